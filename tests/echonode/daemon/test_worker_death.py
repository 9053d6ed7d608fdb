"""The inference worker dies at any moment; reload and stop stay bounded, no study is lost or reported twice.

``echonode serve`` runs as a subprocess in its own session (as in
tests/system/test_stage_recovery.py, whose helpers these tests reuse). The worker is
killed with SIGKILL (as the kernel's OOM killer does) in each of its states:
idle waiting for work, loading its models, processing a study, and between
writing a study's SR and recording it. Then the node gets SIGHUP (reload) and
SIGTERM (stop): each must be acted on within a bound, and the study must end
up reported exactly once: one SR file, one outbox row per destination, one
distinct SR at the PACS. The node's whole process group is also sent SIGTERM,
as supervisord's ``stopasgroup`` and systemd's default ``KillMode`` do.

A worker is held in a state with SIGSTOP before it is killed, so that the
kill lands there and not a moment later; "between the SR and its record" is
reached by holding the journal's write lock from the test while the worker
writes the SR.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from echonode.config import Config
from echonode.daemon.workerlink import HEARTBEAT_FILE
from tests.conftest import free_port, make_config, wait_for, with_destination
from tests.factories import make_studies, tiny_bundle
from tests.peers import (
    ServedNode,
    SlowPACS,
    journal_rows,
    send_studies,
    states,
)

STATES = ("idle", "loading", "processing", "recording")
#: Generous bounds that tell "acted on" from "hangs" on a loaded 2-core machine.
RELOAD_BOUND_S = 15.0
STOP_BOUND_S = 45.0


@pytest.fixture
def pacs() -> Iterator[SlowPACS]:
    scp = SlowPACS(free_port())
    scp.start()
    yield scp
    scp.release.set()
    scp.stop()


def _config(tmp_path: Path, pacs_port: int) -> Config:
    cfg = make_config(tmp_path, study={"stable_after_s": 0.5, "check_interval_s": 0.1},
                      models={"max_attempts": 3, "threads": 1},
                      delivery={"retry_initial_s": 0.3, "retry_max_s": 1.0, "check_interval_s": 0.1,
                                "timeout_s": 30.0})
    return with_destination(cfg, "pacs", "PACS", pacs_port)


class Node(ServedNode):
    """ServedNode with the worker's pid, its heartbeat, and bounded signals."""

    def worker_pid(self) -> int | None:
        """The worker process (not multiprocessing's resource tracker), from /proc."""
        assert self.proc is not None
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for pid in (task / "children").read_text().split():
                    with contextlib.suppress(OSError):
                        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                            return int(pid)
        return None

    def heartbeat(self) -> dict:
        try:
            return json.loads((self.cfg.storage_dir / HEARTBEAT_FILE).read_bytes())
        except (OSError, ValueError):
            return {}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def timed(self, sig: int, event: str, bound: float) -> float:
        """Send ``sig`` to the node; seconds until ``event`` appears once more in its log."""
        assert self.proc is not None
        before = self.log_text().count(f'"{event}"')
        t0 = time.monotonic()
        os.kill(self.proc.pid, sig)
        wait_for(lambda: self.log_text().count(f'"{event}"') > before, timeout=bound, interval=0.05,
                 what=f"{event} after {signal.Signals(sig).name}")
        return time.monotonic() - t0

    def stop_within(self, bound: float, *, group: bool = False) -> float:
        """SIGTERM (to the node, or to its whole process group); seconds until it exited 0."""
        assert self.proc is not None
        t0 = time.monotonic()
        if group:
            os.killpg(self.proc.pid, signal.SIGTERM)
        else:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(bound)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the node did not stop within {bound} s of SIGTERM:\n{self.log_text()[-3000:]}")
        elapsed = time.monotonic() - t0
        assert code == 0, self.log_text()[-3000:]
        # Nothing of the node may outlive it: the worker exits with it.
        wait_for(lambda: not _group_alive(self.proc.pid), timeout=10, what="the node's processes to exit")
        self.proc = None
        return elapsed


