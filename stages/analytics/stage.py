"""The camera analytics stage: line crossings, zones, dwell, loitering and speed per stream.

Input: ``FramePacket`` s whose detections carry track ids (it runs after the tracker), and the
tracker's ``track_ended`` events from the pipeline's event channel (``on_event``, delivered in
this stage's thread before the frame they happened on). Output: the same packet with
``analytics`` set to an ``AnalyticsOverlay`` for the annotated video; events (``line_crossed``,
``zone_entered``, ``zone_exited``, ``zone_loitering``, ``analytics_summary``) published,
complete, on the channel. Streams without an ``analytics`` item pass through untouched.

Only confirmed tracks count (track id >= 0). Each track's anchor point (bottom-centre by
default) is compared with its previous observation: see ``lines`` and ``zones`` for the rules.
Points given as fractions of the frame are turned into pixels on the stream's first frame and
again whenever its size changes (a camera reconnecting at another resolution).

Thread: the analytics stage's own; ``stats()`` (the totals for the run's table and
``--stats``) may be called from any thread, under the stage's lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.stage import StageBase
from stages.analytics.config import Anchor, Coordinates, StreamAnalyticsConfig
from stages.analytics.lines import LineCounter
from stages.analytics.overlay import AnalyticsOverlay, LineOverlay, ZoneOverlay
from stages.analytics.speed import SpeedEstimator
from stages.analytics.zones import Visit, ZoneMonitor
from stages.events import (
    LineClassCount,
    LineTotals,
    ZoneClassCount,
    ZoneTotals,
    analytics_summary_event,
    label_for,
    line_crossed_event,
    zone_entered_event,
    zone_exited_event,
    zone_loitering_event,
)
from stages.frame import FramePacket

__all__ = ["AnalyticsStage", "StreamAnalytics", "anchor_points"]

logger = logging.getLogger(__name__)

Publish = Callable[[dict[str, Any]], None]


def anchor_points(boxes_xyxy: np.ndarray, anchor: Anchor) -> np.ndarray:
    """The anchor of each box: float ``(n, 4)`` xyxy pixels → float64 ``(n, 2)`` pixels."""
    boxes = boxes_xyxy.astype(np.float64)
    x = (boxes[:, 0] + boxes[:, 2]) / 2
    if anchor is Anchor.BOTTOM_CENTER:
        y = boxes[:, 3]
    elif anchor is Anchor.TOP_CENTER:
        y = boxes[:, 1]
    else:
        y = (boxes[:, 1] + boxes[:, 3]) / 2
    return np.stack([x, y], axis=1)


class _Rows:
    """Track id → row of the state arrays; rows of ended tracks are reused."""

    def __init__(self) -> None:
        self.row_of: dict[int, int] = {}
        self.free: list[int] = []
        self.capacity = 0
        self.prev_xy = np.zeros((0, 2))
        self.track_id = np.zeros(0, dtype=np.int64)
        self.class_id = np.zeros(0, dtype=np.int64)

    def lookup(self, track_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``track_ids`` (new ones allocated) and which of them are new."""
        rows = np.empty(len(track_ids), dtype=np.int64)
        new = np.zeros(len(track_ids), dtype=bool)
        for i, track_id in enumerate(track_ids):
            row = self.row_of.get(track_id)
            if row is None:
                row = self.free.pop() if self.free else self._append()
                self.row_of[track_id] = row
                self.prev_xy[row] = np.nan
                self.track_id[row] = track_id
                new[i] = True
            rows[i] = row
        return rows, new

    def _append(self) -> int:
        row = self.capacity
        if row >= len(self.prev_xy):
            size = max(64, 2 * len(self.prev_xy))
            self.prev_xy = np.resize(self.prev_xy, (size, 2))
            self.track_id = np.resize(self.track_id, size)
            self.class_id = np.resize(self.class_id, size)
        self.capacity += 1
        return row

    def release(self, track_id: int) -> int | None:
        row = self.row_of.pop(track_id, None)
        if row is not None:
            self.free.append(row)
        return row


