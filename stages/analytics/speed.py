"""Ground speed of tracks from a four-point ground-plane calibration.

The homography maps image pixels to metres on the road plane, so a car far away (small on the
picture) and one close by get the same speed for the same motion — which a single
metres-per-pixel factor cannot do. Speed is the distance between a track's oldest and newest
ground position within ``window_s`` of stream time, over the time between them: jitter of the
box averages out over the window. Unknown (NaN) until the window holds at least half its length.

Thread: the analytics stage's. Memory: at most one window of positions per live track.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from stages.analytics.config import SpeedConfig
from stages.analytics.geometry import apply_homography, homography_from_points

__all__ = ["SpeedEstimator"]


class SpeedEstimator:
    """km/h per track row, from image anchors and pts."""

    def __init__(self, config: SpeedConfig, image_points_px: np.ndarray) -> None:
        self.config = config
        self.set_geometry(image_points_px)
        self._history: dict[int, deque[tuple[float, float, float]]] = {}
        self.speed_kmh: dict[int, float] = {}

    def set_geometry(self, image_points_px: np.ndarray) -> None:
        """The four calibration points in pixels of the current frame size, float ``(4, 2)``."""
        self._h = homography_from_points(image_points_px, np.array(self.config.world_points_m))

    def update(self, rows: np.ndarray, cur_xy: np.ndarray, pts_s: float) -> None:
        """Record the anchors float ``(T, 2)`` of rows ``(T,)`` at ``pts_s``."""
        if len(rows) == 0:
            return
        ground_m = apply_homography(self._h, cur_xy)
        window = self.config.window_s
        for row, (x, y) in zip(rows.tolist(), ground_m.tolist()):
            history = self._history.setdefault(row, deque())
            history.append((pts_s, x, y))
            while history and pts_s - history[0][0] > window:
                history.popleft()
            t0, x0, y0 = history[0]
            elapsed = pts_s - t0
            if elapsed >= window / 2:
                self.speed_kmh[row] = float(np.hypot(x - x0, y - y0) / elapsed * 3.6)

    def speed_of(self, row: int) -> float | None:
        return self.speed_kmh.get(row)

    def forget(self, row: int) -> None:
        self._history.pop(row, None)
        self.speed_kmh.pop(row, None)
