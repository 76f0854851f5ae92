"""`finestream run` end to end on real clips: what goes in comes out, errors are one line.

Every clip in ../shared/media goes through decode → preprocess → D-FINE-N → norfair → MP4 +
JSON lines + MOT, with the ONNX Runtime and the torch backends. The model is the calibrated
fixture checkpoint (random but active weights), at 320x320 to keep the suite fast; the score
threshold is low enough that its detections (scores ~0.04 to 0.1) reach the tracker and sinks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import yaml

from pipeline.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, main
from tests.conftest import FIXTURES, REPO

CHECKPOINT = FIXTURES / "dfine_n_calibrated" / "dfine_n_calibrated.pth"

# name: (frames, displayed width, displayed height), from ../shared/media/SOURCES.md
CLIPS = {
    "traffic_highway_960x540.mp4": (335, 960, 540),
    "aerial_crosswalk_640x640.mp4": (419, 640, 640),
    "pedestrians_night_street_1080p_mpeg4.mp4": (8, 1920, 1080),
    "cars_320x240.h265": (30, 320, 240),
    "cars_320x240_mjpeg.avi": (30, 320, 240),
    "flower_960x540_vp8.webm": (150, 960, 540),
    "nasa_multistream_320x180.mp4": (325, 320, 180),
    "person_asl_640x480_rotate90.mp4": (89, 480, 640),
}


TORCH_FRAMES = 120


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx_cache")


def write_config(
    path: Path, source: Path, out: Path, backend: str, cache: Path, **model: object
) -> Path:
    config = {
        "sources": [{"file": {"path": str(source)}}],
        "model": {
            "model": str(CHECKPOINT),
            "size": "n",
            "backend": backend,
            "imgsz": 320,
            "score_threshold": 0.07,
            "onnx_cache_dir": str(cache),
            **model,
        },
        "track": {"initialization_delay": 1},
        "outputs": {
            "video": {"path": str(out / "out.mp4"), "annotation": {"trail_length": 10}},
            "jsonl": {"path": str(out / "out.jsonl")},
            "mot": {"path": str(out / "out.txt")},
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def read_video(path: Path) -> tuple[int, tuple[int, int], list[float]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pts = []
        size = (0, 0)
        for frame in container.decode(stream):
            pts.append(float(frame.pts * frame.time_base))
            size = (frame.width, frame.height)
    return len(pts), size, pts


def read_jsonl(path: Path) -> list[dict]:
    """The per-frame messages (docs/events.md: events are lines of their own)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [line for line in lines if line.get("type") == "frame"]


def run_subprocess(args: list[str], **kwargs: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,  # type: ignore[arg-type]
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("finestream: error:")]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("clip", sorted(CLIPS))
def test_every_clip_end_to_end(
    clip: str, backend: str, tmp_path: Path, onnx_cache: Path, media_dir: Path
) -> None:
    frames, width, height = CLIPS[clip]
    config = write_config(tmp_path / "run.yaml", media_dir / clip, tmp_path, backend, onnx_cache)
    stats = tmp_path / "stats.json"
    args = ["run", str(config), "--no-progress", "--stats", str(stats)]
    if backend == "torch":
        # Every clip whole through ONNX Runtime; through torch (3x slower on this CPU) the first
        # TORCH_FRAMES of each, which also checks that --max-frames is a preview, not a loss.
        frames = min(frames, TORCH_FRAMES)
        args += ["--max-frames", str(TORCH_FRAMES)]

    assert main(args) == EXIT_OK

    video_frames, size, video_pts = read_video(tmp_path / "out.mp4")
    lines = read_jsonl(tmp_path / "out.jsonl")
    assert video_frames == frames
    assert len(lines) == frames
    assert size == (width, height)
    assert all(b > a for a, b in zip(video_pts, video_pts[1:]))
    assert [line["frame"] for line in lines] == list(range(frames))
    json_pts = [line["pts_s"] for line in lines]
    assert all(b > a for a, b in zip(json_pts, json_pts[1:]))
    # Real detections flowed through the tracker into the outputs.
    detections = [d for line in lines for d in line["detections"]]
    assert detections, "no detection passed the threshold: the outputs test nothing"
    for d in detections[:50]:
        x1, y1, x2, y2 = d["box_xyxy"]
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
        assert d["score"] >= 0.07
    if frames > 10:
        assert any((d["track_id"] or 0) >= 1 for d in detections)
        mot = (tmp_path / "out.txt").read_text().splitlines()
        assert mot and all(len(row.split(",")) == 10 for row in mot)
    metrics = json.loads(stats.read_text())
    assert metrics["frames_in"] == frames and metrics["dropped"] == 0


def test_torch_and_onnxruntime_agree(tmp_path: Path, onnx_cache: Path, media_dir: Path) -> None:
    """The two backends run the same network: the same boxes come out of both."""
    results = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        out.mkdir()
        config = write_config(
            out / "run.yaml", media_dir / "cars_320x240_mjpeg.avi", out, backend, onnx_cache
        )
        assert main(["run", str(config), "--no-progress"]) == EXIT_OK
        results[backend] = read_jsonl(out / "out.jsonl")
    for a, b in zip(results["torch"], results["onnxruntime"]):
        boxes_a = sorted(tuple(d["box_xyxy"]) for d in a["detections"])
        boxes_b = sorted(tuple(d["box_xyxy"]) for d in b["detections"])
        # near the threshold a score may fall either side of it; the rest must agree
        assert abs(len(boxes_a) - len(boxes_b)) <= 2
        common = min(len(boxes_a), len(boxes_b))
        if common and len(boxes_a) == len(boxes_b):
            assert np.allclose(np.array(boxes_a), np.array(boxes_b), atol=0.1)


