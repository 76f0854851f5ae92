"""From raw D-FINE outputs to the top detections in original-image pixels.

The same computation as the official deploy postprocessor (focal / sigmoid scoring): every
(query, class) pair is a candidate; the ``num_top_queries`` best sigmoid scores are kept, so a
query can appear more than once with different labels. Boxes are not clipped to the image.
"""

from __future__ import annotations

import torch
from torch import nn

from dfine.layers import box_cxcywh_to_xyxy


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
        return labels, picked, scores
