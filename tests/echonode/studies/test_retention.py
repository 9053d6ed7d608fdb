"""Retention with a real journal and store: what goes, what never goes, and in what order."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from echonode.config import RetentionConfig
from echonode.daemon.node import Node
from echonode.studies.journal import Journal
from echonode.studies.retention import Retention
from echonode.studies.states import StudyState
from echonode.studies.store import StudyStore
from tests.conftest import make_config
from tests.factories import DAY, make_study, receive, report_sr


@pytest.fixture
def store(tmp_path: Path) -> StudyStore:
    root = tmp_path / "storage"
    return StudyStore(root, Journal(root / "journal.sqlite"))


def make_reprocessed(store: StudyStore, tmp_path: Path, first: str, second: str, age_days: float) -> str:
    """A study reported with "set1", its SR left ``first``, then reprocessed with "set2", its SR left ``second``.

    The second SR supersedes the first: a first SR still ``pending`` or
    ``dead`` at that point becomes ``superseded`` (never sent); a ``sent``
    one stays ``sent``.
    """
    j = store.journal
    uid = generate_uid()
    receive(store, tmp_path, uid)
    j.mark_stable(0.0)
    j.queue_stable()
    claim = j.claim_next(os.getpid())
    assert claim is not None and claim.study_uid == uid
    older = report_sr(store, claim, "set1", first)
    assert j.requeue(uid)  # `echonode reprocess` once a new model set is installed
    claim = j.claim_next(os.getpid())
    assert claim is not None and claim.study_uid == uid
    report_sr(store, claim, "set2", second, supersedes=older.stem)
    when = time.time() - age_days * DAY
    j._connect().execute(
        "UPDATE studies SET first_received = ?, last_received = ?, updated = ? WHERE study_uid = ?",
        (when, when, when, uid),
    )
    return uid


def sr_files(store: StudyStore, uid: str) -> list[Path]:
    """The study's SR files on disk."""
    return sorted((store.reports / uid).glob("*.dcm"))


def assert_gone(store: StudyStore, uid: str) -> None:
    j = store.journal
    assert j.study(uid) is None
    assert j.instances(uid) == []
    assert j.report_for(uid, "set1") is None and j.latest_report(uid) is None
    assert not [o for o in j.status()["outbox"] if o["study_uid"] == uid]
    con = j._connect()
    assert con.execute("SELECT COUNT(*) FROM results WHERE study_uid = ?", (uid,)).fetchone()[0] == 0
    assert not (store.studies / uid).exists()
    assert not (store.reports / uid).exists()


def assert_kept(store: StudyStore, uid: str) -> None:
    recs = store.journal.instances(uid)
    assert store.journal.study(uid) is not None and recs
    assert all(Path(r.path).exists() for r in recs)


def test_age_purges_only_finished_studies(store: StudyStore, tmp_path: Path) -> None:
    recent = make_study(store, tmp_path, StudyState.DELIVERED, 5)
    # (stable and receiving last: later studies would move them on)
    old = {s: make_study(store, tmp_path, s, 40) for s in (
        StudyState.DELIVERED, StudyState.SKIPPED, StudyState.FAILED, StudyState.REPORTED,
        "reported-dead", "skipped-owed", StudyState.STABLE, StudyState.RECEIVING,
    )}
    assert {s: store.journal.study_state(u) for s, u in old.items()} == {
        s: StudyState(s.split("-")[0]) for s in old
    }
    assert store.journal.study_state(old["skipped-owed"]) == StudyState.SKIPPED

    with capture_logs() as logs:
        purged = Retention(RetentionConfig(enabled=True, max_age_days=30), store.journal, store).run()

    assert {p.study_uid for p in purged} == {old[StudyState.DELIVERED], old[StudyState.SKIPPED]}
    assert {p.rule for p in purged} == {"age"}
    assert_gone(store, old[StudyState.DELIVERED])
    assert_gone(store, old[StudyState.SKIPPED])
    for s, uid in old.items():
        if s not in (StudyState.DELIVERED, StudyState.SKIPPED):
            assert_kept(store, uid)
    assert_kept(store, recent)
    # An SR still owed keeps its file too.
    assert Path(store.journal.report_for(old["reported-dead"], "set1").path).exists()

    events = [e for e in logs if e["event"] == "retention.purged"]
    assert {e["study_uid"] for e in events} == {p.study_uid for p in purged}
    assert all(e["rule"] == "age" and e["bytes"] > 0 for e in events)
    # UIDs only: no paths, nothing from the data set.
    assert not any("path" in e for e in logs)

    # Idempotent.
    assert Retention(RetentionConfig(enabled=True, max_age_days=30), store.journal, store).run() == []


