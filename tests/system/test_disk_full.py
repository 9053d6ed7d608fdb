"""A full disk, for real: the storage folder on a small tmpfs, filled by a ballast file at the moment under test.

The node must survive it, not only refuse new work: a C-STORE whose journal
record finds no room is answered 0xA700 (out of resources, the sender tries
again) and leaves nothing behind; a study whose SR or journal rows find no
room goes back to the queue uncounted, nothing partial stays on disk, and it
is done once space returns. SQLite's own behaviour counts here (its WAL must
grow to take a commit; after SQLITE_FULL it rolls the transaction back by
itself), so nothing is mocked below the file system: the ballast fills the
tmpfs, the writes fail as they would on a full volume.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from structlog.testing import capture_logs

from echonode.analyse.worker import DISK_FULL_REASON, DiskFullPause, work_once
from echonode.bundles.registry import ModelRegistry
from echonode.daemon.node import Node
from echonode.studies.connection import is_disk_full
from echonode.studies.journal import Journal
from echonode.studies.states import StudyState
from echonode.studies.store import RESERVE_NAME, SpaceReserve, StudyStore
from tests.conftest import free_port, make_config, wait_for, with_destination
from tests.factories import tiny_bundle, us_multiframe, write
from tests.peers import RecordingSCP, c_store

DISK_MB = 16


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, unmounted at teardown (mounting needs root)."""
    where = tmp_path / "disk"
    where.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m,mode=0700", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs in CI (needs root): {res.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")
    # A node's SCP points the process's temp folder at its incoming/
    # (scp.StorageSCP.start): put it back before the disk goes, or the next
    # test's in-process peers would write their temp files into a folder
    # that no longer exists.
    tempdir = tempfile.tempdir
    try:
        yield where
    finally:
        tempfile.tempdir = tempdir
        # Lazy: a connection a failed test left open must not keep it mounted.
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte with a ballast file; returns it (delete it to give the room back)."""
    ballast = disk / "ballast"
    with open(ballast, "ab", buffering=0) as f:
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return ballast


def filling_first(disk: Path, fn: Callable, ballasts: list[Path]) -> Callable:
    """``fn`` that fills the disk before it runs (the moment under test)."""

    def wrapper(*args, **kwargs):
        ballasts.append(fill(disk))
        return fn(*args, **kwargs)

    return wrapper


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# -- the journal itself -------------------------------------------------------------------


def test_a_full_disk_mid_transaction_raises_the_disk_full_error_and_the_journal_goes_on(small_disk: Path) -> None:
    journal = Journal(small_disk / "journal.sqlite")
    ballast = fill(small_disk)
    # A transaction big enough to spill SQLite's page cache into the WAL
    # before its COMMIT: SQLITE_FULL in a statement, after which SQLite
    # has rolled the transaction back by itself.
    with pytest.raises(sqlite3.OperationalError) as caught, journal._tx() as con:
        for i in range(64):
            con.execute("INSERT INTO studies (study_uid, state, reason, first_received, last_received, updated)"
                        " VALUES (?, 'receiving', ?, 0, 0, 0)", (f"1.2.{i}", "x" * 200_000))
    assert is_disk_full(caught.value), caught.value  # not "cannot rollback - no transaction is active"
    assert not journal._connect().in_transaction
    ballast.unlink()
    assert journal.mark_stable(0) == []  # the same connection writes again
    journal.close()


# -- receiving ------------------------------------------------------------------------------


@pytest.fixture
def full_disk_node(tmp_path: Path, small_disk: Path) -> Iterator[tuple[Node, list[Path]]]:
    """A node (no worker) whose storage is the small disk; ``ballasts`` lists what filled it."""
    cfg = make_config(tmp_path, node={"storage_dir": str(small_disk / "storage")})
    node = Node(cfg, start_worker=False)
    node.start()
    ballasts: list[Path] = []
    try:
        yield node, ballasts
    finally:
        for b in ballasts:
            b.unlink(missing_ok=True)
        node.stop()
        node.journal.close()


def test_disk_full_as_the_journal_records_a_c_store_answers_a700_and_keeps_nothing(
    full_disk_node: tuple[Node, list[Path]], small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node, ballasts = full_disk_node
    ds = us_multiframe()
    # The object is received, checked and moved into place; then the disk
    # is full as its journal record is written.
    monkeypatch.setattr(node.journal, "record_instance",
                        filling_first(small_disk, node.journal.record_instance, ballasts))
    with capture_logs() as logs:
        assert c_store(node.scp.port, [ds]) == [0xA700]  # out of resources: the cart sends it again later
    assert node.scp.counters.failures == {"out_of_disk": 1}
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["store.refused_disk_full"]
    assert node.journal.get_instance(str(ds.SOPInstanceUID)) is None
    # Nothing the sender was told is gone: no file, no folder made for it, no temp file.
    assert files_under(node.store.studies) == [] and list(node.store.studies.iterdir()) == []
    assert list(node.store.incoming.iterdir()) == []

    # Space returns; the next start finds nothing to record, and the resend is stored.
    ballasts.pop().unlink()
    monkeypatch.undo()
    assert node.store.recover()["recorded"] == 0
    assert c_store(node.scp.port, [ds]) == [0]
    assert node.journal.get_instance(str(ds.SOPInstanceUID)) is not None


@pytest.mark.parametrize("where", ["same series", "new series"])
def test_a_replacement_refused_for_a_full_disk_keeps_the_recorded_copy(
    full_disk_node: tuple[Node, list[Path]], small_disk: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    node, ballasts = full_disk_node
    first = us_multiframe(seed=1)
    assert c_store(node.scp.port, [first]) == [0]
    recorded = node.journal.get_instance(str(first.SOPInstanceUID))
    before = Path(recorded.path).read_bytes()
    # The same SOP Instance UID with other pixels (the newest copy would win).
    second = us_multiframe(study_uid=first.StudyInstanceUID, sop_uid=first.SOPInstanceUID, seed=2,
                           series_uid=first.SeriesInstanceUID if where == "same series" else None)
    monkeypatch.setattr(node.journal, "record_instance",
                        filling_first(small_disk, node.journal.record_instance, ballasts))
    assert c_store(node.scp.port, [second]) == [0xA700]
    # The copy stored and recorded before this C-STORE is still there, byte for byte,
    # and the refused one left nothing.
    assert node.journal.get_instance(str(first.SOPInstanceUID)) == recorded
    assert Path(recorded.path).read_bytes() == before
    assert files_under(node.store.studies) == [str(Path(recorded.path).relative_to(node.store.studies))]


# -- the worker -------------------------------------------------------------------------------


@pytest.fixture
def queued_study(tmp_path: Path, small_disk: Path) -> Iterator[dict]:
    """A stored, queued study on the small disk, a tiny model, and the worker's pieces."""
    cfg = make_config(tmp_path, node={"storage_dir": str(small_disk / "storage")})
    tiny_bundle(cfg.models_dir, "lvh")
    journal = Journal(cfg.journal_path)
    store = StudyStore(cfg.storage_dir, journal)
    ds = us_multiframe(frames=16)
    tmp = write(ds, store.incoming / "t.dcm")
    header, _ = store.accept(tmp, "CART")
    journal.mark_stable(-1)
    journal.queue_stable()
    registry = ModelRegistry(cfg.models_dir, "cpu")
    registry.refresh()
    reserve = SpaceReserve(cfg.storage_dir / RESERVE_NAME)
    assert reserve.restore()
    ballasts: list[Path] = []
    try:
        yield {"cfg": cfg, "journal": journal, "store": store, "registry": registry, "study_uid": header.study_uid,
               "pause": DiskFullPause(journal, reserve), "ballasts": ballasts}
    finally:
        for b in ballasts:
            b.unlink(missing_ok=True)
        journal.close()


