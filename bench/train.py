"""Training benchmarks: speed (s/iter) and "it learns" (overfit, from scratch), on synthetic sets.

Usage::

    python -m bench.train speed   [--size n] [--imgsz 320] [--batch 8] [--steps 10] [--warmup 2]
                                  [--workers 1] [--device cpu|cuda] [--amp off|bf16|fp16]
    python -m bench.train overfit [--images 16] [--epochs 150] [--batch 4] [--lr 4e-4]
    python -m bench.train scratch [--images 200] [--classes 3] [--epochs 60] [--batch 8] [--lr 4e-4]
    (every mode: [--json out.json] [--work DIR] [-v])

- ``speed``: the real trainer (``dfine.train.trainer.Trainer``: data loader, forward, loss,
  backward, clipping, AdamW, EMA, lr schedule) on a synthetic set; seconds per optimiser step
  from the time between consecutive steps (so data loading counts where it is not hidden
  behind the step), median and mean over ``--steps`` after ``--warmup`` steps, and the CPU
  seconds the training process spent per step (on a busy machine wall time is inflated by
  the other work; CPU time divided by the threads is the step's own cost). No validation
  or checkpoints inside the timed steps. The official trainer measured 2.33 s/iter for
  D-FINE-N at 320, batch 8 on the 2-core CPU this project develops on.
- ``overfit``: ``--images`` synthetic images (3 classes), no heavy augmentation, validated on
  the same images: the train mAP50 should reach 0.9.
- ``scratch``: ``--images`` synthetic images, ``--classes`` classes, 10 % held out, random
  initialisation: the val mAP50 at the end, with the optimiser steps and minutes it took (the
  official trainer reached about 0.12 after 568 iterations at batch 8 on such a set).

The synthetic sets are written once under ``--work`` (default: a temporary folder). Each mode
prints one JSON object (and writes it with ``--json``); the run folders keep ``metrics.csv``,
``losses.csv`` and ``results.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import configure_logging, machine_info, write_json
from dfine.train.settings import (
    Amp,
    CheckpointSettings,
    DataSettings,
    EmaSettings,
    OptimSettings,
    Schedule,
    TrainSettings,
    default_param_groups,
)

logger = logging.getLogger(__name__)

OFFICIAL_S_PER_ITER = 2.33  # official trainer, D-FINE-N 320 batch 8, this project's 2-core CPU
OFFICIAL_SCRATCH_MAP50 = 0.12  # official trainer after 568 iterations at batch 8, 200 images


def _synthetic(work: Path, images: int, classes: int, size: int, seed: int) -> Path:
    from dfine.train.synthetic import make_synthetic_dataset

    folder = work / f"synthetic_{images}x{classes}_{size}_s{seed}"
    ann = folder / "annotations.json"
    if not ann.exists():
        make_synthetic_dataset(folder, images, num_classes=classes, size=size, seed=seed)
    return ann


def _groups(lr: float, backbone_ratio: float = 0.5) -> tuple[Any, ...]:
    """The official N groups, the backbone at ``backbone_ratio`` of the lr (official: half)."""
    from dataclasses import replace

    return tuple(
        replace(g, lr=lr * backbone_ratio) if g.lr is not None else g
        for g in default_param_groups()
    )


def run_speed(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from dfine.train.datasets import load_dataset
    from dfine.train.trainer import Trainer

    images = max(args.batch * (args.steps + args.warmup + 1), 16)
    ann = _synthetic(work, images, 3, args.imgsz, seed=0)
    spec = load_dataset(ann, val_fraction=0.0)
    settings = TrainSettings(
        size=args.size,
        epochs=1,
        max_steps=args.warmup + args.steps,
        device=args.device,
        amp=Amp(args.amp),
        val_every=0,
        out=work / "run_speed",
        data=DataSettings(data=ann, imgsz=args.imgsz, batch=args.batch, workers=args.workers),
        checkpoint=CheckpointSettings(every_steps=0, every_s=0),
    )
    stamps: list[float] = []
    cpu_stamps: list[float] = []

    def on_step(step: int, model: torch.nn.Module) -> None:
        if torch.cuda.is_available() and settings.device.value != "cpu":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        cpu_stamps.append(time.process_time())

    start = time.perf_counter()
    Trainer(settings, spec, on_step=on_step).fit()
    total_s = time.perf_counter() - start
    skip = max(0, args.warmup - 1)
    intervals = [b - a for a, b in zip(stamps, stamps[1:])][skip:]
    cpu_intervals = [b - a for a, b in zip(cpu_stamps, cpu_stamps[1:])][skip:]
    median = statistics.median(intervals)
    return {
        "mode": "speed",
        "size": args.size,
        "imgsz": args.imgsz,
        "batch": args.batch,
        "workers": args.workers,
        "device": args.device,
        "amp": args.amp,
        "threads": torch.get_num_threads(),
        "timed_steps": len(intervals),
        "s_per_iter_median": round(median, 3),
        "s_per_iter_mean": round(statistics.fmean(intervals), 3),
        "s_per_iter_min": round(min(intervals), 3),
        # CPU seconds of the training process (all its threads, not the loader workers) per
        # step: what the step costs when it has the cores to itself, whatever else is running.
        "cpu_s_per_iter_median": round(statistics.median(cpu_intervals), 3),
        "official_s_per_iter": OFFICIAL_S_PER_ITER,
        "wall_s_including_setup": round(total_s, 1),
    }


def _learn(
    args: argparse.Namespace, work: Path, *, mode: str, ann: Path, same_val: bool
) -> dict[str, Any]:
    from dfine.train.datasets import load_dataset
    from dfine.train.trainer import Trainer

    spec = load_dataset(
        ann, val_data=ann if same_val else None, val_fraction=0.0 if same_val else 0.1
    )
    out = work / f"run_{mode}"
    settings = TrainSettings(
        size=args.size,
        epochs=args.epochs,
        device=args.device,
        amp=Amp(args.amp),
        seed=args.seed,
        val_every=args.val_every,
        out=out,
        data=DataSettings(
            data=ann,
            imgsz=args.imgsz,
            batch=args.batch,
            workers=args.workers,
            no_aug_epochs=args.epochs if mode == "overfit" else args.no_aug_epochs,
        ),
        optim=OptimSettings(
            lr=args.lr,
            param_groups=_groups(args.lr, args.backbone_lr_ratio),
            warmup_steps=args.warmup_steps,
            schedule=Schedule(args.schedule),
        ),
        ema=EmaSettings(decay=args.ema_decay, warmups=args.ema_warmups),
        checkpoint=CheckpointSettings(every_steps=0, every_s=600),
    )
    start = time.perf_counter()
    result = Trainer(settings, spec, progress=sys.stderr if args.verbose else None).fit()
    minutes = (time.perf_counter() - start) / 60.0
    last = result.history[-1] if result.history else {}
    best_map50 = max((h.get("map50") or 0.0 for h in result.history), default=0.0)
    return {
        "mode": mode,
        "images_train": len(spec.train),
        "images_val": len(spec.val),
        "classes": len(spec.class_names),
        "size": args.size,
        "imgsz": args.imgsz,
        "batch": args.batch,
        "epochs": args.epochs,
        "lr": args.lr,
        "schedule": args.schedule,
        "warmup_steps": args.warmup_steps,
        "backbone_lr_ratio": args.backbone_lr_ratio,
        "ema_decay": args.ema_decay,
        "ema_warmups": args.ema_warmups,
        "device": args.device,
        "amp": args.amp,
        "steps": result.steps,
        "minutes": round(minutes, 1),
        "final_map50": last.get("map50"),
        "final_map50_95": last.get("map50_95"),
        "best_map50": best_map50,
        "run_dir": str(out),
        **({"official_map50_after_568_steps": OFFICIAL_SCRATCH_MAP50} if mode == "scratch" else {}),
        **({"target_train_map50": 0.9} if mode == "overfit" else {}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("mode", choices=["speed", "overfit", "scratch"])
    parser.add_argument("--size", default="n", choices=["n", "s", "m", "l", "x"])
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--amp", default="bf16", choices=["off", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=10, help="speed: timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="speed: untimed first steps")
    parser.add_argument("--images", type=int)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--schedule", default="cosine", choices=["flat", "cosine"])
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument(
        "--backbone-lr-ratio",
        type=float,
        default=0.5,
        help="backbone lr / lr (official 0.5, for pretrained backbones; 1.0 from scratch)",
    )
    parser.add_argument("--ema-decay", type=float, default=0.9999)
    parser.add_argument("--ema-warmups", type=int, default=200)
    parser.add_argument("--no-aug-epochs", type=int, default=5)
    parser.add_argument("--val-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work", type=Path, help="folder for the synthetic sets and runs (default: temporary)"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    defaults = {"speed": (8, None, None), "overfit": (4, 16, 150), "scratch": (8, 200, 60)}[
        args.mode
    ]
    args.batch = args.batch or defaults[0]
    args.images = args.images or defaults[1]
    args.epochs = args.epochs or defaults[2]

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.mode == "speed":
            result = run_speed(args, work)
        elif args.mode == "overfit":
            result = _learn(
                args,
                work,
                mode="overfit",
                ann=_synthetic(work, args.images, 3, args.imgsz, seed=1),
                same_val=True,
            )
        else:
            result = _learn(
                args,
                work,
                mode="scratch",
                ann=_synthetic(work, args.images, args.classes, args.imgsz, seed=2),
                same_val=False,
            )
    result["machine"] = machine_info()
    result["command"] = "python -m bench.train " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    print(json.dumps(result, indent=2))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
