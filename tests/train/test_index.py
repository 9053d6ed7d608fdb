"""``echonode-train index`` on archive trees as PACS exports and node storage
make them: duplicates, non-Part-10 files, files that change or go between
runs, interrupted runs, and studies whose videos disagree on the patient.

The everyday path (a clean archive, a second run that reuses everything, a
cache with other settings refused) is in ``tests/train/test_pretrain.py``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.filewriter import dcmwrite

import train.index_worker
from echonode.analyse.preprocess import SECTOR_MASK_RULE, PreprocessConfig
from tests.conftest import real_testfile
from tests.factories import us_multiframe, write
from train.cache import ClipCache, split_cache
from train.index import Shard, build_index

CFG = PreprocessConfig(size=16)


def cine(path: Path, sop_uid: str, *, seed: int = 0, frames: int = 12, study_uid: str = "1.2.826.0.9.1",
         patient_id: str = "MRN1") -> Path:
    """A small usable US cine at ``path``."""
    ds = us_multiframe(sop_uid=sop_uid, study_uid=study_uid, frames=frames, rows=32, cols=32, seed=seed,
                       patient_id=patient_id)
    return write(ds, path)


def touch_later(path: Path, seconds: int) -> None:
    """Move a file's modification time, as a re-export or a copy would."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


def manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def unusable_by_path(cache: Path) -> dict[str, str]:
    return {u["source"]["path"]: u["reason"] for u in manifest(cache)["unusable"]}


