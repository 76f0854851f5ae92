"""The inference ("deploy") form of the network: norms folded into convolutions, branches merged.

``fuse_network(model)`` rewrites a D-FINE network in place into a form that computes the same
function with fewer operators (``DFINE.deploy`` calls it):

- every ``Conv2d → BatchNorm2d`` (or ``FrozenBatchNorm2d``) pair becomes one ``Conv2d`` with a
  bias: the backbone's ``ConvBNAct``, the encoder's ``ConvNorm``, the input projections;
- HGNetv2's learnable affine ``s * relu(y) + b`` after an activation is folded too: for
  ``s >= 0`` it equals ``max(s * y + b, b)``, so the scale and shift go into the conv and the
  ReLU becomes a clamp at ``b`` — one operator instead of three (a negative ``s``, which no
  trained model is known to have, keeps a separate ReLU and affine);
- each encoder RepVGG block (3x3 conv+BN beside 1x1 conv+BN, summed) becomes a single 3x3 conv
  (the 1x1 kernel sits at the centre of the 3x3 one);
- self-attention runs through ``scaled_dot_product_attention`` without computing the averaged
  attention weights that ``nn.MultiheadAttention`` returns by default and D-FINE discards;
- the stem's 2x2 stride-1 max-pool (``ceil_mode``) becomes two elementwise maxima of shifted
  views: the same values bit for bit, and ~20x faster on a CPU, where torch's pooling kernel for
  that case is a slow generic loop.

The fused modules are inference only: their parameters do not require gradients and their
activations run in place when autograd is off. Weights are combined in float64 and stored in
the dtype of the original conv, so the fused outputs differ from the training form only by
float32 rounding. The state dict changes (``DFINE.deploy`` documents how); load checkpoints
before fusing.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from dfine.encoder import RepVGGBlock
from dfine.hgnetv2 import ConvBNAct, LearnableAffine, StemBlock
from dfine.layers import ConvNorm, FrozenBatchNorm2d

logger = logging.getLogger(__name__)

Norm = nn.BatchNorm2d | FrozenBatchNorm2d


class ClampMin(nn.Module):
    """``max(x, value)``: a ReLU whose following affine ``s * relu(y) + b`` (``s >= 0``) has
    been folded into the conv before it, with ``value = b`` (see the module docstring)."""

    value: torch.Tensor

    def __init__(self, value: float, like: torch.Tensor) -> None:
        super().__init__()
        # A buffer (dtype and device of ``like``), so that the state dict holds it; being
        # 0-dim, it never changes the dtype of the input it clamps.
        self.register_buffer(
            "value", torch.tensor(float(value), dtype=like.dtype, device=like.device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min_(self.value) if _may_work_in_place(x) else torch.clamp_min(x, self.value)


class ReluAffine(nn.Module):
    """``scale * relu(x) + bias`` with fixed scalars: the learnable affine when its scale is
    negative (rare), where it does not fold into a clamp."""

    scale: torch.Tensor
    bias: torch.Tensor

    def __init__(self, scale: float, bias: float, like: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer(
            "scale", torch.tensor(float(scale), dtype=like.dtype, device=like.device)
        )
        self.register_buffer(
            "bias", torch.tensor(float(bias), dtype=like.dtype, device=like.device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _may_work_in_place(x):
            return x.relu_().mul_(self.scale).add_(self.bias)
        return torch.relu(x) * self.scale + self.bias


class InPlace(nn.Module):
    """ReLU / SiLU / GELU / identity, in place on a fresh conv output when autograd is off."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        if not isinstance(act, nn.ReLU | nn.SiLU | nn.GELU | nn.Identity):
            raise ValueError(
                f"cannot fuse activation {type(act).__name__}; expected ReLU, SiLU, GELU or Identity"
            )
        self.kind = type(act).__name__
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "Identity":
            return x
        if _may_work_in_place(x):
            if self.kind == "ReLU":
                return x.relu_()
            if self.kind == "SiLU":
                return F.silu(x, inplace=True)
        return self.act(x)

    def extra_repr(self) -> str:
        return self.kind


