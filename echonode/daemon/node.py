"""``echonode serve``: wire the components, run until told to stop.

The node process holds the SCP, the scheduler (stability, delivery,
retention, agreement) and supervises the inference worker, which runs in its own
process so that receiving never waits for inference and a worker crash
(out of memory, a decoder segfault) cannot take the SCP down.

Signal handlers only set flags; the main loop acts on them. Each step of
the loop (reload, supervise the worker, watchdog) and each scheduled job
runs in its own try/except that logs the error (type and frames) and counts
it: one failing step never ends the node, and a step that keeps failing
shows in ``/health`` and in the metrics.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

from apscheduler.schedulers.background import BackgroundScheduler
from pydicom import config as pydicom_config

from echonode.agreement.record import ReferenceJob
from echonode.bundles.installed import has_task_models
from echonode.config import Config, load_config
from echonode.daemon.receivers import ReceiverPool
from echonode.daemon.supervisor import WorkerPool, remove_unrecorded_reports
from echonode.delivery.outbox import Delivery
from echonode.ops.logs import get_logger, silence_data_warnings
from echonode.ops.prometheus import MetricsServer
from echonode.ops.sdnotify import notify, watchdog_interval_s
from echonode.receive.scp import ReceiveCounters, StorageSCP
from echonode.studies.journal import Journal
from echonode.studies.rebuild import check_journal
from echonode.studies.retention import Retention
from echonode.studies.stability import StabilityCheck
from echonode.studies.store import StudyStore

log = get_logger(__name__)

#: Seconds between two turns of the main loop.
LOOP_INTERVAL_S = 0.5
#: Failures in a row after which a loop step or a job counts as failing (``/health``).
FAILING_AFTER = 3

#: [node] keys a SIGHUP does not change (they shape the listening server,
#: the storage and the journal).
RESTART_ONLY_NODE_KEYS = (
    "ae_title", "host", "port", "storage_dir", "max_pdu", "max_associations",
    "network_timeout_s", "acse_timeout_s", "dimse_timeout_s", "tls", "receivers",
)


class Configurable(Protocol):
    """A component that takes new settings on SIGHUP: the node calls ``apply_config``
    with the whole new :class:`Config`, and the component reads what concerns it."""

    def apply_config(self, cfg: Config) -> None: ...


class ErrorCounts:
    """Failures of named steps (loop steps or jobs): a total, and how many in a row.

    Updated from the main loop and from the scheduler's threads; read by the
    metrics and ``/health``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total: Counter[str] = Counter()
        self.in_a_row: Counter[str] = Counter()

    def succeeded(self, name: str) -> None:
        with self._lock:
            self.in_a_row.pop(name, None)

    def failed(self, name: str) -> None:
        with self._lock:
            self.total[name] += 1
            self.in_a_row[name] += 1

    def totals(self) -> dict[str, int]:
        """Failures since start, per name."""
        with self._lock:
            return dict(self.total)

    def failing(self, after: int = FAILING_AFTER) -> dict[str, int]:
        """Names that failed at least ``after`` times in a row, with that count."""
        with self._lock:
            return {name: n for name, n in self.in_a_row.items() if n >= after}


