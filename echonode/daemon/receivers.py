"""Receiver processes beside the node's own SCP (``[node] receivers = N``).

One Python process receives with one interpreter: with many carts sending at
once, parsing PDUs and writing objects is bound to one core. With N > 1 the
node's own SCP and N - 1 receiver processes listen on the same port with
SO_REUSEPORT, and the kernel spreads new connections between them. Each
receiver is a :class:`~echonode.receive.scp.StorageSCP` over the same store
and journal, with every guarantee of the node's own: the object is fsynced
and recorded (a SQLite transaction: the journal serialises the processes)
before its C-STORE is acknowledged, and a study's files and rows change under
a lock that holds across processes (:mod:`echonode.studies.locks`).

A receiver imports no torch. The node starts, restarts (with a backoff) and
stops them as it does the inference workers, with the same stop pipe
(:mod:`echonode.daemon.workerlink`). A receiver that dies is restarted; the
associations it held were never acknowledged past their last C-STORE (the
carts send the rest again), the journal ends those it had open (its token),
and its partial spool files are deleted at the next start.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import sys
import time
import uuid
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

import structlog
from pydicom import config as pydicom_config

from echonode.config import Config
from echonode.daemon.workerlink import StopListener
from echonode.ops.logs import configure_logging, get_logger, silence_data_warnings
from echonode.receive.scp import ReceiveCounters, StorageSCP
from echonode.studies.journal import Journal
from echonode.studies.store import StudyStore

__all__ = ["ReceiverPool", "counters_file", "receiver_main"]

log = get_logger(__name__)

#: Seconds a stopping receiver gives its associations to finish (as the node's own SCP).
STOP_GRACE_S = 30.0


def receiver_main(cfg: Config, stop_conn: Connection, index: int, run_token: str, log_path: str | None) -> None:
    """The receiver process: listen on ``node.port`` beside the others until asked to stop.

    Parameters
    ----------
    cfg : Config
    stop_conn : multiprocessing.connection.Connection
        The read end of its stop pipe; closed by the node (or its death) to stop it.
    index : int
        Its number among the receivers (1 ... N-1; the node's own SCP is 0).
    run_token : str
        The first part of its association keys in the journal.
    log_path : str, optional
        Logs go to stderr or, when given, are appended to that file.
    """
    stop = StopListener(stop_conn)
    stream = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115 - lives as long as the process
    configure_logging(cfg.logging.format, cfg.logging.level, stream=stream)
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    silence_data_warnings()
    structlog.contextvars.bind_contextvars(receiver=index)
    journal = Journal(cfg.journal_path)
    scp = StorageSCP(cfg.node, StudyStore(cfg.storage_dir, journal), reuse_port=True, run_token=run_token,
                     receiver=index)
    scp.start()
    log.info("receiver.started", pid=os.getpid())
    parent = mp.parent_process()
    counts = cfg.storage_dir / counters_file(index)
    while not stop.wait(1.0):
        write_counters(counts, scp.counters.to_dict())
        if parent is not None and not parent.is_alive():
            log.warning("receiver.orphaned_exit")
            break
    scp.stop(grace_s=STOP_GRACE_S)
    write_counters(counts, scp.counters.to_dict())
    log.info("receiver.stopped", reason=stop.reason or "orphaned")


def counters_file(index: int) -> str:
    """Where receiver ``index`` leaves its receive counts for the node's metrics (every second)."""
    return f"receiver-{index}-counters.json"


def write_counters(path: Path, counts: dict[str, Any]) -> None:
    """Replace ``path`` with ``counts`` (temp file and rename: a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".part")
    try:
        tmp.write_text(json.dumps(counts))
        os.replace(tmp, path)
    except OSError:
        pass  # a full disk: the metrics lag, receiving goes on


def read_counters(path: Path) -> dict[str, Any]:
    """What :func:`write_counters` left, or nothing."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _run_receiver(cfg: Config, stop_conn: Connection, index: int, run_token: str, log_path: str | None) -> None:
    code = 0
    try:
        receiver_main(cfg, stop_conn, index, run_token, log_path)
    except BaseException:
        log.exception("receiver.crashed")
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(code)


class _Receiver:
    """One receiver process and what the node knows of it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: SpawnProcess | None = None
        self.token = ""
        self.writer: Connection | None = None
        self.restarts = 0
        self.next_start = 0.0
        self.restart_requested = False

    def ask_to_stop(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class ReceiverPool:
    """The ``node.receivers - 1`` receiver processes beside the node's own SCP.

    Called from the node's main loop only, like
    :class:`~echonode.daemon.supervisor.WorkerPool`.

    Parameters
    ----------
    cfg : Config
    log_path : str, optional
        File the receivers append their logs to (default: stderr).
    """

    def __init__(self, cfg: Config, log_path: str | None = None) -> None:
        self.cfg = cfg
        self.log_path = log_path
        self._ctx = mp.get_context("spawn")
        self.receivers = [_Receiver(i) for i in range(1, cfg.node.receivers)]
        self._journal: Journal | None = None
        #: Receive counts of receiver processes that have ended (their files are gone).
        self._ended_counts: dict[str, Any] = {}
        for r in self.receivers:
            # A previous node's: counters start at zero with the node.
            self._counts_path(r).unlink(missing_ok=True)

    def _counts_path(self, r: _Receiver) -> Path:
        return self.cfg.storage_dir / counters_file(r.index)

    def _collect_counts(self, r: _Receiver) -> None:
        """Keep an ended receiver's last counts (its successor starts from zero)."""
        total = ReceiveCounters()
        total.add(self._ended_counts)
        total.add(read_counters(self._counts_path(r)))
        self._ended_counts = total.to_dict()
        self._counts_path(r).unlink(missing_ok=True)

    def counts(self) -> list[dict[str, Any]]:
        """Receive counts of every receiver process since the node started (each as ``ReceiveCounters.to_dict``;
        a process's last second before a kill -9 may be missing)."""
        return [self._ended_counts] + [read_counters(self._counts_path(r)) for r in self.receivers
                                       if r.process is not None]

    @property
    def restarts(self) -> int:
        """Receiver deaths restarted from."""
        return sum(r.restarts for r in self.receivers)

    def alive(self) -> int:
        """Receiver processes alive."""
        return sum(1 for r in self.receivers if r.process is not None and r.process.is_alive())

    def _open_journal(self) -> Journal:
        if self._journal is None:
            self._journal = Journal(self.cfg.journal_path)
        return self._journal

    def _start(self, r: _Receiver) -> None:
        reader, writer = self._ctx.Pipe(duplex=False)
        token = uuid.uuid4().hex[:12]
        process = self._ctx.Process(target=_run_receiver, args=(self.cfg, reader, r.index, token, self.log_path),
                                    name=f"echonode-receiver-{r.index}")
        try:
            process.start()
        except BaseException:
            writer.close()
            raise
        finally:
            reader.close()
        r.process, r.writer, r.token = process, writer, token
        log.info("receiver.spawned", receiver=r.index, pid=process.pid)

    def _ended(self, r: _Receiver) -> None:
        """A receiver exited: what it left open in the journal was cut."""
        code = r.process.exitcode if r.process is not None else None
        r.ask_to_stop()
        r.process = None
        self._collect_counts(r)
        ended = self._open_journal().end_open_associations(run_token=r.token)
        if r.restart_requested and code == 0:
            r.restart_requested = False
            r.next_start = 0.0
            return
        r.restart_requested = False
        r.restarts += 1
        log.error("receiver.died", receiver=r.index, exitcode=code, restarts=r.restarts, associations_cut=ended)

    def supervise(self) -> None:
        """Start the receivers, restart a dead one (1, 2, 4 ... 60 s apart when it keeps dying)."""
        error: Exception | None = None
        now = time.monotonic()
        for r in self.receivers:
            try:
                if r.process is not None:
                    if r.process.is_alive():
                        continue
                    self._ended(r)
                if now >= r.next_start:
                    r.next_start = now + min(60.0, 2.0 ** min(r.restarts, 6))
                    self._start(r)
            except Exception as exc:  # noqa: BLE001 - the others still get their turn
                error = error or exc
        if error is not None:
            raise error

    def apply_config(self, cfg: Config) -> None:
        """New settings (allow-lists, disk guard): each receiver lets its associations finish and
        restarts with them; the others, and the node's own SCP, go on listening meanwhile.
        The number of receivers changes at a restart of the node."""
        self.cfg = cfg
        for r in self.receivers:
            if r.process is not None:
                r.restart_requested = True
                r.ask_to_stop()

    def ask_to_stop(self) -> None:
        """Ask every receiver to stop, without waiting (each lets its associations finish)."""
        for r in self.receivers:
            r.ask_to_stop()

    def stop(self, grace_s: float = STOP_GRACE_S + 5.0) -> None:
        """Ask every receiver to stop (each lets its associations finish); kill those left after ``grace_s``."""
        self.ask_to_stop()
        deadline = time.monotonic() + grace_s
        for r in self.receivers:
            if r.process is None:
                continue
            r.process.join(max(0.0, deadline - time.monotonic()))
            if r.process.is_alive():
                log.warning("receiver.killed_on_stop", receiver=r.index)
                r.process.kill()
                r.process.join(5)
            r.process = None
            self._collect_counts(r)
            self._open_journal().end_open_associations(run_token=r.token)
        if self._journal is not None:
            self._journal.close()
            self._journal = None
