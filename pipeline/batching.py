"""One stage serving several streams: per-stream lanes in front of it, batches across them.

The idea is DeepStream's ``nvstreammux``: a ``Batcher`` is the input of one processor that
several sources feed. Each item goes into its stream's *lane* (a small bounded FIFO with the
same overflow policies as ``RingBuffer``: a latest-only slot, ``capacity 1`` + ``DROP_OLDEST``,
for a live camera; a blocking FIFO for a file, which never drops). ``get_batch()`` forms a
batch of up to ``max_batch`` items from the lanes that have one ready, taking the lanes in turn
(the one after the last lane served goes first next time, so no stream is starved when more
are ready than fit; a file's lane may give several queued items), and returns it as soon as

- the batch is full, or
- every *expected* lane has given an item (there is nothing to wait for), or
- ``batch_timeout_s`` has passed since the batch's first item was ready.

A lane is expected once it has delivered an item. A lane that gives nothing within one batch's
timeout is marked *stalled* and no later batch waits for it until its next item arrives: a
camera that dies or freezes costs the others at most one wait of ``batch_timeout_s``, once,
and is simply left out of the batches after that. While a batch waits it takes only the items
of the lanes still missing, not a second, newer item of a lane already in it: otherwise the
batch could fill up before a dead camera is ever found missing, and every batch would wait.
Per-stream order is kept: items of one lane come out in the order they went in, in one batch or
across batches.

Threads: any number of producers call ``put()`` (each blocks only on its own lane when that is
full and blocking); one consumer calls ``get_batch()``; any thread may call ``close()`` and
``lane_stats()``. One lock guards everything, and ``close()`` wakes every waiting call, as in
``RingBuffer``. End of stream is one ``put_end()`` for all lanes (the runner calls it when the
last source has ended); the items before it are still handed out, then ``get_batch()`` returns
``END_OF_STREAM`` every time.

This module is part of the engine: it knows nothing of frames or models. Which lane an item
belongs to is the ``key`` function's business (the assembly passes one that reads the stream
id); lanes named in ``BatchSpec.lanes`` exist (and show in the metrics) before their first item,
others are made on first use with ``default_lane``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from pipeline.ring_buffer import (
    END_OF_STREAM,
    BufferClosed,
    BufferStats,
    EndOfStream,
    OverflowPolicy,
)

__all__ = ["BatchProcessor", "BatchSpec", "Batcher", "LaneSpec"]

T = TypeVar("T")
InT = TypeVar("InT", contravariant=True)
OutT = TypeVar("OutT", covariant=True)

#: The largest batch a spec may ask for: far past what any detector backend takes in one call.
MAX_BATCH_LIMIT = 256


class BatchProcessor(Protocol[InT, OutT]):
    """A processor that takes a batch: one result (or ``None``: consumed) per item, in order.

    The runner gives it ``process_batch()`` instead of ``process()`` when its input is a
    ``BatchSpec``; the other methods are a ``Processor``'s.
    """

    name: str

    def setup(self) -> None: ...

    def process_batch(self, items: Sequence[InT]) -> Sequence[OutT | None]: ...

    def flush(self) -> Iterable[OutT]: ...

    def teardown(self) -> None: ...


@dataclass(frozen=True)
class LaneSpec:
    """One stream's lane: at most ``capacity`` items, and what ``put()`` does when it is full."""

    capacity: int = 1
    policy: OverflowPolicy = OverflowPolicy.DROP_OLDEST

    def __post_init__(self) -> None:
        capacity = self.capacity
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"lane capacity must be an int >= 1, got {capacity!r}")
        if not isinstance(self.policy, OverflowPolicy):
            raise ValueError(f"lane policy must be an OverflowPolicy, got {self.policy!r}")


@dataclass(frozen=True)
class BatchSpec:
    """The input of a ``BatchProcessor``: per-stream lanes and how batches are formed.

    Attributes:
        key: the lane an item goes to (e.g. its stream id); called in the producer's thread.
        max_batch: the most items in one batch (>= 1); 1 serves the lanes one item at a time,
            in turn.
        batch_timeout_s: how long a batch waits, after its first item, for the expected lanes
            that have not given one yet (>= 0; 0 never waits).
        lanes: lanes made up front, by key (they show in the metrics from the start).
        default_lane: the spec of a lane made for a key not in ``lanes``.
    """

    key: Callable[[Any], Hashable]
    max_batch: int = 1
    batch_timeout_s: float = 0.0
    lanes: Mapping[Any, LaneSpec] = field(default_factory=dict)
    default_lane: LaneSpec = field(default_factory=LaneSpec)

    def __post_init__(self) -> None:
        m = self.max_batch
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_BATCH_LIMIT:
            raise ValueError(f"max_batch must be an int in [1, {MAX_BATCH_LIMIT}], got {m!r}")
        if not self.batch_timeout_s >= 0:
            raise ValueError(f"batch_timeout_s must be >= 0, got {self.batch_timeout_s!r}")
        if not callable(self.key):
            raise ValueError(f"key must be callable, got {self.key!r}")


