"""Reading and validating detection datasets: COCO JSON or a YOLO ``data.yaml``.

``load_dataset`` turns either format into one :class:`DatasetSpec` of :class:`Sample` records
(source-pixel ``xyxy`` boxes, contiguous labels ``0..N-1``) and checks *everything* before a
training step is taken: every image exists, opens (Pillow ``verify()``) and has the size the
annotations claim; every box lies inside its image (1 px tolerance, then clipped) and has a
positive size; every category is known. The first problem raises :class:`DatasetError`, one line
that names the file (and the image or annotation) and says how to fix it. Images without boxes
are kept as negatives.

COCO: category ids may be anything (1, 3, 17, ...); they are remapped to ``0..N-1`` in sorted-id
order and their names kept, so the official "ids must be 0-based" trap cannot happen. ``iscrowd=1``
boxes are skipped (the official trainer drops them too). Without ``val_data`` the validation set
is the last ``val_fraction`` of the images sorted by file name: for frames of a clip that is the
later part of the clip, so near-duplicate neighbours of a training frame do not inflate val mAP
the way a random split would.

YOLO (Ultralytics layout): ``path`` (root, relative to the YAML's folder), ``train``/``val`` (a
folder of images, a ``.txt`` list of images, or a list of either), ``names`` (list, or dict
``{index: name}``). Labels are ``labels/<stem>.txt`` beside ``images/``, one
``cls cx cy w h`` line per box, normalised to the image. A missing label file is a negative.

``to_coco_ground_truth`` writes samples back as a COCO dict for faster-coco-eval.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

# Boxes may overhang their image by this much (annotation tools round outwards); beyond it the
# annotation is wrong and refused. Within it the box is clipped to the image.
BOX_TOLERANCE_PX = 1.0

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """A dataset file is wrong; the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class Sample:
    """One image and its boxes.

    Attributes:
        image_path: the image file.
        width, height: pixels as stored in the file (checked against the annotations; EXIF
            orientation is not applied, like the official loader's ``PIL.Image.open``).
        boxes_xyxy: float32 ``(n, 4)`` source pixels, ``0 <= x1 < x2 <= width``,
            ``0 <= y1 < y2 <= height``; ``n`` may be 0 (a negative).
        labels: int64 ``(n,)`` contiguous class index ``0..N-1``.
        image_id: unique within its split (COCO: the file's image id).
    """

    image_path: Path
    width: int
    height: int
    boxes_xyxy: np.ndarray
    labels: np.ndarray
    image_id: int


@dataclass(frozen=True)
class DatasetSpec:
    """A validated dataset: class names (index = label) and the train and val samples."""

    class_names: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    description: str


def load_dataset(
    data: Path,
    images_dir: Path | None = None,
    val_data: Path | None = None,
    val_fraction: float = 0.1,
) -> DatasetSpec:
    """Read and validate a COCO annotations JSON or a YOLO ``data.yaml``.

    Args:
        data: ``*.json`` (COCO) or ``*.yaml``/``*.yml`` (YOLO).
        images_dir: COCO only: the folder ``file_name`` is relative to (default: the JSON's).
        val_data: COCO only: a second annotations JSON for validation (same categories).
        val_fraction: COCO without ``val_data``: the share of images, last by file name, kept
            for validation (0 = none).

    Raises:
        DatasetError: the first problem found, in one line naming the file and the fix.
    """
    data = Path(data)
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction={val_fraction}: must be in [0, 1), e.g. 0.1")
    if not data.is_file():
        raise DatasetError(
            f"{data}: no such dataset file; pass a COCO annotations .json or a YOLO data.yaml"
        )
    suffix = data.suffix.lower()
    if suffix == ".json":
        return _load_coco_dataset(data, images_dir, val_data, val_fraction)
    if suffix in (".yaml", ".yml"):
        if images_dir is not None or val_data is not None:
            raise DatasetError(
                f"{data}: a YOLO data.yaml names its own image folders and val set; "
                "drop the images/val options"
            )
        return _load_yolo_dataset(data)
    raise DatasetError(
        f"{data}: unknown dataset format {suffix!r}; pass a COCO annotations .json or a YOLO data.yaml"
    )


# --------------------------------------------------------------------------------------------
# Shared checks


def _read_image_size(path: Path, where: str) -> tuple[int, int]:
    """(width, height) of an image file, after Pillow's integrity check; ``where`` prefixes errors."""
    if not path.is_file():
        raise DatasetError(
            f"{where}: image file {path} not found; add the file or fix its path "
            "(COCO: file_name is relative to the JSON's folder or to the images folder option)"
        )
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DatasetError(
            f"{where}: image {path} is corrupt or not an image ({reason}); "
            "replace the file or remove it from the annotations"
        ) from None
    return int(size[0]), int(size[1])


