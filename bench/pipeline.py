"""Where the time goes: each stage alone, the threaded pipeline, and a plain sequential loop.

Usage::

    python -m bench.pipeline --source CLIP --model CKPT --size n --backend onnxruntime \\
        --imgsz 640 [--frames N] [--threads 1,2] [--json out.json]

On the same N frames of CLIP (by default the whole clip, but at least 300 frames: a shorter clip
is looped by remuxing, see ``bench.common.loop_clip``) it measures:

1. each stage alone: decode (the file, N frames), then, on those decoded frames held in
   memory, preprocess, inference, tracking, and annotate+encode (the H.264 MP4 sink, its final
   flush included): frames/s and ms/frame;
2. the threaded pipeline: the real ``Pipeline`` with the same stages and blocking buffers (as
   the assembly builds it for a file): frames/s, each stage's busy share, buffer high-water
   marks, latency p50/p95/p99, peak RSS;
3. a sequential loop calling the same components one after the other per frame, as most user
   scripts are written: frames/s;
4. ``efficiency`` = pipeline fps / slowest stage's fps, and ``speedup`` = pipeline fps /
   sequential fps.

The clock of runs 2 and 3 starts when every stage is set up (model loaded) and the first frame
is about to be decoded, and stops when the last stage has torn down (the encoder flushed, the
MP4 closed), so both count the same work.

``--threads`` takes a comma list of inference intra-op thread counts: runs 1-4 are made for
each (decode and the other stages once), a small table compares them, and the top-level JSON
figures are those of the first count.

Where the time goes inside the pipeline: besides its busy share, every stage shows the CPU
time of its own thread per frame and (Linux) the time that thread waited for a core, both from
the end of its setup to the end of its teardown; the inference's are also measured alone. A
call that is slower in the pipeline than alone tells its cause: waiting for a core means the
scheduler gave the core away; more CPU for the same work means the cores are slowing each other
down (shared caches and memory; see bench/RESULTS.md). The whole process's CPU time over the
run says how many cores the pipeline kept busy.

``--nice-others N`` (default 10, as ``pipeline.assemble`` does for files) runs every pipeline
stage thread but the inference's at nice +N, through the runner's ``thread_nice`` as the app
does, so the bottleneck is not preempted by the stages waiting for it.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    RssSampler,
    clip_frame_count,
    configure_logging,
    loop_clip,
    machine_info,
    rss_mib,
    runqueue_wait_s,
    write_json,
)
from pipeline.assemble import nice_all_but_inference
from pipeline.config import BuffersConfig
from pipeline.ring_buffer import OverflowPolicy
from pipeline.runner import BufferSpec, Pipeline
from stages.decode import DecodeConfig, FileSource
from stages.frame import FramePacket
from stages.infer import Backend, Device, InferConfig, InferenceStage, make_backend, prepare_model
from stages.preprocess import PreprocessConfig, PreprocessDevice, Preprocessor
from stages.sinks.video import VideoFileSink, VideoSinkConfig
from stages.track import TrackConfig, Tracker

logger = logging.getLogger(__name__)

#: Stage names in pipeline order, as they appear in the tables and the JSON.
STAGES = ("decode", "preprocess", "inference", "tracking", "annotate_encode")
#: With the bench's random-but-active weights every score is about 0.04-0.09; this threshold
#: keeps about 20 boxes per frame, so tracking and drawing do the work of a busy real scene.
DEFAULT_SCORE_THRESHOLD = 0.055
#: The inference stage's name in the pipeline's metrics (``InferenceStage.name``).
INFER_STAGE = "infer"
#: The assembly's file buffers.
DEFAULT_CAPACITY = BuffersConfig.capacity
#: A clip shorter than this is looped up to it when ``--frames`` is not given: filling the
#: buffers at the start and flushing x264 at the end (~0.5-0.8 s at 1080p) are part of every
#: run, and over a few seconds of frames they, not the steady pace, set the rate.
MIN_FRAMES = 300


@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run measures.

    Attributes:
        source: the video clip.
        model: checkpoint or ONNX file, as ``InferConfig.model``.
        size, backend, imgsz, score_threshold: as ``InferConfig``.
        frames: frames to run (0: the whole clip, looped up to ``MIN_FRAMES`` if shorter); a
            shorter clip is looped to reach it.
        intra_op_threads: inference thread counts to compare; the first gives the headline.
        torch_threads: ``torch.set_num_threads`` for the process (the preprocessor's resize).
        decode_threads: FFmpeg decoder threads (``DecodeConfig.decode_threads``).
        encode_threads: libx264 threads (``VideoSinkConfig.encode_threads``, 0 = x264 picks).
        capacity: the blocking buffers' capacity.
        repeat: runs of each measurement; the best counts (other processes share the CPU).
        nice_others: in the pipeline run, raise the nice value of every stage thread but the
            inference's by this much (10 as the app runs files; 0: equal priorities).
        work_dir: where looped clips and MP4 outputs go.
    """

    source: Path
    model: Path | None
    size: str = "n"
    backend: Backend = Backend.ONNXRUNTIME
    imgsz: int = 640
    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    frames: int = 0
    intra_op_threads: tuple[int, ...] = (1,)
    torch_threads: int = 1
    decode_threads: int = 2
    encode_threads: int = 0
    capacity: int = DEFAULT_CAPACITY
    repeat: int = 1
    nice_others: int = 10  # as the app does for files (pipeline.assemble)
    work_dir: Path = Path(tempfile.gettempdir()) / "finestream-bench"

    def __post_init__(self) -> None:
        if self.frames < 0:
            raise ValueError(f"--frames must be >= 0 (0 = the whole clip), got {self.frames}")
        if not self.intra_op_threads or any(t < 1 for t in self.intra_op_threads):
            raise ValueError(f"--threads must list counts >= 1, got {self.intra_op_threads}")
        if not 0 <= self.nice_others <= 19:
            raise ValueError(f"--nice-others must be in [0, 19], got {self.nice_others}")
        if self.repeat < 1:
            raise ValueError(f"--repeat must be >= 1, got {self.repeat}")
        if self.torch_threads < 1:
            raise ValueError(f"--torch-threads must be >= 1, got {self.torch_threads}")

    def infer_config(self, threads: int) -> InferConfig:
        return InferConfig(
            backend=self.backend,
            model=self.model,
            size=self.size,
            imgsz=self.imgsz,
            device=Device.CPU,
            score_threshold=self.score_threshold,
            intra_op_threads=threads,
        )


