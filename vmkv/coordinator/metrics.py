"""Prometheus metrics read straight from the shared table, so one exporter (``vmkv metrics
--port N``) or one ``vmkv ls --prom`` covers every instance on the node."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from vmkv.coordinator.segment import Segment

LABELS = ["segment", "instance", "engine", "model"]
GAUGES = {
    "leased": "Pages leased (counted against the budget)",
    "held": "Physical pages held, mapped or pooled",
    "mapped": "Physical pages mapped into KV spaces",
    "reclaimable": "Pages that could be given back without touching live blocks",
    "fair_pages": "The instance's fair share of the budget, in pages",
    "min_pages": "Guaranteed minimum, in pages",
    "max_pages": "Maximum, in pages",
    "reclaim_request": "Pages others are waiting for this instance to give back",
}
COUNTERS = {
    "grants": "Lease requests granted",
    "misses": "Lease requests that ended in a miss",
    "reclaims": "Reclaim requests served",
    "reclaimed_pages": "Pages given back to serve reclaim requests",
}


def _histogram(name: str, doc: str, labels: list[str], data: dict) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=LABELS)
    cumulative, buckets = 0, []
    bounds = [b / 1e9 for b in data["bounds_ns"]] + [float("inf")]
    for bound, count in zip(bounds, data["counts"], strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    family.add_metric(labels, buckets, data["sum_ns"] / 1e9)
    return family


class CoordinatorCollector:
    """A prometheus_client collector over the segments returned by ``segments()``."""

    def __init__(self, segments: Callable[[], list[Segment]]) -> None:
        self.segments = segments

    def collect(self) -> Iterator[Metric]:
        budget = GaugeMetricFamily("vmkv_budget_pages", "The device budget, in pages", labels=["segment"])
        page = GaugeMetricFamily("vmkv_page_bytes", "Bytes per page", labels=["segment"])
        gauges = {k: GaugeMetricFamily(f"vmkv_{k}", doc, labels=LABELS) for k, doc in GAUGES.items()}
        counters = {k: CounterMetricFamily(f"vmkv_{k}", doc, labels=LABELS) for k, doc in COUNTERS.items()}
        histograms: list[HistogramMetricFamily] = []
        for segment in self.segments():
            header = segment.table.header()
            budget.add_metric([segment.name], header["budget_pages"])
            page.add_metric([segment.name], header["page_size"])
            for row in segment.table.snapshot():
                labels = [segment.name, row["name"], row["engine"], row["model"]]
                for key, family in gauges.items():
                    family.add_metric(labels, row[key])
                for key, family in counters.items():
                    family.add_metric(labels, row[key])
                histograms.append(
                    _histogram(
                        "vmkv_grant_latency_seconds", "Lease request latency", labels, row["grant_latency"]
                    )
                )
                histograms.append(
                    _histogram(
                        "vmkv_reclaim_latency_seconds",
                        "Reclaim request to pages released",
                        labels,
                        row["reclaim_latency"],
                    )
                )
        yield budget
        yield page
        yield from gauges.values()
        yield from counters.values()
        yield from _merge(histograms)


def _merge(families: list[HistogramMetricFamily]) -> Iterator[Metric]:
    by_name: dict[str, HistogramMetricFamily] = {}
    for family in families:
        if family.name in by_name:
            by_name[family.name].samples.extend(family.samples)
        else:
            by_name[family.name] = family
    yield from by_name.values()


def registry_for(segments: Callable[[], list[Segment]]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(CoordinatorCollector(segments))
    return registry


def render(segments: Callable[[], list[Segment]]) -> str:
    """The Prometheus text format for all instances of the given segments."""
    return generate_latest(registry_for(segments)).decode()


def serve(port: int, segments: Callable[[], list[Segment]], address: str = "127.0.0.1") -> None:
    """Serve /metrics on ``address:port`` from a background thread."""
    start_http_server(port, addr=address, registry=registry_for(segments))
