"""What a stage is, seen from the engine.

The engine runs every stage in its own named thread and joins stages with ring buffers.
It knows nothing of video or models: a stage is any object with these few methods, and
the items that flow are opaque to the engine.

Three shapes of stage:

- ``Source``: makes items (a decoder). ``items()`` is iterated in the source's thread until
  it is exhausted or the pipeline stops.
- ``Processor``: turns one item into one item, or into nothing (``None``: the item is
  consumed, e.g. filtered). ``flush()`` hands on anything held back at the end of the stream.
- ``Sink``: consumes items (a writer). Sinks are fanned out: each gets every item, through its
  own buffer, and must treat the item as read-only (copy before drawing on a frame).

Every stage gets ``setup()`` in its own thread before the first item (load a model, make a
CUDA context there: contexts are per thread) and ``teardown()`` in the same thread after the
last one, whether the run ended normally, failed or was interrupted. Sinks flush and close
their outputs in ``teardown()``, so nothing already processed is lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, Protocol, TypeVar

ItemT = TypeVar("ItemT")
InT = TypeVar("InT", contravariant=True)
OutT = TypeVar("OutT", covariant=True)


class Source(Protocol[OutT]):
    name: str

    def setup(self) -> None: ...

    def items(self) -> Iterator[OutT]: ...

    def request_stop(self) -> None:
        """Called from another thread when the pipeline stops: a source that can block for long
        inside ``items()`` (a network read, a reconnect back-off) returns soon after."""
        ...

    def teardown(self) -> None: ...


class Processor(Protocol[InT, OutT]):
    name: str

    def setup(self) -> None: ...

    def process(self, item: InT) -> OutT | None: ...

    def flush(self) -> Iterable[OutT]: ...

    def teardown(self) -> None: ...


class Sink(Protocol[InT]):
    name: str

    def setup(self) -> None: ...

    def write(self, item: InT) -> None: ...

    def teardown(self) -> None: ...


class StageBase(Generic[ItemT]):
    """Empty defaults for the optional methods, so a stage writes only what it needs."""

    name: str = "stage"

    def setup(self) -> None:
        pass

    def flush(self) -> Iterable[ItemT]:
        return ()

    def request_stop(self) -> None:
        pass

    def teardown(self) -> None:
        pass
