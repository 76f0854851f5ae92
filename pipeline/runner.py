"""Runs stages in threads joined by ring buffers, and stops them cleanly or at once.

Topology: every source puts into the first processor's input buffer (or, with no processors,
into every sink's buffer); each processor's output goes to the next processor's input; the
last processor's output is fanned out to every sink's own buffer. Each ``BufferSpec`` describes
the *input* buffer of the processor or sink it is paired with.

Threads (modelled on CPython's ``concurrent.futures.thread``):

- one daemon thread per stage, named after the stage. It calls ``setup()``, then loops
  (``next()`` / ``process()`` / ``write()``), then ``flush()`` for a processor, and always
  ``teardown()`` last, also after an error, ``stop()`` or ``abort()``. A worker catches
  ``BaseException`` and hands it to the pipeline: the first error aborts the run and is raised
  from ``join()`` as ``StageError``;
- the caller's thread (usually the main thread) calls ``start()``, ``join()``/``run()``;
- any thread, or a signal handler on the main thread, may call ``stop()``, ``abort()``,
  ``metrics()`` and ``running``. Locks taken there are re-entrant, so a handler that runs while
  the main thread is inside ``join()`` or ``metrics()`` cannot deadlock.

Ending:

- the normal end: when every source is exhausted, an end marker follows the last item through
  every buffer; each processor passes on its ``flush()`` items then the marker; each sink tears
  down after the marker. ``join()`` returns once every thread has finished.
- ``stop()`` (graceful, what SIGINT/SIGTERM call): sources stop between items (a source blocked
  inside its own ``next()`` returns after its own timeout), then the same end as above, so every
  item already yielded is processed and written. A second ``stop()`` while draining aborts.
- ``abort()`` and the first error: every buffer closes, which wakes every stage blocked on a
  full or empty buffer; each stage tears down. ``join()`` waits at most ``join_timeout_s`` more
  for threads stuck elsewhere (e.g. a network write), logs those, and returns or raises; they
  are daemon threads, so the process can still exit.

Latency: the engine wraps each item in an envelope stamped with ``time.monotonic()`` when the
source yields it; processors and sinks only see the bare item. A processor's output carries the
stamp of the input it was returned for; items from ``flush()`` carry the stamp of the last input.

Events: beside the items, an ``EventChannel`` carries messages that are not items (a source
lost its camera, a tracker ended a track, a summary). Any thread may ``publish()`` one; every
processor and sink with an ``on_event(event)`` method subscribes when the pipeline is built and
receives each event once, in its own thread, in publishing order: before the next item it
processes and, while no items come, within ``_EVENT_POLL_S``. Events are never dropped by a
buffer policy (each subscriber has its own unbounded mailbox: events are few, frames are not)
and an event published before an item left a stage reaches a subscriber before that item does.
A sink gets every event published before its end marker, then tears down.

Batches: a processor paired with a ``BatchSpec`` (``pipeline.batching``) instead of a
``BufferSpec`` gets a ``Batcher`` as its input: per-stream lanes that the items reach by the
spec's key, and ``process_batch()`` with up to ``max_batch`` of them at a time (one inference
call for several cameras). Its outputs go on one by one, in the batch's order, each with the
stamp of its own input; its metrics count items, and the batch sizes beside them.

Items and events are opaque here: this module knows nothing of frames or models.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pipeline.batching import Batcher, BatchProcessor, BatchSpec
from pipeline.metrics import (
    LatencyMetrics,
    PipelineMetrics,
    StageKind,
    StageRecorder,
)
from pipeline.ring_buffer import (
    END_OF_STREAM,
    BufferClosed,
    BufferStats,
    OverflowPolicy,
    RingBuffer,
)
from pipeline.stage import Processor, Sink, Source

__all__ = [
    "BufferSpec",
    "EventChannel",
    "EventChannelStats",
    "EventSubscriber",
    "Pipeline",
    "StageError",
]

logger = logging.getLogger(__name__)

# How often join() re-checks when nothing notifies it: keeps the main thread responsive to
# signals on every platform; the notifications do the real work.
_JOIN_POLL_S = 0.25
# How long a subscribing stage waits for an item before it looks at its mailbox: the most an
# event waits while no items flow (a camera outage). 20 wake-ups a second cost nothing.
_EVENT_POLL_S = 0.05


class StageError(RuntimeError):
    """A stage failed (or the pipeline was aborted with a reason); ``__cause__`` is the original.

    Attributes:
        stage_name: the failing stage, or ``None`` for ``abort(reason)`` from outside.
    """

    def __init__(self, message: str, stage_name: str | None) -> None:
        super().__init__(message)
        self.stage_name = stage_name


@dataclass(frozen=True)
class BufferSpec:
    """The input buffer of one processor or sink.

    Attributes:
        capacity: the most items it holds (>= 1).
        policy: what the producer does when it is full; ``BLOCK`` loses nothing.
    """

    capacity: int = 8
    policy: OverflowPolicy = OverflowPolicy.BLOCK

    def __post_init__(self) -> None:
        capacity = self.capacity
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {self.capacity!r}")
        if not isinstance(self.policy, OverflowPolicy):
            raise ValueError(
                f"policy must be an OverflowPolicy ({', '.join(p.name for p in OverflowPolicy)}), "
                f"got {self.policy!r}"
            )


@dataclass(frozen=True, slots=True)
class _Envelope:
    """An item in flight and when its source yielded it (``time.monotonic()``)."""

    item: Any
    source_s: float


class _Outlet:
    """Where a stage's output goes: one buffer (or batcher), or one per sink (fan-out)."""

    def __init__(self, buffers: Sequence[RingBuffer[_Envelope] | Batcher[_Envelope]]) -> None:
        self.buffers = tuple(buffers)

    def put(self, envelope: _Envelope) -> None:
        for buf in self.buffers:
            buf.put(envelope)

    def put_end(self) -> None:
        for buf in self.buffers:
            buf.put_end()


