"""Fine-grained Distribution Refinement (FDR): the pieces that turn edge distributions into boxes.

D-FINE predicts, for each of a box's four edges (left, top, right, bottom), a distribution
over ``reg_max + 1`` bins. The bins are the values of a non-uniform weighting function W(n)
(fine near zero, coarse at the ends); the expected value of W under the distribution is the
edge's offset, in units of ``box size / reg_scale``, from the reference box's edge.
Each decoder layer adds its logits to the previous layer's (residual refinement); the
Localization Quality Estimator (LQE) turns the sharpness of the distributions into a score
correction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfine.layers import MLP, box_xyxy_to_cxcywh


def weighting_function(reg_max: int, up: torch.Tensor, reg_scale: torch.Tensor) -> torch.Tensor:
    """W(n), the ``reg_max + 1`` bin values, float ``(reg_max + 1,)``, ascending, W(reg_max/2) = 0.

    With ``a = |up| * |reg_scale|`` and ``step = (a + 1) ** (2 / (reg_max - 2))``:
    ``W = [-2a, 1 - step^(k-1), ..., 1 - step, 0, step - 1, ..., step^(k-1) - 1, 2a]`` with
    ``k = reg_max / 2``; the inner values reach ±a and the two end bins catch large offsets.

    Args:
        reg_max: number of bins minus one (32 in every D-FINE size).
        up: ``(1,)`` float, the ``up`` parameter (0.5).
        reg_scale: ``(1,)``, the ``reg_scale`` parameter (4, or 8 for X); int or float.
    """
    half = reg_max // 2
    bound = up.abs() * reg_scale.abs()
    step = (bound + 1) ** (2 / (reg_max - 2))
    # Same arithmetic as the official code (a float32 power per bin), so the bins agree to the bit.
    right = [step**i - 1 for i in range(1, half)]
    left = [-(step**i) + 1 for i in range(half - 1, 0, -1)]
    values = [-2 * bound] + left + [torch.zeros_like(bound)] + right + [2 * bound]
    return torch.cat(values, dim=0)


def distribution_integral(
    corner_logits: torch.Tensor, project: torch.Tensor, reg_max: int
) -> torch.Tensor:
    """Expected edge offsets: ``sum_n softmax(logits)_n * W(n)`` per edge.

    Args:
        corner_logits: ``(..., 4 * (reg_max + 1))``, edges in order left, top, right, bottom.
        project: W(n), ``(reg_max + 1,)``.

    Returns:
        ``(..., 4)``.
    """
    shape = corner_logits.shape[:-1]
    prob = F.softmax(corner_logits.reshape(-1, reg_max + 1), dim=1)
    offsets = F.linear(prob, project.to(prob.dtype)[None])
    return offsets.reshape(*shape, 4)


def distance_to_box(
    reference: torch.Tensor, distance: torch.Tensor, reg_scale: torch.Tensor
) -> torch.Tensor:
    """Apply edge offsets to reference boxes.

    Each edge moves outwards from the centre by ``(reg_scale / 2 + d) * size / reg_scale``,
    so ``d = 0`` everywhere reproduces the reference box.

    Args:
        reference: ``(..., 4)`` normalized cx, cy, w, h.
        distance: ``(..., 4)`` offsets for left, top, right, bottom.
        reg_scale: ``(1,)``.

    Returns:
        ``(..., 4)`` normalized cx, cy, w, h.
    """
    scale = reg_scale.abs()
    cx, cy, w, h = reference.unbind(-1)
    x1 = cx - (0.5 * scale + distance[..., 0]) * (w / scale)
    y1 = cy - (0.5 * scale + distance[..., 1]) * (h / scale)
    x2 = cx + (0.5 * scale + distance[..., 2]) * (w / scale)
    y2 = cy + (0.5 * scale + distance[..., 3]) * (h / scale)
    return box_xyxy_to_cxcywh(torch.stack([x1, y1, x2, y2], dim=-1))


class LQE(nn.Module):
    """Localization Quality Estimator: adds a score term from the edge distributions' shape.

    For each edge, the top-``k`` bin probabilities and their mean go through a small MLP
    whose single output is added to every class logit of the query.
    """

    def __init__(self, k: int, hidden_dim: int, num_layers: int, reg_max: int) -> None:
        super().__init__()
        self.k = k
        self.reg_max = reg_max
        self.reg_conf = MLP(4 * (k + 1), hidden_dim, 1, num_layers)
        nn.init.zeros_(self.reg_conf.last.weight)
        nn.init.zeros_(self.reg_conf.last.bias)

    def forward(self, scores: torch.Tensor, corner_logits: torch.Tensor) -> torch.Tensor:
        """``scores`` ``(B, Q, C)`` logits, ``corner_logits`` ``(B, Q, 4 * (reg_max + 1))`` → ``(B, Q, C)``."""
        b, q, _ = corner_logits.shape
        prob = F.softmax(corner_logits.reshape(b, q, 4, self.reg_max + 1), dim=-1)
        top, _ = prob.topk(self.k, dim=-1)
        stat = torch.cat([top, top.mean(dim=-1, keepdim=True)], dim=-1)
        return scores + self.reg_conf(stat.reshape(b, q, -1))


def distribution_std(
    corner_logits: torch.Tensor, project: torch.Tensor, reg_max: int
) -> torch.Tensor:
    """Spread of each edge's distribution: ``sqrt(sum_n p_n (W(n) - mean)^2)``, ``mean = sum_n p_n W(n)``.

    ``p = softmax(logits)`` over the ``reg_max + 1`` bins and ``W(n)`` the bin values the box
    integral uses (:func:`distribution_integral`), so the result is in the same units as the
    edge offset (``box size / reg_scale``). A peaked distribution gives a small spread, a flat
    one a large spread (at most ``2 * |up| * |reg_scale|``, half the range of W).

    Args:
        corner_logits: ``(..., 4 * (reg_max + 1))``, edges in order left, top, right, bottom.
        project: W(n), ``(reg_max + 1,)``.

    Returns:
        ``(..., 4)``, non-negative.
    """
    shape = corner_logits.shape[:-1]
    prob = F.softmax(corner_logits.reshape(-1, reg_max + 1).float(), dim=1)
    values = project.to(prob.dtype)[None]
    mean = (prob * values).sum(dim=1, keepdim=True)
    # Centred second moment (not E[W^2] - mean^2): no cancellation for a peaked distribution.
    var = (prob * (values - mean) ** 2).sum(dim=1)
    return var.clamp(min=0.0).sqrt().reshape(*shape, 4)


def edge_std_normalized(
    corner_logits: torch.Tensor,
    reference: torch.Tensor,
    project: torch.Tensor,
    reg_max: int,
    reg_scale: torch.Tensor,
) -> torch.Tensor:
    """Per-edge spread in normalized image units, scaled as :func:`distance_to_box` scales offsets.

    An edge sits at ``centre ± (reg_scale / 2 + d) * size / reg_scale``, so a spread ``s`` of
    ``d`` (:func:`distribution_std`) is a spread ``s * w / reg_scale`` of the left and right
    edges and ``s * h / reg_scale`` of the top and bottom ones, ``w``/``h`` the reference box's.

    Args:
        corner_logits: ``(..., 4 * (reg_max + 1))``, the final layer's, edges left, top, right,
            bottom.
        reference: ``(..., 4)`` normalized cx, cy, w, h: the boxes the offsets start from.
        project: W(n), ``(reg_max + 1,)``.
        reg_scale: ``(1,)``.

    Returns:
        ``(..., 4)`` spreads of left, top, right, bottom as fractions of the image width
        (left, right) and height (top, bottom).
    """
    std = distribution_std(corner_logits, project, reg_max)
    scale = reg_scale.abs().to(std.dtype)
    w, h = reference[..., 2].to(std.dtype), reference[..., 3].to(std.dtype)
    size = torch.stack([w, h, w, h], dim=-1)
    return std * size / scale
