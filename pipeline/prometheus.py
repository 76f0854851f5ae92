"""A Prometheus endpoint for a running pipeline: the engine's own figures, read on each scrape.

Nothing is counted twice: ``PipelineCollector`` keeps no numbers of its own. On each scrape it
calls the function it was given (``AssembledPipeline.metrics``) and turns the snapshot into
metric families, generically: every number or flag of ``StageMetrics`` (per stage), of
``BufferStats`` (per buffer), of the pipeline as a whole, and every counter a stage keeps of its
own work (``PipelineMetrics.counters``: a live source's outages and reconnects, a sink's drops),
so a figure added to those later appears without code here. Names follow Prometheus' habits:
``finestream_`` first, base units (a ``*_ms`` field is exported in seconds as ``*_seconds``,
``*_fraction`` as ``*_ratio``), ``_total`` on counters; the time-per-item histogram and a
``<x>_counts`` tuple (``batch_size_counts``: how often each batch size came) are histograms.
See ``describe_names()`` for the list a run gives.

Serving: ``MetricsServer`` binds ``host:port`` (127.0.0.1 by default: the figures name cameras
and zones; expose them further on purpose) in the calling thread, so a port in use fails before
the pipeline starts, and then serves from prometheus_client's own daemon thread. It has its own
``CollectorRegistry`` (no global default registry: two pipelines in one process do not mix).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pipeline.metrics import DurationHistogram, PipelineMetrics

logger = logging.getLogger(__name__)

__all__ = ["MetricsConfig", "MetricsServer", "MetricsServerError", "PipelineCollector"]

NAMESPACE = "finestream"

#: Fields (of the metrics dataclasses) that only grow during a run: exported as counters. Any
#: other number is a gauge, which is right for levels and rates and harmless for a new total.
_COUNTER_FIELDS = frozenset(
    {
        "items",
        "cpu_s",
        "count",
        "put_count",
        "get_count",
        "dropped",
        "frames_in",
        "frames_out",
        "batches",
    }
)
#: Stage counters (``PipelineMetrics.counters``) that only grow, exported under their own name
#: as well as in ``finestream_stage_counter``: the ones a dashboard asks for first.
_NAMED_STAGE_COUNTERS = {
    "dropped": "dropped",
    "reconnects": "source_reconnects",
    "outages": "source_outages",
}
#: ``PipelineMetrics`` fields exported per stage or buffer, not as whole-pipeline figures.
_PER_PART = frozenset({"stages", "buffers", "counters"})


class MetricsServerError(ValueError):
    """The endpoint cannot listen where it was told; the message names the port and the fix."""


@dataclass(frozen=True)
class MetricsConfig:
    """The ``metrics`` section: where the Prometheus endpoint listens.

    Attributes:
        port: the TCP port (``--metrics-port``); ``None``: no endpoint.
        host: the address to bind; 127.0.0.1 keeps the figures on this machine, 0.0.0.0
            serves every interface.
    """

    port: int | None = None
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.port is not None and (isinstance(self.port, bool) or not 1 <= self.port <= 65535):
            raise ValueError(
                f"metrics.port must be within 1..65535 (or null: off), got {self.port}"
            )
        if not self.host or any(c.isspace() for c in self.host):
            raise ValueError(f"metrics.host must be an address to bind, got {self.host!r}")


def _metric_name(field_name: str) -> tuple[str, float]:
    """A field's metric name in base units and the factor its values are multiplied by."""
    if field_name.endswith("_ms"):
        return field_name[: -len("_ms")] + "_seconds", 1e-3
    if field_name.endswith("_s"):
        return field_name[: -len("_s")] + "_seconds", 1.0
    if field_name.endswith("_fraction"):
        return field_name[: -len("_fraction")] + "_ratio", 1.0
    return field_name, 1.0


class _Families:
    """Metric families by name, made on first use (each with the label names it was made with)."""

    def __init__(self) -> None:
        self._by_name: dict[str, Metric] = {}
        self._labels: dict[str, tuple[str, ...]] = {}

    def add(
        self, name: str, counter: bool, doc: str, labels: Mapping[str, str], value: float
    ) -> None:
        family = self._family(
            name,
            labels,
            lambda full: (CounterMetricFamily if counter else GaugeMetricFamily)(
                full, doc, labels=list(labels)
            ),
        )
        if family is not None:
            family.add_metric(list(labels.values()), value)

    def add_histogram(
        self,
        name: str,
        doc: str,
        labels: Mapping[str, str],
        bounds_cumulative: Sequence[tuple[float, int]],
        count: int,
        total: float,
    ) -> None:
        """A histogram sample: (upper bound, observations <= it) ascending, then all of them."""
        family = self._family(
            name, labels, lambda full: HistogramMetricFamily(full, doc, labels=list(labels))
        )
        if family is None:
            return
        buckets = [(repr(float(b)), float(c)) for b, c in bounds_cumulative]
        buckets.append(("+Inf", float(count)))
        family.add_metric(list(labels.values()), buckets, total)  # type: ignore[attr-defined]

    def _family(self, name: str, labels: Mapping[str, str], make: Callable[[str], Metric]) -> Any:
        full = f"{NAMESPACE}_{name}"
        family = self._by_name.get(full)
        if family is None:
            family = self._by_name[full] = make(full)
            self._labels[full] = tuple(labels)
        elif self._labels[full] != tuple(labels):
            # Two figures came out with one name (a new field named like an old one): keep the
            # first rather than fail the whole scrape.
            logger.debug(
                "metric %s: labels %s clash with %s; left out",
                full,
                tuple(labels),
                self._labels[full],
            )
            return None
        return family

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._by_name.values())


