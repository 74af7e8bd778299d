"""`zeroproxy node install|uninstall` on a node's files (scaletozero/nodeinstall.py).

The files are a temporary host root; the shim and CRIU are the real builds (scripts/build-shim.sh,
scripts/build-criu.sh), and the installed CRIU is run. What a running containerd makes of the
result is tested with a real containerd in tests/test_shim.py and on the kubeadm cluster in
tests/test_cluster.py.
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from scaletozero import nodeinstall as ni
from testbed.bed import built
from zeroproxy.cli import main

OPERATORS_CONFIG = """\
# the operator's containerd config: comments and layout must survive
version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.9"  # pinned
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = true
"""


@pytest.fixture(scope="module")
def builds() -> tuple[Path, Path]:
    shim, criu = built("build-shim.sh"), built("build-criu.sh")
    assert shim is not None and criu is not None
    return shim, criu


def _host(tmp_path: Path, config: str | None = OPERATORS_CONFIG) -> ni.Paths:
    paths = ni.Paths(host_root=tmp_path / "host")
    if config is not None:
        cfg = paths.local(paths.containerd_config)
        cfg.parent.mkdir(parents=True)
        cfg.write_text(config)
    return paths


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_install_then_again_then_uninstall(tmp_path: Path, builds: tuple[Path, Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    shim, criu = builds
    paths = _host(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["node", "install", "--host-root", str(paths.host_root), "--shim", str(shim), "--criu", str(criu)])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert ("added runtime 'zeroproxy' (/opt/zeroproxy/bin/containerd-shim-zeroproxy-v2) to "
            "/etc/containerd/config.toml") in out
    # No containerd reads this file: nothing to restart, and the output says why.
    assert out.splitlines()[-1].endswith("no running containerd reads /etc/containerd/config.toml; "
                                         "it loads the change when it starts"), out

    text = paths.local(paths.containerd_config).read_text()
    assert text.startswith(OPERATORS_CONFIG), "the operator's text changed"
    cri = tomllib.loads(text)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    # The shim by its absolute path: containerd 1.6.20 drops runtime_path (nodeinstall.runtime_table).
    assert cri["runtimes"]["zeroproxy"] == {
        "runtime_type": "/opt/zeroproxy/bin/containerd-shim-zeroproxy-v2",
        "pod_annotations": ["org.criu.config"],
        "options": {"ConfigPath": "/opt/zeroproxy/shim.toml"}}
    assert cri["runtimes"]["runc"] == {"runtime_type": "io.containerd.runc.v2", "options": {"SystemdCgroup": True}}
    # The shim uses the same cgroup driver as the default runtime, so the kubelet's fits both.
    assert tomllib.loads(paths.local(paths.shim_config).read_text()) == {
        "CriuPath": "/opt/zeroproxy/bin/criu", "SystemdCgroup": True}
    assert paths.local(paths.criu_config).read_text().splitlines()[-1] == "network-lock skip"
    assert paths.local(paths.shim).read_bytes() == shim.read_bytes()

    # The installed CRIU runs with its own loader and libraries: point its wrapper at where the
    # host root is here and ask it for its version and whether the kernel supports it.
    wrapper = paths.local(paths.criu).read_text()
    local_wrapper = tmp_path / "criu"
    local_wrapper.write_text(wrapper.replace(paths.criu_lib, str(paths.local(paths.criu_lib))))
    local_wrapper.chmod(0o755)
    version = subprocess.run([str(local_wrapper), "--version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("Version: 4.2.1"), version
    assert subprocess.run(["ldd", str(criu)], capture_output=True, text=True, check=True).stdout.count("=>") + 2 \
        == len(list(paths.local(paths.criu_lib).iterdir()))  # CRIU, its loader, each library

    before = {p: p.stat().st_mtime_ns for p in paths.host_root.rglob("*") if p.is_file()}
    report = ni.install(paths, shim=shim, criu=criu)
    assert report.lines() == ["nothing to change", "containerd: no restart needed"]
    assert {p: p.stat().st_mtime_ns for p in paths.host_root.rglob("*") if p.is_file()} == before

    report = ni.uninstall(paths)
    assert "removed runtime 'zeroproxy' from /etc/containerd/config.toml" in report.changes
    assert paths.local(paths.containerd_config).read_text() == OPERATORS_CONFIG
    # Only the operator's file is left (CRIU's config had nothing else, so it is gone too).
    assert _files(paths.host_root) == {"etc/containerd/config.toml"}
    assert ni.uninstall(paths).lines() == ["nothing to change", "containerd: no restart needed"]


def test_version_3_config_and_an_existing_criu_config(tmp_path: Path, builds: tuple[Path, Path]) -> None:
    shim, criu = builds
    paths = _host(tmp_path, 'version = 3\n[plugins."io.containerd.cri.v1.runtime".containerd]\n'
                            '  default_runtime_name = "runc"\n')
    criu_conf = paths.local(paths.criu_config)
    criu_conf.parent.mkdir(parents=True)
    criu_conf.write_text("tcp-established\n")
    ni.install(paths, shim=shim, criu=criu)
    doc = tomllib.loads(paths.local(paths.containerd_config).read_text())
    assert doc["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["zeroproxy"]["runtime_type"] \
        == "/opt/zeroproxy/bin/containerd-shim-zeroproxy-v2"
    assert "SystemdCgroup" not in paths.local(paths.shim_config).read_text()
    assert criu_conf.read_text().splitlines()[0] == "tcp-established"
    ni.uninstall(paths)
    assert criu_conf.read_text() == "tcp-established\n"


@pytest.mark.parametrize(("config", "criu_conf", "message"), [
    (None, None, r"containerd config /etc/containerd/config.toml: no such file on this node; write "
                 r"containerd's defaults first \(`containerd config default > /etc/containerd/config.toml`\)"),
    ('[plugins.cri]\nsandbox_image = "x"\n', None,
     r"containerd config /etc/containerd/config.toml: version = 1 is not supported"),
    ("version = 2\n[plugins\n", None, r"containerd config /etc/containerd/config.toml: not valid TOML: .*line 2"),
    ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.zeroproxy]\n'
     'runtime_type = "io.containerd.kata.v2"\n', None,
     r"runtime 'zeroproxy' already exists with runtime_type = 'io.containerd.kata.v2', not zeroproxy's"),
    ('version = 2\n[plugins."io.containerd.grpc.v1.cri"]\ncontainerd = "runc"\n', None,
     r"plugins.io.containerd.grpc.v1.cri.containerd is a String, not a table"),
    (OPERATORS_CONFIG, "tcp-established\nnetwork-lock iptables\n",
     r"/etc/criu/runc.conf line 2: 'network-lock iptables': runc's checkpoints would lock the pod's network "
     r"with netfilter rules"),
])
def test_bad_node_files_are_refused_and_nothing_is_written(tmp_path: Path, builds: tuple[Path, Path],
                                                           config: str | None, criu_conf: str | None,
                                                           message: str) -> None:
    shim, criu = builds
    paths = _host(tmp_path, config)
    if criu_conf is not None:
        conf = paths.local(paths.criu_config)
        conf.parent.mkdir(parents=True)
        conf.write_text(criu_conf)
    before = {p: p.read_bytes() for p in paths.host_root.rglob("*") if p.is_file()}
    with pytest.raises(ni.NodeInstallError, match=message):
        ni.install(paths, shim=shim, criu=criu)
    assert {p: p.read_bytes() for p in paths.host_root.rglob("*") if p.is_file()} == before


def test_cli_names_a_bad_flag_and_a_missing_binary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _host(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["node", "install", "--host-root", str(paths.host_root), "--prefix", "opt/zp"])
    assert done.value.code == 1
    assert "zeroproxy node install: --prefix 'opt/zp': must be an absolute path on the host" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["node", "install", "--host-root", str(paths.host_root), "--shim", str(tmp_path / "nope")])
    assert done.value.code == 1
    assert f"the shim to install, {tmp_path / 'nope'}, is not an executable file in this image" \
        in capsys.readouterr().err


def test_uninstall_restores_a_config_whose_runtimes_come_before_other_tables(tmp_path: Path,
                                                                             builds: tuple[Path, Path]) -> None:
    """The runtime goes in as one marked block at the end, whatever follows the runtimes in the
    operator's file; uninstall cuts exactly that block. An install by an older zeroproxy (the
    runtime's name as its type) is replaced, not refused."""
    shim, criu = builds
    config = OPERATORS_CONFIG + '  [plugins."io.containerd.grpc.v1.cri".cni]\n    bin_dir = "/usr/lib/cni"\n'
    paths = _host(tmp_path, config)
    ni.install(paths, shim=shim, criu=criu)
    text = paths.local(paths.containerd_config).read_text()
    assert text.startswith(config) and text.endswith("# <<< zeroproxy node install: zeroproxy\n"), text
    assert tomllib.loads(text)["plugins"]["io.containerd.grpc.v1.cri"]["cni"] == {"bin_dir": "/usr/lib/cni"}
    ni.uninstall(paths)
    assert paths.local(paths.containerd_config).read_text() == config

    older = config + ('[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.zeroproxy]\n'
                      'runtime_type = "io.containerd.zeroproxy.v2"\n')
    paths.local(paths.containerd_config).write_text(older)
    report = ni.install(paths, shim=shim, criu=criu)
    assert report.config_changed
    doc = tomllib.loads(paths.local(paths.containerd_config).read_text())
    assert doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["zeroproxy"] == ni.runtime_table(paths)
    ni.uninstall(paths)
    assert paths.local(paths.containerd_config).read_text() == config


def test_cli_refuses_a_handler_that_is_no_runtimeclass_handler(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    paths = _host(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["node", "install", "--host-root", str(paths.host_root), "--handler", "Zero.Proxy"])
    assert done.value.code == 1
    assert "zeroproxy node install: --handler 'Zero.Proxy': a RuntimeClass handler is a DNS label" \
        in capsys.readouterr().err
    assert _files(paths.host_root) == {"etc/containerd/config.toml"}