def _lower_thread_priority(increment: int) -> None:
    """Raise the calling thread's nice value by ``increment`` (Linux schedules threads one by one).

    Relative to the thread's current value, capped at 19: setting the increment as an absolute
    value would give a stage of a process started under ``nice 10`` a *higher* priority when run
    as root (and fail otherwise).
    """
    if increment <= 0:
        return
    try:
        thread_id = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread_id)
        os.setpriority(os.PRIO_PROCESS, thread_id, min(current + increment, 19))
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: run at normal priority
        logger.debug("could not lower thread priority: %s", exc)


def _make_buffer(spec: BufferSpec, name: str) -> RingBuffer[_Envelope]:
    return RingBuffer(spec.capacity, spec.policy, name=name)


def _make_input(
    spec: BufferSpec | BatchSpec, name: str
) -> RingBuffer[_Envelope] | Batcher[_Envelope]:
    if isinstance(spec, BufferSpec):
        return _make_buffer(spec, name)
    key = spec.key
    return Batcher(spec, name=name, key=lambda envelope: key(envelope.item))


def _buffer_stats(buf: RingBuffer[_Envelope] | Batcher[_Envelope]) -> tuple[BufferStats, ...]:
    return buf.lane_stats() if isinstance(buf, Batcher) else (buf.stats(),)


def _check_pairs(
    kind: str, pairs: Sequence[tuple[Any, Any]], specs: tuple[type, ...] = (BufferSpec,)
) -> None:
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[1], specs)):
            spec_names = " or ".join(spec.__name__ for spec in specs)
            raise ValueError(
                f"{kind}[{i}] must be a ({kind[:-1]}, {spec_names}) pair, got {pair!r}"
            )
        if isinstance(pair[1], BatchSpec) and not callable(getattr(pair[0], "process_batch", None)):
            raise ValueError(
                f"{kind}[{i}] ({getattr(pair[0], 'name', pair[0])!r}) has a BatchSpec but no "
                "process_batch(); give it a BufferSpec or make it a BatchProcessor"
            )


@runtime_checkable
class EventSubscriber(Protocol):
    """A processor or sink that receives the pipeline's events (in its own thread)."""

    def on_event(self, event: Any) -> None: ...


