"""The official D-FINE training augmentation, on albumentations (torchvision is not available here).

Input: an RGB uint8 ``(H, W, 3)`` picture, ``pascal_voc`` boxes (xyxy source pixels) and their
labels. Output: the ``(imgsz, imgsz, 3)`` uint8 picture and the surviving boxes in its pixels.
Boxes are carried by albumentations (``BboxParams``), which clips them to the picture and drops
those under 1 px wide or high after every op — the official ``SanitizeBoundingBoxes(min_size=1)``
(the official pipeline sanitises after the crop and after the resize, the only ops that shrink
boxes, so sanitising after every op removes the same boxes).

How each official op (``configs/dfine/include/dataloader.yml``; torchvision ``transforms.v2``
defaults) maps:

=================================== ==============================================================
official                            here
=================================== ==============================================================
RandomPhotometricDistort(p=0.5)     :class:`PhotometricDistort`: torchvision's algorithm
                                    (brightness 0.875-1.125, contrast 0.5-1.5 before or after
                                    saturation 0.5-1.5 and hue +-0.05, channel permutation; each
                                    with p=0.5) on albumentations' ``adjust_*_torchvision``
                                    kernels (OpenCV's HSV differs from PIL's in rounding only)
RandomZoomOut(fill=0)               :class:`RandomZoomOut`: side ratio U(1, 4), same for both
                                    sides, random placement, p=0.5 (torchvision's sampling; an
                                    ``A.CropAndPad`` pad-only percent would pad each side
                                    independently and change the aspect ratio)
RandomIoUCrop(p=0.8)                :class:`RandomIoUCrop`: torchvision's SSD sampler (scale
                                    0.3-1 per side, aspect 0.5-2, min IoU drawn from {0, .1, .3,
                                    .5, .7, .9, keep}, 40 trials; boxes whose centre falls outside
                                    the crop are dropped), no albumentations equivalent exists
SanitizeBoundingBoxes(min_size=1)   ``BboxParams(min_width=1, min_height=1, clip=True)``
RandomHorizontalFlip()              ``A.HorizontalFlip(p=0.5)``
Resize([S, S])                      :class:`ResizeAntialias`: PIL's antialiased bilinear resize,
                                    what torchvision runs on the official PIL pictures and what
                                    the inference preprocessor matches (``stages/preprocess.py``),
                                    so the model trains on the pictures it will see
stop_epoch policy                   :class:`AugmentPolicy`: ``FULL`` before ``stop_epoch``,
                                    ``LATE`` (flip + resize) from it on, ``EVAL`` (resize only)
BatchImageCollateFuncion(scales)    ``loader.MultiScaleCollate``: one size per batch from
                                    ``loader.multiscale_sizes`` (nearest, as the official), off
                                    from ``stop_epoch`` on
=================================== ==============================================================

Randomness: each albumentations op normally owns a generator; :func:`reseed` points every op of a
pipeline at one shared pair of generators seeded per sample, so a sample's augmentation is a pure
function of that seed (and two ops never draw the same numbers, which seeding each op with the same
seed through ``Compose.set_random_seed`` would do).
"""

from __future__ import annotations

import enum
import os
import random
from typing import Any

# albumentations asks pypi.org for a newer version of itself on import: a network request on every
# training run (and a 2 s stall where DNS hangs). Opt out unless the user chose otherwise. This is
# the one global effect of importing this module, and it only concerns albumentations.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import numpy as np
from albumentations.augmentations.pixel import functional as fpixel
from PIL import Image


class AugmentPolicy(enum.Enum):
    """Which ops run: the official policy switches the heavy three off from ``stop_epoch``."""

    FULL = "full"  # photometric, zoom-out, IoU crop, flip, resize
    LATE = "late"  # flip, resize (epochs >= stop_epoch)
    EVAL = "eval"  # resize only (validation)


