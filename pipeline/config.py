"""The run configuration: one YAML file per deployment, validated at load.

Sections: ``sources`` (files or stream URLs), ``model`` (the inference stage's section; the
preprocessor takes its input size and device from it), ``track`` (the tracker's own section,
``null`` turns tracking off), ``outputs``, ``buffers`` and ``metrics`` (the Prometheus endpoint).
Unknown keys and wrong types are refused with the key's full path (see ``pipeline.schema``). CLI
flags override the file through ``apply_overrides``. ``configs/`` holds complete examples; every key
and default is listed in the README's config reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.batching import MAX_BATCH_LIMIT
from pipeline.prometheus import MetricsConfig
from pipeline.schema import ConfigError, load_yaml
from stages.analytics.config import StreamAnalyticsConfig
from stages.decode import DecodeConfig
from stages.infer import Backend, Device, InferConfig
from stages.live import LiveSourceConfig
from stages.sinks.jsonl import JsonLinesSinkConfig
from stages.sinks.mot import MotSinkConfig
from stages.sinks.mqtt import MqttSinkConfig
from stages.sinks.rtsp_publish import RtspPublishConfig
from stages.sinks.video import VideoSinkConfig
from stages.sinks.zmq_events import ZmqSinkConfig
from stages.track import TrackConfig


@dataclass(frozen=True)
class SourceConfig:
    """One source: exactly one of ``file`` (a video file) or ``live`` (a stream URL)."""

    file: DecodeConfig | None = None
    live: LiveSourceConfig | None = None

    def __post_init__(self) -> None:
        if (self.file is None) == (self.live is None):
            raise ValueError("a source needs exactly one of 'file' or 'live'")

    @property
    def stream_id(self) -> str:
        return self.file.stream_id if self.file is not None else self.live.stream_id  # type: ignore[union-attr]

    @classmethod
    def from_uri(cls, uri: str, stream_id: str) -> SourceConfig:
        """A URL with a scheme (rtsp://, http://...) is live; anything else is a file.

        Raises:
            ValueError: a scheme a live source does not take (``LiveSourceConfig``).
        """
        scheme, sep, _ = uri.partition("://")
        if sep and scheme.lower() != "file":
            return cls(live=LiveSourceConfig(url=uri, stream_id=stream_id))
        return cls(file=DecodeConfig(path=uri.removeprefix("file://"), stream_id=stream_id))


@dataclass(frozen=True)
class OutputsConfig:
    """Where results go; each is off when absent."""

    video: VideoSinkConfig | None = None
    jsonl: JsonLinesSinkConfig | None = None
    mot: MotSinkConfig | None = None
    zmq: ZmqSinkConfig | None = None
    rtsp: RtspPublishConfig | None = None
    # Broker credentials are not here on purpose: they come from the environment (mqtt.py).
    mqtt: MqttSinkConfig | None = None


@dataclass(frozen=True)
class BuffersConfig:
    """Ring-buffer sizes. Files block when a buffer is full (no frame is ever lost); live
    sources drop the oldest frame instead, and their buffers are kept short so the newest frame
    is always next.

    Files: 4 is enough to absorb one slow frame (a keyframe to decode, an x264 spike) and no
    more: each frame waiting in front of the inference adds one inference period of latency and
    a decoded picture of memory. 8 ran no faster (bench/RESULTS.md) with 1.7 s more latency.
    """

    capacity: int = 4
    live_capacity: int = 2

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.live_capacity < 1:
            raise ValueError("capacity and live_capacity must be >= 1")


@dataclass(frozen=True)
class BatchingConfig:
    """One inference stage for every source, in batches across them (``pipeline.batching``).

    Attributes:
        max_batch: the most frames, from different streams (or consecutive frames of a file),
            in one inference call; 1 (the default) runs one frame at a time, the streams taking
            turns. Worth raising where a batch costs little more than one frame (a GPU); on a CPU
            a batch costs about as much as its frames one by one.
        batch_timeout_ms: how long a batch waits, after its first frame, for the streams that
            have not given one yet; a stream that gives none in that time is left out of later
            batches until its next frame (a dead camera never delays the others again). Only
            matters when the inference is faster than the cameras: 40 ms is one frame at 25 fps.
    """

    max_batch: int = 1
    batch_timeout_ms: float = 40.0

    def __post_init__(self) -> None:
        if isinstance(self.max_batch, bool) or not 1 <= self.max_batch <= MAX_BATCH_LIMIT:
            raise ValueError(
                f"max_batch must be an int in [1, {MAX_BATCH_LIMIT}], got {self.max_batch!r}; "
                "1 runs one frame at a time"
            )
        if not 0 <= self.batch_timeout_ms <= 10_000:
            raise ValueError(
                f"batch_timeout_ms must be in [0, 10000] ms, got {self.batch_timeout_ms!r}; "
                "0 never waits"
            )


@dataclass(frozen=True)
class AppConfig:
    sources: tuple[SourceConfig, ...] = ()
    model: InferConfig = field(default_factory=InferConfig)
    track: TrackConfig | None = field(default_factory=TrackConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    buffers: BuffersConfig = field(default_factory=BuffersConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    # Counting lines and zones, one item per stream (stages/analytics/config.py); empty: off.
    analytics: tuple[StreamAnalyticsConfig, ...] = ()
    # The Prometheus endpoint (pipeline/prometheus.py); off unless metrics.port is set.
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


@dataclass(frozen=True)
class CliOverrides:
    """Values given on the command line; ``None`` (or empty) leaves the config's value."""

    sources: tuple[str, ...] = ()
    model: str | None = None
    size: str | None = None
    backend: str | None = None
    imgsz: int | None = None
    device: str | None = None
    score_threshold: float | None = None
    video: Path | None = None
    jsonl: Path | None = None
    mot: Path | None = None
    zmq: str | None = None
    publish: str | None = None
    mqtt: str | None = None
    metrics_port: int | None = None
    realtime: bool | None = None
    max_frames: int | None = None


def load_config(path: Path) -> AppConfig:
    """Read and validate a YAML config; errors name the file and the key path."""
    return load_yaml(
        AppConfig, path, missing=f"config file not found: {path} (see configs/ for examples)"
    )


def apply_overrides(config: AppConfig, cli: CliOverrides) -> AppConfig:
    """The config with the command line's values put in (each re-validated)."""
    try:
        return _apply_overrides(config, cli)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"command line: {exc}") from None


