"""Small video files made here, with the timing quirks real footage has.

Every clip is complete (nothing cut off) and holds ``frames`` pictures: a moving bright square on
a dark background, so that each frame differs. The quirks are what made complete files look
"truncated" when truncation was judged from the container's frame-count estimate.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

WIDTH, HEIGHT = 160, 128


def picture(i: int) -> np.ndarray:
    """uint8 (HEIGHT, WIDTH, 3) RGB: a square that moves with ``i``."""
    image = np.full((HEIGHT, WIDTH, 3), 30, np.uint8)
    x = (8 * i) % (WIDTH - 40)
    image[40:80, x : x + 40] = (230, 200, 40)
    return image


def write_clip(
    path: Path,
    pts: list[int],
    time_base: Fraction,
    *,
    codec: str = "libx264",
    fmt: str | None = None,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    rate: int = 25,
    pix_fmt: str = "yuv420p",
) -> Path:
    """Encode ``len(pts)`` pictures with these presentation stamps (in ``time_base`` units)."""
    with av.open(str(path), "w", format=fmt, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = WIDTH, HEIGHT
        stream.pix_fmt = pix_fmt
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        stream.options = (
            {"preset": "ultrafast", **(options or {})} if codec == "libx264" else (options or {})
        )
        for i, stamp in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(picture(i), format="rgb24")
            frame.pts = stamp
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def vfr_with_a_pause(path: Path) -> Path:
    """MKV, 12 frames at 25 fps then one 4 s later: duration x rate says ~110 frames."""
    ms = [40 * i for i in range(12)] + [40 * 11 + 4000]
    return write_clip(path.with_suffix(".mkv"), ms, Fraction(1, 1000))


def b_frames(path: Path) -> Path:
    """MP4 with B-frames (decode order differs from display order), 14 frames."""
    return write_clip(
        path.with_suffix(".mp4"), list(range(14)), Fraction(1, 25), options={"bf": "3"}
    )


def live_mkv_without_duration(path: Path) -> Path:
    """Matroska written as a live stream: no duration, no index, no frame count."""
    return write_clip(
        path.with_suffix(".mkv"),
        [40 * i for i in range(10)],
        Fraction(1, 1000),
        container_options={"live": "1"},
    )


def mpegts_late_start(path: Path) -> Path:
    """MPEG-TS whose clock starts 10 hours in, at an odd 1/90000 spacing (29.97 fps)."""
    start = 10 * 3600 * 90000
    return write_clip(
        path.with_suffix(".ts"),
        [start + 3003 * i for i in range(11)],
        Fraction(1, 90000),
        fmt="mpegts",
        rate=30,
    )


def raw_h264(path: Path) -> Path:
    """Annex B H.264 with no container at all: no timestamps, no duration, no count."""
    return write_clip(path.with_suffix(".h264"), list(range(9)), Fraction(1, 25), fmt="h264")


def avi_mjpeg_irregular(path: Path) -> Path:
    """AVI (MJPEG) with gaps in its frame clock: the index counts frames, the stamps jump."""
    return write_clip(
        path.with_suffix(".avi"),
        [0, 1, 2, 5, 6, 9, 10, 11],
        Fraction(1, 25),
        codec="mjpeg",
        pix_fmt="yuvj420p",
    )


#: name: (maker, frames in the file)
UNUSUAL_TIMING: dict[str, tuple[Callable[[Path], Path], int]] = {
    "vfr_with_a_pause": (vfr_with_a_pause, 13),
    "b_frames": (b_frames, 14),
    "live_mkv_without_duration": (live_mkv_without_duration, 10),
    "mpegts_late_start": (mpegts_late_start, 11),
    "raw_h264": (raw_h264, 9),
    "avi_mjpeg_irregular": (avi_mjpeg_irregular, 8),
}
