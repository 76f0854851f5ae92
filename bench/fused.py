"""The fused torch deploy form against the training form: D-FINE-N ms per frame on torch-CPU.

Usage::

    python -m bench.fused [--imgsz 320,640] [--threads 1,2] [--rounds 15] [--warmup 3]
        [--nchw] [--write]

Both forms run through ``TorchBackend`` (batch 1, postprocessor included, host arrays out) on
the same weights: the training form is the network as loaded (eval mode), the fused form the
same network after ``DFINE.deploy()``. With ``--nchw`` a third form is timed, fused but kept in
the contiguous (NCHW) layout, to show what channels-last adds. The forms are interleaved: each
round runs every form once, in an order that rotates from round to round, so that load from
other processes on the machine falls on all of them alike; the medians over the rounds are
reported with p10/p90, the ratio of medians, and the load average.

N uses the calibrated fixture checkpoint (``../shared/fixtures``) when present, else random
weights (latency does not depend on weight values). ``--write`` records the table, the
machine and the command in ``bench/RESULTS.md`` under its own dated heading (replacing only a
section with the same heading).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
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
SECTION_TITLE = "## Fused torch deploy form"

TRAINING, FUSED, FUSED_NCHW = "training form", "fused (deploy)", "fused, NCHW"


@dataclass(frozen=True)
class FormTiming:
    imgsz: int
    threads: int
    form: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    rounds: int
    load_1min: float  # after the configuration's rounds: above the core count means contention


def _forms(with_nchw: bool) -> tuple[dict[str, torch.nn.Module], str]:
    import dfine

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = dfine.build_model("n")
    weights = "random"
    if FIXTURE_CKPT.is_file():
        dfine.load_checkpoint(model, FIXTURE_CKPT)
        weights = "fixture"
    training = model.eval()
    fused = copy.deepcopy(training).deploy()
    forms: dict[str, torch.nn.Module] = {TRAINING: training, FUSED: fused}
    if with_nchw:
        forms[FUSED_NCHW] = copy.deepcopy(fused).to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return forms, weights


def measure(
    imgszs: Sequence[int], thread_counts: Sequence[int], rounds: int, warmup: int, with_nchw: bool
) -> tuple[list[FormTiming], str]:
    """Time every form at every input size and thread count, interleaved round by round."""
    import dfine
    from dfine.backends.torch_backend import TorchBackend

    forms, weights = _forms(with_nchw)
    sizes_wh = torch.tensor([[1920, 1080]])
    results: list[FormTiming] = []
    for imgsz in imgszs:
        images = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(1))
        for threads in thread_counts:
            # TorchBackend sets torch's process-wide thread count; every form runs under it.
            backends = {
                name: TorchBackend(
                    model,
                    dfine.PostProcessor(),
                    input_size_hw=(imgsz, imgsz),
                    intra_op_threads=threads,
                )
                for name, model in forms.items()
            }
            names = list(backends)
            for _ in range(warmup):
                for name in names:
                    backends[name](images, sizes_wh)
            times: dict[str, list[float]] = {name: [] for name in names}
            for r in range(rounds):
                shift = r % len(names)
                for name in names[shift:] + names[:shift]:
                    start = time.perf_counter()
                    backends[name](images, sizes_wh)
                    times[name].append((time.perf_counter() - start) * 1000.0)
            load = round(os.getloadavg()[0], 2)
            for name in names:
                q = np.percentile(times[name], [10, 90])
                timing = FormTiming(
                    imgsz,
                    threads,
                    name,
                    statistics.median(times[name]),
                    float(q[0]),
                    float(q[1]),
                    rounds,
                    load,
                )
                print(
                    f"  {imgsz} x{threads} {name}: median {timing.median_ms:.1f} ms",
                    file=sys.stderr,
                )
                results.append(timing)
    return results, weights


# What each ingredient of the fused form measured on its own while it was chosen (same machine,
# 1 intra-op thread, median of 10-20 calls, load 0.4-1.7), and what was tried and not kept.
CHOICES = """\
What the ingredients measured alone when chosen (1 thread, medians of 10-20 calls, load 0.4-1.7):

- Stem max-pool (2x2, stride 1, `ceil_mode`) on a 1x16x321x321 map: torch's kernel 45 ms, two
  maxima of shifted views 2.1 ms (identical values). The biggest single item.
- Self-attention, 300 queries x 128, 8 heads: `nn.MultiheadAttention` as called (it also
  computes the head-averaged weights, discarded) 5.5 ms, through `scaled_dot_product_attention`
  2.2 ms; three decoder layers and the encoder layer use it.
- Folding (D-FINE-N): 79 BatchNorm passes over the feature maps and the 30 learnable affines'
  multiply and add passes are gone (their ReLU becomes one clamp); the 8 RepVGG blocks run one
  3x3 conv instead of a 3x3 and a 1x1 conv and an add.
