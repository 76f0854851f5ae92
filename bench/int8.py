"""INT8 against FP32: ms per frame, file size and agreement of the boxes, on real frames.

Usage::

    python -m bench.int8 [--calibrate traffic_highway_960x540.mp4] [--frames 64]
        [--imgsz 320,640] [--rounds 20] [--threads 1] [--quick] [--json out.json]
        [--checkpoint CKPT --dfine-threshold 0.2] [--no-teacher]

Models: the NanoDet teacher (``../shared/teachers``, a real COCO detector, already ONNX) and
the calibrated fixture D-FINE-N (``../shared/fixtures``, random but numerically active weights)
exported at each ``--imgsz``. Each is quantised by ``dfine.quantize.quantize_int8`` with
``--frames`` calibration frames of the ``--calibrate`` clip, and evaluated on *other* frames:
frames between the calibration ones of that clip, and frames of two clips of another size.

Tables:

1. What to keep in float (the teacher): no part, each ``FloatPart``, both; the measurement the
   default was chosen by.
2. Calibration method (the teacher, default parts): minmax, entropy, percentile.
3. The same for D-FINE-N at the smallest ``--imgsz``, with two name-based choices between "all
   quantised" and "decoder in float" (postprocessor; postprocessor + decoder heads + the decoder's
   own arithmetic: distribution softmax, integral, box refinement, query selection).
4. Speed and size, FP32 vs INT8 (default parts, minmax) for every model.

Agreement, FP32 → INT8 (:func:`box_agreement`): the teacher's confident FP32 boxes (score ≥
0.35, its usual threshold) that the INT8 model reproduces: same label, IoU ≥ 0.9, INT8 score ≥
half the threshold ("matched"; "kept" also needs the INT8 score ≥ the threshold). The fixture's
random weights give no confident boxes (scores 0.04 to 0.1, near-tied), so for it the FP32
top-20 is matched against all INT8 boxes, and a control row shows how much FP32 itself agrees
with FP32 when the input moves by one grey level: on such a model top-k agreement says little.

A trained D-FINE checkpoint (``--checkpoint``, e.g. the demo model) is judged like the
teacher with ``--dfine-threshold``: its FP32 boxes scoring at least that.

Timing: FP32 and INT8 sessions of one model run interleaved (one call each per round, order
alternating), batch 1, the same ``--threads`` intra-op threads; CPU ms per frame is
``time.process_time`` per call (with 1 thread ONNX Runtime computes on the calling thread, so it
is what the inference cost, whatever else loads the machine), wall ms the median of
``time.perf_counter``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from bench.common import configure_logging, machine_info, write_json
from dfine.quantize import CalibrationMethod, FloatPart, check_calibration_source, quantize_int8

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MEDIA = SHARED / "media"
TEACHER = SHARED / "teachers" / "nanodet_coco_416.onnx"
FIXTURE_CKPT = SHARED / "fixtures" / "dfine_n_calibrated" / "dfine_n_calibrated.pth"
#: evaluation clips besides the calibration clip: other scenes and another frame size.
EVAL_CLIPS = ("people_indoor_768x432.mp4", "parking_overhead_768x432.mp4")
TEACHER_THRESHOLD = 0.35
MATCH_IOU = 0.9
TOP_K = 20

Frame = tuple[np.ndarray, np.ndarray, np.ndarray]  # labels (K,), boxes_xyxy (K, 4), scores (K,)


@dataclass(frozen=True)
class Agreement:
    """How far INT8 detections reproduce FP32 ones (see :func:`box_agreement`).

    Attributes:
        ref_boxes: FP32 boxes judged (confident ones, or the top-k of each frame).
        matched: share of them with a same-label INT8 box at IoU ≥ ``MATCH_IOU`` (one-to-one)
            scoring at least half the threshold.
        kept: share matched whose INT8 score also reaches the threshold.
        median_iou: median over the judged boxes of the IoU of their match (0 when none).
        mean_abs_score_diff: mean |FP32 − INT8 score| over matched pairs.
        extra: share of confident INT8 boxes with no same-label FP32 box at IoU ≥ 0.5 scoring at
            least half the threshold (0 in top-k mode).
    """

    ref_boxes: int
    matched: float
    kept: float
    median_iou: float
    mean_abs_score_diff: float
    extra: float


def box_iou(a_xyxy: np.ndarray, b_xyxy: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` ``(N, 4)`` with every box of ``b`` ``(M, 4)`` → ``(N, M)``."""
    a = a_xyxy.astype(np.float64)[:, None, :]
    b = b_xyxy.astype(np.float64)[None, :, :]
    wh = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return np.asarray(inter / np.maximum(area_a + area_b - inter, 1e-9))


