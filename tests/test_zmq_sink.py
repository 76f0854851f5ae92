"""The ZeroMQ event sink and the event schema, with real sockets on loopback."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from rtsp_server import free_port
from stages.events import (
    EVENT_SCHEMA_VERSION,
    EventError,
    decode_event,
    encode_event,
    redact_url,
    source_lost_event,
    track_started_event,
)
from stages.frame import Detections, FramePacket
from stages.sinks.zmq_events import (
    EndpointMode,
    EventSinkError,
    ZmqDropMode,
    ZmqEventSink,
    ZmqSinkConfig,
    listen,
)

CLASS_NAMES = ["person", "bicycle", "car"]


def _packet(
    index: int, n_objects: int = 3, stream: str = "cam", tracked: bool = True
) -> FramePacket:
    rng = np.random.default_rng(index)
    x1y1 = rng.uniform(0, 500, size=(n_objects, 2)).astype(np.float32)
    boxes = np.concatenate([x1y1, x1y1 + 40], axis=1)
    track_ids = np.arange(n_objects, dtype=np.int64) + 1 if tracked else np.full(n_objects, -1)
    return FramePacket(
        stream_id=stream,
        index=index,
        pts_s=index / 30,
        image_rgb_u8=np.zeros((540, 960, 3), dtype=np.uint8),
        arrival_s=time.monotonic(),
        detections=Detections(
            boxes_xyxy=boxes,
            scores=rng.uniform(0.3, 1.0, size=n_objects).astype(np.float32),
            class_ids=(np.arange(n_objects) % 3).astype(np.int64),
            track_ids=track_ids.astype(np.int64),
        ),
    )


def _endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


class _Subscriber:
    """A real SUB socket on the test's thread."""

    def __init__(self, endpoint: str, rcvhwm: int = 1000) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.sock = self.context.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)

    def recv(self, timeout_s: float) -> tuple[str, dict[str, Any]] | None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        topic, body = self.sock.recv_multipart()
        return topic.decode(), decode_event(body)

    def sync(self, sink: ZmqEventSink) -> None:
        """Beat the slow joiner: publish on stream "sync" until one arrives, then drain."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sink.on_event({"v": EVENT_SCHEMA_VERSION, "type": "sync", "stream": "sync"})
            if self.recv(0.05) is not None:
                while self.recv(0.2) is not None:
                    pass
                return
        raise AssertionError("subscriber never connected")

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


def test_one_frame_message_per_packet_with_the_schema_fields() -> None:
    endpoint = _endpoint()
    sink = ZmqEventSink(ZmqSinkConfig(endpoint=endpoint), CLASS_NAMES)
    sink.setup()
    sub = _Subscriber(endpoint)
    try:
        sub.sync(sink)
        packets = [_packet(i, n_objects=i % 4, tracked=i % 2 == 0) for i in range(40)]
        started_event = track_started_event(
            stream="cam",
            frame=7,
            pts_s=7 / 30,
            track_id=1,
            class_id=2,
            box_xyxy=[1, 2, 3, 4],
            class_names=CLASS_NAMES,
        )
        for p in packets:
            if p.index == 7:  # the runner delivers an event before the frame it happened on
                sink.on_event(started_event)
            sink.write(p)
        got = []
        while (msg := sub.recv(2.0)) is not None:
            got.append(msg)
    finally:
        sub.close()
        sink.teardown()

    frames = [e for topic, e in got if e["type"] == "frame"]
    assert [e["frame"] for e in frames] == list(range(40))
    assert all(topic == "cam" for topic, _ in got)
    for packet, event in zip(packets, frames):
        assert event["v"] == EVENT_SCHEMA_VERSION
        assert event["stream"] == "cam"
        assert event["pts_s"] == pytest.approx(packet.pts_s, abs=1e-6)
        assert (event["width"], event["height"]) == (960, 540)
        assert 0 <= event["latency_s"] < 10
        det = packet.detections
        assert det is not None
        assert len(event["detections"]) == len(det)
        for k, record in enumerate(event["detections"]):
            assert record["box_xyxy"] == pytest.approx(det.boxes_xyxy[k].tolist(), abs=0.01)
            assert record["score"] == pytest.approx(float(det.scores[k]), abs=1e-4)
            assert record["class_id"] == int(det.class_ids[k])
            assert record["label"] == CLASS_NAMES[int(det.class_ids[k])]
            expected_track = int(det.track_ids[k]) if packet.index % 2 == 0 else None
            assert record["track_id"] == expected_track
    started = [e for _, e in got if e["type"] == "track_started"]
    assert len(started) == 1 and started[0]["label"] == "car" and started[0]["frame"] == 7
    # The event comes before its frame's message.
    order = [(e["type"], e.get("frame")) for _, e in got]
    assert order.index(("track_started", 7)) == order.index(("frame", 7)) - 1
    assert sink.stats().sent >= 41


def test_events_go_out_as_published_under_their_own_stream(tmp_path: Path) -> None:
    """The sink sends an event as the producer made it: byte for byte the line JSON Lines writes."""
    from stages.sinks.jsonl import JsonLinesSink, JsonLinesSinkConfig

    endpoint = _endpoint()
    sink = ZmqEventSink(ZmqSinkConfig(endpoint=endpoint, send_frames=False), CLASS_NAMES)
    jsonl = JsonLinesSink(JsonLinesSinkConfig(path=str(tmp_path / "e.jsonl")), CLASS_NAMES)
    sink.setup()
    jsonl.setup()
    sub = _Subscriber(endpoint)
    events = [
        source_lost_event(
            stream="yard", outage=2, frame=9, reason="read timeout", url="rtsp://u:secret@x/y"
        ),
        track_started_event(
            stream="gate",
            frame=3,
            pts_s=0.1,
            track_id=4,
            class_id=1,
            box_xyxy=[1, 2, 3, 4],
            class_names=CLASS_NAMES,
        ),
    ]
    try:
        sub.sync(sink)
        for event in events:
            sink.on_event(event)
            jsonl.on_event(event)
        sink.write(_packet(12))  # send_frames: false, so no frame message
        got = []
        while (m := sub.recv(1.0)) is not None:
            got.append(m)
    finally:
        sub.close()
        sink.teardown()
        jsonl.teardown()
    assert [topic for topic, _ in got] == ["yard", "gate"]
    assert [e for _, e in got] == events
    lines = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert lines == events
    assert "secret" not in json.dumps(lines)


def test_a_subscriber_that_never_reads_does_not_block_and_memory_stays_capped() -> None:
    endpoint = _endpoint()
    sink = ZmqEventSink(ZmqSinkConfig(endpoint=endpoint, sndhwm=100), CLASS_NAMES)
    sink.setup()
    sub = _Subscriber(endpoint, rcvhwm=100)
    try:
        sub.sync(sink)  # connected; from now on it reads nothing
        packet = _packet(0, n_objects=50)  # about 4 kB a message, 80 MB for all of them
        rss_before = _rss_bytes()
        start = time.monotonic()
        for i in range(20_000):
            packet.index = i
            sink.write(packet)
        elapsed = time.monotonic() - start
        rss_growth = _rss_bytes() - rss_before
    finally:
        sub.close()
        sink.teardown()
    assert elapsed < 60, f"20,000 writes took {elapsed:.1f} s"
    # Unbounded queues would hold ~80 MB; the HWMs keep about 200 messages (< 1 MB).
    assert rss_growth < 40 * 2**20, f"memory grew by {rss_growth / 2**20:.0f} MB"


def test_counted_mode_reports_the_drops_of_a_stuck_subscriber() -> None:
    endpoint = _endpoint()
    config = ZmqSinkConfig(endpoint=endpoint, sndhwm=100, drop_mode=ZmqDropMode.COUNTED)
    sink = ZmqEventSink(config, CLASS_NAMES)
    sink.setup()
    sub = _Subscriber(endpoint, rcvhwm=100)
    try:
        sub.sync(sink)
        before = sink.stats()
        packet = _packet(0, n_objects=20)
        start = time.monotonic()
        for i in range(20_000):
            packet.index = i
            sink.write(packet)
        elapsed = time.monotonic() - start
        after = sink.stats()
    finally:
        sub.close()
        sink.teardown()
    assert elapsed < 60
    sent = after.sent - before.sent
    dropped = after.dropped - before.dropped
    assert sent + dropped == 20_000
    assert dropped > 10_000, (sent, dropped)


def test_listen_writes_one_json_line_per_message() -> None:
    endpoint = _endpoint()
    sink = ZmqEventSink(ZmqSinkConfig(endpoint=endpoint), CLASS_NAMES)
    sink.setup()
    out = io.StringIO()
    result: list[int] = []
    listener = threading.Thread(
        target=lambda: result.append(listen(endpoint, count=5, timeout_s=20, out=out))
    )
    listener.start()
    try:
        index = 0
        while listener.is_alive() and index < 2000:  # keep publishing until it has 5
            sink.write(_packet(index))
            index += 1
            time.sleep(0.01)
        listener.join(timeout=20)
    finally:
        sink.teardown()
    assert result == [5]
    lines = out.getvalue().splitlines()
    assert len(lines) == 5
    events = [decode_event(line) for line in lines]
    assert all(e["type"] == "frame" and e["stream"] == "cam" for e in events)
    frames = [e["frame"] for e in events]
    assert frames == sorted(frames) and len(set(frames)) == 5


def test_listen_returns_at_its_timeout_when_nothing_comes() -> None:
    start = time.monotonic()
    assert listen(_endpoint(), timeout_s=0.5, out=io.StringIO()) == 0
    assert time.monotonic() - start < 3


def test_binding_a_taken_endpoint_fails_with_one_clear_line() -> None:
    endpoint = _endpoint()
    first = ZmqEventSink(ZmqSinkConfig(endpoint=endpoint), CLASS_NAMES)
    first.setup()
    try:
        second = ZmqEventSink(ZmqSinkConfig(endpoint=endpoint), CLASS_NAMES)
        with pytest.raises(
            EventSinkError, match=r"cannot bind .*127\.0\.0\.1.*another endpoint"
        ) as info:
            second.setup()
        assert "\n" not in str(info.value)
    finally:
        first.teardown()


def test_connect_mode_publishes_to_a_bound_listener() -> None:
    endpoint = _endpoint()
    out = io.StringIO()
    listener = threading.Thread(
        target=listen,
        args=(endpoint,),
        kwargs={"count": 1, "timeout_s": 20, "out": out, "bind": True},
    )
    listener.start()
    sink = ZmqEventSink(ZmqSinkConfig(endpoint=endpoint, mode=EndpointMode.CONNECT), CLASS_NAMES)
    sink.setup()
    try:
        index = 0
        while listener.is_alive() and index < 2000:
            sink.write(_packet(index))
            index += 1
            time.sleep(0.01)
        listener.join(timeout=20)
    finally:
        sink.teardown()
    assert decode_event(out.getvalue().splitlines()[0])["type"] == "frame"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"endpoint": "127.0.0.1:5555"}, "endpoint must look like"),
        ({"sndhwm": 0}, "sndhwm must be >= 1"),
        ({"linger_ms": -1}, "linger_ms must be >= 0"),
        ({"mode": "bind"}, "mode must be 'bind' or 'connect'"),
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ZmqSinkConfig(**kwargs)


# --- the schema ---------------------------------------------------------------------------------


def test_decode_refuses_other_versions_and_bad_json() -> None:
    with pytest.raises(EventError, match="version 1 is not supported"):
        decode_event(b'{"v": 1, "type": "frame", "stream": "a"}')
    with pytest.raises(EventError, match="not valid JSON"):
        decode_event(b"{nope")
    with pytest.raises(EventError, match="not JSON-able"):
        encode_event({"v": 1, "type": "frame", "score": float("nan")})


def test_passwords_never_reach_events() -> None:
    assert (
        redact_url("rtsp://admin:secret@10.0.0.5:554/live") == "rtsp://admin:***@10.0.0.5:554/live"
    )
    assert redact_url("rtsp://10.0.0.5/live") == "rtsp://10.0.0.5/live"
    event = source_lost_event(
        stream="a", outage=1, frame=None, reason="r", url="rtsp://admin:secret@cam/live"
    )
    assert "secret" not in encode_event(event).decode()


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("VmRSS not found")
