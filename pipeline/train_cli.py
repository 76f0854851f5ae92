"""``finestream train`` and ``finestream eval``: registered on the main parser by
:func:`add_train_commands`.

train: config file (optional) → flags on top → dataset validated → ``Trainer.fit``. Every
dataset or config problem is one line and exit 2 before any training step; a NaN/inf loss is
one line and exit 1; Ctrl-C or SIGTERM writes ``last.pth`` and exits 130 (a second one aborts).

eval: COCO mAP of a model file (``.pth`` in torch — the trainer's own validation path —,
``.onnx`` in ONNX Runtime, ``.engine`` in TensorRT) on a dataset's val split or, with
``--all``, on every image; prints the per-class table and optionally writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from dfine.train.settings import TrainSettings
from pipeline.train_config import TrainOverrides, apply_train_overrides, load_train_config

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_SIZES = ["n", "s", "m", "l", "x"]


def add_train_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``train`` and ``eval`` to the ``finestream`` subcommands."""
    train = commands.add_parser(
        "train",
        help="fine-tune or train D-FINE on a COCO or YOLO dataset",
        description="Train D-FINE. Flags override the CONFIG file (configs/train_n.yaml and "
        "siblings hold each size's official recipe). RUN_DIR gets last.pth, best.pth, "
        "metrics.csv, losses.csv and results.png.",
    )
    train.add_argument(
        "config", nargs="?", type=Path, help="training YAML (see configs/train_*.yaml)"
    )
    train.add_argument("--data", type=Path, help="COCO annotations .json or YOLO data.yaml")
    train.add_argument(
        "--images", type=Path, help="COCO: the image folder (default: beside the JSON)"
    )
    train.add_argument(
        "--val-data", type=Path, help="COCO: a separate validation annotations .json"
    )
    train.add_argument("--size", choices=_SIZES)
    train.add_argument("--imgsz", type=int, help="square input side (multiple of 32)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch", type=int, help="images per batch")
    train.add_argument("--out", type=Path, metavar="RUN_DIR", help="run folder")
    train.add_argument(
        "--from",
        dest="init_from",
        type=Path,
        metavar="CKPT",
        help="start from these weights (every tensor that fits; e.g. dfine_n_coco.pth)",
    )
    train.add_argument(
        "--resume", action="store_true", help="continue the run in RUN_DIR from its last.pth"
    )
    train.add_argument("--device", choices=["auto", "cpu", "cuda"])
    train.add_argument("--workers", type=int, help="data loader processes (0: in the main process)")
    train.add_argument(
        "--max-steps", type=int, help="stop after N optimiser steps (smoke runs, benchmarks)"
    )
    train.add_argument("--seed", type=int)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=cmd_train)

    release = commands.add_parser(
        "release",
        help="the file to ship from a training checkpoint: EMA weights, FP16, no optimizer",
        description="Write RUN_DIR/best.pth (or last.pth) as a release: the EMA weights only "
        "(FP16 unless --fp32), the class names and the training input side, in the official "
        "layout. It runs everywhere a .pth does; --from starts a new run from it.",
    )
    release.add_argument("source", type=Path, help="a checkpoint finestream train wrote")
    release.add_argument("target", type=Path, help="the file to write, e.g. model.pth")
    release.add_argument("--fp32", action="store_true", help="keep FP32 weights (default FP16)")
    release.set_defaults(handler=cmd_release)

    ev = commands.add_parser(
        "eval",
        help="COCO mAP of a model on a dataset, per class",
        description="Evaluate a model (.pth, .onnx or .engine) on a dataset's val split (or every "
        "image with --all): COCO AP50:95 and AP50 with faster-coco-eval, per class.",
    )
    ev.add_argument(
        "--model",
        required=True,
        type=Path,
        help=".pth checkpoint, .onnx export or TensorRT .engine",
    )
    ev.add_argument(
        "--data", required=True, type=Path, help="COCO annotations .json or YOLO data.yaml"
    )
    ev.add_argument("--images", type=Path, help="COCO: the image folder (default: beside the JSON)")
    ev.add_argument(
        "--all", action="store_true", help="evaluate every image, not only the val split"
    )
    ev.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="COCO without a separate val file: the share held out (as in training)",
    )
    ev.add_argument("--imgsz", type=int, help="input side (default: the model's, else 640)")
    ev.add_argument(
        "--backend",
        choices=["torch", "onnxruntime", "tensorrt"],
        help="default: from the file (.pth torch, .onnx onnxruntime, .engine tensorrt)",
    )
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ev.add_argument("--batch", type=int, default=8)
    ev.add_argument("--workers", type=int, default=2)
    ev.add_argument("--json", type=Path, metavar="OUT_JSON", help="write the metrics as JSON")
    ev.set_defaults(handler=cmd_eval)


