"""Sliced ("tiled") detection: cut a frame into overlapping tiles, map the tiles' boxes back to
the frame, and merge the duplicates that overlaps and tile borders create.

Small objects shrink to a few pixels when a large frame is resized to the model's input; run on
tiles of about the model's input size they keep their size (SAHI, Akyon et al. 2022). The
vocabulary follows SAHI: ``nms`` keeps the best box of a cluster; ``greedy_ios`` ("greedy
non-maximum merging" by intersection over the smaller box) also folds a box cut by a tile border
into the whole box another tile or the full frame saw, growing the kept box to their union.

Pure numpy/OpenCV functions; the callers (``finestream label``, the inference stage) decide
what to run on the tiles.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import cv2
import numpy as np


class MergeMethod(str, enum.Enum):
    NMS = "nms"  # class-aware non-maximum suppression by IoU
    GREEDY_IOS = "greedy_ios"  # class-aware greedy merging by intersection over the smaller box


@dataclass(frozen=True)
class Tile:
    """A tile of a frame, in frame pixels: columns ``x0:x1``, rows ``y0:y1``."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


def _axis_starts(length: int, tile: int, overlap_px: int) -> list[int]:
    if tile >= length:
        return [0]
    stride = tile - overlap_px
    count = math.ceil((length - tile) / stride) + 1
    # Spread the tiles evenly so the last one ends at the edge (no thin sliver tile).
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def tile_grid(width: int, height: int, tile_wh: tuple[int, int], overlap: float | int = 0.2) -> list[Tile]:
    """Overlapping tiles covering a ``width`` x ``height`` frame, row by row.

    Args:
        tile_wh: (width, height) of a tile in pixels; a frame smaller than a tile gives one tile
            of the frame's size.
        overlap: between neighbouring tiles, as a fraction of the tile side (a float < 1) or in
            pixels (an int >= 1). Tiles are spread evenly, so the real overlap is at least this.

    Raises:
        ValueError: non-positive sizes, or an overlap that leaves no stride.
    """
    tile_w, tile_h = tile_wh
    if width < 1 or height < 1 or tile_w < 1 or tile_h < 1:
        raise ValueError(f"frame {width}x{height} and tile {tile_w}x{tile_h} must be positive")
    if isinstance(overlap, float) and not isinstance(overlap, bool):
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"tile overlap as a fraction must be in [0, 1), got {overlap}")
        overlap_w, overlap_h = round(overlap * tile_w), round(overlap * tile_h)
    else:
        overlap_w = overlap_h = int(overlap)
    if overlap_w >= tile_w or overlap_h >= tile_h or overlap_w < 0:
        raise ValueError(f"tile overlap {overlap} leaves no stride for a {tile_w}x{tile_h} tile")
    tw, th = min(tile_w, width), min(tile_h, height)
    return [
        Tile(x, y, x + tw, y + th)
        for y in _axis_starts(height, th, overlap_h)
        for x in _axis_starts(width, tw, overlap_w)
    ]


def _pairwise_intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    return np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def merge_detections(
    labels: np.ndarray,
    boxes_xyxy: np.ndarray,
    scores: np.ndarray,
    method: MergeMethod = MergeMethod.GREEDY_IOS,
    threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge detections of one frame gathered from several tiles (and the full frame).

    Args:
        labels: int64 ``(N,)``; boxes of different labels never merge.
        boxes_xyxy: float32 ``(N, 4)`` in frame pixels.
        scores: float32 ``(N,)``.
        method: ``nms`` drops a box whose IoU with a better box of its class exceeds
            ``threshold``; ``greedy_ios`` takes boxes best first and folds every remaining box
            of the same class whose intersection over the *smaller* of the two exceeds
            ``threshold`` into it (the kept box grows to their union; its score stays the
            best), so a box cut by a tile border joins the whole box.

    Returns:
        ``labels``, ``boxes_xyxy``, ``scores`` of the kept detections, best first.
    """
    method = MergeMethod(method)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"merge threshold must be in (0, 1], got {threshold}")
    n = len(scores)
    if n == 0:
        return labels.astype(np.int64), boxes_xyxy.astype(np.float32).reshape(0, 4), scores.astype(np.float32)
    labels = labels.astype(np.int64)
    boxes = boxes_xyxy.astype(np.float32).reshape(n, 4)
    scores = scores.astype(np.float32)

    if method is MergeMethod.NMS:
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        keep = cv2.dnn.NMSBoxesBatched(
            xywh.tolist(), scores.tolist(), labels.tolist(), score_threshold=0.0, nms_threshold=threshold
        )
        keep = np.asarray(keep, dtype=np.int64).reshape(-1)
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        return labels[keep], boxes[keep], scores[keep]

    order = np.argsort(-scores, kind="stable")
    labels, boxes, scores = labels[order], boxes[order], scores[order]
    intersection = _pairwise_intersection(boxes, boxes)
    area = _area(boxes)
    smaller = np.minimum(area[:, None], area[None, :])
    ios = np.divide(intersection, smaller, out=np.zeros_like(intersection), where=smaller > 0)
    same_class = labels[:, None] == labels[None, :]
    mergeable = (ios > threshold) & same_class

    taken = np.zeros(n, dtype=bool)
    kept_labels, kept_boxes, kept_scores = [], [], []
    for i in range(n):
        if taken[i]:
            continue
        group = mergeable[i] & ~taken
        group[i] = True
        taken |= group
        members = boxes[group]
        kept_boxes.append(np.concatenate([members[:, :2].min(axis=0), members[:, 2:].max(axis=0)]))
        kept_labels.append(labels[i])
        kept_scores.append(scores[i])
    return (
        np.asarray(kept_labels, dtype=np.int64),
        np.asarray(kept_boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(kept_scores, dtype=np.float32),
    )