class Node:
    """The running node.

    Parameters
    ----------
    cfg : Config
    config_path : str, optional
        The file ``cfg`` came from, re-read on SIGHUP.
    start_worker : bool
        Run the inference worker process (tests of receiving alone turn it off).
    worker_log_path : str, optional
        File the worker appends its log to (default: stderr).
    """

    def __init__(
        self,
        cfg: Config,
        config_path: str | None = None,
        *,
        start_worker: bool = True,
        worker_log_path: str | None = None,
    ) -> None:
        # Received data is parsed leniently; never echo element values
        # (which may be patient names) into warnings.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
        silence_data_warnings()
        self.cfg = cfg
        self.config_path = config_path
        self.storage_dir = cfg.storage_dir
        self.storage_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # A new journal over a storage tree that holds studies would send every SR again.
        check_journal(cfg)
        self.journal = Journal(cfg.journal_path)
        self.store = StudyStore(self.storage_dir, self.journal)
        # With several receivers, every listener on the port (this one too) needs SO_REUSEPORT.
        self.scp = StorageSCP(cfg.node, self.store, reuse_port=cfg.node.receivers > 1)
        #: The receiver processes beside ``scp`` (``node.receivers`` > 1), else None.
        self.receivers: ReceiverPool | None = None
        self.stability = StabilityCheck(self.journal, cfg, has_task_models)
        self.retention = Retention(cfg.retention, self.journal, self.store)
        #: Reads the sonographers' measurement SRs beside the results (None when ``agreement.enabled`` is off).
        self.agreement = ReferenceJob(self.journal, cfg) if cfg.agreement.enabled else None
        self.scheduler = BackgroundScheduler(daemon=True)
        self._stop = threading.Event()
        self._reload = threading.Event()
        #: The inference workers (None when started without them, or before :meth:`start`).
        self.worker: WorkerPool | None = None
        #: Sends the SRs (None before :meth:`start`).
        self.delivery: Delivery | None = None
        self._start_worker = start_worker
        self._worker_log_path = worker_log_path
        #: ``/metrics``, ``/health`` and ``/status`` (None when ``metrics.enabled`` is off or its port was taken).
        self.metrics: MetricsServer | None = None
        #: Failed turns of each main-loop step (reload, supervise, watchdog).
        self.loop_errors = ErrorCounts()
        #: Failed runs of each scheduled job (stability, delivery, retention, agreement).
        self.job_errors = ErrorCounts()
        self._last_watchdog = 0.0

    # -- jobs ---------------------------------------------------------------------

    def _job(self, name: str, fn: Callable[[], object]) -> Callable[[], None]:
        """Wrap a job so that one failing run is logged and counted in :attr:`job_errors`, never fatal."""

        def run() -> None:
            try:
                fn()
            except Exception:  # keep the scheduler alive
                self.job_errors.failed(name)
                log.exception("job.failed", job=name, in_a_row=self.job_errors.in_a_row[name])
            else:
                self.job_errors.succeeded(name)

        run.__name__ = name
        return run

    def _schedule(self) -> None:
        s = self.cfg.study
        self.scheduler.add_job(
            self._job("stability", self.stability.run),
            "interval",
            seconds=s.check_interval_s,
            id="stability",
            max_instances=1,
            coalesce=True,
            next_run_time=None,
        )
        if self.delivery is not None:
            # dispatch() starts each destination's pass in that destination's
            # own lane and returns at once, so the job never waits on a peer:
            # a destination stuck mid-answer cannot make the scheduler skip
            # the passes that serve the others.
            self.scheduler.add_job(
                self._job("delivery", self.delivery.dispatch),
                "interval",
                seconds=self.cfg.delivery.check_interval_s,
                id="delivery",
                max_instances=1,
                coalesce=True,
            )
        if self.cfg.retention.enabled:
            self.scheduler.add_job(
                self._job("retention", self.retention.run),
                "interval",
                seconds=self.cfg.retention.check_interval_s,
                id="retention",
                max_instances=1,
                coalesce=True,
                next_run_time=_now() + timedelta(seconds=min(60.0, self.cfg.retention.check_interval_s)),
            )
        if self.agreement is not None:
            # Apart from the worker: reading an SR takes milliseconds, and a
            # broken one can never hold up a study's AI SR.
            self.scheduler.add_job(
                self._job("agreement", self.agreement.run),
                "interval",
                seconds=self.cfg.agreement.check_interval_s,
                id="agreement",
                max_instances=1,
                coalesce=True,
            )
        # Run the first stability pass now rather than after one interval.
        self.scheduler.get_job("stability").modify(next_run_time=_now())

    # -- lifecycle ------------------------------------------------------------------

    def recover(self) -> None:
        """Reconcile disk and journal, re-queue interrupted studies."""
        counts = self.store.recover()
        # No association outlives the node: those the journal holds open were cut.
        self.journal.end_open_associations()
        requeued = self.journal.recover_running(self.cfg.models.max_attempts)
        remove_unrecorded_reports(self.storage_dir, self.journal, requeued)
        log.info("node.recovered", **counts, interrupted_studies=len(requeued))

    def start(self) -> None:
        self.recover()
        self.delivery = Delivery(self.cfg, self.journal)
        self.scp.start()
        if self.cfg.node.receivers > 1:
            self.receivers = ReceiverPool(self.cfg, log_path=self._worker_log_path)
            self._step("receivers", self.receivers.supervise)
        self._schedule()
        self.scheduler.start()
        if self._start_worker:
            self.worker = WorkerPool(self.cfg, log_path=self._worker_log_path)
            # A worker that cannot start now (a full disk) is started by the
            # main loop's next turns; receiving goes on meanwhile.
            self._step("supervise", self.worker.supervise)
        if self.cfg.metrics.enabled:
            self.metrics = MetricsServer(self, self.cfg.metrics.host, self.cfg.metrics.port)
            try:
                self.metrics.start()
            except OSError as exc:  # receiving matters more than being scraped
                log.error("metrics.not_started", port=self.cfg.metrics.port, error=exc.strerror)
                self.metrics = None
        if not self.cfg.destinations:
            log.warning("node.no_destinations", effect="SRs are built and kept, none is sent")
        notify(f"READY=1\nSTATUS=listening on port {self.scp.port} as {self.cfg.node.ae_title}")
        log.info("node.ready", port=self.scp.port, ae_title=self.cfg.node.ae_title)

    def stop(self) -> None:
        """Stop receiving, the worker, the jobs and the metrics; each part even if another fails."""
        notify("STOPPING=1")
        log.info("node.stopping")
        if self.receivers is not None:
            # Asked first, so that their associations finish alongside this process's.
            self._step("stop_receivers", self.receivers.ask_to_stop)
        self._step("stop_scp", self.scp.stop)
        if self.receivers is not None:
            self._step("stop_receivers", self.receivers.stop)
        if self.delivery is not None:
            # Bounded: attempts in flight get a short grace, then are cut or
            # left behind with their rows pending (sent again at the next start).
            self._step("stop_delivery", self.delivery.stop)
        if self.worker is not None:
            self._step("stop_worker", self.worker.stop)
        if self.scheduler.running:
            self._step("stop_scheduler", lambda: self.scheduler.shutdown(wait=True))
        if self.metrics is not None:
            self._step("stop_metrics", self.metrics.stop)
        log.info("node.stopped")

    def receive_counters(self) -> ReceiveCounters:
        """What every listener of the node received (its own SCP and the receiver processes)."""
        if self.receivers is None:
            return self.scp.counters
        total = ReceiveCounters()
        for counts in [self.scp.counters.to_dict(), *self.receivers.counts()]:
            total.add(counts)
        return total

    def configurables(self) -> list[tuple[str, Configurable]]:
        """The components a reload hands the new settings to, by name."""
        parts: list[tuple[str, Configurable]] = [
            ("scp", self.scp), ("stability", self.stability), ("retention", self.retention),
        ]
        if self.delivery is not None:
            parts.append(("delivery", self.delivery))
        if self.agreement is not None:
            parts.append(("agreement", self.agreement))
        if self.worker is not None:
            parts.append(("worker", self.worker))
        if self.receivers is not None:
            parts.append(("receivers", self.receivers))
        return parts

    def reload(self) -> None:
        """SIGHUP: re-read the config; every component takes it through ``apply_config``.

        Listening address, AE title, storage, TLS, PDU size, association
        limit and timeouts cannot change without a restart; a changed value
        there is logged and ignored (the running value is kept everywhere).
        Scheduling intervals keep their running values too.
        """
        if not self.config_path:
            log.warning("node.reload_ignored", reason="no config file")
            return
        notify("RELOADING=1")
        try:
            new = load_config(self.config_path)
        except Exception as exc:  # noqa: BLE001 - a bad edit must not stop a running node
            log.error("node.reload_failed", error=str(exc))
            notify("READY=1")
            return
        # What the listening socket, the storage and the worker's journal
        # were built with stays as it is until a restart: applying half of
        # it (a new storage_dir for the worker only, a TLS setting that the
        # open server never sees) would be worse than not applying it.
        kept = {}
        for key in RESTART_ONLY_NODE_KEYS:
            if getattr(new.node, key) != getattr(self.cfg.node, key):
                log.warning("node.reload_needs_restart", key=f"node.{key}")
            kept[key] = getattr(self.cfg.node, key)
        new = dataclasses.replace(new, node=dataclasses.replace(new.node, **kept))
        self.cfg = new
        failed = []
        for name, component in self.configurables():
            try:
                component.apply_config(new)
            except Exception:  # the other components still take the new settings
                log.exception("node.reload_component_failed", component=name)
                failed.append(name)
        log.info("node.reloaded", **({"failed": failed} if failed else {}))
        notify("READY=1")

    # -- the main loop ----------------------------------------------------------------

    def _step(self, name: str, fn: Callable[[], object]) -> None:
        """Run one step; an error is logged (type and frames), counted, and the loop goes on."""
        try:
            fn()
        except Exception:  # the daemon outlives any one step's error
            self.loop_errors.failed(name)
            log.exception("loop.step_failed", step=name, in_a_row=self.loop_errors.in_a_row[name])
        else:
            self.loop_errors.succeeded(name)

    def _reload_if_asked(self) -> None:
        if self._reload.is_set():
            self._reload.clear()
            self.reload()

    def _supervise(self) -> None:
        if self.worker is not None:
            self.worker.supervise()

    def _watchdog(self) -> None:
        interval = watchdog_interval_s()
        if interval and time.monotonic() - self._last_watchdog >= interval:
            notify("WATCHDOG=1")
            self._last_watchdog = time.monotonic()

    def loop_once(self) -> None:
        """One turn of the main loop: each step on its own."""
        self._step("reload", self._reload_if_asked)
        self._step("supervise", self._supervise)
        if self.receivers is not None:
            self._step("receivers", self.receivers.supervise)
        self._step("watchdog", self._watchdog)

    def run_forever(self) -> int:
        """Start, then wait for SIGTERM/SIGINT (stop) or SIGHUP (reload)."""
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        try:
            self.start()
            while not self._stop.wait(LOOP_INTERVAL_S):
                self.loop_once()
        finally:
            self.stop()
        return 0


def _now() -> datetime:
    return datetime.now(UTC)
