"""One schema for every message: docs/events.md and docs/events.schema.json are what
``stages.events_schema`` makes from the TypedDicts, every constructor's output satisfies it, and
every message of a real run — a camera outage on the RTSP test server, the NanoDet teacher,
line crossings and zone events — validates, in JSON Lines and over ZeroMQ alike."""

from __future__ import annotations

import json
import threading
import time
import typing
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import zmq

from pipeline.schema import from_dict
from rtsp_server import RtspServer, free_port, require_rtsp_server
from stages.events import EVENT_SCHEMA_VERSION, EVENT_TYPES, EventType, frame_event
from stages.events_schema import DOC_PATH, SCHEMA_PATH, json_schema, render_doc
from stages.frame import Detections, FramePacket
from tests.conftest import REPO

VALIDATOR = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


def test_the_docs_and_the_schema_file_are_generated_from_the_typeddicts() -> None:
    doc = DOC_PATH.read_text()
    assert render_doc(doc) == doc, "docs/events.md is stale: run python -m stages.events_schema"
    assert json.loads(SCHEMA_PATH.read_text()) == json_schema(), (
        "docs/events.schema.json is stale: run python -m stages.events_schema"
    )
    jsonschema.Draft202012Validator.check_schema(json_schema())
    for kind, cls in EVENT_TYPES.items():
        assert f"### {kind.value}\n" in doc
        for name in typing.get_type_hints(cls):
            if name not in ("v", "type", "stream", "time_unix_s"):
                assert f"| `{name}` |" in doc, f"{kind.value}.{name} is not in docs/events.md"
    assert f"(version {EVENT_SCHEMA_VERSION})" in doc
    assert EventType.LINE_CROSSED in EVENT_TYPES and len(EVENT_TYPES) == len(EventType)


def test_the_schema_refuses_what_the_docs_do_not_promise() -> None:
    packet = FramePacket(
        stream_id="s",
        index=0,
        pts_s=0.0,
        image_rgb_u8=np.zeros((4, 4, 3), np.uint8),
        arrival_s=time.monotonic(),
        detections=Detections(
            boxes_xyxy=np.array([[0, 0, 2, 2]], np.float32),
            scores=np.array([0.5], np.float32),
            class_ids=np.array([0], np.int64),
        ),
    )
    good = frame_event(packet, ["person"])
    VALIDATOR.validate(good)
    for bad in (
        {**good, "extra": 1},  # an undocumented field
        {**good, "type": "frames"},
        {**good, "detections": [{**good["detections"][0], "box_xyxy": [0, 0, 2]}]},
        {k: v for k, v in good.items() if k != "pts_s"},
    ):
        assert not VALIDATOR.is_valid(bad), bad


# --- a real run --------------------------------------------------------------------------------

CLIP = "traffic_highway_960x540.mp4"


def _subscribe(
    endpoint: str, into: list[dict[str, Any]], stop: threading.Event
) -> threading.Thread:
    def loop() -> None:
        context: zmq.Context[Any] = zmq.Context()
        sock = context.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(endpoint)
        while not stop.is_set():
            if sock.poll(50):
                topic, body = sock.recv_multipart()
                message = json.loads(body)
                assert topic.decode() == message["stream"]
                into.append(message)
        sock.close(0)
        context.term()

    thread = threading.Thread(target=loop, name="test-sub", daemon=True)
    thread.start()
    return thread


@pytest.mark.rtsp
@pytest.mark.slow
def test_every_message_of_a_real_run_with_a_camera_outage_fits_the_schema(
    media_dir: Path,
    tmp_path: Path,
) -> None:
    require_rtsp_server()
    teacher = REPO.parent / "shared" / "teachers" / "nanodet_coco_416.onnx"
    if not teacher.is_file():
        pytest.skip(f"teacher model not found at {teacher}")
    from pipeline.assemble import build_pipeline
    from pipeline.config import AppConfig

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    received: list[dict[str, Any]] = []
    stop = threading.Event()
    with RtspServer(media_dir / CLIP) as camera:
        config = from_dict(
            AppConfig,
            {
                "sources": [
                    {
                        "live": {
                            "url": camera.url,
                            "stream_id": "cam",
                            "backoff_initial_s": 0.25,
                            "backoff_max_s": 1.0,
                        }
                    }
                ],
                "model": {
                    "model": str(teacher),
                    "backend": "onnxruntime",
                    "imgsz": 416,
                    "score_threshold": 0.35,
                    "classes": [2, 5, 7],
                },
                "outputs": {
                    "jsonl": {"path": str(tmp_path / "run.jsonl")},
                    "zmq": {"endpoint": endpoint},
                },
                "analytics": [
                    {
                        "stream_id": "cam",
                        "coordinates": "normalized",
                        "summary_every_s": 2.0,
                        "lines": [{"name": "carriageway", "a": [0.15, 0.55], "b": [0.9, 0.55]}],
                        "zones": [
                            {
                                "name": "near",
                                "polygon": [[0.1, 0.6], [0.95, 0.6], [0.95, 0.98], [0.1, 0.98]],
                                "loiter_s": 0.5,
                            }
                        ],
                    }
                ],
            },
        )
        assembled = build_pipeline(config)
        listener = _subscribe(endpoint, received, stop)
        assembled.pipeline.start()
        try:

            def seen(kind: str) -> bool:
                return any(m["type"] == kind for m in received)

            deadline = time.monotonic() + 60
            while (
                not (seen("line_crossed") and seen("zone_entered")) and time.monotonic() < deadline
            ):
                time.sleep(0.2)
            camera.kill()
            deadline = time.monotonic() + 10
            while not seen("source_lost") and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
            camera.start()
            deadline = time.monotonic() + 20
            while not seen("source_restored") and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(2.0)  # frames flow again
        finally:
            assembled.stop()
            for source in assembled.sources:
                source.request_stop()
            assembled.pipeline.join(timeout=20)
            time.sleep(0.3)
            stop.set()
            listener.join(5)
    lines = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    for message in lines + received:
        VALIDATOR.validate(message)
    kinds = {m["type"] for m in lines}
    assert {
        "frame",
        "track_started",
        "line_crossed",
        "zone_entered",
        "source_lost",
        "source_restored",
        "analytics_summary",
    } <= kinds, kinds
    # Each source event exactly once in the file, in order; ZeroMQ carries the same events.
    assert [m["type"] for m in lines if m["type"].startswith("source_")] == [
        "source_lost",
        "source_restored",
    ]
    events = [m for m in lines if m["type"] != "frame"]
    zmq_events = [m for m in received if m["type"] != "frame"]
    assert [m for m in zmq_events if m["type"].startswith(("source_", "line_"))] == [
        m for m in events if m["type"].startswith(("source_", "line_"))
    ]
    assert [m for m in lines if m["type"] == "analytics_summary"][-1]["final"] is True