def _apply_overrides(config: AppConfig, cli: CliOverrides) -> AppConfig:
    sources = config.sources
    if cli.sources:
        sources = tuple(SourceConfig.from_uri(uri, str(i)) for i, uri in enumerate(cli.sources))
    file_changes: dict[str, object] = {}
    if cli.realtime is not None:
        file_changes["realtime"] = cli.realtime
    if cli.max_frames is not None:
        file_changes["max_frames"] = cli.max_frames
    if file_changes:
        sources = tuple(
            dataclasses.replace(s, file=dataclasses.replace(s.file, **file_changes))  # type: ignore[arg-type]
            if s.file is not None
            else s
            for s in sources
        )

    model_changes: dict[str, object] = {}
    if cli.model is not None:
        model_changes["model"] = cli.model
    for key, value in (
        ("size", cli.size),
        ("imgsz", cli.imgsz),
        ("score_threshold", cli.score_threshold),
    ):
        if value is not None:
            model_changes[key] = value
    if cli.backend is not None:
        model_changes["backend"] = Backend(cli.backend)
    if cli.device is not None:
        model_changes["device"] = Device(cli.device)
    model = dataclasses.replace(config.model, **model_changes)  # type: ignore[arg-type]

    outputs = config.outputs
    # Each flag sets one key of its section and keeps the rest (trail length, crf, ...): a
    # section the config lacks is made with its defaults.
    flags: tuple[tuple[str, str, object, Any], ...] = (
        ("video", "path", cli.video, VideoSinkConfig),
        ("jsonl", "path", cli.jsonl, JsonLinesSinkConfig),
        ("mot", "path", cli.mot, MotSinkConfig),
        ("zmq", "endpoint", cli.zmq, ZmqSinkConfig),
        ("rtsp", "url", cli.publish, RtspPublishConfig),
        ("mqtt", "host", cli.mqtt, MqttSinkConfig),
    )
    for section, key, given, kind in flags:
        if given is None:
            continue
        current = getattr(outputs, section)
        changed: dict[str, Any] = {key: str(given)}
        updated = kind(**changed) if current is None else dataclasses.replace(current, **changed)
        outputs = dataclasses.replace(outputs, **{section: updated})
    metrics = config.metrics
    if cli.metrics_port is not None:
        metrics = dataclasses.replace(metrics, port=cli.metrics_port)
    return dataclasses.replace(
        config, sources=sources, model=model, outputs=outputs, metrics=metrics
    )