def _exif_turned(path: Path) -> bool:
    """Whether the file's EXIF orientation turns it by 90 degrees (orientations 5-8)."""
    try:
        with Image.open(path) as image:
            return image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except (OSError, ValueError):
        return False


def _read_image_sizes(paths: Sequence[Path], wheres: Sequence[str]) -> list[tuple[int, int]]:
    """(width, height) of each image, checked in parallel (the work is file I/O); the first
    failure in list order is raised."""
    if len(paths) < 16:
        return [_read_image_size(p, w) for p, w in zip(paths, wheres)]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        return list(pool.map(_read_image_size, paths, wheres))


def _check_box(
    x1: float, y1: float, x2: float, y2: float, width: int, height: int, where: str
) -> tuple[float, float, float, float]:
    """The box clipped to its image; refuses a non-positive size or an overhang beyond tolerance."""
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise DatasetError(
            f"{where}: box has a non-finite coordinate; fix or delete the annotation"
        )
    if x2 <= x1 or y2 <= y1:
        raise DatasetError(
            f"{where}: box has zero or negative size ({x2 - x1:g} x {y2 - y1:g} px); "
            "fix or delete the annotation"
        )
    tol = BOX_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise DatasetError(
            f"{where}: box xyxy [{x1:g}, {y1:g}, {x2:g}, {y2:g}] lies outside the "
            f"{width}x{height} image by more than {tol:g} px; fix the annotation or the image"
        )
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 <= x1 or y2 <= y1:
        raise DatasetError(
            f"{where}: box has no area inside the {width}x{height} image; fix or delete the annotation"
        )
    return x1, y1, x2, y2


def _boxes_array(boxes: list[tuple[float, float, float, float]]) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def _labels_array(labels: list[int]) -> np.ndarray:
    return np.asarray(labels, dtype=np.int64).reshape(-1)


def _split_last_by_name(
    samples: list[Sample], val_fraction: float
) -> tuple[list[Sample], list[Sample]]:
    """Train = the first images by file name, val = the last ``val_fraction`` (at least one)."""
    ordered = sorted(samples, key=lambda s: str(s.image_path))
    if val_fraction <= 0.0 or len(ordered) < 2:
        return ordered, []
    num_val = min(max(1, round(len(ordered) * val_fraction)), len(ordered) - 1)
    return ordered[:-num_val], ordered[-num_val:]


def _describe_counts(train: Sequence[Sample], val: Sequence[Sample], num_classes: int) -> str:
    num_boxes = sum(len(s.labels) for s in train) + sum(len(s.labels) for s in val)
    negatives = sum(1 for s in (*train, *val) if len(s.labels) == 0)
    return (
        f"{len(train)} train / {len(val)} val images, {num_classes} classes, "
        f"{num_boxes} boxes, {negatives} images without boxes"
    )


# --------------------------------------------------------------------------------------------
# COCO


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            "fix the file or export it again"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(
            f"{path}: cannot read the file ({exc}); check its permissions and encoding"
        ) from None
    if not isinstance(content, dict):
        raise DatasetError(
            f"{path}: a COCO annotations file is a JSON object with 'images', "
            "'annotations' and 'categories'; this one is not an object"
        )
    return content


def _coco_list(
    path: Path, content: dict[str, Any], key: str, required: bool
) -> list[dict[str, Any]]:
    value = content.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise DatasetError(f"{path}: '{key}' must be a list of objects (COCO format); fix the file")
    return value


def _coco_field(
    path: Path, entry: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str
) -> Any:
    value = entry.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DatasetError(
            f"{path}: {what} has no valid '{key}' (got {value!r}); fix the file (COCO format)"
        )
    return value


def _coco_categories(path: Path, content: dict[str, Any]) -> list[tuple[int, str]]:
    """(COCO id, name) sorted by id: the contiguous label of a category is its position here."""
    categories = _coco_list(path, content, "categories", required=True)
    if not categories:
        raise DatasetError(
            f'{path}: \'categories\' is empty; list every class as {{"id": ..., "name": ...}}'
        )
    pairs: dict[int, str] = {}
    for entry in categories:
        cat_id = _coco_field(path, entry, "id", int, "a category")
        name = _coco_field(path, entry, "name", str, f"category {cat_id}")
        if cat_id in pairs:
            raise DatasetError(
                f"{path}: category id {cat_id} appears twice; give each category its own id"
            )
        pairs[cat_id] = name
    return sorted(pairs.items())


