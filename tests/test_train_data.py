"""Training data: validation errors, COCO/YOLO reading, augmentation geometry, determinism, and the
COCO ground truth through a real evaluator. Every dataset is written here, in tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dfine.train.augment import AugmentPolicy, RandomIoUCrop, reseed
from dfine.train.data import (
    DatasetError,
    DetectionDataset,
    collate_batch,
    load_dataset,
    make_loader,
    multiscale_sizes,
    to_coco_ground_truth,
)
from dfine.train.synthetic import main as synthetic_main
from dfine.train.synthetic import make_synthetic_dataset


def _write_image(
    path: Path, width: int, height: int, rects_xyxy: list[list[int]] | None = None
) -> None:
    """A dark PNG with bright filled rectangles (so a test can find each object's pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = np.full((height, width, 3), 20, np.uint8)
    for x1, y1, x2, y2 in rects_xyxy or []:
        picture[y1:y2, x1:x2] = (230, 200, 40)
    Image.fromarray(picture).save(path)


def _coco(
    tmp_path: Path,
    images: list[dict],
    annotations: list[dict],
    categories: list[dict] | None = None,
    name: str = "ann.json",
    make_files: bool = True,
) -> Path:
    for image in images:
        if make_files:
            _write_image(tmp_path / image["file_name"], image["width"], image["height"])
    path = tmp_path / name
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": categories or [{"id": 1, "name": "thing"}],
            }
        )
    )
    return path


def _ann(ann_id: int, image_id: int, bbox: list[float], category_id: int = 1, **extra) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def _img(image_id: int, file_name: str, width: int = 64, height: int = 48) -> dict:
    return {"id": image_id, "file_name": file_name, "width": width, "height": height}


# ----------------------------------------------------------------------------------------------
# Validation: each error kind, one line, naming the file


def _missing_image(tmp_path: Path) -> Path:
    path = _coco(tmp_path, [_img(1, "a.png")], [], make_files=False)
    return path


def _corrupt_image(tmp_path: Path) -> Path:
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8 this is not a jpeg at all" * 10)
    return _coco(tmp_path, [_img(1, "a.jpg")], [], make_files=False)


def _size_mismatch(tmp_path: Path) -> Path:
    _write_image(tmp_path / "a.png", 64, 40)
    return _coco(tmp_path, [_img(1, "a.png", 64, 48)], [], make_files=False)


def _exif_turned(tmp_path: Path) -> Path:
    picture = Image.new("RGB", (64, 48))
    exif = picture.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": tools label it 48x64
    picture.save(tmp_path / "a.jpg", exif=exif)
    return _coco(tmp_path, [_img(1, "a.jpg", 48, 64)], [], make_files=False)


def _box_outside(tmp_path: Path) -> Path:
    return _coco(tmp_path, [_img(1, "a.png")], [_ann(7, 1, [50, 10, 20, 10])])  # x2 = 70 > 64 + 1


def _zero_box(tmp_path: Path) -> Path:
    return _coco(tmp_path, [_img(1, "a.png")], [_ann(7, 1, [10, 10, 0, 5])])


def _unknown_category(tmp_path: Path) -> Path:
    return _coco(tmp_path, [_img(1, "a.png")], [_ann(7, 1, [10, 10, 5, 5], category_id=4)])


def _malformed_json(tmp_path: Path) -> Path:
    path = tmp_path / "ann.json"
    path.write_text('{"images": [}')
    return path


def _no_images(tmp_path: Path) -> Path:
    return _coco(tmp_path, [], [])


def _yolo_root(tmp_path: Path, label_text: str | None, names: object = ("a", "b")) -> Path:
    _write_image(tmp_path / "images" / "train" / "x.png", 40, 30)
    if label_text is not None:
        (tmp_path / "labels" / "train").mkdir(parents=True, exist_ok=True)
        (tmp_path / "labels" / "train" / "x.txt").write_text(label_text)
    path = tmp_path / "data.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "path": ".",
                "train": "images/train",
                "names": list(names) if isinstance(names, tuple) else names,
            }
        )
    )
    return path


