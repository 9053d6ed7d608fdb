"""Store: atomic placement, duplicates, refusals, recovery."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from echonode.journal import Journal
from echonode.store import BadObject, StudyStore, is_valid_uid, read_header
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
    from echonode.store import read_header as rh

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
    from echonode.journal import InstanceRecord, SopInOtherStudy

    a = write(us_multiframe(sop_uid="1.2.3.4.77"), tmp_path / "a.dcm")
    b = write(us_multiframe(sop_uid="1.2.3.4.77"), tmp_path / "b.dcm")
    store.accept(incoming(store, a), None)
    hb = read_header(b)
    # The pre-check passed in another thread before a's row existed: the
    # journal itself must refuse.
    with pytest.raises(SopInOtherStudy):
        store.journal.record_instance(InstanceRecord(hb.sop_uid, hb.study_uid, hb.series_uid, hb.sop_class_uid,
                                                     hb.transfer_syntax, "/x.dcm", 1, 0.0))


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
