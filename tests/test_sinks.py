"""The file sinks (annotated MP4, JSON Lines, MOTChallenge) and the annotators, on real decoded
frames; outputs are read back with PyAV / json / plain parsing."""

from __future__ import annotations

import json
import logging
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from media import media_path
from stages.annotate import (
    AnnotateConfig,
    BoxAnnotator,
    LabelAnnotator,
    TrailAnnotator,
    color_for,
    make_annotator,
)
from stages.decode import DecodeConfig, FileSource
from stages.events import EVENT_SCHEMA_VERSION, track_started_event
from stages.frame import Detections, FramePacket
from stages.sinks.jsonl import JsonLinesSink, JsonLinesSinkConfig
from stages.sinks.mot import MotSink, MotSinkConfig
from stages.sinks.video import VideoFileSink, VideoSinkConfig

CLASS_NAMES = ["person", "bicycle", "car"]


def _real_packets(name: str, count: int) -> list[FramePacket]:
    source = FileSource(DecodeConfig(path=str(media_path(name))))
    source.setup()
    items = source.items()
    try:
        return [next(items) for _ in range(count)]
    finally:
        items.close()


def _with_detections(packet: FramePacket) -> FramePacket:
    i = packet.index
    packet.detections = Detections(
        boxes_xyxy=np.array(
            [[10 + 3 * i, 20, 200 + 3 * i, 150], [300, 200, 340.123, 260.456]], np.float32
        ),
        scores=np.array([0.91234, 0.5], np.float32),
        class_ids=np.array([2, 0], np.int64),
        track_ids=np.array([7, -1], np.int64),
    )
    return packet


def _read_video(path: Path) -> tuple[list[np.ndarray], list[float], av.VideoStream]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        return (
            [f.to_ndarray(format="rgb24") for f in frames],
            [float(f.time) for f in frames],
            stream,
        )


def _synthetic(index: int, pts_s: float, width: int, height: int, stream: str = "0") -> FramePacket:
    image = np.full((height, width, 3), (index * 20) % 256, dtype=np.uint8)
    return FramePacket(
        stream_id=stream, index=index, pts_s=pts_s, image_rgb_u8=image, arrival_s=time.monotonic()
    )


# --- annotated MP4 -----------------------------------------------------------------------


def test_mp4_of_real_frames_reads_back(tmp_path: Path) -> None:
    packets = [_with_detections(p) for p in _real_packets("traffic_highway_960x540.mp4", 20)]
    before = [p.image_rgb_u8.copy() for p in packets]
    sink = VideoFileSink(VideoSinkConfig(path=str(tmp_path / "out" / "a.mp4")), CLASS_NAMES)
    sink.setup()
    for p in packets:
        sink.write(p)
    sink.teardown()
    sink.teardown()  # idempotent

    images, times_s, _ = _read_video(tmp_path / "out" / "a.mp4")
    assert len(images) == 20 and sink.frames_written == 20
    assert images[0].shape == (540, 960, 3)
    assert np.all(np.diff(times_s) > 0)
    np.testing.assert_allclose(times_s, [p.pts_s for p in packets], atol=1e-3)
    with av.open(str(tmp_path / "out" / "a.mp4")) as container:
        assert container.streams.video[0].average_rate == Fraction(30000, 1001)
    # The packets' pictures are untouched: the sink drew on copies.
    for p, original in zip(packets, before):
        np.testing.assert_array_equal(p.image_rgb_u8, original)
    # Far from the boxes the picture survives encoding closely; at the box it shows the box.
    far = np.abs(images[10][300:, 400:].astype(int) - before[10][300:, 400:]).mean()
    assert far < 5.0
    left_edge = images[10][60:120, 10 + 30].astype(int)
    assert np.abs(left_edge - color_for(7, 2)).mean() < 40.0


def test_rotated_source_keeps_its_displayed_size(tmp_path: Path) -> None:
    packets = _real_packets("person_asl_640x480_rotate90.mp4", 8)
    sink = VideoFileSink(VideoSinkConfig(path=str(tmp_path / "r.mp4")))
    sink.setup()
    for p in packets:
        sink.write(p)
    sink.teardown()
    images, _, stream = _read_video(tmp_path / "r.mp4")
    assert len(images) == 8 and images[0].shape == (640, 480, 3)
    assert sink.frame_rate == 30  # snapped from the clip's jittery 1/16000 s timestamps
    assert stream.average_rate is not None
    assert float(stream.average_rate) == pytest.approx(30, rel=0.01)  # from the timestamps


