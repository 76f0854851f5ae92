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

Camera-motion compensation (``camera_motion.enabled``, for a moving camera such as a drone):
per stream a norfair ``MotionEstimator`` follows corners by sparse optical flow on a grey copy of
the frame scaled down to ``flow_max_side_px`` (the flow needs texture, not resolution, and costs
in proportion to pixels), with the detections' boxes masked out so moving objects do not count as
camera motion. Its transformation (a homography, or a translation) from the stream's first frame
to this one goes to ``tracker.update(coord_transformations=...)``: norfair then keeps each track's
Kalman state in that stabilised frame, and matches (and we write) boxes in image pixels. Its cost
per frame is the ``track`` row's ``motion_ms_per_frame`` counter in the stage table.

Spread-weighted matching (``spread_weight`` > 0, for a model that gives per-edge spreads,
``Detections.edge_std_px``): norfair cannot take a per-detection measurement noise (its
``TrackedObject.hit`` always calls the Kalman filter's ``update`` with ``R=None``, so the
filter's ``R`` is one number for all detections), so the spread scales the matching distance
instead (:func:`spread_scaled_distance`): a detection whose edges the model is unsure of is
forgiven the part of its ``1 - IoU`` its own spread explains.

Thread: runs in the tracker stage's thread; the per-stream state is touched by nothing else.

Ownership: the packet's ``Detections`` object is replaced, not modified, so anything holding
the old one sees no change.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import norfair
import numpy as np
from norfair.camera_motion import (
    CoordinatesTransformation,
    HomographyTransformationGetter,
    MotionEstimator,
    TranslationTransformationGetter,
)

from pipeline.stage import StageBase
from stages.events import track_ended_event, track_started_event
from stages.frame import Detections, FramePacket

logger = logging.getLogger(__name__)


class MotionModel(str, enum.Enum):
    HOMOGRAPHY = "homography"  # pan, rotation, zoom, perspective (a drone)
    TRANSLATION = "translation"  # pan only; the cheaper and steadier estimate


@dataclass(frozen=True)
class CameraMotionConfig:
    """Camera-motion compensation (``track.camera_motion``; off by default).

    Attributes:
        enabled: estimate the camera's motion each frame and track in a stabilised frame.
        model: ``homography`` or ``translation`` (norfair's transformation getters).
        flow_max_side_px: the frame is scaled down so its longer side is at most this before
            the flow is computed (never up).
        max_points: corners followed by the flow.
        min_distance_px: least distance between corners, in pixels of the scaled frame.
        mask_detections: keep corners off the detections' boxes (objects move on their own).
    """

    enabled: bool = False
    model: MotionModel = MotionModel.HOMOGRAPHY
    flow_max_side_px: int = 640
    max_points: int = 300
    min_distance_px: int = 15
    mask_detections: bool = True

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "model", MotionModel(self.model))
        except ValueError:
            choices = ", ".join(m.value for m in MotionModel)
            raise ValueError(
                f"track.camera_motion.model must be one of {choices}, got {self.model!r}"
            ) from None
        if self.flow_max_side_px < 32:
            raise ValueError(
                f"track.camera_motion.flow_max_side_px must be >= 32, got {self.flow_max_side_px}"
            )
        if self.max_points < 4:
            raise ValueError(
                f"track.camera_motion.max_points must be >= 4 (a homography), got {self.max_points}"
            )
        if self.min_distance_px < 1:
            raise ValueError(
                f"track.camera_motion.min_distance_px must be >= 1, got {self.min_distance_px}"
            )


class ScaledTransformation(CoordinatesTransformation):
    """A transformation found on a frame scaled by ``scale``, applied to full-size pixels:
    ``x -> T(x * scale) / scale`` both ways (``S^-1 T S``)."""

    def __init__(self, inner: CoordinatesTransformation, scale: float) -> None:
        self.inner = inner
        self.scale = float(scale)

    def abs_to_rel(self, points: np.ndarray) -> np.ndarray:
        out: np.ndarray = (
            self.inner.abs_to_rel(np.asarray(points, dtype=np.float64) * self.scale) / self.scale
        )
        return out

    def rel_to_abs(self, points: np.ndarray) -> np.ndarray:
        out: np.ndarray = (
            self.inner.rel_to_abs(np.asarray(points, dtype=np.float64) * self.scale) / self.scale
        )
        return out