def _coco_samples(
    path: Path, content: dict[str, Any], image_root: Path, label_of: dict[int, int]
) -> tuple[list[Sample], int]:
    """Validated samples of one COCO file, and the number of ``iscrowd`` boxes skipped."""
    images = _coco_list(path, content, "images", required=True)
    if not images:
        raise DatasetError(f"{path}: no images listed; add the 'images' entries (COCO format)")
    annotations = _coco_list(path, content, "annotations", required=False)

    records: dict[int, dict[str, Any]] = {}
    for entry in images:
        image_id = _coco_field(path, entry, "id", int, "an image")
        file_name = _coco_field(path, entry, "file_name", str, f"image {image_id}")
        # width/height may be left out (the file's size is used); when given they must be right.
        sizes = [
            None
            if entry.get(key) is None
            else _coco_field(path, entry, key, int, f"image {file_name!r}")
            for key in ("width", "height")
        ]
        if image_id in records:
            raise DatasetError(
                f"{path}: image id {image_id} appears twice; give each image its own id"
            )
        records[image_id] = {"file_name": file_name, "json_size": sizes, "boxes": [], "labels": []}

    # The images first: boxes are checked against the real sizes.
    wheres = [f"{path}: image {r['file_name']!r}" for r in records.values()]
    real_sizes = _read_image_sizes([image_root / r["file_name"] for r in records.values()], wheres)
    for record, where, (real_w, real_h) in zip(records.values(), wheres, real_sizes):
        json_w, json_h = record["json_size"]
        if (json_w is not None and json_w != real_w) or (json_h is not None and json_h != real_h):
            if (json_w, json_h) == (real_h, real_w) and _exif_turned(
                image_root / record["file_name"]
            ):
                # Annotation tools label the upright (EXIF-rotated) picture; the loader, like the
                # official one, reads the stored pixels: the boxes would not fit the picture.
                raise DatasetError(
                    f"{where}: the JSON says {json_w}x{json_h} but the file stores "
                    f"{real_w}x{real_h} with an EXIF rotation; save the image upright "
                    "(e.g. PIL.ImageOps.exif_transpose) so pixels and boxes agree"
                )
            raise DatasetError(
                f"{where}: the JSON says {json_w}x{json_h} but the file is "
                f"{real_w}x{real_h}; fix width/height in the JSON (and its boxes) or the image"
            )
        record["width"], record["height"] = real_w, real_h

    skipped_crowd = 0
    for entry in annotations:
        ann_id = entry.get("id", "?")
        image_id = entry.get("image_id")
        if not isinstance(image_id, int) or image_id not in records:
            raise DatasetError(
                f"{path}: annotation {ann_id} refers to image id {image_id!r}, which is not in "
                "'images'; add the image or delete the annotation"
            )
        record = records[image_id]
        where = f"{path}: image {record['file_name']!r}, annotation {ann_id}"
        if entry.get("iscrowd", 0) == 1:
            skipped_crowd += 1
            continue
        cat_id = entry.get("category_id")
        if not isinstance(cat_id, int) or isinstance(cat_id, bool) or cat_id not in label_of:
            known = sorted(label_of)
            listed = ", ".join(map(str, known[:12])) + (", ..." if len(known) > 12 else "")
            raise DatasetError(
                f"{where}: unknown category id {cat_id!r} (known: {listed}); "
                "add it to 'categories' or fix the annotation"
            )
        bbox = entry.get("bbox")
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
        ):
            raise DatasetError(
                f"{where}: 'bbox' must be [x, y, width, height] in pixels (got {bbox!r}); "
                "fix the annotation"
            )
        x, y, w, h = (float(v) for v in bbox)
        record["boxes"].append(
            _check_box(x, y, x + w, y + h, record["width"], record["height"], where)
        )
        record["labels"].append(label_of[cat_id])

    samples = [
        Sample(
            image_path=image_root / r["file_name"],
            width=r["width"],
            height=r["height"],
            boxes_xyxy=_boxes_array(r["boxes"]),
            labels=_labels_array(r["labels"]),
            image_id=image_id,
        )
        for image_id, r in records.items()
    ]
    return samples, skipped_crowd


