"""The inference worker: a process of its own that takes queued studies from the journal.

Per study: claim it (``queued -> running``), run the pipeline, build the SR,
write it, then record results, report and outbox rows in one transaction.
The claim carries a generation number: a study that changed while it ran (a
late instance, a reprocess) refuses the stale write and is processed again.

The node supervises the process (:class:`echonode.daemon.supervisor.WorkerSupervisor`);
node and worker share nothing a dead process can hold
(:mod:`echonode.daemon.workerlink`). This module runs in the worker process
only: it imports torch, which the node process never does.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from pydicom import Dataset
from pydicom import config as pydicom_config

from echonode.analyse.pipeline import StudyAnalysis, StudyRefused, analyse_study
from echonode.bundles.device import split_threads, worker_device
from echonode.bundles.installed import MODELS_STATE
from echonode.bundles.manifest import folder_signature
from echonode.bundles.registry import ModelRegistry, ModelSet
from echonode.bundles.weights import Bundle
from echonode.config import Config
from echonode.daemon.workerlink import HeartbeatWriter, Phase, StopListener
from echonode.durable import replacing, write_json
from echonode.ops.logs import configure_logging, exception_frames, get_logger
from echonode.report.build import build_report
from echonode.report.codes import TASKS
from echonode.report.findings import NotAssessed, SourceInstance, TaskFinding
from echonode.report.header import HeaderRefused, read_study_header
from echonode.studies.connection import is_disk_full
from echonode.studies.journal import Journal
from echonode.studies.records import Claim, ReportRecord, StaleClaim, TaskResult
from echonode.studies.schema import is_document_class
from echonode.studies.store import RESERVE_NAME, SpaceReserve, StudyStore

log = get_logger(__name__)

@dataclass
class StudyOutcome:
    """What :func:`process_study` did (for logs and tests)."""

    study_uid: str
    state: str
    sr_sop_uid: str | None = None
    reason: str | None = None


def _parameters(bundle: Bundle, view_filter: str) -> dict[str, str]:
    """A bundle's TID 4019 algorithm parameters in the SR."""
    params = {
        "clip_frames": str(bundle.meta.clip_frames),
        "frame_size": str(bundle.meta.frame_size),
        "threshold": f"{bundle.threshold:g}",
        "aggregation": f"mean over {bundle.meta.preprocessing.get('eval_clips', 4)} clips per video,"
        " mean over videos",
        "runtime": _runtime_mode(bundle),
        "view_filter": view_filter,
    }
    framing = bundle.meta.preprocessing.get("framing", "sector")
    if framing == "physical":
        # Says that only calibrated videos were measured, and at what scale.
        params["framing"] = f"physical {bundle.meta.preprocessing.get('field_cm', 16.0):g} cm, calibrated videos only"
    elif framing != "sector":
        params["framing"] = str(framing)
    return params


def study_report(
    analysis: StudyAnalysis,
    cfg: Config,
    models: ModelSet,
    *,
    fallback_header: Path,
    supersedes: tuple[str, str, str] | None = None,
) -> Dataset:
    """The SR a study gets: its findings, and each task not assessed and why.

    Parameters
    ----------
    analysis : StudyAnalysis
    cfg : Config
        ``[sr]`` settings and the views the models were asked for.
    models : ModelSet
        The model set that analysed the study.
    fallback_header : Path
        The object whose header the SR copies when the analysis names none.
    supersedes : tuple of str, optional
        (SOP Class, SOP Instance, Series) UIDs of the SR this one replaces.

    Returns
    -------
    pydicom.dataset.Dataset

    Raises
    ------
    HeaderRefused
        When the study's header cannot identify the patient and study.
    """
    # One bounded header: the study's patient and study attributes, not the
    # object's large private elements.
    header = read_study_header(Path(analysis.header_path) if analysis.header_path else fallback_header)
    return build_report(
        header,
        findings_of(analysis) if not analysis.skipped_reason else [],
        sop_class=cfg.sr.sop_class,
        series_number=cfg.sr.series_number,
        institution_name=cfg.sr.institution_name or None,
        supersedes=supersedes,
        no_usable_video_reason=analysis.skipped_reason,
        # Silence would read as "absent": each task without a result says it was not assessed.
        not_assessed=not_assessed_of(analysis, models, cfg.models.views),
    )


def findings_of(analysis: StudyAnalysis) -> list[TaskFinding]:
    """What the SR reports per task the study was assessed for."""
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
                parameters=_parameters(b, analysis.view_filter),
                sources=tuple(
                    SourceInstance(v.sop_class_uid, v.sop_uid, v.series_uid, v.view) for v in used
                ),
                n_videos=len(used),
                video_probabilities={v.sop_uid: v.probabilities[task] for v in used},
            )
        )
    return findings


