"""Put containerd-shim-zeroproxy-v2 and CRIU on a node and register the runtime with containerd.

`zeroproxy node install` runs in the DaemonSet's init container ``install``
(manifests/40-daemonset.yaml), `zeroproxy node uninstall` in manifests/uninstall. Both see the
host's directories under ``host_root`` (``/host``): the prefix (``/opt/zeroproxy``),
``/etc/containerd`` and ``/etc/criu``. Whatever they write names host paths, because containerd,
the shim, runc and CRIU read it on the host.

install:

1. ``<prefix>/bin/containerd-shim-zeroproxy-v2`` (static), and CRIU with every library it links
   (resolved by ``ldd`` in this image) in ``<prefix>/lib/criu``; ``<prefix>/bin/criu`` runs it
   with its own loader and libraries, so the host needs none of them and no CRIU of its own.
2. ``<prefix>/shim.toml``: the runc options the shim uses (``CriuPath``, and ``SystemdCgroup``
   copied from the default runtime, so both agree with the kubelet's cgroup driver).
3. ``/etc/criu/runc.conf``: ``network-lock skip``. runc has no flag for it, and CRIU's default
   lock is netfilter rules; the activation proxy holds the pod's traffic instead.
4. containerd's config: the runtime table of the handler, edited with tomlkit, so the operator's
   comments, order and every other setting stay as they were.

containerd reads its config only when it starts. Both verbs end by saying whether it must be
restarted now: when the running containerd (found through /proc with hostPID, as the process
whose config file is this very file) started before the file last changed. Restarting
containerd leaves running containers running; only the runtime list is reloaded.

Every step compares before it writes: a second run on an installed node changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError

SHIM_NAME = "containerd-shim-zeroproxy-v2"
RUNTIME_TYPE = "io.containerd.zeroproxy.v2"
DEFAULT_HANDLER = "zeroproxy"
DEFAULT_PREFIX = "/opt/zeroproxy"
DEFAULT_CONTAINERD_CONFIG = "/etc/containerd/config.toml"
DEFAULT_CRIU_CONFIG = "/etc/criu/runc.conf"
IMAGE_SHIM = "/usr/local/bin/" + SHIM_NAME
IMAGE_CRIU = "/usr/local/sbin/criu"
# Where the CRI plugin's runtimes are, by containerd config version (2: containerd 1.5-1.7,
# 3: containerd 2.x). Version 1 (`plugins.cri`) is long deprecated and not handled.
CRI_RUNTIMES = {2: ("plugins", "io.containerd.grpc.v1.cri", "containerd"),
                3: ("plugins", "io.containerd.cri.v1.runtime", "containerd")}
CRIU_LOCK_LINE = "network-lock skip"
CRIU_MARKER = "# zeroproxy: scale to zero holds a pod's traffic in its activation proxy, not in netfilter"
# The annotation naming a CRIU config file for runc, passed from the pod into the OCI spec.
POD_ANNOTATIONS = ["org.criu.config"]


class NodeInstallError(RuntimeError):
    """Installing or uninstalling cannot go on; the message names the file and what to do."""


@dataclass
class Paths:
    """Host paths (as containerd sees them) and where this process reaches them."""

    host_root: Path = Path("/host")
    prefix: str = DEFAULT_PREFIX
    containerd_config: str = DEFAULT_CONTAINERD_CONFIG
    criu_config: str = DEFAULT_CRIU_CONFIG
    handler: str = DEFAULT_HANDLER
    socket_dir: str = "/run/zeroproxy/shim"

    def local(self, host_path: str) -> Path:
        """Where a host path is in this process's file system."""
        return self.host_root / host_path.lstrip("/")

    @property
    def shim(self) -> str:
        return f"{self.prefix}/bin/{SHIM_NAME}"

    @property
    def criu(self) -> str:
        return f"{self.prefix}/bin/criu"

    @property
    def criu_lib(self) -> str:
        return f"{self.prefix}/lib/criu"

    @property
    def shim_config(self) -> str:
        return f"{self.prefix}/shim.toml"


