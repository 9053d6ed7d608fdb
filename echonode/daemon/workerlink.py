"""How the node and its inference worker talk, with nothing a dead process can hold.

The worker may die at any instant: the kernel's OOM killer, ``kill -9``, the
supervisor's own timeout kill, a decoder that segfaults. Whatever the two
processes share must stay usable after one of them vanished in the middle of
an operation. A :mod:`multiprocessing` ``Event`` does not: a process killed
inside ``Event.wait`` leaves the condition's sleeper count raised, and the
next ``Event.set`` waits for that sleeper for ever. So:

- **stop** (node -> worker): a pipe per worker process. The worker holds the
  read end and watches it; the node asks it to stop by closing the write end,
  which never blocks, whether the worker is alive, frozen or dead. The worker
  also sees the pipe end when the node itself dies. SIGTERM and SIGINT (a
  process group signalled by systemd, supervisord or a terminal) count as the
  same request.
- **heartbeat** (worker -> node): a small file in the storage folder that a
  thread of the worker overwrites in place every second with its pid, what it
  is doing and since when. Readers take no lock; a record of an earlier worker
  is told apart by its pid. Overwriting the same bytes needs no new disk
  block, so the heartbeat goes on when the disk is full. The beat comes from a
  thread: it stops when the process is stopped (SIGSTOP), frozen or gone, not
  when one study is slow (``models.study_timeout_s`` judges that).

Times in the record are ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for
every process of the machine), so a wall-clock step never makes a worker look
hung.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from types import FrameType

from echonode.ops.logs import get_logger

log = get_logger(__name__)

#: The heartbeat file, beside the journal in the storage folder (the first
#: worker's; see :func:`heartbeat_file`).
HEARTBEAT_FILE = "worker-heartbeat.json"


def heartbeat_file(index: int) -> str:
    """The heartbeat file of worker ``index`` (``[models] workers``): the first keeps :data:`HEARTBEAT_FILE`."""
    return HEARTBEAT_FILE if index == 0 else f"worker-{index}-heartbeat.json"

#: Seconds between two beats.
HEARTBEAT_INTERVAL_S = 1.0
#: The record's fixed size: every write overwrites the same bytes.
RECORD_SIZE = 512


class Phase:
    """What the worker is doing, as written in its heartbeat."""

    STARTING = "starting"  # importing torch, opening the journal
    LOADING = "loading"  # loading model bundles
    IDLE = "idle"  # waiting for a queued study
    PROCESSING = "processing"  # a claimed study: decode, infer, SR, journal
    STOPPING = "stopping"  # asked to stop, finishing up


@dataclass(frozen=True)
class Heartbeat:
    """One heartbeat record.

    Attributes
    ----------
    pid : int
        The worker process that wrote it.
    beat : float
        ``time.monotonic()`` of the write.
    phase : str
        A :class:`Phase` value.
    since : float
        ``time.monotonic()`` when the phase began.
    study_uid : str or None
        The study being processed (``processing`` only).
    studies : int
        Studies this worker process has finished.
    """

    pid: int
    beat: float
    phase: str
    since: float
    study_uid: str | None = None
    studies: int = 0

    def age(self, now: float | None = None) -> float:
        """Seconds since the beat."""
        return (time.monotonic() if now is None else now) - self.beat


def read_heartbeat(path: str | os.PathLike[str]) -> Heartbeat | None:
    """The last heartbeat written to ``path``, or None when there is none (yet).

    Parameters
    ----------
    path : path-like
        The heartbeat file.

    Returns
    -------
    Heartbeat or None
        None when the file is missing or unreadable; a read that crossed a
        write (a torn record) is tried once more.
    """
    for _ in range(2):
        try:
            raw = Path(path).read_bytes()
            doc = json.loads(raw.decode("ascii").strip())
            return Heartbeat(
                pid=int(doc["pid"]),
                beat=float(doc["beat"]),
                phase=str(doc["phase"]),
                since=float(doc["since"]),
                study_uid=doc.get("study_uid"),
                studies=int(doc.get("studies", 0)),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
            continue
    return None


class HeartbeatWriter:
    """The worker's side: a thread that writes the record every ``interval_s`` seconds.

    Parameters
    ----------
    path : path-like
        The heartbeat file (created, mode 0600).
    interval_s : float, optional
        Seconds between beats.
    """

    def __init__(self, path: str | os.PathLike[str], interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._phase = Phase.STARTING
        self._since = time.monotonic()
        self._study_uid: str | None = None
        self._studies = 0
        self._write_failed = False
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._thread = threading.Thread(target=self._run, name="echonode-heartbeat", daemon=True)

    def start(self) -> None:
        """Write the first beat and start beating."""
        self._write()
        self._thread.start()

    def phase(self, phase: str, study_uid: str | None = None) -> None:
        """Enter ``phase`` (and write it at once); ``study_uid`` for :attr:`Phase.PROCESSING`."""
        with self._lock:
            if self._phase == Phase.PROCESSING and phase != Phase.PROCESSING:
                self._studies += 1
            if phase != self._phase or study_uid != self._study_uid:
                self._phase, self._since, self._study_uid = phase, time.monotonic(), study_uid
        self._write()

    def stop(self) -> None:
        """Stop beating (the record stays, with the last phase)."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(5)
        os.close(self._fd)

    def _run(self) -> None:
        while not self._done.wait(self.interval_s):
            self._write()

    def _write(self) -> None:
        with self._lock:
            record = json.dumps(
                {
                    "pid": os.getpid(),
                    "beat": time.monotonic(),
                    "phase": self._phase,
                    "since": self._since,
                    "study_uid": self._study_uid,
                    "studies": self._studies,
                    "wall": time.time(),
                },
                separators=(",", ":"),
            ).encode("ascii")
            try:
                # Same offset, same length: the blocks are reused, no new
                # space is needed, and a reader never sees a shorter file.
                os.pwrite(self._fd, record.ljust(RECORD_SIZE)[:RECORD_SIZE], 0)
            except OSError as exc:
                if not self._write_failed:  # once, not every second
                    log.warning("worker.heartbeat_not_written", error=exc.strerror)
                self._write_failed = True
            else:
                self._write_failed = False


class StopListener:
    """The worker's side of "stop": the node closed its pipe, or SIGTERM/SIGINT came.

    Installs the worker's signal handlers, so create it first thing in the
    worker's main thread. SIGHUP is ignored: reloads are the node's business
    (it restarts the worker with the new settings).

    Parameters
    ----------
    conn : multiprocessing.connection.Connection
        The read end of the node's stop pipe.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.reason: str | None = None
        # A signal wakes a wait at once: its handler's byte lands on this pipe.
        self._wake_r, wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.reason is None:
            self.reason = signal.Signals(signum).name

    def is_set(self) -> bool:
        """True once a stop was asked for (never cleared)."""
        if self.reason is None:
            try:
                if self._conn.poll(0):
                    self.reason = "node"
            except (OSError, EOFError):
                self.reason = "node"
        return self.reason is not None

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds or until a stop is asked for; return :meth:`is_set`."""
        if self.is_set():
            return True
        with contextlib.suppress(OSError):
            wait([self._conn, self._wake_r], timeout)
        # Empty the wake-up pipe (non-blocking: BlockingIOError once empty).
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 512):
                pass
        return self.is_set()
