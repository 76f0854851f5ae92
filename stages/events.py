"""The event messages finestream publishes: one schema, versioned, JSON on the wire.

Every event is a flat JSON object with an envelope (``v``, ``type``, ``stream``,
``time_unix_s``) and the fields of its type (``EventType``):

- ``frame``: one per processed frame, with its detections (made by each sink from the packet).
- ``track_started`` / ``track_ended``: raised by the tracker.
- ``source_lost`` / ``source_restored``: raised by a live source.
- ``line_crossed``, ``zone_entered``, ``zone_exited``, ``zone_loitering``,
  ``analytics_summary``: raised by the camera analytics (``stages.analytics``).

Every event but ``frame`` travels on the pipeline's event channel (``pipeline.runner``), built
complete where it happens with the constructors below; JSON Lines and ZeroMQ write the very same
objects. Each ``TypedDict`` field is ``Annotated[type, "meaning"]``: ``stages.events_schema``
turns them into the JSON Schema and the tables of docs/events.md, and a test keeps both in step.

Compatibility rule: fields may be added without changing ``EVENT_SCHEMA_VERSION``; consumers
ignore fields they do not know. Renaming or removing a field, or changing its meaning or unit,
raises the version (``SCHEMA_CHANGES`` says what changed in each).

``encode_event`` / ``decode_event`` are the wire format. Pure functions, no threads, no state.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Final, Literal, NotRequired, TypedDict
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from stages.frame import Detections, FramePacket

__all__ = [
    "EVENT_SCHEMA_VERSION",
    "EVENT_TYPES",
    "SCHEMA_CHANGES",
    "AnalyticsSummaryEvent",
    "DetectionRecord",
    "EventError",
    "EventType",
    "FrameEvent",
    "LineCrossedEvent",
    "LineTotals",
    "SourceLostEvent",
    "SourceRestoredEvent",
    "TrackEndedEvent",
    "TrackStartedEvent",
    "ZoneEnteredEvent",
    "ZoneExitedEvent",
    "ZoneLoiteringEvent",
    "ZoneTotals",
    "analytics_summary_event",
    "decode_event",
    "detection_records",
    "encode_event",
    "frame_event",
    "label_for",
    "line_crossed_event",
    "redact_url",
    "source_lost_event",
    "source_restored_event",
    "track_ended_event",
    "track_started_event",
    "zone_entered_event",
    "zone_exited_event",
    "zone_loitering_event",
]

#: The ``v`` field of every message. Raised only for incompatible changes (see module docstring).
EVENT_SCHEMA_VERSION: Final = 2

#: What each version changed, newest first (docs/events.md shows it).
SCHEMA_CHANGES: Final[tuple[tuple[int, str], ...]] = (
    (
        2,
        "One schema for every sink: JSON Lines now holds the same messages as ZeroMQ, one per "
        "line (it had its own per-frame object with `box`, `pts`, `track_id: -1` and tracker "
        'events `{"event", "track_id", "class_id"}`). `track_ended` gains `reason`, '
        "`last_seen_pts_s` and `box_xyxy`, and is also sent for tracks still alive when the "
        "stream ends (`reason: stream_ended`). New types: `line_crossed`, `zone_entered`, "
        "`zone_exited`, `zone_loitering`, `analytics_summary`. Labels of unnamed classes are "
        "`class_<id>` everywhere.",
    ),
    (
        1,
        "First version: `frame`, `track_started`, `track_ended`, `source_lost`, "
        "`source_restored` over ZeroMQ.",
    ),
)

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
    LINE_CROSSED = "line_crossed"
    ZONE_ENTERED = "zone_entered"
    ZONE_EXITED = "zone_exited"
    ZONE_LOITERING = "zone_loitering"
    ANALYTICS_SUMMARY = "analytics_summary"


class EventError(ValueError):
    """A message is not a valid finestream event (bad JSON, missing envelope, other version)."""


# Shared field annotations: the same words for the same field in every type.
_V = Annotated[int, "schema version (`EVENT_SCHEMA_VERSION`)"]
_STREAM = Annotated[str, "the source's stream id (also the ZeroMQ topic)"]
_TIME = Annotated[float, "publisher's wall clock when the message was made, seconds since 1970 UTC"]
_FRAME = Annotated[int, "0-based frame number in the stream where it happened"]
_PTS = Annotated[float, "that frame's presentation time, seconds from the stream's start"]
_BOX = Annotated[
    list[float],
    "`[x1, y1, x2, y2]` in pixels of the displayed frame",
    {"minItems": 4, "maxItems": 4},
]
_POINT = Annotated[list[float], "`[x, y]` in pixels", {"minItems": 2, "maxItems": 2}]
_TRACK = Annotated[int, "the tracker's id, unique within the stream for the run"]
_CLASS = Annotated[int, "0-based class index of the model"]
_LABEL = Annotated[str, "the class name (`class_<id>` when the model gives none)"]
_URL = Annotated[str, "the source URL with any password replaced by `***`"]
_LINE = Annotated[str, "the line's `name` from the config"]
_ZONE = Annotated[str, "the zone's `name` from the config"]


class DetectionRecord(TypedDict):
    """One object in a ``frame`` event (not a message by itself)."""

    box_xyxy: _BOX
    score: Annotated[float, "confidence in [0, 1], 4 decimals"]
    class_id: _CLASS
    label: _LABEL
    track_id: Annotated[
        int | None,
        "the tracker's id; `null` when not tracked (no tracker, or not yet confirmed)",
    ]
    edge_std_px: NotRequired[
        Annotated[
            list[float],
            "`[left, top, right, bottom]`: the standard deviation of each box edge in pixels, "
            "from D-FINE's edge distributions; only when the model gives it (the torch backend, "
            "an ONNX export made with `--edge-std`), absent otherwise",
            {"minItems": 4, "maxItems": 4},
        ]
    ]


class FrameEvent(TypedDict):
    """One per processed frame (ZeroMQ: unless the sink has `send_frames: false`)."""

    v: _V
    type: Literal["frame"]
    stream: _STREAM
    time_unix_s: _TIME
    frame: Annotated[int, "0-based frame number in the stream, counting dropped frames too"]
    pts_s: Annotated[
        float,
        "presentation time, seconds from the stream's start; strictly increasing, also across reconnects",
    ]
    width: Annotated[int, "frame width in pixels (the boxes refer to it)"]
    height: Annotated[int, "frame height in pixels"]
    latency_s: Annotated[float, "seconds from the frame's decoding to this message"]
    detections: Annotated[list[DetectionRecord], "the objects found, `[]` when none"]


class TrackStartedEvent(TypedDict):
    """A tracker confirmed a new object, on the frame where it was confirmed."""

    v: _V
    type: Literal["track_started"]
    stream: _STREAM
    time_unix_s: _TIME
    frame: _FRAME
    pts_s: _PTS
    track_id: _TRACK
    class_id: _CLASS
    label: _LABEL
    box_xyxy: Annotated[
        list[float],
        "its box in that frame, `[x1, y1, x2, y2]` pixels",
        {"minItems": 4, "maxItems": 4},
    ]


class TrackEndedEvent(TypedDict):
    """The tracker gave up on an object (unmatched for its allowed number of frames), or the
    stream ended while it was still tracked."""

    v: _V
    type: Literal["track_ended"]
    stream: _STREAM
    time_unix_s: _TIME
    frame: Annotated[
        int,
        "the frame where the tracker dropped it (the stream's last frame for `stream_ended`)",
    ]
    pts_s: _PTS
    track_id: _TRACK
    class_id: _CLASS
    label: _LABEL
    reason: Annotated[
        Literal["lost", "stream_ended"],
        "`lost`: not matched for too long; `stream_ended`: still tracked at the end",
    ]
    last_seen_frame: Annotated[int, "the last frame where it was matched to a detection"]
    last_seen_pts_s: Annotated[float, "that frame's presentation time"]
    box_xyxy: Annotated[
        list[float],
        "its box in the last frame where it was seen",
        {"minItems": 4, "maxItems": 4},
    ]


class SourceLostEvent(TypedDict):
    """A live source stopped delivering (connection closed, stall timeout, read error, first
    connection refused). Sent at once, exactly one per outage; the source then reconnects."""

    v: _V
    type: Literal["source_lost"]
    stream: _STREAM
    time_unix_s: _TIME
    outage: Annotated[int, "1 for the stream's first outage, then 2, 3..."]
    frame: Annotated[
        int | None,
        "the last frame delivered before the loss; `null` if none ever came",
    ]
    reason: Annotated[str, "one line, e.g. `stream ended (connection closed)`"]
    url: _URL


class SourceRestoredEvent(TypedDict):
    """Frames flow again after an outage; sent when the first frame after it is decoded."""

    v: _V
    type: Literal["source_restored"]
    stream: _STREAM
    time_unix_s: _TIME
    outage: Annotated[int, "the outage this ends (the number in its `source_lost`)"]
    frame: Annotated[int, "the first frame after the outage"]
    pts_s: Annotated[float, "its presentation time; the outage shows as a gap in `pts_s`"]
    down_s: Annotated[float, "seconds from the loss to this frame"]
    attempts: Annotated[int, "connection attempts it took"]
    width: Annotated[int, "frame width now (may differ from before the outage)"]
    height: Annotated[int, "frame height now"]
    url: _URL


class LineCrossedEvent(TypedDict):
    """A confirmed track's anchor point crossed a counting line: the segment it travelled
    between two consecutive observations intersects the line."""

    v: _V
    type: Literal["line_crossed"]
    stream: _STREAM
    time_unix_s: _TIME
    frame: _FRAME
    pts_s: _PTS
    line: _LINE
    direction: Annotated[
        Literal["in", "out"],
        "`in`: from the left of A→B (as seen on the picture) to its right; `out`: the other way",
    ]
    track_id: _TRACK
    class_id: _CLASS
    label: _LABEL
    point_xy: Annotated[
        list[float],
        "where the anchor's path met the line, `[x, y]` pixels",
        {"minItems": 2, "maxItems": 2},
    ]
    speed_kmh: Annotated[
        float | None,
        "the track's ground speed, smoothed; `null` unless `speed` is configured (or not yet known)",
    ]
    count_in: Annotated[int, "the line's `in` total, all classes, this crossing included"]
    count_out: Annotated[int, "the line's `out` total, all classes, this crossing included"]


class ZoneEnteredEvent(TypedDict):
    """A confirmed track's anchor point came inside a zone's polygon."""

    v: _V
    type: Literal["zone_entered"]
    stream: _STREAM
    time_unix_s: _TIME
    frame: _FRAME
    pts_s: _PTS
    zone: _ZONE
    track_id: _TRACK
    class_id: _CLASS
    label: _LABEL
    occupancy: Annotated[int, "tracks in the zone now, all classes, this one included"]


class ZoneExitedEvent(TypedDict):
    """A track left a zone: its anchor went outside, or the tracker dropped it while inside."""

    v: _V
    type: Literal["zone_exited"]
    stream: _STREAM
    time_unix_s: _TIME
    frame: Annotated[int, "the frame where it left (or where the tracker dropped it)"]
    pts_s: _PTS
    zone: _ZONE
    track_id: _TRACK
    class_id: _CLASS
    label: _LABEL
    reason: Annotated[
        Literal["left", "track_ended"],
        "`left`: seen outside; `track_ended`: the tracker dropped it inside",
    ]
    dwell_s: Annotated[float, "stream time (pts) from its first to its last observation inside"]
    occupancy: Annotated[int, "tracks in the zone now, all classes"]


class ZoneLoiteringEvent(TypedDict):
    """A track has been inside a zone for longer than the zone's `loiter_s` (once per visit)."""

    v: _V
    type: Literal["zone_loitering"]
    stream: _STREAM
    time_unix_s: _TIME
    frame: _FRAME
    pts_s: _PTS
    zone: _ZONE
    track_id: _TRACK
    class_id: _CLASS
    label: _LABEL
    dwell_s: Annotated[float, "stream time (pts) it has been inside so far"]
    threshold_s: Annotated[float, "the zone's `loiter_s`"]


