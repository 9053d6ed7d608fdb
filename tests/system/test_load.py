"""Load: several carts send at once while the worker runs.

``echonode serve`` as a subprocess with a tiny model and a recording PACS;
N sender threads each send their studies (one association per study); a
prober sends C-ECHO every 0.2 s throughout and a sampler reads the node's
and the worker's resident memory from /proc. Then: every acknowledged
instance is recorded, every study is delivered with exactly one SR, and
C-ECHO was answered every time.

The default run is small (4 senders x 2 studies x 5 objects); the issue's
8 x 10 x 20 runs with ``-m slow``. The figures go to docs/reliability.md.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from echonode.delivery.dimse import Peer, echo
from echonode.delivery.outcome import DeliveryError
from tests.conftest import free_port, make_config, wait_for, with_destination
from tests.factories import tiny_bundle, us_multiframe
from tests.peers import ECHOSCU, ServedNode, SlowPACS, journal_rows, states

#: Generous bound for the shared 2-core CI machine; the issue's figure is 1 s
#: (docs/reliability.md has the measured latencies).
ECHO_BOUND_S = 5.0
#: Resident memory bounds (MiB): a leak over 1600 objects would cross them.
NODE_MAX_RSS_MB = 1024
WORKER_MAX_RSS_MB = 2048


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Monitor(threading.Thread):
    """C-ECHO every ``interval`` s and sample RSS of node and worker until stopped.

    The C-ECHO goes from dcmtk's ``echoscu`` (a process of its own, as a
    monitoring probe would be) when installed, so that the senders' threads
    in this process do not slow the probe down; the latency then includes
    starting echoscu (tens of ms).
    """

    def __init__(self, port: int, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.peer = Peer("ECHONODE", "127.0.0.1", port)
        self.pid = pid
        self.interval = interval
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.node_rss: list[float] = []
        self.worker_rss: list[float] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            t0 = time.monotonic()
            if Path(ECHOSCU).exists():
                r = subprocess.run([ECHOSCU, "-aet", "PROBE", "-aec", self.peer.ae_title, "-to", "30",
                                    self.peer.host, str(self.peer.port)], capture_output=True, timeout=60)
                if r.returncode != 0:
                    self.failures.append(f"echoscu exit {r.returncode}: {r.stderr[-200:]!r}")
            else:
                try:
                    status = echo("PROBE", self.peer, timeout_s=30)
                    if status != 0:
                        self.failures.append(f"status 0x{status:04X}")
                except DeliveryError as exc:
                    self.failures.append(str(exc))
            self.latencies.append(time.monotonic() - t0)
            self.node_rss.append(rss_mb(self.pid))
            self.worker_rss.append(max([rss_mb(c) for c in children(self.pid)] or [0.0]))
            self.stopped.wait(self.interval)

    def figures(self) -> dict:
        lat = sorted(self.latencies)
        return {
            "echoes": len(lat),
            "echo_failures": len(self.failures),
            "echo_median_ms": round(1000 * statistics.median(lat), 1),
            "echo_p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1),
            "echo_max_ms": round(1000 * lat[-1], 1),
            "echo_over_1s": sum(x > 1.0 for x in lat),
            "node_rss_max_mb": round(max(self.node_rss), 0),
            "worker_rss_max_mb": round(max(self.worker_rss), 0),
        }


def make_plan(k: int, study_uids: list[str], objects_each: int, frames: int, side: int) -> list[list[pydicom.Dataset]]:
    return [
        [us_multiframe(study_uid=uid, frames=frames, rows=side, cols=side, seed=k * 1000 + s * 100 + i,
                       patient_id=f"P{k}-{s}") for i in range(objects_each)]
        for s, uid in enumerate(study_uids)
    ]


def _carts_log(path: Path, chars: int = 6000) -> str:
    """The end of the node's log without the monitor's echo associations, which would crowd out the carts'."""
    lines = [line for line in path.read_text().splitlines() if '"calling_ae": "PROBE"' not in line]
    return "\n".join(lines)[-chars:]


def sender_process(port: int, k: int, study_uids: list[str], objects_each: int, frames: int,
                   side: int) -> tuple[list[str], list[str]]:
    """One cart, in a process of its own: send its studies; return (acked SOP UIDs, errors)."""
    studies = make_plan(k, study_uids, objects_each, frames, side)
    acked: set[str] = set()
    errors: list[str] = []
    sender(port, studies, acked, errors, threading.Lock())
    return sorted(acked), errors


