"""Build a runnable ``Pipeline`` from an ``AppConfig``.

The shape is fixed: sources → preprocess → inference → tracking (optional) → sinks (fan-out).
What changes with the sources is the buffer policy: with files every buffer blocks, so no frame
is ever lost; with any live source the buffers in front of the processors and sinks drop their
oldest frame and are kept short, so the newest frame is always the next one processed and
latency cannot build up. Drops are counted per buffer in the metrics.

Each stage receives only its own section of the config.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.config import AppConfig, SourceConfig
from pipeline.ring_buffer import OverflowPolicy
from pipeline.runner import BufferSpec, Pipeline
from pipeline.schema import ConfigError
from pipeline.stage import Processor, Sink, Source
from stages.decode import FileSource
from stages.frame import FramePacket
from stages.infer import Backend, InferConfig, InferenceStage, make_backend, resolve_backend
from stages.live import LiveSource
from stages.preprocess import PreprocessConfig, PreprocessDevice, Preprocessor
from stages.sinks.jsonl import JsonLinesSink
from stages.sinks.mot import MotSink
from stages.sinks.rtsp_publish import RtspPublishSink
from stages.sinks.video import VideoFileSink
from stages.sinks.zmq_events import ZmqEventSink
from stages.track import Tracker

logger = logging.getLogger(__name__)


@dataclass
class AssembledPipeline:
    """A pipeline ready to start, with what the CLI shows about it."""

    pipeline: Pipeline
    sources: Sequence[FileSource | LiveSource]
    live: bool
    outputs: list[str] = field(default_factory=list)

    def total_frames(self) -> int | None:
        """Frames expected from all sources, when every source is a file that knows its length."""
        if self.live:
            return None
        totals = [s.total_frames for s in self.sources if isinstance(s, FileSource)]
        if not totals or any(t is None for t in totals):
            return None
        return sum(t for t in totals if t is not None)

    def output_summary(self) -> list[str]:
        return [f"wrote {o}" for o in self.outputs]

    def stop(self) -> None:
        """Graceful stop (SIGINT/SIGTERM); a second call aborts."""
        self.pipeline.stop()

    def input_losses(self) -> list[str]:
        """One line per file source that ended early (a truncated file), after the run."""
        losses = []
        for source in self.sources:
            if isinstance(source, FileSource) and source.frames_lost_estimate:
                total = source.frames_decoded + source.frames_lost_estimate
                losses.append(
                    f"{source.config.path}: decoded {source.frames_decoded} of ~{total} frames; "
                    f"the file is truncated (outputs hold the {source.frames_decoded} decoded frames)"
                )
        return losses


def build_pipeline(config: AppConfig) -> AssembledPipeline:
    """The pipeline ``config`` describes; raises ``ConfigError`` or ``FileNotFoundError``
    (one line each) for what can be checked before any thread starts."""
    if not config.sources:
        raise ConfigError("no source: give --source PATH_OR_URL or list 'sources' in the config")
    _check_stream_ids(config.sources)
    for source_config in config.sources:
        if source_config.file is not None and not Path(source_config.file.path).is_file():
            raise FileNotFoundError(
                f"video file not found: {source_config.file.path} (check --source or sources[].file.path)"
            )
    if config.model.model is not None and not Path(config.model.model).is_file():
        raise FileNotFoundError(f"model file not found: {config.model.model} (check --model)")
    if config.model.model is None:
        # Said here, once per run, whatever the backend and whether an export is cached.
        logger.warning(
            "NO MODEL GIVEN: D-FINE-%s runs with UNTRAINED random weights, so every box and "
            "label is MEANINGLESS. Download an official checkpoint (e.g. dfine_%s_coco.pth from "
            "the D-FINE GitHub releases, github.com/Peterande/D-FINE) and pass --model.",
            config.model.size.upper(), config.model.size,
        )

    live = any(s.live is not None for s in config.sources)
    if live:
        spec = BufferSpec(config.buffers.live_capacity, OverflowPolicy.DROP_OLDEST)
    else:
        spec = BufferSpec(config.buffers.capacity, OverflowPolicy.BLOCK)

    if resolve_backend(config.model) is not Backend.TORCH:
        # torch only resizes frames here; its default pool of one thread per core fights the
        # model's runtime for the cores (bench/RESULTS.md: 3-6 ms with 1 thread, 24-27 with 2).
        torch.set_num_threads(1)
    processors = _make_processors(config)
    class_names = model_class_names(config.model)
    sinks, outputs = _make_sinks(config, class_names)
    event_sink = next((s for s in sinks if isinstance(s, ZmqEventSink)), None)
    # source_lost/restored go out over ZeroMQ at once, even while no frames flow.
    on_event = event_sink.post_event if event_sink is not None else None
    sources = [_make_source(s, on_event) for s in config.sources]
    if not sinks:
        logger.warning("no outputs configured: detections are computed but not saved "
                       "(add --output, --jsonl, --mot or --zmq)")
    pipeline = Pipeline(
        sources,
        [(p, spec) for p in processors],
        [(s, spec) for s in sinks],
        # After a failure, a stage stuck in native code is given this long; with the CLI's
        # exit that keeps "failure to exit" within 5 s.
        join_timeout_s=3.0,
        thread_nice=nice_all_but_inference([*sources, *processors, *sinks]) if not live else None,
    )
    return AssembledPipeline(pipeline=pipeline, sources=sources, live=live, outputs=outputs)


# Files: inference is the bottleneck by far, and on a small machine the decoder's, encoder's and
# other stages' threads would otherwise take turns on its core (bench/RESULTS.md: efficiency 0.83
# -> 1.0 at 1080p on 2 cores). Live sources keep normal priority: a starved decoder would let
# the camera's stream back up in the socket, which is latency.
BACKGROUND_NICE = 10


def nice_all_but_inference(stages: Sequence[Any], nice: int = BACKGROUND_NICE) -> dict[str, int]:
    """``Pipeline(thread_nice=...)`` for ``stages``: every stage but the inference at ``nice``."""
    return {s.name: nice for s in stages if not isinstance(s, InferenceStage)}


def model_class_names(config: InferConfig) -> list[str]:
    """Class names, index = label: from an ONNX file's metadata when it carries them, else COCO
    for 80 classes, else ``class_<i>``. Read here, before any thread starts, so every sink can
    be given them."""
    from dfine.backends.class_names import resolve_class_names

    path = Path(config.model) if config.model is not None else None
    if path is not None and path.suffix == ".onnx":
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # onnx raises assorted protobuf/IO errors for a bad file
            raise ValueError(f"not an ONNX model: {path} ({type(exc).__name__}); "
                             "give an .onnx exported by 'finestream export' or D-FINE's tools") from None
        meta = {p.key: p.value for p in proto.metadata_props}
        if "class_names" in meta:
            names = json.loads(meta["class_names"])
            return resolve_class_names(len(names), names)
    return resolve_class_names(config.num_classes)


def _check_stream_ids(sources: Sequence[SourceConfig]) -> None:
    seen: set[str] = set()
    for i, source in enumerate(sources):
        if source.stream_id in seen:
            raise ConfigError(
                f"sources[{i}]: stream_id {source.stream_id!r} is used twice; give each source its own"
            )
        seen.add(source.stream_id)


def _make_source(
    config: SourceConfig, on_event: Callable[[dict[str, Any]], None] | None
) -> FileSource | LiveSource:
    if config.file is not None:
        return FileSource(config.file)
    assert config.live is not None  # SourceConfig guarantees one of the two
    return LiveSource(config.live, on_event=on_event)


def _make_processors(config: AppConfig) -> list[Processor[FramePacket, FramePacket]]:
    model = config.model
    preprocess = Preprocessor(
        PreprocessConfig(input_size=model.imgsz, device=PreprocessDevice(model.device.value))
    )
    infer = InferenceStage(model, lambda: make_backend(model))
    processors: list[Processor[FramePacket, FramePacket]] = [preprocess, infer]
    if config.track is not None:
        processors.append(Tracker(config.track))
    return processors


def _make_sinks(config: AppConfig, class_names: list[str]) -> tuple[list[Sink[FramePacket]], list[str]]:
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
    return sinks, outputs


