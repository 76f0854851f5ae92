"""ONNX export of D-FINE with its postprocessor inside the graph (a "deploy" export).

The exported graph takes ``images`` float32 ``(B, 3, H, W)`` in [0, 1] and
``orig_target_sizes`` int64 ``(B, 2)`` = (width, height) of the original frames, and gives
``labels`` int64 ``(B, K)``, ``boxes`` float32 ``(B, K, 4)`` xyxy in original pixels (not
clipped) and ``scores`` float32 ``(B, K)`` sorted descending — the same interface as the official
export, so the ONNX Runtime and TensorRT backends run either. H and W are fixed at export (the
anchors are computed for them); the batch axis is dynamic unless asked otherwise.

With ``edge_std=True`` (``finestream export --edge-std``) the graph has a fourth output,
``edge_std`` float32 ``(B, K, 4)``: each box's left, top, right and bottom edge spread in original
pixels, in the same order as ``boxes`` (``dfine.postprocess.EdgeStdNetwork`` defines it). The
backends find it by name; files without it (the official exports) run as before.

The file's ``metadata_props`` carry ``class_names`` (JSON list), ``num_classes``,
``input_size_hw`` ("H,W") and ``dfine_size``, which the backends read back. An INT8 model of
such a file (``finestream export --int8``) is made from it by ``dfine.quantize``.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from dfine.backends.class_names import resolve_class_names
from dfine.backends.onnx_backend import (
    EDGE_STD_OUTPUT,
    INPUT_NAMES,
    META_CLASS_NAMES,
    META_NUM_CLASSES,
    OUTPUT_NAMES,
)

if TYPE_CHECKING:
    from dfine.model import DFINE

logger = logging.getLogger(__name__)

#: LayerNormalization became an ONNX op in opset 17; below it the norm is spelt out op by op
#: and its sum of squares overflows when TensorRT runs it in FP16.
MIN_OPSET = 17
META_INPUT_SIZE = "input_size_hw"
META_SIZE = "dfine_size"


class DeployModel(nn.Module):
    """The network and its postprocessor as one module: what the ONNX graph computes.

    Args:
        model: a D-FINE network (``dfine.build_model``), in eval mode.
        postprocessor: ``dfine.PostProcessor`` (or any module with the same call).
    """

    def __init__(self, model: nn.Module, postprocessor: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.postprocessor = postprocessor

    def forward(
        self, images: torch.Tensor, orig_target_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``images`` float32 ``(B, 3, H, W)``, ``orig_target_sizes`` int64 ``(B, 2)`` (w, h)
        → ``labels`` ``(B, K)``, ``boxes`` xyxy pixels ``(B, K, 4)``, ``scores`` ``(B, K)``."""
        labels, boxes, scores = self.postprocessor(self.model(images), orig_target_sizes)
        return labels, boxes, scores


