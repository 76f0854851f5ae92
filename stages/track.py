"""Give detections track ids across frames (norfair, IoU matching, class-aware).

Input: ``FramePacket`` with ``detections`` (boxes in source pixels) or ``None`` (no inference
this frame: the trackers still advance).
Output: the same packet with ``detections`` replaced by a copy whose ``track_ids`` hold the
norfair track id (1, 2, … per stream) of each row, or -1 where the row has no confirmed track
yet. Events: complete ``track_started`` / ``track_ended`` messages (``stages.events``) handed to
``publish`` (the pipeline's event channel), not put on the packet.

One norfair tracker per ``stream_id``, made on the stream's first packet. Frames dropped
upstream (gaps in ``packet.index``) are passed to norfair as ``period`` so a track's hit counter
is credited for the frames it could not see.

Events: ``track_started`` on the frame a track is confirmed (after ``initialization_delay``
hits), with its box; ``track_ended`` (``reason: lost``) on the frame norfair drops it (unmatched
for about ``hit_counter_max`` frames), with the frame, time and box where it was last seen.
Tracks still alive when the input ends get ``track_ended`` (``reason: stream_ended``) from
``flush()``, dated at their stream's last frame, so every started track ends once. An event is
published before the packet it happened on is handed on, so stages downstream that subscribe to
the channel (the analytics) know of it before that packet reaches them.

Thread: runs in the tracker stage's thread; the per-stream state is touched by nothing else.

Ownership: the packet's ``Detections`` object is replaced, not modified, so anything holding
the old one sees no change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import norfair
import numpy as np

from pipeline.stage import StageBase
from stages.events import track_ended_event, track_started_event
from stages.frame import Detections, FramePacket

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackConfig:
    """Settings of a ``Tracker`` (norfair's names and meanings).

    Attributes:
        distance_threshold: largest ``1 - IoU`` that still matches a detection to a track
            (0.7: boxes must overlap with IoU above 0.3).
        hit_counter_max: how many frames a track survives without a match.
        initialization_delay: hits a new track needs before it gets an id; until then its
            detections carry track id -1. Must be below ``hit_counter_max``.
        pointwise_hit_counter_max: norfair's per-point hit counter cap.
        past_detections_length: past detections norfair keeps per track.
        class_aware: only match a detection to a track of the same class.
        duplicate_iou: two detections of different classes overlapping with at least this IoU
            are one object seen twice (a detector's NMS runs per class: the same vehicle comes
            as "car" and "truck"); only the higher-scoring one is tracked, the other keeps
            track id -1. Without this each would get a track and be counted twice. 1.0: off.
    """

    distance_threshold: float = 0.7
    hit_counter_max: int = 15
    initialization_delay: int = 3
    pointwise_hit_counter_max: int = 4
    past_detections_length: int = 4
    class_aware: bool = True
    duplicate_iou: float = 0.85

    def __post_init__(self) -> None:
        if not 0.0 < self.duplicate_iou <= 1.0:
            raise ValueError(f"track.duplicate_iou must be in (0, 1] (1.0: off), got {self.duplicate_iou}")
        if not 0.0 < self.distance_threshold <= 1.0:
            raise ValueError(
                f"track.distance_threshold must be in (0, 1] (a 1 - IoU distance), got {self.distance_threshold}"
            )
        if self.hit_counter_max < 1:
            raise ValueError(f"track.hit_counter_max must be >= 1, got {self.hit_counter_max}")
        if not 0 <= self.initialization_delay < self.hit_counter_max:
            raise ValueError(
                "track.initialization_delay must be in [0, hit_counter_max), "
                f"got {self.initialization_delay} with hit_counter_max {self.hit_counter_max}"
            )
        if self.pointwise_hit_counter_max < 1:
            raise ValueError(
                f"track.pointwise_hit_counter_max must be >= 1, got {self.pointwise_hit_counter_max}"
            )
        if self.past_detections_length < 0:
            raise ValueError(
                f"track.past_detections_length must be >= 0, got {self.past_detections_length}"
            )


def iou_distance(detection: norfair.Detection, tracked_object: norfair.tracker.TrackedObject) -> float:
    """``1 - IoU`` of a detection's box and a track's predicted box, both ``[[x1, y1], [x2, y2]]``.

    norfair's own ``iou`` asserts on degenerate boxes and ``iou_opt`` divides by zero on them,
    and norfair calls ``exit()`` on a NaN or inf distance; a Kalman prediction can turn a box
    inside out, so corners are ordered here and an empty union is "no overlap" (1.0).
    """
    (ax1, ay1), (ax2, ay2) = detection.points.tolist()
    (bx1, by1), (bx2, by2) = tracked_object.estimate.tolist()
    ax1, ax2 = min(ax1, ax2), max(ax1, ax2)
    ay1, ay2 = min(ay1, ay2), max(ay1, ay2)
    bx1, bx2 = min(bx1, bx2), max(bx1, bx2)
    by1, by2 = min(by1, by2), max(by1, by2)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    if not union > 0.0:  # also catches NaN
        return 1.0
    return 1.0 - inter / union


@dataclass
class _Seen:
    """A confirmed track's class and its last observation."""

    class_id: int
    frame: int
    pts_s: float
    box_xyxy: list[float]


@dataclass
class _StreamState:
    tracker: norfair.Tracker
    last_index: int | None = None
    last_pts_s: float = 0.0
    # track id -> what we know of it, for every confirmed track norfair still holds.
    live: dict[int, _Seen] = field(default_factory=dict)


def _discard(event: dict[str, Any]) -> None:
    pass


class Tracker(StageBase[FramePacket]):
    """Processor[FramePacket, FramePacket]: fills ``detections.track_ids``; publishes track events.

    Args:
        config: see ``TrackConfig``.
        class_names: index = class id, for the events' ``label``.
        publish: where events go (``EventChannel.publish``); default: nowhere.
    """

    def __init__(
        self,
        config: TrackConfig,
        class_names: Sequence[str] = (),
        publish: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.name = "track"
        self.class_names = tuple(class_names)
        self._publish = publish if publish is not None else _discard
        self._streams: dict[str, _StreamState] = {}

    def _new_tracker(self) -> norfair.Tracker:
        c = self.config
        return norfair.Tracker(
            distance_function=iou_distance,
            distance_threshold=c.distance_threshold,
            hit_counter_max=c.hit_counter_max,
            initialization_delay=c.initialization_delay,
            pointwise_hit_counter_max=c.pointwise_hit_counter_max,
            past_detections_length=c.past_detections_length,
        )

    def process(self, item: FramePacket) -> FramePacket:
        state = self._streams.get(item.stream_id)
        if state is None:
            state = _StreamState(tracker=self._new_tracker())
            self._streams[item.stream_id] = state
        period = 1 if state.last_index is None else max(1, item.index - state.last_index)
        state.last_index = item.index

        dets = item.detections
        norfair_dets = _to_norfair(dets, self.config) if dets is not None else []
        active = state.tracker.update(detections=norfair_dets or None, period=period)
        by_row = {d.data: d for d in norfair_dets}

        if dets is not None:
            track_ids = np.full(len(dets), -1, dtype=np.int64)
            for obj in active:
                row = obj.last_detection.data
                # Only a detection of *this* frame: an unmatched track still points at an old one.
                matched_now = isinstance(row, int) and by_row.get(row) is obj.last_detection
                if matched_now:
                    track_ids[row] = obj.id
            item.detections = Detections(
                boxes_xyxy=dets.boxes_xyxy,
                scores=dets.scores,
                class_ids=dets.class_ids,
                track_ids=track_ids,
            )
            boxes = dets.boxes_xyxy.tolist()
            for row, track_id in enumerate(track_ids.tolist()):
                if track_id < 0:
                    continue
                seen = state.live.get(track_id)
                if seen is None:
                    class_id = int(dets.class_ids[row])
                    state.live[track_id] = _Seen(class_id, item.index, item.pts_s, boxes[row])
                    self._publish(track_started_event(
                        stream=item.stream_id, frame=item.index, pts_s=item.pts_s,
                        track_id=track_id, class_id=class_id, box_xyxy=boxes[row],
                        class_names=self.class_names,
                    ))
                else:
                    seen.frame, seen.pts_s, seen.box_xyxy = item.index, item.pts_s, boxes[row]
        state.last_pts_s = item.pts_s

        # Confirmed tracks norfair no longer holds have ended (unmatched too long).
        held = {
            obj.id
            for obj in state.tracker.tracked_objects
            if obj.id is not None and obj.hit_counter_is_positive
        }
        for track_id in [t for t in state.live if t not in held]:
            self._end(item.stream_id, state, track_id, "lost")
        return item

    def flush(self) -> Iterable[FramePacket]:
        """No packet is held back; every track still alive ends here (``stream_ended``)."""
        for stream_id, state in self._streams.items():
            for track_id in list(state.live):
                self._end(stream_id, state, track_id, "stream_ended")
        return ()

    def teardown(self) -> None:
        self._streams.clear()

    def _end(
        self, stream_id: str, state: _StreamState, track_id: int,
        reason: Literal["lost", "stream_ended"],
    ) -> None:
        seen = state.live.pop(track_id)
        self._publish(track_ended_event(
            stream=stream_id, frame=state.last_index if state.last_index is not None else seen.frame,
            pts_s=state.last_pts_s, track_id=track_id, class_id=seen.class_id, reason=reason,
            last_seen_frame=seen.frame, last_seen_pts_s=seen.pts_s, box_xyxy=seen.box_xyxy,
            class_names=self.class_names,
        ))


def cross_class_duplicates(dets: Detections, iou_threshold: float) -> np.ndarray:
    """bool ``(n,)``: rows that overlap a higher-scoring row of another class with IoU >=
    ``iou_threshold`` (boxes xyxy pixels). All pairs at once: n is tens, n² is nothing."""
    n = len(dets)
    if n < 2 or iou_threshold >= 1.0:
        return np.zeros(n, dtype=bool)
    b = dets.boxes_xyxy.astype(np.float64)
    x1 = np.maximum(b[:, None, 0], b[None, :, 0])
    y1 = np.maximum(b[:, None, 1], b[None, :, 1])
    x2 = np.minimum(b[:, None, 2], b[None, :, 2])
    y2 = np.minimum(b[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area[:, None] + area[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    other_class = dets.class_ids[:, None] != dets.class_ids[None, :]
    scores = dets.scores
    # Ties go to the lower row index, so exactly one of two equal-score duplicates stays.
    beaten = (scores[None, :] > scores[:, None]) | (
        (scores[None, :] == scores[:, None]) & (np.arange(n)[None, :] < np.arange(n)[:, None]))
    duplicate: np.ndarray = (other_class & beaten & (iou >= iou_threshold)).any(axis=1)
    return duplicate


def _to_norfair(dets: Detections, config: TrackConfig) -> list[norfair.Detection]:
    """One norfair Detection per row kept (see ``duplicate_iou``), points
    ``[[x1, y1], [x2, y2]]``, ``data`` the row index."""
    boxes = dets.boxes_xyxy.astype(np.float64).reshape(-1, 2, 2)
    scores = dets.scores.astype(np.float64)
    labels = dets.class_ids.tolist()
    duplicate = cross_class_duplicates(dets, config.duplicate_iou)
    return [
        norfair.Detection(
            points=boxes[i],
            scores=np.array([scores[i], scores[i]]),
            data=i,
            label=labels[i] if config.class_aware else None,
        )
        for i in range(len(dets))
        if not duplicate[i]
    ]

