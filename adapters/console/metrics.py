"""/metrics in Prometheus text format: totals read from the store at each scrape, and what
the process counts as it happens (upstream HTTP requests, `bot.upstream.client.METRICS`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from bot.services import Services
from bot.upstream.client import METRICS

BUCKETS = (5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)


class _Snapshot(Collector):
    """The numbers one scrape read, as metric families."""

    def __init__(self, data: dict[str, Any], queued: int, running: int) -> None:
        self.data = data
        self.queued = queued
        self.running = running

    def collect(self) -> Iterator[Any]:
        jobs = CounterMetricFamily(
            "drawbridge_jobs",
            "Jobs by platform, status and error kind",
            labels=["platform", "status", "error_kind"],
        )
        for platform, status, kind, count in self.data["jobs"]:
            jobs.add_metric([platform, status, kind], count)
        yield jobs
        upstream = CounterMetricFamily(
            "drawbridge_upstream_jobs",
            "Jobs handed to each provider, by outcome",
            labels=["provider", "status"],
        )
        for provider, status, count in self.data["providers"]:
            upstream.add_metric([provider, status], count)
        yield upstream
        by_platform: dict[str, list[float]] = {}
        for platform, seconds in self.data["durations"]:
            by_platform.setdefault(platform, []).append(float(seconds))
        duration = HistogramMetricFamily(
            "drawbridge_job_duration_seconds",
            "Seconds from queued to finished, succeeded jobs",
            labels=["platform"],
        )
        for platform, values in sorted(by_platform.items()):
            buckets = [(str(b), sum(1 for v in values if v <= b)) for b in BUCKETS]
            buckets.append(("+Inf", len(values)))
            duration.add_metric([platform], buckets, sum(values))
        yield duration
        queue = GaugeMetricFamily("drawbridge_queue_depth", "Jobs now", labels=["state"])
        queue.add_metric(["queued"], self.queued)
        queue.add_metric(["running"], self.running)
        yield queue
        credits = CounterMetricFamily(
            "drawbridge_credits", "Credits moved, by ledger kind", labels=["kind"]
        )
        for kind, amount in self.data["credits"]:
            credits.add_metric([kind], amount or 0)
        yield credits
        reserved = GaugeMetricFamily(
            "drawbridge_credits_reserved_now", "Credits reserved by jobs not yet settled"
        )
        reserved.add_metric([], self.data["reserved_now"] or 0)
        yield reserved


class _Counted(Collector):
    """The process's own counters, served next to the store's snapshot."""

    def collect(self) -> Iterator[Any]:
        yield from METRICS.collect()


async def render(services: Services) -> tuple[bytes, str]:
    """The metrics page body and its content type."""
    data = await services.store.console_metrics()
    now = await services.store.console_now()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(data, now["queued"], now["running"]))
    registry.register(_Counted())
    return generate_latest(registry), CONTENT_TYPE_LATEST
