"""Draw detections on a frame: boxes, "label score #id" captions, and track trails.

Input: a uint8 ``(H, W, 3)`` RGB picture and its ``Detections`` (boxes ``[x1, y1, x2, y2]`` in
that picture's pixels). Output: a *new* uint8 ``(H, W, 3)`` RGB picture; the input is never
written (a packet's image is shared by every sink).

An ``Annotator`` is the small ABC from supervision: ``annotate(scene, detections, class_names,
overlay) -> scene``. The concrete ones draw in place on a canvas they are given (``draw``, and
``draw_overlay`` for the analytics); ``annotate`` copies first, and ``AnnotatorChain`` copies
once for several. ``AnalyticsAnnotator`` draws a frame's ``AnalyticsOverlay`` (its packet's
``analytics``): each counting line with an arrow across it pointing the ``in`` way, each zone's
outline, and a panel of live counters (per line: in / out with the classes; per zone: who is
inside). ``EdgeSpreadAnnotator`` (``edge_std_band``) shades a translucent band around each box
edge, ± k standard deviations wide, where the model gives per-edge spreads (``edge_std_px``):
a thin band is a sure edge, a wide one an unsure one.

Colours: one per track id; untracked rows (id -1) take their class's colour.

Thread: whichever stage calls it (the video sink's thread). ``TrailAnnotator`` keeps per-track
history, so use one instance per video stream, from one thread.
"""

from __future__ import annotations

import abc
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from stages.analytics.overlay import AnalyticsOverlay
from stages.events import label_for
from stages.frame import Detections

# 20 well-separated RGB colours (Tableau-like), readable on both dark and light scenes.
PALETTE_RGB: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (219, 219, 141),
    (158, 218, 229),
    (57, 59, 121),
    (99, 121, 57),
    (140, 109, 49),
)


def color_for(track_id: int, class_id: int) -> tuple[int, int, int]:
    """RGB colour of a row: by track id when tracked, else by class."""
    key = track_id if track_id >= 0 else class_id
    return PALETTE_RGB[key % len(PALETTE_RGB)]


class Annotator(abc.ABC):
    """Draws one kind of mark for a frame's detections."""

    def annotate(
        self,
        scene_rgb_u8: np.ndarray,
        detections: Detections | None,
        class_names: Sequence[str],
        overlay: AnalyticsOverlay | None = None,
    ) -> np.ndarray:
        """A copy of ``scene_rgb_u8`` (uint8 ``(H, W, 3)`` RGB) with the marks drawn:
        ``detections`` (``None``: no detector ran) and the analytics ``overlay``, if any."""
        canvas = np.array(scene_rgb_u8, dtype=np.uint8, order="C", copy=True)
        self.draw(canvas, detections if detections is not None else Detections.empty(), class_names)
        if overlay is not None:
            self.draw_overlay(canvas, overlay)
        return canvas

    def draw_overlay(self, canvas_rgb_u8: np.ndarray, overlay: AnalyticsOverlay) -> None:  # noqa: B027
        """Draw the analytics in place; most annotators draw none (so not abstract)."""

    @abc.abstractmethod
    def draw(
        self, canvas_rgb_u8: np.ndarray, detections: Detections, class_names: Sequence[str]
    ) -> None:
        """Draw in place on ``canvas_rgb_u8``, which the caller owns."""


class BoxAnnotator(Annotator):
    def __init__(self, thickness: int = 2) -> None:
        if thickness < 1:
            raise ValueError(f"thickness must be >= 1, got {thickness}")
        self.thickness = thickness

    def draw(
        self, canvas_rgb_u8: np.ndarray, detections: Detections, class_names: Sequence[str]
    ) -> None:
        for (x1, y1, x2, y2), track_id, class_id in _rows(detections, canvas_rgb_u8.shape):
            cv2.rectangle(
                canvas_rgb_u8, (x1, y1), (x2, y2), color_for(track_id, class_id), self.thickness
            )


