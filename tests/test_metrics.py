"""Metrics: percentiles against numpy, recorder figures from known timestamps, the bounded
window, and the three renderings of a snapshot."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.metrics import (
    LatencyMetrics,
    PipelineMetrics,
    StageKind,
    StageMetrics,
    StageRecorder,
    percentile,
)
from pipeline.ring_buffer import BufferStats, OverflowPolicy


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50),
    q=st.floats(0, 100),
)
def test_percentile_matches_numpy_linear(values: list[float], q: float) -> None:
    got = percentile(sorted(values), q)
    assert got == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-6)


def test_percentile_of_nothing_is_none_and_q_is_checked() -> None:
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="q must be"):
        percentile([1.0], 101)


def test_recorder_figures_from_known_timestamps() -> None:
    rec = StageRecorder("infer", StageKind.PROCESSOR)
    rec.mark_started()
    for k in range(4):  # one item per second, each taking 0.5 s
        rec.record_item(float(k), k + 0.5)
    s = rec.snapshot(now_s=4.0)
    assert s.items == 4
    assert s.fps == pytest.approx(1.0)
    assert s.recent_fps == pytest.approx(1.0)
    assert s.busy_fraction == pytest.approx(0.5)
    assert s.recent_busy_fraction == pytest.approx(0.5)
    assert s.time_per_item_p50_ms == pytest.approx(500.0)
    assert s.time_per_item_p95_ms == pytest.approx(500.0)
    assert s.running
    assert s.latency is None  # only sinks measure latency

    # Starved for a while: the rate decays while running ...
    assert rec.snapshot(now_s=8.0).fps == pytest.approx(0.5)
    # ... and freezes once the stage has finished.
    rec.mark_finished(at_s=4.0)
    done = rec.snapshot(now_s=100.0)
    assert done.fps == pytest.approx(1.0) and not done.running


def test_recorder_memory_is_bounded_and_percentiles_follow_recent_items() -> None:
    rec = StageRecorder("sink", StageKind.SINK, window=100)
    t = 0.0
    for _ in range(5000):  # slow at first ...
        rec.record_item(t, t + 1.0)
        rec.record_latency(2.0)
        t += 1.0
    for _ in range(5000):  # ... then fast
        rec.record_item(t, t + 0.001)
        rec.record_latency(0.010)
        t += 0.002
    s = rec.snapshot(now_s=t)
    assert s.items == 10_000  # the counter is a total ...
    # ... the samples a window: over all items the p95 would be 1000 ms.
    assert s.time_per_item_p95_ms == pytest.approx(1.0)
    assert s.recent_fps == pytest.approx(500.0)
    assert s.fps == pytest.approx(10_000 / t)
    count, samples = rec.latency_samples()
    assert count == 10_000 and len(samples) == 100
    assert s.latency is not None
    assert s.latency.count == 10_000
    assert s.latency.p99_ms == pytest.approx(10.0)


def test_flush_time_counts_as_busy_not_as_items() -> None:
    rec = StageRecorder("tracker", StageKind.PROCESSOR)
    rec.record_item(0.0, 1.0)
    rec.record_busy(1.0, 2.0)
    s = rec.snapshot(now_s=2.0)
    assert s.items == 1
    assert s.busy_fraction == pytest.approx(1.0)


def test_a_stage_without_items_reports_zeros_and_no_percentiles() -> None:
    s = StageRecorder("idle", StageKind.SOURCE).snapshot(now_s=10.0)
    assert (s.items, s.fps, s.recent_fps, s.busy_fraction) == (0, 0.0, 0.0, 0.0)
    assert s.time_per_item_p50_ms is None and not s.running


def _example() -> PipelineMetrics:
    def stage(name: str, kind: StageKind, fps: float, busy: float) -> StageMetrics:
        return StageMetrics(
            name=name,
            kind=kind,
            items=900,
            fps=fps,
            recent_fps=fps,
            busy_fraction=busy,
            recent_busy_fraction=busy,
            time_per_item_p50_ms=busy * 1000 / fps,
            time_per_item_p95_ms=None if kind is StageKind.SINK else 2 * busy * 1000 / fps,
            running=True,
            latency=LatencyMetrics(900, 150.0, 210.0, 250.0) if kind is StageKind.SINK else None,
            cpu_s=None if kind is StageKind.SINK else 900 * 0.9 * busy / fps,
        )

    return PipelineMetrics(
        wall_s=30.0,
        frames_in=900,
        frames_out=780,
        latency=LatencyMetrics(count=780, p50_ms=150.0, p95_ms=210.4, p99_ms=250.0),
        stages=(
            stage("decode", StageKind.SOURCE, 29.94, 0.1),
            stage("infer", StageKind.PROCESSOR, 12.08, 0.83),
            stage("mp4", StageKind.SINK, 12.0, 0.2),
        ),
        buffers=(
            BufferStats(
                name="infer.in",
                capacity=8,
                policy=OverflowPolicy.DROP_OLDEST,
                level=3,
                high_water=8,
                put_count=900,
                get_count=777,
                dropped=120,
                ended=False,
                closed=False,
            ),
        ),
    )


def test_status_line_is_one_short_line() -> None:
    assert _example().status_line() == (
        "decode 29.9 fps | infer 12.1 fps 83% | q 3/8 | drops 120 | lat p95 210 ms"
    )


def test_to_dict_is_json_with_enum_values() -> None:
    d = json.loads(json.dumps(_example().to_dict()))
    assert d["frames_in"] == 900 and d["dropped"] == 120
    assert d["latency"] == {"count": 780, "p50_ms": 150.0, "p95_ms": 210.4, "p99_ms": 250.0}
    assert [s["kind"] for s in d["stages"]] == ["source", "processor", "sink"]
    assert d["stages"][2]["time_per_item_p95_ms"] is None
    assert d["stages"][2]["latency"]["p95_ms"] == 210.0
    assert d["buffers"][0]["policy"] == "drop_oldest"
    assert d["buffers"][0]["put_count"] == 900


def test_format_table_lists_every_stage_and_buffer() -> None:
    table = _example().format_table()
    lines = table.splitlines()
    assert lines[0].split() == [
        "stage",
        "kind",
        "items",
        "fps",
        "busy",
        "p50",
        "ms",
        "p95",
        "ms",
        "cpu",
        "ms",
    ]
    assert lines[2].split() == [
        "infer",
        "processor",
        "900",
        "12.1",
        "83%",
        "68.71",
        "137.42",
        "61.84",
    ]
    assert lines[3].split()[-2:] == ["-", "-"]  # no p95 and no CPU figure for the sink: dashes
    assert any(line.split()[:3] == ["infer.in", "drop_oldest", "3/8"] for line in lines)
    assert "p95 210.4" in table
    assert "frames in 900, out 780, dropped 120, wall 30.0 s" in table
