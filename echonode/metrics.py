"""Prometheus ``/metrics`` and a ``/health`` probe over HTTP.

Off by default, loopback by default (``[metrics]`` in the config). Nothing is
counted twice: a custom collector reads the live objects of the running node
(the SCP's :class:`~echonode.scp.ReceiveCounters`, ``Delivery.failures``, the
worker supervisor, the journal) at scrape time, into a registry of its own,
so the process-wide default registry is never touched and two nodes in one
process (tests) do not collide.

The server is a plain :mod:`http.server` in a daemon thread, one request at a
time: a scrape reads the journal through that thread's own connection.

Metrics (all prefixed ``echonode_``)::

    instances_received_total, bytes_received_total, duplicate_instances_total
    associations_total, associations_rejected_total   access policy, unknown called AE, max_associations, low disk
    receive_failures_total{status}        0xA700 as "out_of_disk", 0xC210 ...
    studies{state}                        every state, 0 included
    queue_depth                           studies queued for the worker
    outbox{state}                         SRs pending / dead (dead letters)
    delivery_failures_total{reason}       transient / permanent / exhausted / ...
    inference_seconds                     histogram, one observation per study
                                          and model set reported since start
    stored_bytes, storage_free_bytes
    worker_up, worker_restarts_total, scp_up, models_installed

``/health`` answers 200 ``{"status": "ok", "scp": true, "worker": true}`` or
503 with ``"status": "unavailable"`` when the SCP is not listening or the
worker process is dead (``"worker": null`` when the node runs without one).
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .journal import OutboxState, StudyState
from .logs import get_logger

log = get_logger(__name__)

#: Upper bounds of the inference-time histogram, in seconds (one study).
INFERENCE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class _InferenceHistogram:
    """Inference seconds per study, fed from the journal's ``results`` rows.

    The worker records ``{"seconds": ...}`` in every result's detail, one row
    per task with the same figure; rows written in one transaction share
    ``created``. Rows newer than the last one seen are folded in at each
    scrape, so the histogram only grows (it starts empty when the node starts,
    like the other counters).
    """

    def __init__(self, journal: Any) -> None:
        self.journal = journal
        self.buckets = [0] * (len(INFERENCE_BUCKETS) + 1)
        self.count = 0
        self.sum = 0.0
        self.last_id = journal.last_result_id()

    def update(self) -> None:
        self.last_id, seconds = self.journal.inference_seconds_since(self.last_id)
        for s in seconds:
            self.observe(s)

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        for i, bound in enumerate(INFERENCE_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
                return
        self.buckets[-1] += 1

    def family(self) -> HistogramMetricFamily:
        cumulative, total = [], 0
        for bound, n in zip((*(str(b) for b in INFERENCE_BUCKETS), "+Inf"), self.buckets):
            total += n
            cumulative.append((bound, total))
        return HistogramMetricFamily(
            "echonode_inference_seconds",
            "Wall-clock inference time of one study and model set (decode, preprocess, models)",
            buckets=cumulative,
            sum_value=self.sum,
        )


def scp_listening(node: Any) -> bool:
    """True while the node's SCP accepts associations."""
    return bool(node.scp.listening)


def worker_alive(node: Any) -> bool | None:
    """True/False for the worker process; None when the node runs without one."""
    if not getattr(node, "_start_worker", True):
        return None
    process = getattr(node.worker, "process", None)
    return bool(process is not None and process.is_alive())


def health(node: Any) -> tuple[int, dict[str, Any]]:
    """The ``/health`` answer: (HTTP status, JSON body)."""
    scp = scp_listening(node)
    worker = worker_alive(node)
    ok = scp and worker is not False
    return (200 if ok else 503), {"status": "ok" if ok else "unavailable", "scp": scp, "worker": worker}


