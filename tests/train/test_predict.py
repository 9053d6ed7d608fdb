"""``echonode-train predict``: the node's video and study probabilities over a
clip cache, the same on one process and under torchrun, resumable by part."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from echonode.analyse.preprocess import PreprocessConfig
from echonode.analyse.preprocess_config import SECTOR_MASK_RULE
from tests.conftest import REPO, run_cli
from tests.factories import tiny_bundle, us_multiframe, write
from train.cli import main
from train.index import build_index

SIZE = 32


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An archive of 4 studies (1-3 videos each, one too short to use), its cache at the bundle's size, a bundle."""
    root = tmp_path_factory.mktemp("predict")
    for s in range(4):
        for v in range(1 + s % 3):
            ds = us_multiframe(sop_uid=f"1.2.826.0.9.20.{s}.{v}", study_uid=f"1.2.826.0.9.20.{s}",
                               frames=14 + 3 * v, rows=48, cols=40, seed=10 * s + v, patient_id=f"MRN{s}")
            write(ds, root / "archive" / f"s{s}" / f"IM{v}.dcm")
    write(us_multiframe(sop_uid="1.2.826.0.9.20.9.0", study_uid="1.2.826.0.9.20.0", frames=3, rows=48, cols=40,
                        patient_id="MRN0"),
          root / "archive" / "s0" / "short.dcm")
    build_index(root / "archive", root / "cache", PreprocessConfig(size=SIZE), progress=False)
    tiny_bundle(root / "models", "lvh", size=SIZE, clip_frames=8, threshold=0.5)
    return root


