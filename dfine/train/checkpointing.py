"""Training checkpoints: atomic writes, the official trainer layout, resume and ``--from``.

Layout (what the official ``BaseSolver.state_dict`` writes, plus ours)::

    {"model": sd, "ema": {"module": sd, "updates": n}, "optimizer": ..., "lr_scheduler": ...,
     "lr_warmup_scheduler": ..., "last_epoch": int, "date": iso-8601, "class_names": [str],
     "finestream": {"settings": {...}, "step": int, "epoch": int, "batch_in_epoch": int,
                    "rng": {...}, "history": [...], "best_map50_95": float, ...}}

Every value is a tensor, a number, a string, or a list/dict of these, so the file loads with
``torch.load(weights_only=True)`` — what ``dfine.load_checkpoint`` and ``finestream run`` do.
``last_epoch`` is the last *completed* epoch (-1 before the first), as in the official code.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import logging
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dfine.checkpoint import CheckpointError, extract_state_dict, state_dict_signature

logger = logging.getLogger(__name__)

LAST = "last.pth"
BEST = "best.pth"


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync it, then rename over ``path``.

    A process killed at any moment leaves either the old ``path`` or the new one, never a
    partial file (at worst a stray ``.<name>.<pid>.tmp`` beside it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # The rename itself reaches the disk only once the directory entry is synced.
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def plain(value: Any) -> Any:
    """Settings (dataclasses, enums, paths) as weights-only-loadable plain values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python random states, as tensors and numbers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_checkpoint(
    *,
    model: nn.Module,
    ema_state: dict[str, Any] | None,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    lr_warmup_scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    last_epoch: int,
    class_names: list[str],
    progress: dict[str, Any],
) -> dict[str, Any]:
    """The checkpoint dict (see the module doc); ``progress`` becomes ``finestream``.

    Tensors are the live ones (``torch.save`` copies them); save before the next step.
    """
    checkpoint: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "last_epoch": int(last_epoch),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "lr_warmup_scheduler": lr_warmup_scheduler.state_dict(),
        "class_names": list(class_names),
        "finestream": {**progress, "rng": rng_state()},
    }
    if ema_state is not None:
        checkpoint["ema"] = ema_state
    if scaler is not None:
        checkpoint["scaler"] = scaler.state_dict()
    return checkpoint


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by the trainer (weights only), for resuming.

    Raises:
        CheckpointError: missing, unreadable, or not one of ours (no ``finestream`` entry).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"cannot resume: {path} does not exist (start without --resume, "
            "or point --out at the run folder that holds last.pth)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # arbitrary bytes fail with arbitrary errors, as in dfine.checkpoint
        raise CheckpointError(
            f"cannot resume: {path} is not a readable checkpoint ({type(exc).__name__})"
        ) from exc
    if (
        not isinstance(checkpoint, dict)
        or "finestream" not in checkpoint
        or "optimizer" not in checkpoint
    ):
        raise CheckpointError(
            f"cannot resume from {path}: it is not a finestream training "
            "checkpoint (use --from to start from its weights instead)"
        )
    return checkpoint


# Buffers whose shape follows the input size; the train-mode forward regenerates them.
_RESOLUTION_BUFFERS = ("decoder.anchors", "decoder.valid_mask")


def load_matching_weights(model: nn.Module, path: Path) -> list[str]:
    """``--from``: copy every tensor of ``path`` whose name and shape fit ``model``.

    The rest of ``model`` keeps its initialisation (a class head for another class count, for
    instance). EMA weights are preferred when the file has them, as in the official tuning.

    Returns:
        The names of the model's tensors that were not loaded (missing or another shape).

    Raises:
        CheckpointError: the file is missing, unreadable or holds no weights, or nothing fits.
    """
    path = Path(path)
    source = f"--from {str(path)!r}"
    if not path.is_file():
        raise CheckpointError(f"{source}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{source} is not a PyTorch checkpoint readable with weights_only=True "
            f"({type(exc).__name__})"
        ) from exc
    state, entry = extract_state_dict(checkpoint, source)
    own = model.state_dict()
    theirs, mine = state_dict_signature(state), state_dict_signature(own)
    if theirs is not None and mine is not None and theirs.size_name() != mine.size_name():
        raise CheckpointError(
            f"{source} holds {theirs.describe()}, but this run trains "
            f"{mine.describe()}; pass --size {theirs.size_name() or '?'} (or size: in the config)"
        )
    fitting = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    skipped = [k for k in own if k not in fitting]
    if not fitting:
        raise CheckpointError(
            f"{source}: none of its '{entry}' tensors fits this model "
            "(is it a D-FINE checkpoint of this size?)"
        )
    model.load_state_dict(fitting, strict=False)
    shown = [k for k in skipped if k not in _RESOLUTION_BUFFERS]
    logger.warning(
        "--from %s: loaded %d of %d tensors from '%s'; %d left as initialised%s",
        path,
        len(fitting),
        len(own),
        entry,
        len(shown),
        f": {', '.join(shown)}" if shown else "",
    )
    return skipped
