"""Publish events over ZeroMQ, and ``listen()`` to them (``finestream listen ENDPOINT``).

Input: ``FramePacket`` s (read only). Output: multipart messages ``[stream_id, json]`` on a PUB
socket: first the packet's own ``events`` (``track_started``, ``source_restored``...), then one
``frame`` message with its detections. The body is ``stages.events.encode_event`` JSON; the
first part is the stream id in UTF-8, so a subscriber can filter by stream (ZeroMQ matches
prefixes: subscribing to ``cam1`` also gets ``cam10``). The schema is docs/events.md.

Never blocks the pipeline: every send is ``NOBLOCK`` and queues are capped at ``sndhwm``
messages per subscriber. What happens to a subscriber that does not keep up is ``drop_mode``:

- ``PER_SUBSCRIBER`` (default, a PUB socket): ZeroMQ drops that subscriber's messages until it
  catches up; the others get everything. ZeroMQ does not say when, so ``dropped`` stays 0.
- ``COUNTED`` (an XPUB socket with ``XPUB_NODROP``): a message that some subscriber's full
  queue cannot take is refused for everyone and counted in ``dropped``. For one consumer
  (a service downstream) this costs nothing and makes losses visible.

Out-of-band events: ``post_event(event)`` sends a dict at once from any thread. The assembly
passes it as the live source's ``on_event``, so ``source_lost`` goes out while no frames flow
(the sink's thread is then idle, waiting for a packet). The copy of the same event that later
rides in a packet (same ``type``, ``stream`` and ``outage``) is not sent again.

Threads: ZeroMQ sockets are not thread-safe. The socket is created in ``setup()`` and closed in
``teardown()`` (linger ``linger_ms``, 0 by default: exit never waits for a slow subscriber) on
the sink's thread; ``write()`` runs there too, and ``post_event()`` from other threads uses the
socket only under the sink's lock, which ZeroMQ allows (a full memory barrier between users).
"""

from __future__ import annotations

import enum
import json
import logging
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import zmq

from pipeline.stage import StageBase
from stages.events import (
    EVENT_SCHEMA_VERSION,
    EventError,
    encode_event,
    frame_event,
    label_for,
)
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

# Events posted before setup() made the socket are kept (the oldest dropped beyond this).
_EARLY_EVENTS = 256
# Keys of events already sent by post_event(), to skip their copies in packets. A copy may never
# come (its packet dropped by a leaky buffer), so the memory is bounded.
_POSTED_KEYS = 1024
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
        dropped: messages refused because a queue was full (``COUNTED`` mode), or posted
            after ``teardown()``.
    """

    sent: int
    dropped: int


class ZmqEventSink(StageBase[FramePacket]):
    """Sink[FramePacket] publishing ``stages.events`` messages on a ZeroMQ socket.

    Args:
        config: see ``ZmqSinkConfig``.
        class_names: index = class id; labels of detections and of events that lack one.
    """

    def __init__(self, config: ZmqSinkConfig, class_names: Sequence[str]) -> None:
        self.config = config
        self.class_names = list(class_names)
        self.name = "zmq_events"
        self._lock = threading.Lock()  # guards the socket and everything below
        self._context: zmq.Context[Any] | None = None
        self._socket: zmq.Socket[Any] | None = None
        self._torn_down = False
        self._early: deque[dict[str, Any]] = deque(maxlen=_EARLY_EVENTS)
        self._posted_keys: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self._sent = 0
        self._dropped = 0

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
        with self._lock:
            self._context, self._socket = context, sock
            early = list(self._early)
            self._early.clear()
            for event in early:
                self._send_locked(event)
        logger.info("%s: publishing on %s (%s)", self.name, cfg.endpoint, cfg.mode.value)

    def write(self, item: FramePacket) -> None:
        bodies: list[bytes] = []
        for event in item.events:
            key = _posted_key(event)
            with self._lock:
                if key is not None and key in self._posted_keys:
                    del self._posted_keys[key]  # already sent by post_event()
                    continue
            bodies.append(self._encode(self._complete(event, item.stream_id, item)))
        if self.config.send_frames:
            bodies.append(encode_event(frame_event(item, self.class_names)))
        topic = item.stream_id.encode("utf-8")
        with self._lock:
            for body in bodies:
                self._send_body_locked(topic, body)

    def teardown(self) -> None:
        with self._lock:
            self._torn_down = True
            sock, self._socket = self._socket, None
            context, self._context = self._context, None
            if sock is not None:
                sock.close(linger=self.config.linger_ms)
            if context is not None:
                context.term()
        stats = self.stats()
        logger.info("%s: %d messages sent, %d dropped", self.name, stats.sent, stats.dropped)

    # --- from any thread -------------------------------------------------------------------------

    def post_event(self, event: Mapping[str, Any]) -> None:
        """Send ``event`` now (never blocks); thread-safe. Before ``setup()`` it is kept and
        sent at setup; after ``teardown()`` it is counted as dropped."""
        with self._lock:
            if self._torn_down:
                self._dropped += 1
                return
            key = _posted_key(event)
            if key is not None:
                self._posted_keys[key] = None
                while len(self._posted_keys) > _POSTED_KEYS:
                    self._posted_keys.popitem(last=False)
            if self._socket is None:
                self._early.append(dict(event))
                return
            self._send_locked(event)

    def stats(self) -> ZmqSinkStats:
        """Counters now; thread-safe."""
        with self._lock:
            return ZmqSinkStats(sent=self._sent, dropped=self._dropped)

    # --- internals ---------------------------------------------------------------------------

    def _complete(
        self, event: Mapping[str, Any], stream_id: str, packet: FramePacket | None = None
    ) -> dict[str, Any]:
        """A copy of ``event`` with what a terse producer left out filled in: the envelope, the
        ``frame``/``pts_s`` of the packet it rode in, and ``label`` from ``class_id``. A
        producer's ``event`` key is taken as ``type``."""
        full = dict(event)
        if "type" not in full and isinstance(full.get("event"), str):
            full["type"] = full.pop("event")
        full.setdefault("v", EVENT_SCHEMA_VERSION)
        full.setdefault("stream", stream_id)
        if "time_unix_s" not in full:
            full["time_unix_s"] = round(time.time(), 6)
        if packet is not None:
            full.setdefault("frame", packet.index)
            full.setdefault("pts_s", round(packet.pts_s, 6))
        class_id = full.get("class_id")
        if isinstance(class_id, int) and "label" not in full:
            full["label"] = label_for(class_id, self.class_names)
        return full

    def _encode(self, event: Mapping[str, Any]) -> bytes:
        try:
            return encode_event(event)
        except EventError as exc:
            # A producer's bad event must not stop the frames; say which one it was.
            logger.warning("%s: event not sent: %s", self.name, exc)
            return b""

    def _send_locked(self, event: Mapping[str, Any]) -> None:
        stream = str(event.get("stream", ""))
        body = self._encode(self._complete(event, stream))
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

    @staticmethod
    def _drain_subscriptions_locked(sock: zmq.Socket[Any]) -> None:
        # An XPUB socket receives its subscribers' (un)subscribe messages; nobody needs them, but
        # unread they would pile up.
        while True:
            try:
                sock.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return


def _posted_key(event: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """What identifies a live source's lost/restored event (others are never posted twice)."""
    outage = event.get("outage")
    if outage is None:
        return None
    return (event.get("type"), event.get("stream"), outage)


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
