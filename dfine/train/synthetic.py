"""A synthetic detection set: coloured shapes on textured backgrounds, COCO JSON out.

For tests and benches that need a dataset a detector can learn in minutes on a CPU. Each class is
one shape (circle, square, triangle, diamond, cross, ring), drawn in a random colour at a random
size (about a third of them small, 8-16 px) on a background of noise, a colour gradient or
stripes; about one image in ten has no object (a negative). Shapes do not overlap, and every box is
the tight pixel box of its drawn shape, so the labels are exact. Category ids are ``1, 5, 9, ...``
(non-contiguous on purpose: loading the set exercises the id remapping).

``make_synthetic_dataset`` writes ``out_dir/images/NNNNN.jpg`` and ``out_dir/annotations.json``;
the same arguments write the same files. As a command::

    python -m dfine.train.synthetic --out DIR --images 200 --classes 3 --size 320 --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
NEGATIVE_FRACTION = 0.1
SMALL_FRACTION = 0.3
SMALL_SIDE_PX = (8, 16)
JPEG_QUALITY = 92


def category_id(label: int) -> int:
    """The COCO category id written for contiguous class ``label`` (1, 5, 9, ...)."""
    return 1 + 4 * label


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 RGB ``(size, size, 3)``: noise, a gradient, or stripes, with some grain on top."""
    kind = rng.integers(3)
    # Broadcast a row and a column instead of full coordinate grids: this is the hot loop.
    xx = (np.arange(size, dtype=np.float32) / size)[None, :]
    yy = (np.arange(size, dtype=np.float32) / size)[:, None]
    colour_a = rng.uniform(0, 255, 3).astype(np.float32)
    colour_b = rng.uniform(0, 255, 3).astype(np.float32)
    if kind == 0:  # coarse noise: random blocks upsampled
        cells = int(rng.integers(4, 32))
        coarse = rng.uniform(0, 1, (cells, cells)).astype(np.float32)
        t = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR)
    elif kind == 1:  # linear gradient in a random direction
        angle = rng.uniform(0, 2 * np.pi)
        t = np.float32(np.cos(angle)) * xx + np.float32(np.sin(angle)) * yy
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    else:  # sinusoidal stripes at a random angle and period
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(0.03, 0.25)
        phase = (np.float32(np.cos(angle)) * xx + np.float32(np.sin(angle)) * yy) * np.float32(
            2 * np.pi / period
        )
        t = 0.5 + 0.5 * np.sin(phase)
    grain = rng.standard_normal((size, size), dtype=np.float32) * np.float32(rng.uniform(2, 14))
    t = np.broadcast_to(t, (size, size))
    # One plane per channel: NumPy broadcasting a length-3 last axis is ~10x slower.
    planes = [
        np.clip(colour_a[c] + (colour_b[c] - colour_a[c]) * t + grain, 0, 255).astype(np.uint8)
        for c in range(3)
    ]
    return cv2.merge(planes)


