"""Preprocessor: D-FINE's input tensor from a decoded frame, checked against PIL (the official
pipeline's resize) and cv2 on real frames."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from media import media_path
from stages.decode import DecodeConfig, FileSource
from stages.frame import FramePacket
from stages.preprocess import (
    PreprocessConfig,
    PreprocessDevice,
    Preprocessor,
    image_to_model_input,
)


def _first_frame(name: str) -> np.ndarray:
    source = FileSource(DecodeConfig(path=str(media_path(name))))
    source.setup()
    items = source.items()
    try:
        return next(items).image_rgb_u8
    finally:
        items.close()


def _packet(image: np.ndarray) -> FramePacket:
    return FramePacket(
        stream_id="0", index=0, pts_s=0.0, image_rgb_u8=image, arrival_s=time.monotonic()
    )


def _pil_reference(image: np.ndarray, size: int) -> np.ndarray:
    """The official pipeline: PIL bilinear resize, then ToTensor. float32 (3, S, S) in [0, 1]."""
    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
    return resized.transpose(2, 0, 1).astype(np.float32) / 255.0


def test_output_shape_dtype_range_and_layout() -> None:
    image = _first_frame("traffic_highway_960x540.mp4")
    stage = Preprocessor(PreprocessConfig(input_size=640, device=PreprocessDevice.CPU))
    stage.setup()
    packet = stage.process(_packet(image))
    assert packet is not None
    x = packet.model_input
    assert isinstance(x, torch.Tensor)
    assert x.shape == (1, 3, 640, 640) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert x.is_contiguous()
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert float(x.max()) > 0.5  # a real daytime frame, not all zeros
    np.testing.assert_array_equal(packet.image_rgb_u8, image)  # the frame is only read


@pytest.mark.parametrize(
    "name",
    [
        "traffic_highway_960x540.mp4",
        "pedestrians_night_street_1080p_mpeg4.mp4",
        "person_asl_640x480_rotate90.mp4",
        "cars_320x240.h265",
    ],
)
@pytest.mark.parametrize(
    "resize_in_uint8", [True, False], ids=["uint8-cpu-path", "float-cuda-path"]
)
def test_matches_the_official_pil_resize(name: str, resize_in_uint8: bool) -> None:
    # Both arithmetic paths run here on CPU: the float one is what CUDA uses.
    image = _first_frame(name)
    ours = image_to_model_input(image, 640, torch.device("cpu"), resize_in_uint8=resize_in_uint8)
    diff = np.abs(ours[0].numpy() - _pil_reference(image, 640))
    assert diff.max() <= 1.0 / 255 + 1e-6
    assert diff.mean() <= 0.2 / 255


def test_close_to_cv2_resize_and_far_from_it_on_sharp_edges() -> None:
    # cv2 INTER_LINEAR does not antialias when shrinking: close on average, not on edges.
    image = _first_frame("pedestrians_night_street_1080p_mpeg4.mp4")
    ours = image_to_model_input(image, 640, torch.device("cpu"), resize_in_uint8=True)[0].numpy()
    cv = cv2.resize(image, (640, 640), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1) / 255.0
    diff = np.abs(ours - cv)
    assert diff.mean() < 2.0 / 255
    assert diff.max() > 10.0 / 255


def test_known_pattern_lands_where_it_should() -> None:
    # Left half red, right half blue, top quarter rows green on the right: a stretch, no letterbox.
    image = np.zeros((540, 960, 3), dtype=np.uint8)
    image[:, :480] = (255, 0, 0)
    image[:, 480:] = (0, 0, 255)
    image[:135, 480:] = (0, 255, 0)
    x = image_to_model_input(image, 320, torch.device("cpu"), resize_in_uint8=True)[0]
    left, right = x[:, :, :158], x[:, :, 162:]
    assert torch.all(left[0] == 1.0) and torch.all(left[1:] == 0.0)
    assert torch.all(right[2, 82:] == 1.0) and torch.all(right[:2, 82:] == 0.0)
    assert torch.all(right[1, :78] == 1.0)  # 135/540 of 320 rows = 80 rows of green
    # No letterbox: the very first and last rows and columns carry picture, not padding.
    assert x[0, 0, 0] == 1.0 and x[2, -1, -1] == 1.0


def test_upscaling_a_small_frame() -> None:
    image = _first_frame("cars_320x240.h265")
    x = image_to_model_input(image, 640, torch.device("cpu"), resize_in_uint8=True)
    assert x.shape == (1, 3, 640, 640)
    assert np.abs(x[0].numpy() - _pil_reference(image, 640)).max() <= 1.0 / 255 + 1e-6


def test_rejects_a_non_rgb_image() -> None:
    with pytest.raises(ValueError, match="image_rgb_u8"):
        image_to_model_input(
            np.zeros((4, 4), np.uint8), 32, torch.device("cpu"), resize_in_uint8=True
        )
    with pytest.raises(ValueError, match="image_rgb_u8"):
        image_to_model_input(
            np.zeros((4, 4, 3), np.float32), 32, torch.device("cpu"), resize_in_uint8=True
        )


def test_auto_device_is_cpu_without_a_gpu() -> None:
    stage = Preprocessor(PreprocessConfig())
    assert stage.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no GPU"):
        Preprocessor(PreprocessConfig(device=PreprocessDevice.CUDA)).setup()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    image = _first_frame("traffic_highway_960x540.mp4")
    stage = Preprocessor(PreprocessConfig(device=PreprocessDevice.CUDA))
    stage.setup()
    gpu = stage.process(_packet(image)).model_input  # type: ignore[union-attr]
    assert gpu.device.type == "cuda"
    cpu = image_to_model_input(image, 640, torch.device("cpu"), resize_in_uint8=True)
    assert float((gpu.cpu() - cpu).abs().max()) <= 1.0 / 255 + 1e-6


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"input_size": 0}, "input_size"),
        ({"input_size": 650}, "input_size"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PreprocessConfig(**kwargs)  # type: ignore[arg-type]


def test_config_accepts_device_by_name() -> None:
    assert PreprocessConfig(device="cpu").device is PreprocessDevice.CPU  # type: ignore[arg-type]
