"""What the app knows about a model file, read once: its kind, class names and input size.

``read_model_info`` opens a ``.pth`` checkpoint (tensor shapes only, memory-mapped: the network
is not built), an ``.onnx`` deploy export (graph and metadata, not an inference session) or a
TensorRT ``.engine`` (its sidecar ``<engine>.json`` or the ``.onnx`` it was built from) and
returns a ``ModelInfo``. The check phase, the inference backends, the sinks' labels and
``finestream export`` all take their class names and input size from it, so they cannot
disagree.

Class names, index = label: a checkpoint's top-level ``class_names`` list (our trainer writes
one) or an ONNX file's ``class_names`` metadata when present; otherwise the 80 COCO names when
the model has 80 classes, else ``class_0``, ``class_1``, ...
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dfine.backends.class_names import resolve_class_names
from dfine.checkpoint import CheckpointError, extract_state_dict, state_dict_signature
from dfine.quantize import is_quantized

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_SUFFIXES", "ENGINE_SUFFIXES", "ModelInfo", "ModelKind", "read_model_info"]

CHECKPOINT_SUFFIXES = (".pth", ".pt")
ENGINE_SUFFIXES = (".engine", ".trt", ".plan")
#: top-level key of a checkpoint written by our trainer: the class names, index = label.
CHECKPOINT_CLASS_NAMES = "class_names"


class ModelKind(str, enum.Enum):
    UNTRAINED = "untrained"  # no file: random weights (demo only)
    CHECKPOINT = "checkpoint"  # .pth, official trainer layout or ours
    ONNX = "onnx"  # a deploy export, ours or the official one
    ENGINE = "engine"  # a serialized TensorRT engine


@dataclass(frozen=True)
class ModelInfo:
    """Facts about one model file.

    Attributes:
        kind: what the file is.
        path: the file; ``None`` for the untrained model.
        class_names: index = label; ``len(class_names)`` is the class count.
        input_size_hw: (H, W) the file is fixed to (ONNX, engine); ``None`` when the file takes
            any multiple of 32 (a checkpoint, the untrained model, an ONNX with dynamic H, W).
        size: the D-FINE size ("n".."x") when the file says (checkpoints), else ``None``.
        trained_side: the square input side the checkpoint was trained at, when our trainer
            wrote it (``finestream.imgsz``); the default input size for such a file.
        int8: an ONNX graph quantised to INT8 (QDQ pairs or integer operators, e.g. from
            ``finestream export --int8``).
    """

    kind: ModelKind
    path: Path | None
    class_names: tuple[str, ...]
    input_size_hw: tuple[int, int] | None = None
    size: str | None = None
    trained_side: int | None = None
    int8: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> str:
        """E.g. ``checkpoint x.pth (D-FINE-N, 80 classes)``."""
        parts = [f"D-FINE-{self.size.upper()}"] if self.size else []
        if self.int8:
            parts.append("int8")
        parts.append(f"{self.num_classes} classes")
        if self.input_size_hw is not None:
            parts.append(f"input {self.input_size_hw[0]}x{self.input_size_hw[1]}")
        where = f" {self.path.name}" if self.path is not None else ""
        return f"{self.kind.value}{where} ({', '.join(parts)})"


def model_kind(path: Path | None) -> ModelKind:
    """The kind of ``path`` from its suffix; ``ValueError`` (one line) for an unknown one."""
    if path is None:
        return ModelKind.UNTRAINED
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        return ModelKind.CHECKPOINT
    if suffix == ".onnx":
        return ModelKind.ONNX
    if suffix in ENGINE_SUFFIXES:
        return ModelKind.ENGINE
    raise ValueError(
        f"model {str(path)!r}: unknown file type {suffix or '(no suffix)'!r}; give a .pth "
        "checkpoint, an .onnx export or a TensorRT .engine"
    )


def read_model_info(
    path: str | Path | None, *, size: str = "n", num_classes: int = 80
) -> ModelInfo:
    """Read what ``path`` says about its model, without building or loading the network.

    Args:
        path: a model file, or ``None`` for the untrained model.
        size: the untrained model's D-FINE size (files say their own).
        num_classes: the untrained model's class count, and an engine's when nothing beside it
            says.

    Raises:
        CheckpointError: the file is missing, unreadable, truncated or not a D-FINE model of
            its kind (one line naming the file and what it seems to be).
        ValueError: an unknown suffix.
    """
    if path is None:
        return ModelInfo(
            ModelKind.UNTRAINED, None, tuple(resolve_class_names(num_classes)), None, size
        )
    path = Path(path)
    kind = model_kind(path)
    if not path.exists():
        raise CheckpointError(f"model file not found: {path} (check --model or model.model)")
    if not path.is_file():
        raise CheckpointError(f"model path is not a file: {path} (give a .pth, .onnx or .engine)")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"model file is empty (0 bytes): {path} (download or export it again)"
        )
    if kind is ModelKind.CHECKPOINT:
        return _checkpoint_info(path)
    if kind is ModelKind.ONNX:
        return _onnx_info(path)
    return _engine_info(path, num_classes)


def _checkpoint_info(path: Path) -> ModelInfo:
    import torch

    source = f"checkpoint {str(path)!r}"
    try:
        # mmap: only the tensors' headers are read, so even D-FINE-X is checked in milliseconds.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as first:
        if "mmap" not in str(first).lower():
            raise _not_a_checkpoint(source, first) from None
        try:  # the legacy (non-zip) format cannot be memory-mapped
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # see _not_a_checkpoint
            raise _not_a_checkpoint(source, exc) from None
    except Exception as exc:  # see _not_a_checkpoint
        raise _not_a_checkpoint(source, exc) from None
    state, entry = extract_state_dict(checkpoint, source)
    signature = state_dict_signature(state)
    if signature is None:
        raise CheckpointError(
            f"{source} is not a D-FINE checkpoint (its '{entry}' weights lack the HGNetv2/encoder "
            "keys); give an official dfine_*_coco.pth or one our trainer wrote"
        )
    size = signature.size_name()
    if size is None:
        raise CheckpointError(
            f"{source} holds {signature.describe()}, not one of the official sizes n..x"
        )
    if signature.num_classes is None:
        raise CheckpointError(f"{source}: its class head is missing; the file is incomplete")
    names: Sequence[str] | None = None
    if isinstance(checkpoint, Mapping):
        listed = checkpoint.get(CHECKPOINT_CLASS_NAMES)
        if listed is not None:
            if not isinstance(listed, (list, tuple)) or not all(isinstance(n, str) for n in listed):
                raise CheckpointError(f"{source}: 'class_names' is not a list of strings")
            if len(listed) != signature.num_classes:
                raise CheckpointError(
                    f"{source}: 'class_names' has {len(listed)} names but the model has "
                    f"{signature.num_classes} classes"
                )
            names = listed
    return ModelInfo(
        ModelKind.CHECKPOINT,
        path,
        tuple(resolve_class_names(signature.num_classes, names)),
        None,
        size,
        _trained_side(checkpoint),
    )


def _trained_side(checkpoint: object) -> int | None:
    """``finestream.imgsz`` of a checkpoint our trainer (or ``dfine.train.release``) wrote."""
    ours = checkpoint.get("finestream") if isinstance(checkpoint, Mapping) else None
    side = ours.get("imgsz") if isinstance(ours, Mapping) else None
    return side if isinstance(side, int) and side > 0 and side % 32 == 0 else None


def _not_a_checkpoint(source: str, exc: BaseException) -> CheckpointError:
    # On arbitrary bytes the weights-only unpickler fails with whatever error the garbage
    # provokes (UnpicklingError, KeyError, EOFError, RuntimeError...), so all are caught.
    detail = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:120]}"
    return CheckpointError(
        f"{source} is not a PyTorch checkpoint readable with weights_only=True ({detail}); "
        "is it complete?"
    )


def _onnx_info(path: Path) -> ModelInfo:
    import onnx

    from dfine.backends.onnx_backend import (
        INPUT_NAMES,
        META_CLASS_NAMES,
        META_NUM_CLASSES,
        OUTPUT_NAMES,
        num_classes_from_model,
    )

    try:
        proto = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(proto)
    except Exception as exc:  # protobuf and the checker raise assorted errors
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise CheckpointError(
            f"{path}: not a readable ONNX model ({first_line}); is the file complete? Export "
            "it again with `finestream export`"
        ) from None
    inputs = {i.name: i for i in proto.graph.input}
    outputs = [o.name for o in proto.graph.output]
    if not set(INPUT_NAMES) <= set(inputs) or not set(OUTPUT_NAMES) <= set(outputs):
        raise CheckpointError(
            f"{path}: not a D-FINE deploy export (inputs {sorted(inputs)}, outputs {outputs}; "
            f"expected inputs {list(INPUT_NAMES)} and outputs {list(OUTPUT_NAMES)}); export "
            "with `finestream export`"
        )
    dims = inputs["images"].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise CheckpointError(f"{path}: input 'images' has rank {len(dims)}, expected 4")
    h, w = (d.dim_value if d.HasField("dim_value") else None for d in dims[2:])
    input_size_hw = (int(h), int(w)) if h and w else None

    meta = {p.key: p.value for p in proto.metadata_props}
    names: list[str] | None = None
    if META_CLASS_NAMES in meta:
        try:
            parsed = json.loads(meta[META_CLASS_NAMES])
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, list):
            raise CheckpointError(f"{path}: metadata 'class_names' is not a JSON list")
        names = [str(n) for n in parsed]
    if names is not None:
        count = len(names)
    elif META_NUM_CLASSES in meta and meta[META_NUM_CLASSES].isdigit():
        count = int(meta[META_NUM_CLASSES])
    else:
        found = num_classes_from_model(proto)
        if found is None:
            logger.warning(
                "%s: cannot tell the class count from the graph; assuming 80 (COCO)", path
            )
            found = 80
        count = found
    size = meta.get("dfine_size") or None
    return ModelInfo(
        ModelKind.ONNX,
        path,
        tuple(resolve_class_names(count, names)),
        input_size_hw,
        size,
        int8=is_quantized(proto),
    )


def _engine_info(path: Path, num_classes: int) -> ModelInfo:
    """An engine holds no metadata TensorRT lets us read without a GPU: the sidecar
    ``<engine>.json`` that ``build_engine`` writes names the classes and the source ONNX; else
    an ``.onnx`` of the same stem beside the engine (what ``trtexec`` was given) is read."""
    sidecar = path.with_name(path.name + ".json")
    data: dict[str, object] = {}
    if sidecar.is_file():
        try:
            loaded = json.loads(sidecar.read_text())
            data = loaded if isinstance(loaded, dict) else {}
        except json.JSONDecodeError as err:
            logger.warning("%s: ignored, not JSON (%s)", sidecar, err)
    onnx_candidates = [Path(str(data["onnx"]))] if isinstance(data.get("onnx"), str) else []
    onnx_candidates.append(path.with_suffix(".onnx"))
    source_onnx = next((p for p in onnx_candidates if p.is_file()), None)
    from_onnx = _onnx_info(source_onnx) if source_onnx is not None else None

    listed = data.get("class_names")
    if isinstance(listed, list):
        names: tuple[str, ...] = tuple(str(n) for n in listed)
    elif from_onnx is not None:
        names = from_onnx.class_names
    else:
        logger.warning(
            "%s: no sidecar %s and no .onnx beside it; assuming %d classes",
            path,
            sidecar.name,
            num_classes,
        )
        names = tuple(resolve_class_names(num_classes))
    size_hw = from_onnx.input_size_hw if from_onnx is not None else None
    return ModelInfo(ModelKind.ENGINE, path, names, size_hw, from_onnx.size if from_onnx else None)
