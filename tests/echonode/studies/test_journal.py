"""Journal: study states, claims, results and the outbox."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from echonode.studies.journal import Journal
from echonode.studies.records import (
    InstanceRecord,
    ReportRecord,
    StaleClaim,
    TaskResult,
)
from echonode.studies.states import OutboxState, StudyState


def rec(sop: str, study: str = "1.2.3", t: float | None = None) -> InstanceRecord:
    return InstanceRecord(sop, study, study + ".1", "1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.1.2.1",
                          f"/x/{sop}.dcm", 10, time.time() if t is None else t)


def result(task: str = "lvh") -> TaskResult:
    return TaskResult(task, "m", "1", "1.2.9", 0.7, True, 0.5, 2, {"videos": {}})


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path / "j.sqlite")


def test_journal_file_is_private(journal: Journal) -> None:
    assert (journal.path.stat().st_mode & 0o777) == 0o600


def test_receiving_to_queued(journal: Journal) -> None:
    t0 = time.time() - 100
    journal.record_instance(rec("1.2.3.4", t=t0))
    assert journal.study_state("1.2.3") == StudyState.RECEIVING
    assert journal.mark_stable(200) == []  # not quiet long enough
    assert journal.mark_stable(50) == ["1.2.3"]
    assert journal.queue_stable() == ["1.2.3"]
    assert journal.study_state("1.2.3") == StudyState.QUEUED


def test_new_instance_reopens_a_queued_study(journal: Journal) -> None:
    journal.record_instance(rec("1.2.3.4", t=time.time() - 100))
    journal.mark_stable(10)
    journal.queue_stable()
    journal.record_instance(rec("1.2.3.5"))
    assert journal.study_state("1.2.3") == StudyState.RECEIVING



@pytest.mark.parametrize(("sop_class", "reopens"), [
    ("1.2.840.10008.5.1.4.1.1.88.33", False),  # the sonographers' measurement SR
    ("1.2.840.10008.5.1.4.1.1.104.1", False),  # the report's PDF
    ("1.2.840.10008.5.1.4.1.1.3.1", True),  # a cine loop
])
def test_only_an_image_reopens_a_study(journal: Journal, sop_class: str, reopens: bool) -> None:
    """A document cannot change the analysis, which reads images only; an image can."""
    journal.record_instance(rec("1.2.3.4", t=time.time() - 100))
    journal.mark_stable(10)
    journal.queue_stable()
    late = InstanceRecord("1.2.3.9", "1.2.3", "1.2.3.2", sop_class, "1.2.840.10008.1.2.1", "/x/late.dcm", 10,
                          time.time())
    journal.record_instance(late)
    assert journal.study_state("1.2.3") == (StudyState.RECEIVING if reopens else StudyState.QUEUED)

def test_claim_and_stale_claim(journal: Journal) -> None:
    journal.record_instance(rec("1.2.3.4", t=time.time() - 100))
    journal.mark_stable(10)
    journal.queue_stable()
    claim = journal.claim_next(pid=1)
    assert claim is not None and claim.attempts == 1
    assert journal.study_state("1.2.3") == StudyState.RUNNING
    assert journal.claim_next(pid=1) is None
    # A new instance arrives while the worker runs: its result must not land.
    journal.record_instance(rec("1.2.3.5"))
    with pytest.raises(StaleClaim):
        journal.finish_reported(claim, "set", [result()], None, [])
    assert journal.study_state("1.2.3") == StudyState.RECEIVING


def test_failures_retry_then_fail(journal: Journal) -> None:
    journal.record_instance(rec("1.2.3.4", t=time.time() - 100))
    journal.mark_stable(10)
    journal.queue_stable()
    states = []
    for _ in range(3):
        claim = journal.claim_next(pid=1)
        states.append(journal.finish_failed(claim, "boom", max_attempts=3))
    assert states == [StudyState.QUEUED, StudyState.QUEUED, StudyState.FAILED]
    assert journal.study("1.2.3")["reason"] == "boom"


def test_recover_running(journal: Journal) -> None:
    journal.record_instance(rec("1.2.3.4", t=time.time() - 100))
    journal.mark_stable(10)
    journal.queue_stable()
    journal.claim_next(pid=1)
    assert journal.recover_running(max_attempts=3) == {"1.2.3": StudyState.QUEUED}
    journal.claim_next(pid=1)
    journal.recover_running(max_attempts=3)
    journal.claim_next(pid=1)
    assert journal.recover_running(max_attempts=3) == {"1.2.3": StudyState.FAILED}


def _report(journal: Journal, dests: list[str]) -> StudyState:
    journal.record_instance(rec("1.2.3.4", t=time.time() - 100))
    journal.mark_stable(10)
    journal.queue_stable()
    claim = journal.claim_next(pid=1)
    report = ReportRecord("1.2.3.99", "1.2.3", "set", "1.2.3.98", "1.2.840.10008.5.1.4.1.1.88.33", "/x/sr.dcm")
    return journal.finish_reported(claim, "set", [result("lvh"), result("severe_as")], report, dests)


def test_outbox_delivery_states(journal: Journal) -> None:
    assert _report(journal, ["a", "b"]) == StudyState.REPORTED
    due = journal.due_deliveries()
    assert [d.destination for d in due] == ["a", "b"]
    assert journal.mark_sent(due[0].id) == StudyState.REPORTED
    journal.mark_retry(due[1].id, time.time() + 60, "refused")
    assert journal.due_deliveries() == []
    assert journal.due_deliveries(now=time.time() + 61)[0].attempts == 1
    journal.mark_dead(due[1].id, "rejected permanently")
    assert journal.status()["outbox"][1]["state"] == OutboxState.DEAD
    assert journal.retry_dead("1.2.3") == 1
    due = journal.due_deliveries()
    assert journal.mark_sent(due[0].id) == StudyState.DELIVERED
    assert journal.study_state("1.2.3") == StudyState.DELIVERED


def test_one_report_per_study_and_model_set(journal: Journal) -> None:
    import sqlite3

    _report(journal, ["a"])
    journal.requeue("1.2.3")
    claim = journal.claim_next(pid=1)
    report = ReportRecord("1.2.3.100", "1.2.3", "set", "1.2.3.98", "1.2.840.10008.5.1.4.1.1.88.33", "/x/sr2.dcm")
    with pytest.raises(sqlite3.IntegrityError):
        journal.finish_reported(claim, "set", [result()], report, ["a"])
    assert journal.report_for("1.2.3", "set").sr_sop_uid == "1.2.3.99"


def test_no_destinations_means_delivered(journal: Journal) -> None:
    assert _report(journal, []) == StudyState.DELIVERED


def test_status_shape(journal: Journal) -> None:
    _report(journal, ["a"])
    st = journal.status()
    assert set(st) == {"studies", "outbox", "study_counts", "studies_total", "outbox_counts", "limit"}
    assert st["limit"] is None and st["studies_total"] == 1
    assert st["study_counts"] == {**{str(x): 0 for x in StudyState}, "reported": 1}
    assert st["outbox_counts"] == {**{str(x): 0 for x in OutboxState}, "pending": 1}
    s = st["studies"][0]
    assert {"study_uid", "state", "instances"} <= set(s)
    assert s["instances"] == 1
    assert {r["task"] for r in s["results"]} == {"lvh", "severe_as"}


def test_a_superseded_sr_still_waiting_is_never_sent(journal: Journal) -> None:
    _report(journal, ["a"])  # SR 1.2.3.99 pending for "a"
    journal.requeue("1.2.3")
    claim = journal.claim_next(pid=1)
    newer = ReportRecord("1.2.3.100", "1.2.3", "set2", "1.2.3.98", "1.2.840.10008.5.1.4.1.1.88.33", "/x/sr2.dcm",
                         supersedes="1.2.3.99")
    assert journal.finish_reported(claim, "set2", [result()], newer, ["a"]) == StudyState.REPORTED
    assert [d.sr_sop_uid for d in journal.due_deliveries()] == ["1.2.3.100"]
    old = [o for o in journal.status()["outbox"] if o["sr_sop_uid"] == "1.2.3.99"][0]
    assert old["state"] == OutboxState.SUPERSEDED and "1.2.3.100" in old["last_error"]
    assert journal.mark_sent(journal.due_deliveries()[0].id) == StudyState.DELIVERED


def _superseded(journal: Journal, newer_state: str) -> float:
    """Study 1.2.3: SR 1.2.3.99 superseded while pending, by 1.2.3.100 (``newer_state``); its activity."""
    _report(journal, ["a"])
    journal.requeue("1.2.3")
    claim = journal.claim_next(pid=1)
    newer = ReportRecord("1.2.3.100", "1.2.3", "set2", "1.2.3.97", "1.2.840.10008.5.1.4.1.1.88.33", "/x/sr2.dcm",
                         supersedes="1.2.3.99")
    journal.finish_reported(claim, "set2", [result()], newer, ["a"])
    (item,) = journal.due_deliveries()
    if newer_state == OutboxState.SENT:
        assert journal.mark_sent(item.id) == StudyState.DELIVERED
    elif newer_state == OutboxState.DEAD:
        journal.mark_dead(item.id, "refused")
    assert sorted(o["state"] for o in journal.status()["outbox"]) == sorted([OutboxState.SUPERSEDED, newer_state])
    return journal.study("1.2.3")["updated"]


def test_a_superseded_sr_does_not_keep_a_delivered_study(journal: Journal) -> None:
    """Its replacement was sent: listed for purge, and purged with both SRs' files."""
    active = _superseded(journal, OutboxState.SENT)
    assert journal.study_state("1.2.3") == StudyState.DELIVERED
    assert [c.study_uid for c in journal.purge_candidates([StudyState.DELIVERED])] == ["1.2.3"]
    paths = journal.purge_study("1.2.3", states=[StudyState.DELIVERED], active_before=active)
    assert paths is not None and sorted(paths) == ["/x/1.2.3.4.dcm", "/x/sr.dcm", "/x/sr2.dcm"]
    assert journal.study("1.2.3") is None and journal.status()["outbox"] == []