def _add_fields(
    families: _Families,
    obj: Any,
    prefix: str,
    labels: Mapping[str, str],
    what: str,
    skip: frozenset[str] = frozenset(),
    path: str = "",
) -> None:
    """Every number and flag of dataclass ``obj`` as ``<prefix>_<field>``; nested dataclasses
    with their field name added to the prefix; strings and enums are labels, not values."""
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        field_path = f"{path}{f.name}"
        if value is None or isinstance(value, (str, enum.Enum)):
            continue
        if isinstance(value, DurationHistogram):
            name, _ = _metric_name(f"{f.name}_s")
            families.add_histogram(
                f"{prefix}_{name}",
                f"{what}: {field_path} (histogram)",
                labels,
                list(zip(value.upper_bounds_s, value.cumulative_counts)),
                value.count,
                value.sum_s,
            )
        elif f.name.endswith("_counts") and isinstance(value, tuple):
            # ``<x>_counts[k]``: how many times <x> was k + 1 (batch_size_counts): a histogram
            # of <x> with a bucket per value.
            if value:
                families.add_histogram(
                    f"{prefix}_{f.name.removesuffix('_counts')}",
                    f"{what}: {field_path} (histogram)",
                    labels,
                    [(k + 1, n) for k, n in enumerate(itertools.accumulate(value))],
                    sum(value),
                    float(sum((k + 1) * n for k, n in enumerate(value))),
                )
        elif dataclasses.is_dataclass(value):
            _add_fields(families, value, f"{prefix}_{f.name}", labels, what, path=f"{field_path}.")
        elif isinstance(value, (bool, int, float)):
            name, scale = _metric_name(f.name)
            families.add(
                f"{prefix}_{name}",
                f.name in _COUNTER_FIELDS and not isinstance(value, bool),
                f"{what}: {field_path}",
                labels,
                float(value) * scale,
            )
        # Anything else (a list, a mapping) has no single number to give: left out.


class PipelineCollector(Collector):
    """Reads ``read_metrics()`` on each scrape and yields it as Prometheus metric families.

    Args:
        read_metrics: a snapshot of the pipeline's figures (thread-safe; called from the
            HTTP server's thread).
    """

    def __init__(self, read_metrics: Callable[[], PipelineMetrics]) -> None:
        self._read_metrics = read_metrics

    def collect(self) -> Iterator[Metric]:
        m = self._read_metrics()
        families = _Families()
        for stage in m.stages:
            labels = {"stage": stage.name, "kind": stage.kind.value}
            _add_fields(families, stage, "stage", labels, "per stage")
        for buf in m.buffers:
            labels = {"buffer": buf.name, "policy": buf.policy.value}
            _add_fields(families, buf, "buffer", labels, "per ring buffer")
        _add_fields(families, m, "pipeline", {}, "whole pipeline", skip=_PER_PART)
        for stage_name, values in m.counters.items():
            for key, value in values.items():
                labels = {"stage": stage_name, "counter": key}
                families.add(
                    "stage_counter",
                    False,
                    "a stage's own counters, as the run's table shows them",
                    labels,
                    float(value),
                )
                named = _NAMED_STAGE_COUNTERS.get(key)
                if named is not None and not isinstance(value, bool):
                    families.add(
                        named, True, f"per stage: {key}", {"stage": stage_name}, float(value)
                    )
                if key == "connected" and isinstance(value, bool):
                    families.add(
                        "source_up",
                        False,
                        "1 while the source delivers frames",
                        {"stage": stage_name},
                        float(value),
                    )
        yield from families


def describe_names(metrics: PipelineMetrics) -> list[str]:
    """The metric family names a scrape of ``metrics`` gives, sorted (for docs and tests)."""
    return sorted(f.name for f in PipelineCollector(lambda: metrics).collect())


class MetricsServer:
    """The HTTP endpoint (``GET /metrics``) for one pipeline.

    Args:
        config: where to listen.
        read_metrics: see ``PipelineCollector``.
    """

    def __init__(self, config: MetricsConfig, read_metrics: Callable[[], PipelineMetrics]) -> None:
        if config.port is None:
            raise ValueError("MetricsServer needs metrics.port (null means no endpoint)")
        self.config = config
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PipelineCollector(read_metrics))
        self._server: Any = None
        self._thread: Any = None

    @property
    def url(self) -> str:
        host = self.config.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.config.port}/metrics"

    def start(self) -> None:
        """Bind and serve (from a daemon thread). Raises ``MetricsServerError`` in the caller's
        thread when the address cannot be bound (the port is in use, the host is not ours)."""
        cfg = self.config
        assert cfg.port is not None  # checked in __init__
        try:
            self._server, self._thread = start_http_server(
                cfg.port, addr=cfg.host, registry=self.registry
            )
        except OSError as exc:
            raise MetricsServerError(
                f"metrics.port {cfg.port}: cannot listen on {cfg.host}:{cfg.port} "
                f"({exc.strerror or exc}); pick another --metrics-port (or stop the program "
                "using it)"
            ) from None
        logger.info("Prometheus metrics on %s", self.url)

    def close(self) -> None:
        """Stop serving and free the port (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)