def _predict(workdir: Path, out: Path, *extra: str, bundle: Path | None = None) -> int:
    return main(["predict", "--data", str(workdir / "cache"), "--bundle", str(bundle or workdir / "models" / "test-lvh"),
                 "--out", str(out), "--device", "cpu", "--runtime", "eager", *extra])


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_gives_the_probabilities_echonode_infer_gives(workdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "predictions.csv"
    assert _predict(workdir, out) == 0
    rows = _rows(out)
    videos = {r["sop_uid"]: r for r in rows if r["level"] == "video"}
    studies = {r["study_uid"]: r for r in rows if r["level"] == "study"}
    assert len(videos) == 7 and len(studies) == 4  # the 3-frame video is not usable
    assert all(r["task"] == "lvh" and r["n_clips"] == "4" for r in videos.values())
    assert studies["1.2.826.0.9.20.2"]["n_videos"] == "3" and studies["1.2.826.0.9.20.2"]["n_clips"] == "12"

    config = tmp_path / "echonode.toml"
    config.write_text('[models]\nruntime = "eager"\ndevice = "cpu"\n')
    proc = run_cli("--config", str(config), "infer", str(workdir / "archive"), "--models", str(workdir / "models"),
                   "--json", timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    node = json.loads(proc.stdout)["studies"]
    assert {s["study_uid"] for s in node} == set(studies)
    for study in node:
        assert float(studies[study["study_uid"]]["probability"]) == pytest.approx(
            study["tasks"]["lvh"]["probability"], abs=1e-5)
        assert studies[study["study_uid"]]["positive"] == str(int(study["tasks"]["lvh"]["positive"]))
        used = {v["sop_uid"]: v["probabilities"]["lvh"] for v in study["videos"] if v["used"]}
        assert used and set(used) == {s for s, r in videos.items() if r["study_uid"] == study["study_uid"]}
        for sop, p in used.items():
            assert float(videos[sop]["probability"]) == pytest.approx(p, abs=1e-5)
    # Not all alike: a test that a constant would pass proves nothing.
    assert len({r["probability"] for r in videos.values()}) > 1


def test_torchrun_two_ranks_give_what_one_process_gives(workdir: Path, tmp_path: Path) -> None:
    assert _predict(workdir, tmp_path / "one.csv", "--part-videos", "3") == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "train", "predict", "--data", str(workdir / "cache"), "--bundle", str(workdir / "models" / "test-lvh"),
           "--out", str(tmp_path / "two.csv"), "--device", "cpu", "--runtime", "eager", "--part-videos", "3"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    one, two = _rows(tmp_path / "one.csv"), _rows(tmp_path / "two.csv")
    assert [(r["level"], r["study_uid"], r["sop_uid"]) for r in one] == [(r["level"], r["study_uid"], r["sop_uid"]) for r in two]
    for a, b in zip(one, two, strict=True):
        assert float(a["probability"]) == pytest.approx(float(b["probability"]), abs=1e-6)
    # Both ranks wrote parts: 7 videos in parts of 3, dealt round robin.
    assert sorted(p.name for p in (tmp_path / "two.csv.parts").glob("part-*.csv")) == [
        "part-000000.csv", "part-000001.csv", "part-000002.csv"]


def test_a_stopped_run_resumes_and_parts_of_another_run_are_refused(workdir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.csv"
    assert _predict(workdir, out, "--part-videos", "2") == 0
    first = out.read_text()
    parts = sorted((tmp_path / "p.csv.parts").glob("part-*.csv"))
    assert len(parts) == 4
    # Stopped after three parts, before the merge.
    out.unlink()
    parts[1].unlink()
    kept = {p: p.stat().st_mtime_ns for p in parts if p.exists()}
    assert _predict(workdir, out, "--part-videos", "2") == 0
    assert out.read_text() == first
    assert parts[1].exists() and all(p.stat().st_mtime_ns == t for p, t in kept.items())  # not redone

    other = tiny_bundle(tmp_path / "models", "lvh", seed=3, size=SIZE, clip_frames=8)
    capsys.readouterr()
    assert _predict(workdir, out, "--part-videos", "2", bundle=other) == 2
    assert "parts of another run" in capsys.readouterr().err


def test_a_cache_indexed_for_other_pixels_is_refused(workdir: Path, tmp_path: Path, capsys) -> None:
    build_index(workdir / "archive", tmp_path / "cache16", PreprocessConfig(size=16), progress=False)
    assert main(["predict", "--data", str(tmp_path / "cache16"), "--bundle", str(workdir / "models" / "test-lvh"),
                 "--out", str(tmp_path / "p.csv"), "--device", "cpu", "--runtime", "eager"]) == 2
    err = capsys.readouterr().err
    assert "size 16 (bundle: 32)" in err and "--size 32" in err
    assert not (tmp_path / "p.csv").exists()


def test_a_cache_masked_by_an_older_sector_rule_is_refused(workdir: Path, tmp_path: Path, capsys) -> None:
    """Its frames are not what ``echonode infer`` would make of the same files."""
    shutil.copytree(workdir / "cache", tmp_path / "old")
    old = json.loads((tmp_path / "old" / "manifest.json").read_text())
    del old["preprocess"]["sector_mask"]
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(old))
    assert main(["predict", "--data", str(tmp_path / "old"), "--bundle", str(workdir / "models" / "test-lvh"),
                 "--out", str(tmp_path / "p.csv"), "--device", "cpu", "--runtime", "eager"]) == 2
    assert f"sector_mask 1 (bundle: {SECTOR_MASK_RULE})" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_a_view_bundle_gives_each_video_its_most_probable_view(workdir: Path, tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path / "models", "view", size=SIZE, clip_frames=8, labels=["plax", "a4c", "psax"])
    assert _predict(workdir, tmp_path / "views.csv", bundle=bundle) == 0
    rows = _rows(tmp_path / "views.csv")
    assert len(rows) == 7 and {r["level"] for r in rows} == {"video"}  # no study probability for a view
    assert all(r["label"] in ("plax", "a4c", "psax") and 1 / 3 <= float(r["probability"]) <= 1 for r in rows)
    assert all(r["positive"] == "" for r in rows)