def matched_iou(ref: Frame, got: Frame) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one same-label match maximising IoU: per ``ref`` box its IoU (0 unmatched) and the
    index of its ``got`` box (-1)."""
    iou = box_iou(ref[1], got[1]) * (ref[0][:, None] == got[0][None, :])
    best, index = np.zeros(len(ref[0])), np.full(len(ref[0]), -1)
    if iou.size:
        rows, cols = linear_sum_assignment(-iou)
        best[rows], index[rows] = iou[rows, cols], cols
    index[best <= 0] = -1
    return best, index


def box_agreement(
    ref_frames: Sequence[Frame],
    got_frames: Sequence[Frame],
    score_threshold: float,
    *,
    top_k: int | None = None,
) -> Agreement:
    """Agreement of ``got_frames`` (INT8) with ``ref_frames`` (FP32), frame by frame.

    Args:
        ref_frames, got_frames: per frame ``labels (K,)``, ``boxes_xyxy (K, 4)``, ``scores (K,)``.
        score_threshold: FP32 boxes at or above it are judged; INT8 boxes count from half of it.
        top_k: judge each frame's ``top_k`` highest-scoring FP32 boxes instead, against all INT8
            boxes (for random-weight models without confident boxes).
    """
    if len(ref_frames) != len(got_frames):
        raise ValueError(f"{len(ref_frames)} reference frames but {len(got_frames)} to compare")
    ious: list[np.ndarray] = []
    kept = score_diffs = extra = confident_got = 0.0
    for ref, got in zip(ref_frames, got_frames):
        if top_k is not None:
            order = np.argsort(-ref[2], kind="stable")[:top_k]
            ref_sel, got_sel = tuple(a[order] for a in ref), got
        else:
            ref_sel = tuple(a[ref[2] >= score_threshold] for a in ref)
            got_sel = tuple(a[got[2] >= score_threshold / 2] for a in got)
        best, index = matched_iou(ref_sel, got_sel)  # type: ignore[arg-type]
        ok = best >= MATCH_IOU
        ious.append(best)
        got_scores = got_sel[2][index[ok]]
        kept += float((got_scores >= score_threshold).sum()) if top_k is None else float(ok.sum())
        score_diffs += float(np.abs(ref_sel[2][ok] - got_scores).sum())
        if top_k is None:
            got_conf = tuple(a[got[2] >= score_threshold] for a in got)
            ref_loose = tuple(a[ref[2] >= score_threshold / 2] for a in ref)
            back, _ = matched_iou(got_conf, ref_loose)  # type: ignore[arg-type]
            extra += float((back < 0.5).sum())
            confident_got += len(back)
    all_iou = np.concatenate(ious) if ious else np.zeros(0)
    n = len(all_iou)
    matched = int((all_iou >= MATCH_IOU).sum())
    return Agreement(
        ref_boxes=n,
        matched=matched / n if n else 0.0,
        kept=kept / n if n else 0.0,
        median_iou=float(np.median(all_iou)) if n else 0.0,
        mean_abs_score_diff=score_diffs / matched if matched else 0.0,
        extra=extra / confident_got if confident_got else 0.0,
    )


def clip_frames(path: Path, count: int, *, skip: set[int] | None = None) -> list[np.ndarray]:
    """``count`` frames spread evenly over the clip, none of the indices in ``skip`` (the
    calibration frames), as uint8 RGB pictures (the pipeline's decoding)."""
    from stages.decode import frame_to_rgb_u8

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        total = int(stream.frames) or sum(1 for p in container.demux(stream) if p.size > 0)
    candidates = [i for i in range(total) if i not in (skip or set())]
    wanted = {candidates[int(round(x))] for x in np.linspace(0, len(candidates) - 1, count)}
    out = []
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(container.streams.video[0])):
            if index in wanted:
                out.append(frame_to_rgb_u8(frame))
    return out


