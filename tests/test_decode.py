"""FileSource and frame_to_rgb_u8 on the real clips in shared/media, and on broken files."""

from __future__ import annotations

import logging
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from media import CLIPS, media_path
from stages.decode import DecodeConfig, FileSource, VideoSourceError, frame_to_rgb_u8
from stages.frame import FramePacket


def _decode(path: Path, **kwargs: object) -> tuple[FileSource, list[FramePacket]]:
    source = FileSource(DecodeConfig(path=str(path), **kwargs))  # type: ignore[arg-type]
    source.setup()
    try:
        packets = list(source.items())
    finally:
        source.teardown()
    return source, packets


def _cv2_first_frame_rgb(path: Path) -> np.ndarray:
    capture = cv2.VideoCapture(str(path))
    try:
        ok, bgr = capture.read()
    finally:
        capture.release()
    assert ok, f"OpenCV could not read {path}"
    return bgr[:, :, ::-1]


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_every_clip_decodes_fully(name: str) -> None:
    expected_frames, (width, height) = CLIPS[name]
    source, packets = _decode(media_path(name))

    assert len(packets) == expected_frames
    assert (source.width, source.height) == (width, height)
    assert source.frames_decoded == expected_frames
    assert source.frames_lost_estimate == 0
    assert [p.index for p in packets] == list(range(expected_frames))
    assert all(p.stream_id == "0" for p in packets)
    first = packets[0].image_rgb_u8
    assert (
        first.dtype == np.uint8 and first.shape == (height, width, 3) and first.flags.c_contiguous
    )
    pts = np.array([p.pts_s for p in packets])
    assert pts[0] == pytest.approx(0.0)
    assert np.all(np.diff(pts) > 0), "pts_s must be strictly increasing"
    # Spacing matches the nominal rate on these constant-rate clips.
    assert np.median(np.diff(pts)) == pytest.approx(1.0 / source.frame_rate, rel=0.02)
    if source.total_frames is not None:
        assert abs(source.total_frames - expected_frames) <= 2


def test_raw_h265_without_timestamps_counts_at_nominal_rate() -> None:
    source, packets = _decode(media_path("cars_320x240.h265"))
    assert source.total_frames is None  # no container: no duration, no index
    assert source.frame_rate == 25.0
    np.testing.assert_allclose([p.pts_s for p in packets], np.arange(30) / 25.0)


def test_rotation_metadata_matches_opencv() -> None:
    # Coded 640x480 with a 90° display matrix: displayed 480 wide, 640 high, as OpenCV
    # (which rotates by default) and the ffmpeg CLI show it.
    path = media_path("person_asl_640x480_rotate90.mp4")
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        assert (frame.width, frame.height, frame.rotation) == (640, 480, 90)
        ours = frame_to_rgb_u8(frame)
    assert ours.shape == (640, 480, 3)
    reference = _cv2_first_frame_rgb(path)
    assert np.abs(ours.astype(np.int16) - reference).mean() < 1.0
    # The other three orientations would be far off: the check above can fail.
    wrong = np.ascontiguousarray(np.rot90(ours, k=2))
    assert np.abs(wrong.astype(np.int16) - reference).mean() > 10.0


def test_full_range_mjpeg_matches_opencv() -> None:
    path = media_path("cars_320x240_mjpeg.avi")
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        assert frame.format.name == "yuvj420p"
        ours = frame_to_rgb_u8(frame)
    assert np.abs(ours.astype(np.int16) - _cv2_first_frame_rgb(path)).mean() < 1.0


def test_full_range_flag_on_plain_yuv420p_is_honoured() -> None:
    # Newer decoders say "full range" with color_range on yuv420p instead of yuvj420p.
    path = media_path("cars_320x240_mjpeg.avi")
    with av.open(str(path)) as container:
        jpeg_frame = next(container.decode(video=0))
        reference = frame_to_rgb_u8(jpeg_frame)
        planes = jpeg_frame.to_ndarray()  # (H * 3/2, W) yuv420p layout, full-range values
    flagged = av.VideoFrame.from_ndarray(planes, format="yuv420p")
    flagged.color_range = 2  # AVCOL_RANGE_JPEG
    assert np.abs(frame_to_rgb_u8(flagged).astype(np.int16) - reference).mean() < 1.0


