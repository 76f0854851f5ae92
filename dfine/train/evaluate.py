"""COCO box mAP with faster-coco-eval, overall and per class.

:func:`coco_map` scores detections (COCO result dicts) against a COCO ground-truth dict and
returns an :class:`EvalResult` (AP50:95 and AP50, overall and per class, with image and
instance counts) that prints as a table and writes as JSON. :func:`predict_torch` and
:func:`predict_backend` produce those detections from a torch model (the trainer validates its
EMA model this way) or from any ``DetectorBackend`` (ONNX Runtime, TensorRT), over samples of
``dfine.train.datasets`` resized as for validation.

Labels are 0-based class indices; the ground truth's categories are matched to them by name
(``class_names[i]`` is label ``i``), so any category ids work.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassMetrics:
    """One class: images that contain it, its instances, AP50:95 and AP50 (NaN: no instance)."""

    name: str
    images: int
    instances: int
    map50_95: float
    map50: float


@dataclass(frozen=True)
class EvalResult:
    """COCO bbox metrics: ``map50_95`` is COCO's AP (IoU 0.50:0.95), ``map50`` AP at IoU 0.5."""

    map50_95: float
    map50: float
    images: int
    instances: int
    per_class: tuple[ClassMetrics, ...]

    def to_json(self) -> dict[str, Any]:
        """``{"map50_95", "map50", "images", "instances", "per_class": {name: {...}}}``; NaN → None."""

        def num(x: float) -> float | None:
            return None if np.isnan(x) else float(x)

        return {
            "map50_95": num(self.map50_95),
            "map50": num(self.map50),
            "images": self.images,
            "instances": self.instances,
            "per_class": {
                c.name: {
                    "map50_95": num(c.map50_95),
                    "map50": num(c.map50),
                    "images": c.images,
                    "instances": c.instances,
                }
                for c in self.per_class
            },
        }

    def format_table(self) -> str:
        """The per-class table: class, images, instances, AP50:95, AP50, and an ``all`` row."""
        width = max([len("class"), len("all"), *(len(c.name) for c in self.per_class)])
        head = f"{'class':<{width}} {'images':>7} {'instances':>9} {'AP50:95':>8} {'AP50':>7}"

        def row(name: str, images: int, instances: int, a: float, b: float) -> str:
            fa = "-" if np.isnan(a) else f"{a:.3f}"
            fb = "-" if np.isnan(b) else f"{b:.3f}"
            return f"{name:<{width}} {images:>7} {instances:>9} {fa:>8} {fb:>7}"

        lines = [head, row("all", self.images, self.instances, self.map50_95, self.map50)]
        lines += [row(c.name, c.images, c.instances, c.map50_95, c.map50) for c in self.per_class]
        return "\n".join(lines)


def category_ids_for(ground_truth: dict[str, Any], class_names: Sequence[str]) -> list[int]:
    """The ground truth's category id of each label (``class_names`` order), matched by name.

    Raises:
        ValueError: a class name has no category in the ground truth.
    """
    by_name = {str(c["name"]): int(c["id"]) for c in ground_truth.get("categories", [])}
    missing = [n for n in class_names if n not in by_name]
    if missing:
        raise ValueError(
            f"ground truth has no category named {missing[0]!r} "
            f"(its categories: {', '.join(sorted(by_name)) or 'none'})"
        )
    return [by_name[n] for n in class_names]


def coco_map(
    ground_truth: dict[str, Any], detections: Sequence[dict[str, Any]], class_names: Sequence[str]
) -> EvalResult:
    """COCO bbox evaluation.

    Args:
        ground_truth: a COCO dict (``images``, ``annotations`` with ``bbox`` x, y, w, h pixels,
            ``categories``).
        detections: COCO results: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h] pixels,
            ``score``.
        class_names: the model's classes, in label order (rows of the table).
    """
    from faster_coco_eval import COCO, COCOeval_faster

    cat_ids = category_ids_for(ground_truth, class_names)
    annotations = [a for a in ground_truth.get("annotations", []) if not a.get("iscrowd", 0)]
    images_per_cat = {
        cid: len({a["image_id"] for a in annotations if a["category_id"] == cid}) for cid in cat_ids
    }
    instances_per_cat = {
        cid: sum(1 for a in annotations if a["category_id"] == cid) for cid in cat_ids
    }
    n_images = len(ground_truth.get("images", []))
    n_instances = len(annotations)

    nan = float("nan")
    if not annotations or not detections:
        score = nan if not annotations else 0.0
        per_class = tuple(
            ClassMetrics(
                name,
                images_per_cat[cid],
                instances_per_cat[cid],
                0.0 if instances_per_cat[cid] else nan,
                0.0 if instances_per_cat[cid] else nan,
            )
            for name, cid in zip(class_names, cat_ids)
        )
        return EvalResult(score, score, n_images, n_instances, per_class)

    gt = dict(ground_truth)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    # faster-coco-eval (like pycocotools) needs an area and iscrowd per annotation.
    gt["annotations"] = [
        {
            **a,
            "id": a.get("id", i + 1),
            "iscrowd": a.get("iscrowd", 0),
            "area": a.get("area", float(a["bbox"][2]) * float(a["bbox"][3])),
        }
        for i, a in enumerate(ground_truth["annotations"])
    ]
    with contextlib.redirect_stdout(io.StringIO()):  # the evaluator's own summary table
        coco_gt = COCO(gt)
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        evaluator = COCOeval_faster(coco_gt, coco_dt, "bbox")
        evaluator.params.catIds = cat_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    # precision: (iou thresholds, recall points, categories, area ranges, max dets); -1 = n/a.
    precision = np.asarray(evaluator.eval["precision"])
    per_class = []
    for k, (name, cid) in enumerate(zip(class_names, cat_ids)):
        p = precision[:, :, k, 0, -1]
        valid = p[p > -1]
        ap = float(valid.mean()) if valid.size else nan
        p50 = p[0][p[0] > -1]
        ap50 = float(p50.mean()) if p50.size else nan
        per_class.append(ClassMetrics(name, images_per_cat[cid], instances_per_cat[cid], ap, ap50))
    return EvalResult(float(stats[0]), float(stats[1]), n_images, n_instances, tuple(per_class))