@pytest.mark.parametrize("newer_state", [OutboxState.PENDING, OutboxState.DEAD])
def test_a_superseding_sr_still_owed_keeps_the_study(journal: Journal, newer_state: str) -> None:
    active = _superseded(journal, newer_state)
    assert journal.study_state("1.2.3") == StudyState.REPORTED
    states = [StudyState.REPORTED, StudyState.DELIVERED]  # even were `reported` allowed
    assert journal.purge_candidates(states) == []
    assert journal.purge_study("1.2.3", states=states, active_before=active) is None
    assert journal.study_state("1.2.3") == StudyState.REPORTED and len(journal.status()["outbox"]) == 2


@pytest.mark.parametrize("outbox_state", [*OutboxState, "sending"])
def test_purge_candidates_and_purge_study_agree_on_every_outbox_state(journal: Journal, outbox_state: str) -> None:
    """A study retention lists is one purge_study takes; "sending" stands for a state this version lacks."""
    _report(journal, ["a"])
    journal._connect().execute("UPDATE outbox SET state = ?", (outbox_state,))
    listed = [c.study_uid for c in journal.purge_candidates([StudyState.REPORTED])]
    purged = journal.purge_study("1.2.3", states=[StudyState.REPORTED], active_before=time.time())
    settled = outbox_state in (OutboxState.SENT, OutboxState.SUPERSEDED, OutboxState.DISCARDED)
    assert listed == (["1.2.3"] if settled else [])
    assert (purged is not None) is settled