class LineClassCount(TypedDict):
    """Per-class totals of a line."""

    class_id: _CLASS
    label: _LABEL
    count_in: Annotated[int, "`in` crossings of this class"]
    count_out: Annotated[int, "`out` crossings of this class"]


class LineTotals(TypedDict):
    """Totals of one line in an `analytics_summary`."""

    line: _LINE
    count_in: Annotated[int, "`in` crossings, all classes"]
    count_out: Annotated[int, "`out` crossings, all classes"]
    by_class: Annotated[list[LineClassCount], "one entry per class that crossed, by `class_id`"]


class ZoneClassCount(TypedDict):
    """Per-class totals of a zone."""

    class_id: _CLASS
    label: _LABEL
    entered: Annotated[int, "entries of this class"]
    occupancy: Annotated[int, "tracks of this class inside now"]


class ZoneTotals(TypedDict):
    """Totals of one zone in an `analytics_summary`."""

    zone: _ZONE
    entered: Annotated[int, "entries, all classes"]
    exited: Annotated[int, "exits, all classes (`left` and `track_ended`)"]
    loitering: Annotated[int, "`zone_loitering` events"]
    occupancy: Annotated[int, "tracks inside now, all classes"]
    max_dwell_s: Annotated[
        float,
        "the longest dwell of a finished visit, seconds of stream time (0 if none)",
    ]
    by_class: Annotated[list[ZoneClassCount], "one entry per class that entered, by `class_id`"]


