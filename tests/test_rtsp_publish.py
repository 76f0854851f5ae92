"""The RTSP re-stream: publish annotated frames to the real test server and read them back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from rtsp_server import RtspServer, free_port
from stages.annotate import PALETTE_RGB, AnnotateConfig
from stages.decode import DecodeConfig, FileSource
from stages.frame import Detections, FramePacket
from stages.sinks.rtsp_publish import RtspPublishConfig, RtspPublishSink

pytestmark = pytest.mark.rtsp

BOX = (200.0, 150.0, 600.0, 400.0)  # drawn on every frame, class 0, untracked


def _frames(clip: Path, stream_id: str = "cam") -> Iterator[FramePacket]:
    """Real decoded frames of ``clip``, forever (looping), at the clip's own pace."""
    while True:
        source = FileSource(DecodeConfig(path=str(clip), stream_id=stream_id, realtime=True))
        source.setup()
        try:
            yield from source.items()
        finally:
            source.teardown()


class _Feeder:
    """Publishes frames from a thread, as the pipeline's sink thread would."""

    def __init__(self, sink: RtspPublishSink, clips: list[tuple[Path, int | None]]) -> None:
        self.sink = sink
        self.clips = clips  # (clip, how many frames; None: until stopped)
        self.stop = threading.Event()
        self.written = 0
        self.switched_at: float | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="feeder")

    def _run(self) -> None:
        try:
            self.sink.setup()
            pts_offset = 0.0
            last_pts = 0.0
            for n_clip, (clip, limit) in enumerate(self.clips):
                if n_clip > 0:
                    self.switched_at = time.monotonic()
                for k, packet in enumerate(_frames(clip)):
                    if self.stop.is_set() or (limit is not None and k >= limit):
                        break
                    packet.pts_s += pts_offset
                    last_pts = packet.pts_s
                    packet.detections = Detections(
                        boxes_xyxy=np.array([BOX], dtype=np.float32),
                        scores=np.array([0.9], dtype=np.float32),
                        class_ids=np.array([0], dtype=np.int64),
                    )
                    self.sink.write(packet)
                    self.written += 1
                pts_offset = last_pts + 1 / 30
        except BaseException as exc:  # handed to the test thread
            self.error = exc
        finally:
            self.sink.teardown()

    def __enter__(self) -> _Feeder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "feeder did not stop"
        if self.error is not None:
            raise self.error


def _read_published(url: str, n_frames: int, deadline_s: float) -> list[np.ndarray]:
    """Decode ``n_frames`` from ``url``, retrying while nobody publishes (503)."""
    deadline = time.monotonic() + deadline_s
    frames: list[np.ndarray] = []
    while time.monotonic() < deadline and len(frames) < n_frames:
        try:
            container = av.open(
                url, container_options={"rtsp_transport": "tcp", "probesize": "32"}, timeout=(5, 3)
            )
        except (av.FFmpegError, OSError):
            time.sleep(0.2)
            continue
        try:
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) >= n_frames or time.monotonic() > deadline:
                    break
        except av.FFmpegError:
            pass
        finally:
            container.close()
    return frames


def _box_edge_rgb(image: np.ndarray, scale_xy: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Mean colour of the box's top edge (8 px thick in the source), away from the corners;
    ``scale_xy``: stream pixels per source pixel (the box is drawn before rescaling)."""
    x1, y1, x2 = (
        round(v * k)
        for v, k in ((BOX[0], scale_xy[0]), (BOX[1], scale_xy[1]), (BOX[2], scale_xy[0]))
    )
    return image[y1 - 2 : y1 + 3, x1 + 40 : x2 - 40].reshape(-1, 3).mean(axis=0)


def _sink(url: str) -> RtspPublishSink:
    config = RtspPublishConfig(
        url=url, gop=15, annotation=AnnotateConfig(box_thickness=8, text_scale=0)
    )
    return RtspPublishSink(config, class_names=["person"])


def test_published_stream_is_the_annotated_video_and_keeps_its_size(media_dir: Path) -> None:
    with RtspServer(media_dir / "traffic_highway_960x540.mp4") as server:
        sink = _sink(server.publish_url)
        # 960x540 first, then a 640x640 clip, as after a camera reconnect at another size.
        clips = [
            (media_dir / "traffic_highway_960x540.mp4", 60),
            (media_dir / "aerial_crosswalk_640x640.mp4", None),
        ]
        with _Feeder(sink, clips) as feeder:
            first = _read_published(server.published_url, 20, deadline_s=20)
            while feeder.switched_at is None and feeder.thread.is_alive():
                time.sleep(0.05)
            after_switch = _read_published(server.published_url, 20, deadline_s=20)
    assert len(first) == 20 and len(after_switch) == 20
    assert all(f.shape == (540, 960, 3) for f in first + after_switch)
    expected = np.array(PALETTE_RGB[0], dtype=np.float64)
    # The box is drawn in each frame's own pixels, then the frame is rescaled: after the switch
    # to 640x640 it lands at BOX scaled by (960/640, 540/640) in the stream.
    for image, scale in ((first[-1], (1.0, 1.0)), (after_switch[-1], (960 / 640, 540 / 640))):
        assert np.abs(_box_edge_rgb(image, scale) - expected).max() < 40, _box_edge_rgb(
            image, scale
        )
    stats = sink.stats()
    assert stats.rescaled > 0 and stats.published > 40 and stats.connections == 1
    assert stats.skipped == 0


def test_publisher_survives_a_server_restart_and_publishes_again(media_dir: Path) -> None:
    with RtspServer(media_dir / "traffic_highway_960x540.mp4") as server:
        sink = _sink(server.publish_url)
        with _Feeder(sink, [(media_dir / "traffic_highway_960x540.mp4", None)]) as feeder:
            assert len(_read_published(server.published_url, 5, deadline_s=20)) == 5
            server.kill()
            time.sleep(1.5)  # frames written now are dropped, not fatal
            server.start()
            again = _read_published(server.published_url, 10, deadline_s=30)
            assert feeder.thread.is_alive()
    assert len(again) == 10
    stats = sink.stats()
    assert stats.connections >= 2
    assert stats.dropped > 0


def test_unreachable_server_drops_frames_without_failing(media_dir: Path) -> None:
    sink = _sink(f"rtsp://127.0.0.1:{free_port()}/publish")
    sink.setup()
    packets = _frames(media_dir / "cars_320x240_mjpeg.avi")
    start = time.monotonic()
    for _ in range(10):
        sink.write(next(packets))
    sink.teardown()
    assert time.monotonic() - start < 10
    stats = sink.stats()
    assert stats.published == 0 and stats.dropped == 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "http://127.0.0.1/publish"}, "url must be an rtsp:// URL"),
        ({"gop": 0}, "gop must be >= 1"),
        ({"preset": "turbo"}, "preset must be one of"),
        ({"retry_initial_s": 5.0, "retry_max_s": 1.0}, "retry_initial_s <= retry_max_s"),
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RtspPublishConfig(**kwargs)  # type: ignore[arg-type]
