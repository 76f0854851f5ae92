"""Tracker: norfair IoU tracking on synthetic boxes (the detector is not needed to test ids)."""

from __future__ import annotations

import numpy as np
import pytest

from stages.frame import Detections, FramePacket
from stages.track import TrackConfig, Tracker, iou_distance

IMAGE = np.zeros((8, 8, 3), dtype=np.uint8)  # the tracker never looks at pixels
CLASS_NAMES = ["person", "bicycle", "car"]


def _packet(
    index: int, boxes: list[list[float]], classes: list[int], stream: str = "0"
) -> FramePacket:
    dets = Detections(
        boxes_xyxy=np.array(boxes, dtype=np.float32).reshape(-1, 4),
        scores=np.full(len(boxes), 0.9, dtype=np.float32),
        class_ids=np.array(classes, dtype=np.int64),
    )
    return FramePacket(
        stream_id=stream,
        index=index,
        pts_s=index / 30,
        image_rgb_u8=IMAGE,
        arrival_s=0.0,
        detections=dets,
    )


def _box(cx: float, cy: float, w: float = 40, h: float = 60) -> list[float]:
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def _ids_by_object(
    tracker: Tracker,
    frames: list[list[tuple[str, list[float], int]]],
    rng: np.random.Generator | None = None,
) -> dict[str, list[int]]:
    """Run frames of (object name, box, class); rows are shuffled when rng is given.
    Returns each object's track id per frame."""
    ids: dict[str, list[int]] = {}
    for index, objects in enumerate(frames):
        order = rng.permutation(len(objects)) if rng is not None else np.arange(len(objects))
        rows = [objects[i] for i in order]
        out = tracker.process(_packet(index, [b for _, b, _ in rows], [c for _, _, c in rows]))
        assert out.detections is not None
        for (name, _, _), track_id in zip(rows, out.detections.track_ids.tolist()):
            ids.setdefault(name, []).append(track_id)
        assert not hasattr(out, "events")  # events go to the channel; packets carry none
    return ids


def test_moving_boxes_keep_one_id_each() -> None:
    config = TrackConfig(initialization_delay=3)
    events: list[dict] = []
    tracker = Tracker(config, CLASS_NAMES, publish=events.append)
    frames = [
        [
            ("a", _box(100 + 4 * t, 100), 2),
            ("b", _box(300, 100 + 3 * t), 2),
            ("c", _box(500 - 5 * t, 400), 0),
        ]
        for t in range(30)
    ]
    ids = _ids_by_object(tracker, frames, rng=np.random.default_rng(0))
    confirmed = {}
    for name, seq in ids.items():
        # -1 while the track is being confirmed, then one id to the end.
        first = next(i for i, t in enumerate(seq) if t >= 0)
        assert first <= config.initialization_delay + 1
        assert all(t == -1 for t in seq[:first])
        assert len(set(seq[first:])) == 1, f"{name} changed id: {seq}"
        confirmed[name] = seq[-1]
    assert sorted(confirmed.values()) == [1, 2, 3]
    started = [e for e in events if e["type"] == "track_started"]
    assert sorted((e["track_id"], e["class_id"], e["label"]) for e in started) == sorted(
        (confirmed[n], c, CLASS_NAMES[c]) for n, c in (("a", 2), ("b", 2), ("c", 0))
    )
    for e in started:  # complete where it happens: the box of the frame it was confirmed on
        assert e["frame"] <= config.initialization_delay + 1 and len(e["box_xyxy"]) == 4
    assert not [e for e in events if e["type"] == "track_ended"]


def test_crossing_objects_of_different_classes_keep_their_ids() -> None:
    # A car drives right and a person walks left along the same line: they overlap fully mid-way.
    tracker = Tracker(TrackConfig(initialization_delay=2), publish=[].append)
    frames = [
        [
            ("car", _box(100 + 10 * t, 200, 60, 60), 2),
            ("person", _box(400 - 10 * t, 200, 60, 60), 0),
        ]
        for t in range(30)
    ]
    ids = _ids_by_object(tracker, frames)
    # Where the two boxes coincide (IoU above duplicate_iou) the lower score is taken for a
    # duplicate and has no id for that frame; neither track changes id.
    assert len(set(ids["car"][5:]) - {-1}) == 1 and len(set(ids["person"][5:]) - {-1}) == 1
    assert ids["car"][5:].count(-1) + ids["person"][5:].count(-1) <= 1
    assert ids["car"][-1] != ids["person"][-1]