# --- timing helpers ----------------------------------------------------------------------


@dataclass(frozen=True)
class StageTiming:
    """One stage run alone over ``frames`` frames."""

    frames: int
    total_s: float
    call_ms: tuple[float, ...]
    cpu_s: float | None = None  # the calling thread's CPU time in the timed calls, if measured

    @property
    def fps(self) -> float:
        return self.frames / self.total_s if self.total_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        ordered = sorted(self.call_ms)
        out: dict[str, Any] = {
            "fps": round(self.fps, 3),
            "ms_per_frame": round(1000.0 * self.total_s / self.frames, 3) if self.frames else None,
            "call_p50_ms": round(_quantile(ordered, 0.50), 3) if ordered else None,
            "call_p95_ms": round(_quantile(ordered, 0.95), 3) if ordered else None,
        }
        if self.cpu_s is not None and self.frames:
            out["cpu_ms_per_frame"] = round(1000.0 * self.cpu_s / self.frames, 3)
        return out


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _time_each(packets: Sequence[FramePacket], call: Callable[[FramePacket], Any]) -> StageTiming:
    calls: list[float] = []
    start = time.perf_counter()
    for packet in packets:
        t0 = time.perf_counter()
        call(packet)
        calls.append((time.perf_counter() - t0) * 1000.0)
    return StageTiming(len(packets), time.perf_counter() - start, tuple(calls))


# --- the stages, made the same way for every run -------------------------------------------


def _source(config: BenchConfig, clip: Path) -> FileSource:
    return FileSource(DecodeConfig(path=str(clip), decode_threads=config.decode_threads))


def _preprocessor(config: BenchConfig) -> Preprocessor:
    return Preprocessor(PreprocessConfig(input_size=config.imgsz, device=PreprocessDevice.CPU))


def _inference(config: BenchConfig, threads: int) -> InferenceStage:
    infer_config = config.infer_config(threads)
    return InferenceStage(infer_config, lambda: make_backend(infer_config))


