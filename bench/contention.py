"""How much does work on the other cores slow the inference down? (Even with a core to itself.)

Usage::

    python -m bench.contention --model CKPT --size n --imgsz 640 [--runs 10] [--rounds 3]
        [--json out.json]

The inference stage (ONNX Runtime, one intra-op thread, the same backend the app runs) is
pinned to the first core and timed on one real frame while a neighbour process, pinned to the
other cores, does one kind of work at a time (in interleaved rounds, so drift in the machine's
speed spreads over every kind):

- ``idle``: nothing (the reference);
- ``spin``: a pure-Python busy loop (compute only, almost no memory traffic);
- ``memcopy``: copies 64 MiB arrays back and forth (memory bandwidth and the shared cache);
- ``x264``: encodes 1080p frames with libx264 ``veryfast``, as the MP4 sink does.

Nothing is shared with the neighbour but the machine, so any slow-down is the hardware's (shared
caches, memory bandwidth, or, on a virtual machine, two vCPUs that are threads of one physical
core): no scheduling setting of ours can remove it. ``bench.pipeline`` shows how much of it
reaches the pipeline (the inference's CPU per frame alone and inside).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import configure_logging, machine_info, write_json

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"
#: The frame the inference runs on, and the pictures the x264 neighbour encodes.
DEFAULT_CLIP = MEDIA / "pedestrians_night_street_1080p_mpeg4.mp4"
NEIGHBOURS = ("idle", "spin", "memcopy", "x264")
#: Seconds a neighbour runs before timing starts (x264 decodes its frames first).
SETTLE_S = 2.0


# --- the neighbours (run in a child process: python -m bench.contention --neighbour KIND) ------


def _spin() -> None:
    while True:
        pass


def _memcopy() -> None:
    source = np.ones(64 << 20, dtype=np.uint8)
    target = np.empty_like(source)
    while True:
        np.copyto(target, source)
        np.copyto(source, target)


def _x264(clip: Path) -> None:
    import av

    with av.open(str(clip)) as container:
        pictures = [f.to_ndarray(format="rgb24", threads=1) for f in container.decode(video=0)]
    height, width = pictures[0].shape[:2]
    while True:
        with av.open(os.devnull, mode="w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=30, options={"preset": "veryfast", "crf": "23"})
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for i in range(120):
                frame = av.VideoFrame.from_ndarray(pictures[i % len(pictures)], format="rgb24")
                out.mux(stream.encode(frame.reformat(format="yuv420p", threads=1)))
            out.mux(stream.encode(None))


def run_neighbour(kind: str, clip: Path) -> None:
    """Do ``kind`` of work forever (until killed)."""
    if kind == "spin":
        _spin()
    elif kind == "memcopy":
        _memcopy()
    elif kind == "x264":
        _x264(clip)
    else:
        raise ValueError(f"--neighbour must be one of {', '.join(NEIGHBOURS[1:])}, got {kind!r}")


def _start_neighbour(kind: str, cpus: set[int], clip: Path) -> subprocess.Popen[bytes] | None:
    if kind == "idle":
        return None
    command = [sys.executable, "-m", "bench.contention", "--neighbour", kind, "--clip", str(clip)]
    # The child pins itself before it starts working (sched_setaffinity on its own pid).
    return subprocess.Popen(
        command,
        cwd=REPO,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        stdout=subprocess.DEVNULL,
    )


# --- the measurement -----------------------------------------------------------------------------


def measure(
    model: Path | None, size: str, imgsz: int, clip: Path, runs: int, rounds: int
) -> dict[str, Any]:
    """Median inference call (ms) with each neighbour, and its ratio to ``idle``: ``rounds``
    rounds, each timing ``runs`` calls beside every neighbour in turn."""
    from stages.decode import DecodeConfig, FileSource
    from stages.infer import Backend, Device, InferConfig, InferenceStage, make_backend
    from stages.preprocess import PreprocessConfig, PreprocessDevice, Preprocessor

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise ValueError(
            f"needs at least 2 cores to put a neighbour beside the inference, has {len(cpus)}"
        )
    inference_cpu, neighbour_cpus = cpus[0], set(cpus[1:])
    # As the app does beside ONNX Runtime: torch only resizes, and an OpenMP pool left
    # spin-waiting after the resize would take the inference's own core.
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {inference_cpu})  # this thread, and the threads it starts

    source = FileSource(DecodeConfig(path=str(clip)))
    source.setup()
    packet = next(iter(source.items()))
    source.teardown()
    preprocessor = Preprocessor(PreprocessConfig(input_size=imgsz, device=PreprocessDevice.CPU))
    config = InferConfig(
        backend=Backend.ONNXRUNTIME,
        model=model,
        size=size,
        imgsz=imgsz,
        device=Device.CPU,
        intra_op_threads=1,
    )
    stage = InferenceStage(config, lambda: make_backend(config))
    stage.setup()

    def infer_ms() -> float:
        preprocessor.process(packet)  # the stage consumes its input; made again, untimed
        t0 = time.perf_counter()
        stage.process(packet)
        return (time.perf_counter() - t0) * 1000.0

    for _ in range(3):  # warm-up: ONNX Runtime sizes its arena on the first runs
        infer_ms()

    # Interleaved rounds: a virtual machine's speed drifts by 10-20 % over minutes (other
    # tenants of the host), which would otherwise land on whichever neighbour ran then.
    calls: dict[str, list[float]] = {kind: [] for kind in NEIGHBOURS}
    for round_index in range(rounds):
        for kind in NEIGHBOURS:
            neighbour = _start_neighbour(kind, neighbour_cpus, clip)
            try:
                time.sleep(SETTLE_S if neighbour is not None else 0.0)
                calls[kind].extend(infer_ms() for _ in range(runs))
            finally:
                if neighbour is not None:
                    neighbour.kill()
                    neighbour.wait()
            logger.info(
                "round %d, %s: %.1f ms", round_index, kind, statistics.median(calls[kind][-runs:])
            )
    stage.teardown()
    idle = statistics.median(calls["idle"])
    rows = [
        {
            "neighbour": kind,
            "median_ms": round(statistics.median(ms), 2),
            "min_ms": round(min(ms), 2),
            "calls": len(ms),
            "vs_idle": round(statistics.median(ms) / idle, 3),
        }
        for kind, ms in calls.items()
    ]
    return {
        "inference_cpu": inference_cpu,
        "neighbour_cpus": sorted(neighbour_cpus),
        "rows": rows,
    }


def format_report(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"{m['cpu']}, {m['cores']} cores; load {m['load_avg_1_5_15']} before, "
        f"{result['load_avg_after']} after; {m['date']}",
        f"D-FINE-{result['size'].upper()} {result['imgsz']} on ONNX Runtime, 1 intra-op thread, "
        f"pinned to CPU {result['inference_cpu']}; neighbour on CPU "
        f"{','.join(map(str, result['neighbour_cpus']))}",
        "",
        f"{'neighbour':<10}{'median ms':>11}{'min ms':>9}{'vs idle':>9}",
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['neighbour']:<10}{row['median_ms']:>11.1f}{row['min_ms']:>9.1f}{row['vs_idle']:>9.3f}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.contention",
        description="The inference alone on one core while another core runs spin / memcopy / x264.",
    )
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (.pth) or .onnx")
    parser.add_argument("--size", default="n", help="D-FINE size (n, s, m, l, x)")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument(
        "--clip",
        type=Path,
        default=DEFAULT_CLIP,
        help="the frame to infer on, and what the x264 neighbour encodes",
    )
    parser.add_argument("--runs", type=int, default=10, help="timed calls per neighbour and round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds over all neighbours, interleaved"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--neighbour", choices=NEIGHBOURS[1:], default=None, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.neighbour is not None:
        run_neighbour(args.neighbour, args.clip)
        return 0
    configure_logging(args.verbose)
    if not args.clip.is_file():
        print(f"error: no clip at {args.clip}; pass --clip PATH to a video", file=sys.stderr)
        return 2
    if args.runs < 1 or args.rounds < 1:
        print(
            f"error: --runs and --rounds must be >= 1, got {args.runs} and {args.rounds}",
            file=sys.stderr,
        )
        return 2
    argv_list = list(sys.argv[1:] if argv is None else argv)
    info = machine_info()
    try:
        figures = measure(args.model, args.size, args.imgsz, args.clip, args.runs, args.rounds)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = {
        "command": "python -m bench.contention " + shlex.join(argv_list),
        "machine": info,
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "size": args.size,
        "imgsz": args.imgsz,
        **figures,
    }
    print(format_report(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
