"""`zeroproxy ct`: the TC path's conntrack and SNAT entries, read from the agent's pinned maps.

The reading is dataplane.conntrack's (no bcc, no agent needed: it works while the agent runs or
after it died); this module is only the command line around it, so the dataplane carries no
argparse. Also runs standalone: `python -m zeroproxy.ct_cli --json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from controlplane.config import DEFAULT_BPFFS

EXAMPLE = "example: zeroproxy ct --bpffs /sys/fs/bpf/zeroproxy --json"


def _arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--bpffs", "--bpffs-dir", dest="bpffs_dir", type=Path, default=DEFAULT_BPFFS,
                        help=f"the agent's pin directory (default: {DEFAULT_BPFFS})")
    parser.add_argument("--json", action="store_true", help="one JSON object with flows and snat entries")
    parser.set_defaults(func=cmd_ct)
    return parser


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Hook `ct` into the zeroproxy command line (``sub`` is its subparsers object)."""
    return _arguments(sub.add_parser("ct", help="NodePort conntrack and SNAT entries, read from the pinned maps",
                                     epilog=EXAMPLE))


def cmd_ct(args: argparse.Namespace) -> int:
    from dataplane.conntrack import format_flows, read_flows, read_reverse

    flows = read_flows(args.bpffs_dir)
    if args.json:
        print(json.dumps({"flows": [asdict(f) for f in flows],
                          "snat": [asdict(e) for e in read_reverse(args.bpffs_dir)]}, indent=1))
    else:
        print(format_flows(flows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _arguments(argparse.ArgumentParser(
        prog="python -m zeroproxy.ct_cli",
        description="Show the NodePort conntrack and SNAT entries of a zeroproxy agent.",
        epilog=EXAMPLE,
    ))
    return cmd_ct(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
