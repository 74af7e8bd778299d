"""The node agent: source of Kubernetes objects -> change tracker -> sync loop -> kernel maps.

The watch side (a source feeding the :class:`ChangeTracker`) and the map-writing side
(:class:`ServiceMaps`) meet at one interface, the desired :data:`ServiceTable`. Source
handlers only record changes and request a sync; the sync runner, never more often than the
min sync period, translates the services that changed (all of them after a failure: a full
sync) and hands the table to the map side, which writes only what differs from its shadow.

Nothing is written before every watched kind was listed once, so a restarting agent never
removes entries it simply has not heard about yet: the maps adopted from the previous agent
keep serving until the first complete sync, and stale entries go exactly then.

With ``scaleToZero.enabled`` the agent also runs the scaler for this node's opted-in pods on
its loop (:class:`controlplane.scaling.NodeScaler`): their states reach this node's translation
directly and, with the API source, every other agent through the Pod label it publishes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import time
from typing import Any

from controlplane.changes import SCALE_STATE_PODS, ChangeTracker, ServiceKey
from controlplane.config import DEVICES_AUTO, Config
from controlplane.filesource import FileSource
from controlplane.health import HealthServer, ProxyHealth, ServiceHealth, ServiceHealthServers
from controlplane.metrics import DatapathCollector, Metrics, pin_stats
from controlplane.sync import SyncRunner
from dataplane import tc
from dataplane.loader import SockDatapath, check_paths
from dataplane.services import ServiceMaps
from dataplane.table import FrontendKind, Protocol

log = logging.getLogger("zeroproxy.agent")

ADDRESS_POLL_PERIOD = 5.0  # seconds between looks at the node's addresses
FULL_SYNC_PERIOD = 3600.0  # re-translate everything this often even without failures (kube-proxy: 1 h)


class Agent:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.datapath = SockDatapath(config.cgroup, config.bpffs)
        self.maps: ServiceMaps | None = None
        self.nodeport: tc.NodeDatapath | None = None  # TC programs on config.devices, if any
        self._local_addresses: list[Any] = []
        kube = config.source == "kubernetes"
        self.watch_pods = config.watch_pods or config.scale_to_zero.enabled
        required = ["Service", "EndpointSlice"] + (["Node"] if kube else []) + (
            ["Pod", SCALE_STATE_PODS] if kube and self.watch_pods else [])
        self.tracker = ChangeTracker(config.node_name, proxy_name=config.proxy_name, required_kinds=required,
                                     node_port_range=config.node_port_range,
                                     external_ip_cidrs=config.allowed_external_ip_cidrs)
        self.runner = SyncRunner(
            self._sync,
            min_interval=config.min_sync_period,
            max_interval=config.sync_period,
            retry_interval=config.retry_period,
        )
        self.metrics = Metrics()
        self._listed_at: float | None = None  # monotonic time every required kind was first listed
        self.health = ProxyHealth(config.effective_health_timeout, lambda: self.tracker.queued_since,
                                  lambda: not self.tracker.node_deleting, lambda: self._listed_at)
        self.service_health = ServiceHealthServers(config.health_check_node_port_address, self.health)
        self._need_full = True  # the first sync is full; so is the one after any failure
        self._last_full = float("-inf")
        self._source: Any = None
        self._kube_configuration: Any = None
        self._servers: list[Any] = []
        self._wanted_servers: list[tuple[str, str]] = []  # (what, bind address) not listening yet
        self._failed_servers: set[str] = set()  # logged once each
        self.scale: Any = None  # NodeScaler when scale to zero is enabled
        # one thread for destroying stale connected UDP sockets: in order, off the event loop
        self._udp_worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stale-udp")
        self.synced = asyncio.Event()

    # ---- watch side: handlers only record -----------------------------------------------------

    def on_objects(self, objects: list[dict[str, Any]]) -> None:
        """The file source delivered a complete, new set of objects."""
        changed = self.tracker.replace_all(objects)
        self._note_listed()
        log.info("source: %d objects, %d changed", len(objects), changed)
        self.runner.request()
        if self.scale is not None:
            self.scale.pods_changed()

    def on_list(self, kind: str, objects: list[dict[str, Any]], received: float) -> None:
        """A watcher (re)listed a kind: the objects are all there is of it."""
        first = kind not in self.tracker.listed_kinds
        was_synced = self.tracker.synced
        changed = self.tracker.replace(kind, objects, received)
        self._note_listed()
        # The scaler looks at pods only once every kind is listed (a partial view could opt pods
        # out), so the list that completes the set must wake it too, whatever its kind.
        if self.scale is not None and (kind == "Pod" or (self.tracker.synced and not was_synced)):
            self.scale.pods_changed()
        log.info("%s: %s of %d objects, %d changed", kind, "initial list" if first else "relist", len(objects),
                 changed)
        if changed or self.tracker.synced:
            self.runner.request()

    def _note_listed(self) -> None:
        if self._listed_at is None and self.tracker.synced:
            self._listed_at = time.monotonic()

    def on_event(self, kind: str, event: str, obj: dict[str, Any], received: float) -> None:
        self.metrics.watch_events.labels(kind, event).inc()
        meta = obj.get("metadata") or {}
        name = f"{meta.get('namespace')}/{meta.get('name')}" if meta.get("namespace") else meta.get("name")
        if event == "DELETED":
            changed = self.tracker.delete(kind, obj, received)
        else:
            changed = self.tracker.upsert(kind, obj, received)
        if changed:
            log.info("%s %s %s", kind, name, event.lower())
            self.runner.request()
            if self.scale is not None and kind == "Pod":
                self.scale.pods_changed()
        else:
            log.debug("%s %s %s: nothing a proxy reads changed", kind, name, event.lower())

    def on_status(self, kind: str, what: str, detail: str) -> None:
        if what == "relist":
            self.metrics.relists.labels(kind).inc()
        elif what.endswith("_error"):
            self.metrics.errors.labels(what.removesuffix("_error")).inc()

    # ---- map side -----------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.maps is None or not self.tracker.synced:
            return  # nothing is written before the initial lists: the adopted maps keep serving
        started = time.monotonic()
        full = self._need_full or started - self._last_full > FULL_SYNC_PERIOD
        if self.maps.set_node_port_addresses(self._node_port_addresses()):
            full = True  # every NodePort frontend is written once per accepting address
        mode = "full" if full else "partial"
        try:
            plan = self.tracker.plan(full=full)
            self.tracker.apply(plan)
            result = None
            entries: Any = None
            if full:
                # The whole table: the map side diffs it against its shadow of the kernel and
                # also removes whatever a failure or an earlier agent left that is not wanted.
                entries = self.tracker.table.values()
                result = self.maps.sync(entries)
            elif plan.changes:
                # Only the frontends of the changed services are read and written: the cost of
                # a sync follows the change, not the size of the cluster.
                scope = {fe for ch in plan.changes.values() for fe in (*ch.previous, *ch.current)}
                entries = self.tracker.entries_at(scope)
                result = self.maps.sync(entries, scope=scope)
            if self.nodeport is not None and self.maps.maglev and entries is not None:
                self.nodeport.sync_maglev(self.maps.maglev_tables(entries), live=self.maps.live_rev_nat_ids())
        except Exception:
            self._need_full = True
            self.metrics.errors.labels("sync").inc()
            raise
        self._need_full = False
        if full:
            self._last_full = started
        now = time.time()
        self.tracker.mark_programmed()
        self.health.updated()
        elapsed = time.monotonic() - started
        self.metrics.observe_sync(mode, elapsed, result, now)
        self.metrics.observe_programming(plan.trigger_times.values(), now)
        self.metrics.services_changed.inc(len(plan.changes))
        self._update_gauges()
        if result is not None:
            for c in result.conflicts:
                log.error("frontend conflict: %s", c)
            if not result.changed and full:
                log.info("sync (full): %d services translated, the maps already hold them (%.1f ms)",
                         len(plan.keys), elapsed * 1000)
            elif result.changed:
                log.info(
                    "sync (%s): %d services changed of %d translated; %d frontends written, %d deleted; "
                    "%d backends written, %d deleted; now %d frontends, %d backends (%.1f ms)",
                    mode, len(plan.changes), len(plan.keys), result.frontends_written, result.frontends_deleted,
                    result.backends_written, result.backends_deleted, self.maps.frontend_count,
                    self.maps.backend_count, elapsed * 1000)
        if plan.changes:
            self._update_service_health(plan.changes.keys())
            self._abort_stale_udp(plan.changes.values())
        if not self.synced.is_set():
            log.info("initial sync done")
            self.synced.set()

    def _abort_stale_udp(self, changes: Any) -> None:
        """Destroy connected UDP sockets whose backend just left their frontend (dataplane/udp.py),
        in a worker thread after the maps are written: a new socket then finds a live backend."""
        pairs = set()
        for ch in changes:
            for fe, old in ch.previous.items():
                if fe.protocol is not Protocol.UDP or fe.kind is FrontendKind.NODE_PORT:
                    continue
                new = ch.current.get(fe)
                keep = set() if new is None else {(b.address, b.port) for b in (*new.backends,
                                                                               *(new.internal_backends or ()))}
                for b in (*old.backends, *(old.internal_backends or ())):
                    if (b.address, b.port) not in keep:
                        pairs.add((fe.address, fe.port, b.address, b.port))
        if not pairs:
            return
        from dataplane import udp

        lookup = udp.rnat_lookup(self.datapath.table("zp_rnat4"), self.datapath.table("zp_rnat6"))

        def work() -> None:
            for d in udp.destroy_stale(self.config.cgroup, pairs, lookup):
                self.metrics.udp_destroyed.inc()
                log.info("destroyed a connected UDP socket %s -> %s: its backend left %s (pid %d's netns)",
                         d.local, d.peer, d.frontend, d.pid)

        def done(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is not None:
                log.error("stale UDP sockets: %s", f.exception())

        asyncio.get_running_loop().run_in_executor(self._udp_worker, work).add_done_callback(done)

    def _node_port_addresses(self) -> list[Any]:
        """This node's addresses that accept NodePorts (kube-proxy's nodePortAddresses rules)."""
        node = self.tracker.nodes.get(self.config.node_name)
        primary = node.internal_ips if node is not None else ()
        return tc.node_port_addresses(self.config.node_port_addresses, self._local_addresses, primary=primary)

    async def _watch_addresses(self) -> None:
        """Follow this netns's addresses (NodePorts are served on them); a change means a full sync.

        pyroute2's synchronous API runs an event loop of its own, so it is called from a thread.
        """
        while True:
            await asyncio.sleep(ADDRESS_POLL_PERIOD)
            try:
                addrs = await asyncio.to_thread(tc.local_addresses)
            except Exception as e:  # a netlink hiccup must not stop the agent
                log.warning("reading local addresses: %s", e)
                continue
            if addrs != self._local_addresses:
                log.info("local addresses changed: %s", ", ".join(map(str, addrs)))
                self._local_addresses = addrs
                self.runner.request()

    def _update_gauges(self) -> None:
        assert self.maps is not None
        self.metrics.services.set(len(self.tracker.state))
        self.metrics.frontends.set(self.maps.frontend_count)
        self.metrics.backends.set(self.maps.backend_count)
        self.metrics.invalid_objects.set(self.tracker.problem_count)
        self.metrics.frontend_conflicts.set(self.tracker.conflict_count)

    def _update_service_health(self, changed: Any = None) -> None:
        """healthCheckNodePort listeners for eTP=Local services, with this node's ready endpoints."""
        services: dict[int, ServiceHealth] = {}
        for key, entries in self.tracker.state.items():
            port, local = _health_check(key, entries.values(), self.config.node_name)
            if port:
                services[port] = ServiceHealth(key[0], key[1], local)
        self.service_health.update(services)

    def _map_fill(self) -> dict[str, tuple[int, int]]:
        """Entries per service/backend map from the shadow (no syscalls), capacity from bcc."""
        maps = self.maps
        if maps is None:
            return {}
        out = {}
        for name, fam in (("zp_lb4_svc", maps.v4), ("zp_lb6_svc", maps.v6)):
            used = sum(1 + len(st.backend_ids) for st in fam.frontends.values())
            out[name] = (used, int(self.datapath.table(name).max_entries))
        for name, fam in (("zp_lb4_be", maps.v4), ("zp_lb6_be", maps.v6)):
            out[name] = (len(fam.backends), int(self.datapath.table(name).max_entries))
        return out

    # ---- lifecycle ----------------------------------------------------------------------------

    def _make_source(self) -> Any:
        source = self.config.source
        if source.startswith("file:") and len(source) > 5:
            return FileSource(source[5:], self.on_objects, poll_interval=self.config.poll_period)
        if source == "kubernetes":
            from controlplane.kubesource import KubeSource, load_configuration, resources

            cfg = self._kube_configuration = load_configuration(self.config.kubeconfig, self.config.api_server)
            log.info("watching the Kubernetes API at %s as node %s", cfg.host, self.config.node_name)
            return KubeSource(cfg, resources(self.config.node_name, watch_pods=self.watch_pods,
                                             scale_states=self.watch_pods),
                              self.on_list, self.on_event, self.on_status)
        raise ValueError(f"source {source!r}: expected kubernetes or file:PATH")

    def _start_servers(self) -> None:
        """Listen for health and metrics before anything that can take time (the bcc compile,
        the first list): like kube-proxy, /healthz and /livez answer from the first second,
        saying "not synced yet" rather than refusing the connection. A bind that fails (the
        port still taken by the previous agent, say) is retried by :meth:`_serve`."""
        if self.config.healthz_bind_address:
            self._wanted_servers.append(("healthz", self.config.healthz_bind_address))
        if self.config.metrics_bind_address:
            self.metrics.add_collector(DatapathCollector(pin_stats(self.config.bpffs), self._map_fill))
            self._wanted_servers.append(("metrics", self.config.metrics_bind_address))
        self._try_servers()

    def _try_servers(self) -> None:
        for item in list(self._wanted_servers):
            what, address = item
            try:
                if what == "healthz":
                    self._servers.append(HealthServer(address, self.health))
                else:
                    self.metrics.serve(address)
                    self._servers.append(self.metrics)
                self._wanted_servers.remove(item)
            except OSError as e:
                self.metrics.errors.labels("health" if what == "healthz" else "metrics").inc()
                if what not in self._failed_servers:
                    log.error("%s server: cannot listen on %s: %s; retrying every 5s", what, address,
                              e.strerror or e)
                self._failed_servers.add(what)

    async def _serve(self) -> None:
        """Retry the servers whose bind failed instead of dying: the dataplane matters more than
        the probes."""
        while self._wanted_servers:
            await asyncio.sleep(5)
            self._try_servers()

    async def _watch_pending(self) -> None:
        """Keep the pending-age gauge current between syncs (a scrape must see a stuck queue)."""
        while True:
            queued = self.tracker.queued_since
            self.metrics.pending.set(0.0 if queued is None else time.monotonic() - queued)
            await asyncio.sleep(0.5)

    async def run(self) -> None:
        check_paths(self.config.cgroup, self.config.bpffs)  # in a second, not after a compile
        self._start_servers()
        self._source = self._make_source()
        self.datapath.load()
        self.maps = ServiceMaps(self.datapath)
        self.maps.maglev = self.config.lb_algorithm == "maglev"
        log.info(
            "adopted %d frontends, %d backends from %s",
            self.maps.frontend_count, self.maps.backend_count, self.config.bpffs,
        )
        self.datapath.attach()
        self._local_addresses = await asyncio.to_thread(tc.local_addresses)
        devices = self.config.devices
        if devices == DEVICES_AUTO:
            devices = await asyncio.to_thread(tc.default_route_devices)
            if not devices:
                log.warning("devices: auto found no interface with a default route: no NodePort/ExternalIP/"
                            "LoadBalancer programs (set devices explicitly)")
            else:
                log.info("devices: auto -> %s (the default routes' interfaces)", ", ".join(devices))
        if devices:
            ct = self.config.conntrack
            defaults = tc.CtTimeouts()
            self.nodeport = tc.NodeDatapath(
                self.config.bpffs, devices, node_port_range=self.config.node_port_range,
                snat_ports=self.config.snat_port_range,
                timeouts=tc.CtTimeouts(
                    syn=defaults.syn,
                    established=int(ct.tcp_established_timeout or defaults.established),
                    udp=int(ct.udp_timeout or defaults.udp)),
            )
            self.nodeport.load()
            await asyncio.to_thread(self.nodeport.attach)  # pyroute2 needs a thread of its own here
            log.info("NodePort/ExternalIP/LoadBalancer programs on %s", ", ".join(devices))
        if self.config.scale_to_zero.enabled:
            await self._start_scale_to_zero()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tasks = [asyncio.create_task(self._source.run()), asyncio.create_task(self.runner.run()),
                 asyncio.create_task(self._watch_pending()), asyncio.create_task(self._serve()),
                 asyncio.create_task(self._watch_addresses())]
        self.runner.request()
        try:
            await stop.wait()
        finally:
            log.info("stopping; programs and maps stay in place for the next agent")
            self._source.stop()
            self.runner.stop()
            tasks[2].cancel()
            tasks[3].cancel()
            tasks[4].cancel()
            await asyncio.wait(tasks, timeout=10)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.scale is not None:
                await self.scale.close()
                if self.scale.publisher is not None:
                    await asyncio.to_thread(self.scale.publisher.stop)
            self.service_health.close()
            self._udp_worker.shutdown(wait=True, cancel_futures=True)
            for server in self._servers:
                server.close()
            self.datapath.close()
            if self.nodeport is not None:
                self.nodeport.close()


    async def _start_scale_to_zero(self) -> None:
        from controlplane.scaling import NodeScaler

        publisher = None
        if self._kube_configuration is not None:
            from controlplane.kubesource import PodStatePublisher

            publisher = PodStatePublisher(self._kube_configuration, self.config.node_name)
            publisher.start()
        self.scale = NodeScaler(self.config.scale_to_zero, self.config.node_name, self.tracker, self.runner.request,
                                registry=self.metrics.registry, publisher=publisher)
        await self.scale.start()
        self.scale.pods_changed()


def _health_check(key: ServiceKey, entries: Any, node_name: str) -> tuple[int, int]:
    """(healthCheckNodePort, ready local endpoints) of a service; port 0 when it has none."""
    port = 0
    local: set[Any] = set()
    for entry in entries:
        if not entry.health_check_node_port:  # set only under externalTrafficPolicy: Local
            continue
        port = entry.health_check_node_port
        if entry.frontend.kind is FrontendKind.CLUSTER_IP:
            continue  # eTP filters only external frontends; their backends are this node's
        local.update(b.address for b in entry.backends if b.ready and b.node_name == node_name)
    return port, len(local)