def _video_sink(config: BenchConfig, path: Path, class_names: Sequence[str]) -> VideoFileSink:
    return VideoFileSink(
        VideoSinkConfig(path=str(path), encode_threads=config.encode_threads), class_names
    )


def _take(items: Iterator[FramePacket], frames: int) -> Iterator[FramePacket]:
    """The first ``frames`` items; closes ``items`` (the decoder) however it ends."""
    try:
        for count, packet in enumerate(items):
            if count >= frames:
                break
            yield packet
    finally:
        close = getattr(items, "close", None)
        if callable(close):
            close()


# --- 1. each stage alone ------------------------------------------------------------------


def decode_alone(
    config: BenchConfig, clip: Path, frames: int
) -> tuple[list[FramePacket], StageTiming]:
    """Decode the frames into memory (they feed every later stage alone)."""
    source = _source(config, clip)
    source.setup()
    start = time.perf_counter()
    packets = list(_take(source.items(), frames))
    return packets, StageTiming(len(packets), time.perf_counter() - start, ())


def preprocess_alone(config: BenchConfig, packets: Sequence[FramePacket]) -> StageTiming:
    """The preprocessor over the held frames; each tensor is dropped once made, so memory
    stays flat (the inference pass makes its own, untimed)."""
    preprocessor = _preprocessor(config)
    preprocessor.setup()

    def call(packet: FramePacket) -> None:
        preprocessor.process(packet)
        packet.model_input = None

    return _time_each(packets, call)


def inference_alone(
    config: BenchConfig, packets: Sequence[FramePacket], threads: int
) -> tuple[StageTiming, list[str]]:
    """The inference stage over the held frames, one call at a time; each frame's input is
    made just before its call, outside the timing, so nothing else runs during a timed call.
    Leaves ``detections`` on the packets (tracking and drawing alone use them)."""
    preprocessor = _preprocessor(config)
    preprocessor.setup()
    stage = _inference(config, threads)
    stage.setup()  # loads (and on first use exports) the model: not timed
    # One untimed call: ONNX Runtime sizes its memory arena on the first run.
    stage.process(preprocessor.process(packets[0]))
    calls: list[float] = []
    cpu_s = 0.0
    for packet in packets:
        preprocessor.process(packet)
        c0, t0 = time.thread_time(), time.perf_counter()
        stage.process(packet)
        calls.append((time.perf_counter() - t0) * 1000.0)
        cpu_s += time.thread_time() - c0
    class_names = list(stage.backend.class_names)
    stage.teardown()
    return StageTiming(len(calls), sum(calls) / 1000.0, tuple(calls), cpu_s), class_names


def tracking_alone(packets: Sequence[FramePacket]) -> StageTiming:
    tracker = Tracker(TrackConfig())
    tracker.setup()
    timing = _time_each(packets, tracker.process)
    tracker.teardown()
    return timing


def annotate_encode_alone(
    config: BenchConfig, packets: Sequence[FramePacket], class_names: Sequence[str], out: Path
) -> StageTiming:
    """The MP4 sink (draw, convert, x264) over the held frames; its final flush counts."""
    sink = _video_sink(config, out, class_names)
    sink.setup()
    writes = _time_each(packets, sink.write)
    start = time.perf_counter()
    sink.teardown()  # encodes the frames x264 still holds: part of the work
    return StageTiming(writes.frames, writes.total_s + time.perf_counter() - start, writes.call_ms)


# --- 2. the threaded pipeline -------------------------------------------------------------


class _StartGate:
    """Opens when every gated stage has finished ``setup()``; remembers when."""

    def __init__(self, parties: int) -> None:
        self._left = parties
        self._cond = threading.Condition()
        self.opened_s: float | None = None
        self.opened_cpu_s: float | None = None  # the process's CPU time then

    def arrive(self) -> None:
        with self._cond:
            self._left -= 1
            if self._left <= 0:
                self._cond.notify_all()

    def wait(self) -> float:
        with self._cond:
            while self._left > 0:
                self._cond.wait()
            if self.opened_s is None:
                self.opened_s = time.monotonic()
                self.opened_cpu_s = time.process_time()
            return self.opened_s