def calibration_indices(path: Path, count: int) -> set[int]:
    """The frame indices ``quantize_int8`` calibrates on (evenly spaced, as it picks them)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        total = int(stream.frames) or sum(1 for p in container.demux(stream) if p.size > 0)
    if total <= count:
        return set(range(total))
    return {int(round(i)) for i in np.linspace(0, total - 1, count)}


Inputs = list[tuple[torch.Tensor, torch.Tensor]]


def model_inputs(frames: Sequence[np.ndarray], side: int) -> Inputs:
    from stages.preprocess import image_to_model_input

    cpu = torch.device("cpu")
    return [
        (
            image_to_model_input(f, side, cpu, resize_in_uint8=True),
            torch.tensor([[f.shape[1], f.shape[0]]], dtype=torch.int64),
        )
        for f in frames
    ]


def _backend(path: Path, threads: int) -> Any:
    from dfine.backends.onnx_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(path, providers=["CPUExecutionProvider"], intra_op_threads=threads)


def detect_all(path: Path, inputs: Inputs, threads: int) -> list[Frame]:
    backend = _backend(path, threads)
    out = []
    for images, sizes in inputs:
        labels, boxes, scores = backend(images, sizes)
        out.append((labels[0], boxes[0], scores[0]))
    return out


@dataclass(frozen=True)
class SpeedRow:
    model: str
    fp32_mib: float
    int8_mib: float
    fp32_cpu_ms: float
    int8_cpu_ms: float
    fp32_wall_ms: float
    int8_wall_ms: float
    rounds: int
    threads: int


def time_pair(
    fp32: Path, int8: Path, images: torch.Tensor, sizes: torch.Tensor, rounds: int, threads: int
) -> tuple[float, float, float, float]:
    """Median CPU and wall ms per call of the two models, interleaved round by round."""
    backends = {"fp32": _backend(fp32, threads), "int8": _backend(int8, threads)}
    for backend in backends.values():
        for _ in range(2):  # warm-up: first calls allocate
            backend(images, sizes)
    cpu: dict[str, list[float]] = {k: [] for k in backends}
    wall: dict[str, list[float]] = {k: [] for k in backends}
    names = list(backends)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            c0, w0 = time.process_time(), time.perf_counter()
            backends[name](images, sizes)
            cpu[name].append((time.process_time() - c0) * 1000.0)
            wall[name].append((time.perf_counter() - w0) * 1000.0)
    med = statistics.median
    return med(cpu["fp32"]), med(cpu["int8"]), med(wall["fp32"]), med(wall["int8"])


@dataclass(frozen=True)
class ChoiceRow:
    model: str
    choice: str
    float_nodes: int
    nodes: int
    agreement: Agreement
    int8_cpu_ms: float
    quantize_cpu_s: float


def _quantize(
    fp32: Path,
    out: Path,
    calibrate: Path,
    frames: int,
    *,
    method: CalibrationMethod = CalibrationMethod.MINMAX,
    parts: Sequence[FloatPart] = (FloatPart.GEOMETRY, FloatPart.TAIL),
    extra: Sequence[str] = (),
) -> tuple[Any, float]:
    start = time.process_time()
    done = quantize_int8(
        fp32,
        out,
        check_calibration_source(calibrate),
        num_frames=frames,
        method=method,
        float_parts=parts,
        extra_float_nodes=extra,
    )
    return done, time.process_time() - start


def _cpu_ms_per_frame(path: Path, inputs: Inputs, threads: int) -> float:
    backend = _backend(path, threads)
    backend(*inputs[0])
    start = time.process_time()
    for images, sizes in inputs:
        backend(images, sizes)
    return (time.process_time() - start) * 1000.0 / len(inputs)


def _dfine_name_groups(fp32: Path) -> dict[str, list[str]]:
    """D-FINE node names by part, from the export's module paths (``/postprocessor/...``)."""
    import onnx

    names = [n.name for n in onnx.load(str(fp32)).graph.node]
    post = [n for n in names if n.startswith("/postprocessor/")]
    heads = [
        n
        for n in names
        if re.match(
            r"/model/decoder/(dec_score_head|dec_bbox_head|pre_bbox_head|enc_score_head|"
            r"enc_bbox_head|lqe_layers)",
            n,
        )
    ]
    # The decoder's own ops outside its layers and heads: the distribution softmax + integral,
    # box refinement, inverse sigmoid, the encoder-output top-k that selects the queries.
    own = [n for n in names if re.fullmatch(r"/model/decoder/[A-Z][A-Za-z]*(_\d+)?", n)]
    return {"postprocess": post, "heads+integral": post + heads + own}


