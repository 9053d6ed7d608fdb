"""The ``echonode`` command line: the parser and the dispatch; each command lives in its own module.

Errors a user can cause (bad config, unknown destination, bad path) end with
a one-line message on stderr and exit status 2, never a traceback.

``infer`` runs networks in this process: its module (which imports torch) is
imported only when it runs, so that every other command, and the node that
``serve`` starts, stays free of torch (tests/system/test_layering.py).
``demo`` runs its networks in other processes (the node's worker,
``echonode infer``, ``python -m train``) and is imported with the others.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from typing import Any

from echonode import __version__
from echonode.commands import agreement, echo, maintenance, serve, status
from echonode.commands.common import (
    EXIT_FAILURE,
    EXIT_JOURNAL_LOST,
    fail,
    journal_named,
)
from echonode.commands.demo import run_demo
from echonode.config import ConfigError
from echonode.studies.rebuild import JournalLost

__all__ = ["build_parser", "main"]


def cmd_infer(args: argparse.Namespace) -> int:
    """``echonode infer`` (imports torch when it runs)."""
    # Late: infer imports torch, which the node process and the other commands must not load.
    from echonode.commands.infer import run_infer

    return run_infer(args)


def cmd_demo(args: argparse.Namespace) -> int:
    """``echonode demo`` (its networks run in child processes)."""
    return run_demo(args)


def _register_network_commands(sub: Any) -> None:
    s = sub.add_parser("infer", help="run the pipeline offline on DICOM files or folders")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--models", required=True, metavar="DIR", help="folder of model bundles")
    s.add_argument("--json", action="store_true", help="one JSON document on stdout")
    s.add_argument("--sr-out", metavar="DIR", help="write the SR each study would get")
    s.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: the config's)")
    s.set_defaults(func=cmd_infer)

    s = sub.add_parser(
        "demo",
        help="the whole loop on embedded defaults: receive an echo study, classify it, send back the SR, show it",
    )
    s.add_argument("--workdir", default=None, help="where the demo keeps its node, models and PACS (default: a temp dir)")
    s.add_argument("--models", default=None, help="use these bundles instead of the demo model")
    s.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``echonode`` parser with every sub-command."""
    p = argparse.ArgumentParser(prog="echonode", description="A DICOM node for echocardiography AI.")
    p.add_argument("--version", action="version", version=f"echonode {__version__}")
    p.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="config file (default: $ECHONODE_CONFIG, then /etc/echonode/echonode.toml)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.register(sub)
    status.register(sub)
    echo.register(sub)
    _register_network_commands(sub)
    maintenance.register(sub)
    agreement.register(sub)
    # --config after the sub-command too (CONTRACT.md); SUPPRESS keeps one given before it.
    for command in sub.choices.values():
        command.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                             help="config file (as before the command)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``echonode`` and ``python -m echonode``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        return fail(f"configuration error: {exc}")
    except JournalLost as exc:
        return fail(str(exc), EXIT_JOURNAL_LOST)
    except sqlite3.Error as exc:
        return fail(f"journal error: {exc}{journal_named(args)}", EXIT_FAILURE)
    except OSError as exc:
        # A busy port, an unwritable storage_dir: say what and where, no traceback.
        where = f": {exc.filename}" if exc.filename else ""
        return fail(f"{exc.strerror or exc}{where}", EXIT_FAILURE)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
