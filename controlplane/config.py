"""The agent's configuration: a file shaped like kube-proxy's KubeProxyConfiguration, plus flags.

Operators replacing kube-proxy already know KubeProxyConfiguration, and the DaemonSet's
ConfigMap (issue 7) is easiest to review when the same concept has the same field name. So
where a concept matches, the field is spelled and typed as in ``kubeproxy.config.k8s.io/
v1alpha1`` (``clusterCIDR``, ``nodePortAddresses``, ``healthzBindAddress``,
``metricsBindAddress``, ``conntrack.*``, ``syncPeriod``, ``minSyncPeriod``,
``hostnameOverride``, ``clientConnection.kubeconfig``); fields with no kube-proxy counterpart
are ours (``source``, ``cgroup``, ``bpffs``, ``nodeName``, ``devices``, ...).

Precedence is built-in default < file < command-line flag, as with kube-proxy's ``--config``.
A field that is unknown, or known but invalid, is an error naming the field and what was wrong:
a typo in a ConfigMap must stop the agent at start-up rather than be ignored silently.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from dataplane.table import DEFAULT_NODE_PORT_RANGE, DEFAULT_SNAT_PORTS

API_VERSION = "zeroproxy.io/v1alpha1"
KIND = "ZeroproxyConfiguration"

DEFAULT_HEALTHZ_BIND_ADDRESS = "0.0.0.0:10256"  # kube-proxy's
DEFAULT_METRICS_BIND_ADDRESS = "127.0.0.1:10249"  # kube-proxy's
DEFAULT_BPFFS = Path("/sys/fs/bpf/zeroproxy")


class ConfigError(ValueError):
    """The configuration is unusable; the message names every bad field (one per line)."""

    def __init__(self, problems: list[str], origin: str = "") -> None:
        self.problems = problems
        where = f"{origin}: " if origin else ""
        super().__init__("\n".join(f"{where}{p}" for p in problems))


@dataclass(frozen=True)
class ConntrackConfig:
    """KubeProxyConntrackConfiguration. zeroproxy's socket path keeps no conntrack; the NodePort
    datapath uses these for its own flow table. 0 / None mean "leave the kernel default"."""

    max_per_core: int | None = None
    min: int | None = None
    tcp_established_timeout: float | None = 86400.0  # kube-proxy default 24h
    tcp_close_wait_timeout: float | None = 3600.0  # kube-proxy default 1h
    udp_timeout: float | None = None
    udp_stream_timeout: float | None = None


DEFAULT_S2Z_RUNTIME_DIR = Path("/var/lib/zeroproxy/runtime")
DEFAULT_S2Z_CRIU = Path("/var/tmp/zeroproxy/criu-4.2.1/criu")  # where scripts/build-criu.sh caches it
DEFAULT_S2Z_STATE_FILE = Path("/run/zeroproxy/scale-to-zero.json")  # what `zeroproxy scale status` reads
DEFAULT_S2Z_SHIM_SOCKET_DIR = Path("/run/zeroproxy/shim")  # the shim's own default (shim/task/config.go)
S2Z_RUNTIMES = ("runc", "shim")


@dataclass(frozen=True)
class ScaleToZeroConfig:
    """Scale to zero inside the agent (docs/scale-to-zero.md). Off by default: it needs CRIU
    >= 4.2.1 and the pods' containers in a runtime directory the agent can drive."""

    enabled: bool = False
    # Who runs the opted-in pods' containers: "shim" (containerd-shim-zeroproxy-v2, pods with
    # runtimeClassName: zeroproxy, docs/shim.md) or "runc" (containers zeroproxy starts itself
    # under runtime_dir, the sandbox and file-source setups).
    runtime: str = "runc"
    runtime_dir: Path = DEFAULT_S2Z_RUNTIME_DIR  # RuncRuntime base dir; containers named <ns>.<pod>
    shim_socket_dir: Path = DEFAULT_S2Z_SHIM_SOCKET_DIR  # where the shim serves its control sockets
    criu: Path = DEFAULT_S2Z_CRIU
    cgroup_parent: str = "/zeroproxy"  # cgroup of containers the runtime (re)creates
    restore_timeout: float = 30.0  # how long held clients wait; per pod: zeroproxy.io/restore-timeout
    state_file: Path = DEFAULT_S2Z_STATE_FILE
    poll_interval: float = 0.5  # how often idle pods are looked at