class AnalyticsSummaryEvent(TypedDict):
    """Totals of a stream's lines and zones: every `summary_every_s` of stream time, and once
    at the end of the stream (`final: true`)."""

    v: _V
    type: Literal["analytics_summary"]
    stream: _STREAM
    time_unix_s: _TIME
    frame: Annotated[int, "the last frame counted"]
    pts_s: _PTS
    final: Annotated[bool, "`true` for the summary at the end of the stream"]
    lines: Annotated[list[LineTotals], "one entry per configured line, in config order"]
    zones: Annotated[list[ZoneTotals], "one entry per configured zone, in config order"]


#: Each message type and the ``TypedDict`` that defines it, in the order docs/events.md lists them.
EVENT_TYPES: Final[dict[EventType, type]] = {
    EventType.FRAME: FrameEvent,
    EventType.TRACK_STARTED: TrackStartedEvent,
    EventType.TRACK_ENDED: TrackEndedEvent,
    EventType.SOURCE_LOST: SourceLostEvent,
    EventType.SOURCE_RESTORED: SourceRestoredEvent,
    EventType.LINE_CROSSED: LineCrossedEvent,
    EventType.ZONE_ENTERED: ZoneEnteredEvent,
    EventType.ZONE_EXITED: ZoneExitedEvent,
    EventType.ZONE_LOITERING: ZoneLoiteringEvent,
    EventType.ANALYTICS_SUMMARY: AnalyticsSummaryEvent,
}


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