def _outbox(journal: Journal) -> dict[str, dict]:
    """The outbox rows of study 1.2.3 by destination."""
    return {o["destination"]: o for o in journal.status()["outbox"] if o["study_uid"] == "1.2.3"}


def test_discard_gives_up_on_dead_rows_only(journal: Journal) -> None:
    """Pending and sent rows stay as they are; a discarded row keeps its error and is never retried."""
    _report(journal, ["a", "b", "c"])
    a, b, c = journal.due_deliveries()
    journal.mark_sent(a.id)
    journal.mark_dead(b.id, "destination no longer configured")
    before = time.time()
    (gone,) = journal.discard_dead()
    assert (gone.study_uid, gone.sr_sop_uid, gone.destination) == ("1.2.3", "1.2.3.99", "b")
    assert gone.last_error == "destination no longer configured"
    rows = _outbox(journal)
    assert {d: o["state"] for d, o in rows.items()} == {"a": "sent", "b": "discarded", "c": "pending"}
    assert rows["b"]["last_error"] == "destination no longer configured"
    assert rows["b"]["discarded_at"] >= before and rows["a"]["discarded_at"] is None
    # "c" is still owed: the study waits for it.
    assert journal.study_state("1.2.3") == StudyState.REPORTED
    assert journal.retry_dead() == 0 and _outbox(journal)["b"]["state"] == OutboxState.DISCARDED
    assert journal.discard_dead() == []
    assert [d.destination for d in journal.due_deliveries()] == ["c"]
    # The last owed row sent: delivered, since "a" has the SR.
    assert journal.mark_sent(c.id) == StudyState.DELIVERED
    assert journal.status()["outbox_counts"] == {**{str(x): 0 for x in OutboxState}, "sent": 2, "discarded": 1}


