"""Decode a live stream (RTSP camera, HTTP, HLS: any URL FFmpeg opens) into ``FramePacket`` s.

Input: a URL. Output: one ``FramePacket`` per decoded frame of the first video stream, for as
long as the pipeline runs. A live source does not end when its stream does: a server that dies
just closes the connection, which FFmpeg reports as a normal end of stream, so the end, an error
or a stall are all treated as a *loss*, and the source reconnects with capped exponential
backoff (forever by default). Frame ``index`` and ``pts_s`` carry on across reconnects.

Latency choices, measured against ../shared/rtsp/serve.py (a publisher stamping the wall clock
into the pixels, read back through the server): ``probesize=32`` gives the first frame in under
0.1 s instead of about 1 s; with slice threads (or none) a frame is decoded 36 ms after it was
drawn, while frame threading holds back one frame per extra thread (103 ms with 3 threads at
30 fps), so it is off unless ``threaded_decode``.
``fflags=nobuffer`` made the first frame come 1 s *later* (it threw away the probed keyframe)
and ``flags=low_delay`` changed nothing, so neither is set.

Loss and restore are reported once, as ``source_lost`` / ``source_restored`` events
(``stages.events``) through the ``on_event`` callback, from this source's thread, *while no frames
flow*. The assembly wires it to the pipeline's event channel, which hands every event to every
subscribing sink (JSONL, ZeroMQ) in its own thread: subscribers hear of an outage when it starts,
not when it ends, and no buffer policy can drop it.

Stopping: the engine stops pulling, or calls ``request_stop()`` (any thread), which also breaks
out of a backoff sleep; a blocking network read returns within the read timeout
(``stall_timeout_s / 2``) at worst.

Drop before work: every frame is decoded (the codec needs them all), but the conversion to RGB
waits until a stage first reads ``packet.image_rgb_u8`` (``LiveFramePacket``). A frame dropped
in front of the inference, as most are when the inference is slower than the cameras, is never
converted; ``LiveSourceStats.converted`` counts the ones that were.

Thread: ``setup()``, ``items()``, ``teardown()`` run in the source's own thread; ``on_event``
is called from it too. The RGB conversion runs in the thread that first reads the picture (the
inference stage's, for a live run). Ownership: each packet holds its own decoded frame, and then
its own freshly allocated image; once yielded it belongs to whoever took it.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import av
import numpy as np

from pipeline.stage import StageBase
from stages.decode import VideoSourceError, frame_to_rgb_u8
from stages.events import redact_url, source_lost_event, source_restored_event
from stages.frame import FramePacket

logger = logging.getLogger(__name__)

__all__ = [
    "LiveFramePacket",
    "LiveSource",
    "LiveSourceConfig",
    "LiveSourceError",
    "LiveSourceStats",
    "ReconnectPolicy",
    "RtspTransport",
]

# pts_s must strictly increase; a stream that repeats or rewinds a timestamp is nudged forward.
_MIN_PTS_STEP_S = 1e-3
# FFmpeg's RTSP demuxer gives up only after two read timeouts (one yields a last, possibly
# partial frame, the second raises), so the read timeout is half the stall budget.
_READ_TIMEOUTS_PER_STALL = 2.0
# FFmpeg refuses a probesize below 32 bytes.
_MIN_PROBESIZE = 32


#: URL schemes a live source takes: FFmpeg's network protocols that carry a video stream.
LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "rtp", "srt", "tcp")


class LiveSourceError(VideoSourceError):
    """A live source cannot deliver: unreachable with ``reconnect: never``, or out of retries."""


class ReconnectPolicy(enum.Enum):
    """What a live source does when its stream is lost."""

    #: Reconnect with backoff (up to ``max_reconnects`` attempts per outage).
    ALWAYS = "always"
    #: Fail at once on an error; a clean end of stream ends the source.
    NEVER = "never"


class RtspTransport(enum.Enum):
    """How RTP travels for ``rtsp://`` URLs (ignored for other schemes)."""

    #: Interleaved in the RTSP TCP connection: no loss, passes NAT; the default.
    TCP = "tcp"
    #: Separate UDP ports: lower latency on a clean LAN, but packets can be lost.
    UDP = "udp"


