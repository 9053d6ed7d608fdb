"""What every ``echonode`` sub-command shares: exit statuses, the error line, the config."""

from __future__ import annotations

import argparse
import sys

from echonode.config import Config, ConfigError, load_config

__all__ = [
    "EXIT_FAILURE",
    "EXIT_JOURNAL_LOST",
    "EXIT_OK",
    "EXIT_USAGE",
    "fail",
    "journal_named",
    "load",
    "non_negative_int",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
#: The journal is lost while storage holds studies: a person must act
#: (``echonode recover-journal``); systemd does not restart on it
#: (``RestartPreventExitStatus=3`` in systemd/echonode.service).
EXIT_JOURNAL_LOST = 3


def fail(message: str, code: int = EXIT_USAGE) -> int:
    """Print ``echonode: message`` on stderr and return ``code`` (the exit status)."""
    print(f"echonode: {message}", file=sys.stderr)
    return code


def load(args: argparse.Namespace) -> Config:
    """The configuration the command line names (``--config``, before or after the command)."""
    return load_config(args.config)


def journal_named(args: argparse.Namespace) -> str:
    """``": PATH"`` of the journal a command's config names, for an error message; "" when unknown."""
    try:
        return f": {load(args).journal_path}"
    except (AttributeError, ConfigError, OSError):
        return ""


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (anything else: a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text}")
    return value
