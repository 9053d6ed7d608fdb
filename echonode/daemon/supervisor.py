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

``[models] workers = N`` runs N such processes (:class:`WorkerPool`), each
supervised on its own by a :class:`WorkerSupervisor`. They share nothing but
the journal, whose claims are atomic (``BEGIN IMMEDIATE``): two workers
never hold one study. What a dead worker held is found by its pid (the
journal records the claimer), so its death re-queues its own studies and
never those of the workers still running.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Iterable
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

from echonode.config import Config
from echonode.daemon.workerlink import Heartbeat, HeartbeatWriter, StopListener, heartbeat_file, read_heartbeat
from echonode.ops.logs import get_logger
from echonode.studies.journal import Journal
from echonode.studies.store import is_valid_uid

__all__ = ["HUNG_AFTER_MIN_S", "WorkerPool", "WorkerSupervisor", "remove_unrecorded_reports"]

log = get_logger(__name__)


def _run_worker(
    cfg: Config,
    stop_conn: Connection,
    heartbeat_path: str,
    log_path: str | None = None,
    index: int = 0,
    count: int = 1,
) -> None:
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
    # Late, and only here in the child: the worker's module imports torch.
    from echonode.analyse.worker import worker_process

    worker_process(cfg, stop, beat, log_path, index, count)


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
    index : int, optional
        This worker among the node's (its heartbeat file, device, threads).
    count : int, optional
        Workers in the node.
    recovers_all : bool, optional
        At the first start, re-queue every study left ``running`` (a lone
        worker: nobody else can hold one). A :class:`WorkerPool` does that
        once for all its workers and passes False.
    """

    def __init__(
        self,
        cfg: Config,
        log_path: str | None = None,
        *,
        index: int = 0,
        count: int = 1,
        recovers_all: bool = True,
    ) -> None:
        self.cfg = cfg
        self.log_path = log_path
        self.index = index
        self.count = count
        self._ctx = mp.get_context("spawn")
        self.process: SpawnProcess | None = None
        #: Worker deaths the supervisor restarted from (crash, kill, timeout, hang).
        self.restarts = 0
        #: ``time.monotonic()`` when the current worker was spawned.
        self.spawned_at = 0.0
        self._stop_writer: Connection | None = None
        self._next_start = 0.0
        self._journal: Journal | None = None
        self._restart_requested = False
        #: The pid of the last worker that ended: the studies it still holds are its to give back.
        self._ended_pid: int | None = None
        self._recovers_all = recovers_all
        #: Asked to stop for good (the pool shrank): never started again.
        self.retiring = False

    @property
    def heartbeat_path(self) -> Path:
        """The file the worker beats into."""
        return self.cfg.storage_dir / heartbeat_file(self.index)

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
        """Spawn the worker. The studies the previous worker of this
        supervisor still held (every study ``running`` at the first start of
        a lone worker) go back to the queue first, and an SR file it wrote
        but never recorded is removed."""
        if self._ended_pid is not None:
            recover_studies(self.cfg, self._open_journal(), self._ended_pid)
            self._ended_pid = None
        elif self._recovers_all:
            recover_studies(self.cfg, self._open_journal(), None)
        self._recovers_all = False
        reader, writer = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=_run_worker,
            args=(self.cfg, reader, str(self.heartbeat_path), self.log_path, self.index, self.count),
            name="echonode-worker" if self.count == 1 else f"echonode-worker-{self.index}",
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
        log.info("worker.spawned", pid=process.pid, **self._which())

    def _which(self) -> dict[str, int]:
        """The worker's index for a log line, when there are several."""
        return {"worker": self.index} if self.count > 1 else {}

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
        if self.process is not None and self.process.is_alive() and not self._kill_if_stuck(self.process):
            return
        now = time.monotonic()
        if self.process is not None:
            code = self.process.exitcode
            self._ask_to_stop()
            self._ended_pid = self.process.pid
            self.process = None
            # Exit status 0 is the worker leaving when asked; a worker killed
            # after a reload was asked for still counts as a death.
            if (self._restart_requested or self.retiring) and code == 0:
                self._restart_requested = False
                if not self.retiring:
                    log.info("worker.restarting_for_reload", **self._which())
                self._next_start = 0.0
            else:
                self._restart_requested = False
                self.restarts += 1
                log.error("worker.died", exitcode=code, restarts=self.restarts, **self._which())
        if self._ended_pid is not None:
            # What it held goes back now, not after the backoff: the other
            # workers may take it meanwhile. Retried by the next call (or
            # start()) should the journal refuse.
            recover_studies(self.cfg, self._open_journal(), self._ended_pid)
            self._ended_pid = None
        if self.retiring or now < self._next_start:
            return
        # Back off when it keeps dying (1, 2, 4 ... 60 s between starts); a
        # start that raises is tried again after the same pause.
        self._next_start = now + min(60.0, 2.0 ** min(self.restarts, 6))
        self.start()

    def _kill_if_stuck(self, process: SpawnProcess) -> bool:
        """Kill the running worker ``process`` when past ``models.study_timeout_s``; True when it was killed."""
        limit = self.cfg.models.study_timeout_s
        age, hb = self.heartbeat()
        if age is not None and age > max(limit, HUNG_AFTER_MIN_S):
            log.error("worker.hung", pid=process.pid, heartbeat_age_s=round(age, 1), limit_s=limit,
                      phase=hb.phase if hb else None, **self._which())
        else:
            for study_uid, claimed_at, pid in self._open_journal().running():
                if pid == process.pid and time.time() - claimed_at > limit:
                    log.error("worker.study_timeout", study_uid=study_uid, limit_s=limit)
                    break
            else:
                return False
        process.kill()
        process.join(10)
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
                log.warning("worker.killed_on_stop", **self._which())
                self.process.kill()
                self.process.join(5)
                # Stopped by us, not by the study: its attempt does not count, or
                # a few upgrades during a long study would mark it failed.
                journal = self._open_journal()
                pid = self.process.pid
                # Files first, while the studies are still this worker's:
                # once released, another worker may claim one and write its SR.
                held = [uid for uid, _at, p in journal.running() if p == pid]
                remove_unrecorded_reports(self.cfg.storage_dir, journal, held)
                released = journal.release_running(pid)
                if released:
                    log.info("worker.released_on_stop", studies=released, **self._which())
            elif self.process.exitcode != 0 and self.process.pid is not None:
                # Died before or while stopping: what it held is a death's.
                recover_studies(self.cfg, self._open_journal(), self.process.pid)
            self.process = None
        if self._journal is not None:
            # Nothing of the supervisor's outlives the worker; a later
            # start() opens the journal again.
            self._journal.close()
            self._journal = None


