"""``finestream label``: turn footage into a COCO detection dataset with a teacher model.

Videos and image folders → sampled frames (every k-th, and only frames that changed enough since
the last kept one) → the teacher (any model finestream runs), on the whole frame and optionally
on overlapping tiles merged with it → class subset, renaming/merging, score and size filters →
JPEG frames plus ``train.json`` / ``val.json`` (and ``test.json`` for held-out sources) that
``finestream train`` reads.

The split never puts neighbouring frames of one clip on both sides: ``time`` sends the last part
of every clip to validation (with a gap before it), ``clip`` sends whole clips; sources named with
``holdout`` go to ``test.json`` entirely (an unseen scene).

Runs in the calling thread: labelling is a batch job, no live sources.
"""

from __future__ import annotations

import enum
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np
import torch

from dfine.backends.base import DetectorBackend
from stages.decode import frame_to_rgb_u8
from stages.preprocess import image_to_model_input
from stages.tiling import MergeMethod, Tile, merge_crops, tile_grid

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SMALL_BOX_PX = 32  # COCO's "small": area under 32x32 pixels
_THUMB_WH = (64, 36)


class LabelError(ValueError):
    """Bad input to ``finestream label`` (one line: the thing and the fix)."""


class SplitBy(str, enum.Enum):
    TIME = "time"  # the last part of every clip is validation
    CLIP = "clip"  # whole clips are validation (needs two or more sources)


