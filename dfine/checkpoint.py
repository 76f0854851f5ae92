"""Loading official D-FINE checkpoints (and fine-tuned ones) into ``build_model`` networks.

Accepted layouts: the official trainer checkpoint (``{"ema": {"module": sd}, "model": sd, ...}``),
one with only ``"model"``, one with only ``"ema"``, or a bare state dict. The EMA weights are
preferred when present, as in the official inference and export scripts. Keys must match
exactly; a file that does not fit the model raises one ``CheckpointError`` line that says what
the file seems to hold (size and class count, read from tensor shapes) and what the model is.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dfine.hgnetv2 import HGNETV2_VARIANTS
from dfine.model import SIZES

logger = logging.getLogger(__name__)

_STEM1 = "backbone.stem.stem1.conv.weight"
_STEM4 = "backbone.stem.stem4.conv.weight"
_ENC_PROJ0 = "encoder.input_proj.0.conv.weight"
_CLASS_HEAD = "decoder.enc_score_head.weight"
_DEC_LAYER = re.compile(r"^decoder\.decoder\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded into the given model (message: one line)."""


@dataclass(frozen=True)
class Signature:
    """What tensor shapes say about a D-FINE state dict."""

    stem: tuple[int, int]  # stem1 and stem4 output channels: identify the HGNetv2 variant
    encoder_proj: tuple[int, int]  # (encoder width, first backbone map's channels)
    num_decoder_layers: int
    num_classes: int | None

    def size_name(self) -> str | None:
        """The official size ("n".."x") with this architecture, or None."""
        for name, cfg in SIZES.items():
            stem = HGNETV2_VARIANTS[cfg.backbone].stem_channels
            if (
                self.stem == (stem[1], stem[2])
                and self.encoder_proj == (cfg.encoder_dim, cfg.backbone_channels[0])
                and self.num_decoder_layers == cfg.num_layers
            ):
                return name
        return None

    def describe(self) -> str:
        size = self.size_name()
        what = (
            f"D-FINE-{size.upper()}"
            if size
            else (
                f"an unknown D-FINE variant (backbone stem {self.stem[0]}/{self.stem[1]} channels, "
                f"encoder {self.encoder_proj[0]} wide, {self.num_decoder_layers} decoder layers)"
            )
        )
        classes = "an unknown number of" if self.num_classes is None else str(self.num_classes)
        return f"{what} with {classes} classes"


def state_dict_signature(state: Mapping[str, torch.Tensor]) -> Signature | None:
    """Read the architecture from a state dict's shapes; None if it is not a D-FINE one."""
    try:
        stem = (int(state[_STEM1].shape[0]), int(state[_STEM4].shape[0]))
        proj = state[_ENC_PROJ0].shape
    except (KeyError, AttributeError, IndexError):
        return None
    layers = {int(m.group(1)) for k in state if (m := _DEC_LAYER.match(k))}
    head = state.get(_CLASS_HEAD)
    classes = int(head.shape[0]) if isinstance(head, torch.Tensor) and head.dim() == 2 else None
    return Signature(stem, (int(proj[0]), int(proj[1])), len(layers), classes)


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def extract_state_dict(checkpoint: object, source: str) -> tuple[Mapping[str, torch.Tensor], str]:
    """The model weights in a loaded checkpoint, EMA first, and which entry they came from.

    Raises:
        CheckpointError: no state dict in any known place.
    """
    if isinstance(checkpoint, Mapping):
        ema = checkpoint.get("ema")
        if isinstance(ema, Mapping) and _is_state_dict(ema.get("module")):
            return ema["module"], "ema.module"
        if _is_state_dict(checkpoint.get("model")):
            return checkpoint["model"], "model"
        if _is_state_dict(checkpoint):
            return checkpoint, "state dict"
        keys = ", ".join(sorted(str(k) for k in checkpoint)[:8]) or "none"
        raise CheckpointError(
            f"{source} holds no model weights (expected 'ema.module' or 'model' state dicts, "
            f"found top-level keys: {keys})"
        )
    raise CheckpointError(
        f"{source} holds a {type(checkpoint).__name__}, not a checkpoint dict with model weights"
    )


