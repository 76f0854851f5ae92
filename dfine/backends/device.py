"""The one device enum of the app, and what it means on this machine.

``cuda`` without a GPU is an error wherever it is resolved (the preprocessor, every backend),
never a silent fall-back to the CPU; ``auto`` is CUDA when torch sees a GPU, else the CPU.
"""

from __future__ import annotations

import enum

import torch


class Device(str, enum.Enum):
    AUTO = "auto"  # CUDA when torch sees a GPU, else the CPU
    CPU = "cpu"
    CUDA = "cuda"


def resolve_device(device: Device | str, *, cuda_available: bool | None = None) -> torch.device:
    """The torch device ``device`` stands for here.

    Args:
        device: a ``Device`` or its value.
        cuda_available: whether a GPU is usable; ``None`` asks torch.

    Raises:
        ValueError: ``cuda`` asked for and no GPU (one line with the fix), or an unknown value.
    """
    try:
        device = Device(device)
    except ValueError:
        choices = ", ".join(d.value for d in Device)
        raise ValueError(f"device must be one of {choices}, got {device!r}") from None
    has_cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if device is Device.AUTO:
        return torch.device("cuda" if has_cuda else "cpu")
    if device is Device.CUDA and not has_cuda:
        raise ValueError("device is 'cuda' but torch sees no GPU; use --device auto or cpu")
    return torch.device(device.value)
