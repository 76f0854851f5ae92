"""Pipeline: order, fan-out, several sources, errors reaching join() in bounded time, graceful
stop that loses nothing, abort, leaky buffers, with small real stages in real threads."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import pytest

from pipeline.ring_buffer import OverflowPolicy
from pipeline.runner import BufferSpec, EventChannel, Pipeline, StageError
from pipeline.stage import StageBase

# The bounded-time guarantees asked of the engine ("exits within 5 s").
BOUND_S = 5.0


class Trace:
    """What a stage saw, recorded from its own thread."""

    def __init__(self) -> None:
        self.setup_thread: str | None = None
        self.teardown_thread: str | None = None
        self.teardowns = 0


class CountingSource(StageBase[int]):
    """Yields 0, 1, 2, ... (``n`` of them, or forever), optionally pausing between items."""

    def __init__(
        self, name: str = "src", n: int | None = 100, delay_s: float = 0.0, start: int = 0
    ) -> None:
        self.name = name
        self.n = n
        self.delay_s = delay_s
        self.start = start
        self.yielded: list[int] = []
        self.trace = Trace()
        self.generator_closed = threading.Event()

    def setup(self) -> None:
        self.trace.setup_thread = threading.current_thread().name

    def items(self) -> Iterator[int]:
        i = self.start
        try:
            while self.n is None or i < self.start + self.n:
                if self.delay_s:
                    time.sleep(self.delay_s)
                self.yielded.append(i)
                yield i
                i += 1
        finally:
            self.generator_closed.set()

    def teardown(self) -> None:
        self.trace.teardown_thread = threading.current_thread().name
        self.trace.teardowns += 1


class Square(StageBase[int]):
    def __init__(self, name: str = "square", raise_on: int | None = None) -> None:
        self.name = name
        self.raise_on = raise_on
        self.trace = Trace()

    def setup(self) -> None:
        self.trace.setup_thread = threading.current_thread().name

    def process(self, item: int) -> int | None:
        if item == self.raise_on:
            raise ValueError(f"cannot square {item}")
        return item * item

    def teardown(self) -> None:
        self.trace.teardown_thread = threading.current_thread().name
        self.trace.teardowns += 1


class EvensHeldBack(StageBase[int]):
    """Passes odd items on, keeps even ones and hands them over in flush()."""

    name = "evens"

    def __init__(self) -> None:
        self.held: list[int] = []

    def process(self, item: int) -> int | None:
        if item % 2 == 0:
            self.held.append(item)
            return None
        return item

    def flush(self) -> Iterable[int]:
        return list(self.held)


class CollectSink(StageBase[int]):
    def __init__(
        self,
        name: str = "sink",
        delay_s: float = 0.0,
        raise_on: int | None = None,
        gate: threading.Event | None = None,
        teardown_error: bool = False,
    ) -> None:
        self.name = name
        self.delay_s = delay_s
        self.raise_on = raise_on
        self.gate = gate
        self.teardown_error = teardown_error
        self.written: list[int] = []
        self.trace = Trace()

    def setup(self) -> None:
        self.trace.setup_thread = threading.current_thread().name

    def write(self, item: int) -> None:
        if item == self.raise_on:
            raise OSError(f"disk full at {item}")
        if self.gate is not None:
            self.gate.wait()
        if self.delay_s:
            time.sleep(self.delay_s)
        self.written.append(item)

    def teardown(self) -> None:
        self.trace.teardown_thread = threading.current_thread().name
        self.trace.teardowns += 1
        if self.teardown_error:
            raise RuntimeError("could not close the output")


def run_bounded(pipe: Pipeline) -> None:
    """``pipe.run()`` for pipelines with an endless source: a broken engine fails the test
    instead of hanging the suite."""
    pipe.start()
    pipe.join(timeout=3 * BOUND_S)  # raises StageError on a failure
    if pipe.running:
        pipe.abort()
        pytest.fail("the pipeline was still running after the time allowed")


def _our_threads(*names: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name in names and t.is_alive()]


def _wait_for(condition: object, timeout: float = BOUND_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


# -- construction ---------------------------------------------------------------------------


def test_bad_arguments_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="sources"):
        Pipeline([], [], [])
    with pytest.raises(ValueError, match="'sink' is used twice"):
        Pipeline([CountingSource("sink")], [], [(CollectSink("sink"), BufferSpec())])
    with pytest.raises(ValueError, match=r"sinks\[0\]"):
        Pipeline([CountingSource()], [], [CollectSink()])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="capacity"):
        BufferSpec(capacity=0)
    with pytest.raises(ValueError, match="policy"):
        BufferSpec(policy="block")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="join_timeout_s"):
        Pipeline([CountingSource()], [], [], join_timeout_s=0)


# -- normal runs ------------------------------------------------------------------------------


def test_all_items_arrive_in_order_each_stage_in_its_own_thread() -> None:
    src, sq, sink = CountingSource(n=500), Square(), CollectSink()
    pipe = Pipeline([src], [(sq, BufferSpec(capacity=2))], [(sink, BufferSpec(capacity=3))])
    pipe.run()
    assert sink.written == [i * i for i in range(500)]
    for stage in (src, sq, sink):
        assert stage.trace.setup_thread == stage.name
        assert stage.trace.teardown_thread == stage.name
        assert stage.trace.teardowns == 1
    assert not pipe.running
    assert _our_threads("src", "square", "sink") == []


def test_processors_chain_filter_and_flush_before_the_end() -> None:
    src, sink = CountingSource(n=10), CollectSink()
    pipe = Pipeline(
        [src], [(EvensHeldBack(), BufferSpec()), (Square(), BufferSpec())], [(sink, BufferSpec())]
    )
    pipe.run()
    assert sink.written == [1, 9, 25, 49, 81, 0, 4, 16, 36, 64]


def test_fan_out_gives_every_sink_every_item() -> None:
    sinks = [CollectSink("a"), CollectSink("b", delay_s=0.001)]
    pipe = Pipeline(
        [CountingSource(n=200)],
        [(Square(), BufferSpec())],
        [(s, BufferSpec(capacity=4)) for s in sinks],
    )
    pipe.run()
    for s in sinks:
        assert s.written == [i * i for i in range(200)]
    m = pipe.metrics()
    assert m.frames_in == 200 and m.frames_out == 200
    assert m.latency.count == 400  # every write by every sink


def test_sources_feed_sinks_directly_without_processors() -> None:
    sinks = [CollectSink("a"), CollectSink("b")]
    pipe = Pipeline([CountingSource(n=50)], [], [(s, BufferSpec(capacity=2)) for s in sinks])
    pipe.run()
    assert sinks[0].written == sinks[1].written == list(range(50))


def test_end_of_stream_waits_for_every_source() -> None:
    fast = CountingSource("fast", n=20)
    slow = CountingSource("slow", n=20, delay_s=0.005, start=1000)
    sink = CollectSink()
    pipe = Pipeline([fast, slow], [], [(sink, BufferSpec(capacity=2))])
    pipe.run()
    assert sorted(sink.written) == list(range(20)) + list(range(1000, 1020))
    # Each source's items keep their order.
    assert [x for x in sink.written if x < 1000] == list(range(20))
    assert [x for x in sink.written if x >= 1000] == list(range(1000, 1020))


def test_metrics_after_a_run_count_every_item() -> None:
    pipe = Pipeline(
        [CountingSource(n=300)], [(Square(), BufferSpec())], [(CollectSink(), BufferSpec())]
    )
    before = pipe.metrics()
    assert before.frames_in == 0 and before.latency.p95_ms is None
    pipe.run()
    m = pipe.metrics()
    assert m.frames_in == 300 and m.frames_out == 300
    assert [s.name for s in m.stages] == ["src", "square", "sink"]
    assert [s.items for s in m.stages] == [300, 300, 300]
    assert not any(s.running for s in m.stages)
    assert [b.name for b in m.buffers] == ["square.in", "sink.in"]
    for b in m.buffers:
        assert b.put_count == b.get_count == 300 and b.dropped == 0 and b.level == 0
        assert 1 <= b.high_water <= b.capacity
    assert m.latency.count == 300
    assert m.latency.p50_ms is not None and m.latency.p99_ms is not None
    assert 0 <= m.latency.p50_ms <= m.latency.p99_ms
    json.dumps(m.to_dict())
    assert "square" in m.format_table()
    # Rates stop decaying once the run is over.
    assert pipe.metrics().wall_s == m.wall_s


class Burner(StageBase[int]):
    """Works (CPU) for ``cpu_ms`` per item; ``Sleeper`` below waits as long instead."""

    def __init__(self, name: str, cpu_ms: float) -> None:
        self.name = name
        self.cpu_ms = cpu_ms

    def process(self, item: int) -> int:
        end = time.thread_time() + self.cpu_ms / 1000.0
        while time.thread_time() < end:
            pass
        return item


class Sleeper(Burner):
    def process(self, item: int) -> int:
        time.sleep(self.cpu_ms / 1000.0)
        return item


@pytest.mark.skipif(
    not hasattr(time, "pthread_getcpuclockid"), reason="no per-thread CPU clock here"
)
def test_cpu_time_per_item_tells_work_from_waiting() -> None:
    """Both stages are busy 20 ms per item; only one of them works for it."""
    pipe = Pipeline(
        [CountingSource(n=15)],
        [(Burner("burn", 20.0), BufferSpec()), (Sleeper("sleep", 20.0), BufferSpec())],
        [(CollectSink(), BufferSpec())],
    )
    live = []
    pipe.start()
    while pipe.metrics().frames_out < 5:
        time.sleep(0.01)
    live.append(pipe.metrics().stages[1].cpu_s)  # read from another thread mid-run
    pipe.join()
    m = {s.name: s for s in pipe.metrics().stages}
    assert live[0] is not None and live[0] >= 5 * 0.020
    burn, sleep = m["burn"].cpu_ms_per_item, m["sleep"].cpu_ms_per_item
    assert burn is not None and sleep is not None
    assert burn >= 20.0  # it spun until its thread had used 20 ms of CPU, every item
    assert sleep < 5.0  # asleep: busy, but no work
    # The last reading is kept once the thread is gone (its clock goes with it).
    time.sleep(0.05)
    assert pipe.metrics().stages[1].cpu_s == m["burn"].cpu_s


class HeavySetup(Burner):
    """Loads something expensive (200 ms of CPU) in setup, then does nearly nothing per item."""

    def setup(self) -> None:
        end = time.thread_time() + 0.2
        while time.thread_time() < end:
            pass


@pytest.mark.skipif(
    not hasattr(time, "pthread_getcpuclockid"), reason="no per-thread CPU clock here"
)
def test_cpu_time_leaves_out_setup() -> None:
    """A model load is not work per frame: a short run must not show it as such."""
    pipe = Pipeline(
        [CountingSource(n=10)],
        [(HeavySetup("load", 0.0), BufferSpec())],
        [(CollectSink(), BufferSpec())],
    )
    pipe.run()
    load = pipe.metrics().stages[1]
    assert load.cpu_s is not None and load.cpu_s < 0.1


# -- errors -------------------------------------------------------------------------------------


class RaisingSource(CountingSource):
    def items(self) -> Iterator[int]:
        yield from range(5)
        raise ConnectionError("camera unplugged")


class SetupFails(Square):
    def setup(self) -> None:
        super().setup()
        raise FileNotFoundError("no weights at /nowhere")


@pytest.mark.parametrize(
    ("failing", "cause", "message"),
    [
        ("square", ValueError, "stage 'square' failed: cannot square 7"),
        ("sink", OSError, "stage 'sink' failed: disk full at 81"),
        ("src", ConnectionError, "stage 'src' failed: camera unplugged"),
        ("setup", FileNotFoundError, "stage 'square' failed: no weights at /nowhere"),
    ],
)
def test_a_failing_stage_stops_everything_within_bounded_time(
    failing: str, cause: type[BaseException], message: str
) -> None:
    # Capacity 1 everywhere and an endless source: every other stage is blocked on a full or
    # empty buffer when the error comes, which is the case that hangs naive pipelines.
    src: CountingSource = RaisingSource() if failing == "src" else CountingSource(n=None)
    proc = (
        SetupFails() if failing == "setup" else Square(raise_on=7 if failing == "square" else None)
    )
    sink = CollectSink(raise_on=81 if failing == "sink" else None)
    pipe = Pipeline([src], [(proc, BufferSpec(capacity=1))], [(sink, BufferSpec(capacity=1))])
    t0 = time.monotonic()
    with pytest.raises(StageError) as info:
        run_bounded(pipe)
    assert time.monotonic() - t0 < BOUND_S
    assert str(info.value).startswith(message)
    assert isinstance(info.value.__cause__, cause)
    assert info.value.stage_name == ("square" if failing == "setup" else failing)
    assert not pipe.running
    assert _our_threads("src", "square", "sink") == []
    for stage in (src, proc, sink):
        assert stage.trace.teardowns == 1  # always, also after the error, also after setup failed
    # Raised again on a later join, like a Future's result().
    with pytest.raises(StageError):
        pipe.join()


def test_teardown_error_is_reported_when_nothing_failed_before() -> None:
    sink = CollectSink(teardown_error=True)
    pipe = Pipeline([CountingSource(n=5)], [], [(sink, BufferSpec())])
    with pytest.raises(StageError, match="stage 'sink' failed: could not close the output"):
        pipe.run()
    assert sink.written == list(range(5))


def test_teardown_error_after_an_earlier_error_does_not_replace_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = CollectSink(teardown_error=True)
    pipe = Pipeline(
        [CountingSource(n=None)], [(Square(raise_on=3), BufferSpec())], [(sink, BufferSpec())]
    )
    with caplog.at_level(logging.ERROR, logger="pipeline.runner"):
        with pytest.raises(StageError, match="stage 'square' failed"):
            run_bounded(pipe)
    assert any("teardown failed" in r.getMessage() for r in caplog.records)


def test_a_stage_stuck_outside_the_buffers_is_left_behind_after_join_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = threading.Event()  # the sink waits on this inside write(): no buffer can wake it
    stuck = CollectSink("stuck", gate=gate)
    pipe = Pipeline(
        [CountingSource(n=None)],
        # Room for the items before the failing one, so the processor gets to it.
        [(Square(raise_on=20), BufferSpec(capacity=1))],
        [(stuck, BufferSpec(capacity=100))],
        join_timeout_s=0.3,
    )
    try:
        t0 = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="pipeline.runner"):
            with pytest.raises(StageError, match="stage 'square' failed"):
                run_bounded(pipe)
        assert time.monotonic() - t0 < BOUND_S
        assert any("stuck" in r.getMessage() for r in caplog.records)
        left = [t for t in threading.enumerate() if t.name == "stuck"]
        assert left and all(t.daemon for t in left)  # cannot keep the process alive
        # Left behind: no longer counted, so the CLI's `while running: join(timeout)` ends.
        assert not pipe.running
    finally:
        gate.set()
    _wait_for(lambda: not _our_threads("stuck"))
    assert stuck.trace.teardowns == 1


def test_abort_with_a_reason_is_raised_from_join() -> None:
    pipe = Pipeline(
        [CountingSource(n=None)],
        [(Square(), BufferSpec(capacity=1))],
        [(CollectSink(), BufferSpec())],
    )
    pipe.start()
    pipe.abort(TimeoutError("watchdog: no frame for 10 s"))
    with pytest.raises(StageError, match="pipeline aborted: watchdog") as info:
        pipe.join(timeout=BOUND_S)
    assert info.value.stage_name is None
    assert isinstance(info.value.__cause__, TimeoutError)
    assert not pipe.running


# -- stop ---------------------------------------------------------------------------------------


def test_stop_mid_run_drains_every_item_already_yielded() -> None:
    src = CountingSource(n=None, delay_s=0.001)
    sinks = [CollectSink("a", delay_s=0.003), CollectSink("b")]
    sq = Square()
    pipe = Pipeline(
        [src], [(sq, BufferSpec(capacity=4))], [(s, BufferSpec(capacity=4)) for s in sinks]
    )
    pipe.start()
    _wait_for(lambda: len(sinks[0].written) >= 20)
    # Buffers are full now (sink "a" is the slowest): stopping must still lose nothing.
    t0 = time.monotonic()
    pipe.stop()
    pipe.join(timeout=BOUND_S)
    assert time.monotonic() - t0 < BOUND_S
    assert not pipe.running
    expected = [i * i for i in src.yielded]
    assert len(expected) >= 20
    for s in sinks:
        assert s.written == expected
        assert s.trace.teardowns == 1
    assert src.trace.teardowns == sq.trace.teardowns == 1
    assert src.generator_closed.is_set()  # the generator's own cleanup ran
    assert _our_threads("src", "square", "a", "b") == []


def test_stop_from_another_thread_while_the_main_thread_joins() -> None:
    src, sink = CountingSource(n=None, delay_s=0.001), CollectSink()
    pipe = Pipeline([src], [], [(sink, BufferSpec(capacity=2))])
    timer = threading.Timer(0.1, pipe.stop)
    timer.start()
    run_bounded(pipe)
    timer.join()
    assert sink.written == src.yielded and sink.written
    pipe.stop()  # after the end: nothing happens
    assert not pipe.running


def test_sigint_handler_calling_stop_ends_the_run_cleanly() -> None:
    """What the CLI does: a real SIGINT reaches the main thread while it waits in join()."""
    src, sink = CountingSource(n=None, delay_s=0.001), CollectSink()
    pipe = Pipeline([src], [(Square(), BufferSpec(capacity=2))], [(sink, BufferSpec(capacity=2))])
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pipe.stop())
    try:
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        t0 = time.monotonic()
        run_bounded(pipe)
        timer.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - t0 < BOUND_S
    assert sink.written == [i * i for i in src.yielded] and sink.written


def test_second_stop_while_draining_aborts() -> None:
    gate = threading.Event()
    sink = CollectSink(gate=gate)
    pipe = Pipeline([CountingSource(n=None)], [], [(sink, BufferSpec(capacity=2))])
    pipe.start()
    _wait_for(lambda: pipe.metrics().buffers[0].level == 2)
    pipe.stop()  # the sink cannot drain: it waits on the gate
    time.sleep(0.05)
    assert pipe.running
    pipe.stop()  # escalates: buffers close, the blocked stages are woken
    gate.set()  # let the sink's current write() return, as a real write would
    pipe.join(timeout=BOUND_S)
    assert not pipe.running
    assert sink.trace.teardowns == 1
    # Aborted: the items still queued were not written.
    assert pipe.metrics().buffers[0].closed


def test_stop_before_start_runs_nothing_through() -> None:
    sink = CollectSink()
    pipe = Pipeline([CountingSource(n=10)], [], [(sink, BufferSpec())])
    pipe.stop()
    pipe.run()
    assert sink.written == []
    assert sink.trace.teardowns == 1


def test_start_twice_and_join_before_start_are_refused() -> None:
    pipe = Pipeline([CountingSource(n=1)], [], [])
    with pytest.raises(RuntimeError, match="before start"):
        pipe.join()
    pipe.run()
    with pytest.raises(RuntimeError, match="already called"):
        pipe.start()


# -- leaky buffers ----------------------------------------------------------------------------


def test_drop_oldest_in_front_of_a_slow_processor_drops_instead_of_blocking() -> None:
    first_taken = threading.Event()
    source_done = threading.Event()

    class GatedSource(CountingSource):
        """Yields 0, waits until the processor holds it, then 1..99 as fast as it can."""

        def items(self) -> Iterator[int]:
            yield 0
            assert first_taken.wait(BOUND_S)
            yield from range(1, 100)

        def teardown(self) -> None:
            super().teardown()
            source_done.set()

    class SlowUntilSourceDone(Square):
        def process(self, item: int) -> int | None:
            if item == 0:
                first_taken.set()
                # Only a source that never blocks gets to its end while we wait here.
                assert source_done.wait(BOUND_S), "the source blocked on a DROP_OLDEST buffer"
            return item

    sink = CollectSink()
    pipe = Pipeline(
        [GatedSource()],
        [(SlowUntilSourceDone(), BufferSpec(4, OverflowPolicy.DROP_OLDEST))],
        [(sink, BufferSpec())],
    )
    pipe.run()
    # The newest four won; the 95 between were dropped and counted.
    assert sink.written == [0, 96, 97, 98, 99]
    b = pipe.metrics().buffers[0]
    assert (b.put_count, b.get_count, b.dropped, b.level) == (100, 5, 95, 0)
    assert pipe.metrics().dropped == 95


def test_a_thread_that_cannot_start_stops_those_already_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Mocked: running out of OS threads cannot be provoked safely on a shared machine.
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name == "src":  # sources start last: sink and square are already waiting
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    sink, sq = CollectSink(), Square()
    pipe = Pipeline([CountingSource()], [(sq, BufferSpec())], [(sink, BufferSpec())])
    with pytest.raises(RuntimeError, match="can't start"):
        pipe.start()
    with pytest.raises(StageError, match="stage 'src' failed: can't start new thread"):
        pipe.join(timeout=BOUND_S)
    assert not pipe.running
    assert _our_threads("square", "sink") == []
    assert sink.trace.teardowns == sq.trace.teardowns == 1


def test_thread_nice_lowers_only_the_named_stages() -> None:
    """The nice value is per thread on Linux: each stage reads its own from inside its thread."""
    import os
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread nice values are a Linux feature")
    seen: dict[str, int] = {}

    class NiceProbe(StageBase[int]):
        def __init__(self, name: str) -> None:
            self.name = name

        def process(self, item: int) -> int:
            seen[self.name] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            return item

    base = os.getpriority(os.PRIO_PROCESS, 0)
    sink = CollectSink("sink")
    pipeline = Pipeline(
        [CountingSource("src", 3)],
        [(NiceProbe("busy"), BufferSpec()), (NiceProbe("background"), BufferSpec())],
        [(sink, BufferSpec())],
        thread_nice={"background": 5},
    )
    pipeline.run()
    assert seen == {"busy": base, "background": min(base + 5, 19)}
    with pytest.raises(ValueError, match="names no stage"):
        Pipeline(
            [CountingSource("src", 1)],
            [],
            [(CollectSink("sink"), BufferSpec())],
            thread_nice={"nope": 1},
        )


# -- the event channel ----------------------------------------------------------------------


class EventLog(CollectSink):
    """A sink that records items and events in the order its thread saw them."""

    def __init__(self, name: str = "log", delay_s: float = 0.0) -> None:
        super().__init__(name, delay_s=delay_s)
        self.seen: list[tuple[str, object]] = []
        self.event_threads: set[str] = set()

    def write(self, item: int) -> None:
        super().write(item)
        self.seen.append(("item", item))

    def on_event(self, event: object) -> None:
        self.event_threads.add(threading.current_thread().name)
        self.seen.append(("event", event))


class Announcer(Square):
    """Publishes ("square", n) for every 10th item before passing it on, and ("done",) in flush."""

    def __init__(self, publish: Callable[[object], None]) -> None:
        super().__init__("announce")
        self.publish = publish
        self.heard: list[object] = []

    def process(self, item: int) -> int | None:
        if item % 10 == 0:
            self.publish(("square", item))
        return item

    def on_event(self, event: object) -> None:
        self.heard.append(event)

    def flush(self) -> Iterable[int]:
        self.publish(("done",))
        return ()


def test_events_reach_every_subscriber_before_the_item_they_were_published_with() -> None:
    channel = EventChannel()
    announcer = Announcer(channel.publish)
    logs = [EventLog("log_a"), EventLog("log_b", delay_s=0.001)]
    plain = CollectSink("plain")  # no on_event: not subscribed
    pipe = Pipeline(
        [CountingSource(n=50)],
        [(announcer, BufferSpec(2))],
        [(log, BufferSpec(2)) for log in logs] + [(plain, BufferSpec(2))],
        events=channel,
    )
    pipe.run()
    for log in logs:
        events = [e for kind, e in log.seen if kind == "event"]
        assert events == [("square", n) for n in range(0, 50, 10)] + [("done",)]
        order = [e for e in log.seen]
        for n in range(0, 50, 10):
            assert order.index(("event", ("square", n))) < order.index(("item", n))
        assert log.event_threads == {log.name}  # delivered in the sink's own thread
    # A publisher hears its own events too, except the one from its flush: it has finished.
    assert announcer.heard == [("square", n) for n in range(0, 50, 10)]
    assert plain.written == list(range(50))
    stats = channel.stats()
    assert stats.subscribers == ("announce", "log_a", "log_b")
    assert (stats.published, stats.delivered, stats.undelivered) == (6, 17, 1)


def test_events_are_never_dropped_by_a_leaky_buffer() -> None:
    channel = EventChannel()
    announcer = Announcer(channel.publish)
    log = EventLog(delay_s=0.002)
    pipe = Pipeline(
        [CountingSource(n=400)],
        [(announcer, BufferSpec(1))],
        [(log, BufferSpec(1, OverflowPolicy.DROP_OLDEST))],
        events=channel,
    )
    pipe.run()
    items = [e for kind, e in log.seen if kind == "item"]
    events = [e for kind, e in log.seen if kind == "event"]
    assert len(items) < 400  # the slow sink lost items...
    assert events == [("square", n) for n in range(0, 400, 10)] + [("done",)]  # ...no events


def test_an_event_published_while_no_items_flow_arrives_at_once() -> None:
    channel = EventChannel()
    gate = threading.Event()

    class Quiet(CountingSource):
        def items(self) -> Iterator[int]:
            yield 0
            channel.publish("camera lost")  # and then nothing comes for a while
            gate.wait(BOUND_S)
            yield 1

    log = EventLog()
    pipe = Pipeline([Quiet()], [], [(log, BufferSpec())], events=channel)
    pipe.start()
    try:
        _wait_for(lambda: ("event", "camera lost") in log.seen, timeout=1.0)
    finally:
        gate.set()
    pipe.join(timeout=BOUND_S)
    assert sorted(log.seen[:2], key=str) == [("event", "camera lost"), ("item", 0)]
    assert log.seen[2:] == [("item", 1)]