@pytest.mark.parametrize("first", ["sent", "pending", "dead"])
def test_a_reprocessed_study_goes_once_its_newest_sr_is_sent(
    store: StudyStore, tmp_path: Path, first: str
) -> None:
    """The older SR, superseded (or sent) before, keeps nothing; the newer one still owed keeps the study.

    With ``first`` pending or dead the older SR's row is ``superseded``: that
    row used to keep a delivered study for ever, logged
    ``retention.study_changed`` at every run.
    """
    j = store.journal
    done = make_reprocessed(store, tmp_path, first, "sent", 40)
    owed = {second: make_reprocessed(store, tmp_path, first, second, 40) for second in ("pending", "dead")}
    older_state = "sent" if first == "sent" else "superseded"
    rows = {u: sorted(o["state"] for o in j.status()["outbox"] if o["study_uid"] == u) for u in [done, *owed.values()]}
    assert rows == {done: sorted([older_state, "sent"]),
                    **{u: sorted([older_state, second]) for second, u in owed.items()}}
    assert j.study_state(done) == StudyState.DELIVERED
    assert {j.study_state(u) for u in owed.values()} == {StudyState.REPORTED}
    assert len(sr_files(store, done)) == 2

    job = Retention(RetentionConfig(enabled=True, max_age_days=30, max_total_gb=1e-9), j, store)
    with capture_logs() as logs:
        purged = job.run()
        assert job.run() == []  # and the next run has nothing to say about them either

    assert [(p.study_uid, p.rule) for p in purged] == [(done, "age")]
    assert_gone(store, done)  # both SRs' files with the study: they live under reports/<Study>/
    for uid in owed.values():
        assert_kept(store, uid)
        assert len(sr_files(store, uid)) == 2
        assert j.latest_report(uid) is not None
    assert not [e for e in logs if e["event"] == "retention.study_changed"]
    # The size rule saw the same candidates: nothing it could take was left.
    assert [e["event"] for e in logs].count("retention.over_cap") == 2


def test_size_cap_purges_oldest_finished_first(store: StudyStore, tmp_path: Path) -> None:
    pending = make_study(store, tmp_path, StudyState.REPORTED, 10)  # oldest, but its SR is owed
    d3 = make_study(store, tmp_path, StudyState.DELIVERED, 3)
    d2 = make_study(store, tmp_path, StudyState.SKIPPED, 2)
    d1 = make_study(store, tmp_path, StudyState.DELIVERED, 1)
    size = store.journal.status()["studies"][0]["bytes"]
    # Equal up to the UIDs' lengths (generate_uid varies by a few characters).
    assert all(abs(s["bytes"] - size) <= 64 for s in store.journal.status()["studies"])

    cfg = RetentionConfig(enabled=True, max_age_days=0, max_total_gb=2.5 * size / 1e9)
    purged = Retention(cfg, store.journal, store).run()

    assert [p.study_uid for p in purged] == [d3, d2]
    assert {p.rule for p in purged} == {"size"}
    assert purged[0].bytes >= size
    assert_gone(store, d3)
    assert_gone(store, d2)
    assert_kept(store, d1)
    assert_kept(store, pending)


def test_over_cap_with_nothing_purgeable_is_logged(store: StudyStore, tmp_path: Path) -> None:
    failed = make_study(store, tmp_path, StudyState.FAILED, 100)
    owed = make_study(store, tmp_path, "reported-dead", 100)
    with capture_logs() as logs:
        purged = Retention(RetentionConfig(enabled=True, max_age_days=1, max_total_gb=1e-9),
                           store.journal, store).run()
    assert purged == []
    assert_kept(store, failed)
    assert_kept(store, owed)
    (warning,) = [e for e in logs if e["event"] == "retention.over_cap"]
    assert warning["cap_bytes"] == 1 and warning["stored_bytes"] > 1


