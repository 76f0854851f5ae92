"""Camera analytics on synthetic tracks: lines (fast objects, jitter, directions, two at once, a
line by the frame's edge), zones (dwell from pts at a variable frame rate, a track dropped
inside), loitering, speed, config validation, and the vectorised geometry."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pipeline.schema import ConfigError, from_dict
from stages.analytics.config import (
    Coordinates,
    LineConfig,
    SpeedConfig,
    StreamAnalyticsConfig,
    ZoneConfig,
)
from stages.analytics.geometry import (
    apply_homography,
    homography_from_points,
    points_in_polygons,
    polygon_self_intersects,
    segments_cross_lines,
)
from stages.analytics.overlay import AnalyticsOverlay
from stages.analytics.stage import AnalyticsStage
from stages.frame import Detections, FramePacket

CLASS_NAMES = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck"]
W, H = 960, 540
IMAGE = np.zeros((H, W, 3), dtype=np.uint8)  # the analytics never look at pixels


class Run:
    """An analytics stage fed synthetic tracked boxes, collecting what it publishes."""

    def __init__(self, **config: Any) -> None:
        self.events: list[dict[str, Any]] = []
        self.stage = AnalyticsStage(
            [StreamAnalyticsConfig(**config)], CLASS_NAMES, self.events.append
        )
        self.index = 0

    def frame(
        self, objects: list[tuple[int, list[float], int]], pts_s: float | None = None
    ) -> AnalyticsOverlay:
        """One frame of (track id, box xyxy, class id); pts defaults to index / 25. Returns the
        overlay the stage put on the packet."""
        boxes = np.array([b for _, b, _ in objects], dtype=np.float32).reshape(-1, 4)
        packet = FramePacket(
            stream_id="0",
            index=self.index,
            pts_s=self.index / 25 if pts_s is None else pts_s,
            image_rgb_u8=IMAGE,
            arrival_s=0.0,
            detections=Detections(
                boxes_xyxy=boxes,
                scores=np.full(len(objects), 0.9, np.float32),
                class_ids=np.array([c for _, _, c in objects], dtype=np.int64),
                track_ids=np.array([t for t, _, _ in objects], dtype=np.int64),
            ),
        )
        self.index += 1
        out = self.stage.process(packet)
        assert out is packet and isinstance(out.analytics, AnalyticsOverlay)
        return out.analytics

    def end_track(self, track_id: int, pts_s: float) -> None:
        """What the runner delivers when the tracker drops a track."""
        self.stage.on_event(
            {
                "type": "track_ended",
                "stream": "0",
                "track_id": track_id,
                "frame": self.index,
                "pts_s": pts_s,
            }
        )

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]


def box_at(x: float, y_bottom: float, w: float = 40, h: float = 30) -> list[float]:
    """A box whose bottom-centre (the default anchor) is (x, y_bottom)."""
    return [x - w / 2, y_bottom - h, x + w / 2, y_bottom]


# A horizontal line across the picture at y = 300, A on the left, B on the right: walking from
# A to B on the screen, the left hand points up. `in` = from above (left) to below (right).
ROAD = {"name": "road", "a": (0.0, 300.0), "b": (960.0, 300.0)}


def road_line(**kwargs: Any) -> dict[str, Any]:
    return {"lines": (LineConfig(**{**ROAD, **kwargs}),)}


# --- lines -----------------------------------------------------------------------------------


def test_an_object_moving_80_px_per_frame_across_a_line_is_counted() -> None:
    run = Run(**road_line())
    ys = [60.0 + 80 * t for t in range(6)]  # 60, 140, 220, 300... no observation near the line
    ys[3] = 290.0 + 80.0  # 370: it jumps from 220 to 370, over the line, between two frames
    for y in ys:
        run.frame([(1, box_at(480, y), 2)])
    crossed = run.of("line_crossed")
    assert len(crossed) == 1
    event = crossed[0]
    assert (event["line"], event["direction"], event["track_id"], event["label"]) == (
        "road",
        "in",
        1,
        "car",
    )
    assert event["frame"] == 3 and event["point_xy"] == pytest.approx([480.0, 300.0])
    assert (event["count_in"], event["count_out"]) == (1, 0)


def test_jitter_back_and_forth_over_the_line_counts_once() -> None:
    run = Run(**road_line(rearm_distance_px=20))
    ys = [250, 270, 290, 305, 296, 304, 295, 306, 298, 303, 340, 380]  # crosses 5 more times
    for y in ys:
        run.frame([(1, box_at(400, y), 0)])
    assert [e["direction"] for e in run.of("line_crossed")] == ["in"]


def test_going_back_beyond_the_rearm_distance_counts_again() -> None:
    run = Run(**road_line(rearm_distance_px=20))
    for y in [250, 320, 340, 260, 250, 330]:  # in, (far below), out, (far above), in
        run.frame([(1, box_at(400, y), 0)])
    assert [e["direction"] for e in run.of("line_crossed")] == ["in", "out", "in"]


def test_opposite_directions_are_counted_apart_and_per_class() -> None:
    run = Run(**road_line())
    for t in range(10):
        run.frame(
            [
                (1, box_at(200, 200 + 20 * t), 2),  # down: in
                (2, box_at(600, 400 - 20 * t), 7),  # up: out
                (3, box_at(800, 400 - 25 * t), 2),
            ]
        )  # up: out
    totals = run.stage._streams["0"].line_totals()[0]
    assert (totals["count_in"], totals["count_out"]) == (1, 2)
    assert totals["by_class"] == [
        {"class_id": 2, "label": "car", "count_in": 1, "count_out": 1},
        {"class_id": 7, "label": "truck", "count_in": 0, "count_out": 1},
    ]


def test_two_objects_crossing_in_the_same_frame_are_both_counted() -> None:
    run = Run(**road_line())
    run.frame([(1, box_at(300, 280), 2), (2, box_at(330, 285), 2)])
    run.frame([(1, box_at(300, 320), 2), (2, box_at(330, 315), 2)])
    crossed = run.of("line_crossed")
    assert sorted(e["track_id"] for e in crossed) == [1, 2]
    assert all(e["frame"] == 1 for e in crossed)
    assert crossed[-1]["count_in"] == 2


def test_a_line_5_px_from_the_frame_edge_counts_objects_leaving_the_picture() -> None:
    # A car drives down and out of the bottom; its box is clipped at the edge (y = 540).
    run = Run(lines=(LineConfig(name="exit", a=(0.0, H - 5.0), b=(W, H - 5.0)),))
    for t in range(8):
        bottom = min(H, 440 + 20 * t)
        run.frame([(1, [460, bottom - 60, 500, bottom], 2)])
    assert [e["direction"] for e in run.of("line_crossed")] == ["in"]


def test_only_confirmed_tracks_and_configured_classes_count() -> None:
    run = Run(**road_line(classes=(2,)))
    for y in (280, 320):
        run.frame(
            [
                (-1, box_at(100, y), 2),  # not (yet) a track
                (5, box_at(300, y), 0),  # a person: not counted on this line
                (6, box_at(500, y), 2),
            ]
        )
    assert [e["track_id"] for e in run.of("line_crossed")] == [6]


def test_the_line_segment_not_its_extension_is_what_counts() -> None:
    run = Run(lines=(LineConfig(name="short", a=(400.0, 300.0), b=(500.0, 300.0)),))
    for y in (280, 320):
        run.frame([(1, box_at(100, y), 2), (2, box_at(450, y), 2)])
    assert [e["track_id"] for e in run.of("line_crossed")] == [2]


def test_a_reused_track_row_starts_with_no_history() -> None:
    run = Run(**road_line())
    run.frame([(1, box_at(100, 280), 2)])
    run.end_track(1, 0.04)
    run.frame([(2, box_at(100, 320), 2)])  # takes row 0 again: it must not "cross" from 280
    assert run.of("line_crossed") == []


# --- zones -----------------------------------------------------------------------------------

BAY = ZoneConfig(
    name="bay", polygon=((100.0, 100.0), (500.0, 100.0), (500.0, 400.0), (100.0, 400.0))
)


def test_dwell_from_pts_at_a_variable_frame_rate_is_right_to_one_frame_interval() -> None:
    run = Run(zones=(BAY,))
    rng = np.random.default_rng(1)
    pts = np.cumsum(rng.uniform(0.02, 0.2, size=80))  # 5 to 50 fps, changing every frame
    xs = np.linspace(20, 700, 80)  # walks in from the left and out on the right
    for x, t in zip(xs, pts):
        run.frame([(1, box_at(float(x), 300), 0)], pts_s=float(t))
    entered, exited = run.of("zone_entered"), run.of("zone_exited")
    assert len(entered) == len(exited) == 1
    inside = (xs > 100) & (xs < 500)
    true_dwell = pts[inside][-1] - pts[inside][0]
    frame_interval = np.diff(pts).max()
    assert abs(exited[0]["dwell_s"] - true_dwell) <= frame_interval
    assert exited[0]["reason"] == "left" and exited[0]["occupancy"] == 0
    assert entered[0]["occupancy"] == 1 and entered[0]["pts_s"] == pytest.approx(
        pts[inside][0], abs=1e-6
    )


def test_a_track_that_vanishes_inside_a_zone_ends_its_dwell_when_the_tracker_drops_it() -> None:
    run = Run(zones=(BAY,))
    for t in range(10):
        run.frame([(1, box_at(300, 300), 0), (2, box_at(320, 250), 2)], pts_s=t * 0.5)
    for t in range(10, 15):  # track 1 is no longer seen, the tracker still holds it
        overlay = run.frame([(2, box_at(320, 250), 2)], pts_s=t * 0.5)
    assert overlay.zones[0].occupancy == 2  # an occluded object is still there
    assert run.of("zone_exited") == []
    run.end_track(1, pts_s=7.0)  # dropped now
    exited = run.of("zone_exited")
    assert len(exited) == 1
    assert exited[0]["reason"] == "track_ended" and exited[0]["track_id"] == 1
    assert exited[0]["dwell_s"] == pytest.approx(4.5)  # 0 .. 4.5 s, its last sighting
    assert exited[0]["pts_s"] == 7.0 and exited[0]["occupancy"] == 1
    after = run.frame([(2, box_at(320, 250), 2)], pts_s=7.5)
    assert after.zones[0].occupancy == 1 and after.zones[0].by_class == (("car", 1),)


def test_loitering_fires_once_per_visit_when_dwell_passes_the_threshold() -> None:
    zone = ZoneConfig(name="door", polygon=BAY.polygon, loiter_s=2.0, classes=(0,))
    run = Run(zones=(zone,))
    for t in range(30):  # 0.0 .. 2.9 s inside, a car beside it is not watched
        run.frame([(1, box_at(300, 300), 0), (2, box_at(310, 300), 2)], pts_s=t * 0.1)
    loiter = run.of("zone_loitering")
    assert len(loiter) == 1
    assert loiter[0]["track_id"] == 1 and loiter[0]["threshold_s"] == 2.0
    assert loiter[0]["pts_s"] == pytest.approx(2.0) and loiter[0]["dwell_s"] == pytest.approx(2.0)
    assert [e["track_id"] for e in run.of("zone_entered")] == [1]


def test_summary_totals_per_zone_and_class_at_the_end() -> None:
    run = Run(zones=(BAY,), **road_line())
    for t in range(10):
        run.frame([(1, box_at(300, 200 + 30 * t), 2), (2, box_at(700, 200), 0)])  # in and out
    assert list(run.stage.flush()) == []
    final = run.of("analytics_summary")[-1]
    assert final["final"] is True and final["frame"] == 9
    assert final["lines"][0]["count_in"] == 1
    zone = final["zones"][0]
    assert (zone["entered"], zone["exited"], zone["occupancy"]) == (1, 1, 0)
    assert zone["by_class"] == [{"class_id": 2, "label": "car", "entered": 1, "occupancy": 0}]
    assert run.stage.totals()["0"] == final


def test_normalized_coordinates_follow_the_frame_size() -> None:
    run = Run(
        coordinates=Coordinates.NORMALIZED,
        lines=(LineConfig(name="mid", a=(0.0, 0.5), b=(1.0, 0.5)),),
    )
    overlay = run.frame([(1, box_at(100, 260), 2)])
    assert overlay.lines[0].a_xy == (0.0, 270.0) and overlay.lines[0].b_xy == (960.0, 270.0)
    run.frame([(1, box_at(100, 280), 2)])
    assert len(run.of("line_crossed")) == 1


def test_speed_from_a_ground_plane_homography() -> None:
    # A road seen in perspective: a 10 m x 40 m rectangle on the ground is a trapezoid in the picture.
    image = ((380.0, 200.0), (580.0, 200.0), (880.0, 500.0), (80.0, 500.0))
    world = ((0.0, 40.0), (10.0, 40.0), (10.0, 0.0), (0.0, 0.0))
    speed = SpeedConfig(image_points=image, world_points_m=world, window_s=1.0)
    run = Run(speed=speed, lines=(LineConfig(name="l", a=(0.0, 350.0), b=(960.0, 350.0)),))
    to_image = homography_from_points(np.array(world), np.array(image))
    # 20 m/s = 72 km/h straight down the road's middle (x = 5 m), from 38 m to 2 m.
    for t in range(45):
        y_m = 38.0 - 20.0 * t / 25
        if y_m < 2:
            break
        x_px, y_px = apply_homography(to_image, np.array([[5.0, y_m]]))[0]
        run.frame([(1, box_at(float(x_px), float(y_px)), 2)])
    crossed = run.of("line_crossed")
    assert len(crossed) == 1 and crossed[0]["speed_kmh"] == pytest.approx(72.0, rel=0.01)


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"lines": [{"name": "x", "a": [5, 5], "b": [5, 5]}]},
            "analytics[0].lines[0]: b: line 'x' has zero length",
        ),
        (
            {"zones": [{"name": "z", "polygon": [[0, 0], [10, 10], [10, 0], [0, 10]]}]},
            "analytics[0].zones[0]: polygon: zone 'z' crosses itself",
        ),
        ({"zones": [{"name": "z", "polygon": [[0, 0], [10, 10]]}]}, "needs at least 3 corners"),
        (
            {"coordinates": "normalized", "lines": [{"name": "x", "a": [0, 0.5], "b": [1.2, 0.5]}]},
            "analytics[0]: lines[0].b: [1.2, 0.5] is outside [0, 1]",
        ),
        (
            {
                "lines": [{"name": "x", "a": [0, 1], "b": [1, 1]}],
                "zones": [{"name": "x", "polygon": [[0, 0], [1, 0], [1, 1]]}],
            },
            "zones[0].name: 'x' is already used",
        ),
        ({"lines": [{"name": "x", "a": [0, 1, 2], "b": [1, 1]}]}, "a: a point is [x, y]"),
        (
            {
                "speed": {
                    "image_points": [[0, 0], [1, 1], [2, 2], [3, 3]],
                    "world_points_m": [[0, 0], [1, 0], [1, 1], [0, 1]],
                }
            },
            "general position",
        ),
        ({"anchor": "feet"}, "analytics[0].anchor: expected one of"),
    ],
)
def test_bad_analytics_config_is_one_line_naming_the_key(
    data: dict[str, Any], message: str
) -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Holder:
        analytics: tuple[StreamAnalyticsConfig, ...] = ()

    with pytest.raises(ConfigError) as info:
        from_dict(Holder, {"analytics": [data]})
    assert message in str(info.value) and "\n" not in str(info.value)


# --- geometry --------------------------------------------------------------------------------


def test_segment_crossing_direction_follows_the_picture() -> None:
    a, b = np.array([[0.0, 100.0]]), np.array([[100.0, 100.0]])
    p0 = np.array([[50.0, 50.0], [50.0, 150.0], [50.0, 50.0], [150.0, 50.0]])
    p1 = np.array([[50.0, 150.0], [50.0, 50.0], [50.0, 90.0], [150.0, 150.0]])
    crossed, into_right, point, _ = segments_cross_lines(p0, p1, a, b)
    assert crossed[:, 0].tolist() == [True, True, False, False]
    assert into_right[:2, 0].tolist() == [True, False]  # downwards on screen is `in` for A→B = →
    assert point[0, 0].tolist() == [50.0, 100.0]


def test_points_in_polygons_with_padding_and_a_concave_shape() -> None:
    square = [[0, 0], [10, 0], [10, 10], [0, 10]]
    u_shape = [[0, 0], [30, 0], [30, 30], [20, 30], [20, 10], [10, 10], [10, 30], [0, 30]]
    vertices = np.array([square + [square[-1]] * 4, u_shape], dtype=np.float64)
    points = np.array([[5.0, 5.0], [15.0, 20.0], [25.0, 20.0], [50.0, 5.0]])
    inside = points_in_polygons(points, vertices)
    assert inside.tolist() == [[True, True], [False, False], [False, True], [False, False]]


def test_self_intersection() -> None:
    assert polygon_self_intersects(np.array([[0, 0], [10, 10], [10, 0], [0, 10]], float))
    assert not polygon_self_intersects(np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float))


# --- drawing ---------------------------------------------------------------------------------


def test_the_annotated_picture_shows_the_line_its_in_arrow_the_zone_and_the_counters() -> None:
    from stages.annotate import LINE_RGB, ZONE_RGB, AnnotateConfig, make_annotator

    run = Run(zones=(BAY,), **road_line())
    for t in range(8):
        overlay = run.frame([(1, box_at(700, 200 + 30 * t), 2)])
    annotator = make_annotator(AnnotateConfig())
    scene = np.full((H, W, 3), 90, dtype=np.uint8)
    picture = annotator.annotate(scene, None, CLASS_NAMES, overlay)
    assert (scene == 90).all()  # drawn on a copy

    def has(color: tuple[int, int, int], region: np.ndarray) -> bool:
        return bool((np.abs(region.astype(int) - color).sum(axis=2) < 30).any())

    assert has(LINE_RGB, picture[298:303, 600:900])  # the line itself, across the picture
    # The `in` arrow (A→B points right, so `in` points down): across the line at its middle,
    # its head and its "in" label below it.

    def count(color: tuple[int, int, int], region: np.ndarray) -> int:
        return int((np.abs(region.astype(int) - color).sum(axis=2) < 30).sum())

    below, above = (
        count(LINE_RGB, picture[304:340, 440:520]),
        count(LINE_RGB, picture[260:296, 440:520]),
    )
    assert above > 0 and below > 2 * above
    assert has(ZONE_RGB, picture[99:102, 150:450])  # the zone's top edge
    # The counter panel: darkened top-left corner with white text.
    panel = picture[:40, :200]
    assert (panel < 90).any() and (panel > 200).all(axis=2).any()
    no_overlay = annotator.annotate(scene, None, CLASS_NAMES)
    assert (no_overlay == 90).all()
