"""Turn a training checkpoint into the file one ships: EMA weights only, optionally FP16.

A ``last.pth``/``best.pth`` of the trainer carries the weights twice (``model`` and
``ema.module``), the optimizer's two moments and the RNG states: four times what inference needs.
The release keeps the official trainer layout that every loader understands (weights under
``model``; the official tools and ``dfine.load_checkpoint`` read that key) plus what finestream
reads from a model file: ``class_names`` and the training input side (``finestream.imgsz``).
Without an optimizer it is not resumable, by design; ``--from`` starts a new run from it.

    finestream release RUN_DIR/best.pth model.pth [--fp32]
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from dfine.train.checkpointing import atomic_save, read_checkpoint


def release_checkpoint(source: Path, target: Path, *, fp16: bool = True) -> dict[str, Any]:
    """Write ``target`` from the training checkpoint ``source``; returns what was written.

    The EMA weights are taken when the run kept an EMA (what validation scored), else the raw
    ones. FP16 halves the file; floating tensors only (counters stay integers). Loaders cast the
    weights back to the model's FP32 parameters.

    Raises:
        CheckpointError: ``source`` is not a finestream training checkpoint.
    """
    checkpoint = read_checkpoint(Path(source))
    ema = checkpoint.get("ema")
    has_ema = isinstance(ema, dict) and isinstance(ema.get("module"), dict)
    state = ema["module"] if has_ema else checkpoint["model"]
    if fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    progress = checkpoint.get("finestream", {})
    released: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "last_epoch": checkpoint.get("last_epoch", -1),
        "model": state,
        "class_names": list(checkpoint.get("class_names", [])),
        "finestream": {
            "imgsz": progress.get("imgsz"),
            "size": progress.get("size"),
            "steps": progress.get("step"),
            "weights": "ema" if has_ema else "model",
            "dtype": "float16" if fp16 else "float32",
            "released_from": Path(source).name,
        },
    }
    atomic_save(released, Path(target))
    return released