# Buffers whose shape depends on the training resolution; the decoder takes them as saved.
_RESOLUTION_BUFFERS = ("decoder.anchors", "decoder.valid_mask")


def _key_problems(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """A one-line summary of key and shape mismatches, empty if the state dict fits.

    Checked before loading so that a bad file leaves the model untouched.
    """
    missing = [k for k in expected if k not in state]
    # Frozen batch norms accept (and drop) the counter an ordinary one saves.
    unexpected = [
        k
        for k in state
        if k not in expected
        and not (
            k.endswith(".num_batches_tracked") and k.rsplit(".", 1)[0] + ".running_mean" in expected
        )
    ]
    mismatched = [
        k
        for k in expected
        if k in state
        and k not in _RESOLUTION_BUFFERS
        and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
    if mismatched:
        k = mismatched[0]
        parts.append(
            f"{len(mismatched)} tensors of another shape (first: {k} is {tuple(state[k].shape)}, "
            f"model has {tuple(expected[k].shape)})"
        )
    return ", ".join(parts)


def _model_description(model: nn.Module) -> str:
    sig = state_dict_signature(model.state_dict())
    return sig.describe() if sig else f"a {type(model).__name__}"


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a D-FINE checkpoint into ``model`` (from ``build_model``), strictly.

    Args:
        model: the network, on any device (weights are copied to it).
        path: a ``.pth`` file saved by the official trainer, or a bare state dict.

    Raises:
        CheckpointError: the file is missing, not a torch file, holds no weights, or holds
            weights of another size or class count (the message names both).
    """
    path = Path(path)
    source = f"checkpoint {str(path)!r}"
    if getattr(model, "deployed", False):  # DFINE.deploy() folded the norms its keys name
        raise CheckpointError(
            f"cannot load {source}: the model is deployed; load it before calling deploy()"
        )
    if not path.is_file():
        raise CheckpointError(f"{source} does not exist or is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    # On arbitrary bytes the weights-only unpickler fails with whatever error the garbage
    # provokes (UnpicklingError, KeyError, EOFError, RuntimeError...), so all are caught.
    except Exception as exc:
        first_line = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"
        raise CheckpointError(
            f"{source} is not a PyTorch checkpoint readable with weights_only=True ({first_line})"
        ) from exc

    state, entry = extract_state_dict(checkpoint, source)
    wanted = state_dict_signature(model.state_dict())
    found = state_dict_signature(state)
    if found is None:
        raise CheckpointError(
            f"{source} is not a D-FINE checkpoint (its '{entry}' weights lack the HGNetv2/encoder keys)"
        )
    if wanted is not None and found != wanted:
        hint = ""
        size = found.size_name()
        if size is not None and found.num_classes is not None:
            hint = f"; use build_model({size!r}, num_classes={found.num_classes})"
        raise CheckpointError(
            f"{source} is for {found.describe()}, model is {wanted.describe()}{hint}"
        )

    problems = _key_problems(model.state_dict(), state)
    if problems:
        raise CheckpointError(
            f"{source} ('{entry}') does not match {_model_description(model)}: {problems}"
        )
    model.load_state_dict(state, strict=True)
    logger.info("loaded %s from %s (%s)", entry, path, found.describe())


def build_and_load(
    size: str, num_classes: int, path: str | Path | None, *, seed: int = 0
) -> nn.Module:
    """The one build-and-load routine: the network of ``size`` with ``path``'s weights, in eval
    mode; ``path=None`` gives random weights drawn with ``seed`` (the caller's random stream is
    left as it was).

    Raises:
        CheckpointError: see :func:`load_checkpoint`.
    """
    from dfine.model import build_model

    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_model(size, num_classes=num_classes).eval()
    model = build_model(size, num_classes=num_classes)
    load_checkpoint(model, path)
    return model.eval()
