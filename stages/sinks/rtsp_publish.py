"""Re-stream the annotated video to an RTSP server (ANNOUNCE/RECORD), for live viewing.

Input: ``FramePacket`` s (read only) of one stream. Output: H.264 (libx264, ``tune=zerolatency``,
no B-frames: the server relays frames in arrival order, so they must arrive in display order)
pushed over RTSP/TCP to ``url``, e.g. ``rtsp://127.0.0.1:8554/publish`` on
../shared/rtsp/serve.py, watched at ``.../published``. Detections are drawn with
``stages.annotate`` on a copy of the picture.

Size: the stream keeps the first frame's size (rounded down to even numbers, as yuv420p needs).
A frame of another size, as a camera gives after reconnecting at another resolution, is
rescaled to it: a viewer's decoder cannot follow a size change mid-stream. Detections are drawn
first, on the picture in its own (source) pixels, where the boxes are; then it is rescaled.

Timing: frames are stamped with their ``pts_s`` (1/90000 s clock) from the first published
frame; a frame whose stamp is not after the previous one is skipped (the muxer would refuse it).

Never fatal: if the server is unreachable or goes away, the frames are dropped (counted), a
warning is logged once per outage, and the connection is retried with capped backoff; the
pipeline carries on. Each new connection starts with a keyframe.

Thread: the sink's own thread (setup, write, teardown). Ownership: nothing is handed on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
import cv2
import numpy as np

from pipeline.stage import StageBase
from stages.annotate import AnnotateConfig, Annotator, make_annotator
from stages.events import redact_url
from stages.frame import FramePacket
from stages.sinks.yuv import X264_PRESETS, rgb_to_yuv420p, tag_bt709_limited

logger = logging.getLogger(__name__)

__all__ = ["RtspPublishConfig", "RtspPublishSink", "RtspPublishStats"]

# The RTP clock of video: 90 kHz.
_TIME_BASE = Fraction(1, 90000)


@dataclass(frozen=True)
class RtspPublishConfig:
    """Settings of an ``RtspPublishSink``.

    Attributes:
        url: where to publish (``rtsp://HOST:PORT/PATH``; the server must accept RECORD).
        stream_id: publish only this stream's packets; ``None``: the first stream seen.
        frame_rate: nominal rate for the encoder's rate control (timing comes from ``pts_s``).
        gop: frames between keyframes; a new viewer waits for the next one.
        bitrate_kbps: target bit rate.
        preset: libx264 preset; ``ultrafast`` keeps encoding cheap next to inference.
        annotate: draw the detections (boxes, captions as ``annotation`` says).
        annotation: what to draw.
        timeout_s: the most connecting, or one write, may take before the server counts as gone.
        retry_initial_s: wait before the first reconnect after a failure...
        retry_max_s: ...doubling up to this.
    """

    url: str = "rtsp://127.0.0.1:8554/publish"
    stream_id: str | None = None
    frame_rate: float = 30.0
    gop: int = 30
    bitrate_kbps: int = 2000
    preset: str = "ultrafast"
    annotate: bool = True
    annotation: AnnotateConfig = field(default_factory=AnnotateConfig)
    timeout_s: float = 5.0
    retry_initial_s: float = 1.0
    retry_max_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.url.lower().startswith(("rtsp://", "rtsps://")):
            raise ValueError(f"url must be an rtsp:// URL, got {redact_url(self.url)!r}")
        if self.stream_id is not None and not self.stream_id:
            raise ValueError("stream_id must not be empty (null publishes the first stream)")
        if not self.frame_rate > 0:
            raise ValueError(f"frame_rate must be > 0, got {self.frame_rate}")
        if self.gop < 1:
            raise ValueError(f"gop must be >= 1 frame, got {self.gop}")
        if self.bitrate_kbps < 1:
            raise ValueError(f"bitrate_kbps must be >= 1, got {self.bitrate_kbps}")
        if self.preset not in X264_PRESETS:
            raise ValueError(
                f"preset must be one of {', '.join(X264_PRESETS)}, got {self.preset!r}"
            )
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if not 0 < self.retry_initial_s <= self.retry_max_s:
            raise ValueError(
                f"need 0 < retry_initial_s <= retry_max_s, got {self.retry_initial_s} and "
                f"{self.retry_max_s}"
            )


@dataclass(frozen=True)
class RtspPublishStats:
    """Counters of an ``RtspPublishSink``.

    Attributes:
        published: frames handed to the encoder on a live connection.
        dropped: frames lost because no connection was up (or it broke while sending them).
        skipped: frames whose ``pts_s`` was not after the previous one.
        rescaled: frames resized to the stream's size.
        connections: connections made.
        bytes_sent: bytes of the encoded packets handed to the connection.
    """

    published: int
    dropped: int
    skipped: int
    rescaled: int
    connections: int
    bytes_sent: int = 0


class RtspPublishSink(StageBase[FramePacket]):
    """Sink[FramePacket] pushing the annotated stream to an RTSP server.

    Args:
        config: see ``RtspPublishConfig``.
        class_names: index = class id, for the captions.
        annotator: drawing to use instead of the one ``config.annotation`` describes.
    """

    def __init__(
        self,
        config: RtspPublishConfig,
        class_names: Sequence[str] = (),
        annotator: Annotator | None = None,
    ) -> None:
        self.config = config
        self.class_names = list(class_names)
        self.name = (
            "rtsp_publish" if config.stream_id is None else f"rtsp_publish:{config.stream_id}"
        )
        self._annotator = annotator
        self._url_safe = redact_url(config.url)
        self._stream_id = config.stream_id
        self._size: tuple[int, int] | None = None  # (width, height) of the published stream
        self._rescaled_from: tuple[int, int] | None = None  # the last other size seen (logged)
        self._container: av.container.OutputContainer | None = None
        self._video: Any = None  # the output av.VideoStream
        self._base_pts_s = 0.0  # pts_s published as 0 on the current connection
        self._last_pts: int | None = None
        self._retry_at = 0.0
        self._retry_delay_s = config.retry_initial_s
        self._failing = False
        self._published = 0
        self._dropped = 0
        self._skipped = 0
        self._rescaled = 0
        self._connections = 0
        self._bytes_sent = 0

    def setup(self) -> None:
        if self._annotator is None and self.config.annotate:
            self._annotator = make_annotator(self.config.annotation)

    def write(self, item: FramePacket) -> None:
        if self._stream_id is None:
            self._stream_id = item.stream_id
        elif item.stream_id != self._stream_id:
            return
        if self._size is None:
            self._size = _even_size(item.image_rgb_u8)
            logger.info("%s: publishing %dx%d", self.name, *self._size)
        if self._container is None and not self._connect(item.pts_s):
            self._dropped += 1
            return
        pts = round((item.pts_s - self._base_pts_s) / _TIME_BASE)
        if self._last_pts is not None and pts <= self._last_pts:
            self._skipped += 1
            logger.debug("%s: frame %d skipped: pts_s not increasing", self.name, item.index)
            return
        frame = rgb_to_yuv420p(self.picture(item))
        frame.pts = pts
        frame.time_base = _TIME_BASE
        try:
            assert self._container is not None
            for packet in self._video.encode(frame):
                self._container.mux(packet)
                self._bytes_sent += packet.size
        except (av.FFmpegError, OSError) as exc:
            self._dropped += 1
            self._lost(f"sending failed: {_describe(exc)}")
            return
        self._last_pts = pts
        self._published += 1
        if self._failing:
            self._failing = False
            logger.warning("%s: publishing to %s again", self.name, self._url_safe)

    def teardown(self) -> None:
        self._close(flush=True)
        s = self.stats()
        logger.info(
            "%s: %d frames published, %d dropped, %d skipped, %d rescaled, %d connections",
            self.name,
            s.published,
            s.dropped,
            s.skipped,
            s.rescaled,
            s.connections,
        )

    def stats(self) -> RtspPublishStats:
        return RtspPublishStats(
            published=self._published,
            dropped=self._dropped,
            skipped=self._skipped,
            rescaled=self._rescaled,
            connections=self._connections,
            bytes_sent=self._bytes_sent,
        )

    # --- internals -----------------------------------------------------------------------------

    def picture(self, item: FramePacket) -> np.ndarray:
        """What is published for ``item``: uint8 ``(h, w, 3)`` RGB at the stream's size, the
        detections drawn in the packet's own (source) pixels, then rescaled. The first
        picture fixes the stream's size."""
        picture = item.image_rgb_u8
        if self._size is None:
            self._size = _even_size(picture)
        if self.config.annotate and self._annotator is not None and item.detections is not None:
            # annotate() draws on a copy: the packet's picture is shared with the other sinks.
            picture = self._annotator.annotate(
                picture, item.detections, self.class_names, item.analytics
            )
        return self._fit(picture)

    def _fit(self, picture: np.ndarray) -> np.ndarray:
        """``picture`` at the stream's size (fixed by the first picture); others are resized."""
        height, width = picture.shape[:2]
        assert self._size is not None
        if (width, height) == self._size:
            return picture
        if (width, height) != self._rescaled_from:
            logger.info(
                "%s: frames of %dx%d are rescaled to the stream's %dx%d",
                self.name,
                width,
                height,
                *self._size,
            )
            self._rescaled_from = (width, height)
        self._rescaled += 1
        shrinking = width * height > self._size[0] * self._size[1]
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        return cv2.resize(picture, self._size, interpolation=interpolation)

    def _connect(self, pts_s: float) -> bool:
        """Open the connection and encoder if the retry time has come; True when open."""
        now = time.monotonic()
        if now < self._retry_at:
            return False
        cfg = self.config
        assert self._size is not None
        try:
            container = av.open(
                cfg.url,
                mode="w",
                format="rtsp",
                options={"rtsp_transport": "tcp"},
                timeout=(cfg.timeout_s, cfg.timeout_s),
            )
        except (av.FFmpegError, OSError) as exc:
            self._lost(f"cannot connect: {_describe(exc)}")
            return False
        video = container.add_stream(
            "libx264", rate=Fraction(cfg.frame_rate).limit_denominator(1001)
        )
        video.width, video.height = self._size
        video.pix_fmt = "yuv420p"
        tag_bt709_limited(video.codec_context)
        video.bit_rate = cfg.bitrate_kbps * 1000
        # Both the stream and the encoder on the 90 kHz clock: with the encoder on 1/rate, two
        # frames closer than one nominal period would get the same pts and the muxer refuses it.
        video.time_base = _TIME_BASE
        video.codec_context.time_base = _TIME_BASE
        video.options = {"preset": cfg.preset, "tune": "zerolatency", "g": str(cfg.gop), "bf": "0"}
        self._container, self._video = container, video
        self._base_pts_s = pts_s
        self._last_pts = None
        self._connections += 1
        self._retry_delay_s = cfg.retry_initial_s
        # The RTSP handshake itself happens with the first mux() in write().
        return True

    def _lost(self, reason: str) -> None:
        """The connection failed: drop it and schedule a retry."""
        self._close(flush=False)
        if not self._failing:
            self._failing = True
            logger.warning(
                "%s: cannot publish to %s (%s); dropping frames and retrying every %g-%g s",
                self.name,
                self._url_safe,
                reason,
                self.config.retry_initial_s,
                self.config.retry_max_s,
            )
        else:
            logger.debug("%s: still cannot publish: %s", self.name, reason)
        self._retry_at = time.monotonic() + self._retry_delay_s
        self._retry_delay_s = min(self._retry_delay_s * 2, self.config.retry_max_s)

    def _close(self, *, flush: bool) -> None:
        container, self._container = self._container, None
        video, self._video = self._video, None
        if container is None:
            return
        try:
            if flush and video is not None and self._last_pts is not None:
                for packet in video.encode(None):
                    container.mux(packet)
        except (av.FFmpegError, OSError) as exc:
            logger.debug("%s: flushing the encoder failed: %s", self.name, exc)
        try:
            container.close()
        except (av.FFmpegError, OSError) as exc:  # the server may be gone already
            logger.debug("%s: closing the connection failed: %s", self.name, exc)


def _even_size(picture: np.ndarray) -> tuple[int, int]:
    """(width, height) rounded down to even numbers: yuv420p needs them, and dropping at most
    one row or column is invisible."""
    height, width = picture.shape[:2]
    return (max(2, width - width % 2), max(2, height - height % 2))


def _describe(exc: BaseException) -> str:
    """One line without the URL (which may hold a password)."""
    strerror = getattr(exc, "strerror", None)
    text = strerror if isinstance(strerror, str) and strerror else str(exc)
    return f"{text} ({type(exc).__name__})"
