"""The ``finestream label`` subcommand: arguments → checks → teacher → dataset (see
``pipeline.label``). Registered by ``pipeline.cli``; errors raise ``LabelError`` (exit 2)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline.label import (
    LabelError,
    LabelSettings,
    SplitBy,
    Teacher,
    check_sources,
    class_mapping,
    label_sources,
)
from stages.tiling import MergeMethod


def add_label_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    label = commands.add_parser(
        "label",
        help="label footage with a teacher model into a COCO dataset for `finestream train`",
        description="Run a teacher model over videos or image folders and write a COCO dataset "
        "(JPEG frames, train.json, val.json, test.json for --holdout sources).",
    )
    label.add_argument("--model", type=Path, required=True, help="teacher: .pth, .onnx or .engine")
    label.add_argument(
        "--source", type=Path, action="append", default=[], help="video or image folder (repeat)"
    )
    label.add_argument(
        "--holdout",
        type=Path,
        action="append",
        default=[],
        help="source labelled into test.json only: a scene the model never trains on (repeat)",
    )
    label.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    label.add_argument(
        "--size", default=None, help="D-FINE size of a .pth teacher (default: the file's)"
    )
    label.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes of a .pth teacher (default: the file's)",
    )
    label.add_argument(
        "--backend", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"]
    )
    label.add_argument(
        "--imgsz",
        type=int,
        default=None,
        help="teacher input side (default: an .onnx/.engine file's, else 640)",
    )
    label.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    label.add_argument("--every", type=int, default=1, help="keep every k-th frame")
    label.add_argument(
        "--min-change",
        type=float,
        default=0.0,
        help="keep a frame only if its mean grey difference from the last kept one "
        "is at least this (0-255; 0 keeps all)",
    )
    label.add_argument("--threshold", type=float, default=0.4, help="teacher score threshold")
    label.add_argument(
        "--classes",
        default=None,
        help="comma-separated teacher class names to keep, e.g. person,bicycle,car",
    )
    label.add_argument(
        "--rename",
        default=None,
        help="comma-separated old=new; renaming to a kept name merges, e.g. truck=car",
    )
    label.add_argument(
        "--min-box",
        type=float,
        default=4.0,
        help="drop boxes whose shorter side is below this (px)",
    )
    label.add_argument(
        "--split",
        default="time",
        choices=[s.value for s in SplitBy],
        help="time: the last part of each clip is validation; clip: whole clips are",
    )
    label.add_argument("--val-fraction", type=float, default=0.2)
    label.add_argument(
        "--gap",
        type=float,
        default=1.0,
        help="seconds of frames dropped before the validation part",
    )
    label.add_argument(
        "--tile",
        type=int,
        default=None,
        help="also run the teacher on overlapping tiles of this side (px) and merge",
    )
    label.add_argument("--tile-overlap", type=float, default=0.2)
    label.add_argument("--merge", default="greedy_ios", choices=[m.value for m in MergeMethod])
    label.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="crops per teacher call (1 for fixed-batch exports)",
    )
    label.add_argument("--no-progress", action="store_true")
    label.set_defaults(handler=run_label)


def _parse_rename(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    pairs = {}
    for item in text.split(","):
        old, sep, new = item.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise LabelError(f"--rename {item!r}: expected old=new, e.g. truck=car")
        pairs[old.strip()] = new.strip()
    return pairs


def run_label(args: argparse.Namespace) -> int:
    settings = LabelSettings(
        every=args.every,
        min_change=args.min_change,
        score_threshold=args.threshold,
        classes=tuple(c.strip() for c in args.classes.split(",")) if args.classes else None,
        rename=_parse_rename(args.rename),
        min_box_px=args.min_box,
        split_by=SplitBy(args.split),
        val_fraction=args.val_fraction,
        gap_s=args.gap,
        tile_px=args.tile,
        tile_overlap=args.tile_overlap,
        merge=MergeMethod(args.merge),
        max_batch=args.max_batch,
    )
    check_sources([*args.source, *args.holdout])
    if not args.model.is_file():
        raise LabelError(f"--model {args.model}: no such file")
    if args.out.exists() and any(args.out.iterdir()):
        raise LabelError(f"--out {args.out}: folder is not empty; choose a new folder or empty it")

    from stages.infer import InferConfig, make_backend, prepare_model

    # The check phase: the model file read once (class names, input size), nothing loaded yet.
    prepared = prepare_model(
        InferConfig(
            backend=args.backend,
            model=args.model,
            size=args.size,
            num_classes=args.num_classes,
            imgsz=args.imgsz,
            device=args.device,
            score_threshold=settings.score_threshold,
        )
    )
    class_names = list(prepared.info.class_names)
    class_mapping(class_names, settings.classes, settings.rename)  # refuses unknown names now
    backend = make_backend(prepared.config, prepared.info)
    started = time.monotonic()

    def progress(frames_read: int) -> None:
        if args.no_progress:
            return
        rate = frames_read / max(time.monotonic() - started, 1e-6)
        sys.stderr.write(f"\rlabel: {frames_read} frames read, {rate:.1f} fps")
        sys.stderr.flush()

    summary = label_sources(
        Teacher(backend, settings),
        class_names,
        args.source,
        args.out,
        settings,
        holdout=args.holdout,
        progress=progress,
    )
    if not args.no_progress:
        sys.stderr.write("\n")
    for line in summary.lines():
        print(line)
    print(
        f"dataset: {args.out}/train.json, {args.out}/val.json"
        + (f", {args.out}/test.json" if args.holdout else "")
    )
    return 0
