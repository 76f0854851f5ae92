"""``finestream label`` with the real teacher (NanoDet in the D-FINE graph contract) on real clips:
the dataset it writes loads with the trainer's own loader, splits never share a clip's
neighbouring frames, and bad input is one line and exit 2 before the model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.label import LabelError, class_mapping

REPO = Path(__file__).resolve().parents[1]
FINESTREAM = [sys.executable, "-m", "pipeline.cli"]
ROAD = "person,bicycle,car,motorcycle,bus,truck"


@pytest.fixture(scope="module")
def teacher() -> Path:
    path = REPO.parent / "shared" / "teachers" / "nanodet_coco_416.onnx"
    if not path.is_file():
        pytest.skip(f"teacher model not found at {path} (the shared/ folder beside the repository)")
    return path


def _label(*args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FINESTREAM, "label", *map(str, args), "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _frames(dataset: Path, split: str) -> dict[str, list[int]]:
    """Per source folder, the frame indices in ``split``."""
    data = json.loads((dataset / f"{split}.json").read_text())
    out: dict[str, list[int]] = {}
    for image in data["images"]:
        _, source, name = image["file_name"].split("/")
        out.setdefault(source, []).append(int(Path(name).stem))
    return out


def test_a_video_and_an_image_folder_become_a_dataset_the_trainer_loads(
    tmp_path: Path, media_dir: Path, teacher: Path
) -> None:
    from dfine.train.data import load_dataset

    folder = tmp_path / "stills"
    folder.mkdir()
    capture = cv2.VideoCapture(str(media_dir / "person_asl_640x480_rotate90.mp4"))
    for i in range(40):
        ok, bgr = capture.read()
        assert ok
        if i % 4 == 0:
            cv2.imwrite(str(folder / f"still_{i:03d}.jpg"), bgr)
    out = tmp_path / "dataset"
    result = _label(
        "--model",
        teacher,
        "--source",
        media_dir / "cars_320x240_mjpeg.avi",
        "--source",
        folder,
        "--out",
        out,
        "--classes",
        ROAD,
        "--rename",
        "truck=car,bus=car",
        "--threshold",
        "0.35",
        "--gap",
        "0",
    )
    assert result.returncode == 0, result.stderr
    assert "boxes per class: person" in result.stdout

    spec = load_dataset(out / "train.json", val_data=out / "val.json")
    assert list(spec.class_names) == ["person", "bicycle", "car", "motorcycle"]  # bus, truck merged
    assert len(spec.train) > len(spec.val) > 0
    train_labels = np.concatenate([s.labels for s in spec.train])
    assert (train_labels == 2).sum() > 20  # cars in the cars clip
    assert (train_labels == 0).sum() > 0  # the signing woman in the stills
    for sample in (*spec.train, *spec.val):
        assert sample.image_path.is_file()

    # Time split: within each source, every training frame comes before every validation frame.
    train, val = _frames(out, "train"), _frames(out, "val")
    assert set(train) == set(val) == {"cars_320x240_mjpeg", "stills"}
    for source in train:
        assert max(train[source]) < min(val[source])


def test_clip_split_and_holdout_keep_each_clip_on_one_side(
    tmp_path: Path, media_dir: Path, teacher: Path
) -> None:
    out = tmp_path / "dataset"
    result = _label(
        "--model",
        teacher,
        "--source",
        media_dir / "cars_320x240_mjpeg.avi",
        "--source",
        media_dir / "traffic_highway_960x540.mp4",
        "--holdout",
        media_dir / "cars_320x240.h265",
        "--out",
        out,
        "--classes",
        "car",
        "--split",
        "clip",
        "--val-fraction",
        "0.5",
        "--every",
        "15",
    )
    assert result.returncode == 0, result.stderr
    train, val, test = (set(_frames(out, s)) for s in ("train", "val", "test"))
    assert (
        train == {"cars_320x240_mjpeg"}
        and val == {"traffic_highway_960x540"}
        and test == {"cars_320x240"}
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_per_split"]["test"] == 2  # 30 frames, every 15th


def test_a_static_scene_keeps_one_frame_with_min_change(
    tmp_path: Path, media_dir: Path, teacher: Path
) -> None:
    folder = tmp_path / "static"
    folder.mkdir()
    capture = cv2.VideoCapture(str(media_dir / "cars_320x240_mjpeg.avi"))
    ok, bgr = capture.read()
    assert ok
    for i in range(6):
        cv2.imwrite(str(folder / f"{i:02d}.png"), bgr)
    out = tmp_path / "dataset"
    result = _label(
        "--model",
        teacher,
        "--source",
        folder,
        "--out",
        out,
        "--min-change",
        "2",
        "--val-fraction",
        "0",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_read"] == 6 and summary["frames_kept"] == 1


def test_tiles_find_small_objects_the_whole_frame_misses(
    tmp_path: Path, media_dir: Path, teacher: Path
) -> None:
    out = tmp_path / "dataset"
    result = _label(
        "--model",
        teacher,
        "--source",
        media_dir / "traffic_highway_960x540.mp4",
        "--out",
        out,
        "--every",
        "60",
        "--classes",
        "car,truck",
        "--tile",
        "416",
        "--threshold",
        "0.35",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["merged_boxes"] > summary["full_frame_boxes"]
    assert summary["small_boxes_merged"] > summary["small_boxes_full_frame"]


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (lambda d: None, ["--source", "{d}/missing.mp4"], "no such file"),
        (
            lambda d: (d / "a.mp4").write_text("not a video"),
            ["--source", "{d}/a.mp4"],
            "not a readable video",
        ),
        (lambda d: (d / "empty").mkdir(), ["--source", "{d}/empty"], "holds no images"),
        (
            lambda d: None,
            ["--source", "{media}/cars_320x240_mjpeg.avi", "--classes", "car,unicorn"],
            "unicorn",
        ),
        (
            lambda d: None,
            ["--source", "{media}/cars_320x240_mjpeg.avi", "--rename", "car"],
            "expected old=new",
        ),
        (lambda d: None, ["--source", "{media}/cars_320x240_mjpeg.avi", "--every", "0"], "--every"),
        (
            lambda d: (d / "out").mkdir() or (d / "out" / "x").write_text(""),
            ["--source", "{media}/cars_320x240_mjpeg.avi"],
            "not empty",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path,
    media_dir: Path,
    teacher: Path,
    capsys: pytest.CaptureFixture[str],
    make,
    args,
    message,
) -> None:
    from pipeline.cli import main

    make(tmp_path)
    args = [a.format(d=tmp_path, media=media_dir) for a in args]
    code = main(
        ["label", "--model", str(teacher), "--out", str(tmp_path / "out"), "--no-progress", *args]
    )
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out" / "images").exists()  # refused before any frame was labelled


def test_the_command_line_exits_2_in_one_line(tmp_path: Path, teacher: Path) -> None:
    result = _label(
        "--model",
        teacher,
        "--source",
        tmp_path / "missing.mp4",
        "--out",
        tmp_path / "out",
        timeout=60,
    )
    assert result.returncode == 2
    expected = f"finestream: error: --source {tmp_path}/missing.mp4: no such file or folder"
    assert result.stderr.strip().splitlines() == [expected]


def test_renaming_to_a_kept_name_merges_classes() -> None:
    names, mapping = class_mapping(
        ["person", "car", "bus", "truck"], ["person", "car", "truck"], {"truck": "car"}
    )
    assert names == ["person", "car"] and mapping == {0: 0, 1: 1, 3: 1}
    with pytest.raises(LabelError, match="not among the kept"):
        class_mapping(["person", "car", "bus"], ["person"], {"bus": "car"})
