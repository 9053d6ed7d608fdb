"""The node's main loop outlives any one step's error; jobs count their failures; one way to reload.

``Node.run_forever`` runs here in the test's main thread (it installs signal
handlers, which only the main thread may), with a real worker process, while
a second thread injects the fault, checks the node from outside (C-ECHO,
``/health``, ``/metrics``) and finally asks it to stop.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from echonode.config import Config, to_toml
from echonode.daemon.node import FAILING_AFTER, Node
from echonode.daemon.supervisor import WorkerSupervisor
from echonode.delivery.dimse import Peer, echo
from echonode.delivery.outbox import Delivery
from echonode.studies.journal import Journal
from tests.conftest import free_port, make_config, wait_for
from tests.peers import get_health, scrape


def run_node(node: Node, checks: Callable[[Node], None], timeout: float = 120) -> None:
    """``node.run_forever()`` in this thread while ``checks(node)`` runs in another; then stop.

    A failure in ``checks`` is raised here, after the node stopped; so is an
    exception that ends ``run_forever`` (a main loop that died).
    """
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    failure: list[BaseException] = []

    def drive() -> None:
        try:
            wait_for(lambda: node.scp.listening, timeout=30, what="the node to listen")
            checks(node)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            failure.append(exc)
        finally:
            node._stop.set()

    driver = threading.Thread(target=drive, name="test-driver", daemon=True)
    driver.start()
    try:
        assert node.run_forever() == 0
    finally:
        node._stop.set()
        driver.join(timeout)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert not driver.is_alive(), "the checks did not finish"
    if failure:
        raise failure[0]


def _config(tmp_path: Path, **sections: dict) -> Config:
    return make_config(tmp_path, metrics={"enabled": True, "port": free_port()}, **sections)


def _echo_ok(node: Node) -> bool:
    return echo("CART", Peer(node.cfg.node.ae_title, "127.0.0.1", node.scp.port), timeout_s=5) == 0


class Fault:
    """Make ``cls.name`` raise ``error`` while :attr:`on`, counting the calls it spoilt."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type, name: str, error: Exception) -> None:
        self.on = True
        self.hits = 0
        original = getattr(cls, name)

        def faulty(*args, **kwargs):  # type: ignore[no-untyped-def]
            if self.on:
                self.hits += 1
                raise error
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, faulty)