class EdgeSpreadAnnotator(Annotator):
    """A translucent band ``edge ± sigmas * std`` along each box edge (rows with ``edge_std_px``).

    Args:
        sigmas: the band's half-width in standard deviations of the edge.
        opacity: the band's weight over the picture, in (0, 1].
    """

    def __init__(self, sigmas: float = 1.0, opacity: float = 0.35) -> None:
        if not sigmas > 0:
            raise ValueError(f"sigmas must be > 0, got {sigmas}")
        if not 0 < opacity <= 1:
            raise ValueError(f"opacity must be in (0, 1], got {opacity}")
        self.sigmas = float(sigmas)
        self.opacity = float(opacity)

    def draw(
        self, canvas_rgb_u8: np.ndarray, detections: Detections, class_names: Sequence[str]
    ) -> None:
        spread = detections.edge_std_px
        if spread is None or len(detections) == 0:
            return
        height, width = canvas_rgb_u8.shape[:2]
        rows = [r for r in _row_indices(detections) if np.isfinite(spread[r]).all()]
        if not rows:
            return
        bands = canvas_rgb_u8.copy()
        for row in rows:
            x1, y1, x2, y2 = detections.boxes_xyxy[row].astype(np.float64).tolist()
            half = (self.sigmas * np.asarray(spread[row], dtype=np.float64)).tolist()
            color = color_for(int(detections.track_ids[row]), int(detections.class_ids[row]))
            # left, top, right, bottom: each band spans the edge's length and ± its spread.
            for bx1, by1, bx2, by2 in (
                (x1 - half[0], y1, x1 + half[0], y2),
                (x1, y1 - half[1], x2, y1 + half[1]),
                (x2 - half[2], y1, x2 + half[2], y2),
                (x1, y2 - half[3], x2, y2 + half[3]),
            ):
                p1 = (
                    int(np.clip(round(bx1), 0, width - 1)),
                    int(np.clip(round(by1), 0, height - 1)),
                )
                p2 = (
                    int(np.clip(round(bx2), 0, width - 1)),
                    int(np.clip(round(by2), 0, height - 1)),
                )
                cv2.rectangle(bands, p1, p2, color, cv2.FILLED)
        cv2.addWeighted(bands, self.opacity, canvas_rgb_u8, 1.0 - self.opacity, 0.0, canvas_rgb_u8)


class LabelAnnotator(Annotator):
    """Caption above each box: ``"label score #id"`` (score and id optional)."""

    def __init__(
        self, text_scale: float = 0.5, show_score: bool = True, show_track_id: bool = True
    ) -> None:
        if text_scale <= 0:
            raise ValueError(f"text_scale must be > 0, got {text_scale}")
        self.text_scale = text_scale
        self.show_score = show_score
        self.show_track_id = show_track_id
        self._thickness = max(1, round(text_scale * 2))

    def caption(
        self, class_id: int, score: float, track_id: int, class_names: Sequence[str]
    ) -> str:
        parts = [label_for(class_id, class_names)]
        if self.show_score:
            parts.append(f"{score:.2f}")
        if self.show_track_id and track_id >= 0:
            parts.append(f"#{track_id}")
        return " ".join(parts)

    def draw(
        self, canvas_rgb_u8: np.ndarray, detections: Detections, class_names: Sequence[str]
    ) -> None:
        height, width = canvas_rgb_u8.shape[:2]
        font = cv2.FONT_HERSHEY_SIMPLEX
        scores = detections.scores.tolist()
        for row, ((x1, y1, _, _), track_id, class_id) in zip(
            _row_indices(detections), _rows(detections, canvas_rgb_u8.shape)
        ):
            text = self.caption(class_id, scores[row], track_id, class_names)
            (text_w, text_h), baseline = cv2.getTextSize(
                text, font, self.text_scale, self._thickness
            )
            pad = 2
            box_h = text_h + baseline + 2 * pad
            # Above the box when there is room, else inside it; kept within the picture.
            top = y1 - box_h if y1 - box_h >= 0 else y1
            top = min(max(0, top), max(0, height - box_h))
            left = min(max(0, x1), max(0, width - text_w - 2 * pad))
            color = color_for(track_id, class_id)
            cv2.rectangle(
                canvas_rgb_u8,
                (left, top),
                (left + text_w + 2 * pad, top + box_h),
                color,
                cv2.FILLED,
            )
            ink = (0, 0, 0) if sum(color) > 382 else (255, 255, 255)
            cv2.putText(
                canvas_rgb_u8,
                text,
                (left + pad, top + pad + text_h),
                font,
                self.text_scale,
                ink,
                self._thickness,
                cv2.LINE_AA,
            )


