"""Smoke tests of the benchmarks: they run end to end on a few frames, and their ratios are the
figures they print divided as documented. No speed is asserted: speed belongs in bench/RESULTS.md.

Real parts throughout: PyAV decoding and x264 encoding of the shared clips, ONNX Runtime on the
official D-FINE-N export of the calibrated fixture (an .onnx, so no export step is needed), and
the loopback RTSP server for the soak.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import av
import pytest

from bench import contention as bench_contention
from bench import pipeline as bench_pipeline
from bench import soak as bench_soak
from bench.common import clip_frame_count, least_squares_slope, loop_clip
from rtsp_server import require_rtsp_server

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TRAFFIC = SHARED / "media" / "traffic_highway_960x540.mp4"
NIGHT_1080P = SHARED / "media" / "pedestrians_night_street_1080p_mpeg4.mp4"
OFFICIAL_ONNX = SHARED / "fixtures" / "dfine_n_calibrated" / "dfine_n_calibrated_official.onnx"


def _need(*paths: Path) -> None:
    for path in paths:
        if not path.is_file():
            pytest.skip(
                f"shared material not found: {path} (the shared/ folder beside the repository)"
            )


def test_least_squares_slope_recovers_a_line() -> None:
    xs = [0.0, 1.0, 2.0, 3.0, 4.0]
    assert least_squares_slope(xs, [3.0 + 0.5 * x for x in xs]) == pytest.approx(0.5)
    # Noise symmetric about a flat line: slope 0.
    assert least_squares_slope(xs, [1.0, 2.0, 1.0, 2.0, 1.0]) == pytest.approx(0.0)
    assert least_squares_slope([1.0], [5.0]) == 0.0
    with pytest.raises(ValueError, match="same length"):
        least_squares_slope([1.0, 2.0], [1.0])


def test_loop_clip_repeats_every_frame_with_increasing_time(tmp_path: Path) -> None:
    _need(NIGHT_1080P)
    looped = loop_clip(NIGHT_1080P, tmp_path / "looped.mp4", 3)
    assert clip_frame_count(looped) == 24
    with av.open(str(looped)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 24
    times = [float(f.time) for f in frames]
    assert all(b > a for a, b in zip(times, times[1:]))
    # 3 fps: one frame period between the last frame of a pass and the first of the next.
    assert times[8] - times[7] == pytest.approx(1 / 3, abs=1e-3)
    # The same pictures in each pass.
    first = frames[0].to_ndarray(format="gray")
    assert (frames[8].to_ndarray(format="gray") == first).all()


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    _need(TRAFFIC, OFFICIAL_ONNX)
    out = tmp_path_factory.mktemp("bench")
    code = bench_pipeline.main(
        [
            "--source",
            str(TRAFFIC),
            "--model",
            str(OFFICIAL_ONNX),
            "--size",
            "n",
            "--backend",
            "onnxruntime",
            "--imgsz",
            "640",
            "--frames",
            "10",
            "--threads",
            "1,2",
            "--work-dir",
            str(out),
            "--json",
            str(out / "result.json"),
        ]
    )
    assert code == 0
    result: dict = json.loads((out / "result.json").read_text())
    return result


def test_pipeline_bench_reports_every_figure(bench_result: dict) -> None:
    r = bench_result
    for key in (
        "command",
        "machine",
        "settings",
        "clip",
        "stages",
        "slowest_stage",
        "pipeline",
        "sequential",
        "efficiency",
        "speedup",
        "sweep",
        "runs",
    ):
        assert key in r, key
    assert r["command"].startswith("python -m bench.pipeline --source ")
    assert set(r["stages"]) == set(bench_pipeline.STAGES)
    for figures in r["stages"].values():
        assert figures["fps"] > 0
        assert figures["ms_per_frame"] == pytest.approx(1000.0 / figures["fps"], rel=1e-2)
    assert r["clip"]["frames"] == 10
    p = r["pipeline"]
    assert p["frames"] == 10 and r["sequential"]["frames"] == 10
    assert set(p["stages"]) == {"decode:0", "preprocess", "infer", "track", "video_sink"}
    assert all(0.0 <= s["busy"] <= 1.0 for s in p["stages"].values())
    assert {b["capacity"] for b in p["buffers"].values()} == {bench_pipeline.DEFAULT_CAPACITY}
    assert all(b["dropped"] == 0 for b in p["buffers"].values())  # blocking buffers lose nothing
    lat = p["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert p["peak_rss_mib"] >= p["rss_before_mib"] > 0
    assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"]


def test_pipeline_bench_profiles_the_threads(bench_result: dict) -> None:
    """CPU time per frame of each stage's thread, the inference's alone and inside."""
    p = bench_result["pipeline"]
    for name, stage in p["stages"].items():
        assert stage["cpu_ms_per_frame"] > 0, name
        assert stage["core_wait_ms_per_frame"] is None or stage["core_wait_ms_per_frame"] >= 0
    # One intra-op thread computes in the stage's own thread: its CPU is most of each call.
    infer = p["stages"]["infer"]
    assert 0.5 * infer["call_p50_ms"] <= infer["cpu_ms_per_frame"] <= 2.0 * infer["call_p95_ms"]
    alone = bench_result["stages"]["inference"]
    assert 0.5 * alone["call_p50_ms"] <= alone["cpu_ms_per_frame"] <= 2.0 * alone["call_p95_ms"]
    assert 0 < p["cores_busy"] <= bench_result["machine"]["cores"] + 0.5
    assert (
        p["process_cpu_ms_per_frame"]
        >= sum(s["cpu_ms_per_frame"] for s in p["stages"].values()) * 0.9
    )


def test_pipeline_bench_ratios_come_from_the_figures(bench_result: dict) -> None:
    r = bench_result
    stage_fps = {name: figures["fps"] for name, figures in r["stages"].items()}
    slowest = min(stage_fps, key=lambda name: stage_fps[name])
    assert r["slowest_stage"] == slowest
    assert r["slowest_stage_fps"] == pytest.approx(stage_fps[slowest], rel=1e-3)
    assert r["efficiency"] == pytest.approx(r["pipeline"]["fps"] / r["slowest_stage_fps"], abs=1e-3)
    assert r["speedup"] == pytest.approx(r["pipeline"]["fps"] / r["sequential"]["fps"], abs=1e-3)
    # The sweep has one row per thread count; the first is the headline.
    assert [row["intra_op_threads"] for row in r["sweep"]] == [1, 2]
    head = r["sweep"][0]
    assert head["pipeline_fps"] == r["pipeline"]["fps"]
    assert head["efficiency"] == r["efficiency"] and head["speedup"] == r["speedup"]
    for row in r["sweep"]:
        slowest_fps = min(
            row["inference_alone_fps"],
            *(f for name, f in stage_fps.items() if name != "inference"),
        )
        assert row["efficiency"] == pytest.approx(row["pipeline_fps"] / slowest_fps, abs=1e-3)
        assert row["speedup"] == pytest.approx(
            row["pipeline_fps"] / row["sequential_fps"], abs=1e-3
        )


def test_pipeline_bench_loops_a_short_clip(tmp_path: Path) -> None:
    _need(NIGHT_1080P)
    clip, frames, passes = bench_pipeline.prepare_clip(NIGHT_1080P, 20, tmp_path)
    assert (frames, passes) == (20, 3)
    assert clip != NIGHT_1080P and clip_frame_count(clip) == 24
    # Without --frames an 8-frame clip still gives the pipeline MIN_FRAMES to reach its pace.
    looped, frames, passes = bench_pipeline.prepare_clip(NIGHT_1080P, 0, tmp_path)
    assert (frames, passes) == (bench_pipeline.MIN_FRAMES, 38) and clip_frame_count(looped) == 304
    if TRAFFIC.exists():  # long enough: the clip itself, whole
        assert bench_pipeline.prepare_clip(TRAFFIC, 0, tmp_path) == (TRAFFIC, 335, 1)


def test_pipeline_bench_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="--frames"):
        bench_pipeline.BenchConfig(source=TRAFFIC, model=None, frames=-1)
    with pytest.raises(ValueError, match="--threads"):
        bench_pipeline.BenchConfig(source=TRAFFIC, model=None, intra_op_threads=(0,))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="puts a neighbour on a second core")
def test_contention_bench_times_every_neighbour(tmp_path: Path) -> None:
    _need(NIGHT_1080P, OFFICIAL_ONNX)
    out = tmp_path / "contention.json"
    code = bench_contention.main(
        [
            "--model",
            str(OFFICIAL_ONNX),
            "--size",
            "n",
            "--imgsz",
            "640",
            "--clip",
            str(NIGHT_1080P),
            "--runs",
            "2",
            "--rounds",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    r = json.loads(out.read_text())
    assert [row["neighbour"] for row in r["rows"]] == list(bench_contention.NEIGHBOURS)
    assert r["inference_cpu"] not in r["neighbour_cpus"]
    idle = r["rows"][0]["median_ms"]
    for row in r["rows"]:
        assert row["calls"] == 2 and 0 < row["min_ms"] <= row["median_ms"]
        assert row["vs_idle"] == pytest.approx(row["median_ms"] / idle, abs=2e-3)
    # The neighbours were killed: no child process is left working.
    assert not [c for c in os.listdir("/proc") if c.isdigit() and _is_neighbour(int(c))]


def _is_neighbour(pid: int) -> bool:
    try:
        return "--neighbour" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def test_contention_bench_refuses_a_missing_clip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench_contention.main(["--clip", str(tmp_path / "none.mp4")]) == 2
    assert "no clip at" in capsys.readouterr().err


@pytest.mark.rtsp
def test_soak_reports_slopes_on_a_short_live_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _need(TRAFFIC, OFFICIAL_ONNX)
    require_rtsp_server()
    out = tmp_path / "soak.json"
    code = bench_soak.main(
        [
            "--serve",
            str(TRAFFIC),
            "--model",
            str(OFFICIAL_ONNX),
            "--minutes",
            "0.1",
            "--interval-s",
            "2",
            "--warmup-s",
            "2",
            "--json",
            str(out),
        ]
    )
    # Exit 0 (both checks pass) or 3 (one fails): a 6-second run proves nothing about drift.
    assert code in (0, 3), capsys.readouterr().err
    r = json.loads(out.read_text())
    assert r["settings"]["buffers"] == "DROP_OLDEST, capacity 2"
    assert len(r["samples"]) >= 3
    assert r["frames_out"] > 0 and r["frames_in"] >= r["frames_out"]
    for key in ("rss_slope_mib_per_min", "latency_p95_slope_ms_per_min"):
        assert math.isfinite(r[key])
    measured = [s for s in r["samples"] if s["t_s"] >= 2]
    minutes = [(s["t_s"] - 2) / 60.0 for s in measured]
    rss = [s["rss_mib"] for s in measured]
    assert r["rss_slope_mib_per_min"] == pytest.approx(least_squares_slope(minutes, rss), abs=1e-3)
    assert r["rss_ok"] == (r["rss_slope_mib_per_min"] < 1.0)
