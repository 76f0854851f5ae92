"""Soak test: a live source through the whole pipeline for minutes; does memory or latency creep?

Usage::

    python -m bench.soak --source rtsp://127.0.0.1:8554/stream --minutes 10 \\
        --model CKPT --size n --backend onnxruntime --imgsz 640 [--json out.json]
    python -m bench.soak --serve CLIP --minutes 10 ...   # starts and stops the loopback server

The pipeline is the one the assembly builds for a live source: ``LiveSource`` → preprocess →
inference → tracking → annotated MP4 sink, every buffer ``DROP_OLDEST`` with capacity 2, so
the newest frame is always next and frames the inference cannot keep up with are dropped.

Every ``--interval-s`` (10 s) it records the process's RSS and the latency p95 of the frames
written in that interval (source yield to the end of the sink's write, from each packet's
``arrival_s``). After ``--warmup-s`` (model arenas, encoder buffers, the first connection), it
fits least-squares lines: RSS in MiB/min and latency p95 in ms/min, and compares latency p95
over the first and the last minute. Pass: RSS slope < 1 MiB/min and last-minute p95 within 20 %
of the first minute's.

``--serve CLIP`` runs ``/usr/bin/python3 ../shared/rtsp/serve.py CLIP --port 0`` (Debian's
python, the one that can import GStreamer), reads its ``READY rtsp://...`` line and stops it at
the end.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from bench.common import configure_logging, least_squares_slope, machine_info, rss_mib, write_json
from pipeline.metrics import percentile
from pipeline.ring_buffer import OverflowPolicy
from pipeline.runner import BufferSpec, Pipeline
from stages.frame import FramePacket
from stages.infer import Backend, Device, InferConfig, InferenceStage, make_backend, prepare_model
from stages.live import LiveSource, LiveSourceConfig
from stages.preprocess import PreprocessConfig, PreprocessDevice, Preprocessor
from stages.sinks.video import VideoFileSink, VideoSinkConfig
from stages.track import TrackConfig, Tracker

logger = logging.getLogger(__name__)

#: The loopback RTSP server beside the repository (../shared/rtsp/serve.py).
DEFAULT_SERVE_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "rtsp" / "serve.py"
#: Debian's interpreter: the one with the GStreamer bindings the server needs.
SYSTEM_PYTHON = "/usr/bin/python3"
#: What the assembly uses for live sources (``BuffersConfig.live_capacity``).
LIVE_CAPACITY = 2
#: As in bench.pipeline: about 20 boxes per frame with the random-but-active weights.
DEFAULT_SCORE_THRESHOLD = 0.055
RSS_SLOPE_LIMIT_MIB_PER_MIN = 1.0
LATENCY_DRIFT_LIMIT = 0.20
_SERVER_START_TIMEOUT_S = 20.0


class RtspServer:
    """The loopback RTSP server as a subprocess (``with``): ``url`` once it is READY."""

    def __init__(self, clip: Path, script: Path = DEFAULT_SERVE_SCRIPT) -> None:
        if not clip.is_file():
            raise FileNotFoundError(f"--serve clip not found: {clip}")
        if not script.is_file():
            raise FileNotFoundError(f"RTSP server script not found: {script} (give --serve-script)")
        self.command = [SYSTEM_PYTHON, str(script), str(clip), "--port", "0"]
        self._process: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> RtspServer:
        process = subprocess.Popen(self.command, stdout=subprocess.PIPE, text=True)
        self._process = process
        ready: list[str] = []
        reader = threading.Thread(
            target=lambda: ready.append(process.stdout.readline() if process.stdout else ""),
            daemon=True,
        )
        reader.start()
        reader.join(_SERVER_START_TIMEOUT_S)
        line = ready[0].strip() if ready else ""
        if not line.startswith("READY "):
            self._stop()
            raise RuntimeError(
                f"RTSP server did not print READY within {_SERVER_START_TIMEOUT_S:.0f} s "
                f"(got {line!r}); run `{shlex.join(self.command)}` to see why"
            )
        self.url = line.split()[1]
        logger.info("RTSP server ready at %s", self.url)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class LatencyProbe:
    """Wraps a sink: after each write, records (now, now - packet.arrival_s), both
    ``time.monotonic()`` seconds. Thread-safe to read while the sink's thread writes."""

    def __init__(self, inner: VideoFileSink) -> None:
        self.inner = inner
        self.name = inner.name
        self._lock = threading.Lock()
        self._samples: list[tuple[float, float]] = []

    def setup(self) -> None:
        self.inner.setup()

    def write(self, item: FramePacket) -> None:
        self.inner.write(item)
        now = time.monotonic()
        with self._lock:
            self._samples.append((now, now - item.arrival_s))

    def teardown(self) -> None:
        self.inner.teardown()

    def samples_between(self, start_s: float, end_s: float) -> list[float]:
        """Latencies (s) of the writes that finished in ``[start_s, end_s)``."""
        with self._lock:
            return [lat for at, lat in self._samples if start_s <= at < end_s]