class StreamAnalytics:
    """Lines, zones and speeds of one stream; events go to ``publish``."""

    def __init__(
        self, config: StreamAnalyticsConfig, class_names: Sequence[str], publish: Publish
    ) -> None:
        self.config = config
        self.class_names = tuple(class_names)
        self._publish = publish
        self.lines = LineCounter(config.lines)
        self.zones = ZoneMonitor(config.zones)
        self._rows = _Rows()
        self._speed: SpeedEstimator | None = None
        self._size: tuple[int, int] | None = None
        self._last_frame = -1
        self._last_pts_s = 0.0
        self._next_summary_s: float | None = None
        # The overlay changes only with an event (or a new frame size): most frames reuse it,
        # and only the lines and zones an event touched are redrawn in it.
        self._overlay: AnalyticsOverlay | None = None
        self._dirty_lines: set[int] = set()
        self._dirty_zones: set[int] = set()

    # --- per frame -------------------------------------------------------------------------

    def update(self, packet: FramePacket) -> AnalyticsOverlay:
        if self._size != (packet.width, packet.height):
            self._set_size(packet.width, packet.height)
        stream, frame, pts_s = packet.stream_id, packet.index, packet.pts_s
        self._last_frame, self._last_pts_s = frame, pts_s
        det = packet.detections
        if det is not None and len(det) > 0:
            tracked = np.flatnonzero(det.track_ids >= 0)
            track_ids = det.track_ids[tracked]
            class_ids = det.class_ids[tracked]
            anchors = anchor_points(det.boxes_xyxy[tracked], self.config.anchor)
            finite = np.isfinite(anchors).all(axis=1)
            if not finite.all():  # a broken box locates nothing
                track_ids, class_ids, anchors = (
                    track_ids[finite],
                    class_ids[finite],
                    anchors[finite],
                )
        else:
            track_ids = np.zeros(0, dtype=np.int64)
            class_ids = np.zeros(0, dtype=np.int64)
            anchors = np.zeros((0, 2))

        table = self._rows
        rows, new = table.lookup(track_ids.tolist())
        self.lines.grow(len(table.prev_xy))
        self.zones.grow(len(table.prev_xy))
        if new.any():
            self.lines.reset(rows[new])
        table.class_id[rows] = class_ids
        prev_xy = table.prev_xy[rows]

        if self._speed is not None:
            self._speed.update(rows, anchors, pts_s)
        for crossing in self.lines.update(rows, class_ids, prev_xy, anchors):
            row = int(rows[crossing.index])
            line = crossing.line
            self._dirty_lines.add(line)
            self._publish(
                line_crossed_event(
                    stream=stream,
                    frame=frame,
                    pts_s=pts_s,
                    line=self.lines.lines[line].name,
                    direction="in" if crossing.into_right else "out",
                    track_id=int(track_ids[crossing.index]),
                    class_id=int(class_ids[crossing.index]),
                    point_xy=crossing.point_xy,
                    speed_kmh=self._speed.speed_of(row) if self._speed is not None else None,
                    count_in=int(self.lines.count_in[line]),
                    count_out=int(self.lines.count_out[line]),
                    class_names=self.class_names,
                )
            )
        entered, exited = self.zones.update(rows, class_ids, anchors, pts_s)
        self._zone_events(entered, exited, "left", frame, pts_s)
        for visit in self.zones.loiterers(pts_s):
            self._publish(
                zone_loitering_event(
                    stream=self.config.stream_id,
                    frame=frame,
                    pts_s=pts_s,
                    zone=self.zones.zones[visit.zone].name,
                    track_id=int(table.track_id[visit.row]),
                    class_id=int(table.class_id[visit.row]),
                    dwell_s=visit.dwell_s,
                    threshold_s=float(self.zones.zones[visit.zone].loiter_s or 0.0),
                    class_names=self.class_names,
                )
            )
        table.prev_xy[rows] = anchors

        every = self.config.summary_every_s
        if every is not None:
            if self._next_summary_s is None:
                self._next_summary_s = pts_s + every
            elif pts_s >= self._next_summary_s:
                self._publish(self.summary_event(final=False))
                self._next_summary_s = pts_s + every
        if self._overlay is None:
            self._overlay = self.overlay()
        elif self._dirty_lines or self._dirty_zones:
            lines, zones = list(self._overlay.lines), list(self._overlay.zones)
            for i in self._dirty_lines:
                lines[i] = self._line_overlay(i)
            if self._dirty_zones:
                by_class = self._occupancy_by_class()
                occupancy = self.zones.occupancy()
                for i in self._dirty_zones:
                    zones[i] = self._zone_overlay(i, int(occupancy[i]), by_class[i])
            self._overlay = AnalyticsOverlay(lines=tuple(lines), zones=tuple(zones))
        self._dirty_lines.clear()
        self._dirty_zones.clear()
        return self._overlay

    def end_track(self, track_id: int, frame: int, pts_s: float) -> None:
        """The tracker dropped ``track_id`` on ``frame``: it leaves its zones, its row is freed."""
        row = self._rows.release(track_id)
        if row is None:
            return
        visits = self.zones.end_rows(np.array([row]))
        self._zone_events([], visits, "track_ended", frame, pts_s)
        if self._speed is not None:
            self._speed.forget(row)

    # --- totals ----------------------------------------------------------------------------

    def line_totals(self) -> list[LineTotals]:
        totals = []
        for i, line in enumerate(self.lines.lines):
            by_class = [
                LineClassCount(
                    class_id=c, label=label_for(c, self.class_names), count_in=n[0], count_out=n[1]
                )
                for c, n in sorted(self.lines.by_class[i].items())
            ]
            totals.append(
                LineTotals(
                    line=line.name,
                    count_in=int(self.lines.count_in[i]),
                    count_out=int(self.lines.count_out[i]),
                    by_class=by_class,
                )
            )
        return totals

    def zone_totals(self) -> list[ZoneTotals]:
        totals = []
        z = self.zones
        occupancy_by_class = self._occupancy_by_class()
        for i, zone in enumerate(z.zones):
            inside = occupancy_by_class[i]
            classes = sorted(set(z.entered_by_class[i]) | set(inside))
            by_class = [
                ZoneClassCount(
                    class_id=c,
                    label=label_for(c, self.class_names),
                    entered=z.entered_by_class[i].get(c, 0),
                    occupancy=inside.get(c, 0),
                )
                for c in classes
            ]
            totals.append(
                ZoneTotals(
                    zone=zone.name,
                    entered=int(z.entered[i]),
                    exited=int(z.exited[i]),
                    loitering=int(z.loitering[i]),
                    occupancy=int(sum(inside.values())),
                    max_dwell_s=round(float(z.max_dwell_s[i]), 6),
                    by_class=by_class,
                )
            )
        return totals

    def summary_event(self, *, final: bool) -> dict[str, Any]:
        return analytics_summary_event(
            stream=self.config.stream_id,
            frame=max(self._last_frame, 0),
            pts_s=self._last_pts_s,
            final=final,
            lines=self.line_totals(),
            zones=self.zone_totals(),
        )

    def overlay(self) -> AnalyticsOverlay:
        """The whole overlay, built afresh."""
        occupancy = self.zones.occupancy()
        by_class = self._occupancy_by_class()
        return AnalyticsOverlay(
            lines=tuple(self._line_overlay(i) for i in range(len(self.lines.lines))),
            zones=tuple(
                self._zone_overlay(i, int(occupancy[i]), by_class[i])
                for i in range(len(self.zones.zones))
            ),
        )

    def _line_overlay(self, i: int) -> LineOverlay:
        lines = self.lines
        return LineOverlay(
            name=lines.lines[i].name,
            a_xy=(float(lines.a_xy[i, 0]), float(lines.a_xy[i, 1])),
            b_xy=(float(lines.b_xy[i, 0]), float(lines.b_xy[i, 1])),
            count_in=int(lines.count_in[i]),
            count_out=int(lines.count_out[i]),
            by_class=tuple(
                (label_for(c, self.class_names), n[0], n[1])
                for c, n in sorted(lines.by_class[i].items())
            ),
        )

    def _zone_overlay(self, i: int, occupancy: int, inside_by_class: dict[int, int]) -> ZoneOverlay:
        return ZoneOverlay(
            name=self.zones.zones[i].name,
            polygon_xy=self._polygon_tuples[i],
            occupancy=occupancy,
            entered=int(self.zones.entered[i]),
            by_class=tuple(
                (label_for(c, self.class_names), n) for c, n in sorted(inside_by_class.items())
            ),
        )

    # --- internals -------------------------------------------------------------------------

    def _inside_by_class(self, zone: int) -> dict[int, int]:
        return self._occupancy_by_class()[zone]

    def _occupancy_by_class(self) -> list[dict[int, int]]:
        """Per zone: class id -> tracks inside now (one bincount for every zone and class)."""
        rows, zones = np.nonzero(self.zones.inside)
        n_zones = len(self.zones.zones)
        if len(rows) == 0:
            return [{} for _ in range(n_zones)]
        classes = self._rows.class_id[rows]
        n_classes = int(classes.max()) + 1
        counts = np.bincount(zones * n_classes + classes, minlength=n_zones * n_classes)
        table = counts.reshape(n_zones, n_classes).tolist()
        return [{c: n for c, n in enumerate(row) if n} for row in table]

    def _zone_events(
        self, entered: list[Visit], exited: list[Visit], reason: Any, frame: int, pts_s: float
    ) -> None:
        if not entered and not exited:
            return
        self._dirty_zones.update(v.zone for v in entered)
        self._dirty_zones.update(v.zone for v in exited)
        table = self._rows
        occupancy = self.zones.occupancy()
        for visit in entered:
            self._publish(
                zone_entered_event(
                    stream=self.config.stream_id,
                    frame=frame,
                    pts_s=pts_s,
                    zone=self.zones.zones[visit.zone].name,
                    track_id=int(table.track_id[visit.row]),
                    class_id=int(table.class_id[visit.row]),
                    occupancy=int(occupancy[visit.zone]),
                    class_names=self.class_names,
                )
            )
        for visit in exited:
            self._publish(
                zone_exited_event(
                    stream=self.config.stream_id,
                    frame=frame,
                    pts_s=pts_s,
                    zone=self.zones.zones[visit.zone].name,
                    track_id=int(table.track_id[visit.row]),
                    class_id=int(table.class_id[visit.row]),
                    reason=reason,
                    dwell_s=visit.dwell_s,
                    occupancy=int(occupancy[visit.zone]),
                    class_names=self.class_names,
                )
            )

    def _set_size(self, width: int, height: int) -> None:
        scale = np.array([width, height], dtype=np.float64)
        if self.config.coordinates is Coordinates.PIXELS:
            scale = np.ones(2)
        lines = self.config.lines
        self.lines.set_geometry(
            np.array([line.a for line in lines], dtype=np.float64).reshape(-1, 2) * scale,
            np.array([line.b for line in lines], dtype=np.float64).reshape(-1, 2) * scale,
        )
        self._overlay = None
        self._polygons_px = [
            np.array(zone.polygon, dtype=np.float64) * scale for zone in self.config.zones
        ]
        self._polygon_tuples = [
            tuple((float(x), float(y)) for x, y in p) for p in self._polygons_px
        ]
        self.zones.set_geometry(self._polygons_px)
        if self.config.speed is not None:
            points = np.array(self.config.speed.image_points, dtype=np.float64) * scale
            if self._speed is None:
                self._speed = SpeedEstimator(self.config.speed, points)
            else:
                self._speed.set_geometry(points)
        if self._size is not None:
            logger.info(
                "analytics '%s': frame size now %dx%d, geometry rescaled",
                self.config.stream_id,
                width,
                height,
            )
        self._size = (width, height)