def _shape_mask(shape: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``(side, side)`` mask of one shape filling most of the patch, randomly turned."""
    mask = np.zeros((side, side), np.uint8)
    c = (side - 1) / 2.0
    r = side / 2.0
    if shape == "circle":
        cv2.circle(mask, (int(round(c)), int(round(c))), max(1, int(r) - 1), 1, -1)
    elif shape == "ring":
        cv2.circle(mask, (int(round(c)), int(round(c))), max(1, int(r) - 1), 1, -1)
        cv2.circle(mask, (int(round(c)), int(round(c))), max(1, int(r * 0.5)), 0, -1)
    else:
        points: list[tuple[float, float]]
        if shape == "square":
            points = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
            scale, turn = 0.95, rng.uniform(-0.3, 0.3)
        elif shape == "diamond":
            points = [(0, -1), (1, 0), (0, 1), (-1, 0)]
            scale, turn = 1.0, rng.uniform(-0.2, 0.2)
        elif shape == "triangle":
            points = [(0, -1), (0.87, 0.5), (-0.87, 0.5)]
            scale, turn = 1.0, rng.uniform(-np.pi, np.pi)
        else:  # cross: two bars
            points = [
                (-0.3, -1),
                (0.3, -1),
                (0.3, -0.3),
                (1, -0.3),
                (1, 0.3),
                (0.3, 0.3),
                (0.3, 1),
                (-0.3, 1),
                (-0.3, 0.3),
                (-1, 0.3),
                (-1, -0.3),
                (-0.3, -0.3),
            ]
            scale, turn = 1.0, rng.uniform(-0.4, 0.4)
        cos, sin = np.cos(turn), np.sin(turn)
        pts = np.array(
            [
                (c + r * scale * (x * cos - y * sin), c + r * scale * (x * sin + y * cos))
                for x, y in points
            ]
        )
        pts = np.clip(pts, 0, side - 1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask


def _object_colour(rng: np.random.Generator, background_rgb: np.ndarray) -> np.ndarray:
    """A random colour at least some distance from the background under the shape."""
    for _ in range(20):
        colour = rng.uniform(0, 255, 3)
        if np.abs(colour - background_rgb).sum() > 150:
            return colour
    return 255.0 - background_rgb


def _draw_image(
    rng: np.random.Generator, size: int, num_classes: int, max_objects: int
) -> tuple[np.ndarray, list[tuple[list[float], int]]]:
    picture = _background(rng, size)
    if rng.random() < NEGATIVE_FRACTION:
        return picture, []
    wanted = int(rng.integers(1, max_objects + 1))
    taken = np.zeros((size, size), bool)  # pixels (with a margin) already used by a shape
    objects: list[tuple[list[float], int]] = []
    for _ in range(wanted * 10):
        if len(objects) == wanted:
            break
        if rng.random() < SMALL_FRACTION:
            side = int(rng.integers(SMALL_SIDE_PX[0], SMALL_SIDE_PX[1] + 1))
        else:
            side = int(np.exp(rng.uniform(np.log(SMALL_SIDE_PX[1]), np.log(size * 0.45))))
        side = min(side, size)
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        if taken[y0 : y0 + side, x0 : x0 + side].any():
            continue
        label = int(rng.integers(num_classes))
        mask = _shape_mask(SHAPES[label], side, rng).astype(bool)
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            continue
        region = picture[y0 : y0 + side, x0 : x0 + side]
        colour = _object_colour(rng, region.reshape(-1, 3).mean(axis=0))
        region[mask] = colour.astype(np.uint8)
        margin = 2
        taken[
            max(0, y0 - margin) : y0 + side + margin, max(0, x0 - margin) : x0 + side + margin
        ] = True
        box_xywh = [
            float(x0 + xs.min()),
            float(y0 + ys.min()),
            float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1),
        ]
        objects.append((box_xywh, label))
    return picture, objects


def make_synthetic_dataset(
    out_dir: Path,
    num_images: int,
    num_classes: int = 3,
    size: int = 320,
    seed: int = 0,
    max_objects: int = 6,
) -> Path:
    """Write ``num_images`` JPEG pictures and a COCO ``annotations.json``; returns the JSON's path.

    Args:
        out_dir: created if missing; ``images/`` and ``annotations.json`` are (over)written.
        num_images: at least 1.
        num_classes: 1..6, one shape each (``SHAPES``), COCO ids ``category_id(label)``.
        size: square picture side in pixels (>= 32).
        seed: the same seed writes the same set.
        max_objects: at most this many shapes per picture (>= 1).
    """
    if num_images < 1:
        raise ValueError(f"num_images={num_images}: must be >= 1")
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(
            f"num_classes={num_classes}: must be 1..{len(SHAPES)} (one shape per class)"
        )
    if size < 32:
        raise ValueError(f"size={size}: must be >= 32 pixels")
    if max_objects < 1:
        raise ValueError(f"max_objects={max_objects}: must be >= 1")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(num_images):
        picture, objects = _draw_image(rng, size, num_classes, max_objects)
        file_name = f"images/{index:05d}.jpg"
        if not cv2.imwrite(
            str(out_dir / file_name),
            cv2.cvtColor(picture, cv2.COLOR_RGB2BGR),
            [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY],
        ):
            raise OSError(f"cannot write {out_dir / file_name}")
        images.append({"id": index + 1, "file_name": file_name, "width": size, "height": size})
        for box_xywh, label in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": category_id(label),
                    "bbox": box_xywh,
                    "area": box_xywh[2] * box_xywh[3],
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": category_id(k), "name": SHAPES[k], "supercategory": "shape"}
        for k in range(num_classes)
    ]
    path = out_dir / "annotations.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    logger.info(
        "synthetic set: %d images, %d boxes, %d classes -> %s",
        num_images,
        len(annotations),
        num_classes,
        path,
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dfine.train.synthetic",
        description="Write a synthetic shapes detection set (COCO JSON).",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--images", type=int, default=200, help="number of images (default 200)")
    parser.add_argument("--classes", type=int, default=3, help=f"1..{len(SHAPES)} (default 3)")
    parser.add_argument("--size", type=int, default=320, help="image side in pixels (default 320)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-objects", type=int, default=6, help="shapes per image at most (default 6)"
    )
    args = parser.parse_args(argv)
    try:
        path = make_synthetic_dataset(
            args.out, args.images, args.classes, args.size, args.seed, args.max_objects
        )
    except ValueError as exc:
        # The command line is this function's whole job: errors and the result go to the terminal.
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    print(path)  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
