"""The agent's config file and flags: KubeProxyConfiguration-shaped fields, flags over file, and
errors that name the field -- checked through the real CLI as an operator would hit them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from controlplane import config
from controlplane.config import ConfigError, parse, parse_duration
from dataplane import tc
from testbed.bed import TestBed

HEADER = {"apiVersion": config.API_VERSION, "kind": config.KIND}


def doc(**fields: object) -> dict[str, object]:
    return {**HEADER, **fields}


def test_defaults_mirror_kube_proxy() -> None:
    cfg = parse(doc())
    assert cfg.healthz_bind_address == "0.0.0.0:10256"
    assert cfg.metrics_bind_address == "127.0.0.1:10249"
    assert cfg.source == "kubernetes"
    assert cfg.effective_health_timeout == 2 * cfg.sync_period  # kube-proxy's rule


def test_every_field_parses() -> None:
    cfg = parse(doc(
        clusterCIDR="10.244.0.0/16,fd00:10:244::/56",
        nodePortAddresses=["192.168.0.0/16", "::1/128"],
        healthzBindAddress="127.0.0.1:20256",
        metricsBindAddress="[::1]:20249",
        conntrack={"maxPerCore": 0, "min": 131072, "tcpEstablishedTimeout": "24h0m0s",
                   "tcpCloseWaitTimeout": "1h", "udpTimeout": "30s", "udpStreamTimeout": "2m"},
        syncPeriod="30s", minSyncPeriod="500ms",
        clientConnection={"kubeconfig": "/etc/kubernetes/zp.conf"},
        source="file:/tmp/x.yaml", cgroup="/sys/fs/cgroup/kubepods", bpffs="/sys/fs/bpf/zp",
        nodeName="node-1", devices=["eth0", "eth1"], apiServer="https://10.0.0.1:6443",
        proxyName="zeroproxy", healthTimeout="5s", healthCheckNodePortAddress="10.0.0.5", watchPods=True,
        lbAlgorithm="maglev", allowedExternalIPCIDRs=["198.51.100.0/24"],
    ))
    assert cfg.lb_algorithm == "maglev" and cfg.allowed_external_ip_cidrs == ("198.51.100.0/24",)
    assert cfg.cluster_cidr == ("10.244.0.0/16", "fd00:10:244::/56")
    assert cfg.node_port_addresses == ("192.168.0.0/16", "::1/128")
    assert cfg.metrics_bind_address == "[::1]:20249"
    assert cfg.conntrack.min == 131072 and cfg.conntrack.tcp_established_timeout == 86400
    assert cfg.conntrack.tcp_close_wait_timeout == 3600 and cfg.conntrack.udp_stream_timeout == 120
    assert (cfg.sync_period, cfg.min_sync_period, cfg.effective_health_timeout) == (30, 0.5, 5)
    assert cfg.kubeconfig == "/etc/kubernetes/zp.conf"
    assert cfg.cgroup == Path("/sys/fs/cgroup/kubepods") and cfg.devices == ("eth0", "eth1")
    assert (cfg.node_name, cfg.api_server, cfg.proxy_name, cfg.watch_pods) == (
        "node-1", "https://10.0.0.1:6443", "zeroproxy", True)


@pytest.mark.parametrize(("fields", "named"), [
    ({"syncPeriode": "30s"}, "syncPeriode: unknown field"),
    ({"conntrack": {"tcpTimeout": "1s"}}, "conntrack.tcpTimeout: unknown field"),
    ({"mode": "iptables"}, "mode: a KubeProxyConfiguration field zeroproxy has no use for"),
    ({"iptables": {"masqueradeAll": True}}, "iptables: a KubeProxyConfiguration field"),
    ({"clientConnection": {"qps": 5}}, "clientConnection.qps: not supported"),
    ({"syncPeriod": 30}, "syncPeriod: must be a duration string"),
    ({"syncPeriod": "30 seconds"}, "syncPeriod: '30 seconds' is not a duration like"),
    ({"minSyncPeriod": "-1s"}, "minSyncPeriod: '-1s' is not a duration"),
    ({"healthzBindAddress": "10256"}, "healthzBindAddress: must be \"IP:port\""),
    ({"metricsBindAddress": "localhost:10249"}, "metricsBindAddress: 'localhost' is not an IP address"),
    ({"metricsBindAddress": "::1:10249"}, "metricsBindAddress: an IPv6 address must be in brackets"),
    ({"healthzBindAddress": "0.0.0.0:70000"}, "healthzBindAddress: port must be 0..65535"),
    ({"clusterCIDR": "10.244.0.0/33"}, "clusterCIDR: [0] '10.244.0.0/33' is not a CIDR"),
    ({"nodePortAddresses": "10.0.0.0/8"}, "nodePortAddresses: must be a list of CIDRs"),
    ({"source": "api"}, "source: must be \"kubernetes\" or \"file:PATH\""),
    ({"watchPods": "yes"}, "watchPods: must be true or false"),
    ({"conntrack": {"min": -1}}, "conntrack.min: must be a non-negative integer"),
    ({"apiServer": "10.0.0.1:6443"}, "apiServer: must be a URL"),
    ({"nodeName": "a", "hostnameOverride": "b"}, "hostnameOverride: conflicts with nodeName"),
    ({"syncPeriod": "1s", "minSyncPeriod": "2s"}, "minSyncPeriod: 2.0s is longer than syncPeriod"),
    ({"apiVersion": "kubeproxy.config.k8s.io/v1alpha1"}, "apiVersion: must be zeroproxy.io/v1alpha1"),
    ({"lbAlgorithm": "round-robin"}, "lbAlgorithm: must be one of random, maglev, got the string 'round-robin'"),
    ({"allowedExternalIPCIDRs": ["10.0.0.0/40"]}, "allowedExternalIPCIDRs: [0] '10.0.0.0/40' is not a CIDR"),
])
def test_bad_fields_are_named(fields: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(doc(**fields))
    assert named in str(err.value)


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        parse({"kind": config.KIND, "bogus": 1, "syncPeriod": "x"})
    text = str(err.value)
    assert "bogus: unknown field" in text and "syncPeriod:" in text and "apiVersion: missing" in text
    assert len(err.value.problems) == 3


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("1m30s", 90), ("500ms", 0.5), ("24h0m0s", 86400), ("1.5h", 5400), ("0", 0), ("250us", 250e-6),
])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_printed_config_parses_back(tmp_path: Path) -> None:
    cfg = parse(doc(syncPeriod="45s", minSyncPeriod="250ms", nodeName="n1", devices=["eth0"],
                    clusterCIDR="10.244.0.0/16", conntrack={"udpTimeout": "30s"}))
    again = parse(yaml.safe_load(yaml.safe_dump(config.dump(cfg))))
    assert again == cfg


def test_devices_auto_parses_prints_and_resolves_to_default_route_interfaces(testbed: TestBed) -> None:
    cfg = parse(doc(devices="auto"))
    assert cfg.devices == config.DEVICES_AUTO
    assert parse(yaml.safe_load(yaml.safe_dump(config.dump(cfg)))).devices == config.DEVICES_AUTO
    # In a real namespace: the interface of the default route, not loopback or a second link.
    node = testbed.add_node("n1")
    assert tc.default_route_devices(node.netns) == ()
    testbed.iproute(node.netns).route("add", dst="0.0.0.0/0", gateway=testbed.nodes["n1"].ip4.rsplit(".", 1)[0] + ".1")
    assert tc.default_route_devices(node.netns) == ("eth0",)


def _agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zeroproxy", "agent", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_cli_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc(syncPeriod="30s", minSyncPeriod="1s", nodeName="from-file",
                                       metricsBindAddress="127.0.0.1:19999", source="file:/tmp/objects.yaml")))
    out = _agent("--config", str(path), "--print-config", "--node-name", "from-flag", "--min-sync-period", "50ms")
    assert out.returncode == 0, out.stderr
    effective = yaml.safe_load(out.stdout)
    assert effective["nodeName"] == "from-flag"  # flag wins
    assert effective["minSyncPeriod"] == "50ms"  # flag wins
    assert effective["syncPeriod"] == "30s"  # file wins over the default
    assert effective["metricsBindAddress"] == "127.0.0.1:19999"
    assert effective["healthzBindAddress"] == "0.0.0.0:10256"  # default


def test_cli_rejects_a_bad_file_naming_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc(healthzBindAdress="0.0.0.0:10256")))
    out = _agent("--config", str(path))
    assert out.returncode == 2
    assert f"{path}: healthzBindAdress: unknown field" in out.stderr
    out = _agent("--config", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "missing.yaml: cannot read" in out.stderr
    out = _agent("--print-config", "--metrics-bind-address", "nope")
    assert out.returncode == 2 and "--metrics-bind-address:" in out.stderr


def test_every_flag_goes_through_its_fields_parser() -> None:
    """Flags and file fields share one parser each (config.apply_flags): what the file refuses,
    the flag refuses too, named by the flag; lists are comma strings, durations may be bare seconds."""
    out = _agent("--print-config", "--source", "file:/x.yaml", "--cgroup", "/sys/fs/cgroup/x", "--bpffs", "/b",
                 "--node-name", "n1", "--devices", "eth0,eth1", "--kubeconfig", "/k", "--master", "https://10.0.0.1:6443",
                 "--proxy-name", "zp", "--healthz-bind-address", "", "--metrics-bind-address", "127.0.0.1:1",
                 "--health-timeout", "90s", "--healthcheck-nodeport-address", "10.0.0.2",
                 "--cluster-cidr", "10.244.0.0/16", "--nodeport-addresses", "10.0.0.0/8,192.168.0.0/16",
                 "--nodeport-range", "31000-31999", "--snat-port-range", "62000-65535", "--sync-period", "20",
                 "--min-sync-period", "0.05", "--watch-pods", "--scale-to-zero", "--runtime-dir", "/r", "--criu", "/c",
                 "--s2z-cgroup-parent", "/zp", "--restore-timeout", "1m", "--scale-state-file", "/s.json")
    assert out.returncode == 0, out.stderr
    got = yaml.safe_load(out.stdout)
    assert {k: got[k] for k in ("devices", "nodePortAddresses", "nodePortRange", "syncPeriod", "minSyncPeriod",
                                "healthTimeout", "healthzBindAddress", "apiServer")} == {
        "devices": ["eth0", "eth1"], "nodePortAddresses": ["10.0.0.0/8", "192.168.0.0/16"],
        "nodePortRange": "31000-31999", "syncPeriod": "20s", "minSyncPeriod": "50ms", "healthTimeout": "1m30s",
        "healthzBindAddress": "", "apiServer": "https://10.0.0.1:6443"}
    assert got["clientConnection"] == {"kubeconfig": "/k"}
    assert got["scaleToZero"] | {"pollInterval": None} == {
        "enabled": True, "runtime": "runc", "runtimeDir": "/r", "shimSocketDir": "/run/zeroproxy/shim",
        "criu": "/c", "cgroupParent": "/zp", "restoreTimeout": "1m0s",
        "stateFile": "/s.json", "pollInterval": None}
    out = _agent("--print-config", "--nodeport-addresses", "10.0.0.0/8,bad", "--sync-period", "0",
                 "--restore-timeout", "20m", "--s2z-cgroup-parent", "zp", "--min-sync-period", "-1")
    assert out.returncode == 2
    assert "--nodeport-addresses: [1] 'bad' is not a CIDR" in out.stderr
    assert "--sync-period: must be greater than 0" in out.stderr  # as syncPeriod in the file
    assert "--restore-timeout: must be between 1s and 600s" in out.stderr
    assert "--s2z-cgroup-parent: must be an absolute cgroup path" in out.stderr
    assert "--min-sync-period: '-1' is not a duration" in out.stderr


@pytest.mark.parametrize(("value", "expected"), [("30000-32767", (30000, 32767)), ("31000-31999", (31000, 31999)),
                                                 ("8080", (8080, 8080))])
def test_node_port_range_parses(value: str, expected: tuple[int, int]) -> None:
    cfg = parse({"apiVersion": config.API_VERSION, "kind": config.KIND, "nodePortRange": value})
    assert cfg.node_port_range == expected


@pytest.mark.parametrize("value", ["40000-3", "0-10", "30000-70000", "a-b", ["30000", "32767"]])
def test_bad_node_port_range_is_named(value: object) -> None:
    with pytest.raises(ConfigError, match="nodePortRange"):
        parse({"apiVersion": config.API_VERSION, "kind": config.KIND, "nodePortRange": value})


def test_snat_port_range_parses_and_must_not_overlap_node_ports() -> None:
    base = {"apiVersion": config.API_VERSION, "kind": config.KIND}
    assert parse(base).snat_port_range == (61000, 65535)
    assert parse({**base, "snatPortRange": "40000-65535"}).snat_port_range == (40000, 65535)
    with pytest.raises(ConfigError, match=r"snatPortRange: 32000-65535 overlaps nodePortRange 30000-32767"):
        parse({**base, "snatPortRange": "32000-65535"})
    with pytest.raises(ConfigError, match="snatPortRange: must be within 1-65535"):
        parse({**base, "snatPortRange": "61000-70000"})
    assert config.dump(parse({**base, "snatPortRange": "40000-65535"}))["snatPortRange"] == "40000-65535"
    out = _agent("--print-config", "--snat-port-range", "31000-33000")
    assert out.returncode == 2 and "snatPortRange: 31000-33000 overlaps nodePortRange" in out.stderr


def test_node_port_range_reaches_translation() -> None:
    from controlplane.changes import ChangeTracker
    from testbed.k8sobjects import service

    svc = service("np", ["10.96.0.5"], [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30500}],
                  type="NodePort")
    narrow = ChangeTracker("a", node_port_range=(31000, 31999))
    narrow.replace_all([svc])
    narrow.apply(narrow.plan(full=True))
    assert not any(fe.kind.value == "NodePort" for fe in narrow.table)
    wide = ChangeTracker("a")
    wide.replace_all([svc])
    wide.apply(wide.plan(full=True))
    assert any(fe.kind.value == "NodePort" and fe.port == 30500 for fe in wide.table)