class FusedConv(nn.Module):
    """A conv unit with its norm folded in: ``Conv2d`` (with bias) → activation.

    Input and output as the unit it replaces: float ``(B, C_in, H, W)`` →
    ``(B, C_out, H', W')``.
    """

    def __init__(self, conv: nn.Conv2d, act: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class ShiftedMax2x2(nn.Module):
    """``MaxPool2d(kernel_size=2, stride=1)`` as two maxima of shifted views (the same values).

    ``(B, C, H, W)`` → ``(B, C, H - 1, W - 1)``; with stride 1, ``ceil_mode`` changes nothing.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.maximum(x[..., :-1, :], x[..., 1:, :])
        return torch.maximum(rows[..., :-1], rows[..., 1:])


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch first, no dropout) for queries equal to keys, through
    ``scaled_dot_product_attention`` and without the head-averaged weights nobody reads.

    Same parameters and state-dict keys as the module it replaces; queries and keys are
    projected by one matmul since they are the same tensor in every D-FINE layer.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not (mha.batch_first and mha._qkv_same_embed_dim and mha.in_proj_bias is not None):
            raise ValueError(
                "SelfAttention replaces batch-first attention with packed, biased projections only"
            )
        if mha.bias_k is not None or mha.add_zero_attn or mha.dropout:
            raise ValueError("SelfAttention does not support bias_k/v, add_zero_attn or dropout")
        self.num_heads = mha.num_heads
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        need_weights: bool = False,  # nn.MultiheadAttention's signature; never computed here
    ) -> tuple[torch.Tensor, None]:
        """``query`` = ``key`` and ``value`` ``(B, N, C)`` → ``((B, N, C), None)``.

        ``attn_mask`` bool ``(N, N)``, True = blocked (as for ``nn.MultiheadAttention``).
        """
        if key is not query:
            raise ValueError("SelfAttention needs key to be the query tensor itself")
        b, n, c = query.shape
        h = self.num_heads
        qk = F.linear(query, self.in_proj_weight[: 2 * c], self.in_proj_bias[: 2 * c])
        v = F.linear(value, self.in_proj_weight[2 * c :], self.in_proj_bias[2 * c :])
        q, k = qk.reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        v = v.reshape(b, n, h, c // h).transpose(1, 2)
        mask = None if attn_mask is None else ~attn_mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c)), None


def _may_work_in_place(x: torch.Tensor) -> bool:
    # A conv output is a fresh tensor nobody else holds; with autograd on, overwriting it could
    # destroy what backward needs, so only then do the activations allocate. Traced graphs
    # (ONNX export) get the out-of-place ops, which the exporter maps without rewriting.
    if torch.jit.is_tracing():
        return False
    return not torch.is_grad_enabled() or not x.requires_grad


def fold_norm(conv: nn.Conv2d, norm: Norm) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight ``(C_out, C_in / g, k, k)`` and bias ``(C_out,)`` of ``norm(conv(x))``, float64.

    The norm's running statistics are used (eval-mode semantics), whatever its mode.
    """
    weight = conv.weight.detach().double()
    bias = (
        conv.bias.detach().double()
        if conv.bias is not None
        else torch.zeros(conv.out_channels, dtype=torch.float64, device=weight.device)
    )
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError(
            "cannot fold a BatchNorm2d without running statistics (track_running_stats=False)"
        )
    mean = norm.running_mean.detach().double()
    var = norm.running_var.detach().double()
    gamma = norm.weight.detach().double() if norm.weight is not None else torch.ones_like(mean)
    beta = norm.bias.detach().double() if norm.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + norm.eps)
    return weight * scale.reshape(-1, 1, 1, 1), beta + (bias - mean) * scale


