"""The contract every inference backend (torch, ONNX Runtime, TensorRT) fulfils.

A backend holds a loaded D-FINE model with its postprocessor and answers detections for a
batch of preprocessed images. The inference stage depends on this protocol only.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


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