class AnalyticsStage(StageBase[FramePacket]):
    """Processor[FramePacket, FramePacket] and event subscriber: the analytics of every stream
    that has a config item.

    Args:
        configs: one per stream (distinct ``stream_id`` s).
        class_names: index = class id, for the events' ``label``.
        publish: where events go (``EventChannel.publish``).
    """

    def __init__(
        self, configs: Sequence[StreamAnalyticsConfig], class_names: Sequence[str], publish: Publish
    ) -> None:
        self.name = "analytics"
        ids = [c.stream_id for c in configs]
        if len(set(ids)) != len(ids):
            raise ValueError(
                f"analytics: a stream_id appears twice in {ids}; give one item per stream"
            )
        self._publish = publish
        self._streams = {c.stream_id: StreamAnalytics(c, class_names, publish) for c in configs}
        self._final: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()  # stats() from other threads

    def process(self, item: FramePacket) -> FramePacket:
        state = self._streams.get(item.stream_id)
        if state is not None:
            with self._lock:
                item.analytics = state.update(item)
        return item

    def stats(self) -> dict[str, int | float]:
        """Totals now, flat for the run's table and ``--stats``: ``LINE.in``, ``LINE.in.LABEL``,
        ``ZONE.entered``, ``ZONE.entered.LABEL``, ``ZONE.inside``, ``ZONE.loitering``,
        ``ZONE.max_dwell_s``; prefixed ``STREAM:`` when several streams have analytics."""
        out: dict[str, int | float] = {}
        with self._lock:
            for stream_id, state in self._streams.items():
                prefix = f"{stream_id}:" if len(self._streams) > 1 else ""
                for line in state.line_totals():
                    name = prefix + line["line"]
                    out[f"{name}.in"] = line["count_in"]
                    out[f"{name}.out"] = line["count_out"]
                    for c in line["by_class"]:
                        out[f"{name}.in.{c['label']}"] = c["count_in"]
                        out[f"{name}.out.{c['label']}"] = c["count_out"]
                for zone in state.zone_totals():
                    name = prefix + zone["zone"]
                    out[f"{name}.entered"] = zone["entered"]
                    out[f"{name}.inside"] = zone["occupancy"]
                    out[f"{name}.loitering"] = zone["loitering"]
                    out[f"{name}.max_dwell_s"] = zone["max_dwell_s"]
                    for zc in zone["by_class"]:
                        out[f"{name}.entered.{zc['label']}"] = zc["entered"]
        return out

    def on_event(self, event: Mapping[str, Any]) -> None:
        if event.get("type") != "track_ended":
            return
        state = self._streams.get(str(event.get("stream")))
        if state is not None:
            with self._lock:
                state.end_track(int(event["track_id"]), int(event["frame"]), float(event["pts_s"]))

    def flush(self) -> Iterable[FramePacket]:
        """No packet held back; the final ``analytics_summary`` of every stream."""
        for stream_id, state in self._streams.items():
            with self._lock:
                summary = state.summary_event(final=True)
            self._final[stream_id] = summary
            self._publish(summary)
        return ()

    def totals(self) -> dict[str, dict[str, Any]]:
        """The final summary of each stream (after the run; empty before its end)."""
        return dict(self._final)
