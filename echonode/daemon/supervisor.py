"""The node's side of the inference worker: start it, watch it, restart it, stop it.

The worker runs in a process of its own (:mod:`echonode.analyse.worker`), so
that receiving never waits for inference and a worker crash (out of memory,
a decoder segfault) cannot take the SCP down. A worker that dies is
restarted with a backoff and its study goes back to the queue until
``models.max_attempts``; a study that runs past ``models.study_timeout_s``,
or a worker whose heartbeat stops for that long (frozen, stopped), gets its
worker killed the same way. Node and worker share nothing a dead process
can hold (:mod:`echonode.daemon.workerlink`).

The node process never imports the worker's module (it imports torch): the
child imports it (:func:`_run_worker`).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Iterable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from echonode.config import Config
from echonode.daemon.workerlink import (
    HEARTBEAT_FILE,
    Heartbeat,
    HeartbeatWriter,
    StopListener,
    read_heartbeat,
)
from echonode.ops.logs import get_logger
from echonode.studies.journal import Journal
from echonode.studies.store import is_valid_uid

__all__ = ["HUNG_AFTER_MIN_S", "WorkerSupervisor", "remove_unrecorded_reports"]

log = get_logger(__name__)


def _run_worker(cfg: Config, stop_conn: Connection, heartbeat_path: str, log_path: str | None = None) -> None:
    """The child process's target: import the worker (and torch) there, never here.

    The stop listener and the heartbeat start before that import: until the
    listener runs, SIGTERM has its default action (the process dies, which
    the node survives, but a graceful stop is better); and importing torch
    takes seconds on a busy machine, during which a worker that did not beat
    would be taken for hung and killed, again at every start.
    """
    stop = StopListener(stop_conn)
    beat = HeartbeatWriter(heartbeat_path)
    beat.start()
    from echonode.analyse.worker import worker_process

    worker_process(cfg, stop, beat, log_path)


#: A worker is hung after ``models.study_timeout_s`` without a heartbeat, and
#: never sooner than this (a few missed beats, a slow start).
HUNG_AFTER_MIN_S = 5.0


class WorkerSupervisor:
    """Runs :func:`worker_main` in a child process and keeps it alive.

    Called from the node's main loop only (:meth:`supervise`, :meth:`apply_config`,
    :meth:`stop`); none of them waits on anything the worker could hold, so a
    worker killed at any instant never stalls the loop.

    Parameters
    ----------
    cfg : Config
    log_path : str, optional
        File the worker appends its log to (default: stderr).
    """

    def __init__(self, cfg: Config, log_path: str | None = None) -> None:
        self.cfg = cfg
        self.log_path = log_path
        self._ctx = mp.get_context("spawn")
        self.process: Any = None
        #: Worker deaths the supervisor restarted from (crash, kill, timeout, hang).
        self.restarts = 0
        #: ``time.monotonic()`` when the current worker was spawned.
        self.spawned_at = 0.0
        self._stop_writer: Connection | None = None
        self._next_start = 0.0
        self._journal: Journal | None = None
        self._restart_requested = False

    @property
    def heartbeat_path(self) -> Path:
        """The file the worker beats into."""
        return self.cfg.storage_dir / HEARTBEAT_FILE

    def _open_journal(self) -> Journal:
        """The supervisor's journal, opened on first use and kept for every worker it starts.

        ``node.storage_dir`` never changes while the supervisor lives
        (:meth:`apply_config` refuses it), so one handle, and its one
        connection, serves for good.
        """
        if self._journal is None:
            self._journal = Journal(self.cfg.journal_path)
        return self._journal

    def start(self) -> None:
        """Spawn the worker. A study still ``running`` belongs to a worker that
        is gone (only one runs at a time), so it goes back to the queue first,
        and an SR file that worker wrote but never recorded is removed."""
        journal = self._open_journal()
        recovered = journal.recover_running(self.cfg.models.max_attempts)
        if recovered:
            log.warning("worker.recovered_studies", studies={k: str(v) for k, v in recovered.items()})
            remove_unrecorded_reports(self.cfg.storage_dir, journal, recovered)
        reader, writer = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=_run_worker, args=(self.cfg, reader, str(self.heartbeat_path), self.log_path),
            name="echonode-worker",
        )
        try:
            process.start()
        except BaseException:
            writer.close()
            raise
        finally:
            # Only the worker keeps the read end: the pipe ends when the node
            # closes the write end or dies.
            reader.close()
        self.process, self._stop_writer = process, writer
        self.spawned_at = time.monotonic()
        log.info("worker.spawned", pid=process.pid)

    def _ask_to_stop(self) -> None:
        """Close the stop pipe: never blocks, whatever became of the worker."""
        if self._stop_writer is not None:
            self._stop_writer.close()
            self._stop_writer = None

    def heartbeat(self) -> tuple[float | None, Heartbeat | None]:
        """(seconds since the current worker last showed life, its last record).

        The age counts from the spawn until the new worker's first beat;
        ``(None, None)`` when no worker runs.
        """
        if self.process is None:
            return None, None
        hb = read_heartbeat(self.heartbeat_path)
        now = time.monotonic()
        if hb is None or hb.pid != self.process.pid:
            return now - self.spawned_at, None
        return hb.age(now), hb

    def apply_config(self, cfg: Config) -> None:
        """New settings: ask the worker to finish its study and exit; :meth:`supervise`
        starts the next one with ``cfg``. Returns at once, so the node's main
        loop (signals, watchdog) never waits for a study to finish, nor for a
        worker that is dead or frozen.

        Parameters
        ----------
        cfg : Config
            The new settings; ``node.storage_dir`` must be the running one.

        Raises
        ------
        ValueError
            When ``cfg`` names another journal: the studies the running
            worker holds are recorded in this one (the node keeps
            ``storage_dir`` until a restart, so it never asks).
        """
        if cfg.journal_path != self.cfg.journal_path:
            raise ValueError(
                f'Argument "cfg" must keep node.storage_dir ({self.cfg.storage_dir}); a new one needs a restart.'
            )
        self.cfg = cfg
        if self.process is not None:
            self._restart_requested = True
            self._ask_to_stop()

    def supervise(self) -> None:
        """Called by the node's main loop: restart a dead worker, kill a stuck one.

        Stuck means a study running past ``models.study_timeout_s``, or no
        heartbeat for that long (a frozen or stopped process). A restart
        that fails (a full disk, no memory) raises; the next call tries
        again after the backoff.
        """
        if self.process is not None and self.process.is_alive() and not self._kill_if_stuck():
            return
        now = time.monotonic()
        if self.process is not None:
            code = self.process.exitcode
            self._ask_to_stop()
            self.process = None
            # Exit status 0 is the worker leaving when asked; a worker killed
            # after a reload was asked for still counts as a death.
            if self._restart_requested and code == 0:
                self._restart_requested = False
                log.info("worker.restarting_for_reload")
                self._next_start = 0.0
            else:
                self._restart_requested = False
                self.restarts += 1
                log.error("worker.died", exitcode=code, restarts=self.restarts)
        if now < self._next_start:
            return
        # Back off when it keeps dying (1, 2, 4 ... 60 s between starts); a
        # start that raises is tried again after the same pause.
        self._next_start = now + min(60.0, 2.0 ** min(self.restarts, 6))
        self.start()

    def _kill_if_stuck(self) -> bool:
        """Kill a worker past ``models.study_timeout_s``; True when it was killed."""
        limit = self.cfg.models.study_timeout_s
        age, hb = self.heartbeat()
        if age is not None and age > max(limit, HUNG_AFTER_MIN_S):
            log.error("worker.hung", pid=self.process.pid, heartbeat_age_s=round(age, 1), limit_s=limit,
                      phase=hb.phase if hb else None)
        else:
            for study_uid, claimed_at, _pid in self._open_journal().running():
                if time.time() - claimed_at > limit:
                    log.error("worker.study_timeout", study_uid=study_uid, limit_s=limit)
                    break
            else:
                return False
        self.process.kill()
        self.process.join(10)
        return True

    def stop(self, grace_s: float = 20.0) -> None:
        """Ask the worker to finish its study and exit; kill it after ``grace_s`` seconds.

        Parameters
        ----------
        grace_s : float, optional
            Seconds the worker may take to finish its study.
        """
        if self.process is not None:
            self._ask_to_stop()
            self.process.join(grace_s)
            if self.process.is_alive():
                log.warning("worker.killed_on_stop")
                self.process.kill()
                self.process.join(5)
                # Stopped by us, not by the study: its attempt does not count, or
                # a few upgrades during a long study would mark it failed.
                journal = self._open_journal()
                released = journal.release_running()
                if released:
                    log.info("worker.released_on_stop", studies=released)
                    remove_unrecorded_reports(self.cfg.storage_dir, journal, released)
            self.process = None
        if self._journal is not None:
            # Nothing of the supervisor's outlives the worker; a later
            # start() opens the journal again.
            self._journal.close()
            self._journal = None


def remove_unrecorded_reports(storage_dir: Path, journal: Journal, study_uids: Iterable[str]) -> int:
    """Delete the SR files of ``study_uids`` that the journal does not name.

    A worker killed between writing an SR and recording it leaves a file that
    was never in the outbox, so never sent; the study is processed again and
    gets its SR then. Call only while no worker runs.

    Returns
    -------
    int
        Files removed.
    """
    removed = 0
    for study_uid in study_uids:
        folder = storage_dir / "reports" / study_uid
        if not is_valid_uid(study_uid) or not folder.is_dir():
            continue
        recorded = journal.report_paths(study_uid)
        for path in folder.iterdir():
            if path.is_file() and str(path) not in recorded:
                path.unlink(missing_ok=True)
                removed += 1
                log.info("worker.unrecorded_report_removed", study_uid=study_uid, file=path.name)
    return removed
