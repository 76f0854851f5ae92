"""Tiled inference in the run: the preprocessor cuts the crops, the inference stage runs them in
one batch (or in turn for a fixed-batch export) and merges them, with the real teacher (NanoDet in
the D-FINE deploy contract) on a real clip upscaled 2x, as drone footage makes small objects."""

from __future__ import annotations

import logging
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from dfine.backends.device import Device
from pipeline.config import load_config
from pipeline.schema import ConfigError, from_dict
from stages.frame import Detections, FramePacket
from stages.infer import InferConfig, InferenceStage, make_backend, prepare_model
from stages.preprocess import PreprocessConfig, Preprocessor
from stages.tiling import MergeMethod, Tile, TiledInput, TilingConfig, frame_crops, merge_crops
from tests.conftest import REPO, SHARED

TEACHER = SHARED / "teachers" / "nanodet_coco_416.onnx"
SMALL_PX = 32


@pytest.fixture(scope="module")
def teacher() -> Path:
    if not TEACHER.is_file():
        pytest.skip(
            f"teacher model not found at {TEACHER} (the shared/ folder beside the repository)"
        )
    return TEACHER


@pytest.fixture(scope="module")
def highway_2x(media_dir: Path) -> list[np.ndarray]:
    """Frames 0 and 40 of the highway clip, upscaled 2x to 1920x1080 (distant cars get small)."""
    frames = []
    with av.open(str(media_dir / "traffic_highway_960x540.mp4")) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in (0, 40):
                rgb = frame.to_ndarray(format="rgb24")
                frames.append(cv2.resize(rgb, (1920, 1080), interpolation=cv2.INTER_CUBIC))
            if i >= 40:
                break
    return frames


def _run(
    model: Path, frames: list[np.ndarray], tiling: TilingConfig, threshold: float = 0.35
) -> list[Detections]:
    prepared = prepare_model(
        InferConfig(
            model=model,
            score_threshold=threshold,
            intra_op_threads=1,
            tiling=tiling,
            device=Device.CPU,
        )
    )
    config = prepared.config
    assert config.imgsz is not None
    stage = InferenceStage(config, lambda: make_backend(config, prepared.info))
    stage.setup()
    pre = Preprocessor(
        PreprocessConfig(input_size=config.imgsz, device=config.device, tiling=config.tiling)
    )
    out = []
    for i, image in enumerate(frames):
        packet = FramePacket("0", i, 0.0, image, 0.0)
        stage.process(pre.process(packet))
        assert packet.model_input is None and packet.detections is not None
        out.append(packet.detections)
    return out


def _small(dets: Detections) -> int:
    wh = dets.boxes_xyxy[:, 2:] - dets.boxes_xyxy[:, :2]
    return int((wh.max(axis=1) < SMALL_PX).sum())


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def test_tiles_find_more_small_boxes_than_the_whole_frame(
    teacher: Path, highway_2x: list[np.ndarray]
) -> None:
    whole = _run(teacher, highway_2x, TilingConfig())
    tiled = _run(teacher, highway_2x, TilingConfig(enabled=True, full_frame=True))
    small_whole = sum(_small(d) for d in whole)
    small_tiled = sum(_small(d) for d in tiled)
    assert small_tiled > small_whole and small_tiled >= 3, (small_whole, small_tiled)
    assert sum(len(d) for d in tiled) > sum(len(d) for d in whole)
    for dets in tiled:
        boxes = dets.boxes_xyxy
        # Source pixels of the 1920x1080 frame, not of a 416 px tile.
        assert (
            (boxes >= 0).all() and (boxes[:, 0::2] <= 1920).all() and (boxes[:, 1::2] <= 1080).all()
        )
        assert boxes[:, 2].max() > 416 and boxes[:, 3].max() > 416
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        # Merged: no two boxes of a class left over one object.
        for c in np.unique(dets.class_ids):
            same = boxes[dets.class_ids == c]
            iou = _iou(same, same)
            np.fill_diagonal(iou, 0)
            assert iou.max(initial=0) <= 0.5


def _fixed_batch_copy(src: Path, dst: Path, batch: int) -> Path:
    import onnx

    model = onnx.load(str(src))
    for graph_input in model.graph.input:
        graph_input.type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("batch", [1, 3])