@dataclass(frozen=True)
class Config:
    """Everything the agent needs; built by :func:`load` from defaults, a file and flags."""

    # -- ours ---------------------------------------------------------------------------------
    source: str = "kubernetes"  # "kubernetes" or "file:PATH"
    cgroup: Path = Path("/sys/fs/cgroup")
    bpffs: Path = DEFAULT_BPFFS
    node_name: str = field(default_factory=lambda: os.environ.get("NODE_NAME") or socket.gethostname())
    devices: tuple[str, ...] = ()
    api_server: str = ""  # overrides the server of the kubeconfig / in-cluster config when set
    proxy_name: str = ""  # the service.kubernetes.io/service-proxy-name value that means us
    health_timeout: float | None = None  # None: 2 x sync_period, as kube-proxy
    health_check_node_port_address: str = "0.0.0.0"  # where healthCheckNodePort servers listen
    watch_pods: bool = False  # only scale to zero needs Pods
    retry_period: float = 1.0
    poll_period: float = 0.3  # the file source's poll interval
    # -- KubeProxyConfiguration ---------------------------------------------------------------
    kubeconfig: str = ""  # clientConnection.kubeconfig; "" = in-cluster, then $KUBECONFIG, ~/.kube
    cluster_cidr: tuple[str, ...] = ()
    node_port_addresses: tuple[str, ...] = ()
    node_port_range: tuple[int, int] = DEFAULT_NODE_PORT_RANGE  # the apiserver's --service-node-port-range
    healthz_bind_address: str = DEFAULT_HEALTHZ_BIND_ADDRESS  # "" disables the server
    metrics_bind_address: str = DEFAULT_METRICS_BIND_ADDRESS  # "" disables the server
    conntrack: ConntrackConfig = ConntrackConfig()
    sync_period: float = 60.0
    min_sync_period: float = 0.1
    # -- ours, appended -------------------------------------------------------------------------
    scale_to_zero: ScaleToZeroConfig = ScaleToZeroConfig()
    # source ports of SNATed NodePort flows; above Linux's ephemeral range (32768-60999) by default
    snat_port_range: tuple[int, int] = DEFAULT_SNAT_PORTS
    # the only CIDRs spec.externalIPs may come from; None admits every address (kube-proxy's way)
    allowed_external_ip_cidrs: tuple[str, ...] | None = None
    # how the TC path picks a new flow's backend: "random" or "maglev" (the same backend on every
    # node, about 1/N of flows moved when one of N backends goes; Cilium's loadBalancer.algorithm)
    lb_algorithm: str = "random"

    @property
    def effective_health_timeout(self) -> float:
        return self.health_timeout if self.health_timeout is not None else 2 * self.sync_period

    def with_overrides(self, **changes: Any) -> Config:
        """A copy with the given fields replaced (``None`` values are ignored: flag not given)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


# --- value parsers -----------------------------------------------------------------------------
# Each returns the parsed value or raises ValueError with a message that completes
# "<field>: <message>".

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_BARE_SECONDS = re.compile(r"\d+(?:\.\d*)?|\.\d+")  # what duration flags also accept


class DurationError(ValueError):
    """Not a duration: the message says what was expected."""


def parse_duration(value: Any) -> float:
    """A Go/metav1 duration ("30s", "1m30s", "500ms", "24h0m0s") in seconds; no sign.

    The one duration parser: the config file, the flags (through :func:`apply_flags`) and the
    Pod annotations of controlplane/annotations.py all read durations with it, so "1m30s" means
    the same wherever an operator writes it. Bounds are the caller's.
    """
    if not isinstance(value, str):
        raise DurationError(f"must be a duration string like \"30s\" or \"1m30s\", got {_describe(value)}")
    text = value.strip()
    if text == "":
        raise DurationError("must be a duration like \"30s\", got an empty string")
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            raise DurationError(f"{value!r} is not a duration like \"30s\", \"1m30s\" or \"250ms\"")
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    return total


def parse_bind_address(value: Any) -> str:
    """"host:port" / "[v6]:port", or "" to disable; the port must be 0..65535."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string \"IP:port\", got {_describe(value)}")
    if value == "":
        return ""
    host, port = split_host_port(value)
    del host, port
    return value


