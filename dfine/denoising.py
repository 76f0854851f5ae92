"""Contrastive denoising groups: noisy copies of the ground truth fed to the decoder in training.

Input: the batch's targets (per image ``labels`` int64 ``(n,)`` and ``boxes`` float32
``(n, 4)`` normalised cx, cy, w, h). Output: a ``DenoisingGroup`` whose ``D`` queries go in
front of the ``Q`` matching queries of the decoder.

Each group holds, per image, ``max_gt`` positive slots (GT boxes moved by less than half their
size, some labels replaced) and ``max_gt`` negative slots (moved by one to two half-sizes),
padded where an image has fewer GT; there are ``num_denoising // max_gt`` groups. The decoder
must reconstruct the GT from the positives and reject the negatives; the attention mask keeps
the groups from seeing each other and the matching queries from seeing any of them.

Randomness: four draws from torch's default generator of the targets' device, in the order of
the official ``get_contrastive_denoising_training_group`` (label-noise uniform, new labels,
signs, magnitudes), with the same shapes, so that one seed gives the official group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dfine.layers import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


@dataclass(frozen=True)
class DenoisingGroup:
    """The decoder inputs of the denoising queries, and what the criterion needs to match them.

    Attributes:
        query_logits: float ``(B, D, hidden)``, the class embeddings of the noisy labels (the
            official code calls them logits; they are the queries' content).
        ref_points_unact: float ``(B, D, 4)``, the noisy boxes before sigmoid (inverse sigmoid
            of ``boxes``, inputs clipped to [0, 1], odds terms to at least 1e-5).
        attn_mask: bool ``(D + Q, D + Q)``, True = blocked, for the decoder's self-attention;
            None when ``D`` is 0.
        dn_meta: ``dn_positive_idx`` (per image, int64 positions of the positive slots among
            the ``D``, group-major then GT order), ``dn_num_group`` (int) and ``dn_num_split``
            (``[D, Q]``), as the official outputs carry it.
        labels: int32 ``(B, D)``, the noisy labels (``num_classes`` in padding slots).
        boxes: float32 ``(B, D, 4)``, the noisy boxes, normalised cx, cy, w, h (zeros in
            padding slots).
    """

    query_logits: torch.Tensor
    ref_points_unact: torch.Tensor
    attn_mask: torch.Tensor | None
    dn_meta: dict[str, Any]
    labels: torch.Tensor
    boxes: torch.Tensor

    @property
    def num_queries(self) -> int:
        """``D``, the denoising queries per image."""
        return int(self.ref_points_unact.shape[1])


def _check_targets(targets: Sequence[dict[str, torch.Tensor]]) -> None:
    if len(targets) == 0:
        raise ValueError("targets is empty; pass one dict per image (labels (n,), boxes (n, 4))")
    for i, target in enumerate(targets):
        if "labels" not in target or "boxes" not in target:
            raise ValueError(f"targets[{i}] needs 'labels' and 'boxes', got keys {sorted(target)}")
        labels, boxes = target["labels"], target["boxes"]
        if labels.dim() != 1 or boxes.dim() != 2 or boxes.shape != (labels.shape[0], 4):
            raise ValueError(
                f"targets[{i}]: labels must be (n,) and boxes (n, 4), got {tuple(labels.shape)} "
                f"and {tuple(boxes.shape)}"
            )


def denoising_attn_mask(
    num_denoising: int, group_size: int, num_queries: int, device: torch.device
) -> torch.Tensor:
    """Self-attention mask, bool ``(D + Q, D + Q)``, True = blocked.

    Matching queries cannot see any denoising query (they would learn from the answers); a
    denoising query sees its own group of ``group_size`` slots and every matching query.
    """
    size = num_denoising + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[num_denoising:, :num_denoising] = True
    group = torch.arange(num_denoising, device=device) // group_size
    mask[:num_denoising, :num_denoising] = group[:, None] != group[None, :]
    return mask


def make_denoising_group(
    targets: Sequence[dict[str, torch.Tensor]],
    num_classes: int,
    num_queries: int,
    class_embed: Callable[[torch.Tensor], torch.Tensor],
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> DenoisingGroup | None:
    """Build the contrastive denoising queries for a batch (official semantics and draws).

    Args:
        targets: per image ``labels`` int64 ``(n,)`` in [0, num_classes) and ``boxes``
            float32 ``(n, 4)`` normalised cx, cy, w, h; images without boxes are allowed.
        num_classes: classes of the model; ``num_classes`` is the padding label.
        num_queries: ``Q``, the matching queries (only sizes the attention mask).
        class_embed: label → content embedding, e.g. the decoder's ``denoising_class_embed``
            (``num_classes + 1`` rows, the last one the zero padding row).
        num_denoising: requested denoising queries; groups = ``num_denoising // max_gt``
            (at least 1), so ``D = 2 * max_gt * groups``.
        label_noise_ratio: a GT label is replaced by a random class with probability half
            this ratio (0: no label noise, and no draws for it).
        box_noise_scale: scale of the box noise relative to half the box size (0: none).

    Returns:
        None when ``num_denoising`` is 0; a group with ``D = 0`` when no image has a box
        (no random numbers are drawn then); otherwise the group.

    Raises:
        ValueError: malformed targets.
    """
    if num_denoising <= 0:
        return None
    _check_targets(targets)
    num_gts = [int(t["labels"].shape[0]) for t in targets]
    device = targets[0]["labels"].device
    batch = len(targets)
    max_gt = max(num_gts)
    if max_gt == 0:
        hidden = class_embed(torch.zeros(batch, 0, dtype=torch.int32, device=device))
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return DenoisingGroup(
            query_logits=hidden,
            ref_points_unact=torch.zeros(batch, 0, 4, device=device),
            attn_mask=None,
            dn_meta={
                "dn_positive_idx": [empty] * batch,
                "dn_num_group": 0,
                "dn_num_split": [0, num_queries],
            },
            labels=torch.zeros(batch, 0, dtype=torch.int32, device=device),
            boxes=torch.zeros(batch, 0, 4, device=device),
        )

    num_group = max(num_denoising // max_gt, 1)
    group_size = 2 * max_gt
    total = group_size * num_group

    # One padded group of GT per image: max_gt positive slots, then the same again as negatives.
    labels = torch.full((batch, max_gt), num_classes, dtype=torch.int32, device=device)
    boxes = torch.zeros(batch, max_gt, 4, dtype=torch.float32, device=device)
    is_gt = torch.zeros(batch, max_gt, dtype=torch.bool, device=device)
    for i, (target, n) in enumerate(zip(targets, num_gts)):
        if n:
            labels[i, :n] = target["labels"]
            boxes[i, :n] = target["boxes"]
            is_gt[i, :n] = True
    labels = labels.tile(1, 2 * num_group)
    boxes = boxes.tile(1, 2 * num_group, 1)
    is_gt = is_gt.tile(1, 2 * num_group)
    negative = torch.zeros(batch, group_size, 1, device=device)
    negative[:, max_gt:] = 1.0
    negative = negative.tile(1, num_group, 1)

    # Positives of image i sit at slot g * group_size + k for group g and GT k < n_i.
    slot = torch.arange(num_group, device=device)[:, None] * group_size
    positive_idx = [(slot + torch.arange(n, device=device)[None, :]).flatten() for n in num_gts]

    if label_noise_ratio > 0:
        flip = torch.rand(batch, total, device=device) < label_noise_ratio * 0.5
        new_labels = torch.randint(0, num_classes, (batch, total), dtype=torch.int32, device=device)
        labels = torch.where(flip & is_gt, new_labels, labels)

    if box_noise_scale > 0:
        corners = box_cxcywh_to_xyxy(boxes)
        half_size = boxes[..., 2:].mul(0.5).tile(1, 1, 2) * box_noise_scale
        sign = (
            torch.randint(0, 2, (batch, total, 4), dtype=torch.float32, device=device) * 2.0 - 1.0
        )
        part = torch.rand(batch, total, 4, device=device)
        # Negatives move by 1-2 half-sizes, positives by 0-1: the arithmetic of the official
        # code, kept so that the same draws give the same boxes to the bit.
        part = (part + 1.0) * negative + part * (1 - negative)
        corners = (corners + sign * part * half_size).clip(min=0.0, max=1.0)
        boxes = box_xyxy_to_cxcywh(corners)
        boxes = torch.where(boxes < 0, -boxes, boxes)

    return DenoisingGroup(
        query_logits=class_embed(labels),
        ref_points_unact=inverse_sigmoid(boxes),
        attn_mask=denoising_attn_mask(total, group_size, num_queries, device),
        dn_meta={
            "dn_positive_idx": positive_idx,
            "dn_num_group": num_group,
            "dn_num_split": [total, num_queries],
        },
        labels=labels,
        boxes=boxes,
    )