class DeployModelWithEdgeStd(nn.Module):
    """:class:`DeployModel` with a fourth output, the boxes' per-edge spreads in pixels.

    Args:
        model: a D-FINE network (``dfine.build_model``), in eval mode.
        postprocessor: ``dfine.PostProcessor`` (its ``forward_with_edge_std`` is used).
    """

    def __init__(self, model: nn.Module, postprocessor: nn.Module) -> None:
        super().__init__()
        # Imported here: dfine.postprocess imports the network parts, this module only the
        # backends' names.
        from dfine.postprocess import EdgeStdNetwork, PostProcessor

        self.network = EdgeStdNetwork(cast("DFINE", model))
        self.postprocessor = cast(PostProcessor, postprocessor)

    def forward(
        self, images: torch.Tensor, orig_target_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`DeployModel.forward`, plus ``edge_std`` ``(B, K, 4)`` pixels (l, t, r, b)."""
        outputs = self.network(images)
        labels, boxes, scores, edge_std = self.postprocessor.forward_with_edge_std(
            outputs, orig_target_sizes
        )
        return labels, boxes, scores, edge_std


def _size_hw(imgsz: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    if h < 32 or w < 32 or h % 32 or w % 32:
        raise ValueError(f"imgsz must be a multiple of 32 (at least 32), got {imgsz}")
    return int(h), int(w)


def export_onnx(
    model: nn.Module,
    postprocessor: nn.Module,
    path: str | Path,
    *,
    imgsz: int | tuple[int, int] = 640,
    opset: int = 17,
    dynamic_batch: bool = True,
    class_names: Sequence[str] | None = None,
    edge_std: bool = False,
) -> Path:
    """Export ``model`` + ``postprocessor`` to a deploy ONNX file and check it.

    Args:
        model: the D-FINE network; put in eval mode (not otherwise changed).
        postprocessor: ``dfine.PostProcessor`` with the model's class count.
        path: the ``.onnx`` file to write (parent folders are made).
        imgsz: input size, ``S`` for SxS or ``(H, W)``; multiples of 32.
        opset: ONNX opset, at least 17.
        dynamic_batch: a dynamic batch axis (else fixed at 1).
        class_names: stored in the metadata; default COCO for 80 classes else ``class_<i>``.
        edge_std: add the ``edge_std`` output (``DeployModelWithEdgeStd``); off by default, so
            the file has exactly the official outputs.

    Returns:
        ``path``, written and passed by ``onnx.checker.check_model``.
    """
    import onnx

    if opset < MIN_OPSET:
        raise ValueError(
            f"opset must be >= {MIN_OPSET} (LayerNormalization; below it FP16 TensorRT engines "
            f"overflow), got {opset}"
        )
    size_hw = _size_hw(imgsz)
    num_classes = int(getattr(postprocessor, "num_classes", 0)) or None
    if num_classes is None:
        raise ValueError("postprocessor has no num_classes; pass a dfine.PostProcessor")
    names = resolve_class_names(num_classes, class_names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    deploy: nn.Module = (
        DeployModelWithEdgeStd(model, postprocessor)
        if edge_std
        else DeployModel(model, postprocessor)
    ).eval()
    output_names = (*OUTPUT_NAMES, EDGE_STD_OUTPUT) if edge_std else OUTPUT_NAMES
    param = next(deploy.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, *size_hw, generator=generator).to(device)
    sizes = torch.tensor([[size_hw[1], size_hw[0]]], dtype=torch.int64, device=device)
    dynamic_axes = {name: {0: "batch"} for name in (*INPUT_NAMES, *output_names)}

    # The legacy TorchScript exporter, not dynamo: on D-FINE it exports in ~3 s against ~26 s,
    # keeps the weights in one file (dynamo writes a separate .data file), and its batch axis
    # stays dynamic from a batch-1 sample (dynamo specialises size-1 dims unless traced with
    # B >= 2). It is also the exporter of the official files, whose ops TensorRT is known to take.
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing turns feature-map sizes into constants: intended, since H and W are fixed.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Strided slices (x[..., ::2]) are left unfolded; ONNX Runtime and TensorRT fold them.
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        # The legacy exporter is chosen knowingly (see above); its deprecation notices would be
        # printed on every export. If a torch release drops it, tests/test_export_onnx.py fails.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            deploy,
            (images, sizes),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes if dynamic_batch else None,
            do_constant_folding=True,
        )

    proto = onnx.load(str(path))
    metadata = {
        META_CLASS_NAMES: json.dumps(names),
        META_NUM_CLASSES: str(num_classes),
        META_INPUT_SIZE: f"{size_hw[0]},{size_hw[1]}",
    }
    size_name = getattr(model, "size", "")
    if isinstance(size_name, str) and size_name:
        metadata[META_SIZE] = size_name
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "finestream"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    logger.info(
        "exported %s: %dx%d, opset %d, %s batch, %d classes%s",
        path,
        *size_hw,
        opset,
        "dynamic" if dynamic_batch else "fixed",
        num_classes,
        ", edge_std output" if edge_std else "",
    )
    return path


def export_from_checkpoint(
    ckpt_path: str | Path,
    size: str | None,
    num_classes: int | None,
    out_path: str | Path,
    imgsz: int | tuple[int, int] = 640,
    opset: int = 17,
    *,
    dynamic_batch: bool = True,
    edge_std: bool = False,
) -> Path:
    """Export a checkpoint with :func:`export_onnx`: its size, class count and class names are
    read from the file (:func:`dfine.model_info.read_model_info`); ``size``/``num_classes``,
    when given, must match it.

    Raises:
        dfine.CheckpointError: not a D-FINE checkpoint, or not of ``size``/``num_classes``.
    """
    import dfine
    from dfine.checkpoint import CheckpointError, build_and_load
    from dfine.model_info import read_model_info

    info = read_model_info(ckpt_path)
    assert info.size is not None  # a checkpoint always says its size
    if size is not None and size != info.size:
        raise CheckpointError(
            f"{ckpt_path} is D-FINE-{info.size.upper()}, not {size!r}; drop --size (the file says it)"
        )
    if num_classes is not None and num_classes != info.num_classes:
        raise CheckpointError(
            f"{ckpt_path} has {info.num_classes} classes, not {num_classes}; drop --num-classes"
        )
    model = build_and_load(info.size, info.num_classes, ckpt_path)
    return export_onnx(
        model,
        dfine.PostProcessor(num_classes=info.num_classes),
        out_path,
        imgsz=imgsz,
        opset=opset,
        dynamic_batch=dynamic_batch,
        class_names=info.class_names,
        edge_std=edge_std,
    )