def test_variable_frame_rate_uses_real_timestamps(tmp_path: Path) -> None:
    times_s = [0.0, 0.1, 0.15, 0.4, 0.45, 1.0]
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, t in enumerate(times_s):
            image = np.full((48, 64, 3), 40 * i, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = round(t * 1000)
            frame.time_base = Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    _, packets = _decode(path)
    np.testing.assert_allclose([p.pts_s for p in packets], times_s, atol=1e-3)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VideoSourceError, match="not found"):
        FileSource(DecodeConfig(path=str(tmp_path / "nope.mp4"))).setup()


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.touch()
    with pytest.raises(VideoSourceError, match="empty"):
        FileSource(DecodeConfig(path=str(path))).setup()


def test_text_file_is_not_a_video(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 50)
    with pytest.raises(VideoSourceError, match="cannot open"):
        FileSource(DecodeConfig(path=str(path))).setup()


@pytest.mark.parametrize(("suffix", "codec"), [(".wav", "pcm_s16le"), (".m4a", "aac")])
def test_audio_only_file(tmp_path: Path, suffix: str, codec: str) -> None:
    path = tmp_path / f"tone{suffix}"
    rate = 16000
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        assert isinstance(stream, av.AudioStream)
        stream.layout = "mono"
        sine = np.sin(2 * np.pi * 440 * np.arange(rate) / rate)
        fmt = "s16" if codec == "pcm_s16le" else "fltp"
        samples = (sine * 20000).astype(np.int16) if fmt == "s16" else sine.astype(np.float32)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format=fmt, layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(VideoSourceError, match="no video stream"):
        FileSource(DecodeConfig(path=str(path))).setup()


def test_truncated_file_gives_what_decodes_and_reports_the_loss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = media_path("traffic_highway_960x540.mp4").read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: int(len(data) * 0.4)])
    with caplog.at_level(logging.WARNING, logger="stages.decode"):
        source, packets = _decode(path)
    assert 0 < len(packets) < 335
    assert source.frames_lost_estimate == 335 - len(packets)
    assert np.all(np.diff([p.pts_s for p in packets]) > 0)
    assert f"decoded {len(packets)} of ~335 frames; the file is truncated" in caplog.text


def test_file_cut_before_any_frame_raises(tmp_path: Path) -> None:
    data = media_path("traffic_highway_960x540.mp4").read_bytes()
    path = tmp_path / "header_only.mp4"
    path.write_bytes(data[: data.find(b"mdat") + 100])  # the index, and almost no picture data
    with pytest.raises(VideoSourceError, match="no frame"):
        FileSource(DecodeConfig(path=str(path))).setup()


def test_closing_items_early_closes_the_file() -> None:
    source = FileSource(DecodeConfig(path=str(media_path("traffic_highway_960x540.mp4"))))
    source.setup()
    items = source.items()
    taken = [next(items) for _ in range(3)]
    items.close()
    assert [p.index for p in taken] == [0, 1, 2]
    assert source._container is None
    source.teardown()  # idempotent


def test_realtime_paces_at_the_native_rate() -> None:
    # A lower bound only: pacing must not deliver 30 frames at 25 fps faster than 1.16 s.
    # (Sleeping can only make it later, so this cannot flake on a loaded machine.)
    start = time.monotonic()
    _, packets = _decode(media_path("cars_320x240_mjpeg.avi"), realtime=True)
    elapsed = time.monotonic() - start
    assert len(packets) == 30
    assert elapsed >= packets[-1].pts_s - 0.01
    arrivals = np.array([p.arrival_s for p in packets])
    assert arrivals[-1] - arrivals[0] >= packets[-1].pts_s - 0.01


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"path": ""}, "path"),
        ({"path": "a.mp4", "decode_threads": -1}, "decode_threads"),
        ({"path": "a.mp4", "stream_id": ""}, "stream_id"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DecodeConfig(**kwargs)  # type: ignore[arg-type]
