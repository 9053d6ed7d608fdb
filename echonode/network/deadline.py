"""A hard deadline on an outgoing association (or HTTP request), enforced from outside it.

pynetdicom's own timeouts (ACSE, DIMSE, network) are kept by the thread
that waits for an answer. When one fires, that thread aborts the association
and then waits for the association's reader thread to come back to idle. The
reader thread, once it has read a PDU header, waits for the declared length
with a blocking ``recv`` on a socket that has no timeout (pynetdicom sets the
requestor's socket back to blocking once connected). A peer that stops in
the middle of a PDU, or a link that dies without FIN or RST, therefore holds
both threads for ever, whatever the timeouts say.

:class:`AssociationDeadline` shuts the association's socket down from a
timer thread when the deadline passes. The blocked ``recv`` returns short,
pynetdicom takes that as the transport closing (Evt17), the state machine
goes back to idle and the waiting thread returns with the association
aborted. The same cut serves a stopping node (``reason="stop"``).

An HTTP request (a STOW-RS destination, :mod:`echonode.delivery.stow`) has the same
weakness: a socket timeout bounds each read, not the answer, so a server
that trickles a byte at a time holds the request for ever. Its socket is
watched the same way, and the cut ends whatever read or write waits on it.

Nothing here depends on the peer's answer: the timer needs no read to end,
so it holds even where a read itself has no deadline.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType
from typing import Any, Self

#: What cut an association: its deadline passed, or the node is stopping.
DEADLINE = "deadline"
STOP = "stop"


def _raw_socket(target: Any) -> socket.socket | None:
    """The socket to shut: ``target`` itself when it is one, an association's while it is open, else None."""
    if isinstance(target, socket.socket):
        return target
    transport = getattr(getattr(target, "dul", None), "socket", None)
    sock = getattr(transport, "socket", None)
    return sock if isinstance(sock, socket.socket) else None


class AssociationDeadline:
    """Cut the watched associations when ``seconds`` have passed since :meth:`start`.

    Parameters
    ----------
    seconds : float
        The limit for everything the attempt does on the network.

    Notes
    -----
    Use as a context manager (``with AssociationDeadline(30) as d:``), or
    call :meth:`start` and :meth:`cancel`. :meth:`watch` takes an
    association as soon as its connection opens (pynetdicom's
    ``EVT_CONN_OPEN``); connecting itself is bounded by the connection
    timeout. :meth:`watch` also takes a plain socket (an HTTP request's,
    as soon as it is connected, and again once wrapped in TLS).
    :meth:`cut` may be called from any thread, at any time, more than once.
    """

    def __init__(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError(f'Argument "seconds" must be positive, not {seconds!r}.')
        self.seconds = float(seconds)
        #: Why the associations were cut (``deadline`` or ``stop``), or None.
        self.reason: str | None = None
        self.started: float | None = None
        self._lock = threading.Lock()
        self._assocs: list[Any] = []
        self._timer: threading.Timer | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()

    @property
    def expired(self) -> bool:
        """True once the deadline (not a stop) has cut the attempt."""
        return self.reason == DEADLINE

    def remaining(self) -> float:
        """Seconds left before the cut: the whole limit before :meth:`start`, 0 once cut."""
        if self.reason is not None:
            return 0.0
        if self.started is None:
            return self.seconds
        return max(0.0, self.seconds - (time.monotonic() - self.started))

    def start(self) -> None:
        """Start the clock (once)."""
        with self._lock:
            if self._timer is not None:
                return
            self.started = time.monotonic()
            self._timer = threading.Timer(self.seconds, self.cut, kwargs={"reason": DEADLINE})
            self._timer.name = "echonode-association-deadline"
            self._timer.daemon = True
            self._timer.start()

    def cancel(self) -> None:
        """Stop the clock; the attempt is over. Waits for the timer thread to end."""
        with self._lock:
            timer, self._timer = self._timer, None
            self._assocs.clear()
        if timer is not None:
            timer.cancel()
            if timer is not threading.current_thread():
                timer.join()

    def watch(self, assoc: Any) -> None:
        """Cut ``assoc`` (an association or a socket) with the others; at once when the deadline has already passed."""
        with self._lock:
            self._assocs.append(assoc)
            late = self.reason is not None
        if late:
            self._shut(assoc)

    def cut(self, reason: str = DEADLINE) -> None:
        """Shut down every watched association's socket, so that no read on it can go on waiting."""
        with self._lock:
            if self.reason is None:
                self.reason = reason
            assocs = list(self._assocs)
        for assoc in assocs:
            self._shut(assoc)

    @staticmethod
    def _shut(assoc: Any) -> None:
        sock = _raw_socket(assoc)
        if sock is None:
            return
        # The plain socket's shutdown, also for a TLS socket: ssl's own would
        # drop its SSL object under the thread reading from it. OSError:
        # already closed, nothing left to wait on.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
