"""Model latency alone: D-FINE N and S at 320 and 640 on torch-CPU and ONNX Runtime-CPU.

Usage::

    python -m bench.model [--sizes n,s] [--imgsz 320,640] [--runs 20] [--warmup 3]
        [--threads 1,2] [--write]

Each configuration calls the backend (``TorchBackend`` / ``OnnxRuntimeBackend``, batch 1, the
postprocessor included, host arrays out) ``--warmup`` times, then ``--runs`` timed times, and
reports the median with p10/p90 and the minimum. N uses the calibrated fixture checkpoint
(``../shared/fixtures``) when present, S random weights (latency does not depend on weight
values). ONNX files are exported once into a temporary folder; export time is not counted.
Both runtimes get the same intra-op thread count; ``--threads 1,2`` measures each.

``--write`` records the table, the machine and the command in ``bench/RESULTS.md`` under
"## Model latency", replacing only that section.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import machine_info

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
FIXTURE_CKPT = REPO.parent / "shared" / "fixtures" / "dfine_n_calibrated" / "dfine_n_calibrated.pth"
SECTION = "## Model latency"


@dataclass(frozen=True)
class Timing:
    size: str
    imgsz: int
    runtime: str
    threads: int
    weights: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    runs: int
    load_1min: float  # machine load average right after the runs: > cores means contention


def _model(size: str) -> tuple[torch.nn.Module, str]:
    import dfine

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = dfine.build_model(size)
    if size == "n" and FIXTURE_CKPT.is_file():
        dfine.load_checkpoint(model, FIXTURE_CKPT)
        weights = "fixture"
    else:
        weights = "random"
    return model.eval(), weights


def _time(call: Callable[[], Any], warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def measure(
    sizes: Sequence[str],
    imgszs: Sequence[int],
    runs: int,
    warmup: int,
    thread_counts: Sequence[int],
) -> list[Timing]:
    import dfine
    from dfine.backends.base import DetectorBackend
    from dfine.backends.onnx_backend import OnnxRuntimeBackend
    from dfine.backends.torch_backend import TorchBackend
    from dfine.export import export_onnx

    results: list[Timing] = []
    sizes_wh = torch.tensor([[1920, 1080]])
    with tempfile.TemporaryDirectory(prefix="bench_model_") as tmp:
        for size in sizes:
            model, weights = _model(size)
            for imgsz in imgszs:
                generator = torch.Generator().manual_seed(1)
                images = torch.rand(1, 3, imgsz, imgsz, generator=generator)
                path = export_onnx(
                    model, dfine.PostProcessor(), Path(tmp) / f"{size}{imgsz}.onnx", imgsz=imgsz
                )
                for threads in thread_counts:
                    # TorchBackend sets torch's process-wide thread count; ORT's is per session.
                    backends: list[tuple[str, DetectorBackend]] = [
                        (
                            "torch-cpu",
                            TorchBackend(
                                model,
                                dfine.PostProcessor(),
                                input_size_hw=(imgsz, imgsz),
                                intra_op_threads=threads,
                            ),
                        ),
                        (
                            "onnxruntime-cpu",
                            OnnxRuntimeBackend(
                                path, providers=["CPUExecutionProvider"], intra_op_threads=threads
                            ),
                        ),
                    ]
                    for runtime, backend in backends:
                        times = _time(lambda b=backend, x=images: b(x, sizes_wh), warmup, runs)
                        q = np.percentile(times, [10, 90])
                        timing = Timing(
                            size,
                            imgsz,
                            runtime,
                            threads,
                            weights,
                            statistics.median(times),
                            float(q[0]),
                            float(q[1]),
                            min(times),
                            runs,
                            round(os.getloadavg()[0], 2),
                        )
                        logger.info("%s", timing)
                        print(
                            f"  {size} {imgsz} {runtime} x{threads}: median {timing.median_ms:.1f} ms",
                            file=sys.stderr,
                        )
                        results.append(timing)
    return results


def format_table(results: Sequence[Timing]) -> str:
    lines = [
        "| model | input | runtime | threads | weights | median ms | p10–p90 ms | min ms | runs | load |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for t in results:
        lines.append(
            f"| D-FINE-{t.size.upper()} | {t.imgsz}×{t.imgsz} | {t.runtime} | {t.threads} | {t.weights} | "
            f"{t.median_ms:.1f} | {t.p10_ms:.1f}–{t.p90_ms:.1f} | {t.min_ms:.1f} | {t.runs} | "
            f"{t.load_1min:.2f} |"
        )
    return "\n".join(lines)


def format_section(
    results: Sequence[Timing],
    info: dict[str, Any],
    command: str,
    load_before: Sequence[float],
    load_after: Sequence[float],
) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    return "\n".join(
        [
            SECTION,
            "",
            "Batch 1, postprocessing included (labels/boxes/scores as host arrays), median of the "
            "timed runs after warm-up. The inference stage's per-frame cost is this plus moving the "
            "tensor in and building `Detections` (negligible).",
            "",
            f"- Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, no GPU",
            f"- Date: {info['date']}",
            f"- Software: {versions}",
            f"- Load average (1, 5, 15 min) before: {list(load_before)}, after: {list(load_after)}; "
            "the `load` column is the 1-minute load right after each row's runs (other work on "
            "the machine shows there: above the core count, figures are inflated)",
            f"- Command: `{command}`",
            "",
            format_table(results),
            "",
        ]
    )


def write_section(section: str, path: Path = RESULTS) -> None:
    """Put ``section`` into ``path`` in place of an existing "## Model latency" section (up to
    the next "## " heading), or append it; other sections are left as they are."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        rest = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + rest if rest else "")
    path.write_text(new)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 320,640, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.model", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--sizes", default="n,s", help="comma list of D-FINE sizes (default n,s)")
    parser.add_argument(
        "--imgsz", type=_int_list, default=[320, 640], help="comma list (default 320,640)"
    )
    parser.add_argument("--runs", type=int, default=20, help="timed runs per configuration (>= 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=_int_list,
        default=[os.cpu_count() or 1],
        help="comma list of intra-op thread counts, same for both runtimes (default: all cores)",
    )
    parser.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    if args.runs < 20:
        print(
            "error: --runs must be at least 20 (medians of fewer runs are too noisy)",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    command = "python -m bench.model " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    load_before = [round(x, 2) for x in os.getloadavg()]
    results = measure(sizes, args.imgsz, args.runs, args.warmup, args.threads)
    load_after = [round(x, 2) for x in os.getloadavg()]
    table = format_table(results)
    print(table)
    if args.write:
        info = machine_info()
        write_section(format_section(results, info, command.strip(), load_before, load_after))
        print(f"recorded in {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
