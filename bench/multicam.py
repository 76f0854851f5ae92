"""Multi-camera: four live RTSP cameras through one batched inference stage, in one process.

Usage::

    python -m bench.multicam [--clip CLIP] [--model ONNX] [--seconds 20] [--rounds 2] \\
        [--json out.json]

Every camera is ``../shared/rtsp/serve.py CLIP`` (one server each, as four cameras would be).
Three parts:

1. **Throughput**: the assembly's pipeline (``build_pipeline``, no tracker, no outputs) with
   ``batching.max_batch`` 4 and 1, alternating for ``--rounds`` rounds on the same four cameras
   so both see the same load: frames inferred per second in all, the inference thread's CPU ms
   per frame, the mean batch size, each camera's share.
2. **Drop before work**: the same four cameras through the layout the assembly built before
   batching (one preprocessor thread in front of the inference, both behind the live
   drop-oldest buffers of 2) and through the batched one: per camera, frames decoded, converted
   to RGB, preprocessed and inferred, and the whole process's CPU seconds per inferred frame.
   (Before batching the live source also converted every decoded frame in its own thread;
   ``converted`` here is what the lazy conversion leaves of that.)
3. **Isolation**: camera 3's server is killed mid-run; the other cameras' inferred frames per
   second before and after (least-squares slope of their counters, polled every 20 ms, over
   ``--seconds`` each side). Twice: on cameras slowed to ``--slow-fps`` (a clip re-encoded at
   that rate, default 1 fps, with a batch timeout of 1.5 s), where the inference should keep up
   and each camera's rate is its own; and on the clip's own rate, where the inference is the
   bottleneck and a batch of three costs less than one of four on a CPU.

Figures on a shared, loaded machine are noisy: the CPU ms per frame and the ratios measured in
the same run are the ones to compare, and ``machine`` in the JSON gives the load.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from bench.common import configure_logging, machine_info, write_json
from bench.soak import DEFAULT_SERVE_SCRIPT, RtspServer
from dfine.backends.device import Device
from pipeline.assemble import build_pipeline
from pipeline.config import AppConfig, BatchingConfig, OutputsConfig, SourceConfig
from pipeline.ring_buffer import OverflowPolicy
from pipeline.runner import BufferSpec, Pipeline
from stages.infer import InferConfig, InferenceStage, make_backend, prepare_model
from stages.live import LiveSource, LiveSourceConfig
from stages.preprocess import PreprocessConfig, Preprocessor

logger = logging.getLogger(__name__)

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT_CLIP = SHARED / "media" / "cars_320x240_mjpeg.avi"
DEFAULT_MODEL = SHARED / "teachers" / "nanodet_coco_416.onnx"
CAMERAS = 4
#: The live buffers the assembly used before batching (``BuffersConfig.live_capacity``).
PREVIOUS_LIVE = BufferSpec(2, OverflowPolicy.DROP_OLDEST)
POLL_S = 0.02
SLOW_FPS = 1
SLOW_TIMEOUT_MS = 1500.0


@dataclass
class Running:
    """A started pipeline and what the figures are read from."""

    pipeline: Pipeline
    infer: InferenceStage
    sources: Sequence[LiveSource]
    preprocess: Preprocessor | None  # its own thread (the previous layout), else None


def _infer_config(model: Path) -> InferConfig:
    return InferConfig(model=model, intra_op_threads=1, device=Device.CPU)


def _sources(urls: Sequence[str]) -> tuple[SourceConfig, ...]:
    return tuple(
        SourceConfig(live=LiveSourceConfig(url=u, stream_id=str(i), backoff_max_s=1.0))
        for i, u in enumerate(urls)
    )


def _batched(urls: Sequence[str], model: Path, max_batch: int, timeout_ms: float = 40.0) -> Running:
    assembled = build_pipeline(
        AppConfig(
            sources=_sources(urls),
            model=_infer_config(model),
            track=None,
            outputs=OutputsConfig(),
            batching=BatchingConfig(max_batch=max_batch, batch_timeout_ms=timeout_ms),
        )
    )
    infer = next(s for s in assembled.stages if isinstance(s, InferenceStage))
    sources = [s for s in assembled.sources if isinstance(s, LiveSource)]
    return Running(assembled.pipeline, infer, sources, None)


def _previous_layout(urls: Sequence[str], model: Path) -> Running:
    """Sources → preprocess → inference through drop-oldest buffers of 2, as before batching."""
    prepared = prepare_model(_infer_config(model))
    config = prepared.config
    assert config.imgsz is not None
    preprocess = Preprocessor(PreprocessConfig(input_size=config.imgsz, device=Device.CPU))
    infer = InferenceStage(config, lambda: make_backend(config, prepared.info))
    sources = [LiveSource(s.live) for s in _sources(urls) if s.live is not None]
    pipeline = Pipeline(sources, [(preprocess, PREVIOUS_LIVE), (infer, PREVIOUS_LIVE)], [])
    return Running(pipeline, infer, sources, preprocess)


@dataclass(frozen=True)
class Snapshot:
    at_s: float
    process_cpu_s: float
    infer_cpu_s: float
    infer: dict[str, int | float]
    preprocess: dict[str, int]
    decoded: list[int]
    converted: list[int]
    batch_sizes: tuple[int, ...]


def _snapshot(run: Running) -> Snapshot:
    metrics = run.pipeline.metrics()
    stage = next(s for s in metrics.stages if s.name == run.infer.name)
    infer = run.infer.stats()
    # The previous layout preprocesses in its own thread; the batched one in the inference's.
    pre = run.preprocess.stats() if run.preprocess is not None else {}
    if run.preprocess is None:
        pre = {k.replace("preprocessed", "frames"): int(v) for k, v in infer.items()}
        pre = {k: v for k, v in pre.items() if k.startswith("frames")}
    live = [s.stats() for s in run.sources]
    return Snapshot(
        at_s=time.monotonic(),
        process_cpu_s=time.process_time(),
        infer_cpu_s=stage.cpu_s or 0.0,
        infer=infer,
        preprocess=pre,
        decoded=[s.frames for s in live],
        converted=[s.converted for s in live],
        batch_sizes=stage.batch_size_counts,
    )


@contextlib.contextmanager
def _started(run: Running, cameras: int, timeout_s: float = 60.0) -> Iterator[Running]:
    """The pipeline running, once every camera has had a frame inferred; stopped after."""
    run.pipeline.start()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stats = run.infer.stats()
            if all(stats.get(f"frames[{i}]", 0) >= 1 for i in range(cameras)):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"not every camera had a frame inferred within {timeout_s:.0f} s")
        yield run
    finally:
        run.pipeline.stop()
        run.pipeline.join(timeout=20)


def _window(run: Running, seconds: float, cameras: int) -> dict[str, Any]:
    """Figures over ``seconds`` of a running pipeline."""
    a = _snapshot(run)
    time.sleep(seconds)
    b = _snapshot(run)
    wall = b.at_s - a.at_s
    inferred = [
        int(b.infer.get(f"frames[{i}]", 0)) - int(a.infer.get(f"frames[{i}]", 0))
        for i in range(cameras)
    ]
    pre = [
        b.preprocess.get(f"frames[{i}]", 0) - a.preprocess.get(f"frames[{i}]", 0)
        for i in range(cameras)
    ]
    total = sum(inferred)
    sizes_a = [*a.batch_sizes, *[0] * 8][:8]
    sizes_b = [*b.batch_sizes, *[0] * 8][:8]
    batches = [y - x for x, y in zip(sizes_a, sizes_b)]
    n_batches = sum(batches)
    return {
        "seconds": round(wall, 2),
        "inferred_per_s": round(total / wall, 3),
        "inferred": inferred,
        "preprocessed": pre,
        "decoded": [y - x for x, y in zip(a.decoded, b.decoded)],
        "converted": [y - x for x, y in zip(a.converted, b.converted)],
        "infer_cpu_ms_per_frame": round(1000 * (b.infer_cpu_s - a.infer_cpu_s) / total, 2)
        if total
        else None,
        "process_cpu_ms_per_inferred_frame": round(
            1000 * (b.process_cpu_s - a.process_cpu_s) / total, 2
        )
        if total
        else None,
        "batch_size_mean": round(sum((k + 1) * n for k, n in enumerate(batches)) / n_batches, 2)
        if n_batches
        else None,
    }


def throughput(
    urls: Sequence[str], model: Path, seconds: float, rounds: int
) -> list[dict[str, Any]]:
    rows = []
    for r in range(rounds):
        for max_batch in (4, 1) if r % 2 else (1, 4):
            with _started(_batched(urls, model, max_batch), len(urls)) as run:
                row = {"max_batch": max_batch, "round": r, **_window(run, seconds, len(urls))}
            logger.info("throughput %s", row)
            rows.append(row)
    return rows


def drop_before_work(urls: Sequence[str], model: Path, seconds: float) -> dict[str, Any]:
    out = {}
    for name, make in (
        ("previous", lambda: _previous_layout(urls, model)),
        ("batched", lambda: _batched(urls, model, max_batch=1)),
    ):
        with _started(make(), len(urls)) as run:
            out[name] = _window(run, seconds, len(urls))
        logger.info("layout %s: %s", name, out[name])
    return out


class _CounterTimes:
    """Polls the inference stage's per-stream counters: when each stream's count went up."""

    def __init__(self, stage: InferenceStage, cameras: int) -> None:
        self.stage = stage
        self.times: list[list[float]] = [[] for _ in range(cameras)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poll", daemon=True)

    def __enter__(self) -> _CounterTimes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            now = time.monotonic()
            stats = self.stage.stats()
            for i, seen in enumerate(self.times):
                seen.extend([now] * (int(stats.get(f"frames[{i}]", 0)) - len(seen)))

    def fps(self, stream: int, start_s: float, end_s: float) -> float | None:
        ts = [t for t in list(self.times[stream]) if start_s <= t < end_s]
        if len(ts) < 3:
            return None
        return float(np.polyfit(ts, np.arange(len(ts)), 1)[0])


def isolation(clip: Path, model: Path, seconds: float, timeout_ms: float) -> dict[str, Any]:
    """Camera 3 killed mid-run: the other cameras' inferred fps before and after."""
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(RtspServer(clip, DEFAULT_SERVE_SCRIPT)) for _ in range(4)]
        run = _batched([s.url for s in servers], model, max_batch=4, timeout_ms=timeout_ms)
        with _CounterTimes(run.infer, CAMERAS) as counts, _started(run, CAMERAS):
            t0 = time.monotonic()
            time.sleep(seconds)
            t1 = time.monotonic()
            servers[3].__exit__(None, None, None)  # the camera dies (its server stops)
            killed = time.monotonic()
            threes = _snapshot(run).batch_sizes[2:3] or (0,)
            # From the end of the first batch without camera 3 (past the one wait for it).
            while time.monotonic() < killed + 30:
                time.sleep(0.1)
                if (_snapshot(run).batch_sizes[2:3] or (0,))[0] > threes[0]:
                    break
            t2 = time.monotonic()
            time.sleep(seconds)
            t3 = time.monotonic()
    before = [counts.fps(i, t0, t1) for i in range(3)]
    after = [counts.fps(i, t2, t3) for i in range(3)]
    change = [
        None if b is None or a is None else round(100 * (a / b - 1), 1)
        for b, a in zip(before, after)
    ]
    return {
        "clip": clip.name,
        "batch_timeout_ms": timeout_ms,
        "fps_before": [None if v is None else round(v, 3) for v in before],
        "fps_after": [None if v is None else round(v, 3) for v in after],
        "change_pct": change,
        "first_batch_without_it_s": round(t2 - killed, 2),
        "dead_camera_frames_after_kill": sum(1 for t in counts.times[3] if t > killed + 2),
    }