class TrailAnnotator(Annotator):
    """Line through each track's last ``length`` box centres (bottom-centre: where it stands).

    Memory is bounded: at most ``length`` points per track, and a track not seen for ``length``
    frames is forgotten.
    """

    def __init__(self, length: int = 30, thickness: int = 2) -> None:
        if length < 2:
            raise ValueError(f"length must be >= 2, got {length}")
        if thickness < 1:
            raise ValueError(f"thickness must be >= 1, got {thickness}")
        self.length = length
        self.thickness = thickness
        self._frame = 0
        self._points: dict[int, deque[tuple[int, int]]] = {}
        self._last_seen: dict[int, int] = {}
        self._class: dict[int, int] = {}

    @property
    def tracks_held(self) -> int:
        return len(self._points)

    def draw(
        self, canvas_rgb_u8: np.ndarray, detections: Detections, class_names: Sequence[str]
    ) -> None:
        self._frame += 1
        for (x1, _, x2, y2), track_id, class_id in _rows(detections, canvas_rgb_u8.shape):
            if track_id < 0:
                continue
            trail = self._points.setdefault(track_id, deque(maxlen=self.length))
            trail.append(((x1 + x2) // 2, y2))
            self._last_seen[track_id] = self._frame
            self._class[track_id] = class_id
        for track_id in [
            t for t, seen in self._last_seen.items() if self._frame - seen >= self.length
        ]:
            del self._points[track_id], self._last_seen[track_id], self._class[track_id]
        for track_id, trail in self._points.items():
            if len(trail) >= 2:
                points = np.array(trail, dtype=np.int32).reshape(-1, 1, 2)
                cv2.polylines(
                    canvas_rgb_u8,
                    [points],
                    False,
                    color_for(track_id, self._class[track_id]),
                    self.thickness,
                    cv2.LINE_AA,
                )


class AnnotatorChain(Annotator):
    """Several annotators on one copy, in order (trails under boxes under captions)."""

    def __init__(self, annotators: Sequence[Annotator]) -> None:
        self.annotators = tuple(annotators)

    def draw(
        self, canvas_rgb_u8: np.ndarray, detections: Detections, class_names: Sequence[str]
    ) -> None:
        for annotator in self.annotators:
            annotator.draw(canvas_rgb_u8, detections, class_names)

    def draw_overlay(self, canvas_rgb_u8: np.ndarray, overlay: AnalyticsOverlay) -> None:
        for annotator in self.annotators:
            annotator.draw_overlay(canvas_rgb_u8, overlay)


LINE_RGB = (255, 221, 0)  # counting lines: yellow, seen on asphalt and on grass
ZONE_RGB = (0, 200, 255)


class AnalyticsAnnotator(Annotator):
    """Counting lines with their ``in`` arrows, zone outlines and a panel of live counters."""

    def __init__(self, thickness: int = 2, text_scale: float = 0.5) -> None:
        if thickness < 1:
            raise ValueError(f"thickness must be >= 1, got {thickness}")
        if text_scale <= 0:
            raise ValueError(f"text_scale must be > 0, got {text_scale}")
        self.thickness = thickness
        self.text_scale = text_scale
        self._text_thickness = max(1, round(text_scale * 2))

    def draw(
        self, canvas_rgb_u8: np.ndarray, detections: Detections, class_names: Sequence[str]
    ) -> None:
        pass  # only the overlay

    def draw_overlay(self, canvas_rgb_u8: np.ndarray, overlay: AnalyticsOverlay) -> None:
        height, width = canvas_rgb_u8.shape[:2]
        for zone in overlay.zones:
            points = np.rint(np.array(zone.polygon_xy)).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(canvas_rgb_u8, [points], True, ZONE_RGB, self.thickness, cv2.LINE_AA)
            x, y = points[:, 0, 0].min(), points[:, 0, 1].min()
            self._text(
                canvas_rgb_u8, f"{zone.name}: {zone.occupancy}", (int(x) + 4, int(y) + 4), ZONE_RGB
            )
        for line in overlay.lines:
            a = np.array(line.a_xy)
            b = np.array(line.b_xy)
            pa, pb = _pixel(a, width, height), _pixel(b, width, height)
            cv2.line(canvas_rgb_u8, pa, pb, LINE_RGB, self.thickness, cv2.LINE_AA)
            # The `in` way: A→B's right-hand side on the picture (y down), i.e. (-dy, dx).
            d = (b - a) / max(1e-9, float(np.hypot(*(b - a))))
            right = np.array([-d[1], d[0]])
            mid = (a + b) / 2
            size = max(20.0, 0.04 * min(width, height))
            tail, head = mid - right * size / 2, mid + right * size / 2
            cv2.arrowedLine(
                canvas_rgb_u8,
                _pixel(tail, width, height),
                _pixel(head, width, height),
                LINE_RGB,
                self.thickness,
                cv2.LINE_AA,
                tipLength=0.35,
            )
            self._text(canvas_rgb_u8, "in", _pixel(head + right * 6, width, height), LINE_RGB)
        self._panel(canvas_rgb_u8, overlay)

    def _panel(self, canvas_rgb_u8: np.ndarray, overlay: AnalyticsOverlay) -> None:
        rows = []
        for line in overlay.lines:
            rows.append(f"{line.name}: in {line.count_in}  out {line.count_out}")
            rows += [f"  {label}: in {n_in}  out {n_out}" for label, n_in, n_out in line.by_class]
        for zone in overlay.zones:
            inside = ", ".join(f"{label} {n}" for label, n in zone.by_class)
            rows.append(
                f"{zone.name}: {zone.occupancy} inside"
                + (f" ({inside})" if inside else "")
                + f", {zone.entered} entered"
            )
        if not rows:
            return
        font = cv2.FONT_HERSHEY_SIMPLEX
        sizes = [cv2.getTextSize(r, font, self.text_scale, self._text_thickness) for r in rows]
        line_h = max(h + base for (_, h), base in sizes) + 4
        panel_w = max(w for (w, _), _ in sizes) + 12
        height, width = canvas_rgb_u8.shape[:2]
        panel_h = min(height, line_h * len(rows) + 8)
        region = canvas_rgb_u8[:panel_h, : min(width, panel_w)]
        region[...] = (region.astype(np.uint16) * 2 // 5).astype(
            np.uint8
        )  # darkened, still see-through
        for i, text in enumerate(rows):
            y = 4 + line_h * (i + 1) - 4
            if y > panel_h:
                break
            cv2.putText(
                canvas_rgb_u8,
                text,
                (6, y),
                font,
                self.text_scale,
                (255, 255, 255),
                self._text_thickness,
                cv2.LINE_AA,
            )

    def _text(
        self,
        canvas_rgb_u8: np.ndarray,
        text: str,
        org: tuple[int, int],
        color: tuple[int, int, int],
    ) -> None:
        font = cv2.FONT_HERSHEY_SIMPLEX
        (_, text_h), _ = cv2.getTextSize(text, font, self.text_scale, self._text_thickness)
        x, y = org
        cv2.putText(
            canvas_rgb_u8,
            text,
            (x, y + text_h),
            font,
            self.text_scale,
            (0, 0, 0),
            self._text_thickness + 2,
            cv2.LINE_AA,
        )
        cv2.putText(
            canvas_rgb_u8,
            text,
            (x, y + text_h),
            font,
            self.text_scale,
            color,
            self._text_thickness,
            cv2.LINE_AA,
        )


def _pixel(point_xy: np.ndarray, width: int, height: int) -> tuple[int, int]:
    """A point as OpenCV wants it: ints, kept within a margin of the picture (a line at the edge
    stays visible)."""
    x = int(np.clip(np.rint(point_xy[0]), 0, width - 1))
    y = int(np.clip(np.rint(point_xy[1]), 0, height - 1))
    return x, y


@dataclass(frozen=True)
class AnnotateConfig:
    """What the annotated video shows.

    Attributes:
        box_thickness: box line width in pixels.
        text_scale: OpenCV font scale of the captions; 0 turns captions off.
        show_score: put the score in the caption.
        show_track_id: put ``#id`` in the caption for tracked rows.
        trail_length: frames of track history drawn as a line; 0 turns trails off.
        edge_std_band: shade a band ± this many standard deviations around each box edge where
            the model gives per-edge spreads (``edge_std_px``); 0 turns it off.
    """

    box_thickness: int = 2
    text_scale: float = 0.5
    show_score: bool = True
    show_track_id: bool = True
    trail_length: int = 0
    edge_std_band: float = 0.0

    def __post_init__(self) -> None:
        if self.box_thickness < 1:
            raise ValueError(f"annotate.box_thickness must be >= 1, got {self.box_thickness}")
        if self.text_scale < 0:
            raise ValueError(
                f"annotate.text_scale must be >= 0 (0: no captions), got {self.text_scale}"
            )
        if self.trail_length < 0 or self.trail_length == 1:
            raise ValueError(
                f"annotate.trail_length must be 0 (off) or >= 2, got {self.trail_length}"
            )
        if not self.edge_std_band >= 0:
            raise ValueError(
                f"annotate.edge_std_band must be >= 0 (0: off), got {self.edge_std_band}"
            )


def make_annotator(config: AnnotateConfig) -> Annotator:
    """The annotator a config describes (one per video stream: trails keep state)."""
    parts: list[Annotator] = []
    if config.trail_length:
        parts.append(TrailAnnotator(length=config.trail_length, thickness=config.box_thickness))
    if config.edge_std_band > 0:
        # Under the box lines, so the predicted edge stays sharp inside its band.
        parts.append(EdgeSpreadAnnotator(sigmas=config.edge_std_band))
    parts.append(BoxAnnotator(thickness=config.box_thickness))
    if config.text_scale > 0:
        parts.append(LabelAnnotator(config.text_scale, config.show_score, config.show_track_id))
    # Draws only when a frame carries an analytics overlay (lines or zones are configured).
    parts.append(AnalyticsAnnotator(config.box_thickness, config.text_scale or 0.5))
    return AnnotatorChain(parts)


def _row_indices(detections: Detections) -> list[int]:
    boxes = detections.boxes_xyxy
    finite = np.isfinite(boxes).all(axis=1) if len(boxes) else np.zeros(0, dtype=bool)
    return np.flatnonzero(finite).tolist()


def _rows(
    detections: Detections, shape: tuple[int, ...]
) -> list[tuple[tuple[int, int, int, int], int, int]]:
    """Finite rows as (int box clipped to the picture, track id, class id)."""
    height, width = shape[:2]
    rows = _row_indices(detections)
    if not rows:
        return []
    boxes = np.rint(detections.boxes_xyxy[rows]).astype(np.int64)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width - 1)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height - 1)
    track_ids = detections.track_ids[rows].tolist()
    class_ids = detections.class_ids[rows].tolist()
    return [
        ((int(b[0]), int(b[1]), int(b[2]), int(b[3])), t, c)
        for b, t, c in zip(boxes.tolist(), track_ids, class_ids)
    ]