def _yolo_field_count(tmp_path: Path) -> Path:
    return _yolo_root(tmp_path, "0 0.5 0.5 0.2\n")


def _yolo_unknown_class(tmp_path: Path) -> Path:
    return _yolo_root(tmp_path, "2 0.5 0.5 0.2 0.2\n")


def _yolo_box_outside(tmp_path: Path) -> Path:
    return _yolo_root(tmp_path, "0 0.95 0.5 0.3 0.2\n")


def _malformed_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "data.yaml"
    path.write_text("train: [images\nnames: {0: a")
    return path


def _yolo_no_images(tmp_path: Path) -> Path:
    (tmp_path / "images" / "train").mkdir(parents=True)
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump({"train": "images/train", "names": ["a"]}))
    return path


ERROR_CASES = {
    "missing image": (_missing_image, "a.png", "not found"),
    "corrupt image": (_corrupt_image, "a.jpg", "corrupt"),
    "size mismatch": (_size_mismatch, "ann.json", "64x40"),
    "exif rotated": (_exif_turned, "a.jpg", "EXIF rotation"),
    "box outside": (_box_outside, "ann.json", "outside"),
    "zero box": (_zero_box, "ann.json", "zero or negative"),
    "unknown category": (_unknown_category, "ann.json", "unknown category id 4"),
    "malformed json": (_malformed_json, "ann.json", "malformed JSON"),
    "no images": (_no_images, "ann.json", "no images"),
    "yolo field count": (_yolo_field_count, "x.txt:1", "expected 5"),
    "yolo unknown class": (_yolo_unknown_class, "x.txt:1", "unknown class 2"),
    "yolo box outside": (_yolo_box_outside, "x.txt:1", "outside"),
    "malformed yaml": (_malformed_yaml, "data.yaml", "malformed YAML"),
    "yolo no images": (_yolo_no_images, "data.yaml", "no images"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_dataset_errors_are_one_line_naming_the_file_and_the_fix(tmp_path: Path, case: str) -> None:
    make, names, says = ERROR_CASES[case]
    path = make(tmp_path)
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    message = str(info.value)
    assert "\n" not in message
    assert names in message and says in message, message
    assert any(word in message for word in ("fix", "add", "replace", "renumber", "put", "save")), (
        message
    )
    assert isinstance(info.value, ValueError)


def test_box_within_tolerance_is_clipped_and_kept(tmp_path: Path) -> None:
    path = _coco(
        tmp_path, [_img(1, "a.png")], [_ann(1, 1, [-0.6, 40.0, 64.5, 8.8])]
    )  # 0.6 px out left, 0.8 px below
    (sample,) = load_dataset(path, val_fraction=0.0).train
    np.testing.assert_allclose(sample.boxes_xyxy, [[0.0, 40.0, 63.9, 48.0]], atol=1e-4)


def test_images_dir_option_finds_images_elsewhere(tmp_path: Path) -> None:
    _write_image(tmp_path / "pictures" / "a.png", 64, 48)
    path = _coco(tmp_path, [_img(1, "a.png")], [], make_files=False)
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(path)
    spec = load_dataset(path, images_dir=tmp_path / "pictures", val_fraction=0.0)
    assert spec.train[0].image_path == tmp_path / "pictures" / "a.png"


def test_missing_sizes_come_from_the_file_and_a_big_set_names_its_first_bad_image(
    tmp_path: Path,
) -> None:
    images = [_img(i, f"f{i:02d}.png") for i in range(20)]
    for image in images:
        _write_image(tmp_path / image["file_name"], 64, 48)
    del images[3]["width"], images[3]["height"]
    path = _coco(tmp_path, images, [_ann(1, 3, [60, 1, 4, 4])], make_files=False)
    spec = load_dataset(path, val_fraction=0.0)
    assert (spec.train[3].width, spec.train[3].height) == (64, 48)
    (tmp_path / "f12.png").unlink()
    (tmp_path / "f17.png").unlink()
    with pytest.raises(DatasetError, match="f12.png") as info:  # the first in the file's order
        load_dataset(path)
    assert "f17" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# COCO reading


def test_coco_category_ids_remap_in_sorted_order_keeping_names(tmp_path: Path) -> None:
    categories = [
        {"id": 17, "name": "truck"},
        {"id": 3, "name": "car"},
        {"id": 1, "name": "person"},
    ]
    images = [_img(5, "a.png"), _img(9, "b.png")]
    annotations = [
        _ann(1, 5, [1, 2, 10, 10], 17),
        _ann(2, 5, [20, 2, 10, 10], 1),
        _ann(3, 9, [3, 3, 5, 6], 3),
        _ann(4, 9, [0, 0, 64, 48], 3, iscrowd=1),
    ]
    spec = load_dataset(_coco(tmp_path, images, annotations, categories), val_fraction=0.0)
    assert spec.class_names == ("person", "car", "truck")
    by_id = {s.image_id: s for s in spec.train}
    assert by_id[5].labels.tolist() == [2, 0] and by_id[9].labels.tolist() == [
        1
    ]  # the crowd box is skipped
    np.testing.assert_allclose(by_id[9].boxes_xyxy, [[3, 3, 8, 9]])
    assert by_id[5].boxes_xyxy.dtype == np.float32 and by_id[5].labels.dtype == np.int64
    assert "1 iscrowd boxes skipped" in spec.description and "17->2" in spec.description


def test_coco_val_is_the_last_fraction_by_file_name_not_random(tmp_path: Path) -> None:
    names = [f"frame_{i:03d}.png" for i in range(20)]
    order = [
        7,
        3,
        19,
        0,
        12,
        5,
        18,
        1,
        9,
        14,
        2,
        11,
        6,
        16,
        4,
        10,
        13,
        8,
        15,
        17,
    ]  # ids not in name order
    images = [_img(100 + k, names[i]) for k, i in enumerate(order)]
    spec = load_dataset(_coco(tmp_path, images, []), val_fraction=0.2)
    assert [s.image_path.name for s in spec.val] == names[16:]
    assert [s.image_path.name for s in spec.train] == names[:16]
    assert "16 train / 4 val" in spec.description and "by file name" in spec.description
    # Negatives only: valid, no boxes.
    assert all(s.boxes_xyxy.shape == (0, 4) for s in spec.train)


def test_coco_separate_val_file_uses_the_same_categories(tmp_path: Path) -> None:
    categories = [{"id": 2, "name": "a"}, {"id": 8, "name": "b"}]
    train = _coco(
        tmp_path, [_img(1, "t.png")], [_ann(1, 1, [1, 1, 5, 5], 8)], categories, name="train.json"
    )
    val = _coco(
        tmp_path, [_img(1, "v.png")], [_ann(1, 1, [2, 2, 5, 5], 2)], categories[:1], name="val.json"
    )
    spec = load_dataset(train, val_data=val)
    assert [s.image_path.name for s in spec.val] == ["v.png"] and spec.val[0].labels.tolist() == [0]
    assert spec.train[0].labels.tolist() == [1]
    bad = _coco(tmp_path, [_img(1, "v.png")], [], [{"id": 2, "name": "other"}], name="bad.json")
    with pytest.raises(DatasetError, match="bad.json"):
        load_dataset(train, val_data=bad)


# ----------------------------------------------------------------------------------------------
# YOLO reading


def _write_yolo_from(spec_samples, class_names, root: Path, split: str) -> None:
    for sample in spec_samples:
        image = Image.open(sample.image_path)
        target = root / "images" / split / sample.image_path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)
        lines = []
        for (x1, y1, x2, y2), label in zip(sample.boxes_xyxy.tolist(), sample.labels.tolist()):
            w, h = sample.width, sample.height
            cx, cy, bw, bh = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h
            lines.append(f"{label} {cx:.8f} {cy:.8f} {bw:.8f} {bh:.8f}")
        if lines:  # negatives get no label file at all
            label = root / "labels" / split / (sample.image_path.stem + ".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("\n".join(lines) + "\n")


def test_yolo_data_yaml_round_trip_matches_the_coco_set(tmp_path: Path) -> None:
    coco_json = make_synthetic_dataset(tmp_path / "coco", 12, num_classes=3, size=96, seed=3)
    coco = load_dataset(coco_json, val_fraction=0.25)
    root = tmp_path / "yolo"
    _write_yolo_from(coco.train, coco.class_names, root, "train")
    _write_yolo_from(coco.val, coco.class_names, root, "val")
    (root / "data.yaml").write_text(
        yaml.safe_dump(
            {
                "path": ".",
                "train": "images/train",
                "val": "images/val",
                "names": dict(enumerate(coco.class_names)),
            }
        )
    )
    yolo = load_dataset(root / "data.yaml")
    assert yolo.class_names == coco.class_names == ("circle", "square", "triangle")
    for coco_split, yolo_split in ((coco.train, yolo.train), (coco.val, yolo.val)):
        assert [s.image_path.name for s in yolo_split] == [s.image_path.name for s in coco_split]
        for a, b in zip(coco_split, yolo_split):
            assert (a.width, a.height) == (b.width, b.height)
            np.testing.assert_array_equal(a.labels, b.labels)
            np.testing.assert_allclose(a.boxes_xyxy, b.boxes_xyxy, atol=1e-3)
    assert sum(len(s.labels) == 0 for s in yolo.train) == sum(
        len(s.labels) == 0 for s in coco.train
    )
    ids = [s.image_id for s in (*yolo.train, *yolo.val)]
    assert len(set(ids)) == len(ids)


def test_yolo_image_lists_absolute_root_and_class_count(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        _write_image(tmp_path / "set" / "images" / f"{name}.png", 40, 30)
    (tmp_path / "set" / "labels").mkdir()
    (tmp_path / "set" / "labels" / "b.txt").write_text("1 0.5 0.5 0.5 0.5\n\n0 0.25 0.25 0.1 0.2\n")
    (tmp_path / "set" / "train.txt").write_text("./images/a.png\n./images/b.png\n")
    (tmp_path / "set" / "val.txt").write_text(f"{tmp_path / 'set' / 'images' / 'c.png'}\n")
    path = tmp_path / "elsewhere" / "data.yaml"
    path.parent.mkdir()
    content = {
        "path": str(tmp_path / "set"),
        "train": "train.txt",
        "val": "val.txt",
        "names": ["x", "y"],
    }
    path.write_text(yaml.safe_dump(content))
    spec = load_dataset(path)
    assert [s.image_path.name for s in spec.train] == ["a.png", "b.png"] and spec.val[
        0
    ].image_path.name == "c.png"
    np.testing.assert_allclose(
        spec.train[1].boxes_xyxy, [[10, 7.5, 30, 22.5], [8, 4.5, 12, 10.5]], atol=1e-4
    )
    assert spec.train[1].labels.tolist() == [1, 0] and len(spec.train[0].labels) == 0
    path.write_text(yaml.safe_dump({**content, "nc": 3}))
    with pytest.raises(DatasetError, match="nc=3"):
        load_dataset(path)
    path.write_text(yaml.safe_dump({**content, "train": "missing/"}))
    with pytest.raises(DatasetError, match="missing/"):
        load_dataset(path)


def test_yolo_names_dict_must_be_contiguous(tmp_path: Path) -> None:
    path = _yolo_root(tmp_path, "0 0.5 0.5 0.2 0.2\n", names={0: "a", 2: "b"})
    with pytest.raises(DatasetError, match="renumber"):
        load_dataset(path)


# ----------------------------------------------------------------------------------------------
# Augmentation geometry


# At least 16 px apart, so a 4x zoom-out still leaves background between neighbours.
RECTS = [[8, 8, 40, 30], [60, 12, 100, 56], [16, 52, 44, 92], [68, 80, 120, 120], [116, 4, 126, 20]]


@pytest.fixture
def rect_samples(tmp_path: Path):
    """Four 128x128 pictures of bright rectangles on a dark ground, one negative."""
    images, annotations = [], []
    for i in range(4):
        rects = [[x1 + i, y1, min(x2 + i, 128), y2] for x1, y1, x2, y2 in RECTS][: 5 - i]
        _write_image(tmp_path / f"r{i}.png", 128, 128, rects)
        images.append(_img(i + 1, f"r{i}.png", 128, 128))
        annotations += [
            _ann(len(annotations) + 1, i + 1, [x1, y1, x2 - x1, y2 - y1])
            for x1, y1, x2, y2 in rects
        ]
    _write_image(tmp_path / "r9.png", 128, 128)
    images.append(_img(10, "r9.png", 128, 128))
    return load_dataset(
        _coco(tmp_path, images, annotations, make_files=False), val_fraction=0.0
    ).train


def _to_pixels(boxes_cxcywh: torch.Tensor, size: int) -> np.ndarray:
    b = boxes_cxcywh.numpy().astype(np.float64)
    return np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], axis=1) * size


def test_augmented_boxes_stay_inside_and_cover_their_objects(rect_samples) -> None:
    size = 128
    dataset = DetectionDataset(rect_samples, size, augment=True, seed=11)
    plain = DetectionDataset(rect_samples, size, augment=False)
    checked = changed = 0
    for epoch in range(6):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            image, target = dataset[i]
            assert image.shape == (3, size, size) and image.dtype == torch.float32
            assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
            boxes = target["boxes"]
            assert boxes.dtype == torch.float32 and target["labels"].dtype == torch.int64
            assert boxes.shape == (len(target["labels"]), 4)
            assert bool((boxes[:, 2:] > 0).all())
            xyxy = _to_pixels(boxes, size)
            assert (xyxy >= -1e-3).all() and (xyxy <= size + 1e-3).all()
            # Object pixels are the bright ones (the photometric ops keep their order vs the ground).
            gray = image.mean(0).numpy()
            bright = gray > (gray.min() + gray.max()) / 2
            for x1, y1, x2, y2 in xyxy:
                if x2 - x1 < 6 or y2 - y1 < 6:
                    continue  # too small after a 4x zoom-out to test its edges
                inner = bright[
                    int(np.ceil(y1)) + 2 : int(y2) - 2, int(np.ceil(x1)) + 2 : int(x2) - 2
                ]
                assert inner.mean() > 0.97, (epoch, i, (x1, y1, x2, y2), inner.mean())
                # Just outside each edge that is not on the picture border: background.
                across = slice(int(x1) + 2, int(x2) - 2)
                down = slice(int(y1) + 2, int(y2) - 2)
                rings = []
                if y1 >= 3:
                    rings.append(bright[int(y1) - 3, across])
                if y2 <= size - 3:
                    rings.append(bright[min(size - 1, int(np.ceil(y2)) + 2), across])
                if x1 >= 3:
                    rings.append(bright[down, int(x1) - 3])
                if x2 <= size - 3:
                    rings.append(bright[down, min(size - 1, int(np.ceil(x2)) + 2)])
                for ring in rings:
                    assert ring.mean() < 0.05, (epoch, i, (x1, y1, x2, y2))
                checked += 1
            ref_wh = plain[i][1]["boxes"][:, 2:]
            changed += int(
                boxes.shape != plain[i][1]["boxes"].shape
                or not torch.allclose(boxes[:, 2:].sort(0).values, ref_wh.sort(0).values, atol=0.01)
            )
    assert checked > 50 and changed > 5  # zoom-outs and crops happened and were checked


def test_iou_crop_keeps_exactly_the_boxes_whose_centre_is_inside() -> None:
    crop_op = RandomIoUCrop(p=1.0)
    bbox_params = A.BboxParams(
        format="pascal_voc", label_fields=["labels"], min_width=1, min_height=1, clip=True
    )
    pipeline = A.Compose([crop_op], bbox_params=bbox_params)
    corners = np.array(
        [(x, y) for y in range(5, 200, 40) for x in range(5, 200, 40)], dtype=np.float32
    )
    boxes = np.concatenate([corners, corners + 24], axis=1)  # 25 boxes 24 px wide on a 5x5 grid
    labels = np.arange(len(boxes))
    image = np.zeros((200, 220, 3), np.uint8)
    crops = 0
    for seed in range(40):
        reseed(pipeline, seed)
        out = pipeline(image=image, bboxes=boxes, labels=labels)
        if crop_op.params["crop"] is None:  # the "keep" option
            np.testing.assert_allclose(out["bboxes"], boxes)
            continue
        left, top, right, bottom = crop_op.params["crop"]
        assert out["image"].shape[:2] == (bottom - top, right - left)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = (
            (left < centres[:, 0])
            & (centres[:, 0] < right)
            & (top < centres[:, 1])
            & (centres[:, 1] < bottom)
        )
        assert np.asarray(out["labels"]).tolist() == labels[inside].tolist()
        expected = np.clip(
            boxes[inside] - [left, top, left, top], 0, [right - left, bottom - top] * 2
        )
        np.testing.assert_allclose(out["bboxes"], expected, atol=1e-3)
        crops += 1
    assert crops >= 20


def test_late_policy_only_flips_and_a_flipped_box_mirrors_exactly(rect_samples) -> None:
    plain = DetectionDataset(rect_samples, 96, augment=False)
    late = DetectionDataset(rect_samples, 96, augment=True, seed=5, stop_epoch=0)
    assert late.policy is AugmentPolicy.LATE and plain.policy is AugmentPolicy.EVAL
    flipped = kept = 0
    for epoch in range(4):
        late.set_epoch(epoch)
        for i in range(len(rect_samples)):
            ref_image, ref = plain[i]
            image, target = late[i]
            torch.testing.assert_close(target["labels"], ref["labels"])
            if torch.equal(image, ref_image):
                torch.testing.assert_close(target["boxes"], ref["boxes"])
                kept += 1
            else:
                torch.testing.assert_close(image, ref_image.flip(-1), atol=2 / 255, rtol=0)
                mirrored = ref["boxes"].clone()
                mirrored[:, 0] = 1.0 - mirrored[:, 0]
                torch.testing.assert_close(target["boxes"], mirrored, atol=1e-6, rtol=0)
                flipped += 1
    assert flipped > 3 and kept > 3


def test_stop_epoch_switches_the_heavy_ops_off(rect_samples) -> None:
    plain = DetectionDataset(rect_samples, 96, augment=False)
    dataset = DetectionDataset(rect_samples, 96, augment=True, seed=2, stop_epoch=3)

    def plain_or_mirror(epoch: int) -> list[bool]:
        dataset.set_epoch(epoch)
        same = []
        for i in range(len(rect_samples)):
            image, _ = dataset[i]
            ref, _ = plain[i]
            mirror = ref.flip(-1)
            same.append(
                torch.allclose(image, ref, atol=2 / 255)
                or torch.allclose(image, mirror, atol=2 / 255)
            )
        return same

    assert dataset.policy is AugmentPolicy.FULL
    heavy = [plain_or_mirror(e) for e in range(3)]
    assert (
        sum(not s for epoch in heavy for s in epoch) >= 5
    )  # photometric / zoom / crop change pictures
    for epoch in (3, 4, 7):
        assert all(plain_or_mirror(epoch)) and dataset.policy is AugmentPolicy.LATE


def test_negative_images_give_empty_targets(rect_samples) -> None:
    negative = [s for s in rect_samples if len(s.labels) == 0]
    dataset = DetectionDataset(negative, 64, augment=True)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        image, target = dataset[0]
        assert image.shape == (3, 64, 64)
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        assert target["orig_size_wh"].tolist() == [128, 128] and int(target["image_id"]) == 10


# ----------------------------------------------------------------------------------------------
# Determinism


def _epoch_batches(loader) -> list[tuple[torch.Tensor, list[dict[str, torch.Tensor]]]]:
    return list(loader)


def _assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (images_a, targets_a), (images_b, targets_b) in zip(a, b):
        assert torch.equal(images_a, images_b)
        for ta, tb in zip(targets_a, targets_b):
            assert ta.keys() == tb.keys()
            for key in ta:
                assert torch.equal(ta[key], tb[key]), key


@pytest.fixture(scope="module")
def synthetic_spec(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return load_dataset(
        make_synthetic_dataset(out, 26, num_classes=3, size=96, seed=1), val_fraction=0.0
    )


def test_batches_do_not_depend_on_workers_and_skip_batches_continues_the_epoch(
    synthetic_spec,
) -> None:
    dataset = DetectionDataset(synthetic_spec.train, 128, augment=True, seed=4, stop_epoch=10)
    serial = _epoch_batches(
        make_loader(dataset, 4, workers=0, seed=4, epoch=1, shuffle=True, multiscale=True)
    )
    parallel = _epoch_batches(
        make_loader(dataset, 4, workers=2, seed=4, epoch=1, shuffle=True, multiscale=True)
    )
    assert len(serial) == 26 // 4
    _assert_same_batches(serial, parallel)
    assert len({b[0].shape[-1] for b in serial}) > 1  # multi-scale draws several sizes
    resumed = _epoch_batches(
        make_loader(
            dataset, 4, workers=2, seed=4, epoch=1, shuffle=True, skip_batches=4, multiscale=True
        )
    )
    _assert_same_batches(serial[4:], resumed)
    # Another epoch: another order and other augmentations.
    other = _epoch_batches(make_loader(dataset, 4, workers=0, seed=4, epoch=2, shuffle=True))
    ids = [[int(t["image_id"]) for t in batch[1]] for batch in serial]
    other_ids = [[int(t["image_id"]) for t in batch[1]] for batch in other]
    assert ids != other_ids


FORK_CHECK = """
import sys
from pathlib import Path
from dfine.train.data import DetectionDataset, load_dataset, make_loader
spec = load_dataset(Path(sys.argv[1]), val_fraction=0.0)
dataset = DetectionDataset(spec.train, 320, augment=True, seed=0)
for workers in (0, 2):  # OpenCV's pool runs in this process first, then workers fork from it
    assert len(list(make_loader(dataset, 8, workers, seed=0, epoch=0, shuffle=True))) == 4
"""


def test_workers_fork_safely_after_the_main_process_augmented(tmp_path: Path) -> None:
    # A worker that reconfigures OpenCV's threads after the fork hangs forever: run it aside.
    path = make_synthetic_dataset(tmp_path, 32, size=320, seed=2)
    result = subprocess.run(
        [sys.executable, "-c", FORK_CHECK, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr[-2000:]


NETWORK_SPY = """
import urllib.request
calls = []
real_open = urllib.request.OpenerDirector.open
def spy(self, url, *args, **kwargs):
    calls.append(getattr(url, "full_url", url))
    raise OSError("no network in this check")
urllib.request.OpenerDirector.open = spy
import dfine.train.loader
assert not calls, calls
"""


def test_importing_the_loader_asks_no_server_anything() -> None:
    # albumentations checks pypi.org for updates on import unless told not to.
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", NETWORK_SPY],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_unshuffled_loader_keeps_every_sample_in_order(synthetic_spec) -> None:
    dataset = DetectionDataset(synthetic_spec.train, 64, augment=False)
    batches = _epoch_batches(
        make_loader(dataset, 8, workers=0, seed=0, epoch=0, shuffle=False, drop_last=False)
    )
    ids = [int(t["image_id"]) for _, targets in batches for t in targets]
    assert ids == [s.image_id for s in synthetic_spec.train]
    assert [b[0].shape for b in batches][-1] == (26 % 8, 3, 64, 64)
    with pytest.raises(ValueError, match="skip_batches"):
        make_loader(dataset, 8, workers=0, seed=0, epoch=0, shuffle=False, skip_batches=5)


def test_multiscale_sizes_are_the_official_list_at_640() -> None:
    assert multiscale_sizes(640) == (
        480,
        512,
        544,
        576,
        608,
        672,
        704,
        736,
        768,
        800,
        640,
        640,
        640,
    )
    assert all(s % 32 == 0 for s in multiscale_sizes(320))


def test_collate_stacks_images_and_keeps_targets() -> None:
    items = [
        (torch.zeros(3, 32, 32), {"labels": torch.zeros(0, dtype=torch.int64)}),
        (torch.ones(3, 32, 32), {"labels": torch.ones(2, dtype=torch.int64)}),
    ]
    images, targets = collate_batch(items)
    assert images.shape == (2, 3, 32, 32) and float(images[1].mean()) == 1.0
    assert [t["labels"].tolist() for t in targets] == [[], [1, 1]]


# ----------------------------------------------------------------------------------------------
# Ground truth through a real evaluator


def test_to_coco_ground_truth_scores_map_one_against_itself(synthetic_spec) -> None:
    from faster_coco_eval import COCO, COCOeval_faster

    samples = synthetic_spec.train
    gt_dict = to_coco_ground_truth(samples, synthetic_spec.class_names)
    assert [c["id"] for c in gt_dict["categories"]] == [0, 1, 2]
    assert {im["id"] for im in gt_dict["images"]} == {s.image_id for s in samples}

    def evaluate(detections: list[dict]) -> float:
        gt = COCO(gt_dict)
        dt = gt.loadRes(detections)
        evaluator = COCOeval_faster(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        return float(evaluator.stats[0])

    perfect = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in gt_dict["annotations"]
    ]
    assert evaluate(perfect) == pytest.approx(1.0)
    # A real evaluator notices half the boxes shifted by half their width.
    shifted = [
        dict(d, bbox=[d["bbox"][0] + d["bbox"][2] / 2, *d["bbox"][1:]]) if k % 2 else d
        for k, d in enumerate(perfect)
    ]
    assert evaluate(shifted) < 0.8


# ----------------------------------------------------------------------------------------------
# Synthetic set


def test_synthetic_set_is_valid_remapped_and_reproducible(tmp_path: Path) -> None:
    path = make_synthetic_dataset(tmp_path / "a", 40, num_classes=3, size=128, seed=7)
    content = json.loads(path.read_text())
    assert sorted(c["id"] for c in content["categories"]) == [1, 5, 9]
    spec = load_dataset(path, val_fraction=0.1)
    assert spec.class_names == ("circle", "square", "triangle")
    samples = (*spec.train, *spec.val)
    assert len(samples) == 40 and any(len(s.labels) == 0 for s in samples)
    assert set(np.concatenate([s.labels for s in samples]).tolist()) == {0, 1, 2}
    sides = np.concatenate([s.boxes_xyxy[:, 2:] - s.boxes_xyxy[:, :2] for s in samples]).min(axis=1)
    assert sides.min() <= 16 and sides.max() >= 30  # small objects and big ones
    # Each box holds its shape: the picture inside differs from the ring just around it.
    picture = np.asarray(Image.open(samples[0].image_path).convert("RGB"), dtype=np.float32)
    for x1, y1, x2, y2 in samples[0].boxes_xyxy.astype(int):
        assert picture[y1:y2, x1:x2].std(axis=(0, 1)).max() > 10
    again = make_synthetic_dataset(tmp_path / "b", 40, num_classes=3, size=128, seed=7)
    assert again.read_text() == path.read_text()
    first, second = (tmp_path / d / "images" / "00003.jpg" for d in ("a", "b"))
    assert first.read_bytes() == second.read_bytes()


def test_synthetic_cli(tmp_path: Path, capsys) -> None:
    assert (
        synthetic_main(
            ["--out", str(tmp_path / "s"), "--images", "5", "--classes", "2", "--size", "64"]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == str(tmp_path / "s" / "annotations.json")
    assert len(load_dataset(tmp_path / "s" / "annotations.json", val_fraction=0).train) == 5
    assert synthetic_main(["--out", str(tmp_path / "t"), "--classes", "9"]) == 2
    assert "num_classes=9" in capsys.readouterr().err