def test_a_discarded_dead_letter_no_longer_keeps_the_study(store: StudyStore, tmp_path: Path) -> None:
    """A dead letter kept its study for ever (and the node, in time, full); given up, the study goes.

    Over the cap, the size rule takes it at once; the age rule once it is idle
    for ``max_age_days`` after the discard (a state change is activity).
    """
    j = store.journal
    owed = make_study(store, tmp_path, "reported-dead", 100)
    aged = make_study(store, tmp_path, "reported-dead", 100)
    other = make_study(store, tmp_path, "reported-dead", 100)
    size_rule = RetentionConfig(enabled=True, max_age_days=0, max_total_gb=1e-9)
    age_rule = RetentionConfig(enabled=True, max_age_days=30)
    assert Retention(size_rule, j, store).run() == []
    assert Retention(age_rule, j, store).run() == []

    assert [d.study_uid for d in j.discard_dead(owed)] == [owed]
    assert j.study_state(owed) == StudyState.UNDELIVERED
    with capture_logs() as logs:
        purged = Retention(size_rule, j, store).run()
    assert [(p.study_uid, p.state, p.rule) for p in purged] == [(owed, "undelivered", "size")]
    assert_gone(store, owed)  # the SR file and the discarded row with it
    assert not [e for e in logs if e["event"] == "retention.study_changed"]

    j.discard_dead(aged)
    assert Retention(age_rule, j, store).run() == []  # the discard just now is its last activity
    when = time.time() - 40 * DAY
    j._connect().execute("UPDATE studies SET updated = ? WHERE study_uid = ?", (when, aged))
    assert [(p.study_uid, p.rule) for p in Retention(age_rule, j, store).run()] == [(aged, "age")]
    assert_gone(store, aged)
    assert_kept(store, other)  # still dead-lettered: still owed


def test_zero_means_no_limit(store: StudyStore, tmp_path: Path) -> None:
    uid = make_study(store, tmp_path, StudyState.DELIVERED, 10_000)
    assert Retention(RetentionConfig(enabled=True, max_age_days=0, max_total_gb=0),
                     store.journal, store).run() == []
    assert_kept(store, uid)


def test_settings_are_read_at_each_run(store: StudyStore, tmp_path: Path) -> None:
    uid = make_study(store, tmp_path, StudyState.DELIVERED, 10)
    cfg = make_config(tmp_path, retention={"enabled": True, "max_age_days": 30})
    job = Retention(cfg.retention, store.journal, store)
    assert job.run() == []
    job.apply_config(dataclasses.replace(cfg, retention=RetentionConfig(enabled=True, max_age_days=7)))  # a reload
    assert [p.study_uid for p in job.run()] == [uid]


def test_purge_study_guards(store: StudyStore, tmp_path: Path) -> None:
    j = store.journal
    assert j.purge_study("1.2.3.4") is None
    uid = make_study(store, tmp_path, StudyState.DELIVERED, 10)
    active = j.study(uid)["last_received"]
    # Wrong state, or changed since the caller looked: untouched.
    assert j.purge_study(uid, states=[StudyState.SKIPPED]) is None
    assert j.purge_study(uid, active_before=active - 1) is None
    assert_kept(store, uid)
    paths = j.purge_study(uid, states=[StudyState.DELIVERED], active_before=active)
    assert paths is not None and len(paths) == 2  # the instance and the SR
    assert all(Path(p).exists() for p in paths)  # rows only: files are the caller's
    assert j.study(uid) is None and j.instances(uid) == []

    owed = make_study(store, tmp_path, "reported-dead", 10)
    assert j.purge_study(owed, states=[StudyState.REPORTED]) is None  # an SR still owed
    # Without guards every row goes (an administrator's explicit purge).
    assert j.purge_study(owed) is not None
    assert j.study(owed) is None and j.status()["outbox"] == []


def test_an_instance_arriving_during_the_purge_is_kept(store: StudyStore, tmp_path: Path, monkeypatch) -> None:
    """A C-STORE for the study while it is purged waits for the purge, then lands in a fresh study."""
    import threading

    j = store.journal
    uid = make_study(store, tmp_path, StudyState.DELIVERED, 40)
    (old,) = j.instances(uid)
    real = j.purge_study
    late: list[Path] = []
    sender = threading.Thread(target=lambda: late.append(receive(store, tmp_path, uid)))
    blocked: list[bool] = []

    def racing(study_uid, **kw):
        paths = real(study_uid, **kw)
        sender.start()  # the receive races the file deletion ...
        sender.join(0.5)
        blocked.append(sender.is_alive())  # ... and must wait for the study's lock
        return paths

    monkeypatch.setattr(j, "purge_study", racing)
    purged = Retention(RetentionConfig(enabled=True, max_age_days=30), j, store).run()
    sender.join(10)
    assert blocked == [True]
    assert [p.study_uid for p in purged] == [uid]
    assert not Path(old.path).exists()
    assert late[0].exists()
    assert j.study_state(uid) == StudyState.RECEIVING and [r.path for r in j.instances(uid)] == [str(late[0])]


def test_node_schedules_retention_only_when_enabled(tmp_path: Path) -> None:
    for enabled in (False, True):
        cfg = make_config(tmp_path / str(enabled), retention={"enabled": enabled, "check_interval_s": 5.0})
        node = Node(cfg, start_worker=False)
        node.start()
        try:
            job = node.scheduler.get_job("retention")
            assert (job is not None) is enabled
        finally:
            node.stop()


