"""``GET {prefix}/metrics``: the dashboard's numbers in Prometheus' text format.

Rendered by ``prometheus-client`` from the Offload's monitor at each scrape
(a collector, not live metric objects: the numbers already live in the
:class:`offload.events.TaskLog` and the poller's last round, and a scrape
costs the broker nothing beyond the dashboard's shared inspect round).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..events import RUNTIME_BUCKETS

__all__ = ["render_metrics"]


class _MonitorCollector:
    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        log = self.monitor.log
        snap = self.monitor.poller.snapshot()
        tasks = CounterMetricFamily("offload_tasks", "Tasks that reached a final state (or a retry), by name",
                                    labels=["name", "state"])
        for (name, state), count in sorted(log.counts.items()):
            tasks.add_metric([name, state], count)
        yield tasks
        current = GaugeMetricFamily("offload_tasks_recorded", "Tasks in the dashboard's record, by name and state",
                                    labels=["name", "state"])
        seen: dict[tuple[str, str], int] = {}
        for record in log.recent(log.max_tasks):
            key = (record.name or "unknown", record.state)
            seen[key] = seen.get(key, 0) + 1
        for (name, state), count in sorted(seen.items()):
            current.add_metric([name, state], count)
        yield current
        runtime = HistogramMetricFamily("offload_task_runtime_seconds", "Runtime of finished tasks",
                                        labels=["name"])
        for name, counts in sorted(log.runtimes.items()):
            buckets = [(_bound(b), counts[i]) for i, b in enumerate(RUNTIME_BUCKETS)] + [("+Inf", counts[-3])]
            runtime.add_metric([name], buckets, counts[-2])
        yield runtime
        queues = GaugeMetricFamily("offload_queue_length", "Messages waiting in a queue", labels=["queue"])
        for name, length in sorted((snap.get("queues") or {}).items()):
            if isinstance(length, int):
                queues.add_metric([name], length)
        yield queues
        workers = GaugeMetricFamily("offload_worker_up", "1 when the worker answered the last inspect round",
                                    labels=["worker"])
        for name, info in sorted((snap.get("workers") or {}).items()):
            workers.add_metric([name], 1 if info.get("status") == "online" else 0)
        yield workers


def _bound(value: float) -> str:
    return repr(float(value))


def render_metrics(monitor: Any) -> bytes:
    """The exposition text of ``monitor``'s tasks, queues and workers."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_MonitorCollector(monitor))
    return generate_latest(registry)