def split_host_port(value: str) -> tuple[str, int]:
    """Split "IP:port" / "[v6]:port" into (IP, port); ValueError naming what is wrong."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"must be \"[IPv6]:port\", got {value!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ValueError(f"must be \"IP:port\", got {value!r}")
        if ":" in host:
            raise ValueError(f"an IPv6 address must be in brackets, \"[IPv6]:port\", got {value!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (in {value!r})") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 0..65535, got {port_text!r} (in {value!r})")
    return host, int(port_text)


def _cidr_list(value: Any, *, comma_string: bool) -> tuple[str, ...]:
    if isinstance(value, str) and comma_string:
        items: list[Any] = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        want = "a comma-separated string of CIDRs" if comma_string else "a list of CIDRs"
        raise ValueError(f"must be {want}, got {_describe(value)}")
    out: list[str] = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ValueError(f"[{i}] must be a CIDR string, got {_describe(item)}")
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"[{i}] {item!r} is not a CIDR (like 10.244.0.0/16)") from None
    return tuple(out)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {_describe(value)}")
    return value


def _nonempty_string(value: Any) -> str:
    if _string(value) == "":
        raise ValueError("must not be empty")
    return value


def _path(value: Any) -> Path:
    return Path(_nonempty_string(value))


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_describe(value)}")
    return value


def _source(value: Any) -> str:
    text = _nonempty_string(value)
    if text == "kubernetes" or (text.startswith("file:") and len(text) > len("file:")):
        return text
    raise ValueError(f"must be \"kubernetes\" or \"file:PATH\", got {text!r}")


LB_ALGORITHMS = ("random", "maglev")


def _lb_algorithm(value: Any) -> str:
    if value not in LB_ALGORITHMS:
        raise ValueError(f"must be one of {', '.join(LB_ALGORITHMS)}, got {_describe(value)}")
    return value


def _port_range(value: Any) -> tuple[int, int]:
    """kube-apiserver's --service-node-port-range form: "30000-32767" (a single port is allowed)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"must be a port range like \"30000-32767\", got {_describe(value)}")
    lo_s, _, hi_s = value.strip().partition("-")
    try:
        lo, hi = int(lo_s), int(hi_s or lo_s)
    except ValueError:
        raise ValueError(f"must be a port range like \"30000-32767\", got {value!r}") from None
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"must be within 1-65535 with the low port first, got {value!r}")
    return (lo, hi)


# `devices: auto`: the interfaces that carry the node's default routes, found at agent start
# (dataplane.tc.default_route_devices), as Cilium detects its devices.
DEVICES_AUTO = ("auto",)


def _devices(value: Any) -> tuple[str, ...]:
    if value == "auto" or value == ["auto"]:
        return DEVICES_AUTO
    if isinstance(value, str):
        return tuple(d for d in value.split(",") if d)
    if not isinstance(value, list | tuple) or not all(isinstance(d, str) and d for d in value):
        raise ValueError(f"must be a list of interface names, got {_describe(value)}")
    return tuple(value)


def _api_server(value: Any) -> str:
    text = _string(value)
    if text and not re.match(r"^https?://[^/\s]+", text):
        raise ValueError(f"must be a URL like https://10.0.0.1:6443, got {text!r}")
    return text


def _ip(value: Any) -> str:
    text = _nonempty_string(value)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None
    return text


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be greater than 0, got {value!r}")
    return seconds


def _nonnegative_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return seconds


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be a non-negative integer, got {_describe(value)}")
    return value


def _optional_duration(value: Any) -> float | None:
    return None if value is None else _nonnegative_duration(value)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


# --- the file schema ----------------------------------------------------------------------------

