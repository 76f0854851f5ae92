"""Does an FP16 release keep the FP32 weights' boxes? The check behind a model card's FP16 line.

    .venv/bin/python -m bench.release_precision --fp32 RUN/fp32.pth --fp16 model.pth
        [--clip assets/people_indoor_768x432_cut.mp4] [--frames 30] [--threshold 0.3]

Both files (``finestream release`` with and without ``--fp32``) run in the torch backend at their
recorded input side on the same frames. Each FP32 detection at or above ``--threshold`` is
matched one to one (same class, highest IoU: ``bench.int8.matched_iou``) to an FP16 detection; the figures
are how many were matched and the largest and median corner difference in source pixels.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import configure_logging, write_json
from bench.drone import read_frames
from bench.int8 import matched_iou
from bench.uncertainty import TorchDetector

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO / "assets" / "people_indoor_768x432_cut.mp4"


def compare(fp32: Path, fp16: Path, frames: list[np.ndarray], threshold: float) -> dict[str, Any]:
    """Corner differences (px) between the two files' confident boxes, matched per frame."""
    low = min(threshold, 0.05)  # FP16 may put a box just under the threshold: look below it
    reference = TorchDetector(fp32, None, low, threads=2)
    candidate = TorchDetector(fp16, None, low, threads=2)
    diffs_px: list[float] = []
    confident = unmatched = 0
    for index, image in enumerate(frames):
        a, b = reference(index, image), candidate(index, image)
        keep = a.scores >= threshold
        ref = (a.class_ids[keep], a.boxes_xyxy[keep], a.scores[keep])
        confident += len(ref[0])
        _, match = matched_iou(ref, (b.class_ids, b.boxes_xyxy, b.scores))
        unmatched += int((match < 0).sum())
        for box_xyxy, j in zip(ref[1], match, strict=True):
            if j >= 0:
                diffs_px.append(float(np.abs(box_xyxy - b.boxes_xyxy[j]).max()))
    return {
        "frames": len(frames),
        "threshold": threshold,
        "confident_fp32_boxes": confident,
        "unmatched": unmatched,
        "max_corner_diff_px": max(diffs_px, default=0.0),
        "median_corner_diff_px": float(np.median(diffs_px)) if diffs_px else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp32", type=Path, required=True, help="finestream release --fp32 file")
    parser.add_argument("--fp16", type=Path, required=True, help="finestream release file")
    parser.add_argument("--clip", type=Path, default=CLIP)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    result = compare(args.fp32, args.fp16, read_frames(args.clip, args.frames), args.threshold)
    print(
        f"{result['confident_fp32_boxes']} FP32 boxes >= {args.threshold} over "
        f"{result['frames']} frames, {result['unmatched']} unmatched; corner difference "
        f"max {result['max_corner_diff_px']:.3f} px, median {result['median_corner_diff_px']:.3f} px"
    )
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