def test_a_fixed_batch_export_runs_tiles_in_turn_with_the_same_result(
    teacher: Path, media_dir: Path, tmp_path: Path, batch: int, caplog: pytest.LogCaptureFixture
) -> None:
    with av.open(str(media_dir / "traffic_highway_960x540.mp4")) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    tiling = TilingConfig(enabled=True)
    crops = frame_crops(960, 540, tiling, 416)
    assert len(crops) == 7 and crops[0] == Tile(0, 0, 960, 540)  # whole frame + 3x2 tiles
    dynamic = _run(teacher, [frame], tiling, threshold=0.3)[0]
    fixed_path = _fixed_batch_copy(teacher, tmp_path / f"fixed{batch}.onnx", batch)
    with caplog.at_level(logging.WARNING, logger="stages.infer"):
        fixed = _run(fixed_path, [frame], tiling, threshold=0.3)[0]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"exactly {batch} image" in said
    assert ("one after another" if batch == 1 else f"{batch} at a time") in said
    assert len(fixed) == len(dynamic) > 0
    np.testing.assert_allclose(fixed.boxes_xyxy, dynamic.boxes_xyxy, atol=0.05)
    np.testing.assert_array_equal(fixed.class_ids, dynamic.class_ids)


def test_the_preprocessor_makes_one_batch_of_all_crops() -> None:
    image = np.random.default_rng(0).integers(0, 255, (540, 960, 3), dtype=np.uint8)
    tiling = TilingConfig(enabled=True, full_frame=False)
    pre = Preprocessor(PreprocessConfig(input_size=416, device=Device.CPU, tiling=tiling))
    packet = pre.process(FramePacket("0", 0, 0.0, image, 0.0))
    tiled = packet.model_input
    assert isinstance(tiled, TiledInput)
    assert tuple(tiled.images.shape) == (6, 3, 416, 416) and len(tiled.crops) == 6
    # A 416 px tile reaches the model at its own scale: the crop's pixels unchanged.
    c = tiled.crops[4]
    crop = image[c.y0 : c.y1, c.x0 : c.x1].transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(tiled.images[4].numpy(), crop, atol=1e-6)


def test_merge_crops_maps_back_and_counts_a_border_cut_object_once() -> None:
    frame_wh = (760, 416)
    crops = [Tile(0, 0, 416, 416), Tile(344, 0, 760, 416)]  # 72 px overlap
    # A 40 px car at x 380..420: whole in the right tile, cut at x 416 in the left one.
    f32 = np.float32
    left = (
        np.array([2, 2]),
        np.array([[380, 100, 416, 130], [10, 10, 30, 30]], f32),
        np.array([0.6, 0.9], f32),
    )
    right = (
        np.array([2, 0]),
        np.array([[36, 100, 76, 130], [300, 300, 330, 340]], f32),
        np.array([0.8, 0.7], f32),
    )
    for method in MergeMethod:
        labels, boxes, scores = merge_crops([left, right], crops, frame_wh, method, 0.5)
        assert len(labels) == 3, method
        car = boxes[np.isclose(scores, 0.8)][0]
        np.testing.assert_allclose(car, [380, 100, 420, 130])  # right tile's box, in frame pixels
        np.testing.assert_allclose(boxes[labels == 0][0], [644, 300, 674, 340])
    # The piece (score 0.6) is gone under NMS too, where IoU alone (0.9 here) would be luck.
    assert not np.isclose(
        merge_crops([left, right], crops, frame_wh, MergeMethod.NMS)[2], 0.6
    ).any()


def test_tiling_config_is_validated_with_its_path() -> None:
    drone = load_config(REPO / "configs" / "drone.yaml")
    assert (
        drone.model.tiling.enabled and drone.track is not None and drone.track.camera_motion.enabled
    )
    assert not InferConfig().tiling.enabled  # off by default
    with pytest.raises(ConfigError, match=r"model.tiling.merge"):
        from_dict(InferConfig, {"tiling": {"merge": "soft"}}, "model")
    with pytest.raises(ConfigError, match=r"model.tiling.tile_cols: unknown key"):
        from_dict(InferConfig, {"tiling": {"tile_cols": 3}}, "model")
    with pytest.raises(ValueError, match=r"overlap 416 px leaves no stride"):
        TilingConfig(enabled=True, tile_px=416, overlap=416)
    with pytest.raises(ValueError, match="merge_threshold"):
        TilingConfig(merge_threshold=0.0)
