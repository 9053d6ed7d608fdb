"""``echonode echo``: is a destination there? C-ECHO, or a QIDO-RS query for a STOW-RS one."""

from __future__ import annotations

import argparse
import time
from typing import Any

from echonode.commands.common import EXIT_FAILURE, EXIT_OK, fail, load
from echonode.config import Destination
from echonode.delivery.dimse import Peer, echo
from echonode.delivery.outcome import DeliveryError
from echonode.delivery.stow import check

__all__ = ["cmd_echo", "register"]


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a destination (a STOW-RS one gets a QIDO-RS query) and say how long it took."""
    cfg = load(args)
    stow_dest = next((d for d in cfg.destinations if d.name == args.dest and d.kind == "stow"), None)
    if stow_dest is not None:
        return _check_stow(stow_dest, args.timeout)
    try:
        peer = Peer.parse(args.dest, cfg)
    except ValueError as exc:
        return fail(str(exc))
    t0 = time.monotonic()
    try:
        status = echo(cfg.node.ae_title, peer, timeout_s=args.timeout)
    except DeliveryError as exc:
        return fail(f"C-ECHO to {peer.ae_title}@{peer.host}:{peer.port} failed: {exc}", EXIT_FAILURE)
    ms = (time.monotonic() - t0) * 1000
    if status != 0:
        return fail(f"C-ECHO to {peer.ae_title}@{peer.host}:{peer.port}: status 0x{status:04X}", EXIT_FAILURE)
    print(f"C-ECHO {peer.ae_title}@{peer.host}:{peer.port}: success ({ms:.0f} ms)")
    return EXIT_OK


def _check_stow(dest: Destination, timeout_s: float) -> int:
    """``echonode echo`` for a STOW-RS destination: a QIDO-RS query with its auth, under the same deadline."""
    t0 = time.monotonic()
    try:
        line = check(dest, timeout_s=timeout_s)
    except DeliveryError as exc:
        return fail(f"QIDO-RS to {dest.url} failed: {exc}", EXIT_FAILURE)
    ms = (time.monotonic() - t0) * 1000
    print(f"QIDO-RS {dest.url}/studies: success ({line}, {ms:.0f} ms)")
    return EXIT_OK


def register(sub: Any) -> None:
    """Add ``echo`` to the sub-command parsers ``sub``."""
    s = sub.add_parser("echo", help="C-ECHO a destination (name or AET@HOST:PORT); a STOW-RS one gets a QIDO-RS query")
    s.add_argument("dest")
    s.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    s.set_defaults(func=cmd_echo)
