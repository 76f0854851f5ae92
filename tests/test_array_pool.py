"""ArrayPool: reuse of the same memory, reference counts, blocking when empty, close(), and
release through a leaky RingBuffer's on_drop."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pipeline.array_pool import ArrayPool, PoolClosed, PooledArray, PoolExhausted
from pipeline.ring_buffer import OverflowPolicy, RingBuffer

WAKE_S = 5.0


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"shape": (2, 2), "dtype": np.uint8, "size": 0}, "size"),
        ({"shape": (2, 2), "dtype": np.uint8, "size": True}, "size"),
        ({"shape": [2, 2], "dtype": np.uint8, "size": 1}, "shape"),
        ({"shape": (2, -1), "dtype": np.uint8, "size": 1}, "shape"),
    ],
)
def test_bad_arguments_are_refused_naming_them(kwargs: dict[str, object], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        ArrayPool(**kwargs)  # type: ignore[arg-type]


def test_arrays_have_the_pool_shape_and_their_memory_is_reused() -> None:
    pool = ArrayPool((4, 6, 3), np.uint8, size=2, name="frames")
    a = pool.acquire()
    assert a.array.shape == (4, 6, 3) and a.array.dtype == np.uint8
    addresses = {a.array.ctypes.data}
    a.release()
    for _ in range(10):
        with pool.acquire() as h:
            addresses.add(h.array.ctypes.data)
    assert len(addresses) <= 2  # never more arrays than the pool made
    assert pool.free == 2


def test_the_array_returns_only_when_the_last_holder_releases() -> None:
    pool = ArrayPool((3,), np.float32, size=1)
    h = pool.acquire()
    assert h.retain() is h and h.refcount == 2  # e.g. fanned out to a second sink
    h.release()
    assert pool.free == 0
    h.array[:] = 1.0  # still valid for the remaining holder
    h.release()
    assert pool.free == 1
    with pytest.raises(RuntimeError, match="used after its last release"):
        _ = h.array
    with pytest.raises(RuntimeError, match="released more times"):
        h.release()
    with pytest.raises(RuntimeError, match="retained after"):
        h.retain()
    # The next user gets a fresh handle on the same array: the stale one stays refused.
    h2 = pool.acquire()
    assert h2 is not h and h2.refcount == 1
    with pytest.raises(RuntimeError):
        _ = h.array


def test_an_empty_pool_blocks_then_times_out_with_the_fix() -> None:
    pool = ArrayPool((2,), np.uint8, size=1, name="frames")
    held = pool.acquire()
    with pytest.raises(PoolExhausted, match=r"pool 'frames'.*release\(\).*size="):
        pool.acquire(timeout=0.05)
    assert isinstance(PoolExhausted("x"), TimeoutError)
    held.release()
    pool.acquire(timeout=0).release()


def test_a_blocked_acquire_wakes_on_release() -> None:
    pool = ArrayPool((2,), np.uint8, size=1)
    held = pool.acquire()
    got: list[PooledArray] = []
    t = threading.Thread(target=lambda: got.append(pool.acquire()), daemon=True)
    t.start()
    t.join(0.1)
    assert t.is_alive() and not got
    held.release()
    t.join(WAKE_S)
    assert len(got) == 1 and pool.free == 0


def test_close_wakes_blocked_acquires() -> None:
    pool = ArrayPool((2,), np.uint8, size=1, name="frames")
    held = pool.acquire()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            pool.acquire()
        except PoolClosed as exc:
            errors.append(exc)

    threads = [threading.Thread(target=waiter, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.1)  # let them block
    pool.close()
    for t in threads:
        t.join(WAKE_S)
    assert len(errors) == 3 and not any(t.is_alive() for t in threads)
    held.release()  # a release after close still returns the array
    assert pool.free == 1


def test_no_array_is_held_by_two_threads_at_once() -> None:
    pool = ArrayPool((16,), np.int64, size=3)
    clashes: list[int] = []

    def worker(tag: int) -> None:
        for _ in range(300):
            with pool.acquire(timeout=WAKE_S) as h:
                h.array[:] = tag
                # Another holder of the same array would have overwritten it by now.
                if not (h.array == tag).all():
                    clashes.append(tag)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert clashes == []
    assert pool.free == 3


def test_a_leaky_ring_buffer_gives_dropped_arrays_back() -> None:
    pool = ArrayPool((8, 8, 3), np.uint8, size=4)
    buf: RingBuffer[PooledArray] = RingBuffer(
        2, OverflowPolicy.DROP_OLDEST, on_drop=PooledArray.release
    )
    for k in range(10):
        h = pool.acquire(timeout=WAKE_S)  # would exhaust the pool if drops leaked
        h.array[:] = k
        buf.put(h)
    assert pool.free == 2
    kept = [buf.get(), buf.get()]
    assert all(isinstance(x, PooledArray) for x in kept)
    handles = [x for x in kept if isinstance(x, PooledArray)]
    assert [int(x.array[0, 0, 0]) for x in handles] == [8, 9]
    for x in handles:
        x.release()
    assert pool.free == 4
