"""Exponential moving average of a model's weights, as the official ``ModelEMA``.

After each optimiser step every floating-point entry of the state dict (parameters and
buffers, e.g. BatchNorm statistics) moves towards the model's:
``ema = d * ema + (1 - d) * model`` with ``d = decay * (1 - exp(-updates / warmups))``, so the
average follows the model closely at first and ever more slowly later. Validation and
``best.pth`` use the averaged weights; checkpoints store them as ``{"module": sd, "updates": n}``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


def ema_decay(updates: int, decay: float, warmups: int) -> float:
    """The decay used for update number ``updates`` (1-based)."""
    return decay * (1.0 - math.exp(-updates / warmups))


class ModelEma:
    """An averaged copy of ``model`` (eval mode, no gradients) in ``self.module``.

    Args:
        model: the network being trained; copied once here.
        decay: the decay the warm-up tends to.
        warmups: updates over which the decay ramps up (e-folding count).
        start: optimiser steps to skip before the first update.
    """

    def __init__(
        self, model: nn.Module, decay: float = 0.9999, warmups: int = 1000, start: int = 0
    ) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.warmups = warmups
        self.start = start
        self.before_start = 0
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (one optimiser step's worth)."""
        if self.before_start < self.start:
            self.before_start += 1
            return
        self.updates += 1
        d = ema_decay(self.updates, self.decay, self.warmups)
        current = model.state_dict()
        mine, theirs = [], []
        for key, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                mine.append(value)
                theirs.append(current[key].detach())
        # One fused op over all tensors; lerp(a, b, w) = a + w * (b - a) = d * a + (1 - d) * b.
        torch._foreach_lerp_(mine, theirs, 1.0 - d)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"], strict=True)
        self.updates = int(state.get("updates", 0))
        self.before_start = self.start if self.updates else self.before_start