@dataclass(frozen=True)
class LiveSourceConfig:
    """Settings of a ``LiveSource``.

    Attributes:
        url: what FFmpeg opens: ``rtsp://user:pass@host:554/path``, ``http(s)://``, an HLS
            ``.m3u8``... Passwords are never logged or published.
        stream_id: written into every packet's ``stream_id`` and every event's ``stream``.
        rtsp_transport: TCP or UDP for RTSP URLs.
        open_timeout_s: the most one connection attempt may take (connect, handshake, probe).
        stall_timeout_s: no frame for this long counts as a loss and triggers a reconnect; a
            hung server (connection open, nothing sent) is detected within about this time.
        probesize: bytes FFmpeg reads to find the stream's parameters before the first frame;
            32 (the minimum) starts an RTSP stream in < 0.1 s; ``None`` keeps FFmpeg's default
            (about 1 s of buffering), which some HTTP/HLS sources may need.
        threaded_decode: frame-threaded decoding, for streams one core cannot decode in real
            time; adds one frame of latency per extra thread. Off: slice threads only.
        reconnect: what to do on a loss (see ``ReconnectPolicy``).
        max_reconnects: with ``ALWAYS``, give up (``LiveSourceError``) when this many reconnect
            attempts in a row brought no frame; ``None`` retries forever. The count starts
            again with every frame.
        backoff_initial_s: wait before the second reconnect attempt of an outage (the first
            is immediate).
        backoff_factor: each further wait is this much longer...
        backoff_max_s: ...up to this cap.
    """

    url: str
    stream_id: str = "0"
    rtsp_transport: RtspTransport = RtspTransport.TCP
    open_timeout_s: float = 5.0
    stall_timeout_s: float = 4.0
    probesize: int | None = 32
    threaded_decode: bool = False
    reconnect: ReconnectPolicy = ReconnectPolicy.ALWAYS
    max_reconnects: int | None = None
    backoff_initial_s: float = 0.25
    backoff_factor: float = 2.0
    backoff_max_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.url:
            raise ValueError("url must name a stream (rtsp://, http://, ...), got an empty string")
        scheme = self.url.partition("://")[0].lower()
        if scheme not in LIVE_SCHEMES:
            raise ValueError(
                f"live source {redact_url(self.url)!r}: unknown URL scheme {scheme!r}; give a URL "
                f"starting with {', '.join(s + '://' for s in LIVE_SCHEMES)} (or a file path)"
            )
        if not self.stream_id:
            raise ValueError("stream_id must not be empty")
        if not isinstance(self.rtsp_transport, RtspTransport):
            raise ValueError(f"rtsp_transport must be 'tcp' or 'udp', got {self.rtsp_transport!r}")
        if not isinstance(self.reconnect, ReconnectPolicy):
            raise ValueError(f"reconnect must be 'always' or 'never', got {self.reconnect!r}")
        for name in ("open_timeout_s", "stall_timeout_s", "backoff_initial_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value}")
        if not self.backoff_factor >= 1:
            raise ValueError(f"backoff_factor must be >= 1, got {self.backoff_factor}")
        if not self.backoff_max_s >= self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) must be >= backoff_initial_s "
                f"({self.backoff_initial_s})"
            )
        if self.probesize is not None and self.probesize < _MIN_PROBESIZE:
            raise ValueError(
                f"probesize must be >= {_MIN_PROBESIZE} bytes or null, got {self.probesize}"
            )
        if self.max_reconnects is not None:
            if self.max_reconnects < 0:
                raise ValueError(f"max_reconnects must be >= 0 or null, got {self.max_reconnects}")
            if self.reconnect is ReconnectPolicy.NEVER:
                raise ValueError(
                    "max_reconnects is set but reconnect is 'never'; drop one of the two"
                )