def test_discard_by_study_and_destination(journal: Journal) -> None:
    _report(journal, ["old", "pacs"])
    for item in journal.due_deliveries():
        journal.mark_dead(item.id, "refused")
    assert journal.discard_dead("9.9.9") is None  # no such study
    assert journal.discard_dead(destination="elsewhere") == []
    assert [d.destination for d in journal.discard_dead("1.2.3", destination="old")] == ["old"]
    assert {d: o["state"] for d, o in _outbox(journal).items()} == {"old": "discarded", "pacs": "dead"}
    assert journal.study_state("1.2.3") == StudyState.REPORTED  # "pacs" is still owed


def test_a_study_whose_sr_went_nowhere_is_undelivered_and_may_go(journal: Journal) -> None:
    """Every row discarded: not ``delivered`` (no PACS has the SR), but nothing owed either."""
    _report(journal, ["old"])
    (item,) = journal.due_deliveries()
    journal.mark_dead(item.id, "destination no longer configured")
    assert journal.purge_candidates([StudyState.REPORTED, StudyState.UNDELIVERED]) == []
    assert len(journal.discard_dead(destination="old")) == 1
    assert journal.study_state("1.2.3") == StudyState.UNDELIVERED
    assert journal.status()["study_counts"]["undelivered"] == 1
    assert [c.study_uid for c in journal.purge_candidates([StudyState.UNDELIVERED])] == ["1.2.3"]
    # Final like delivered: a late instance is recorded but does not re-open it.
    assert journal.record_instance(rec("1.2.3.5")) == StudyState.UNDELIVERED
    # Reprocessed: the new SR is owed again; the discarded row stays as it was.
    journal.requeue("1.2.3")
    claim = journal.claim_next(pid=1)
    newer = ReportRecord("1.2.3.100", "1.2.3", "set2", "1.2.3.97", "1.2.840.10008.5.1.4.1.1.88.33", "/x/sr2.dcm",
                         supersedes="1.2.3.99")
    assert journal.finish_reported(claim, "set2", [result()], newer, ["pacs"]) == StudyState.REPORTED
    assert {o["sr_sop_uid"]: o["state"] for o in journal.status()["outbox"]} == {
        "1.2.3.99": "discarded", "1.2.3.100": "pending"}
    assert journal.mark_sent(journal.due_deliveries()[0].id) == StudyState.DELIVERED


def test_an_older_sr_sent_does_not_make_the_latest_delivered(journal: Journal) -> None:
    """The PACS has the first SR, not the results ``status`` shows: the study is ``undelivered``."""
    _report(journal, ["pacs"])
    journal.mark_sent(journal.due_deliveries()[0].id)
    journal.requeue("1.2.3")
    claim = journal.claim_next(pid=1)
    newer = ReportRecord("1.2.3.100", "1.2.3", "set2", "1.2.3.97", "1.2.840.10008.5.1.4.1.1.88.33", "/x/sr2.dcm",
                         supersedes="1.2.3.99")
    journal.finish_reported(claim, "set2", [result()], newer, ["pacs"])
    journal.mark_dead(journal.due_deliveries()[0].id, "refused")
    journal.discard_dead()
    assert journal.study_state("1.2.3") == StudyState.UNDELIVERED