@pytest.mark.parametrize(("width", "height"), [(320, 180), (321, 181), (64, 47)])
def test_odd_sizes_are_padded_to_even(tmp_path: Path, width: int, height: int) -> None:
    sink = VideoFileSink(VideoSinkConfig(path=str(tmp_path / "odd.mp4"), annotate=False))
    sink.setup()
    for i in range(6):
        sink.write(_synthetic(i, i / 25, width, height))
    sink.teardown()
    images, _, _ = _read_video(tmp_path / "odd.mp4")
    assert len(images) == 6
    assert images[0].shape == (height + height % 2, width + width % 2, 3)


@pytest.mark.parametrize("k", [1, 3, 12])
def test_teardown_after_k_frames_leaves_a_playable_file(tmp_path: Path, k: int) -> None:
    # What Ctrl-C does: the engine stops feeding the sink and calls teardown().
    packets = _real_packets("nasa_multistream_320x180.mp4", k)
    sink = VideoFileSink(VideoSinkConfig(path=str(tmp_path / "stopped.mp4")), CLASS_NAMES)
    sink.setup()
    for p in packets:
        sink.write(_with_detections(p))
    sink.teardown()
    images, times_s, _ = _read_video(tmp_path / "stopped.mp4")
    assert len(images) == k
    assert images[0].shape == (180, 320, 3)
    np.testing.assert_allclose(times_s, [p.pts_s for p in packets], atol=1e-3)


def test_pictures_reused_upstream_after_write_are_recorded_as_written(tmp_path: Path) -> None:
    """A source may refill a picture's memory once write() returns: the sink keeps its own copy
    of frames it holds (before the encoder opens) and copies the rest into the encoder at once."""
    sink = VideoFileSink(VideoSinkConfig(path=str(tmp_path / "reuse.mp4"), annotate=False))
    sink.setup()
    shared = np.zeros((64, 64, 3), np.uint8)
    levels = [40, 80, 120, 160, 200, 240, 30, 90]  # 8 frames: the first ones are held
    for i, level in enumerate(levels):
        shared[:] = level
        sink.write(
            FramePacket(
                stream_id="0",
                index=i,
                pts_s=i / 25,
                image_rgb_u8=shared,
                arrival_s=time.monotonic(),
            )
        )
    shared[:] = 0
    sink.teardown()
    images, _, _ = _read_video(tmp_path / "reuse.mp4")
    assert [round(float(im.mean())) for im in images] == pytest.approx(levels, abs=3)


def test_out_of_order_and_repeated_pts_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pts = [0.0, 0.04, 0.04, 0.02, 0.08, 0.12, 0.16, 0.2]
    sink = VideoFileSink(VideoSinkConfig(path=str(tmp_path / "pts.mp4"), annotate=False))
    sink.setup()
    with caplog.at_level(logging.WARNING, logger="stages.sinks.video"):
        for i, t in enumerate(pts):
            sink.write(_synthetic(i, t, 64, 48))
        sink.teardown()
    assert (sink.frames_written, sink.frames_skipped) == (6, 2)
    assert "not after the last written frame" in caplog.text
    _, times_s, _ = _read_video(tmp_path / "pts.mp4")
    np.testing.assert_allclose(times_s, [0.0, 0.04, 0.08, 0.12, 0.16, 0.2], atol=1e-3)


def test_other_streams_are_ignored(tmp_path: Path) -> None:
    sink = VideoFileSink(
        VideoSinkConfig(path=str(tmp_path / "s.mp4"), stream_id="cam-b", annotate=False)
    )
    sink.setup()
    for i in range(6):
        sink.write(_synthetic(i, i / 25, 64, 48, stream="cam-a"))
        sink.write(_synthetic(i, i / 25, 96, 64, stream="cam-b"))
    sink.teardown()
    images, _, _ = _read_video(tmp_path / "s.mp4")
    assert len(images) == 6 and images[0].shape == (64, 96, 3)


def test_fragmented_mp4_reads_back(tmp_path: Path) -> None:
    sink = VideoFileSink(
        VideoSinkConfig(path=str(tmp_path / "f.mp4"), fragmented=True, annotate=False)
    )
    sink.setup()
    for i in range(10):
        sink.write(_synthetic(i, i / 30, 64, 48))
    sink.teardown()
    images, _, _ = _read_video(tmp_path / "f.mp4")
    assert len(images) == 10


