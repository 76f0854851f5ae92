"""Box geometry for matching and losses: format conversion, IoU and generalised IoU.

All boxes here are float tensors in normalised image units. ``cxcywh`` is (centre x, centre y,
width, height); ``xyxy`` is (x1, y1, x2, y2) with ``x1 <= x2`` and ``y1 <= y2``.

Two shapes of each measure: ``*_pairwise`` compares every box of one set with every box of the
other (``(N, 4)`` x ``(M, 4)`` → ``(N, M)``, for the matcher's cost matrix) and ``*_paired``
compares box ``i`` with box ``i`` (``(N, 4)`` x ``(N, 4)`` → ``(N,)``, for losses on matched
pairs; the official code takes the diagonal of an ``N x N`` matrix, which gives the same values).
"""

from __future__ import annotations

import torch


def box_cxcywh_to_xyxy(boxes_cxcywh: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` cxcywh → ``(..., 4)`` xyxy, with negative widths and heights taken as 0.

    A predicted box can come out of the distribution decoding with a negative size; clamping
    makes it a point-sized box instead of one with swapped corners, as the official loss does.
    """
    cx, cy, w, h = boxes_cxcywh.unbind(-1)
    half_w = 0.5 * w.clamp(min=0.0)
    half_h = 0.5 * h.clamp(min=0.0)
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)


def box_area(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` xyxy → ``(...)`` areas."""
    return (boxes_xyxy[..., 2] - boxes_xyxy[..., 0]) * (boxes_xyxy[..., 3] - boxes_xyxy[..., 1])


def _iou_terms(
    a_xyxy: torch.Tensor, b_xyxy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IoU, union and enclosing-box area of broadcastable ``(..., 4)`` xyxy boxes."""
    inter_wh = (
        torch.min(a_xyxy[..., 2:], b_xyxy[..., 2:]) - torch.max(a_xyxy[..., :2], b_xyxy[..., :2])
    ).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = box_area(a_xyxy) + box_area(b_xyxy) - inter
    hull_wh = (
        torch.max(a_xyxy[..., 2:], b_xyxy[..., 2:]) - torch.min(a_xyxy[..., :2], b_xyxy[..., :2])
    ).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return inter / union, union, hull


def box_iou_pairwise(a_xyxy: torch.Tensor, b_xyxy: torch.Tensor) -> torch.Tensor:
    """IoU of every box in ``a`` ``(N, 4)`` with every box in ``b`` ``(M, 4)`` → ``(N, M)``."""
    iou, _, _ = _iou_terms(a_xyxy[:, None, :], b_xyxy[None, :, :])
    return iou


def generalized_box_iou_pairwise(a_xyxy: torch.Tensor, b_xyxy: torch.Tensor) -> torch.Tensor:
    """GIoU (Rezatofighi et al. 2019) of every ``a`` ``(N, 4)`` with every ``b`` ``(M, 4)`` → ``(N, M)``.

    ``GIoU = IoU - (hull - union) / hull``, in [-1, 1]. NaN where both boxes have zero area.
    """
    iou, union, hull = _iou_terms(a_xyxy[:, None, :], b_xyxy[None, :, :])
    return iou - (hull - union) / hull


def box_iou_paired(a_xyxy: torch.Tensor, b_xyxy: torch.Tensor) -> torch.Tensor:
    """IoU of ``a[i]`` with ``b[i]``, both ``(N, 4)`` → ``(N,)``."""
    iou, _, _ = _iou_terms(a_xyxy, b_xyxy)
    return iou


def generalized_box_iou_paired(a_xyxy: torch.Tensor, b_xyxy: torch.Tensor) -> torch.Tensor:
    """GIoU of ``a[i]`` with ``b[i]``, both ``(N, 4)`` → ``(N,)``."""
    iou, union, hull = _iou_terms(a_xyxy, b_xyxy)
    return iou - (hull - union) / hull
