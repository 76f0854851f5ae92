"""`finestream run` as a new user meets it: the fastest backend by default, the input size read
from the model file, complete files never called truncated, class names from one place, and
the source/ZeroMQ/re-stream counters in the metrics.

Most runs use the teacher ONNX (NanoDet, fixed 416x416, a real COCO detector; no --imgsz) on
small clips made here; the backend comparison uses the calibrated D-FINE-N checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from pipeline.cli import EXIT_FAILED, EXIT_OK, main
from tests.conftest import FIXTURES, REPO, SHARED
from tests.made_clips import UNUSUAL_TIMING, write_clip

CHECKPOINT = FIXTURES / "dfine_n_calibrated" / "dfine_n_calibrated.pth"
TEACHER = SHARED / "teachers" / "nanodet_coco_416.onnx"


@pytest.fixture(scope="module")
def teacher() -> Path:
    if not TEACHER.is_file():
        pytest.skip(f"teacher ONNX not found at {TEACHER}")
    return TEACHER


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def frame_lines(path: Path) -> list[dict]:
    """The per-frame lines of a JSON Lines output (events, if any, are lines of their own)."""
    return [line for line in read_jsonl(path) if line.get("type", "frame") == "frame"]


def box(detection: dict) -> list[float]:
    return detection["box_xyxy"] if "box_xyxy" in detection else detection["box"]


def pts_s(line: dict) -> float:
    return line["pts_s"] if "pts_s" in line else line["pts"]


def video_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


# ---- complete files with unusual timing ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(UNUSUAL_TIMING))
def test_complete_files_with_unusual_timing_exit_0_with_every_frame(
    name: str, tmp_path: Path, teacher: Path
) -> None:
    make, frames = UNUSUAL_TIMING[name]
    clip = make(tmp_path / name)
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "--no-progress",
            "--source",
            str(clip),
            "--model",
            str(teacher),
            "--output",
            str(out / "o.mp4"),
            "--jsonl",
            str(out / "o.jsonl"),
        ]
    )
    assert code == EXIT_OK
    lines = frame_lines(out / "o.jsonl")
    assert [line["frame"] for line in lines] == list(range(frames))
    assert video_frames(out / "o.mp4") == frames
    pts = [pts_s(line) for line in lines]
    assert all(b > a for a, b in zip(pts, pts[1:]))


def test_raw_h265_without_timestamps_exits_0_with_every_frame(
    tmp_path: Path, teacher: Path, media_dir: Path
) -> None:
    code = main(
        [
            "run",
            "--no-progress",
            "--source",
            str(media_dir / "cars_320x240.h265"),
            "--model",
            str(teacher),
            "--jsonl",
            str(tmp_path / "o.jsonl"),
        ]
    )
    assert code == EXIT_OK
    assert [line["frame"] for line in frame_lines(tmp_path / "o.jsonl")] == list(range(30))


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_a_really_truncated_file_still_says_so(
    suffix: str, tmp_path: Path, teacher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = write_clip(
        tmp_path / f"whole{suffix}",
        list(range(40)),
        Fraction(1, 25),
        container_options={"movflags": "+faststart"} if suffix == ".mp4" else None,
    )
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    code = main(
        [
            "run",
            "--no-progress",
            "--source",
            str(cut),
            "--model",
            str(teacher),
            "--jsonl",
            str(tmp_path / "o.jsonl"),
        ]
    )
    assert code == EXIT_FAILED
    decoded = len(frame_lines(tmp_path / "o.jsonl"))
    assert 0 < decoded < 40
    error = [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.startswith("finestream: error:")
    ]
    assert len(error) == 1 and "truncated" in error[0] and f"decoded {decoded}" in error[0]


# ---- counters in the metrics ---------------------------------------------------------------


def test_zmq_and_restream_counters_reach_the_stats(tmp_path: Path, teacher: Path) -> None:
    """A ZeroMQ sink with no subscriber still sends (counted, with bytes); a re-stream to a
    port where nothing listens drops every frame (counted). Both appear in --stats and the table."""
    import socket

    clip = write_clip(tmp_path / "c.mp4", list(range(8)), Fraction(1, 25))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # bound then closed: nothing listens there
    stats = tmp_path / "stats.json"
    code = main(
        [
            "run",
            "--no-progress",
            "--source",
            str(clip),
            "--model",
            str(teacher),
            "--zmq",
            f"tcp://127.0.0.1:{port}",
            "--publish",
            f"rtsp://127.0.0.1:{closed}/x",
            "--stats",
            str(stats),
        ]
    )
    assert code == EXIT_OK
    counters = json.loads(stats.read_text())["counters"]
    zmq = next(v for k, v in counters.items() if k.startswith("zmq"))
    rtsp = next(v for k, v in counters.items() if k.startswith("rtsp"))
    assert zmq["sent"] >= 8 and zmq["bytes_sent"] > 8 * 50 and zmq["dropped"] == 0
    assert rtsp["dropped"] == 8 and rtsp["published"] == 0 and rtsp["bytes_sent"] == 0


# ---- the default backend -------------------------------------------------------------------


def _run_process(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _matched(a: list[dict], b: list[dict], threshold: float) -> None:
    """``a`` and ``b`` hold the same detections as sets: same class, boxes within 0.05 px.
    Detections scoring within 0.002 of the threshold may be on one side only."""
    sure_a = [d for d in a if d["score"] >= threshold + 0.002]
    sure_b = [d for d in b if d["score"] >= threshold + 0.002]
    for ours, theirs in ((sure_a, b), (sure_b, a)):
        if not ours:
            continue
        assert theirs, f"{len(ours)} detections on one side only"
        cost = np.array(
            [
                [
                    max(abs(p - q) for p, q in zip(box(d), box(e)))
                    + (0 if d["class_id"] == e["class_id"] else 1e6)
                    for e in theirs
                ]
                for d in ours
            ]
        )
        rows, cols = linear_sum_assignment(cost)
        assert len(rows) == len(ours)
        assert cost[rows, cols].max() <= 0.05, f"boxes differ by {cost[rows, cols].max():.3f} px"


@pytest.mark.slow  # three runs, one ONNX export and torch on a CPU: about 90 s on 2 busy cores
def test_default_backend_on_a_cpu_is_onnxruntime_cached_and_matches_torch(
    tmp_path: Path, fixtures_dir: Path, media_dir: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine auto runs torch FP16")
    clip = media_dir / "cars_320x240_mjpeg.avi"
    threshold = 0.07
    common = [
        "run",
        "--no-progress",
        "--source",
        str(clip),
        "--model",
        str(CHECKPOINT),
        "--imgsz",
        "320",
        "--threshold",
        str(threshold),
        "--max-frames",
        "10",
    ]
    runs = {}
    for name, extra in (("auto", []), ("again", []), ("torch", ["--backend", "torch"])):
        out = tmp_path / f"{name}.jsonl"
        proc = _run_process([*common, *extra, "--jsonl", str(out)], tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = (proc.stderr.splitlines(), frame_lines(out))
        if name == "auto":
            cached = sorted((tmp_path / ".cache" / "finestream" / "onnx").glob("*.onnx"))
            assert len(cached) == 1
            mtime = cached[0].stat().st_mtime_ns
    first_line = runs["auto"][0][0]
    assert first_line.startswith("finestream: backend onnxruntime (auto:"), first_line
    assert runs["again"][0][0] == first_line
    assert runs["torch"][0][0].startswith("finestream: backend torch (as asked)")
    # The second run reused the export: still one file, untouched.
    assert sorted((tmp_path / ".cache" / "finestream" / "onnx").glob("*.onnx")) == cached
    assert cached[0].stat().st_mtime_ns == mtime
    auto, torch_lines = runs["auto"][1], runs["torch"][1]
    assert len(auto) == len(torch_lines) == 10
    assert any(line["detections"] for line in auto), "no detections: the comparison tests nothing"
    for a, b in zip(auto, torch_lines):
        _matched(a["detections"], b["detections"], threshold)


def test_teacher_runs_without_imgsz_and_says_its_input_size(tmp_path: Path, teacher: Path) -> None:
    clip = write_clip(tmp_path / "c.mp4", list(range(3)), Fraction(1, 25))
    proc = _run_process(
        [
            "run",
            "--no-progress",
            "--source",
            str(clip),
            "--model",
            str(teacher),
            "--jsonl",
            str(tmp_path / "o.jsonl"),
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = proc.stderr.splitlines()[0]
    assert first.startswith("finestream: backend onnxruntime") and "input 416x416" in first
    # Quiet by default: the start-up line, the table and the summary; no INFO lines.
    assert not any(": INFO:" in line for line in proc.stderr.splitlines())
    assert len(frame_lines(tmp_path / "o.jsonl")) == 3


# ---- class names from one place ------------------------------------------------------------


NAMES = ["cyclist", "bus", "van", "dog", "cone", "sign"]


@pytest.fixture(scope="module")
def six_class_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-class D-FINE-N checkpoint as our trainer writes it: official layout plus
    ``class_names``. Random weights: with threshold 0 every query is a detection."""
    from dfine.checkpoint import build_and_load

    path = tmp_path_factory.mktemp("six") / "six.pth"
    model = build_and_load("n", len(NAMES), None, seed=1)
    torch.save({"model": model.state_dict(), "class_names": NAMES}, path)
    return path