def _point(point_xy: Sequence[float]) -> list[float]:
    return [round(float(v), _BOX_DECIMALS) for v in point_xy]


def _time(value_s: float) -> float:
    return round(float(value_s), _TIME_DECIMALS)


def detection_records(
    detections: Detections | None, class_names: Sequence[str]
) -> list[DetectionRecord]:
    """The ``detections`` of a ``frame`` event: the one serialisation of ``Detections``.

    ``detections``: boxes float ``(n, 4)`` xyxy pixels, scores ``(n,)``, class and track ids
    ``(n,)`` int (track id -1: untracked, written ``null``), and ``edge_std_px`` ``(n, 4)``
    pixels when the model gave it (written as ``edge_std_px``, else the key is absent). Rows
    with a non-finite box or score (a broken model output) are left out: JSON has no NaN, and
    such a box locates nothing.
    """
    if detections is None or len(detections) == 0:
        return []
    boxes_xyxy = detections.boxes_xyxy.astype(np.float64)
    scores = detections.scores.astype(np.float64)
    finite = np.isfinite(boxes_xyxy).all(axis=1) & np.isfinite(scores)
    rows = np.flatnonzero(finite)
    # Round and convert whole arrays at once: per-value Python calls cost 4x more.
    boxes = np.round(boxes_xyxy[rows], _BOX_DECIMALS).tolist()
    rounded = np.round(scores[rows], _SCORE_DECIMALS).tolist()
    class_ids = detections.class_ids[rows].tolist()
    track_ids = detections.track_ids[rows].tolist()
    records = [
        DetectionRecord(
            box_xyxy=box,
            score=score,
            class_id=class_id,
            label=label_for(class_id, class_names),
            track_id=None if track_id < 0 else track_id,
        )
        for box, score, class_id, track_id in zip(boxes, rounded, class_ids, track_ids)
    ]
    if detections.edge_std_px is not None:
        spread = np.nan_to_num(
            detections.edge_std_px[rows].astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0
        )
        for record, std in zip(records, np.round(spread, _BOX_DECIMALS).tolist()):
            record["edge_std_px"] = std
    return records