@dataclass
class Report:
    """What a run did, one line per change, and whether containerd must be restarted."""

    changes: list[str] = field(default_factory=list)
    config_changed: bool = False
    restart: str = ""  # why containerd must be restarted; empty when it need not be

    def lines(self) -> list[str]:
        return [*(self.changes or ["nothing to change"]), self.restart or "containerd: no restart needed"]


# ---- files ------------------------------------------------------------------------------------


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomically(dest: Path, data: bytes, mode: int) -> None:
    """Replace ``dest`` by a renamed temporary file: a running shim keeps its old inode, and a
    reader never sees half a config."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.zeroproxy-tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, dest)


def _install_file(src: Path, dest: Path, mode: int, report: Report, what: str) -> None:
    if dest.exists() and dest.is_file() and _digest(dest) == _digest(src) and (dest.stat().st_mode & 0o777) == mode:
        return
    _write_atomically(dest, src.read_bytes(), mode)
    report.changes.append(f"installed {what}")


def _install_text(dest: Path, text: str, report: Report, what: str) -> None:
    if dest.is_file() and dest.read_text() == text:
        return
    _write_atomically(dest, text.encode(), 0o644)
    report.changes.append(f"wrote {what}")


def linked_libraries(binary: Path) -> tuple[Path, list[Path]]:
    """The ELF loader and the shared libraries ``binary`` loads, as this system's ``ldd`` resolves them."""
    try:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise NodeInstallError(f"ldd {binary}: {getattr(e, 'stderr', '') or e}") from None
    loader: Path | None = None
    libs: list[Path] = []
    for line in out.splitlines():
        line = line.strip()
        if "=>" in line:
            name, _, rest = line.partition("=>")
            target = rest.split("(")[0].strip()
            if target in ("", "not found"):
                raise NodeInstallError(f"{binary} needs {name.strip()}, which this image does not have")
            libs.append(Path(target))
        elif m := re.match(r"(/\S+)\s+\(0x", line):
            loader = Path(m.group(1))
    if loader is None:
        raise NodeInstallError(f"ldd {binary}: no ELF loader in its output; is it a dynamic executable?")
    return loader, libs


def _install_criu(paths: Paths, criu: Path, report: Report) -> None:
    loader, libs = linked_libraries(criu)
    lib = paths.local(paths.criu_lib)
    wanted = {"criu": criu, loader.name: loader, **{p.name: p for p in libs}}
    files = Report()
    for name, src in sorted(wanted.items()):
        _install_file(src.resolve(), lib / name, 0o755, files, name)
    if files.changes:
        report.changes.append(f"installed {len(files.changes)} of CRIU's {len(wanted)} files (itself, its loader "
                              f"and libraries) in {paths.criu_lib}")
    if lib.is_dir():
        for stale in lib.iterdir():
            if stale.name not in wanted:
                stale.unlink()
                report.changes.append(f"removed {paths.criu_lib}/{stale.name} (no longer linked)")
    wrapper = "\n".join([
        "#!/bin/sh",
        "# CRIU for containerd-shim-zeroproxy-v2, with its own loader and libraries (zeroproxy node install).",
        f'exec {paths.criu_lib}/{loader.name} --library-path {paths.criu_lib} {paths.criu_lib}/criu "$@"',
        ""])
    dest = paths.local(paths.criu)
    if not (dest.is_file() and dest.read_text() == wrapper):
        _write_atomically(dest, wrapper.encode(), 0o755)
        report.changes.append(f"installed {paths.criu} (CRIU {criu})")


# ---- CRIU's config for runc -----------------------------------------------------------------------


def _criu_config_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _check_criu_config(paths: Paths) -> bool:
    """Whether CRIU's config for runc already says ``network-lock skip``; raises if it locks otherwise."""
    for n, line in enumerate(_criu_config_lines(paths.local(paths.criu_config)), 1):
        words = line.split()
        if words and words[0] in ("network-lock", "--network-lock"):
            if words[1:] == ["skip"]:
                return True
            raise NodeInstallError(
                f"{paths.criu_config} line {n}: {line.strip()!r}: runc's checkpoints would lock the pod's "
                "network with netfilter rules, which zeroproxy never creates; change it to "
                f"'{CRIU_LOCK_LINE}' (or remove it and run the install again)")
    return False


