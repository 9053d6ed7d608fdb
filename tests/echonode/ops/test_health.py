"""``/health`` tells the truth and answers at once: idle clients, a frozen worker, a queue that does not move.

A node runs in the test process (its worker, where there is one, is a real
process); clients are raw sockets and urllib. The worker is frozen with
SIGSTOP and thawed with SIGCONT.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from echonode.daemon.node import Node
from echonode.daemon.supervisor import WorkerSupervisor
from echonode.daemon.workerlink import Phase, read_heartbeat
from echonode.ops.prometheus import REQUEST_DEADLINE_S
from tests.conftest import free_port, make_config, wait_for
from tests.factories import us_multiframe
from tests.peers import get_health, scrape


@pytest.fixture
def node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Node]:
    """A node with metrics on; ``@pytest.mark.parametrize("node", [{...}], indirect=True)`` sets
    ``worker`` (default False) and ``[metrics]`` keys."""
    opts = dict(getattr(request, "param", {}))
    worker = opts.pop("worker", False)
    cfg = make_config(tmp_path, study={"stable_after_s": 3600.0},
                      metrics={"enabled": True, "port": free_port(), **opts})
    n = Node(cfg, start_worker=worker)
    n.start()
    try:
        yield n
    finally:
        if n.worker is not None and n.worker.process is not None:
            os.kill(n.worker.process.pid, signal.SIGCONT)
        n.stop()


def timed_health(port: int) -> tuple[float, int, dict]:
    t0 = time.monotonic()
    code, doc = get_health(port)
    return time.monotonic() - t0, code, doc


# -- one client cannot stall another ------------------------------------------------------------


def test_an_idle_connection_does_not_delay_health(node: Node) -> None:
    port = node.cfg.metrics.port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    try:
        time.sleep(0.2)  # the server has accepted them and waits for their requests
        seconds, code, _ = timed_health(port)
        # Served one at a time, /health waited for the idle client's 10 s timeout.
        assert code == 200 and seconds < 3.0, seconds
        assert ("echonode_scp_up", ()) in scrape(port)
    finally:
        for s in idle:
            s.close()


def test_a_trickling_client_is_cut_off_at_the_request_deadline(node: Node) -> None:
    """One byte a second keeps a per-read timeout happy for ever; the deadline is for the whole request."""
    port = node.cfg.metrics.port
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(REQUEST_DEADLINE_S + 10)
        t0 = time.monotonic()
        closed = False
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n":
            try:
                s.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.5)
            if time.monotonic() - t0 > REQUEST_DEADLINE_S + 2:
                break
        if not closed:
            try:
                closed = s.recv(1024) == b""
            except ConnectionResetError:
                closed = True
        elapsed = time.monotonic() - t0
    assert closed, "the server kept the trickling connection"
    assert REQUEST_DEADLINE_S - 0.5 <= elapsed <= REQUEST_DEADLINE_S + 3, elapsed
    assert get_health(port)[0] == 200


# -- the worker's heartbeat --------------------------------------------------------------------


@pytest.mark.parametrize("node", [{"worker": True, "worker_stale_s": 3.0}], indirect=True)
def test_health_turns_red_while_the_worker_is_frozen(node: Node) -> None:
    port = node.cfg.metrics.port
    wait_for(lambda: (b := read_heartbeat(node.worker.heartbeat_path)) is not None
             and b.pid == node.worker.process.pid and b.phase == Phase.IDLE, timeout=90, what="the worker idle")
    code, doc = get_health(port)
    assert code == 200 and doc["worker"] is True and doc["worker_phase"] == "idle", doc
    assert doc["worker_heartbeat_age_s"] < 3.0
    pid = node.worker.process.pid
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        wait_for(lambda: get_health(port)[0] == 503, timeout=30, interval=0.1, what="health to turn red")
        red_after = time.monotonic() - t0
        code, doc = get_health(port)
        assert doc["worker"] is False
        assert any(r.startswith("worker: no heartbeat for ") and f"(process {pid} stopped or frozen)" in r
                   for r in doc["reasons"]), doc
        assert scrape(port)[("echonode_worker_heartbeat_age_seconds", ())] > 3.0
    finally:
        os.kill(pid, signal.SIGCONT)
    t1 = time.monotonic()
    wait_for(lambda: get_health(port)[0] == 200, timeout=30, interval=0.1, what="health to turn green again")
    print({"red_after_s": round(red_after, 2), "green_after_s": round(time.monotonic() - t1, 2)})


def test_the_supervisor_kills_a_worker_frozen_past_the_study_timeout(tmp_path: Path) -> None:
    """No study is running, so the claim's age says nothing: the silent heartbeat does."""
    cfg = make_config(tmp_path, models={"study_timeout_s": 1.0})
    sup = WorkerSupervisor(cfg)
    sup.start()
    first = sup.process.pid
    try:
        wait_for(lambda: (b := read_heartbeat(sup.heartbeat_path)) is not None and b.pid == first
                 and b.phase == Phase.IDLE, timeout=90, what="the worker idle")
        os.kill(first, signal.SIGSTOP)
        t0 = time.monotonic()
        with capture_logs() as logs:
            wait_for(lambda: (sup.supervise(), sup.process is not None and sup.process.pid != first)[1],
                     timeout=60, interval=0.2, what="the frozen worker replaced")
        killed_after = time.monotonic() - t0
        (hung,) = [e for e in logs if e["event"] == "worker.hung"]
        assert hung["pid"] == first and hung["phase"] == "idle" and hung["heartbeat_age_s"] >= 5.0
        assert sup.restarts == 1
        print({"killed_after_s": round(killed_after, 2)})
    finally:
        if _exists(first):
            os.kill(first, signal.SIGCONT)
        sup.stop()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- a queue that moves ---------------------------------------------------------------------------


@pytest.mark.parametrize("node", [{"queue_stall_s": 1.0}], indirect=True)
def test_health_turns_red_when_the_queue_does_not_move(node: Node) -> None:
    port = node.cfg.metrics.port
    ds = us_multiframe(frames=4, rows=16, cols=16)
    path = node.store.incoming / "t-a.dcm"
    ds.save_as(path, enforce_file_format=True)
    node.store.accept(path, "CART")
    node.journal.mark_stable(-1)
    assert node.journal.queue_stable() == [str(ds.StudyInstanceUID)]
    assert get_health(port)[0] == 200  # just queued
    wait_for(lambda: get_health(port)[0] == 503, timeout=10, interval=0.2, what="the stalled queue to show")
    code, doc = get_health(port)
    assert doc["queue"] is False and doc["queued"] == 1 and doc["running"] == 0
    (reason,) = doc["reasons"]
    assert reason.startswith("queue: 1 studies queued, none processed for "), reason
    # Being processed is moving, however long it takes (models.study_timeout_s judges that).
    node.journal.claim_next(os.getpid())
    code, doc = get_health(port)
    assert code == 200 and doc["queue"] is True and doc["running"] == 1