class ChainedTransformation(CoordinatesTransformation):
    """``base`` (first frame -> a later reference frame) then ``inner`` (that reference -> now):
    how the estimate stays in the stream's first-frame coordinates after a restart."""

    def __init__(self, base: CoordinatesTransformation, inner: CoordinatesTransformation) -> None:
        self.base = base
        self.inner = inner

    def abs_to_rel(self, points: np.ndarray) -> np.ndarray:
        return self.inner.abs_to_rel(self.base.abs_to_rel(points))

    def rel_to_abs(self, points: np.ndarray) -> np.ndarray:
        return self.base.rel_to_abs(self.inner.rel_to_abs(points))


class CameraMotion:
    """One stream's camera-motion estimate: frame and boxes in, transformation out.

    Args:
        config: see ``CameraMotionConfig``.
    """

    def __init__(self, config: CameraMotionConfig) -> None:
        self.config = config
        self._estimator = self._new_estimator()
        self._last: CoordinatesTransformation | None = None
        # After a restart: first frame -> the restarted estimator's reference frame.
        self._base: CoordinatesTransformation | None = None
        self.failures = 0

    def _new_estimator(self) -> MotionEstimator:
        config = self.config
        getter = (
            HomographyTransformationGetter()
            if config.model is MotionModel.HOMOGRAPHY
            else TranslationTransformationGetter()
        )
        return MotionEstimator(
            max_points=config.max_points,
            min_distance=config.min_distance_px,
            transformations_getter=getter,
        )

    def update(
        self, image_rgb_u8: np.ndarray, boxes_xyxy: np.ndarray | None
    ) -> CoordinatesTransformation | None:
        """The transformation from the stream's first frame to this one (image pixels).

        Args:
            image_rgb_u8: uint8 ``(H, W, 3)``.
            boxes_xyxy: float ``(n, 4)`` source pixels, masked out of the flow; or ``None``.

        Returns:
            ``None`` only until a first estimate exists. When the flow fails on a frame (too few
            corners: a blank or blurred frame), the last estimate is kept: the camera is taken
            to have stood still for that frame.
        """
        height, width = image_rgb_u8.shape[:2]
        scale = min(1.0, self.config.flow_max_side_px / max(height, width))
        small = image_rgb_u8
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = cv2.resize(image_rgb_u8, size, interpolation=cv2.INTER_AREA)
        mask = None
        if self.config.mask_detections and boxes_xyxy is not None and len(boxes_xyxy):
            mask = np.ones(small.shape[:2], dtype=np.uint8)
            for x1, y1, x2, y2 in (np.asarray(boxes_xyxy, dtype=np.float64) * scale).tolist():
                mask[
                    max(0, int(y1)) : int(np.ceil(y2)) + 1, max(0, int(x1)) : int(np.ceil(x2)) + 1
                ] = 0
        try:
            # norfair greys the frame as BGR; RGB only weighs the channels differently.
            found = self._estimator.update(small, mask)
        except (cv2.error, np.linalg.LinAlgError, TypeError, ValueError) as exc:
            self.failures += 1
            logger.debug("camera motion: no estimate on this frame (%s); keeping the last", exc)
            # Start again from the next frame (the old reference may be lost for good), chained
            # to the last estimate: tracks live in first-frame coordinates, and a new origin
            # would move every one of them at once.
            self._estimator = self._new_estimator()
            self._base = self._last
            return self._last
        estimate: CoordinatesTransformation = (
            ScaledTransformation(found, scale) if scale < 1.0 else found
        )
        self._last = estimate if self._base is None else ChainedTransformation(self._base, estimate)
        return self._last


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
        camera_motion: compensation of a moving camera (``CameraMotionConfig``); off by default.
        spread_weight: scale each detection's ``1 - IoU`` by ``1 / (1 + spread_weight * e)``,
            ``e`` the ``1 - IoU`` its per-edge spreads alone would cause
            (:func:`spread_scaled_distance`); 0 (default) or a model without spreads: plain IoU.
            Measured on the highway clip it added id switches rather than removing them, with
            the model's spreads and with known true ones (bench/uncertainty.py): keep 0 unless
            your footage says otherwise.
    """

    distance_threshold: float = 0.7
    hit_counter_max: int = 15
    initialization_delay: int = 3
    pointwise_hit_counter_max: int = 4
    past_detections_length: int = 4
    class_aware: bool = True
    duplicate_iou: float = 0.85
    camera_motion: CameraMotionConfig = field(default_factory=CameraMotionConfig)
    spread_weight: float = 0.0

    def __post_init__(self) -> None:
        if not self.spread_weight >= 0:
            raise ValueError(f"track.spread_weight must be >= 0 (0: off), got {self.spread_weight}")
        if not 0.0 < self.duplicate_iou <= 1.0:
            raise ValueError(
                f"track.duplicate_iou must be in (0, 1] (1.0: off), got {self.duplicate_iou}"
            )
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


def iou_distance(
    detection: norfair.Detection, tracked_object: norfair.tracker.TrackedObject
) -> float:
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


class SpreadDetection(norfair.Detection):  # type: ignore[misc]
    """A norfair ``Detection`` that also carries ``noise_distance``: the ``1 - IoU`` its box's
    per-edge spreads alone would cause (:func:`expected_noise_distance`)."""

    def __init__(self, *args: Any, noise_distance: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.noise_distance = float(noise_distance)


def expected_noise_distance(boxes_xyxy: np.ndarray, edge_std_px: np.ndarray) -> np.ndarray:
    """float64 ``(n,)``: the ``1 - IoU`` between a box and itself with its edges moved by their
    spreads, to first order: ``sqrt(2 / pi) * (s_l / w + s_r / w + s_t / h + s_b / h)``.

    An edge off by ``delta`` changes ``1 - IoU`` by about ``|delta| / side`` for small offsets,
    and ``E|delta| = std * sqrt(2 / pi)`` for a normal error. Sides under 1 px count as 1 px.

    Args:
        boxes_xyxy: float ``(n, 4)`` pixels. edge_std_px: float ``(n, 4)`` pixels, l, t, r, b.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    spread = np.nan_to_num(np.asarray(edge_std_px, dtype=np.float64).reshape(-1, 4), nan=0.0)
    w = np.maximum(boxes[:, 2] - boxes[:, 0], 1.0)
    h = np.maximum(boxes[:, 3] - boxes[:, 1], 1.0)
    relative = (spread[:, 0] + spread[:, 2]) / w + (spread[:, 1] + spread[:, 3]) / h
    out: np.ndarray = math.sqrt(2.0 / math.pi) * np.clip(relative, 0.0, None)
    return out


