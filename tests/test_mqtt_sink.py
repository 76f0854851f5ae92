"""The MQTT sink against a real broker: Debian's mosquitto, started here on a free loopback port.

Every run is the real pipeline (real decoding of shared clips or a real RTSP camera, the teacher
ONNX in ONNX Runtime) with a JSON Lines sink beside the MQTT one: what the broker's subscriber
gets is compared with what the file holds. Without mosquitto on PATH these tests skip and say
how to install it (scripts/setup.sh does, as root).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from pipeline.assemble import AssembledPipeline, build_pipeline
from pipeline.cli import EXIT_USAGE, main
from pipeline.config import AppConfig, OutputsConfig, SourceConfig, load_config
from pipeline.schema import ConfigError
from rtsp_server import RtspServer, free_port
from stages.decode import DecodeConfig
from stages.infer import InferConfig
from stages.live import LiveSourceConfig
from stages.sinks.jsonl import JsonLinesSinkConfig
from stages.sinks.mqtt import (
    ENV_PASSWORD,
    ENV_USERNAME,
    MqttEventSink,
    MqttSinkConfig,
    MqttSinkError,
    topic_for,
)
from tests.conftest import SHARED
from tests.media import media_path

TEACHER = SHARED / "teachers" / "nanodet_coco_416.onnx"
# Root's PATH has /usr/sbin, where Debian puts the broker; a user's may not.
MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")


@pytest.fixture(scope="module")
def teacher() -> Path:
    if not TEACHER.is_file():
        pytest.skip(f"teacher ONNX not found at {TEACHER}")
    return TEACHER


class Broker:
    """mosquitto on 127.0.0.1:``port`` with a generated config; stop() and start() again on the
    same port, like a broker restarted under a running client."""

    def __init__(
        self, tmp: Path, password_file: Path | None = None, extra: tuple[str, ...] = ()
    ) -> None:
        if MOSQUITTO is None:
            pytest.skip(
                "mosquitto not found on PATH: install Debian's 'mosquitto' package "
                "(scripts/setup.sh does as root)"
            )
        self.port = free_port()
        self.conf = tmp / f"mosquitto-{self.port}.conf"
        lines = [f"listener {self.port} 127.0.0.1", "persistence false", "log_dest stderr"]
        if os.geteuid() == 0:
            # Started as root, mosquitto turns into user 'mosquitto', who cannot read the
            # test's private folder (the password file).
            lines.append("user root")
        if password_file is None:
            lines.append("allow_anonymous true")
        else:
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        lines += extra
        self.conf.write_text("\n".join(lines) + "\n")
        self._log = tempfile.TemporaryFile()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        assert MOSQUITTO is not None
        self._proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=self._log, stderr=self._log
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"mosquitto exited: {self._log.read().decode()[-500:]}")
            try:
                import socket

                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within 10 s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    b = Broker(tmp_path).start()
    yield b
    b.stop()


class Subscriber:
    """A paho client subscribed to ``topic`` (QoS 1), resubscribing after each reconnect."""

    def __init__(
        self, port: int, topic: str = "finestream/#", auth: tuple[str, str] | None = None
    ) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{port}")
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.client.reconnect_delay_set(1, 1)

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            client.subscribe(topic, qos=1)

        def on_subscribe(client: Any, userdata: Any, mid: Any, reasons: Any, props: Any) -> None:
            self._subscribed.set()

        def on_message(client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            with self._lock:
                self.messages.append((msg.topic, json.loads(msg.payload)))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the subscriber did not get its SUBACK"

    def count(self) -> int:
        with self._lock:
            return len(self.messages)

    def wait_quiet(self, quiet_s: float = 0.5, timeout_s: float = 10) -> None:
        """Until no message came for ``quiet_s``."""
        deadline = time.monotonic() + timeout_s
        last = -1
        while time.monotonic() < deadline and self.count() != last:
            last = self.count()
            time.sleep(quiet_s)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _wait(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _config(
    source: SourceConfig, model: Path, jsonl: Path, mqtt_config: MqttSinkConfig, **kw: Any
) -> AppConfig:
    return dataclasses.replace(
        AppConfig(),
        sources=(source,),
        model=InferConfig(model=model),
        outputs=OutputsConfig(jsonl=JsonLinesSinkConfig(path=str(jsonl)), mqtt=mqtt_config),
        **kw,
    )


def _stage(assembled: AssembledPipeline, name: str) -> Any:
    return next(s for s in assembled.metrics().stages if s.name == name)


def _timeless(message: dict[str, Any]) -> dict[str, Any]:
    """A message without the fields each sink stamps itself."""
    return {k: v for k, v in message.items() if k not in ("time_unix_s", "latency_s")}


def _run(assembled: AssembledPipeline, timeout_s: float = 300) -> None:
    assembled.pipeline.start()
    assembled.pipeline.join(timeout=timeout_s)
    assert not assembled.pipeline.running, "the run did not finish"


# ---- every message reaches a subscriber --------------------------------------------------------


def test_a_subscriber_receives_every_message_the_jsonl_sink_wrote(
    broker: Broker, teacher: Path, tmp_path: Path
) -> None:
    clip = media_path("traffic_highway_960x540.mp4")
    jsonl = tmp_path / "run.jsonl"
    source = SourceConfig(file=DecodeConfig(path=str(clip), stream_id="cam0", max_frames=90))
    config = _config(source, teacher, jsonl, MqttSinkConfig(port=broker.port, qos=1))
    sub = Subscriber(broker.port)
    try:
        assembled = build_pipeline(config)
        _run(assembled)
        sub.wait_quiet()
    finally:
        sub.close()
    written = [json.loads(line) for line in jsonl.read_text().splitlines()]
    types = {m["type"] for m in written}
    assert sum(m["type"] == "frame" for m in written) == 90
    assert "track_started" in types and "track_ended" in types, types  # events, not only frames
    # Every message, in the order the JSON Lines sink wrote it, with the same JSON (each sink
    # makes its own frame message: its wall clock and latency are its own)...
    assert [_timeless(payload) for _, payload in sub.messages] == [_timeless(m) for m in written]
    # ...each on <prefix>/<stream>/<type>.
    assert all(topic == f"finestream/cam0/{m['type']}" for topic, m in sub.messages)
    counters = assembled.metrics().counters["mqtt_events"]
    assert counters["published"] == len(written) and counters["dropped"] == 0
    assert counters["pending"] == 0 and counters["connections"] == 1


def test_a_dead_broker_from_the_start_costs_the_run_nothing_and_every_message_is_counted(
    teacher: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clip = media_path("cars_320x240_mjpeg.avi")
    jsonl = tmp_path / "run.jsonl"
    source = SourceConfig(file=DecodeConfig(path=str(clip), stream_id="0"))
    # Nothing listens on this port; a small queue so the drops start at once.
    mqtt_config = MqttSinkConfig(port=free_port(), max_queued=5, linger_s=0.5)
    config = _config(source, teacher, jsonl, mqtt_config, track=None)
    with caplog.at_level("WARNING"):
        assembled = build_pipeline(config)  # the check phase warns, and does not refuse
        assert any("does not answer now" in r.getMessage() for r in caplog.records)
        _run(assembled)
    lines = jsonl.read_text().splitlines()
    assert len(lines) == 30  # every frame of the clip
    counters = assembled.metrics().counters["mqtt_events"]
    assert counters["published"] == 0 and counters["dropped"] == len(lines)
    assert counters["connected"] is False and counters["pending"] == 0
    assert _stage(assembled, "mqtt_events").items == 30


# ---- the broker goes away mid-run ---------------------------------------------------------------


@pytest.mark.rtsp
def test_a_broker_stopped_mid_run_keeps_the_frame_rate_and_counts_the_drops(
    broker: Broker, teacher: Path, tmp_path: Path
) -> None:
    """A live camera (its drop-oldest buffers make a sink that blocks fall behind, visibly):
    the broker is stopped, the MQTT sink keeps pace with the JSON Lines sink frame for frame and
    counts what it cannot deliver, then reconnects when the broker comes back."""
    jsonl = tmp_path / "run.jsonl"
    with RtspServer(media_path("cars_320x240_mjpeg.avi")) as camera:
        live = LiveSourceConfig(url=camera.url, stream_id="cam")
        mqtt_config = MqttSinkConfig(port=broker.port, qos=1, max_queued=50, reconnect_max_s=1.0)
        config = _config(SourceConfig(live=live), teacher, jsonl, mqtt_config, track=None)
        sub = Subscriber(broker.port)
        assembled = build_pipeline(config)
        mqtt_sink = next(s for s in assembled.stages if isinstance(s, MqttEventSink))
        assembled.pipeline.start()
        try:
            assert _wait(lambda: mqtt_sink.stats().published >= 10, 300), "nothing published"

            def figures() -> tuple[int, int, int]:
                return (
                    _stage(assembled, "mqtt_events").items,
                    _stage(assembled, "jsonl_sink").items,
                    _stage(assembled, "infer").items,
                )

            broker.stop()
            assert _wait(lambda: not mqtt_sink.stats().connected, 10)
            before = figures()
            received_at_stop = sub.count()
            assert _wait(lambda: figures()[1] >= before[1] + 60, 300), "frames stopped flowing"
            after = figures()
            down = mqtt_sink.stats()
            broker.start()
            assert _wait(lambda: mqtt_sink.stats().connections >= 2, 60), "no reconnect"
            assert _wait(lambda: sub.count() > received_at_stop + 10, 120), "nothing after it"
            back = mqtt_sink.stats()
        finally:
            assembled.stop()
            assembled.pipeline.join(timeout=30)
            sub.close()
    mqtt_frames, jsonl_frames, infer_frames = (a - b for a, b in zip(after, before))
    print(
        f"broker down: mqtt sink {mqtt_frames} frames, jsonl sink {jsonl_frames}, inference "
        f"{infer_frames}; mqtt dropped {down.dropped}, pending {down.pending}"
    )
    # The MQTT sink wrote as many frames as the JSON Lines sink while the broker was gone: a
    # publish that waited for the broker would have made its drop-oldest buffer drop them.
    assert mqtt_frames >= jsonl_frames - 2, (mqtt_frames, jsonl_frames)
    assert infer_frames >= 60
    buffers = {b.name: b for b in assembled.metrics().buffers}
    assert buffers["mqtt_events.in"].dropped <= buffers["jsonl_sink.in"].dropped + 2
    # What could not wait for the broker was dropped, counted, and memory stayed bounded.
    assert down.dropped >= 60 - 50 and down.pending <= 50
    assert back.connections >= 2
    table = assembled.metrics().format_table()
    assert any(line.startswith("mqtt_events") and "dropped" in line for line in table.splitlines())


# ---- credentials come from the environment -------------------------------------------------------


def test_user_and_password_from_the_environment_log_in(
    teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    passwords = tmp_path / "passwords"
    subprocess.run(
        [shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-b", "-c"]
        + [str(passwords), "cam-user", "s3cret"],
        check=True,
        capture_output=True,
    )
    os.chmod(passwords, 0o600)
    broker = Broker(tmp_path, password_file=passwords).start()
    try:
        sub = Subscriber(broker.port, auth=("cam-user", "s3cret"))
        clip = media_path("cars_320x240_mjpeg.avi")
        results = {}
        for password in ("s3cret", "wrong"):
            monkeypatch.setenv(ENV_USERNAME, "cam-user")
            monkeypatch.setenv(ENV_PASSWORD, password)
            source = SourceConfig(file=DecodeConfig(path=str(clip), max_frames=10))
            mqtt_config = MqttSinkConfig(port=broker.port, linger_s=0.5, send_frames=True)
            jsonl = tmp_path / f"{password}.jsonl"
            assembled = build_pipeline(_config(source, teacher, jsonl, mqtt_config, track=None))
            _run(assembled)
            results[password] = assembled.metrics().counters["mqtt_events"]
        sub.wait_quiet()
        sub.close()
    finally:
        broker.stop()
    assert results["s3cret"]["published"] == 10 and results["s3cret"]["dropped"] == 0
    # A refused login is not a failed run: nothing is published, all of it counted as dropped.
    assert results["wrong"]["published"] == 0 and results["wrong"]["dropped"] == 10
    assert sub.count() == 10


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not found on PATH (Debian package 'openssl')")
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    cert, key, csr = folder / "server.pem", folder / "server.key", folder / "server.csr"
    san = folder / "san.ext"
    san.write_text("subjectAltName=IP:127.0.0.1\n")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca]
        + ["-days", "1", "-subj", "/CN=finestream test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr]
        + ["-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial"]
        + ["-out", cert, "-days", "1", "-extfile", san],
    ):
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True)
    return ca, cert, key


def test_tls_with_the_ca_from_the_environment(
    teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = _tls_files(tmp_path)
    tls = (f"cafile {ca}", f"certfile {cert}", f"keyfile {key}")
    broker = Broker(tmp_path, extra=tls).start()
    clip = media_path("cars_320x240_mjpeg.avi")
    results = {}
    try:
        for name, environ in (("our CA", {"FINESTREAM_MQTT_CA": str(ca)}), ("system CAs", {})):
            monkeypatch.delenv("FINESTREAM_MQTT_CA", raising=False)
            for k, v in environ.items():
                monkeypatch.setenv(k, v)
            source = SourceConfig(file=DecodeConfig(path=str(clip), max_frames=10))
            mqtt_config = MqttSinkConfig(port=broker.port, tls=True, linger_s=0.5)
            jsonl = tmp_path / "tls.jsonl"
            assembled = build_pipeline(_config(source, teacher, jsonl, mqtt_config, track=None))
            _run(assembled)
            results[name] = assembled.metrics().counters["mqtt_events"]
    finally:
        broker.stop()
    # Acknowledged by the broker (QoS 1) over TLS checked against the CA from the environment.
    assert results["our CA"]["published"] == 10 and results["our CA"]["dropped"] == 0
    # The system's CAs do not know this broker: no connection, the run goes on, all counted.
    assert results["system CAs"]["published"] == 0 and results["system CAs"]["dropped"] == 10
    assert results["system CAs"]["connections"] == 0


def test_credentials_are_refused_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("outputs:\n  mqtt:\n    host: broker.local\n    password: hunter2\n")
    with pytest.raises(ConfigError, match=r"outputs\.mqtt\.password: unknown key"):
        load_config(config)


def test_a_password_without_a_user_name_and_a_missing_ca_are_refused_in_one_line() -> None:
    sink = MqttEventSink(MqttSinkConfig(), [], environ={ENV_PASSWORD: "x"})
    with pytest.raises(MqttSinkError, match=ENV_USERNAME):
        sink.check()
    sink = MqttEventSink(MqttSinkConfig(), [], environ={"FINESTREAM_MQTT_CA": "/no/ca.pem"})
    with pytest.raises(MqttSinkError, match="FINESTREAM_MQTT_CA: file not found: /no/ca.pem"):
        sink.check()
    environ = {ENV_USERNAME: "u", ENV_PASSWORD: "x"}
    assert "'x'" not in repr(MqttEventSink(MqttSinkConfig(), [], environ=environ).credentials)


# ---- bad settings are refused before anything starts ---------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"port": 0}, "mqtt.port must be within 1..65535"),
        ({"port": 70000}, "mqtt.port must be within 1..65535"),
        ({"host": "tcp://broker"}, "mqtt.host must be a host name"),
        ({"qos": 3}, "mqtt.qos must be 0, 1 or 2"),
        ({"topic_prefix": "a/#"}, "mqtt.topic_prefix"),
        ({"topic_prefix": "a/"}, "mqtt.topic_prefix"),
        ({"max_queued": 0}, "mqtt.max_queued"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        MqttSinkConfig(**kwargs)


def test_a_broker_name_that_does_not_resolve_fails_the_check_phase_in_one_line(
    teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clip = media_path("cars_320x240_mjpeg.avi")
    out = tmp_path / "out.jsonl"
    code = main(
        ["run", "--no-progress", "--source", str(clip), "--model", str(teacher)]
        + ["--jsonl", str(out), "--mqtt", "no-such-broker.invalid"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE
    assert err[-1].startswith(
        "finestream: error: mqtt.host 'no-such-broker.invalid': cannot resolve"
    )
    assert not out.exists()  # refused before any output was made


def test_topics_keep_mqtt_special_characters_out_of_the_levels() -> None:
    assert topic_for("finestream", "cam0", "frame") == "finestream/cam0/frame"
    assert topic_for("site/a", "gate/1+#", "line_crossed") == "site/a/gate_1__/line_crossed"
    assert topic_for("finestream", "", "frame") == "finestream/_/frame"
