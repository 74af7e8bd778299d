"""NodePort scenario: a client outside the cluster -> node A's address:nodePort -> a backend.

Layout, added to the ClusterIP benchmark's test bed (its ``be`` node and nginx pods are the
remote backends)::

    ext (external host) --underlay--> node npd / npi / npn / npz --underlay--> node be (be-0..2)
                                          |
                                          +-- local nginx pod (np?-be)

One node per mode, as in the ClusterIP layout, so every datapath is programmed once per N:

- ``direct`` (the floor, no proxying): the external host has plain routes to the pod CIDRs of
  ``be`` and of ``npd`` via npd, so its packets take the same first hop (ext -> node A -> pod)
  without any service translation. Replies from a remote pod go straight back to ext (no SNAT,
  so no detour through node A): the floor is a touch lower than any proxy can be.
- ``iptables`` / ``nftables``: kube-proxy's NodePort shapes (KUBE-SERVICES -> ... last rule
  ``--dst-type LOCAL -j KUBE-NODEPORTS`` -> one ``--dport`` rule per node port -> KUBE-EXT
  (mark for masquerade) -> KUBE-SVC; nftables: ``service-nodeports`` vmap -> ``external-`` chain),
  in npi / npn only. Like kube-proxy for externalTrafficPolicy: Cluster, both masquerade the
  local case too.
- ``zeroproxy``: the TC programs (dataplane.tc.NodeDatapath) on npz's eth0 plus the socket
  programs on npz's cgroup, programmed by a bench.zpctl process of its own; remote backends are
  SNATed to npz's address, local ones only DNATed.

At N the node holds N NodePort services (ports 20000 + i) served by the remote pods and one more,
last in rule order, served by the node's local pod; the client hits the last remote service
("remote") and the local one ("local"). Only short connections are run: every connection is a
new NodePort lookup, keep-alive requests would not see it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import client, rules, zpctl
from bench.services import Service, make_node_port_services
from bench.topology import (
    BACKEND_PORT,
    BACKEND_SYSCTLS,
    CLIENT_SYSCTLS,
    CLUSTER_CIDR,
    DIRECT,
    IPTABLES,
    NFTABLES,
    REPO,
    ZEROPROXY,
    Topology,
    set_sysctls,
    timed,
)
from testbed.bed import External, Node, Pod

log = logging.getLogger(__name__)

SCENARIO = "nodeport"
REMOTE, LOCAL = "remote", "local"
NODE_PORT_BASE = 20000  # NodePort range of the bench: 20000 .. 20000 + N (below any ephemeral range)
NODE_NAMES = {DIRECT: "npd", IPTABLES: "npi", NFTABLES: "npn", ZEROPROXY: "npz"}
# The client opens thousands of SNATed connections a second to three backends; a closed flow holds
# its SNAT port for 10 s, so zeroproxy's default 4 536 ports would run ~60 % full and fail a SYN
# now and then (docs/nodeport.md, "Capacity"). kube-proxy's masquerade draws from the whole port
# space, so the bench node gives zeroproxy the upper half and moves its own ephemeral ports below.
SNAT_PORTS_FLOOR = 32768
DEVICE = "eth0"


class NodePortTopology:
    """The NodePort nodes, their local backends and the external client, inside ``topo``'s bed."""

    def __init__(self, topo: Topology, modes: Sequence[str], max_services: int) -> None:
        self.topo = topo
        self.bed = topo.bed
        self.modes = tuple(modes)
        self.node_port_range = (NODE_PORT_BASE, NODE_PORT_BASE + max_services)
        self.nodes: dict[str, Node] = {}
        self.local: dict[str, Pod] = {}
        self.external: External | None = None
        self.pin_dir = Path("/sys/fs/bpf") / f"{self.bed.id}-np"
        self.zpctl: subprocess.Popen[str] | None = None
        self.loaded: set[str] = set()

    def build(self) -> None:
        for mode in self.modes:
            node = self.bed.add_node(NODE_NAMES[mode])
            pod = self.bed.add_pod(node, f"{NODE_NAMES[mode]}-be")
            set_sysctls(self.bed, pod.netns, BACKEND_SYSCTLS)
            self.topo._start_nginx(pod)
            self.nodes[mode] = node
            self.local[mode] = pod
        self.external = self.bed.add_external("np")
        set_sysctls(self.bed, self.external.netns, CLIENT_SYSCTLS)
        if DIRECT in self.nodes:
            gateway = self.nodes[DIRECT]
            assert self.topo.backend_node is not None
            self.external.add_route(str(self.topo.backend_node.pod_cidr4), via=gateway.ip4)
            self.external.add_route(str(gateway.pod_cidr4), via=gateway.ip4)
        if ZEROPROXY in self.nodes:
            lo = self.snat_ports[0]
            set_sysctls(self.bed, self.nodes[ZEROPROXY].netns,
                        {"net.ipv4.ip_local_port_range": f"{self.node_port_range[1] + 1} {lo - 1}"})
        for pod in self.local.values():
            self.topo._wait_listening(pod)

    @property
    def snat_ports(self) -> tuple[int, int]:
        return (max(SNAT_PORTS_FLOOR, self.node_port_range[1] + 1024), 65535)

    def services(self, mode: str, count: int) -> list[Service]:
        return make_node_port_services(count, self.topo.endpoints, [(self.local[mode].ip4, BACKEND_PORT)],
                                       NODE_PORT_BASE)

    def targets(self, mode: str, services: Sequence[Service], backend: str) -> list[str]:
        if mode == DIRECT:
            eps = self.topo.endpoints if backend == REMOTE else [(self.local[mode].ip4, BACKEND_PORT)]
            return [f"{ip}:{port}" for ip, port in eps]
        svc = services[-2] if backend == REMOTE else services[-1]
        return [f"{self.nodes[mode].ip4}:{svc.node_port}"]

    # -- programming -----------------------------------------------------------------------------

    def program(self, mode: str, count: int, nft_chunk: int) -> dict[str, Any]:
        """Replace ``mode``'s NodePort services with ``count`` (+1 local) services; timed."""
        services = self.services(mode, count)
        node = self.nodes[mode]
        path = self.topo.workdir / f"np-{mode}.rules"
        if mode == IPTABLES:
            path.write_text(rules.iptables_restore(services, CLUSTER_CIDR))
            self.loaded.add(mode)
            seconds = timed(self.bed, node.netns, ["iptables-restore", str(path)])
            path.unlink()
            return {"seconds": seconds, "rules": rules.iptables_rule_count(services)}
        if mode == NFTABLES:
            self._unload(mode)
            self.loaded.add(mode)
            path.write_text(rules.nft_base(CLUSTER_CIDR))
            base = timed(self.bed, node.netns, ["nft", "-f", str(path)])
            chunks = []
            for i in range(0, len(services), nft_chunk):
                path.write_text(rules.nft_services(services[i:i + nft_chunk], CLUSTER_CIDR))
                chunks.append(timed(self.bed, node.netns, ["nft", "-f", str(path)]))
            path.unlink()
            return {"seconds": base + sum(chunks), "base_s": base, "chunk_s": chunks, "chunk": nft_chunk,
                    "chains": rules.nft_chain_count(services)}
        if mode == ZEROPROXY:
            if self.zpctl is None:
                self._start_zpctl()
            reply = self._zp(op="program", services=[[s.index, s.vip, s.port, [list(e) for e in s.endpoints],
                                                      s.node_port] for s in services])
            return {"seconds": reply["sync_s"], **{k: v for k, v in reply.items() if k != "ok"}}
        return {"seconds": 0.0}

    def _start_zpctl(self) -> dict[str, Any]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        self.zpctl = subprocess.Popen([sys.executable, "-m", "bench.zpctl"], cwd=REPO, env=env, text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.loaded.add(ZEROPROXY)
        node = self.nodes[ZEROPROXY]
        return self._zp(op="load", cgroup=str(node.cgroup_path), pin_dir=str(self.pin_dir), devices=[DEVICE],
                        netns=node.netns, node_port_range=list(self.node_port_range),
                        snat_ports=list(self.snat_ports))

    def drop_counters(self) -> dict[str, int]:
        """zeroproxy's TC counters so far (new flows, replies, and every drop reason)."""
        return self._zp(op="np_stats")["stats"] if self.zpctl is not None else {}

    def _zp(self, **cmd: Any) -> dict[str, Any]:
        return zpctl.request(self.zpctl, "bench.zpctl (NodePort)", **cmd)

    # -- teardown --------------------------------------------------------------------------------

    def _unload(self, mode: str) -> None:
        if mode not in self.loaded:
            return
        node = self.nodes[mode]
        if mode == IPTABLES:
            path = self.topo.workdir / "np-iptables.flush"
            path.write_text(rules.iptables_flush())
            self.bed.run_in_netns(node.netns, ["iptables-restore", str(path)])
        elif mode == NFTABLES:
            self.bed.run_in_netns(node.netns, ["nft", "delete", "table", "ip", rules.NFT_TABLE])
        elif mode == ZEROPROXY:
            self._stop_zeroproxy()
        self.loaded.discard(mode)

    def _stop_zeroproxy(self) -> None:
        from dataplane import loader, tc

        if self.zpctl is not None:
            zpctl.stop(self.zpctl)
            self.zpctl = None
        node = self.nodes[ZEROPROXY]
        tc.detach([DEVICE], node.netns)
        loader.cleanup(node.cgroup_path, self.pin_dir)

    def teardown(self) -> list[str]:
        """Remove every rule set and program; each step runs even if an earlier one failed."""
        errors = []
        for mode in list(self.loaded):
            try:
                self._unload(mode)
            except Exception as exc:
                log.warning("removing the NodePort %s datapath failed: %s", mode, exc)
                errors.append(f"nodeport {mode}: {exc}")
        if self.pin_dir.exists():
            errors.append(f"nodeport: {self.pin_dir} left behind")
        return errors

    def leftover_rules(self) -> dict[str, str]:
        out = {}
        for mode, node in self.nodes.items():
            text = (self.bed.run_in_netns(node.netns, ["nft", "list", "ruleset"]).stdout
                    + self.bed.run_in_netns(node.netns, ["iptables-save"]).stdout)
            kube = [line for line in text.splitlines() if "KUBE" in line or rules.NFT_TABLE in line]
            if kube:
                out[f"nodeport-{mode}"] = "\n".join(kube[:5])
        return out


def cases(modes: Sequence[str]) -> list[tuple[str, str]]:
    """(mode, backend) pairs in a fixed order; rotated per round like the ClusterIP cases."""
    order = [m for m in (DIRECT, IPTABLES, NFTABLES, ZEROPROXY) if m in modes]
    return [(m, b) for m in order for b in (REMOTE, LOCAL)]


def run_count(np: NodePortTopology, count: int, *, binary: Path, rounds: int, threads: int, duration: float,
              warmup: float, cpu: int | None, nft_chunk: int, results: dict[str, Any],
              step: Callable[[str], None]) -> None:
    """Program every mode with ``count`` NodePort services, then run the rotated client rounds."""
    services = {}
    for mode in np.modes:
        info = np.program(mode, count, nft_chunk)
        services[mode] = np.services(mode, count)
        if mode != DIRECT:
            results["programming"].append({"services": count, "mode": mode, **info})
    step(f"NodePort N={count}: programmed")
    all_cases = cases(np.modes)
    assert np.external is not None
    for rnd in range(rounds):
        k = rnd % len(all_cases)
        for mode, backend in [*all_cases[k:], *all_cases[:k]]:
            targets = np.targets(mode, services[mode], backend)
            argv = client.argv(binary, targets, scenario="short", threads=threads, duration=duration,
                               warmup=warmup, cpu=cpu)
            before = np.drop_counters() if mode == ZEROPROXY else {}
            rec = client.parse(np.external.check_output(argv, timeout=duration + warmup + 60))
            if mode == ZEROPROXY:
                after = np.drop_counters()
                rec["tc_counters"] = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
            rec.update(services=count, scenario=SCENARIO, mode=mode, position=backend, round=rnd, targets=targets)
            results["runs"].append(rec)
            step(f"NodePort N={count} r{rnd + 1} {mode}/{backend}")
