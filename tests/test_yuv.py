"""The RGB ↔ YUV conversions at both ends of the pipeline: right colours, no thread pools."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest

from stages.decode import frame_to_rgb_u8
from stages.sinks.yuv import rgb_to_yuv420p

NIGHT_1080P = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "media"
    / "pedestrians_night_street_1080p_mpeg4.mp4"
)


def _colour_chart() -> np.ndarray:
    """Flat 8x8 patches (so 4:2:0 chroma loses nothing) of saturated and grey colours."""
    colours = [
        (255, 0, 0),
        (0, 255, 0),
        (0, 0, 255),
        (255, 255, 0),
        (0, 255, 255),
        (255, 0, 255),
        (255, 255, 255),
        (0, 0, 0),
        (128, 128, 128),
        (200, 120, 40),
    ]
    patches = [np.full((8, 8, 3), c, np.uint8) for c in colours]
    return np.concatenate(patches, axis=1)


def _back_to_rgb(frame: av.VideoFrame, colorspace: str) -> np.ndarray:
    return frame.to_ndarray(format="rgb24", src_colorspace=colorspace, src_color_range="MPEG")


def test_rgb_to_yuv420p_is_bt709_limited_range() -> None:
    chart = _colour_chart()
    frame = rgb_to_yuv420p(chart)
    assert frame.format.name == "yuv420p" and (frame.width, frame.height) == (80, 8)
    luma = frame.to_ndarray()[:8]
    # Limited range: black at 16, white at 235; BT.709 green has luma 16 + 219 * 0.7152 = 173.
    assert luma[:, 56:64].max() == 16 and luma[:, 48:56].min() == 235
    assert abs(int(luma[4, 12]) - 173) <= 1
    as_709 = _back_to_rgb(frame, "ITU709").astype(int)
    as_601 = _back_to_rgb(frame, "ITU601").astype(int)
    assert np.abs(as_709 - chart).max() <= 3
    # Read with the other matrix the saturated patches are visibly off: the matrix matters.
    assert np.abs(as_601 - chart).max() > 20


@pytest.mark.parametrize("width", [1920, 962, 80])
def test_every_width_converts_the_same_whichever_copy_is_used(width: int) -> None:
    """Widths whose rows FFmpeg pads (962 * 3 bytes is not a multiple of its alignment) take
    the slower copy; both must give the picture sws would convert from a plain ndarray."""
    rng = np.random.default_rng(width)
    picture = rng.integers(0, 256, size=(64, width, 3), dtype=np.uint8)
    expected = av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(
        format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG", threads=1
    )
    assert np.array_equal(rgb_to_yuv420p(picture).to_ndarray(), expected.to_ndarray())
    # A view with gaps between rows (a crop) is made contiguous first, not read with a stride.
    wide = np.zeros((64, width + 10, 3), np.uint8)
    wide[:, :width] = picture
    assert np.array_equal(rgb_to_yuv420p(wide[:, :width]).to_ndarray(), expected.to_ndarray())


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
@pytest.mark.skipif(not NIGHT_1080P.exists(), reason="needs ../shared/media")
def test_conversions_start_no_threads() -> None:
    """FFmpeg's converters default to a pool of one thread per core each; in the pipeline every
    stage already has its thread, and extra pools only compete with inference for the cores."""
    with av.open(str(NIGHT_1080P)) as container:
        frames = list(container.decode(video=0))
    before = len(os.listdir("/proc/self/task"))
    for frame in frames:
        rgb = frame_to_rgb_u8(frame)
        rgb_to_yuv420p(rgb)
    assert len(os.listdir("/proc/self/task")) == before
