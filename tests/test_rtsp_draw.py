"""The RTSP re-stream draws detections in the frame's own pixels, then rescales the picture to
the stream's size (a camera that reconnects at another resolution keeps its boxes in place).
No server needed: ``RtspPublishSink.picture()`` is what each frame is encoded from."""

from __future__ import annotations

import cv2
import numpy as np

from stages.annotate import AnnotateConfig, make_annotator
from stages.frame import Detections, FramePacket
from stages.sinks.rtsp_publish import RtspPublishConfig, RtspPublishSink


def _packet(width: int, height: int, boxes_xyxy: list[list[float]], index: int) -> FramePacket:
    image = np.full((height, width, 3), 90, np.uint8)
    count = len(boxes_xyxy)
    return FramePacket(
        stream_id="cam",
        index=index,
        pts_s=index / 25,
        image_rgb_u8=image,
        arrival_s=0.0,
        detections=Detections(
            boxes_xyxy=np.array(boxes_xyxy, np.float32).reshape(count, 4),
            scores=np.full(count, 0.9, np.float32),
            class_ids=np.zeros(count, np.int64),
            track_ids=np.full(count, -1, np.int64),
        ),
    )


def test_restream_draws_in_source_pixels_then_rescales() -> None:
    annotation = AnnotateConfig(box_thickness=2, text_scale=0)  # boxes only
    sink = RtspPublishSink(
        RtspPublishConfig(url="rtsp://127.0.0.1:9/x", annotation=annotation), ["car"]
    )
    sink.setup()
    first = sink.picture(_packet(640, 360, [], 0))  # fixes the stream at 640x360
    assert first.shape == (360, 640, 3)

    # The camera came back at half the size; the box is in those pixels.
    box = [40.0, 30.0, 200.0, 150.0]
    small = _packet(320, 180, [box], 1)
    got = sink.picture(small)
    assert got.shape == (360, 640, 3)

    drawn = make_annotator(annotation).annotate(small.image_rgb_u8, small.detections, ["car"])
    expected = cv2.resize(drawn, (640, 360), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(got, expected)

    # The box lands where it belongs in the stream's pixels (x2 scale): its left edge near
    # column 80, rows 60..300; rescaling first and drawing the source's coordinates would put
    # it at column 40 instead.
    changed = np.abs(got.astype(int) - 90).sum(axis=2) > 60
    columns = np.flatnonzero(changed[100:260].any(axis=0))
    assert 76 <= columns.min() <= 82 and 396 <= columns.max() <= 404
    assert not changed[100:260, 30:50].any()
    assert small.image_rgb_u8.max() == 90  # the packet's own picture is left as it was
