"""Training settings: plain frozen dataclasses, one per concern, validated on construction.

``pipeline.train_config`` fills them from a YAML file (unknown keys refused by full path) and
the CLI puts its flags on top; the trainer receives them as they are. Nothing here reads files
or imports the pipeline.

The defaults are the official D-FINE-N COCO recipe (``configs/dfine/dfine_hgnetv2_n_coco.yml``
over ``include/optimizer.yml``) except for the batch, learning rates and warm-up, which are
scaled for a batch of 8 on one machine; ``configs/train_{n,s,m,l,x}.yaml`` give every size's
recipe and explain the scaling.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path


class Schedule(str, enum.Enum):
    """The learning-rate curve after the linear warm-up."""

    FLAT = "flat"  # the official recipe: constant (MultiStepLR with a milestone never reached)
    COSINE = (
        "cosine"  # flat for ``flat_fraction`` of the steps, then cosine down to ``min_lr_ratio``
    )


class Amp(str, enum.Enum):
    """Mixed precision of the forward pass (CUDA only; the loss is always float32)."""

    OFF = "off"
    BF16 = "bf16"
    FP16 = "fp16"  # with a GradScaler


class TrainDevice(str, enum.Enum):
    AUTO = "auto"  # CUDA when available
    CPU = "cpu"
    CUDA = "cuda"


# The official per-size configs group parameters by regular expressions over their names
# (``re.search``); each group overrides the optimiser's lr and/or weight decay, the rest get the
# defaults. These are the N/S/M expressions; L and X use only the first and a variant of the third.
BACKBONE_NO_NORM = r"^(?=.*backbone)(?!.*norm|bn).*$"
BACKBONE_NORM = r"^(?=.*backbone)(?=.*norm|bn).*$"
ENC_DEC_NORM_BIAS = r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$"


@dataclass(frozen=True)
class ParamGroupSettings:
    """Parameters whose names match ``pattern`` (``re.search``); ``None`` keeps the default."""

    pattern: str
    lr: float | None = None
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        import re

        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(
                f"pattern {self.pattern!r} is not a regular expression ({exc})"
            ) from None
        if self.lr is not None and self.lr < 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


def default_param_groups() -> tuple[ParamGroupSettings, ...]:
    """The official N/S/M groups at this file's default lrs (backbone at half the lr)."""
    return (
        ParamGroupSettings(BACKBONE_NO_NORM, lr=1e-4),
        ParamGroupSettings(BACKBONE_NORM, lr=1e-4, weight_decay=0.0),
        ParamGroupSettings(ENC_DEC_NORM_BIAS, weight_decay=0.0),
    )


