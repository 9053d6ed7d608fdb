"""The inference worker: a process of its own that takes queued studies from the journal.

Per study: claim it (``queued -> running``), run the pipeline, build the SR,
write it, then record results, report and outbox rows in one transaction.
The claim carries a generation number: a study that changed while it ran (a
late instance, a reprocess) refuses the stale write and is processed again.

The node supervises the process: a worker that dies (out of memory, a
decoder crash) is restarted with a backoff and its study goes back to the
queue until ``models.max_attempts``; a study that runs past
``models.study_timeout_s`` gets its worker killed the same way.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config
from .logs import exception_frames, get_logger

if TYPE_CHECKING:
    from .journal import Journal

log = get_logger(__name__)

_SR_SOP_CLASS_UIDS = {
    "comprehensive": "1.2.840.10008.5.1.4.1.1.88.33",
    "enhanced": "1.2.840.10008.5.1.4.1.1.88.22",
    "comprehensive3d": "1.2.840.10008.5.1.4.1.1.88.34",
}


@dataclass
class StudyOutcome:
    """What :func:`process_study` did (for logs and tests)."""

    study_uid: str
    state: str
    sr_sop_uid: str | None = None
    reason: str | None = None


def _findings(analysis: Any) -> list[Any]:
    from .sr import SourceInstance, TaskFinding

    findings = []
    for task, outcome in sorted(analysis.tasks.items()):
        used = [v for v in analysis.videos if task in v.probabilities]
        b = outcome.bundle
        findings.append(
            TaskFinding(
                task=task,
                probability=min(1.0, max(0.0, outcome.probability)),
                threshold=b.threshold,
                model_name=b.name,
                model_version=b.version,
                device_uid=b.device_uid,
                parameters={
                    "clip_frames": str(b.meta.clip_frames),
                    "frame_size": str(b.meta.frame_size),
                    "threshold": f"{b.threshold:g}",
                    "aggregation": f"mean over {b.meta.preprocessing.get('eval_clips', 4)} clips per video,"
                    " mean over videos",
                    "runtime": _runtime_mode(b),
                    "view_filter": analysis.view_filter,
                },
                sources=tuple(
                    SourceInstance(v.sop_class_uid, v.sop_uid, v.series_uid, v.view) for v in used
                ),
                views_used=tuple(sorted({v.view for v in used if v.view})),
                n_videos=len(used),
                video_probabilities={v.sop_uid: v.probabilities[task] for v in used},
            )
        )
    return findings


def _runtime_mode(bundle: Any) -> str:
    """The inference runtime that produced a bundle's probabilities (eager, jit, bf16 ...)."""
    runner = getattr(bundle, "runner", None)
    if runner is None:
        return "eager"
    try:
        return str(runner.describe().get("mode", "eager"))
    except Exception:  # noqa: BLE001 - a description must never fail a report
        return "unknown"


MODELS_STATE = "worker-models.json"


def write_models_state(cfg: Config, registry: Any) -> None:
    """Tell ``echonode status`` which bundles the worker really loaded, and why others not.

    The node queues studies when a task bundle is installed; if it does not
    load in the worker, the studies would wait with no visible reason.
    """
    import json

    state = {
        "loaded": [b.describe()["name"] for b in registry.bundles],
        "model_set": registry.key,
        "errors": {str(p): e for p, e in registry.errors},
        "runtime": {b.describe()["name"]: _runtime_mode(b) for b in registry.bundles},
        "updated": time.time(),
    }
    path = cfg.storage_dir / MODELS_STATE
    tmp = path.with_name(path.name + ".part")
    try:
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("models.state_not_written", error=exc.strerror)


def write_report(ds: Any, path: Path) -> None:
    """Write an SR file atomically (temp file, fsync, rename)."""
    from .store import fsync_dir, fsync_file

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    ds.save_as(tmp, enforce_file_format=True)
    fsync_file(tmp)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _fail_for_good(journal: Any, claim: Any, bound: Any, event: str, reason: str) -> StudyOutcome:
    """``running -> failed`` at once (another attempt would fail the same way); ``reason`` quotes no data."""
    journal.finish_failed(claim, reason, max_attempts=1)
    bound.error(event, reason=reason)
    return StudyOutcome(claim.study_uid, "failed", reason=reason)