def make_conv(template: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A biased conv with ``template``'s geometry and the given (float64) weight and bias,
    stored in ``template``'s dtype and device, not requiring gradients."""
    # skip_init: no random initialisation, which would also advance the caller's RNG.
    conv = nn.utils.skip_init(
        nn.Conv2d,
        template.in_channels,
        template.out_channels,
        template.kernel_size,  # type: ignore[arg-type]
        template.stride,  # type: ignore[arg-type]
        padding=template.padding,  # type: ignore[arg-type]
        dilation=template.dilation,  # type: ignore[arg-type]
        groups=template.groups,
        bias=True,
        padding_mode=template.padding_mode,
        device=template.weight.device,
        dtype=template.weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        assert conv.bias is not None
        conv.bias.copy_(bias)
    conv.requires_grad_(False)
    return conv


def fuse_conv_norm(conv: nn.Conv2d, norm: Norm, act: nn.Module) -> FusedConv:
    """``act(norm(conv(x)))`` as one biased conv followed by ``act`` (in place when allowed)."""
    weight, bias = fold_norm(conv, norm)
    return FusedConv(make_conv(conv, weight, bias), InPlace(act))


def fuse_conv_bn_act(unit: ConvBNAct) -> FusedConv:
    """HGNetv2's conv → BN → ReLU → learnable affine as one conv and one clamp (or ReLU)."""
    assert isinstance(unit.bn, nn.BatchNorm2d | FrozenBatchNorm2d)
    if not isinstance(unit.lab, LearnableAffine):
        return fuse_conv_norm(unit.conv, unit.bn, unit.act)
    weight, bias = fold_norm(unit.conv, unit.bn)
    scale = float(unit.lab.scale.detach().double().item())
    shift = float(unit.lab.bias.detach().double().item())
    if scale < 0:
        return FusedConv(
            make_conv(unit.conv, weight, bias), ReluAffine(scale, shift, unit.conv.weight)
        )
    # s * relu(y) + b = max(s * y + b, b) for s >= 0.
    return FusedConv(
        make_conv(unit.conv, weight * scale, bias * scale + shift),
        ClampMin(shift, unit.conv.weight),
    )


def merge_repvgg(block: RepVGGBlock) -> FusedConv:
    """A RepVGG block (3x3 conv+BN + 1x1 conv+BN, summed, then the activation) as one 3x3 conv."""
    big, small = block.conv1, block.conv2
    ok = (
        big.conv.kernel_size == (3, 3)
        and big.conv.padding == (1, 1)
        and small.conv.kernel_size == (1, 1)
        and small.conv.padding == (0, 0)
        and big.conv.stride == small.conv.stride == (1, 1)
        and big.conv.groups == small.conv.groups == 1
    )
    if not ok:
        raise ValueError(
            "RepVGG merge needs a 3x3 (padding 1) and a 1x1 (padding 0) conv at stride 1, groups 1"
        )
    assert isinstance(big.norm, nn.BatchNorm2d) and isinstance(small.norm, nn.BatchNorm2d)
    w3, b3 = fold_norm(big.conv, big.norm)
    w1, b1 = fold_norm(small.conv, small.norm)
    return FusedConv(make_conv(big.conv, w3 + F.pad(w1, (1, 1, 1, 1)), b3 + b1), InPlace(block.act))


def _fuse_child(child: nn.Module) -> nn.Module | None:
    """The fused replacement of ``child``, or None when it is not a fusable unit."""
    if isinstance(child, RepVGGBlock):
        return merge_repvgg(child)
    if isinstance(child, ConvBNAct):
        return fuse_conv_bn_act(child)
    if isinstance(child, ConvNorm):
        assert isinstance(child.norm, nn.BatchNorm2d)
        return fuse_conv_norm(child.conv, child.norm, child.act)
    if isinstance(child, nn.MultiheadAttention):
        return SelfAttention(child)
    if isinstance(child, nn.MaxPool2d) and _is_stride1_2x2(child):
        return ShiftedMax2x2()
    if isinstance(child, nn.Sequential) and len(child) == 2:
        conv, norm = child[0], child[1]
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d | FrozenBatchNorm2d):
            return fuse_conv_norm(conv, norm, nn.Identity())
    return None


def _is_stride1_2x2(pool: nn.MaxPool2d) -> bool:
    def pair(v: int | tuple[int, ...]) -> tuple[int, ...]:
        return (v, v) if isinstance(v, int) else tuple(v)

    return (
        pair(pool.kernel_size) == (2, 2)
        and pair(pool.stride) == (1, 1)
        and pair(pool.padding) == (0, 0)
        and pair(pool.dilation) == (1, 1)
        and not pool.return_indices
    )


def fuse_network(module: nn.Module) -> int:
    """Replace every fusable unit below ``module`` by its fused form, in place.

    Only the backbone stem's pooling is rewritten among the max-pools (``StemBlock.pool``);
    a second call finds nothing left to fuse.

    Returns:
        The number of units replaced (0 when already fused).
    """
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.MaxPool2d) and not isinstance(module, StemBlock):
            continue
        fused = _fuse_child(child)
        if fused is None:
            count += fuse_network(child)
        else:
            setattr(module, name, fused)
            count += 1
    return count