def _ensure_network_lock_skip(paths: Paths, report: Report) -> None:
    if _check_criu_config(paths):
        return
    path = paths.local(paths.criu_config)
    lines = _criu_config_lines(path)
    _write_atomically(path, "\n".join([*lines, CRIU_MARKER, CRIU_LOCK_LINE, ""]).encode(), 0o644)
    report.changes.append(f"added '{CRIU_LOCK_LINE}' to {paths.criu_config}")


def _remove_network_lock_skip(paths: Paths, report: Report) -> None:
    path = paths.local(paths.criu_config)
    lines = _criu_config_lines(path)
    if CRIU_MARKER not in lines:
        return
    i = lines.index(CRIU_MARKER)
    rest = lines[:i] + lines[i + 1 + (i + 1 < len(lines) and lines[i + 1].strip() == CRIU_LOCK_LINE):]
    if any(line.strip() for line in rest):
        _write_atomically(path, "\n".join([*rest, ""]).encode(), 0o644)
    else:
        path.unlink()
    report.changes.append(f"removed '{CRIU_LOCK_LINE}' from {paths.criu_config}")


# ---- containerd's config ------------------------------------------------------------------------


def _load_config(paths: Paths) -> tuple[Path, str, Any, tuple[str, ...]]:
    """The config's text, parsed (a tomlkit document), and the key path of the CRI plugin's
    containerd table."""
    path = paths.local(paths.containerd_config)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NodeInstallError(
            f"containerd config {paths.containerd_config}: no such file on this node; write containerd's "
            f"defaults first (`containerd config default > {paths.containerd_config}`), then run the "
            "install again") from None
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as e:
        raise NodeInstallError(f"containerd config {paths.containerd_config}: not valid TOML: {e}") from None
    version = doc.get("version", 1)
    if version not in CRI_RUNTIMES:
        raise NodeInstallError(
            f"containerd config {paths.containerd_config}: version = {version} is not supported; zeroproxy "
            "edits version 2 (containerd 1.5-1.7) and 3 (containerd 2.x) configs: migrate it "
            "(`containerd config migrate`, or `containerd config default` as a new start)")
    return path, text, doc, CRI_RUNTIMES[version]


def _table(doc: Any, keys: tuple[str, ...], paths: Paths, create: bool) -> Any:
    node = doc
    for i, key in enumerate(keys):
        if key not in node:
            if not create:
                return None
            node[key] = tomlkit.table(is_super_table=i < len(keys) - 1)
        node = node[key]
        if not isinstance(node, dict):
            raise NodeInstallError(f"containerd config {paths.containerd_config}: "
                                   f"{'.'.join(keys[:i + 1])} is a {type(node).__name__}, not a table")
    return node


def _systemd_cgroup(cri: Any) -> bool:
    """Whether the default runtime uses the systemd cgroup driver (the kubelet's must match)."""
    if cri is None:
        return False
    default = cri.get("default_runtime_name", "runc")
    options = ((cri.get("runtimes") or {}).get(default) or {}).get("options") or {}
    return bool(options.get("SystemdCgroup", False))


def runtime_table(paths: Paths) -> dict[str, Any]:
    """The runtime entry containerd needs for the handler.

    ``runtime_type`` is the shim's absolute path, not the name ``io.containerd.zeroproxy.v2``:
    containerd resolves a name to ``containerd-shim-zeroproxy-v2`` on its own PATH, and the
    ``runtime_path`` key that should point elsewhere is parsed but dropped by containerd 1.6.20's
    client (``WithRuntimePath`` sets a field ``NewTask`` never sends), so Debian bookworm's
    containerd would not find the shim. An absolute ``runtime_type`` is taken as the binary by
    every containerd since 1.6 (``resolveRuntimePath``), and the CRI plugin gives a type that is
    not runc's the generic options (``ConfigPath``) either way.
    """
    return {
        "runtime_type": paths.shim,
        "pod_annotations": list(POD_ANNOTATIONS),
        "options": {"ConfigPath": paths.shim_config},
    }