@dataclass(frozen=True)
class LabelSettings:
    """What to keep and how to split; see ``finestream label --help`` for each."""

    every: int = 1
    min_change: float = 0.0
    score_threshold: float = 0.4
    classes: tuple[str, ...] | None = None
    rename: dict[str, str] = field(default_factory=dict)
    min_box_px: float = 4.0
    split_by: SplitBy = SplitBy.TIME
    val_fraction: float = 0.2
    gap_s: float = 1.0
    tile_px: int | None = None
    tile_overlap: float = 0.2
    merge: MergeMethod = MergeMethod.GREEDY_IOS
    merge_threshold: float = 0.5
    max_batch: int = 8
    jpeg_quality: int = 92

    def __post_init__(self) -> None:
        if self.every < 1:
            raise LabelError(f"--every must be >= 1, got {self.every}")
        if self.min_change < 0:
            raise LabelError(
                f"--min-change must be >= 0 (mean grey difference, 0-255), got {self.min_change}"
            )
        if not 0.0 <= self.score_threshold <= 1.0:
            raise LabelError(f"--threshold must be in [0, 1], got {self.score_threshold}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise LabelError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.tile_px is not None and self.tile_px < 32:
            raise LabelError(f"--tile must be at least 32 pixels, got {self.tile_px}")
        if self.max_batch < 1:
            raise LabelError(f"--max-batch must be >= 1, got {self.max_batch}")


@dataclass
class SourceFrame:
    """One sampled frame: where it came from and its picture, uint8 ``(H, W, 3)`` RGB."""

    source_index: int
    frame_index: int
    pts_s: float
    image_rgb_u8: np.ndarray


@dataclass
class LabelledFrame:
    """A kept frame after the teacher: boxes in source pixels, labels in the output classes."""

    file_name: str
    width: int
    height: int
    source_index: int
    pts_s: float
    boxes_xyxy: np.ndarray
    labels: np.ndarray
    scores: np.ndarray


@dataclass
class LabelSummary:
    """What a labelling run produced (also written as ``summary.json``)."""

    frames_read: int = 0
    frames_kept: int = 0
    boxes_per_class: dict[str, int] = field(default_factory=dict)
    frames_per_split: dict[str, int] = field(default_factory=dict)
    boxes_per_split: dict[str, int] = field(default_factory=dict)
    full_frame_boxes: int = 0
    merged_boxes: int = 0
    small_boxes_full_frame: int = 0
    small_boxes_merged: int = 0

    def lines(self) -> list[str]:
        out = [
            f"frames: {self.frames_read} read, {self.frames_kept} kept "
            + ", ".join(f"{k} {v}" for k, v in self.frames_per_split.items()),
            "boxes per class: "
            + (", ".join(f"{k} {v}" for k, v in self.boxes_per_class.items()) or "none"),
        ]
        if self.merged_boxes != self.full_frame_boxes:
            out.append(
                f"tiling: {self.full_frame_boxes} boxes from the whole frame alone, {self.merged_boxes} "
                f"with tiles merged in; boxes under {SMALL_BOX_PX} px: {self.small_boxes_full_frame} → "
                f"{self.small_boxes_merged}"
            )
        return out


def check_sources(sources: Sequence[Path]) -> None:
    """Refuse missing, empty and unreadable sources before any model loads."""
    if not sources:
        raise LabelError("no --source given: name a video file or a folder of images")
    for path in sources:
        if not path.exists():
            raise LabelError(f"--source {path}: no such file or folder")
        if path.is_dir():
            if not _image_files(path):
                raise LabelError(
                    f"--source {path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})"
                )
            continue
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise LabelError(f"--source {path}: has no video stream; give a video file")
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                next(container.decode(stream))
        except (av.error.FFmpegError, StopIteration, UnicodeDecodeError):
            raise LabelError(f"--source {path}: not a readable video (no frame decodes)") from None


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _iter_video(path: Path) -> Iterator[tuple[int, float, np.ndarray]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        for index, frame in enumerate(container.decode(stream)):
            pts_s = float(frame.time) if frame.time is not None else index / rate
            yield index, pts_s, frame_to_rgb_u8(frame)


def _iter_images(folder: Path) -> Iterator[tuple[int, float, np.ndarray]]:
    for index, path in enumerate(_image_files(folder)):
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise LabelError(f"{path}: not a readable image; remove it or replace it")
        # The index stands in for time: files sorted by name are taken as a sequence.
        yield index, float(index), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _thumbnail(image_rgb_u8: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(image_rgb_u8, cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, _THUMB_WH, interpolation=cv2.INTER_AREA).astype(np.float32)


def sample_frames(
    sources: Sequence[Path], every: int, min_change: float, counter: Counter[str] | None = None
) -> Iterator[SourceFrame]:
    """Every ``every``-th frame of each source whose mean grey difference from the last kept
    frame (on a 64x36 thumbnail, 0-255) is at least ``min_change``; ``counter["read"]`` counts
    all frames read."""
    for source_index, path in enumerate(sources):
        frames = _iter_images(path) if path.is_dir() else _iter_video(path)
        last_thumb: np.ndarray | None = None
        for frame_index, pts_s, rgb in frames:
            if counter is not None:
                counter["read"] += 1
            if frame_index % every:
                continue
            if min_change > 0:
                thumb = _thumbnail(rgb)
                if last_thumb is not None and float(np.abs(thumb - last_thumb).mean()) < min_change:
                    continue
                last_thumb = thumb
            yield SourceFrame(source_index, frame_index, pts_s, rgb)


class Teacher:
    """A backend run on whole frames, and optionally on tiles merged with the whole frame."""

    def __init__(self, backend: DetectorBackend, settings: LabelSettings) -> None:
        self.backend = backend
        self.settings = settings
        self.input_side = backend.input_size_hw[0]

    def _run(self, crops: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        results: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        step = self.settings.max_batch
        for start in range(0, len(crops), step):
            chunk = crops[start : start + step]
            images = torch.cat(
                [
                    image_to_model_input(
                        c, self.input_side, self.backend.device, resize_in_uint8=True
                    )
                    for c in chunk
                ]
            )
            sizes = torch.tensor([[c.shape[1], c.shape[0]] for c in chunk], dtype=torch.int64)
            labels, boxes, scores = self.backend(images, sizes.to(self.backend.device))
            for i in range(len(chunk)):
                keep = scores[i] >= self.settings.score_threshold
                results.append((labels[i][keep], boxes[i][keep], scores[i][keep]))
        return results

    def detect(
        self, image_rgb_u8: np.ndarray
    ) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        """``(full_frame, merged)`` detections, each ``(labels, boxes_xyxy, scores)`` in frame
        pixels; ``merged`` is ``full_frame`` when tiling is off."""
        height, width = image_rgb_u8.shape[:2]
        tiles: list[Tile] = []
        if self.settings.tile_px is not None:
            side = self.settings.tile_px
            grid = tile_grid(width, height, (side, side), self.settings.tile_overlap)
            tiles = grid if len(grid) > 1 else []
        crops = [image_rgb_u8] + [image_rgb_u8[t.y0 : t.y1, t.x0 : t.x1] for t in tiles]
        results = self._run(crops)
        full = results[0]
        if not tiles:
            return full, full
        # The inference stage's merge (shift to frame pixels, drop border-cut pieces, merge).
        merged = merge_crops(
            results,
            [Tile(0, 0, width, height), *tiles],
            (width, height),
            self.settings.merge,
            self.settings.merge_threshold,
        )
        return full, merged


def class_mapping(
    teacher_names: Sequence[str], keep: Sequence[str] | None, rename: dict[str, str]
) -> tuple[list[str], dict[int, int]]:
    """Output class names and ``teacher label → output label`` for the kept classes.

    Renaming to a name that another kept class also gets merges them (``truck=car``).
    """
    known = list(teacher_names)
    chosen = list(keep) if keep is not None else known
    for name in [*chosen, *rename]:
        if name not in known:
            raise LabelError(
                f"class {name!r} is not one of the teacher's classes (e.g. {', '.join(known[:8])}, ...)"
            )
    for source in rename:
        if source not in chosen:
            raise LabelError(f"--rename {source}=...: {source!r} is not among the kept --classes")
    names: list[str] = []
    mapping: dict[int, int] = {}
    for name in chosen:
        out = rename.get(name, name)
        if out not in names:
            names.append(out)
        mapping[known.index(name)] = names.index(out)
    return names, mapping


def _assign_splits(
    frames: Sequence[LabelledFrame], num_sources: int, holdout: set[int], settings: LabelSettings
) -> list[str]:
    """``train``, ``val``, ``test`` or ``drop`` (inside the gap) per frame."""
    if settings.split_by is SplitBy.CLIP:
        candidates = [i for i in range(num_sources) if i not in holdout]
        count = (
            math.ceil(len(candidates) * settings.val_fraction) if settings.val_fraction > 0 else 0
        )
        if count >= len(candidates) and count > 0:
            raise LabelError(
                "--split clip needs at least two sources that are not held out (one for training, one for validation)"
            )
        val_sources = set(candidates[len(candidates) - count :]) if count else set()
        return [
            "test"
            if f.source_index in holdout
            else "val"
            if f.source_index in val_sources
            else "train"
            for f in frames
        ]
    end_s: dict[int, float] = {}
    start_s: dict[int, float] = {}
    for f in frames:
        end_s[f.source_index] = max(end_s.get(f.source_index, f.pts_s), f.pts_s)
        start_s[f.source_index] = min(start_s.get(f.source_index, f.pts_s), f.pts_s)
    splits = []
    for f in frames:
        if f.source_index in holdout:
            splits.append("test")
            continue
        begin, end = start_s[f.source_index], end_s[f.source_index]
        boundary = end - settings.val_fraction * (end - begin)
        # A short clip keeps most of its training part: the gap is at most a tenth of the clip.
        gap_s = min(settings.gap_s, 0.1 * (end - begin))
        if settings.val_fraction > 0 and f.pts_s >= boundary:
            splits.append("val")
        elif settings.val_fraction > 0 and f.pts_s > boundary - gap_s:
            splits.append("drop")  # neighbours of the first validation frames: near-duplicates
        else:
            splits.append("train")
    return splits


def _coco(frames: Sequence[LabelledFrame], class_names: Sequence[str], description: str) -> dict:
    images, annotations = [], []
    for image_id, f in enumerate(frames, start=1):
        images.append(
            {"id": image_id, "file_name": f.file_name, "width": f.width, "height": f.height}
        )
        for box, label, score in zip(f.boxes_xyxy, f.labels, f.scores):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                    "area": round((x2 - x1) * (y2 - y1), 2),
                    "iscrowd": 0,
                    "score": round(float(score), 4),
                }
            )
    return {
        "info": {"description": description},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)],
    }