class _Lane(Generic[T]):
    """One stream's FIFO and counters (guarded by the batcher's lock)."""

    def __init__(self, key: Hashable, spec: LaneSpec) -> None:
        self.key = key
        self.spec = spec
        self.items: deque[T] = deque()
        self.put_count = 0
        self.get_count = 0
        self.dropped = 0
        self.high_water = 0
        # Whether a batch waits for this lane: from its first item until it misses a batch.
        self.expected = False

    def append(self, item: T) -> None:
        self.items.append(item)
        self.put_count += 1
        self.high_water = max(self.high_water, len(self.items))
        self.expected = True


class Batcher(Generic[T]):
    """Per-key lanes and batches across them (see the module docstring).

    Args:
        spec: lanes, ``max_batch`` and ``batch_timeout_s``.
        name: shown in stats and errors; a lane's stats are named ``"<name>[<key>]"``.
        key: the lane of an item; ``None``: ``spec.key`` (the runner passes one that unwraps
            its envelopes).
    """

    def __init__(
        self, spec: BatchSpec, name: str = "", key: Callable[[T], Hashable] | None = None
    ) -> None:
        self.spec = spec
        self.name = name
        self._key = key if key is not None else spec.key
        self._lock = threading.RLock()  # re-entrant: close() may come from a signal handler
        self._ready = threading.Condition(self._lock)  # an item arrived, the end, or a close
        self._room = threading.Condition(self._lock)  # a blocking lane has room, or a close
        self._lanes: dict[Hashable, _Lane[T]] = {}
        self._order: list[Hashable] = []  # lanes in the order they were made
        self._next = 0  # index in _order of the lane served first in the next batch
        self._ended = False
        self._closed = False
        for key_, lane_spec in spec.lanes.items():
            self._lane(key_, lane_spec)

    @property
    def max_batch(self) -> int:
        return self.spec.max_batch

    @property
    def closed(self) -> bool:
        return self._closed

    # -- producers ----------------------------------------------------------------------------

    def put(self, item: T, timeout: float | None = None) -> bool:
        """Queue ``item`` in its lane; the batcher owns it now.

        Returns ``True`` when queued (under ``DROP_OLDEST`` possibly by evicting the lane's
        oldest item), ``False`` when a full ``DROP_NEWEST`` lane refused it.

        Raises:
            BufferClosed: the batcher is closed (also while waiting for room).
            TimeoutError: a full ``BLOCK`` lane stayed full for ``timeout`` seconds.
            ValueError: ``put_end()`` was already called, or ``item`` is the end marker.
        """
        if item is END_OF_STREAM:
            raise ValueError(f"batcher '{self.name}': pass the end with put_end(), not put()")
        key = self._key(item)
        with self._lock:
            self._check_open_for_put()
            lane = self._lanes.get(key) or self._lane(key, self.spec.default_lane)
            if len(lane.items) >= lane.spec.capacity:
                policy = lane.spec.policy
                if policy is OverflowPolicy.DROP_NEWEST:
                    lane.put_count += 1
                    lane.dropped += 1
                    return False
                if policy is OverflowPolicy.DROP_OLDEST:
                    lane.items.popleft()
                    lane.dropped += 1
                else:
                    self._wait_for_room(lane, timeout)
            lane.append(item)
            self._ready.notify_all()
            return True

    def put_end(self) -> None:
        """The end of every lane, after the items already queued. Idempotent.

        Raises:
            BufferClosed: the batcher is closed.
        """
        with self._lock:
            if self._closed:
                raise BufferClosed(f"batcher '{self.name}' is closed")
            self._ended = True
            self._ready.notify_all()

    # -- the consumer -------------------------------------------------------------------------

    def get_batch(self, timeout: float | None = None) -> list[T] | EndOfStream:
        """The next batch: 1 to ``max_batch`` items, or ``END_OF_STREAM`` once ended and empty.

        Args:
            timeout: seconds to wait for the *first* item; ``None`` waits until one comes, the
                stream ends or the batcher closes. (Once an item is there, the batch waits at
                most ``batch_timeout_s`` more, as the module docstring says.)

        Raises:
            BufferClosed: the batcher is closed (also while waiting).
            TimeoutError: no item within ``timeout``.
        """
        with self._lock:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._any_ready():
                if self._closed:
                    raise BufferClosed(f"batcher '{self.name}' is closed")
                if self._ended:
                    return END_OF_STREAM
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"batcher '{self.name}': no item within {timeout} s")
                self._ready.wait(remaining)
            if self._closed:
                raise BufferClosed(f"batcher '{self.name}' is closed")
            batch: list[T] = []
            given: set[Hashable] = set()
            window_end = time.monotonic() + self.spec.batch_timeout_s
            self._take(batch, given)
            while True:
                if len(batch) >= self.spec.max_batch or self._ended:
                    break
                waiting = [lane for lane in self._lanes.values() if lane.expected]
                waiting = [lane for lane in waiting if lane.key not in given]
                if not waiting:
                    break
                remaining = window_end - time.monotonic()
                if remaining <= 0:
                    for lane in waiting:  # missed this batch: later batches do not wait for it
                        lane.expected = False
                    break
                self._ready.wait(remaining)
                if self._closed:
                    raise BufferClosed(f"batcher '{self.name}' is closed")
                # Only the streams still missing: a second, newer frame of a stream already in
                # the batch waits for the next one (taking it would let the batch fill up before
                # a dead stream is ever found missing, and every batch would wait for it).
                self._take(batch, given, missing_only=True)
            self._room.notify_all()
            return batch

    # -- any thread ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close, waking every waiting ``put`` and ``get_batch`` (they raise ``BufferClosed``).
        Idempotent; safe from any thread."""
        with self._lock:
            self._closed = True
            self._ready.notify_all()
            self._room.notify_all()

    def lane_stats(self) -> tuple[BufferStats, ...]:
        """One ``BufferStats`` per lane, in the order the lanes were made, named ``name[key]``."""
        with self._lock:
            return tuple(
                BufferStats(
                    name=f"{self.name}[{lane.key}]",
                    capacity=lane.spec.capacity,
                    policy=lane.spec.policy,
                    level=len(lane.items),
                    high_water=lane.high_water,
                    put_count=lane.put_count,
                    get_count=lane.get_count,
                    dropped=lane.dropped,
                    ended=self._ended,
                    closed=self._closed,
                )
                for lane in (self._lanes[k] for k in self._order)
            )

    def stalled(self) -> tuple[Hashable, ...]:
        """Keys of the lanes no batch waits for now (none delivered yet, or one missed a batch)."""
        with self._lock:
            return tuple(k for k in self._order if not self._lanes[k].expected)

    # -- internals, lock held ----------------------------------------------------------------

    def _lane(self, key: Hashable, spec: LaneSpec) -> _Lane[T]:
        lane: _Lane[T] = _Lane(key, spec)
        self._lanes[key] = lane
        self._order.append(key)
        return lane

    def _any_ready(self) -> bool:
        return any(lane.items for lane in self._lanes.values())

    def _take(self, batch: list[T], given: set[Hashable], missing_only: bool = False) -> None:
        """Fill ``batch`` from the lanes in turn, one item per lane per round, until it is
        full or every lane is empty (``missing_only``: one round, over the lanes not in
        ``given``); the lane after the last one served goes first next time."""
        n = len(self._order)
        took = True
        while took and len(batch) < self.spec.max_batch:
            took = False
            start = self._next
            for step in range(n):
                if len(batch) >= self.spec.max_batch:
                    break
                index = (start + step) % n
                lane = self._lanes[self._order[index]]
                if not lane.items or (missing_only and lane.key in given):
                    continue
                batch.append(lane.items.popleft())
                lane.get_count += 1
                given.add(lane.key)
                self._next = (index + 1) % n
                took = True
            if missing_only:
                return

    def _check_open_for_put(self) -> None:
        if self._closed:
            raise BufferClosed(f"batcher '{self.name}' is closed")
        if self._ended:
            raise ValueError(
                f"batcher '{self.name}' got an item after its end of stream; call put_end() "
                "only after the last put()"
            )

    def _wait_for_room(self, lane: _Lane[T], timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(lane.items) >= lane.spec.capacity:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(
                    f"batcher '{self.name}' lane {lane.key!r} stayed full "
                    f"({lane.spec.capacity} items) for {timeout} s"
                )
            self._room.wait(remaining)
            self._check_open_for_put()
