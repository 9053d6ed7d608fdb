"""A long-lived node's journal: status, retention and metrics read a bounded part of it, whatever it holds.

The default tests check how the queries read (SQLite's query plans, what
they return); the slow one builds 100,000 studies (``bench/journal_scale.py``'s
builder, executemany) and checks what ``status --json`` prints there.
Timings are in docs/benchmarks.md, from the bench.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from echonode.config import to_toml
from echonode.daemon.node import ErrorCounts
from echonode.ops.prometheus import NodeCollector
from echonode.receive.scp import ReceiveCounters
from echonode.studies.journal import Journal
from echonode.studies.records import InstanceRecord, ReportRecord, TaskResult
from echonode.studies.states import OutboxState, StudyState
from tests.conftest import make_config, run_cli

TABLES = ("studies", "instances", "results", "reports", "outbox")


def _study(journal: Journal, uid: str, *, instances: int = 2, outbox: str | None = "sent", size: int = 1000) -> None:
    now = time.time()
    for k in range(instances):
        journal.record_instance(InstanceRecord(f"{uid}.{k + 1}", uid, f"{uid}.0", "1.2.840.10008.5.1.4.1.1.3.1",
                                               "1.2.840.10008.1.2.1", f"/s/{uid}.{k + 1}.dcm", size, now))
    if outbox is None:
        return
    assert journal.requeue(uid)
    claim = journal.claim_next(pid=1)
    report = ReportRecord(f"{uid}.99", uid, "set", f"{uid}.98", "1.2.840.10008.5.1.4.1.1.88.33", f"/r/{uid}.dcm")
    journal.finish_reported(claim, "set", [TaskResult("lvh", "m", "1", "1.2.9", 0.7, True, 0.5, 1, {"seconds": 2.0})],
                            report, ["pacs"])
    (item,) = [d for d in journal.due_deliveries(limit=10_000) if d.study_uid == uid]
    if outbox == "sent":
        journal.mark_sent(item.id)
    elif outbox == "dead":
        journal.mark_dead(item.id, "association rejected")


def _plans(journal: Journal, run) -> list[tuple[str, list[str]]]:
    """Each SELECT ``run`` sends to the journal, with SQLite's plan for it."""
    con = journal._connect()
    seen: list[str] = []
    con.set_trace_callback(seen.append)
    try:
        run()
    finally:
        con.set_trace_callback(None)
    out = []
    for q in seen:
        if q.lstrip().upper().startswith("SELECT"):
            out.append((q, [r["detail"] for r in con.execute("EXPLAIN QUERY PLAN " + q)]))
    return out


def _full_scans(plans: list[tuple[str, list[str]]]) -> list[tuple[str, str]]:
    """Plan lines that read a whole table (``SCAN t`` without an index)."""
    return [(q, d) for q, plan in plans for d in plan
            if d.startswith("SCAN") and "INDEX" not in d and d.split()[1] in TABLES]