class NodeCollector(Collector):
    """Reads the running node's counters and the journal at scrape time.

    Parameters
    ----------
    node : echonode.node.Node
        The node; its ``scp``, ``delivery``, ``worker``, ``journal`` and
        ``store`` are read at every scrape (they may be replaced by a reload).
    """

    def __init__(self, node: Any) -> None:
        self.node = node
        self.inference = _InferenceHistogram(node.journal)

    def collect(self) -> Iterator[Any]:
        node = self.node
        c = node.scp.counters

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"echonode_{name}", doc, value=value)

        yield counter("instances_received", "Instances stored (duplicates excluded)", c.instances)
        yield counter("bytes_received", "Bytes of instances stored", c.bytes)
        yield counter("duplicate_instances", "Identical copies of stored instances, acknowledged and dropped",
                      c.duplicates)
        yield counter("associations", "Associations accepted", c.associations)
        yield counter("associations_rejected",
                      "Associations rejected (calling AE title or address not allowed, unknown called AE title, "
                      "max_associations reached, low disk)", c.rejected)
        fam = CounterMetricFamily(
            "echonode_receive_failures", "C-STOREs answered with a failure status, by reason", labels=["status"]
        )
        for status, n in sorted(dict(c.failures).items()):
            fam.add_metric([status], n)
        yield fam

        journal = node.journal
        counts = journal.counts()
        fam = GaugeMetricFamily("echonode_studies", "Studies in the journal, by state", labels=["state"])
        for state in StudyState:
            fam.add_metric([state.value], counts.get(state.value, 0))
        yield fam
        yield GaugeMetricFamily(
            "echonode_queue_depth", "Studies queued for the inference worker", value=counts.get(StudyState.QUEUED, 0)
        )
        outbox = journal.outbox_counts()
        fam = GaugeMetricFamily("echonode_outbox", "SR deliveries not yet acknowledged, by state", labels=["state"])
        for state in (OutboxState.PENDING, OutboxState.DEAD):
            fam.add_metric([state.value], outbox.get(state.value, 0))
        yield fam
        yield GaugeMetricFamily("echonode_stored_bytes", "Bytes of received instances in the store",
                                value=journal.stored_bytes())
        try:
            free = shutil.disk_usage(node.store.root).free
        except OSError:
            free = float("nan")
        yield GaugeMetricFamily("echonode_storage_free_bytes", "Free bytes on the storage file system", value=free)

        fam = CounterMetricFamily(
            "echonode_delivery_failures", "Failed SR delivery attempts, by reason", labels=["reason"]
        )
        delivery = node.delivery
        for reason, n in sorted(dict(getattr(delivery, "failures", {}) or {}).items()):
            fam.add_metric([reason], n)
        yield fam

        self.inference.update()
        yield self.inference.family()

        alive = worker_alive(node)
        yield GaugeMetricFamily("echonode_worker_up", "1 when the inference worker process is alive",
                                value=1 if alive else 0)
        restarts = getattr(node.worker, "restarts", 0) if node.worker is not None else 0
        yield counter("worker_restarts", "Inference worker restarts (crash, study timeout)", restarts)
        yield GaugeMetricFamily("echonode_scp_up", "1 while the SCP listens", value=1 if scp_listening(node) else 0)
        from .node import installed_bundles

        yield GaugeMetricFamily(
            "echonode_models_installed", "Model bundles in the models folder", value=len(installed_bundles(node.cfg.models_dir))
        )


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    #: A client that connects and says nothing must not block the next scrape.
    timeout = 10

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body = generate_latest(self.server.registry)
            except Exception:  # noqa: BLE001 - a scrape error must not kill the server thread
                log.exception("metrics.scrape_failed")
                self._send(500, b"scrape failed\n", "text/plain; charset=utf-8")
                return
            self._send(200, body, CONTENT_TYPE_LATEST)
        elif path == "/health":
            try:
                code, doc = health(self.server.node)
            except Exception as exc:  # noqa: BLE001
                code, doc = 503, {"status": "unavailable", "error": type(exc).__name__}
            self._send(code, json.dumps(doc).encode() + b"\n", "application/json")
        else:
            self._send(404, b"not found: try /metrics or /health\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        pass  # scrapes every few seconds would flood the journal


class _Server(HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], node: Any, registry: CollectorRegistry) -> None:
        self.node = node
        self.registry = registry
        if ":" in address[0]:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class MetricsServer:
    """``/metrics`` and ``/health`` for one node, in a daemon thread.

    Parameters
    ----------
    node : echonode.node.Node
    host, port : str, int
        Where to listen (``[metrics]``; port 0 picks a free one).
    """

    def __init__(self, node: Any, host: str = "127.0.0.1", port: int = 9108) -> None:
        self.node = node
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(node))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen; raises OSError when the address is taken."""
        self._server = _Server((self.host, self.port), self.node, self.registry)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, name="echonode-metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics.listening", host=self.host, port=self.port)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = None
        log.info("metrics.stopped")
