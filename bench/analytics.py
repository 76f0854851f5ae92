"""Cost of the camera analytics per frame: L lines and Z zones over T live tracks.

    .venv/bin/python -m bench.analytics [--lines 10] [--zones 10] [--tracks 100] [--frames 3000] [--json out.json]

Synthetic tracks (the tracker is not timed) drift over a 1920x1080 picture at 1-10 px a frame
with a jitter of their boxes, so they cross lines and enter and leave zones; one track in 50 is
dropped and replaced each frame (rows recycled, ``track_ended`` handled). Timed: ``AnalyticsStage.process``
as the pipeline calls it, which includes building the events it publishes and the overlay for
the annotated video. Target (issue 11): 10 lines, 10 zones, 100 tracks under 1 ms per frame. Both the wall time and
the thread's CPU time are reported: on a busy machine the wall time includes waiting for a core.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import configure_logging, machine_info, write_json
from stages.analytics.config import LineConfig, StreamAnalyticsConfig, ZoneConfig
from stages.analytics.stage import AnalyticsStage
from stages.frame import Detections, FramePacket

logger = logging.getLogger(__name__)

W, H = 1920, 1080


def make_config(n_lines: int, n_zones: int, rng: np.random.Generator) -> StreamAnalyticsConfig:
    lines = []
    for i in range(n_lines):
        y = H * (i + 1) / (n_lines + 1)
        lines.append(LineConfig(name=f"line{i}", a=(50.0, y - 40), b=(W - 50.0, y + 40)))
    zones = []
    for i in range(n_zones):
        cx, cy = rng.uniform(200, W - 200), rng.uniform(200, H - 200)
        r = rng.uniform(80, 200)
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=6))
        polygon = tuple((float(cx + r * np.cos(a)), float(cy + r * np.sin(a))) for a in angles)
        zones.append(
            ZoneConfig(
                name=f"zone{i}", polygon=polygon, loiter_s=5.0, classes=(0, 2) if i % 2 else None
            )
        )
    return StreamAnalyticsConfig(lines=tuple(lines), zones=tuple(zones))


def run(n_lines: int, n_zones: int, n_tracks: int, n_frames: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    events: list[dict[str, Any]] = []
    stage = AnalyticsStage(
        [make_config(n_lines, n_zones, rng)], ["person", "bicycle", "car"], events.append
    )
    ids = np.arange(1, n_tracks + 1, dtype=np.int64)
    xy = rng.uniform([0, 0], [W, H], size=(n_tracks, 2))
    # Traffic at 30 fps seen from a pole: 1-10 px a frame, mostly down the picture, so each
    # track crosses a line every few seconds (a busy scene: ~1 event a frame in all).
    velocity = rng.normal(0, 2, size=(n_tracks, 2)) + [0, 4]
    classes = rng.integers(0, 3, size=n_tracks).astype(np.int64)
    next_id = n_tracks + 1
    image = np.zeros((H, W, 3), dtype=np.uint8)
    times_s: list[float] = []
    cpu_s: list[float] = []
    for frame in range(n_frames):
        pts_s = frame / 30
        xy += velocity + rng.normal(0, 1.5, size=xy.shape)  # drift plus box jitter
        # Dropped by the tracker (1 in 50 a frame, and any that left the picture), replaced by
        # a new track somewhere else.
        gone = (rng.random(n_tracks) < 0.02) | (xy < 0).any(axis=1) | (xy >= [W, H]).any(axis=1)
        for k in np.flatnonzero(gone):
            stage.on_event(
                {
                    "type": "track_ended",
                    "stream": "0",
                    "track_id": int(ids[k]),
                    "frame": frame,
                    "pts_s": pts_s,
                }
            )
            ids[k], next_id = next_id, next_id + 1
            xy[k] = rng.uniform([0, 0], [W, H])
        boxes = np.concatenate([xy - [20, 60], xy + [20, 0]], axis=1).astype(np.float32)
        packet = FramePacket(
            stream_id="0",
            index=frame,
            pts_s=pts_s,
            image_rgb_u8=image,
            arrival_s=0.0,
            detections=Detections(
                boxes_xyxy=boxes,
                scores=np.full(n_tracks, 0.8, np.float32),
                class_ids=classes,
                track_ids=ids.copy(),
            ),
        )
        start, start_cpu = time.perf_counter(), time.thread_time()
        stage.process(packet)
        times_s.append(time.perf_counter() - start)
        cpu_s.append(time.thread_time() - start_cpu)
    times_ms = np.array(times_s[100:]) * 1e3  # after the warm-up (first allocations)
    cpu_ms = np.array(cpu_s[100:]) * 1e3
    kinds: dict[str, int] = {}
    for e in events:
        kinds[e["type"]] = kinds.get(e["type"], 0) + 1
    return {
        "lines": n_lines,
        "zones": n_zones,
        "tracks": n_tracks,
        "frames": n_frames,
        "mean_ms": float(times_ms.mean()),
        "p50_ms": float(np.percentile(times_ms, 50)),
        "p95_ms": float(np.percentile(times_ms, 95)),
        "p99_ms": float(np.percentile(times_ms, 99)),
        # The thread's own CPU time: what the analytics cost, whatever else the machine runs.
        "cpu_mean_ms": float(cpu_ms.mean()),
        "cpu_p50_ms": float(np.percentile(cpu_ms, 50)),
        "cpu_p95_ms": float(np.percentile(cpu_ms, 95)),
        "events_per_frame": len(events) / n_frames,
        "events": kinds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10)
    parser.add_argument("--zones", type=int, default=10)
    parser.add_argument("--tracks", type=int, default=100)
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    result = run(args.lines, args.zones, args.tracks, args.frames)
    result["machine"] = machine_info()
    print(
        f"analytics: {result['lines']} lines, {result['zones']} zones, {result['tracks']} tracks, "
        f"{result['frames']} frames"
    )
    print(
        f"  per frame: mean {result['mean_ms']:.3f} ms  p50 {result['p50_ms']:.3f}  "
        f"p95 {result['p95_ms']:.3f}  p99 {result['p99_ms']:.3f}  (target < 1 ms)"
    )
    print(
        f"  thread CPU per frame: mean {result['cpu_mean_ms']:.3f} ms  p50 {result['cpu_p50_ms']:.3f}  "
        f"p95 {result['cpu_p95_ms']:.3f}  (load average: {result['machine'].get('load_avg_1_5_15')})"
    )
    print(f"  events per frame: {result['events_per_frame']:.2f}  {result['events']}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
