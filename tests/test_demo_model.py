"""The bundled demo model on the bundled clip, as `bash scripts/demo.sh` runs it
(configs/demo.yaml with its outputs moved to a temporary folder): it tracks the clip's people,
and at least one track lasts 20 frames or more with boxes that overlap the teacher's (the NanoDet
COCO model it learnt from, run on the same frames) by IoU >= 0.5. The clip's frames are ones the
model never trained on (assets/ATTRIBUTION.md)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.cli import main
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # two runs over 294 frames: about a minute on the CI machine

MODEL = REPO / "assets" / "dfine_n_road_480.pth"
MIN_FRAMES, MIN_IOU = 20, 0.5


def _frames(jsonl: Path) -> list[dict]:
    messages = [json.loads(line) for line in jsonl.read_text().splitlines()]
    return [m for m in messages if m["type"] == "frame"]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of one box ``a`` (4,) against boxes ``b`` (N, 4), xyxy."""
    lt, rb = np.maximum(a[:2], b[:, :2]), np.minimum(a[2:], b[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda x: np.prod(x[..., 2:] - x[..., :2], axis=-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    teacher = REPO.parent / "shared" / "teachers" / "nanodet_coco_416.onnx"
    if not teacher.is_file():
        pytest.skip(
            f"teacher model not found at {teacher} (the shared/ folder beside the repository)"
        )
    out = tmp_path_factory.mktemp("demo")
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    assert Path(demo["model"]["model"]) == MODEL.relative_to(REPO), (
        "the demo runs the bundled model"
    )
    demo["sources"][0]["file"]["path"] = str(REPO / demo["sources"][0]["file"]["path"])
    demo["model"]["model"] = str(MODEL)
    demo["outputs"] = {"jsonl": {"path": str(out / "demo.jsonl")}}
    (out / "demo.yaml").write_text(yaml.safe_dump(demo))
    teacher_run = {
        "sources": demo["sources"],
        "model": {"model": str(teacher), "backend": "onnxruntime", "imgsz": 416},
        "outputs": {"jsonl": {"path": str(out / "teacher.jsonl")}},
    }
    (out / "teacher.yaml").write_text(yaml.safe_dump(teacher_run))
    assert main(["run", str(out / "teacher.yaml"), "--no-progress"]) == 0
    return out / "demo.yaml", out / "teacher.jsonl", str(out)


def test_the_bundled_model_tracks_people_as_the_teacher_sees_them(
    runs: tuple[Path, Path, str], capfd: pytest.CaptureFixture[str]
) -> None:
    demo_yaml, teacher_jsonl, out = runs
    assert main(["run", str(demo_yaml), "--no-progress"]) == 0
    assert "untrained" not in capfd.readouterr().err.lower()
    demo, teacher = _frames(Path(out) / "demo.jsonl"), _frames(teacher_jsonl)
    assert [m["frame"] for m in demo] == [m["frame"] for m in teacher] == list(range(len(demo)))

    agreeing_frames: dict[int, int] = defaultdict(int)
    for ours, theirs in zip(demo, teacher):
        for det in ours["detections"]:
            same = [t["box_xyxy"] for t in theirs["detections"] if t["label"] == det["label"]]
            if det["track_id"] is None or not same:
                continue
            if _iou(np.array(det["box_xyxy"]), np.array(same)).max() >= MIN_IOU:
                agreeing_frames[det["track_id"]] += 1
    longest = max(agreeing_frames.values(), default=0)
    assert longest >= MIN_FRAMES, dict(agreeing_frames)
    labels = {d["label"] for m in demo for d in m["detections"] if d["track_id"] is not None}
    assert "person" in labels


def test_the_bundled_model_is_a_small_release_with_its_names() -> None:
    from dfine.model_info import read_model_info

    assert MODEL.stat().st_size <= 16 * 2**20
    info = read_model_info(MODEL)
    assert info.size == "n" and info.trained_side == 480
    assert info.class_names == ("person", "bicycle", "car", "motorcycle", "bus", "truck")