def spread_scaled_distance(
    weight: float,
) -> Callable[[norfair.Detection, norfair.tracker.TrackedObject], float]:
    """A distance ``iou_distance / (1 + weight * noise_distance)`` (``SpreadDetection``); a
    plain ``Detection`` (no spreads) gets the plain ``iou_distance``. Same range, [0, 1]."""

    def distance(
        detection: norfair.Detection, tracked_object: norfair.tracker.TrackedObject
    ) -> float:
        plain = iou_distance(detection, tracked_object)
        noise = getattr(detection, "noise_distance", 0.0)
        return plain / (1.0 + weight * noise)

    return distance


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
    motion: CameraMotion | None = None
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
        # Camera-motion cost, all streams (read by stats() from another thread: plain numbers).
        self._motion_s = 0.0
        self._motion_frames = 0

    def _new_tracker(self) -> norfair.Tracker:
        c = self.config
        return norfair.Tracker(
            distance_function=(
                spread_scaled_distance(c.spread_weight) if c.spread_weight > 0 else iou_distance
            ),
            distance_threshold=c.distance_threshold,
            hit_counter_max=c.hit_counter_max,
            initialization_delay=c.initialization_delay,
            pointwise_hit_counter_max=c.pointwise_hit_counter_max,
            past_detections_length=c.past_detections_length,
        )

    def process(self, item: FramePacket) -> FramePacket:
        state = self._streams.get(item.stream_id)
        if state is None:
            motion = (
                CameraMotion(self.config.camera_motion)
                if self.config.camera_motion.enabled
                else None
            )
            state = _StreamState(tracker=self._new_tracker(), motion=motion)
            self._streams[item.stream_id] = state
        period = 1 if state.last_index is None else max(1, item.index - state.last_index)
        state.last_index = item.index

        dets = item.detections
        transformation = None
        if state.motion is not None:
            started = time.perf_counter()
            transformation = state.motion.update(
                item.image_rgb_u8, dets.boxes_xyxy if dets is not None else None
            )
            self._motion_s += time.perf_counter() - started
            self._motion_frames += 1
        norfair_dets = _to_norfair(dets, self.config) if dets is not None else []
        # norfair iterates the detections when given a transformation: a list, never None, then.
        active = state.tracker.update(
            detections=norfair_dets if transformation is not None else (norfair_dets or None),
            period=period,
            coord_transformations=transformation,
        )
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
                edge_std_px=dets.edge_std_px,
            )
            boxes = dets.boxes_xyxy.tolist()
            for row, track_id in enumerate(track_ids.tolist()):
                if track_id < 0:
                    continue
                seen = state.live.get(track_id)
                if seen is None:
                    class_id = int(dets.class_ids[row])
                    state.live[track_id] = _Seen(class_id, item.index, item.pts_s, boxes[row])
                    self._publish(
                        track_started_event(
                            stream=item.stream_id,
                            frame=item.index,
                            pts_s=item.pts_s,
                            track_id=track_id,
                            class_id=class_id,
                            box_xyxy=boxes[row],
                            class_names=self.class_names,
                        )
                    )
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

    def stats(self) -> dict[str, int | float]:
        """The tracker's own counters for the stage table: with camera motion on, its mean cost
        per frame (``motion_ms_per_frame``) and the frames whose flow failed."""
        if not self.config.camera_motion.enabled:
            return {}
        frames = self._motion_frames
        return {
            "motion_ms_per_frame": round(1000.0 * self._motion_s / frames, 2) if frames else 0.0,
            "motion_frames": frames,
            "motion_failures": sum(
                s.motion.failures for s in list(self._streams.values()) if s.motion
            ),
        }

    def flush(self) -> Iterable[FramePacket]:
        """No packet is held back; every track still alive ends here (``stream_ended``)."""
        for stream_id, state in self._streams.items():
            for track_id in list(state.live):
                self._end(stream_id, state, track_id, "stream_ended")
        return ()

    def teardown(self) -> None:
        self._streams.clear()

    def _end(
        self,
        stream_id: str,
        state: _StreamState,
        track_id: int,
        reason: Literal["lost", "stream_ended"],
    ) -> None:
        seen = state.live.pop(track_id)
        self._publish(
            track_ended_event(
                stream=stream_id,
                frame=state.last_index if state.last_index is not None else seen.frame,
                pts_s=state.last_pts_s,
                track_id=track_id,
                class_id=seen.class_id,
                reason=reason,
                last_seen_frame=seen.frame,
                last_seen_pts_s=seen.pts_s,
                box_xyxy=seen.box_xyxy,
                class_names=self.class_names,
            )
        )


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
        (scores[None, :] == scores[:, None]) & (np.arange(n)[None, :] < np.arange(n)[:, None])
    )
    duplicate: np.ndarray = (other_class & beaten & (iou >= iou_threshold)).any(axis=1)
    return duplicate


def _to_norfair(dets: Detections, config: TrackConfig) -> list[norfair.Detection]:
    """One norfair Detection per row kept (see ``duplicate_iou``), points
    ``[[x1, y1], [x2, y2]]``, ``data`` the row index; a ``SpreadDetection`` when
    ``spread_weight`` is on and the rows have spreads."""
    boxes = dets.boxes_xyxy.astype(np.float64).reshape(-1, 2, 2)
    scores = dets.scores.astype(np.float64)
    labels = dets.class_ids.tolist()
    duplicate = cross_class_duplicates(dets, config.duplicate_iou)
    if config.spread_weight > 0 and dets.edge_std_px is not None:
        noise = expected_noise_distance(dets.boxes_xyxy, dets.edge_std_px).tolist()
        return [
            SpreadDetection(
                points=boxes[i],
                scores=np.array([scores[i], scores[i]]),
                data=i,
                label=labels[i] if config.class_aware else None,
                noise_distance=noise[i],
            )
            for i in range(len(dets))
            if not duplicate[i]
        ]
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
