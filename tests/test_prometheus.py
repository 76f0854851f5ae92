"""The Prometheus endpoint: scraped over HTTP during real runs (the teacher ONNX on a shared
clip), read back with prometheus_client's own parser; and the exporter's naming, generically."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.assemble import build_pipeline
from pipeline.cli import EXIT_OK, EXIT_USAGE, main
from pipeline.config import AppConfig, OutputsConfig, SourceConfig
from pipeline.metrics import (
    TIME_PER_ITEM_BUCKETS_S,
    LatencyMetrics,
    PipelineMetrics,
    StageKind,
    StageMetrics,
    StageRecorder,
)
from pipeline.prometheus import (
    MetricsConfig,
    MetricsServer,
    MetricsServerError,
    describe_names,
)
from rtsp_server import free_port
from stages.decode import DecodeConfig
from stages.infer import InferConfig
from stages.sinks.jsonl import JsonLinesSinkConfig
from tests.conftest import SHARED
from tests.media import media_path

TEACHER = SHARED / "teachers" / "nanodet_coco_416.onnx"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def teacher() -> Path:
    if not TEACHER.is_file():
        pytest.skip(f"teacher ONNX not found at {TEACHER}")
    return TEACHER


def scrape(url: str) -> Samples:
    """Every sample of one scrape: (name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _wait(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_scraped_twice_during_a_run_the_figures_move(teacher: Path, tmp_path: Path) -> None:
    clip = media_path("traffic_highway_960x540.mp4")
    source = SourceConfig(file=DecodeConfig(path=str(clip), stream_id="cam0", max_frames=200))
    config = dataclasses.replace(
        AppConfig(),
        sources=(source,),
        model=InferConfig(model=teacher),
        outputs=OutputsConfig(jsonl=JsonLinesSinkConfig(path=str(tmp_path / "run.jsonl"))),
    )
    assembled = build_pipeline(config)
    server = MetricsServer(MetricsConfig(port=free_port()), assembled.metrics)
    server.start()
    assert server._server.server_address[0] == "127.0.0.1"  # loopback unless told otherwise
    infer = {"stage": "infer", "kind": "processor"}
    try:
        assembled.pipeline.start()
        assert _wait(lambda: assembled.pipeline.metrics().frames_out >= 5, 120), "no frames"
        first = scrape(server.url)
        assert _wait(lambda: assembled.pipeline.metrics().frames_out >= 40, 120)
        second = scrape(server.url)
        assembled.pipeline.join(timeout=300)
        last = scrape(server.url)  # still served after the run, until closed
    finally:
        assembled.stop()
        server.close()
    for name in (
        "finestream_stage_items_total",
        "finestream_stage_time_per_item_seconds_count",
        "finestream_stage_time_per_item_seconds_sum",
        "finestream_stage_cpu_seconds_total",
    ):
        assert value(first, name, **infer) < value(second, name, **infer), name
    assert value(first, "finestream_pipeline_frames_in_total") < value(
        second, "finestream_pipeline_frames_in_total"
    )
    assert value(second, "finestream_stage_fps", **infer) > 0
    assert value(second, "finestream_stage_running", **infer) == 1
    # The histogram: cumulative buckets ending in +Inf == count, over every item so far.
    buckets = [
        value(last, "finestream_stage_time_per_item_seconds_bucket", le=le, **infer)
        for le in [*(repr(b) for b in TIME_PER_ITEM_BUCKETS_S), "+Inf"]
    ]
    assert buckets == sorted(buckets) and buckets[-1] == 200
    assert value(last, "finestream_stage_time_per_item_seconds_count", **infer) == 200
    # Queue levels, per buffer; file runs block, so nothing was dropped.
    sink_in = {"buffer": "jsonl_sink.in", "policy": "block"}
    assert value(last, "finestream_buffer_capacity", **sink_in) == config.buffers.capacity
    assert value(last, "finestream_buffer_put_count_total", **sink_in) == 200
    assert value(last, "finestream_buffer_dropped_total", **sink_in) == 0
    assert value(last, "finestream_stage_running", **infer) == 0
    assert (
        value(last, "finestream_stage_latency_count_total", stage="jsonl_sink", kind="sink") == 200
    )


def test_the_cli_serves_the_metrics_while_it_runs(
    teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`finestream run --metrics-port`: a scraper thread beside the real CLI on the main thread."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    scrapes: list[Samples] = []

    def scraper() -> None:
        def served() -> bool:
            try:
                scrapes.append(scrape(url))
                return True
            except OSError:
                return False

        if not _wait(served, 120):
            return
        infer = frozenset({"stage": "infer", "kind": "processor"}.items())
        items = ("finestream_stage_items_total", infer)
        _wait(lambda: served() and scrapes[-1].get(items, 0) >= 10, 120)

    thread = threading.Thread(target=scraper, daemon=True)
    thread.start()
    clip = media_path("traffic_highway_960x540.mp4")
    code = main(
        ["run", "--no-progress", "--source", str(clip), "--model", str(teacher)]
        + ["--jsonl", str(tmp_path / "o.jsonl"), "--max-frames", "120", "--realtime"]
        + ["--metrics-port", str(port)]
    )
    thread.join(timeout=10)
    assert code == EXIT_OK
    assert f"Prometheus metrics on {url}" in capsys.readouterr().err
    assert len(scrapes) >= 2
    key = ("finestream_pipeline_frames_in_total", frozenset())
    assert scrapes[0][key] < scrapes[-1][key]
    with pytest.raises(OSError):  # closed with the run
        scrape(url)


def test_a_metrics_port_in_use_is_refused_before_anything_starts(
    teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clip = media_path("cars_320x240_mjpeg.avi")
    out = tmp_path / "o.jsonl"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(
            ["run", "--no-progress", "--source", str(clip), "--model", str(teacher)]
            + ["--jsonl", str(out), "--metrics-port", str(port)]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE
    assert err[-1].startswith(f"finestream: error: metrics.port {port}: cannot listen on 127.0.0.1")
    assert "--metrics-port" in err[-1]
    assert not out.exists()  # no stage started


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_a_bad_port_is_refused(port: int) -> None:
    with pytest.raises(ValueError, match="metrics.port must be within 1..65535"):
        MetricsConfig(port=port)


def test_a_server_that_cannot_bind_says_so_in_one_line() -> None:
    server = MetricsServer(MetricsConfig(port=free_port(), host="192.0.2.1"), lambda: _metrics())
    with pytest.raises(MetricsServerError, match=r"cannot listen on 192\.0\.2\.1"):
        server.start()


# ---- the exporter reads the engine's figures, whatever they are ------------------------------------


@dataclasses.dataclass(frozen=True)
class _StageWithBatches(StageMetrics):
    """A figure added to the stage metrics later (as batching adds one)."""

    batch_size_mean: float = 3.5
    window_ms: float = 250.0


def _metrics(stage: StageMetrics | None = None, **counters: Any) -> PipelineMetrics:
    recorder = StageRecorder("infer", StageKind.PROCESSOR)
    recorder.mark_started()
    for duration_s in (0.0004, 0.0005, 0.003, 0.2, 30.0):
        recorder.record_item(0.0, duration_s)
    return PipelineMetrics(
        wall_s=1.0,
        frames_in=5,
        frames_out=5,
        latency=LatencyMetrics.from_samples(1, [0.1]),
        stages=(stage or recorder.snapshot(),),
        buffers=(),
        counters=counters,
    )


def test_new_figures_appear_without_code_in_the_exporter() -> None:
    base = _metrics().stages[0]
    stage = _StageWithBatches(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    metrics = _metrics(stage, infer={"batches": 7, "mean_batch": 2.5})
    server = MetricsServer(MetricsConfig(port=free_port()), lambda: metrics)
    server.start()
    try:
        samples = scrape(server.url)
    finally:
        server.close()
    infer = {"stage": "infer", "kind": "processor"}
    assert value(samples, "finestream_stage_batch_size_mean", **infer) == 3.5
    assert value(samples, "finestream_stage_window_seconds", **infer) == 0.25  # ms -> s
    assert value(samples, "finestream_stage_counter", stage="infer", counter="mean_batch") == 2.5


def test_the_inference_batch_size_is_a_histogram() -> None:
    recorder = StageRecorder("infer", StageKind.PROCESSOR)
    recorder.mark_started()
    for size in (1, 4, 4, 3):
        recorder.record_batch(0.0, 0.1, size)
    metrics = dataclasses.replace(_metrics(), stages=(recorder.snapshot(),))
    server = MetricsServer(MetricsConfig(port=free_port()), lambda: metrics)
    server.start()
    try:
        samples = scrape(server.url)
    finally:
        server.close()
    infer = {"stage": "infer", "kind": "processor"}
    buckets = [
        value(samples, "finestream_stage_batch_size_bucket", le=le, **infer)
        for le in ("1.0", "2.0", "3.0", "4.0", "+Inf")
    ]
    assert buckets == [1, 1, 2, 4, 4]
    assert value(samples, "finestream_stage_batch_size_sum", **infer) == 12
    assert value(samples, "finestream_stage_batches_total", **infer) == 4
    assert value(samples, "finestream_stage_items_total", **infer) == 12


def test_stage_counters_named_for_dashboards() -> None:
    live = {"connected": False, "outages": 2, "reconnects": 1, "frames": 10}
    names = describe_names(_metrics(**{"live:cam": live, "mqtt_events": {"dropped": 4}}))
    for name in (
        "finestream_source_up",
        "finestream_source_reconnects",
        "finestream_source_outages",
        "finestream_dropped",
        "finestream_stage_counter",
        "finestream_stage_time_per_item_seconds",
        "finestream_stage_items",
        "finestream_pipeline_latency_p95_seconds",
    ):
        assert name in names, (name, names)


def test_the_histogram_counts_every_item_in_its_bucket_cumulatively() -> None:
    h = _metrics().stages[0].time_per_item
    assert h is not None and h.count == 5
    by_bound = dict(zip(h.upper_bounds_s, h.cumulative_counts))
    assert by_bound[0.0005] == 2  # upper bounds are inclusive (Prometheus' le)
    assert by_bound[0.005] == 3 and by_bound[0.25] == 4 and by_bound[10.0] == 4  # 30 s: only +Inf
    assert h.sum_s == pytest.approx(0.0004 + 0.0005 + 0.003 + 0.2 + 30.0)


@pytest.mark.rtsp
def test_a_live_camera_going_down_and_up_shows_in_the_scrapes(
    teacher: Path, tmp_path: Path
) -> None:
    """Source up/down, outages, reconnects and the per-stream drops of a real RTSP camera."""
    from rtsp_server import RtspServer
    from stages.live import LiveSourceConfig

    with RtspServer(media_path("cars_320x240_mjpeg.avi")) as camera:
        live = LiveSourceConfig(
            url=camera.url, stream_id="cam", backoff_initial_s=0.2, backoff_max_s=0.5
        )
        config = dataclasses.replace(
            AppConfig(),
            sources=(SourceConfig(live=live),),
            model=InferConfig(model=teacher),
            track=None,
            outputs=OutputsConfig(jsonl=JsonLinesSinkConfig(path=str(tmp_path / "live.jsonl"))),
        )
        assembled = build_pipeline(config)
        server = MetricsServer(MetricsConfig(port=free_port()), assembled.metrics)
        server.start()
        cam = {"stage": "live:cam"}

        def up() -> float:
            return scrape(server.url).get(("finestream_source_up", frozenset(cam.items())), -1)

        try:
            assembled.pipeline.start()
            assert _wait(lambda: up() == 1, 120), "the camera never came up"
            camera.kill()
            assert _wait(lambda: up() == 0, 30), "still up after the camera died"
            down = scrape(server.url)
            camera.start()
            assert _wait(lambda: up() == 1, 60), "not up again after the restart"
            back = scrape(server.url)
        finally:
            assembled.stop()
            assembled.pipeline.join(timeout=30)
            server.close()
    assert value(down, "finestream_source_outages_total", **cam) == 1
    assert value(back, "finestream_source_reconnects_total", **cam) == 1
    # Each camera's frames dropped before inference, under the stream's own name.
    drops = [k for k in back if k[0] == "finestream_buffer_dropped_total"]
    assert any(dict(labels)["buffer"].endswith("[cam]") for _, labels in drops), drops