# file field -> (Config attribute, parser)
_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "source": ("source", _source),
    "cgroup": ("cgroup", _path),
    "bpffs": ("bpffs", _path),
    "nodeName": ("node_name", _nonempty_string),
    "hostnameOverride": ("node_name", _nonempty_string),  # kube-proxy's name for the same thing
    "devices": ("devices", _devices),
    "apiServer": ("api_server", _api_server),
    "proxyName": ("proxy_name", _string),
    "healthTimeout": ("health_timeout", _positive_duration),
    "healthCheckNodePortAddress": ("health_check_node_port_address", _ip),
    "watchPods": ("watch_pods", _bool),
    "clusterCIDR": ("cluster_cidr", lambda v: _cidr_list(v, comma_string=True)),
    "nodePortAddresses": ("node_port_addresses", lambda v: _cidr_list(v, comma_string=False)),
    "nodePortRange": ("node_port_range", _port_range),
    "allowedExternalIPCIDRs": ("allowed_external_ip_cidrs", lambda v: _cidr_list(v, comma_string=False)),
    "snatPortRange": ("snat_port_range", _port_range),
    "lbAlgorithm": ("lb_algorithm", _lb_algorithm),
    "healthzBindAddress": ("healthz_bind_address", parse_bind_address),
    "metricsBindAddress": ("metrics_bind_address", parse_bind_address),
    "syncPeriod": ("sync_period", _positive_duration),
    "minSyncPeriod": ("min_sync_period", _nonnegative_duration),
}
_CONNTRACK_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "maxPerCore": ("max_per_core", _optional_int),
    "min": ("min", _optional_int),
    "tcpEstablishedTimeout": ("tcp_established_timeout", _optional_duration),
    "tcpCloseWaitTimeout": ("tcp_close_wait_timeout", _optional_duration),
    "udpTimeout": ("udp_timeout", _optional_duration),
    "udpStreamTimeout": ("udp_stream_timeout", _optional_duration),
}
_CLIENT_CONNECTION_FIELDS = {"kubeconfig"}


def _cgroup_parent(value: Any) -> str:
    text = _nonempty_string(value)
    if not text.startswith("/"):
        raise ValueError(f"must be an absolute cgroup path like /zeroproxy, got {text!r}")
    return text


def _s2z_runtime(value: Any) -> str:
    text = _nonempty_string(value)
    if text not in S2Z_RUNTIMES:
        raise ValueError(f"must be one of {', '.join(S2Z_RUNTIMES)}, got {text!r}")
    return text


def _restore_timeout(value: Any) -> float:
    from controlplane import annotations

    seconds = _positive_duration(value)
    lo, hi = annotations.RESTORE_TIMEOUT_BOUNDS
    if not lo <= seconds <= hi:
        raise ValueError(f"must be between {lo:g}s and {hi:g}s, got {value!r}")
    return seconds


_DURATION_PARSERS = (_positive_duration, _nonnegative_duration, _optional_duration, _restore_timeout)

_SCALE_TO_ZERO_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "enabled": ("enabled", _bool),
    "runtime": ("runtime", _s2z_runtime),
    "runtimeDir": ("runtime_dir", _path),
    "shimSocketDir": ("shim_socket_dir", _path),
    "criu": ("criu", _path),
    "cgroupParent": ("cgroup_parent", _cgroup_parent),
    "restoreTimeout": ("restore_timeout", _restore_timeout),
    "stateFile": ("state_file", _path),
    "pollInterval": ("poll_interval", _positive_duration),
}

# KubeProxyConfiguration fields whose concept zeroproxy does not have: named in the error so
# that a copied kube-proxy config says why they are refused rather than "unknown".
_KUBE_PROXY_ONLY = {
    "bindAddress", "bindAddressHardFail", "configSyncPeriod", "detectLocal", "detectLocalMode",
    "enableProfiling", "featureGates", "iptables", "ipvs", "nftables", "winkernel", "mode",
    "oomScoreAdj", "portRange", "showHiddenMetricsForVersion", "udpIdleTimeout", "logging",
}


