"""Camera analytics end to end with a real detector (the NanoDet teacher, --imgsz 416) on the
highway clip: one line across the carriageway; the run reports counts per direction and class
(table, --stats, analytics_summary), every JSON line satisfies the documented schema, and the
annotated MP4 shows the line and its counters."""

from __future__ import annotations

import json
from pathlib import Path

import av
import jsonschema
import numpy as np
import pytest
import yaml

from pipeline.cli import main
from stages.annotate import LINE_RGB
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # about 80 s on the 2-core CI machine

CLIP = "traffic_highway_960x540.mp4"
FRAMES = 240  # 8 s: several cars cross the line
# Cars drive down the picture, towards the camera: across A→B (left to right) that is `in`.
LINE = {"name": "carriageway", "a": [150, 300], "b": [850, 300], "rearm_distance_px": 20.0}
ZONE = {"name": "near", "polygon": [[150, 330], [850, 330], [900, 530], [100, 530]]}


@pytest.fixture(scope="module")
def teacher() -> Path:
    path = REPO.parent / "shared" / "teachers" / "nanodet_coco_416.onnx"
    if not path.is_file():
        pytest.skip(f"teacher model not found at {path} (the shared/ folder beside the repository)")
    return path


@pytest.fixture(scope="module")
def run(teacher: Path, media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("analytics_e2e")
    config = {
        "sources": [{"file": {"path": str(media_dir / CLIP), "max_frames": FRAMES}}],
        "model": {
            "model": str(teacher),
            "backend": "onnxruntime",
            "imgsz": 416,
            "score_threshold": 0.35,
            "classes": [2, 5, 7],
        },
        "outputs": {
            "video": {"path": str(out / "out.mp4")},
            "jsonl": {"path": str(out / "out.jsonl")},
        },
        "analytics": [{"stream_id": "0", "lines": [LINE], "zones": [ZONE]}],
    }
    (out / "run.yaml").write_text(yaml.safe_dump(config))
    assert (
        main(["run", str(out / "run.yaml"), "--no-progress", "--stats", str(out / "stats.json")])
        == 0
    )
    return out


def test_the_run_counts_cars_crossing_the_line_per_direction_and_class(run: Path) -> None:
    messages = [json.loads(line) for line in (run / "out.jsonl").read_text().splitlines()]
    schema = json.loads((REPO / "docs" / "events.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for message in messages:
        validator.validate(message)
    frames = [m for m in messages if m["type"] == "frame"]
    assert [m["frame"] for m in frames] == list(range(FRAMES))
    crossed = [m for m in messages if m["type"] == "line_crossed"]
    assert len(crossed) >= 3, "cars cross this line every second or two"
    assert {m["direction"] for m in crossed} == {"in"}  # the near carriageway drives towards us
    assert {m["label"] for m in crossed} <= {"car", "bus", "truck"}
    assert len({m["track_id"] for m in crossed}) == len(crossed)  # each car counted once
    # Every crossing track was a confirmed track that had started before.
    started = {m["track_id"]: m["frame"] for m in messages if m["type"] == "track_started"}
    assert all(m["track_id"] in started and started[m["track_id"]] <= m["frame"] for m in crossed)
    final = [m for m in messages if m["type"] == "analytics_summary" and m["final"]]
    assert len(final) == 1
    line = final[0]["lines"][0]
    assert (line["count_in"], line["count_out"]) == (len(crossed), 0)
    assert sum(c["count_in"] for c in line["by_class"]) == len(crossed)
    zone = final[0]["zones"][0]
    assert zone["entered"] >= len(crossed) - 1 and zone["max_dwell_s"] > 0
    # The same totals in --stats, per direction and per class.
    counters = json.loads((run / "stats.json").read_text())["counters"]["analytics"]
    assert counters["carriageway.in"] == len(crossed) and counters["carriageway.out"] == 0
    for c in line["by_class"]:
        assert counters[f"carriageway.in.{c['label']}"] == c["count_in"]


def test_the_annotated_mp4_shows_the_line_and_its_counters(run: Path) -> None:
    with av.open(str(run / "out.mp4")) as container:
        pictures = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(pictures) == FRAMES
    last = pictures[-1].astype(int)
    line_band = last[296:305, 300:700]
    assert (np.abs(line_band - LINE_RGB).sum(axis=2) < 80).mean() > 0.2  # yellow, through H.264
    panel, scene = last[:40, :150], pictures[0][:40, 200:350]
    assert panel.mean() < scene.mean()  # the darkened counter panel...
    assert (panel > 200).all(axis=2).any()  # ...with white text on it
