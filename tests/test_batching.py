"""The batcher in front of a shared stage: batches from the streams that are ready, a stalled
stream left out after one wait, per-stream order, drops and the end; and the runner driving a
batched processor. Pure engine: items are (stream, number) tuples, no video, no model.

The two waits checked here (a batch waits for an expected stream, and no longer once it is
stalled) are bounds on what the batcher does, not speed: the margins are seconds wide.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence

import pytest

from pipeline.batching import Batcher, BatchSpec, LaneSpec
from pipeline.ring_buffer import END_OF_STREAM, BufferClosed, OverflowPolicy
from pipeline.runner import BufferSpec, Pipeline, StageError
from pipeline.stage import StageBase

Item = tuple[str, int]
LATEST = LaneSpec(1, OverflowPolicy.DROP_OLDEST)
BLOCK = LaneSpec(3, OverflowPolicy.BLOCK)


def _stream(item: Item) -> str:
    return item[0]


def _batcher(
    max_batch: int,
    timeout_s: float = 0.0,
    lanes: Sequence[str] = (),
    lane: LaneSpec = LATEST,
) -> Batcher[Item]:
    spec = BatchSpec(
        key=_stream,
        max_batch=max_batch,
        batch_timeout_s=timeout_s,
        lanes={k: lane for k in lanes},
        default_lane=lane,
    )
    return Batcher(spec, name="infer.in")


def _timed_batch(batcher: Batcher[Item]) -> tuple[list[Item], float]:
    start = time.monotonic()
    batch = batcher.get_batch(timeout=10)
    assert batch is not END_OF_STREAM
    return batch, time.monotonic() - start


def test_a_batch_holds_one_frame_of_each_ready_stream() -> None:
    b = _batcher(max_batch=4)
    for stream in ("a", "b", "c"):
        b.put((stream, 0))
    assert b.get_batch() == [("a", 0), ("b", 0), ("c", 0)]


def test_max_batch_caps_the_batch_and_the_streams_take_turns() -> None:
    streams = [f"s{i}" for i in range(6)]
    b = _batcher(max_batch=4, lanes=streams)
    served: dict[str, int] = dict.fromkeys(streams, 0)
    for n in range(6):
        for s in streams:  # every camera has a new frame before each batch
            b.put((s, n))
        batch = b.get_batch()
        assert batch != END_OF_STREAM and len(batch) == 4
        for s, _ in batch:
            served[s] += 1
    # 24 frames over 6 streams: each served 4 times, none starved by its place in the list.
    assert served == dict.fromkeys(streams, 4)


def test_latest_only_lane_keeps_the_newest_and_counts_the_drops() -> None:
    b = _batcher(max_batch=2, lanes=("a",))
    for n in range(5):
        b.put(("a", n))
    assert b.get_batch() == [("a", 4)]
    (lane,) = b.lane_stats()
    assert lane.name == "infer.in[a]"
    assert (lane.put_count, lane.dropped, lane.get_count, lane.level) == (5, 4, 1, 0)


def test_a_stream_never_heard_from_does_not_delay_a_batch() -> None:
    b = _batcher(max_batch=4, timeout_s=5.0, lanes=("a", "b", "c", "d"))
    b.put(("a", 0))
    batch, took_s = _timed_batch(b)
    assert batch == [("a", 0)]
    assert took_s < 2.5  # it did not wait the 5 s for streams that never delivered
    assert set(b.stalled()) == {"b", "c", "d"}


def test_a_batch_waits_for_an_expected_stream_until_it_delivers() -> None:
    b = _batcher(max_batch=3, timeout_s=5.0)
    for s in ("a", "b", "c"):
        b.put((s, 0))
    assert b.get_batch() == [("a", 0), ("b", 0), ("c", 0)]  # all three are expected now
    b.put(("a", 1))
    b.put(("b", 1))
    threading.Timer(0.3, lambda: b.put(("c", 1))).start()
    batch, took_s = _timed_batch(b)
    assert batch == [("a", 1), ("b", 1), ("c", 1)]
    assert 0.25 < took_s < 4.0  # waited for c, and ended when c came, not at the timeout


def test_a_stalled_stream_costs_one_timeout_then_is_left_out() -> None:
    timeout_s = 1.0
    b = _batcher(max_batch=3, timeout_s=timeout_s)
    for s in ("a", "b", "c"):
        b.put((s, 0))
    b.get_batch()
    # c's camera dies: the next batch waits for it, at most the timeout ...
    b.put(("a", 1))
    b.put(("b", 1))
    batch, took_s = _timed_batch(b)
    assert batch == [("a", 1), ("b", 1)]
    assert timeout_s - 0.05 < took_s < timeout_s + 2.0
    assert b.stalled() == ("c",)
    # ... and the batches after it do not wait for c at all.
    for n in (2, 3):
        b.put(("a", n))
        b.put(("b", n))
        batch, took_s = _timed_batch(b)
        assert batch == [("a", n), ("b", n)]
        assert took_s < timeout_s / 2
    # When c comes back it is in the next batch, and expected again.
    b.put(("c", 9))
    b.put(("a", 4))
    back = b.get_batch()
    assert back is not END_OF_STREAM and sorted(back) == [("a", 4), ("c", 9)]
    assert "c" not in b.stalled()


def test_a_newer_frame_of_a_stream_in_the_batch_does_not_fill_the_dead_streams_place() -> None:
    # Four cameras, max_batch 4, one dies: while the batch waits for it, a live camera's next
    # frame must not fill the place, or the dead camera would never be found missing and every
    # batch would wait for such a second frame.
    timeout_s = 1.0
    b = _batcher(max_batch=4, timeout_s=timeout_s)
    for s in "abcd":
        b.put((s, 0))
    b.get_batch()
    for s in "abc":
        b.put((s, 1))
    threading.Timer(0.2, lambda: b.put(("a", 2))).start()
    batch, took_s = _timed_batch(b)
    assert batch == [("a", 1), ("b", 1), ("c", 1)]
    assert took_s > timeout_s - 0.05
    assert b.stalled() == ("d",)
    assert b.get_batch() == [("a", 2)]  # the newer frame, in the next batch


def test_per_stream_order_is_kept_across_batches_with_blocking_lanes() -> None:
    b = _batcher(max_batch=4, timeout_s=0.01, lane=BLOCK)
    per_stream = 200

    def produce(stream: str) -> None:
        for n in range(per_stream):
            b.put((stream, n))  # blocks while its lane is full: nothing is dropped

    producers = [threading.Thread(target=produce, args=(s,)) for s in ("a", "b", "c")]
    for t in producers:
        t.start()
    got: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    sizes = []
    while sum(len(v) for v in got.values()) < 3 * per_stream:
        batch = b.get_batch(timeout=10)
        assert batch is not END_OF_STREAM
        sizes.append(len(batch))
        for s, n in batch:
            got[s].append(n)
    for t in producers:
        t.join(5)
    assert got == {s: list(range(per_stream)) for s in got}
    assert max(sizes) <= 4
    assert all(lane.dropped == 0 for lane in b.lane_stats())


def test_the_end_drains_what_is_queued_without_waiting_then_sticks() -> None:
    b = _batcher(max_batch=2, timeout_s=30.0, lane=BLOCK)
    for s in ("a", "b", "c"):
        b.put((s, 0))
    b.put(("a", 1))
    b.put_end()
    start = time.monotonic()
    assert b.get_batch() == [("a", 0), ("b", 0)]
    assert b.get_batch() == [("c", 0), ("a", 1)]
    assert b.get_batch() is END_OF_STREAM
    assert b.get_batch() is END_OF_STREAM
    assert time.monotonic() - start < 5  # no 30 s wait for streams that will never come
    with pytest.raises(ValueError, match="after its end"):
        b.put(("a", 2))


def test_close_wakes_a_waiting_consumer_and_a_blocked_producer() -> None:
    b = _batcher(max_batch=2, lane=LaneSpec(1, OverflowPolicy.BLOCK))
    b.put(("a", 0))
    errors: list[BaseException] = []

    def blocked_put() -> None:
        try:
            b.put(("a", 1))  # the lane is full and blocks
        except BufferClosed as exc:
            errors.append(exc)

    consumer = _batcher(max_batch=2)

    def waiting_get() -> None:
        try:
            consumer.get_batch()
        except BufferClosed as exc:
            errors.append(exc)

    threads = [threading.Thread(target=blocked_put), threading.Thread(target=waiting_get)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    b.close()
    consumer.close()
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert len(errors) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch": 0}, "max_batch must be an int in"),
        ({"max_batch": True}, "max_batch must be an int in"),
        ({"max_batch": 1000}, "max_batch must be an int in"),
        ({"batch_timeout_s": -0.1}, "batch_timeout_s must be >= 0"),
    ],
)
def test_bad_batch_spec_is_one_line(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        BatchSpec(key=_stream, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


# -- the runner with a batched processor ------------------------------------------------------


class _Numbers(StageBase[Item]):
    def __init__(self, stream: str, count: int) -> None:
        self.name = f"src:{stream}"
        self.stream = stream
        self.count = count

    def items(self) -> Iterator[Item]:
        for n in range(self.count):
            yield (self.stream, n)


class _Doubler(StageBase[Item]):
    """A batched processor: keeps the batch sizes it was given."""

    name = "double"

    def __init__(self, short_by: int = 0) -> None:
        self.sizes: list[int] = []
        self.short_by = short_by

    def process_batch(self, items: Sequence[Item]) -> Sequence[Item | None]:
        self.sizes.append(len(items))
        out: list[Item | None] = [(s, 2 * n) for s, n in items]
        return out[: len(out) - self.short_by]


class _Keep(StageBase[Item]):
    name = "keep"

    def __init__(self) -> None:
        self.items: list[Item] = []

    def write(self, item: Item) -> None:
        self.items.append(item)

    def flush(self) -> Iterable[Item]:
        return ()


def test_runner_feeds_a_batched_processor_and_keeps_every_item_in_order() -> None:
    doubler, keep = _Doubler(), _Keep()
    spec = BatchSpec(
        key=_stream,
        max_batch=4,
        batch_timeout_s=0.005,
        lanes={s: BLOCK for s in "abc"},
        default_lane=BLOCK,
    )
    pipeline = Pipeline(
        [_Numbers(s, 100) for s in "abc"], [(doubler, spec)], [(keep, BufferSpec(8))]
    )
    pipeline.run()
    for s in "abc":
        assert [n for t, n in keep.items if t == s] == [2 * n for n in range(100)]
    metrics = pipeline.metrics()
    stage = next(st for st in metrics.stages if st.name == "double")
    assert stage.items == 300
    assert stage.batches == len(doubler.sizes)
    assert sum((k + 1) * n for k, n in enumerate(stage.batch_size_counts)) == 300
    assert stage.batch_size_mean == pytest.approx(300 / len(doubler.sizes))
    assert max(doubler.sizes) <= 4
    lanes = [b for b in metrics.buffers if b.name.startswith("double.in[")]
    assert [b.name for b in lanes] == ["double.in[a]", "double.in[b]", "double.in[c]"]
    assert all(b.put_count == 100 and b.dropped == 0 for b in lanes)
    assert "double batch size: mean" in metrics.format_table()
    assert metrics.to_dict()["stages"][3]["batch_size_mean"] == stage.batch_size_mean


def test_runner_refuses_a_batch_spec_for_a_processor_without_process_batch() -> None:
    class _Plain(StageBase[Item]):
        name = "plain"

        def process(self, item: Item) -> Item:
            return item

    with pytest.raises(ValueError, match="has a BatchSpec but no process_batch") as info:
        Pipeline([_Numbers("a", 1)], [(_Plain(), BatchSpec(key=_stream))], [])
    assert "\n" not in str(info.value)


def test_a_batch_result_of_the_wrong_length_fails_the_run() -> None:
    pipeline = Pipeline(
        [_Numbers("a", 3)], [(_Doubler(short_by=1), BatchSpec(key=_stream, max_batch=2))], []
    )
    with pytest.raises(StageError, match="one per item"):
        pipeline.run()
