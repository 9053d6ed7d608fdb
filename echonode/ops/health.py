"""The ``/health`` answer: is the node doing its job right now?

Healthy means the SCP is listening, every worker process is alive and
beating its heartbeat within ``metrics.worker_stale_s``, the queue moves
(no study waited ``metrics.queue_stall_s`` while none was processed), and no
main-loop step or job failed :data:`~echonode.daemon.node.FAILING_AFTER`
times in a row. Served at ``/health`` by :mod:`echonode.ops.prometheus` and
shown on the status page (:mod:`echonode.ops.statuspage`); both import it,
so it imports neither.
"""

from __future__ import annotations

import time
from typing import Any

from echonode.studies.states import StudyState

__all__ = ["health", "scp_listening", "worker_alive", "worker_entries"]


def scp_listening(node: Any) -> bool:
    """True while the node's SCP accepts associations."""
    return bool(node.scp.listening)


def worker_entries(node: Any) -> list[dict[str, Any]] | None:
    """Each worker's state (:meth:`echonode.daemon.supervisor.WorkerPool.workers`), or None
    when the node runs without a pool of workers."""
    workers = getattr(node.worker, "workers", None) if getattr(node, "worker", None) is not None else None
    return workers() if callable(workers) else None


def worker_alive(node: Any) -> bool | None:
    """True when every worker process is alive, False when one is not; None when the node runs without one."""
    if not getattr(node, "_start_worker", True):
        return None
    entries = worker_entries(node)
    if entries:
        return all(w["alive"] for w in entries)
    process = getattr(node.worker, "process", None)
    return bool(process is not None and process.is_alive())


def _workers_check(entries: list[dict[str, Any]], stale_s: float) -> tuple[bool, dict[str, Any], str | None]:
    """Several workers: healthy when each is alive and beating; a reason per one that is not."""
    why = []
    for w in entries:
        if not w["alive"]:
            why.append(f"worker {w['index']}: process not running (crashed or killed; the node restarts it)")
        elif w["heartbeat_age_s"] is not None and w["heartbeat_age_s"] > stale_s:
            why.append(f"worker {w['index']}: no heartbeat for {w['heartbeat_age_s']:.0f} s"
                       f" (process {w['pid']} stopped or frozen)")
    detail = {"workers": entries, "workers_alive": sum(w["alive"] for w in entries)}
    return not why, detail, "; ".join(why) or None


def _worker_check(node: Any, stale_s: float) -> tuple[bool | None, dict[str, Any], str | None]:
    """(worker healthy, detail for the body, reason when not)."""
    alive = worker_alive(node)
    if alive is None:
        return None, {}, None
    entries = worker_entries(node)
    if entries is not None and len(entries) > 1:
        return _workers_check(entries, stale_s)
    if not alive:
        return False, {}, "worker: process not running (crashed or killed; the node restarts it)"
    age, beat = node.worker.heartbeat()
    detail: dict[str, Any] = {"worker_phase": beat.phase if beat else "starting"}
    if age is not None:
        detail["worker_heartbeat_age_s"] = round(age, 1)
    if beat is not None and beat.study_uid:
        detail["worker_study_uid"] = beat.study_uid
    if age is not None and age > stale_s:
        pid = node.worker.process.pid
        return False, detail, f"worker: no heartbeat for {age:.0f} s (process {pid} stopped or frozen)"
    return True, detail, None


def _queue_check(node: Any, stall_s: float) -> tuple[bool, dict[str, Any], str | None]:
    """(queue moving, detail, reason when stalled): stalled means studies waited
    ``stall_s`` in the queue while none was being processed."""
    counts = node.journal.counts()
    queued = counts.get(StudyState.QUEUED, 0)
    running = counts.get(StudyState.RUNNING, 0)
    detail = {"queued": queued, "running": running}
    if not queued or running:
        return True, detail, None
    oldest = node.journal.oldest_queued()
    waited = time.time() - oldest if oldest is not None else 0.0
    if waited <= stall_s:
        return True, detail, None
    detail["queue_waited_s"] = round(waited)
    return False, detail, f"queue: {queued} studies queued, none processed for {waited:.0f} s"


def _loop_check(node: Any) -> tuple[bool, str | None]:
    """(every loop step and job working, reason when one keeps failing)."""
    failing = []
    for kind, counts in (("loop step", getattr(node, "loop_errors", None)), ("job", getattr(node, "job_errors", None))):
        if counts is None:
            continue
        for name, n in sorted(counts.failing().items()):
            failing.append(f"{kind} {name} failed {n} times in a row")
    return not failing, ("loop: " + "; ".join(failing)) if failing else None


def health(node: Any) -> tuple[int, dict[str, Any]]:
    """The ``/health`` answer: (HTTP status, JSON body).

    The body: ``status`` (``ok`` or ``unavailable``), ``scp`` (listening),
    ``worker`` (process alive and beating; null without a worker), ``queue``
    (moving), ``loop`` (no step or job failing), ``reasons`` (a line per
    problem, empty when ok), and as details ``worker_phase``,
    ``worker_heartbeat_age_s``, ``worker_study_uid``, ``queued``, ``running``;
    with several workers (``models.workers``) ``workers`` (a list: ``index``,
    ``pid``, ``alive``, ``phase``, ``heartbeat_age_s``, ``study_uid``,
    ``studies``, ``restarts``) and ``workers_alive`` instead of the
    ``worker_*`` details, and a reason per worker that is down or silent.
    """
    settings = node.cfg.metrics
    reasons: list[str] = []
    scp = scp_listening(node)
    if not scp:
        reasons.append("scp: not listening")
    worker, worker_detail, why = _worker_check(node, settings.worker_stale_s)
    if why:
        reasons.append(why)
    queue, queue_detail, why = _queue_check(node, settings.queue_stall_s)
    if why:
        reasons.append(why)
    loop, why = _loop_check(node)
    if why:
        reasons.append(why)
    ok = not reasons
    doc = {"status": "ok" if ok else "unavailable", "scp": scp, "worker": worker, "queue": queue, "loop": loop,
           "reasons": reasons, **worker_detail, **queue_detail}
    return (200 if ok else 503), doc
