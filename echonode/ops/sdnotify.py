"""systemd's sd_notify protocol, dependency-free.

Does nothing when ``NOTIFY_SOCKET`` is unset (not under systemd, tests).
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; return True when sent.

    Parameters
    ----------
    state : str
        One or more ``KEY=VALUE`` lines: READY=1, STOPPING=1, RELOADING=1,
        STATUS=..., WATCHDOG=1, MONOTONIC_USEC=...
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        # Abstract namespace socket.
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
        return True
    except OSError:
        return False


def watchdog_interval_s() -> float | None:
    """Half of systemd's WatchdogSec for this process, or None when there is no watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None