def process_study(cfg: Config, journal: Any, store: Any, registry: Any, claim: Any) -> StudyOutcome:
    """Take one claimed study through the pipeline to the outbox."""
    import pydicom

    from .journal import ReportRecord, StaleClaim, TaskResult
    from .pipeline import StudyRefused, analyse_study
    from .sr import HeaderRefused, build_report

    bound = log.bind(study_uid=claim.study_uid, attempt=claim.attempts)
    models = registry.current
    instances = journal.instances(claim.study_uid)
    paths = [Path(r.path) for r in instances if Path(r.path).exists()]
    if not paths:
        # Received and acknowledged, then lost from storage (deleted by hand,
        # a volume swapped; recovery forgets the rows of missing files): a
        # fault of the node's storage, not a study with nothing to classify.
        return _fail_for_good(journal, claim, bound, "study.files_gone", "the study's files are gone")
    t0 = time.monotonic()
    try:
        analysis = analyse_study(
            claim.study_uid,
            paths,
            models,
            views=cfg.models.views,
            batch_size=cfg.models.batch_size,
            max_videos=cfg.models.max_videos,
        )
    except StudyRefused as exc:
        return _fail_for_good(journal, claim, bound, "study.refused", str(exc))
    seconds = time.monotonic() - t0
    usable = sum(v.usable for v in analysis.videos)
    used = len(analysis.used_videos)
    bound.info("study.analysed", seconds=round(seconds, 2), objects=len(analysis.videos), usable=usable, used=used)

    results = [
        TaskResult(
            task=t,
            bundle_name=o.bundle.name,
            bundle_version=o.bundle.version,
            device_uid=o.bundle.device_uid,
            probability=o.probability,
            positive=o.positive,
            threshold=o.bundle.threshold,
            n_videos=len(o.video_probabilities),
            detail={"videos": o.video_probabilities, "seconds": seconds},
        )
        for t, o in sorted(analysis.tasks.items())
    ]
    if analysis.skipped_reason and not cfg.sr.report_skipped:
        try:
            journal.finish_skipped(claim, analysis.skipped_reason)
        except StaleClaim:
            bound.info("study.changed_while_running")
            return StudyOutcome(claim.study_uid, "stale")
        bound.info("study.skipped", reason=analysis.skipped_reason)
        return StudyOutcome(claim.study_uid, "skipped", reason=analysis.skipped_reason)

    model_set = models.key
    existing = journal.report_for(claim.study_uid, model_set)
    report = None
    if existing is None:
        header = pydicom.dcmread(paths[0], stop_before_pixels=True)
        previous = journal.latest_report(claim.study_uid)
        supersedes = (
            (previous.sop_class_uid, previous.sr_sop_uid, previous.series_uid) if previous is not None else None
        )
        try:
            ds = build_report(
                header,
                _findings(analysis) if not analysis.skipped_reason else [],
                sop_class=cfg.sr.sop_class,
                series_number=cfg.sr.series_number,
                institution_name=cfg.sr.institution_name or None,
                supersedes=supersedes,
                no_usable_video_reason=analysis.skipped_reason,
            )
        except HeaderRefused as exc:
            return _fail_for_good(journal, claim, bound, "study.refused", f"no SR can be built: {exc}")
        sr_uid = str(ds.SOPInstanceUID)
        path = store.report_path(claim.study_uid, sr_uid)
        write_report(ds, path)
        report = ReportRecord(
            sr_sop_uid=sr_uid,
            study_uid=claim.study_uid,
            model_set=model_set,
            series_uid=str(ds.SeriesInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            path=str(path),
            supersedes=supersedes[1] if supersedes else None,
        )
    try:
        state = journal.finish_reported(claim, model_set, results, report, [d.name for d in cfg.destinations])
    except StaleClaim:
        if report is not None:
            Path(report.path).unlink(missing_ok=True)
        bound.info("study.changed_while_running")
        return StudyOutcome(claim.study_uid, "stale")
    if report is None:
        bound.info("study.already_reported", model_set=model_set, state=str(state))
        return StudyOutcome(claim.study_uid, str(state), existing.sr_sop_uid if existing else None)
    bound.info(
        "study.reported",
        sr_sop_uid=report.sr_sop_uid,
        supersedes=report.supersedes,
        **{f"p_{r.task}": round(r.probability, 4) for r in results},
    )
    return StudyOutcome(claim.study_uid, str(state), report.sr_sop_uid)


def _where(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame, for a reason without the message."""
    return (exception_frames(exc, limit=1) or ["unknown"])[-1]


def handle_claim(cfg: Config, journal: Any, store: Any, registry: Any, claim: Any) -> None:
    """Process one claimed study; an unexpected error fails this attempt, never the worker.

    The message of a library's exception can quote a data element (a
    malformed birth date, a name): the journal and the log get the type and
    where it happened, never the text. The study is retried up to
    ``models.max_attempts`` times.
    """
    from .journal import StaleClaim

    try:
        process_study(cfg, journal, store, registry, claim)
    except StaleClaim:
        log.info("study.changed_while_running", study_uid=claim.study_uid)
    except Exception as exc:  # noqa: BLE001 - record, retry, go on
        where = _where(exc)
        reason = f"could not process the study: {type(exc).__name__} at {where}"
        try:
            state = journal.finish_failed(claim, reason, max_attempts=cfg.models.max_attempts)
        except StaleClaim:
            log.info("study.changed_while_running", study_uid=claim.study_uid)
            return
        log.error("study.error", study_uid=claim.study_uid, error=type(exc).__name__, where=where,
                  next_state=str(state))


def worker_main(cfg: Config, stop: Any, log_path: str | None = None) -> None:
    """The worker process: claim, process, repeat until ``stop`` is set.

    Logs go to stderr (journald under systemd) or, when ``log_path`` is
    given, appended to that file (the demo keeps its terminal readable).
    """
    from .bundle import ModelRegistry
    from .journal import Journal
    from .logs import configure_logging
    from .store import StudyStore

    # The node handles signals; the worker stops when told through ``stop``.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stream = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115 - lives as long as the process
    configure_logging(cfg.logging.format, cfg.logging.level, stream=stream)
    import torch
    from pydicom import config as pydicom_config

    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    if cfg.models.threads:
        torch.set_num_threads(cfg.models.threads)
    journal = Journal(cfg.journal_path)
    store = StudyStore(cfg.storage_dir, journal)
    registry = ModelRegistry(cfg.models.dir, cfg.models.device, runtime=cfg.models.runtime,
                             state_dir=cfg.storage_dir)
    log.info("worker.started", pid=os.getpid(), device=str(registry.device))
    parent = mp.parent_process()
    while not stop.is_set():
        if parent is not None and not parent.is_alive():
            # The node was killed (kill -9): nobody will ever set ``stop``.
            # Exit; the next node re-queues whatever this worker held.
            log.warning("worker.orphaned_exit")
            break
        try:
            if registry.refresh():
                for path, err in registry.errors:
                    log.error("models.unusable", bundle=str(path), error=err)
                log.info("models.loaded", models=[b.describe()["name"] for b in registry.bundles],
                         model_set=registry.key)
                write_models_state(cfg, registry)
            if not any(b.task != "view" for b in registry.bundles):
                stop.wait(2.0)
                continue
            claim = journal.claim_next(os.getpid())
            if claim is None:
                stop.wait(0.5)
                continue
            handle_claim(cfg, journal, store, registry, claim)
        except Exception:  # noqa: BLE001 - a journal hiccup must not kill the loop
            log.exception("worker.loop_error")
            stop.wait(2.0)
    log.info("worker.stopped")


class WorkerSupervisor:
    """Runs :func:`worker_main` in a child process and keeps it alive.

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
        self._stop = self._ctx.Event()
        self.process: Any = None
        self.restarts = 0
        self._next_start = 0.0
        self._journal: Journal | None = None
        self._restart_requested = False

    def _open_journal(self) -> Journal:
        """The supervisor's journal, opened on first use and kept for every worker it starts.

        ``node.storage_dir`` never changes while the supervisor lives
        (:meth:`reload` refuses it), so one handle, and its one connection,
        serves for good.
        """
        if self._journal is None:
            from .journal import Journal

            self._journal = Journal(self.cfg.journal_path)
        return self._journal

    def start(self) -> None:
        """Spawn the worker. A study still ``running`` belongs to a worker that
        is gone (only one runs at a time), so it goes back to the queue first."""
        recovered = self._open_journal().recover_running(self.cfg.models.max_attempts)
        if recovered:
            log.warning("worker.recovered_studies", studies={k: str(v) for k, v in recovered.items()})
        self._stop.clear()
        self.process = self._ctx.Process(target=worker_main, args=(self.cfg, self._stop, self.log_path),
                                        name="echonode-worker")
        self.process.start()
        log.info("worker.spawned", pid=self.process.pid)

    def reload(self, cfg: Config) -> None:
        """New settings: ask the worker to finish its study and exit; :meth:`supervise`
        starts the next one with ``cfg``. Returns at once, so the node's main
        loop (signals, watchdog) never waits for a study to finish.

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
        self._restart_requested = True
        self._stop.set()

    def supervise(self) -> None:
        """Called by the node's main loop: restart a dead worker, kill a stuck one."""
        if self.process is None:
            return
        journal = self._open_journal()
        if self.process.is_alive():
            limit = self.cfg.models.study_timeout_s
            for study_uid, claimed_at, _pid in journal.running():
                if time.time() - claimed_at > limit:
                    log.error("worker.study_timeout", study_uid=study_uid, limit_s=limit)
                    self.process.kill()
                    self.process.join(10)
                    break
            else:
                return
        if self._restart_requested:
            self._restart_requested = False
            self.process.join(5)
            log.info("worker.restarting_for_reload")
            self.start()
            return
        if time.monotonic() < self._next_start:
            return
        code = self.process.exitcode
        self.restarts += 1
        log.error("worker.died", exitcode=code, restarts=self.restarts)
        # Back off when it keeps dying (1, 2, 4 ... 60 s).
        self._next_start = time.monotonic() + min(60.0, 2.0 ** min(self.restarts, 6))
        self.start()

    def stop(self, grace_s: float = 20.0) -> None:
        """Ask the worker to finish its study and exit; kill it after ``grace_s`` seconds.

        Parameters
        ----------
        grace_s : float, optional
            Seconds the worker may take to finish its study.
        """
        if self.process is None:
            return
        self._stop.set()
        self.process.join(grace_s)
        if self.process.is_alive():
            log.warning("worker.killed_on_stop")
            self.process.kill()
            self.process.join(5)
            # Stopped by us, not by the study: its attempt does not count, or
            # a few upgrades during a long study would mark it failed.
            released = self._open_journal().release_running()
            if released:
                log.info("worker.released_on_stop", studies=released)
        self.process = None
        if self._journal is not None:
            # Nothing of the supervisor's outlives the worker; a later
            # start() opens the journal again.
            self._journal.close()
            self._journal = None