def _count_small(boxes_xyxy: np.ndarray) -> int:
    if len(boxes_xyxy) == 0:
        return 0
    area = (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])
    return int((area < SMALL_BOX_PX * SMALL_BOX_PX).sum())


def label_sources(
    teacher: Teacher,
    teacher_names: Sequence[str],
    sources: Sequence[Path],
    out_dir: Path,
    settings: LabelSettings,
    holdout: Sequence[Path] = (),
    progress: Callable[[int], None] | None = None,
) -> LabelSummary:
    """Label ``sources`` (and ``holdout``) into a COCO dataset under ``out_dir``.

    Writes ``images/<source stem>/<frame>.jpg``, ``train.json``, ``val.json``, ``test.json``
    (held-out sources only) and ``summary.json``; ``progress(frames_read)`` is called per frame.
    """
    class_names, mapping = class_mapping(teacher_names, settings.classes, settings.rename)
    all_sources = [*sources, *holdout]
    holdout_ids = set(range(len(sources), len(all_sources)))
    stems = _unique_stems(all_sources)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)

    summary = LabelSummary()
    counter: Counter[str] = Counter()
    frames: list[LabelledFrame] = []
    teacher_ids = np.array(sorted(mapping), dtype=np.int64)
    output_of = np.zeros(max(len(teacher_names), 1), dtype=np.int64)
    for k, v in mapping.items():
        output_of[k] = v
    for sampled in sample_frames(all_sources, settings.every, settings.min_change, counter):
        full, merged = teacher.detect(sampled.image_rgb_u8)
        summary.full_frame_boxes += int(np.isin(full[0], teacher_ids).sum())
        summary.small_boxes_full_frame += _count_small(full[1][np.isin(full[0], teacher_ids)])
        labels, boxes, scores = merged
        height, width = sampled.image_rgb_u8.shape[:2]
        boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
        sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        keep = np.isin(labels, teacher_ids) & (sides >= settings.min_box_px)
        labels, boxes, scores = output_of[labels[keep]], boxes[keep], scores[keep]
        summary.merged_boxes += int(keep.sum())
        summary.small_boxes_merged += _count_small(boxes)

        file_name = f"images/{stems[sampled.source_index]}/{sampled.frame_index:06d}.jpg"
        path = out_dir / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        bgr = cv2.cvtColor(sampled.image_rgb_u8, cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, settings.jpeg_quality]):
            raise OSError(f"cannot write {path}")
        frames.append(
            LabelledFrame(
                file_name, width, height, sampled.source_index, sampled.pts_s, boxes, labels, scores
            )
        )
        if progress is not None:
            progress(counter["read"])

    summary.frames_read = counter["read"]
    splits = _assign_splits(frames, len(all_sources), holdout_ids, settings)
    for split in ("train", "val", "test"):
        chosen = [f for f, s in zip(frames, splits) if s == split]
        if split == "test" and not holdout:
            continue
        description = (
            f"finestream label: {split} split ({settings.split_by.value}), {len(chosen)} frames"
        )
        (out_dir / f"{split}.json").write_text(json.dumps(_coco(chosen, class_names, description)))
        summary.frames_per_split[split] = len(chosen)
        summary.boxes_per_split[split] = int(sum(len(f.labels) for f in chosen))
    dropped = [f for f, s in zip(frames, splits) if s == "drop"]
    for f in dropped:
        (out_dir / f.file_name).unlink(missing_ok=True)
    summary.frames_kept = len(frames) - len(dropped)
    per_class = Counter(
        int(label) for f, s in zip(frames, splits) if s != "drop" for label in f.labels
    )
    summary.boxes_per_class = {name: per_class.get(i, 0) for i, name in enumerate(class_names)}
    (out_dir / "summary.json").write_text(json.dumps(summary.__dict__, indent=2))
    return summary


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    stems: list[str] = []
    for path in paths:
        stem = path.stem if path.is_file() else path.name
        candidate, n = stem, 1
        while candidate in stems:
            n += 1
            candidate = f"{stem}_{n}"
        stems.append(candidate)
    return stems
