"""Where the shared test clips live, for the video-stage tests.

The clips are in ``shared/media`` beside the repository (see its SOURCES.md); a test that needs
one calls ``media_path(name)``, which skips the test when the folder is not there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

MEDIA_DIR = Path(__file__).resolve().parents[2] / "shared" / "media"

# Frame counts and displayed sizes (width, height) from shared/media/SOURCES.md.
CLIPS: dict[str, tuple[int, tuple[int, int]]] = {
    "aerial_crosswalk_640x640.mp4": (419, (640, 640)),
    "cars_320x240.h265": (30, (320, 240)),
    "cars_320x240_mjpeg.avi": (30, (320, 240)),
    "flower_960x540_vp8.webm": (150, (960, 540)),
    "nasa_multistream_320x180.mp4": (325, (320, 180)),
    "pedestrians_night_street_1080p_mpeg4.mp4": (8, (1920, 1080)),
    "person_asl_640x480_rotate90.mp4": (89, (480, 640)),
    "traffic_highway_960x540.mp4": (335, (960, 540)),
}


def media_path(name: str) -> Path:
    """The path of clip ``name`` in shared/media; skips the calling test when it is missing."""
    path = MEDIA_DIR / name
    if not path.is_file():
        pytest.skip(f"test clip not found: {path} (the shared/ folder beside the repository)")
    return path
