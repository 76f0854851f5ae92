"""RingBuffer: each overflow policy, the end marker, close() waking blocked threads, counters
under concurrency, and a hypothesis state machine against a plain-list model."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pipeline.ring_buffer import (
    END_OF_STREAM,
    BufferClosed,
    OverflowPolicy,
    RingBuffer,
)

# Bounded-time guarantee for threads woken by close(): generous for a loaded 2-core machine.
WAKE_S = 5.0


def _start(target: Callable[[], None], name: str) -> threading.Thread:
    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    return t


def _wait_until_blocked(buf: RingBuffer[int], n_threads: list[threading.Thread]) -> None:
    """Give the threads time to enter their wait (there is no public 'waiters' count)."""
    time.sleep(0.1)
    assert all(t.is_alive() for t in n_threads), "thread returned instead of blocking"


# -- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -1, 1.5, True, "4"])
def test_bad_capacity_is_refused_naming_the_argument(capacity: object) -> None:
    with pytest.raises(ValueError, match="capacity"):
        RingBuffer(capacity)  # type: ignore[arg-type]


def test_bad_policy_is_refused_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="policy"):
        RingBuffer(2, "drop_oldest")  # type: ignore[arg-type]


# -- each policy --------------------------------------------------------------------------------


def test_block_keeps_fifo_order_and_times_out_when_full() -> None:
    buf: RingBuffer[int] = RingBuffer(3, name="q")
    assert all(buf.put(i) for i in range(3))
    with pytest.raises(TimeoutError, match="'q'"):
        buf.put(99, timeout=0.05)
    assert [buf.get() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(TimeoutError, match="'q'"):
        buf.get(timeout=0.05)
    s = buf.stats()
    # The put that timed out was not taken: the caller still owns it.
    assert (s.put_count, s.get_count, s.dropped, s.level, s.high_water) == (3, 3, 0, 0, 3)


def test_block_put_waits_for_a_get() -> None:
    buf: RingBuffer[int] = RingBuffer(1)
    buf.put(0)
    done = threading.Event()

    def producer() -> None:
        buf.put(1)
        done.set()

    t = _start(producer, "producer")
    assert not done.wait(0.1), "put on a full BLOCK buffer returned without a free slot"
    assert buf.get() == 0
    assert done.wait(WAKE_S)
    assert buf.get() == 1
    t.join(WAKE_S)


def test_drop_oldest_evicts_the_oldest_and_hands_it_to_on_drop() -> None:
    dropped: list[int] = []
    buf: RingBuffer[int] = RingBuffer(3, OverflowPolicy.DROP_OLDEST, on_drop=dropped.append)
    results = [buf.put(i) for i in range(7)]
    assert results == [True] * 7  # the new item always gets in
    assert dropped == [0, 1, 2, 3]
    assert [buf.get() for _ in range(3)] == [4, 5, 6]
    s = buf.stats()
    assert (s.put_count, s.get_count, s.dropped, s.level, s.high_water) == (7, 3, 4, 0, 3)


def test_drop_newest_refuses_the_incoming_item() -> None:
    dropped: list[int] = []
    buf: RingBuffer[int] = RingBuffer(2, OverflowPolicy.DROP_NEWEST, on_drop=dropped.append)
    results = [buf.put(i) for i in range(5)]
    assert results == [True, True, False, False, False]
    assert dropped == [2, 3, 4]
    assert [buf.get(), buf.get()] == [0, 1]
    s = buf.stats()
    assert (s.put_count, s.get_count, s.dropped, s.level) == (5, 2, 3, 0)


def test_on_drop_runs_outside_the_lock() -> None:
    """A callback that looks at the buffer (stats, or put into another) must not deadlock."""
    seen: list[int] = []

    def on_drop(item: int) -> None:
        # From another thread: if put() still held the lock, stats() would block there.
        t = _start(lambda: seen.append(buf.stats().dropped), "inspector")
        t.join(WAKE_S)
        assert not t.is_alive()

    buf: RingBuffer[int] = RingBuffer(1, OverflowPolicy.DROP_OLDEST, on_drop=on_drop)
    buf.put(1)
    buf.put(2)
    assert seen == [1]


# -- end of stream ------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", list(OverflowPolicy))
def test_end_marker_gets_through_a_full_buffer_and_is_sticky(policy: OverflowPolicy) -> None:
    buf: RingBuffer[int] = RingBuffer(2, policy)
    buf.put(0)
    buf.put(1)
    buf.put_end()  # must neither block nor be dropped, whatever the policy
    assert buf.get() == 0
    assert buf.get() == 1
    assert buf.get() is END_OF_STREAM
    assert buf.get(timeout=0) is END_OF_STREAM  # every consumer sees it
    s = buf.stats()
    assert s.ended and s.get_count == 2 and s.dropped == 0


def test_put_after_end_is_refused() -> None:
    buf: RingBuffer[int] = RingBuffer(2, name="q")
    buf.put_end()
    with pytest.raises(ValueError, match="after its end of stream"):
        buf.put(1)
    with pytest.raises(ValueError, match="put_end"):
        buf.put(END_OF_STREAM)  # type: ignore[arg-type]


def test_end_wakes_every_waiting_consumer() -> None:
    buf: RingBuffer[int] = RingBuffer(2)
    got: list[object] = []
    threads = [_start(lambda: got.append(buf.get()), f"c{i}") for i in range(3)]
    _wait_until_blocked(buf, threads)
    buf.put_end()
    for t in threads:
        t.join(WAKE_S)
    assert got == [END_OF_STREAM] * 3


# -- close --------------------------------------------------------------------------------------


def test_close_wakes_blocked_puts_and_gets_at_once() -> None:
    full: RingBuffer[int] = RingBuffer(1, name="full")
    full.put(0)
    empty: RingBuffer[int] = RingBuffer(1, name="empty")
    outcomes: list[str] = []
    lock = threading.Lock()

    def blocked(call: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                call()
                result = "returned"
            except BufferClosed:
                result = "closed"
            with lock:
                outcomes.append(result)

        return run

    threads = [_start(blocked(lambda: full.put(1)), f"p{i}") for i in range(3)]
    threads += [_start(blocked(empty.get), f"g{i}") for i in range(3)]
    _wait_until_blocked(full, threads)
    t0 = time.monotonic()
    full.close()
    empty.close()
    for t in threads:
        t.join(WAKE_S)
    assert time.monotonic() - t0 < WAKE_S
    assert not any(t.is_alive() for t in threads)
    assert outcomes == ["closed"] * 6


def test_closed_buffer_refuses_everything_but_keeps_its_counts() -> None:
    buf: RingBuffer[int] = RingBuffer(3)
    buf.put(1)
    buf.close()
    buf.close()  # idempotent
    with pytest.raises(BufferClosed):
        buf.put(2)
    with pytest.raises(BufferClosed):
        buf.get()
    with pytest.raises(BufferClosed):
        buf.put_end()
    s = buf.stats()
    assert s.closed and s.level == 1 and s.put_count == 1


# -- concurrency --------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", list(OverflowPolicy))
def test_many_producers_and_consumers_lose_and_duplicate_nothing(policy: OverflowPolicy) -> None:
    n_producers, n_consumers, per_producer = 4, 3, 2000
    dropped: list[tuple[int, int]] = []
    drop_lock = threading.Lock()

    def on_drop(item: tuple[int, int]) -> None:
        with drop_lock:
            dropped.append(item)

    buf: RingBuffer[tuple[int, int]] = RingBuffer(5, policy, on_drop=on_drop)
    received: list[list[tuple[int, int]]] = [[] for _ in range(n_consumers)]
    snapshots_ok: list[bool] = []
    producers_done = threading.Event()

    def producer(p: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(per_producer):
                buf.put((p, i))

        return run

    def consumer(c: int) -> Callable[[], None]:
        def run() -> None:
            while (item := buf.get()) is not END_OF_STREAM:
                received[c].append(item)

        return run

    def watcher() -> None:
        while not producers_done.is_set():
            s = buf.stats()
            # Recorded, not asserted: an assert in a thread would not fail the test.
            snapshots_ok.append(
                s.put_count == s.get_count + s.dropped + s.level and 0 <= s.level <= s.capacity
            )

    consumers = [_start(consumer(c), f"consumer{c}") for c in range(n_consumers)]
    watch = _start(watcher, "watcher")
    producers = [_start(producer(p), f"producer{p}") for p in range(n_producers)]
    for t in producers:
        t.join(30)
    buf.put_end()
    producers_done.set()
    for t in [*consumers, watch]:
        t.join(30)
    assert not any(t.is_alive() for t in [*producers, *consumers, watch])

    everything = sorted([x for r in received for x in r] + dropped)
    assert everything == sorted((p, i) for p in range(n_producers) for i in range(per_producer))
    # Each consumer sees each producer's items in the order they were put.
    for r in received:
        for p in range(n_producers):
            seq = [i for q, i in r if q == p]
            assert seq == sorted(seq)
    s = buf.stats()
    assert s.put_count == n_producers * per_producer
    assert s.get_count == sum(len(r) for r in received)
    assert s.dropped == len(dropped)
    assert s.put_count == s.get_count + s.dropped + s.level
    assert s.high_water <= s.capacity
    assert snapshots_ok and all(snapshots_ok)
    if policy is OverflowPolicy.BLOCK:
        assert s.dropped == 0


# -- model-based ------------------------------------------------------------------------------


class RingBufferMachine(RuleBasedStateMachine):
    """Single-threaded operations against a deque model; timeouts of 0 never wait."""

    def __init__(self) -> None:
        super().__init__()
        self.buf: RingBuffer[int] | None = None
        self.model: deque[int] = deque()
        self.dropped: list[int] = []
        self.model_dropped: list[int] = []
        self.capacity = 1
        self.policy = OverflowPolicy.BLOCK
        self.ended = False
        self.next_item = 0

    @precondition(lambda self: self.buf is None)
    @rule(capacity=st.integers(1, 5), policy=st.sampled_from(list(OverflowPolicy)))
    def create(self, capacity: int, policy: OverflowPolicy) -> None:
        self.capacity, self.policy = capacity, policy
        self.buf = RingBuffer(capacity, policy, on_drop=self.dropped.append)

    @precondition(lambda self: self.buf is not None and not self.ended)
    @rule()
    def put(self) -> None:
        assert self.buf is not None
        item = self.next_item
        self.next_item += 1
        if len(self.model) < self.capacity:
            assert self.buf.put(item, timeout=0) is True
            self.model.append(item)
        elif self.policy is OverflowPolicy.BLOCK:
            with pytest.raises(TimeoutError):
                self.buf.put(item, timeout=0)
        elif self.policy is OverflowPolicy.DROP_OLDEST:
            assert self.buf.put(item, timeout=0) is True
            self.model_dropped.append(self.model.popleft())
            self.model.append(item)
        else:
            assert self.buf.put(item, timeout=0) is False
            self.model_dropped.append(item)

    @precondition(lambda self: self.buf is not None)
    @rule()
    def get(self) -> None:
        assert self.buf is not None
        if self.model:
            assert self.buf.get(timeout=0) == self.model.popleft()
        elif self.ended:
            assert self.buf.get(timeout=0) is END_OF_STREAM
        else:
            with pytest.raises(TimeoutError):
                self.buf.get(timeout=0)

    @precondition(lambda self: self.buf is not None)
    @rule()
    def end(self) -> None:
        assert self.buf is not None
        self.buf.put_end()
        self.ended = True

    @invariant()
    def counters_match_the_model(self) -> None:
        if self.buf is None:
            return
        s = self.buf.stats()
        assert s.level == len(self.model)
        assert s.dropped == len(self.model_dropped)
        assert self.dropped == self.model_dropped
        assert s.put_count == s.get_count + s.dropped + s.level
        assert s.level <= s.high_water <= s.capacity


TestRingBufferMachine = RingBufferMachine.TestCase
TestRingBufferMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