def _is_ours(kind: Any) -> bool:
    """A runtime_type zeroproxy wrote: the shim's path (any prefix) or its runtime name."""
    return isinstance(kind, str) and (kind == RUNTIME_TYPE or (kind.startswith("/") and kind.endswith("/" + SHIM_NAME)))


def _check_ours(entry: Any, paths: Paths) -> None:
    kind = entry.get("runtime_type")
    if not _is_ours(kind):
        raise NodeInstallError(
            f"containerd config {paths.containerd_config}: runtime {paths.handler!r} already exists with "
            f"runtime_type = {kind!r}, not zeroproxy's ({paths.shim!r}); zeroproxy does not replace another "
            "runtime: rename it, or install under another handler (--handler, and the RuntimeClass's handler)")


# The runtime's block is appended to the operator's file between these lines, so that uninstall
# takes out exactly what install put in and the file is again byte for byte what it was.
BLOCK_BEGIN = "# >>> zeroproxy node install: RuntimeClass handler {handler} (`zeroproxy node uninstall` removes it)"
BLOCK_END = "# <<< zeroproxy node install: {handler}"


def _toml_key(keys: tuple[str, ...]) -> str:
    return ".".join(tomlkit.key(k).as_string() for k in keys)


def runtime_block(paths: Paths, cri_keys: tuple[str, ...]) -> str:
    """The text install appends to containerd's config: the runtime table and its options."""
    want = runtime_table(paths)
    base = (*cri_keys, "runtimes", paths.handler)
    lines = [BLOCK_BEGIN.format(handler=paths.handler), f"[{_toml_key(base)}]"]
    lines += [f"{k} = {tomlkit.item(v).as_string()}" for k, v in want.items() if k != "options"]
    lines.append(f"[{_toml_key((*base, 'options'))}]")
    lines += [f"{k} = {tomlkit.item(v).as_string()}" for k, v in want["options"].items()]
    lines.append(BLOCK_END.format(handler=paths.handler))
    return "\n".join(lines) + "\n"


def _without_block(text: str, handler: str) -> str | None:
    """The text with install's block (and the blank line before it) cut out; None if it has none."""
    begin = text.find("\n" + BLOCK_BEGIN.format(handler=handler) + "\n")
    if begin < 0:
        return None
    end_line = BLOCK_END.format(handler=handler) + "\n"
    end = text.find(end_line, begin)
    if end < 0:
        return None
    return text[:begin] + text[end + len(end_line):]


def _runtimes(doc: Any, cri_keys: tuple[str, ...], paths: Paths) -> Any:
    return _table(doc, (*cri_keys, "runtimes"), paths, create=False)


@dataclass
class _ConfigPlan:
    path: Path
    text: str | None  # the new config; None when it is already right
    systemd_cgroup: bool

    def apply(self, paths: Paths, report: Report) -> None:
        if self.text is None:
            return
        _write_atomically(self.path, self.text.encode(), self.path.stat().st_mode & 0o777)
        report.changes.append(f"added runtime {paths.handler!r} ({paths.shim}) to {paths.containerd_config}")
        report.config_changed = True


def _plan_containerd(paths: Paths) -> _ConfigPlan:
    """The config with the runtime added or updated, in memory: every check happens here,
    before install writes anything. The operator's text stays as it is; the runtime is a block
    at the end (TOML tables may come in any order)."""
    path, text, doc, cri_keys = _load_config(paths)
    cri = _table(doc, cri_keys, paths, create=False)
    systemd = _systemd_cgroup(cri)
    runtimes = _runtimes(doc, cri_keys, paths)
    if runtimes is not None and paths.handler in runtimes:
        _check_ours(runtimes[paths.handler], paths)
        if runtimes[paths.handler].unwrap() == runtime_table(paths):
            return _ConfigPlan(path, None, systemd)
        text = _remove_runtime(paths, text, cri_keys)  # an older install: replaced
    base = text if not text or text.endswith("\n") else text + "\n"
    new = base + "\n" + runtime_block(paths, cri_keys)
    # What containerd will read: the operator's settings, and the runtime exactly as meant.
    try:
        parsed = tomlkit.parse(new).unwrap()
    except TOMLKitError as e:
        raise NodeInstallError(f"containerd config {paths.containerd_config}: the runtime table cannot be added "
                               f"({e}); is {_toml_key((*cri_keys, 'runtimes'))} an inline table?") from None
    node: Any = parsed
    for key in (*cri_keys, "runtimes", paths.handler):
        node = node.get(key) if isinstance(node, dict) else None
    if node != runtime_table(paths):
        raise NodeInstallError(f"containerd config {paths.containerd_config}: the runtime table added at the end "
                               f"does not read back as written ({node!r})")
    return _ConfigPlan(path, new, systemd)