def test_a_journal_from_before_discard_gets_its_column(tmp_path: Path) -> None:
    """An outbox table without ``discarded_at`` (an earlier echonode's) gains it at open."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    j = Journal(path)
    _report(j, ["a"])
    j.close()
    con = sqlite3.connect(path)
    con.execute("ALTER TABLE outbox DROP COLUMN discarded_at")
    con.close()
    j = Journal(path)
    (item,) = j.due_deliveries()
    j.mark_dead(item.id, "refused")
    assert len(j.discard_dead()) == 1
    assert _outbox(j)["a"]["discarded_at"] is not None
    j.close()


def test_a_journal_from_before_the_fallback_records_what_was_sent(tmp_path: Path) -> None:
    """An outbox table without ``sent_sop_class_uid`` / ``sent_sop_uid`` gains them at open, and a send fills them."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    j = Journal(path)
    _report(j, ["a", "b"])
    j.close()
    con = sqlite3.connect(path)
    con.execute("ALTER TABLE outbox DROP COLUMN sent_sop_class_uid")
    con.execute("ALTER TABLE outbox DROP COLUMN sent_sop_uid")
    con.close()
    j = Journal(path)
    a, b = sorted(j.due_deliveries(), key=lambda i: i.destination)
    j.mark_sent(a.id, "1.2.840.10008.5.1.4.1.1.88.33", "2.25.1234")
    j.mark_sent(b.id)  # a caller that does not say (as an earlier echonode's)
    rows = _outbox(j)
    assert (rows["a"]["sent_sop_class_uid"], rows["a"]["sent_sop_uid"]) == ("1.2.840.10008.5.1.4.1.1.88.33", "2.25.1234")
    assert (rows["b"]["sent_sop_class_uid"], rows["b"]["sent_sop_uid"]) == (None, None)
    j.close()


def test_rerun_with_same_models_keeps_the_reported_results(journal: Journal) -> None:
    _report(journal, ["a"])
    journal.requeue("1.2.3")
    claim = journal.claim_next(pid=1)
    changed = TaskResult("lvh", "m", "1", "1.2.9", 0.01, False, 0.5, 2, {})
    journal.finish_reported(claim, "set", [changed], None, ["a"])
    probs = {r["task"]: r["probability"] for r in journal.status()["studies"][0]["results"]}
    assert probs["lvh"] == 0.7


def test_release_running_does_not_count_the_attempt(journal: Journal) -> None:
    journal.record_instance(rec("1.2.3.4", t=time.time() - 100))
    journal.mark_stable(10)
    journal.queue_stable()
    assert journal.claim_next(pid=1).attempts == 1
    assert journal.release_running() == ["1.2.3"]
    st = journal.study("1.2.3")
    assert st["state"] == StudyState.QUEUED and st["attempts"] == 0
    assert journal.claim_next(pid=1).attempts == 1


def _study(journal: Journal, uid: str, t: float) -> None:
    """A receiving study whose first and last activity are at ``t``."""
    journal.record_instance(rec(uid + ".1", study=uid, t=t))
    journal._connect().execute("UPDATE studies SET updated = ? WHERE study_uid = ?", (t, uid))


def _delivered_later(journal: Journal, uid: str, dest_state: str) -> None:
    """Report ``uid`` to one destination; leave its row ``dest_state`` (sent, pending or dead)."""
    assert journal.requeue(uid)
    claim = journal.claim_next(pid=1)
    assert claim is not None and claim.study_uid == uid
    report = ReportRecord(uid + ".99", uid, "set", uid + ".98", "1.2.840.10008.5.1.4.1.1.88.33", "/x/sr.dcm")
    journal.finish_reported(claim, "set", [result()], report, ["a"])
    (item,) = [d for d in journal.due_deliveries() if d.study_uid == uid]
    if dest_state == OutboxState.SENT:
        journal.mark_sent(item.id)
    elif dest_state == OutboxState.DEAD:
        journal.mark_dead(item.id, "refused")


