"""LiveSource against the real RTSP test server (and a real HTTP server), iterated directly."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rtsp_server import RtspServer, free_port
from stages.decode import VideoSourceError
from stages.live import (
    LiveSource,
    LiveSourceConfig,
    LiveSourceError,
    ReconnectPolicy,
    RtspTransport,
)

TRAFFIC = "traffic_highway_960x540.mp4"  # 960x540, 29.97 fps
AERIAL = "aerial_crosswalk_640x640.mp4"  # 640x640, 23.976 fps


@dataclass
class _Seen:
    """What the test keeps of a packet (not the image: 1.5 MB a frame)."""

    index: int
    pts_s: float
    arrival_s: float
    shape: tuple[int, ...]
    dtype: Any
    stream_id: str


@dataclass
class _Collector:
    """Iterates ``source.items()`` on a thread, as the engine's source thread does."""

    source: LiveSource
    seen: list[_Seen] = field(default_factory=list)
    callbacks: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    error: BaseException | None = None
    ended_at: float | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="collector", daemon=True)

    def on_event(self, event: dict[str, Any]) -> None:
        self.callbacks.append((time.monotonic(), event))

    def _run(self) -> None:
        try:
            self.source.setup()
            for p in self.source.items():
                self.seen.append(
                    _Seen(
                        p.index,
                        p.pts_s,
                        p.arrival_s,
                        p.image_rgb_u8.shape,
                        p.image_rgb_u8.dtype,
                        p.stream_id,
                    )
                )
        except BaseException as exc:  # handed to the test
            self.error = exc
        finally:
            self.source.teardown()
            self.ended_at = time.monotonic()

    def wait_for(self, predicate: Any, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            if not self.thread.is_alive():
                return bool(predicate())
            time.sleep(0.02)
        return False

    def frames(self, n: int, timeout_s: float = 15) -> None:
        target = len(self.seen) + n
        assert self.wait_for(lambda: len(self.seen) >= target, timeout_s), (
            f"only {len(self.seen)} of {target} frames; error: {self.error!r}"
        )

    def stop(self, timeout_s: float = 10) -> float:
        """request_stop(), wait for items() to return; how long that took."""
        start = time.monotonic()
        self.source.request_stop()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "items() did not return after request_stop()"
        return time.monotonic() - start


def _collect(config: LiveSourceConfig) -> _Collector:
    holder: list[_Collector] = []
    source = LiveSource(config, on_event=lambda e: holder[0].on_event(e))
    collector = _Collector(source)
    holder.append(collector)
    collector.thread.start()
    return collector


@pytest.fixture
def camera(media_dir: Path) -> Iterator[RtspServer]:
    with RtspServer(media_dir / TRAFFIC) as server:
        yield server


@pytest.mark.rtsp
def test_frames_carry_the_picture_the_stream_id_and_increasing_times(camera: RtspServer) -> None:
    c = _collect(LiveSourceConfig(url=camera.url, stream_id="cam7"))
    try:
        c.frames(60)
    finally:
        c.stop()
    seen = c.seen[:60]
    assert [s.index for s in seen] == list(range(60))
    assert all(s.shape == (540, 960, 3) and s.dtype == np.uint8 for s in seen)
    assert all(s.stream_id == "cam7" for s in seen)
    pts = np.array([s.pts_s for s in seen])
    assert pts[0] == 0.0 and np.all(np.diff(pts) > 0)
    # The stream clock, not the arrival clock: steps of one frame at 29.97 fps.
    assert np.median(np.diff(pts)) == pytest.approx(1001 / 30000, abs=1e-4)
    assert np.all(np.diff([s.arrival_s for s in seen]) >= 0)
    stats = c.source.stats()
    assert (
        stats.connections == 1 and stats.outages == 0 and (stats.width, stats.height) == (960, 540)
    )


@pytest.mark.rtsp
def test_server_killed_then_back_at_another_size_is_reconnected(
    camera: RtspServer, media_dir: Path
) -> None:
    config = LiveSourceConfig(
        url=camera.url, stream_id="cam", backoff_initial_s=0.2, backoff_max_s=1.0
    )
    c = _collect(config)
    try:
        c.frames(30)
        camera.kill()
        killed_at = time.monotonic()
        # The loss is reported at once, through the callback, while no frame flows.
        assert c.wait_for(lambda: len(c.callbacks) == 1, 3), c.callbacks
        lost_at, lost = c.callbacks[0]
        assert lost["type"] == "source_lost" and lost_at - killed_at < 1.0
        frames_while_down = len(c.seen)
        time.sleep(1.0)
        camera.start(media_dir / AERIAL)  # the camera comes back at 640x640
        restarted_at = time.monotonic()
        assert c.wait_for(lambda: len(c.callbacks) == 2, 1.0 + 2 + 2)  # backoff cap + 2 s (+ start)
        restored_at, restored = c.callbacks[1]
        c.frames(20)
    finally:
        c.stop()
    assert restored_at - restarted_at < 1.0 + 2
    assert lost["outage"] == restored["outage"] == 1
    assert lost["frame"] == frames_while_down - 1
    assert lost["reason"] == "stream ended (connection closed)"
    assert restored["frame"] == frames_while_down
    assert (restored["width"], restored["height"]) == (640, 640)
    assert restored["down_s"] == pytest.approx(restored_at - lost_at, abs=0.3)
    # Indices do not jump over the outage.
    after = c.seen[frames_while_down]
    assert after.index == frames_while_down
    assert after.shape == (640, 640, 3)
    # pts_s goes on, with a gap as long as the outage.
    gap = after.pts_s - c.seen[frames_while_down - 1].pts_s
    assert gap == pytest.approx(restored["down_s"], abs=0.5)
    assert np.all(np.diff([s.pts_s for s in c.seen]) > 0)
    assert restored["pts_s"] == pytest.approx(after.pts_s)
    stats = c.source.stats()
    assert stats.outages == 1 and stats.connections == 2 and stats.failed_attempts >= 1


@pytest.mark.rtsp
def test_a_hung_server_is_detected_within_the_stall_timeout(camera: RtspServer) -> None:
    c = _collect(LiveSourceConfig(url=camera.url, stall_timeout_s=2.0, open_timeout_s=2.0))
    try:
        c.frames(15)
        camera.freeze()  # connection open, nothing sent
        frozen_at = time.monotonic()
        assert c.wait_for(lambda: len(c.callbacks) >= 1, 2.0 + 2)
        lost_at, lost = c.callbacks[0]
        camera.thaw()
        assert c.wait_for(lambda: len(c.callbacks) >= 2, 15)
        c.frames(5)
    finally:
        c.stop()
    assert lost["type"] == "source_lost" and "timeout" in lost["reason"]
    assert lost_at - frozen_at < 2.0 + 1.0
    assert c.callbacks[1][1]["type"] == "source_restored"


@pytest.mark.rtsp
def test_reconnect_never_ends_the_source_when_the_server_goes(camera: RtspServer) -> None:
    c = _collect(LiveSourceConfig(url=camera.url, reconnect=ReconnectPolicy.NEVER))
    c.frames(10)
    camera.kill()
    c.thread.join(5)
    assert not c.thread.is_alive()
    assert c.error is None and c.callbacks == []


def test_reconnect_never_and_nothing_listening_fails_at_once_with_one_line() -> None:
    url = f"rtsp://admin:hunter2@127.0.0.1:{free_port()}/stream"
    source = LiveSource(
        LiveSourceConfig(url=url, reconnect=ReconnectPolicy.NEVER, open_timeout_s=3)
    )
    start = time.monotonic()
    with pytest.raises(LiveSourceError) as info:
        next(iter(source.items()))
    assert time.monotonic() - start < 3
    message = str(info.value)
    assert isinstance(info.value, VideoSourceError)
    assert "\n" not in message
    assert "127.0.0.1" in message and "Connection refused" in message
    assert "reconnect: always" in message  # the fix
    assert "hunter2" not in message and "***" in message


def test_reconnect_never_and_a_silent_server_fails_within_the_open_timeout() -> None:
    # A TCP listener that never answers: the RTSP handshake hangs until the open timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"rtsp://127.0.0.1:{silent.getsockname()[1]}/stream"
        source = LiveSource(
            LiveSourceConfig(url=url, reconnect=ReconnectPolicy.NEVER, open_timeout_s=1.0)
        )
        start = time.monotonic()
        with pytest.raises(LiveSourceError, match="cannot open live source"):
            next(iter(source.items()))
        elapsed = time.monotonic() - start
    assert 0.5 < elapsed < 1.0 + 2.0


def test_max_reconnects_gives_up_after_its_attempts_with_backoff() -> None:
    url = f"rtsp://127.0.0.1:{free_port()}/stream"
    config = LiveSourceConfig(
        url=url, max_reconnects=3, backoff_initial_s=0.2, backoff_factor=2.0, backoff_max_s=0.3
    )
    events: list[dict[str, Any]] = []
    source = LiveSource(config, on_event=events.append)
    start = time.monotonic()
    with pytest.raises(LiveSourceError, match="still down after 3 reconnect attempts"):
        next(iter(source.items()))
    elapsed = time.monotonic() - start
    # First try, then reconnects after 0, 0.2 and min(0.4, 0.3) s.
    assert 0.5 - 0.05 < elapsed < 0.5 + 1.0
    assert [e["type"] for e in events] == ["source_lost"]  # one per outage, not per attempt
    assert events[0]["frame"] is None and "Connection refused" in events[0]["reason"]
    assert source.stats().failed_attempts == 4


def test_request_stop_ends_a_backoff_wait_at_once() -> None:
    url = f"rtsp://127.0.0.1:{free_port()}/stream"
    c = _collect(LiveSourceConfig(url=url, backoff_initial_s=30, backoff_max_s=30))
    assert c.wait_for(lambda: c.source.stats().failed_attempts >= 2, 5)  # now in a 30 s wait
    assert c.stop() < 1.0
    assert c.error is None and c.seen == []


@pytest.mark.rtsp
def test_request_stop_while_streaming_returns_promptly(camera: RtspServer) -> None:
    c = _collect(LiveSourceConfig(url=camera.url))
    c.frames(5)
    assert c.stop() < 1.0
    assert c.error is None


@pytest.mark.rtsp
def test_udp_transport_is_requested_when_configured(camera: RtspServer) -> None:
    # The test server only speaks TCP and answers UDP with 461: proof the option is passed on.
    config = LiveSourceConfig(
        url=camera.url, rtsp_transport=RtspTransport.UDP, reconnect=ReconnectPolicy.NEVER
    )
    with pytest.raises(LiveSourceError, match="cannot open live source"):
        next(iter(LiveSource(config).items()))


def test_any_url_ffmpeg_opens_http_file_to_its_end(media_dir: Path) -> None:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cars_320x240_mjpeg.avi"
        source = LiveSource(
            LiveSourceConfig(url=url, stream_id="http", reconnect=ReconnectPolicy.NEVER)
        )
        packets = list(source.items())
        source.teardown()
    finally:
        server.shutdown()
        server.server_close()
    assert len(packets) == 30  # the whole file, then a clean end (reconnect: never)
    assert all(p.image_rgb_u8.shape == (240, 320, 3) for p in packets)
    pts = [p.pts_s for p in packets]
    assert pts[0] == 0.0 and pts[-1] == pytest.approx(29 / 25)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": ""}, "url must name a stream"),
        ({"stream_id": ""}, "stream_id must not be empty"),
        ({"stall_timeout_s": 0}, "stall_timeout_s must be > 0"),
        ({"open_timeout_s": -1}, "open_timeout_s must be > 0"),
        ({"backoff_factor": 0.5}, "backoff_factor must be >= 1"),
        ({"backoff_initial_s": 2.0, "backoff_max_s": 1.0}, "backoff_max_s"),
        ({"probesize": 8}, "probesize must be >= 32"),
        ({"max_reconnects": -1}, "max_reconnects must be >= 0"),
        ({"max_reconnects": 3, "reconnect": ReconnectPolicy.NEVER}, "drop one of the two"),
        ({"reconnect": "always"}, "reconnect must be 'always' or 'never'"),
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, Any], message: str) -> None:
    kwargs = {"url": "rtsp://127.0.0.1:8554/stream", **kwargs}
    with pytest.raises(ValueError, match=message):
        LiveSourceConfig(**kwargs)


def test_config_loads_from_yaml_style_dicts() -> None:
    from pipeline.schema import from_dict

    config = from_dict(
        LiveSourceConfig,
        {"url": "rtsp://cam/live", "stream_id": 3, "reconnect": "never", "rtsp_transport": "udp"},
    )
    assert config.stream_id == "3"
    assert config.reconnect is ReconnectPolicy.NEVER and config.rtsp_transport is RtspTransport.UDP
