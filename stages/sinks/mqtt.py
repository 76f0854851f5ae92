"""Publish the run's messages to an MQTT broker: the same messages, with the same JSON, as ZeroMQ.

Input: ``FramePacket`` s (read only) and the pipeline's events (``on_event``: track, analytics and
source events, delivered by the runner in this sink's thread, also while no frames flow).
Output: one MQTT message per ``frame`` message (``stages.events.frame_event``) and per event, on
the topic ``<topic_prefix>/<stream>/<type>`` (e.g. ``finestream/cam0/line_crossed``), its payload
the ``stages.events.encode_event`` JSON the JSON Lines and ZeroMQ sinks write (docs/events.md).
A stream id's ``/``, ``+`` and ``#`` become ``_`` in the topic (they are MQTT's level separator
and wildcards); the payload keeps the id as it is.

Never blocks the pipeline, and a dead broker costs bounded memory: paho-mqtt's network thread
(``loop_start``) connects, reconnects with capped back-off and sends; ``publish()`` only queues.
At most ``max_queued`` messages wait for the broker (paho's own offline queue is bounded to the
same ``max_queued_messages_set``); a message that finds the queue full, or (QoS 0) no
connection, is dropped and counted in ``dropped``, as are the ones still waiting when the run
ends (after up to ``linger_s`` while connected) or lost with a connection (QoS 0).

Secrets never come from the config file: the broker's user name and password, a CA bundle and a
client certificate come from the environment (``FINESTREAM_MQTT_USERNAME``,
``FINESTREAM_MQTT_PASSWORD``, ``FINESTREAM_MQTT_CA``, ``FINESTREAM_MQTT_CERT``,
``FINESTREAM_MQTT_KEY``), read once when the sink is made; a CA (or ``tls: true``) turns TLS on.

Threads: ``check()`` runs in the main thread before anything starts (the broker's name must
resolve; one that refuses now is only a warning: it may come up later, like a camera).
``setup()``, ``write()``, ``on_event()`` and ``teardown()`` run in the sink's thread; paho's
callbacks in its network thread only append to a deque (they run under paho's own locks, so they
take none of ours); ``stats()`` may be called from any thread. Nothing is handed on.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from pipeline.stage import StageBase
from stages.events import EventError, encode_event, frame_event
from stages.frame import FramePacket

logger = logging.getLogger(__name__)

__all__ = [
    "ENV_CA",
    "ENV_CERT",
    "ENV_KEY",
    "ENV_PASSWORD",
    "ENV_USERNAME",
    "MqttCredentials",
    "MqttEventSink",
    "MqttSinkConfig",
    "MqttSinkError",
    "MqttSinkStats",
    "topic_for",
]

ENV_USERNAME = "FINESTREAM_MQTT_USERNAME"
ENV_PASSWORD = "FINESTREAM_MQTT_PASSWORD"
ENV_CA = "FINESTREAM_MQTT_CA"
ENV_CERT = "FINESTREAM_MQTT_CERT"
ENV_KEY = "FINESTREAM_MQTT_KEY"

# The network thread's TCP connect gives up after this long: it bounds how long teardown waits
# for that thread when the broker's host does not answer at all.
_CONNECT_TIMEOUT_S = 3.0
# How long check() waits to see whether the broker answers (only to warn when it does not).
_PROBE_TIMEOUT_S = 1.0
_LINGER_POLL_S = 0.01
# Characters a topic level may not carry: the level separator and the two wildcards.
_TOPIC_UNSAFE = str.maketrans({"/": "_", "+": "_", "#": "_"})


class MqttSinkError(ValueError):
    """The MQTT output cannot work as configured (a broker name that does not resolve, a
    certificate file that is not there); the message names the setting and the fix."""


@dataclass(frozen=True)
class MqttSinkConfig:
    """Settings of an ``MqttEventSink`` (credentials are not settings: see the module doc).

    Attributes:
        host: the broker's host name or address.
        port: its TCP port (1883 plain, 8883 is the usual TLS port).
        topic_prefix: the first topic level(s): ``<topic_prefix>/<stream>/<type>``.
        qos: MQTT quality of service, 0 (at most once), 1 (at least once) or 2 (exactly once).
        retain: the broker keeps each topic's last message for subscribers that come later.
        send_frames: one ``frame`` message per frame; off: only the events.
        max_queued: messages that may wait for the broker (offline or slow) before new ones are
            dropped.
        keepalive_s: seconds between keep-alive pings; a broker silent for 1.5x that is lost.
        client_id: the MQTT client id; ``None``: ``finestream-`` and a random suffix.
        tls: TLS with the system's CAs (a CA in ``FINESTREAM_MQTT_CA`` turns it on too).
        linger_s: at the end, how long to wait for queued messages while connected.
        reconnect_min_s, reconnect_max_s: back-off between reconnect attempts (doubling).
    """

    host: str = "127.0.0.1"
    port: int = 1883
    topic_prefix: str = "finestream"
    qos: int = 1
    retain: bool = False
    send_frames: bool = True
    max_queued: int = 1000
    keepalive_s: int = 30
    client_id: str | None = None
    tls: bool = False
    linger_s: float = 2.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.host or any(c.isspace() for c in self.host) or "/" in self.host:
            raise ValueError(f"mqtt.host must be a host name or address, got {self.host!r}")
        if isinstance(self.port, bool) or not 1 <= self.port <= 65535:
            raise ValueError(f"mqtt.port must be within 1..65535, got {self.port}")
        prefix = self.topic_prefix
        if not prefix or prefix.startswith("/") or prefix.endswith("/") or set(prefix) & {"+", "#"}:
            raise ValueError(
                "mqtt.topic_prefix must be topic levels without wildcards and without a leading "
                f"or trailing '/', e.g. 'finestream' or 'site/cameras', got {prefix!r}"
            )
        if self.qos not in (0, 1, 2):
            raise ValueError(f"mqtt.qos must be 0, 1 or 2, got {self.qos}")
        if not 1 <= self.max_queued <= 65535:  # message ids are 16 bits: one each in flight
            raise ValueError(f"mqtt.max_queued must be within 1..65535, got {self.max_queued}")
        if self.keepalive_s < 1:
            raise ValueError(f"mqtt.keepalive_s must be >= 1, got {self.keepalive_s}")
        if self.client_id is not None and not self.client_id:
            raise ValueError("mqtt.client_id must not be empty (null: a random one)")
        if self.linger_s < 0:
            raise ValueError(f"mqtt.linger_s must be >= 0, got {self.linger_s}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError(
                "mqtt: need 0 < reconnect_min_s <= reconnect_max_s, got "
                f"{self.reconnect_min_s} and {self.reconnect_max_s}"
            )


@dataclass(frozen=True)
class MqttCredentials:
    """What the environment says about logging in to the broker (see the module doc).

    Attributes:
        username, password: ``None`` when not set (anonymous).
        ca_path: a CA bundle to check the broker's certificate with; given, TLS is on.
        cert_path, key_path: a client certificate and its key, for brokers that ask for one.
    """

    username: str | None = None
    password: str | None = None
    ca_path: Path | None = None
    cert_path: Path | None = None
    key_path: Path | None = None

    def __repr__(self) -> str:  # never print the password
        return (
            f"MqttCredentials(username={self.username!r}, password={'***' if self.password else None}, "
            f"ca_path={self.ca_path}, cert_path={self.cert_path}, key_path={self.key_path})"
        )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> MqttCredentials:
        def path(name: str) -> Path | None:
            value = environ.get(name, "")
            return Path(value).expanduser() if value else None

        return cls(
            username=environ.get(ENV_USERNAME) or None,
            password=environ.get(ENV_PASSWORD) or None,
            ca_path=path(ENV_CA),
            cert_path=path(ENV_CERT),
            key_path=path(ENV_KEY),
        )

    def check(self) -> None:
        """Raises ``MqttSinkError`` for a password without a user name, or a file not there."""
        if self.password is not None and self.username is None:
            raise MqttSinkError(f"{ENV_PASSWORD} is set but {ENV_USERNAME} is not; set both")
        if (self.cert_path is None) != (self.key_path is None):
            raise MqttSinkError(f"{ENV_CERT} and {ENV_KEY} go together; set both or neither")
        for name, value in (
            (ENV_CA, self.ca_path),
            (ENV_CERT, self.cert_path),
            (ENV_KEY, self.key_path),
        ):
            if value is not None and not value.is_file():
                raise MqttSinkError(f"{name}: file not found: {value}; give an existing file")


@dataclass(frozen=True)
class MqttSinkStats:
    """Counters of an ``MqttEventSink``.

    Attributes:
        published: messages the broker has (QoS 0: written to its socket; QoS 1/2: acknowledged).
        dropped: messages lost: refused because the queue was full or (QoS 0) there was no
            connection, lost with a connection (QoS 0), or still queued when the run ended.
        pending: messages queued now, waiting for the broker.
        bytes_published: payload and topic bytes of the published messages.
        connected: connected to the broker now.
        connections: connections made (each after the first is a reconnect).
    """

    published: int
    dropped: int
    pending: int
    bytes_published: int
    connected: bool
    connections: int


def topic_for(prefix: str, stream: str, message_type: str) -> str:
    """``<prefix>/<stream>/<type>`` with MQTT's special characters in the levels made ``_``."""
    return (
        f"{prefix}/{stream.translate(_TOPIC_UNSAFE) or '_'}/"
        f"{message_type.translate(_TOPIC_UNSAFE) or '_'}"
    )