def frame_event(
    packet: FramePacket, class_names: Sequence[str], *, now_monotonic_s: float | None = None
) -> dict[str, Any]:
    """The ``frame`` message for ``packet`` (read only; detections may be ``None``: no objects).

    ``latency_s`` is measured from ``packet.arrival_s`` to ``now_monotonic_s`` (default: now).
    """
    now = time.monotonic() if now_monotonic_s is None else now_monotonic_s
    event = FrameEvent(
        v=EVENT_SCHEMA_VERSION,
        type="frame",
        stream=packet.stream_id,
        time_unix_s=_now(),
        frame=packet.index,
        pts_s=_time(packet.pts_s),
        width=packet.width,
        height=packet.height,
        latency_s=_time(max(0.0, now - packet.arrival_s)),
        detections=detection_records(packet.detections, class_names),
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
    class_names: Sequence[str],
) -> dict[str, Any]:
    """A ``track_started`` event."""
    event = TrackStartedEvent(
        v=EVENT_SCHEMA_VERSION,
        type="track_started",
        stream=stream,
        time_unix_s=_now(),
        frame=frame,
        pts_s=_time(pts_s),
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
    reason: Literal["lost", "stream_ended"],
    last_seen_frame: int,
    last_seen_pts_s: float,
    box_xyxy: Sequence[float],
    class_names: Sequence[str],
) -> dict[str, Any]:
    """A ``track_ended`` event."""
    event = TrackEndedEvent(
        v=EVENT_SCHEMA_VERSION,
        type="track_ended",
        stream=stream,
        time_unix_s=_now(),
        frame=frame,
        pts_s=_time(pts_s),
        track_id=track_id,
        class_id=class_id,
        label=label_for(class_id, class_names),
        reason=reason,
        last_seen_frame=last_seen_frame,
        last_seen_pts_s=_time(last_seen_pts_s),
        box_xyxy=_box(box_xyxy),
    )
    return _plain(event)


