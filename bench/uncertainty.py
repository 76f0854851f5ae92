"""Per-edge uncertainty on a real clip: spread vs box size, and spread-weighted tracking.

    .venv/bin/python -m bench.uncertainty [--model CKPT.pth] [--clip VIDEO] [--frames 150]
        [--threshold 0.35] [--weights 0.5,1,2,4] [--out bench/out/uncertainty] [--json out.json]

The model runs in the torch backend (which always computes ``edge_std_px``, the standard
deviation of each box edge from D-FINE's final-layer distributions, in source pixels). Three
things are measured on the same frames:

1. **Agreement**: the same checkpoint exported with ``--edge-std`` and run in ONNX Runtime on the
   first frames; the largest |torch - ORT| spread over detections matched one to one.
2. **Spread vs box size**: every kept detection's left/right spreads against its width and its
   top/bottom spreads against its height; a scatter (``spread_vs_size.png`` in ``--out``, log
   axes, absolute and relative to the side), the rank correlation and medians per size bin.
3. **Tracking**: the clip's reference tracks are the NanoDet teacher's (its confirmed tracks seen
   on >= 10 frames, default tracker), as in ``bench/drone.py``; the model's detections are
   tracked with ``track.spread_weight`` 0 (plain 1 - IoU) and each ``--weights`` value, and each
   run's ids are matched per frame to the reference (IoU >= 0.5): ids, fragments (extra ids per
   reference track), id switches (consecutive matched frames whose id changes) and coverage (the
   share of reference frames with a confirmed id), the same counts as ``bench/drone.py``.
4. **Control with a known spread**: the teacher's own boxes with each edge moved by Gaussian
   noise of a known, per-detection standard deviation (drawn log-uniformly between
   ``--noise-min`` and ``--noise-max`` of the box side), that standard deviation handed to the
   tracker as ``edge_std_px``, tracked plain and spread-weighted against the clean boxes' tracks;
   plus two controls that tell information from mere looseness: the same spreads shuffled among
   the detections of each frame, and the plain tracker with a looser ``distance_threshold``.

With the calibrated fixture (random weights; the default when no ``--model`` is given) the
figures measure the plumbing, not a detector: say which model a figure came from.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import spearmanr

from bench.common import configure_logging, machine_info, write_json
from bench.drone import Detector, _iou, _tracked, read_frames
from dfine.backends.device import Device
from dfine.backends.onnx_backend import OnnxRuntimeBackend
from stages.frame import Detections, FramePacket
from stages.infer import Backend, InferConfig, InferenceStage, make_backend, prepare_model
from stages.preprocess import PreprocessConfig, Preprocessor
from stages.tiling import TilingConfig
from stages.track import TrackConfig

logger = logging.getLogger(__name__)

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURE = SHARED / "fixtures" / "dfine_n_calibrated" / "dfine_n_calibrated.pth"
# COCO's small / medium / large split, on the side instead of the area.
SIZE_BINS_PX = (0.0, 32.0, 96.0, float("inf"))


class TorchDetector:
    """Preprocessor + inference stage on the torch backend (which gives ``edge_std_px``)."""

    def __init__(self, model: Path, imgsz: int | None, threshold: float, threads: int) -> None:
        prepared = prepare_model(
            InferConfig(
                model=model,
                backend=Backend.TORCH,
                device=Device.CPU,
                imgsz=imgsz,
                score_threshold=threshold,
                intra_op_threads=threads,
            )
        )
        config = prepared.config
        assert config.imgsz is not None
        self.imgsz = config.imgsz
        self.size = config.size
        self.infer = InferenceStage(config, lambda: make_backend(config, prepared.info))
        self.infer.setup()
        self.pre = Preprocessor(PreprocessConfig(input_size=config.imgsz, device=Device.CPU))

    def __call__(self, index: int, image: np.ndarray) -> Detections:
        packet = FramePacket("0", index, index / 30.0, image, time.monotonic())
        self.infer.process(self.pre.process(packet))
        assert packet.detections is not None and packet.detections.edge_std_px is not None
        return packet.detections


def agreement(model: Path, imgsz: int, frames: list[np.ndarray]) -> dict[str, Any]:
    """Largest |torch - ONNX Runtime| edge spread (px) on ``frames``, detections matched by
    label and box (near-tied scores may be ordered differently)."""
    from dfine.backends.torch_backend import TorchBackend
    from dfine.export import export_from_checkpoint
    from dfine.model_info import read_model_info
    from stages.preprocess import image_to_model_input

    info = read_model_info(model)
    assert info.size is not None
    torch_backend = TorchBackend.from_checkpoint(
        model, info.size, info.num_classes, input_size_hw=(imgsz, imgsz)
    )
    worst_px, worst_box_px, pairs = 0.0, 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_from_checkpoint(
            model, None, None, Path(tmp) / "edge_std.onnx", imgsz, edge_std=True
        )
        ort_backend = OnnxRuntimeBackend(onnx_path, intra_op_threads=1)
        for image in frames:
            images = image_to_model_input(image, imgsz, torch.device("cpu"), resize_in_uint8=True)
            sizes = torch.tensor([[image.shape[1], image.shape[0]]])
            a, b = torch_backend.detect(images, sizes), ort_backend.detect(images, sizes)
            assert a.edge_std_px is not None and b.edge_std_px is not None
            cost = np.abs(a.boxes_xyxy[0][:, None] - b.boxes_xyxy[0][None]).sum(-1)
            cost += 1e6 * (a.labels[0][:, None] != b.labels[0][None])
            rows, cols = linear_sum_assignment(cost)
            same = a.labels[0][rows] == b.labels[0][cols]
            rows, cols = rows[same], cols[same]
            pairs += len(rows)
            worst_px = max(
                worst_px, float(np.abs(a.edge_std_px[0][rows] - b.edge_std_px[0][cols]).max())
            )
            worst_box_px = max(
                worst_box_px, float(np.abs(a.boxes_xyxy[0][rows] - b.boxes_xyxy[0][cols]).max())
            )
    return {
        "frames": len(frames),
        "pairs": pairs,
        "max_edge_std_diff_px": worst_px,
        "max_box_diff_px": worst_box_px,
    }


def spread_vs_size(detections: list[Detections]) -> dict[str, Any]:
    """Per edge: (side px, spread px) pairs, their rank correlation and per-bin medians."""
    sides, spreads = [], []
    for dets in detections:
        if not len(dets) or dets.edge_std_px is None:
            continue
        w = dets.boxes_xyxy[:, 2] - dets.boxes_xyxy[:, 0]
        h = dets.boxes_xyxy[:, 3] - dets.boxes_xyxy[:, 1]
        std = dets.edge_std_px
        sides += [w, h, w, h]
        spreads += [std[:, 0], std[:, 1], std[:, 2], std[:, 3]]
    side = np.concatenate(sides) if sides else np.zeros(0)
    spread = np.concatenate(spreads) if spreads else np.zeros(0)
    keep = side >= 1.0  # boxes clipped to a sliver at the frame's border say nothing of size
    side, spread = side[keep], spread[keep]
    bins = []
    for low, high in zip(SIZE_BINS_PX[:-1], SIZE_BINS_PX[1:]):
        inside = (side >= low) & (side < high)
        n = int(inside.sum())
        bins.append(
            {
                "side_px": f"{low:.0f}-{high:.0f}" if np.isfinite(high) else f">= {low:.0f}",
                "edges": n,
                "median_std_px": float(np.median(spread[inside])) if n else None,
                "median_std_over_side": float(np.median(spread[inside] / side[inside]))
                if n
                else None,
            }
        )
    rho_abs = float(spearmanr(side, spread).statistic) if len(side) > 2 else None
    rho_rel = float(spearmanr(side, spread / side).statistic) if len(side) > 2 else None
    return {
        "edges": len(side),
        "spearman_std_vs_side": rho_abs,
        "spearman_relative_std_vs_side": rho_rel,
        "bins": bins,
        "_side": side,
        "_spread": spread,
    }


def plot(side: np.ndarray, spread: np.ndarray, path: Path, title: str) -> Path:
    """Scatter of spread vs side, absolute and relative, log axes; a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, y, label in (
        (axes[0], spread, "edge std (px)"),
        (axes[1], spread / side, "edge std / box side"),
    ):
        ax.scatter(side, y, s=3, alpha=0.25, linewidths=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("box side along the edge's axis (px)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def id_metrics(reference: list[Detections], run: list[Detections]) -> dict[str, Any]:
    """ids, fragments, id switches and coverage of ``run`` against the reference's confirmed
    tracks seen on >= 10 frames (per frame, best IoU >= 0.5), as ``bench/drone.py`` counts."""
    lengths = Counter(int(t) for d in reference for t in d.track_ids if t >= 0)
    long_ids = {t for t, n in lengths.items() if n >= 10}
    matched: dict[int, list[int]] = defaultdict(list)
    for ref, dets in zip(reference, run):
        keep = np.isin(ref.track_ids, list(long_ids))
        if not keep.any():
            continue
        ref_boxes, ref_ids = ref.boxes_xyxy[keep], ref.track_ids[keep]
        boxes = dets.boxes_xyxy
        iou = _iou(ref_boxes, boxes) if len(boxes) else np.zeros((len(ref_boxes), 0))
        for r, ref_id in enumerate(ref_ids.tolist()):
            j = int(iou[r].argmax()) if iou.shape[1] else -1
            hit = j >= 0 and iou[r, j] >= 0.5 and dets.track_ids[j] >= 0
            matched[ref_id].append(int(dets.track_ids[j]) if hit else -1)
    ids_per_track = [len({i for i in seen if i >= 0}) for seen in matched.values()]
    frames_total = sum(len(seen) for seen in matched.values())
    covered = sum(sum(1 for i in seen if i >= 0) for seen in matched.values())
    switches = 0
    for seen in matched.values():
        ids = [i for i in seen if i >= 0]
        switches += sum(1 for a, b in zip(ids, ids[1:]) if a != b)
    return {
        "reference_tracks": len(long_ids),
        "ids": len({int(t) for d in run for t in d.track_ids if t >= 0}),
        "fragments": sum(max(0, n - 1) for n in ids_per_track),
        "id_switches": switches,
        "coverage": covered / frames_total if frames_total else 0.0,
    }


def noisy_boxes(
    clean: list[Detections], low: float, high: float, seed: int
) -> tuple[list[Detections], list[Detections]]:
    """The ``clean`` boxes with each edge moved by N(0, s), ``s = r * side`` and ``r`` drawn
    log-uniformly in [low, high] per detection; returned with ``edge_std_px = s`` and with the
    same spreads shuffled among each frame's detections (no information, the same magnitudes)."""
    rng = np.random.default_rng(seed)
    noisy, shuffled = [], []
    for dets in clean:
        n = len(dets)
        boxes = dets.boxes_xyxy.astype(np.float64)
        w = np.maximum(boxes[:, 2] - boxes[:, 0], 1.0)
        h = np.maximum(boxes[:, 3] - boxes[:, 1], 1.0)
        ratio = np.exp(rng.uniform(np.log(low), np.log(high), size=n))
        std = np.stack([ratio * w, ratio * h, ratio * w, ratio * h], axis=1)
        moved = boxes + rng.normal(size=(n, 4)) * std
        # Keep every box the right way round (a large draw may cross its edges).
        x1, x2 = np.minimum(moved[:, 0], moved[:, 2]), np.maximum(moved[:, 0], moved[:, 2])
        y1, y2 = np.minimum(moved[:, 1], moved[:, 3]), np.maximum(moved[:, 1], moved[:, 3])
        moved = np.stack([x1, y1, x2 + 1.0, y2 + 1.0], axis=1).astype(np.float32)
        common = {"scores": dets.scores, "class_ids": dets.class_ids}
        noisy.append(Detections(moved, edge_std_px=std.astype(np.float32), **common))
        mixed = std[rng.permutation(n)] if n else std
        shuffled.append(Detections(moved, edge_std_px=mixed.astype(np.float32), **common))
    return noisy, shuffled


def _positive_floats(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"want a comma-separated list of numbers > 0, got {text!r}"
        )
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=FIXTURE, help="a D-FINE .pth")
    parser.add_argument("--imgsz", type=int, default=None, help="default: what the file says")
    parser.add_argument(
        "--clip", type=Path, default=SHARED / "media" / "traffic_highway_960x540.mp4"
    )
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--threshold", type=float, default=0.35)
    parser.add_argument(
        "--teacher", type=Path, default=SHARED / "teachers" / "nanodet_coco_416.onnx"
    )
    parser.add_argument("--weights", type=_positive_floats, default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--agreement-frames", type=int, default=3)
    parser.add_argument("--noise-min", type=float, default=0.02, help="of the side, control 4")
    parser.add_argument("--noise-max", type=float, default=0.25, help="of the side, control 4")
    parser.add_argument(
        "--seeds", type=str, default="0,1,2,3,4", help="noise draws of control 4, summed"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/out/uncertainty"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    for name in ("model", "clip", "teacher"):
        path = getattr(args, name)
        if not path.is_file():
            parser.error(f"--{name} {path}: no such file")
    if args.frames < 10:
        parser.error(f"--frames must be >= 10 (reference tracks need 10 frames), got {args.frames}")
    torch.set_num_threads(args.threads)

    result: dict[str, Any] = {
        "machine": machine_info(),
        "model": str(args.model),
        "clip": str(args.clip),
        "threshold": args.threshold,
    }
    frames = read_frames(args.clip, args.frames)
    cpu_start = time.process_time()
    detector = TorchDetector(args.model, args.imgsz, args.threshold, args.threads)
    detections = [detector(i, image) for i, image in enumerate(frames)]
    result["imgsz"] = detector.imgsz
    result["detections_per_frame"] = sum(len(d) for d in detections) / len(frames)
    result["model_cpu_s_per_frame"] = (time.process_time() - cpu_start) / len(frames)

    result["agreement"] = agreement(
        args.model, detector.imgsz, frames[: max(1, args.agreement_frames)]
    )

    size = spread_vs_size(detections)
    side, spread = size.pop("_side"), size.pop("_spread")
    result["spread_vs_size"] = size
    if len(side):
        png = plot(
            side,
            spread,
            args.out / "spread_vs_size.png",
            f"{args.model.name} on {args.clip.name}: {len(frames)} frames, score >= {args.threshold}",
        )
        result["plot"] = str(png)

    teacher = Detector(args.teacher, TilingConfig(), args.threads)
    teacher_dets = [teacher(i, image) for i, image in enumerate(frames)]
    reference, _ = _tracked(zip(frames, teacher_dets), TrackConfig())
    runs: dict[str, Any] = {}
    for weight in [0.0, *args.weights]:
        tracked, _ = _tracked(zip(frames, detections), TrackConfig(spread_weight=weight))
        runs[f"spread_weight {weight:g}"] = id_metrics(reference, tracked)
    result["tracking"] = runs

    seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    per_seed: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for seed in seeds:
        noisy, shuffled = noisy_boxes(reference, args.noise_min, args.noise_max, seed)
        runs_of_seed: list[tuple[str, list[Detections], TrackConfig]] = [
            (f"spread_weight {w:g}", noisy, TrackConfig(spread_weight=w))
            for w in [0.0, *args.weights]
        ]
        runs_of_seed += [
            (f"spread_weight {w:g}, spreads shuffled", shuffled, TrackConfig(spread_weight=w))
            for w in args.weights
        ]
        runs_of_seed += [
            (f"plain, distance_threshold {t:g}", noisy, TrackConfig(distance_threshold=t))
            for t in (0.8, 0.9)
        ]
        for name, dets, config in runs_of_seed:
            tracked, _ = _tracked(zip(frames, dets), config)
            per_seed[name].append(id_metrics(reference, tracked))
    control = {
        name: {
            "ids": sum(r["ids"] for r in rs),
            "fragments": sum(r["fragments"] for r in rs),
            "id_switches": sum(r["id_switches"] for r in rs),
            "coverage": float(np.mean([r["coverage"] for r in rs])),
            "id_switches_per_seed": [r["id_switches"] for r in rs],
        }
        for name, rs in per_seed.items()
    }
    result["control_known_spread"] = {
        "noise_of_side": [args.noise_min, args.noise_max],
        "seeds": seeds,
        "runs": control,
    }
    _print(result)
    write_json(args.json, result)
    return 0


def _print(result: dict[str, Any]) -> None:
    a = result["agreement"]
    print(
        f"model {result['model']} at {result['imgsz']} px on {result['clip']}, score >= "
        f"{result['threshold']}: {result['detections_per_frame']:.1f} detections / frame, "
        f"{result['model_cpu_s_per_frame']:.2f} CPU-s / frame (torch, spreads included)"
    )
    print(
        f"torch vs ONNX Runtime ({a['frames']} frames, {a['pairs']} matched detections): "
        f"edge std within {a['max_edge_std_diff_px']:.4f} px, boxes within {a['max_box_diff_px']:.4f} px"
    )
    s = result["spread_vs_size"]
    rho, rho_rel = s["spearman_std_vs_side"], s["spearman_relative_std_vs_side"]
    print(
        f"\nspread vs size: {s['edges']} edges; Spearman rho(std, side) = "
        f"{rho if rho is None else round(rho, 3)}, rho(std / side, side) = "
        f"{rho_rel if rho_rel is None else round(rho_rel, 3)}; plot {result.get('plot')}"
    )
    print("| side (px) | edges | median std (px) | median std / side |")
    print("| --- | ---: | ---: | ---: |")
    for b in s["bins"]:
        med = "-" if b["median_std_px"] is None else f"{b['median_std_px']:.2f}"
        rel = "-" if b["median_std_over_side"] is None else f"{b['median_std_over_side']:.3f}"
        print(f"| {b['side_px']} | {b['edges']} | {med} | {rel} |")
    runs = result["tracking"]
    first = next(iter(runs.values()))
    print(
        f"\ntracking against the teacher's {first['reference_tracks']} reference tracks "
        "(>= 10 frames, IoU >= 0.5):"
    )
    print("| tracker | ids | fragments | id switches | reference frames with a confirmed id |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in runs.items():
        print(
            f"| {name} | {r['ids']} | {r['fragments']} | {r['id_switches']} "
            f"| {100 * r['coverage']:.0f} % |"
        )
    c = result["control_known_spread"]
    print(
        f"\ncontrol: the teacher's boxes moved by known noise (std {c['noise_of_side'][0]:g}-"
        f"{c['noise_of_side'][1]:g} of the side), that std as edge_std_px, against the clean "
        f"boxes' tracks; sums over {len(c['seeds'])} noise draws (seeds {c['seeds']}):"
    )
    print(
        "| tracker | ids | fragments | id switches (per draw) "
        "| reference frames with a confirmed id |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in c["runs"].items():
        draws = ", ".join(str(v) for v in r["id_switches_per_seed"])
        print(
            f"| {name} | {r['ids']} | {r['fragments']} | {r['id_switches']} ({draws}) "
            f"| {100 * r['coverage']:.0f} % |"
        )
    print(f"\nload average (1, 5, 15 min) at the start: {result['machine']['load_avg_1_5_15']}")


if __name__ == "__main__":
    raise SystemExit(main())
