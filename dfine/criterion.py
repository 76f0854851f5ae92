"""The D-FINE training loss: VFL, L1, GIoU, FGL and DDF over every output set of the model.

``Criterion()(outputs, targets)`` takes the train-mode outputs dict of the model (the official
keys, see below) and the targets (per image ``labels`` int64 ``(n,)`` and ``boxes`` float
``(n, 4)`` normalised cxcywh, ``n`` may be 0) and returns the **weighted** loss terms, named as
the official ``DFINECriterion`` names them; the training loss is their sum.

The terms, per output set (``_suffix``):

- ``loss_vfl`` — varifocal classification: BCE on every query and class, the target being the
  detached IoU of the matched box on its GT class, weighted ``alpha * sigmoid^gamma`` on the
  negatives; ÷ number of GT boxes.
- ``loss_bbox`` / ``loss_giou`` — L1 on cxcywh and ``1 - GIoU`` over the matched pairs.
- ``loss_fgl`` — Fine-Grained Localization: each GT edge, as a distance from the reference box
  in the units of the FDR weighting function, is split between its two neighbouring bins;
  cross-entropy of the edge distribution to both, weighted by the pair's IoU.
- ``loss_ddf`` — Decoupled Distillation Focal (GO-LSD): KL divergence, temperature 5, from the
  last decoder layer's edge distributions (the teacher) to this layer's, for every query;
  matched queries are weighted by their IoU, the others by the teacher's confidence, and the
  two groups' means are combined with weights ``sqrt(count)``.

Which predictions are matched to which GT (the official scheme):

- every output set has its own Hungarian match, used by its VFL term;
- the **GO-LSD union** pools the matches of the last layer, the auxiliary layers, the pre
  outputs and the encoder; each query keeps the GT it was matched to most often. The box,
  FGL and DDF terms of all non-denoising sets use this union (÷ its size), so that every
  layer is taught on the same, larger set of queries;
- the denoising sets use their known pairs (each positive noisy copy ↔ its GT), ÷ GT count
  × number of groups.

Output sets and suffixes: last layer (none; VFL, boxes, FGL), ``_aux_{i}`` (earlier decoder
layers; + DDF), ``_pre`` (layer 0's plain head; VFL, boxes), ``_enc_{i}`` (encoder
proposals; VFL, boxes), ``_dn_{i}`` (denoising queries per layer; + FGL, DDF against the last
denoising layer, so the last one's DDF is exactly 0) and ``_dn_pre``.

Differences from the official code, on purpose: nothing is written into the caller's dicts
(the official one adds ``up``, ``reg_scale`` and ``is_dn`` to them), the matcher does not run
under a distributed all-reduce (world size 1), and terms are not passed through
``nan_to_num``: the losses are finite on every valid input (images without boxes included),
so a NaN means the network or the data broke and the trainer must see it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfine.box_ops import box_cxcywh_to_xyxy, box_iou_paired, generalized_box_iou_paired
from dfine.fdr import weighting_function
from dfine.matcher import HungarianMatcher, MatchIndices, at_least_float32

Target = Mapping[str, torch.Tensor]
Outputs = Mapping[str, Any]

# Edges per box, in the order of ``pred_corners``: left, top, right, bottom.
_EDGES = 4


class LossInputError(ValueError):
    """Outputs or targets the criterion cannot use (message: one line naming the fix)."""


@dataclass(frozen=True)
class Matching:
    """Every assignment one loss evaluation uses, as per-image ``(pred_idx, gt_idx)`` int64 pairs.

    ``main``/``aux``/``pre``/``enc`` are the Hungarian matches of the last layer, the earlier
    decoder layers, the pre outputs and the encoder outputs; ``go`` their GO-LSD union
    (one GT per query, ordered by query); ``dn`` the denoising pairs (None without denoising).
    ``num_boxes`` is the number of GT boxes in the batch and ``num_boxes_go`` the number of
    pairs in ``go``, both at least 1 so that a batch of empty images divides by 1.
    """

    main: MatchIndices
    aux: list[MatchIndices]
    pre: MatchIndices | None
    enc: list[MatchIndices]
    go: MatchIndices
    dn: MatchIndices | None
    num_boxes: float
    num_boxes_go: float


@dataclass(frozen=True)
class EdgeTargets:
    """FGL targets for ``k`` matched pairs, one row per edge (``4k``, pair-major, edge-minor).

    ``left_bin`` int64 in ``[0, reg_max)``: the bin just below the GT edge's distance; the
    target puts ``weight_left`` on it and ``weight_right`` (float, sums to 1 with the other)
    on ``left_bin + 1``. Distances beyond the outer bins go wholly to bin 0 or bin reg_max.
    """

    left_bin: torch.Tensor
    weight_left: torch.Tensor
    weight_right: torch.Tensor


@dataclass(frozen=True)
class Pairs:
    """One matching's ``k`` pairs, flattened once for every set and term that uses them.

    ``batch_idx``/``pred_idx`` int64 ``(k,)`` index ``(B, Q, ...)`` outputs (``index``);
    ``labels`` int64 ``(k,)``, ``boxes_cxcywh`` and ``boxes_xyxy`` float ``(k, 4)`` are each
    pair's GT, all on the outputs' device; ``indices`` is the per-image matching they came from.
    """

    indices: MatchIndices
    batch_idx: torch.Tensor
    pred_idx: torch.Tensor
    labels: torch.Tensor
    boxes_cxcywh: torch.Tensor
    boxes_xyxy: torch.Tensor

    @property
    def index(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch_idx, self.pred_idx


def make_pairs(indices: MatchIndices, targets: Sequence[Target], device: torch.device) -> Pairs:
    """Flatten ``indices`` for indexing outputs on ``device`` and gather each pair's GT."""
    batch_idx, pred_idx = _flat_index(indices, device)
    boxes = _matched_gt(targets, indices, "boxes").to(device)
    return Pairs(
        indices=indices,
        batch_idx=batch_idx,
        pred_idx=pred_idx,
        labels=_matched_gt(targets, indices, "labels").to(device),
        boxes_cxcywh=boxes,
        boxes_xyxy=box_cxcywh_to_xyxy(boxes),
    )