def test_stage_failing_mid_run_exits_nonzero_naming_it_within_5_s(
    tmp_path: Path, media_dir: Path
) -> None:
    """A real sink fails for a real reason mid-run: its file hits the process's file-size limit
    (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the write fails with EFBIG, as on a full disk)."""
    import resource

    limit = 48 * 1024
    out = tmp_path / "o.jsonl"

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = run_subprocess(
        [
            "run",
            "--no-progress",
            "--source",
            str(media_dir / "traffic_highway_960x540.mp4"),
            "--model",
            str(CHECKPOINT),
            "--size",
            "n",
            "--backend",
            "torch",
            "--imgsz",
            "320",
            "--threshold",
            "0.07",
            "--jsonl",
            str(out),
        ],
        preexec_fn=limit_file_size,
    )
    full_at = None
    while proc.poll() is None:
        if full_at is None and out.exists() and out.stat().st_size >= limit - 4096:
            full_at = time.monotonic()
        time.sleep(0.05)
    exited_at = time.monotonic()
    _, stderr = proc.communicate()
    assert proc.returncode == EXIT_FAILED, stderr[-2000:]
    errors = error_lines(stderr)
    assert len(errors) == 1 and "stage 'jsonl_sink' failed" in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    lines = out.read_text().splitlines()
    assert 5 < len(lines) < 335, "the failure was meant to come mid-run"
    assert full_at is not None and exited_at - full_at < 5.0


def test_failure_leaves_no_thread_running(
    tmp_path: Path, onnx_cache: Path, media_dir: Path
) -> None:
    """In process: after a stage fails, join() raises naming it and every stage thread is gone."""
    import dataclasses

    from pipeline.assemble import build_pipeline
    from pipeline.config import load_config
    from pipeline.runner import StageError

    # torch: its model loads in about a second, well inside the runner's 5 s join timeout
    # (an ONNX export in setup() could not be interrupted that fast).
    config = load_config(
        write_config(
            tmp_path / "run.yaml",
            media_dir / "traffic_highway_960x540.mp4",
            tmp_path,
            "torch",
            onnx_cache,
        )
    )
    # The MP4 is to go into a folder that cannot be made (a file stands in its way), so the
    # video sink fails when it opens its output on the first frames.
    (tmp_path / "blocked").write_text("a file, not a folder")
    video = dataclasses.replace(config.outputs.video, path=str(tmp_path / "blocked" / "out.mp4"))
    config = dataclasses.replace(config, outputs=dataclasses.replace(config.outputs, video=video))
    assembled = build_pipeline(config)
    before = set(threading.enumerate())
    assembled.pipeline.start()
    with pytest.raises(StageError, match="video_sink"):
        assembled.pipeline.join(timeout=60)
    deadline = time.monotonic() + 10
    while assembled.pipeline.running and time.monotonic() < deadline:
        try:
            assembled.pipeline.join(timeout=0.5)
        except StageError:
            pass
    left = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not left, f"threads still running: {[t.name for t in left]}"


def test_sigint_leaves_playable_video_matching_jsonl(
    tmp_path: Path, onnx_cache: Path, media_dir: Path
) -> None:
    config = write_config(
        tmp_path / "run.yaml",
        media_dir / "traffic_highway_960x540.mp4",
        tmp_path,
        "onnxruntime",
        onnx_cache,
    )
    # Warm the ONNX cache so the subprocess starts processing at once.
    proc = run_subprocess(["run", str(config), "--no-progress", "--realtime"])
    jsonl = tmp_path / "out.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        # Frames, not lines: track events are lines of their own.
        if jsonl.exists() and jsonl.read_text().count('"type":"frame"') >= 20:
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"no progress: {proc.communicate()[1][-2000:]}")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-2000:]
    lines = read_jsonl(jsonl)
    video_frames, _, _ = read_video(tmp_path / "out.mp4")
    assert 20 <= len(lines) < 335
    assert video_frames == len(lines)


# Bad input (refused before anything starts, exit 2): tests/test_bad_input.py.


def test_truncated_file_keeps_what_decodes_and_says_what_was_lost(
    tmp_path: Path, media_dir: Path
) -> None:
    data = (media_dir / "traffic_highway_960x540.mp4").read_bytes()
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(data[: int(len(data) * 0.4)])
    out = tmp_path / "o.jsonl"
    proc = run_subprocess(
        [
            "run",
            "--no-progress",
            "--source",
            str(truncated),
            "--model",
            str(CHECKPOINT),
            "--size",
            "n",
            "--backend",
            "torch",
            "--imgsz",
            "320",
            "--jsonl",
            str(out),
        ]
    )
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_FAILED, stderr[-2000:]
    errors = error_lines(stderr)
    assert len(errors) == 1 and "truncated" in errors[0], stderr[-2000:]
    decoded = len(out.read_text().splitlines())
    assert 50 < decoded < 335
    assert str(decoded) in errors[0]
