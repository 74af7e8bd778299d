"""`zeroproxy node install|uninstall`: the shim and CRIU on this node, and containerd's runtime entry.

    zeroproxy node install   [--host-root /host] [--prefix /opt/zeroproxy] [--handler zeroproxy]
    zeroproxy node uninstall [--host-root /host] [--force]

What each step does is in scaletozero/nodeinstall.py. The DaemonSet's init container ``install``
runs the first on every node before the agent starts; manifests/uninstall runs the second. The
last line of the output says whether containerd must be restarted (``RESTART REQUIRED: ...``).
Exit status 1, with the reason on stderr, when the node's files do not allow it (a config
zeroproxy cannot edit, a runtime of that name that is not zeroproxy's, pods still on the shim).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from scaletozero import nodeinstall as ni


def _paths(args: argparse.Namespace) -> ni.Paths:
    for name in ("prefix", "containerd_config", "criu_config", "socket_dir"):
        if not getattr(args, name).startswith("/"):
            raise ni.NodeInstallError(f"--{name.replace('_', '-')} {getattr(args, name)!r}: must be an absolute "
                                      "path on the host")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", args.handler):
        raise ni.NodeInstallError(f"--handler {args.handler!r}: a RuntimeClass handler is a DNS label "
                                  "(lower-case letters, digits and '-', at most 63)")
    return ni.Paths(host_root=Path(args.host_root), prefix=args.prefix.rstrip("/") or "/",
                    containerd_config=args.containerd_config, criu_config=args.criu_config,
                    handler=args.handler, socket_dir=args.socket_dir)


def _run(args: argparse.Namespace) -> int:
    try:
        paths = _paths(args)
        if args.node_command == "install":
            report = ni.install(paths, shim=Path(args.shim), criu=Path(args.criu))
        else:
            report = ni.uninstall(paths, force=args.force)
    except ni.NodeInstallError as e:
        print(f"zeroproxy node {args.node_command}: {e}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(f"zeroproxy node {args.node_command}: {line}", flush=True)
    return 0


def add_parser(sub: Any) -> None:
    n = sub.add_parser("node", help="install or remove the scale-to-zero shim on this node",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    nsub = n.add_subparsers(dest="node_command", required=True)
    for verb, text in (("install", "copy the shim and CRIU to the host and add the runtime to containerd"),
                       ("uninstall", "remove what install added")):
        v = nsub.add_parser(verb, help=text)
        v.add_argument("--host-root", default="/host",
                       help="where the host's directories are mounted in this container (default %(default)s)")
        v.add_argument("--prefix", default=ni.DEFAULT_PREFIX, help="host directory for the shim and CRIU")
        v.add_argument("--containerd-config", default=ni.DEFAULT_CONTAINERD_CONFIG,
                       help="containerd's config on the host")
        v.add_argument("--criu-config", default=ni.DEFAULT_CRIU_CONFIG,
                       help="CRIU's config file for runc on the host (network-lock skip)")
        v.add_argument("--handler", default=ni.DEFAULT_HANDLER,
                       help="containerd runtime name, the RuntimeClass's handler (default %(default)s)")
        v.add_argument("--socket-dir", default="/run/zeroproxy/shim", help="the shims' control sockets on the host")
        if verb == "install":
            v.add_argument("--shim", default=ni.IMAGE_SHIM, help="the shim binary to install (in this image)")
            v.add_argument("--criu", default=ni.IMAGE_CRIU, help="the CRIU binary to install (in this image)")
        else:
            v.add_argument("--force", action="store_true",
                           help="uninstall although containers still run under the shim")
        v.set_defaults(func=_run)