@pytest.mark.parametrize("class_aware", [True, False])
def test_a_person_never_takes_over_a_car_track(class_aware: bool) -> None:
    # A car stands still, then in its place there is a person (same box): only a class-aware
    # tracker starts a new track for the person.
    tracker = Tracker(TrackConfig(initialization_delay=1, class_aware=class_aware))
    for t in range(10):
        car = tracker.process(_packet(t, [_box(100, 100)], [2]))
    person = tracker.process(_packet(10, [_box(100, 100)], [0]))
    assert car.detections.track_ids.tolist() == [1]  # type: ignore[union-attr]
    expected = -1 if class_aware else 1  # a new track is not confirmed on its first frame
    assert person.detections.track_ids.tolist() == [expected]  # type: ignore[union-attr]


def test_track_ends_after_the_object_leaves() -> None:
    config = TrackConfig(hit_counter_max=5, initialization_delay=1)
    events: list[dict] = []
    tracker = Tracker(config, CLASS_NAMES, publish=events.append)
    for t in range(10):
        tracker.process(_packet(t, [_box(100 + 2 * t, 100)], [2]))
    for t in range(10, 30):
        tracker.process(_packet(t, [], []))
    assert [e["type"] for e in events] == ["track_started", "track_ended"]
    ended = events[1]
    assert (ended["track_id"], ended["class_id"], ended["label"], ended["reason"]) == (
        1,
        2,
        "car",
        "lost",
    )
    assert ended["last_seen_frame"] == 9 and ended["last_seen_pts_s"] == pytest.approx(
        9 / 30, abs=1e-6
    )
    assert ended["box_xyxy"] == pytest.approx(_box(118, 100))
    # Dropped a few frames after the last sighting, within its allowed misses.
    assert 10 <= ended["frame"] <= 10 + config.hit_counter_max + 1
    assert ended["pts_s"] == pytest.approx(ended["frame"] / 30, abs=1e-6)


def test_tracks_alive_at_the_end_of_the_input_end_in_flush() -> None:
    events: list[dict] = []
    tracker = Tracker(TrackConfig(initialization_delay=1), CLASS_NAMES, publish=events.append)
    for t in range(6):
        tracker.process(_packet(t, [_box(100 + 2 * t, 100), _box(300, 300)], [2, 0]))
        tracker.process(_packet(t, [_box(50, 50)], [0], stream="1"))
    assert list(tracker.flush()) == []
    ended = sorted((e["stream"], e["track_id"]) for e in events if e["type"] == "track_ended")
    started = sorted((e["stream"], e["track_id"]) for e in events if e["type"] == "track_started")
    assert ended == started == [("0", 1), ("0", 2), ("1", 1)]
    for e in events:
        if e["type"] == "track_ended":
            assert e["reason"] == "stream_ended" and e["frame"] == e["last_seen_frame"] == 5


def test_frames_without_inference_advance_the_tracker() -> None:
    tracker = Tracker(TrackConfig(initialization_delay=1))
    for t in range(5):
        tracker.process(_packet(t, [_box(100 + 2 * t, 100)], [2]))
    empty = FramePacket(stream_id="0", index=5, pts_s=0.0, image_rgb_u8=IMAGE, arrival_s=0.0)
    assert tracker.process(empty).detections is None
    out = tracker.process(_packet(6, [_box(112, 100)], [2]))
    assert out.detections is not None and out.detections.track_ids.tolist() == [1]


def test_dropped_frames_keep_the_id() -> None:
    tracker = Tracker(TrackConfig(initialization_delay=1))
    seen = []
    for t in [0, 1, 2, 3, 7, 8, 12, 13]:  # gaps: frames dropped upstream
        out = tracker.process(_packet(t, [_box(100 + 1 * t, 100)], [2]))
        seen.append(int(out.detections.track_ids[0]))  # type: ignore[union-attr]
    assert set(seen[2:]) == {1}


