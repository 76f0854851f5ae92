"""Publish events over ZeroMQ, and ``listen()`` to them (``finestream listen ENDPOINT``).

Input: ``FramePacket`` s (read only), and the pipeline's events (``on_event``: track,
analytics and source events, delivered by the runner in this sink's thread, also while no
frames flow). Output: multipart messages ``[stream_id, json]`` on a PUB socket: a ``frame``
message per packet (``stages.events.frame_event``) and each event as it was published, the very
messages the JSON Lines sink writes. The body is ``stages.events.encode_event`` JSON; the first
part is the message's ``stream`` in UTF-8, so a subscriber can filter by stream (ZeroMQ matches
prefixes: subscribing to ``cam1`` also gets ``cam10``). The schema is docs/events.md.

Never blocks the pipeline: every send is ``NOBLOCK`` and queues are capped at ``sndhwm``
messages per subscriber. What happens to a subscriber that does not keep up is ``drop_mode``:

- ``PER_SUBSCRIBER`` (default, a PUB socket): ZeroMQ drops that subscriber's messages until it
  catches up; the others get everything. ZeroMQ does not say when, so ``dropped`` stays 0.
- ``COUNTED`` (an XPUB socket with ``XPUB_NODROP``): a message that some subscriber's full
  queue cannot take is refused for everyone and counted in ``dropped``. For one consumer
  (a service downstream) this costs nothing and makes losses visible.

Threads: ZeroMQ sockets are not thread-safe. The socket is created in ``setup()``, used by
``write()`` and ``on_event()`` and closed in ``teardown()`` (linger ``linger_ms``, 0 by default:
exit never waits for a slow subscriber), all on the sink's thread; ``stats()`` may be called
from any thread (the counters are under a lock).
"""

from __future__ import annotations

import enum
import json
import logging
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import zmq

from pipeline.stage import StageBase
from stages.events import EventError, encode_event, frame_event
from stages.frame import FramePacket

logger = logging.getLogger(__name__)

__all__ = [
    "EndpointMode",
    "EventSinkError",
    "ZmqDropMode",
    "ZmqEventSink",
    "ZmqSinkConfig",
    "ZmqSinkStats",
    "listen",
]

# listen() wakes this often to check its deadline and let Ctrl-C through.
_LISTEN_POLL_MS = 100


class EndpointMode(enum.Enum):
    """Whether the socket binds the endpoint (a server) or connects to it (to a broker/proxy)."""

    BIND = "bind"
    CONNECT = "connect"


class ZmqDropMode(enum.Enum):
    """What a subscriber that cannot keep up costs (see the module docstring)."""

    PER_SUBSCRIBER = "per_subscriber"
    COUNTED = "counted"


class EventSinkError(RuntimeError):
    """The event socket cannot be set up (endpoint malformed or already in use)."""


@dataclass(frozen=True)
class ZmqSinkConfig:
    """Settings of a ``ZmqEventSink``.

    Attributes:
        endpoint: a ZeroMQ endpoint, ``tcp://HOST:PORT`` (``tcp://*:5555`` binds every
            interface), ``ipc:///path`` or ``inproc://name``.
        mode: bind the endpoint (subscribers connect to us) or connect to it.
        sndhwm: messages queued per subscriber before it loses messages.
        drop_mode: see ``ZmqDropMode``.
        send_frames: one ``frame`` message per frame; off: only the events.
        linger_ms: how long ``teardown()`` may wait to deliver queued messages; 0 drops them.
    """

    endpoint: str = "tcp://127.0.0.1:5555"
    mode: EndpointMode = EndpointMode.BIND
    sndhwm: int = 1000
    drop_mode: ZmqDropMode = ZmqDropMode.PER_SUBSCRIBER
    send_frames: bool = True
    linger_ms: int = 0

    def __post_init__(self) -> None:
        if "://" not in self.endpoint:
            raise ValueError(
                f"endpoint must look like tcp://HOST:PORT, ipc://PATH or inproc://NAME, "
                f"got {self.endpoint!r}"
            )
        if not isinstance(self.mode, EndpointMode):
            raise ValueError(f"mode must be 'bind' or 'connect', got {self.mode!r}")
        if not isinstance(self.drop_mode, ZmqDropMode):
            raise ValueError(
                f"drop_mode must be 'per_subscriber' or 'counted', got {self.drop_mode!r}"
            )
        if self.sndhwm < 1:
            raise ValueError(f"sndhwm must be >= 1 message, got {self.sndhwm}")
        if self.linger_ms < 0:
            raise ValueError(f"linger_ms must be >= 0, got {self.linger_ms}")


@dataclass(frozen=True)
class ZmqSinkStats:
    """Counters of a ``ZmqEventSink``.

    Attributes:
        sent: messages handed to ZeroMQ.
        dropped: messages refused because a queue was full (``COUNTED`` mode).
        bytes_sent: bytes of the messages handed to ZeroMQ (topics and bodies).
    """

    sent: int
    dropped: int
    bytes_sent: int = 0


