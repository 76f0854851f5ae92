"""A bounded, thread-safe FIFO between two stages, with a choice of what to do when it is full.

The vocabulary is GStreamer's ``queue`` element: the buffer holds at most ``capacity`` items
and *blocks* the producer when full (``OverflowPolicy.BLOCK``, for files: lose nothing), or is
*leaky*: ``DROP_OLDEST`` (``leaky=downstream``, for live streams: the newest frame wins) or
``DROP_NEWEST`` (``leaky=upstream``: the incoming item is refused).

Threads: any number of producer threads call ``put()`` / ``put_end()``, any number of consumer
threads call ``get()``; any thread (the runner, a signal handler) may call ``close()`` and
``stats()``. One lock guards everything; ``close()`` wakes every blocked ``put`` and ``get`` at
once, so a failing pipeline never leaves a stage stuck on a full or empty buffer.

End of stream is explicit: ``put_end()`` marks it, and once the items before it are taken every
``get()`` returns the ``END_OF_STREAM`` sentinel (it is sticky, so several consumers all see it).
The marker takes no slot, so it is never dropped by a leaky policy and never blocks, even on a
full buffer.

Ownership: ``put()`` takes the item. If the buffer discards it (the oldest under
``DROP_OLDEST``, the incoming one under ``DROP_NEWEST``) it hands it to ``on_drop`` (so a pooled
array can be released); ``on_drop`` runs in the producer's thread, outside the lock. When
``put()`` raises (``BufferClosed``, ``TimeoutError``) the caller still owns the item. Items left
in a buffer when it is closed stay there (counted in ``level``) and are not passed to
``on_drop``.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

__all__ = [
    "END_OF_STREAM",
    "BufferClosed",
    "BufferStats",
    "EndOfStream",
    "OverflowPolicy",
    "RingBuffer",
]

T = TypeVar("T")


class OverflowPolicy(enum.Enum):
    """What ``put()`` does when the buffer is full."""

    #: Wait for a free slot (or the timeout): nothing is lost; the producer slows to the consumer.
    BLOCK = "block"
    #: Discard the oldest queued item to make room (GStreamer ``leaky=downstream``).
    DROP_OLDEST = "drop_oldest"
    #: Refuse the incoming item (GStreamer ``leaky=upstream``).
    DROP_NEWEST = "drop_newest"


class EndOfStream(enum.Enum):
    """The type of the end-of-stream sentinel (a one-member enum so type checkers narrow on it)."""

    END_OF_STREAM = "end_of_stream"


#: Returned by ``RingBuffer.get()`` once the producer side has called ``put_end()`` and every
#: item before it has been taken. Compare with ``is``.
END_OF_STREAM: Final = EndOfStream.END_OF_STREAM


class BufferClosed(Exception):
    """The buffer was closed (the pipeline is aborting): no more items go in or come out."""


@dataclass(frozen=True)
class BufferStats:
    """A consistent snapshot of one buffer's counters (taken under its lock).

    Invariant: ``put_count == get_count + dropped + level``.

    Attributes:
        name: the buffer's name (the runner uses ``"<consumer stage>.in"``).
        capacity: the most items it holds.
        policy: what a ``put()`` on a full buffer does.
        level: items queued now.
        high_water: the highest ``level`` ever reached.
        put_count: items handed to ``put()`` that were accounted for (queued or dropped);
            puts that raised are not counted.
        get_count: items returned by ``get()`` (the end marker is not an item).
        dropped: items discarded by the leaky policy (both the evicted oldest and the refused
            newest).
        ended: ``put_end()`` was called.
        closed: ``close()`` was called.
    """

    name: str
    capacity: int
    policy: OverflowPolicy
    level: int
    high_water: int
    put_count: int
    get_count: int
    dropped: int
    ended: bool
    closed: bool


class RingBuffer(Generic[T]):
    """A bounded FIFO of ``T`` with an overflow policy, an end marker and ``close()``.

    Args:
        capacity: the most items held at once; at least 1.
        policy: what ``put()`` does when full.
        name: shown in stats, errors and logs.
        on_drop: called with each item the buffer discards (see the module docstring).
    """

    def __init__(
        self,
        capacity: int,
        policy: OverflowPolicy = OverflowPolicy.BLOCK,
        name: str = "",
        on_drop: Callable[[T], None] | None = None,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        if not isinstance(policy, OverflowPolicy):
            raise ValueError(
                f"policy must be an OverflowPolicy ({', '.join(p.name for p in OverflowPolicy)}), "
                f"got {policy!r}"
            )
        self._capacity = capacity
        self._policy = policy
        self.name = name
        self._on_drop = on_drop
        self._items: deque[T] = deque()
        # An RLock so that close() stays safe when a signal handler running on a thread that is
        # inside one of these methods calls it (the handler runs on that same thread).
        self._lock = threading.RLock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._put_count = 0
        self._get_count = 0
        self._dropped = 0
        self._high_water = 0
        self._ended = False
        self._closed = False

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def policy(self) -> OverflowPolicy:
        return self._policy

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"RingBuffer(name={s.name!r}, level={s.level}/{s.capacity}, policy={s.policy.name}, "
            f"dropped={s.dropped}, ended={s.ended}, closed={s.closed})"
        )

    def put(self, item: T, timeout: float | None = None) -> bool:
        """Queue ``item``; the buffer now owns it.

        Args:
            item: anything; ``END_OF_STREAM`` is refused (use ``put_end()``).
            timeout: seconds to wait for a free slot under ``BLOCK``; ``None`` waits until a
                slot frees or the buffer closes. Leaky policies never wait.

        Returns:
            ``True`` if ``item`` was queued (under ``DROP_OLDEST`` possibly by evicting the oldest
            item), ``False`` if ``DROP_NEWEST`` refused it (it was passed to ``on_drop``).

        Raises:
            BufferClosed: the buffer is closed (also when it closes while waiting).
            TimeoutError: ``BLOCK`` and no slot freed within ``timeout``.
            ValueError: ``put_end()`` was already called, or ``item`` is the end marker.
        """
        if item is END_OF_STREAM:
            raise ValueError(
                f"buffer '{self.name}': pass the end of stream with put_end(), not put()"
            )
        dropped_item: T
        with self._lock:
            self._check_open_for_put()
            if len(self._items) < self._capacity:
                self._append(item)
                return True
            if self._policy is OverflowPolicy.DROP_NEWEST:
                self._put_count += 1
                self._dropped += 1
                dropped_item = item
                accepted = False
            elif self._policy is OverflowPolicy.DROP_OLDEST:
                dropped_item = self._items.popleft()
                self._dropped += 1
                self._append(item)
                accepted = True
            else:
                self._wait_for_slot(timeout)
                self._append(item)
                return True
        if self._on_drop is not None:
            self._on_drop(dropped_item)
        return accepted

    def put_end(self) -> None:
        """Mark the end of the stream after the items already queued.

        Never blocks and is never dropped: the marker takes no slot. Calling it again is a no-op.

        Raises:
            BufferClosed: the buffer is closed.
        """
        with self._lock:
            if self._closed:
                raise BufferClosed(f"buffer '{self.name}' is closed")
            self._ended = True
            # Every waiting consumer must see the end, not just one.
            self._not_empty.notify_all()

    def get(self, timeout: float | None = None) -> T | EndOfStream:
        """Take the oldest item, waiting for one if the buffer is empty.

        Args:
            timeout: seconds to wait; ``None`` waits until an item arrives, the stream ends or
                the buffer closes.

        Returns:
            The oldest item, or ``END_OF_STREAM`` once ``put_end()`` was called and no item is
            left (every later call returns it again).

        Raises:
            BufferClosed: the buffer is closed (also when it closes while waiting); items still
                queued are not returned.
            TimeoutError: nothing arrived within ``timeout``.
        """
        with self._lock:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if self._closed:
                    raise BufferClosed(f"buffer '{self.name}' is closed")
                if self._items:
                    item = self._items.popleft()
                    self._get_count += 1
                    self._not_full.notify()
                    return item
                if self._ended:
                    return END_OF_STREAM
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"buffer '{self.name}': no item within {timeout} s")
                self._not_empty.wait(remaining)

    def close(self) -> None:
        """Close the buffer and wake every blocked ``put`` and ``get`` (they raise
        ``BufferClosed``). Idempotent; safe from any thread."""
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def stats(self) -> BufferStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return BufferStats(
                name=self.name,
                capacity=self._capacity,
                policy=self._policy,
                level=len(self._items),
                high_water=self._high_water,
                put_count=self._put_count,
                get_count=self._get_count,
                dropped=self._dropped,
                ended=self._ended,
                closed=self._closed,
            )

    # -- internals, called with the lock held ------------------------------------------------

    def _check_open_for_put(self) -> None:
        if self._closed:
            raise BufferClosed(f"buffer '{self.name}' is closed")
        if self._ended:
            raise ValueError(
                f"buffer '{self.name}' got an item after its end of stream; call put_end() "
                "only after the last put()"
            )

    def _append(self, item: T) -> None:
        self._items.append(item)
        self._put_count += 1
        if len(self._items) > self._high_water:
            self._high_water = len(self._items)
        self._not_empty.notify()

    def _wait_for_slot(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self._items) >= self._capacity:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(
                    f"buffer '{self.name}' stayed full ({self._capacity} items) for {timeout} s"
                )
            self._not_full.wait(remaining)
            self._check_open_for_put()