def test_one_tracker_per_stream() -> None:
    tracker = Tracker(TrackConfig(initialization_delay=0))
    a = tracker.process(_packet(0, [_box(100, 100)], [2], stream="cam-a"))
    b = tracker.process(_packet(0, [_box(100, 100)], [2], stream="cam-b"))
    # The same box on two cameras is two objects, each the first of its own stream.
    assert a.detections.track_ids.tolist() == [1]  # type: ignore[union-attr]
    assert b.detections.track_ids.tolist() == [1]  # type: ignore[union-attr]


def test_input_detections_are_not_modified() -> None:
    tracker = Tracker(TrackConfig(initialization_delay=0))
    packet = _packet(0, [_box(100, 100)], [2])
    original = packet.detections
    out = tracker.process(packet)
    assert original is not None and original.track_ids.tolist() == [-1]
    assert out.detections is not original and out.detections.track_ids.tolist() == [1]  # type: ignore[union-attr]


def test_degenerate_boxes_do_not_crash() -> None:
    tracker = Tracker(TrackConfig(initialization_delay=0))
    for t in range(5):
        out = tracker.process(
            _packet(t, [[10, 10, 10, 10], [50, 50, 40, 40], _box(200, 200)], [1, 1, 1])
        )
    assert len(out.detections) == 3  # type: ignore[arg-type]


def test_iou_distance_values() -> None:
    class _Obj:  # stands in for a TrackedObject: iou_distance reads only .estimate / .points
        def __init__(self, box: list[float]) -> None:
            self.estimate = np.array(box, dtype=float).reshape(2, 2)
            self.points = self.estimate

    a = _Obj([0, 0, 10, 10])
    assert iou_distance(a, _Obj([0, 0, 10, 10])) == pytest.approx(0.0)  # type: ignore[arg-type]
    assert iou_distance(a, _Obj([5, 0, 15, 10])) == pytest.approx(1 - 50 / 150)  # type: ignore[arg-type]
    assert iou_distance(a, _Obj([20, 20, 30, 30])) == 1.0  # type: ignore[arg-type]
    assert iou_distance(a, _Obj([10, 10, 0, 0])) == pytest.approx(0.0)  # type: ignore[arg-type]
    assert iou_distance(_Obj([3, 3, 3, 3]), _Obj([3, 3, 3, 3])) == 1.0  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"distance_threshold": 0.0}, "distance_threshold"),
        ({"distance_threshold": 1.5}, "distance_threshold"),
        ({"hit_counter_max": 0}, "hit_counter_max"),
        ({"initialization_delay": 15}, "initialization_delay"),
        ({"initialization_delay": -1}, "initialization_delay"),
        ({"pointwise_hit_counter_max": 0}, "pointwise_hit_counter_max"),
        ({"past_detections_length": -1}, "past_detections_length"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TrackConfig(**kwargs)  # type: ignore[arg-type]


def test_one_object_detected_as_two_classes_gets_one_track() -> None:
    """A detector's NMS runs per class: the same truck comes as "car" 0.6 and "truck" 0.8."""
    events: list[dict] = []
    tracker = Tracker(TrackConfig(initialization_delay=1), CLASS_NAMES, publish=events.append)
    for t in range(8):
        box = _box(100 + 5 * t, 100)
        shifted = [v + 1 for v in box]  # IoU 0.92
        dets = Detections(
            boxes_xyxy=np.array([box, shifted, _box(400, 400)], np.float32),
            scores=np.array([0.6, 0.8, 0.7], np.float32),
            class_ids=np.array([2, 1, 2], np.int64),
        )
        out = tracker.process(
            FramePacket(
                stream_id="0",
                index=t,
                pts_s=t / 30,
                image_rgb_u8=IMAGE,
                arrival_s=0.0,
                detections=dets,
            )
        )
    assert out.detections is not None
    ids = out.detections.track_ids.tolist()
    assert ids[0] == -1 and ids[1] >= 1 and ids[2] >= 1 and ids[1] != ids[2]
    assert sorted(e["class_id"] for e in events if e["type"] == "track_started") == [1, 2]
    # Off: both are tracked.
    tracker = Tracker(TrackConfig(initialization_delay=1, duplicate_iou=1.0))
    for t in range(8):
        out = tracker.process(
            FramePacket(
                stream_id="0",
                index=t,
                pts_s=0.0,
                image_rgb_u8=IMAGE,
                arrival_s=0.0,
                detections=dets,
            )
        )
    assert out.detections is not None and (out.detections.track_ids >= 1).all()
