"""The zeroproxy command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from controlplane.config import DEFAULT_BPFFS
from dataplane.table import DEFAULT_NODE_PORT_RANGE

if TYPE_CHECKING:
    from controlplane.config import Config

EPILOG = """\
examples:
  zeroproxy agent --kubeconfig ~/.kube/config --cgroup /sys/fs/cgroup/kubepods
  zeroproxy agent --config /etc/zeroproxy/config.yaml   # fields like KubeProxyConfiguration
  zeroproxy agent --source file:cluster.yaml --cgroup /sys/fs/cgroup/kubepods
  zeroproxy service list                           # what this node has programmed
  zeroproxy status                                 # attachments and datapath counters
  zeroproxy cleanup --cgroup /sys/fs/cgroup/kubepods
  zeroproxy print-bpf                              # the C text handed to bcc

The demo sandbox, the kubeadm test cluster and the e2e runs are the test bed's, not the agent's:
  ./zp demo | ./zp cluster up | ./zp e2e      (python -m testbed ...)
"""


AGENT_EPILOG = """\
examples:
  zeroproxy agent --kubeconfig ~/.kube/config --node-name node-1
  zeroproxy agent --config /etc/zeroproxy/config.yaml --master https://10.0.0.1:6443
  zeroproxy agent --source file:cluster.yaml --cgroup /sys/fs/cgroup/kubepods --bpffs /sys/fs/bpf/zeroproxy
  zeroproxy agent --config config.yaml --print-config   # the effective configuration