def _old_selection(journal: Journal, cfg: RetentionConfig, now: float) -> list[tuple[str, str]]:
    """What retention purged before it paged through the journal: (study_uid, rule), in order.

    The earlier implementation, kept here as the reference: every study from
    ``Journal.status()``, filtered and sorted in Python.
    """
    status = journal.status()
    owed = {o["study_uid"] for o in status["outbox"] if o["state"] in ("pending", "dead")}
    total, candidates = 0, []
    for s in status["studies"]:
        total += int(s["bytes"] or 0)
        if s["state"] in ("delivered", "skipped") and s["study_uid"] not in owed:
            candidates.append((max(s["last_received"], s["updated"]), s["study_uid"], int(s["bytes"])))
    candidates.sort()
    out, remaining = [], []
    cutoff = now - cfg.max_age_days * DAY if cfg.max_age_days > 0 else None
    for active, uid, size in candidates:
        if cutoff is not None and active < cutoff:
            out.append((uid, "age"))
            total -= size
        else:
            remaining.append((uid, size))
    if cfg.max_total_gb > 0:
        for uid, size in remaining:
            if total <= cfg.max_total_gb * 1e9:
                break
            out.append((uid, "size"))
            total -= size
    return out


@pytest.mark.parametrize("rules", ["age", "size", "both"])
def test_paged_retention_picks_what_the_full_scan_picked(
    store: StudyStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rules: str
) -> None:
    import echonode.studies.retention

    # A page of 3 over 20 studies: many pages, and page ends inside runs of
    # equal activity times (the keyset's tie-break on the UID).
    monkeypatch.setattr(echonode.studies.retention, "PAGE", 3)
    kinds = [StudyState.DELIVERED, StudyState.SKIPPED, StudyState.FAILED, "reported-dead", StudyState.DELIVERED,
             StudyState.REPORTED, "skipped-owed", StudyState.DELIVERED, StudyState.SKIPPED, StudyState.DELIVERED]
    uids = [make_study(store, tmp_path, kind, age) for kind, age in
            zip(kinds * 2, [60, 55, 50, 45, 40, 35, 30, 25, 20, 15, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1], strict=True)]
    j = store.journal
    same = time.time() - 45 * DAY
    for uid in uids[1:9]:  # eight studies, five purgeable, last active at the same instant
        j._connect().execute("UPDATE studies SET last_received = ?, updated = ? WHERE study_uid = ?",
                             (same, same, uid))
    size = j.status()["studies"][0]["bytes"]
    cfg = RetentionConfig(
        enabled=True,
        max_age_days=30 if rules in ("age", "both") else 0,
        max_total_gb=7.5 * size / 1e9 if rules in ("size", "both") else 0,
    )
    now = time.time()
    expected = _old_selection(j, cfg, now)
    assert len(expected) >= 4 and {r for _, r in expected} == ({"age", "size"} if rules == "both" else {rules})

    purged = Retention(cfg, j, store).run(now=now)

    assert [(p.study_uid, p.rule) for p in purged] == expected
    for uid, _ in expected:
        assert_gone(store, uid)
    assert j.status()["studies_total"] == 20 - len(expected)


def test_retention_reads_the_journal_through_indexes(store: StudyStore, tmp_path: Path) -> None:
    """The queries that find candidates walk studies_active in order and stop: no table scan, no sort.

    (The cap's starting total is one SUM over the instances per run.)
    """
    for kind, age in [(StudyState.DELIVERED, 40), ("reported-dead", 40), (StudyState.SKIPPED, 3),
                      (StudyState.FAILED, 50)]:
        make_study(store, tmp_path, kind, age)
    con = store.journal._connect()
    seen: list[str] = []
    con.set_trace_callback(seen.append)
    try:
        purged = Retention(RetentionConfig(enabled=True, max_age_days=30, max_total_gb=1e-9),
                           store.journal, store).run()
    finally:
        con.set_trace_callback(None)
    assert len(purged) == 2
    selects = [q for q in seen if q.lstrip().upper().startswith("SELECT") and "FROM studies s" in q]
    assert selects
    for q in selects:
        plan = [r["detail"] for r in con.execute("EXPLAIN QUERY PLAN " + q)]
        assert any("USING INDEX studies_active" in d for d in plan), plan
        # "SCAN s USING INDEX" is the in-order walk that LIMIT stops; a bare
        # "SCAN s" would read the table, a temp B-tree would sort all of it.
        assert not any((d.startswith("SCAN") and "USING" not in d) or "TEMP B-TREE" in d for d in plan), plan