def parse(data: Any, base: Config | None = None) -> Config:
    """Validate a parsed config document and return ``base`` (defaults) with it applied."""
    problems: list[str] = []
    if not isinstance(data, Mapping):
        raise ConfigError([f"the document must be a mapping of fields, got {_describe(data)}"])
    changes: dict[str, Any] = {}
    set_by: dict[str, str] = {}

    def apply(name: str, value: Any, attr: str, parser: Callable[[Any], Any], target: dict[str, Any]) -> None:
        try:
            parsed = parser(value)
        except ValueError as e:
            problems.append(f"{name}: {e}")
            return
        if attr in set_by and target is changes and target.get(attr) != parsed:
            problems.append(f"{name}: conflicts with {set_by[attr]} ({target[attr]!r} vs {parsed!r})")
            return
        if target is changes:
            set_by[attr] = name
        target[attr] = parsed

    for key, value in data.items():
        if not isinstance(key, str):
            problems.append(f"{key!r}: field names must be strings")
        elif key == "apiVersion":
            if value != API_VERSION:
                problems.append(f"apiVersion: must be {API_VERSION}, got {_describe(value)}")
        elif key == "kind":
            if value != KIND:
                problems.append(f"kind: must be {KIND}, got {_describe(value)}")
        elif key == "conntrack":
            if not isinstance(value, Mapping):
                problems.append(f"conntrack: must be a mapping, got {_describe(value)}")
                continue
            ct: dict[str, Any] = {}
            for sub, subvalue in value.items():
                if sub not in _CONNTRACK_FIELDS:
                    problems.append(f"conntrack.{sub}: unknown field (known: {', '.join(_CONNTRACK_FIELDS)})")
                    continue
                attr, parser = _CONNTRACK_FIELDS[sub]
                apply(f"conntrack.{sub}", subvalue, attr, parser, ct)
            changes["conntrack"] = replace((base or Config()).conntrack, **ct)
        elif key == "scaleToZero":
            if not isinstance(value, Mapping):
                problems.append(f"scaleToZero: must be a mapping, got {_describe(value)}")
                continue
            sz: dict[str, Any] = {}
            for sub, subvalue in value.items():
                if sub not in _SCALE_TO_ZERO_FIELDS:
                    problems.append(f"scaleToZero.{sub}: unknown field (known: {', '.join(_SCALE_TO_ZERO_FIELDS)})")
                    continue
                attr, parser = _SCALE_TO_ZERO_FIELDS[sub]
                apply(f"scaleToZero.{sub}", subvalue, attr, parser, sz)
            changes["scale_to_zero"] = replace((base or Config()).scale_to_zero, **sz)
        elif key == "clientConnection":
            if not isinstance(value, Mapping):
                problems.append(f"clientConnection: must be a mapping, got {_describe(value)}")
                continue
            for sub, subvalue in value.items():
                if sub not in _CLIENT_CONNECTION_FIELDS:
                    problems.append(f"clientConnection.{sub}: not supported by zeroproxy (only kubeconfig)")
                    continue
                apply("clientConnection.kubeconfig", subvalue, "kubeconfig", _string, changes)
        elif key in _FIELDS:
            attr, parser = _FIELDS[key]
            apply(key, value, attr, parser, changes)
        elif key in _KUBE_PROXY_ONLY:
            problems.append(f"{key}: a KubeProxyConfiguration field zeroproxy has no use for; remove it")
        else:
            problems.append(f"{key}: unknown field")
    if "apiVersion" not in data:
        problems.append(f"apiVersion: missing (must be {API_VERSION})")
    if "kind" not in data:
        problems.append(f"kind: missing (must be {KIND})")
    if problems:
        raise ConfigError(problems)
    return validate(replace(base or Config(), **changes))


def validate(cfg: Config) -> Config:
    """Checks across fields, run after flags were applied too."""
    problems = []
    if cfg.min_sync_period > cfg.sync_period:
        problems.append(
            f"minSyncPeriod: {cfg.min_sync_period}s is longer than syncPeriod {cfg.sync_period}s")
    (s_lo, s_hi), (n_lo, n_hi) = cfg.snat_port_range, cfg.node_port_range
    if s_lo <= n_hi and n_lo <= s_hi:
        problems.append(f"snatPortRange: {s_lo}-{s_hi} overlaps nodePortRange {n_lo}-{n_hi}; a SNATed flow's "
                        "source port must never be a NodePort")
    if problems:
        raise ConfigError(problems)
    return cfg


def load_file(path: str | os.PathLike[str], base: Config | None = None) -> Config:
    """Read and validate a config file (YAML or JSON); errors name the file and each field."""
    origin = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError([f"cannot read: {e.strerror or e}"], origin) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"invalid YAML: {' '.join(str(e).split())}"], origin) from None
    try:
        return parse(data, base)
    except ConfigError as e:
        raise ConfigError(e.problems, origin) from None


# --- command-line flags ---------------------------------------------------------------------------
# A flag sets the same attribute as a file field and goes through that field's parser, so a flag
# never accepts what the file refuses (or the other way round). Two differences, both for
# typing on a command line: a list is one comma-separated string, and a duration may also be a
# bare number of seconds ("0.05", what the flags always accepted).

_FLAG_PARSERS: dict[str, Callable[[Any], Any]] = {
    "nodePortAddresses": lambda v: _cidr_list(v, comma_string=True),
    "allowedExternalIPCIDRs": lambda v: _cidr_list(v, comma_string=True),  # "" admits none
}