@dataclass(frozen=True)
class SoakConfig:
    url: str
    model: Path | None
    size: str = "n"
    backend: Backend = Backend.ONNXRUNTIME
    imgsz: int = 640
    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    intra_op_threads: int = 1
    torch_threads: int = 1
    minutes: float = 10.0
    interval_s: float = 10.0
    warmup_s: float = 30.0

    def __post_init__(self) -> None:
        if self.minutes <= 0:
            raise ValueError(f"--minutes must be > 0, got {self.minutes}")
        if self.interval_s <= 0:
            raise ValueError(f"--interval-s must be > 0, got {self.interval_s}")
        if self.warmup_s < 0:
            raise ValueError(f"--warmup-s must be >= 0, got {self.warmup_s}")


def _p95_ms(latencies_s: Sequence[float]) -> float | None:
    value = percentile(sorted(latencies_s), 95)
    return None if value is None else value * 1000.0


def run_soak(config: SoakConfig, out_dir: Path, command: str = "") -> dict[str, Any]:
    """Run the live pipeline for ``config.minutes`` after the warm-up; the JSON-able report."""
    torch.set_num_threads(config.torch_threads)
    infer_config = InferConfig(
        backend=config.backend,
        model=config.model,
        size=config.size,
        imgsz=config.imgsz,
        device=Device.CPU,
        score_threshold=config.score_threshold,
        intra_op_threads=config.intra_op_threads,
    )
    class_names = list(prepare_model(infer_config).info.class_names)
    spec = BufferSpec(LIVE_CAPACITY, OverflowPolicy.DROP_OLDEST)
    probe = LatencyProbe(
        VideoFileSink(VideoSinkConfig(path=str(out_dir / "soak.mp4")), class_names)
    )
    pipeline = Pipeline(
        [LiveSource(LiveSourceConfig(url=config.url))],
        [
            (
                Preprocessor(
                    PreprocessConfig(input_size=config.imgsz, device=PreprocessDevice.CPU)
                ),
                spec,
            ),
            (InferenceStage(infer_config, lambda: make_backend(infer_config)), spec),
            (Tracker(TrackConfig()), spec),
        ],
        [(probe, spec)],
    )
    machine = machine_info()
    samples: list[dict[str, Any]] = []
    pipeline.start()
    try:
        start = time.monotonic()
        measure_from = start + config.warmup_s
        end = measure_from + config.minutes * 60.0
        tick = start
        while True:
            tick += config.interval_s
            pipeline.join(timeout=max(0.0, tick - time.monotonic()))
            if not pipeline.running:
                raise RuntimeError("the pipeline ended before the soak did; see the log")
            now = time.monotonic()
            metrics = pipeline.metrics()
            sample = {
                "t_s": round(now - start, 2),
                "rss_mib": round(rss_mib(), 2),
                "latency_p95_ms": _round(
                    _p95_ms(probe.samples_between(now - config.interval_s, now))
                ),
                "frames_in": metrics.frames_in,
                "frames_out": metrics.frames_out,
                "dropped": metrics.dropped,
            }
            samples.append(sample)
            logger.info("%s", sample)
            if now >= end:
                break
    finally:
        pipeline.stop()
        pipeline.join(timeout=30.0)
    final = pipeline.metrics()

    measured = [s for s in samples if s["t_s"] >= config.warmup_s]
    minutes = [(s["t_s"] - config.warmup_s) / 60.0 for s in measured]
    with_latency = [
        (m, s["latency_p95_ms"])
        for m, s in zip(minutes, measured)
        if s["latency_p95_ms"] is not None
    ]
    first_minute = _p95_ms(
        probe.samples_between(start + config.warmup_s, start + config.warmup_s + 60.0)
    )
    last_end = start + float(measured[-1]["t_s"]) if measured else end
    last_minute = _p95_ms(probe.samples_between(last_end - 60.0, last_end))
    rss_slope = least_squares_slope(minutes, [s["rss_mib"] for s in measured])
    latency_slope = least_squares_slope([m for m, _ in with_latency], [v for _, v in with_latency])
    drift = (
        last_minute / first_minute - 1.0
        if first_minute is not None and last_minute is not None and first_minute > 0
        else None
    )
    return {
        "command": command,
        "machine": machine,
        "load_avg_after": machine_info()["load_avg_1_5_15"],
        "settings": {
            "url": config.url,
            "model": str(config.model) if config.model is not None else None,
            "size": config.size,
            "backend": config.backend.value,
            "imgsz": config.imgsz,
            "score_threshold": config.score_threshold,
            "intra_op_threads": config.intra_op_threads,
            "torch_threads": config.torch_threads,
            "buffers": f"DROP_OLDEST, capacity {LIVE_CAPACITY}",
            "minutes": config.minutes,
            "interval_s": config.interval_s,
            "warmup_s": config.warmup_s,
        },
        "rss_slope_mib_per_min": round(rss_slope, 4),
        "latency_p95_slope_ms_per_min": round(latency_slope, 3),
        "latency_p95_first_minute_ms": _round(first_minute),
        "latency_p95_last_minute_ms": _round(last_minute),
        "latency_p95_drift": _round(drift, 4),
        "rss_ok": rss_slope < RSS_SLOPE_LIMIT_MIB_PER_MIN,
        "latency_ok": drift is not None and abs(drift) <= LATENCY_DRIFT_LIMIT,
        "frames_in": final.frames_in,
        "frames_out": final.frames_out,
        "dropped": final.dropped,
        "output_fps": round(final.frames_out / final.wall_s, 3) if final.wall_s > 0 else 0.0,
        "samples": samples,
    }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def format_report(result: dict[str, Any]) -> str:
    m = result["machine"]
    s = result["settings"]
    lines = [
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; load {m['load_avg_1_5_15']} before, "
        f"{result['load_avg_after']} after; {m['date']}",
        f"{s['url']}: D-FINE-{s['size'].upper()} {s['imgsz']} on {s['backend']}, {s['buffers']}; "
        f"{s['minutes']} min after {s['warmup_s']:.0f} s warm-up, a sample every {s['interval_s']:.0f} s",
        "",
        f"{'t s':>8}{'RSS MiB':>10}{'lat p95 ms':>12}{'frames in':>11}{'out':>8}{'dropped':>9}",
    ]
    for x in result["samples"]:
        p95 = "-" if x["latency_p95_ms"] is None else f"{x['latency_p95_ms']:.0f}"
        lines.append(
            f"{x['t_s']:>8.0f}{x['rss_mib']:>10.1f}{p95:>12}{x['frames_in']:>11}{x['frames_out']:>8}"
            f"{x['dropped']:>9}"
        )
    first = result["latency_p95_first_minute_ms"]
    last = result["latency_p95_last_minute_ms"]
    drift = result["latency_p95_drift"]
    lines += [
        "",
        f"RSS slope          {result['rss_slope_mib_per_min']:+.3f} MiB/min  "
        f"({'ok' if result['rss_ok'] else 'FAIL'}: limit < {RSS_SLOPE_LIMIT_MIB_PER_MIN} MiB/min)",
        f"latency p95 slope  {result['latency_p95_slope_ms_per_min']:+.2f} ms/min",
        f"latency p95        first minute {first} ms, last minute {last} ms, "
        + ("drift -" if drift is None else f"drift {drift * 100:+.1f}%")
        + f"  ({'ok' if result['latency_ok'] else 'FAIL'}: limit ±{LATENCY_DRIFT_LIMIT * 100:.0f}%)",
        f"frames in {result['frames_in']}, out {result['frames_out']} ({result['output_fps']:.2f} fps), "
        f"dropped {result['dropped']}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="Run the live pipeline for minutes; report RSS and latency p95 slopes.",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--source", help="a live URL (rtsp://...)")
    where.add_argument("--serve", type=Path, help="start the loopback RTSP server on this clip")
    parser.add_argument("--serve-script", type=Path, default=DEFAULT_SERVE_SCRIPT)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--size", default="n")
    parser.add_argument(
        "--backend",
        default=Backend.ONNXRUNTIME.value,
        choices=[b.value for b in Backend if b is not Backend.TENSORRT],
    )
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--score-threshold", type=float, default=DEFAULT_SCORE_THRESHOLD)
    parser.add_argument("--threads", type=int, default=1, help="inference intra-op threads")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument(
        "--minutes", type=float, default=10.0, help="measured time after the warm-up"
    )
    parser.add_argument("--interval-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=30.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    command = "python -m bench.soak " + shlex.join(list(sys.argv[1:] if argv is None else argv))

    def soak(url: str) -> dict[str, Any]:
        config = SoakConfig(
            url=url,
            model=args.model,
            size=args.size,
            backend=Backend(args.backend),
            imgsz=args.imgsz,
            score_threshold=args.score_threshold,
            intra_op_threads=args.threads,
            torch_threads=args.torch_threads,
            minutes=args.minutes,
            interval_s=args.interval_s,
            warmup_s=args.warmup_s,
        )
        with tempfile.TemporaryDirectory(prefix="finestream-soak-") as tmp:
            return run_soak(config, Path(tmp), command)

    try:
        if args.serve is not None:
            with RtspServer(args.serve, args.serve_script) as server:
                result = soak(server.url)
        else:
            result = soak(args.source)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_report(result))
    write_json(args.json, result)
    return 0 if result["rss_ok"] and result["latency_ok"] else 3


if __name__ == "__main__":
    raise SystemExit(main())