class PhotometricDistort(A.ImageOnlyTransform):
    """torchvision ``RandomPhotometricDistort``: each colour op on its own with probability ``op_p``.

    Works on uint8 RGB ``(H, W, 3)``; the order is brightness, contrast (before or after, 50/50),
    saturation, hue, then a random channel permutation, as torchvision does it.
    """

    def __init__(
        self,
        brightness: tuple[float, float] = (0.875, 1.125),
        contrast: tuple[float, float] = (0.5, 1.5),
        saturation: tuple[float, float] = (0.5, 1.5),
        hue: tuple[float, float] = (-0.05, 0.05),
        op_p: float = 0.5,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.brightness, self.contrast, self.saturation, self.hue = (
            brightness,
            contrast,
            saturation,
            hue,
        )
        self.op_p = op_p

    def get_params(self) -> dict[str, Any]:
        rand = self.py_random

        def factor(bounds: tuple[float, float]) -> float | None:
            return rand.uniform(*bounds) if rand.random() < self.op_p else None

        brightness = factor(self.brightness)
        contrast = factor(self.contrast)
        contrast_before = rand.random() < 0.5
        saturation = factor(self.saturation)
        hue = factor(self.hue)
        permutation = self.random_generator.permutation(3) if rand.random() < self.op_p else None
        return {
            "brightness": brightness,
            "contrast": contrast,
            "contrast_before": contrast_before,
            "saturation": saturation,
            "hue": hue,
            "permutation": permutation,
        }

    def apply(
        self,
        img: np.ndarray,
        brightness: float | None,
        contrast: float | None,
        contrast_before: bool,
        saturation: float | None,
        hue: float | None,
        permutation: np.ndarray | None,
        **params: Any,
    ) -> np.ndarray:
        if brightness is not None:
            img = fpixel.adjust_brightness_torchvision(img, brightness)
        if contrast is not None and contrast_before:
            img = fpixel.adjust_contrast_torchvision(img, contrast)
        if saturation is not None:
            img = fpixel.adjust_saturation_torchvision(img, saturation)
        if hue is not None:
            img = fpixel.adjust_hue_torchvision(img, hue)
        if contrast is not None and not contrast_before:
            img = fpixel.adjust_contrast_torchvision(img, contrast)
        if permutation is not None:
            img = np.ascontiguousarray(img[..., permutation])
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness", "contrast", "saturation", "hue", "op_p")


class RandomZoomOut(A.DualTransform):
    """torchvision ``RandomZoomOut``: place the picture on a ``fill`` canvas ``r`` times its size.

    ``r ~ U(side_range)`` (one ratio for both sides, so the aspect ratio is kept); the picture's
    top-left corner is uniform over the free space. Boxes keep their pixel size.
    """

    def __init__(
        self, side_range: tuple[float, float] = (1.0, 4.0), fill: int = 0, p: float = 0.5
    ) -> None:
        super().__init__(p=p)
        if not 1.0 <= side_range[0] <= side_range[1]:
            raise ValueError(f"side_range={side_range}: need 1 <= low <= high")
        self.side_range, self.fill_value = side_range, fill

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        height, width = params["shape"][:2]
        ratio = self.py_random.uniform(*self.side_range)
        canvas_w, canvas_h = int(width * ratio), int(height * ratio)
        left = int((canvas_w - width) * self.py_random.random())
        top = int((canvas_h - height) * self.py_random.random())
        return {"left": left, "top": top, "canvas_w": canvas_w, "canvas_h": canvas_h}

    def apply(
        self, img: np.ndarray, left: int, top: int, canvas_w: int, canvas_h: int, **params: Any
    ) -> np.ndarray:
        height, width = img.shape[:2]
        canvas = np.full((canvas_h, canvas_w, *img.shape[2:]), self.fill_value, dtype=img.dtype)
        canvas[top : top + height, left : left + width] = img
        return canvas

    def apply_to_bboxes(
        self, bboxes: np.ndarray, left: int, top: int, canvas_w: int, canvas_h: int, **params: Any
    ) -> np.ndarray:
        # Albumentations boxes are normalised to the current picture: re-normalise to the canvas.
        height, width = params["shape"][:2]
        out = bboxes.copy()
        out[:, [0, 2]] = (bboxes[:, [0, 2]] * width + left) / canvas_w
        out[:, [1, 3]] = (bboxes[:, [1, 3]] * height + top) / canvas_h
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("side_range", "fill_value")


# torchvision's sampler options: a minimum IoU between the crop and some box; 1.0 = keep as is.
IOU_CROP_OPTIONS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


class RandomIoUCrop(A.DualTransform):
    """torchvision ``RandomIoUCrop`` (the SSD crop) with the official ``p=0.8`` wrapper.

    Draw a minimum IoU from ``IOU_CROP_OPTIONS`` (1.0: no crop); up to ``trials`` times draw a
    crop of ``[min_scale, max_scale]`` of each side with aspect in ``[min_aspect, max_aspect]``
    and keep it when some box's centre lies strictly inside and the best such box overlaps the
    crop by at least that IoU; otherwise draw another minimum. Boxes whose centre is outside the
    crop are dropped, the rest clipped to it. A picture without boxes is left as is (torchvision
    cannot crop one either: no trial can succeed, so only the "keep" option ends the loop).
    """

    def __init__(
        self,
        min_scale: float = 0.3,
        max_scale: float = 1.0,
        min_aspect: float = 0.5,
        max_aspect: float = 2.0,
        trials: int = 40,
        p: float = 0.8,
    ) -> None:
        super().__init__(p=p)
        self.min_scale, self.max_scale = min_scale, max_scale
        self.min_aspect, self.max_aspect = min_aspect, max_aspect
        self.trials = trials

    @property
    def targets_as_params(self) -> list[str]:
        return ["bboxes"]

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        height, width = params["shape"][:2]
        bboxes = np.asarray(data.get("bboxes", ()), dtype=np.float64)
        no_crop = {"crop": None}
        if bboxes.size == 0:
            return no_crop
        bboxes = bboxes.reshape(len(bboxes), -1)
        # Albumentations hands the boxes normalised in float32; back in pixels they are off by
        # ~1e-5 px, which would flip the strict "centre inside" test for a centre lying exactly on
        # a crop edge. torchvision compares in pixels: round the error away.
        boxes = np.round(
            bboxes[:, :4] * np.array([width, height, width, height], dtype=np.float64), 3
        )
        centre_x = 0.5 * (boxes[:, 0] + boxes[:, 2])
        centre_y = 0.5 * (boxes[:, 1] + boxes[:, 3])
        # torchvision loops until an option succeeds; "keep" (1/7 per round) ends it for sure,
        # the cap only bounds a pathological run. The trials of a round are drawn at once (the
        # first one that passes wins, as in the sequential loop).
        for _ in range(1000):
            min_iou = IOU_CROP_OPTIONS[self.py_random.randrange(len(IOU_CROP_OPTIONS))]
            if min_iou >= 1.0:
                return no_crop
            draws = self.random_generator.random((self.trials, 4))
            scale = self.min_scale + (self.max_scale - self.min_scale) * draws[:, :2]
            new_w = (width * scale[:, 0]).astype(np.int64)
            new_h = (height * scale[:, 1]).astype(np.int64)
            left = ((width - new_w) * draws[:, 2]).astype(np.int64)
            top = ((height - new_h) * draws[:, 3]).astype(np.int64)
            right, bottom = left + new_w, top + new_h
            with np.errstate(divide="ignore", invalid="ignore"):
                aspect = new_w / new_h
            ok = (
                (new_w > 0)
                & (new_h > 0)
                & (self.min_aspect <= aspect)
                & (aspect <= self.max_aspect)
            )
            # (trials, boxes): which box centres lie strictly inside each candidate crop
            inside = (
                (left[:, None] < centre_x)
                & (centre_x < right[:, None])
                & (top[:, None] < centre_y)
                & (centre_y < bottom[:, None])
            )
            ok &= inside.any(axis=1)
            iou = _iou_with_crops(boxes, np.stack([left, top, right, bottom], axis=1))
            ok &= np.where(inside, iou, -1.0).max(axis=1) >= min_iou
            if ok.any():
                t = int(np.argmax(ok))
                return {
                    "crop": (int(left[t]), int(top[t]), int(right[t]), int(bottom[t])),
                    "keep": inside[t],
                }
        return no_crop

    def apply(
        self, img: np.ndarray, crop: tuple[int, int, int, int] | None, **params: Any
    ) -> np.ndarray:
        if crop is None:
            return img
        left, top, right, bottom = crop
        return np.ascontiguousarray(img[top:bottom, left:right])

    def apply_to_bboxes(
        self, bboxes: np.ndarray, crop: tuple[int, int, int, int] | None, **params: Any
    ) -> np.ndarray:
        if crop is None:
            return bboxes
        height, width = params["shape"][:2]
        left, top, right, bottom = crop
        out = bboxes[params["keep"]].copy()
        out[:, [0, 2]] = np.clip((out[:, [0, 2]] * width - left) / (right - left), 0.0, 1.0)
        out[:, [1, 3]] = np.clip((out[:, [1, 3]] * height - top) / (bottom - top), 0.0, 1.0)
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_scale", "max_scale", "min_aspect", "max_aspect", "trials")


def _iou_with_crops(boxes_xyxy: np.ndarray, crops_xyxy: np.ndarray) -> np.ndarray:
    """IoU ``(m, n)`` of ``m`` xyxy crops ``(m, 4)`` with ``n`` xyxy boxes ``(n, 4)`` (same pixels)."""
    crops = crops_xyxy.astype(np.float64)[:, None, :]
    boxes = boxes_xyxy[None, :, :]
    inter_w = np.clip(
        np.minimum(boxes[..., 2], crops[..., 2]) - np.maximum(boxes[..., 0], crops[..., 0]), 0, None
    )
    inter_h = np.clip(
        np.minimum(boxes[..., 3], crops[..., 3]) - np.maximum(boxes[..., 1], crops[..., 1]), 0, None
    )
    inter = inter_w * inter_h
    area_boxes = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    area_crops = (crops[..., 2] - crops[..., 0]) * (crops[..., 3] - crops[..., 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nan_to_num(inter / (area_boxes + area_crops - inter))


class ResizeAntialias(A.DualTransform):
    """Resize to ``size x size`` with PIL's antialiased bilinear filter.

    The same resize as ``stages/preprocess.py`` at inference. Normalised boxes are unchanged
    by a resize; albumentations re-measures them in the new pixels for the 1 px sanitising.
    """

    def __init__(self, size: int, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.size = size

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        if img.shape[:2] == (self.size, self.size):
            return img
        # PIL itself (what torchvision's Resize runs on the official PIL pictures): single-threaded,
        # so data workers do not fight the training step for cores the way torch's kernel does.
        picture = Image.fromarray(np.ascontiguousarray(img))
        return np.asarray(picture.resize((self.size, self.size), Image.Resampling.BILINEAR))

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size",)


def build_transform(imgsz: int, policy: AugmentPolicy) -> A.Compose:
    """The albumentations pipeline of ``policy`` ending in an ``imgsz`` square picture.

    Call it as ``pipeline(image=rgb_u8, bboxes=boxes_xyxy_px, labels=labels)``; seed it per sample
    with :func:`reseed` first.
    """
    if imgsz < 1:
        raise ValueError(f"imgsz={imgsz}: must be a positive number of pixels, e.g. 640")
    ops: list[A.BasicTransform] = []
    if policy is AugmentPolicy.FULL:
        ops += [PhotometricDistort(p=1.0), RandomZoomOut(fill=0, p=0.5), RandomIoUCrop(p=0.8)]
    if policy in (AugmentPolicy.FULL, AugmentPolicy.LATE):
        ops.append(A.HorizontalFlip(p=0.5))
    ops.append(ResizeAntialias(imgsz))
    bbox_params = A.BboxParams(
        format="pascal_voc",
        label_fields=["labels"],
        min_width=1.0,
        min_height=1.0,
        clip=True,
        filter_invalid_bboxes=True,
    )
    return A.Compose(ops, bbox_params=bbox_params, p=1.0)


def reseed(pipeline: A.BaseCompose, seed: int) -> None:
    """Point every op of ``pipeline`` at one shared pair of generators seeded with ``seed``."""
    numpy_rng = np.random.default_rng(seed)
    python_rng = random.Random(seed)
    _share_generators(pipeline, numpy_rng, python_rng)


def _share_generators(
    node: A.BasicTransform | A.BaseCompose,
    numpy_rng: np.random.Generator,
    python_rng: random.Random,
) -> None:
    node.random_generator = numpy_rng
    node.py_random = python_rng
    if isinstance(node, A.BaseCompose):
        for child in node.transforms:
            _share_generators(child, numpy_rng, python_rng)