class MqttEventSink(StageBase[FramePacket]):
    """Sink[FramePacket] and event subscriber publishing ``stages.events`` messages over MQTT.

    Args:
        config: see ``MqttSinkConfig``.
        class_names: index = class id, for the detections' ``label``.
        environ: where the credentials are read (default ``os.environ``), once, here.
    """

    def __init__(
        self,
        config: MqttSinkConfig,
        class_names: Sequence[str],
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.class_names = list(class_names)
        self.name = "mqtt_events"
        self.credentials = MqttCredentials.from_environ(os.environ if environ is None else environ)
        self._client: mqtt.Client | None = None
        self._lock = threading.Lock()  # guards the counters and the pending table
        # mid -> (paho's message info, bytes): queued, not yet published.
        self._pending: dict[int, tuple[mqtt.MQTTMessageInfo, int]] = {}
        # Filled by paho's thread (deque.append is atomic), emptied under _lock.
        self._completed: deque[int] = deque()
        self._early: set[int] = set()  # completed before we had filed them
        self._connection_changed = False
        self._published = 0
        self._dropped = 0
        self._bytes = 0
        # Written only by paho's thread (plain assignments), read under _lock.
        self._connected = False
        self._connections = 0
        self._failing = False

    @property
    def broker(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    # --- the check phase (main thread) ------------------------------------------------------

    def check(self) -> None:
        """Before any thread starts: the credentials' files exist and the broker's name
        resolves (``MqttSinkError`` otherwise); a broker that does not answer now is a warning."""
        self.credentials.check()
        cfg = self.config
        try:
            addresses = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise MqttSinkError(
                f"mqtt.host {cfg.host!r}: cannot resolve the broker's name ({exc}); "
                "give the broker's host name or address"
            ) from None
        family, kind, proto, _, address = addresses[0]
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.settimeout(_PROBE_TIMEOUT_S)
                probe.connect(address)
        except OSError as exc:
            logger.warning(
                "MQTT broker %s does not answer now (%s); publishing starts when it does",
                self.broker,
                exc.strerror or exc,
            )

    # --- the stage (sink thread) ---------------------------------------------------------------

    def setup(self) -> None:
        cfg, cred = self.config, self.credentials
        client_id = cfg.client_id or f"finestream-{uuid.uuid4().hex[:8]}"
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311
        )
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        client.max_queued_messages_set(cfg.max_queued)
        client.reconnect_delay_set(
            min_delay=max(1, round(cfg.reconnect_min_s)), max_delay=round(cfg.reconnect_max_s)
        )
        client.connect_timeout = _CONNECT_TIMEOUT_S
        if cred.username is not None:
            client.username_pw_set(cred.username, cred.password)
        if cfg.tls or cred.ca_path is not None:
            client.tls_set(
                ca_certs=None if cred.ca_path is None else str(cred.ca_path),
                certfile=None if cred.cert_path is None else str(cred.cert_path),
                keyfile=None if cred.key_path is None else str(cred.key_path),
            )
        # Asynchronous: the network thread connects (and reconnects); nothing here waits.
        client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s)
        client.loop_start()
        self._client = client
        logger.info(
            "%s: publishing to %s as %s under %s/<stream>/<type> (QoS %d%s)",
            self.name,
            self.broker,
            client_id,
            cfg.topic_prefix,
            cfg.qos,
            ", TLS" if cfg.tls or cred.ca_path is not None else "",
        )

    def write(self, item: FramePacket) -> None:
        if self.config.send_frames:
            self._publish(item.stream_id, "frame", frame_event(item, self.class_names))

    def on_event(self, event: Mapping[str, Any]) -> None:
        """One event from the pipeline's channel, published under its own stream and type."""
        self._publish(str(event.get("stream", "")), str(event.get("type", "")), event)

    def teardown(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        # Give queued messages a moment to reach a broker that is there; a dead one costs nothing.
        deadline = time.monotonic() + self.config.linger_s
        while time.monotonic() < deadline:
            with self._lock:
                self._settle_locked()
                if not self._pending or not self._connected:
                    break
            time.sleep(_LINGER_POLL_S)
        client.disconnect()
        client.loop_stop()
        with self._lock:
            self._settle_locked()
            self._dropped += len(self._pending)  # never reached the broker
            self._pending.clear()
        stats = self.stats()
        logger.info(
            "%s: %d messages published, %d dropped, %d connections to %s",
            self.name,
            stats.published,
            stats.dropped,
            stats.connections,
            self.broker,
        )

    # --- from any thread -------------------------------------------------------------------------

    def stats(self) -> MqttSinkStats:
        """Counters now; thread-safe."""
        with self._lock:
            self._settle_locked()
            return MqttSinkStats(
                published=self._published,
                dropped=self._dropped,
                pending=len(self._pending),
                bytes_published=self._bytes,
                connected=self._connected,
                connections=self._connections,
            )

    # --- internals ---------------------------------------------------------------------------

    def _publish(self, stream: str, message_type: str, message: Mapping[str, Any]) -> None:
        client = self._client
        if client is None:
            return
        try:
            body = encode_event(message)
        except EventError as exc:
            # A producer's bad event must not stop the frames; say which one it was.
            logger.warning("%s: message not sent: %s", self.name, exc)
            return
        cfg = self.config
        topic = topic_for(cfg.topic_prefix, stream, message_type)
        size = len(body) + len(topic.encode("utf-8"))
        with self._lock:
            self._settle_locked()
            if len(self._pending) >= cfg.max_queued:
                self._dropped += 1
                return
            # Only queues (paho's network thread sends): returns at once, broker or not.
            info = client.publish(topic, body, qos=cfg.qos, retain=cfg.retain)
            rc = info.rc
            if rc == mqtt.MQTT_ERR_NO_CONN and cfg.qos == 0 or rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                self._dropped += 1
                return
            if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                self._dropped += 1
                logger.debug("%s: publish refused: %s", self.name, mqtt.error_string(rc))
                return
            if info.mid in self._early:
                self._early.discard(info.mid)
                self._published += 1
                self._bytes += size
            else:
                self._pending[info.mid] = (info, size)

    def _settle_locked(self) -> None:
        """Match what paho's thread reported against the pending table (lock held)."""
        while self._completed:
            mid = self._completed.popleft()
            entry = self._pending.pop(mid, None)
            if entry is None:
                self._early.add(mid)
                continue
            self._published += 1
            self._bytes += entry[1]
        if self._connection_changed:
            # QoS 0 messages still in paho's socket queue when a connection broke are marked
            # lost (without an on_publish) as it reconnects.
            self._connection_changed = False
            lost = [
                m for m, (info, _) in self._pending.items() if info.rc == mqtt.MQTT_ERR_CONN_LOST
            ]
            for mid in lost:
                del self._pending[mid]
            self._dropped += len(lost)

    # paho's network thread: no locks of ours (paho holds its own while calling these).

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            if not self._failing:  # once per outage (a wrong password is refused every try)
                self._failing = True
                logger.warning(
                    "%s: broker %s refused the connection: %s (credentials: %s, %s)",
                    self.name,
                    self.broker,
                    reason,
                    ENV_USERNAME,
                    ENV_PASSWORD,
                )
            self._connection_changed = True
            return
        self._connected = True
        self._failing = False
        self._connections += 1
        self._connection_changed = True
        if self._connections > 1:
            logger.warning("%s: reconnected to %s", self.name, self.broker)

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._connection_changed = True
        if not self._failing:  # once per outage, not at every attempt
            self._failing = True
            logger.warning(
                "%s: cannot connect to the broker %s; retrying every %g s at most "
                "(check the host, port, TLS and credentials; -vv shows paho's log)",
                self.name,
                self.broker,
                self.config.reconnect_max_s,
            )

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        was = self._connected
        self._connected = False
        self._connection_changed = True
        if was and self._client is not None:
            logger.warning(
                "%s: lost the broker %s (%s); reconnecting, %s",
                self.name,
                self.broker,
                reason,
                "messages meanwhile are dropped (QoS 0)"
                if self.config.qos == 0
                else f"messages meanwhile queue (at most {self.config.max_queued})",
            )

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self._completed.append(mid)