def test_status_lists_a_bounded_part_of_the_outbox_and_counts_all_of_it(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    for i in range(40):  # a destination dead for weeks: every SR a dead letter
        _study(journal, f"1.2.{i + 1}", outbox="dead")
    for i in range(5):
        _study(journal, f"1.3.{i + 1}", outbox="pending")
    st = journal.status(limit=3)
    assert st["outbox_counts"][OutboxState.DEAD] == 40 and st["outbox_counts"][OutboxState.PENDING] == 5
    assert st["studies_total"] == 45 and len(st["studies"]) == 3
    rows = st["outbox"]
    # The 3 due first of each owing state, and every row of the 3 listed studies.
    assert sum(d["state"] == OutboxState.DEAD for d in rows) <= 3 + 3
    assert sum(d["state"] == OutboxState.PENDING for d in rows) <= 3 + 3
    assert {s["study_uid"] for s in st["studies"]} <= {d["study_uid"] for d in rows}
    assert [d["id"] for d in rows] == sorted(d["id"] for d in rows)
    # Everything, when asked.
    assert len(journal.status()["outbox"]) == 45


def test_status_and_metrics_read_through_indexes(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    for i, state in enumerate(["sent", "dead", "pending", None, "sent", "sent"]):
        _study(journal, f"1.2.{i + 1}", outbox=state)
    plans = _plans(journal, lambda: journal.status(limit=2))
    assert plans and _full_scans(plans) == [], _full_scans(plans)
    plans = _plans(journal, lambda: (journal.counts(), journal.outbox_counts(), journal.stored_bytes(),
                                      journal.inference_seconds_since(journal.last_result_id())))
    assert _full_scans(plans) == [], _full_scans(plans)
    # The stored total is one row, not a sum over every instance.
    assert not [q for q, _ in plans if "SUM(size)" in q]


def test_the_stored_total_follows_every_write_and_is_counted_once_for_an_older_journal(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    journal = Journal(path)

    def summed() -> int:
        return journal._connect().execute("SELECT COALESCE(SUM(size), 0) FROM instances").fetchone()[0]

    _study(journal, "1.2.1", size=100)
    _study(journal, "1.2.2", size=250, outbox=None)
    assert journal.stored_bytes() == summed() == 700
    # A replacement with another size, a purge.
    journal.record_instance(InstanceRecord("1.2.1.1", "1.2.1", "1.2.1.0", "1.2.840.10008.5.1.4.1.1.3.1",
                                           "1.2.840.10008.1.2.1", "/s/x.dcm", 5000, time.time()))
    assert journal.stored_bytes() == summed() == 5600
    assert journal.purge_study("1.2.2") is not None
    assert journal.stored_bytes() == summed() == 5100
    journal.close()
    # A journal from before the total: its table and triggers gone, as an earlier echonode left it.
    con = sqlite3.connect(path)
    con.executescript("DROP TRIGGER stored_totals_insert; DROP TRIGGER stored_totals_delete;"
                      " DROP TRIGGER stored_totals_update; DROP TABLE stored_totals;")
    con.close()
    journal = Journal(path)
    assert journal.stored_bytes() == summed() == 5100
    _study(journal, "1.2.3", size=10)
    assert journal.stored_bytes() == summed() == 5120


def test_metrics_read_the_journal_through_its_methods(tmp_path: Path) -> None:
    """No raw SQL on the journal's connection: a journal that refuses ``_connect`` from outside still scrapes."""
    journal = Journal(tmp_path / "journal.sqlite")
    _study(journal, "1.2.1")
    _study(journal, "1.2.2", outbox="dead")

    class Sealed:
        def __getattr__(self, name: str):
            if name.startswith("_"):
                raise AssertionError(f"metrics used the journal's private {name}")
            return getattr(journal, name)

    node = SimpleNamespace(
        scp=SimpleNamespace(counters=ReceiveCounters(), listening=True),
        journal=Sealed(), store=SimpleNamespace(root=tmp_path), delivery=None, worker=None, _start_worker=False,
        loop_errors=ErrorCounts(), job_errors=ErrorCounts(),
        cfg=SimpleNamespace(models_dir=tmp_path / "models"),
    )
    collector = NodeCollector(node)
    _study(journal, "1.2.3")
    families = {f.name: f for f in collector.collect()}
    outbox = {s.labels["state"]: s.value for s in families["echonode_outbox"].samples}
    assert outbox == {"pending": 0, "dead": 1}
    assert families["echonode_stored_bytes"].samples[0].value == 6000
    hist = {s.name: s.value for s in families["echonode_inference_seconds"].samples}
    assert hist["echonode_inference_seconds_count"] == 1  # the study reported after the collector started


def _bench():
    from bench import journal_scale

    return journal_scale


@pytest.mark.slow
def test_status_of_a_node_with_100k_studies_and_a_dead_destination(tmp_path: Path) -> None:
    """100,000 studies, every SR a dead letter: `status --json` lists 50 studies and a bounded outbox."""
    cfg = make_config(tmp_path)
    cfg.storage_dir.mkdir(parents=True)
    held = _bench().build(cfg.journal_path, 100_000, 10, 365.0)
    con = sqlite3.connect(cfg.journal_path)
    con.execute("UPDATE outbox SET state = 'dead' WHERE state = 'sent'")
    con.commit()
    con.close()
    config = tmp_path / "echonode.toml"
    config.write_text(to_toml(cfg))
    res = run_cli("--config", str(config), "status", "--json", timeout=300)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["studies_total"] == held["studies"] and len(doc["studies"]) == 50
    owed = doc["outbox_counts"]["dead"] + doc["outbox_counts"]["pending"]
    assert owed > 95_000
    assert len(doc["outbox"]) <= 3 * 50  # 50 due first of each owing state, and the listed studies' rows
    assert len(res.stdout) < 1_000_000
    assert sum(doc["study_counts"].values()) == held["studies"]
    assert doc["study_counts"][StudyState.DELIVERED] == held["states"]["delivered"]
