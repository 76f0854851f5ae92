"""Build a runnable ``Pipeline`` from an ``AppConfig``.

The shape is fixed: sources → preprocess → inference → tracking (optional) → sinks (fan-out).
What changes with the sources is the buffer policy: with files every buffer blocks, so no frame
is ever lost; with any live source the buffers in front of the processors and sinks drop their
oldest frame and are kept short, so the newest frame is always the next one processed and
latency cannot build up. Drops are counted per buffer in the metrics.

Every source shares the one inference stage. With a live source, or ``batching.max_batch`` above
1, its input is a ``Batcher`` (``pipeline.batching``) with a lane per stream: a latest-frame slot
per camera (the stale frame is dropped and counted), a blocking FIFO per file (nothing lost), and
batches of up to ``max_batch`` frames from the streams that have one ready, in turn, so every
camera gets its share and a dead one delays the others at most once, by ``batch_timeout_ms``.
Live runs drop before work: the cameras feed the inference stage's lanes directly, and the
stage converts and preprocesses only the frames it takes (``InferenceStage(preprocessor=...)``);
files keep the preprocessor in its own thread, where it overlaps the inference.

Each stage receives only its own section of the config.

``build_pipeline`` is also the check phase: in the calling (main) thread, before any stage
thread starts, it opens every file source and decodes its first frame, and reads the model
file's facts (``ModelInfo``) and checks them against the config; a live URL is not probed (a
camera may come up later, by design). Every failure is one ``ValueError`` line naming the
thing and the fix. The model itself is loaded once, later, in the inference thread.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dfine.model_info import ModelInfo
from pipeline.batching import BatchSpec, LaneSpec
from pipeline.config import AppConfig, SourceConfig
from pipeline.metrics import PipelineMetrics
from pipeline.ring_buffer import OverflowPolicy
from pipeline.runner import BufferSpec, EventChannel, Pipeline
from pipeline.schema import ConfigError
from pipeline.stage import Processor, Sink
from stages.analytics.stage import AnalyticsStage
from stages.decode import FileSource
from stages.frame import FramePacket
from stages.infer import (
    Backend,
    BackendChoice,
    InferenceStage,
    PreparedModel,
    make_backend,
    prepare_model,
)
from stages.live import LiveSource
from stages.preprocess import PreprocessConfig, Preprocessor
from stages.sinks.jsonl import JsonLinesSink
from stages.sinks.mot import MotSink
from stages.sinks.mqtt import MqttEventSink
from stages.sinks.rtsp_publish import RtspPublishSink
from stages.sinks.video import VideoFileSink
from stages.sinks.zmq_events import ZmqEventSink
from stages.track import Tracker

logger = logging.getLogger(__name__)


@dataclass
class AssembledPipeline:
    """A pipeline ready to start, with what the CLI shows about it.

    Attributes:
        model: the model file's facts, read once in the check phase; the sinks' labels and
            the backend's class names both come from it.
        backend: which backend runs it and why (the CLI's start-up line).
        stages: every stage, in pipeline order (sources, processors, sinks).
    """

    pipeline: Pipeline
    sources: Sequence[FileSource | LiveSource]
    live: bool
    model: ModelInfo
    backend: BackendChoice
    outputs: list[str] = field(default_factory=list)
    stages: Sequence[Any] = ()

    def total_frames(self) -> int | None:
        """Frames expected from all sources, when every source is a file that knows its length."""
        if self.live:
            return None
        totals = [s.total_frames for s in self.sources if isinstance(s, FileSource)]
        if not totals or any(t is None for t in totals):
            return None
        return sum(t for t in totals if t is not None)

    def metrics(self) -> PipelineMetrics:
        """The pipeline's metrics with the counters of every stage that keeps its own (a
        ``stats()`` method: live sources' outages and reconnects; ZeroMQ, MQTT and RTSP sinks'
        drops and bytes; analytics' counts per line, zone and class)."""
        counters: dict[str, dict[str, int | float | bool]] = {}
        for stage in self.stages:
            stats_of = getattr(stage, "stats", None)
            if not callable(stats_of):
                continue
            stats = stats_of()
            values = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(stats)
            counters[stage.name] = {
                k: v for k, v in values.items() if isinstance(v, (int, float, bool))
            }
        return dataclasses.replace(self.pipeline.metrics(), counters=counters)

    def output_summary(self) -> list[str]:
        return [f"wrote {o}" for o in self.outputs]

    def stop(self) -> None:
        """Graceful stop (SIGINT/SIGTERM); a second call aborts."""
        self.pipeline.stop()

    def input_losses(self) -> list[str]:
        """One line per file source that was cut short (judged on evidence), after the run."""
        losses = []
        for source in self.sources:
            if isinstance(source, FileSource) and source.truncation is not None:
                of = ""
                if source.frames_lost_estimate:
                    of = f" of ~{source.frames_decoded + source.frames_lost_estimate}"
                losses.append(
                    f"{source.config.path}: decoded {source.frames_decoded}{of} frames; the file "
                    f"is truncated ({source.truncation}); outputs hold the "
                    f"{source.frames_decoded} decoded frames"
                )
        return losses


def build_pipeline(config: AppConfig) -> AssembledPipeline:
    """The pipeline ``config`` describes, after the check phase (see the module doc).

    Raises:
        ConfigError, ValueError: bad input, one line each (``VideoSourceError`` for a source,
            ``dfine.CheckpointError`` for the model file); nothing has started.
    """
    if not config.sources:
        raise ConfigError("no source: give --source PATH_OR_URL or list 'sources' in the config")
    _check_stream_ids(config.sources)
    prepared = prepare_model(config.model)
    # Files are opened here, in the main thread, and their first frame decoded: "cannot read"
    # is said before any thread starts or any output is created.
    for source_config in config.sources:
        if source_config.file is not None:
            FileSource(source_config.file).check()
    live = any(s.live is not None for s in config.sources)
    if live:
        # Behind the inference a batch arrives all at once: room for a whole one, or a burst of
        # max_batch frames would drop some of the very frames just inferred.
        capacity = max(config.buffers.live_capacity, config.batching.max_batch)
        spec = BufferSpec(capacity, OverflowPolicy.DROP_OLDEST)
    else:
        spec = BufferSpec(config.buffers.capacity, OverflowPolicy.BLOCK)

    if prepared.choice.backend is not Backend.TORCH:
        # torch only resizes frames here; its default pool of one thread per core fights the
        # model's runtime for the cores (bench/RESULTS.md: 3-6 ms with 1 thread, 24-27 with 2).
        torch.set_num_threads(1)
    # Every event (track, analytics, source lost/restored) reaches every output through this
    # channel, also while no frames flow, and no buffer policy drops one.
    events = EventChannel()
    class_names = list(prepared.info.class_names)
    processors = _make_processors(config, prepared, class_names, events.publish, live)
    infer_input = _infer_input(config, live)
    sinks, outputs = _make_sinks(config, class_names)
    sources = [_make_source(s, events.publish) for s in config.sources]
    if not sinks:
        logger.warning(
            "no outputs configured: detections are computed but not saved "
            "(add --output, --jsonl, --mot, --zmq or --mqtt)"
        )
    pipeline = Pipeline(
        sources,
        [
            (p, infer_input if infer_input and isinstance(p, InferenceStage) else spec)
            for p in processors
        ],
        [(s, spec) for s in sinks],
        # After a failure, a stage stuck in native code is given this long; with the CLI's
        # exit that keeps "failure to exit" within 5 s.
        join_timeout_s=3.0,
        thread_nice=nice_all_but_inference([*sources, *processors, *sinks]) if not live else None,
        events=events,
    )
    return AssembledPipeline(
        pipeline=pipeline,
        sources=sources,
        live=live,
        model=prepared.info,
        backend=prepared.choice,
        outputs=outputs,
        stages=[*sources, *processors, *sinks],
    )


# Files: inference is the bottleneck by far, and on a small machine the decoder's, encoder's and
# other stages' threads would otherwise take turns on its core (bench/RESULTS.md: efficiency 0.83
# -> 1.0 at 1080p on 2 cores). Live sources keep normal priority: a starved decoder would let
# the camera's stream back up in the socket, which is latency.
BACKGROUND_NICE = 10


def nice_all_but_inference(stages: Sequence[Any], nice: int = BACKGROUND_NICE) -> dict[str, int]:
    """``Pipeline(thread_nice=...)`` for ``stages``: every stage but the inference at ``nice``."""
    return {s.name: nice for s in stages if not isinstance(s, InferenceStage)}


def _check_stream_ids(sources: Sequence[SourceConfig]) -> None:
    seen: set[str] = set()
    for i, source in enumerate(sources):
        if source.stream_id in seen:
            raise ConfigError(
                f"sources[{i}]: stream_id {source.stream_id!r} is used twice; give each source its own"
            )
        seen.add(source.stream_id)


#: A camera's lane in front of the inference: only its newest frame waits (no lag builds up).
LATEST_FRAME = LaneSpec(1, OverflowPolicy.DROP_OLDEST)


def _stream_id(packet: FramePacket) -> str:
    return packet.stream_id


def _infer_input(config: AppConfig, live: bool) -> BatchSpec | None:
    """The inference stage's per-stream lanes, or ``None`` for the one plain buffer (files with
    ``max_batch`` 1, as before batching existed)."""
    batching = config.batching
    if not live and batching.max_batch == 1:
        return None
    # A file's lane holds a whole batch, so one file alone still fills batches.
    file_lane = LaneSpec(max(config.buffers.capacity, batching.max_batch), OverflowPolicy.BLOCK)
    lanes = {s.stream_id: LATEST_FRAME if s.live is not None else file_lane for s in config.sources}
    return BatchSpec(
        key=_stream_id,
        max_batch=batching.max_batch,
        batch_timeout_s=batching.batch_timeout_ms / 1000.0,
        lanes=lanes,
        default_lane=LATEST_FRAME if live else file_lane,
    )


def _make_source(
    config: SourceConfig, on_event: Callable[[dict[str, Any]], None] | None
) -> FileSource | LiveSource:
    if config.file is not None:
        return FileSource(config.file)
    assert config.live is not None  # SourceConfig guarantees one of the two
    return LiveSource(config.live, on_event=on_event)


def _make_processors(
    config: AppConfig,
    prepared: PreparedModel,
    class_names: list[str],
    publish: Callable[[dict[str, Any]], None],
    live: bool,
) -> list[Processor[FramePacket, FramePacket]]:
    model, info = prepared.config, prepared.info
    assert model.imgsz is not None  # settled by prepare_model
    preprocess = Preprocessor(
        PreprocessConfig(input_size=model.imgsz, device=model.device, tiling=model.tiling)
    )
    # Live: the inference stage preprocesses the frames it takes, none that will be dropped.
    infer = InferenceStage(
        model,
        lambda: make_backend(model, info),
        preprocessor=preprocess if live else None,
        max_batch=config.batching.max_batch,
    )
    processors: list[Processor[FramePacket, FramePacket]] = [infer] if live else [preprocess, infer]
    if config.track is not None:
        processors.append(Tracker(config.track, class_names, publish))
    if config.analytics:
        known = {s.stream_id for s in config.sources}
        for i, item in enumerate(config.analytics):
            if item.stream_id not in known:
                raise ConfigError(
                    f"analytics[{i}].stream_id: no source has stream_id "
                    f"{item.stream_id!r} (sources: {', '.join(sorted(known))})"
                )
        if config.track is None:
            raise ConfigError(
                "analytics: lines and zones count tracks; turn tracking on (remove 'track: null')"
            )
        processors.append(AnalyticsStage(config.analytics, class_names, publish))
    return processors


def _make_sinks(
    config: AppConfig, class_names: list[str]
) -> tuple[list[Sink[FramePacket]], list[str]]:
    out = config.outputs
    sinks: list[Sink[FramePacket]] = []
    outputs: list[str] = []
    if out.video is not None:
        sinks.append(VideoFileSink(out.video, class_names))
        outputs.append(f"annotated video: {out.video.path}")
    if out.jsonl is not None:
        sinks.append(JsonLinesSink(out.jsonl, class_names))
        outputs.append(f"detections (JSON lines): {out.jsonl.path}")
    if out.mot is not None:
        sinks.append(MotSink(out.mot))
        outputs.append(f"tracks (MOTChallenge): {out.mot.path}")
    if out.zmq is not None:
        sinks.append(ZmqEventSink(out.zmq, class_names))
        outputs.append(f"events (ZeroMQ): {out.zmq.endpoint}")
    if out.rtsp is not None:
        sinks.append(RtspPublishSink(out.rtsp, class_names))
        outputs.append(f"annotated stream (RTSP): {out.rtsp.url}")
    if out.mqtt is not None:
        mqtt_sink = MqttEventSink(out.mqtt, class_names)
        mqtt_sink.check()  # the broker's name and the credentials' files, before any thread
        sinks.append(mqtt_sink)
        outputs.append(
            f"events (MQTT): {mqtt_sink.broker} under {out.mqtt.topic_prefix}/<stream>/<type>"
        )
    return sinks, outputs