@dataclass(frozen=True)
class LiveSourceStats:
    """A snapshot of a live source's counters.

    Attributes:
        frames: packets yielded.
        connections: connections that delivered at least one frame.
        outages: losses so far (the ``outage`` number of the last ``source_lost``).
        failed_attempts: connection attempts that gave no frame.
        decode_errors: packets the decoder rejected (skipped; the stream went on).
        connected: frames are flowing now.
        width: size of the latest frame (0 before the first).
        height: see ``width``.
        reconnects: connections after the first (each ended an outage).
        bytes_received: bytes of the stream's packets read so far.
        converted: frames whose RGB picture was made (read by a stage); the rest of ``frames``
            were dropped before anyone looked at them.
    """

    frames: int
    connections: int
    outages: int
    failed_attempts: int
    decode_errors: int
    connected: bool
    width: int
    height: int
    reconnects: int = 0
    bytes_received: int = 0
    converted: int = 0


class LiveFramePacket(FramePacket):
    """A ``FramePacket`` whose RGB picture is made from the decoded frame when first read.

    ``image_rgb_u8``, ``width`` and ``height`` behave as on any packet; the conversion
    (``stages.decode.frame_to_rgb_u8``: colour matrix, range, rotation) runs once, in the thread
    that first reads ``image_rgb_u8``, and the decoded frame is released then. ``width`` and
    ``height`` come from the decoded frame without converting it. Sinks fanned out from one
    stage may read it at once: a lock makes the first reader convert and the others wait.
    """

    def __init__(
        self,
        *,
        stream_id: str,
        index: int,
        pts_s: float,
        arrival_s: float,
        decoded: av.VideoFrame,
        on_convert: Callable[[], None] | None = None,
    ) -> None:
        self._decoded: av.VideoFrame | None = decoded
        self._rgb: np.ndarray | None = None
        self._on_convert = on_convert
        self._convert_lock = threading.Lock()
        # The displayed size: a quarter turn of rotation swaps the coded width and height.
        turned = round(decoded.rotation / 90) % 2 == 1
        self._size_wh = (
            (decoded.height, decoded.width) if turned else (decoded.width, decoded.height)
        )
        super().__init__(
            stream_id=stream_id,
            index=index,
            pts_s=pts_s,
            image_rgb_u8=None,  # type: ignore[arg-type]  # pending: made when first read
            arrival_s=arrival_s,
        )

    @property  # type: ignore[override]
    def image_rgb_u8(self) -> np.ndarray:
        rgb = self._rgb
        if rgb is not None:
            return rgb
        with self._convert_lock:
            rgb = self._rgb
            if rgb is None:  # nobody converted it while this thread waited for the lock
                decoded = self._decoded
                if decoded is None:
                    raise RuntimeError(f"frame {self.stream_id}/{self.index} has no picture")
                rgb = frame_to_rgb_u8(decoded)
                self._rgb, self._decoded = rgb, None
                if self._on_convert is not None:
                    self._on_convert()
            return rgb

    @image_rgb_u8.setter
    def image_rgb_u8(self, value: np.ndarray | None) -> None:
        # FramePacket's __init__ sets it to None here: the picture is pending until read.
        if value is not None:
            self._rgb, self._decoded = value, None

    @property
    def converted(self) -> bool:
        """The RGB picture has been made."""
        return self._rgb is not None

    def __repr__(self) -> str:  # the dataclass's would convert the picture to show it
        return (
            f"LiveFramePacket(stream_id={self.stream_id!r}, index={self.index}, "
            f"pts_s={self.pts_s:.3f}, {self.width}x{self.height}, converted={self.converted})"
        )

    @property
    def width(self) -> int:
        return self._size_wh[0] if self._rgb is None else int(self._rgb.shape[1])

    @property
    def height(self) -> int:
        return self._size_wh[1] if self._rgb is None else int(self._rgb.shape[0])


class _Loss(Exception):
    """Internal: the current connection is gone; the message is the reason."""


