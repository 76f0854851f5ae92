"""Write an annotated H.264 MP4 of one stream.

Input: ``FramePacket``s (read only): ``image_rgb_u8`` (uint8 ``(H, W, 3)`` RGB, displayed
orientation), ``pts_s``, ``detections`` (boxes in that picture's pixels).
Output: an MP4 file (libx264, yuv420p, BT.709 limited range, tagged as such) at the picture's
own size, frames timed by their ``pts_s`` (so variable rate and dropped frames stay true to
time), shifted so the first written frame is at 0.

The encoder opens lazily on the stream's fifth frame (or at teardown if there were fewer): the
size comes from the first picture and, unless ``frame_rate`` is set, the nominal rate from the
median step of the first timestamps, snapped to a standard rate (29.97, 25, …) within 1.5 %.
x264 uses the rate for rate control; the MP4's timing comes from the timestamps.

Odd sizes: yuv420p needs even width and height, so an odd dimension is padded by one pixel
(the last column/row repeated), logged once. A frame whose ``pts_s`` is not after the last
written one is skipped with a warning (counted in ``frames_skipped``), never a crash. Packets of
other streams are ignored (one MP4 per stream).

Abort safety: ``teardown()`` flushes the encoder and closes the container (writing the MP4
index), so a run stopped by Ctrl-C, which goes through teardown, leaves a playable file with
every frame written so far. A hard kill (SIGKILL, power loss) skips teardown and leaves a
plain MP4 without its index, which is unplayable; ``fragmented=True`` writes a fragmented MP4
instead, playable up to the last complete fragment (about one keyframe interval) even then.

Thread: the sink's own thread (setup, write, teardown); annotation happens here on a copy of
the picture. Ownership: nothing is handed on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from pipeline.stage import StageBase
from stages.annotate import AnnotateConfig, Annotator, make_annotator
from stages.frame import FramePacket
from stages.sinks.yuv import X264_PRESETS, rgb_to_yuv420p, tag_bt709_limited

logger = logging.getLogger(__name__)

# MP4 timestamps in 1/90000 s (the MPEG clock): exact for 25, 30 and 30000/1001 fps, and fine
# enough (11 µs) for anything else.
_TIME_BASE = Fraction(1, 90000)
_DEFAULT_RATE = Fraction(30)
_STANDARD_RATES = tuple(
    Fraction(r)
    for r in (
        "24000/1001",
        "24",
        "25",
        "30000/1001",
        "30",
        "50",
        "60000/1001",
        "60",
        "1",
        "2",
        "3",
        "5",
        "6",
        "10",
        "12",
        "12.5",
        "15",
        "20",
    )
)
# Frames held before the encoder opens, to measure the rate from their timestamps.
_RATE_PROBE_FRAMES = 5


@dataclass(frozen=True)
class VideoSinkConfig:
    """Settings of a ``VideoFileSink``.

    Attributes:
        path: the MP4 to write (parent folders are created).
        stream_id: the stream to record; ``None`` records the stream of the first packet.
        annotate: draw detections (boxes, captions, trails as ``annotation`` says).
        annotation: what to draw.
        preset: libx264 speed/size trade-off.
        crf: libx264 constant quality, 0 (lossless) to 51; 23 is x264's default.
        frame_rate: nominal frames per second for the encoder (e.g. ``FileSource.frame_rate``);
            0 measures it from the first timestamps.
        encode_threads: libx264 threads; 0 lets x264 choose.
        fragmented: write a fragmented MP4 that survives a hard kill (see the module doc).
    """

    path: str
    stream_id: str | None = None
    annotate: bool = True
    annotation: AnnotateConfig = field(default_factory=AnnotateConfig)
    preset: str = "veryfast"
    crf: int = 23
    frame_rate: float = 0.0
    encode_threads: int = 0
    fragmented: bool = False

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("video_sink.path must name an output file, got an empty string")
        if self.preset not in X264_PRESETS:
            raise ValueError(
                f"video_sink.preset must be one of {', '.join(X264_PRESETS)}, got {self.preset!r}"
            )
        if not 0 <= self.crf <= 51:
            raise ValueError(f"video_sink.crf must be in [0, 51], got {self.crf}")
        if self.frame_rate < 0 or self.frame_rate > 1000:
            raise ValueError(
                f"video_sink.frame_rate must be 0 (measure) or in (0, 1000], got {self.frame_rate}"
            )
        if self.encode_threads < 0:
            raise ValueError(f"video_sink.encode_threads must be >= 0, got {self.encode_threads}")


class VideoFileSink(StageBase[FramePacket]):
    """Sink[FramePacket]: the annotated MP4 of one stream.

    Args:
        config: the settings.
        class_names: caption text per class id.
        annotator: drawing to apply instead of the one ``config.annotation`` describes.
    """

    def __init__(
        self,
        config: VideoSinkConfig,
        class_names: Sequence[str] = (),
        annotator: Annotator | None = None,
    ) -> None:
        self.config = config
        self.name = "video_sink"
        self.class_names = tuple(class_names)
        self._annotator = annotator
        self._stream_id = config.stream_id
        self._container: av.container.OutputContainer | None = None
        self._stream: av.VideoStream | None = None
        self._pending: list[tuple[np.ndarray, float]] = []
        self._size: tuple[int, int] | None = None  # (width, height) of the first picture
        self._rescaled_sizes: set[tuple[int, int]] = set()
        self._origin_s: float | None = None
        self._last_pts: int | None = None
        self._warned_streams: set[str] = set()
        self._closed = False
        self.frames_written = 0
        self.frames_skipped = 0
        # The nominal rate the encoder was opened with (``None`` until it opens).
        self.frame_rate: Fraction | None = None

    @property
    def path(self) -> Path:
        return Path(self.config.path)

    def setup(self) -> None:
        path = self.path
        if path.is_dir():
            raise ValueError(f"video_sink.path is a folder, not a file: {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._annotator is None and self.config.annotate:
            self._annotator = make_annotator(self.config.annotation)

    def write(self, item: FramePacket) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name}: write() after teardown()")
        if self._stream_id is None:
            self._stream_id = item.stream_id
        if item.stream_id != self._stream_id:
            if item.stream_id not in self._warned_streams:
                self._warned_streams.add(item.stream_id)
                logger.warning(
                    "%s records stream %r; ignoring packets of stream %r",
                    self.path,
                    self._stream_id,
                    item.stream_id,
                )
            return
        picture = item.image_rgb_u8
        size = (picture.shape[1], picture.shape[0])
        if self._size is None:
            self._size = size
        if self.config.annotate and self._annotator is not None and item.detections is not None:
            picture = self._annotator.annotate(
                picture, item.detections, self.class_names, item.analytics
            )
        if size != self._size:
            # A camera that came back at another resolution: an MP4 stream has one size, so
            # later pictures are scaled to the first one (after drawing, in their own pixels).
            if size not in self._rescaled_sizes:
                self._rescaled_sizes.add(size)
                logger.warning(
                    "%s: frames of %dx%d are scaled to the first frame's %dx%d",
                    self.path,
                    size[0],
                    size[1],
                    self._size[0],
                    self._size[1],
                )
            picture = cv2.resize(picture, self._size, interpolation=cv2.INTER_AREA)
        if self._container is None:
            # Held until the encoder opens (a few frames): our own copy, as the packet's picture
            # may be reused upstream. Once open, each picture is copied into its frame at once.
            held = picture.copy() if picture is item.image_rgb_u8 else picture
            self._pending.append((held, item.pts_s))
            if len(self._pending) < _RATE_PROBE_FRAMES:
                return
            self._open()
            pending, self._pending = self._pending, []
            for image, pts_s in pending:
                self._encode(image, pts_s, item.index)
            return
        self._encode(picture, item.pts_s, item.index)

    def teardown(self) -> None:
        """Flush the encoder and close the file (idempotent). With no frame, no file is made."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._container is None and self._pending:
                self._open()
                for image, pts_s in self._pending:
                    self._encode(image, pts_s, -1)
            self._pending = []
            if self._container is None:
                logger.warning("%s: no frames arrived; no video written", self.path)
                return
            assert self._stream is not None
            self._container.mux(self._stream.encode(None))
        finally:
            if self._container is not None:
                container, self._container = self._container, None
                container.close()
                logger.info(
                    "%s: wrote %d frames (%d skipped)",
                    self.path,
                    self.frames_written,
                    self.frames_skipped,
                )

    # --- internals -----------------------------------------------------------------------

    def _open(self) -> None:
        assert self._size is not None
        width, height = self._size
        even_w, even_h = width + width % 2, height + height % 2
        if (even_w, even_h) != (width, height):
            logger.info(
                "%s: %dx%d is odd; yuv420p needs even sizes, padding to %dx%d (edge pixels repeated)",
                self.path,
                width,
                height,
                even_w,
                even_h,
            )
        rate = self._nominal_rate()
        options = {"preset": self.config.preset, "crf": str(self.config.crf)}
        container_options = {}
        if self.config.fragmented:
            container_options["movflags"] = "+frag_keyframe+empty_moov+default_base_moof"
        container = av.open(str(self.path), mode="w", format="mp4", options=container_options)
        try:
            stream = container.add_stream("libx264", rate=rate, options=options)
            stream.width, stream.height, stream.pix_fmt = even_w, even_h, "yuv420p"
            stream.time_base = _TIME_BASE
            context = stream.codec_context
            context.time_base = _TIME_BASE
            context.thread_count = self.config.encode_threads
            tag_bt709_limited(context)  # say what the pixels are (see rgb_to_yuv420p)
        except Exception:
            container.close()
            raise
        self._container, self._stream = container, stream
        self.frame_rate = rate
        logger.info(
            "%s: H.264 %dx%d, ~%.3f fps, preset %s",
            self.path,
            even_w,
            even_h,
            float(rate),
            self.config.preset,
        )

    def _nominal_rate(self) -> Fraction:
        if self.config.frame_rate > 0:
            return Fraction(self.config.frame_rate).limit_denominator(1001)
        steps = np.diff([pts_s for _, pts_s in self._pending])
        steps = steps[steps > 0]
        if len(steps) == 0:
            return _DEFAULT_RATE
        measured = 1.0 / float(np.median(steps))
        # Timestamps in coarse time bases jitter (1/16000 s gives 30.3 fps from one step): snap
        # to a standard rate when one is within 1.5 %.
        nearest = min(_STANDARD_RATES, key=lambda r: abs(measured / float(r) - 1.0))
        if abs(measured / float(nearest) - 1.0) < 0.015:
            return nearest
        return Fraction(measured).limit_denominator(1001)

    def _encode(self, picture: np.ndarray, pts_s: float, index: int) -> None:
        assert self._container is not None and self._stream is not None
        if self._origin_s is None:
            self._origin_s = pts_s
        pts = round((pts_s - self._origin_s) / _TIME_BASE)
        if self._last_pts is not None and pts <= self._last_pts:
            self.frames_skipped += 1
            logger.warning(
                "%s: skipping frame %d: pts %.4f s is not after the last written frame",
                self.path,
                index,
                pts_s,
            )
            return
        height, width = picture.shape[:2]
        if width % 2 or height % 2:
            picture = np.pad(picture, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        frame = rgb_to_yuv420p(picture)
        frame.pts = pts
        frame.time_base = _TIME_BASE
        self._container.mux(self._stream.encode(frame))
        self._last_pts = pts
        self.frames_written += 1

    def _skip(self, item: FramePacket, why: str) -> None:
        self.frames_skipped += 1
        logger.warning(
            "%s: skipping frame %d of stream %r: %s", self.path, item.index, item.stream_id, why
        )
