"""The node's Prometheus /metrics and /health endpoints, against a running node and real peers.

(``tests/train/test_metrics.py`` tests ``train.metrics``, the AUROC/AUPRC code.)
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY, generate_latest
from structlog.testing import capture_logs

from echonode.daemon.node import Node
from echonode.ops.prometheus import MetricsServer, health
from echonode.studies.records import TaskResult
from tests.conftest import free_port, make_config
from tests.peers import c_store_one, get_health, scrape


@pytest.fixture
def metrics_node(tmp_path: Path):
    cfg = make_config(
        tmp_path,
        node={"allowed_calling_aets": ["CART"]},
        # Nothing moves by itself: the test drives the study states.
        study={"stable_after_s": 3600.0},
        metrics={"enabled": True, "port": free_port()},
    )
    node = Node(cfg, start_worker=False)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def test_metrics_reflect_the_running_node(metrics_node: Node, ybr_loop: Path) -> None:
    node = metrics_node
    port = node.cfg.metrics.port
    assert node.metrics is not None and node.metrics.port == port

    m = scrape(port)
    assert m[("echonode_instances_received_total", ())] == 0
    assert m[("echonode_scp_up", ())] == 1

    assert c_store_one(node.scp.port, ybr_loop, calling="CART") == 0x0000
    assert c_store_one(node.scp.port, ybr_loop, calling="CART") == 0x0000  # identical copy: a duplicate
    assert c_store_one(node.scp.port, ybr_loop, calling="STRANGER") is None  # not on the allow-list
    node.delivery.failures["transient"] = 2  # as Delivery._count leaves them

    m = scrape(port)
    assert m[("echonode_instances_received_total", ())] == 1
    assert m[("echonode_bytes_received_total", ())] == ybr_loop.stat().st_size
    assert m[("echonode_duplicate_instances_total", ())] == 1
    assert m[("echonode_associations_total", ())] == 2
    assert m[("echonode_associations_rejected_total", ())] == 1
    assert m[("echonode_studies", (("state", "receiving"),))] == 1
    assert m[("echonode_studies", (("state", "delivered"),))] == 0
    assert m[("echonode_queue_depth", ())] == 0
    assert m[("echonode_outbox", (("state", "pending"),))] == 0
    assert m[("echonode_outbox", (("state", "dead"),))] == 0
    assert m[("echonode_delivery_failures_total", (("reason", "transient"),))] == 2
    assert m[("echonode_stored_bytes", ())] == ybr_loop.stat().st_size
    assert m[("echonode_storage_free_bytes", ())] > 0
    assert m[("echonode_worker_up", ())] == 0
    assert m[("echonode_worker_restarts_total", ())] == 0
    assert m[("echonode_inference_seconds_count", ())] == 0

    # Through the journal as the worker would: queued, then reported with a time.
    j = node.journal
    j.mark_stable(0.0)
    j.queue_stable()
    assert scrape(port)[("echonode_queue_depth", ())] == 1
    claim = j.claim_next(os.getpid())
    results = [
        TaskResult(task, "b-" + task, "1", "1.2.3", 0.7, True, 0.5, 1, {"videos": [0.7], "seconds": 3.5})
        for task in ("lvh", "severe_as")
    ]
    j.finish_reported(claim, "set1", results, None, [])

    m = scrape(port)
    assert m[("echonode_studies", (("state", "delivered"),))] == 1
    assert m[("echonode_queue_depth", ())] == 0
    # One study, two task rows: one observation.
    assert m[("echonode_inference_seconds_count", ())] == 1
    assert m[("echonode_inference_seconds_sum", ())] == pytest.approx(3.5)
    assert m[("echonode_inference_seconds_bucket", (("le", "2.5"),))] == 0
    assert m[("echonode_inference_seconds_bucket", (("le", "5.0"),))] == 1
    assert m[("echonode_inference_seconds_bucket", (("le", "+Inf"),))] == 1
    # Counters only grow: a second scrape does not count the study again.
    assert scrape(port)[("echonode_inference_seconds_count", ())] == 1

    # The process-wide default registry is left alone.
    assert b"echonode_" not in generate_latest(REGISTRY)


def test_health(metrics_node: Node) -> None:
    port = metrics_node.cfg.metrics.port
    assert get_health(port) == (200, {"status": "ok", "scp": True, "worker": None, "queue": True, "loop": True,
                                      "reasons": [], "queued": 0, "running": 0})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        assert r.headers["Content-Type"] == "application/json"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nothing", timeout=10)
    assert err.value.code == 404
    metrics_node.scp.stop(grace_s=1)
    code, doc = get_health(port)
    assert code == 503 and doc["status"] == "unavailable" and doc["scp"] is False
    assert doc["reasons"] == ["scp: not listening"]
    assert scrape(port)[("echonode_scp_up", ())] == 0


def _fake_node(process, heartbeat=(0.5, None), stale_s: float = 15.0):
    journal = SimpleNamespace(counts=lambda: {}, oldest_queued=lambda: None)
    return SimpleNamespace(
        scp=SimpleNamespace(listening=True), _start_worker=True, journal=journal,
        cfg=SimpleNamespace(metrics=SimpleNamespace(worker_stale_s=stale_s, queue_stall_s=600.0)),
        worker=SimpleNamespace(process=process, heartbeat=lambda: heartbeat),
    )


def test_health_follows_the_worker_process() -> None:
    alive = SimpleNamespace(is_alive=lambda: True, pid=4321)
    dead = SimpleNamespace(is_alive=lambda: False, pid=4321)
    node = _fake_node(alive)
    code, doc = health(node)
    assert (code, doc["status"], doc["worker"], doc["reasons"]) == (200, "ok", True, [])
    assert doc["worker_heartbeat_age_s"] == 0.5
    node.worker.process = dead
    code, doc = health(node)
    assert (code, doc["status"], doc["worker"]) == (503, "unavailable", False)
    assert doc["reasons"] == ["worker: process not running (crashed or killed; the node restarts it)"]
    node.worker.process = None  # between a crash and the restart
    assert health(node)[0] == 503
    # Alive but silent (SIGSTOP, frozen): not healthy, and the reason says so.
    node = _fake_node(alive, heartbeat=(16.2, None))
    code, doc = health(node)
    assert (code, doc["worker"]) == (503, False)
    assert doc["reasons"] == ["worker: no heartbeat for 16 s (process 4321 stopped or frozen)"]


def test_off_by_default_and_on_loopback(tmp_path: Path) -> None:
    port = free_port()
    cfg = make_config(tmp_path, metrics={"port": port})
    assert cfg.metrics.enabled is False
    assert make_config(tmp_path).metrics.host == "127.0.0.1"
    node = Node(cfg, start_worker=False)
    node.start()
    try:
        assert node.metrics is None
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    finally:
        node.stop()


def test_port_taken_does_not_stop_the_node(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cfg = make_config(tmp_path, metrics={"enabled": True, "port": busy.getsockname()[1]})
        node = Node(cfg, start_worker=False)
        with capture_logs() as logs:
            node.start()
        try:
            assert node.metrics is None
            assert any(e["event"] == "metrics.not_started" for e in logs)
            assert node.scp.port  # still receiving
        finally:
            node.stop()


def test_server_stops_and_frees_its_port(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    node = Node(cfg, start_worker=False)
    server = MetricsServer(node, "127.0.0.1", 0)
    server.start()
    port = server.port
    assert ("echonode_scp_up", ()) in scrape(port)
    server.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