class _CoreWait:
    """Time the thread that calls ``start`` and ``stop`` spent runnable but without a core
    (Linux schedstat): from the end of a stage's setup to the end of its teardown. The CPU
    time of the same span is in the runner's metrics (``StageMetrics.cpu_s``)."""

    def __init__(self) -> None:
        self.wait_s: float | None = None
        self._start: float | None = None

    def start(self) -> None:
        self._start = runqueue_wait_s()

    def stop(self) -> None:
        end = runqueue_wait_s()
        if self._start is not None and end is not None:
            self.wait_s = end - self._start


class _Gated:
    """A processor or sink that reports to the gate once set up and times its thread's waits
    for a core; otherwise the stage itself."""

    def __init__(self, inner: Any, gate: _StartGate) -> None:
        self.inner = inner
        self.name: str = inner.name
        self._gate = gate
        self.core_wait = _CoreWait()

    def setup(self) -> None:
        try:
            self.inner.setup()
        finally:
            # Also on failure, so the source is never left waiting: the run aborts anyway.
            self._gate.arrive()
            self.core_wait.start()

    def process(self, item: FramePacket) -> FramePacket | None:
        out: FramePacket | None = self.inner.process(item)
        return out

    def flush(self) -> Iterable[FramePacket]:
        flushed: Iterable[FramePacket] = self.inner.flush()
        return flushed

    def write(self, item: FramePacket) -> None:
        self.inner.write(item)

    def teardown(self) -> None:
        try:
            self.inner.teardown()
        finally:
            self.core_wait.stop()


class _GatedSource:
    """The file source, holding its first frame until every other stage is set up, and
    stopping after ``frames`` frames."""

    def __init__(self, inner: FileSource, gate: _StartGate, frames: int) -> None:
        self.inner = inner
        self.name = inner.name
        self._gate = gate
        self._frames = frames
        self.core_wait = _CoreWait()

    def setup(self) -> None:
        self.inner.setup()

    def items(self) -> Iterator[FramePacket]:
        self._gate.wait()
        self.core_wait.start()
        return _take(self.inner.items(), self._frames)

    def request_stop(self) -> None:
        self.inner.request_stop()

    def teardown(self) -> None:
        try:
            self.inner.teardown()
        finally:
            self.core_wait.stop()


def measure_pipeline(
    config: BenchConfig,
    clip: Path,
    frames: int,
    threads: int,
    class_names: Sequence[str],
    out: Path,
) -> dict[str, Any]:
    """The threaded pipeline end to end, blocking buffers as for a file."""
    spec = BufferSpec(config.capacity, OverflowPolicy.BLOCK)
    stages: list[Any] = [_preprocessor(config), _inference(config, threads), Tracker(TrackConfig())]
    sink = _video_sink(config, out, class_names)
    gate = _StartGate(len(stages) + 1)
    source = _GatedSource(_source(config, clip), gate, frames)
    gated = [_Gated(stage, gate) for stage in stages]
    gated_sink = _Gated(sink, gate)
    every: list[_Gated | _GatedSource] = [source, *gated, gated_sink]
    # As pipeline.assemble does for a file: every thread but the inference's yields the CPU.
    nice = nice_all_but_inference([s.inner for s in every], config.nice_others)
    pipeline = Pipeline(
        [source], [(g, spec) for g in gated], [(gated_sink, spec)], thread_nice=nice
    )
    core_waits = {s.name: s.core_wait for s in every}
    rss_before = rss_mib()
    with RssSampler() as rss:
        pipeline.run()
        end_s, end_cpu_s = time.monotonic(), time.process_time()
    metrics = pipeline.metrics()
    opened = gate.opened_s if gate.opened_s is not None else end_s
    opened_cpu = gate.opened_cpu_s if gate.opened_cpu_s is not None else end_cpu_s
    wall_s = end_s - opened
    done = metrics.frames_out
    lat = metrics.latency
    per_frame = 1000.0 / done if done else 0.0
    return {
        "intra_op_threads": threads,
        "frames": done,
        "wall_s": round(wall_s, 3),
        "fps": round(done / wall_s, 3) if wall_s > 0 else 0.0,
        # Every thread of the process, the libraries' own included (FFmpeg, x264, ONNX Runtime).
        "process_cpu_ms_per_frame": round((end_cpu_s - opened_cpu) * per_frame, 2),
        "cores_busy": round((end_cpu_s - opened_cpu) / wall_s, 2) if wall_s > 0 else 0.0,
        "stages": {
            s.name: {
                "fps": round(s.fps, 3),
                "busy": round(s.busy_fraction, 3),
                "call_p50_ms": _round(s.time_per_item_p50_ms),
                "call_p95_ms": _round(s.time_per_item_p95_ms),
                # The stage's own thread only, from the end of its setup; per frame delivered.
                "cpu_ms_per_frame": _per_frame(s.cpu_s, per_frame),
                "core_wait_ms_per_frame": _per_frame(core_waits[s.name].wait_s, per_frame),
            }
            for s in metrics.stages
        },
        "buffers": {
            b.name: {"capacity": b.capacity, "high_water": b.high_water, "dropped": b.dropped}
            for b in metrics.buffers
        },
        "latency_ms": {
            "p50": _round(lat.p50_ms),
            "p95": _round(lat.p95_ms),
            "p99": _round(lat.p99_ms),
        },
        "rss_before_mib": round(rss_before, 1),
        "peak_rss_mib": round(rss.peak_mib, 1),
    }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _per_frame(seconds: float | None, ms_per_frame_second: float) -> float | None:
    return None if seconds is None else round(seconds * ms_per_frame_second, 2)