def _load_coco_dataset(
    data: Path, images_dir: Path | None, val_data: Path | None, val_fraction: float
) -> DatasetSpec:
    if images_dir is not None and not Path(images_dir).is_dir():
        raise DatasetError(
            f"{images_dir}: images folder not found; "
            "pass the folder the JSON's file_name entries are in"
        )
    content = _read_json(data)
    categories = _coco_categories(data, content)
    label_of = {cat_id: index for index, (cat_id, _) in enumerate(categories)}
    class_names = tuple(name for _, name in categories)
    image_root = Path(images_dir) if images_dir is not None else data.parent
    samples, crowd = _coco_samples(data, content, image_root, label_of)

    notes = []
    if val_data is not None:
        val_data = Path(val_data)
        if not val_data.is_file():
            raise DatasetError(f"{val_data}: no such validation annotations file; fix the path")
        val_content = _read_json(val_data)
        val_categories = _coco_categories(val_data, val_content)
        for cat_id, name in val_categories:
            if label_of.get(cat_id) is None or class_names[label_of[cat_id]] != name:
                raise DatasetError(
                    f"{val_data}: category {cat_id} {name!r} is not a category of {data}; "
                    "use the same 'categories' in both files"
                )
        val_root = Path(images_dir) if images_dir is not None else val_data.parent
        val, val_crowd = _coco_samples(val_data, val_content, val_root, label_of)
        crowd += val_crowd
        train = sorted(samples, key=lambda s: str(s.image_path))
        val = sorted(val, key=lambda s: str(s.image_path))
        notes.append(f"val from {val_data.name}")
    else:
        train, val = _split_last_by_name(samples, val_fraction)
        if val:
            notes.append(
                f"val = the last {len(val)} images by file name (val_fraction {val_fraction:g}, not random)"
            )
        else:
            notes.append("no val images")
    if crowd:
        notes.append(f"{crowd} iscrowd boxes skipped")
    remap = (
        ""
        if [c for c, _ in categories] == list(range(len(categories)))
        else ("; category ids " + ", ".join(f"{c}->{i}" for i, (c, _) in enumerate(categories)))
    )
    description = (
        f"COCO {data.name}: {_describe_counts(train, val, len(class_names))}; "
        + "; ".join(notes)
        + remap
    )
    logger.info("dataset: %s", description)
    return DatasetSpec(
        class_names=class_names, train=tuple(train), val=tuple(val), description=description
    )


# --------------------------------------------------------------------------------------------
# YOLO


def _yolo_names(path: Path, content: dict[str, Any]) -> tuple[str, ...]:
    names = content.get("names")
    if isinstance(names, list) and names and all(isinstance(n, (str, int)) for n in names):
        result = tuple(str(n) for n in names)
    elif isinstance(names, dict) and names:
        keys = sorted(names)
        if not all(isinstance(k, int) for k in keys) or keys != list(range(len(keys))):
            raise DatasetError(
                f"{path}: 'names' keys must be the class indices 0..N-1 (got {keys}); renumber them"
            )
        result = tuple(str(names[k]) for k in keys)
    else:
        raise DatasetError(
            f"{path}: 'names' must be a list of class names or a dict {{index: name}}; add it"
        )
    nc = content.get("nc")
    if nc is not None and nc != len(result):
        raise DatasetError(
            f"{path}: nc={nc} but 'names' lists {len(result)} classes; make them agree"
        )
    return result