def to_coco_results(
    image_ids: Sequence[int],
    labels: np.ndarray,
    boxes_xyxy: np.ndarray,
    scores: np.ndarray,
    category_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """COCO result dicts from a batch of detections.

    Args:
        image_ids: ``B`` ids.
        labels: int ``(B, K)`` class indices; boxes_xyxy: float ``(B, K, 4)`` pixels;
            scores: float ``(B, K)``.
        category_ids: category id of each label; a negative id drops that label's detections.
    """
    out: list[dict[str, Any]] = []
    for b, image_id in enumerate(image_ids):
        for label, box, score in zip(
            labels[b].tolist(), boxes_xyxy[b].tolist(), scores[b].tolist()
        ):
            category = category_ids[int(label)]
            if category < 0:  # a class the ground truth does not have
                continue
            x1, y1, x2, y2 = box
            out.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(category),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    return out


Predictor = Callable[[torch.Tensor, torch.Tensor], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _image_id(value: Any) -> int:
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


def _orig_sizes(targets: Sequence[dict[str, Any]]) -> torch.Tensor:
    rows = [torch.as_tensor(t["orig_size_wh"], dtype=torch.int64).reshape(2) for t in targets]
    return torch.stack(rows)


def predict_batches(
    batches: Iterable[tuple[torch.Tensor, Sequence[dict[str, Any]]]],
    predictor: Predictor,
    category_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """Run ``predictor(images, orig_sizes_wh) -> (labels, boxes_xyxy, scores)`` over batches
    of ``(images (B, 3, S, S), targets)`` (targets carry ``image_id`` and ``orig_size_wh``)."""
    results: list[dict[str, Any]] = []
    for images, targets in batches:
        labels, boxes, scores = predictor(images, _orig_sizes(targets))
        results += to_coco_results(
            [_image_id(t["image_id"]) for t in targets], labels, boxes, scores, category_ids
        )
    return results


def torch_predictor(
    model: nn.Module, num_classes: int, device: torch.device, amp_dtype: torch.dtype | None = None
) -> Predictor:
    """A predictor over a torch D-FINE in eval mode (the top 300 detections per image)."""
    from dfine.postprocess import PostProcessor

    post = PostProcessor(num_classes=num_classes)

    @torch.no_grad()
    def predict(
        images: torch.Tensor, orig_sizes_wh: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images = images.to(device, non_blocking=True)
        with torch.autocast(
            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            outputs = model(images)
        outputs = {k: outputs[k].float() for k in ("pred_logits", "pred_boxes")}
        labels, boxes, scores = post(outputs, orig_sizes_wh.to(device))
        return labels.cpu().numpy(), boxes.cpu().numpy(), scores.cpu().numpy()

    return predict


def evaluate_model(
    model: nn.Module,
    samples: Sequence[Any],
    class_names: Sequence[str],
    *,
    imgsz: int,
    batch: int,
    workers: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> EvalResult:
    """COCO mAP of a torch model (put in eval mode here, restored after) on ``samples``."""
    was_training = model.training
    model.eval()
    try:
        predictor = torch_predictor(model, len(class_names), device, amp_dtype)
        return evaluate_predictor(
            predictor, samples, class_names, imgsz=imgsz, batch=batch, workers=workers
        )
    finally:
        model.train(was_training)


def evaluate_predictor(
    predictor: Predictor,
    samples: Sequence[Any],
    class_names: Sequence[str],
    *,
    imgsz: int,
    batch: int,
    workers: int,
    label_names: Sequence[str] | None = None,
) -> EvalResult:
    """COCO mAP of any predictor on ``samples`` (``dfine.train.datasets.Sample``), resized to ``imgsz``.

    ``label_names`` names the predictor's labels when they differ from ``class_names`` (the
    dataset's): detections are matched to the ground truth by name, other classes dropped.
    """
    from dfine.train.datasets import to_coco_ground_truth
    from dfine.train.loader import DetectionDataset, make_loader

    ground_truth = to_coco_ground_truth(list(samples), list(class_names))
    dataset = DetectionDataset(list(samples), imgsz, augment=False)
    loader = make_loader(dataset, batch, workers, seed=0, epoch=0, shuffle=False, drop_last=False)
    by_name = dict(zip(class_names, category_ids_for(ground_truth, class_names)))
    ids = [by_name.get(n, -1) for n in (label_names if label_names is not None else class_names)]
    detections = predict_batches(loader, predictor, ids)
    return coco_map(ground_truth, detections, class_names)