# --- 3. the sequential loop ---------------------------------------------------------------


def measure_sequential(
    config: BenchConfig,
    clip: Path,
    frames: int,
    threads: int,
    class_names: Sequence[str],
    out: Path,
) -> dict[str, Any]:
    """One frame at a time through the same components, in one thread."""
    source = _source(config, clip)
    preprocessor = _preprocessor(config)
    inference = _inference(config, threads)
    tracker = Tracker(TrackConfig())
    sink = _video_sink(config, out, class_names)
    for stage in (source, preprocessor, inference, tracker, sink):
        stage.setup()
    done = 0
    start = time.monotonic()
    try:
        for packet in _take(source.items(), frames):
            processed = tracker.process(inference.process(preprocessor.process(packet)))
            sink.write(processed)
            done += 1
    finally:
        sink.teardown()
        tracker.teardown()
        inference.teardown()
    wall_s = time.monotonic() - start
    return {
        "intra_op_threads": threads,
        "frames": done,
        "wall_s": round(wall_s, 3),
        "fps": round(done / wall_s, 3) if wall_s > 0 else 0.0,
    }


# --- putting it together ------------------------------------------------------------------


def prepare_clip(source: Path, frames: int, work_dir: Path) -> tuple[Path, int, int]:
    """(clip to read, frames to run, passes of the source it holds): the source itself when
    it has enough frames, else a remuxed loop of it."""
    available = clip_frame_count(source)
    if frames == 0:
        if available >= MIN_FRAMES:
            return source, available, 1
        frames = MIN_FRAMES
    if frames <= available:
        return source, frames, 1
    repeats = -(-frames // available)
    looped = loop_clip(source, work_dir / f"{source.stem}_x{repeats}.mp4", repeats)
    return looped, frames, repeats


@dataclass(frozen=True)
class _ThreadResult:
    """The best runs for one inference thread count, and the two ratios from them."""

    intra_op_threads: int
    inference: StageTiming
    slowest_stage: str
    slowest_stage_fps: float
    pipeline: dict[str, Any]
    sequential: dict[str, Any]
    efficiency: float
    speedup: float


def run_bench(config: BenchConfig, command: str = "") -> dict[str, Any]:
    """All measurements of one benchmark, as the JSON-able dict the CLI writes.

    Order, per repeat and thread count: pipeline, sequential, inference alone; the other
    stages alone once, after the first pipeline and sequential runs. The first pipeline run
    therefore starts with nothing held in memory, so its peak RSS is the app's own. With
    ``repeat`` > 1 the best run of each kind counts (the least disturbed by other processes)
    and every run is kept under ``runs``.
    """
    torch.set_num_threads(config.torch_threads)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    clip, frames, repeats = prepare_clip(config.source, config.frames, config.work_dir)
    machine_before = machine_info()
    class_names = list(
        prepare_model(config.infer_config(config.intra_op_threads[0])).info.class_names
    )

    timings: dict[str, StageTiming] = {}
    packets: list[FramePacket] = []
    pipeline_runs: dict[int, list[dict[str, Any]]] = {t: [] for t in config.intra_op_threads}
    sequential_runs: dict[int, list[dict[str, Any]]] = {t: [] for t in config.intra_op_threads}
    inference_runs: dict[int, list[StageTiming]] = {t: [] for t in config.intra_op_threads}
    for repeat in range(config.repeat):
        for threads in config.intra_op_threads:
            tag = f"t{threads}_r{repeat}"
            pipeline_runs[threads].append(
                measure_pipeline(
                    config,
                    clip,
                    frames,
                    threads,
                    class_names,
                    config.work_dir / f"pipeline_{tag}.mp4",
                )
            )
            logger.info(
                "pipeline, %d threads: %.2f fps", threads, pipeline_runs[threads][-1]["fps"]
            )
            sequential_runs[threads].append(
                measure_sequential(
                    config,
                    clip,
                    frames,
                    threads,
                    class_names,
                    config.work_dir / f"sequential_{tag}.mp4",
                )
            )
            logger.info(
                "sequential, %d threads: %.2f fps", threads, sequential_runs[threads][-1]["fps"]
            )
            if not packets:
                packets, timings["decode"] = decode_alone(config, clip, frames)
                timings["preprocess"] = preprocess_alone(config, packets)
            inference, class_names = inference_alone(config, packets, threads)
            inference_runs[threads].append(inference)
            logger.info("inference alone, %d threads: %.2f fps", threads, inference.fps)
            if "tracking" not in timings:
                timings["tracking"] = tracking_alone(packets)
                timings["annotate_encode"] = annotate_encode_alone(
                    config, packets, class_names, config.work_dir / "alone.mp4"
                )
    detections = [len(p.detections) if p.detections is not None else 0 for p in packets]
    del packets

    rows: list[_ThreadResult] = []
    for threads in config.intra_op_threads:
        best_inference = max(inference_runs[threads], key=lambda t: t.fps)
        pipeline = dict(max(pipeline_runs[threads], key=lambda r: r["fps"]))
        # Memory from the first run: later ones start with the heap the stages-alone pass left.
        first = pipeline_runs[threads][0]
        pipeline["rss_before_mib"] = first["rss_before_mib"]
        pipeline["peak_rss_mib"] = first["peak_rss_mib"]
        sequential = max(sequential_runs[threads], key=lambda r: r["fps"])
        stage_fps = {name: timings[name].fps for name in STAGES if name != "inference"}
        stage_fps["inference"] = best_inference.fps
        slowest = min(stage_fps, key=lambda name: stage_fps[name])
        rows.append(
            _ThreadResult(
                intra_op_threads=threads,
                inference=best_inference,
                slowest_stage=slowest,
                slowest_stage_fps=round(stage_fps[slowest], 3),
                pipeline=pipeline,
                sequential=sequential,
                efficiency=_ratio(pipeline["fps"], stage_fps[slowest]),
                speedup=_ratio(pipeline["fps"], sequential["fps"]),
            )
        )

    head = rows[0]
    timings["inference"] = head.inference
    return {
        "command": command,
        "machine": machine_before,
        "load_avg_after": machine_info()["load_avg_1_5_15"],
        "settings": {
            "source": str(config.source),
            "model": str(config.model) if config.model is not None else None,
            "size": config.size,
            "backend": config.backend.value,
            "imgsz": config.imgsz,
            "score_threshold": config.score_threshold,
            "intra_op_threads": list(config.intra_op_threads),
            "torch_threads": config.torch_threads,
            "decode_threads": config.decode_threads,
            "encode_threads": config.encode_threads,
            "buffer_capacity": config.capacity,
            "repeat": config.repeat,
            "nice_others": config.nice_others,
        },
        "clip": {"path": str(clip), "frames": frames, "passes_of_source": repeats},
        "detections_per_frame": round(statistics.fmean(detections), 2) if detections else 0.0,
        "stages": {name: timings[name].to_dict() for name in STAGES},
        "slowest_stage": head.slowest_stage,
        "slowest_stage_fps": head.slowest_stage_fps,
        "pipeline": head.pipeline,
        "sequential": head.sequential,
        "efficiency": head.efficiency,
        "speedup": head.speedup,
        "sweep": [
            {
                "intra_op_threads": r.intra_op_threads,
                "inference_alone_fps": round(r.inference.fps, 3),
                "slowest_stage": r.slowest_stage,
                "pipeline_fps": r.pipeline["fps"],
                "sequential_fps": r.sequential["fps"],
                "efficiency": r.efficiency,
                "speedup": r.speedup,
                "latency_p95_ms": r.pipeline["latency_ms"]["p95"],
            }
            for r in rows
        ],
        "runs": {
            str(t): {
                "pipeline_fps": [r["fps"] for r in pipeline_runs[t]],
                "sequential_fps": [r["fps"] for r in sequential_runs[t]],
                "inference_alone_fps": [round(x.fps, 3) for x in inference_runs[t]],
            }
            for t in config.intra_op_threads
        },
    }


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator > 0 else 0.0


def format_report(result: dict[str, Any]) -> str:
    """The tables the CLI prints."""
    lines: list[str] = []
    m = result["machine"]
    lines.append(
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; load {m['load_avg_1_5_15']} "
        f"before, {result['load_avg_after']} after; {m['date']}"
    )
    clip = result["clip"]
    s = result["settings"]
    lines.append(
        f"clip {Path(s['source']).name}: {clip['frames']} frames"
        + (
            f" ({clip['passes_of_source']} passes of the source, remuxed)"
            if clip["passes_of_source"] > 1
            else ""
        )
        + f"; D-FINE-{s['size'].upper()} {s['imgsz']} on {s['backend']}, intra-op threads "
        f"{s['intra_op_threads'][0]}, torch threads {s['torch_threads']}, decode threads "
        f"{s['decode_threads']}, encode threads {s['encode_threads'] or 'auto'}, "
        f"nice others +{s['nice_others']}; "
        f"{result['detections_per_frame']} detections/frame"
    )
    lines.append("")
    lines.append(f"{'stage alone':<18}{'fps':>9}{'ms/frame':>10}")
    for name in STAGES:
        st = result["stages"][name]
        mark = "  <- slowest" if name == result["slowest_stage"] else ""
        lines.append(f"{name:<18}{st['fps']:>9.1f}{st['ms_per_frame']:>10.1f}{mark}")
    p = result["pipeline"]
    lines.append("")
    lines.append(
        f"{'pipeline stage':<18}{'fps':>9}{'busy':>7}{'p50 ms':>9}{'p95 ms':>9}"
        f"{'cpu ms':>9}{'wait ms':>9}"
    )
    for name, st in p["stages"].items():
        lines.append(
            f"{name:<18}{st['fps']:>9.1f}{st['busy'] * 100:>6.0f}%"
            f"{_cell(st['call_p50_ms']):>9}{_cell(st['call_p95_ms']):>9}"
            f"{_cell(st['cpu_ms_per_frame']):>9}{_cell(st['core_wait_ms_per_frame']):>9}"
        )
    lines.append(
        "  (cpu ms: the stage thread's CPU per frame; wait ms: its time runnable without a core)"
    )
    lines.append("")
    lines.append(f"{'buffer':<18}{'high-water':>11}")
    for name, b in p["buffers"].items():
        lines.append(f"{name:<18}{b['high_water']:>7}/{b['capacity']}")
    lat = p["latency_ms"]
    lines.append("")
    lines.append(
        f"pipeline   {p['fps']:7.2f} fps  ({p['frames']} frames in {p['wall_s']:.1f} s); latency ms "
        f"p50 {_cell(lat['p50'])} p95 {_cell(lat['p95'])} p99 {_cell(lat['p99'])}; peak RSS "
        f"{p['peak_rss_mib']:.0f} MiB ({p['rss_before_mib']:.0f} before the run)"
    )
    q = result["sequential"]
    lines.append(f"sequential {q['fps']:7.2f} fps  ({q['frames']} frames in {q['wall_s']:.1f} s)")
    lines.append(
        f"efficiency {result['efficiency']:.3f} (pipeline / slowest stage alone, "
        f"{result['slowest_stage']} {result['slowest_stage_fps']:.2f} fps)"
    )
    lines.append(f"speedup    {result['speedup']:.3f} (pipeline / sequential)")
    lines.extend(_inference_profile(result))
    if len(result["sweep"]) > 1:
        lines.append("")
        lines.append(
            f"{'intra-op threads':<18}{'infer alone':>12}{'pipeline':>10}{'sequential':>11}"
            f"{'efficiency':>11}{'speedup':>9}{'lat p95':>9}"
        )
        for r in result["sweep"]:
            lines.append(
                f"{r['intra_op_threads']:<18}{r['inference_alone_fps']:>12.2f}{r['pipeline_fps']:>10.2f}"
                f"{r['sequential_fps']:>11.2f}{r['efficiency']:>11.3f}{r['speedup']:>9.3f}"
                f"{_cell(r['latency_p95_ms'], '.0f'):>9}"
            )
    return "\n".join(lines)


def _inference_profile(result: dict[str, Any]) -> list[str]:
    """Why the inference runs slower (or not) inside the pipeline than alone, in two lines."""
    alone = result["stages"]["inference"]
    inside = result["pipeline"]["stages"].get(INFER_STAGE)
    p = result["pipeline"]
    lines = [
        f"cores busy {p['cores_busy']:.2f} of {result['machine']['cores']} during the pipeline run "
        f"({p['process_cpu_ms_per_frame']:.0f} ms of CPU per frame, every thread of the process)"
    ]
    if (
        inside is None
        or alone.get("cpu_ms_per_frame") is None
        or inside["cpu_ms_per_frame"] is None
    ):
        return lines
    cpu_ratio = inside["cpu_ms_per_frame"] / alone["cpu_ms_per_frame"]
    lines.append(
        f"inference CPU per frame: {alone['cpu_ms_per_frame']:.1f} ms alone, "
        f"{inside['cpu_ms_per_frame']:.1f} ms in the pipeline ({cpu_ratio:.3f}x), waiting for a "
        f"core {_cell(inside['core_wait_ms_per_frame'])} ms per frame"
    )
    return lines


def _cell(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _thread_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--threads takes counts like 1 or 1,2,3, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pipeline",
        description="Each stage alone vs the threaded pipeline vs a sequential loop, on the same frames.",
    )
    parser.add_argument("--source", type=Path, required=True, help="video clip")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (.pth) or .onnx")
    parser.add_argument("--size", default="n", help="D-FINE size (n, s, m, l, x)")
    parser.add_argument(
        "--backend",
        default=Backend.ONNXRUNTIME.value,
        choices=[b.value for b in Backend if b is not Backend.TENSORRT],
    )
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument(
        "--frames",
        type=int,
        default=0,
        help=f"frames to run; 0 = the whole clip, at least {MIN_FRAMES} (a shorter "
        "clip is looped by remuxing)",
    )
    parser.add_argument(
        "--threads",
        type=_thread_list,
        default=(1,),
        help="inference intra-op threads, or a comma list to compare (default 1)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch.set_num_threads for the preprocessor's resize (default 1)",
    )
    parser.add_argument("--decode-threads", type=int, default=DecodeConfig.decode_threads)
    parser.add_argument("--encode-threads", type=int, default=0, help="libx264 threads, 0 = auto")
    parser.add_argument("--score-threshold", type=float, default=DEFAULT_SCORE_THRESHOLD)
    parser.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY, help="buffer capacity")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each measurement, interleaved; the best counts (default 1)",
    )
    parser.add_argument(
        "--nice-others",
        type=int,
        default=10,
        help="pipeline run: nice value added to every stage thread but inference's "
        "(default 10, as the app does for files; 0 = none)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="for looped clips and output MP4s (default: a temporary folder)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python -m bench.pipeline " + shlex.join(argv_list)
    with tempfile.TemporaryDirectory(prefix="finestream-bench-") as tmp:
        try:
            config = BenchConfig(
                source=args.source,
                model=args.model,
                size=args.size,
                backend=Backend(args.backend),
                imgsz=args.imgsz,
                score_threshold=args.score_threshold,
                frames=args.frames,
                intra_op_threads=args.threads,
                torch_threads=args.torch_threads,
                decode_threads=args.decode_threads,
                encode_threads=args.encode_threads,
                capacity=args.capacity,
                repeat=args.repeat,
                nice_others=args.nice_others,
                work_dir=args.work_dir if args.work_dir is not None else Path(tmp),
            )
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        result = run_bench(config, command)
    print(format_report(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