def not_assessed_of(analysis: StudyAnalysis, models: ModelSet, views: tuple[str, ...]) -> list[NotAssessed]:
    """Every installed task the study has no result for, and why (coded).

    A skipped study lists every task. A study with results lists the tasks
    without one: videos of the view were there (another model measured
    them), but none that this task's model could measure (a model that
    measures in cm, videos without a calibration). Silence would read as
    "absent".
    """
    if analysis.skipped_reason is None or any(v.used for v in analysis.videos):
        # Of the view, passed to the task models, and none measured them.
        reason = "no_measurable_video"
    elif any(v.usable for v in analysis.videos):
        reason = "no_required_view"
    else:
        reason = "no_usable_video"
    required = tuple(views) if reason == "no_required_view" else ()
    return [
        NotAssessed(
            task=b.task,
            reason=reason,
            threshold=b.threshold,
            model_name=b.name,
            model_version=b.version,
            device_uid=b.device_uid,
            parameters=_parameters(b, analysis.view_filter),
            required_views=required,
        )
        for b in unassessed_bundles(analysis, models)
    ]


#: Why a study holding only structured reports and other documents (a PDF, a presentation
#: state) is not analysed: it waits for its images.
WAITING_FOR_IMAGES = "only structured reports or documents, no images yet: analysed when an image arrives"


def unassessed_bundles(analysis: StudyAnalysis, models: ModelSet) -> list[Bundle]:
    """The installed task bundles without a result for the study, by task."""
    return [b for b in sorted(models.bundles, key=lambda b: b.task) if b.task in TASKS and b.task not in analysis.tasks]


def _runtime_mode(bundle: Bundle) -> str:
    """The inference runtime that produced a bundle's probabilities (eager, jit, bf16 ...)."""
    runner = getattr(bundle, "runner", None)
    if runner is None:
        return "eager"
    try:
        return str(runner.describe().get("mode", "eager"))
    except Exception:  # noqa: BLE001 - a description must never fail a report
        return "unknown"


def write_models_state(cfg: Config, registry: ModelRegistry) -> None:
    """Tell ``echonode status`` which bundles the worker really loaded, and why others not.

    The node queues studies when a task bundle is installed; if it does not
    load in the worker, the studies would wait with no visible reason.
    """

    state = {
        "loaded": [b.describe()["name"] for b in registry.bundles],
        "model_set": registry.key,
        "errors": {str(p): e for p, e in registry.errors},
        "runtime": {b.describe()["name"]: _runtime_mode(b) for b in registry.bundles},
        "updated": time.time(),
    }
    try:
        write_json(cfg.storage_dir / MODELS_STATE, state, durable=False)
    except OSError as exc:
        log.warning("models.state_not_written", error=exc.strerror)


