"""Multi-scale deformable cross-attention, as D-FINE's decoder uses it.

Each query, per head, samples a few points around its reference box on every feature level
(bilinear, ``grid_sample``) and averages them with softmax weights. Offsets are relative to
the box size, scaled by ``1 / num_points`` of the level and by ``offset_scale``. Unlike the
Deformable-DETR original there is no value or output projection: the decoder hands in the
encoder memory already split per head and level.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def deformable_sample(
    values: list[torch.Tensor],
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_points: list[int],
) -> torch.Tensor:
    """Sample and weight the per-level values.

    Args:
        values: per level, float ``(B, heads, head_dim, H_l * W_l)``.
        spatial_shapes: per level, ``(H_l, W_l)``.
        sampling_locations: ``(B, Q, heads, P, 2)``, x, y in [0, 1] (outside → zeros);
            ``P = sum(num_points)``, level 0's points first.
        attention_weights: ``(B, Q, heads, P)``, summing to 1 over P.
        num_points: points per level.

    Returns:
        ``(B, Q, heads * head_dim)``.
    """
    batch, heads, head_dim, _ = values[0].shape
    num_queries = sampling_locations.shape[1]
    # grid_sample wants [-1, 1] coordinates and (N, H_out, W_out, 2) grids: here
    # (B * heads, Q, P_l, 2), giving (B * heads, head_dim, Q, P_l) samples.
    grids = (2 * sampling_locations - 1).permute(0, 2, 1, 3, 4).flatten(0, 1)
    # Contiguous grids: grid_sample's CPU kernel is about twice as slow on strided ones.
    grids_per_level = [g.contiguous() for g in grids.split(num_points, dim=-2)]
    samples = []
    for value, (h, w), grid in zip(values, spatial_shapes, grids_per_level):
        value_map = value.reshape(batch * heads, head_dim, h, w)
        samples.append(
            F.grid_sample(
                value_map, grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    weights = attention_weights.permute(0, 2, 1, 3).reshape(batch * heads, 1, num_queries, -1)
    out = (torch.cat(samples, dim=-1) * weights).sum(-1)
    return out.reshape(batch, heads * head_dim, num_queries).permute(0, 2, 1)


class MSDeformableAttention(nn.Module):
    """Deformable cross-attention from queries to multi-level values.

    Args:
        embed_dim: query width.
        num_heads: attention heads (``embed_dim`` must divide evenly).
        num_points: sampling points per head on each level, e.g. ``[3, 6, 3]``.
        offset_scale: offsets are ``offset * box_wh * offset_scale / num_points_of_level``.
    """

    num_points_scale: torch.Tensor

    def __init__(
        self, embed_dim: int, num_heads: int, num_points: list[int], offset_scale: float = 0.5
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_points = list(num_points)
        self.offset_scale = offset_scale
        total = sum(self.num_points)
        # Saved in the official checkpoints, so kept as a buffer: 1/n for each of a level's n points.
        scale = [1.0 / n for n in self.num_points for _ in range(n)]
        self.register_buffer("num_points_scale", torch.tensor(scale, dtype=torch.float32))
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * total * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * total)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Start with each head's points on a ray in its own direction, 1..n steps out.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (
            2.0 * math.pi / self.num_heads
        )
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.reshape(self.num_heads, 1, 2).tile([1, sum(self.num_points), 1])
        steps = torch.cat([torch.arange(1, n + 1) for n in self.num_points]).reshape(1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_((grid * steps).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_boxes: torch.Tensor,
        values: list[torch.Tensor],
        spatial_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """Attend.

        Args:
            query: ``(B, Q, C)`` (content + positional embedding).
            reference_boxes: ``(B, Q, 1, 4)`` normalized cx, cy, w, h.
            values: per level ``(B, heads, C / heads, H_l * W_l)``.
            spatial_shapes: per level ``(H_l, W_l)``.

        Returns:
            ``(B, Q, C)``.
        """
        batch, num_queries = query.shape[:2]
        total = sum(self.num_points)
        offsets = self.sampling_offsets(query).reshape(batch, num_queries, self.num_heads, total, 2)
        weights = self.attention_weights(query).reshape(batch, num_queries, self.num_heads, total)
        weights = F.softmax(weights, dim=-1)
        scale = self.num_points_scale.to(dtype=query.dtype).unsqueeze(-1)
        offset = offsets * scale * reference_boxes[:, :, None, :, 2:] * self.offset_scale
        locations = reference_boxes[:, :, None, :, :2] + offset
        return deformable_sample(values, spatial_shapes, locations, weights, self.num_points)