def test_no_frames_writes_no_file(tmp_path: Path) -> None:
    sink = VideoFileSink(VideoSinkConfig(path=str(tmp_path / "none.mp4")))
    sink.setup()
    sink.teardown()
    assert not (tmp_path / "none.mp4").exists()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"path": ""}, "path"),
        ({"path": "a.mp4", "preset": "warp"}, "preset"),
        ({"path": "a.mp4", "crf": 52}, "crf"),
        ({"path": "a.mp4", "frame_rate": -1.0}, "frame_rate"),
        ({"path": "a.mp4", "encode_threads": -1}, "encode_threads"),
    ],
)
def test_video_config_rejects_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        VideoSinkConfig(**kwargs)  # type: ignore[arg-type]


# --- annotators ---------------------------------------------------------------------------


def _dets() -> Detections:
    return Detections(
        boxes_xyxy=np.array([[10, 20, 60, 90], [70, 10, 95, 40]], np.float32),
        scores=np.array([0.9, 0.4], np.float32),
        class_ids=np.array([2, 0], np.int64),
        track_ids=np.array([5, -1], np.int64),
    )


def test_box_annotator_draws_on_a_copy_in_the_row_colour() -> None:
    scene = np.zeros((100, 120, 3), np.uint8)
    out = BoxAnnotator(thickness=1).annotate(scene, _dets(), CLASS_NAMES)
    assert not scene.any()
    assert tuple(out[50, 10]) == color_for(5, 2)  # left edge of the tracked box: its track's colour
    assert tuple(out[25, 95]) == color_for(-1, 0)  # right edge of the untracked one: class colour
    assert not out[50, 30].any()  # inside a box: untouched


def test_label_caption_text() -> None:
    labels = LabelAnnotator()
    assert labels.caption(2, 0.912, 5, CLASS_NAMES) == "car 0.91 #5"
    assert labels.caption(0, 0.4, -1, CLASS_NAMES) == "person 0.40"
    assert labels.caption(99, 0.5, 3, CLASS_NAMES) == "class_99 0.50 #3"  # stages.events.label_for
    assert (
        LabelAnnotator(show_score=False, show_track_id=False).caption(2, 0.9, 5, CLASS_NAMES)
        == "car"
    )


def test_full_annotation_of_a_real_frame_leaves_the_frame_alone() -> None:
    packet = _with_detections(_real_packets("cars_320x240_mjpeg.avi", 1)[0])
    original = packet.image_rgb_u8.copy()
    annotator = make_annotator(AnnotateConfig(trail_length=10))
    assert packet.detections is not None
    out = annotator.annotate(packet.image_rgb_u8, packet.detections, CLASS_NAMES)
    np.testing.assert_array_equal(packet.image_rgb_u8, original)
    assert out.shape == original.shape and out.dtype == np.uint8
    assert (out != original).any(axis=2).mean() > 0.005  # something was drawn


def test_boxes_outside_the_picture_and_nan_rows_do_not_crash() -> None:
    dets = Detections(
        boxes_xyxy=np.array([[-50, -50, 500, 500], [np.nan, 0, 10, 10]], np.float32),
        scores=np.array([0.9, 0.9], np.float32),
        class_ids=np.array([1, 1], np.int64),
    )
    out = make_annotator(AnnotateConfig()).annotate(
        np.zeros((40, 60, 3), np.uint8), dets, CLASS_NAMES
    )
    assert out.any()


def test_trail_memory_is_bounded() -> None:
    trails = TrailAnnotator(length=5)
    scene = np.zeros((100, 100, 3), np.uint8)
    for t in range(50):
        dets = Detections(
            boxes_xyxy=np.array([[t, 10, t + 10, 20]], np.float32),
            scores=np.array([0.9], np.float32),
            class_ids=np.array([0], np.int64),
            track_ids=np.array([t // 3], np.int64),  # a new track every third frame
        )
        trails.draw(scene, dets, CLASS_NAMES)
    assert trails.tracks_held <= 5
    assert all(len(points) <= 5 for points in trails._points.values())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"box_thickness": 0}, "box_thickness"),
        ({"text_scale": -1.0}, "text_scale"),
        ({"trail_length": 1}, "trail_length"),
    ],
)
def test_annotate_config_rejects_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AnnotateConfig(**kwargs)  # type: ignore[arg-type]


# --- JSON Lines ---------------------------------------------------------------------------


