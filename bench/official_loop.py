"""`finestream run` against the official D-FINE video tool's way of working, in one run.

Usage::

    python -m bench.official_loop [--clip traffic_highway_960x540.mp4] [--frames 100]
        [--imgsz 640] [--threshold 0.08] [--rounds 1] [--json out.json]

Three ingredients, each a fresh process timed whole (start, imports, model load, the clip, the
output file closed), on the same checkpoint (the calibrated fixture D-FINE-N), clip, first
``--frames`` frames and input size:

1. ``finestream run`` with the default backend: on this CPU, ONNX Runtime on the export made
   once and cached (the cache is filled by an untimed one-frame run first; the export's own time
   is reported beside it).
2. ``finestream run --backend torch``: the fused deploy form in torch.
3. ``sequential``: one frame at a time, as the official ``tools/inference/torch_inf.py`` does it
   (read, not copied: Peterande/D-FINE): OpenCV ``VideoCapture`` decoding, BGR → RGB, a PIL
   image, ``Resize((S, S))`` + ``ToTensor`` (here PIL's bilinear resize and a division by 255:
   torchvision is not installable here; ``T.Resize`` on a PIL image calls PIL's resize), the
   eager model in its training form (``model.eval()``, not ``model.deploy()``: our port of the
   official network, unfused) called without ``torch.no_grad()`` as the tool calls it, boxes
   and labels drawn on the PIL image with ``ImageDraw`` (the tool uses supervision's annotators
   on the same PIL image), RGB → BGR, OpenCV ``VideoWriter`` with ``mp4v``.

Both ``finestream run`` processes also track (norfair, the default) and write H.264 with x264
(the official tool writes MPEG-4 part 2, cheaper to encode); they are not made lighter to match.
The score threshold is the same for all three (the fixture's random weights score 0.04 to 0.1,
so the default 0.08 leaves a few boxes per frame to draw). Figures: whole-process wall seconds,
fps = frames / wall, and the CPU seconds of the child process (``RUSAGE_CHILDREN``), which a
loaded machine inflates less; ratios are against the sequential loop, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import configure_logging, machine_info, write_json

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CLIP = SHARED / "media" / "traffic_highway_960x540.mp4"
FIXTURE_CKPT = SHARED / "fixtures" / "dfine_n_calibrated" / "dfine_n_calibrated.pth"
DEFAULT, TORCH, SEQUENTIAL = (
    "finestream run (default backend)",
    "finestream run --backend torch",
    "sequential loop",
)


def sequential_loop(
    clip: Path, checkpoint: Path, out: Path, *, imgsz: int, threshold: float, max_frames: int
) -> int:
    """The official tool's loop over ``clip`` (see the module docstring); returns frames done."""
    import cv2
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    import dfine
    from dfine.checkpoint import build_and_load
    from dfine.model_info import read_model_info

    info = read_model_info(checkpoint)
    assert info.size is not None
    model = build_and_load(info.size, info.num_classes, checkpoint)  # eval(), unfused
    postprocessor = dfine.PostProcessor(num_classes=info.num_classes)
    capture = cv2.VideoCapture(str(clip))
    fps = capture.get(cv2.CAP_PROP_FPS)
    size_wh = (
        int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
        int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
    )
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, size_wh)
    done = 0
    while capture.isOpened() and done < max_frames:
        ok, frame_bgr = capture.read()
        if not ok:
            break
        picture = Image.fromarray(cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB))
        w, h = picture.size
        resized = np.asarray(picture.resize((imgsz, imgsz), Image.Resampling.BILINEAR))
        images = torch.from_numpy(resized.copy()).permute(2, 0, 1).float().div(255.0)[None]
        # No torch.no_grad(): the official tool calls its model as it is.
        labels, boxes, scores = postprocessor(model(images), torch.tensor([[w, h]]))
        draw = ImageDraw.Draw(picture)
        keep = scores[0] > threshold
        for label, box, score in zip(labels[0][keep], boxes[0][keep], scores[0][keep]):
            draw.rectangle(box.tolist(), outline="red")
            draw.text(
                (float(box[0]), float(box[1])), f"{int(label)} {float(score):.2f}", fill="blue"
            )
        writer.write(cv2.cvtColor(np.array(picture), cv2.COLOR_RGB2BGR))
        done += 1
    capture.release()
    writer.release()
    return done


@dataclass(frozen=True)
class Run:
    ingredient: str
    round: int
    frames: int
    wall_s: float
    cpu_s: float

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s