@dataclass(frozen=True)
class EventChannelStats:
    """Counters of an ``EventChannel``.

    Attributes:
        published: events published.
        delivered: deliveries made (one event reaching three subscribers counts three).
        undelivered: deliveries not made because the subscriber had already finished (an event
            published after the end of the run) or the run was aborted.
        subscribers: names of the subscribing stages.
    """

    published: int
    delivered: int
    undelivered: int
    subscribers: tuple[str, ...]


class _Mailbox:
    """One subscriber's queue of events (unbounded; guarded by the channel's lock)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: deque[Any] = deque()
        self.closed = False


class EventChannel:
    """Events beside the items: published from any thread, delivered to every subscriber.

    Made by whoever assembles the pipeline (so stages can be given ``publish`` before the
    ``Pipeline`` exists) and handed to ``Pipeline(events=...)``, which subscribes every stage
    that has ``on_event``. Events published before that reach nobody (counted as published only).
    ``publish`` never blocks beyond a short lock and is safe from any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mailboxes: list[_Mailbox] = []
        self._published = 0
        self._delivered = 0
        self._undelivered = 0

    def publish(self, event: Any) -> None:
        """Queue ``event`` for every subscriber (the same object: subscribers must not modify it)."""
        with self._lock:
            self._published += 1
            for box in self._mailboxes:
                if box.closed:
                    self._undelivered += 1
                else:
                    box.events.append(event)

    def stats(self) -> EventChannelStats:
        with self._lock:
            return EventChannelStats(
                published=self._published,
                delivered=self._delivered,
                undelivered=self._undelivered,
                subscribers=tuple(b.name for b in self._mailboxes),
            )

    def _subscribe(self, name: str) -> _Mailbox:
        box = _Mailbox(name)
        with self._lock:
            self._mailboxes.append(box)
        return box

    def _take(self, box: _Mailbox) -> list[Any]:
        with self._lock:
            if not box.events:
                return []
            events = list(box.events)
            box.events.clear()
            self._delivered += len(events)
            return events

    def _close(self, box: _Mailbox) -> None:
        with self._lock:
            box.closed = True
            self._undelivered += len(box.events)
            box.events.clear()


def _subscriber(stage: Any) -> Callable[[Any], None] | None:
    on_event = getattr(stage, "on_event", None)
    return on_event if callable(on_event) else None