class LiveSource(StageBase[FramePacket]):
    """Source[FramePacket] reading a live URL, reconnecting on loss.

    Args:
        config: see ``LiveSourceConfig``.
        on_event: called with each ``source_lost`` / ``source_restored`` dict as it happens,
            from the source's thread; must not block (``ZmqEventSink.post_event`` doesn't).

    ``items()`` raises ``LiveSourceError`` (one line: URL, cause, fix) when the stream cannot be
    opened and ``reconnect`` is ``NEVER``, or when ``max_reconnects`` attempts in a row failed.
    With ``NEVER`` a clean end of stream ends ``items()`` and an error mid-stream raises.
    """

    def __init__(
        self,
        config: LiveSourceConfig,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.name = f"live:{config.stream_id}"
        self._on_event = on_event
        self._url_safe = redact_url(config.url)
        self._is_rtsp = config.url.lower().startswith(("rtsp://", "rtsps://"))
        self._read_timeout_s = config.stall_timeout_s / _READ_TIMEOUTS_PER_STALL
        self._stop = threading.Event()
        self._container: av.container.InputContainer | None = None
        self._lock = threading.Lock()  # guards the counters read by stats()
        # Counters and stream state, written only by the source thread.
        self._next_index = 0
        self._frames = 0
        self._connections = 0
        self._outages = 0
        self._failed_attempts = 0
        self._decode_errors = 0
        self._bytes_received = 0
        self._converted = 0  # incremented from the converting thread, under the lock
        self._connected = False
        self._width = 0
        self._height = 0
        self._last_pts_s: float | None = None
        self._last_arrival_s: float | None = None
        self._lost_at: float | None = None  # monotonic start of the current outage, if any
        self._outage_attempts = 0  # reconnect attempts made in the current outage
        self._last_reason = ""

    # --- control, from any thread ----------------------------------------------------------

    def request_stop(self) -> None:
        """Make ``items()`` return soon: at once from a backoff wait, after the current frame
        while streaming, within the read timeout when blocked on the network. Thread-safe,
        idempotent."""
        self._stop.set()

    def stats(self) -> LiveSourceStats:
        """The counters now (thread-safe)."""
        with self._lock:
            return LiveSourceStats(
                frames=self._frames,
                connections=self._connections,
                outages=self._outages,
                failed_attempts=self._failed_attempts,
                decode_errors=self._decode_errors,
                connected=self._connected,
                width=self._width,
                height=self._height,
                reconnects=max(0, self._connections - 1),
                bytes_received=self._bytes_received,
                converted=self._converted,
            )

    # --- the stage ---------------------------------------------------------------------------

    def items(self) -> Iterator[FramePacket]:
        cfg = self.config
        while not self._stop.is_set():
            if self._lost_at is not None:  # in an outage: reconnecting
                attempts = self._outage_attempts
                if cfg.max_reconnects is not None and attempts >= cfg.max_reconnects:
                    raise LiveSourceError(
                        f"live source {self._url_safe} (stream {cfg.stream_id}) still down after "
                        f"{attempts} reconnect attempts ({self._last_reason}); check the camera "
                        "and the URL, or set max_reconnects: null to retry forever"
                    )
                # The first attempt after a loss is immediate: a glitch heals at once, and a
                # dead server answers "connection refused" within a millisecond.
                if attempts > 0 and self._stop.wait(self._backoff_s(attempts)):
                    return
                self._outage_attempts += 1
            try:
                container = self._open()
            except (av.FFmpegError, OSError, _NoVideoStream) as exc:
                if cfg.reconnect is ReconnectPolicy.NEVER:
                    raise LiveSourceError(
                        f"cannot open live source {self._url_safe} (stream {cfg.stream_id}): "
                        f"{_describe(exc)}; check that the camera or server is up and the URL is "
                        "right, or set reconnect: always to keep retrying"
                    ) from None
                self._failed(f"cannot connect: {_describe(exc)}")
                continue
            frames_before = self._frames
            try:
                yield from self._packets(container)
                if self._stop.is_set():
                    return
                reason = "stream ended (connection closed)"
                if cfg.reconnect is ReconnectPolicy.NEVER:
                    logger.info(
                        "%s: %s; reconnect is 'never', so the source ends", self.name, reason
                    )
                    return
            except _Loss as loss:
                reason = str(loss)
                if cfg.reconnect is ReconnectPolicy.NEVER:
                    raise LiveSourceError(
                        f"live source {self._url_safe} (stream {cfg.stream_id}) lost: {reason}; "
                        "set reconnect: always to reconnect instead"
                    ) from None
            finally:
                self._close()
                with self._lock:
                    self._connected = False
            if self._frames > frames_before:
                self._begin_outage(reason)
            else:
                self._failed(reason)

    def teardown(self) -> None:
        self._close()

    # --- internals (source thread) ------------------------------------------------------------

    def _backoff_s(self, attempts: int) -> float:
        """The wait before reconnect attempt ``attempts + 1`` of an outage (``attempts >= 1``)."""
        cfg = self.config
        delay = cfg.backoff_initial_s * cfg.backoff_factor ** (attempts - 1)
        return float(min(delay, cfg.backoff_max_s))

    def _failed(self, reason: str) -> None:
        """An attempt gave no frame: count it; it starts an outage if none is on (first connect)."""
        with self._lock:
            self._failed_attempts += 1
        if self._lost_at is None:
            self._begin_outage(reason)
        else:
            self._last_reason = reason
            logger.debug(
                "%s: reconnect attempt %d failed: %s", self.name, self._outage_attempts, reason
            )

    def _begin_outage(self, reason: str) -> None:
        """Frames stopped (or never came): emit ``source_lost``, start counting attempts."""
        self._last_reason = reason
        self._lost_at = time.monotonic()
        self._outage_attempts = 0
        with self._lock:
            self._outages += 1
            outage = self._outages
        logger.warning(
            "%s: source lost (%s) at %s; reconnecting (outage %d)",
            self.name,
            reason,
            self._url_safe,
            outage,
        )
        self._emit(
            source_lost_event(
                stream=self.config.stream_id,
                outage=outage,
                frame=self._next_index - 1 if self._next_index > 0 else None,
                reason=reason,
                url=self.config.url,
            )
        )

    def _emit(self, event: dict[str, Any]) -> None:
        if self._on_event is not None:
            self._on_event(event)

    def _open(self) -> av.container.InputContainer:
        cfg = self.config
        options: dict[str, str] = {}
        if self._is_rtsp:
            options["rtsp_transport"] = cfg.rtsp_transport.value
        if cfg.probesize is not None:
            options["probesize"] = str(cfg.probesize)
        container = av.open(
            cfg.url,
            container_options=options,
            timeout=(cfg.open_timeout_s, self._read_timeout_s),
        )
        if not container.streams.video:
            container.close()
            raise _NoVideoStream("the stream has no video track")
        self._container = container
        return container

    def _close(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            try:
                container.close()
            except (av.FFmpegError, OSError) as exc:  # closing a dead connection may complain
                logger.debug("%s: error while closing: %s", self.name, exc)

    def _packets(self, container: av.container.InputContainer) -> Iterator[FramePacket]:
        """Frames of one connection as packets; raises ``_Loss`` on an error or a stall."""
        cfg = self.config
        stream = container.streams.video[0]
        stream.thread_type = "AUTO" if cfg.threaded_decode else "SLICE"
        demuxed = container.demux(stream)
        last_frame_at = time.monotonic()
        # This connection's timeline: its first frame gets pts_s = offset_s; later frames add the
        # stream clock's progress since base_time_s (the stream time matching offset_s). RTSP
        # gives the very first frame no timestamp, so the base may be set by a later frame.
        offset_s = 0.0
        first_arrival_s = 0.0
        base_time_s: float | None = None
        connection_has_frame = False
        while not self._stop.is_set():
            try:
                av_packet = next(demuxed)
            except StopIteration:
                return
            except (av.ExitError, av.TimeoutError):
                raise _Loss(f"no data for {self._read_timeout_s:g} s (read timeout)") from None
            except (av.FFmpegError, OSError) as exc:
                raise _Loss(f"read error: {_describe(exc)}") from None
            self._bytes_received += av_packet.size  # one int written by this thread only
            try:
                frames = av_packet.decode()
            except av.FFmpegError as exc:
                # One bad packet (lost data over UDP, a missing reference) is not a lost stream.
                with self._lock:
                    self._decode_errors += 1
                logger.debug("%s: decode error, packet skipped: %s", self.name, exc)
                frames = []
            if not frames and time.monotonic() - last_frame_at > cfg.stall_timeout_s:
                raise _Loss(f"no frame decoded for {cfg.stall_timeout_s:g} s (stalled)")
            for frame in frames:
                arrival_s = time.monotonic()
                last_frame_at = arrival_s
                if not connection_has_frame:
                    offset_s = self._pts_offset_s(arrival_s)
                    first_arrival_s = arrival_s
                stream_time_s = frame.time
                if stream_time_s is None:  # no timestamp: the wall clock is the best we have
                    pts_s = offset_s + (arrival_s - first_arrival_s)
                else:
                    if base_time_s is None:
                        base_time_s = stream_time_s - (arrival_s - first_arrival_s)
                    pts_s = offset_s + (stream_time_s - base_time_s)
                if self._last_pts_s is not None and pts_s < self._last_pts_s + _MIN_PTS_STEP_S:
                    pts_s = self._last_pts_s + _MIN_PTS_STEP_S
                packet = LiveFramePacket(
                    stream_id=cfg.stream_id,
                    index=self._next_index,
                    pts_s=pts_s,
                    arrival_s=arrival_s,
                    decoded=frame,
                    on_convert=self._count_conversion,
                )
                if not connection_has_frame:
                    connection_has_frame = True
                    self._on_connected(packet.width, packet.height, pts_s)
                self._next_index += 1
                self._last_pts_s = pts_s
                self._last_arrival_s = arrival_s
                with self._lock:
                    self._frames += 1
                yield packet

    def _count_conversion(self) -> None:
        """A packet's picture was made (in whichever thread read it first)."""
        with self._lock:
            self._converted += 1

    def _pts_offset_s(self, arrival_s: float) -> float:
        """Where a new connection's timeline starts: after the last frame, by the wall-clock
        time that passed, so an outage shows as a gap in ``pts_s`` just as it did in reality."""
        if self._last_pts_s is None or self._last_arrival_s is None:
            return 0.0
        return self._last_pts_s + max(arrival_s - self._last_arrival_s, _MIN_PTS_STEP_S)

    def _on_connected(self, width: int, height: int, pts_s: float) -> None:
        """The first frame of a connection: count it, report a restore, note a size change."""
        with self._lock:
            self._connections += 1
            self._connected = True
            old_size = (self._width, self._height)
            self._width, self._height = width, height
            outage = self._outages
        if old_size != (0, 0) and old_size != (width, height):
            logger.info(
                "%s: frame size changed from %dx%d to %dx%d after reconnecting",
                self.name,
                old_size[0],
                old_size[1],
                width,
                height,
            )
        lost_at, self._lost_at = self._lost_at, None
        if lost_at is None:
            logger.info("%s: streaming %dx%d from %s", self.name, width, height, self._url_safe)
            return
        down_s = time.monotonic() - lost_at
        attempts = max(self._outage_attempts, 1)
        logger.warning(
            "%s: source restored after %.1f s (%d attempts)", self.name, down_s, attempts
        )
        self._emit(
            source_restored_event(
                stream=self.config.stream_id,
                outage=outage,
                frame=self._next_index,
                pts_s=pts_s,
                down_s=down_s,
                attempts=attempts,
                width=width,
                height=height,
                url=self.config.url,
            )
        )


class _NoVideoStream(Exception):
    """Internal: the URL opened but carries no video (retried like any failed attempt)."""


def _describe(exc: BaseException) -> str:
    """One line for an FFmpeg/OS error, without the URL (which may hold a password)."""
    if isinstance(exc, _NoVideoStream):
        return str(exc)
    strerror = getattr(exc, "strerror", None)
    text = strerror if isinstance(strerror, str) and strerror else str(exc)
    return f"{text} ({type(exc).__name__})"
