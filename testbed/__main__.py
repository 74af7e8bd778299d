"""python -m testbed: the commands that build things on this machine for trying and testing zeroproxy.

``./zp demo``, ``./zp cluster ...`` and ``./zp e2e ...`` land here. They are not part of the
product: the agent and its CLI (package ``zeroproxy``) never import the test bed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

EPILOG = """\
examples:
  python -m testbed demo                  # a sandbox on this machine: pods, services, traffic
  python -m testbed cluster up --nodes 2  # a kubeadm cluster on this machine, zeroproxy deployed
  python -m testbed e2e --proxy zeroproxy # Kubernetes' e2e Services specs on such a cluster
"""


def cmd_demo(args: argparse.Namespace) -> int:
    from testbed.demo import run_demo

    return run_demo(requests=args.requests, keep_going=args.keep)


def build_parser() -> argparse.ArgumentParser:
    from testbed.cluster_cli import add_parser as add_cluster_parser
    from testbed.e2e import add_parser as add_e2e_parser

    p = argparse.ArgumentParser(prog="python -m testbed", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", default=os.environ.get("ZP_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="build a sandbox on this machine, run the agent, send traffic, clean up")
    d.add_argument("--requests", type=int, default=30, help="requests per service (default %(default)s)")
    d.add_argument("--keep", action="store_true", help="keep the sandbox until Enter is pressed")
    d.set_defaults(func=cmd_demo)
    add_cluster_parser(sub)
    add_e2e_parser(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(args.func(args))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