class Pipeline:
    """Sources → processors (in a chain) → sinks (fanned out), each stage in its own thread.

    Args:
        sources: at least one. The stream ends when every source has ended.
        processors: (processor, its input buffer) in order; may be empty. A ``BatchSpec``
            instead of a ``BufferSpec`` makes that input a ``Batcher`` and the processor a
            ``BatchProcessor`` (see the module docstring).
        sinks: (sink, its input buffer); each gets every item. May be empty (outputs are then
            discarded, e.g. for a benchmark).
        join_timeout_s: after an abort, how long ``join()`` waits for stage threads blocked
            outside the buffers before it logs them and gives up on them.
        events: the channel whose events reach every processor and sink with ``on_event``;
            ``None``: a channel of its own (``Pipeline.events``), for stages that publish later.
    """

    def __init__(
        self,
        sources: Sequence[Source[Any]],
        processors: Sequence[
            tuple[Processor[Any, Any] | BatchProcessor[Any, Any], BufferSpec | BatchSpec]
        ],
        sinks: Sequence[tuple[Sink[Any], BufferSpec]],
        *,
        join_timeout_s: float = 5.0,
        thread_nice: Mapping[str, int] | None = None,
        events: EventChannel | None = None,
    ) -> None:
        """``thread_nice`` maps stage names to a nice increment (0..19) for that stage's thread
        (Linux: per thread; threads it starts, such as FFmpeg's, inherit it). Raising it for
        every stage but the bottleneck lets the bottleneck keep its core on a small machine."""
        if not sources:
            raise ValueError("sources must hold at least one source")
        _check_pairs("processors", processors, (BufferSpec, BatchSpec))
        _check_pairs("sinks", sinks)
        if not join_timeout_s > 0:
            raise ValueError(f"join_timeout_s must be > 0, got {join_timeout_s!r}")
        names = [
            *(s.name for s in sources),
            *(p.name for p, _ in processors),
            *(s.name for s, _ in sinks),
        ]
        seen: set[str] = set()
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"every stage needs a non-empty str name, got {name!r}")
            if name in seen:
                raise ValueError(f"stage names must be unique: '{name}' is used twice; rename one")
            seen.add(name)

        self._thread_nice = dict(thread_nice or {})
        for name, nice in self._thread_nice.items():
            if name not in seen:
                raise ValueError(
                    f"thread_nice names no stage: '{name}' (stages: {', '.join(names)})"
                )
            if not 0 <= nice <= 19:
                raise ValueError(f"thread_nice['{name}'] must be in [0, 19], got {nice}")
        self._sources = tuple(sources)
        self._processors: tuple[Any, ...] = tuple(p for p, _ in processors)
        self._sinks = tuple(s for s, _ in sinks)
        self._join_timeout_s = join_timeout_s

        self._proc_inputs = [_make_input(spec, f"{p.name}.in") for p, spec in processors]
        self._sink_inputs = [_make_buffer(spec, f"{s.name}.in") for s, spec in sinks]
        self._buffers: list[RingBuffer[_Envelope] | Batcher[_Envelope]] = [
            *self._proc_inputs,
            *self._sink_inputs,
        ]
        # Outlet of processor i is processor i+1's input; the last one fans out to the sinks.
        chain_ins = [_Outlet([b]) for b in self._proc_inputs] + [_Outlet(self._sink_inputs)]
        self._source_outlet = chain_ins[0]
        self._proc_outlets = chain_ins[1:]

        self.events = events if events is not None else EventChannel()
        self._mailboxes: dict[str, _Mailbox] = {}
        stages: list[Processor[Any, Any] | Sink[Any]] = [*self._processors, *self._sinks]
        for stage in stages:
            if _subscriber(stage) is not None:
                self._mailboxes[stage.name] = self.events._subscribe(stage.name)

        self._recorders: dict[str, StageRecorder] = {}
        for src in self._sources:
            self._recorders[src.name] = StageRecorder(src.name, StageKind.SOURCE)
        for proc in self._processors:
            self._recorders[proc.name] = StageRecorder(proc.name, StageKind.PROCESSOR)
        for sink in self._sinks:
            self._recorders[sink.name] = StageRecorder(sink.name, StageKind.SINK)

        # Re-entrant: stop()/abort() may run in a signal handler on a thread that holds it.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []
        self._started = False
        self._threads_left = 0
        self._sources_left = len(self._sources)
        self._stop_requested = threading.Event()
        self._aborted = threading.Event()
        self._abort_s: float | None = None
        self._left_behind_logged = False
        self._error: tuple[str | None, BaseException] | None = None
        self._start_s: float | None = None
        self._end_s: float | None = None

    # -- control ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start one thread per stage (sinks first, so they are waiting when items come)."""
        with self._lock:
            if self._started:
                raise RuntimeError(
                    "Pipeline.start() was already called; make a new Pipeline to run again"
                )
            self._started = True
            self._start_s = time.monotonic()
            targets: list[tuple[str, Callable[[], None], Callable[[], None]]] = []
            for sink, buf in zip(self._sinks, self._sink_inputs):
                targets.append((sink.name, _bind(self._sink_loop, sink, buf), sink.teardown))
            for proc, inbox, outlet in zip(self._processors, self._proc_inputs, self._proc_outlets):
                loop = self._batch_loop if isinstance(inbox, Batcher) else self._processor_loop
                targets.append((proc.name, _bind(loop, proc, inbox, outlet), proc.teardown))
            for src in self._sources:
                targets.append((src.name, _bind(self._source_loop, src), src.teardown))
            self._threads_left = len(targets)
            for name, body, teardown in targets:
                thread = threading.Thread(
                    target=self._worker, args=(name, body, teardown), name=name, daemon=True
                )
                self._threads.append(thread)
            for started, thread in enumerate(self._threads):
                try:
                    thread.start()
                except BaseException as exc:
                    # Out of threads: stop the ones already running instead of leaving them
                    # blocked on buffers nobody will fill.
                    self._threads_left -= len(self._threads) - started
                    self._threads = self._threads[:started]
                    if self._threads_left == 0:
                        self._end_s = time.monotonic()
                    self._fail(thread.name, exc)
                    raise
        logger.debug("pipeline started: %s", ", ".join(t.name for t in self._threads))

    def stop(self) -> None:
        """Stop gracefully: sources stop producing, items in flight drain, sinks flush and tear
        down. Returns at once (``join()`` waits). Safe from any thread and from a signal handler.
        A second call while the pipeline is still draining escalates to ``abort()``; a call
        after the end does nothing."""
        with self._lock:
            if self._started and self._threads_left == 0:
                return
            if not self._stop_requested.is_set():
                self._stop_requested.set()
                logger.info("stop requested: sources stop, items in flight drain")
                self._changed.notify_all()
                self._request_sources_stop()
                return
            if not self._started or self._aborted.is_set():
                return
        logger.warning("stop requested again while draining: aborting")
        self.abort()

    def abort(self, reason: BaseException | None = None) -> None:
        """Stop at once: close every buffer, which wakes every blocked stage; items in flight
        are lost, each stage still tears down. With a ``reason`` (and no earlier error),
        ``join()`` raises ``StageError`` from it. Idempotent; safe from any thread."""
        with self._lock:
            if reason is not None and self._error is None:
                self._error = (None, reason)
            first = not self._aborted.is_set()
            self._abort_locked()
        if first and reason is not None:
            logger.warning("pipeline aborted: %s", reason)
        elif first:
            logger.warning("pipeline aborted")

    def join(self, timeout: float | None = None) -> None:
        """Wait for every stage thread to finish.

        Args:
            timeout: seconds to wait at most; ``None`` waits for the end. On expiry it returns
                (check ``running``) unless a stage has failed.

        Raises:
            StageError: a stage failed (the first failure; ``__cause__`` is its exception), or
                ``abort(reason)`` was called. Raised once the threads have finished, or
                ``join_timeout_s`` after the abort for threads that do not.
            RuntimeError: ``start()`` was not called.
        """
        if not self._started:
            raise RuntimeError("Pipeline.join() called before start()")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self._threads_left > 0:
                now = time.monotonic()
                waits = [_JOIN_POLL_S]
                if self._abort_s is not None:
                    if self._abort_grace_over(now):
                        self._log_left_behind()
                        break
                    waits.append(self._abort_s + self._join_timeout_s - now)
                if deadline is not None:
                    if deadline - now <= 0:
                        break
                    waits.append(deadline - now)
                self._changed.wait(min(waits))
            all_done = self._threads_left == 0
        if all_done:
            # Each worker has run its last line; this only waits for the thread to exit.
            for thread in self._threads:
                thread.join(self._join_timeout_s)
        self._raise_error()

    def run(self) -> None:
        """``start()`` then ``join()``. If the calling thread is interrupted (e.g.
        ``KeyboardInterrupt`` without a signal handler installed), the pipeline is aborted first."""
        self.start()
        try:
            self.join()
        except StageError:
            raise
        except BaseException as exc:
            self.abort(exc)
            raise

    @property
    def running(self) -> bool:
        """Started, and at least one stage thread has not finished; threads still stuck
        ``join_timeout_s`` after an abort are left behind and no longer count, so a loop of
        ``while p.running: p.join(timeout=...)`` always ends."""
        with self._lock:
            if not self._started or self._threads_left == 0:
                return False
            return not self._abort_grace_over(time.monotonic())

    def metrics(self) -> PipelineMetrics:
        """A snapshot of every stage, buffer and the latency; any time, from any thread."""
        now = time.monotonic()
        with self._lock:
            start, end = self._start_s, self._end_s
        wall = 0.0 if start is None else (end if end is not None else now) - start
        stages = tuple(r.snapshot(now) for r in self._recorders.values())
        latency_count = 0
        samples: list[float] = []
        for sink in self._sinks:
            count, recent = self._recorders[sink.name].latency_samples()
            latency_count += count
            samples.extend(recent)
        return PipelineMetrics(
            wall_s=wall,
            frames_in=sum(s.items for s in stages if s.kind is StageKind.SOURCE),
            frames_out=max((s.items for s in stages if s.kind is StageKind.SINK), default=0),
            latency=LatencyMetrics.from_samples(latency_count, samples),
            stages=stages,
            buffers=tuple(s for b in self._buffers for s in _buffer_stats(b)),
        )

    # -- stage threads -----------------------------------------------------------------------

    def _worker(self, name: str, body: Callable[[], None], teardown: Callable[[], None]) -> None:
        recorder = self._recorders[name]
        recorder.mark_started()
        try:
            _lower_thread_priority(self._thread_nice.get(name, 0))
            body()
        except BufferClosed as exc:
            # The pipeline closed the buffers: someone else's error or an abort, not ours.
            if not self._aborted.is_set():
                self._fail(name, exc)
        except BaseException as exc:
            self._fail(name, exc)
        finally:
            try:
                teardown()
            except BaseException as exc:
                # One line for the user; the traceback only with debug logging.
                logger.error("stage '%s': teardown failed: %s", name, exc)
                logger.debug("stage '%s': teardown traceback", name, exc_info=True)
                self._fail(name, exc, logged=True)
            box = self._mailboxes.get(name)
            if box is not None:
                self.events._close(box)
            recorder.mark_finished()
            with self._changed:
                self._threads_left -= 1
                if self._threads_left == 0:
                    self._end_s = time.monotonic()
                self._changed.notify_all()

    def _source_loop(self, source: Source[Any]) -> None:
        recorder = self._recorders[source.name]
        source.setup()
        recorder.mark_set_up()
        iterator: Iterator[Any] = iter(source.items())
        try:
            while not self._stop_requested.is_set():
                start = time.monotonic()
                try:
                    item = next(iterator)
                except StopIteration:
                    break
                yielded = time.monotonic()
                recorder.record_item(start, yielded)
                self._source_outlet.put(_Envelope(item, yielded))
        finally:
            # Runs a generator's own cleanup (its finally blocks) here, in the source's thread.
            close = getattr(iterator, "close", None)
            if callable(close):
                close()
        with self._lock:
            self._sources_left -= 1
            last = self._sources_left == 0
        if last:
            self._source_outlet.put_end()

    def _processor_loop(
        self, processor: Processor[Any, Any], inbox: RingBuffer[_Envelope], outlet: _Outlet
    ) -> None:
        recorder = self._recorders[processor.name]
        processor.setup()
        recorder.mark_set_up()
        deliver = self._deliverer(processor)
        last_stamp: float | None = None
        while True:
            envelope = self._get(inbox, deliver)
            if envelope is END_OF_STREAM:
                break
            deliver()
            last_stamp = envelope.source_s
            start = time.monotonic()
            out = processor.process(envelope.item)
            recorder.record_item(start, time.monotonic())
            if out is not None:
                outlet.put(_Envelope(out, envelope.source_s))
        deliver()  # what came up to the end, before the flush may act on it
        self._flush(processor, recorder, outlet, last_stamp)

    def _batch_loop(
        self, processor: BatchProcessor[Any, Any], inbox: Batcher[_Envelope], outlet: _Outlet
    ) -> None:
        recorder = self._recorders[processor.name]
        processor.setup()
        recorder.mark_set_up()
        deliver = self._deliverer(processor)
        last_stamp: float | None = None
        while True:
            batch = self._get_batch(inbox, deliver)
            if batch is END_OF_STREAM:
                break
            deliver()
            last_stamp = batch[-1].source_s
            start = time.monotonic()
            outs = processor.process_batch([envelope.item for envelope in batch])
            recorder.record_batch(start, time.monotonic(), len(batch))
            if len(outs) != len(batch):
                raise RuntimeError(
                    f"{processor.name}.process_batch() returned {len(outs)} results for "
                    f"{len(batch)} items; it must return one per item (None: consumed)"
                )
            for envelope, out in zip(batch, outs):
                if out is not None:
                    outlet.put(_Envelope(out, envelope.source_s))
        deliver()
        self._flush(processor, recorder, outlet, last_stamp)

    def _flush(
        self,
        processor: Processor[Any, Any] | BatchProcessor[Any, Any],
        recorder: StageRecorder,
        outlet: _Outlet,
        last_stamp: float | None,
    ) -> None:
        """Hand on what ``processor.flush()`` gives, then the end marker."""
        stamp = time.monotonic() if last_stamp is None else last_stamp
        flushed = iter(processor.flush())
        while True:
            start = time.monotonic()
            try:
                item = next(flushed)
            except StopIteration:
                recorder.record_busy(start, time.monotonic())
                break
            recorder.record_busy(start, time.monotonic())
            outlet.put(_Envelope(item, stamp))
        outlet.put_end()

    def _sink_loop(self, sink: Sink[Any], inbox: RingBuffer[_Envelope]) -> None:
        recorder = self._recorders[sink.name]
        sink.setup()
        recorder.mark_set_up()
        deliver = self._deliverer(sink)
        while True:
            envelope = self._get(inbox, deliver)
            if envelope is END_OF_STREAM:
                # Every stage upstream has finished, so every event it published is here.
                deliver()
                break
            deliver()
            start = time.monotonic()
            sink.write(envelope.item)
            done = time.monotonic()
            recorder.record_item(start, done)
            recorder.record_latency(done - envelope.source_s)

    def _deliverer(self, stage: Any) -> Callable[[], None]:
        """A function that hands ``stage`` the events in its mailbox (a no-op if it has none)."""
        box = self._mailboxes.get(stage.name)
        on_event = _subscriber(stage)
        if box is None or on_event is None:
            return _nothing
        channel = self.events

        def deliver() -> None:
            for event in channel._take(box):
                on_event(event)

        return deliver

    def _get_batch(self, inbox: Batcher[_Envelope], deliver: Callable[[], None]) -> Any:
        """The next batch of envelopes (or the end), delivering events while it waits."""
        if deliver is _nothing:
            return inbox.get_batch()
        while True:
            try:
                return inbox.get_batch(timeout=_EVENT_POLL_S)
            except TimeoutError:
                deliver()

    def _get(self, inbox: RingBuffer[_Envelope], deliver: Callable[[], None]) -> Any:
        """The next envelope (or the end); a subscriber gets its events while it waits."""
        if deliver is _nothing:
            return inbox.get()
        while True:
            try:
                return inbox.get(timeout=_EVENT_POLL_S)
            except TimeoutError:
                deliver()

    # -- failure ---------------------------------------------------------------------------

    def _fail(self, name: str, exc: BaseException, *, logged: bool = False) -> None:
        with self._lock:
            first = self._error is None
            if first:
                self._error = (name, exc)
            self._abort_locked()
        if logged:
            return
        if first:
            # join() raises it on the caller's thread; the traceback travels as __cause__.
            logger.debug("stage '%s' failed, aborting the pipeline", name, exc_info=exc)
        else:
            logger.warning("stage '%s' also failed (after the first error): %r", name, exc)

    def _request_sources_stop(self) -> None:
        for src in self._sources:
            try:
                src.request_stop()
            except Exception:  # a failing stop request must not hide the stop itself
                logger.exception("source '%s': request_stop() failed", src.name)

    def _abort_locked(self) -> None:
        if self._aborted.is_set():
            return
        self._aborted.set()
        self._stop_requested.set()
        self._abort_s = time.monotonic()
        for buf in self._buffers:
            buf.close()
        self._request_sources_stop()
        self._changed.notify_all()

    def _abort_grace_over(self, now: float) -> bool:
        return self._abort_s is not None and now - self._abort_s >= self._join_timeout_s

    def _log_left_behind(self) -> None:
        if self._left_behind_logged:
            return
        self._left_behind_logged = True
        stuck = [t.name for t in self._threads if t.is_alive()]
        logger.error(
            "stage threads still running %.1f s after abort, left behind (daemon threads, "
            "they do not keep the process alive): %s",
            self._join_timeout_s,
            ", ".join(stuck),
        )

    def _raise_error(self) -> None:
        with self._lock:
            error = self._error
        if error is None:
            return
        name, exc = error
        if name is None:
            raise StageError(f"pipeline aborted: {exc}", None) from exc
        raise StageError(f"stage '{name}' failed: {exc}", name) from exc


def _nothing() -> None:
    pass


def _bind(fn: Callable[..., None], *args: Any) -> Callable[[], None]:
    return lambda: fn(*args)