class ZmqEventSink(StageBase[FramePacket]):
    """Sink[FramePacket] and event subscriber publishing ``stages.events`` messages on ZeroMQ.

    Args:
        config: see ``ZmqSinkConfig``.
        class_names: index = class id, for the detections' ``label``.
    """

    def __init__(self, config: ZmqSinkConfig, class_names: Sequence[str]) -> None:
        self.config = config
        self.class_names = list(class_names)
        self.name = "zmq_events"
        self._lock = threading.Lock()  # guards the counters (stats() from other threads)
        self._context: zmq.Context[Any] | None = None
        self._socket: zmq.Socket[Any] | None = None
        self._sent = 0
        self._dropped = 0
        self._bytes_sent = 0

    # --- the stage (sink thread) ---------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.config
        context: zmq.Context[Any] = zmq.Context()
        counted = cfg.drop_mode is ZmqDropMode.COUNTED
        sock = context.socket(zmq.XPUB if counted else zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, cfg.sndhwm)
        sock.setsockopt(zmq.LINGER, cfg.linger_ms)
        if counted:
            sock.setsockopt(zmq.XPUB_NODROP, 1)
        try:
            if cfg.mode is EndpointMode.BIND:
                sock.bind(cfg.endpoint)
            else:
                sock.connect(cfg.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            context.term()
            raise EventSinkError(
                f"cannot {cfg.mode.value} ZeroMQ events to {cfg.endpoint}: {exc.strerror}; "
                "pick another endpoint (or stop the program already using it)"
            ) from None
        self._context, self._socket = context, sock
        logger.info("%s: publishing on %s (%s)", self.name, cfg.endpoint, cfg.mode.value)

    def write(self, item: FramePacket) -> None:
        if self.config.send_frames:
            self._send(item.stream_id, frame_event(item, self.class_names))

    def on_event(self, event: Mapping[str, Any]) -> None:
        """One event from the pipeline's channel, sent as it is under its own ``stream``."""
        self._send(str(event.get("stream", "")), event)

    def teardown(self) -> None:
        sock, self._socket = self._socket, None
        context, self._context = self._context, None
        if sock is not None:
            sock.close(linger=self.config.linger_ms)
        if context is not None:
            context.term()
        stats = self.stats()
        logger.info("%s: %d messages sent, %d dropped", self.name, stats.sent, stats.dropped)

    # --- from any thread -------------------------------------------------------------------------

    def stats(self) -> ZmqSinkStats:
        """Counters now; thread-safe."""
        with self._lock:
            return ZmqSinkStats(sent=self._sent, dropped=self._dropped, bytes_sent=self._bytes_sent)

    # --- internals ---------------------------------------------------------------------------

    def _send(self, stream: str, message: Mapping[str, Any]) -> None:
        try:
            body = encode_event(message)
        except EventError as exc:
            # A producer's bad event must not stop the frames; say which one it was.
            logger.warning("%s: message not sent: %s", self.name, exc)
            return
        with self._lock:
            self._send_body_locked(stream.encode("utf-8"), body)

    def _send_body_locked(self, topic: bytes, body: bytes) -> None:
        sock = self._socket
        if sock is None or not body:
            return
        if self.config.drop_mode is ZmqDropMode.COUNTED:
            self._drain_subscriptions_locked(sock)
        try:
            sock.send_multipart([topic, body], flags=zmq.NOBLOCK)
        except zmq.Again:
            self._dropped += 1
        else:
            self._sent += 1
            self._bytes_sent += len(topic) + len(body)

    @staticmethod
    def _drain_subscriptions_locked(sock: zmq.Socket[Any]) -> None:
        # An XPUB socket receives its subscribers' (un)subscribe messages; nobody needs them, but
        # unread they would pile up.
        while True:
            try:
                sock.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return


def listen(
    endpoint: str,
    *,
    count: int | None = None,
    timeout_s: float | None = None,
    out: TextIO | None = None,
    streams: Sequence[str] = (),
    bind: bool = False,
) -> int:
    """Subscribe to ``endpoint`` and write each message's JSON as one line to ``out``.

    Args:
        endpoint: where the sink publishes, e.g. ``tcp://127.0.0.1:5555``.
        count: stop after this many messages; ``None``: no limit.
        timeout_s: stop after listening this many seconds in all; ``None``: no limit.
        out: where the lines go (default: ``sys.stdout`` at call time); flushed per line.
        streams: only these stream ids (ZeroMQ prefix match); empty: every stream.
        bind: bind ``endpoint`` instead of connecting (when the sink is in ``connect`` mode).

    Returns:
        The number of messages written. Messages that are not ``[stream, json]`` are logged
        and skipped. ZeroMQ connects in the background, so messages sent before the
        connection is up are not seen (the "slow joiner").

    Raises:
        EventSinkError: the endpoint is malformed, or ``bind`` and it is in use.
    """
    if count is not None and count < 0:
        raise ValueError(f"count must be >= 0 or None, got {count}")
    if timeout_s is not None and timeout_s < 0:
        raise ValueError(f"timeout_s must be >= 0 or None, got {timeout_s}")
    stream_out = sys.stdout if out is None else out
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    context: zmq.Context[Any] = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    received = 0
    try:
        for stream in streams or ("",):
            sock.setsockopt(zmq.SUBSCRIBE, stream.encode("utf-8"))
        try:
            if bind:
                sock.bind(endpoint)
            else:
                sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise EventSinkError(
                f"cannot {'bind' if bind else 'connect'} to {endpoint}: {exc.strerror}; "
                "check the endpoint (tcp://HOST:PORT)"
            ) from None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while count is None or received < count:
            wait_ms = _LISTEN_POLL_MS
            if deadline is not None:
                left_ms = (deadline - time.monotonic()) * 1000
                if left_ms <= 0:
                    break
                wait_ms = min(wait_ms, max(1, int(left_ms)))
            if not poller.poll(wait_ms):
                continue
            parts = sock.recv_multipart()
            line = _message_line(parts)
            if line is None:
                continue
            stream_out.write(line + "\n")
            stream_out.flush()
            received += 1
    finally:
        sock.close(linger=0)
        context.term()
    return received


def _message_line(parts: list[bytes]) -> str | None:
    """The JSON body of ``[stream, json]`` on one line, or None (logged) if it is not that."""
    if len(parts) != 2:
        logger.warning("skipped a message with %d parts (expected [stream, json])", len(parts))
        return None
    try:
        event = json.loads(parts[1])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("skipped a message whose body is not JSON: %s", exc)
        return None
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)
