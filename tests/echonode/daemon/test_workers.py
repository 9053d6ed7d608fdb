"""Several inference workers in one node (``[models] workers``).

Two workers share the queue through the journal's atomic claims: a study is
never held by both, a worker frozen on a study keeps it while the other
works through the rest, and kill -9 of one worker gives back its study
alone, which is then reported once (one SR file, one outbox row, one SR at
the PACS). ``echonode serve`` runs as a subprocess, as in
tests/echonode/daemon/test_worker_death.py (peers from tests/peers.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from echonode.bundles.device import split_threads, worker_device
from echonode.config import ConfigError
from echonode.daemon.supervisor import WorkerPool
from echonode.daemon.workerlink import heartbeat_file
from echonode.ops.prometheus import health
from echonode.studies.journal import Journal
from echonode.studies.records import InstanceRecord
from tests.conftest import make_config, with_destination
from tests.factories import make_studies, tiny_bundle
from tests.peers import (
    ServedNode,
    SlowPACS,
    free_port,
    get_health,
    journal_rows,
    scrape,
    send_studies,
    states,
    wait_for,
)


@pytest.fixture
def pacs() -> Iterator[SlowPACS]:
    scp = SlowPACS(free_port())
    scp.start()
    yield scp
    scp.release.set()
    scp.stop()


# -- settings ---------------------------------------------------------------------------------


def test_workers_setting(tmp_path: Path) -> None:
    assert make_config(tmp_path).models.workers == 1
    assert make_config(tmp_path, models={"workers": 4}).models.workers == 4
    for bad in (0, 65):
        with pytest.raises(ConfigError, match="models.workers"):
            make_config(tmp_path, models={"workers": bad})


def test_cpu_threads_are_split_between_workers() -> None:
    assert split_threads(0, 1, 8) == 0  # one worker: torch decides, as before
    assert split_threads(6, 1, 8) == 6
    assert split_threads(0, 2, 8) == 4  # the CPUs, shared
    assert split_threads(6, 4, 8) == 1
    assert split_threads(2, 4, 2) == 1  # never 0 (which would mean "all of them")
    assert worker_device("cpu", 1, 2) == "cpu"
    assert worker_device("cuda:1", 0, 2) == "cuda:1"  # a named GPU is shared


# -- claims -----------------------------------------------------------------------------------


def _claim_all(path: str, out: mp.Queue) -> None:
    journal = Journal(path)
    got = []
    while (claim := journal.claim_next(os.getpid())) is not None:
        got.append(claim.study_uid)
    out.put(got)


def test_two_processes_never_claim_one_study(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    uids = [f"1.2.3.{i}" for i in range(60)]
    for i, uid in enumerate(uids):
        journal.record_instance(InstanceRecord(f"1.2.4.{i}", uid, "1.2.5", "1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.1.2.1",
                                               str(tmp_path / f"{i}.dcm"), 1, time.time(), "CART"))
    journal.mark_stable(-1)
    journal.queue_stable()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(journal.path), out)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == sorted(uids)
    assert len(got[0]) + len(got[1]) == len(uids)


# -- two workers in a running node ------------------------------------------------------------


def _heartbeat(cfg, index: int) -> dict:
    try:
        return json.loads((cfg.storage_dir / heartbeat_file(index)).read_bytes())
    except (OSError, ValueError):
        return {}


def _running(cfg) -> dict[str, int]:
    return dict(journal_rows(cfg, "SELECT study_uid, worker_pid FROM studies WHERE state = 'running'"))


def test_two_workers_a_held_study_and_a_kill(tmp_path: Path, pacs: SlowPACS) -> None:
    cfg = make_config(tmp_path, study={"stable_after_s": 0.3, "check_interval_s": 0.1},
                      models={"workers": 2, "threads": 2, "max_attempts": 3},
                      metrics={"enabled": True, "port": free_port()},
                      delivery={"retry_initial_s": 0.3, "retry_max_s": 1.0, "check_interval_s": 0.1})
    cfg = with_destination(cfg, "pacs", "PACS", pacs.port)
    tiny_bundle(cfg.models_dir, "lvh", seed=1)
    node = ServedNode(cfg, tmp_path).start()
    try:
        wait_for(lambda: all(_heartbeat(cfg, i).get("phase") == "idle" for i in (0, 1)), timeout=180,
                 interval=0.2, what="both workers idle")
        pids = {i: _heartbeat(cfg, i)["pid"] for i in (0, 1)}
        assert pids[0] != pids[1]
        code, doc = get_health(cfg.metrics.port)
        assert code == 200 and doc["workers_alive"] == 2, doc
        assert [(w["index"], w["pid"], w["phase"]) for w in doc["workers"]] == [
            (0, pids[0], "idle"), (1, pids[1], "idle")]

        studies = make_studies(3, 2, seed=7)
        uids = [str(s[0].StudyInstanceUID) for s in studies]
        send_studies(cfg.node.port, studies)
        # Freeze the first worker that claims a study, on that study.
        held: tuple[str, int] | None = None
        deadline = time.monotonic() + 120
        while held is None and time.monotonic() < deadline:
            for uid, pid in _running(cfg).items():
                if pid in pids.values():
                    os.kill(pid, signal.SIGSTOP)
                    if _running(cfg).get(uid) == pid:
                        held = (uid, pid)
                        break
                    os.kill(pid, signal.SIGCONT)
            time.sleep(0.002)
        assert held is not None, "no worker claimed a study"
        held_uid, held_pid = held
        other_pid = next(p for p in pids.values() if p != held_pid)
        others = [u for u in uids if u != held_uid]
        # The other worker takes the rest; the held study stays with its worker.
        wait_for(lambda: all(states(cfg).get(u) == "delivered" for u in others), timeout=180, interval=0.1,
                 what="the other studies delivered by the other worker")
        assert _running(cfg) == {held_uid: held_pid}
        assert {r[0] for r in journal_rows(cfg, "SELECT study_uid FROM reports")} == set(others)
        _, doc = get_health(cfg.metrics.port)
        by_index = {w["index"]: w for w in doc["workers"]}
        held_index = next(i for i, p in pids.items() if p == held_pid)
        assert by_index[1 - held_index]["studies"] == 2
        assert by_index[held_index]["phase"] == "processing" and by_index[held_index]["study_uid"] == held_uid

        os.kill(held_pid, signal.SIGKILL)
        wait_for(lambda: states(cfg).get(held_uid) == "delivered", timeout=180, interval=0.1,
                 what="the held study delivered after its worker's kill")
        sr = pacs.sr_uids()
        assert set(sr) == set(uids) and all(len(v) == 1 for v in sr.values()), sr
        for uid in uids:
            (sr_uid,) = [r[0] for r in journal_rows(cfg, "SELECT sr_sop_uid FROM reports WHERE study_uid = ?", (uid,))]
            assert sr[uid] == {sr_uid}
            assert journal_rows(cfg, "SELECT destination, state FROM outbox WHERE study_uid = ?", (uid,)) == [
                ("pacs", "sent")]
            assert [p.name for p in (cfg.storage_dir / "reports" / uid).iterdir()] == [f"{sr_uid}.dcm"]
        # The kill cost the held study one attempt, and nothing else.
        (attempts,) = journal_rows(cfg, "SELECT attempts FROM studies WHERE study_uid = ?", (held_uid,))[0]
        assert attempts == 2
        log = node.log.read_text()
        recovered = [json.loads(line) for line in log.splitlines() if '"worker.recovered_studies"' in line]
        assert [r["studies"] for r in recovered] == [{held_uid: "queued"}]
        assert recovered[0]["pid"] == held_pid
        wait_for(lambda: get_health(cfg.metrics.port)[1].get("workers_alive") == 2, timeout=120,
                 what="the killed worker restarted")
        _, doc = get_health(cfg.metrics.port)
        by_index = {w["index"]: w for w in doc["workers"]}
        assert by_index[held_index]["restarts"] == 1 and by_index[held_index]["pid"] != held_pid
        assert by_index[1 - held_index]["restarts"] == 0 and by_index[1 - held_index]["pid"] == other_pid
        metrics = scrape(cfg.metrics.port)
        assert metrics[("echonode_worker_process_restarts_total", (("worker", str(held_index)),))] == 1
        assert metrics[("echonode_worker_process_up", (("worker", "0"),))] == 1
        assert metrics[("echonode_worker_restarts_total", ())] == 1
    finally:
        for pid in _heartbeat_pids(cfg):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        node.stop()


def _heartbeat_pids(cfg) -> list[int]:
    return [p for p in (_heartbeat(cfg, i).get("pid") for i in (0, 1)) if p]


# -- health and the status page with several workers ------------------------------------------


def _pool_node(entries: list[dict]) -> SimpleNamespace:
    journal = SimpleNamespace(counts=lambda: {}, oldest_queued=lambda: None)
    return SimpleNamespace(
        scp=SimpleNamespace(listening=True), _start_worker=True, journal=journal,
        cfg=SimpleNamespace(metrics=SimpleNamespace(worker_stale_s=15.0, queue_stall_s=600.0)),
        worker=SimpleNamespace(workers=lambda: entries),
    )


def _entry(index: int, alive: bool = True, age: float | None = 0.4, study: str | None = None) -> dict:
    return {"index": index, "pid": 100 + index, "alive": alive, "restarts": 0, "phase": "processing" if study else "idle",
            "heartbeat_age_s": age, "study_uid": study, "studies": 0}


def test_health_names_the_worker_that_is_down() -> None:
    code, doc = health(_pool_node([_entry(0), _entry(1, study="1.2.3")]))
    assert (code, doc["worker"], doc["workers_alive"], doc["reasons"]) == (200, True, 2, [])
    code, doc = health(_pool_node([_entry(0), _entry(1, alive=False, age=None)]))
    assert (code, doc["worker"], doc["workers_alive"]) == (503, False, 1)
    assert doc["reasons"] == ["worker 1: process not running (crashed or killed; the node restarts it)"]
    code, doc = health(_pool_node([_entry(0, age=20.0), _entry(1)]))
    assert (code, doc["worker"]) == (503, False)
    assert doc["reasons"] == ["worker 0: no heartbeat for 20 s (process 100 stopped or frozen)"]


def test_a_dead_workers_studies_alone_go_back(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    for i, uid in enumerate(("1.2.3.1", "1.2.3.2")):
        journal.record_instance(InstanceRecord(f"1.2.4.{i}", uid, "1.2.5", "1.2.840.10008.5.1.4.1.1.3.1",
                                               "1.2.840.10008.1.2.1", str(tmp_path / f"{i}.dcm"), 1, time.time(),
                                               "CART"))
    journal.mark_stable(-1)
    journal.queue_stable()
    first, second = journal.claim_next(111), journal.claim_next(222)
    assert journal.recover_running(3, pid=111) == {first.study_uid: "queued"}
    assert journal.release_running(pid=333) == []
    assert [(uid, pid) for uid, _at, pid in journal.running()] == [(second.study_uid, 222)]


def test_reload_changes_the_number_of_workers(tmp_path: Path) -> None:
    """2 -> 1 -> 2 workers by reload: the surplus one leaves (not counted as a death), new ones start."""
    cfg = make_config(tmp_path, models={"workers": 2, "threads": 2})
    pool = WorkerPool(cfg)

    def settled(n: int) -> bool:
        pool.supervise()
        entries = pool.workers()
        return not pool._retiring and len(entries) == n and all(w["alive"] and w["phase"] == "idle" for w in entries)

    try:
        wait_for(lambda: settled(2), timeout=180, interval=0.2, what="two workers idle")
        first = [w["pid"] for w in pool.workers()]
        pool.apply_config(dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, workers=1)))
        wait_for(lambda: settled(1), timeout=180, interval=0.2, what="one worker left")
        assert pool.workers()[0]["pid"] not in first  # restarted with the new settings
        assert pool.supervisors[0].count == 1
        pool.apply_config(cfg)
        wait_for(lambda: settled(2), timeout=180, interval=0.2, what="two workers again")
        assert pool.restarts == 0  # reloads, not deaths
        assert [w["index"] for w in pool.workers()] == [0, 1]
    finally:
        pool.stop()
    assert all(s.process is None for s in pool.supervisors)


def test_the_status_page_shows_each_worker() -> None:
    from echonode.ops.statuspage import _health_section

    doc = health(_pool_node([_entry(0), _entry(1, study="1.2.3")]))[1]
    html = _health_section(SimpleNamespace(health_code=200, health=doc, scp_port=104))
    assert "worker 0 idle" in html
    assert 'worker 1 processing on study <span class="uid">1.2.3</span>' in html
