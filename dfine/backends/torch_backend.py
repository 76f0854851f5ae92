"""D-FINE in PyTorch eager mode, on the CPU or a CUDA GPU (optionally FP16 and CUDA graphs).

FP16 uses autocast rather than ``.half()``: autocast keeps LayerNorm, softmax and the other
reductions in FP32 (DETR-family models lose their detections when the norms run in FP16), and
the postprocessor (sigmoid, top-k over all query×class scores) runs on FP32 logits outside it,
so near-tied scores are ordered as in FP32.

CUDA graphs (optional) replay one captured forward per batch size from static input buffers;
the capture happens on the first call of each batch size, after warm-up passes that fill the
model's per-size caches (anchors) so that no host work is captured.

Every call also computes the boxes' per-edge spreads (``dfine.postprocess.EdgeStdNetwork``: the
same decoder steps, keeping the last layer's distributions); ``detect`` returns them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn

from dfine.backends.base import BackendOutput
from dfine.backends.class_names import resolve_class_names
from dfine.backends.onnx_backend import check_inputs

if TYPE_CHECKING:
    from dfine.model import DFINE
    from dfine.postprocess import PostProcessor

logger = logging.getLogger(__name__)

_WARMUP_PASSES = 3


@dataclass
class _Graph:
    """One captured forward: write the static inputs, replay, read the static outputs."""

    graph: torch.cuda.CUDAGraph
    images: torch.Tensor
    sizes: torch.Tensor
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class TorchBackend:
    """A :class:`~dfine.backends.base.DetectorBackend` over a D-FINE ``nn.Module``.

    Args:
        model: the network (``dfine.build_model``), weights loaded; moved to ``device`` and put
            in eval mode.
        postprocessor: ``dfine.PostProcessor`` for the model's class count.
        input_size_hw: (H, W) of the images the caller passes (multiples of 32).
        device: "cpu", "cuda" or "cuda:<i>".
        fp16: autocast to FP16 (CUDA only); norms and the postprocessor stay FP32.
        cuda_graphs: capture and replay CUDA graphs (CUDA only).
        class_names: names per label; default COCO for 80 classes, else ``class_<i>``.
        intra_op_threads: if given, calls ``torch.set_num_threads`` — a process-wide setting
            that also changes every other torch user in this process.
    """

    def __init__(
        self,
        model: nn.Module,
        postprocessor: nn.Module,
        *,
        input_size_hw: tuple[int, int] = (640, 640),
        device: str | torch.device = "cpu",
        fp16: bool = False,
        cuda_graphs: bool = False,
        class_names: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} asked for but torch sees no CUDA GPU; use 'cpu'"
            )
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {str(device)!r}")
        if (fp16 or cuda_graphs) and self.device.type != "cuda":
            raise ValueError(
                f"fp16={fp16} and cuda_graphs={cuda_graphs} need a CUDA device, got {self.device}"
            )
        h, w = input_size_hw
        if h < 32 or w < 32 or h % 32 or w % 32:
            raise ValueError(f"input_size_hw must be multiples of 32, got {input_size_hw}")
        if intra_op_threads is not None:
            if intra_op_threads < 1:
                raise ValueError(f"intra_op_threads must be >= 1 or None, got {intra_op_threads}")
            torch.set_num_threads(intra_op_threads)

        self.input_size_hw: tuple[int, int] = (int(h), int(w))
        self.fp16 = fp16
        self.cuda_graphs = cuda_graphs
        self._model = model.to(self.device).eval()
        from dfine.postprocess import EdgeStdNetwork

        self._network = EdgeStdNetwork(cast("DFINE", self._model)).eval()
        #: the torch backend always gives ``edge_std_px`` (``detect``).
        self.provides_edge_std = True
        self._postprocessor = cast("PostProcessor", postprocessor.to(self.device).eval())
        num_classes = int(getattr(postprocessor, "num_classes", 0)) or len(class_names or ())
        if num_classes < 1:
            raise ValueError("postprocessor has no num_classes; pass a dfine.PostProcessor")
        self.class_names: list[str] = resolve_class_names(num_classes, class_names)
        self._graphs: dict[int, _Graph] = {}
        logger.info(
            "torch: %s on %s, input %dx%d%s%s",
            type(model).__name__,
            self.device,
            *self.input_size_hw,
            ", fp16 autocast" if fp16 else "",
            ", CUDA graphs" if cuda_graphs else "",
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        size: str,
        num_classes: int = 80,
        *,
        input_size_hw: tuple[int, int] = (640, 640),
        device: str | torch.device = "cpu",
        fp16: bool = False,
        cuda_graphs: bool = False,
        class_names: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
    ) -> TorchBackend:
        """Build the network of ``size``, load ``path`` (raises ``dfine.CheckpointError`` on a
        wrong file) and wrap it."""
        import dfine
        from dfine.checkpoint import build_and_load

        model = build_and_load(size, num_classes, path)
        # Drop the decoder layers the output never reads (load first: strict keys need them).
        model.deploy()
        return cls(
            model,
            dfine.PostProcessor(num_classes=num_classes),
            input_size_hw=input_size_hw,
            device=device,
            fp16=fp16,
            cuda_graphs=cuda_graphs,
            class_names=class_names,
            intra_op_threads=intra_op_threads,
        )

    def _forward(
        self, images: torch.Tensor, sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fp16:
            # No autocast weight cache under CUDA graphs: cached casts would be captured once
            # and freed behind the graph's back.
            with torch.autocast("cuda", dtype=torch.float16, cache_enabled=not self.cuda_graphs):
                outputs = self._network(images)
        else:
            outputs = self._network(images)
        # The postprocessor on FP32 logits: FP16 sigmoid scores tie far more often.
        outputs = {k: v.float() for k, v in outputs.items()}
        labels, boxes, scores, edge_std = self._postprocessor.forward_with_edge_std(outputs, sizes)
        return labels, boxes, scores, edge_std

    def _capture(self, batch: int) -> _Graph | None:
        h, w = self.input_size_hw
        images = torch.zeros(batch, 3, h, w, device=self.device)
        sizes = torch.full((batch, 2), max(h, w), dtype=torch.int64, device=self.device)
        side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            # Warm-up off the default stream, as torch.cuda.graph requires; it also fills the
            # model's caches so that the captured pass does no host-side work.
            with torch.cuda.stream(side):
                for _ in range(_WARMUP_PASSES):
                    self._forward(images, sizes)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = self._forward(images, sizes)
        except RuntimeError as err:
            logger.warning(
                "CUDA graph capture failed for batch %d (%s); running eagerly",
                batch,
                str(err).splitlines()[0] if str(err) else type(err).__name__,
            )
            return None
        logger.info("captured a CUDA graph for batch %d", batch)
        return _Graph(graph, images, sizes, outputs)

    def __call__(
        self, images: torch.Tensor, orig_sizes_wh: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Detect objects; see :meth:`DetectorBackend.__call__` for the contract.

        Args:
            images: float32 ``(B, 3, H, W)`` in [0, 1], on ``self.device`` (else copied there).
            orig_sizes_wh: int64 ``(B, 2)`` (width, height), on any device.

        Returns:
            ``labels`` int64 ``(B, K)``, ``boxes_xyxy`` float32 ``(B, K, 4)`` in original pixels,
            ``scores`` float32 ``(B, K)``: new host arrays owned by the caller.
        """
        out = self.detect(images, orig_sizes_wh)
        return out.labels, out.boxes_xyxy, out.scores

    def detect(self, images: torch.Tensor, orig_sizes_wh: torch.Tensor) -> BackendOutput:
        """``__call__``'s detections plus ``edge_std_px`` (float32 ``(B, K, 4)`` pixels)."""
        check_inputs(images, orig_sizes_wh, self.input_size_hw)
        with torch.inference_mode():
            images = images.to(self.device, torch.float32)
            sizes = orig_sizes_wh.to(self.device, torch.int64)
            outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
            if self.cuda_graphs:
                batch = int(images.shape[0])
                if batch not in self._graphs:
                    captured = self._capture(batch)
                    if captured is None:
                        self.cuda_graphs = False
                    else:
                        self._graphs[batch] = captured
                graph = self._graphs.get(batch)
                if graph is not None:
                    graph.images.copy_(images)
                    graph.sizes.copy_(sizes)
                    graph.graph.replay()
                    # The static outputs are overwritten by the next replay: copy them out.
                    outputs = graph.outputs
            if outputs is None:
                outputs = self._forward(images, sizes)
            labels, boxes, scores, edge_std = (t.to("cpu") for t in outputs)
        # On the CPU the eager outputs are new tensors per call; from CUDA .to("cpu") copied.
        return BackendOutput(
            labels=labels.numpy().astype(np.int64, copy=False),
            boxes_xyxy=boxes.numpy().astype(np.float32, copy=False),
            scores=scores.numpy().astype(np.float32, copy=False),
            edge_std_px=edge_std.numpy().astype(np.float32, copy=False),
        )