def _timed(argv: Sequence[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of the child process ``argv`` (which must succeed)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[:4])}... failed ({done.returncode}): {done.stderr[-800:]}"
        )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _frames_in(video: Path) -> int:
    import av

    with av.open(str(video)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


def measure(
    clip: Path, checkpoint: Path, frames: int, imgsz: int, threshold: float, rounds: int
) -> dict[str, Any]:
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench_official_") as tmp:
        work = Path(tmp)
        env = {**os.environ, "HOME": str(work)}  # the ONNX cache under ~/.cache starts empty
        common = ["--source", str(clip), "--model", str(checkpoint), "--imgsz", str(imgsz),
                  "--threshold", str(threshold), "--max-frames", str(frames), "--no-progress"]  # fmt: skip
        cli = [sys.executable, "-m", "pipeline.cli", "run"]
        # Untimed: fills the ONNX cache (a one-time cost per checkpoint and size).
        export_wall, export_cpu = _timed([*cli, *common[:8], "--max-frames", "1"], env)
        argvs = {
            DEFAULT: [*cli, *common, "--output", str(work / "default.mp4")],
            TORCH: [*cli, *common, "--backend", "torch", "--output", str(work / "torch.mp4")],
            SEQUENTIAL: [
                sys.executable,
                "-m",
                "bench.official_loop",
                "--loop-only",
                "--clip",
                str(clip),
                "--checkpoint",
                str(checkpoint),
                "--frames",
                str(frames),
                "--imgsz",
                str(imgsz),
                "--threshold",
                str(threshold),
                "--out",
                str(work / "sequential.mp4"),
            ],  # fmt: skip
        }
        outputs = {DEFAULT: "default.mp4", TORCH: "torch.mp4", SEQUENTIAL: "sequential.mp4"}
        names = list(argvs)
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:  # alternate the order per round
                wall, cpu = _timed(argvs[name], env)
                done = _frames_in(work / outputs[name])
                runs.append(Run(name, r, done, wall, cpu))
                print(
                    f"  round {r} {name}: {done} frames, {wall:.1f} s, cpu {cpu:.1f} s",
                    file=sys.stderr,
                )
    return {
        "runs": [{**asdict(run), "fps": run.fps} for run in runs],
        "cache_fill_wall_s": export_wall,
        "cache_fill_cpu_s": export_cpu,
    }


def format_table(result: dict[str, Any]) -> str:
    by: dict[str, list[dict[str, Any]]] = {}
    for run in result["runs"]:
        by.setdefault(run["ingredient"], []).append(run)
    base = by[SEQUENTIAL]
    base_wall = sum(r["wall_s"] for r in base) / len(base)
    base_cpu = sum(r["cpu_s"] for r in base) / len(base)
    lines = [
        "| ingredient | frames | wall s | fps | CPU s | wall speed-up vs sequential | "
        "CPU speed-up vs sequential |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in (DEFAULT, TORCH, SEQUENTIAL):
        rows = by[name]
        wall = sum(r["wall_s"] for r in rows) / len(rows)
        cpu = sum(r["cpu_s"] for r in rows) / len(rows)
        frames = rows[0]["frames"]
        lines.append(
            f"| {name} | {frames} | {wall:.1f} | {frames / wall:.2f} | {cpu:.1f} | "
            f"{base_wall / wall:.2f}× | {base_cpu / cpu:.2f}× |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.official_loop", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--clip", type=Path, default=CLIP)
    parser.add_argument("--checkpoint", type=Path, default=FIXTURE_CKPT)
    parser.add_argument("--frames", type=int, default=100, help="first N frames (default 100)")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--threshold", type=float, default=0.08)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each ingredient")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    parser.add_argument("--loop-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.frames < 1 or args.rounds < 1 or args.imgsz % 32:
        print("error: --frames, --rounds >= 1 and --imgsz a multiple of 32", file=sys.stderr)
        return 2
    for path in (args.clip, args.checkpoint):
        if not path.is_file():
            print(f"error: {path} not found (the shared/ folder beside the repo)", file=sys.stderr)
            return 2
    if args.loop_only:  # the sequential ingredient's own process
        sequential_loop(
            args.clip,
            args.checkpoint,
            args.out,
            imgsz=args.imgsz,
            threshold=args.threshold,
            max_frames=args.frames,
        )
        return 0
    configure_logging(args.verbose)
    load_before = [round(x, 2) for x in os.getloadavg()]
    result = measure(
        args.clip, args.checkpoint, args.frames, args.imgsz, args.threshold, args.rounds
    )
    result["load_before"] = load_before
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["machine"] = machine_info()
    result["command"] = "python -m bench.official_loop " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    print(format_table(result))
    print(f"load average before {load_before}, after {result['load_after']}", file=sys.stderr)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
