"""Small building blocks shared by the backbone, the encoder and the decoder.

Attribute names (``conv``, ``norm``, ``layers``...) follow the official D-FINE state-dict keys,
so that official checkpoints load with strict key matching.
"""

from __future__ import annotations

import enum
import math

import torch
import torch.nn.functional as F
from torch import nn


class Activation(enum.Enum):
    """The activation functions D-FINE uses."""

    RELU = "relu"
    SILU = "silu"
    GELU = "gelu"
    IDENTITY = "identity"

    def make(self) -> nn.Module:
        """A new module computing this activation."""
        if self is Activation.RELU:
            return nn.ReLU()
        if self is Activation.SILU:
            return nn.SiLU()
        if self is Activation.GELU:
            return nn.GELU()
        return nn.Identity()


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine terms are buffers, not parameters.

    The L and X backbones are trained with frozen norms; their checkpoints hold these four
    tensors per norm and no ``num_batches_tracked``, and the official parameter counts leave
    them out, so they must be buffers here too.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A backbone saved with ordinary BatchNorm has this counter; it means nothing frozen.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class ConvNorm(nn.Module):
    """Conv2d (no bias) → BatchNorm2d → activation; the encoder's basic unit.

    Padding defaults to ``(kernel_size - 1) // 2`` ("same" for odd kernels at stride 1).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        padding: int | None = None,
        act: Activation = Activation.IDENTITY,
    ) -> None:
        super().__init__()
        pad = (kernel_size - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=pad, groups=groups, bias=False
        )
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = act.make()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (none after the last)."""

    layers: nn.ModuleList

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    @property
    def last(self) -> nn.Linear:
        """The output layer (zero-initialised by several heads)."""
        layer = self.layers[-1]
        assert isinstance(layer, nn.Linear)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


def bias_for_prior(prior_prob: float) -> float:
    """The logit bias that makes a sigmoid output ``prior_prob`` at initialisation."""
    return -math.log((1.0 - prior_prob) / prior_prob)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clipped to [0, 1] and both odds terms to at least ``eps``."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` cx, cy, w, h → x1, y1, x2, y2 (same units)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` x1, y1, x2, y2 → cx, cy, w, h (same units)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)