- `F.pad` of the stem on a channels-last map 5.8 ms; written into a channels-last buffer 1.5 ms.
- Channels-last: the "fused, NCHW" rows above (run with `--nchw`) show what it adds.
- `grid_sample` on strided sampling grids was ~2x slower than on contiguous ones: fixed for both
  forms (bit-identical), so not part of the ratio.

Tried and not kept: `torch.compile` (inductor) had not finished compiling D-FINE-N after 4 min
on this machine, too slow and fragile for a video process start; `torch.jit.trace` + `freeze`
gained ~4 % (77 vs 81 ms at 320, 2 threads) but bakes in the input size; 1x1 convs as a matmul
on the channels-last view: no consistent gain. Threads stay the backend's `intra_op_threads`
setting (the table shows 1 and 2).
"""


def format_table(results: Sequence[FormTiming]) -> str:
    lines = [
        "| input | threads | form | median ms | p10–p90 ms | training / this | rounds | load |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    base = {(t.imgsz, t.threads): t.median_ms for t in results if t.form == TRAINING}
    for t in results:
        ratio = base.get((t.imgsz, t.threads), float("nan")) / t.median_ms
        lines.append(
            f"| {t.imgsz}×{t.imgsz} | {t.threads} | {t.form} | {t.median_ms:.1f} | "
            f"{t.p10_ms:.1f}–{t.p90_ms:.1f} | {ratio:.2f}× | {t.rounds} | {t.load_1min:.2f} |"
        )
    return "\n".join(lines)


def section_heading(date: str) -> str:
    return f"{SECTION_TITLE} ({date})"


def format_section(
    results: Sequence[FormTiming],
    weights: str,
    info: dict[str, Any],
    command: str,
    uptime_before: str,
    uptime_after: str,
) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    return "\n".join(
        [
            section_heading(info["date"][:10]),
            "",
            "D-FINE-N through `TorchBackend` (batch 1, postprocessing included, host arrays out), "
            f"{weights} weights; training form = the network as loaded (eval mode), fused = after "
            "`DFINE.deploy()` (norms and learnable affines folded into the convs, RepVGG blocks "
            "merged, SDPA self-attention, shifted-view stem pool, channels-last). The forms run "
            "interleaved, one call each per round in a rotating order, so they see the same load.",
            "",
            f"- Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, no GPU "
            "(shared with other work while measured: see the load)",
            f"- Date: {info['date']}",
            f"- Software: {versions}",
            f"- `uptime` before: `{uptime_before}`; after: `{uptime_after}`",
            *(
                [
                    "- The load exceeded the core count: the figures are inflated, most of all "
                    "with 2 threads (each form's threads wait for cores); compare the forms within "
                    "a row group, and prefer the 1-thread rows"
                ]
                if max(t.load_1min for t in results) >= (info["cores"] or 1)
                else []
            ),
            f"- Command: `{command}`",
            "",
            format_table(results),
            "",
            CHOICES,
        ]
    )


def write_section(section: str, path: Path = RESULTS) -> None:
    """Append ``section`` to ``path``, or put it in place of a section with the same heading
    (up to the next "## " heading); other sections are left as they are."""
    heading = section.splitlines()[0].strip()
    text = path.read_text() if path.is_file() else "# Benchmark results\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        rest = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + rest if rest else "")
    path.write_text(new)


def _uptime() -> str:
    """What ``uptime`` prints (its own output when the command exists)."""
    if shutil.which("uptime"):
        done = subprocess.run(["uptime"], capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.strip():
            return " ".join(done.stdout.split())
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{datetime.datetime.now().strftime('%H:%M:%S')} load average: {load}"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 320,640, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers like 320,640, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fused", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--imgsz", type=_int_list, default=[320, 640], help="comma list (default 320,640)"
    )
    parser.add_argument(
        "--threads",
        type=_int_list,
        default=[1, 2],
        help="comma list of intra-op thread counts (default 1,2)",
    )
    parser.add_argument(
        "--rounds", type=int, default=15, help="timed rounds per configuration (>= 1)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--nchw", action="store_true", help="also time the fused form without channels-last"
    )
    parser.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        print("error: --rounds must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    bad = [s for s in args.imgsz if s % 32 or s < 320]
    if bad:
        print(
            f"error: --imgsz must be multiples of 32 of at least 320 (300 queries), got {bad}",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    command = "python -m bench.fused " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    uptime_before = _uptime()
    results, weights = measure(args.imgsz, args.threads, args.rounds, args.warmup, args.nchw)
    uptime_after = _uptime()
    print(format_table(results))
    if args.write:
        section = format_section(
            results, weights, machine_info(), command.strip(), uptime_before, uptime_after
        )
        write_section(section)
        print(f"recorded in {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