def _backends() -> list[str]:
    from dfine.backends.tensorrt_backend import tensorrt_available

    found = ["torch", "onnxruntime"]
    if tensorrt_available() and torch.cuda.is_available():
        found.append("tensorrt")
    return found


def test_every_backend_labels_with_the_models_class_names(
    tmp_path: Path, six_class_checkpoint: Path
) -> None:
    """The same 6-class model through every backend here: the backend's class names, every
    sink's labels and the JSON lines' labels are the checkpoint's names."""
    import dataclasses

    from pipeline.assemble import build_pipeline
    from pipeline.config import AppConfig, CliOverrides, apply_overrides
    from stages.infer import InferenceStage

    clip = write_clip(tmp_path / "c.mp4", list(range(2)), Fraction(1, 25))
    engine = None
    for backend in _backends():
        model = six_class_checkpoint
        if backend == "tensorrt":  # built from our export of the same checkpoint
            from dfine.backends.tensorrt_build import build_engine
            from dfine.export import export_from_checkpoint

            onnx_path = export_from_checkpoint(
                six_class_checkpoint, None, None, tmp_path / "six.onnx", 256
            )
            engine = build_engine(onnx_path, tmp_path / "six.engine", max_batch=1)
            model = engine
        out = tmp_path / backend
        config = apply_overrides(
            AppConfig(),
            CliOverrides(
                sources=(str(clip),),
                model=str(model),
                backend=backend,
                imgsz=None if engine else 256,
                score_threshold=0.0,
                jsonl=out / "o.jsonl",
                video=out / "o.mp4",
                mot=out / "o.txt",
            ),
        )
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, onnx_cache_dir=tmp_path / "cache")
        )
        assembled = build_pipeline(config)
        assert assembled.model.class_names == tuple(NAMES)
        assembled.pipeline.run()
        infer = next(s for s in assembled.stages if isinstance(s, InferenceStage))
        assert infer.backend.class_names == NAMES, backend
        labelled = [
            s for s in assembled.stages if hasattr(s, "class_names") and hasattr(s, "write")
        ]
        assert len(labelled) >= 2
        for sink in labelled:
            assert list(sink.class_names) == NAMES, (backend, sink.name)
        detections = [d for line in frame_lines(out / "o.jsonl") for d in line["detections"]]
        assert len(detections) == 2 * 300
        assert all(d["label"] == NAMES[d["class_id"]] for d in detections)