def _field(name: str) -> tuple[str | None, str, Callable[[Any], Any]]:
    """(nested Config attribute or None, attribute, parser) of a file field ("syncPeriod",
    "scaleToZero.criu", "clientConnection.kubeconfig"); KeyError for a field the file lacks."""
    section, _, sub = name.partition(".")
    if not sub:
        attr, parser = _FIELDS[name]
        return None, attr, _FLAG_PARSERS.get(name, parser)
    if name == "clientConnection.kubeconfig":
        return None, "kubeconfig", _string
    nested, table = {"conntrack": ("conntrack", _CONNTRACK_FIELDS),
                     "scaleToZero": ("scale_to_zero", _SCALE_TO_ZERO_FIELDS)}[section]
    attr, parser = table[sub]
    return nested, attr, parser


def apply_flags(cfg: Config, flags: Mapping[str, tuple[str, Any]]) -> Config:
    """``cfg`` (defaults, then the file) with command-line flags applied, checked across fields.

    ``flags`` maps a file field name to (the flag's name, its value as typed); a value of None
    means the flag was not given. Raises ConfigError naming every bad flag, e.g.
    ``--nodeport-range: must be within 1-65535 ...``.
    """
    problems: list[str] = []
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for name, (flag, value) in flags.items():
        if value is None:
            continue
        section, attr, parser = _field(name)
        if parser in _DURATION_PARSERS and isinstance(value, str) and _BARE_SECONDS.fullmatch(value.strip()):
            value = f"{value.strip()}s"
        try:
            parsed = parser(value)
        except ValueError as e:
            problems.append(f"{flag}: {e}")
            continue
        (nested.setdefault(section, {}) if section else top)[attr] = parsed
    if problems:
        raise ConfigError(problems)
    for section, changes in nested.items():
        top[section] = replace(getattr(cfg, section), **changes)
    return validate(replace(cfg, **top))


def config_fields() -> list[str]:
    """Every field the file accepts, for documentation and `--help`."""
    names = [n for n in _FIELDS]
    names += [f"conntrack.{n}" for n in _CONNTRACK_FIELDS]
    names += [f"clientConnection.{n}" for n in sorted(_CLIENT_CONNECTION_FIELDS)]
    names += [f"scaleToZero.{n}" for n in _SCALE_TO_ZERO_FIELDS]
    return names


def dump(cfg: Config) -> dict[str, Any]:
    """The config as a file document (what `zeroproxy agent --print-config` shows)."""
    out: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND}
    attrs = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    seen: set[str] = set()
    for name, (attr, _) in _FIELDS.items():
        if attr in seen or attr == "conntrack":
            continue
        seen.add(attr)
        value = attrs[attr]
        if attr in ("sync_period", "min_sync_period", "health_timeout"):
            value = None if value is None else format_duration(value)
        elif isinstance(value, Path):
            value = str(value)
        elif name in ("nodePortRange", "snatPortRange"):
            value = f"{value[0]}-{value[1]}"
        elif isinstance(value, tuple):
            value = ",".join(value) if name == "clusterCIDR" else list(value)
        if value is not None:
            out[name] = value
    out["clientConnection"] = {"kubeconfig": cfg.kubeconfig}
    ct = {}
    for name, (attr, _) in _CONNTRACK_FIELDS.items():
        value = getattr(cfg.conntrack, attr)
        if value is not None:
            ct[name] = format_duration(value) if name.endswith("Timeout") else value
    out["conntrack"] = ct
    sz = cfg.scale_to_zero
    out["scaleToZero"] = {
        "enabled": sz.enabled, "runtime": sz.runtime, "runtimeDir": str(sz.runtime_dir),
        "shimSocketDir": str(sz.shim_socket_dir), "criu": str(sz.criu),
        "cgroupParent": sz.cgroup_parent, "restoreTimeout": format_duration(sz.restore_timeout),
        "stateFile": str(sz.state_file), "pollInterval": format_duration(sz.poll_interval),
    }
    return out


def format_duration(seconds: float) -> str:
    """Go's time.Duration form, as kube-proxy prints its config: ``24h0m0s``, ``1m30s``, ``250ms``.

    The one formatter (config dumps, annotation errors); parse_duration reads every output back.
    """
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(int(seconds), 3600)
    minutes, whole = divmod(rest, 60)
    secs = f"{whole + (seconds - int(seconds)):g}s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    return f"{minutes}m{secs}" if minutes else secs
