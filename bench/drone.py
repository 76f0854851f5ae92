"""Drone footage: what tiling finds and costs, and what camera-motion compensation does for ids.

    .venv/bin/python -m bench.drone [--teacher ../shared/teachers/nanodet_coco_416.onnx]
        [--frames 30] [--frames-4x 8] [--track-frames 120] [--threads 1] [--json out.json]

Small objects, with a real detector (NanoDet in the D-FINE deploy contract, input size read from
the file), on the highway clip upscaled 2x and 4x (excerpts written with PyAV into a temporary
folder, as drone footage makes distant cars a few dozen pixels in a large frame) and on the 1080p
street clip: detections per frame, the share of boxes under 32 px, and ms per frame (preprocess +
inference + merge, the stages' own code, one thread) of whole-frame vs tiled vs tiled + whole frame.

Camera motion against a known truth: the highway clip warped by a synthetic moving camera (a
known homography per frame: a pan that turns, a slow rotation, a zoom, wind shake). Detections
are the teacher's on each clip (tiled + whole frame). Tracks of the original clip are the reference; a warped clip's
track is mapped back through the known homography and matched per frame by IoU >= 0.5 to the
original's tracks. Reported: ids, fragments (the extra ids an original track was split into,
over tracks seen >= 10 frames) and the share of their frames covered by a confirmed id — on
the original, on the warped clip without compensation, and with it; and the compensation's ms per frame.
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import torch
from norfair.camera_motion import HomographyTransformation

from bench.common import configure_logging, machine_info, write_json
from dfine.backends.device import Device
from stages.frame import Detections, FramePacket
from stages.infer import InferConfig, InferenceStage, make_backend, prepare_model
from stages.preprocess import PreprocessConfig, Preprocessor
from stages.tiling import TilingConfig
from stages.track import CameraMotionConfig, MotionModel, TrackConfig, Tracker, _StreamState

logger = logging.getLogger(__name__)

SHARED = Path(__file__).resolve().parents[2] / "shared"
SMALL_PX = 32
SCORE = 0.35
MODES = {
    "whole frame": TilingConfig(),
    "tiled": TilingConfig(enabled=True, full_frame=False),
    "tiled + whole": TilingConfig(enabled=True, full_frame=True),
}


def read_frames(path: Path, count: int, start: int = 0) -> list[np.ndarray]:
    """``count`` uint8 RGB frames from frame ``start`` on."""
    frames = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i >= start:
                frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) >= count:
                break
    return frames


def write_upscaled(frames: list[np.ndarray], factor: int, path: Path) -> Path:
    """An H.264 clip of ``frames`` upscaled ``factor`` times (bicubic), near-lossless (crf 12)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(30))
        h, w = frames[0].shape[:2]
        stream.width, stream.height, stream.pix_fmt = w * factor, h * factor, "yuv420p"
        stream.options = {"crf": "12", "preset": "veryfast"}
        for rgb in frames:
            big = cv2.resize(rgb, (w * factor, h * factor), interpolation=cv2.INTER_CUBIC).astype(
                np.uint8
            )
            for packet in stream.encode(av.VideoFrame.from_ndarray(big, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


class Detector:
    """The preprocessor and inference stages of a run, called in turn on one thread."""

    def __init__(self, teacher: Path, tiling: TilingConfig, threads: int) -> None:
        prepared = prepare_model(
            InferConfig(
                model=teacher,
                score_threshold=SCORE,
                intra_op_threads=threads,
                tiling=tiling,
                device=Device.CPU,
            )
        )
        config = prepared.config
        assert config.imgsz is not None
        self.imgsz = config.imgsz
        self.infer = InferenceStage(config, lambda: make_backend(config, prepared.info))
        self.infer.setup()
        self.pre = Preprocessor(
            PreprocessConfig(input_size=config.imgsz, device=Device.CPU, tiling=tiling)
        )

    def __call__(self, index: int, image: np.ndarray) -> Detections:
        packet = FramePacket("0", index, index / 30.0, image, time.monotonic())
        self.infer.process(self.pre.process(packet))
        assert packet.detections is not None
        return packet.detections


def small_objects(
    teacher: Path, clips: dict[str, Path], frames: dict[str, int], threads: int
) -> list[dict[str, Any]]:
    rows = []
    for name, path in clips.items():
        images = read_frames(path, frames[name])
        h, w = images[0].shape[:2]
        for mode, tiling in MODES.items():
            detector = Detector(teacher, tiling, threads)
            detector(0, images[0])  # warm-up, not timed
            counts, small, times = [], 0, []
            for i, image in enumerate(images):
                started = time.perf_counter()
                dets = detector(i, image)
                times.append(time.perf_counter() - started)
                counts.append(len(dets))
                wh = dets.boxes_xyxy[:, 2:] - dets.boxes_xyxy[:, :2]
                small += int((wh.max(axis=1) < SMALL_PX).sum())
            total = sum(counts)
            row = {
                "clip": name,
                "size": f"{w}x{h}",
                "frames": len(images),
                "mode": mode,
                "crops": len(
                    detector.pre.process(FramePacket("0", 0, 0, images[0], 0)).model_input.crops
                )
                if tiling.enabled
                else 1,
                "dets_per_frame": total / len(images),
                "small_per_frame": small / len(images),
                "small_share": small / total if total else 0.0,
                "ms_per_frame": 1000 * float(np.median(times)),
            }
            logger.info("%s", row)
            rows.append(row)
    return rows


# The synthetic camera: homography from the original frame to the warped one, per frame.
def camera_homography(t: int, w: int, h: int, seed: int = 0) -> np.ndarray:
    """Zoom 1.5 -> 1.7, rotation swinging +-5 deg, a pan that turns (a loop of 120 px radius in
    60 frames: 12 px a frame), and wind shake (+-8 px, the same each run): a drone in wind, whose
    frame-to-frame jumps are as large as the distant cars."""
    rng = np.random.default_rng(seed + t)
    zoom = 1.5 + 0.2 * t / 120
    angle = 5.0 * math.sin(2 * math.pi * t / 90)
    pan = 120 * np.array([math.cos(2 * math.pi * t / 60) - 1, math.sin(2 * math.pi * t / 60)])
    shake = rng.uniform(-8, 8, 2)
    rotation = cv2.getRotationMatrix2D((w / 2, h / 2), angle, zoom)
    matrix = np.vstack([rotation, [0, 0, 1]])
    matrix[:2, 2] += pan + shake
    return matrix


def _map_boxes(boxes_xyxy: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Boxes through a homography: the bounding box of the four mapped corners."""
    if not len(boxes_xyxy):
        return boxes_xyxy.reshape(0, 4)
    x1, y1, x2, y2 = boxes_xyxy.T
    corners = np.stack(
        [
            np.stack([x1, y1], 1),
            np.stack([x2, y1], 1),
            np.stack([x1, y2], 1),
            np.stack([x2, y2], 1),
        ],
        1,
    )
    mapped = cv2.perspectiveTransform(corners.reshape(-1, 1, 2).astype(np.float64), matrix).reshape(
        -1, 4, 2
    )
    return np.concatenate([mapped.min(1), mapped.max(1)], 1).astype(np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


class KnownMotion:
    """The true camera motion in ``CameraMotion``'s place (the estimator's upper bound)."""

    failures = 0

    def __init__(self, matrices: list[np.ndarray]) -> None:
        self._matrices = matrices
        self._t = 0

    def update(
        self, image_rgb_u8: np.ndarray, boxes_xyxy: np.ndarray | None
    ) -> HomographyTransformation:
        # First warped frame -> this one: H_t H_0^-1.
        matrix = self._matrices[self._t] @ np.linalg.inv(self._matrices[0])
        self._t += 1
        return HomographyTransformation(matrix)


def _tracked(
    frames: Iterator[tuple[np.ndarray, Detections]],
    config: TrackConfig,
    known: list[np.ndarray] | None = None,
) -> tuple[list[Detections], Tracker]:
    tracker = Tracker(config)
    if known is not None:
        # The tracker's own state for stream "0", with the known motion as its estimator.
        tracker._streams["0"] = _StreamState(
            tracker=tracker._new_tracker(), motion=KnownMotion(known)
        )  # type: ignore[arg-type]
    out = []
    for i, (image, dets) in enumerate(frames):
        packet = tracker.process(FramePacket("0", i, i / 30.0, image, 0.0, detections=dets))
        assert packet.detections is not None
        out.append(packet.detections)
    tracker.flush()
    return out, tracker


def camera_motion(teacher: Path, clip: Path, n_frames: int, threads: int) -> dict[str, Any]:
    originals = read_frames(clip, n_frames)
    h, w = originals[0].shape[:2]
    # Tiled + whole frame: the whole frame alone finds too few of the clip's distant cars to
    # have tracks to compare (0.5 a frame, bench table above).
    detector = Detector(teacher, MODES["tiled + whole"], threads)
    matrices = [camera_homography(t, w, h) for t in range(len(originals))]
    warped = [
        cv2.warpPerspective(img, m, (w, h), flags=cv2.INTER_LINEAR)
        for img, m in zip(originals, matrices)
    ]
    dets_original = [detector(i, img) for i, img in enumerate(originals)]
    dets_warped = [detector(i, img) for i, img in enumerate(warped)]

    base = TrackConfig()
    reference, _ = _tracked(zip(originals, dets_original), base)
    runs: dict[str, list[Detections]] = {"original": reference}
    runs["warped, no compensation"], _ = _tracked(zip(warped, dets_warped), base)
    cmc = TrackConfig(camera_motion=CameraMotionConfig(enabled=True))
    runs["warped, compensated"], tracker = _tracked(zip(warped, dets_warped), cmc)
    motion = tracker.stats()
    translation = TrackConfig(
        camera_motion=CameraMotionConfig(enabled=True, model=MotionModel.TRANSLATION)
    )
    runs["warped, compensated (translation)"], _ = _tracked(zip(warped, dets_warped), translation)
    runs["warped, true motion"], _ = _tracked(zip(warped, dets_warped), cmc, known=matrices)
    # Exact detections: the original's boxes through the known homography (inside the view), so
    # only the camera differs from the original; with none, estimated and the true motion.
    exact = []
    for dets, matrix in zip(dets_original, matrices):
        boxes = _map_boxes(dets.boxes_xyxy, matrix)
        inside = (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= w) & (boxes[:, 3] <= h)
        exact.append(Detections(boxes[inside], dets.scores[inside], dets.class_ids[inside]))
    runs["exact boxes, no compensation"], _ = _tracked(zip(warped, exact), base)
    runs["exact boxes, compensated"], _ = _tracked(zip(warped, exact), cmc)
    runs["exact boxes, true motion"], _ = _tracked(zip(warped, exact), cmc, known=matrices)

    # Reference tracks: confirmed ids of the original seen on >= 10 frames.
    lengths = Counter(int(t) for d in reference for t in d.track_ids if t >= 0)
    long_ids = {t for t, n in lengths.items() if n >= 10}
    result: dict[str, Any] = {
        "frames": len(originals),
        "size": f"{w}x{h}",
        "reference_tracks": len(long_ids),
        "motion_ms_per_frame": motion.get("motion_ms_per_frame"),
        "motion_failures": motion.get("motion_failures"),
        "runs": {},
    }
    for name, run in runs.items():
        matched: dict[int, list[int]] = defaultdict(
            list
        )  # reference id -> ids seen on it, per frame
        for t, (ref, dets) in enumerate(zip(reference, run)):
            keep = np.isin(ref.track_ids, list(long_ids))
            if not keep.any():
                continue
            ref_boxes, ref_ids = ref.boxes_xyxy[keep], ref.track_ids[keep]
            boxes = (
                dets.boxes_xyxy
                if name == "original"
                else _map_boxes(dets.boxes_xyxy, np.linalg.inv(matrices[t]))
            )
            iou = _iou(ref_boxes, boxes) if len(boxes) else np.zeros((len(ref_boxes), 0))
            for r, ref_id in enumerate(ref_ids.tolist()):
                j = int(iou[r].argmax()) if iou.shape[1] else -1
                hit = j >= 0 and iou[r, j] >= 0.5 and dets.track_ids[j] >= 0
                matched[ref_id].append(int(dets.track_ids[j]) if hit else -1)
        ids_per_track = [len({i for i in seen if i >= 0}) for seen in matched.values()]
        frames_total = sum(len(seen) for seen in matched.values())
        covered = sum(sum(1 for i in seen if i >= 0) for seen in matched.values())
        switches = sum(
            sum(1 for a, b in zip([i for i in s if i >= 0], [i for i in s if i >= 0][1:]) if a != b)
            for s in matched.values()
        )
        all_ids = {int(t) for d in run for t in d.track_ids if t >= 0}
        result["runs"][name] = {
            "ids": len(all_ids),
            "fragments": sum(max(0, n - 1) for n in ids_per_track),
            "id_switches": switches,
            "coverage": covered / frames_total if frames_total else 0.0,
        }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--teacher", type=Path, default=SHARED / "teachers" / "nanodet_coco_416.onnx"
    )
    parser.add_argument("--media", type=Path, default=SHARED / "media")
    parser.add_argument(
        "--frames", type=int, default=30, help="frames of the 2x and 1080p excerpts"
    )
    parser.add_argument(
        "--frames-4x", type=int, default=8, help="frames of the 4x excerpt (about 85 tiles each)"
    )
    parser.add_argument("--track-frames", type=int, default=120)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-tiling", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    torch.set_num_threads(1)  # torch only resizes here; the model runs in ONNX Runtime
    highway = args.media / "traffic_highway_960x540.mp4"
    result: dict[str, Any] = {
        "machine": machine_info(),
        "teacher": str(args.teacher),
        "score_threshold": SCORE,
    }
    if not args.skip_tiling:
        with tempfile.TemporaryDirectory() as tmp:
            excerpt = read_frames(highway, max(args.frames, args.frames_4x))
            clips = {
                "highway 2x": write_upscaled(
                    excerpt[: args.frames], 2, Path(tmp) / "highway_2x.mp4"
                ),
                "highway 4x": write_upscaled(
                    excerpt[: args.frames_4x], 4, Path(tmp) / "highway_4x.mp4"
                ),
                "street 1080p": args.media / "pedestrians_night_street_1080p_mpeg4.mp4",
            }
            frames = {
                "highway 2x": args.frames,
                "highway 4x": args.frames_4x,
                "street 1080p": args.frames,
            }
            result["tiling"] = small_objects(args.teacher, clips, frames, args.threads)
        print(
            f"| clip | frames | mode | crops | detections / frame | under {SMALL_PX} px / frame "
            f"| share under {SMALL_PX} px | ms / frame |"
        )
        print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        for r in result["tiling"]:
            print(
                f"| {r['clip']} ({r['size']}) | {r['frames']} | {r['mode']} | {r['crops']} "
                f"| {r['dets_per_frame']:.1f} | {r['small_per_frame']:.1f} | {100 * r['small_share']:.0f} % "
                f"| {r['ms_per_frame']:.0f} |"
            )
    cm = camera_motion(args.teacher, highway, args.track_frames, args.threads)
    result["camera_motion"] = cm
    print()
    print(
        f"camera motion: {cm['frames']} frames {cm['size']}, {cm['reference_tracks']} reference tracks "
        f"(original, >= 10 frames); compensation {cm['motion_ms_per_frame']} ms / frame, "
        f"{cm['motion_failures']} failed frames"
    )
    print("| clip | ids | fragments | id switches | reference frames with a confirmed id |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in cm["runs"].items():
        print(
            f"| {name} | {r['ids']} | {r['fragments']} | {r['id_switches']} | {100 * r['coverage']:.0f} % |"
        )
    print(f"\nload average (1, 5, 15 min) at the start: {result['machine']['load_avg_1_5_15']}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