def _group_alive(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def _stop_when(pid: int, reached, timeout: float, what: str) -> None:
    """SIGSTOP ``pid`` once ``reached()`` is true, and check it still is (the process is frozen there)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reached():
            os.kill(pid, signal.SIGSTOP)
            if reached():
                return
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.002)
    pytest.fail(f"timed out after {timeout}s waiting for the worker {what}")


def _idle(node: Node) -> bool:
    """The worker waits for work: nothing queued or running, and its heartbeat (when it has one) says so."""
    busy = journal_rows(node.cfg, "SELECT 1 FROM studies WHERE state IN ('queued', 'running')")
    return not busy and node.heartbeat().get("phase", "idle") == "idle"


def _running_in(cfg: Config, study_uid: str, pid: int) -> bool:
    return bool(journal_rows(cfg, "SELECT 1 FROM studies WHERE study_uid = ? AND state = 'running' AND worker_pid = ?",
                             (study_uid, pid)))


def _sr_files(cfg: Config, study_uid: str) -> list[str]:
    folder = cfg.storage_dir / "reports" / study_uid
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _delivered(cfg: Config, study_uid: str) -> bool:
    return states(cfg).get(study_uid) == "delivered"


def _assert_reported_once(cfg: Config, study_uid: str, pacs: SlowPACS) -> None:
    (sr_uid,) = [r[0] for r in journal_rows(cfg, "SELECT sr_sop_uid FROM reports WHERE study_uid = ?", (study_uid,))]
    assert _sr_files(cfg, study_uid) == [f"{sr_uid}.dcm"]
    outbox = journal_rows(cfg, "SELECT destination, state FROM outbox WHERE study_uid = ?", (study_uid,))
    assert outbox == [("pacs", "sent")]
    assert pacs.sr_uids() == {study_uid: {sr_uid}}


def kill_worker_then_reload_and_stop(state: str, tmp_path: Path, pacs: SlowPACS) -> dict:
    """Kill -9 the worker in ``state``, then SIGHUP, then SIGTERM; assert the bounds and
    that the study is reported once; return the figures."""
    cfg = _config(tmp_path, pacs.port)
    tiny_bundle(cfg.models_dir, "lvh", seed=1)
    node = Node(cfg, tmp_path)
    studies = make_studies(1, 2)
    study_uid = str(studies[0][0].StudyInstanceUID)
    node.start()
    try:
        worker = wait_for(node.worker_pid, timeout=30, what="the worker process")
        lock: sqlite3.Connection | None = None
        if state == "idle":
            send_studies(cfg.node.port, studies)
            wait_for(lambda: _delivered(cfg, study_uid), timeout=120, interval=0.1, what="the study delivered")
            _stop_when(worker, lambda: _idle(node), 30, "idle")
        elif state == "loading":
            send_studies(cfg.node.port, studies)  # queued while the worker loads its models
            _stop_when(worker, lambda: node.heartbeat().get("phase") == "loading", 90, "loading its models")
        else:
            send_studies(cfg.node.port, studies)
            if state == "processing":
                _stop_when(worker, lambda: _running_in(cfg, study_uid, worker), 90, "processing the study")
            else:
                wait_for(lambda: _running_in(cfg, study_uid, worker), timeout=90, interval=0.002,
                         what="the worker to claim the study")
                # Hold the journal's write lock: the worker writes the SR, then waits to record it.
                lock = sqlite3.connect(cfg.journal_path, timeout=30, isolation_level=None)
                lock.execute("BEGIN IMMEDIATE")
                wait_for(lambda: any(n.endswith(".dcm") for n in _sr_files(cfg, study_uid)), timeout=90,
                         interval=0.01, what="the SR written")
                os.kill(worker, signal.SIGSTOP)
        at_kill = {"study": states(cfg).get(study_uid), "sr_files": len(_sr_files(cfg, study_uid)),
                   "phase": node.heartbeat().get("phase")}
        os.kill(worker, signal.SIGKILL)
        if lock is not None:
            lock.execute("ROLLBACK")
            lock.close()
        reload_s = node.timed(signal.SIGHUP, "node.reloaded", RELOAD_BOUND_S)
        wait_for(lambda: _delivered(cfg, study_uid), timeout=180, interval=0.1,
                 what="the study delivered after the kill")
        stop_s = node.stop_within(STOP_BOUND_S)
        _assert_reported_once(cfg, study_uid, pacs)
        return {"state": state, "at_kill": at_kill, "reload_s": round(reload_s, 2), "stop_s": round(stop_s, 2)}
    finally:
        node.stop()


@pytest.mark.parametrize("state", STATES)
def test_worker_killed_then_reload_and_stop(state: str, tmp_path: Path, pacs: SlowPACS) -> None:
    figures = kill_worker_then_reload_and_stop(state, tmp_path, pacs)
    print(figures)
    if state == "recording":
        # The kill landed between the SR file and its record.
        assert figures["at_kill"]["study"] == "running" and figures["at_kill"]["sr_files"] == 1


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "processing"])
def test_sigterm_to_the_process_group(busy: bool, tmp_path: Path, pacs: SlowPACS) -> None:
    """``kill -TERM -PGID``: node and worker both get SIGTERM; the node stops, the worker with it,
    and a study the worker held is reported once after the next start."""
    cfg = _config(tmp_path, pacs.port)
    tiny_bundle(cfg.models_dir, "lvh", seed=1)
    node = Node(cfg, tmp_path)
    studies = make_studies(1, 2)
    study_uid = str(studies[0][0].StudyInstanceUID)
    node.start()
    try:
        worker = wait_for(node.worker_pid, timeout=30, what="the worker process")
        if busy:
            send_studies(cfg.node.port, studies)
            _stop_when(worker, lambda: _running_in(cfg, study_uid, worker), 90, "processing the study")
            # The group's SIGTERM reaches the worker in the middle of the study.
            assert node.proc is not None
            os.killpg(node.proc.pid, signal.SIGTERM)
            os.kill(worker, signal.SIGCONT)
            t0 = time.monotonic()
            try:
                assert node.proc.wait(STOP_BOUND_S) == 0, node.log_text()[-3000:]
            except subprocess.TimeoutExpired:
                pytest.fail(f"no stop within {STOP_BOUND_S} s of the group's SIGTERM:\n{node.log_text()[-3000:]}")
            stop_s = time.monotonic() - t0
            wait_for(lambda: not _group_alive(node.proc.pid), timeout=10, what="the worker to exit")
            node.proc = None
        else:
            wait_for(lambda: '"models.loaded"' in node.log_text() and _idle(node), timeout=90,
                     what="the worker idle")
            stop_s = node.stop_within(STOP_BOUND_S, group=True)
        assert "worker.killed_on_stop" not in node.log_text()
        print({"busy": busy, "stop_s": round(stop_s, 2)})
        if busy:
            node.start()
            wait_for(lambda: _delivered(cfg, study_uid), timeout=180, interval=0.1,
                     what="the study delivered after the restart")
            node.stop_within(STOP_BOUND_S)
            _assert_reported_once(cfg, study_uid, pacs)
    finally:
        node.stop()
