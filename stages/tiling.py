"""Sliced ("tiled") detection: cut a frame into overlapping tiles, map the tiles' boxes back to
the frame, and merge the duplicates that overlaps and tile borders create.

Small objects shrink to a few pixels when a large frame is resized to the model's input; run on
tiles of about the model's input size they keep their size (SAHI, Akyon et al. 2022). The
vocabulary follows SAHI: ``nms`` keeps the best box of a cluster; ``greedy_ios`` ("greedy
non-maximum merging" by intersection over the smaller box) also folds a box cut by a tile border
into the whole box another tile or the full frame saw, growing the kept box to their union.

Pure numpy/OpenCV functions; the callers (``finestream label``, the inference stage) decide
what to run on the tiles. :class:`TilingConfig` is the ``model.tiling`` section of a run config
(the preprocessor cuts the crops, the inference stage merges what the model finds on them), and
:func:`merge_crops` is the one way crop detections become frame detections, for both callers.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np


class MergeMethod(str, enum.Enum):
    NMS = "nms"  # class-aware non-maximum suppression by IoU
    GREEDY_IOS = "greedy_ios"  # class-aware greedy merging by intersection over the smaller box


@dataclass(frozen=True)
class TilingConfig:
    """Sliced inference in a run (the ``model.tiling`` section; off by default).

    Attributes:
        enabled: cut every frame into tiles and run the model on each.
        tile_px: side of a square tile in frame pixels; ``None``: the model's input side, so
            a tile reaches the model at its own scale.
        overlap: between neighbouring tiles: below 1 a fraction of the tile side, from 1 on
            pixels.
        full_frame: also run the whole frame (in the same batch), for objects larger than
            a tile.
        merge: how duplicates across tiles are merged (``nms`` or ``greedy_ios``).
        merge_threshold: the IoU (``nms``) or intersection over the smaller box
            (``greedy_ios``) above which two boxes of a class are one object.
    """

    enabled: bool = False
    tile_px: int | None = None
    overlap: float = 0.2
    full_frame: bool = True
    merge: MergeMethod = MergeMethod.GREEDY_IOS
    merge_threshold: float = 0.5

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "merge", MergeMethod(self.merge))
        except ValueError:
            choices = ", ".join(m.value for m in MergeMethod)
            raise ValueError(
                f"model.tiling.merge must be one of {choices}, got {self.merge!r}"
            ) from None
        if self.tile_px is not None and self.tile_px < 32:
            raise ValueError(
                f"model.tiling.tile_px must be >= 32 (null: the model input side), got {self.tile_px}"
            )
        if self.overlap < 0:
            raise ValueError(
                f"model.tiling.overlap must be >= 0 (a fraction below 1, else pixels), got {self.overlap}"
            )
        side = self.tile_px
        if self.overlap >= 1 and side is not None and self.overlap >= side:
            raise ValueError(
                f"model.tiling.overlap {self.overlap:g} px leaves no stride for {side} px tiles; "
                "give a fraction below 1 or fewer pixels"
            )
        if not 0.0 < self.merge_threshold <= 1.0:
            raise ValueError(
                f"model.tiling.merge_threshold must be in (0, 1], got {self.merge_threshold}"
            )

    def overlap_arg(self) -> float | int:
        """``overlap`` in the form :func:`tile_grid` takes (a float fraction or int pixels)."""
        return float(self.overlap) if self.overlap < 1 else int(round(self.overlap))


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


def tile_grid(
    width: int, height: int, tile_wh: tuple[int, int], overlap: float | int = 0.2
) -> list[Tile]:
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
        return (
            labels.astype(np.int64),
            boxes_xyxy.astype(np.float32).reshape(0, 4),
            scores.astype(np.float32),
        )
    labels = labels.astype(np.int64)
    boxes = boxes_xyxy.astype(np.float32).reshape(n, 4)
    scores = scores.astype(np.float32)

    if method is MergeMethod.NMS:
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        found = cv2.dnn.NMSBoxesBatched(
            xywh.tolist(),
            scores.tolist(),
            labels.tolist(),
            score_threshold=0.0,
            nms_threshold=threshold,
        )
        keep = np.asarray(found, dtype=np.int64).reshape(-1)
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


def frame_crops(width: int, height: int, config: TilingConfig, model_side: int) -> list[Tile]:
    """The crops one frame is run on: the whole frame first when ``config.full_frame``, then
    the tiles (:func:`tile_grid`). A frame no larger than a tile is one crop, the frame.

    Args:
        model_side: the model's input side, the tile side when ``config.tile_px`` is ``None``.
    """
    side = config.tile_px or model_side
    if side > 0 and config.overlap >= 1 and config.overlap >= side:
        raise ValueError(
            f"model.tiling.overlap {config.overlap:g} px leaves no stride for {side} px tiles"
        )
    tiles = tile_grid(width, height, (side, side), config.overlap_arg())
    whole = Tile(0, 0, width, height)
    if len(tiles) == 1:
        return [whole]
    return [whole, *tiles] if config.full_frame else tiles


def _min_overlaps(crops: Sequence[Tile]) -> tuple[int, int]:
    """The smallest overlap (x, y) between neighbouring tiles of a grid (not the whole frame)."""
    out = []
    for start, end in ((lambda t: t.x0, lambda t: t.x1), (lambda t: t.y0, lambda t: t.y1)):
        starts = sorted({start(t) for t in crops})
        side = max(end(t) - start(t) for t in crops)
        steps = [b - a for a, b in zip(starts, starts[1:])]
        out.append(side - max(steps) if steps else 0)
    return out[0], out[1]


def drop_border_cut(
    boxes_xyxy: np.ndarray,
    tile: Tile,
    frame_wh: tuple[int, int],
    overlap_xy: tuple[int, int],
    margin_px: float = 2.0,
) -> np.ndarray:
    """bool ``(K,)``: which boxes of one tile to keep, dropping those cut by an inner border.

    A box touching an edge of the tile that is not an edge of the frame, and narrower (along
    that axis) than the tiles' overlap, is a piece of an object the neighbouring tile sees
    whole: the object starts inside the overlap band, so it ends inside the neighbour. Counting
    the piece as well would count the object twice (NMS keeps both: their IoU is low). Wider
    boxes stay: no neighbour is sure to hold them whole, and the merge joins them.

    Args:
        boxes_xyxy: float32 ``(K, 4)`` in frame pixels.
    """
    width, height = frame_wh
    ov_x, ov_y = overlap_xy
    w = boxes_xyxy[:, 2] - boxes_xyxy[:, 0]
    h = boxes_xyxy[:, 3] - boxes_xyxy[:, 1]
    cut = np.zeros(len(boxes_xyxy), dtype=bool)
    if tile.x0 > 0:
        cut |= (boxes_xyxy[:, 0] <= tile.x0 + margin_px) & (w < ov_x)
    if tile.x1 < width:
        cut |= (boxes_xyxy[:, 2] >= tile.x1 - margin_px) & (w < ov_x)
    if tile.y0 > 0:
        cut |= (boxes_xyxy[:, 1] <= tile.y0 + margin_px) & (h < ov_y)
    if tile.y1 < height:
        cut |= (boxes_xyxy[:, 3] >= tile.y1 - margin_px) & (h < ov_y)
    keep: np.ndarray = ~cut
    return keep


CropResult = tuple[np.ndarray, np.ndarray, np.ndarray]


def merge_crops(
    results: Sequence[CropResult],
    crops: Sequence[Tile],
    frame_wh: tuple[int, int],
    method: MergeMethod = MergeMethod.GREEDY_IOS,
    threshold: float = 0.5,
) -> CropResult:
    """Detections of a frame from the detections of its crops.

    Args:
        results: per crop ``(labels int64 (K,), boxes_xyxy float32 (K, 4) in that crop's
            pixels, scores float32 (K,))``, already filtered by score and class.
        crops: where each crop lies in the frame (the whole frame is ``Tile(0, 0, W, H)``).
        frame_wh: the frame's (width, height).

    Returns:
        ``labels``, ``boxes_xyxy`` (frame pixels, not clipped), ``scores``, best first: every
        box mapped back by its crop's offset, pieces cut by inner tile borders dropped
        (:func:`drop_border_cut`), duplicates merged (:func:`merge_detections`). One crop that is
        the whole frame comes back as it is.
    """
    if len(results) != len(crops):
        raise ValueError(f"{len(results)} crop results for {len(crops)} crops")
    width, height = frame_wh
    if len(crops) == 1 and crops[0] == Tile(0, 0, width, height):
        labels, boxes, scores = results[0]
        return (
            labels.astype(np.int64),
            boxes.astype(np.float32).reshape(-1, 4),
            scores.astype(np.float32),
        )
    tiles = [c for c in crops if c != Tile(0, 0, width, height)]
    overlap_xy = _min_overlaps(tiles) if tiles else (0, 0)
    all_labels, all_boxes, all_scores = [], [], []
    for crop, (labels, boxes, scores) in zip(crops, results):
        shifted = boxes.astype(np.float32).reshape(-1, 4) + np.array(
            [crop.x0, crop.y0, crop.x0, crop.y0], dtype=np.float32
        )
        keep = drop_border_cut(shifted, crop, frame_wh, overlap_xy)
        all_labels.append(labels[keep])
        all_boxes.append(shifted[keep])
        all_scores.append(scores[keep])
    return merge_detections(
        np.concatenate(all_labels),
        np.concatenate(all_boxes),
        np.concatenate(all_scores),
        method,
        threshold,
    )


@dataclass
class TiledInput:
    """The model input of one frame under tiling (``FramePacket.model_input``).

    Attributes:
        images: float32 ``(B, 3, S, S)`` RGB in [0, 1], one row per crop, each crop stretched to
            S x S as a whole frame would be (``stages.preprocess``).
        crops: ``B`` crops in frame pixels, row order; the whole frame is ``Tile(0, 0, W, H)``.
    """

    images: Any
    crops: tuple[Tile, ...]

    def __post_init__(self) -> None:
        if len(self.crops) != int(self.images.shape[0]):
            raise ValueError(
                f"TiledInput: {len(self.crops)} crops for a batch of {int(self.images.shape[0])}"
            )