def _remove_runtime(paths: Paths, text: str, cri_keys: tuple[str, ...]) -> str:
    """The config text without the handler's runtime: install's block cut out as it was written,
    or, where someone edited it since, the table removed with tomlkit."""
    cut = _without_block(text, paths.handler)
    if cut is not None:
        return cut
    doc = tomlkit.parse(text)
    runtimes = _runtimes(doc, cri_keys, paths)
    if runtimes is not None and paths.handler in runtimes:
        del runtimes[paths.handler]
    return tomlkit.dumps(doc)


def _unconfigure_containerd(paths: Paths, report: Report) -> None:
    try:
        path, text, doc, cri_keys = _load_config(paths)
    except NodeInstallError:
        if not paths.local(paths.containerd_config).exists():
            return
        raise
    runtimes = _runtimes(doc, cri_keys, paths)
    if runtimes is None or paths.handler not in runtimes:
        return
    _check_ours(runtimes[paths.handler], paths)
    _write_atomically(path, _remove_runtime(paths, text, cri_keys).encode(), path.stat().st_mode & 0o777)
    report.changes.append(f"removed runtime {paths.handler!r} from {paths.containerd_config}")
    report.config_changed = True


# ---- is the running containerd's config older than its file? -------------------------------------


def _containerd_config_arg(cmdline: list[str]) -> str:
    for i, arg in enumerate(cmdline):
        if arg in ("--config", "-c") and i + 1 < len(cmdline):
            return cmdline[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return DEFAULT_CONTAINERD_CONFIG


def _boot_time() -> float:
    """The wall-clock time of boot to the clock tick: now minus CLOCK_BOOTTIME, the clock that
    /proc/<pid>/stat's starttime counts on. (/proc/stat's btime is whole seconds: a config
    written within a second of containerd's start could not be told from one it had read.)"""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


RESTART_SLACK = 0.05  # seconds: how much later than containerd's start a config change must be to count


def running_containerd(paths: Paths, proc: Path = Path("/proc")) -> tuple[int, float] | None:
    """(pid, start time) of the containerd that reads this node's config file, or None.

    With hostPID every containerd on the host is visible (a test bed runs several, one per
    node); the right one is the process whose config path, seen from its own root, is the same
    inode as the file under host_root.
    """
    try:
        mine = paths.local(paths.containerd_config).stat()
    except FileNotFoundError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "containerd":
                continue
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            theirs = (entry / "root" / _containerd_config_arg(cmdline).lstrip("/")).stat()
            if (theirs.st_dev, theirs.st_ino) != (mine.st_dev, mine.st_ino):
                continue
            stat = (entry / "stat").read_text()
            started = _boot_time() + int(stat.rsplit(")", 1)[1].split()[19]) / ticks
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError, ValueError):
            continue
        return int(entry.name), started
    return None


