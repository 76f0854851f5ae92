"""HGNetv2, the backbone of every D-FINE size (B0 for N and S, B2 for M, B4 for L, B5 for X).

Input: float32 ``(B, 3, H, W)`` with H, W multiples of 32. Output: the feature maps of the
stages named in ``return_idx``; stage ``i`` has stride ``4 * 2**i`` (stages 1, 2, 3 → strides
8, 16, 32).

Structure (names follow the official state-dict keys): a stem of five ConvBNAct units that
reaches stride 4, then four stages; each stage optionally halves the resolution with a
depthwise conv and runs HG blocks. An HG block runs ``layer_num`` convs in sequence, concatenates
its input with every conv output and aggregates them with a squeeze (1x1 to out/2) and an
excitation (1x1 to out) conv; all blocks but a stage's first add their input back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dfine.layers import FrozenBatchNorm2d


@dataclass(frozen=True)
class StageSpec:
    """One HGNetv2 stage."""

    in_channels: int
    mid_channels: int
    out_channels: int
    num_blocks: int
    downsample: bool
    light_block: bool
    kernel_size: int
    layer_num: int


@dataclass(frozen=True)
class HGNetv2Spec:
    """Stem channels (in, mid, out) and the four stages of one HGNetv2 variant."""

    stem_channels: tuple[int, int, int]
    stages: tuple[StageSpec, StageSpec, StageSpec, StageSpec]


# The published variants (PaddleClas PP-HGNetV2), as the official D-FINE code defines them.
HGNETV2_VARIANTS: dict[str, HGNetv2Spec] = {
    "B0": HGNetv2Spec(
        (3, 16, 16),
        (
            StageSpec(16, 16, 64, 1, False, False, 3, 3),
            StageSpec(64, 32, 256, 1, True, False, 3, 3),
            StageSpec(256, 64, 512, 2, True, True, 5, 3),
            StageSpec(512, 128, 1024, 1, True, True, 5, 3),
        ),
    ),
    "B1": HGNetv2Spec(
        (3, 24, 32),
        (
            StageSpec(32, 32, 64, 1, False, False, 3, 3),
            StageSpec(64, 48, 256, 1, True, False, 3, 3),
            StageSpec(256, 96, 512, 2, True, True, 5, 3),
            StageSpec(512, 192, 1024, 1, True, True, 5, 3),
        ),
    ),
    "B2": HGNetv2Spec(
        (3, 24, 32),
        (
            StageSpec(32, 32, 96, 1, False, False, 3, 4),
            StageSpec(96, 64, 384, 1, True, False, 3, 4),
            StageSpec(384, 128, 768, 3, True, True, 5, 4),
            StageSpec(768, 256, 1536, 1, True, True, 5, 4),
        ),
    ),
    "B3": HGNetv2Spec(
        (3, 24, 32),
        (
            StageSpec(32, 32, 128, 1, False, False, 3, 5),
            StageSpec(128, 64, 512, 1, True, False, 3, 5),
            StageSpec(512, 128, 1024, 3, True, True, 5, 5),
            StageSpec(1024, 256, 2048, 1, True, True, 5, 5),
        ),
    ),
    "B4": HGNetv2Spec(
        (3, 32, 48),
        (
            StageSpec(48, 48, 128, 1, False, False, 3, 6),
            StageSpec(128, 96, 512, 1, True, False, 3, 6),
            StageSpec(512, 192, 1024, 3, True, True, 5, 6),
            StageSpec(1024, 384, 2048, 1, True, True, 5, 6),
        ),
    ),
    "B5": HGNetv2Spec(
        (3, 32, 64),
        (
            StageSpec(64, 64, 128, 1, False, False, 3, 6),
            StageSpec(128, 128, 512, 2, True, False, 3, 6),
            StageSpec(512, 256, 1024, 5, True, True, 5, 6),
            StageSpec(1024, 512, 2048, 2, True, True, 5, 6),
        ),
    ),
}


class LearnableAffine(nn.Module):
    """``scale * x + bias`` with two learnable scalars (HGNetv2's "lab", used by B0-B3)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0]))
        self.bias = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x + self.bias


class ConvBNAct(nn.Module):
    """Conv (no bias, padding ``(k-1)//2``) → BN → optional ReLU → optional learnable affine.

    The affine only follows an activation, as in the official network.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        use_act: bool = True,
        use_lab: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.act: nn.Module = nn.ReLU() if use_act else nn.Identity()
        self.lab: nn.Module = LearnableAffine() if (use_act and use_lab) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lab(self.act(self.bn(self.conv(x))))


class LightConvBNAct(nn.Module):
    """A 1x1 conv without activation, then a depthwise ``kernel_size`` conv with activation."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, use_lab: bool
    ) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_channels, out_channels, 1, use_act=False, use_lab=use_lab)
        self.conv2 = ConvBNAct(
            out_channels, out_channels, kernel_size, groups=out_channels, use_lab=use_lab
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


def pad_bottom_right(x: torch.Tensor) -> torch.Tensor:
    """``F.pad(x, (0, 1, 0, 1))``: one row and one column of zeros at the bottom and right.

    ``(B, C, H, W)`` → ``(B, C, H + 1, W + 1)``, same dtype and memory format. A channels-last
    input (the deploy form) is padded by writing into a channels-last buffer, since ``F.pad``
    on one is ~4x slower than on a contiguous tensor; traced and exported graphs keep ``F.pad``.
    """
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if not channels_last or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return F.pad(x, (0, 1, 0, 1))
    b, c, h, w = x.shape
    out = x.new_empty((b, h + 1, w + 1, c)).permute(0, 3, 1, 2)
    out[..., h, :] = 0
    out[..., :h, w] = 0
    out[..., :h, :w] = x
    return out


class StemBlock(nn.Module):
    """Stride-4 stem: a stride-2 conv, then a max-pool branch beside a two-conv 2x2 branch."""

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, use_lab: bool
    ) -> None:
        super().__init__()
        self.stem1 = ConvBNAct(in_channels, mid_channels, 3, stride=2, use_lab=use_lab)
        self.stem2a = ConvBNAct(mid_channels, mid_channels // 2, 2, use_lab=use_lab)
        self.stem2b = ConvBNAct(mid_channels // 2, mid_channels, 2, use_lab=use_lab)
        self.stem3 = ConvBNAct(mid_channels * 2, mid_channels, 3, stride=2, use_lab=use_lab)
        self.stem4 = ConvBNAct(mid_channels, out_channels, 1, use_lab=use_lab)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=1, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem1(x)
        # The 2x2 convs and the 2x2 pool keep the size only with one extra row and column
        # of zeros on the bottom/right.
        x = pad_bottom_right(x)
        branch = self.stem2b(pad_bottom_right(self.stem2a(x)))
        pooled = self.pool(x)
        x = torch.cat([pooled, branch], dim=1)
        return self.stem4(self.stem3(x))


class HGBlock(nn.Module):
    """Convs in sequence, all outputs concatenated, squeeze-excitation aggregation."""

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        layer_num: int,
        kernel_size: int,
        residual: bool,
        light_block: bool,
        use_lab: bool,
    ) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.ModuleList()
        for i in range(layer_num):
            c_in = in_channels if i == 0 else mid_channels
            if light_block:
                self.layers.append(LightConvBNAct(c_in, mid_channels, kernel_size, use_lab))
            else:
                self.layers.append(ConvBNAct(c_in, mid_channels, kernel_size, use_lab=use_lab))
        total = in_channels + layer_num * mid_channels
        self.aggregation = nn.Sequential(
            ConvBNAct(total, out_channels // 2, 1, use_lab=use_lab),
            ConvBNAct(out_channels // 2, out_channels, 1, use_lab=use_lab),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [x]
        y = x
        for layer in self.layers:
            y = layer(y)
            outputs.append(y)
        y = self.aggregation(torch.cat(outputs, dim=1))
        return y + x if self.residual else y


class HGStage(nn.Module):
    """Optional depthwise stride-2 downsample, then ``num_blocks`` HG blocks."""

    def __init__(self, spec: StageSpec, use_lab: bool) -> None:
        super().__init__()
        c_in = spec.in_channels
        self.downsample: nn.Module = (
            ConvBNAct(c_in, c_in, 3, stride=2, groups=c_in, use_act=False, use_lab=use_lab)
            if spec.downsample
            else nn.Identity()
        )
        self.blocks = nn.Sequential(
            *(
                HGBlock(
                    c_in if i == 0 else spec.out_channels,
                    spec.mid_channels,
                    spec.out_channels,
                    spec.layer_num,
                    spec.kernel_size,
                    residual=i > 0,
                    light_block=spec.light_block,
                    use_lab=use_lab,
                )
                for i in range(spec.num_blocks)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


def _freeze_batch_norms(module: nn.Module) -> None:
    """Replace every BatchNorm2d below ``module`` by a FrozenBatchNorm2d, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
        else:
            _freeze_batch_norms(child)


class HGNetv2(nn.Module):
    """The HGNetv2 backbone.

    Args:
        variant: one of ``HGNETV2_VARIANTS`` ("B0".."B5").
        return_idx: which stages' outputs to return, e.g. ``(2, 3)`` for strides 16 and 32.
        use_lab: learnable affine after each activation (the N, S and M checkpoints have it).
        freeze_norm: frozen batch norms (buffers, as in the L and X checkpoints).
        freeze_at: -1 trains everything; ``k >= 0`` sets ``requires_grad=False`` on the stem
            and, unless ``freeze_stem_only``, on stages 0..k too (official semantics).
        freeze_stem_only: with ``freeze_at >= 0``, freeze only the stem.
    """

    def __init__(
        self,
        variant: str,
        return_idx: tuple[int, ...] = (1, 2, 3),
        use_lab: bool = False,
        freeze_norm: bool = False,
        freeze_at: int = -1,
        freeze_stem_only: bool = True,
    ) -> None:
        super().__init__()
        if variant not in HGNETV2_VARIANTS:
            raise ValueError(
                f"unknown HGNetv2 variant {variant!r}; valid: {', '.join(HGNETV2_VARIANTS)}"
            )
        spec = HGNETV2_VARIANTS[variant]
        self.variant = variant
        self.return_idx = tuple(return_idx)
        self.out_channels = [spec.stages[i].out_channels for i in self.return_idx]
        self.out_strides = [4 * 2**i for i in self.return_idx]
        self.stem = StemBlock(*spec.stem_channels, use_lab=use_lab)
        self.stages = nn.ModuleList(HGStage(s, use_lab) for s in spec.stages)
        if freeze_at >= 0:
            frozen: list[nn.Module] = [self.stem]
            if not freeze_stem_only:
                frozen += list(self.stages[: freeze_at + 1])
            for part in frozen:
                for param in part.parameters():
                    param.requires_grad_(False)
        if freeze_norm:
            _freeze_batch_norms(self)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` → one ``(B, C_i, H / s_i, W / s_i)`` map per returned stage."""
        x = self.stem(images)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.return_idx:
                outs.append(x)
        return outs
