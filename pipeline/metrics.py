"""Run-time figures of a pipeline: per stage, per buffer, and source-to-sink latency.

Recording: each stage thread owns one ``StageRecorder`` (made and kept by the ``Pipeline``, no
globals) and calls ``record_item()`` after each item: a source around its ``next()``, a
processor around ``process()``, a sink around ``write()``; a sink also calls
``record_latency()`` with the time from the source's yield to the end of the write; a batched
processor calls ``record_batch()`` once per batch instead (its items and the batch size). Any other
thread (the CLI's status display, a signal handler) may call ``snapshot()`` at any time: each
recorder has its own small lock, held only to append or to copy.

Memory stays bounded on a stream that runs for days: totals are running counters, and the
percentiles come from a fixed window of the most recent samples (``window`` items per stage).
The time-per-item histogram (``DurationHistogram``, for a Prometheus scrape) counts every item
since the start in fixed buckets, so it is bounded too.

Reporting: ``PipelineMetrics`` is a frozen snapshot with ``to_dict()`` (JSON-able),
``format_table()`` (the summary at the end of a run) and ``status_line()`` (one short line for a
live display). Durations in the dataclasses are milliseconds (``*_ms``) or seconds (``*_s``),
as named; a percentile is ``None`` until there is a sample.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.ring_buffer import BufferStats

__all__ = [
    "DEFAULT_WINDOW",
    "TIME_PER_ITEM_BUCKETS_S",
    "DurationHistogram",
    "LatencyMetrics",
    "PipelineMetrics",
    "StageKind",
    "StageMetrics",
    "StageRecorder",
    "percentile",
]

#: Samples kept per stage for percentiles: enough for stable p99 figures, small enough to copy
#: for every snapshot (a few microseconds).
DEFAULT_WINDOW = 2048

#: Upper bounds of the time-per-item histogram's buckets, seconds: from a sink's write (well
#: under a millisecond) to a large model on a CPU (seconds).
TIME_PER_ITEM_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class StageKind(enum.Enum):
    SOURCE = "source"
    PROCESSOR = "processor"
    SINK = "sink"


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of already sorted values, linearly interpolated between
    closest ranks (numpy's default method); ``None`` for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    n = len(sorted_values)
    if n == 0:
        return None
    pos = (n - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


@dataclass(frozen=True)
class LatencyMetrics:
    """Time from a source yielding an item to a sink finishing its write of it.

    Attributes:
        count: items measured since the start (every sink write counts once).
        p50_ms, p95_ms, p99_ms: over the most recent window of samples; ``None`` before the
            first sample.
    """

    count: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None

    @classmethod
    def from_samples(cls, count: int, samples_s: Iterable[float]) -> LatencyMetrics:
        values = sorted(samples_s)
        return cls(
            count=count,
            p50_ms=_ms(percentile(values, 50)),
            p95_ms=_ms(percentile(values, 95)),
            p99_ms=_ms(percentile(values, 99)),
        )


@dataclass(frozen=True)
class DurationHistogram:
    """Time inside the stage's call per item, every item since the start, in fixed buckets
    (cumulative, as a Prometheus histogram has them).

    Attributes:
        upper_bounds_s: each bucket's upper bound, ascending; the last bucket (+Inf) is ``count``.
        cumulative_counts: per bound, the items that took at most that long.
        count: items in all.
        sum_s: their durations added up.
    """

    upper_bounds_s: tuple[float, ...]
    cumulative_counts: tuple[int, ...]
    count: int
    sum_s: float


@dataclass(frozen=True)
class StageMetrics:
    """One stage's figures.

    Attributes:
        name: the stage's name (also its thread's name).
        kind: source, processor or sink.
        items: items handled since the start: yielded by a source, passed to ``process()``
            (whatever it returned), written by a sink.
        fps: ``items`` per second of wall time from the start of its first item to now (or to
            when the stage finished).
        recent_fps: the same over the recent window only: what a live display should show.
        busy_fraction: share of that wall time spent inside ``next()`` / ``process()`` /
            ``flush()`` / ``write()``, in [0, 1]; the rest is waiting on buffers.
        recent_busy_fraction: the same over the recent window (flush time not included).
        time_per_item_p50_ms, time_per_item_p95_ms: time inside the call, over the recent window.
        running: the stage's thread has not finished.
        latency: for a sink, source-to-write latency of the items it wrote; ``None`` otherwise.
        cpu_s: CPU time of the stage's own thread since its setup finished (model loading
            is not work per item), or ``None`` before then or where the platform cannot tell.
            Threads its libraries start (FFmpeg's decoder, x264, an ONNX Runtime pool) are not
            counted. Unlike ``busy_fraction``, which also counts time spent waiting for a core,
            this is work done: a stage whose calls take longer than its CPU time is being held
            up, not working.
        time_per_item: the histogram of time inside the call, since the start.
        batches: calls of a batched processor (``process_batch()``); 0 for any other stage.
        batch_size_counts: how many batches had each size: ``batch_size_counts[k]`` batches of
            ``k + 1`` items, since the start (empty for a stage that takes no batches).
    """

    name: str
    kind: StageKind
    items: int
    fps: float
    recent_fps: float
    busy_fraction: float
    recent_busy_fraction: float
    time_per_item_p50_ms: float | None
    time_per_item_p95_ms: float | None
    running: bool
    latency: LatencyMetrics | None = None
    cpu_s: float | None = None
    time_per_item: DurationHistogram | None = None
    batches: int = 0
    batch_size_counts: tuple[int, ...] = ()

    @property
    def batch_size_mean(self) -> float | None:
        """Items per batch over all batches so far; ``None`` for a stage without batches."""
        if not self.batches:
            return None
        items = sum((k + 1) * n for k, n in enumerate(self.batch_size_counts))
        return items / self.batches

    @property
    def cpu_ms_per_item(self) -> float | None:
        """``cpu_s`` per item, in ms (``None`` without a CPU figure or an item)."""
        if self.cpu_s is None or self.items == 0:
            return None
        return 1000.0 * self.cpu_s / self.items


class StageRecorder:
    """Collects one stage's timings. Written by the stage's thread, read by any thread.

    Args:
        name: the stage's name.
        kind: what kind of stage records here (sinks also record latency).
        window: recent samples kept for percentiles and ``recent_fps``.
    """

    def __init__(self, name: str, kind: StageKind, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.name = name
        self.kind = kind
        # Re-entrant: metrics() may be called from a signal handler on a thread inside it.
        self._lock = threading.RLock()
        self._items = 0
        self._busy_s = 0.0
        self._first_start_s: float | None = None
        self._finished_s: float | None = None
        self._started = False
        # (start_s, duration_s) of recent items.
        self._recent: deque[tuple[float, float]] = deque(maxlen=window)
        self._latency_count = 0
        self._latency_s: deque[float] = deque(maxlen=window)
        # Per bucket of TIME_PER_ITEM_BUCKETS_S, plus one for longer: items, since the start.
        self._bucket_items = [0] * (len(TIME_PER_ITEM_BUCKETS_S) + 1)
        self._item_s = 0.0
        # Batches of each size (index = size - 1): a batch is never larger than its max_batch,
        # so this stays small however long the run.
        self._batch_sizes: list[int] = []
        # The stage thread's CPU clock, readable from any thread while it runs; its final
        # reading is kept when the thread finishes (the clock dies with the thread).
        self._cpu_clock: int | None = None
        self._cpu_start_s = 0.0
        self._cpu_final_s: float | None = None

    def mark_started(self) -> None:
        """The stage's thread is running (called first thing in that thread)."""
        with self._lock:
            self._started = True
            self._finished_s = None

    def mark_set_up(self) -> None:
        """The stage's setup is done (called from its thread): its CPU clock starts here."""
        clock = _thread_cpu_clock()
        with self._lock:
            self._cpu_clock, self._cpu_final_s = clock, None
            self._cpu_start_s = time.clock_gettime(clock) if clock is not None else 0.0

    def mark_finished(self, at_s: float | None = None) -> None:
        """The stage's thread is done (called last thing in that thread, if from it); rates
        stop decaying from here."""
        with self._lock:
            self._finished_s = time.monotonic() if at_s is None else at_s
            self._cpu_final_s = self._cpu_now_s()
            self._cpu_clock = None

    def record_item(self, start_s: float, end_s: float) -> None:
        """One item took ``[start_s, end_s]`` (``time.monotonic()``) inside the stage's call."""
        duration = max(0.0, end_s - start_s)
        with self._lock:
            if self._first_start_s is None:
                self._first_start_s = start_s
            self._items += 1
            self._busy_s += duration
            self._recent.append((start_s, duration))
            self._bucket_items[bisect.bisect_left(TIME_PER_ITEM_BUCKETS_S, duration)] += 1
            self._item_s += duration

    def record_batch(self, start_s: float, end_s: float, size: int) -> None:
        """A batch of ``size`` items took ``[start_s, end_s]`` in one call: counted as ``size``
        items, each taking an equal share of the time, and one batch of that size."""
        if size < 1:
            raise ValueError(f"a batch holds at least one item, got size {size}")
        duration = max(0.0, end_s - start_s)
        share = duration / size
        bucket = bisect.bisect_left(TIME_PER_ITEM_BUCKETS_S, share)
        with self._lock:
            if self._first_start_s is None:
                self._first_start_s = start_s
            self._items += size
            self._busy_s += duration
            self._recent.extend((start_s + i * share, share) for i in range(size))
            self._bucket_items[bucket] += size
            self._item_s += duration
            if len(self._batch_sizes) < size:
                self._batch_sizes.extend([0] * (size - len(self._batch_sizes)))
            self._batch_sizes[size - 1] += 1

    def record_busy(self, start_s: float, end_s: float) -> None:
        """Work that is not an item (a processor's ``flush()``): counts in the busy fraction."""
        with self._lock:
            if self._first_start_s is None:
                self._first_start_s = start_s
            self._busy_s += max(0.0, end_s - start_s)

    def record_latency(self, latency_s: float) -> None:
        """A sink finished writing an item ``latency_s`` after its source yielded it."""
        with self._lock:
            self._latency_count += 1
            self._latency_s.append(latency_s)

    @property
    def items(self) -> int:
        with self._lock:
            return self._items

    def latency_samples(self) -> tuple[int, list[float]]:
        """(count since start, the recent samples in seconds)."""
        with self._lock:
            return self._latency_count, list(self._latency_s)

    def _cpu_now_s(self) -> float | None:
        """CPU seconds of the stage's thread so far (lock held)."""
        if self._cpu_clock is None:
            return self._cpu_final_s
        try:
            return time.clock_gettime(self._cpu_clock) - self._cpu_start_s
        except OSError:  # the thread ended without mark_finished from inside it
            return self._cpu_final_s

    def snapshot(self, now_s: float | None = None) -> StageMetrics:
        with self._lock:
            cpu_s = self._cpu_now_s()
            items = self._items
            busy_s = self._busy_s
            first = self._first_start_s
            finished = self._finished_s
            running = self._started and finished is None
            recent = list(self._recent)
            latency_count = self._latency_count
            latency = list(self._latency_s)
            bucket_items = list(self._bucket_items)
            item_s = self._item_s
            batch_sizes = tuple(self._batch_sizes)
        end = finished if finished is not None else (time.monotonic() if now_s is None else now_s)
        fps = recent_fps = busy = recent_busy = 0.0
        if first is not None and end > first:
            wall = end - first
            fps = items / wall
            busy = min(1.0, busy_s / wall)
        if recent and end > recent[0][0]:
            recent_wall = end - recent[0][0]
            recent_fps = len(recent) / recent_wall
            recent_busy = min(1.0, sum(d for _, d in recent) / recent_wall)
        durations = sorted(d for _, d in recent)
        return StageMetrics(
            name=self.name,
            kind=self.kind,
            items=items,
            fps=fps,
            recent_fps=recent_fps,
            busy_fraction=busy,
            recent_busy_fraction=recent_busy,
            time_per_item_p50_ms=_ms(percentile(durations, 50)),
            time_per_item_p95_ms=_ms(percentile(durations, 95)),
            running=running,
            latency=(
                LatencyMetrics.from_samples(latency_count, latency)
                if self.kind is StageKind.SINK
                else None
            ),
            cpu_s=cpu_s,
            time_per_item=DurationHistogram(
                upper_bounds_s=TIME_PER_ITEM_BUCKETS_S,
                cumulative_counts=tuple(itertools.accumulate(bucket_items[:-1])),
                count=items,
                sum_s=item_s,
            ),
            batches=sum(batch_sizes),
            batch_size_counts=batch_sizes,
        )


def _thread_cpu_clock() -> int | None:
    """The calling thread's CPU-time clock id, or ``None`` where there is none (Windows)."""
    getter = getattr(time, "pthread_getcpuclockid", None)
    if getter is None:
        return None
    try:
        return int(getter(threading.get_ident()))
    except OSError:
        return None


def _json_value(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


#: Counters the live status line shows (when not zero).
_STATUS_COUNTERS = ("outages", "failed_attempts", "dropped")


def _counter(value: int | float | bool) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


@dataclass(frozen=True)
class PipelineMetrics:
    """A snapshot of a whole pipeline.

    Attributes:
        wall_s: seconds since ``start()`` (to the end, once finished).
        frames_in: items yielded by all sources together.
        frames_out: items written by the sink that wrote the most (each item counts once even
            when several sinks write it); 0 without sinks.
        latency: source-to-sink-write latency over all sinks.
        stages: in pipeline order: sources, processors, sinks.
        buffers: in pipeline order: each processor's input, then each sink's input.
        counters: per stage name, the counters a stage keeps of its own work (a live
            source's outages and reconnects, a ZeroMQ or RTSP sink's drops and bytes), added
            by whoever knows those stages (``AssembledPipeline.metrics()``); empty otherwise.
    """

    wall_s: float
    frames_in: int
    frames_out: int
    latency: LatencyMetrics
    stages: tuple[StageMetrics, ...]
    buffers: tuple[BufferStats, ...]
    counters: Mapping[str, Mapping[str, int | float | bool]] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        """Items dropped by leaky buffers, all buffers together."""
        return sum(b.dropped for b in self.buffers)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists, numbers, strings and ``None`` (enums as their values)."""
        d = _json_value(asdict(self))
        for stage, stage_dict in zip(self.stages, d["stages"]):
            stage_dict["batch_size_mean"] = stage.batch_size_mean
        d["counters"] = {name: dict(values) for name, values in self.counters.items()}
        d["dropped"] = self.dropped
        return dict(d)

    def format_table(self) -> str:
        """A plain-text summary for the end of a run."""
        lines = [
            f"{'stage':<16} {'kind':<9} {'items':>8} {'fps':>8} {'busy':>5} "
            f"{'p50 ms':>8} {'p95 ms':>8} {'cpu ms':>8}"
        ]
        for s in self.stages:
            lines.append(
                f"{s.name:<16} {s.kind.value:<9} {s.items:>8} {s.fps:>8.1f} "
                f"{s.busy_fraction * 100:>4.0f}% {_fmt(s.time_per_item_p50_ms, '.2f'):>8} "
                f"{_fmt(s.time_per_item_p95_ms, '.2f'):>8} {_fmt(s.cpu_ms_per_item, '.2f'):>8}"
            )
        for s in self.stages:
            if s.batches:
                sizes = "  ".join(f"{k + 1}: {n}" for k, n in enumerate(s.batch_size_counts) if n)
                lines.append(
                    f"{s.name} batch size: mean {s.batch_size_mean:.2f} over {s.batches} "
                    f"batches (size: batches  {sizes})"
                )
        if self.buffers:
            lines.append("")
            lines.append(
                f"{'buffer':<16} {'policy':<11} {'level':>9} {'high':>5} {'puts':>8} {'dropped':>8}"
            )
            for b in self.buffers:
                lines.append(
                    f"{b.name:<16} {b.policy.value:<11} {f'{b.level}/{b.capacity}':>9} "
                    f"{b.high_water:>5} {b.put_count:>8} {b.dropped:>8}"
                )
        counters = {name: values for name, values in self.counters.items() if values}
        if counters:
            lines.append("")
            for name, values in counters.items():
                shown = "  ".join(f"{k} {_counter(v)}" for k, v in values.items())
                lines.append(f"{name:<16} {shown}")
        lines.append("")
        lat = self.latency
        lines.append(
            f"latency ms: p50 {_fmt(lat.p50_ms)}  p95 {_fmt(lat.p95_ms)}  p99 {_fmt(lat.p99_ms)}"
            f"  ({lat.count} items)"
        )
        lines.append(
            f"frames in {self.frames_in}, out {self.frames_out}, dropped {self.dropped}, "
            f"wall {self.wall_s:.1f} s"
        )
        return "\n".join(lines)

    def status_line(self) -> str:
        """One short line for a live display, e.g.
        ``decode 29.9 fps | infer 12.1 fps 83% | q 3/8 1/8 | drops 120 | lat p95 210 ms``.

        Sources and processors show their recent rate, processors also how busy they were
        recently (near 100% marks the bottleneck); sinks are left out to keep it short.
        """
        parts = []
        for s in self.stages:
            if s.kind is StageKind.SOURCE:
                parts.append(f"{s.name} {s.recent_fps:.1f} fps")
            elif s.kind is StageKind.PROCESSOR:
                batch = f" batch {s.batch_size_mean:.1f}" if s.batch_size_mean is not None else ""
                parts.append(
                    f"{s.name} {s.recent_fps:.1f} fps {s.recent_busy_fraction * 100:.0f}%{batch}"
                )
        if self.buffers:
            parts.append("q " + " ".join(f"{b.level}/{b.capacity}" for b in self.buffers))
        parts.append(f"drops {self.dropped}")
        # The counters that say something went wrong, and only once it has.
        for name, values in self.counters.items():
            trouble = {k: v for k, v in values.items() if k in _STATUS_COUNTERS and v}
            if trouble:
                parts.append(
                    f"{name} " + " ".join(f"{k} {_counter(v)}" for k, v in trouble.items())
                )
        parts.append(f"lat p95 {_fmt(self.latency.p95_ms, '.0f')} ms")
        return " | ".join(parts)