def _noisy(inputs: Inputs, seed: int = 0) -> Inputs:
    """The inputs moved by one grey level (±1/255, clipped): the control for top-k agreement."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for images, sizes in inputs:
        step = torch.randint(-1, 2, images.shape, generator=generator).float() / 255.0
        out.append(((images + step).clamp_(0.0, 1.0), sizes))
    return out


def measure(
    calibrate: Path,
    frames: int,
    imgszs: Sequence[int],
    rounds: int,
    threads: int,
    quick: bool,
    checkpoint: Path = FIXTURE_CKPT,
    dfine_threshold: float | None = None,
    teacher: bool = True,
) -> dict[str, Any]:
    from dfine.export import export_from_checkpoint

    cal_idx = calibration_indices(calibrate, frames)
    eval_per_clip = 8 if quick else 20
    eval_frames = clip_frames(calibrate, 2 * eval_per_clip, skip=cal_idx)
    for name in EVAL_CLIPS:
        eval_frames += clip_frames(MEDIA / name, eval_per_clip)
    print(f"  {len(eval_frames)} evaluation frames", file=sys.stderr)
    choices: list[ChoiceRow] = []
    speed: list[SpeedRow] = []
    controls: dict[str, Agreement] = {}
    with tempfile.TemporaryDirectory(prefix="bench_int8_") as tmp:
        work = Path(tmp)
        if teacher:  # --- the teacher ---
            t_inputs = model_inputs(eval_frames, 416)
            t_ref = detect_all(TEACHER, t_inputs, threads)
            part_sets: list[tuple[str, tuple[FloatPart, ...]]] = [
                ("nothing in float", ()),
                ("geometry", (FloatPart.GEOMETRY,)),
                ("tail", (FloatPart.TAIL,)),
                ("geometry + tail (default)", (FloatPart.GEOMETRY, FloatPart.TAIL)),
            ]
            methods = [CalibrationMethod.MINMAX] if quick else list(CalibrationMethod)
            runs: list[tuple[str, tuple[FloatPart, ...], CalibrationMethod]] = [
                (label, parts, CalibrationMethod.MINMAX) for label, parts in part_sets
            ] + [
                (f"default parts, {m.value}", (FloatPart.GEOMETRY, FloatPart.TAIL), m)
                for m in methods
                if m is not CalibrationMethod.MINMAX
            ]
            teacher_int8 = work / "teacher.int8.onnx"
            for i, (label, parts, method) in enumerate(runs):
                out = work / f"teacher_{i}.onnx"
                done, q_s = _quantize(TEACHER, out, calibrate, frames, method=method, parts=parts)
                got = detect_all(out, t_inputs, threads)
                row = ChoiceRow(
                    "NanoDet teacher 416",
                    label,
                    done.float_nodes,
                    done.nodes,
                    box_agreement(t_ref, got, TEACHER_THRESHOLD),
                    _cpu_ms_per_frame(out, t_inputs[:10], threads),
                    q_s,
                )
                print(
                    f"  {row.model}: {label}: matched {row.agreement.matched:.3f}", file=sys.stderr
                )
                choices.append(row)
                if label.endswith("(default)"):
                    out.replace(teacher_int8)
            speed.append(
                _speed_row("NanoDet teacher 416", TEACHER, teacher_int8, t_inputs, rounds, threads)
            )

        # --- D-FINE: the fixture, or --checkpoint ---
        for k, side in enumerate(sorted(imgszs)):
            fp32 = work / f"dfine_n_{side}.onnx"
            export_from_checkpoint(checkpoint, None, None, fp32, side)
            d_inputs = model_inputs(eval_frames, side)
            d_ref = detect_all(fp32, d_inputs, threads)
            weights = "fixture" if checkpoint == FIXTURE_CKPT else checkpoint.name
            model = f"D-FINE {weights} {side}"

            def agreement(ref: list[Frame], got: list[Frame]) -> Agreement:
                if dfine_threshold is not None:  # a trained model: its confident boxes
                    return box_agreement(ref, got, dfine_threshold)
                return box_agreement(ref, got, 0.0, top_k=TOP_K)

            controls[model] = agreement(d_ref, detect_all(fp32, _noisy(d_inputs), threads))
            d_runs: list[tuple[str, tuple[FloatPart, ...], list[str]]] = [
                ("geometry + tail (default)", (FloatPart.GEOMETRY, FloatPart.TAIL), [])
            ]
            if k == 0 and not quick:
                groups = _dfine_name_groups(fp32)
                d_runs = [
                    ("nothing in float", (), []),
                    ("geometry", (FloatPart.GEOMETRY,), []),
                    ("geometry + postprocessor", (FloatPart.GEOMETRY,), groups["postprocess"]),
                    (
                        "geometry + postprocessor + heads + integral",
                        (FloatPart.GEOMETRY,),
                        groups["heads+integral"],
                    ),
                    *d_runs,
                ]
            for i, (label, parts, extra) in enumerate(d_runs):
                out = work / f"dfine_n_{side}_{i}.int8.onnx"
                done, q_s = _quantize(fp32, out, calibrate, frames, parts=parts, extra=extra)
                got = detect_all(out, d_inputs, threads)
                row = ChoiceRow(
                    model,
                    label,
                    done.float_nodes,
                    done.nodes,
                    agreement(d_ref, got),
                    _cpu_ms_per_frame(out, d_inputs[:10], threads),
                    q_s,
                )
                print(f"  {model}: {label}: matched {row.agreement.matched:.3f}", file=sys.stderr)
                choices.append(row)
            speed.append(_speed_row(model, fp32, out, d_inputs, rounds, threads))
    return {
        "choices": [asdict(c) for c in choices],
        "speed": [asdict(s) for s in speed],
        "controls": {k: asdict(v) for k, v in controls.items()},
        "eval_frames": len(eval_frames),
    }


def _speed_row(
    model: str, fp32: Path, int8: Path, inputs: Inputs, rounds: int, threads: int
) -> SpeedRow:
    mib = 1024.0 * 1024.0
    timings = time_pair(fp32, int8, *inputs[0], rounds, threads)
    row = SpeedRow(
        model, fp32.stat().st_size / mib, int8.stat().st_size / mib, *timings, rounds, threads
    )
    print(
        f"  {model}: cpu ms fp32 {row.fp32_cpu_ms:.1f} int8 {row.int8_cpu_ms:.1f}", file=sys.stderr
    )
    return row


def format_tables(result: dict[str, Any]) -> str:
    lines = [
        "| model | kept in float | float nodes | matched | kept | median IoU | mean abs Δscore | "
        "extra | INT8 CPU ms/frame | quantise CPU s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["choices"]:
        a = c["agreement"]
        lines.append(
            f"| {c['model']} | {c['choice']} | {c['float_nodes']}/{c['nodes']} | "
            f"{a['matched']:.3f} | {a['kept']:.3f} | {a['median_iou']:.3f} | "
            f"{a['mean_abs_score_diff']:.3f} | {a['extra']:.3f} | {c['int8_cpu_ms']:.1f} | "
            f"{c['quantize_cpu_s']:.1f} |"
        )
    for model, a in result["controls"].items():
        lines.append(
            f"| {model} | control: FP32 vs FP32 on input ±1/255 | – | {a['matched']:.3f} | – | "
            f"{a['median_iou']:.3f} | {a['mean_abs_score_diff']:.3f} | – | – | – |"
        )
    lines += [
        "",
        "| model | FP32 MiB | INT8 MiB | FP32 CPU ms | INT8 CPU ms | CPU ratio | FP32 wall ms | "
        "INT8 wall ms | wall ratio | rounds | threads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in result["speed"]:
        lines.append(
            f"| {s['model']} | {s['fp32_mib']:.1f} | {s['int8_mib']:.1f} | {s['fp32_cpu_ms']:.1f} | "
            f"{s['int8_cpu_ms']:.1f} | {s['fp32_cpu_ms'] / s['int8_cpu_ms']:.2f}× | "
            f"{s['fp32_wall_ms']:.1f} | {s['int8_wall_ms']:.1f} | "
            f"{s['fp32_wall_ms'] / s['int8_wall_ms']:.2f}× | {s['rounds']} | {s['threads']} |"
        )
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 320,640, got {text!r}") from None
    if not values or any(v < 32 or v % 32 for v in values):
        raise argparse.ArgumentTypeError(f"expected multiples of 32 like 320,640, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.int8", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--calibrate",
        type=Path,
        default=MEDIA / "traffic_highway_960x540.mp4",
        help="calibration clip (default: the highway clip in ../shared/media)",
    )
    parser.add_argument("--frames", type=int, default=64, help="calibration frames (default 64)")
    parser.add_argument("--imgsz", type=_int_list, default=[320, 640], help="D-FINE input sizes")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per model")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads, both models")
    parser.add_argument(
        "--quick", action="store_true", help="default choices only, fewer frames (a smoke run)"
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=FIXTURE_CKPT,
        help="the D-FINE .pth (default: the calibrated random-weight fixture)",
    )
    parser.add_argument(
        "--dfine-threshold",
        type=float,
        help="a trained checkpoint: judge its boxes scoring at least this, as for the teacher "
        "(default: the top-20 of each frame, for random weights)",
    )
    parser.add_argument("--no-teacher", action="store_true", help="D-FINE rows only")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.frames < 1 or args.rounds < 1 or args.threads < 1:
        print("error: --frames, --rounds and --threads must be >= 1", file=sys.stderr)
        return 2
    missing = [p for p in (TEACHER, args.checkpoint, args.calibrate) if not p.is_file()]
    if missing:
        print(
            f"error: {missing[0]} not found (the shared/ folder beside the repo)", file=sys.stderr
        )
        return 2
    configure_logging(args.verbose)
    load_before = [round(x, 2) for x in os.getloadavg()]
    result = measure(
        args.calibrate,
        args.frames,
        args.imgsz,
        args.rounds,
        args.threads,
        args.quick,
        args.checkpoint,
        args.dfine_threshold,
        teacher=not args.no_teacher,
    )
    result["load_before"] = load_before
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["machine"] = machine_info()
    result["command"] = "python -m bench.int8 " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_tables(result))
    print(f"load average before {load_before}, after {result['load_after']}", file=sys.stderr)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
