"""Prometheus metrics of the agent, served on the metrics bind address (default 127.0.0.1:10249).

Names follow kube-proxy's where the meaning is the same (``sync_proxy_rules_duration_seconds``,
``network_programming_duration_seconds``, ``sync_proxy_rules_last_timestamp_seconds``) under
our own ``zeroproxy_`` prefix, so dashboards can be ported by renaming the prefix. What only a
BPF datapath has comes from the kernel at scrape time: the drop/event counters kept per CPU in
the pinned stats map, and how full the service and backend maps are.

Every metric lives in a registry of its own (not the process-global default): two agents in
one test process, or one agent restarted in it, never collide.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from controlplane.config import split_host_port

log = logging.getLogger("zeroproxy.metrics")

PREFIX = "zeroproxy"
# Sync durations: from a 10-entry partial sync (~1 ms) to a 10k-service full sync (seconds).
SYNC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# kube-proxy's network programming buckets, in seconds.
PROGRAMMING_BUCKETS = (0.25, 0.5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 30, 45, 60, 120, 300)

# Datapath counters that are drops (a connection refused or a packet not translated), as
# opposed to counters of things that went right: lower-case dataplane.maps.Reason names.
DROP_REASONS = {"no_backend", "stale_backend", "unknown", "src_range", "snat_exhausted", "backend_gone",
                "ct_miss", "fib_fail", "rewrite_fail", "map_write"}
TC_PREFIX = "tc_"  # events of the TC path (NodePort, ExternalIP, LB IPs) are named tc_<reason>


class Metrics:
    """All series of one agent; the agent calls the ``observe_*`` methods, scrapes read the rest."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sync_duration = Histogram(
            f"{PREFIX}_sync_proxy_rules_duration_seconds", "Time one sync took (translation + map writes)",
            ["mode"], buckets=SYNC_BUCKETS, registry=r)
        self.last_sync = Gauge(f"{PREFIX}_sync_proxy_rules_last_timestamp_seconds",
                               "Wall time of the last successful sync", registry=r)
        self.programming = Histogram(
            f"{PREFIX}_network_programming_duration_seconds",
            "From an API change (the EndpointSlice trigger time, or the event's arrival) to the map write",
            buckets=PROGRAMMING_BUCKETS, registry=r)
        self.syncs = Counter(f"{PREFIX}_syncs", "Syncs that ran, by mode (partial or full)", ["mode"], registry=r)
        self.writes = Counter(
            f"{PREFIX}_map_writes", "Map entries written or deleted by syncs",
            ["what"], registry=r)  # frontends_written, frontends_deleted, backends_written, backends_deleted
        self.services_changed = Counter(f"{PREFIX}_sync_services_changed",
                                        "Services whose translation changed and were programmed", registry=r)
        self.services = Gauge(f"{PREFIX}_services_programmed", "Services with at least one frontend programmed",
                              registry=r)
        self.frontends = Gauge(f"{PREFIX}_frontends_programmed", "Frontends in the service maps", registry=r)
        self.backends = Gauge(f"{PREFIX}_backends_programmed", "Backends in the backend maps", registry=r)
        self.errors = Counter(f"{PREFIX}_errors", "Errors by kind", ["kind"], registry=r)
        self.relists = Counter(f"{PREFIX}_watch_relists", "Relists after 410 Gone, by resource", ["resource"],
                               registry=r)
        self.watch_events = Counter(f"{PREFIX}_watch_events", "Watch events received, by resource and type",
                                    ["resource", "type"], registry=r)
        self.pending = Gauge(f"{PREFIX}_sync_pending_seconds",
                             "How long the oldest unprogrammed change has waited (0 = none)", registry=r)
        self.invalid_objects = Gauge(f"{PREFIX}_invalid_input_problems",
                                     "Problems currently found in the input objects", registry=r)
        self.udp_destroyed = Counter(f"{PREFIX}_udp_sockets_destroyed",
                                     "Connected UDP sockets destroyed because their backend left the service",
                                     registry=r)
        self.frontend_conflicts = Gauge(f"{PREFIX}_frontend_conflicts",
                                        "Frontends a Service claims but another Service holds (not programmed "
                                        "for it)", registry=r)
        for mode in ("partial", "full"):
            self.syncs.labels(mode)
        for what in ("frontends_written", "frontends_deleted", "backends_written", "backends_deleted"):
            self.writes.labels(what)
        for kind in ("sync", "watch", "list", "health", "metrics"):
            self.errors.labels(kind)
        for resource in ("Service", "EndpointSlice", "Node"):
            self.relists.labels(resource)
        self._server: Any = None
        self._thread: Any = None

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def observe_sync(self, mode: str, seconds: float, result: Any | None, wall: float) -> None:
        self.syncs.labels(mode).inc()
        self.sync_duration.labels(mode).observe(seconds)
        self.last_sync.set(wall)
        if result is not None:
            for what in ("frontends_written", "frontends_deleted", "backends_written", "backends_deleted"):
                self.writes.labels(what).inc(getattr(result, what))

    def observe_programming(self, trigger_times: Iterable[float], now: float) -> None:
        for t in trigger_times:
            self.programming.observe(max(0.0, now - t))

    def serve(self, bind_address: str) -> tuple[str, int]:
        host, port = split_host_port(bind_address)
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound = self._server.server_address[:2]
        log.info("metrics server listening on %s", bind_address)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class DatapathCollector(Collector):
    """Kernel-side series, read at scrape time so they are never stale.

    ``stats`` returns the per-reason counters summed over CPUs (``dataplane.inspect.stats``);
    ``fill`` returns map name -> (entries, capacity).
    """

    def __init__(self, stats: Callable[[], dict[str, int]], fill: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self.stats = stats
        self.fill = fill

    def collect(self) -> Iterable[Any]:
        drops = CounterMetricFamily(f"{PREFIX}_datapath_drops", "Connections or packets the datapath refused, "
                                    "by reason (from the pinned stats map)", labels=["reason"])
        events = CounterMetricFamily(f"{PREFIX}_datapath_events", "Every datapath counter, by name",
                                     labels=["event"])
        try:
            counters = self.stats()
        except Exception as e:  # pins gone (cleanup ran): report nothing rather than fail the scrape
            log.debug("datapath stats unavailable: %s", e)
            counters = {}
        dropped: dict[str, float] = {}
        for name, value in sorted(counters.items()):
            events.add_metric([name], value)
            reason = name.removeprefix(TC_PREFIX)
            if reason in DROP_REASONS:  # one series per reason, whichever path dropped
                dropped[reason] = dropped.get(reason, 0) + value
        for reason, value in sorted(dropped.items()):
            drops.add_metric([reason], value)
        yield drops
        yield events
        ratio = GaugeMetricFamily(f"{PREFIX}_map_fill_ratio", "Entries / max_entries per BPF map", labels=["map"])
        entries = GaugeMetricFamily(f"{PREFIX}_map_entries", "Entries per BPF map", labels=["map"])
        try:
            fill = self.fill()
        except Exception as e:
            log.debug("map fill unavailable: %s", e)
            fill = {}
        for name, (used, capacity) in sorted(fill.items()):
            entries.add_metric([name], used)
            ratio.add_metric([name], used / capacity if capacity else 0.0)
        yield ratio
        yield entries


def pin_stats(pin_dir: Path) -> Callable[[], dict[str, int]]:
    """Datapath counters read from the pins, the way ``zeroproxy status`` reads them."""
    from dataplane.inspect import np_stats, stats

    def read() -> dict[str, int]:
        out = stats(pin_dir)
        out.update({TC_PREFIX + k: v for k, v in np_stats(pin_dir).items()})
        return out

    return read
