"""`./zp demo` (`python -m testbed demo`): ClusterIP and scale to zero on this one machine, no cluster needed.

Builds a node and pods out of network namespaces and a private cgroup subtree, writes
Kubernetes YAML for four Services, runs a real agent on it, sends TCP and UDP from a client
pod to the ClusterIPs and prints who answered. Then the headline: a fourth service's only pod
(busybox httpd in a runc container) goes idle, is checkpointed with CRIU, and the client's next
request through the ClusterIP wakes it. Everything it made is removed at the end.
"""

from __future__ import annotations

import collections
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dataplane import inspect
from testbed import nettools
from testbed.bed import TestBed, cleanup_stale
from testbed.k8sobjects import endpoint_slice, node, service
from testbed.nettools import TIMED_GETS
from testbed.sandbox import AgentProcess

WEB4, WEB6, DNS4, GONE4, SLEEPY4 = "10.96.0.10", "fd00:10:96::10", "10.96.0.53", "10.96.0.99", "10.96.0.80"
SLEEPY_IDLE_S = 2.0

def _objects(bed_node, web, dns, sleepy) -> list[dict[str, Any]]:
    http = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    udp = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
    return [
        node(bed_node.name, [bed_node.ip4]),
        service("web", [WEB4, WEB6], [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
                ipFamilyPolicy="RequireDualStack"),
        endpoint_slice("web", [p.ip4 for p in web], http, node_name=bed_node.name),
        endpoint_slice("web", [p.ip6 for p in web], http, address_type="IPv6", node_name=bed_node.name),
        service("dns", [DNS4], [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]),
        endpoint_slice("dns", [p.ip4 for p in dns], udp, node_name=bed_node.name),
        service("scaled-down", [GONE4], [{"name": "http", "port": 80, "protocol": "TCP"}]),
        service("sleepy", [SLEEPY4], [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]),
        endpoint_slice("sleepy", [sleepy.ip4], http, node_name=bed_node.name),
    ]


def _scale_to_zero(workdir: Path, client: Any, sleepy: Any) -> None:
    """The sleepy pod: idle -> checkpointed (process gone) -> woken by a request to its ClusterIP."""
    import json
    import uuid

    from scaletozero.runc import RuncRuntime
    from scaletozero.runtime import ContainerSpec
    from scaletozero.scaler import ScaledPod, ScalerThread
    from testbed import rootfs
    from testbed.bed import built, wait_until

    print(f"\n== scale to zero: {SLEEPY4}:80 -> pod sleepy {sleepy.ip4} (busybox httpd under runc)")
    print("   CRIU 4.2.1 from scripts/build-criu.sh (built once, cached; the first run takes minutes)")
    criu = built("build-criu.sh")
    if criu is None:
        raise RuntimeError("scripts/build-criu.sh printed no path")
    runtime = RuncRuntime(workdir / "runtime", criu, cgroup_parent=f"/zpdemo-{uuid.uuid4().hex[:8]}")
    scaler = None
    try:
        fs = rootfs.build_busybox_rootfs(workdir / "sleepy-rootfs", {"/www/index.html": "hello from sleepy\n"})
        runtime.run(ContainerSpec(id="sleepy", rootfs=fs.path, netns=sleepy.netns_path,
                                  args=["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]))
        scaler = ScalerThread(runtime, poll_interval=0.2)
        scaler.call(scaler.scaler.add, ScaledPod("default/sleepy", "sleepy", sleepy.netns_path, (sleepy.ip4,),
                                               idle_timeout=SLEEPY_IDLE_S))

        def get() -> dict[str, Any]:
            r = json.loads(client.check_output([sys.executable, "-c", TIMED_GETS, SLEEPY4, "80", "1"], timeout=90))[0]
            return {"first_byte_ms": r["first_byte"] * 1000, "body": r["body"]}

        warm = get()
        print(f"   running: {warm['body'].strip()!r} in {warm['first_byte_ms']:.1f} ms; "
              f"idle timeout {SLEEPY_IDLE_S:g} s")
        wait_until(lambda: scaler.status()["default/sleepy"].state == "checkpointed", "sleepy checkpointed",
                   timeout=60)
        st = scaler.status()["default/sleepy"]
        print(f"   idle: checkpointed in {st.last_checkpoint_seconds:.3f} s; container {runtime.state('sleepy')}, "
              f"no process left; the activation proxy listens for it")
        woke = get()
        st = scaler.status()["default/sleepy"]
        print(f"   woken by a request to the ClusterIP: {woke['body'].strip()!r}, first byte after "
              f"{woke['first_byte_ms']:.1f} ms (restore {st.last_restore_seconds:.3f} s); "
              f"container {runtime.state('sleepy')}, {st.restores} restore, {st.accepted} connection held")
        again = get()
        print(f"   and then straight to the app: {again['first_byte_ms']:.1f} ms")
    finally:
        if scaler is not None:
            scaler.close()
        runtime.delete_all()


def _report(title: str, records: list[dict[str, Any]], show: str) -> None:
    ok = [r for r in records if r["ok"]]
    spread = collections.Counter(r["server_name"] for r in ok)
    print(f"\n== {title}: {len(ok)}/{len(records)} ok")
    for name, n in sorted(spread.items()):
        print(f"   {name:<8} {n:>4}  {'#' * round(40 * n / max(len(ok), 1))}")
    if ok:
        r = ok[0]
        print(f"   first reply from {r['server_name']}; {show} = {r.get(show)}; "
              f"backend saw client {r['peer_seen_by_server']}")
    errors = collections.Counter(r["error"] for r in records if not r["ok"])
    for err, n in errors.items():
        ms = [r["connect_ms"] for r in records if r["error"] == err and r.get("connect_ms") is not None]
        print(f"   {n} x {err}" + (f" (median {sorted(ms)[len(ms) // 2]:.3f} ms)" if ms else ""))


def run_demo(requests: int = 30, keep_going: bool = False) -> int:
    cleanup_stale("zpdemo")
    workdir = Path(tempfile.mkdtemp(prefix="zeroproxy-demo-"))
    print("zeroproxy demo: building a sandbox (network namespaces + a private cgroup subtree)")
    try:
        with TestBed(prefix="zpdemo") as bed:
            n = bed.add_node("node-a")
            client = bed.add_pod(n, "client")
            web = [bed.add_pod(n, f"web-{i}") for i in (1, 2, 3)]
            dns = [bed.add_pod(n, f"dns-{i}") for i in (1, 2)]
            sleepy = bed.add_pod(n, "sleepy")
            for p in web:
                p.serve(p.name, tcp=[8080])
            for p in dns:
                p.serve(p.name, udp=[5353])
            print(f"   node {n.name} ({n.ip4}); client pod {client.ip4}; "
                  f"web pods {', '.join(p.ip4 for p in web)}; dns pods {', '.join(p.ip4 for p in dns)}")
            with AgentProcess(workdir, n.cgroup_path, node_name=n.name, name="demo") as agent:
                agent.write(_objects(n, web, dns, sleepy))
                started = time.monotonic()
                agent.start()
                print(f"   agent up and synced in {time.monotonic() - started:.2f}s "
                      f"(log {agent.log_path}); programs on {n.cgroup_path}")
                print("\n== zeroproxy service list")
                for s in inspect.service_list(agent.pin_dir):
                    print(f"   {s.frontend:<28} -> {', '.join(s.backends) or '(no backends: refused)'}")

                _report(f"TCP {WEB4}:80, {requests} connections",
                        client.client(nettools.format_target(WEB4, 80), count=requests), "getpeername")
                _report(f"TCP [{WEB6}]:80, {requests} connections",
                        client.client(nettools.format_target(WEB6, 80), count=requests), "getpeername")
                _report(f"UDP {DNS4}:53 connected, {requests} queries",
                        client.client(nettools.format_target(DNS4, 53), proto="udp-connected", count=requests),
                        "getpeername")
                _report(f"UDP {DNS4}:53 unconnected (DNS-style sendto/recvfrom), {requests} queries",
                        client.client(nettools.format_target(DNS4, 53), proto="udp-unconnected",
                                      count=requests), "reply_source")
                _report(f"TCP {GONE4}:80 (a service with no endpoints), 5 connections",
                        client.client(nettools.format_target(GONE4, 80), count=5), "getpeername")
                _scale_to_zero(workdir, client, sleepy)
                print("\n== datapath counters:", inspect.stats(agent.pin_dir))
                if keep_going:
                    input(f"\nsandbox kept: pin dir {agent.pin_dir}. Press Enter to remove it... ")
        print("\nremoved the sandbox: agent stopped, programs detached, pins, namespaces and cgroups gone")
        return 0
    except Exception as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
