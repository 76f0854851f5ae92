"""Counting lines: which tracks crossed which directed line this frame, counted once.

A track crosses line A→B when the segment its anchor travelled between two consecutive
observations intersects the line (``geometry.segments_cross_lines``): no speed can jump over
it, and a line a few pixels from the frame's edge works like any other. ``in`` is the crossing
from the left of A→B to its right as seen on the picture; ``out`` the other way.

Counting once: every (track, line) pair has two "armed" flags, one per direction, both set when
the track appears. A crossing counts only if its direction is armed, and a counted crossing
disarms both. A direction re-arms once the track's anchor has been at least
``rearm_distance_px`` from the line on the side that direction starts from. So a box jittering
on the line counts once; a track that really goes back (beyond the distance) and crosses again
counts again.

State is row-indexed (one row per live track, rows recycled, see ``stages.analytics.stage``);
every update is a few numpy calls over all tracks × all lines. Thread: the analytics stage's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stages.analytics.config import LineConfig
from stages.analytics.geometry import ClassFilter, segments_cross_lines

__all__ = ["Crossing", "LineCounter"]


@dataclass(frozen=True)
class Crossing:
    """One counted crossing: ``index`` is the track's position in the update's arrays."""

    index: int
    line: int
    into_right: bool  # True: ``in``
    point_xy: tuple[float, float]


class LineCounter:
    """Crossing counts of ``lines`` (config order) over the tracks of one stream."""

    def __init__(self, lines: Sequence[LineConfig]) -> None:
        self.lines = tuple(lines)
        n = len(self.lines)
        self.a_xy = np.zeros((n, 2))
        self.b_xy = np.zeros((n, 2))
        self._rearm_px = np.array([line.rearm_distance_px for line in self.lines], dtype=np.float64)
        self._classes = ClassFilter([line.classes for line in self.lines])
        self._armed_in = np.ones((0, n), dtype=bool)
        self._armed_out = np.ones((0, n), dtype=bool)
        self.count_in = np.zeros(n, dtype=np.int64)
        self.count_out = np.zeros(n, dtype=np.int64)
        # Per line: class id -> [in, out]. Touched only when something crosses.
        self.by_class: list[dict[int, list[int]]] = [{} for _ in self.lines]

    def set_geometry(self, a_xy: np.ndarray, b_xy: np.ndarray) -> None:
        """The lines' ends in pixels of the current frame size, float ``(L, 2)`` each."""
        self.a_xy, self.b_xy = np.asarray(a_xy, np.float64), np.asarray(b_xy, np.float64)

    def grow(self, rows: int) -> None:
        """Room for ``rows`` rows (new rows armed)."""
        extra = rows - len(self._armed_in)
        if extra > 0:
            fill = np.ones((extra, len(self.lines)), dtype=bool)
            self._armed_in = np.concatenate([self._armed_in, fill])
            self._armed_out = np.concatenate([self._armed_out, fill.copy()])

    def reset(self, rows: np.ndarray) -> None:
        """Rows handed to new tracks: armed again."""
        self._armed_in[rows] = True
        self._armed_out[rows] = True

    def update(
        self, rows: np.ndarray, class_ids: np.ndarray, prev_xy: np.ndarray, cur_xy: np.ndarray
    ) -> list[Crossing]:
        """Count this frame's crossings.

        Args:
            rows: int ``(T,)``, each observed track's row.
            class_ids: int ``(T,)``.
            prev_xy: float ``(T, 2)``, the anchor at each track's previous observation (NaN for
                a track seen for the first time: it cannot have crossed).
            cur_xy: float ``(T, 2)``, the anchor now.

        Returns:
            The counted crossings, by track then line.
        """
        if not self.lines or len(rows) == 0:
            return []
        crossed, into_right, point_xy, side1 = segments_cross_lines(
            prev_xy, cur_xy, self.a_xy, self.b_xy
        )
        if not self._classes.trivial:
            crossed &= self._classes.mask(class_ids)
        armed_in = self._armed_in[rows]
        armed_out = self._armed_out[rows]
        counted = crossed & np.where(into_right, armed_in, armed_out)
        if counted.any():
            armed_in &= ~counted
            armed_out &= ~counted
        # Re-arming only matters where a direction is disarmed (after a crossing): few pairs.
        t_idx, l_idx = np.nonzero(~(armed_in & armed_out))
        if len(t_idx):
            side = side1[t_idx, l_idx]
            far = np.abs(side) >= self._rearm_px[l_idx]
            armed_out[t_idx, l_idx] |= far & (side > 0)  # well on the right: it may now go out
            armed_in[t_idx, l_idx] |= far & (side < 0)
            self._armed_in[rows] = armed_in
            self._armed_out[rows] = armed_out

        found = []
        for index, line in zip(*np.nonzero(counted)):
            into = bool(into_right[index, line])
            (self.count_in if into else self.count_out)[line] += 1
            per_class = self.by_class[line].setdefault(int(class_ids[index]), [0, 0])
            per_class[0 if into else 1] += 1
            x, y = point_xy[index, line]
            found.append(Crossing(int(index), int(line), into, (float(x), float(y))))
        return found
