"""Decode a video file into ``FramePacket``s.

Input: a path to any container/codec FFmpeg reads (MP4, MKV/WebM, AVI, raw Annex B H.264/H.265…).
Output: one ``FramePacket`` per decoded frame of the first video stream, with ``image_rgb_u8``
the displayed picture (rotation metadata applied, full range handled) and ``pts_s`` seconds from
the stream's start, strictly increasing.

Thread: ``setup()``, ``items()`` and ``teardown()`` run in the source's own thread (the engine's
source thread); FFmpeg decodes with its own worker threads underneath (``decode_threads``).

Ownership: every packet holds a freshly allocated image array; once yielded, the packet belongs
to whoever took it from ``items()`` and the decoder never touches it again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from pipeline.stage import StageBase
from stages.frame import FramePacket

logger = logging.getLogger(__name__)

# FFmpeg and GStreamer assume 25 fps for streams that carry no rate (raw Annex B).
_FALLBACK_FRAME_RATE = 25.0
# A Matroska/WebM file cut mid-cluster ends without an error: the demuxer drops the partial
# block silently (it only logs, and PyAV's logging is off: it can deadlock FFmpeg's threads).
# Its Duration element, though, is written by the muxer when the file is finished, so a stream
# that stops this far short of it was cut. (Frame-count estimates are no evidence: duration x
# rate is wrong for every VFR file, and AVI/MP4 counts include dropped-frame gaps.)
_MATROSKA_SHORT_S = 0.5


class VideoSourceError(ValueError):
    """A video source cannot be read: missing, empty, not a video, or nothing decodes.

    A ``ValueError``: bad input, refused in one line before the pipeline starts."""


def frame_to_rgb_u8(frame: av.VideoFrame) -> np.ndarray:
    """The picture as it should be displayed, as uint8 ``(H, W, 3)`` RGB, C-contiguous.

    Colour: PyAV's reformatter reads the frame's colour range and matrix (``yuvj420p`` and
    ``yuv420p`` flagged full range both come out right); on the eight clips in
    /work/shared/media the result equals OpenCV's ``VideoCapture`` output exactly.

    Rotation: PyAV returns the coded picture and reports ``frame.rotation``, the angle in degrees
    by which the display matrix turns it counterclockwise; ``np.rot90`` turns counterclockwise
    too, so ``k = rotation / 90``. A 640x480 frame with ``rotation == 90`` becomes 480 wide and
    640 high, as ffmpeg and OpenCV show it. Angles that are not a multiple of 90 are rounded to
    the nearest one; mirroring in the display matrix is ignored.
    """
    # threads=1: converted in the calling stage's thread. FFmpeg's default is a pool of one
    # thread per core for every converter, which then competes with inference for the cores
    # (the pipeline gets its parallelism from its stages, not from here).
    rgb = frame.to_ndarray(format="rgb24", threads=1)
    quarter_turns = round(frame.rotation / 90) % 4
    if quarter_turns == 0:
        return rgb
    return np.ascontiguousarray(np.rot90(rgb, k=quarter_turns))


@dataclass(frozen=True)
class DecodeConfig:
    """Settings of a ``FileSource``.

    Attributes:
        path: the video file.
        stream_id: written into every packet's ``stream_id``.
        realtime: pace frames at the file's own rate (sleep until each frame's ``pts_s`` after
            the first), as a camera would deliver them; otherwise decode as fast as possible.
        decode_threads: FFmpeg decoder threads; 0 lets FFmpeg pick one per core. 2 suits a
            2-core machine where other stages need the CPU too.
        max_frames: stop after this many frames (a preview of a long file); ``None``: all.
    """

    path: str
    stream_id: str = "0"
    realtime: bool = False
    decode_threads: int = 2
    max_frames: int | None = None

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("decode.path must name a video file, got an empty string")
        if not self.stream_id:
            raise ValueError("decode.stream_id must not be empty")
        if self.decode_threads < 0:
            raise ValueError(f"decode.decode_threads must be >= 0, got {self.decode_threads}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"decode.max_frames must be >= 1 or null, got {self.max_frames}")


class FileSource(StageBase[FramePacket]):
    """Source[FramePacket] reading one video file.

    After ``setup()``: ``width``/``height`` (displayed, after rotation), ``frame_rate``,
    ``total_frames`` (an estimate or ``None``). After ``items()`` is exhausted:
    ``frames_decoded``, ``truncation`` (why the file is judged truncated, ``None`` when it
    ended cleanly) and ``frames_lost_estimate`` (for a truncated file, frames short of the
    container's count when it has one, else 0).

    A file is judged truncated only on evidence: the demuxer or decoder failed, or the data
    ended inside a packet. Never from the frame count alone, which containers often misstate.

    Raises ``VideoSourceError`` from ``setup()`` (and ``check()``) when the file is missing,
    empty, not a video, has no video stream, or no frame decodes.
    """

    def __init__(self, config: DecodeConfig) -> None:
        self.config = config
        self.name = f"decode:{config.stream_id}"
        self._path = Path(config.path)
        self._container: av.container.InputContainer | None = None
        self._stream: av.VideoStream | None = None
        self._first_frame: av.VideoFrame | None = None
        self._frames: Iterator[av.VideoFrame] | None = None
        self._decode_errors = 0
        self._last_error: Exception | None = None
        self._width = 0
        self._height = 0
        self._frame_rate = _FALLBACK_FRAME_RATE
        self._total_frames: int | None = None
        self._total_is_exact = False
        self._evidence: list[str] = []  # why the file is judged cut short, if it is
        self.frames_decoded = 0
        self.frames_lost_estimate = 0
        self.truncation: str | None = None

    # --- what is known after setup -------------------------------------------------------

    @property
    def width(self) -> int:
        """Displayed width in pixels (after rotation)."""
        return self._width

    @property
    def height(self) -> int:
        """Displayed height in pixels (after rotation)."""
        return self._height

    @property
    def frame_rate(self) -> float:
        """Nominal frames per second (the container's average rate; 25 when it has none)."""
        return self._frame_rate

    @property
    def total_frames(self) -> int | None:
        """Expected number of frames, for a progress bar: exact from the container's index
        when it has one, else duration × rate, else ``None`` (raw streams); at most
        ``max_frames``."""
        if self.config.max_frames is not None and self._total_frames is not None:
            return min(self._total_frames, self.config.max_frames)
        return self._total_frames

    # --- stage methods -------------------------------------------------------------------

    def check(self) -> None:
        """Open the file, decode its first frame and close it again: the check phase, in the
        main thread before any stage starts. Raises what ``setup()`` raises."""
        self.setup()
        self.teardown()

    def setup(self) -> None:
        """Open the file and decode the first frame, so that every "cannot read" error is
        raised here, before the pipeline starts, and the picture size is known."""
        path = self._path
        if not path.exists():
            raise VideoSourceError(
                f"video file not found: {path} (check --source or sources[].file.path)"
            )
        if not path.is_file():
            raise VideoSourceError(
                f"video path is not a file: {path} (give a video file, not a folder)"
            )
        if path.stat().st_size == 0:
            raise VideoSourceError(
                f"video file is empty (0 bytes): {path} (give a complete video file)"
            )
        # A fresh start (check() opened the file once before).
        self._evidence = []
        self._decode_errors = 0
        self._last_error = None
        try:
            container = av.open(str(path), mode="r")
        except av.FFmpegError as exc:
            raise VideoSourceError(
                f"cannot open {path} as a video ({exc.strerror}); give a video file FFmpeg reads"
            ) from exc
        self._container = container
        if not container.streams.video:
            kinds: list[str] = sorted({str(s.type) for s in container.streams}) or ["none"]
            self.teardown()
            raise VideoSourceError(
                f"{path} has no video stream (streams: {', '.join(kinds)}); give a file with video"
            )
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = self.config.decode_threads
        self._stream = stream
        self._frame_rate = _stream_rate(stream)
        self._total_frames, self._total_is_exact = _estimate_total(
            stream, container, self._frame_rate
        )

        self._frames = self._decode_all()
        self._first_frame = next(self._frames, None)
        if self._first_frame is None:
            detail = f": {self._last_error}" if self._last_error else ""
            self.teardown()
            raise VideoSourceError(
                f"no frame of {path} could be decoded{detail}; is the file cut short or damaged?"
            )
        first = frame_to_rgb_u8(self._first_frame)
        self._height, self._width = first.shape[:2]
        logger.info(
            "opened %s: %s %dx%d (displayed), %.3f fps, ~%s frames",
            path,
            stream.codec_context.name,
            self._width,
            self._height,
            self._frame_rate,
            self._total_frames if self._total_frames is not None else "?",
        )

    def items(self) -> Generator[FramePacket, None, None]:
        """Yield every frame as a ``FramePacket``; closes the file when exhausted or closed."""
        if self._frames is None or self._first_frame is None or self._stream is None:
            raise VideoSourceError(f"{self.name}: items() called before setup()")
        time_base = self._stream.time_base or Fraction(1, 1)
        origin = self._stream.start_time
        frame_period_s = 1.0 / self._frame_rate
        last_pts_s: float | None = None
        repaired = 0
        clock_start: float | None = None
        frames = self._frames
        first: av.VideoFrame | None = self._first_frame
        self._first_frame = None
        try:
            while True:
                if (
                    self.config.max_frames is not None
                    and self.frames_decoded >= self.config.max_frames
                ):
                    return  # a deliberate preview: nothing was lost
                frame = first if first is not None else next(frames, None)
                first = None
                if frame is None:
                    break
                index = self.frames_decoded
                if frame.pts is None:
                    # Raw streams carry no timestamps: count at the nominal rate.
                    # index × period rather than a running sum, which would accumulate rounding.
                    pts_s = index * frame_period_s
                    if last_pts_s is not None and pts_s <= last_pts_s:
                        pts_s = last_pts_s + frame_period_s
                else:
                    if origin is None:
                        origin = frame.pts
                    pts_s = float((frame.pts - origin) * time_base)
                    if last_pts_s is not None and pts_s <= last_pts_s:
                        # Downstream (MP4 muxing, latency) needs strictly increasing times.
                        repaired += 1
                        if repaired == 1:
                            logger.warning(
                                "%s: frame %d has pts %.4f s, not after %.4f s; "
                                "placing it one frame period later (further repairs counted)",
                                self._path,
                                index,
                                pts_s,
                                last_pts_s,
                            )
                        pts_s = last_pts_s + frame_period_s
                last_pts_s = pts_s
                if self.config.realtime:
                    now = time.monotonic()
                    if clock_start is None:
                        clock_start = now - pts_s
                    delay = clock_start + pts_s - now
                    if delay > 0:
                        time.sleep(delay)
                image = frame_to_rgb_u8(frame)
                self.frames_decoded += 1
                yield FramePacket(
                    stream_id=self.config.stream_id,
                    index=index,
                    pts_s=pts_s,
                    image_rgb_u8=image,
                    arrival_s=time.monotonic(),
                )
            self._check_matroska_end(last_pts_s)
            self._report_losses(repaired)
        finally:
            self.teardown()

    def teardown(self) -> None:
        """Close the file (idempotent)."""
        if self._frames is not None:
            frames, self._frames = self._frames, None
            if hasattr(frames, "close"):
                frames.close()
        if self._container is not None:
            container, self._container = self._container, None
            container.close()

    # --- internals -----------------------------------------------------------------------

    def _decode_all(self) -> Iterator[av.VideoFrame]:
        """Frames of the video stream; a packet that fails to decode is skipped and counted,
        and a read error ends the stream (a truncated file) instead of raising."""
        assert self._container is not None and self._stream is not None
        packets = self._container.demux(self._stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.FFmpegError as exc:
                self._decode_errors += 1
                self._last_error = exc
                self._evidence.append(f"read error: {exc}")
                logger.debug("%s: read error, ending the stream: %s", self._path, exc)
                return
            if packet.is_corrupt and packet.size:
                # MP4 and others flag a packet whose data the file ends inside.
                self._evidence.append(f"the data ends inside the packet at pts {packet.pts}")
            try:
                decoded = packet.decode()
            except av.FFmpegError as exc:
                # A damaged or cut-off packet: skip it, later packets may decode.
                self._decode_errors += 1
                self._last_error = exc
                logger.debug(
                    "%s: packet at pts %s does not decode: %s", self._path, packet.pts, exc
                )
                continue
            yield from decoded  # type: ignore[misc]

    def _check_matroska_end(self, last_pts_s: float | None) -> None:
        container = self._container
        if container is None or last_pts_s is None or "matroska" not in container.format.name:
            return
        if container.duration is None or container.duration <= 0:
            return  # a live-written file states no duration
        stated_s = container.duration / av.time_base
        reached_s = last_pts_s + 1.0 / self._frame_rate  # pts_s counts from the stream's start
        if stated_s - reached_s > max(_MATROSKA_SHORT_S, 0.05 * stated_s):
            self._evidence.append(
                f"the stream stops at {reached_s:.2f} s of the {stated_s:.2f} s its header states"
            )

    def _report_losses(self, repaired: int) -> None:
        decoded = self.frames_decoded
        expected = self._total_frames
        if repaired > 1:
            logger.warning("%s: %d frames had out-of-order or repeated pts", self._path, repaired)
        if self._evidence:
            self.truncation = self._evidence[0]
            if expected is not None and self._total_is_exact and decoded < expected:
                self.frames_lost_estimate = expected - decoded
                logger.warning(
                    "%s: decoded %d of ~%d frames; the file is truncated (%s)",
                    self._path,
                    decoded,
                    expected,
                    self.truncation,
                )
            else:
                logger.warning(
                    "%s: decoded %d frames; the file is truncated (%s)",
                    self._path,
                    decoded,
                    self.truncation,
                )
            return
        if self._decode_errors > 0:
            logger.warning(
                "%s: %d packets could not be decoded and were skipped (last error: %s)",
                self._path,
                self._decode_errors,
                self._last_error,
            )


def _stream_rate(stream: av.VideoStream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and rate > 0:
            return float(rate)
    return _FALLBACK_FRAME_RATE


def _estimate_total(
    stream: av.VideoStream, container: av.container.InputContainer, frame_rate: float
) -> tuple[int | None, bool]:
    """(frame count, whether it is exact). MP4/AVI index every frame; Matroska and raw
    streams do not, so fall back to duration × rate."""
    if stream.frames > 0:
        return int(stream.frames), True
    duration_s: float | None = None
    if stream.duration is not None and stream.time_base is not None:
        duration_s = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration_s = container.duration / av.time_base
    if duration_s is None or duration_s <= 0 or not math.isfinite(duration_s):
        return None, False
    return round(duration_s * frame_rate), False
