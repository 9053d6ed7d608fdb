"""``echonode serve`` and ``echonode check-config``: run the node, check its configuration."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from echonode.commands.common import EXIT_OK, load
from echonode.config import resolve_config_path
from echonode.daemon.node import Node
from echonode.ops.logs import configure_logging

__all__ = ["cmd_check_config", "cmd_serve", "register"]


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the node in the foreground until a signal stops it."""
    cfg = load(args)
    configure_logging(cfg.logging.format, cfg.logging.level)
    return Node(cfg, str(resolve_config_path(args.config))).run_forever()


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config file; say what it configures."""
    cfg = load(args)
    print(f"{cfg.source}: OK ({len(cfg.destinations)} destination(s), AE title {cfg.node.ae_title})")
    if not cfg.destinations:
        print("warning: no [[destinations]]: results are kept in the journal and no SR is sent", file=sys.stderr)
    return EXIT_OK


def register(sub: Any) -> None:
    """Add ``serve`` and ``check-config`` to the sub-command parsers ``sub``."""
    sub.add_parser("serve", help="run the node in the foreground").set_defaults(func=cmd_serve)
    sub.add_parser("check-config", help="validate the config file").set_defaults(func=cmd_check_config)
