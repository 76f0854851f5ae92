"""Live sources in the real engine: outages, a dead camera, and a processor slower than the camera.

The processors here are cheap stand-ins (no model): the point is the plumbing. A sleeping
processor stands for slow inference. The buffers use the live policy (DROP_OLDEST), as the
assembly sets it for live sources.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from pipeline.ring_buffer import OverflowPolicy
from pipeline.runner import BufferSpec, EventChannel, Pipeline, StageError
from pipeline.stage import StageBase
from rtsp_server import RtspServer, free_port
from stages.events import decode_event
from stages.frame import Detections, FramePacket
from stages.live import LiveSource, LiveSourceConfig, LiveSourceError, ReconnectPolicy
from stages.sinks.zmq_events import ZmqEventSink, ZmqSinkConfig

pytestmark = pytest.mark.rtsp

LIVE = BufferSpec(capacity=2, policy=OverflowPolicy.DROP_OLDEST)
CLIP = "cars_320x240_mjpeg.avi"  # 25 fps, cheap to serve and decode on a busy machine


class _Brightness(StageBase[FramePacket]):
    """A cheap processor: one 'detection' covering the frame, scored by its mean brightness."""

    name = "brightness"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    def process(self, item: FramePacket) -> FramePacket:
        if self.delay_s:
            time.sleep(self.delay_s)  # stands for inference slower than the camera
        h, w = item.image_rgb_u8.shape[:2]
        item.detections = Detections(
            boxes_xyxy=np.array([[0, 0, w, h]], dtype=np.float32),
            scores=np.array([item.image_rgb_u8.mean() / 255], dtype=np.float32),
            class_ids=np.zeros(1, dtype=np.int64),
        )
        return item

    def flush(self) -> Iterable[FramePacket]:
        return ()


@dataclass(frozen=True)
class _Written:
    at_s: float
    stream_id: str
    index: int
    pts_s: float
    arrival_s: float


class _Recorder(StageBase[FramePacket]):
    """A sink that keeps what it was given (not the pictures)."""

    name = "recorder"

    def __init__(self) -> None:
        self.written: list[_Written] = []
        self._lock = threading.Lock()

    def write(self, item: FramePacket) -> None:
        with self._lock:
            self.written.append(
                _Written(time.monotonic(), item.stream_id, item.index, item.pts_s, item.arrival_s)
            )

    def count(self, stream_id: str | None = None) -> int:
        with self._lock:
            return sum(1 for w in self.written if stream_id is None or w.stream_id == stream_id)


def _stop(pipeline: Pipeline, sources: list[LiveSource], timeout_s: float = 15) -> float:
    """Stop as the CLI does; returns how long the pipeline took to finish."""
    start = time.monotonic()
    pipeline.stop()
    for source in sources:
        source.request_stop()  # breaks a source out of a reconnect wait
    pipeline.join(timeout=timeout_s)
    assert not pipeline.running, "pipeline still running after stop()"
    return time.monotonic() - start


def _wait(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


@pytest.fixture
def camera(media_dir: Path) -> Iterator[RtspServer]:
    with RtspServer(media_dir / CLIP) as server:
        yield server


class _Subscriber:
    def __init__(self, endpoint: str) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.sock = self.context.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.events: list[tuple[float, dict[str, Any]]] = []

    def drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(int(left * 1000)):
                _, body = self.sock.recv_multipart()
                self.events.append((time.monotonic(), decode_event(body)))
            else:
                return

    def of_type(self, *types: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, e) for t, e in self.events if e["type"] in types]

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


def test_camera_killed_and_restarted_three_times_keeps_the_pipeline_going(
    camera: RtspServer,
) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    zmq_sink = ZmqEventSink(ZmqSinkConfig(endpoint=endpoint), ["scene"])
    events = EventChannel()  # source events reach the sink's thread also while no frames flow
    backoff_max_s = 1.0
    source = LiveSource(
        LiveSourceConfig(
            url=camera.url,
            stream_id="cam",
            backoff_initial_s=0.25,
            backoff_max_s=backoff_max_s,
            stall_timeout_s=4.0,
        ),
        on_event=events.publish,
    )
    recorder = _Recorder()
    pipeline = Pipeline(
        [source], [(_Brightness(), LIVE)], [(recorder, LIVE), (zmq_sink, LIVE)], events=events
    )
    sub = _Subscriber(endpoint)
    pipeline.start()
    try:
        assert _wait(lambda: recorder.count() >= 25, 15), "no frames from the camera"
        sub.drain(0.5)  # connected by now; frame messages flow
        for outage in (1, 2, 3):
            camera.kill()
            # source_lost reaches subscribers while no frames flow.
            deadline = time.monotonic() + 3
            while not sub.of_type("source_lost")[outage - 1 :] and time.monotonic() < deadline:
                sub.drain(0.1)
            assert len(sub.of_type("source_lost")) == outage, sub.of_type("source_lost")
            time.sleep(1.0)
            before = recorder.count()
            camera.start()
            restarted_at = time.monotonic()
            assert _wait(lambda b=before: recorder.count() > b, backoff_max_s + 2), (
                f"outage {outage}: no frame within backoff + 2 s of the restart"
            )
            assert time.monotonic() - restarted_at < backoff_max_s + 2
            assert pipeline.running
            assert _wait(lambda b=before: recorder.count() > b + 25, 10)  # and it keeps coming
        sub.drain(0.5)
    finally:
        took = _stop(pipeline, [source])
        sub.close()
    pipeline.join()  # no error: raises StageError otherwise
    assert took < 10

    lost = [e for _, e in sub.of_type("source_lost")]
    restored = [e for _, e in sub.of_type("source_restored")]
    assert [e["outage"] for e in lost] == [1, 2, 3]
    assert [e["outage"] for e in restored] == [1, 2, 3]
    assert all(e["down_s"] < 1.0 + backoff_max_s + 2 for e in restored)
    # Frames never repeat or go back, across all three reconnects.
    indices = [w.index for w in recorder.written]
    assert indices == sorted(set(indices))
    assert np.all(np.diff([w.pts_s for w in recorder.written]) > 0)
    stats = source.stats()
    assert stats.outages == 3 and stats.connections == 4
    # Each event was delivered once (the copies the source also puts in packets are not read).
    assert len(sub.of_type("source_lost", "source_restored")) == 6


def test_unreachable_url_with_reconnect_never_fails_the_run_with_one_line() -> None:
    url = f"rtsp://127.0.0.1:{free_port()}/stream"
    source = LiveSource(
        LiveSourceConfig(url=url, reconnect=ReconnectPolicy.NEVER, open_timeout_s=2)
    )
    pipeline = Pipeline([source], [(_Brightness(), LIVE)], [(_Recorder(), LIVE)])
    start = time.monotonic()
    with pytest.raises(StageError) as info:
        pipeline.run()
    assert time.monotonic() - start < 2 + 3
    cause = info.value.__cause__
    assert isinstance(cause, LiveSourceError)
    assert "\n" not in str(cause) and url in str(cause) and "reconnect: always" in str(cause)


@pytest.mark.slow
def test_slow_processor_behind_drop_oldest_keeps_latency_flat(camera: RtspServer) -> None:
    source = LiveSource(LiveSourceConfig(url=camera.url, stream_id="cam"))
    recorder = _Recorder()
    # 5 fps against a 25 fps camera. (A long step also keeps the 20 % tolerance above the
    # scheduling jitter of a busy 2-core machine: tens of ms.)
    slow = _Brightness(delay_s=0.2)
    pipeline = Pipeline([source], [(slow, LIVE)], [(recorder, LIVE)])
    pipeline.start()
    try:
        assert _wait(lambda: recorder.count() >= 1, 15)
        first_at = time.monotonic()
        time.sleep(60)
        metrics = pipeline.metrics()
    finally:
        _stop(pipeline, [source])
    pipeline.join()

    written = [w for w in recorder.written if w.at_s >= first_at]
    t0 = written[0].at_s
    first = [w for w in written if w.at_s - t0 < 10]
    last = [w for w in written if w.at_s - t0 >= 50]
    assert len(first) > 30 and len(last) > 30  # about 5 frames a second get through

    def p95_latency(ws: list[_Written]) -> float:
        return float(np.percentile([w.at_s - w.arrival_s for w in ws], 95))

    early, late = p95_latency(first), p95_latency(last)
    assert abs(late - early) <= 0.2 * early, (
        f"latency p95 {early * 1000:.0f} -> {late * 1000:.0f} ms"
    )
    # Latency from decoding can hide a backlog in front of the decoder, so also check how far the
    # frames lag behind the camera's clock: it must not grow either.
    w0 = written[0]

    def lag(ws: list[_Written]) -> float:
        return float(np.median([(w.at_s - w0.at_s) - (w.pts_s - w0.pts_s) for w in ws]))

    assert lag(last) - lag(first) < 0.25, f"lag behind live grew by {lag(last) - lag(first):.2f} s"
    # The drops are reported: about 20 of every 25 frames a second.
    proc_in = next(b for b in metrics.buffers if b.name == "brightness.in")
    assert proc_in.dropped > 0.5 * proc_in.put_count
    assert metrics.dropped >= proc_in.dropped
    assert metrics.frames_in > 20 * 55  # the source kept the camera's pace


def test_a_dead_camera_does_not_slow_the_live_one(camera: RtspServer) -> None:
    live = LiveSource(LiveSourceConfig(url=camera.url, stream_id="alive"))
    dead_events: list[dict[str, Any]] = []
    dead = LiveSource(
        LiveSourceConfig(
            url=f"rtsp://127.0.0.1:{free_port()}/stream", stream_id="dead", backoff_max_s=1.0
        ),
        on_event=dead_events.append,
    )
    recorder = _Recorder()
    pipeline = Pipeline([live, dead], [(_Brightness(), LIVE)], [(recorder, LIVE)])
    pipeline.start()
    try:
        assert _wait(lambda: recorder.count("alive") >= 10, 15)
        start_count, start = recorder.count("alive"), time.monotonic()
        time.sleep(6)
        fps = (recorder.count("alive") - start_count) / (time.monotonic() - start)
        assert pipeline.running
    finally:
        took = _stop(pipeline, [live, dead])
    pipeline.join()
    assert fps == pytest.approx(25, rel=0.1)
    assert recorder.count("dead") == 0
    assert [e["type"] for e in dead_events] == ["source_lost"]
    assert dead.stats().failed_attempts >= 5
    assert took < 5