def test_export_writes_the_checkpoints_class_names(
    tmp_path: Path, six_class_checkpoint: Path
) -> None:
    from dfine.model_info import read_model_info

    out = tmp_path / "six.onnx"
    assert (
        main(["export", str(six_class_checkpoint), "--imgsz", "256", "--output", str(out)])
        == EXIT_OK
    )
    info = read_model_info(out)
    assert (
        info.class_names == tuple(NAMES) and info.input_size_hw == (256, 256) and info.size == "n"
    )


def test_live_source_outages_and_reconnects_reach_the_metrics(
    tmp_path: Path, teacher: Path, media_dir: Path
) -> None:
    """A live HTTP stream that ends (a camera going away) and comes back: the outages,
    reconnects and bytes show in the metrics, the status line and the final table."""
    import dataclasses
    import functools
    import http.server
    import threading
    import time

    from pipeline.assemble import build_pipeline
    from pipeline.config import AppConfig, SourceConfig
    from stages.infer import InferConfig
    from stages.live import LiveSourceConfig

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cars_320x240_mjpeg.avi"
    live = LiveSourceConfig(url=url, stream_id="cam", backoff_initial_s=0.1, backoff_max_s=0.2)
    config = dataclasses.replace(
        AppConfig(),
        sources=(SourceConfig(live=live),),
        model=InferConfig(model=teacher),
        track=None,
    )
    assembled = build_pipeline(config)
    assembled.pipeline.start()
    try:
        deadline = time.monotonic() + 90
        counters: dict = {}
        while time.monotonic() < deadline:
            counters = dict(assembled.metrics().counters.get("live:cam", {}))
            if counters.get("reconnects", 0) >= 2:
                break
            time.sleep(0.2)
        status = assembled.metrics().status_line()
    finally:
        assembled.stop()
        assembled.pipeline.join(timeout=30)
        server.shutdown()
        server.server_close()
    assert counters["outages"] >= 2 and counters["reconnects"] >= 2, counters
    assert counters["bytes_received"] >= 2 * 150_000  # two passes of the 184 kB clip, at least
    assert "live:cam outages" in status
    table = assembled.metrics().format_table()
    assert any(line.startswith("live:cam") and "reconnects" in line for line in table.splitlines())
    assert assembled.metrics().to_dict()["counters"]["live:cam"]["outages"] >= 2
