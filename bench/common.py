"""Pieces both benchmarks share: machine facts, memory sampling, clip looping, a slope.

Nothing here changes global state on import. ``RssSampler`` runs one daemon thread while it is
open; everything else is a plain function.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import av

logger = logging.getLogger(__name__)

_KIB_PER_MIB = 1024.0


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPU model, cores, RAM, load, library versions, date."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib: float | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / _KIB_PER_MIB / 1024.0, 1)
                break
    except OSError:
        pass
    versions: dict[str, str] = {"python": platform.python_version(), "av": av.__version__}
    for module in ("numpy", "torch", "onnxruntime"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": ram_gib,
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": versions,
    }


def configure_logging(verbose: bool) -> None:
    """What every benchmark's ``main`` logs: warnings, or with ``-v`` each step as it goes."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def write_json(path: Path | None, result: dict[str, Any]) -> None:
    """Write a benchmark's figures to ``path`` (its folder made if needed); nothing if ``None``."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def runqueue_wait_s() -> float | None:
    """Seconds the calling thread has spent runnable but without a core (Linux ``schedstat``),
    or ``None`` where the kernel does not say."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def rss_mib() -> float:
    """This process's resident set size now (``VmRSS`` of /proc/self/status), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / _KIB_PER_MIB
    raise RuntimeError("no VmRSS line in /proc/self/status; RSS sampling needs Linux procfs")


@dataclass
class RssSampler:
    """Samples ``rss_mib()`` every ``period_s`` in a daemon thread while open (``with``).

    Attributes:
        period_s: seconds between samples.
        samples: ``(time.monotonic(), MiB)`` pairs, the first taken on entry, the last on exit.
    """

    period_s: float = 0.05
    samples: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def peak_mib(self) -> float:
        return max((mib for _, mib in self.samples), default=0.0)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.samples.append((time.monotonic(), rss_mib()))

    def __enter__(self) -> RssSampler:
        self.samples.append((time.monotonic(), rss_mib()))
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.samples.append((time.monotonic(), rss_mib()))


def clip_frame_count(path: Path) -> int:
    """Frames in the first video stream: the container's count, else a demux count."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames > 0:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def loop_clip(source: Path, destination: Path, repeats: int) -> Path:
    """Write ``source``'s first video stream ``repeats`` times back to back into ``destination``.

    A remux, not a re-encode: the compressed packets are copied unchanged, each pass shifted
    in time by the clip's length, so decoding the result runs the real decoder on the real
    bitstream, ``repeats`` times. Each pass starts on the clip's first packet, a keyframe, so
    every pass decodes as the first does. Audio and other streams are left out.

    Returns:
        ``destination``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    with av.open(str(source)) as first_pass:
        stream = first_pass.streams.video[0]
        packets = [p for p in first_pass.demux(stream) if p.size > 0]
    if not packets or packets[0].pts is None:
        raise ValueError(f"{source}: no timestamped video packets to loop")
    time_base = stream.time_base or Fraction(1, 90000)
    pts_values = [p.pts for p in packets if p.pts is not None]
    step = _packet_step(packets)
    span = max(pts_values) - min(pts_values) + step
    destination.parent.mkdir(parents=True, exist_ok=True)
    with (
        av.open(str(source)) as reader,
        av.open(str(destination), mode="w", format="mp4") as writer,
    ):
        in_stream = reader.streams.video[0]
        out_stream = writer.add_stream_from_template(in_stream)
        for repeat in range(repeats):
            reader.seek(0, stream=in_stream)
            for packet in reader.demux(in_stream):
                if packet.size == 0:
                    continue
                shift = repeat * span
                if packet.pts is not None:
                    packet.pts += shift
                if packet.dts is not None:
                    packet.dts += shift
                packet.stream = out_stream
                writer.mux(packet)
    logger.info(
        "looped %s %d times into %s (%.2f s per pass)",
        source.name,
        repeats,
        destination,
        float(span * time_base),
    )
    return destination


def _packet_step(packets: Sequence[av.Packet]) -> int:
    """One frame's duration in stream ticks: the packets' own, else the median pts step."""
    durations = [p.duration for p in packets if p.duration]
    if durations:
        return int(sorted(durations)[len(durations) // 2])
    pts = sorted(p.pts for p in packets if p.pts is not None)
    steps = [b - a for a, b in zip(pts, pts[1:]) if b > a]
    return int(sorted(steps)[len(steps) // 2]) if steps else 1


def least_squares_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Slope of the least-squares line through ``(xs, ys)``; 0.0 with fewer than two points
    or no spread in ``xs``."""
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys must have the same length, got {len(xs)} and {len(ys)}")
    n = len(xs)
    if n < 2:
        return 0.0
    mean_x = sum(xs) / n
    mean_y = sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0.0:
        return 0.0
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    return sxy / sxx
