"""Hungarian matching of predicted boxes to ground-truth boxes (one-to-one, per image).

For every image the matcher builds a cost matrix between its ``Q`` predictions and its ``n``
ground-truth boxes and solves the assignment with scipy's ``linear_sum_assignment``; each GT
gets exactly one prediction (``min(Q, n)`` pairs), every other prediction is "no object".

Cost (D-FINE's configuration: class 2, L1 5, GIoU 2, focal alpha 0.25, gamma 2)::

    C = w_class * focal_class_cost + w_bbox * L1(cxcywh) + w_giou * (-GIoU(xyxy))

with, for ``p = sigmoid(logit of the GT's class)``::

    focal_class_cost = alpha * (1 - p)^gamma * -log(p) - (1 - alpha) * p^gamma * -log(1 - p)

(the focal loss of calling the query that class, minus the focal loss of calling it background).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from dfine.box_ops import box_cxcywh_to_xyxy, generalized_box_iou_pairwise

MatchIndices = list[tuple[torch.Tensor, torch.Tensor]]
"""Per image, ``(pred_idx, gt_idx)``: two int64 ``(k,)`` tensors, ``pred_idx`` ascending."""

# Keeps log() finite at p = 0 and p = 1; the same constant as the official matcher.
_LOG_EPS = 1e-8


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is a 16-bit float (AMP outputs), else ``x`` itself (no copy).

    Costs and losses are computed in float32 or better: in float16, ``-log(p)`` and the
    softmax over 33 bins overflow or lose the small differences the losses are made of.
    """
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class HungarianMatcher:
    """Assigns each ground-truth box to one prediction by minimum total cost.

    Args:
        cost_class: weight of the focal classification cost.
        cost_bbox: weight of the L1 distance between cxcywh boxes.
        cost_giou: weight of the negative generalised IoU.
        alpha: focal cost balance between positive and negative terms.
        gamma: focal cost focusing exponent.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ) -> None:
        for name, value in (
            ("cost_class", cost_class),
            ("cost_bbox", cost_bbox),
            ("cost_giou", cost_giou),
        ):
            if value < 0:
                raise ValueError(f"HungarianMatcher: {name} must be >= 0, got {value}")
        if cost_class == cost_bbox == cost_giou == 0:
            raise ValueError(
                "HungarianMatcher: all three costs are 0; give at least one a positive weight"
            )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"HungarianMatcher: alpha must be in [0, 1], got {alpha}")
        if gamma < 0:
            raise ValueError(f"HungarianMatcher: gamma must be >= 0, got {gamma}")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.alpha = alpha
        self.gamma = gamma

    @torch.no_grad()
    def cost_matrix(
        self,
        logits: torch.Tensor,
        boxes_cxcywh: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_boxes_cxcywh: torch.Tensor,
    ) -> torch.Tensor:
        """Matching cost of one image's predictions against its ground truth.

        Args:
            logits: ``(Q, C)`` float class logits (sigmoid, not softmax, classes).
            boxes_cxcywh: ``(Q, 4)`` float predicted boxes, normalised cxcywh.
            gt_labels: ``(n,)`` int64 class ids in ``[0, C)``.
            gt_boxes_cxcywh: ``(n, 4)`` float GT boxes, normalised cxcywh.

        Returns:
            ``(Q, n)`` float cost, same device as the inputs; NaN entries (degenerate boxes)
            are replaced by 1 so the assignment can still be solved.
        """
        prob = logits[:, gt_labels].sigmoid()  # only the GT classes: n columns, not C
        pos = self.alpha * (1 - prob) ** self.gamma * -(prob + _LOG_EPS).log()
        neg = (1 - self.alpha) * prob**self.gamma * -(1 - prob + _LOG_EPS).log()
        cost_l1 = torch.cdist(boxes_cxcywh, gt_boxes_cxcywh, p=1)
        giou = generalized_box_iou_pairwise(
            box_cxcywh_to_xyxy(boxes_cxcywh), box_cxcywh_to_xyxy(gt_boxes_cxcywh)
        )
        cost = self.cost_bbox * cost_l1 + self.cost_class * (pos - neg) + self.cost_giou * -giou
        return torch.nan_to_num(cost, nan=1.0)

    @torch.no_grad()
    def __call__(
        self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]]
    ) -> MatchIndices:
        """Match one set of predictions (one decoder layer, or the encoder's) to the targets.

        Args:
            outputs: ``pred_logits`` ``(B, Q, C)`` float and ``pred_boxes`` ``(B, Q, 4)`` float
                normalised cxcywh; other keys are ignored.
            targets: ``B`` dicts with ``labels`` int64 ``(n_b,)`` and ``boxes`` float ``(n_b, 4)``
                normalised cxcywh; ``n_b`` may be 0.

        Returns:
            Per image ``(pred_idx, gt_idx)``, int64 CPU tensors of length ``min(Q, n_b)``,
            ``pred_idx`` ascending: prediction ``pred_idx[k]`` is matched to GT ``gt_idx[k]``.
        """
        return self.match_sets([outputs], targets)[0]

    @torch.no_grad()
    def match_sets(
        self,
        sets: Sequence[Mapping[str, torch.Tensor]],
        targets: Sequence[Mapping[str, torch.Tensor]],
    ) -> list[MatchIndices]:
        """Match several sets of predictions of the same images to the same targets.

        The same as ``[self(s, targets) for s in sets]`` (the cost of every entry is computed
        by the same operations), cheaper: per image, the queries of all sets are scored in one
        :meth:`cost_matrix` call (``(Q_1 + ... + Q_S, n_b)``), and all costs come to the host
        in one copy. Args as :meth:`__call__`, each set with its own ``Q``.

        Returns:
            One :data:`MatchIndices` per set, in the order of ``sets``.
        """
        logits = [at_least_float32(s["pred_logits"]) for s in sets]
        boxes = [at_least_float32(s["pred_boxes"]) for s in sets]
        for lg in logits:
            if len(targets) != lg.shape[0]:
                raise ValueError(
                    f"HungarianMatcher: {len(targets)} targets for a batch of {lg.shape[0]} "
                    "images; pass one target dict per image"
                )
        # Imported here: scipy.optimize takes about a second to import, and ``import dfine``
        # must stay light for inference.
        from scipy.optimize import linear_sum_assignment

        queries = [lg.shape[1] for lg in logits]
        costs = [
            self.cost_matrix(
                torch.cat([lg[b] for lg in logits]),
                torch.cat([bx[b] for bx in boxes]),
                t["labels"],
                at_least_float32(t["boxes"]),
            )
            for b, t in enumerate(targets)
        ]
        # One device-to-host copy for the whole batch instead of one per image and set.
        flat = torch.cat([c.reshape(-1) for c in costs]).cpu().numpy()
        matched: list[MatchIndices] = [[] for _ in sets]
        start = 0
        for cost in costs:
            per_image = flat[start : start + cost.numel()].reshape(cost.shape)
            start += cost.numel()
            row = 0
            for s, q in enumerate(queries):
                pred_idx, gt_idx = linear_sum_assignment(per_image[row : row + q])
                row += q
                matched[s].append(
                    (
                        torch.as_tensor(pred_idx, dtype=torch.int64),
                        torch.as_tensor(gt_idx, dtype=torch.int64),
                    )
                )
        return matched
