"""The hybrid encoder: intra-scale attention on the coarsest map, then a cross-scale FPN/PAN.

Input: the backbone maps, float32 ``(B, C_i, H / s_i, W / s_i)`` for strides ``s_i``
(16, 32 for N; 8, 16, 32 for the others). Output: as many maps, each with ``hidden_dim``
channels at the same strides.

1. Each map is projected to ``hidden_dim`` channels (1x1 conv + BN).
2. The maps in ``use_encoder_idx`` (the stride-32 one) go through a transformer encoder with
   a fixed 2D sin-cos positional embedding, computed for the size in use.
3. Top-down (FPN): the coarser map, after a 1x1 lateral conv, is upsampled x2, concatenated
   with the finer one and fused by a RepNCSPELAN4 block.
4. Bottom-up (PAN): the finer result is downsampled (SCDown) and fused with the lateral map.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from dfine.layers import Activation, ConvNorm


class RepVGGBlock(nn.Module):
    """A 3x3 ConvNorm and a 1x1 ConvNorm in parallel, summed, then the activation.

    (The official code calls it VGGBlock; a deploy step may fuse both branches into one conv.)
    """

    def __init__(self, in_channels: int, out_channels: int, act: Activation) -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_channels, out_channels, 3, padding=1)
        self.conv2 = ConvNorm(in_channels, out_channels, 1, padding=0)
        self.act = act.make()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv1(x) + self.conv2(x))


class CSPLayer(nn.Module):
    """Two 1x1 branches; one runs ``num_blocks`` RepVGG blocks; their sum is the output."""

    def __init__(
        self, in_channels: int, out_channels: int, num_blocks: int, act: Activation
    ) -> None:
        super().__init__()
        # The official layer takes an ``expansion``; D-FINE always passes 1, so the hidden
        # width equals the output width and its final 1x1 conv is an identity (no weights).
        self.conv1 = ConvNorm(in_channels, out_channels, 1, act=act)
        self.conv2 = ConvNorm(in_channels, out_channels, 1, act=act)
        self.bottlenecks = nn.Sequential(
            *(RepVGGBlock(out_channels, out_channels, act) for _ in range(num_blocks))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottlenecks(self.conv1(x)) + self.conv2(x)


class RepNCSPELAN4(nn.Module):
    """CSP-ELAN fusion block (from YOLOv9), the FPN/PAN block of D-FINE.

    ``cv1`` widens to ``c3`` and splits in two halves; the second half goes through two
    CSP + 3x3 stages (``cv2``, ``cv3``) in series; all four pieces are concatenated and
    ``cv4`` maps them to ``c2`` channels.
    """

    def __init__(
        self, c1: int, c2: int, c3: int, c4: int, num_blocks: int, act: Activation = Activation.SILU
    ) -> None:
        super().__init__()
        self.split_width = c3 // 2
        self.cv1 = ConvNorm(c1, c3, 1, act=act)
        self.cv2 = nn.Sequential(
            CSPLayer(c3 // 2, c4, num_blocks, act), ConvNorm(c4, c4, 3, act=act)
        )
        self.cv3 = nn.Sequential(CSPLayer(c4, c4, num_blocks, act), ConvNorm(c4, c4, 3, act=act))
        self.cv4 = ConvNorm(c3 + 2 * c4, c2, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split((self.split_width, self.split_width), dim=1)
        c = self.cv2(b)
        d = self.cv3(c)
        return self.cv4(torch.cat([a, b, c, d], dim=1))


class SCDown(nn.Module):
    """Spatial-channel downsample: 1x1 ConvNorm, then a depthwise stride-2 ConvNorm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.cv1 = ConvNorm(in_channels, out_channels, 1)
        self.cv2 = ConvNorm(out_channels, out_channels, kernel_size, stride, groups=out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(self.cv1(x))


class TransformerEncoderLayer(nn.Module):
    """Post-norm transformer layer; the positional embedding is added to queries and keys only."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, act: Activation) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.activation = act.make()

    def forward(self, src: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        """``src`` ``(B, L, C)``, ``pos_embed`` ``(1, L, C)`` → ``(B, L, C)``."""
        q = k = src + pos_embed
        attn, _ = self.self_attn(q, k, value=src)
        src = self.norm1(src + attn)
        ffn = self.linear2(self.activation(self.linear1(src)))
        return self.norm2(src + ffn)


class TransformerEncoder(nn.Module):
    """A stack of ``TransformerEncoderLayer`` (D-FINE uses one)."""

    def __init__(self, layer: TransformerEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos_embed)
        return src


def sincos_position_embedding(
    width: int, height: int, embed_dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """The encoder's fixed 2D sin-cos embedding, float32 ``(1, width * height, embed_dim)``.

    Channels are [sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω)], each ``embed_dim / 4`` wide.
    The rows run x-major (row ``i`` is x = i // height, y = i % height), whereas the feature
    map is flattened y-major; the official model was trained with this ordering, so it is
    kept as is (on a square map it amounts to a transposed embedding).
    """
    if embed_dim % 4 != 0:
        raise ValueError(
            f"embed_dim must be divisible by 4 for the 2D sin-cos embedding, got {embed_dim}"
        )
    grid_x, grid_y = torch.meshgrid(
        torch.arange(width, dtype=torch.float32),
        torch.arange(height, dtype=torch.float32),
        indexing="ij",
    )
    pos_dim = embed_dim // 4
    omega = 1.0 / (temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim))
    out_x = grid_x.flatten()[:, None] @ omega[None]
    out_y = grid_y.flatten()[:, None] @ omega[None]
    return torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1)[None]


class HybridEncoder(nn.Module):
    """D-FINE's hybrid encoder.

    Args:
        in_channels: channels of the backbone maps, finest first.
        feat_strides: their strides, e.g. ``(8, 16, 32)``.
        hidden_dim: channels of every output map.
        nhead, dim_feedforward: of the transformer encoder layer.
        use_encoder_idx: which maps get the transformer encoder (the coarsest, in every size).
        num_encoder_layers: transformer layers per encoded map.
        expansion: width of the fusion blocks' inner branches, ``round(expansion * hidden_dim // 2)``.
        depth_mult: RepVGG blocks per CSP layer, ``round(3 * depth_mult)``.
    """

    def __init__(
        self,
        in_channels: tuple[int, ...],
        feat_strides: tuple[int, ...],
        hidden_dim: int = 256,
        nhead: int = 8,
        dim_feedforward: int = 1024,
        use_encoder_idx: tuple[int, ...] = (2,),
        num_encoder_layers: int = 1,
        expansion: float = 1.0,
        depth_mult: float = 1.0,
        pe_temperature: float = 10000.0,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(feat_strides):
            raise ValueError(
                f"in_channels and feat_strides must have the same length, got {in_channels} and {feat_strides}"
            )
        self.in_channels = tuple(in_channels)
        self.feat_strides = tuple(feat_strides)
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = tuple(use_encoder_idx)
        self.pe_temperature = pe_temperature
        self.out_channels = [hidden_dim] * len(in_channels)
        self.out_strides = list(feat_strides)
        self._pos_embed_cache: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

        self.input_proj = nn.ModuleList(
            nn.Sequential(
                OrderedDict(  # the official keys are input_proj.{i}.conv / .norm
                    conv=nn.Conv2d(c, hidden_dim, kernel_size=1, bias=False),
                    norm=nn.BatchNorm2d(hidden_dim),
                )
            )
            for c in in_channels
        )
        layer = TransformerEncoderLayer(hidden_dim, nhead, dim_feedforward, Activation.GELU)
        self.encoder = nn.ModuleList(
            TransformerEncoder(layer, num_encoder_layers) for _ in self.use_encoder_idx
        )

        c4 = round(expansion * hidden_dim // 2)
        num_blocks = round(3 * depth_mult)
        n_fuse = len(in_channels) - 1
        # lateral_convs[j] / fpn_blocks[j] fuse from the coarsest map downwards.
        self.lateral_convs = nn.ModuleList(
            ConvNorm(hidden_dim, hidden_dim, 1) for _ in range(n_fuse)
        )
        self.fpn_blocks = nn.ModuleList(
            RepNCSPELAN4(hidden_dim * 2, hidden_dim, hidden_dim * 2, c4, num_blocks)
            for _ in range(n_fuse)
        )
        self.downsample_convs = nn.ModuleList(
            nn.Sequential(SCDown(hidden_dim, hidden_dim, 3, 2)) for _ in range(n_fuse)
        )
        self.pan_blocks = nn.ModuleList(
            RepNCSPELAN4(hidden_dim * 2, hidden_dim, hidden_dim * 2, c4, num_blocks)
            for _ in range(n_fuse)
        )

    def position_embedding(
        self, width: int, height: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """The sin-cos embedding for a ``height x width`` map, cached per size."""
        key = (width, height, device, dtype)
        cached = self._pos_embed_cache.get(key)
        if cached is None:
            cached = sincos_position_embedding(width, height, self.hidden_dim, self.pe_temperature)
            cached = cached.to(device=device, dtype=dtype)
            self._pos_embed_cache[key] = cached
        return cached

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Backbone maps (finest first) → ``hidden_dim``-channel maps at the same strides."""
        if len(feats) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature maps, got {len(feats)}")
        proj = [p(f) for p, f in zip(self.input_proj, feats)]

        for encoder, idx in zip(self.encoder, self.use_encoder_idx):
            b, c, h, w = proj[idx].shape
            src = proj[idx].flatten(2).permute(0, 2, 1)
            pos = self.position_embedding(w, h, src.device, src.dtype)
            memory = encoder(src, pos)
            proj[idx] = memory.permute(0, 2, 1).reshape(b, c, h, w).contiguous()

        # Top-down: laterals[k] is the lateral-conv output of map k (coarse maps only).
        n = len(proj)
        laterals: list[torch.Tensor] = [proj[-1]] * n
        top = proj[-1]
        for j, level in enumerate(range(n - 1, 0, -1)):
            lateral = self.lateral_convs[j](top)
            laterals[level] = lateral
            up = F.interpolate(lateral, scale_factor=2.0, mode="nearest")
            top = self.fpn_blocks[j](torch.cat([up, proj[level - 1]], dim=1))
        # Bottom-up.
        outs = [top]
        for j in range(n - 1):
            down = self.downsample_convs[j](outs[-1])
            outs.append(self.pan_blocks[j](torch.cat([down, laterals[j + 1]], dim=1)))
        return outs
