"""Camera-motion compensation in the tracker: norfair's MotionEstimator on a scaled-down frame,
its transformation mapped back to full-size pixels, and tracks that keep their ids while the
camera shakes, where the same tracker without it loses them."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.schema import ConfigError, from_dict
from stages.frame import Detections, FramePacket
from stages.track import CameraMotion, CameraMotionConfig, MotionModel, TrackConfig, Tracker

FRAME_WH = (960, 600)
# Five parked objects in world pixels (x1, y1, x2, y2), 30 px: a small target, as from a drone.
OBJECTS = np.array(
    [
        [200, 150, 230, 180],
        [420, 300, 450, 330],
        [650, 200, 680, 230],
        [300, 420, 330, 450],
        [700, 440, 730, 470],
    ],
    dtype=np.float32,
)


def _world(seed: int = 0) -> np.ndarray:
    """A textured ground (corners everywhere) with the objects painted on, uint8 RGB."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 255, (FRAME_WH[1] + 200, FRAME_WH[0] + 200, 3), dtype=np.uint8)
    world = cv2.GaussianBlur(noise, (0, 0), 2.0)
    for x1, y1, x2, y2 in (OBJECTS + 100).astype(int).tolist():
        cv2.rectangle(world, (x1, y1), (x2, y2), (250, 30, 30), -1)
    return world


def _frame(world: np.ndarray, shift_xy: tuple[float, float]) -> np.ndarray:
    """The camera's view: world content moved by ``shift_xy`` pixels in the image."""
    dx, dy = shift_xy
    matrix = np.array([[1, 0, dx - 100], [0, 1, dy - 100]], dtype=np.float64)
    return cv2.warpAffine(world, matrix, FRAME_WH, flags=cv2.INTER_LINEAR)


def test_a_known_translation_maps_back_through_the_scaled_flow() -> None:
    world = _world()
    motion = CameraMotion(
        CameraMotionConfig(enabled=True, flow_max_side_px=480)
    )  # flow at half size
    motion.update(_frame(world, (0, 0)), OBJECTS)
    shift = (12.0, -7.0)
    transformation = motion.update(
        _frame(world, shift), OBJECTS + np.array([*shift, *shift], np.float32)
    )
    assert transformation is not None
    seen = np.array([[100.0, 100.0], [800.0, 500.0]]) + np.array(shift)
    np.testing.assert_allclose(transformation.rel_to_abs(seen), seen - np.array(shift), atol=0.5)
    np.testing.assert_allclose(transformation.abs_to_rel(seen - np.array(shift)), seen, atol=0.5)


def test_a_frame_without_corners_is_no_estimate_and_the_next_ones_recover() -> None:
    world = _world()
    motion = CameraMotion(CameraMotionConfig(enabled=True, model=MotionModel.TRANSLATION))
    assert motion.update(np.full((600, 960, 3), 128, np.uint8), None) is None  # nothing to follow
    assert motion.failures == 1
    motion.update(_frame(world, (0, 0)), None)
    transformation = motion.update(_frame(world, (20, 0)), None)
    assert transformation is not None
    np.testing.assert_allclose(
        transformation.rel_to_abs(np.array([[520.0, 300.0]])), [[500.0, 300.0]], atol=0.6
    )


def _track(camera_motion: bool, shifts: np.ndarray) -> tuple[int, float, Tracker]:
    """Distinct track ids and the share of detections with an id, over the shaken clip."""
    world = _world()
    config = TrackConfig(
        camera_motion=CameraMotionConfig(enabled=camera_motion, flow_max_side_px=480)
    )
    tracker = Tracker(config)
    ids: list[int] = []
    for i, (dx, dy) in enumerate(shifts.tolist()):
        boxes = OBJECTS + np.array([dx, dy, dx, dy], np.float32)
        dets = Detections(
            boxes_xyxy=boxes,
            scores=np.full(len(boxes), 0.9, np.float32),
            class_ids=np.zeros(len(boxes), np.int64),
        )
        packet = tracker.process(
            FramePacket("0", i, i / 30, _frame(world, (dx, dy)), 0.0, detections=dets)
        )
        assert packet.detections is not None
        np.testing.assert_array_equal(packet.detections.boxes_xyxy, boxes)  # still image pixels
        if i >= 5:  # past the initialisation delay
            ids.extend(packet.detections.track_ids.tolist())
    tracked = [t for t in ids if t >= 0]
    return len(set(tracked)), len(tracked) / len(ids), tracker


def test_ids_survive_a_shaking_camera_only_with_compensation() -> None:
    # A drone in wind: the view jumps up to 40 px a frame, more than a 30 px box.
    shifts = np.random.default_rng(1).uniform(-40, 40, (40, 2))
    shifts[0] = 0
    ids_with, covered_with, tracker = _track(True, shifts)
    ids_without, covered_without, _ = _track(False, shifts)
    assert ids_with == len(OBJECTS) and covered_with == pytest.approx(1.0)
    assert covered_without < 0.5 or ids_without > 2 * len(OBJECTS), (ids_without, covered_without)
    stats = tracker.stats()
    assert stats["motion_frames"] == len(shifts) and stats["motion_ms_per_frame"] > 0


def test_camera_motion_config_is_validated_with_its_path() -> None:
    assert not TrackConfig().camera_motion.enabled  # off by default
    assert Tracker(TrackConfig()).stats() == {}
    with pytest.raises(ConfigError, match=r"track.camera_motion.model"):
        from_dict(TrackConfig, {"camera_motion": {"model": "affine"}}, "track")
    with pytest.raises(ValueError, match="flow_max_side_px"):
        CameraMotionConfig(flow_max_side_px=8)