def slow_clip(src: Path, dst: Path, fps: int | Fraction, frames: int = 8) -> Path:
    """``frames`` pictures of ``src`` re-encoded at ``fps`` (the server plays a file at its rate)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.pix_fmt = "yuv420p"
        stream.time_base = 1 / Fraction(fps)
        for i, frame in enumerate(inp.decode(video=0)):
            if i == frames:
                break
            if i == 0:
                stream.width, stream.height = frame.width, frame.height
            picture = frame.reformat(format="yuv420p")
            picture.pts = i
            picture.time_base = stream.time_base
            for packet in stream.encode(picture):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return dst


def _print(result: dict[str, Any]) -> None:
    print("throughput, 4 cameras (frames inferred per second in all):")
    print(
        f"  {'max_batch':>9} {'round':>5} {'fps':>7} {'cpu ms/frame':>12} {'batch':>6}  per camera"
    )
    for row in result["throughput"]:
        print(
            f"  {row['max_batch']:>9} {row['round']:>5} {row['inferred_per_s']:>7.2f} "
            f"{row['infer_cpu_ms_per_frame']!s:>12} {row['batch_size_mean']!s:>6}  {row['inferred']}"
        )
    print("drop before work (per camera):")
    for name, row in result["drop_before_work"].items():
        print(
            f"  {name:<9} decoded {row['decoded']} converted {row['converted']} "
            f"preprocessed {row['preprocessed']} inferred {row['inferred']}; process CPU "
            f"{row['process_cpu_ms_per_inferred_frame']} ms per inferred frame"
        )
    for iso in result["isolation"]:
        print(
            f"isolation ({iso['clip']}, timeout {iso['batch_timeout_ms']:g} ms): fps before "
            f"{iso['fps_before']} after {iso['fps_after']} change % {iso['change_pct']}; "
            f"first batch without it {iso['first_batch_without_it_s']} s after the kill"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.multicam", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--seconds", type=float, default=20.0, help="each measuring window")
    parser.add_argument("--rounds", type=int, default=2, help="max_batch 1/4 pairs, alternated")
    parser.add_argument(
        "--slow-fps",
        type=Fraction,
        default=Fraction(SLOW_FPS),
        help="the slowed cameras' rate in the isolation part, e.g. 1 or 1/4",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["throughput", "layout", "isolation-slow", "isolation-clip"],
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    for path in (args.clip, args.model):
        if not path.is_file():
            print(f"not found: {path}", file=sys.stderr)
            return 2
    result: dict[str, Any] = {"machine": machine_info(), "command": " ".join(sys.argv)}
    result["throughput"], result["drop_before_work"], result["isolation"] = [], {}, []
    if not {"throughput", "layout"} <= set(args.skip):
        with contextlib.ExitStack() as stack:
            servers = [
                stack.enter_context(RtspServer(args.clip, DEFAULT_SERVE_SCRIPT))
                for _ in range(CAMERAS)
            ]
            urls = [s.url for s in servers]
            if "throughput" not in args.skip:
                result["throughput"] = throughput(urls, args.model, args.seconds, args.rounds)
            if "layout" not in args.skip:
                result["drop_before_work"] = drop_before_work(urls, args.model, args.seconds)
    if "isolation-slow" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            name = f"camera_{float(args.slow_fps):g}fps.mp4"
            slow = slow_clip(args.clip, Path(tmp) / name, args.slow_fps)
            result["isolation"].append(isolation(slow, args.model, args.seconds, SLOW_TIMEOUT_MS))
    if "isolation-clip" not in args.skip:
        result["isolation"].append(isolation(args.clip, args.model, args.seconds, 40.0))
    result["machine_after"] = machine_info()["load_avg_1_5_15"]
    _print(result)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