def write_report(ds: Dataset, path: Path) -> None:
    """Write an SR file under the durable rule (:mod:`echonode.durable`); a write that fails leaves no file."""

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        with replacing(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
    except BaseException:
        # The SR is not recorded: a file from an earlier try must not stay
        # either, or it would be taken for this one.
        path.unlink(missing_ok=True)
        raise


def _fail_for_good(
    journal: Journal, claim: Claim, bound: structlog.stdlib.BoundLogger, event: str, reason: str
) -> StudyOutcome:
    """``running -> failed`` at once (another attempt would fail the same way); ``reason`` quotes no data."""
    journal.finish_failed(claim, reason, max_attempts=1)
    bound.error(event, reason=reason)
    return StudyOutcome(claim.study_uid, "failed", reason=reason)


def process_study(cfg: Config, journal: Journal, store: StudyStore, registry: ModelRegistry, claim: Claim) -> StudyOutcome:
    """Take one claimed study through the pipeline to the outbox."""

    bound = log.bind(study_uid=claim.study_uid, attempt=claim.attempts)
    models = registry.current
    instances = journal.instances(claim.study_uid)
    if instances and all(is_document_class(r.sop_class_uid) for r in instances):
        # A sonographer's measurement SR (or its PDF) forwarded before the loops: there is
        # nothing to analyse yet, and a "not assessed" SR now would be the
        # study's answer for good (a delivered study is never re-opened).
        # Skipped, with no SR: the first image re-opens it.
        try:
            journal.finish_skipped(claim, WAITING_FOR_IMAGES)
        except StaleClaim:
            bound.info("study.changed_while_running")
            return StudyOutcome(claim.study_uid, "stale")
        bound.info("study.waiting_for_images", objects=len(instances))
        return StudyOutcome(claim.study_uid, "skipped", reason=WAITING_FOR_IMAGES)
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
    bound.info("study.analysed", seconds=round(seconds, 2), objects=len(analysis.videos), usable=usable, used=used,
               **analysis.timings)

    results = _task_results(analysis, seconds)
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
        try:
            report = _write_study_report(cfg, journal, store, analysis, models, claim.study_uid, paths[0])
        except HeaderRefused as exc:
            return _fail_for_good(journal, claim, bound, "study.refused", f"no SR can be built: {exc}")
    try:
        state = journal.finish_reported(claim, model_set, results, report, [d.name for d in cfg.destinations])
    except StaleClaim:
        if report is not None:
            Path(report.path).unlink(missing_ok=True)
        bound.info("study.changed_while_running")
        return StudyOutcome(claim.study_uid, "stale")
    except BaseException:
        # Not recorded, so never sent: the file must not outlive the attempt
        # (``recover-journal`` takes every SR in reports/ for one the PACS has).
        if report is not None:
            Path(report.path).unlink(missing_ok=True)
        raise
    if report is None:
        bound.info("study.already_reported", model_set=model_set, state=str(state))
        return StudyOutcome(claim.study_uid, str(state), existing.sr_sop_uid if existing else None)
    bound.info(
        "study.reported",
        sr_sop_uid=report.sr_sop_uid,
        supersedes=report.supersedes,
        not_assessed=analysis.skipped_reason,
        tasks_not_assessed=[b.task for b in unassessed_bundles(analysis, models)],
        **{f"p_{r.task}": round(r.probability, 4) for r in results},
    )
    return StudyOutcome(claim.study_uid, str(state), report.sr_sop_uid)


def _task_results(analysis: StudyAnalysis, seconds: float) -> list[TaskResult]:
    """What the journal records per task: the model, its probability and verdict, and how it was reached."""
    return [
        TaskResult(
            task=t,
            bundle_name=o.bundle.name,
            bundle_version=o.bundle.version,
            device_uid=o.bundle.device_uid,
            probability=o.probability,
            positive=o.positive,
            threshold=o.bundle.threshold,
            n_videos=len(o.video_probabilities),
            detail={"videos": o.video_probabilities, "seconds": seconds, "timings": analysis.timings},
        )
        for t, o in sorted(analysis.tasks.items())
    ]


def _write_study_report(
    cfg: Config, journal: Journal, store: StudyStore, analysis: StudyAnalysis, models: ModelSet, study_uid: str,
    fallback_header: Path,
) -> ReportRecord:
    """Build the study's SR (naming the one it supersedes), write it durably, and say what the journal records.

    Raises
    ------
    HeaderRefused
        When the study's header cannot identify the patient and study.
    """
    previous = journal.latest_report(study_uid)
    supersedes = (previous.sop_class_uid, previous.sr_sop_uid, previous.series_uid) if previous is not None else None
    ds = study_report(analysis, cfg, models, fallback_header=fallback_header, supersedes=supersedes)
    sr_uid = str(ds.SOPInstanceUID)
    path = store.report_path(study_uid, sr_uid)
    write_report(ds, path)
    return ReportRecord(
        sr_sop_uid=sr_uid,
        study_uid=study_uid,
        model_set=models.key,
        series_uid=str(ds.SeriesInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        path=str(path),
        supersedes=supersedes[1] if supersedes else None,
    )


def _where(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame, for a reason without the message."""
    return (exception_frames(exc, limit=1) or ["unknown"])[-1]


class StorageFull(Exception):
    """The storage file system had no room for a study's SR or its journal rows.

    Not the study's fault: the worker returns it to the queue uncounted and
    claims nothing more until there is room (:class:`DiskFullPause`).

    Parameters
    ----------
    claim : Claim
        The study being processed.
    where : str
        ``file:line in function`` of the write that failed.
    """

    def __init__(self, claim: Claim, where: str) -> None:
        super().__init__(f"storage full at {where}")
        self.claim = claim
        self.where = where


def handle_claim(cfg: Config, journal: Journal, store: StudyStore, registry: ModelRegistry, claim: Claim) -> None:
    """Process one claimed study; an unexpected error fails this attempt, never the worker.

    The message of a library's exception can quote a data element (a
    malformed birth date, a name): the journal and the log get the type and
    where it happened, never the text. The study is retried up to
    ``models.max_attempts`` times.

    Raises
    ------
    StorageFull
        When a write found the disk full, recording the study's outcome
        included; nothing partial of the study is left on disk.
    """

    try:
        process_study(cfg, journal, store, registry, claim)
    except StaleClaim:
        log.info("study.changed_while_running", study_uid=claim.study_uid)
    except Exception as exc:  # record, retry, go on
        where = _where(exc)
        if is_disk_full(exc):
            raise StorageFull(claim, where) from exc
        reason = f"could not process the study: {type(exc).__name__} at {where}"
        try:
            state = journal.finish_failed(claim, reason, max_attempts=cfg.models.max_attempts)
        except StaleClaim:
            log.info("study.changed_while_running", study_uid=claim.study_uid)
            return
        except Exception as record_exc:
            if is_disk_full(record_exc):
                raise StorageFull(claim, _where(record_exc)) from record_exc
            raise
        log.error("study.error", study_uid=claim.study_uid, error=type(exc).__name__, where=where,
                  next_state=str(state))


#: Seconds between the worker's tries to find room again after a full disk.
DISK_FULL_RETRY_S = 5.0
#: What ``status`` shows for a study returned to the queue by a full disk.
DISK_FULL_REASON = "storage full: no room for the SR or its journal rows; retried when space returns"


class DiskFullPause:
    """The worker's answer to a full storage file system.

    A study whose SR or journal rows found no room goes back to the queue
    uncounted: storage, not the study, is at fault. Its claim is returned
    with the room the worker's :class:`~echonode.studies.store.SpaceReserve` gives
    back (a full disk leaves none for the journal write that returns it);
    should that write fail all the same, the claim is kept here and
    returned at each later try. Meanwhile the worker claims nothing: it
    resumes once the reserve can be set aside again with as much room free
    beside it, that is once space has returned.

    Parameters
    ----------
    journal : Journal
    reserve : SpaceReserve
    """

    def __init__(self, journal: Journal, reserve: SpaceReserve) -> None:
        self.journal = journal
        self.reserve = reserve
        #: True from a full disk until there is room again.
        self.active = False
        #: A claim the journal could not take back yet.
        self.held: Claim | None = None

    def begin(self, claim: Claim | None, where: str) -> None:
        """Storage was found full (by the study of ``claim``, if any); return the claim, pause claiming."""
        if claim is not None:
            self.held = claim
        if not self.active:
            # Once per episode, not at every retry.
            log.error("worker.disk_full", study_uid=getattr(claim, "study_uid", None), where=where,
                      effect="study back in the queue, uncounted; claiming paused until space returns")
        self.active = True
        self.reserve.release()
        self._return_held()

    def _return_held(self) -> bool:
        """Give the held claim back to the queue; False while the journal still has no room."""

        if self.held is None:
            return True
        claim = self.held
        try:
            self.journal.release_claim(claim, DISK_FULL_REASON)
        except StaleClaim:
            pass  # the study changed meanwhile (a new instance, reprocess): its new state stands
        except Exception as exc:
            if is_disk_full(exc):
                return False
            raise
        else:
            log.info("worker.study_requeued", study_uid=claim.study_uid, reason="storage full")
        self.held = None
        return True

    def ready(self) -> bool:
        """True when the worker may claim a study: no full disk, or room again.

        Room again: the reserve is set aside and as much is free beside it
        (the room the reserve itself gave back is not room that returned).
        """
        if not self.active:
            # Given back by someone else meanwhile (retention on a full disk): set aside again.
            self.reserve.restore()
            return True
        if not self._return_held() or not self.reserve.restore():
            return False
        try:
            if self.reserve.free_bytes() < self.reserve.size:
                return False
        except OSError:
            pass  # cannot tell: the reserve could be set aside, take that
        self.active = False
        log.info("worker.disk_space_back")
        return True


def work_once(
    cfg: Config,
    journal: Journal,
    store: StudyStore,
    registry: ModelRegistry,
    pause: DiskFullPause,
    *,
    beat: HeartbeatWriter | None = None,
) -> float:
    """One turn of the worker's loop: claim the next study and process it (``beat`` says so).

    Returns
    -------
    float
        Seconds to wait before the next turn (0: go on at once).
    """

    if not pause.ready():
        return DISK_FULL_RETRY_S
    try:
        claim = journal.claim_next(os.getpid())
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        pause.begin(None, _where(exc))
        return DISK_FULL_RETRY_S
    if claim is None:
        return 0.5
    if beat is not None:
        beat.phase(Phase.PROCESSING, claim.study_uid)
    try:
        handle_claim(cfg, journal, store, registry, claim)
    except StorageFull as exc:
        pause.begin(exc.claim, exc.where)
        return DISK_FULL_RETRY_S
    finally:
        if beat is not None:
            beat.phase(Phase.IDLE)
    return 0.0


def worker_main(
    cfg: Config,
    stop: StopListener,
    beat: HeartbeatWriter,
    log_path: str | None = None,
    index: int = 0,
    count: int = 1,
) -> None:
    """The worker process: claim, process, repeat until asked to stop.

    A stop is asked for by the node closing the stop pipe's other end, by the
    node's death, or by SIGTERM/SIGINT (the whole process group signalled):
    the study in hand is finished (the journal's claim rules keep it whole if
    the node kills the worker first), then the process exits.

    Parameters
    ----------
    cfg : Config
    stop : StopListener
        Listening on the read end of this worker's stop pipe and for
        signals (see :mod:`echonode.daemon.workerlink`); started by the
        process's entry point before torch is imported.
    beat : HeartbeatWriter
        This worker's heartbeat, already beating.
    log_path : str, optional
        Logs go to stderr (journald under systemd) or, when given, appended
        to that file (the demo keeps its terminal readable).
    index, count : int, optional
        This worker among the node's ``[models] workers``: its device
        (:func:`~echonode.bundles.device.worker_device`) and its share of
        the CPU threads (:func:`~echonode.bundles.device.split_threads`).
    """
    stream = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115 - lives as long as the process
    configure_logging(cfg.logging.format, cfg.logging.level, stream=stream)


    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    threads = split_threads(cfg.models.threads, count, len(os.sched_getaffinity(0)))
    if threads:
        torch.set_num_threads(threads)
    journal = Journal(cfg.journal_path)
    store = StudyStore(cfg.storage_dir, journal)
    registry = ModelRegistry(cfg.models.dir, worker_device(cfg.models.device, index, count),
                             runtime=cfg.models.runtime, state_dir=cfg.storage_dir)
    pause = DiskFullPause(journal, SpaceReserve(cfg.storage_dir / RESERVE_NAME))
    if not pause.reserve.restore():
        pause.begin(None, "worker start")
    if count > 1:
        # Which of the workers wrote a line (the pid changes at every restart).
        structlog.contextvars.bind_contextvars(worker=index)
    log.info("worker.started", pid=os.getpid(), device=str(registry.device), threads=torch.get_num_threads(),
             workers=count)
    parent = mp.parent_process()
    while True:
        if parent is not None and not parent.is_alive():
            # The node was killed (kill -9); its end of the pipe closed with
            # it. Exit; the next node re-queues whatever this worker held.
            log.warning("worker.orphaned_exit")
            break
        if stop.is_set():
            break
        try:
            if folder_signature(registry.models_dir) != registry.current.signature:
                beat.phase(Phase.LOADING)
            if registry.refresh():
                for path, err in registry.errors:
                    log.error("models.unusable", bundle=str(path), error=err)
                log.info("models.loaded", models=[b.describe()["name"] for b in registry.bundles],
                         model_set=registry.key)
                write_models_state(cfg, registry)
            beat.phase(Phase.IDLE)
            if not any(b.task != "view" for b in registry.bundles):
                stop.wait(2.0)
                continue
            wait_s = work_once(cfg, journal, store, registry, pause, beat=beat)
            if wait_s:
                stop.wait(wait_s)
        except Exception:  # a journal hiccup must not kill the loop
            log.exception("worker.loop_error")
            beat.phase(Phase.IDLE)
            stop.wait(2.0)
    beat.phase(Phase.STOPPING)
    log.info("worker.stopped", reason=stop.reason or "orphaned")
    beat.stop()


def worker_process(
    cfg: Config,
    stop: StopListener,
    beat: HeartbeatWriter,
    log_path: str | None = None,
    index: int = 0,
    count: int = 1,
) -> None:
    """The worker process's entry point: :func:`worker_main`, then leave at once.

    Everything the worker owes is on disk when :func:`worker_main` returns
    (results and SRs are committed, the log is flushed here). The
    interpreter's own shutdown in a process that loaded torch (thread pools,
    module teardown) takes seconds on a busy machine, and the node's stop
    would wait for it: ``os._exit`` skips it.
    """
    code = 0
    try:
        worker_main(cfg, stop, beat, log_path, index, count)
    except BaseException:  # logged, then the exit status says it
        log.exception("worker.crashed")
        code = 1
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(code)
