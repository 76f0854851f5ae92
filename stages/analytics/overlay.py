"""What the annotated video shows of the analytics: a read-only snapshot per frame.

The analytics stage puts one on ``FramePacket.analytics``; ``stages.annotate`` draws it. All
coordinates are pixels of that frame. Immutable, so every sink may read the same one.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AnalyticsOverlay", "LineOverlay", "ZoneOverlay"]


@dataclass(frozen=True)
class LineOverlay:
    """A line, its ``in`` direction (A→B's right-hand side on the picture) and its counts."""

    name: str
    a_xy: tuple[float, float]
    b_xy: tuple[float, float]
    count_in: int
    count_out: int
    # (label, in, out) per class that crossed, by class id.
    by_class: tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class ZoneOverlay:
    """A zone's polygon and who is in it."""

    name: str
    polygon_xy: tuple[tuple[float, float], ...]
    occupancy: int
    entered: int
    # (label, tracks inside now) per class inside, by class id.
    by_class: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class AnalyticsOverlay:
    lines: tuple[LineOverlay, ...]
    zones: tuple[ZoneOverlay, ...]
