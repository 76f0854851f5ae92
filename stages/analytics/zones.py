"""Zones: who is inside which polygon, since when, and who has stayed too long.

A confirmed track is inside a zone when its anchor point is inside the polygon (even-odd rule,
``geometry.points_in_polygons``) and its class is one the zone watches. Entering and leaving
are judged at each observation; a track the tracker drops while inside leaves then
(``track_ended``), not when it was last seen, but its dwell is measured to its last observation
inside. Dwell is stream time (``pts_s``), so a variable frame rate or frames dropped by a live
pipeline do not bend it; it is right to one frame interval. A track counts in the occupancy
until it leaves or the tracker drops it (an occluded object is still there).

State is row-indexed like ``stages.analytics.lines``; each update is a few numpy calls over all
tracks × all zones. Thread: the analytics stage's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stages.analytics.config import ZoneConfig
from stages.analytics.geometry import ClassFilter, points_in_polygons

__all__ = ["Visit", "ZoneMonitor"]


@dataclass(frozen=True)
class Visit:
    """A change for one (track row, zone): entered, exited (with its dwell) or loitering.
    ``row`` is the track's row in the stage's table."""

    row: int
    zone: int
    dwell_s: float


class ZoneMonitor:
    """Occupancy, dwell and loitering of ``zones`` (config order) over one stream's tracks."""

    def __init__(self, zones: Sequence[ZoneConfig]) -> None:
        self.zones = tuple(zones)
        n = len(self.zones)
        self.vertices_xy = np.zeros((n, 3, 2))
        self._next_xy = self.vertices_xy
        self._classes = ClassFilter([z.classes for z in self.zones])
        self._loiter_s = np.array(
            [np.inf if z.loiter_s is None else z.loiter_s for z in self.zones]
        )
        self.inside = np.zeros((0, n), dtype=bool)
        self._enter_pts = np.zeros((0, n))
        self._last_pts = np.zeros((0, n))
        self._loitered = np.zeros((0, n), dtype=bool)
        self.entered = np.zeros(n, dtype=np.int64)
        self.exited = np.zeros(n, dtype=np.int64)
        self.loitering = np.zeros(n, dtype=np.int64)
        self.max_dwell_s = np.zeros(n)
        self.entered_by_class: list[dict[int, int]] = [{} for _ in self.zones]

    def set_geometry(self, polygons_xy: Sequence[np.ndarray]) -> None:
        """The polygons in pixels of the current frame size, each float ``(V_i, 2)``."""
        if not polygons_xy:
            return
        most = max(len(p) for p in polygons_xy)
        padded = [
            np.concatenate([p, np.repeat(p[-1:], most - len(p), axis=0)]) for p in polygons_xy
        ]
        self.vertices_xy = np.stack(padded).astype(np.float64)
        self._next_xy = np.roll(self.vertices_xy, -1, axis=1)

    def grow(self, rows: int) -> None:
        extra = rows - len(self.inside)
        if extra > 0:
            n = len(self.zones)
            self.inside = np.concatenate([self.inside, np.zeros((extra, n), dtype=bool)])
            self._enter_pts = np.concatenate([self._enter_pts, np.zeros((extra, n))])
            self._last_pts = np.concatenate([self._last_pts, np.zeros((extra, n))])
            self._loitered = np.concatenate([self._loitered, np.zeros((extra, n), dtype=bool)])

    def update(
        self, rows: np.ndarray, class_ids: np.ndarray, cur_xy: np.ndarray, pts_s: float
    ) -> tuple[list[Visit], list[Visit]]:
        """Entries and exits of the tracks observed this frame (rows ``(T,)``, class ids
        ``(T,)``, anchors float ``(T, 2)``) at stream time ``pts_s``."""
        if not self.zones or len(rows) == 0:
            return [], []
        now_in = points_in_polygons(cur_xy, self.vertices_xy, self._next_xy)
        if not self._classes.trivial:
            now_in &= self._classes.mask(class_ids)
        was_in = self.inside[rows]
        # Only pairs whose state changed are touched (few in any frame), and every pair inside
        # gets its last-seen time.
        t_idx, z_idx = np.nonzero(now_in != was_in)
        ins: list[Visit] = []
        outs: list[Visit] = []
        if len(t_idx):
            r_idx = rows[t_idx]
            entering = now_in[t_idx, z_idx]
            er, ez, et = r_idx[entering], z_idx[entering], t_idx[entering]
            xr, xz = r_idx[~entering], z_idx[~entering]
            self._enter_pts[er, ez] = pts_s
            dwell = (self._last_pts[xr, xz] - self._enter_pts[xr, xz]).tolist()
            self._loitered[xr, xz] = False
            self.inside[r_idx, z_idx] = entering
            for row, zone, index in zip(er.tolist(), ez.tolist(), et.tolist()):
                self.entered[zone] += 1
                by_class = self.entered_by_class[zone]
                class_id = int(class_ids[index])
                by_class[class_id] = by_class.get(class_id, 0) + 1
                ins.append(Visit(row, zone, 0.0))
            outs = [
                self._exit(row, zone, d) for row, zone, d in zip(xr.tolist(), xz.tolist(), dwell)
            ]
        in_t, in_z = np.nonzero(now_in)
        self._last_pts[rows[in_t], in_z] = pts_s
        return ins, outs

    def loiterers(self, pts_s: float) -> list[Visit]:
        """Rows inside a zone for at least its ``loiter_s`` by now, not yet reported this visit."""
        if not self.zones:
            return []
        dwell = pts_s - self._enter_pts
        due = self.inside & ~self._loitered & (dwell >= self._loiter_s[None, :])
        found = []
        for row, zone in zip(*np.nonzero(due)):
            self._loitered[row, zone] = True
            self.loitering[zone] += 1
            found.append(Visit(int(row), int(zone), float(dwell[row, zone])))
        return found

    def end_rows(self, rows: np.ndarray) -> list[Visit]:
        """The tracker dropped these rows' tracks: they leave every zone they were in."""
        visits = []
        for row, zone in zip(*np.nonzero(self.inside[rows])):
            r = int(rows[row])
            dwell = float(self._last_pts[r, zone] - self._enter_pts[r, zone])
            visits.append(self._exit(r, int(zone), dwell))
        self.inside[rows] = False
        self._loitered[rows] = False
        return visits

    def occupancy(self) -> np.ndarray:
        """int ``(Z,)``: tracks inside each zone now."""
        return np.count_nonzero(self.inside, axis=0)

    def _exit(self, row: int, zone: int, dwell_s: float) -> Visit:
        self.exited[zone] += 1
        self.max_dwell_s[zone] = max(self.max_dwell_s[zone], dwell_s)
        return Visit(row, zone, dwell_s)
