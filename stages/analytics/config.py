"""The ``analytics`` section of a run's config: lines, zones and speed, per stream.

Each item describes one stream (``stream_id``): its counting lines (directed A→B), its zones
(polygons) and, optionally, a ground-plane calibration for speeds. Points are pixels of the
displayed frame, or fractions of its width and height with ``coordinates: normalized`` (the
same config then fits every resolution a camera may switch to).

Validated at load: a zero-length line, a polygon with fewer than three corners, one that
crosses itself or has no area, a point outside [0, 1] in normalised mode, a name used twice;
each refused with one line naming the key.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stages.analytics.geometry import homography_from_points, polygon_self_intersects

__all__ = [
    "Anchor",
    "Coordinates",
    "LineConfig",
    "SpeedConfig",
    "StreamAnalyticsConfig",
    "ZoneConfig",
]


class Coordinates(enum.Enum):
    """What the numbers of lines, zones and speed points mean."""

    PIXELS = "pixels"  # pixels of the displayed frame
    NORMALIZED = "normalized"  # x / width, y / height, each in [0, 1]


class Anchor(enum.Enum):
    """The point of a box that stands for the object. Bottom-centre is where a car or a person
    touches the ground, so it is what crosses a line painted on the road."""

    BOTTOM_CENTER = "bottom_center"
    CENTER = "center"
    TOP_CENTER = "top_center"


def _point(value: Sequence[float], key: str) -> tuple[float, float]:
    if len(value) != 2 or not all(math.isfinite(v) for v in value):
        raise ValueError(f"{key}: a point is [x, y] (two finite numbers), got {list(value)}")
    return (float(value[0]), float(value[1]))


def _classes(value: tuple[int, ...] | None, key: str) -> None:
    if value is not None and (not value or any(c < 0 for c in value)):
        raise ValueError(
            f"{key}: a list of class ids >= 0, or null for every class; got {list(value)}"
        )


@dataclass(frozen=True)
class LineConfig:
    """A counting line.

    Attributes:
        name: how events and totals name it (unique within the stream).
        a, b: its ends ``[x, y]``; the direction A→B defines ``in``: crossing from its left
            to its right as seen on the picture.
        classes: class ids counted (null: every class).
        rearm_distance_px: after a crossing, a track counts again on this line only once it
            has been this far (pixels) from it on the side it must come from, so a box
            jittering on the line counts once; 0 counts every crossing.
    """

    name: str
    a: tuple[float, ...]
    b: tuple[float, ...]
    classes: tuple[int, ...] | None = None
    rearm_distance_px: float = 20.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: every line needs a name")
        a, b = _point(self.a, "a"), _point(self.b, "b")
        if a == b:
            raise ValueError(
                f"b: line '{self.name}' has zero length (a == b == {list(a)}); give two different ends"
            )
        _classes(self.classes, "classes")
        if not self.rearm_distance_px >= 0:
            raise ValueError(
                f"rearm_distance_px: must be >= 0 pixels, got {self.rearm_distance_px}"
            )


@dataclass(frozen=True)
class ZoneConfig:
    """A zone: a polygon whose visitors are counted and timed.

    Attributes:
        name: how events and totals name it (unique within the stream).
        polygon: its corners ``[[x, y], ...]`` in order (at least three; closed implicitly).
        classes: class ids watched (null: every class).
        loiter_s: a ``zone_loitering`` event when a track has been inside this long (stream
            time); null: never.
    """

    name: str
    polygon: tuple[tuple[float, ...], ...]
    classes: tuple[int, ...] | None = None
    loiter_s: float | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: every zone needs a name")
        if len(self.polygon) < 3:
            raise ValueError(
                f"polygon: zone '{self.name}' needs at least 3 corners, got {len(self.polygon)}"
            )
        corners = np.array([_point(p, f"polygon[{i}]") for i, p in enumerate(self.polygon)])
        x, y = corners[:, 0], corners[:, 1]
        area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
        if polygon_self_intersects(corners):
            raise ValueError(
                f"polygon: zone '{self.name}' crosses itself; list its corners in order around it"
            )
        if area == 0:
            raise ValueError(
                f"polygon: zone '{self.name}' has no area (its corners are on one line)"
            )
        _classes(self.classes, "classes")
        if self.loiter_s is not None and not self.loiter_s > 0:
            raise ValueError(f"loiter_s: must be > 0 seconds or null, got {self.loiter_s}")


@dataclass(frozen=True)
class SpeedConfig:
    """A ground-plane calibration for speeds (perspective-correct, unlike a metres-per-pixel
    factor): four image points and where they are on the ground, in metres.

    Attributes:
        image_points: four ``[x, y]`` on the road in the picture (e.g. lane-marking corners).
        world_points_m: the same four points on the ground, ``[x, y]`` metres in any flat frame.
        window_s: speed is the distance travelled over this much stream time, smoothing jitter.
    """

    image_points: tuple[tuple[float, ...], ...]
    world_points_m: tuple[tuple[float, ...], ...]
    window_s: float = 1.0

    def __post_init__(self) -> None:
        for key in ("image_points", "world_points_m"):
            points = getattr(self, key)
            if len(points) != 4:
                raise ValueError(f"{key}: exactly 4 points, got {len(points)}")
            for i, p in enumerate(points):
                _point(p, f"{key}[{i}]")
        try:
            homography_from_points(np.array(self.image_points), np.array(self.world_points_m))
        except ValueError as exc:
            raise ValueError(f"image_points: {exc}") from None
        if not self.window_s > 0:
            raise ValueError(f"window_s: must be > 0 seconds, got {self.window_s}")


@dataclass(frozen=True)
class StreamAnalyticsConfig:
    """The analytics of one stream.

    Attributes:
        stream_id: the source it applies to.
        coordinates: pixels, or normalised to the frame (see ``Coordinates``).
        anchor: the point of each box that crosses lines and stands in zones.
        lines: counting lines.
        zones: zones.
        speed: ground-plane calibration; null: no speeds.
        summary_every_s: an ``analytics_summary`` every this much stream time (null: only the
            final one at the end of the stream).
    """

    stream_id: str = "0"
    coordinates: Coordinates = Coordinates.PIXELS
    anchor: Anchor = Anchor.BOTTOM_CENTER
    lines: tuple[LineConfig, ...] = ()
    zones: tuple[ZoneConfig, ...] = ()
    speed: SpeedConfig | None = None
    summary_every_s: float | None = None

    def __post_init__(self) -> None:
        if not self.stream_id:
            raise ValueError("stream_id: name the source these lines and zones belong to")
        seen: dict[str, str] = {}
        names = [(f"lines[{i}].name", line.name) for i, line in enumerate(self.lines)]
        names += [(f"zones[{i}].name", zone.name) for i, zone in enumerate(self.zones)]
        for key, name in names:
            if name in seen:
                raise ValueError(f"{key}: '{name}' is already used by {seen[name]}")
            seen[name] = key
        if self.coordinates is Coordinates.NORMALIZED:
            for key, point in self._points():
                if not all(0.0 <= v <= 1.0 for v in point):
                    raise ValueError(
                        f"{key}: {list(point)} is outside [0, 1] (coordinates: normalized); "
                        "give fractions of the frame's width and height, or coordinates: pixels"
                    )
        if self.summary_every_s is not None and not self.summary_every_s > 0:
            raise ValueError(
                f"summary_every_s: must be > 0 seconds or null, got {self.summary_every_s}"
            )

    def _points(self) -> list[tuple[str, tuple[float, ...]]]:
        points: list[tuple[str, tuple[float, ...]]] = []
        for i, line in enumerate(self.lines):
            points += [(f"lines[{i}].a", line.a), (f"lines[{i}].b", line.b)]
        for i, zone in enumerate(self.zones):
            points += [(f"zones[{i}].polygon[{j}]", p) for j, p in enumerate(zone.polygon)]
        if self.speed is not None:
            points += [
                (f"speed.image_points[{j}]", p) for j, p in enumerate(self.speed.image_points)
            ]
        return points