def test_same_sop_under_two_paths_is_cached_once_and_stays_incremental(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    first = cine(archive / "a" / "IM1", "1.2.826.0.9.1.1")
    second = archive / "b" / "IM1"
    second.parent.mkdir()
    shutil.copy(first, second)  # a second export of the same object, a newer mtime
    touch_later(second, 5)
    # The real pair: one SonoSite loop exported twice, 120 and 30 frames,
    # with one SOP Instance UID.
    shutil.copy(real_testfile("color3d_jpeg_baseline.dcm"), archive / "c_color3d.dcm")
    shutil.copy(real_testfile("examples_ybr_color.dcm"), archive / "d_ybr.dcm")

    report = build_index(archive, tmp_path / "cache", CFG, progress=False)
    assert report.cached == 2 and report.added == 2
    videos = {v["sop_uid"]: v for v in manifest(tmp_path / "cache")["videos"]}
    # The first path in the scan's order is kept, whatever its mtime.
    assert videos["1.2.826.0.9.1.1"]["source"]["path"] == "a/IM1"
    assert videos["1.2.840.114340.3.8251017118051.3.20160503.121539.16117.4"]["frames"] == 100  # the 120-frame loop
    reasons = unusable_by_path(tmp_path / "cache")
    assert set(reasons) == {"b/IM1", "d_ybr.dcm"}
    assert "a/IM1" in reasons["b/IM1"] and "c_color3d.dcm" in reasons["d_ybr.dcm"]

    # Nothing changed: nothing is decoded again (it used to redo both copies
    # on every run, flipping which one the cache held).
    again = build_index(archive, tmp_path / "cache", CFG, progress=False)
    assert again.added == 0 and again.cached == 2 and again.reused == 4

    # The kept copy goes: the other one takes its place.
    first.unlink()
    third = build_index(archive, tmp_path / "cache", CFG, progress=False)
    assert third.cached == 2 and third.missing == 0
    videos = {v["sop_uid"]: v for v in manifest(tmp_path / "cache")["videos"]}
    assert videos["1.2.826.0.9.1.1"]["source"]["path"] == "b/IM1"
    assert "b/IM1" not in unusable_by_path(tmp_path / "cache")


def test_dicom_without_a_part10_header_is_listed_not_ignored(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    cine(archive / "ok" / "IM1", "1.2.826.0.9.2.1")
    # "DICM" and the file meta, but no 128-byte preamble.
    buffer = io.BytesIO()
    dcmwrite(buffer, us_multiframe(sop_uid="1.2.826.0.9.2.2", frames=12, rows=32, cols=32), enforce_file_format=True)
    (archive / "raw").mkdir()
    (archive / "raw" / "IM2").write_bytes(buffer.getvalue()[128:])
    # A bare dataset: no preamble, no file meta (some older exports).
    bare = us_multiframe(sop_uid="1.2.826.0.9.2.3", frames=12, rows=32, cols=32)
    del bare.file_meta
    buffer = io.BytesIO()
    bare.save_as(buffer, implicit_vr=True, little_endian=True, enforce_file_format=False)
    (archive / "raw" / "IM3").write_bytes(buffer.getvalue())
    # What else an export folder holds: none of it is DICOM.
    shutil.copy(real_testfile("DICOMDIR"), archive / "DICOMDIR")
    (archive / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    (archive / "empty").write_bytes(b"")
    (archive / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))

    report = build_index(archive, tmp_path / "cache", CFG, progress=False)
    assert report.cached == 1
    reasons = unusable_by_path(tmp_path / "cache")
    assert set(reasons) == {"raw/IM2", "raw/IM3", "DICOMDIR"}
    for name in ("raw/IM2", "raw/IM3"):
        assert "preamble" in reasons[name], reasons[name]
    assert "DICOMDIR" in reasons["DICOMDIR"]
    assert report.not_dicom == 3
    # Listed objects are remembered: the second run reads none of them.
    assert build_index(archive, tmp_path / "cache", CFG, progress=False).reused == 4


def test_a_file_that_changes_replaces_its_record(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    a = cine(archive / "a.dcm", "1.2.826.0.9.3.1", seed=1)
    b = cine(archive / "b.dcm", "1.2.826.0.9.3.2", seed=2)
    build_index(archive, tmp_path / "cache", CFG, progress=False)
    before = np.array(ClipCache(tmp_path / "cache").frames("1.2.826.0.9.3.1"))

    cine(a, "1.2.826.0.9.3.1", seed=9)  # re-exported with new pixels, same UID
    touch_later(a, 5)
    cine(b, "1.2.826.0.9.3.2", frames=3)  # re-exported, now too short to use
    touch_later(b, 5)
    report = build_index(archive, tmp_path / "cache", CFG, progress=False)
    cache = ClipCache(tmp_path / "cache")
    assert not np.array_equal(before, np.array(cache.frames("1.2.826.0.9.3.1")))
    # The unusable version is not trained on under its old frames.
    assert set(cache.by_sop) == {"1.2.826.0.9.3.1"} and report.cached == 1
    assert not (tmp_path / "cache" / "videos" / "1.2.826.0.9.3.2.npy").exists()
    assert "frames" in unusable_by_path(tmp_path / "cache")["b.dcm"]
    # And the next run is incremental again (b used to be decoded every run).
    assert build_index(archive, tmp_path / "cache", CFG, progress=False).added == 0


def test_a_file_that_becomes_something_else_drops_its_old_video(tmp_path: Path) -> None:
    """Cut short in its header, overwritten by text, or re-exported under a new UID:
    one record per path, and the old frames leave the cache."""
    archive = tmp_path / "archive"
    a = cine(archive / "a.dcm", "1.2.826.0.9.3.1", seed=1)
    b = cine(archive / "b.dcm", "1.2.826.0.9.3.2", seed=2)
    c = cine(archive / "c.dcm", "1.2.826.0.9.3.3", seed=3)
    build_index(archive, tmp_path / "cache", CFG, progress=False)

    a.write_bytes(a.read_bytes()[:143])
    b.write_text("not an image any more\n")
    cine(c, "1.2.826.0.9.3.9", seed=3)
    for path in (a, b, c):
        touch_later(path, 5)
    build_index(archive, tmp_path / "cache", CFG, progress=False)
    cache = ClipCache(tmp_path / "cache")
    assert set(cache.by_sop) == {"1.2.826.0.9.3.9"}
    assert [v["source"]["path"] for v in manifest(tmp_path / "cache")["videos"]] == ["c.dcm"]
    assert set(unusable_by_path(tmp_path / "cache")) == {"a.dcm"}
    for gone in ("1.2.826.0.9.3.1", "1.2.826.0.9.3.2", "1.2.826.0.9.3.3"):
        assert not (tmp_path / "cache" / "videos" / f"{gone}.npy").exists()
    # Nothing is reported missing: every file is still there.
    assert build_index(archive, tmp_path / "cache", CFG, progress=False).missing == 0


def test_a_deleted_file_is_reported_and_pruned_on_request(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    cine(archive / "a.dcm", "1.2.826.0.9.4.1")
    gone = cine(archive / "b.dcm", "1.2.826.0.9.4.2")
    reused_path = cine(archive / "c.dcm", "1.2.826.0.9.4.3")
    write(us_multiframe(sop_uid="1.2.826.0.9.4.4", frames=3, rows=32, cols=32), archive / "short.dcm")
    build_index(archive, tmp_path / "cache", CFG, progress=False)

    gone.unlink()
    (archive / "short.dcm").unlink()
    cine(reused_path, "1.2.826.0.9.4.9")  # the path now holds another object, which replaces the old
    touch_later(reused_path, 5)
    report = build_index(archive, tmp_path / "cache", CFG, progress=False)
    # A file that is gone is kept by default (a purge on the node's storage
    # must not empty a training cache), but counted.
    assert report.missing == 1 and report.cached == 3
    assert unusable_by_path(tmp_path / "cache") == {}

    report = build_index(archive, tmp_path / "cache", CFG, progress=False, prune=True)
    assert report.removed == 1 and report.cached == 2 and report.missing == 0
    assert set(ClipCache(tmp_path / "cache").by_sop) == {"1.2.826.0.9.4.1", "1.2.826.0.9.4.9"}
    assert sorted(p.name for p in (tmp_path / "cache" / "videos").iterdir()) == ["1.2.826.0.9.4.1.npy", "1.2.826.0.9.4.9.npy"]


def test_an_interrupted_run_keeps_its_work_and_the_rerun_completes(tmp_path: Path, monkeypatch) -> None:
    archive = tmp_path / "archive"
    for i in range(6):
        cine(archive / f"{i}.dcm", f"1.2.826.0.9.5.{i}", seed=i)
    write(us_multiframe(sop_uid="1.2.826.0.9.5.9", frames=3, rows=32, cols=32), archive / "9short.dcm")
    real = train.index_worker.preprocess_file
    calls = []

    def interrupted(path, cfg, *args, **kwargs):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C while the fourth file decodes
        return real(path, cfg, *args, **kwargs)

    monkeypatch.setattr(train.index_worker, "preprocess_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_index(archive, tmp_path / "cache", CFG, progress=False)
    # What was done before the interruption is in the manifest, not lost.
    assert {v["sop_uid"] for v in manifest(tmp_path / "cache")["videos"]} == {f"1.2.826.0.9.5.{i}" for i in range(3)}

    monkeypatch.setattr(train.index_worker, "preprocess_file", real)
    report = build_index(archive, tmp_path / "cache", CFG, progress=False)
    assert report.added == 3 and report.reused == 3 and report.cached == 6 and report.unusable == 1
    cache = ClipCache(tmp_path / "cache")
    assert len(cache.videos) == len(cache.by_sop) == 6
    assert sorted(p.name for p in (tmp_path / "cache" / "videos").iterdir()) == sorted(
        f"1.2.826.0.9.5.{i}.npy" for i in range(6)
    )


def test_a_study_whose_videos_disagree_on_the_patient_keeps_both_patients_together(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    # Study S has one video filed under MRN1 and one under MRN2 (a merge or
    # a typo at the modality); each patient also has a study of their own.
    cine(archive / "s1.dcm", "1.2.826.0.9.6.1", study_uid="1.2.826.0.9.60", patient_id="MRN1")
    cine(archive / "s2.dcm", "1.2.826.0.9.6.2", study_uid="1.2.826.0.9.60", patient_id="MRN2")
    cine(archive / "t.dcm", "1.2.826.0.9.6.3", study_uid="1.2.826.0.9.61", patient_id="MRN1")
    cine(archive / "u.dcm", "1.2.826.0.9.6.4", study_uid="1.2.826.0.9.62", patient_id="MRN2")
    for p in range(3, 12):  # other patients, so that every split has some
        cine(archive / f"p{p}.dcm", f"1.2.826.0.9.7.{p}", study_uid=f"1.2.826.0.9.7{p}", patient_id=f"MRN{p}")
    report = build_index(archive, tmp_path / "cache", CFG, progress=False)
    cache = ClipCache(tmp_path / "cache")
    patients = cache.study_patient()
    assert patients["1.2.826.0.9.60"] == patients["1.2.826.0.9.61"] == patients["1.2.826.0.9.62"]
    for seed in range(10):
        splits = split_cache(cache, seed=seed)
        where = {s: name for name, studies in splits.items() for s in studies}
        assert where["1.2.826.0.9.60"] == where["1.2.826.0.9.61"] == where["1.2.826.0.9.62"]
    assert "MRN" not in (tmp_path / "cache" / "manifest.json").read_text()
    assert report.patient_conflicts == 1  # and the run says so


def test_a_killed_runs_temporary_files_are_cleared_and_a_second_run_waits_its_turn(tmp_path: Path) -> None:
    import fcntl

    archive = tmp_path / "archive"
    cine(archive / "a.dcm", "1.2.826.0.9.8.1")
    cache = tmp_path / "cache"
    build_index(archive, cache, CFG, progress=False)
    # What `kill -9` during _atomic_save_npy and _atomic_write_bytes leaves.
    (cache / "videos" / ".1.2.826.0.9.8.2.x1y2z3.npy").write_bytes(b"\x93NUMPY")
    (cache / ".manifest.json.abc123.tmp").write_text("{")
    build_index(archive, cache, CFG, progress=False)
    assert sorted(p.name for p in (cache / "videos").iterdir()) == ["1.2.826.0.9.8.1.npy"]
    assert not list(cache.glob("*.tmp"))

    with open(cache / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run at work
        with pytest.raises(RuntimeError, match="another"):
            build_index(archive, cache, CFG, progress=False)


def test_a_deflate_bomb_is_listed_before_pydicom_inflates_it(tmp_path: Path, monkeypatch) -> None:
    """pydicom inflates a deflated data set whole even for a header: the decoder's guard comes first."""
    from tests.corpus import _deflate_bomb

    monkeypatch.setattr(train.index_worker, "_MAX_INFLATED_BYTES", 16 * 2**20)
    archive = tmp_path / "archive"
    cine(archive / "ok.dcm", "1.2.826.0.9.6.1")
    bomb = us_multiframe(sop_uid="1.2.826.0.9.6.2", frames=4, rows=32, cols=32)
    (archive / "bomb.dcm").write_bytes(_deflate_bomb(64 * 2**20)(bomb))
    report = build_index(archive, tmp_path / "cache", CFG, progress=False)
    assert report.cached == 1
    assert "inflates to more than 16 MiB" in unusable_by_path(tmp_path / "cache")["bomb.dcm"]


def _messy_archive(archive: Path) -> None:
    """Studies of several patients, a duplicate, a real JPEG loop pair sharing one UID,
    a too-short video, a non-Part-10 file and a non-DICOM file."""
    for s in range(6):
        for v in range(2):
            cine(archive / f"s{s}" / f"IM{v}", f"1.2.826.0.9.10.{s}.{v}", seed=10 * s + v,
                 study_uid=f"1.2.826.0.9.10.{s}", patient_id=f"MRN{s // 2}")
    shutil.copy(archive / "s0" / "IM0", archive / "s0" / "IM0copy")
    touch_later(archive / "s0" / "IM0copy", 5)
    shutil.copy(real_testfile("color3d_jpeg_baseline.dcm"), archive / "c_color3d.dcm")
    shutil.copy(real_testfile("examples_ybr_color.dcm"), archive / "d_ybr.dcm")
    write(us_multiframe(sop_uid="1.2.826.0.9.10.9", frames=3, rows=32, cols=32), archive / "short.dcm")
    buffer = io.BytesIO()
    dcmwrite(buffer, us_multiframe(sop_uid="1.2.826.0.9.10.8", frames=12, rows=32, cols=32), enforce_file_format=True)
    (archive / "raw").write_bytes(buffer.getvalue()[128:])
    (archive / "notes.bin").write_bytes(b"not DICOM" * 20)


def _cache_content(cache: ClipCache) -> tuple[list[dict], dict[str, bytes]]:
    return cache.videos, {sop: np.asarray(cache.frames(sop)).tobytes() for sop in cache.by_sop}


def test_two_worker_processes_make_the_same_cache_as_one(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    _messy_archive(archive)
    one = build_index(archive, tmp_path / "one", CFG, progress=False, workers=1)
    two = build_index(archive, tmp_path / "two", CFG, progress=False, workers=2)
    assert two.workers == 2 and (one.cached, one.unusable, one.duplicates, one.not_dicom) == (
        two.cached, two.unusable, two.duplicates, two.not_dicom)
    assert manifest(tmp_path / "one") == manifest(tmp_path / "two")
    assert _cache_content(ClipCache(tmp_path / "one")) == _cache_content(ClipCache(tmp_path / "two"))
    assert not list((tmp_path / "two" / "videos").glob(".*"))  # no temporary frames left behind

    # The archive moves: its videos are found under their new paths, none decoded again.
    shutil.move(archive, tmp_path / "moved")
    again = build_index(tmp_path / "moved", tmp_path / "two", CFG, progress=False, workers=2)
    assert again.added == 0 and again.cached == one.cached and again.missing == 0


def test_shards_of_an_archive_read_together_equal_the_whole(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    _messy_archive(archive)
    whole = build_index(archive, tmp_path / "whole", CFG, progress=False)
    parts = [build_index(archive, tmp_path / f"part{i}", CFG, progress=False, workers=2, shard=Shard(i, 2))
             for i in range(2)]
    caches = [ClipCache(tmp_path / f"part{i}") for i in range(2)]
    studies = [{v["study_uid"] for v in c.videos} for c in caches]
    assert studies[0] and studies[1] and not studies[0] & studies[1]  # disjoint, by study
    assert sum(p.cached for p in parts) == whole.cached
    assert all(p.elsewhere > 0 for p in parts)
    # Every listed file is listed by exactly one shard.
    listed = [set(unusable_by_path(tmp_path / f"part{i}")) for i in range(2)]
    assert not listed[0] & listed[1] and listed[0] | listed[1] == set(unusable_by_path(tmp_path / "whole"))

    merged = ClipCache([tmp_path / "part1", tmp_path / "part0"])
    assert _cache_content(merged) == _cache_content(ClipCache(tmp_path / "whole"))
    assert merged.duplicates == 0
    for seed in range(3):  # the patient split does not depend on how the archive was cut
        assert split_cache(merged, seed=seed) == split_cache(ClipCache(tmp_path / "whole"), seed=seed)

    # A shard's cache refuses to become another shard, or the whole archive.
    with pytest.raises(ValueError, match="shard 0/2"):
        build_index(archive, tmp_path / "part0", CFG, progress=False, shard=Shard(1, 2))
    with pytest.raises(ValueError, match="whole archive"):
        build_index(archive, tmp_path / "part0", CFG, progress=False)
    # Run again: nothing is decoded.
    assert build_index(archive, tmp_path / "part0", CFG, progress=False, shard=Shard(0, 2)).added == 0


def test_the_shard_argument_is_checked(tmp_path: Path, capsys) -> None:
    from train.cli import main

    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="I/N|0 <= I < N"):
            Shard.parse(bad)
    archive = tmp_path / "archive"
    cine(archive / "a.dcm", "1.2.826.0.9.11.1")
    assert main(["index", str(archive), "--out", str(tmp_path / "c"), "--shard", "3/2", "--no-progress"]) == 2
    assert "shard 3/2: want I/N with 0 <= I < N" in capsys.readouterr().out
    assert main(["index", str(archive), "--out", str(tmp_path / "c"), "--workers", "0", "--no-progress"]) == 2
    assert "--workers 0: want at least 1" in capsys.readouterr().out
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_caches_with_other_settings_are_not_read_together(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    cine(archive / "a.dcm", "1.2.826.0.9.12.1")
    build_index(archive, tmp_path / "c16", CFG, progress=False)
    build_index(archive, tmp_path / "c24", PreprocessConfig(size=24), progress=False)
    with pytest.raises(ValueError, match="share their settings"):
        ClipCache([tmp_path / "c16", tmp_path / "c24"])
    both = ClipCache([tmp_path / "c16", tmp_path / "c16"])  # the same video twice: read once
    assert len(both.videos) == 1 and both.duplicates == 1


def test_workers_started_by_spawn_make_the_same_cache(tmp_path: Path, monkeypatch) -> None:
    """Nothing a worker needs comes from a forked parent: spawn (the start method
    where forkserver is missing) gives the same cache."""
    archive = tmp_path / "archive"
    for i in range(4):
        cine(archive / f"{i}.dcm", f"1.2.826.0.9.13.{i}", seed=i, study_uid=f"1.2.826.0.9.13{i % 2}")
    build_index(archive, tmp_path / "one", CFG, progress=False, workers=1)
    monkeypatch.setattr(train.index_worker, "_START_METHOD", "spawn")
    report = build_index(archive, tmp_path / "spawned", CFG, progress=False, workers=2)
    assert report.workers == 2 and report.cached == 4
    assert manifest(tmp_path / "one") == manifest(tmp_path / "spawned")
    assert _cache_content(ClipCache(tmp_path / "one")) == _cache_content(ClipCache(tmp_path / "spawned"))


def test_a_cache_masked_by_an_older_sector_rule_is_not_added_to_or_read_with_a_new_one(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    cine(archive / "a.dcm", "1.2.826.0.9.14.1")
    build_index(archive, tmp_path / "new", CFG, progress=False)
    assert manifest(tmp_path / "new")["preprocess"]["sector_mask"] == SECTOR_MASK_RULE == 3
    # A cache written before the rule was recorded (rule 1: the largest moving region only).
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    old = manifest(tmp_path / "old")
    del old["preprocess"]["sector_mask"]
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(old))
    cine(archive / "b.dcm", "1.2.826.0.9.14.2")
    with pytest.raises(ValueError, match="use another --out"):
        build_index(archive, tmp_path / "old", CFG, progress=False)
    with pytest.raises(ValueError, match="share their settings"):
        ClipCache([tmp_path / "new", tmp_path / "old"])
    assert len(ClipCache(tmp_path / "old").videos) == 1  # still readable on its own
    assert (ClipCache(tmp_path / "old").sector_mask_rule, ClipCache(tmp_path / "new").sector_mask_rule) == (1, 3)


def test_target_fps_resamples_every_video_and_is_a_setting_of_the_cache(tmp_path: Path, capsys) -> None:
    from train.cli import main

    archive = tmp_path / "archive"
    cine(archive / "a.dcm", "1.2.826.0.9.13.1", frames=24)  # 30 fps (FrameTime 33.3 ms)
    assert main(["index", str(archive), "--out", str(tmp_path / "native"), "--size", "16", "--workers", "1",
                 "--no-progress"]) == 0
    assert main(["index", str(archive), "--out", str(tmp_path / "at15"), "--size", "16", "--workers", "1",
                 "--target-fps", "15", "--no-progress"]) == 0
    native, at15 = manifest(tmp_path / "native"), manifest(tmp_path / "at15")
    assert native["preprocess"]["target_fps"] is None and at15["preprocess"]["target_fps"] == 15.0
    assert native["videos"][0]["frames"] == 24 and at15["videos"][0]["frames"] == 12
    # Every other native frame, as the node's own preprocessing resamples.
    full = ClipCache(tmp_path / "native").frames("1.2.826.0.9.13.1")
    half = ClipCache(tmp_path / "at15").frames("1.2.826.0.9.13.1")
    np.testing.assert_array_equal(half, full[::2])
    with pytest.raises(ValueError, match="share their settings"):
        ClipCache([tmp_path / "native", tmp_path / "at15"])
    capsys.readouterr()
    assert main(["index", str(archive), "--out", str(tmp_path / "at0"), "--size", "16", "--workers", "1",
                 "--target-fps", "0", "--no-progress"]) == 2
    assert 'echonode-train index: Argument "target_fps" must be positive' in capsys.readouterr().out
    assert not (tmp_path / "at0" / "manifest.json").exists()


def test_physical_framing_is_a_setting_of_the_cache_and_leaves_out_uncalibrated_videos(tmp_path: Path) -> None:
    from train.cli import main
    from train.evaluate import _check_cache_matches_bundle

    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copy(real_testfile("color3d_jpeg_baseline.dcm"), archive / "real.dcm")
    cine(archive / "plain.dcm", "1.2.826.0.9.14.1")  # states no pixel size
    assert main(["index", str(archive), "--out", str(tmp_path / "cm"), "--size", "16", "--workers", "1",
                 "--framing", "physical", "--field-cm", "14", "--no-progress"]) == 0
    got = manifest(tmp_path / "cm")
    assert got["preprocess"]["framing"] == "physical" and got["preprocess"]["field_cm"] == 14.0
    assert [v["source"]["path"] for v in got["videos"]] == ["real.dcm"]
    assert "no calibrated 2D tissue region" in unusable_by_path(tmp_path / "cm")["plain.dcm"]
    # Another window is other pixels: a bundle trained on one is not scored on the other.
    cache = ClipCache(tmp_path / "cm")
    bundle_pre = {**PreprocessConfig(size=16, framing="physical", field_cm=16.0).to_meta(), "normalisation": "minmax"}
    with pytest.raises(ValueError, match="14 cm window, the bundle expects 16 cm.*--field-cm 16"):
        _check_cache_matches_bundle(cache, bundle_pre, "cache")
    _check_cache_matches_bundle(cache, {**bundle_pre, "field_cm": 14.0}, "cache")