@dataclass(frozen=True)
class Supervision:
    """How one output set is supervised: the pairs and normaliser of each kind of term.

    ``class_pairs``/``class_norm`` serve the VFL term; ``box_pairs``/``box_norm`` the L1,
    GIoU, FGL and DDF terms. ``class_iou``/``box_iou`` float ``(k,)`` are the detached IoUs of
    this set's predicted boxes with their GT (``box_iou`` None for a set without corner
    distributions, whose terms do not use it). ``edge_targets`` are the FGL targets of
    ``box_pairs`` (None for sets without corner distributions). ``ddf_balance`` weights DDF's
    (matched, unmatched) means.
    """

    class_pairs: Pairs
    class_norm: float
    box_pairs: Pairs
    box_norm: float
    edge_targets: EdgeTargets | None
    ddf_balance: tuple[float, float]
    class_iou: torch.Tensor
    box_iou: torch.Tensor | None


def go_union(match_sets: Sequence[MatchIndices]) -> MatchIndices:
    """GO-LSD union of several matchings of the same images.

    Per image, all ``(query, gt)`` pairs of all sets are pooled; each query keeps the GT it was
    paired with most often (ties: the lower GT index). Returns per image ``(pred_idx, gt_idx)``
    int64, ordered by query.
    """
    num_images = len(match_sets[0])
    union: MatchIndices = []
    for b in range(num_images):
        counts: Counter[tuple[int, int]] = Counter()
        for matching in match_sets:
            pred_idx, gt_idx = matching[b]
            counts.update(zip(pred_idx.tolist(), gt_idx.tolist(), strict=True))
        best: dict[int, tuple[int, int]] = {}  # query -> (count, gt)
        for (query, gt), count in counts.items():
            held = best.get(query)
            if held is None or count > held[0] or (count == held[0] and gt < held[1]):
                best[query] = (count, gt)
        queries = sorted(best)
        union.append(
            (
                torch.tensor(queries, dtype=torch.int64),
                torch.tensor([best[q][1] for q in queries], dtype=torch.int64),
            )
        )
    return union


