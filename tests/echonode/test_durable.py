"""The one durable-write rule (echonode/durable.py): atomic, leaves no debris, keeps the old file on failure."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from echonode.durable import (
    FILE_MODE,
    PART_SUFFIX,
    move_into_place,
    publish_folder,
    replace_symlink,
    replacing,
    write_bytes,
    write_json,
    write_text,
)


def test_write_replaces_whole_file_with_owner_only_mode(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    write_json(target, {"b": 1, "a": [1, 2]})
    assert target.read_text() == '{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}\n'
    assert stat.S_IMODE(target.stat().st_mode) == FILE_MODE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_failed_writer_keeps_old_content_and_removes_its_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "report.dcm"
    write_bytes(target, b"first")
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full half-way")
    assert target.read_bytes() == b"first"
    assert not list(tmp_path.glob(f"*{PART_SUFFIX}"))


def test_not_durable_still_atomic_and_mode_is_honoured(tmp_path: Path) -> None:
    target = tmp_path / "cache.txt"
    write_text(target, "x", durable=False, mode=0o644)
    assert target.read_text() == "x"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_temporary_names_differ_per_writer(tmp_path: Path) -> None:
    target = tmp_path / "f"
    with replacing(target) as a, replacing(target) as b:
        a.write_text("a")
        b.write_text("b")
        assert a != b and a.name.endswith(PART_SUFFIX) and a.parent == tmp_path
    assert target.read_text() == "a"  # the outer block finished last


def test_move_into_place_across_file_systems_copies_beside_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dest = tmp_path / "incoming", tmp_path / "dest"
    src.write_bytes(b"object")
    real_replace = os.replace

    def cross_device_once(a: object, b: object) -> None:
        if Path(str(a)) == src:
            raise OSError(18, "Invalid cross-device link")  # EXDEV
        real_replace(a, b)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", cross_device_once)
    move_into_place(src, dest)
    assert dest.read_bytes() == b"object"
    assert not list(tmp_path.glob(f"*{PART_SUFFIX}"))


def test_publish_folder_swaps_whole_folders(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staging = tmp_path / ".bundle.staging"
    (staging / "sub").mkdir(parents=True)
    (staging / "sub" / "weights.pt").write_bytes(b"w")
    publish_folder(staging, target)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["sub", "sub/weights.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_replace_symlink_points_at_new_target(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    link = tmp_path / "current"
    replace_symlink(link, "a")
    replace_symlink(link, "b")
    assert os.readlink(link) == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "current"]