def _yolo_images(path: Path, root: Path, entry: Any, key: str) -> list[Path]:
    """Image files of a ``train``/``val`` entry: folders (recursive), ``.txt`` lists, or a list of both."""
    entries = entry if isinstance(entry, list) else [entry]
    if not entries or not all(isinstance(e, str) for e in entries):
        raise DatasetError(
            f"{path}: '{key}' must be a folder, a .txt list of images, or a list of them"
        )
    found: list[Path] = []
    for item in entries:
        location = Path(item) if Path(item).is_absolute() else root / item
        if location.is_dir():
            found.extend(
                p for p in sorted(location.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif location.is_file() and location.suffix.lower() == ".txt":
            for line in location.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line:
                    image = Path(line)
                    found.append(image if image.is_absolute() else location.parent / image)
        elif location.is_file() and location.suffix.lower() in IMAGE_SUFFIXES:
            found.append(location)
        else:
            raise DatasetError(
                f"{path}: '{key}' entry {item!r} ({location}) not found; fix the path "
                "(relative to 'path', which is relative to the YAML's folder)"
            )
    return found


def _yolo_label_path(image: Path) -> Path | None:
    """``.../images/x/a.jpg`` -> ``.../labels/x/a.txt`` (the last ``images`` folder), as Ultralytics."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return None


def _yolo_sample(image: Path, size_wh: tuple[int, int], num_classes: int, image_id: int) -> Sample:
    width, height = size_wh
    label_path = _yolo_label_path(image)
    if label_path is None:
        raise DatasetError(
            f"{image}: not inside an 'images' folder, so its labels cannot be found; "
            "put images in images/ and labels in labels/ beside it"
        )
    boxes: list[tuple[float, float, float, float]] = []
    labels: list[int] = []
    if label_path.is_file():  # no label file: a negative, as Ultralytics treats it
        for number, line in enumerate(label_path.read_text(encoding="utf-8").splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{label_path}:{number}"
            if len(fields) != 5:
                raise DatasetError(
                    f"{where}: {len(fields)} fields, expected 5 'cls cx cy w h' (normalised); "
                    "fix the line (segmentation polygons are not supported)"
                )
            try:
                cls_f, cx, cy, w, h = (float(f) for f in fields)
            except ValueError:
                raise DatasetError(
                    f"{where}: non-numeric field in {line.strip()!r}; fix the line"
                ) from None
            if cls_f != int(cls_f) or not 0 <= int(cls_f) < num_classes:
                raise DatasetError(
                    f"{where}: unknown class {fields[0]} (data.yaml names {num_classes} classes, "
                    f"0..{num_classes - 1}); fix the line or add the class to 'names'"
                )
            x1, x2 = (cx - w / 2) * width, (cx + w / 2) * width
            y1, y2 = (cy - h / 2) * height, (cy + h / 2) * height
            boxes.append(_check_box(x1, y1, x2, y2, width, height, f"{where} (image {image.name})"))
            labels.append(int(cls_f))
    return Sample(
        image_path=image,
        width=width,
        height=height,
        boxes_xyxy=_boxes_array(boxes),
        labels=_labels_array(labels),
        image_id=image_id,
    )


def _load_yolo_dataset(data: Path) -> DatasetSpec:
    try:
        content = yaml.safe_load(data.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise DatasetError(f"{data}: malformed YAML{at}; fix the file") from None
    if not isinstance(content, dict):
        raise DatasetError(
            f"{data}: a YOLO data.yaml is a mapping with 'path', 'train', 'val' and 'names'"
        )
    class_names = _yolo_names(data, content)
    root_entry = content.get("path")
    if root_entry is not None and not isinstance(root_entry, str):
        raise DatasetError(f"{data}: 'path' must be the dataset folder; fix it")
    root = (
        data.parent
        if root_entry is None
        else (Path(root_entry) if Path(root_entry).is_absolute() else data.parent / root_entry)
    )
    if "train" not in content:
        raise DatasetError(f"{data}: no 'train' entry; add the training images folder")
    train_images = _yolo_images(data, root, content["train"], "train")
    val_images = _yolo_images(data, root, content["val"], "val") if content.get("val") else []
    if not train_images:
        raise DatasetError(
            f"{data}: no images found for 'train'; check the folder and the image suffixes"
        )
    sizes = _read_image_sizes(
        [*train_images, *val_images], [str(p) for p in (*train_images, *val_images)]
    )
    train = [_yolo_sample(p, sizes[i], len(class_names), i) for i, p in enumerate(train_images)]
    val = [
        _yolo_sample(p, sizes[len(train) + i], len(class_names), len(train) + i)
        for i, p in enumerate(val_images)
    ]
    note = f"val from '{content['val']}'" if val else "no val images"
    description = f"YOLO {data.name}: {_describe_counts(train, val, len(class_names))}; {note}"
    logger.info("dataset: %s", description)
    return DatasetSpec(
        class_names=class_names, train=tuple(train), val=tuple(val), description=description
    )


# --------------------------------------------------------------------------------------------
# Back to COCO, for the evaluator


def to_coco_ground_truth(samples: Sequence[Sample], class_names: Sequence[str]) -> dict[str, Any]:
    """A COCO ground-truth dict (faster-coco-eval / pycocotools) of ``samples``.

    Category ids are the contiguous labels ``0..N-1``, image ids are ``Sample.image_id``, boxes
    ``[x, y, w, h]`` in source pixels with ``area = w * h`` (no masks), ``iscrowd`` 0.
    """
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for sample in samples:
        images.append(
            {
                "id": int(sample.image_id),
                "file_name": sample.image_path.name,
                "width": int(sample.width),
                "height": int(sample.height),
            }
        )
        for box, label in zip(sample.boxes_xyxy.tolist(), sample.labels.tolist()):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(sample.image_id),
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i, "name": name} for i, name in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}