def sender(port: int, studies: list[list[pydicom.Dataset]], acked: set[str], errors: list[str],
           lock: threading.Lock) -> None:
    ae = AE(ae_title="CART")
    ae.add_requested_context(studies[0][0].SOPClassUID, studies[0][0].file_meta.TransferSyntaxUID)
    for objs in studies:
        for attempt in range(5):  # a cart retries a refused association
            assoc = ae.associate("127.0.0.1", port, ae_title="ECHONODE")
            if assoc.is_established:
                break
            time.sleep(0.5 * (attempt + 1))
        else:
            errors.append("association refused 5 times")
            continue
        for ds in objs:
            if not assoc.is_established:
                # Aborted under us (a DIMSE timeout): what is left of the study was not sent.
                errors.append("association ended before every object was sent")
                break
            rsp = assoc.send_c_store(ds)
            if "Status" in rsp and rsp.Status == 0:
                with lock:
                    acked.add(str(ds.SOPInstanceUID))
            else:
                errors.append(f"C-STORE {rsp.get('Status', 'no response')}")
        assoc.release()


@pytest.fixture
def pacs() -> Iterator[SlowPACS]:
    scp = SlowPACS(free_port())
    scp.start()
    yield scp
    scp.stop()


def run_load(tmp_path: Path, pacs: SlowPACS, senders: int, studies_each: int, objects_each: int,
             *, frames: int = 16, side: int = 64, stable_after_s: float = 1.0, processes: bool = False,
             deliver_timeout: float = 300) -> dict:
    cfg = make_config(tmp_path, study={"stable_after_s": stable_after_s, "check_interval_s": 0.25},
                      models={"threads": 1},
                      delivery={"retry_initial_s": 0.5, "retry_max_s": 2.0, "check_interval_s": 0.5})
    cfg = with_destination(cfg, "pacs", "PACS", pacs.port)
    tiny_bundle(cfg.models_dir, "lvh", seed=1)
    uids = [[pydicom.uid.generate_uid() for _ in range(studies_each)] for _ in range(senders)]
    study_uids = {u for per in uids for u in per}
    node = ServedNode(cfg, tmp_path).start()
    monitor = Monitor(cfg.node.port, node.proc.pid)
    monitor.start()
    acked: set[str] = set()
    errors: list[str] = []
    try:
        t0 = time.monotonic()
        args = [(cfg.node.port, k, uids[k], objects_each, frames, side) for k in range(senders)]
        if processes:
            # Carts are separate machines: one process each, not threads sharing a GIL.
            with mp.get_context("spawn").Pool(senders) as pool:
                results = pool.starmap(sender_process, args)
        else:  # the short run: threads start at once
            results = [None] * senders

            def run(i: int) -> None:
                try:
                    results[i] = sender_process(*args[i])
                except Exception as exc:  # noqa: BLE001 - the sender's failure is the test's finding, not a thread's death
                    results[i] = ([], [f"sender {i}: {type(exc).__name__}: {exc}"])

            threads = [threading.Thread(target=run, args=(i,)) for i in range(senders)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        for got_acked, got_errors in results:
            acked.update(got_acked)
            errors.extend(got_errors)
        receive_s = time.monotonic() - t0

        def delivered() -> bool:
            st = states(cfg)
            return set(st) == study_uids and all(v == "delivered" for v in st.values())

        wait_for(delivered, timeout=deliver_timeout, interval=0.5, what="every study delivered")
        total_s = time.monotonic() - t0
    finally:
        monitor.stopped.set()
        monitor.join(60)
        node.stop()
    n = senders * studies_each * objects_each
    assert errors == [], f"{errors}; the node's log without the monitor's echoes ends: {_carts_log(node.log)}"
    assert len(acked) == n
    rows = journal_rows(cfg, "SELECT sop_uid, path FROM instances")
    assert {r[0] for r in rows} == acked, "an acknowledged instance is missing from the journal"
    assert all(Path(r[1]).exists() for r in rows)
    got = pacs.sr_uids()
    assert set(got) == study_uids and all(len(u) == 1 for u in got.values())
    figures = {
        "senders": senders, "studies": len(study_uids), "objects": n,
        "object_bytes": frames * side * side, "receive_s": round(receive_s, 1),
        "all_delivered_s": round(total_s, 1), **monitor.figures(),
    }
    print(figures)
    assert monitor.failures == []
    assert figures["echo_max_ms"] < ECHO_BOUND_S * 1000
    assert figures["node_rss_max_mb"] < NODE_MAX_RSS_MB
    assert figures["worker_rss_max_mb"] < WORKER_MAX_RSS_MB
    return figures


def test_load_small(tmp_path: Path, pacs: SlowPACS) -> None:
    run_load(tmp_path, pacs, senders=4, studies_each=2, objects_each=3)


@pytest.mark.slow
def test_load_issue_6(tmp_path: Path, pacs: SlowPACS) -> None:
    """The issue's load: 8 senders x 10 studies x 20 objects while the worker runs."""
    run_load(tmp_path, pacs, senders=8, studies_each=10, objects_each=20, stable_after_s=5.0,
             processes=True, deliver_timeout=1800)
