"""``echonode serve``: wire the components, run until told to stop.

The node process holds the SCP, the scheduler (stability, delivery,
retention) and supervises the inference worker, which runs in its own
process so that receiving never waits for inference and a worker crash
(out of memory, a decoder segfault) cannot take the SCP down.

Signal handlers only set flags; the main loop acts on them.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from pydicom import config as pydicom_config

from .config import Config, load_config
from .journal import Journal
from .logs import get_logger, silence_data_warnings
from .rebuild import check_journal
from .scp import StorageSCP
from .sdnotify import notify, watchdog_interval_s
from .stability import StabilityCheck
from .store import StudyStore

log = get_logger(__name__)

#: [node] keys a SIGHUP does not change (they shape the listening server,
#: the storage and the journal).
RESTART_ONLY_NODE_KEYS = (
    "ae_title", "host", "port", "storage_dir", "max_pdu", "max_associations",
    "network_timeout_s", "acse_timeout_s", "dimse_timeout_s", "tls",
)


def installed_bundles(models_dir: Path) -> list[Path]:
    """Sub-folders of ``models_dir`` that hold a ``bundle.json``."""
    if not models_dir.is_dir():
        return []
    return sorted(p.parent for p in models_dir.glob("*/bundle.json"))


def has_task_models(models_dir: Path) -> bool:
    """True when a bundle other than a view classifier is installed."""
    import json

    for b in installed_bundles(models_dir):
        try:
            task = json.loads((b / "bundle.json").read_text()).get("task")
        except (OSError, ValueError):
            continue
        if task and task != "view":
            return True
    return False


class Node:
    """The running node.

    Parameters
    ----------
    cfg : Config
    config_path : str, optional
        The file ``cfg`` came from, re-read on SIGHUP.
    start_worker : bool
        Run the inference worker process (tests of receiving alone turn it off).
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
        self.scp = StorageSCP(cfg.node, self.store)
        self.stability = StabilityCheck(
            self.journal, cfg.study.stable_after_s, lambda: has_task_models(self.cfg.models_dir)
        )
        self.scheduler = BackgroundScheduler(daemon=True)
        self._stop = threading.Event()
        self._reload = threading.Event()
        self.worker: Any = None
        self.delivery: Any = None
        self._start_worker = start_worker
        self._worker_log_path = worker_log_path
        self.metrics: Any = None

    # -- jobs ---------------------------------------------------------------------

    def _job(self, name: str, fn: Any) -> Any:
        """Wrap a job so that one failing run is logged and counted, never fatal."""

        def run() -> None:
            try:
                fn()
            except Exception:  # noqa: BLE001 - keep the scheduler alive
                log.exception("job.failed", job=name)

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
            self.scheduler.add_job(
                self._job("delivery", self.delivery.run),
                "interval",
                seconds=self.cfg.delivery.check_interval_s,
                id="delivery",
                max_instances=1,
                coalesce=True,
            )
        if self.cfg.retention.enabled:
            from .retention import retention_job

            self.scheduler.add_job(
                self._job("retention", retention_job(self).run),
                "interval",
                seconds=self.cfg.retention.check_interval_s,
                id="retention",
                max_instances=1,
                coalesce=True,
                next_run_time=_now() + timedelta(seconds=min(60.0, self.cfg.retention.check_interval_s)),
            )
        # Run the first stability pass now rather than after one interval.
        self.scheduler.get_job("stability").modify(next_run_time=_now())

    # -- lifecycle ------------------------------------------------------------------

    def recover(self) -> None:
        """Reconcile disk and journal, re-queue interrupted studies."""
        counts = self.store.recover()
        requeued = self.journal.recover_running(self.cfg.models.max_attempts)
        log.info("node.recovered", **counts, interrupted_studies=len(requeued))

    def start(self) -> None:
        self.recover()
        from .delivery import Delivery

        self.delivery = Delivery(self.cfg, self.journal)
        self.scp.start()
        self._schedule()
        self.scheduler.start()
        if self._start_worker:
            from .worker import WorkerSupervisor

            self.worker = WorkerSupervisor(self.cfg, log_path=self._worker_log_path)
            self.worker.start()
        if self.cfg.metrics.enabled:
            from .metrics import MetricsServer

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
        notify("STOPPING=1")
        log.info("node.stopping")
        self.scp.stop()
        if self.worker is not None:
            self.worker.stop()
        self.scheduler.shutdown(wait=True)
        if self.metrics is not None:
            self.metrics.stop()
        log.info("node.stopped")

    def reload(self) -> None:
        """SIGHUP: re-read the config; apply allow-lists, destinations and limits.

        Listening address, AE title, storage, TLS, PDU size, association
        limit and timeouts cannot change without a restart; a changed value
        there is logged and ignored (the running value is kept everywhere).
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
        self.scp.update_policy(new.node)
        if self.delivery is not None:
            self.delivery.update_config(new)
        self.stability.stable_after_s = new.study.stable_after_s
        if self.worker is not None:
            self.worker.reload(new)
        log.info("node.reloaded")
        notify("READY=1")

    def run_forever(self) -> int:
        """Start, then wait for SIGTERM/SIGINT (stop) or SIGHUP (reload)."""
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        self.start()
        wd = watchdog_interval_s()
        last_wd = 0.0
        try:
            while not self._stop.wait(0.5):
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload()
                if self.worker is not None:
                    self.worker.supervise()
                if wd and time.monotonic() - last_wd >= wd:
                    notify("WATCHDOG=1")
                    last_wd = time.monotonic()
        finally:
            self.stop()
        return 0


def _now() -> Any:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)