def test_a_sqlite_error_in_supervise_is_counted_and_the_loop_goes_on(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    node = Node(_config(tmp_path))
    port = node.cfg.metrics.port

    def checks(node: Node) -> None:
        wait_for(lambda: node.worker.process is not None and node.worker.process.is_alive(), timeout=30,
                 what="the worker")
        fault = Fault(monkeypatch, Journal, "running", sqlite3.OperationalError("database disk image is malformed"))
        wait_for(lambda: fault.hits >= FAILING_AFTER + 1, timeout=30, what="supervise to fail a few times")
        # Still receiving, and the failing step is visible.
        assert _echo_ok(node)
        code, doc = get_health(port)
        assert code == 503 and doc["loop"] is False
        assert any(r.startswith("loop: loop step supervise failed ") for r in doc["reasons"]), doc
        assert scrape(port)[("echonode_loop_errors_total", (("step", "supervise"),))] >= FAILING_AFTER
        # The fault goes away: so does the alarm; the total stays.
        fault.on = False
        wait_for(lambda: get_health(port)[0] == 200, timeout=10, what="health to recover")
        assert node.loop_errors.totals()["supervise"] == fault.hits

    with capture_logs() as logs:
        run_node(node, checks)
    failed = [e for e in logs if e["event"] == "loop.step_failed"]
    assert failed and all(e["step"] == "supervise" and e["log_level"] == "error" for e in failed)
    assert [e["in_a_row"] for e in failed[:3]] == [1, 2, 3]


def test_a_worker_that_cannot_start_does_not_stop_the_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while the supervisor restarts the worker: logged, counted, tried again; the SCP
    keeps listening; once space returns the worker runs again; the stop is bounded."""
    node = Node(_config(tmp_path))
    port = node.cfg.metrics.port
    stop_s: list[float] = []

    def checks(node: Node) -> None:
        first = wait_for(lambda: node.worker.process is not None and node.worker.process.pid, timeout=30,
                         what="the worker")
        fault = Fault(monkeypatch, WorkerSupervisor, "start", OSError(errno.ENOSPC, "No space left on device"))
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: fault.hits >= 2, timeout=30, what="two failed restarts")
        assert _echo_ok(node)
        code, doc = get_health(port)
        assert code == 503 and doc["worker"] is False and doc["scp"] is True
        assert scrape(port)[("echonode_loop_errors_total", (("step", "supervise"),))] >= 2
        fault.on = False
        wait_for(lambda: node.worker.process is not None and node.worker.process.is_alive(), timeout=90,
                 what="the worker to start once the disk has room")
        assert node.worker.process.pid != first
        stop_s.append(time.monotonic())

    run_node(node, checks)
    assert time.monotonic() - stop_s[0] < 30, "the stop took too long"
    assert node.worker.process is None  # stopped, not left behind


def test_job_failures_are_counted_per_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, study={"stable_after_s": 0.1, "check_interval_s": 0.1})
    node = Node(cfg, start_worker=False)
    fault = Fault(monkeypatch, Journal, "mark_stable", sqlite3.OperationalError("database is locked"))
    node.start()
    try:
        port = cfg.metrics.port
        wait_for(lambda: node.job_errors.failing().get("stability", 0) >= FAILING_AFTER, timeout=30,
                 what="the stability job to fail in a row")
        m = scrape(port)
        assert m[("echonode_job_failures_total", (("job", "stability"),))] >= FAILING_AFTER
        assert ("echonode_job_failures_total", (("job", "delivery"),)) not in m
        code, doc = get_health(port)
        assert code == 503 and any("job stability failed" in r for r in doc["reasons"]), doc
        fault.on = False
        wait_for(lambda: get_health(port)[0] == 200, timeout=10, what="health to recover")
        assert node.job_errors.totals()["stability"] >= FAILING_AFTER
    finally:
        node.stop()


# -- one way to reload ---------------------------------------------------------------


def test_every_component_takes_a_reload_through_apply_config(tmp_path: Path) -> None:
    """SIGHUP end to end: allow-list, stability, retention, destinations and the worker's models
    folder each change through ``apply_config``, and one component that refuses the new
    settings leaves the others updated and the node running."""
    from tests.factories import tiny_bundle

    cfg = make_config(tmp_path, node={"allowed_calling_aets": ["CART"]}, study={"stable_after_s": 3600.0})
    path = tmp_path / "echonode.toml"
    path.write_text(to_toml(cfg))
    node = Node(cfg, str(path))
    new_models = tmp_path / "models-b"
    tiny_bundle(new_models, "lvh")

    def checks(node: Node) -> None:
        first = wait_for(lambda: node.worker.process is not None and node.worker.process.pid, timeout=30,
                         what="the worker")
        assert [name for name, _ in node.configurables()] == ["scp", "stability", "retention", "delivery", "agreement", "worker"]
        assert all(callable(getattr(c, "apply_config", None)) for _, c in node.configurables())
        new = make_config(tmp_path, node={"allowed_calling_aets": ["CART", "CART2"], "port": cfg.node.port},
                          study={"stable_after_s": 0.5}, models={"dir": str(new_models)},
                          retention={"enabled": True, "max_age_days": 7},
                          destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}])
        path.write_text(to_toml(new))
        os.kill(os.getpid(), signal.SIGHUP)
        wait_for(lambda: node.stability.stable_after_s == 0.5, timeout=10, what="the reload")
        assert node.scp.policy.calling_aets == frozenset({"CART", "CART2"})
        assert node.retention.settings.max_age_days == 7
        assert [d.name for d in node.delivery.cfg.destinations] == ["pacs"]
        assert node.stability.models_dir == new_models
        wait_for(lambda: node.worker.process is not None and node.worker.process.pid != first, timeout=60,
                 what="the worker restarted with the new settings")
        assert node.worker.restarts == 0  # a reload, not a death
        assert node.worker.cfg.models_dir == new_models

    run_node(node, checks)


def test_a_component_that_refuses_the_reload_does_not_stop_the_others(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_config(tmp_path, study={"stable_after_s": 3600.0})
    path = tmp_path / "echonode.toml"
    path.write_text(to_toml(cfg))
    node = Node(cfg, str(path), start_worker=False)
    Fault(monkeypatch, Delivery, "apply_config", RuntimeError("refused"))
    node.start()
    try:
        path.write_text(to_toml(dataclasses.replace(cfg, study=dataclasses.replace(cfg.study, stable_after_s=5.0))))
        with capture_logs() as logs:
            node.reload()
        assert node.stability.stable_after_s == 5.0
        (event,) = [e for e in logs if e["event"] == "node.reload_component_failed"]
        assert event["component"] == "delivery"
        (done,) = [e for e in logs if e["event"] == "node.reloaded"]
        assert done["failed"] == ["delivery"]
    finally:
        node.stop()