"""


def _default_cgroup() -> str:
    from dataplane.loader import cgroup2_mount

    try:
        return str(cgroup2_mount())
    except RuntimeError:
        return "/sys/fs/cgroup"


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def agent_config(args: argparse.Namespace) -> Config:
    """Defaults < --config file < flags; raises ConfigError naming every bad field or flag."""
    from controlplane import config as cfgmod

    base = cfgmod.Config(cgroup=Path(_default_cgroup()))
    cfg = cfgmod.load_file(args.config, base) if args.config else base
    # file field -> (flag, value as typed); config checks each with the field's own parser
    return cfgmod.apply_flags(cfg, {
        "source": ("--source", args.source),
        "cgroup": ("--cgroup", args.cgroup or None),
        "bpffs": ("--bpffs", args.bpffs or None),
        "nodeName": ("--node-name", args.node_name),
        "devices": ("--devices", args.devices),
        "clientConnection.kubeconfig": ("--kubeconfig", args.kubeconfig),
        "apiServer": ("--master", args.master),
        "proxyName": ("--proxy-name", args.proxy_name),
        "healthzBindAddress": ("--healthz-bind-address", args.healthz_bind_address),
        "metricsBindAddress": ("--metrics-bind-address", args.metrics_bind_address),
        "healthTimeout": ("--health-timeout", args.health_timeout),
        "healthCheckNodePortAddress": ("--healthcheck-nodeport-address", args.healthcheck_nodeport_address),
        "clusterCIDR": ("--cluster-cidr", args.cluster_cidr),
        "nodePortAddresses": ("--nodeport-addresses", args.nodeport_addresses),
        "allowedExternalIPCIDRs": ("--allowed-external-ip-cidrs", args.allowed_external_ip_cidrs),
        "nodePortRange": ("--nodeport-range", args.nodeport_range),
        "snatPortRange": ("--snat-port-range", args.snat_port_range),
        "lbAlgorithm": ("--lb-algorithm", args.lb_algorithm),
        "syncPeriod": ("--sync-period", args.sync_period),
        "minSyncPeriod": ("--min-sync-period", args.min_sync_period),
        "watchPods": ("--watch-pods", args.watch_pods),
        "scaleToZero.enabled": ("--scale-to-zero", args.scale_to_zero),
        "scaleToZero.runtime": ("--s2z-runtime", args.s2z_runtime),
        "scaleToZero.runtimeDir": ("--runtime-dir", args.runtime_dir),
        "scaleToZero.criu": ("--criu", args.criu),
        "scaleToZero.cgroupParent": ("--s2z-cgroup-parent", args.s2z_cgroup_parent),
        "scaleToZero.restoreTimeout": ("--restore-timeout", args.restore_timeout),
        "scaleToZero.stateFile": ("--scale-state-file", args.scale_state_file),
    })


def cmd_agent(args: argparse.Namespace) -> int:
    import uvloop

    from controlplane.config import ConfigError, dump
    from dataplane.loader import SetupError
    from zeroproxy.agent import Agent

    try:
        cfg = agent_config(args)
    except ConfigError as e:
        print(f"zeroproxy agent: invalid configuration:\n{e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(dump(cfg), sort_keys=False), end="")
        return 0
    agent = Agent(cfg)
    try:
        uvloop.run(agent.run())
    except SetupError as e:
        print(f"zeroproxy agent: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from dataplane.loader import cleanup

    devices = [d for d in args.devices.split(",") if d]
    if devices:
        from dataplane import tc

        for line in tc.detach(devices):
            print(line)
    for line in cleanup(Path(args.cgroup) if args.cgroup else None, Path(args.bpffs)):
        print(line)
    return 0


def cmd_service_list(args: argparse.Namespace) -> int:
    from dataplane.inspect import service_list

    if not Path(args.bpffs).exists():
        from dataplane.netns import hidden_mounts_hint

        hint = hidden_mounts_hint()
        print(f"nothing programmed: {args.bpffs} does not exist" + (f"\n{hint}" if hint else ""), file=sys.stderr)
        return 1
    services = service_list(Path(args.bpffs))
    if args.output == "json":
        print(json.dumps([asdict(s) for s in services], indent=2))
        return 0
    print(f"{'ID':>5}  {'FRONTEND':<44} BACKENDS")
    for s in services:
        backends = ", ".join(s.backends) if s.backends else "(none: connect() is refused)"
        frontend = s.frontend if s.view == "internal" else f"{s.frontend} (from outside)"
        print(f"{s.rev_nat_id:>5}  {frontend:<44} {backends}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from dataplane.inspect import service_list, stats
    from dataplane.loader import attached

    pin = Path(args.bpffs)
    out: dict = {"bpffs": str(pin), "pinned": pin.exists()}
    if pin.exists():
        svcs = service_list(pin)
        out["frontends"] = sum(1 for s in svcs if s.view == "internal")
        out["backend_slots"] = sum(len(s.backends) for s in svcs)
        out["counters"] = stats(pin)
    if args.cgroup:
        out["cgroup"] = args.cgroup
        out["attached"] = sorted(p.name for _, p in attached(Path(args.cgroup)))
    print(json.dumps(out, indent=2))
    return 0


def cmd_print_bpf(args: argparse.Namespace) -> int:
    from dataplane.loader import sock_source

    text, cflags = sock_source(Path(args.bpffs))
    print(f"/* cflags: {' '.join(cflags)} */")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zeroproxy",
        description="kube-proxy replacement in eBPF: services at the socket, no iptables/nftables/IPVS",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--log-level", default=os.environ.get("ZP_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    def bpffs_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--bpffs", default=str(DEFAULT_BPFFS),
                        help="directory on a bpf filesystem for pinned maps and programs (default %(default)s)")

    a = sub.add_parser("agent", help="run the node agent", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=AGENT_EPILOG)
    a.add_argument("--config", metavar="FILE",
                   help="config file (YAML, fields like KubeProxyConfiguration; see docs/controlplane.md); "
                        "flags given on the command line override it")
    a.add_argument("--print-config", action="store_true",
                   help="print the effective configuration (defaults, file, flags) as a config file and exit")
    a.add_argument("--source", default=None,
                   help="where Services/EndpointSlices/Nodes come from: 'kubernetes' (list+watch the API "
                        "server; the default) or file:PATH (multi-document Kubernetes YAML, re-read when it "
                        "changes)")
    a.add_argument("--kubeconfig", default=None,
                   help="kubeconfig for --source kubernetes (default: in-cluster config inside a pod, else "
                        "$KUBECONFIG or ~/.kube/config)")
    a.add_argument("--master", default=None, metavar="URL",
                   help="API server URL, overriding the kubeconfig's or the in-cluster one (a kube-proxy "
                        "replacement cannot rely on the kubernetes Service VIP)")
    a.add_argument("--cgroup", default=None,
                   help="cgroup v2 directory whose processes (and descendants) get service translation at the "
                        f"socket (default: the cgroup2 root, {_default_cgroup()})")
    a.add_argument("--bpffs", default=None,
                   help=f"directory on a bpf filesystem for pinned maps and programs (default {DEFAULT_BPFFS})")
    a.add_argument("--node-name", default=None,
                   help="this node's name as in Node objects and EndpointSlice nodeName (default: $NODE_NAME or "
                        f"the hostname, {os.environ.get('NODE_NAME') or socket.gethostname()})")
    a.add_argument("--devices", default=None,
                   help="comma-separated node devices for NodePort/ExternalIP programs (TC); empty = none")
    a.add_argument("--proxy-name", default=None,
                   help="the service.kubernetes.io/service-proxy-name value that means zeroproxy; services "
                        "labelled with any other value are left to that proxy (default: only unlabelled ones)")
    a.add_argument("--healthz-bind-address", default=None, metavar="IP:PORT",
                   help="/healthz and /livez, kube-proxy compatible; empty disables (default 0.0.0.0:10256)")
    a.add_argument("--metrics-bind-address", default=None, metavar="IP:PORT",
                   help="Prometheus /metrics; empty disables (default 127.0.0.1:10249)")
    a.add_argument("--health-timeout", default=None,
                   help="/healthz fails when a change waited longer than this (default 2 x --sync-period)")
    a.add_argument("--healthcheck-nodeport-address", default=None, metavar="IP",
                   help="address the healthCheckNodePort servers of externalTrafficPolicy=Local services "
                        "listen on (default 0.0.0.0)")
    a.add_argument("--cluster-cidr", default=None, help="comma-separated pod CIDRs of the cluster")
    a.add_argument("--nodeport-addresses", default=None,
                   help="comma-separated CIDRs: NodePorts answer only on node addresses inside them")
    a.add_argument("--allowed-external-ip-cidrs", default=None, metavar="CIDR,...",
                   help="admit spec.externalIPs only inside these CIDRs (\"\" admits none); default: every "
                        "address, as kube-proxy. Any user who may create a Service can name any address there "
                        "(CVE-2020-8554)")
    a.add_argument("--nodeport-range", default=None,
                   help="the cluster's NodePort range, as kube-apiserver's --service-node-port-range "
                        f"(default {DEFAULT_NODE_PORT_RANGE[0]}-{DEFAULT_NODE_PORT_RANGE[1]}); nodePorts outside "
                        "it are rejected")
    a.add_argument("--lb-algorithm", default=None, metavar="random|maglev",
                   help="how NodePort/ExternalIP/LoadBalancer traffic from outside picks a new flow's backend: "
                        "random (default) or maglev (the same backend on every node for the same flow)")
    a.add_argument("--snat-port-range", default=None,
                   help="source ports of NodePort flows SNATed to a remote backend (default 61000-65535); "
                        "must not overlap the NodePort range or the node's ip_local_port_range")
    a.add_argument("--min-sync-period", default=None,
                   help="minimum time between two syncs, e.g. 100ms or 0.1; bursts of changes coalesce "
                        "(default 100ms)")
    a.add_argument("--sync-period", default=None,
                   help="maximum time between two syncs, e.g. 60s (default 60s)")
    a.add_argument("--watch-pods", action="store_const", const=True, default=None,
                   help="also watch this node's Pods (scale to zero needs them)")
    a.add_argument("--scale-to-zero", action="store_const", const=True, default=None,
                   help="checkpoint idle opted-in pods of this node and wake them on demand (implies --watch-pods)")
    a.add_argument("--s2z-runtime", default=None, choices=("runc", "shim"),
                   help="scale to zero: who runs the pods' containers: the zeroproxy containerd shim "
                        "(runtimeClassName: zeroproxy) or runc under --runtime-dir (default runc)")
    a.add_argument("--runtime-dir", default=None, help="scale to zero: runc runtime dir of the pods' containers")
    a.add_argument("--criu", default=None, help="scale to zero: CRIU >= 4.2.1 binary")
    a.add_argument("--s2z-cgroup-parent", default=None, help="scale to zero: cgroup of restored containers")
    a.add_argument("--restore-timeout", default=None, metavar="DURATION",
                   help="scale to zero: how long held connections wait for a restore (default 30s)")
    a.add_argument("--scale-state-file", default=None, help="scale to zero: state file for `zeroproxy scale status`")
    a.set_defaults(func=cmd_agent)

    c = sub.add_parser("cleanup", help="detach zeroproxy's programs and remove its pins")
    c.add_argument("--cgroup", default=_default_cgroup(), help="cgroup to detach from (default %(default)s)")
    c.add_argument("--devices", default="", help="comma-separated devices to remove the NodePort programs from")
    bpffs_arg(c)
    c.set_defaults(func=cmd_cleanup)

    s = sub.add_parser("service", help="inspect programmed services")
    ssub = s.add_subparsers(dest="service_command", required=True)
    sl = ssub.add_parser("list", help="frontends and their backends, read from the pinned maps")
    bpffs_arg(sl)
    sl.add_argument("-o", "--output", choices=["table", "json"], default="table")
    sl.set_defaults(func=cmd_service_list)

    st = sub.add_parser("status", help="attachments and datapath counters")
    bpffs_arg(st)
    st.add_argument("--cgroup", default=None, help="also list programs attached to this cgroup")
    st.set_defaults(func=cmd_status)

    pb = sub.add_parser("print-bpf", help="print the generated C text handed to bcc")
    bpffs_arg(pb)
    pb.set_defaults(func=cmd_print_bpf)

    from zeroproxy.ct_cli import add_parser as add_ct_parser
    from zeroproxy.node_cli import add_parser as add_node_parser
    from zeroproxy.scale_cli import add_parser as add_scale_parser

    add_scale_parser(sub)
    add_ct_parser(sub)
    add_node_parser(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        sys.exit(args.func(args))
    except KeyboardInterrupt:
        sys.exit(130)
