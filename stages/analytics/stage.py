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

    def __init__(self, config: StreamAnalyticsConfig, class_names: Sequence[str], publish: Publish) -> None:
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
            track_ids, class_ids, anchors = track_ids[finite], class_ids[finite], anchors[finite]
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
            self._publish(line_crossed_event(
                stream=stream, frame=frame, pts_s=pts_s, line=self.lines.lines[line].name,
                direction="in" if crossing.into_right else "out", track_id=int(track_ids[crossing.index]),
                class_id=int(class_ids[crossing.index]), point_xy=crossing.point_xy,
                speed_kmh=self._speed.speed_of(row) if self._speed is not None else None,
                count_in=int(self.lines.count_in[line]), count_out=int(self.lines.count_out[line]),
                class_names=self.class_names,
            ))
        entered, exited = self.zones.update(rows, class_ids, anchors, pts_s)
        self._zone_events(entered, exited, "left", frame, pts_s)
        for visit in self.zones.loiterers(pts_s):
            self._publish(zone_loitering_event(
                stream=self.config.stream_id, frame=frame, pts_s=pts_s,
                zone=self.zones.zones[visit.zone].name, track_id=int(table.track_id[visit.row]),
                class_id=int(table.class_id[visit.row]), dwell_s=visit.dwell_s,
                threshold_s=float(self.zones.zones[visit.zone].loiter_s or 0.0),
                class_names=self.class_names,
            ))
        table.prev_xy[rows] = anchors

        every = self.config.summary_every_s
        if every is not None:
            if self._next_summary_s is None:
                self._next_summary_s = pts_s + every
            elif pts_s >= self._next_summary_s:
                self._publish(self.summary_event(final=False))
                self._next_summary_s = pts_s + every
        return self.overlay()

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
                LineClassCount(class_id=c, label=label_for(c, self.class_names), count_in=n[0], count_out=n[1])
                for c, n in sorted(self.lines.by_class[i].items())
            ]
            totals.append(LineTotals(line=line.name, count_in=int(self.lines.count_in[i]),
                                     count_out=int(self.lines.count_out[i]), by_class=by_class))
        return totals

    def zone_totals(self) -> list[ZoneTotals]:
        totals = []
        z = self.zones
        for i, zone in enumerate(z.zones):
            inside = self._inside_by_class(i)
            classes = sorted(set(z.entered_by_class[i]) | set(inside))
            by_class = [
                ZoneClassCount(class_id=c, label=label_for(c, self.class_names),
                               entered=z.entered_by_class[i].get(c, 0), occupancy=inside.get(c, 0))
                for c in classes
            ]
            totals.append(ZoneTotals(
                zone=zone.name, entered=int(z.entered[i]), exited=int(z.exited[i]),
                loitering=int(z.loitering[i]), occupancy=int(sum(inside.values())),
                max_dwell_s=round(float(z.max_dwell_s[i]), 6), by_class=by_class,
            ))
        return totals

    def summary_event(self, *, final: bool) -> dict[str, Any]:
        return analytics_summary_event(
            stream=self.config.stream_id, frame=max(self._last_frame, 0), pts_s=self._last_pts_s,
            final=final, lines=self.line_totals(), zones=self.zone_totals(),
        )

    def overlay(self) -> AnalyticsOverlay:
        lines = tuple(
            LineOverlay(
                name=t["line"],
                a_xy=(float(self.lines.a_xy[i, 0]), float(self.lines.a_xy[i, 1])),
                b_xy=(float(self.lines.b_xy[i, 0]), float(self.lines.b_xy[i, 1])),
                count_in=t["count_in"], count_out=t["count_out"],
                by_class=tuple((c["label"], c["count_in"], c["count_out"]) for c in t["by_class"]),
            )
            for i, t in enumerate(self.line_totals())
        )
        zones = tuple(
            ZoneOverlay(
                name=zone.name,
                polygon_xy=tuple((float(x), float(y)) for x, y in self._polygons_px[i]),
                occupancy=int(self.zones.occupancy()[i]),
                entered=int(self.zones.entered[i]),
                by_class=tuple((label_for(c, self.class_names), n)
                               for c, n in sorted(self._inside_by_class(i).items())),
            )
            for i, zone in enumerate(self.zones.zones)
        )
        return AnalyticsOverlay(lines=lines, zones=zones)

    # --- internals -------------------------------------------------------------------------

    def _inside_by_class(self, zone: int) -> dict[int, int]:
        inside = self.zones.inside[: len(self._rows.class_id), zone]
        classes, counts = np.unique(self._rows.class_id[: len(inside)][inside], return_counts=True)
        return dict(zip(classes.tolist(), counts.tolist()))

    def _zone_events(self, entered: list[Visit], exited: list[Visit], reason: Any, frame: int,
                     pts_s: float) -> None:
        table = self._rows
        occupancy = self.zones.occupancy()
        for visit in entered:
            self._publish(zone_entered_event(
                stream=self.config.stream_id, frame=frame, pts_s=pts_s,
                zone=self.zones.zones[visit.zone].name, track_id=int(table.track_id[visit.row]),
                class_id=int(table.class_id[visit.row]), occupancy=int(occupancy[visit.zone]),
                class_names=self.class_names,
            ))
        for visit in exited:
            self._publish(zone_exited_event(
                stream=self.config.stream_id, frame=frame, pts_s=pts_s,
                zone=self.zones.zones[visit.zone].name, track_id=int(table.track_id[visit.row]),
                class_id=int(table.class_id[visit.row]), reason=reason, dwell_s=visit.dwell_s,
                occupancy=int(occupancy[visit.zone]), class_names=self.class_names,
            ))

    def _set_size(self, width: int, height: int) -> None:
        scale = np.array([width, height], dtype=np.float64)
        if self.config.coordinates is Coordinates.PIXELS:
            scale = np.ones(2)
        lines = self.config.lines
        self.lines.set_geometry(
            np.array([line.a for line in lines], dtype=np.float64).reshape(-1, 2) * scale,
            np.array([line.b for line in lines], dtype=np.float64).reshape(-1, 2) * scale,
        )
        self._polygons_px = [np.array(zone.polygon, dtype=np.float64) * scale for zone in self.config.zones]
        self.zones.set_geometry(self._polygons_px)
        if self.config.speed is not None:
            points = np.array(self.config.speed.image_points, dtype=np.float64) * scale
            if self._speed is None:
                self._speed = SpeedEstimator(self.config.speed, points)
            else:
                self._speed.set_geometry(points)
        if self._size is not None:
            logger.info("analytics '%s': frame size now %dx%d, geometry rescaled",
                        self.config.stream_id, width, height)
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
            raise ValueError(f"analytics: a stream_id appears twice in {ids}; give one item per stream")
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
                    for c in zone["by_class"]:
                        out[f"{name}.entered.{c['label']}"] = c["entered"]
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