def restart_needed(paths: Paths, report: Report, proc: Path = Path("/proc"), *,
                   effect: str = "to take effect") -> None:
    """Fill ``report.restart`` when containerd runs on a config older than its file."""
    found = running_containerd(paths, proc)
    config = paths.local(paths.containerd_config)
    if found is None:
        if report.config_changed:
            report.restart = (f"containerd: no running containerd reads {paths.containerd_config}; it loads "
                              "the change when it starts")
        return
    pid, started = found
    changed = config.stat().st_mtime
    # The start time is known to a clock tick (10 ms) and mtimes to the kernel's coarse clock:
    # a change more than 50 ms after the start counts.
    if changed > started + RESTART_SLACK or report.config_changed:
        report.restart = (
            f"RESTART REQUIRED: containerd (pid {pid}, started {time.strftime('%H:%M:%S', time.gmtime(started))} "
            f"UTC) runs on an older {paths.containerd_config} (changed "
            f"{time.strftime('%H:%M:%S', time.gmtime(changed))} UTC); restart it (`systemctl restart "
            f"containerd`) for RuntimeClass {paths.handler!r} {effect}; running containers keep running")


# ---- the verbs ----------------------------------------------------------------------------------


def install(paths: Paths, shim: Path = Path(IMAGE_SHIM), criu: Path = Path(IMAGE_CRIU),
            proc: Path = Path("/proc")) -> Report:
    for what, p in (("shim", shim), ("CRIU", criu)):
        if not os.access(p, os.X_OK):
            raise NodeInstallError(f"the {what} to install, {p}, is not an executable file in this image")
    report = Report()
    # Check what the operator owns before writing anything of ours.
    plan = _plan_containerd(paths)
    _check_criu_config(paths)
    _ensure_network_lock_skip(paths, report)
    _install_file(shim, paths.local(paths.shim), 0o755, report, paths.shim)
    _install_criu(paths, criu, report)
    shim_toml = f'CriuPath = "{paths.criu}"\n' + ("SystemdCgroup = true\n" if plan.systemd_cgroup else "")
    _install_text(paths.local(paths.shim_config), shim_toml, report, paths.shim_config)
    # Last: containerd sees the runtime only once everything it points at is in place.
    plan.apply(paths, report)
    restart_needed(paths, report, proc)
    return report


def live_shim_containers(paths: Paths) -> list[str]:
    """The containers a zeroproxy shim still serves on this node, as ``namespace/pod/container``."""
    from scaletozero.shimclient import ShimClient, ShimError
    from scaletozero.shimruntime import CRI_CONTAINER_NAME, CRI_CONTAINER_TYPE, CRI_POD_NAME, CRI_POD_NAMESPACE

    client = ShimClient(paths.local(paths.socket_dir), timeout=5.0)
    found = []
    for cid in client.container_ids():
        try:
            state = client.state(cid)
        except ShimError:
            continue  # a stale socket of a shim that is gone
        a = state.annotations
        if a.get(CRI_CONTAINER_TYPE) == "sandbox":
            continue
        found.append(f"{a.get(CRI_POD_NAMESPACE, '?')}/{a.get(CRI_POD_NAME, '?')}/"
                     f"{a.get(CRI_CONTAINER_NAME, cid[:12])} ({state.state.value})")
    return sorted(found)


def uninstall(paths: Paths, *, force: bool = False, proc: Path = Path("/proc")) -> Report:
    live = live_shim_containers(paths)
    if live and not force:
        raise NodeInstallError(
            f"{len(live)} container(s) still run under {SHIM_NAME} on this node: {', '.join(live)}; delete those "
            f"pods (or move them off RuntimeClass {paths.handler!r}) first, since a checkpointed one would be "
            "lost; --force uninstalls anyway")
    report = Report()
    _unconfigure_containerd(paths, report)
    for host_path in (paths.shim, paths.criu, paths.shim_config):
        p = paths.local(host_path)
        if p.exists():
            p.unlink()
            report.changes.append(f"removed {host_path}")
    lib = paths.local(paths.criu_lib)
    if lib.exists():
        shutil.rmtree(lib)
        report.changes.append(f"removed {paths.criu_lib}")
    # The prefix's own directories go too when nothing else is in them.
    for host_path in (f"{paths.prefix}/lib", f"{paths.prefix}/bin"):
        p = paths.local(host_path)
        if p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    _remove_network_lock_skip(paths, report)
    # Asked on every run, not only the one that edited the file: a second run (a retried init
    # container) must still say so while containerd runs on the config with the runtime in it.
    restart_needed(paths, report, proc, effect="to be gone")
    return report