def test_jsonl_one_frame_message_per_packet_and_events_on_their_own_lines(tmp_path: Path) -> None:
    packets = [_with_detections(p) for p in _real_packets("cars_320x240.h265", 5)]
    packets[4].detections = None  # a frame no detector looked at
    started = track_started_event(
        stream="0",
        frame=2,
        pts_s=0.08,
        track_id=7,
        class_id=2,
        box_xyxy=[13, 20, 203, 150],
        class_names=CLASS_NAMES,
    )
    sink = JsonLinesSink(JsonLinesSinkConfig(path=str(tmp_path / "d.jsonl")), CLASS_NAMES)
    sink.setup()
    for p in packets:
        if p.index == 2:
            sink.on_event(started)  # as the runner delivers it: before its frame
        sink.write(p)
    # Flushed per line: everything is readable before teardown (what a crash would leave).
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 6
    sink.teardown()

    lines = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert [(line["type"], line["frame"]) for line in lines] == [
        ("frame", 0),
        ("frame", 1),
        ("track_started", 2),
        ("frame", 2),
        ("frame", 3),
        ("frame", 4),
    ]
    frames = [line for line in lines if line["type"] == "frame"]
    assert all(line["v"] == EVENT_SCHEMA_VERSION for line in lines)
    assert frames[1]["stream"] == "0" and frames[1]["pts_s"] == pytest.approx(0.04)
    assert (frames[1]["width"], frames[1]["height"]) == (320, 240)
    first = frames[1]["detections"][0]
    assert first == {
        "box_xyxy": [13.0, 20.0, 203.0, 150.0],
        "score": 0.9123,
        "class_id": 2,
        "label": "car",
        "track_id": 7,
    }
    assert frames[1]["detections"][1]["box_xyxy"] == [300.0, 200.0, 340.12, 260.46]
    assert frames[1]["detections"][1]["track_id"] is None
    assert lines[2] == started
    assert frames[4]["detections"] == []


def test_jsonl_rows_with_non_finite_numbers_are_left_out_and_lines_stay_strict_json(
    tmp_path: Path,
) -> None:
    packet = _synthetic(0, 0.0, 8, 8)
    packet.detections = Detections(
        boxes_xyxy=np.array([[np.nan, 1, 2, np.inf], [1, 1, 4, 4]], np.float32),
        scores=np.array([0.5, 0.25], np.float32),
        class_ids=np.array([9, 9], np.int64),
    )
    sink = JsonLinesSink(JsonLinesSinkConfig(path=str(tmp_path / "n.jsonl")), CLASS_NAMES)
    sink.setup()
    sink.write(packet)
    sink.on_event({"v": EVENT_SCHEMA_VERSION, "type": "x", "stream": "0", "bad": float("nan")})
    sink.teardown()
    lines = (tmp_path / "n.jsonl").read_text().splitlines()
    assert len(lines) == 1  # the broken event is logged and skipped, the run goes on
    line = json.loads(lines[0])
    assert [d["box_xyxy"] for d in line["detections"]] == [[1.0, 1.0, 4.0, 4.0]]
    assert line["detections"][0]["label"] == "class_9"  # one fallback for every output


def test_jsonl_flush_every_n(tmp_path: Path) -> None:
    sink = JsonLinesSink(JsonLinesSinkConfig(path=str(tmp_path / "b.jsonl"), flush_every=4))
    sink.setup()
    for i in range(6):
        sink.write(_synthetic(i, i / 25, 8, 8))
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 4
    sink.teardown()
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 6


# --- MOTChallenge -------------------------------------------------------------------------


def test_mot_lines_only_tracked_one_based(tmp_path: Path) -> None:
    packets = [_with_detections(p) for p in _real_packets("cars_320x240_mjpeg.avi", 3)]
    packets.append(_synthetic(3, 0.12, 8, 8, stream="other"))
    sink = MotSink(MotSinkConfig(path=str(tmp_path / "mot" / "seq.txt")))
    sink.setup()
    for p in packets:
        sink.write(p)
    sink.teardown()
    lines = (tmp_path / "mot" / "seq.txt").read_text().splitlines()
    assert lines == [
        "1,7,10.00,20.00,190.00,130.00,0.9123,-1,-1,-1",
        "2,7,13.00,20.00,190.00,130.00,0.9123,-1,-1,-1",
        "3,7,16.00,20.00,190.00,130.00,0.9123,-1,-1,-1",
    ]
    for line in lines:
        fields = line.split(",")
        assert len(fields) == 10
        frame, track_id = int(fields[0]), int(fields[1])
        assert frame >= 1 and track_id >= 0


def test_a_later_size_is_scaled_to_the_first(tmp_path: Path) -> None:
    """A camera that comes back at another resolution keeps recording, at the first size."""
    path = tmp_path / "resized.mp4"
    sink = VideoFileSink(VideoSinkConfig(path=str(path), frame_rate=25.0))
    sink.setup()
    for i in range(6):
        width, height = (320, 240) if i < 3 else (640, 360)
        sink.write(_synthetic(i, i / 25, width, height))
    sink.teardown()
    frames, _, _ = _read_video(path)
    assert len(frames) == 6
    assert {f.shape for f in frames} == {(240, 320, 3)}
