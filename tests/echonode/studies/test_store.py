"""Store: atomic placement, duplicates, refusals, recovery."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from echonode.studies.journal import Journal
from echonode.studies.store import BadObject, StudyStore, is_valid_uid, read_header
from tests.factories import us_multiframe, write


@pytest.fixture
def store(tmp_path: Path) -> StudyStore:
    return StudyStore(tmp_path / "s", Journal(tmp_path / "s.sqlite"))


def incoming(store: StudyStore, src: Path) -> Path:
    """Copy ``src`` where pynetdicom would have streamed it."""
    dst = store.incoming / f"tmp{src.stat().st_ino}-{src.name}"
    shutil.copy(src, dst)
    return dst


def test_uid_check() -> None:
    assert is_valid_uid("1.2.840.10008.1.2")
    for bad in ("", "1..2", "../../etc", "1.2.a", "1" * 65, None, "1.2/3"):
        assert not is_valid_uid(bad)


def test_accept_places_and_records(store: StudyStore, ybr_loop: Path) -> None:
    header, outcome = store.accept(incoming(store, ybr_loop), "CART")
    assert outcome == "stored"
    dest = store.instance_path(header)
    assert dest.read_bytes() == ybr_loop.read_bytes()
    assert (dest.stat().st_mode & 0o777) == 0o600
    assert (dest.parent.stat().st_mode & 0o777) == 0o700
    assert list(store.incoming.iterdir()) == []
    rec = store.journal.get_instance(header.sop_uid)
    assert rec.path == str(dest) and rec.calling_ae == "CART"


def test_duplicates(store: StudyStore, ybr_loop: Path, sonosite_loop: Path) -> None:
    h1, _ = store.accept(incoming(store, ybr_loop), "CART")
    _, outcome = store.accept(incoming(store, ybr_loop), "CART")
    assert outcome == "duplicate"
    # The two real loops share SOP and Study UIDs but differ: newest wins.
    h2, outcome = store.accept(incoming(store, sonosite_loop), "CART")
    assert outcome == "replaced" and h2.sop_uid == h1.sop_uid
    assert store.instance_path(h2).read_bytes() == sonosite_loop.read_bytes()
    assert len(store.journal.instances()) == 1


def test_same_sop_uid_in_another_study_is_refused(store: StudyStore, tmp_path: Path) -> None:
    a = write(us_multiframe(sop_uid="1.2.3.4.5"), tmp_path / "a.dcm")
    b = write(us_multiframe(sop_uid="1.2.3.4.5"), tmp_path / "b.dcm")
    store.accept(incoming(store, a), None)
    with pytest.raises(BadObject) as err:
        store.accept(incoming(store, b), None)
    assert err.value.status == 0xC230


@pytest.mark.parametrize(
    "mutate, status",
    [
        (lambda ds: delattr(ds, "StudyInstanceUID"), 0xC220),
        (lambda ds: delattr(ds, "SOPInstanceUID"), 0xC220),
        (lambda ds: setattr(ds, "SeriesInstanceUID", "1.2.x.4"), 0xC221),
        (lambda ds: setattr(ds, "StudyInstanceUID", "../../../../etc"), 0xC221),
    ],
)
def test_bad_headers(store: StudyStore, tmp_path: Path, mutate, status: int) -> None:
    ds = us_multiframe()
    mutate(ds)
    path = tmp_path / "bad.dcm"
    ds.preamble = b"\x00" * 128
    ds.save_as(path, enforce_file_format=False)
    with pytest.raises(BadObject) as err:
        read_header(path)
    assert err.value.status == status


def test_truncated_and_garbage(tmp_path: Path, ybr_loop: Path) -> None:
    data = ybr_loop.read_bytes()
    for cut in (len(data) - 1000, len(data) // 2, 300):
        p = tmp_path / f"t{cut}.dcm"
        p.write_bytes(data[:cut])
        with pytest.raises(BadObject) as err:
            read_header(p)
        assert err.value.status in (0xC210, 0xC220)
    p = tmp_path / "garbage.dcm"
    p.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 500)
    with pytest.raises(BadObject):
        read_header(p)
    # Native pixel data shorter than declared.
    ds = us_multiframe(frames=4)
    good = write(ds, tmp_path / "g.dcm").read_bytes()
    (tmp_path / "short.dcm").write_bytes(good[:-100])
    with pytest.raises(BadObject, match="file ends first"):
        read_header(tmp_path / "short.dcm")


def test_recover(store: StudyStore, tmp_path: Path) -> None:
    # An acknowledged instance, recorded.
    a = write(us_multiframe(), tmp_path / "a.dcm")
    ha, _ = store.accept(incoming(store, a), None)
    # A transfer in flight at the crash.
    (store.incoming / "tmp123.dcm").write_bytes(b"partial")
    # Renamed into place, not recorded (crash between rename and commit).
    b = write(us_multiframe(), tmp_path / "b.dcm")
    from echonode.studies.store import read_header as rh

    hb = rh(b)
    dest = store.instance_path(hb)
    dest.parent.mkdir(parents=True)
    shutil.copy(b, dest)
    # A recorded instance whose file vanished (disk trouble).
    c = write(us_multiframe(), tmp_path / "c.dcm")
    hc, _ = store.accept(incoming(store, c), None)
    store.instance_path(hc).unlink()
    counts = store.recover()
    assert counts == {"temp_removed": 1, "recorded": 1, "forgotten": 1}
    assert {r.sop_uid for r in store.journal.instances()} == {ha.sop_uid, hb.sop_uid}
    assert store.recover() == {"temp_removed": 0, "recorded": 0, "forgotten": 0}


def test_concurrent_same_sop_in_two_studies_is_refused_in_the_transaction(store: StudyStore, tmp_path: Path) -> None:
    """Two associations store one SOP Instance UID under two studies at once.

    Both pass the pre-check (neither row exists yet) and move their file into
    place; the journal's transaction lets one record it and the store answers
    the other 0xC230 and removes its copy.
    """
    import sqlite3
    import threading

    a = write(us_multiframe(sop_uid="1.2.3.4.77", study_uid="1.2.3.10"), tmp_path / "a.dcm")
    b = write(us_multiframe(sop_uid="1.2.3.4.77", study_uid="1.2.3.11"), tmp_path / "b.dcm")
    ha, hb = read_header(a), read_header(b)
    # Different studies, different locks: the two accepts run side by side.
    assert store.locks.stripe(ha.study_uid) != store.locks.stripe(hb.study_uid)
    # A writer of our own holds the journal (as a long commit of a third
    # association would): reads, and so both pre-checks, go on; both records wait.
    holder = sqlite3.connect(store.journal.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    outcomes: dict[str, object] = {}

    def accept(name: str, src: Path) -> None:
        try:
            outcomes[name] = store.accept(incoming(store, src), None)[1]
        except BadObject as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=accept, args=(n, p)) for n, p in (("a", a), ("b", b))]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        # A file in place means its accept passed the pre-check and waits to record it.
        while not (store.instance_path(ha).exists() and store.instance_path(hb).exists()):
            assert time.monotonic() < deadline, "both accepts should get past the pre-check"
            time.sleep(0.01)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    for t in threads:
        t.join(30)
    refused = [n for n, o in outcomes.items() if isinstance(o, BadObject)]
    assert len(refused) == 1, outcomes
    (loser,) = refused
    (winner,) = {"a", "b"} - {loser}
    assert outcomes[winner] == "stored"
    assert outcomes[loser].status == 0xC230
    assert "another study" in str(outcomes[loser])
    headers = {"a": ha, "b": hb}
    (rec,) = store.journal.instances()
    assert rec.study_uid == headers[winner].study_uid
    assert rec.path == str(store.instance_path(headers[winner]))
    assert store.instance_path(headers[winner]).exists()
    assert not store.instance_path(headers[loser]).exists()  # the refused copy is gone
    assert store.journal.study_state(headers[loser].study_uid) is None


def test_recover_after_crash_during_a_replacement(store: StudyStore, tmp_path: Path) -> None:
    # Same SOP, new series: the new copy recorded, the old one not yet unlinked.
    ds = us_multiframe(sop_uid="1.2.3.4.88")
    h1, _ = store.accept(incoming(store, write(ds, tmp_path / "1.dcm")), None)
    old_path = store.instance_path(h1)
    kept = old_path.read_bytes()
    ds.SeriesInstanceUID = "1.2.3.4.89"
    ds.PixelData = bytes(len(ds.PixelData))
    h2, outcome = store.accept(incoming(store, write(ds, tmp_path / "2.dcm")), None)
    assert outcome == "replaced" and not old_path.exists()
    old_path.parent.mkdir(parents=True, exist_ok=True)
    old_path.write_bytes(kept)  # as if the crash came before the unlink
    (store.instance_path(h2).parent / "x.dcm.part").write_bytes(b"half")
    counts = store.recover()
    assert not old_path.exists()
    assert counts["forgotten"] == 0
    rec = store.journal.get_instance("1.2.3.4.88")
    assert rec.path == str(store.instance_path(h2)) and rec.series_uid == "1.2.3.4.89"
    assert not list(store.studies.glob("*/*/*.part"))
