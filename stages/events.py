"""The event messages finestream publishes: one schema, versioned, JSON on the wire.

Every event is a flat JSON object with an envelope (``v``, ``type``, ``stream``,
``time_unix_s``) and the fields of its type. Five types (``EventType``):

- ``frame``: one per processed frame, with its detections (and track ids once tracked).
- ``track_started`` / ``track_ended``: raised by the tracker in ``FramePacket.events``.
- ``source_lost`` / ``source_restored``: raised by a live source when its stream drops and
  when frames flow again.

docs/events.md is the reference for consumers: every field, its unit and when it is ``null``.
Compatibility rule: fields may be added without changing ``EVENT_SCHEMA_VERSION``; consumers
ignore fields they do not know. Renaming or removing a field, or changing its meaning or unit,
raises the version.

The constructors below build each event as its ``TypedDict`` (so a type checker checks the keys)
and return it as the plain, JSON-able ``dict`` that ``FramePacket.events`` holds;
``encode_event`` / ``decode_event`` are the wire format.
Pure functions, no threads, no state.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, TypedDict
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from stages.frame import FramePacket

__all__ = [
    "EVENT_SCHEMA_VERSION",
    "DetectionRecord",
    "EventError",
    "EventType",
    "FrameEvent",
    "SourceLostEvent",
    "SourceRestoredEvent",
    "TrackEndedEvent",
    "TrackStartedEvent",
    "decode_event",
    "encode_event",
    "frame_event",
    "label_for",
    "redact_url",
    "source_lost_event",
    "source_restored_event",
    "track_ended_event",
    "track_started_event",
]

#: The ``v`` field of every message. Raised only for incompatible changes (see module docstring).
EVENT_SCHEMA_VERSION: Final = 1

# Boxes to 1/100 px and scores to 1e-4 are far below what a detector resolves, and they keep a
# frame message with 50 objects under 4 kB.
_BOX_DECIMALS = 2
_SCORE_DECIMALS = 4
_TIME_DECIMALS = 6


class EventType(str, enum.Enum):
    """The ``type`` field: what an event reports."""

    FRAME = "frame"
    TRACK_STARTED = "track_started"
    TRACK_ENDED = "track_ended"
    SOURCE_LOST = "source_lost"
    SOURCE_RESTORED = "source_restored"


class EventError(ValueError):
    """A message is not a valid finestream event (bad JSON, missing envelope, other version)."""


class DetectionRecord(TypedDict):
    """One object in a ``frame`` event."""

    box_xyxy: list[float]  # [x1, y1, x2, y2], source-frame pixels
    score: float  # [0, 1]
    class_id: int  # 0-based
    label: str  # the class name
    track_id: int | None  # None (JSON null) until the tracker gave it an id


class FrameEvent(TypedDict):
    v: int
    type: str
    stream: str
    time_unix_s: float  # wall clock when the message was made
    frame: int  # FramePacket.index
    pts_s: float  # FramePacket.pts_s
    width: int  # frame size the boxes refer to
    height: int
    latency_s: float  # decode to this message (time.monotonic() - FramePacket.arrival_s)
    detections: list[DetectionRecord]


class TrackStartedEvent(TypedDict):
    v: int
    type: str
    stream: str
    time_unix_s: float
    frame: int  # the frame where the track was confirmed
    pts_s: float
    track_id: int
    class_id: int
    label: str
    box_xyxy: list[float]  # its box in that frame


class TrackEndedEvent(TypedDict):
    v: int
    type: str
    stream: str
    time_unix_s: float
    frame: int  # the frame where the tracker dropped the track
    pts_s: float
    track_id: int
    class_id: int
    label: str
    last_seen_frame: int  # the last frame where it was matched to a detection


class SourceLostEvent(TypedDict):
    v: int
    type: str
    stream: str
    time_unix_s: float
    outage: int  # 1 for the stream's first outage, 2 for the next...
    frame: int | None  # index of the last frame before the loss; None if none came yet
    reason: str  # one line: "stream ended (connection closed)", "read timeout", ...
    url: str  # the source URL, password removed


class SourceRestoredEvent(TypedDict):
    v: int
    type: str
    stream: str
    time_unix_s: float
    outage: int  # the outage this ends (same number as its source_lost)
    frame: int  # index of the first frame after the outage
    pts_s: float
    down_s: float  # seconds from the loss to this frame
    attempts: int  # connection attempts it took
    width: int  # frame size after the outage (may differ from before)
    height: int
    url: str


def label_for(class_id: int, class_names: Sequence[str]) -> str:
    """The name of ``class_id``, or ``class_<id>`` when ``class_names`` has no entry for it."""
    if 0 <= class_id < len(class_names):
        return class_names[class_id]
    return f"class_{class_id}"


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (camera URLs often carry credentials)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _plain(event: Mapping[str, Any]) -> dict[str, Any]:
    """A TypedDict built with its keys checked, handed on as the plain dict that
    ``FramePacket.events`` holds."""
    return dict(event)


def _now() -> float:
    return round(time.time(), _TIME_DECIMALS)


def _box(box_xyxy: Sequence[float]) -> list[float]:
    return [round(float(v), _BOX_DECIMALS) for v in box_xyxy]


def frame_event(
    packet: FramePacket, class_names: Sequence[str], *, now_monotonic_s: float | None = None
) -> dict[str, Any]:
    """The ``frame`` message for ``packet`` (read only; detections may be ``None``: no objects).

    ``latency_s`` is measured from ``packet.arrival_s`` to ``now_monotonic_s`` (default: now).
    """
    now = time.monotonic() if now_monotonic_s is None else now_monotonic_s
    records: list[DetectionRecord] = []
    det = packet.detections
    if det is not None and len(det) > 0:
        # Round and convert whole arrays at once: per-value Python calls cost 4x more.
        boxes = np.round(det.boxes_xyxy.astype(np.float64), _BOX_DECIMALS).tolist()
        scores = np.round(det.scores.astype(np.float64), _SCORE_DECIMALS).tolist()
        class_ids = det.class_ids.tolist()
        track_ids = det.track_ids.tolist()
        labels = [label_for(c, class_names) for c in class_ids]
        records = [
            DetectionRecord(
                box_xyxy=box,
                score=score,
                class_id=class_id,
                label=label,
                track_id=None if track_id < 0 else track_id,
            )
            for box, score, class_id, label, track_id in zip(
                boxes, scores, class_ids, labels, track_ids
            )
        ]
    event = FrameEvent(
        v=EVENT_SCHEMA_VERSION,
        type=EventType.FRAME.value,
        stream=packet.stream_id,
        time_unix_s=_now(),
        frame=packet.index,
        pts_s=round(packet.pts_s, _TIME_DECIMALS),
        width=packet.width,
        height=packet.height,
        latency_s=round(max(0.0, now - packet.arrival_s), _TIME_DECIMALS),
        detections=records,
    )
    return _plain(event)


def track_started_event(
    *,
    stream: str,
    frame: int,
    pts_s: float,
    track_id: int,
    class_id: int,
    box_xyxy: Sequence[float],
    class_names: Sequence[str] = (),
) -> dict[str, Any]:
    """A ``track_started`` event (for the tracker: put it in ``FramePacket.events``)."""
    event = TrackStartedEvent(
        v=EVENT_SCHEMA_VERSION,
        type=EventType.TRACK_STARTED.value,
        stream=stream,
        time_unix_s=_now(),
        frame=frame,
        pts_s=round(pts_s, _TIME_DECIMALS),
        track_id=track_id,
        class_id=class_id,
        label=label_for(class_id, class_names),
        box_xyxy=_box(box_xyxy),
    )
    return _plain(event)


def track_ended_event(
    *,
    stream: str,
    frame: int,
    pts_s: float,
    track_id: int,
    class_id: int,
    last_seen_frame: int,
    class_names: Sequence[str] = (),
) -> dict[str, Any]:
    """A ``track_ended`` event (for the tracker: put it in ``FramePacket.events``)."""
    event = TrackEndedEvent(
        v=EVENT_SCHEMA_VERSION,
        type=EventType.TRACK_ENDED.value,
        stream=stream,
        time_unix_s=_now(),
        frame=frame,
        pts_s=round(pts_s, _TIME_DECIMALS),
        track_id=track_id,
        class_id=class_id,
        label=label_for(class_id, class_names),
        last_seen_frame=last_seen_frame,
    )
    return _plain(event)


def source_lost_event(
    *, stream: str, outage: int, frame: int | None, reason: str, url: str
) -> dict[str, Any]:
    """A ``source_lost`` event; ``url`` is redacted here."""
    event = SourceLostEvent(
        v=EVENT_SCHEMA_VERSION,
        type=EventType.SOURCE_LOST.value,
        stream=stream,
        time_unix_s=_now(),
        outage=outage,
        frame=frame,
        reason=reason,
        url=redact_url(url),
    )
    return _plain(event)


def source_restored_event(
    *,
    stream: str,
    outage: int,
    frame: int,
    pts_s: float,
    down_s: float,
    attempts: int,
    width: int,
    height: int,
    url: str,
) -> dict[str, Any]:
    """A ``source_restored`` event; ``url`` is redacted here."""
    event = SourceRestoredEvent(
        v=EVENT_SCHEMA_VERSION,
        type=EventType.SOURCE_RESTORED.value,
        stream=stream,
        time_unix_s=_now(),
        outage=outage,
        frame=frame,
        pts_s=round(pts_s, _TIME_DECIMALS),
        down_s=round(down_s, 3),
        attempts=attempts,
        width=width,
        height=height,
        url=redact_url(url),
    )
    return _plain(event)


def encode_event(event: Mapping[str, Any]) -> bytes:
    """UTF-8 JSON on one line (no newline inside), the body of a ZeroMQ message.

    Raises:
        EventError: the event has a NaN or infinite number, or a value JSON cannot hold.
    """
    try:
        text = json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise EventError(f"event {event.get('type')!r} is not JSON-able: {exc}") from None
    return text.encode("utf-8")


def decode_event(data: bytes | str) -> dict[str, Any]:
    """Parse one message body and check its envelope.

    Raises:
        EventError: not JSON, not an object, no ``type``/``stream``, or a ``v`` other than
            ``EVENT_SCHEMA_VERSION``.
    """
    try:
        event = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EventError(f"event is not valid JSON: {exc}") from None
    if not isinstance(event, dict):
        raise EventError(f"event must be a JSON object, got {type(event).__name__}")
    version = event.get("v")
    if version != EVENT_SCHEMA_VERSION:
        raise EventError(
            f"event schema version {version!r} is not supported (this finestream reads "
            f"v{EVENT_SCHEMA_VERSION}); upgrade the reader or the publisher"
        )
    for key in ("type", "stream"):
        if not isinstance(event.get(key), str):
            raise EventError(f"event has no {key!r} string: {str(event)[:80]}")
    return event