def line_crossed_event(
    *,
    stream: str,
    frame: int,
    pts_s: float,
    line: str,
    direction: Literal["in", "out"],
    track_id: int,
    class_id: int,
    point_xy: Sequence[float],
    speed_kmh: float | None,
    count_in: int,
    count_out: int,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """A ``line_crossed`` event."""
    event = LineCrossedEvent(
        v=EVENT_SCHEMA_VERSION,
        type="line_crossed",
        stream=stream,
        time_unix_s=_now(),
        frame=frame,
        pts_s=_time(pts_s),
        line=line,
        direction=direction,
        track_id=track_id,
        class_id=class_id,
        label=label_for(class_id, class_names),
        point_xy=_point(point_xy),
        speed_kmh=None if speed_kmh is None else round(float(speed_kmh), 2),
        count_in=count_in,
        count_out=count_out,
    )
    return _plain(event)


def zone_entered_event(
    *,
    stream: str,
    frame: int,
    pts_s: float,
    zone: str,
    track_id: int,
    class_id: int,
    occupancy: int,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """A ``zone_entered`` event."""
    event = ZoneEnteredEvent(
        v=EVENT_SCHEMA_VERSION,
        type="zone_entered",
        stream=stream,
        time_unix_s=_now(),
        frame=frame,
        pts_s=_time(pts_s),
        zone=zone,
        track_id=track_id,
        class_id=class_id,
        label=label_for(class_id, class_names),
        occupancy=occupancy,
    )
    return _plain(event)


def zone_exited_event(
    *,
    stream: str,
    frame: int,
    pts_s: float,
    zone: str,
    track_id: int,
    class_id: int,
    reason: Literal["left", "track_ended"],
    dwell_s: float,
    occupancy: int,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """A ``zone_exited`` event."""
    event = ZoneExitedEvent(
        v=EVENT_SCHEMA_VERSION,
        type="zone_exited",
        stream=stream,
        time_unix_s=_now(),
        frame=frame,
        pts_s=_time(pts_s),
        zone=zone,
        track_id=track_id,
        class_id=class_id,
        label=label_for(class_id, class_names),
        reason=reason,
        dwell_s=_time(dwell_s),
        occupancy=occupancy,
    )
    return _plain(event)


def zone_loitering_event(
    *,
    stream: str,
    frame: int,
    pts_s: float,
    zone: str,
    track_id: int,
    class_id: int,
    dwell_s: float,
    threshold_s: float,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """A ``zone_loitering`` event."""
    event = ZoneLoiteringEvent(
        v=EVENT_SCHEMA_VERSION,
        type="zone_loitering",
        stream=stream,
        time_unix_s=_now(),
        frame=frame,
        pts_s=_time(pts_s),
        zone=zone,
        track_id=track_id,
        class_id=class_id,
        label=label_for(class_id, class_names),
        dwell_s=_time(dwell_s),
        threshold_s=float(threshold_s),
    )
    return _plain(event)


def analytics_summary_event(
    *,
    stream: str,
    frame: int,
    pts_s: float,
    final: bool,
    lines: Sequence[LineTotals],
    zones: Sequence[ZoneTotals],
) -> dict[str, Any]:
    """An ``analytics_summary`` event (totals built by ``stages.analytics``)."""
    event = AnalyticsSummaryEvent(
        v=EVENT_SCHEMA_VERSION,
        type="analytics_summary",
        stream=stream,
        time_unix_s=_now(),
        frame=frame,
        pts_s=_time(pts_s),
        final=final,
        lines=list(lines),
        zones=list(zones),
    )
    return _plain(event)


def source_lost_event(
    *, stream: str, outage: int, frame: int | None, reason: str, url: str
) -> dict[str, Any]:
    """A ``source_lost`` event; ``url`` is redacted here."""
    event = SourceLostEvent(
        v=EVENT_SCHEMA_VERSION,
        type="source_lost",
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
        type="source_restored",
        stream=stream,
        time_unix_s=_now(),
        outage=outage,
        frame=frame,
        pts_s=_time(pts_s),
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