def recover_studies(cfg: Config, journal: Journal, pid: int | None) -> dict[str, Any]:
    """Give back the studies a dead worker held: queued again, or failed after ``models.max_attempts``.

    The SR files it wrote but never recorded are removed first, while the
    studies are still marked as its own: once queued, another worker may
    claim one and write an SR of its own into the same folder.

    Parameters
    ----------
    cfg : Config
    journal : Journal
    pid : int or None
        The dead worker's process; None for every study ``running`` (no
        worker runs).

    Returns
    -------
    dict
        Study UID to its new state.
    """
    held = [uid for uid, _at, p in journal.running() if pid is None or p == pid]
    if not held:
        return {}
    remove_unrecorded_reports(cfg.storage_dir, journal, held)
    recovered = journal.recover_running(cfg.models.max_attempts, pid)
    if recovered:
        log.warning("worker.recovered_studies", studies={k: str(v) for k, v in recovered.items()},
                    **({} if pid is None else {"pid": pid}))
    return dict(recovered)


class WorkerPool:
    """``[models] workers`` inference processes, each kept alive by its own :class:`WorkerSupervisor`.

    The node's view of its workers: :meth:`supervise`, :meth:`apply_config`
    and :meth:`stop` as for one, and :meth:`workers` for what each is doing
    (``/health``, the metrics, the status page). A study a worker held when
    it died goes back to the queue by that worker's pid alone; the other
    workers go on with theirs.

    Parameters
    ----------
    cfg : Config
    log_path : str, optional
        File the workers append their logs to (default: stderr).
    """

    def __init__(self, cfg: Config, log_path: str | None = None) -> None:
        self.cfg = cfg
        self.log_path = log_path
        self.supervisors: list[WorkerSupervisor] = [self._supervisor(i) for i in range(cfg.models.workers)]
        #: Supervisors of workers asked to leave for good (the pool shrank), until they have.
        self._retiring: list[WorkerSupervisor] = []
        self._retired_restarts = 0
        self._recovered = False
        self._journal: Journal | None = None

    def _supervisor(self, index: int) -> WorkerSupervisor:
        return WorkerSupervisor(self.cfg, self.log_path, index=index, count=self.cfg.models.workers,
                                recovers_all=False)

    @property
    def process(self) -> SpawnProcess | None:
        """The first worker's process (for callers that know of one worker)."""
        return self.supervisors[0].process if self.supervisors else None

    @property
    def heartbeat_path(self) -> Path:
        """The first worker's heartbeat file."""
        return self.cfg.storage_dir / heartbeat_file(0)

    @property
    def restarts(self) -> int:
        """Worker deaths restarted from, all workers together."""
        return self._retired_restarts + sum(s.restarts for s in self.supervisors + self._retiring)

    def heartbeat(self) -> tuple[float | None, Heartbeat | None]:
        """The stalest running worker's (age, record), as :meth:`WorkerSupervisor.heartbeat`."""
        beats = [s.heartbeat() for s in self.supervisors if s.process is not None]
        beats = [b for b in beats if b[0] is not None]
        if not beats:
            return None, None
        return max(beats, key=lambda b: b[0] or 0.0)

    def workers(self) -> list[dict[str, Any]]:
        """One entry per worker: ``index``, ``pid``, ``alive``, ``restarts``, and from
        its heartbeat ``phase``, ``heartbeat_age_s``, ``study_uid``, ``studies`` (done)."""
        out = []
        for sup in self.supervisors:
            process = sup.process
            alive = bool(process is not None and process.is_alive())
            entry: dict[str, Any] = {"index": sup.index, "pid": process.pid if process is not None else None,
                                     "alive": alive, "restarts": sup.restarts}
            age, beat = sup.heartbeat() if alive else (None, None)
            entry["phase"] = beat.phase if beat is not None else ("starting" if alive else "down")
            entry["heartbeat_age_s"] = None if age is None else round(age, 1)
            entry["study_uid"] = beat.study_uid if beat is not None else None
            entry["studies"] = beat.studies if beat is not None else 0
            out.append(entry)
        return out

    def supervise(self) -> None:
        """Start, restart or kill each worker as :meth:`WorkerSupervisor.supervise` does.

        The first call re-queues every study left ``running`` (no worker
        runs yet); one worker that cannot start does not keep the others
        from starting. The first error is raised after every worker had its turn.
        """
        if not self._recovered:
            if self._journal is None:
                self._journal = Journal(self.cfg.journal_path)
            recover_studies(self.cfg, self._journal, None)
            self._recovered = True
            self._journal.close()
            self._journal = None
        error: Exception | None = None
        for sup in self.supervisors + self._retiring:
            try:
                sup.supervise()
            except Exception as exc:  # noqa: BLE001 - the others still get their turn
                error = error or exc
        for sup in [s for s in self._retiring if s.process is None]:
            self._retiring.remove(sup)
            self._retired_restarts += sup.restarts
            sup.stop()
        if error is not None:
            raise error

    def apply_config(self, cfg: Config) -> None:
        """New settings: every worker finishes its study and restarts with them
        (see :meth:`WorkerSupervisor.apply_config`); a new ``models.workers`` adds
        workers, or asks the last ones to leave once their study is done.

        Raises
        ------
        ValueError
            When ``cfg`` names another journal.
        """
        if cfg.journal_path != self.cfg.journal_path:
            raise ValueError(
                f'Argument "cfg" must keep node.storage_dir ({self.cfg.storage_dir}); a new one needs a restart.'
            )
        self.cfg = cfg
        n = cfg.models.workers
        for sup in self.supervisors[n:]:
            sup.retiring = True
            sup._ask_to_stop()
            self._retiring.append(sup)
        self.supervisors = self.supervisors[:n]
        for sup in self.supervisors:
            sup.count = n
            sup.apply_config(cfg)
        self.supervisors += [self._supervisor(i) for i in range(len(self.supervisors), n)]

    def stop(self, grace_s: float = 20.0) -> None:
        """Ask every worker to finish its study and exit; kill those still running after ``grace_s``."""
        everyone = self.supervisors + self._retiring
        for sup in everyone:
            sup._ask_to_stop()
        deadline = time.monotonic() + grace_s
        for sup in everyone:
            sup.stop(max(0.0, deadline - time.monotonic()))


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
