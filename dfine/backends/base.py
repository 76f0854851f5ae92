"""The contract every inference backend (torch, ONNX Runtime, TensorRT) fulfils.

A backend holds a loaded D-FINE model with its postprocessor and answers detections for a
batch of preprocessed images. The inference stage depends on this protocol only.

``__call__`` gives the three outputs of the official deploy contract; ``detect`` gives
everything the model provides (``BackendOutput``), today also the boxes' per-edge spreads
(``edge_std_px``) when the model has them: the torch backend always, an ONNX file or TensorRT
engine when it has an ``edge_std`` output (``finestream export --edge-std``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class BackendOutput:
    """What one backend call found, host arrays owned by the caller.

    Attributes:
        labels: int64 ``(B, K)``.
        boxes_xyxy: float32 ``(B, K, 4)`` in original-frame pixels (not clipped).
        scores: float32 ``(B, K)``, sorted descending per image.
        edge_std_px: float32 ``(B, K, 4)``, the standard deviation of each box's left, top,
            right and bottom edge in original-frame pixels (``dfine.postprocess.EdgeStdNetwork``
            defines it), same order as ``boxes_xyxy``; ``None`` when the model does not give it.
    """

    labels: np.ndarray
    boxes_xyxy: np.ndarray
    scores: np.ndarray
    edge_std_px: np.ndarray | None = None


class DetectorBackend(Protocol):
    #: (height, width) of the images the model takes.
    input_size_hw: tuple[int, int]
    #: where ``images`` must live when passed in (cpu, or cuda for torch-CUDA and TensorRT).
    device: torch.device
    #: class names, index = label.
    class_names: list[str]

    def __call__(
        self, images: torch.Tensor, orig_sizes_wh: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Detect objects.

        Args:
            images: float32 ``(B, 3, H, W)``, RGB in [0, 1], on ``self.device``;
                (H, W) == ``input_size_hw``.
            orig_sizes_wh: int64 ``(B, 2)``, (width, height) of the original frames; boxes are
                scaled to these.

        Returns:
            ``labels`` int64 ``(B, K)``, ``boxes_xyxy`` float32 ``(B, K, 4)`` in original-frame
            pixels (not clipped), ``scores`` float32 ``(B, K)`` sorted descending per image.
            New host arrays owned by the caller: the next call never overwrites them.
        """
        ...

    def detect(self, images: torch.Tensor, orig_sizes_wh: torch.Tensor) -> BackendOutput:
        """``__call__``'s detections with everything else the model gives (``BackendOutput``)."""
        ...