def denoising_indices(dn_meta: Mapping[str, Any], targets: Sequence[Target]) -> MatchIndices:
    """The known pairs of contrastive denoising: positive copy ``dn_positive_idx[b][k]`` ↔ GT.

    The positives are laid out group by group, GT order within a group, so the GT index of
    the ``k``-th positive is ``k mod n``. Returns per image ``(pred_idx, gt_idx)`` int64.
    """
    groups = int(dn_meta["dn_num_group"])
    pairs: MatchIndices = []
    for b, target in enumerate(targets):
        num_gt = len(target["labels"])
        positive = torch.as_tensor(dn_meta["dn_positive_idx"][b], dtype=torch.int64).cpu()
        if len(positive) != num_gt * groups:
            raise LossInputError(
                f"dn_meta: image {b} has {len(positive)} positive denoising queries, expected "
                f"{num_gt} GT x {groups} groups = {num_gt * groups}; build the denoising group from these targets"
            )
        pairs.append((positive, torch.arange(num_gt, dtype=torch.int64).repeat(groups)))
    return pairs


@torch.no_grad()
def edge_targets(
    ref_cxcywh: torch.Tensor,
    gt_xyxy: torch.Tensor,
    up: torch.Tensor,
    reg_scale: torch.Tensor,
    reg_max: int,
) -> EdgeTargets:
    """FGL targets: GT edges as soft labels over the FDR bins of the reference boxes.

    Args:
        ref_cxcywh: ``(k, 4)`` float reference boxes (``ref_points`` of the matched queries).
        gt_xyxy: ``(k, 4)`` float GT boxes, xyxy.
        up, reg_scale: the model's ``(1,)`` FDR parameters (``outputs["up"]``, ``outputs["reg_scale"]``).
        reg_max: bins per edge minus one.
    """
    scale = reg_scale.abs()
    cx, cy, w, h = ref_cxcywh.unbind(-1)
    x1, y1, x2, y2 = gt_xyxy.unbind(-1)
    # One unit of the weighting function is (reference size / reg_scale); the 1e-16 keeps a
    # zero-size reference finite. Distance 0 means the GT edge lies on the reference's edge.
    unit_w = w / scale + 1e-16
    unit_h = h / scale + 1e-16
    half = 0.5 * scale
    distance = torch.stack(
        [
            (cx - x1) / unit_w - half,
            (cy - y1) / unit_h - half,
            (x2 - cx) / unit_w - half,
            (y2 - cy) / unit_h - half,
        ],
        dim=-1,
    ).reshape(-1)
    bins = weighting_function(reg_max, up, reg_scale).to(distance.dtype)
    left = (bins[None, :] <= distance[:, None]).sum(dim=1) - 1  # in [-1, reg_max]
    below, beyond = left < 0, left >= reg_max
    left = left.clamp(0, reg_max - 1)
    to_left = (distance - bins[left]).abs()
    to_right = (bins[left + 1] - distance).abs()
    weight_right = to_left / (to_left + to_right)
    weight_right = torch.where(below, 0.0, torch.where(beyond, 1.0, weight_right))
    return EdgeTargets(left_bin=left, weight_left=1.0 - weight_right, weight_right=weight_right)


