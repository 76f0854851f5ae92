"""From raw D-FINE outputs to the top detections in original-image pixels.

The same computation as the official deploy postprocessor (focal / sigmoid scoring): every
(query, class) pair is a candidate; the ``num_top_queries`` best sigmoid scores are kept, so a
query can appear more than once with different labels. Boxes are not clipped to the image.

``EdgeStdNetwork`` runs the network and also gives each query's per-edge spread (the FDR
distributions' standard deviations, ``dfine.fdr.edge_std_normalized``);
``PostProcessor.forward_with_edge_std`` then keeps the spreads of the kept detections in pixels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dfine.fdr import edge_std_normalized, weighting_function
from dfine.layers import box_cxcywh_to_xyxy

if TYPE_CHECKING:
    from dfine.model import DFINE


class PostProcessor(nn.Module):
    """Top-k detections over all queries and classes.

    Args:
        num_classes: classes of the model's logits.
        num_top_queries: detections kept per image (at most queries × classes).
    """

    def __init__(self, num_classes: int = 80, num_top_queries: int = 300) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if num_top_queries < 1:
            raise ValueError(f"num_top_queries must be at least 1, got {num_top_queries}")
        self.num_classes = num_classes
        self.num_top_queries = num_top_queries

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_top_queries={self.num_top_queries}"

    def forward(
        self, outputs: dict[str, torch.Tensor], orig_target_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Select detections.

        Args:
            outputs: ``pred_logits`` float ``(B, Q, C)`` raw logits, ``pred_boxes`` float
                ``(B, Q, 4)`` normalized cx, cy, w, h.
            orig_target_sizes: int64 ``(B, 2)``, **(width, height)** of the original images.

        Returns:
            ``labels`` int64 ``(B, K)`` class index (0-based, not a COCO category id),
            ``boxes`` float ``(B, K, 4)`` x1, y1, x2, y2 in original-image pixels (not clipped),
            ``scores`` float ``(B, K)`` sigmoid scores sorted descending; ``K = num_top_queries``.
        """
        labels, boxes_xyxy, scores, _ = self._select(outputs, orig_target_sizes)
        return labels, boxes_xyxy, scores

    def forward_with_edge_std(
        self, outputs: dict[str, torch.Tensor], orig_target_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward` plus each kept detection's per-edge spread in pixels.

        Args:
            outputs: as for :meth:`forward`, plus ``pred_edge_std`` float ``(B, Q, 4)``
                (``EdgeStdNetwork``): spreads of left, top, right, bottom as fractions of the
                image width / height.
            orig_target_sizes: int64 ``(B, 2)`` (width, height).

        Returns:
            ``labels``, ``boxes``, ``scores`` as :meth:`forward`, and ``edge_std`` float
            ``(B, K, 4)``: the standard deviation of each box's left, top, right and bottom edge
            in original-image pixels (scaled by the width for left/right, the height for
            top/bottom, as the box is), in the same order as ``boxes``.
        """
        labels, boxes_xyxy, scores, query = self._select(outputs, orig_target_sizes)
        spread = outputs["pred_edge_std"]
        scale = orig_target_sizes.to(spread.dtype).repeat(1, 2).unsqueeze(1)  # w, h, w, h
        edge_std = (spread * scale).gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
        return labels, boxes_xyxy, scores, edge_std

    def _select(
        self, outputs: dict[str, torch.Tensor], orig_target_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Labels, boxes, scores and the query index ``(B, K)`` int64 of each kept detection."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"pred_logits has {logits.shape[-1]} classes, the postprocessor expects {self.num_classes}"
            )
        scale = orig_target_sizes.to(boxes.dtype).repeat(1, 2).unsqueeze(1)  # (B, 1, 4): w, h, w, h
        boxes_xyxy = box_cxcywh_to_xyxy(boxes) * scale

        scores, flat_index = torch.topk(
            torch.sigmoid(logits).flatten(1), self.num_top_queries, dim=-1
        )
        # a - (a // b) * b rather than %: the official export uses it for old TensorRT versions.
        labels = (
            flat_index
            - torch.div(flat_index, self.num_classes, rounding_mode="floor") * self.num_classes
        )
        query = torch.div(flat_index, self.num_classes, rounding_mode="floor")
        picked = boxes_xyxy.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
        return labels, picked, scores, query


class EdgeStdNetwork(nn.Module):
    """A D-FINE network's eval forward that also returns each query's per-edge spread.

    The same computation as ``model(images)`` in eval mode (the same decoder steps, so the same
    logits and boxes), keeping what the plain forward drops: the last layer's corner logits and
    the reference boxes its offsets start from.

    Definition of the spread, per query and edge (left, top, right, bottom): with
    ``p = softmax(final-layer corner logits)`` over the ``reg_max + 1`` bins and ``W(n)`` the
    bin values the box integral uses, ``mean = sum p W`` and ``std = sqrt(sum p (W - mean)^2)``,
    in edge-offset units (``dfine.fdr.distribution_std``), times the reference box's width
    (left, right) or height (top, bottom) over ``reg_scale`` (``dfine.fdr.edge_std_normalized``):
    a fraction of the image width / height, as ``pred_boxes`` is. The postprocessor multiplies it
    by the frame size, as it does the boxes.

    Args:
        model: a D-FINE network (``dfine.DFINE``, training or deploy form), in eval mode.
    """

    def __init__(self, model: DFINE) -> None:
        super().__init__()
        self.model: DFINE = model

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images`` float32 ``(B, 3, H, W)`` in [0, 1] → ``pred_logits`` ``(B, Q, C)``,
        ``pred_boxes`` ``(B, Q, 4)`` normalized cxcywh and ``pred_edge_std`` ``(B, Q, 4)``."""
        model = self.model
        decoder = model.decoder
        memory, shapes = decoder.flatten_features(model.encoder(model.backbone(images)))
        content, ref_logits, _ = decoder.select_queries(memory, shapes)
        layer = decoder.eval_idx
        states = decoder.run_layers(content, ref_logits, memory, shapes, layer + 1)
        corners = states.corners[-1]
        logits = decoder.class_logits(layer, states.hidden[-1], corners)
        project = weighting_function(decoder.reg_max, decoder.up, decoder.reg_scale)
        spread = edge_std_normalized(
            corners, states.ref_points, project, decoder.reg_max, decoder.reg_scale
        )
        return {"pred_logits": logits, "pred_boxes": states.boxes[-1], "pred_edge_std": spread}
