"""Preallocated numpy arrays of one shape and dtype, handed out with reference counts.

Large frames (a 4K RGB frame is 25 MB) should not be allocated per frame: a source acquires a
``PooledArray`` from an ``ArrayPool``, fills ``.array`` in place, and hands the handle on.
Whoever holds a reference calls ``release()`` when done with it; an array goes back to the
pool when its count reaches zero. A holder that passes the handle to a second consumer (e.g.
fan-out to two sinks) calls ``retain()`` once per extra consumer first. A ring buffer that drops
an item under a leaky policy releases it through its ``on_drop`` callback.

When the pool is empty, ``acquire()`` *blocks* (up to its timeout) until a holder releases an
array. Chosen over growing: blocking keeps the memory bound that is the point of a pool and
makes a leaked handle show up as a clear ``PoolExhausted`` error instead of slow growth.
Size the pool for the worst case in flight: the capacities of every buffer the arrays travel
through, plus one per stage that may hold one, plus one for the producer.

Threads: any thread may call ``acquire()``, ``retain()``, ``release()``, ``close()``; one lock
per pool guards the free list and every count. Contents of an acquired array are whatever its
last user left (not zeroed).

This is the one engine module that imports numpy.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

import numpy as np
from numpy.typing import DTypeLike

__all__ = ["ArrayPool", "PoolClosed", "PoolExhausted", "PooledArray"]


class PoolExhausted(TimeoutError):
    """No array was released within the timeout: every array of the pool is held."""


class PoolClosed(Exception):
    """The pool was closed (the pipeline is aborting): no more arrays are handed out."""


class PooledArray:
    """A counted reference to one array of an ``ArrayPool``.

    Made by ``ArrayPool.acquire()`` with a count of 1. Each ``acquire()`` makes a new handle,
    so a handle kept after its final ``release()`` is refused rather than silently aliasing the
    next user's data. Usable as a context manager that releases on exit.
    """

    __slots__ = ("_array", "_pool", "_refs")

    def __init__(self, pool: ArrayPool, array: np.ndarray) -> None:
        self._pool = pool
        self._array = array
        self._refs = 1

    @property
    def array(self) -> np.ndarray:
        """The array, of the pool's shape and dtype; valid until the last ``release()``.

        Raises:
            RuntimeError: the handle was fully released.
        """
        if self._refs <= 0:
            raise RuntimeError(
                f"array from pool '{self._pool.name}' used after its last release(); "
                "retain() it before handing it to a second holder"
            )
        return self._array

    @property
    def refcount(self) -> int:
        return self._refs

    def retain(self) -> PooledArray:
        """Add a reference (one per extra holder); returns ``self``."""
        self._pool._retain(self)
        return self

    def release(self) -> None:
        """Drop one reference; at zero the array goes back to the pool."""
        self._pool._release(self)

    def __enter__(self) -> PooledArray:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"PooledArray(pool={self._pool.name!r}, refcount={self._refs})"


class ArrayPool:
    """A fixed number of arrays of one shape and dtype.

    Args:
        shape: the shape of every array, e.g. ``(H, W, 3)`` for an RGB frame.
        dtype: their dtype, e.g. ``np.uint8``.
        size: how many arrays; at least 1. All are allocated here.
        name: shown in errors and repr.
    """

    def __init__(
        self, shape: tuple[int, ...], dtype: DTypeLike, size: int, *, name: str = ""
    ) -> None:
        if not isinstance(shape, tuple) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise ValueError(f"shape must be a tuple of ints >= 0, got {shape!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        self.name = name
        self._shape = shape
        self._dtype = np.dtype(dtype)
        self._size = size
        self._free: list[np.ndarray] = [np.empty(shape, self._dtype) for _ in range(size)]
        self._lock = threading.Lock()
        self._available = threading.Condition(self._lock)
        self._closed = False

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def size(self) -> int:
        return self._size

    @property
    def free(self) -> int:
        """Arrays not held by anyone now."""
        with self._lock:
            return len(self._free)

    def __repr__(self) -> str:
        return (
            f"ArrayPool(name={self.name!r}, shape={self._shape}, dtype={self._dtype}, "
            f"free={self.free}/{self._size})"
        )

    def acquire(self, timeout: float | None = None) -> PooledArray:
        """Take a free array, waiting for a release if none is free.

        Args:
            timeout: seconds to wait at most; ``None`` waits until an array is released or the
                pool closes.

        Returns:
            A handle with a count of 1; its array's contents are left over from the last user.

        Raises:
            PoolExhausted: nothing was released within ``timeout``.
            PoolClosed: the pool is closed (also when it closes while waiting).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                if self._closed:
                    raise PoolClosed(f"array pool '{self.name}' is closed")
                if self._free:
                    return PooledArray(self, self._free.pop())
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise PoolExhausted(
                        f"array pool '{self.name}': no array released within {timeout} s, all "
                        f"{self._size} are held; release() each PooledArray when done with it "
                        "or make the pool larger (size=)"
                    )
                self._available.wait(remaining)

    def close(self) -> None:
        """Wake every blocked ``acquire()`` (they raise ``PoolClosed``); refuse later ones.
        Releases still return arrays. Idempotent."""
        with self._lock:
            self._closed = True
            self._available.notify_all()

    def _retain(self, handle: PooledArray) -> None:
        with self._lock:
            if handle._refs <= 0:
                raise RuntimeError(
                    f"array from pool '{self.name}' retained after its last release()"
                )
            handle._refs += 1

    def _release(self, handle: PooledArray) -> None:
        with self._lock:
            if handle._refs <= 0:
                raise RuntimeError(
                    f"array from pool '{self.name}' released more times than acquired and "
                    "retained"
                )
            handle._refs -= 1
            if handle._refs == 0:
                self._free.append(handle._array)
                self._available.notify()