def test_status_with_a_limit_lists_the_most_recent_and_counts_all(journal: Journal) -> None:
    t0 = time.time() - 1000
    # 1.2.10 is the first received but the most recently active (a dead
    # letter just now); 1.2.11 has an SR pending; the others only received.
    for i in range(10, 18):
        _study(journal, f"1.2.{i}", t0 + i)
    for uid, dest_state in (("1.2.10", OutboxState.DEAD), ("1.2.11", OutboxState.PENDING),
                            ("1.2.12", OutboxState.SENT)):
        _delivered_later(journal, uid, dest_state)
    for uid, t in (("1.2.11", t0 + 1), ("1.2.12", t0 + 2)):  # their activity long ago again
        journal._connect().execute("UPDATE studies SET updated = ? WHERE study_uid = ?", (t, uid))

    full = journal.status()
    assert [s["study_uid"] for s in full["studies"]] == [f"1.2.{i}" for i in range(10, 18)]
    assert len(full["outbox"]) == 3

    st = journal.status(limit=3)
    assert st["limit"] == 3
    with pytest.raises(ValueError):
        journal.status(limit=0)  # "everything" is None; 0 is not a second spelling of it
    # The three most recently active, still in order of first reception.
    assert [s["study_uid"] for s in st["studies"]] == ["1.2.10", "1.2.16", "1.2.17"]
    assert st["studies"] == [s for s in full["studies"] if s["study_uid"] in {"1.2.10", "1.2.16", "1.2.17"}]
    assert st["studies_total"] == 8
    assert st["study_counts"] == {**{str(x): 0 for x in StudyState}, "receiving": 5, "reported": 2, "delivered": 1}
    assert st["outbox_counts"] == {**{str(x): 0 for x in OutboxState}, "sent": 1, "pending": 1, "dead": 1}
    # Rows not yet sent are listed whatever their study; a sent one only with its study.
    assert [(o["study_uid"], o["state"]) for o in st["outbox"]] == [("1.2.10", "dead"), ("1.2.11", "pending")]
    assert journal.status(limit=100)["studies"] == full["studies"]


def test_a_journal_from_before_the_indexes_gets_them(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    j = Journal(path)
    j.record_instance(rec("1.2.3.4", t=time.time() - 100))
    j.close()
    # The previous schema is the current one without these two indexes.
    con = sqlite3.connect(path)
    con.executescript("DROP INDEX studies_active; DROP INDEX outbox_study;")
    con.close()

    def indexes() -> set[str]:
        con = sqlite3.connect(path)
        try:
            return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        finally:
            con.close()

    assert not {"studies_active", "outbox_study"} & indexes()
    j = Journal(path)
    assert {"studies_active", "outbox_study", "studies_state", "instances_study"} <= indexes()
    assert j.study_state("1.2.3") == StudyState.RECEIVING and len(j.instances()) == 1
    # The queries that depend on the expression index use it.
    plan = " ".join(
        r["detail"]
        for r in j._connect().execute(
            "EXPLAIN QUERY PLAN SELECT study_uid FROM studies s ORDER BY MAX(s.last_received, s.updated) DESC,"
            " s.study_uid DESC LIMIT 5"
        )
    )
    assert "studies_active" in plan and "TEMP B-TREE" not in plan
    j.close()


def test_a_state_from_a_later_release_is_final_after_a_roll_back(journal: Journal) -> None:
    """A roll back meets states it does not know: never re-opened, claimed or purged, no crash."""
    journal.record_instance(rec("1.2.3.4", t=time.time() - 100))
    with journal._tx() as con:
        con.execute("UPDATE studies SET state = 'from-a-later-release' WHERE study_uid = '1.2.3'")
    journal.record_instance(rec("1.2.3.5"))  # a late instance: recorded, the study stays as it is
    assert journal.study_state("1.2.3") == "from-a-later-release"
    assert journal.get_instance("1.2.3.5") is not None
    journal.mark_stable(0)
    journal.queue_stable()
    assert journal.claim_next(pid=1) is None
    assert journal.purge_candidates([StudyState.DELIVERED, StudyState.UNDELIVERED, StudyState.SKIPPED],
                                    active_before=time.time() + 10) == []
