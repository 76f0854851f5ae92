"""Order-independent comparison of two detection sets (helper for the backend/export tests).

Near-tied scores let a correct implementation reorder detections, so sets are compared by a
one-to-one Hungarian match (same label, nearest box), then matched boxes and scores are checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True)
class MatchReport:
    label_mismatches: int  # matched pairs whose labels differ
    max_box_px: float  # largest |coordinate difference| over matched pairs with equal labels
    max_score: float  # largest |score difference| over the same pairs


def match_detections(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> MatchReport:
    """Match one image's detections: each of ``ref``/``got`` is labels ``(K,)``, boxes
    ``(K, 4)`` xyxy, scores ``(K,)``."""
    ref_labels, ref_boxes, ref_scores = (np.asarray(a) for a in ref)
    labels, boxes, scores = (np.asarray(a) for a in got)
    assert labels.shape == ref_labels.shape, (labels.shape, ref_labels.shape)
    cost = np.abs(boxes[:, None, :].astype(np.float64) - ref_boxes[None].astype(np.float64)).sum(-1)
    cost += 100.0 * np.abs(scores[:, None].astype(np.float64) - ref_scores[None])
    cost += 1e6 * (labels[:, None] != ref_labels[None])
    rows, cols = linear_sum_assignment(cost)
    same = labels[rows] == ref_labels[cols]
    box_err = np.abs(boxes[rows] - ref_boxes[cols])[same]
    score_err = np.abs(scores[rows] - ref_scores[cols])[same]
    return MatchReport(
        label_mismatches=int((~same).sum()),
        max_box_px=float(box_err.max()) if box_err.size else 0.0,
        max_score=float(score_err.max()) if score_err.size else 0.0,
    )