def _quiet_libraries(verbose: bool) -> None:
    # Training logs a line per checkpoint and the evaluator its own summary: kept for -v.
    level = logging.DEBUG if verbose else logging.WARNING
    for name in ("dfine", "faster_coco_eval"):
        logging.getLogger(name).setLevel(level)


def _settings_from_args(args: argparse.Namespace) -> TrainSettings:
    settings = load_train_config(args.config) if args.config else TrainSettings()
    return apply_train_overrides(
        settings,
        TrainOverrides(
            data=args.data,
            images=args.images,
            val_data=args.val_data,
            size=args.size,
            imgsz=args.imgsz,
            epochs=args.epochs,
            batch=args.batch,
            workers=args.workers,
            out=args.out,
            init_from=args.init_from,
            resume=True if args.resume else None,
            device=args.device,
            max_steps=args.max_steps,
            seed=args.seed,
        ),
    )


def cmd_train(args: argparse.Namespace) -> int:
    from dfine.train.datasets import load_dataset
    from dfine.train.trainer import NonFiniteLossError, Trainer

    _quiet_libraries(getattr(args, "verbose", False))
    settings = _settings_from_args(args)
    if settings.data.data is None:
        raise ValueError(
            "no dataset: pass --data (a COCO annotations .json or a YOLO data.yaml) "
            "or set data.data in the config"
        )
    if settings.init_from is not None and not settings.init_from.is_file():
        raise FileNotFoundError(f"--from {settings.init_from}: no such checkpoint (check the path)")
    if settings.resume and not (settings.out / "last.pth").is_file():
        raise FileNotFoundError(
            f"--resume: {settings.out / 'last.pth'} does not exist; point --out at "
            "the run folder, or start without --resume"
        )
    dataset = load_dataset(
        settings.data.data, settings.data.images, settings.data.val_data, settings.data.val_fraction
    )
    print(f"dataset: {dataset.description}", file=sys.stderr)
    trainer = Trainer(settings, dataset, progress=None if args.no_progress else sys.stderr)

    signals_seen = 0

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            raise KeyboardInterrupt  # second interrupt: stop now, without a checkpoint
        print(
            f"\n{signal.Signals(signum).name}: finishing this step and writing last.pth "
            "(again to abort)",
            file=sys.stderr,
        )
        trainer.request_stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = trainer.fit()
    except NonFiniteLossError as exc:
        print(f"finestream: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    best = "-" if result.best_map50_95 is None else f"{result.best_map50_95:.3f}"
    where = result.last_checkpoint or settings.out
    if result.interrupted:
        print(
            f"interrupted at step {result.steps}: saved {where}; continue with --resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(
        f"done: {result.steps} steps, {result.epochs_done} epochs, best val AP50:95 {best}; "
        f"run folder {settings.out}",
        file=sys.stderr,
    )
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# eval


def make_eval_predictor(
    model_path: Path, backend: str | None, imgsz: int | None, device: str
) -> tuple[Any, list[str], int, str]:
    """The predictor for ``finestream eval``: ``(predict(images, orig_sizes_wh) -> (labels,
    boxes_xyxy, scores) numpy), class names, input side, description)``.

    A checkpoint on the torch backend runs through the trainer's own validation path (EMA
    weights when present); everything else through the app's backends (``stages.infer``).
    """
    from dfine.model_info import ModelKind, read_model_info
    from dfine.train.evaluate import torch_predictor
    from stages.infer import InferConfig, make_backend, prepare_model

    info = read_model_info(model_path)
    chosen = (
        backend
        or {
            ModelKind.CHECKPOINT: "torch",
            ModelKind.ONNX: "onnxruntime",
            ModelKind.ENGINE: "tensorrt",
        }[info.kind]
    )
    side = imgsz or (info.input_size_hw[0] if info.input_size_hw else (info.trained_side or 640))
    if chosen == "torch":
        if info.kind is not ModelKind.CHECKPOINT:
            raise ValueError(
                f"--backend torch needs a .pth checkpoint, not {model_path.name}; "
                "use --backend onnxruntime or tensorrt"
            )
        from dfine.checkpoint import build_and_load

        dev = torch.device(
            "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        )
        if device == "cuda" and dev.type != "cuda":
            raise ValueError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
        model = build_and_load(info.size or "n", info.num_classes, model_path).to(dev)
        return (
            torch_predictor(model, info.num_classes, dev),
            list(info.class_names),
            side,
            info.describe(),
        )
    prepared = prepare_model(
        InferConfig(backend=chosen, model=model_path, imgsz=side, device=device)
    )
    det = make_backend(prepared.config, prepared.info)

    def predict(
        images: torch.Tensor, orig_sizes_wh: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return det(images.to(det.device), orig_sizes_wh)

    return (
        predict,
        list(det.class_names),
        int(prepared.config.imgsz or side),
        prepared.info.describe(),
    )


def _label_names_for(model_names: Sequence[str], data_names: Sequence[str]) -> list[str]:
    """Model label names as the dataset spells them; a model with only placeholder names
    (``class_0``...) and the dataset's class count is taken in the dataset's order."""
    if not set(data_names) <= set(model_names):
        generic = all(n == f"class_{i}" for i, n in enumerate(model_names))
        if generic and len(model_names) == len(data_names):
            logger.warning(
                "the model has no class names; taking them in the dataset's order (%s)",
                ", ".join(data_names),
            )
            return list(data_names)
        missing = [n for n in data_names if n not in model_names]
        raise ValueError(
            f"the model has no class {missing[0]!r} of the dataset (model classes: "
            f"{', '.join(model_names[:10])}{'...' if len(model_names) > 10 else ''})"
        )
    return list(model_names)


def cmd_release(args: argparse.Namespace) -> int:
    """``finestream release``: see ``dfine.train.release``."""
    from dfine.checkpoint import CheckpointError
    from dfine.train.release import release_checkpoint

    try:
        released = release_checkpoint(args.source, args.target, fp16=not args.fp32)
    except CheckpointError as exc:
        print(f"finestream: error: {exc}", file=sys.stderr)
        return 2
    meta = released["finestream"]
    print(
        f"{args.target}: {meta['weights']} weights of step {meta['steps']}, {meta['dtype']}, "
        f"{len(released['class_names'])} classes, trained at {meta['imgsz']}, "
        f"{args.target.stat().st_size / 1e6:.1f} MB"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dfine.train.datasets import load_dataset
    from dfine.train.evaluate import evaluate_predictor

    _quiet_libraries(getattr(args, "verbose", False))
    if args.imgsz is not None and (args.imgsz < 32 or args.imgsz % 32):
        raise ValueError(f"--imgsz {args.imgsz}: must be a multiple of 32, e.g. 320 or 640")
    if args.batch < 1 or args.workers < 0:
        raise ValueError("--batch must be >= 1 and --workers >= 0")
    dataset = load_dataset(args.data, args.images, None, 0.0 if args.all else args.val_fraction)
    samples = list(dataset.train) + list(dataset.val) if args.all else list(dataset.val)
    if not samples:
        raise ValueError(f"{args.data}: the val split is empty; pass --all to evaluate every image")
    predict, model_names, side, described = make_eval_predictor(
        args.model, args.backend, args.imgsz, args.device
    )
    label_names = _label_names_for(model_names, dataset.class_names)
    print(f"evaluating {described} at {side}x{side} on {len(samples)} images", file=sys.stderr)
    result = evaluate_predictor(
        predict,
        samples,
        list(dataset.class_names),
        imgsz=side,
        batch=args.batch,
        workers=args.workers,
        label_names=label_names,
    )
    print(result.format_table())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    **result.to_json(),
                    "model": str(args.model),
                    "data": str(args.data),
                    "imgsz": side,
                },
                indent=2,
            )
        )
    return EXIT_OK