@dataclass(frozen=True)
class OptimSettings:
    """AdamW, its parameter groups, the lr curve, clipping and accumulation.

    Attributes:
        lr: the default learning rate (encoder, decoder), reached at the end of the warm-up.
        weight_decay: AdamW's decoupled weight decay of the default group.
        betas: AdamW's (beta1, beta2).
        param_groups: per-name overrides (backbone lr, no decay on norms/biases), in order.
        warmup_steps: optimiser steps of the linear warm-up (factor ``min(1, (s + 1) / n)``).
        schedule: the curve after the warm-up.
        flat_fraction: cosine only: share of all steps kept flat before the decay starts.
        min_lr_ratio: cosine only: the final lr as a fraction of each group's lr.
        clip_max_norm: gradient clipping by total norm; 0 turns it off.
        accumulate: batches whose gradients are summed (averaged) per optimiser step.
    """

    lr: float = 2e-4
    weight_decay: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    param_groups: tuple[ParamGroupSettings, ...] = field(default_factory=default_param_groups)
    warmup_steps: int = 500
    schedule: Schedule = Schedule.FLAT
    flat_fraction: float = 0.5
    min_lr_ratio: float = 0.05
    clip_max_norm: float = 0.1
    accumulate: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", Schedule(self.schedule))
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.flat_fraction <= 1.0:
            raise ValueError(f"flat_fraction must be in [0, 1], got {self.flat_fraction}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.clip_max_norm < 0:
            raise ValueError(
                f"clip_max_norm must be >= 0 (0 turns clipping off), got {self.clip_max_norm}"
            )
        if self.accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {self.accumulate}")


@dataclass(frozen=True)
class EmaSettings:
    """Exponential moving average of the weights, with the official warm-up of its decay:
    ``decay * (1 - exp(-updates / warmups))`` (small early, so the average follows the fast
    changes of the first steps)."""

    enabled: bool = True
    decay: float = 0.9999
    warmups: int = 1000
    start: int = 0  # optimiser steps before the first update

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.warmups < 1:
            raise ValueError(f"warmups must be >= 1, got {self.warmups}")
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")


@dataclass(frozen=True)
class DataSettings:
    """What to train on and how the batches are made.

    Attributes:
        data: COCO annotations JSON or YOLO ``data.yaml``.
        images: image folder of a COCO file when images are not relative to it.
        val_data: a separate validation set; ``None`` splits ``val_fraction`` off ``data``.
        val_fraction: share of ``data`` held out for validation when there is no ``val_data``.
        imgsz: side of the square training and validation input (multiple of 32).
        batch: images per batch (per optimiser step: ``batch * optim.accumulate``).
        workers: data loader processes; 0 loads in the training process.
        multiscale: random input sizes around ``imgsz`` per batch (until ``no_aug_epochs``).
        no_aug_epochs: the last epochs run without the heavy augmentations and multi-scale
            (the official ``stop_epoch`` policy: 120 of 132 epochs for N, i.e. 12 left).
    """

    data: Path | None = None
    images: Path | None = None
    val_data: Path | None = None
    val_fraction: float = 0.1
    imgsz: int = 640
    batch: int = 8
    workers: int = 2
    multiscale: bool = False
    no_aug_epochs: int = 0

    def __post_init__(self) -> None:
        for name in ("data", "images", "val_data"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 64 <= self.imgsz <= 4096 or self.imgsz % 32:
            raise ValueError(f"imgsz must be a multiple of 32 in [64, 4096], got {self.imgsz}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.no_aug_epochs < 0:
            raise ValueError(f"no_aug_epochs must be >= 0, got {self.no_aug_epochs}")


@dataclass(frozen=True)
class CheckpointSettings:
    """When ``last.pth`` is written during an epoch (it is also written at each epoch's end)."""

    every_steps: int = 50  # 0: only at epoch ends
    every_s: float = 120.0  # 0: no time trigger

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.every_s < 0:
            raise ValueError("every_steps and every_s must be >= 0 (0 turns the trigger off)")


@dataclass(frozen=True)
class TrainSettings:
    """One training run.

    Attributes:
        size: D-FINE size, "n" … "x".
        epochs: passes over the training set.
        max_steps: stop after this many optimiser steps (benchmarks, smoke runs); ``None``: all.
        seed: seeds torch, numpy, Python and the data order/augmentation.
        device: where to train.
        amp: mixed precision on CUDA (ignored on the CPU, with a log line).
        num_denoising: contrastive denoising queries (the official 100); 0 turns them off.
        val_every: validate every this many epochs (and after the last); 0: never.
        out: the run folder (``last.pth``, ``best.pth``, ``metrics.csv``, plots).
        init_from: ``--from``: start from these weights (whatever fits).
        resume: continue the run in ``out`` from its ``last.pth``.
    """

    size: str = "n"
    epochs: int = 72
    max_steps: int | None = None
    seed: int = 0
    device: TrainDevice = TrainDevice.AUTO
    amp: Amp = Amp.BF16
    num_denoising: int = 100
    val_every: int = 1
    out: Path = Path("runs/train")
    init_from: Path | None = None
    resume: bool = False
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    ema: EmaSettings = field(default_factory=EmaSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", TrainDevice(self.device))
        object.__setattr__(self, "amp", Amp(self.amp))
        if not isinstance(self.out, Path):
            object.__setattr__(self, "out", Path(self.out))
        if self.init_from is not None and not isinstance(self.init_from, Path):
            object.__setattr__(self, "init_from", Path(self.init_from))
        if self.size not in ("n", "s", "m", "l", "x"):
            raise ValueError(f"size must be one of n, s, m, l, x, got {self.size!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.num_denoising < 0:
            raise ValueError(f"num_denoising must be >= 0, got {self.num_denoising}")
        if self.val_every < 0:
            raise ValueError(f"val_every must be >= 0, got {self.val_every}")
        if self.resume and self.init_from is not None:
            raise ValueError(
                "resume and init_from (--from) exclude each other: resume continues "
                "the run's own last.pth"
            )
