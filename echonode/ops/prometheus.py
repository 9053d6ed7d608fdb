"""Prometheus ``/metrics`` and a ``/health`` probe over HTTP.

Off by default, loopback by default (``[metrics]`` in the config). Nothing is
counted twice: a custom collector reads the live objects of the running node
(the SCP's :class:`~echonode.receive.scp.ReceiveCounters`, ``Delivery.failures``, the
worker supervisor, the journal) at scrape time, into a registry of its own,
so the process-wide default registry is never touched and two nodes in one
process (tests) do not collide.

The server is :mod:`http.server` with a thread per connection (at most
:data:`MAX_CONNECTIONS` at once, more are closed at once), and each
connection must send its whole request within :data:`REQUEST_DEADLINE_S`:
one idle or slow client never delays another's ``/health``. A request reads
the journal through its thread's own connection, closed when it ends.

Metrics (all prefixed ``echonode_``)::

    instances_received_total, bytes_received_total, duplicate_instances_total
    associations_total, associations_rejected_total   access policy, unknown called AE, max_associations, low disk
    associations_aborted_total{reason}    protocol faults: pdu_too_large, stalled, bad_pdu, failed
    receive_failures_total{status}        0xA700 as "out_of_disk", 0xC210 ...
    studies{state}                        every state, 0 included
    queue_depth                           studies queued for the worker
    outbox{state}                         SRs pending / dead (dead letters)
    delivery_failures_total{reason}       transient / permanent / exhausted / ...
    delivery_in_flight{destination}       1 while an attempt to that destination runs
    delivery_attempt_seconds{destination} how long it has run (0 when none)
    delivery_stuck{destination}           1 when it outlived its deadline and the cut:
                                          that destination gets nothing until it returns
    delivery_timeouts_total{destination}  attempts cut at delivery.timeout_s
    inference_seconds                     histogram, one observation per study
                                          and model set reported since start
    stored_bytes, storage_free_bytes
    worker_up, worker_restarts_total, scp_up, models_installed
    worker_heartbeat_age_seconds          since the worker last showed life
                                          (with several: every worker up; the stalest)
    worker_process_up{worker}, worker_process_heartbeat_age_seconds{worker},
    worker_process_busy{worker}, worker_process_restarts_total{worker}
                                          each of the models.workers processes
    loop_errors_total{step}               failed turns of a main-loop step
    job_failures_total{job}               failed runs of a scheduled job
    agreement_studies{model,version,task} studies with a model result and a decided
                                          reference label from the sonographers' SRs
    agreement_positives{model,version,task}
    agreement_auroc{model,version,task}   NaN while one class only
    agreement_sensitivity{model,version,task}, agreement_specificity{...}
                                          at the bundle's threshold (NaN: undefined)
    agreement_references{kind}            studies whose SRs were read: with_reference,
                                          without (no usable measurement SR), due

``/health`` answers 200 with ``"status": "ok"``, or 503 with ``"status":
"unavailable"`` and ``"reasons"`` (one line per problem) when the SCP is not
listening, the worker process is dead or has not beaten its heartbeat for
``metrics.worker_stale_s`` (stopped, frozen), studies have waited
``metrics.queue_stall_s`` in the queue with none being processed, or a
main-loop step or a job failed :data:`~echonode.daemon.node.FAILING_AFTER` times in
a row. See :func:`echonode.ops.health.health` for the body.

``/status`` is the administrator's HTML status page when
``status_page.enabled`` (:mod:`echonode.ops.statuspage`; 404 otherwise).
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from socketserver import ThreadingMixIn
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from echonode.bundles.installed import installed_bundles
from echonode.ops import statuspage
from echonode.ops.health import health, scp_listening, worker_alive, worker_entries
from echonode.ops.logs import get_logger
from echonode.studies.states import OutboxState, StudyState

log = get_logger(__name__)

#: Seconds a client has to send its whole request; then the connection is closed.
REQUEST_DEADLINE_S = 5.0
#: Seconds the answer may take to write (a client that reads nothing).
RESPONSE_TIMEOUT_S = 5.0
#: Connections served at once; more are closed at once.
MAX_CONNECTIONS = 64
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
        for bound, n in zip((*(str(b) for b in INFERENCE_BUCKETS), "+Inf"), self.buckets, strict=True):
            total += n
            cumulative.append((bound, total))
        return HistogramMetricFamily(
            "echonode_inference_seconds",
            "Wall-clock inference time of one study and model set (decode, preprocess, models)",
            buckets=cumulative,
            sum_value=self.sum,
        )


def agreement_families(summary: dict[str, Any] | None) -> Iterator[Any]:
    """The agreement job's summary as gauges, per model (name, version) and task.

    Parameters
    ----------
    summary : dict or None
        :meth:`~echonode.studies.references.ReferenceRows.agreement_summary`
        (one journal row: a scrape never reads the results).

    Yields
    ------
    prometheus_client metric families
    """
    labels = ["model", "version", "task"]
    families = {
        "studies": GaugeMetricFamily("echonode_agreement_studies",
                                     "Studies with a model result and a decided reference label from the"
                                     " sonographers' measurement SRs", labels=labels),
        "positives": GaugeMetricFamily("echonode_agreement_positives",
                                       "Of those, studies whose reference label is positive", labels=labels),
        "auroc": GaugeMetricFamily("echonode_agreement_auroc",
                                   "AUROC of the model's probability against the reference labels (NaN: one class"
                                   " only)", labels=labels),
        "sensitivity": GaugeMetricFamily("echonode_agreement_sensitivity",
                                         "Sensitivity at the bundle's threshold (NaN: no positive)", labels=labels),
        "specificity": GaugeMetricFamily("echonode_agreement_specificity",
                                         "Specificity at the bundle's threshold (NaN: no negative)", labels=labels),
    }
    references = GaugeMetricFamily("echonode_agreement_references",
                                   "Studies whose SRs the agreement job read: with a usable measurement SR,"
                                   " without one, and waiting to be read", labels=["kind"])
    if summary:
        for row in summary.get("models", []):
            key = [str(row["model"]), str(row["version"]), str(row["task"])]
            for name, family in families.items():
                value = row.get(name)
                family.add_metric(key, float("nan") if value is None else float(value))
        refs = summary.get("references", {})
        with_ref = int(refs.get("with_reference", 0))
        references.add_metric(["with_reference"], with_ref)
        references.add_metric(["without"], int(refs.get("studies", 0)) - with_ref)
        references.add_metric(["due"], int(refs.get("due", 0)))
    yield from (*families.values(), references)


def worker_families(entries: list[dict[str, Any]]) -> Iterator[Any]:
    """Each inference worker (``models.workers``): alive, heartbeat age, restarts, labelled ``worker``.

    Parameters
    ----------
    entries : list of dict
        :meth:`echonode.daemon.supervisor.WorkerPool.workers`.

    Yields
    ------
    prometheus_client metric families
    """
    up = GaugeMetricFamily("echonode_worker_process_up", "1 when this inference worker's process is alive",
                           labels=["worker"])
    age = GaugeMetricFamily("echonode_worker_process_heartbeat_age_seconds",
                            "Seconds since this inference worker last showed life (NaN: not running)",
                            labels=["worker"])
    busy = GaugeMetricFamily("echonode_worker_process_busy", "1 while this inference worker processes a study",
                             labels=["worker"])
    restarts = CounterMetricFamily("echonode_worker_process_restarts", "Restarts of this inference worker",
                                   labels=["worker"])
    for w in entries:
        label = [str(w["index"])]
        up.add_metric(label, 1 if w["alive"] else 0)
        age.add_metric(label, float("nan") if w["heartbeat_age_s"] is None else w["heartbeat_age_s"])
        busy.add_metric(label, 1 if w["study_uid"] else 0)
        restarts.add_metric(label, w["restarts"])
    yield from (up, age, busy, restarts)


def delivery_families(delivery: Any) -> Iterator[Any]:
    """Each destination lane of :class:`echonode.delivery.outbox.Delivery`: in flight, for how long, stuck, cut.

    Parameters
    ----------
    delivery : echonode.delivery.outbox.Delivery
        Its ``lanes()``: every destination tried since the node started.

    Yields
    ------
    prometheus_client metric families
    """
    lanes = delivery.lanes()
    in_flight = GaugeMetricFamily("echonode_delivery_in_flight",
                                  "1 while an SR delivery attempt to the destination is in flight",
                                  labels=["destination"])
    age = GaugeMetricFamily("echonode_delivery_attempt_seconds",
                            "How long the attempt in flight has run (0 when none)", labels=["destination"])
    stuck = GaugeMetricFamily("echonode_delivery_stuck",
                              "1 when the attempt in flight outlived delivery.timeout_s and the abort: the"
                              " destination gets nothing more until it returns or the node restarts",
                              labels=["destination"])
    timeouts = CounterMetricFamily("echonode_delivery_timeouts",
                                   "SR delivery attempts aborted at delivery.timeout_s", labels=["destination"])
    for lane in lanes:
        in_flight.add_metric([lane.destination], 1 if lane.in_flight else 0)
        age.add_metric([lane.destination], round(lane.attempt_s, 3))
        stuck.add_metric([lane.destination], 1 if lane.stuck else 0)
        timeouts.add_metric([lane.destination], lane.timeouts)
    yield from (in_flight, age, stuck, timeouts)


class NodeCollector(Collector):
    """Reads the running node's counters and the journal at scrape time.

    Parameters
    ----------
    node : echonode.daemon.node.Node
        The node; its ``scp``, ``delivery``, ``worker``, ``journal`` and
        ``store`` are read at every scrape (they may be replaced by a reload).
    """

    def __init__(self, node: Any) -> None:
        self.node = node
        self.inference = _InferenceHistogram(node.journal)
        # Scrapes may run at once (a thread per connection); the histogram
        # folds in new rows, which two at once would count twice.
        self._inference_lock = threading.Lock()

    def collect(self) -> Iterator[Any]:
        node = self.node
        # Every listener's: the node's own SCP and its receiver processes (node.receivers).
        yield from receive_families(node.receive_counters() if hasattr(node, "receive_counters") else node.scp.counters)
        yield from journal_families(node)
        delivery = node.delivery
        fam = CounterMetricFamily(
            "echonode_delivery_failures", "Failed SR delivery attempts, by reason", labels=["reason"]
        )
        for reason, n in sorted(dict(getattr(delivery, "failures", {}) or {}).items()):
            fam.add_metric([reason], n)
        yield fam
        if delivery is not None:
            yield from delivery_families(delivery)
        with self._inference_lock:
            self.inference.update()
            yield self.inference.family()
        yield from process_families(node)
        yield from agreement_families(node.journal.agreement_summary())
        yield GaugeMetricFamily(
            "echonode_models_installed", "Model bundles in the models folder", value=len(installed_bundles(node.cfg.models_dir))
        )


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"echonode_{name}", doc, value=value)


def receive_families(c: Any) -> Iterator[Any]:
    """What the listeners received, refused and aborted (``c``: their summed counters)."""
    yield _counter("instances_received", "Instances stored (duplicates excluded)", c.instances)
    yield _counter("bytes_received", "Bytes of instances stored", c.bytes)
    yield _counter("duplicate_instances", "Identical copies of stored instances, acknowledged and dropped",
                   c.duplicates)
    yield _counter("associations", "Associations accepted", c.associations)
    yield _counter("associations_rejected",
                   "Associations rejected (calling AE title or address not allowed, unknown called AE title, "
                   "max_associations reached, low disk)", c.rejected)
    fam = CounterMetricFamily(
        "echonode_associations_aborted",
        "Associations the node aborted for a protocol fault (pdu_too_large, stalled, bad_pdu, failed)",
        labels=["reason"],
    )
    for reason, n in sorted(dict(c.aborted).items()):
        fam.add_metric([reason], n)
    yield fam
    fam = CounterMetricFamily(
        "echonode_receive_failures", "C-STOREs answered with a failure status, by reason", labels=["status"]
    )
    for status, n in sorted(dict(c.failures).items()):
        fam.add_metric([status], n)
    yield fam


def journal_families(node: Any) -> Iterator[Any]:
    """Studies by state, the queue, the outbox, and the storage (bounded journal queries)."""
    journal = node.journal
    counts = journal.counts()
    gauge = GaugeMetricFamily("echonode_studies", "Studies in the journal, by state", labels=["state"])
    for state in StudyState:
        gauge.add_metric([state.value], counts.get(state.value, 0))
    yield gauge
    yield GaugeMetricFamily(
        "echonode_queue_depth", "Studies queued for the inference worker", value=counts.get(StudyState.QUEUED, 0)
    )
    outbox = journal.outbox_counts()
    gauge = GaugeMetricFamily("echonode_outbox", "SR deliveries not yet acknowledged, by state", labels=["state"])
    for outbox_state in (OutboxState.PENDING, OutboxState.DEAD):
        gauge.add_metric([outbox_state.value], outbox.get(outbox_state.value, 0))
    yield gauge
    yield GaugeMetricFamily("echonode_stored_bytes", "Bytes of received instances in the store",
                            value=journal.stored_bytes())
    free: float
    try:
        free = shutil.disk_usage(node.store.root).free
    except OSError:
        free = float("nan")
    yield GaugeMetricFamily("echonode_storage_free_bytes", "Free bytes on the storage file system", value=free)


def process_families(node: Any) -> Iterator[Any]:
    """The worker(s), the SCP, and the main loop's and jobs' failures."""
    alive = worker_alive(node)
    yield GaugeMetricFamily("echonode_worker_up", "1 when the inference worker process is alive",
                            value=1 if alive else 0)
    restarts = getattr(node.worker, "restarts", 0) if node.worker is not None else 0
    yield _counter("worker_restarts", "Inference worker restarts (crash, study timeout)", restarts)
    age = node.worker.heartbeat()[0] if node.worker is not None and alive else None
    yield GaugeMetricFamily("echonode_worker_heartbeat_age_seconds",
                            "Seconds since the inference worker last showed life (NaN: no worker running)",
                            value=float("nan") if age is None else age)
    yield from worker_families(worker_entries(node) or [])
    yield GaugeMetricFamily("echonode_scp_up", "1 while the SCP listens", value=1 if scp_listening(node) else 0)
    for name, label, doc, counts in (
        ("loop_errors", "step", "Failed turns of a main-loop step (reload, supervise, watchdog, stop_*)",
         node.loop_errors),
        ("job_failures", "job", "Failed runs of a scheduled job (stability, delivery, retention, agreement)",
         node.job_errors),
    ):
        fam = CounterMetricFamily(f"echonode_{name}", doc, labels=[label])
        for key, n in sorted(counts.totals().items()):
            fam.add_metric([key], n)
        yield fam


class _DeadlineReader(io.RawIOBase):
    """A socket's reading side that gives up at a fixed deadline, however slowly bytes trickle in."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request not received in time")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_DEADLINE_S

    def setup(self) -> None:
        super().setup()
        # The whole request within the deadline, not each read: a client
        # sending a byte every few seconds must not hold the thread.
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, time.monotonic() + REQUEST_DEADLINE_S))

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            # This thread's journal connection dies with the thread.
            self.server.node.journal.close()

    def do_GET(self) -> None:  # http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body = generate_latest(self.server.registry)
            except Exception:  # a scrape error must not kill the server thread
                log.exception("metrics.scrape_failed")
                self._send(500, b"scrape failed\n", "text/plain; charset=utf-8")
                return
            self._send(200, body, CONTENT_TYPE_LATEST)
        elif path == "/health":
            try:
                code, doc = health(self.server.node)
            except Exception as exc:
                log.exception("metrics.health_failed")
                code, doc = 503, {"status": "unavailable", "error": type(exc).__name__,
                                  "reasons": [f"health check failed: {type(exc).__name__}"]}
            self._send(code, json.dumps(doc).encode() + b"\n", "application/json")
        elif (page := statuspage.respond(self.server.node, path, self.headers.get("Authorization"),
                                         self.client_address[0])) is not None:
            self._send(page.status, page.body, page.content_type, page.headers)
        else:
            self._send(404, b"not found: try /metrics or /health\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, content_type: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.connection.settimeout(RESPONSE_TIMEOUT_S)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # http.server's name
        pass  # scrapes every few seconds would flood the journal


class _Server(ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], node: Any, registry: CollectorRegistry) -> None:
        self.node = node
        self.registry = registry
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            # Refused at once: a flood must not queue up threads.
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsServer:
    """``/metrics`` and ``/health`` for one node, in a daemon thread.

    Parameters
    ----------
    node : echonode.daemon.node.Node
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
        statuspage.announce(self.node.cfg, self.host, self.port)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = None
        log.info("metrics.stopped")