def _turn(w: dict) -> float:
    return work_once(w["cfg"], w["journal"], w["store"], w["registry"], w["pause"])


@pytest.mark.parametrize("fails", ["SR file", "journal rows"])
def test_a_study_that_meets_a_full_disk_goes_back_to_the_queue_uncounted_and_is_done_when_space_returns(
    queued_study: dict, small_disk: Path, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    import echonode.analyse.worker

    w = queued_study
    journal, store, uid = w["journal"], w["store"], w["study_uid"]
    if fails == "SR file":
        monkeypatch.setattr(echonode.analyse.worker, "write_report",
                            filling_first(small_disk, echonode.analyse.worker.write_report, w["ballasts"]))
    else:  # the SR is written, then its journal rows find no room
        monkeypatch.setattr(journal, "finish_reported",
                            filling_first(small_disk, journal.finish_reported, w["ballasts"]))
    with capture_logs() as logs:
        assert _turn(w) > 0
        assert _turn(w) > 0  # still full: nothing claimed, nothing logged again
    study = journal.study(uid)
    assert study["state"] == StudyState.QUEUED and study["attempts"] == 0 and study["reason"] == DISK_FULL_REASON
    assert [(e["event"], e.get("study_uid")) for e in logs if e["log_level"] == "error"] == [("worker.disk_full", uid)]
    # Nothing partial: no temp SR, no SR that the journal does not know.
    assert files_under(store.reports) == []
    assert journal.latest_report(uid) is None

    monkeypatch.undo()
    w["ballasts"].pop().unlink()
    with capture_logs() as logs:
        assert _turn(w) == 0
    assert "worker.disk_space_back" in [e["event"] for e in logs]
    study = journal.study(uid)
    assert study["state"] == StudyState.DELIVERED and study["attempts"] == 1 and study["reason"] is None
    assert len(files_under(store.reports)) == 1


def test_a_claim_the_journal_cannot_take_back_yet_is_held_and_returned_when_space_returns(
    queued_study: dict, small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reserve's room taken by something else before the worker used it: the claim waits in the worker."""
    import echonode.analyse.worker

    w = queued_study
    journal, uid, pause = w["journal"], w["study_uid"], w["pause"]
    monkeypatch.setattr(echonode.analyse.worker, "write_report",
                        filling_first(small_disk, echonode.analyse.worker.write_report, w["ballasts"]))
    release = pause.reserve.release

    def release_then_fill() -> bool:
        given = release()
        w["ballasts"].append(fill(small_disk))
        return given

    monkeypatch.setattr(pause.reserve, "release", release_then_fill)
    assert _turn(w) > 0
    assert pause.held is not None and journal.study(uid)["state"] == StudyState.RUNNING
    assert _turn(w) > 0
    assert pause.held is not None
    monkeypatch.undo()
    for b in w["ballasts"]:  # one file, filled twice
        b.unlink(missing_ok=True)
    assert _turn(w) == 0  # the claim returned uncounted, then claimed again and done
    assert pause.held is None
    study = journal.study(uid)
    assert study["state"] == StudyState.DELIVERED and study["attempts"] == 1


def test_a_reserve_is_room_given_back(small_disk: Path) -> None:
    reserve = SpaceReserve(small_disk / RESERVE_NAME, size=2 << 20)
    assert reserve.restore() and reserve.path.stat().st_blocks * 512 >= 2 << 20  # real blocks, not sparse
    ballast = fill(small_disk)
    assert reserve.release()
    with open(small_disk / "after", "wb") as f:  # the room is there to use
        f.write(b"\0" * (1 << 20))
    (small_disk / "after").unlink()
    ballast.unlink()
    fill(small_disk)
    assert not reserve.restore()  # no room: it says so, and leaves no part behind
    assert sorted(p.name for p in small_disk.iterdir()) == ["ballast"]


def test_a_full_disk_at_claim_time_pauses_the_worker(queued_study: dict, small_disk: Path) -> None:
    w = queued_study
    journal, uid = w["journal"], w["study_uid"]
    w["ballasts"].append(fill(small_disk))
    with capture_logs() as logs:
        for _ in range(3):
            assert _turn(w) > 0
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["worker.disk_full"]
    assert journal.study(uid)["state"] == StudyState.QUEUED
    w["ballasts"].pop().unlink()
    assert _turn(w) == 0
    assert journal.study(uid)["state"] == StudyState.DELIVERED


def test_sr_round_trip_on_the_small_disk(queued_study: dict) -> None:
    """The fixture's study is done as usual when the disk has room (the cases above start from it)."""
    w = queued_study
    assert _turn(w) == 0
    report = w["journal"].latest_report(w["study_uid"])
    assert pydicom.dcmread(report.path).StudyInstanceUID == w["study_uid"]


@pytest.fixture
def pacs() -> Iterator[RecordingSCP]:
    """A PACS that records every SR it is sent."""
    scp = RecordingSCP(free_port()).start()
    try:
        yield scp
    finally:
        scp.stop()


def test_a_running_node_survives_a_disk_that_fills_while_its_worker_writes_the_sr(
    tmp_path: Path, small_disk: Path, pacs: RecordingSCP
) -> None:
    """The real worker process: the disk fills as it analyses; the study waits in the queue, then is delivered once."""
    cfg = with_destination(make_config(tmp_path, node={"storage_dir": str(small_disk / "storage")}),
                           "pacs", "PACS", pacs.port)
    tiny_bundle(cfg.models_dir, "lvh")
    worker_log = tmp_path / "worker.log"
    node = Node(cfg, worker_log_path=str(worker_log))
    node.start()
    ballast: Path | None = None
    try:
        study = pydicom.uid.generate_uid()
        assert c_store(node.scp.port, [us_multiframe(study_uid=study, frames=32, seed=i) for i in range(4)]) == [0] * 4
        wait_for(lambda: node.journal.study_state(study) == StudyState.RUNNING, timeout=120, interval=0.01,
                 what="the worker to claim the study")
        ballast = fill(small_disk)  # while it analyses: its SR finds no room
        filled = time.monotonic()
        wait_for(lambda: node.journal.study_state(study) == StudyState.QUEUED, timeout=60,
                 what="the study back in the queue")
        requeued_s = time.monotonic() - filled
        row = node.journal.study(study)
        assert row["attempts"] == 0 and row["reason"] == DISK_FULL_REASON
        assert [p.name for p in node.store.reports.rglob("*") if p.is_file()] == []  # no .part, no stray SR
        assert '"event": "worker.disk_full"' in worker_log.read_text()
        assert pacs.received == []

        ballast.unlink()
        ballast = None
        freed = time.monotonic()
        wait_for(lambda: node.journal.study_state(study) == StudyState.DELIVERED, timeout=120,
                 what="the study delivered once space returned")
        print({"disk full -> study queued again (s)": round(requeued_s, 2),
               "space back -> SR delivered (s)": round(time.monotonic() - freed, 2)})
        # One SR (a resend of the same one after a delivery timeout on a loaded machine is no second SR).
        assert {(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)) for ds in pacs.received} == {
            (study, node.journal.latest_report(study).sr_sop_uid)}
        assert node.journal.study(study)["attempts"] == 1
    finally:
        if ballast is not None:
            ballast.unlink(missing_ok=True)
        node.stop()
        node.journal.close()


def test_retention_frees_a_full_disk_with_the_reserve(tmp_path: Path, small_disk: Path) -> None:
    """Purging needs room in the journal too: on a full disk retention gives back the worker's reserve to do it."""
    from echonode.config import RetentionConfig
    from echonode.studies.retention import Retention
    from tests.factories import make_study

    root = small_disk / "storage"
    journal = Journal(root / "journal.sqlite")
    store = StudyStore(root, journal)
    old = make_study(store, tmp_path, StudyState.DELIVERED, 40, frames=64)
    kept = make_study(store, tmp_path, StudyState.DELIVERED, 1)
    reserve = SpaceReserve(root / RESERVE_NAME)
    assert reserve.restore()
    ballast = fill(small_disk)
    try:
        with capture_logs() as logs:
            purged = Retention(RetentionConfig(enabled=True, max_age_days=30), journal, store).run()
        assert [p.study_uid for p in purged] == [old]
        assert "retention.disk_full" in [e["event"] for e in logs]
        assert journal.study(old) is None and not (store.studies / old).exists()
        assert journal.study(kept) is not None
        assert not reserve.path.exists()  # given back
        ballast.unlink()
        assert DiskFullPause(journal, reserve).ready() and reserve.path.exists()  # the worker's next turn
    finally:
        ballast.unlink(missing_ok=True)
        journal.close()