def _flat_index(indices: MatchIndices, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(batch_idx, pred_idx)`` of all pairs, for indexing ``(B, Q, ...)`` outputs."""
    batch = torch.cat([torch.full_like(pred, b) for b, (pred, _) in enumerate(indices)])
    pred = torch.cat([pred for pred, _ in indices])
    return batch.to(device), pred.to(device)


def _matched_gt(targets: Sequence[Target], indices: MatchIndices, key: str) -> torch.Tensor:
    """The GT ``key`` (``labels`` or ``boxes``) of every pair, in pair order."""
    return at_least_float32(
        torch.cat(
            [t[key][gt.to(t[key].device)] for t, (_, gt) in zip(targets, indices, strict=True)]
        )
    )


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal(a, b)``, with most unequal pairs told apart by their first row.

    torch.equal reads both tensors whole (about 1.5 ms for a batch's corner logits on the CPU),
    and DDF asks it for every layer, of which only the last one matches its teacher.
    """
    if a.shape != b.shape:
        return False
    first = (0,) * (a.dim() - 1)
    if a.numel() and not torch.equal(a[first], b[first]):
        return False
    return torch.equal(a, b)


def _pair_iou(outputs: Outputs, pairs: Pairs) -> torch.Tensor:
    """Detached IoU of each matched prediction with its GT, float ``(k,)``."""
    pred = box_cxcywh_to_xyxy(at_least_float32(outputs["pred_boxes"][pairs.index].detach()))
    return box_iou_paired(pred, pairs.boxes_xyxy)


class Criterion(nn.Module):
    """D-FINE's set-prediction loss with the official weights and hyper-parameters by default.

    Args:
        num_classes: classes of the model's class head (``pred_logits.shape[-1]``).
        matcher: the Hungarian matcher; default: class 2, L1 5, GIoU 2, focal alpha 0.25, gamma 2.
        weight_vfl, weight_bbox, weight_giou, weight_fgl, weight_ddf: term weights (1, 5, 2,
            0.15, 1.5 in every official D-FINE config).
        vfl_alpha: weight of the negatives in VFL (0.75).
        vfl_gamma: focusing exponent of the negatives in VFL (2).
        ddf_temperature: softmax temperature of the distillation (5); the KL is scaled by T².
    """

    def __init__(
        self,
        num_classes: int = 80,
        matcher: HungarianMatcher | None = None,
        weight_vfl: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        weight_fgl: float = 0.15,
        weight_ddf: float = 1.5,
        vfl_alpha: float = 0.75,
        vfl_gamma: float = 2.0,
        ddf_temperature: float = 5.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"Criterion: num_classes must be >= 1, got {num_classes}")
        weights = {
            "loss_vfl": weight_vfl,
            "loss_bbox": weight_bbox,
            "loss_giou": weight_giou,
            "loss_fgl": weight_fgl,
            "loss_ddf": weight_ddf,
        }
        for name, value in weights.items():
            if not value >= 0:
                raise ValueError(f"Criterion: weight of {name} must be >= 0, got {value}")
        if ddf_temperature <= 0:
            raise ValueError(f"Criterion: ddf_temperature must be > 0, got {ddf_temperature}")
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.weights = weights
        self.vfl_alpha = vfl_alpha
        self.vfl_gamma = vfl_gamma
        self.ddf_temperature = ddf_temperature

    # ------------------------------------------------------------------ loss terms
    # Each term: (one output set, its targets, its Supervision) -> {unweighted name: 0-d tensor}.

    def loss_vfl(
        self, outputs: Outputs, targets: Sequence[Target], sup: Supervision
    ) -> dict[str, torch.Tensor]:
        """Varifocal loss over ``pred_logits`` ``(B, Q, C)``; positives are ``sup.class_pairs``."""
        logits = at_least_float32(outputs["pred_logits"])
        b, q = sup.class_pairs.index
        labels = sup.class_pairs.labels
        iou = sup.class_iou.to(logits.dtype)
        is_gt = torch.zeros_like(logits)
        is_gt[b, q, labels] = 1.0
        score = torch.zeros_like(logits)
        score[b, q, labels] = iou
        # Negatives (every class but the GT's) are down-weighted by how confident they already
        # are; a positive is weighted by its own IoU target, so good boxes learn high scores.
        weight = (
            self.vfl_alpha * logits.detach().sigmoid().pow(self.vfl_gamma) * (1 - is_gt) + score
        )
        loss = F.binary_cross_entropy_with_logits(logits, score, weight=weight, reduction="none")
        return {"loss_vfl": loss.sum() / sup.class_norm}

    def loss_boxes(
        self, outputs: Outputs, targets: Sequence[Target], sup: Supervision
    ) -> dict[str, torch.Tensor]:
        """L1 (cxcywh) and GIoU losses of the ``sup.box_pairs`` of ``pred_boxes`` ``(B, Q, 4)``."""
        boxes = at_least_float32(outputs["pred_boxes"])
        pred = boxes[sup.box_pairs.index]
        gt = sup.box_pairs.boxes_cxcywh
        giou = generalized_box_iou_paired(box_cxcywh_to_xyxy(pred), sup.box_pairs.boxes_xyxy)
        return {
            "loss_bbox": (pred - gt).abs().sum() / sup.box_norm,
            "loss_giou": (1 - giou).sum() / sup.box_norm,
        }

    def loss_fgl(
        self, outputs: Outputs, targets: Sequence[Target], sup: Supervision
    ) -> dict[str, torch.Tensor]:
        """Fine-Grained Localization loss on ``pred_corners`` ``(B, Q, 4 * (reg_max + 1))``."""
        if "pred_corners" not in outputs or sup.edge_targets is None or sup.box_iou is None:
            return {}
        corners = at_least_float32(outputs["pred_corners"])
        num_bins = corners.shape[-1] // _EDGES
        logp = F.log_softmax(corners[sup.box_pairs.index].reshape(-1, num_bins), dim=1)
        target = sup.edge_targets
        ce_left = -logp.gather(1, target.left_bin[:, None]).squeeze(1)
        ce_right = -logp.gather(1, target.left_bin[:, None] + 1).squeeze(1)
        iou = sup.box_iou.repeat_interleave(_EDGES)
        loss = (ce_left * target.weight_left + ce_right * target.weight_right) * iou
        return {"loss_fgl": loss.sum() / sup.box_norm}

    def loss_ddf(
        self, outputs: Outputs, targets: Sequence[Target], sup: Supervision
    ) -> dict[str, torch.Tensor]:
        """Decoupled Distillation Focal loss from ``teacher_corners`` to ``pred_corners`` (both ``(B, Q, 4(R+1))``)."""
        if "teacher_corners" not in outputs or sup.box_iou is None:
            return {}
        student = at_least_float32(outputs["pred_corners"])
        teacher = at_least_float32(outputs["teacher_corners"].detach())
        if outputs["teacher_corners"] is outputs["pred_corners"] or _same_values(student, teacher):
            # The last layer is its own teacher: nothing to distil, but keep the term in the graph.
            return {"loss_ddf": student.sum() * 0.0}
        num_bins = student.shape[-1] // _EDGES
        t = self.ddf_temperature
        kl = F.kl_div(
            F.log_softmax(student.reshape(-1, num_bins) / t, dim=1),
            F.softmax(teacher.reshape(-1, num_bins) / t, dim=1),
            reduction="none",
        ).sum(dim=1) * (t * t)
        # Per query: matched ones by how well this layer localises them, the rest by how sure
        # the teacher is that something is there.
        weight = at_least_float32(outputs["teacher_logits"].detach()).sigmoid().amax(dim=-1)
        matched = torch.zeros_like(weight, dtype=torch.bool)
        idx = sup.box_pairs.index
        matched[idx] = True
        weight = weight.index_put(idx, sup.box_iou.to(weight.dtype))
        loss = weight.reshape(-1).repeat_interleave(_EDGES) * kl
        matched = matched.reshape(-1).repeat_interleave(_EDGES)
        mean_matched = torch.where(matched, loss, 0.0).sum() / matched.sum().clamp(min=1)
        mean_unmatched = torch.where(matched, 0.0, loss).sum() / (~matched).sum().clamp(min=1)
        w_matched, w_unmatched = sup.ddf_balance
        return {
            "loss_ddf": (mean_matched * w_matched + mean_unmatched * w_unmatched)
            / (w_matched + w_unmatched)
        }

    # ------------------------------------------------------------------ matching

    def match(self, outputs: Outputs, targets: Sequence[Target]) -> Matching:
        """All assignments for one evaluation: a Hungarian run per output set, the GO union, the denoising pairs."""
        aux_sets = list(outputs.get("aux_outputs", []))
        pre_sets = [outputs["pre_outputs"]] if "pre_outputs" in outputs else []
        enc_sets = list(outputs.get("enc_aux_outputs", []))
        enc_targets = self._encoder_targets(outputs, targets)
        # All sets scored against the same targets go through the matcher together.
        together = [outputs, *aux_sets, *pre_sets, *(enc_sets if enc_targets is targets else [])]
        found = self.matcher.match_sets(together, targets)
        if enc_targets is not targets:
            found += self.matcher.match_sets(enc_sets, enc_targets)
        main, aux = found[0], found[1 : 1 + len(aux_sets)]
        pre = found[1 + len(aux_sets)] if pre_sets else None
        enc = found[1 + len(aux_sets) + len(pre_sets) :]
        go = go_union([main, *aux, *([pre] if pre is not None else []), *enc])
        dn = denoising_indices(outputs["dn_meta"], targets) if "dn_outputs" in outputs else None
        return Matching(
            main=main,
            aux=aux,
            pre=pre,
            enc=enc,
            go=go,
            dn=dn,
            num_boxes=float(max(sum(len(t["labels"]) for t in targets), 1)),
            num_boxes_go=float(max(sum(len(pred) for pred, _ in go), 1)),
        )

    # ------------------------------------------------------------------ the whole loss

    def forward(self, outputs: Outputs, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
        """Weighted loss terms of one batch.

        Args:
            outputs: the model's train-mode dict. Required: ``pred_logits`` ``(B, Q, C)``,
                ``pred_boxes`` ``(B, Q, 4)`` normalised cxcywh. Used when present:
                ``pred_corners`` ``(B, Q, 4(R+1))``, ``ref_points`` ``(B, Q, 4)``, ``up``,
                ``reg_scale``, ``aux_outputs``, ``pre_outputs``, ``enc_aux_outputs``,
                ``enc_meta``, ``dn_outputs``, ``dn_pre_outputs``, ``dn_meta``. Not modified.
            targets: ``B`` dicts: ``labels`` int64 ``(n,)`` in ``[0, C)``, ``boxes`` float
                ``(n, 4)`` normalised cxcywh with positive sizes.

        Returns:
            Weighted 0-d float tensors named ``loss_{vfl,bbox,giou,fgl,ddf}{suffix}`` in the
            official order; the training loss is their sum.
        """
        self._check_inputs(outputs, targets)
        matching = self.match(outputs, targets)
        losses: dict[str, torch.Tensor] = {}
        for suffix, set_outputs, set_targets, sup in self._output_sets(outputs, targets, matching):
            for term in (self.loss_vfl, self.loss_boxes, self.loss_fgl, self.loss_ddf):
                for name, value in term(set_outputs, set_targets, sup).items():
                    losses[name + suffix] = value * self.weights[name]
        return losses

    def _output_sets(
        self, outputs: Outputs, targets: Sequence[Target], matching: Matching
    ) -> list[tuple[str, Outputs, Sequence[Target], Supervision]]:
        """Every output set with its suffix, targets and supervision, in the official order.

        Each matching is flattened once (:func:`make_pairs`) and each set's IoUs computed once,
        however many sets and terms share them.
        """
        device = outputs["pred_boxes"].device
        balance = self._ddf_balance(outputs, matching.go)
        go = make_pairs(matching.go, targets, device)
        go_edges = self._edge_targets(outputs, outputs, go)

        def supervise(
            layer: Outputs,
            class_pairs: Pairs,
            class_norm: float,
            box_pairs: Pairs,
            box_norm: float,
            edges: EdgeTargets | None,
        ) -> Supervision:
            class_iou = _pair_iou(layer, class_pairs)
            box_iou = None
            if "pred_corners" in layer:  # FGL and DDF use it
                box_iou = class_iou if box_pairs is class_pairs else _pair_iou(layer, box_pairs)
            return Supervision(
                class_pairs, class_norm, box_pairs, box_norm, edges, balance, class_iou, box_iou
            )

        def regular(
            layer: Outputs,
            class_indices: MatchIndices,
            class_targets: Sequence[Target],
            edges: EdgeTargets | None,
        ) -> Supervision:
            class_pairs = make_pairs(class_indices, class_targets, device)
            return supervise(
                layer, class_pairs, matching.num_boxes, go, matching.num_boxes_go, edges
            )

        sets: list[tuple[str, Outputs, Sequence[Target], Supervision]] = [
            ("", outputs, targets, regular(outputs, matching.main, targets, go_edges))
        ]
        for i, (layer, indices) in enumerate(
            zip(outputs.get("aux_outputs", []), matching.aux, strict=True)
        ):
            sets.append((f"_aux_{i}", layer, targets, regular(layer, indices, targets, go_edges)))
        if matching.pre is not None:
            pre = outputs["pre_outputs"]
            sets.append(("_pre", pre, targets, regular(pre, matching.pre, targets, None)))
        enc_targets = self._encoder_targets(outputs, targets)
        for i, (layer, indices) in enumerate(
            zip(outputs.get("enc_aux_outputs", []), matching.enc, strict=True)
        ):
            # The box terms use the GT boxes, which the encoder's targets share.
            sup = regular(layer, indices, enc_targets, None)
            sets.append((f"_enc_{i}", layer, enc_targets, sup))

        if matching.dn is not None:
            dn_layers = list(outputs["dn_outputs"])
            # At least 1: a batch without GT may still carry an empty denoising group.
            dn_norm = max(matching.num_boxes * int(outputs["dn_meta"]["dn_num_group"]), 1.0)
            dn = make_pairs(matching.dn, targets, device)
            dn_edges = self._edge_targets(outputs, dn_layers[0], dn) if dn_layers else None
            # DDF's balance stays the one of the matching queries (as the official criterion).
            sets.extend(
                (f"_dn_{i}", layer, targets, supervise(layer, dn, dn_norm, dn, dn_norm, dn_edges))
                for i, layer in enumerate(dn_layers)
            )
            if "dn_pre_outputs" in outputs:
                layer = outputs["dn_pre_outputs"]
                sup = supervise(layer, dn, dn_norm, dn, dn_norm, dn_edges)
                sets.append(("_dn_pre", layer, targets, sup))
        return sets

    @staticmethod
    def _edge_targets(outputs: Outputs, layer: Outputs, pairs: Pairs) -> EdgeTargets | None:
        """FGL targets of ``pairs`` from ``layer``'s reference boxes (shared by all its layers)."""
        if "pred_corners" not in layer:
            return None
        reg_max = layer["pred_corners"].shape[-1] // _EDGES - 1
        ref = at_least_float32(layer["ref_points"])
        ref = ref[pairs.index].detach()
        up = at_least_float32(outputs["up"]).to(ref.device)
        reg_scale = at_least_float32(outputs["reg_scale"]).to(ref.device)
        return edge_targets(ref, pairs.boxes_xyxy, up, reg_scale, reg_max)

    @staticmethod
    def _ddf_balance(outputs: Outputs, go: MatchIndices) -> tuple[float, float]:
        """Weights of DDF's matched and unmatched means: the square roots of their edge counts.

        (The official code scales both counts by ``8 / B`` first; that factor cancels in the
        weighted mean.) Counted on the matching queries only and reused for denoising.
        """
        batch, queries = outputs["pred_logits"].shape[:2]
        matched = _EDGES * sum(len(pred) for pred, _ in go)
        return math.sqrt(matched), math.sqrt(_EDGES * batch * queries - matched)

    @staticmethod
    def _encoder_targets(outputs: Outputs, targets: Sequence[Target]) -> Sequence[Target]:
        """Targets for the encoder proposals: all labels 0 when its class head is class-agnostic."""
        if not outputs.get("enc_meta", {}).get("class_agnostic", False):
            return targets
        return [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]

    def _check_inputs(self, outputs: Outputs, targets: Sequence[Target]) -> None:
        for key in ("pred_logits", "pred_boxes"):
            if key not in outputs:
                raise LossInputError(
                    f"Criterion: outputs has no '{key}'; pass the model's train-mode outputs dict"
                )
        batch, _, classes = outputs["pred_logits"].shape
        if classes != self.num_classes:
            raise LossInputError(
                f"Criterion: pred_logits has {classes} classes but the criterion was built for "
                f"{self.num_classes}; use Criterion(num_classes={classes})"
            )
        if len(targets) != batch:
            raise LossInputError(
                f"Criterion: {len(targets)} targets for a batch of {batch} images; "
                "pass one target dict per image"
            )
        if "pred_corners" in outputs and not {"ref_points", "up", "reg_scale"} <= outputs.keys():
            raise LossInputError(
                "Criterion: outputs has pred_corners but not ref_points, up and reg_scale; "
                "pass the whole train-mode outputs dict"
            )
        if "dn_outputs" in outputs and "dn_meta" not in outputs:
            raise LossInputError(
                "Criterion: outputs has dn_outputs but no dn_meta; pass the whole outputs dict"
            )
        for b, target in enumerate(targets):
            labels, boxes = target.get("labels"), target.get("boxes")
            if labels is None or boxes is None:
                raise LossInputError(f"Criterion: targets[{b}] needs 'labels' and 'boxes'")
            if labels.dtype != torch.int64 or labels.dim() != 1:
                raise LossInputError(
                    f"Criterion: targets[{b}]['labels'] must be int64 (n,), got "
                    f"{labels.dtype} {tuple(labels.shape)}"
                )
            if boxes.shape != (len(labels), 4) or not boxes.is_floating_point():
                raise LossInputError(
                    f"Criterion: targets[{b}]['boxes'] must be float ({len(labels)}, 4) normalised "
                    f"cxcywh, got {boxes.dtype} {tuple(boxes.shape)}"
                )
        # One host sync for the whole batch; the loop that names the image runs only on error.
        all_labels = torch.cat([t["labels"].reshape(-1) for t in targets])
        all_boxes = torch.cat([t["boxes"] for t in targets])
        labels_ok = ((all_labels >= 0) & (all_labels < classes)).all()
        boxes_ok = torch.isfinite(all_boxes).all() & (all_boxes[:, 2:] > 0).all()
        if bool(labels_ok & boxes_ok):
            return
        for b, target in enumerate(targets):
            labels, boxes = target["labels"], target["boxes"]
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
                raise LossInputError(
                    f"Criterion: targets[{b}]['labels'] has ids outside [0, {classes}): "
                    f"{labels.min().item()}..{labels.max().item()}; "
                    f"remap class ids to 0..{classes - 1}"
                )
            if not bool(torch.isfinite(boxes).all() & (boxes[:, 2:] > 0).all()):
                raise LossInputError(
                    f"Criterion: targets[{b}]['boxes'] has a box without a positive finite width "
                    "and height; drop degenerate boxes when loading the data"
                )
