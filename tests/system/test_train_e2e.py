"""The training workflow end to end, as a data team runs it, into the node.

``python -m train synth -> index -> pretrain (EchoCLR) -> finetune lvh --init RUN
-> evaluate -> promote``, then ``python -m echonode infer`` on one study with
the promoted models folder: every step is a subprocess of the real command
line. A small archive (16 patients, 120x160, 24 frames) and ``--preset tiny``
with one epoch keep it in CI's budget; the figures it produces are not
meaningful, the plumbing is what is tested.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from echonode.analyse.pipeline import preprocess_config
from echonode.analyse.preprocess import make_eval_clips, preprocess_file
from echonode.bundles.manifest import BundleError
from echonode.bundles.registry import ModelRegistry
from echonode.bundles.weights import load_bundle
from echonode.report.read import summarise_report
from tests.conftest import REPO
from train.promote import rollback

PNG = b"\x89PNG\r\n\x1a\n"
SLOT = "e2e-lvh"


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m ARGS`` from the repository root, one thread, checked."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("ECHONODE_CONFIG", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"`python -m {' '.join(args)}` exited {proc.returncode} after {time.monotonic() - started:.1f} s\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train_e2e")
    archive, cache, runs = root / "archive", root / "cache", root / "run"
    labels = archive / "labels.csv"
    run("train", "synth", "--out", str(archive), "--patients", "16", "--seed", "3", "--frames", "24",
        "--rows", "120", "--cols", "160")  # fmt: skip
    run("train", "index", str(archive), "--out", str(cache), "--preset", "tiny", "--no-progress")
    # 16 patients: split seed 4 is one whose validation and test splits both hold an LVH study
    # (fine-tuning refuses a split it cannot score); pretraining uses the same split.
    split = ("--split-seed", "4")
    run("train", "pretrain", "--data", str(cache), "--out", str(runs), "--method", "echoclr", *split,
        "--preset", "tiny", "--epochs", "1", "--max-steps", "2", "--device", "cpu", "--no-progress")  # fmt: skip
    bundle = root / "lvh-v1"
    run("train", "finetune", "--data", str(cache), "--labels", str(labels), "--task", "lvh", "--init", str(runs),
        "--out", str(bundle), "--preset", "tiny", "--epochs", "1", "--name", SLOT, "--version", "1", *split,
        "--bootstrap", "200", "--device", "cpu", "--no-progress")  # fmt: skip
    report = root / "eval"
    run("train", "evaluate", "--bundle", str(bundle), "--data", str(cache), "--labels", str(labels),
        "--out", str(report), "--bootstrap", "500")  # fmt: skip
    models = root / "models"
    run("train", "promote", str(bundle), "--models-dir", str(models))
    # One study of the archive, as a folder of DICOM files.
    with open(labels, newline="") as fh:
        first = next(csv.DictReader(fh))
    study_dir = archive / "dicom" / first["patient_id"] / first["accession_number"]
    sr_out = root / "sr"
    infer = run("echonode", "infer", str(study_dir), "--models", str(models), "--json", "--sr-out", str(sr_out))
    return {
        "root": root, "archive": archive, "labels": labels, "cache": cache, "run": runs, "bundle": bundle,
        "report": report, "models": models, "study_dir": study_dir, "study_uid": first["study_uid"],
        "infer_json": infer.stdout,
    }  # fmt: skip


def test_pretraining_run_and_provenance(workflow) -> None:
    run_dir = workflow["run"]
    for name in ("checkpoint.pt", "encoder.pt", "config.json", "split.json", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["config"]["method"] == "echoclr"
    split = json.loads((run_dir / "split.json").read_text())
    # Pretraining saw training studies only, and the bundle says so.
    meta = json.loads((workflow["bundle"] / "bundle.json").read_text())
    prov = meta["provenance"]
    assert prov["init"]["pretrain_run"] == str(run_dir)
    assert prov["init"]["pretrain_split"].startswith("checked")
    assert not set(split["train"]) & (set(split["val"]) | set(split["test"]))
    assert set(split["used"]["pretrained"]) <= set(split["train"])
    bundle_split = json.loads((workflow["bundle"] / "split.json").read_text())
    assert bundle_split["used"]["pretrained"] == split["used"]["pretrained"]
    assert prov["task_column"] == "lvh" and prov["config"]["preset"] == "tiny"


def test_evaluate_report(workflow) -> None:
    report = json.loads((workflow["report"] / "metrics.json").read_text())
    assert report["bootstrap"]["level"] == 0.95 and report["bootstrap"]["n_resamples"] == 500
    for level in ("video", "study"):
        a = report[level]["auroc"]
        assert 0.0 <= a["low"] <= a["estimate"] <= a["high"] <= 1.0
        assert a["level"] == 0.95
        assert report[level]["auprc"]["low"] <= report[level]["auprc"]["high"]
    assert report["study"]["n"] <= report["n_videos"]
    for name in ("roc_video.png", "roc_study.png", "pr_video.png", "pr_study.png"):
        assert (workflow["report"] / name).read_bytes()[:8] == PNG, name
    assert sorted(report["plots"]) == ["pr_study.png", "pr_video.png", "roc_study.png", "roc_video.png"]


def test_infer_names_promoted_model_and_sr(workflow) -> None:
    meta = json.loads((workflow["bundle"] / "bundle.json").read_text())
    link = workflow["models"] / SLOT
    assert link.is_symlink() and (link / "bundle.json").is_file()
    doc = json.loads(workflow["infer_json"])
    (study,) = doc["studies"]
    assert study["study_uid"] == workflow["study_uid"] and study["skipped_reason"] is None
    lvh = study["tasks"]["lvh"]
    assert (lvh["model"], lvh["version"], lvh["device_uid"]) == (SLOT, "1", meta["device_uid"])
    assert not lvh["random_weights"] and 0.0 <= lvh["probability"] <= 1.0
    assert [m["name"] for m in doc["models"]] == [SLOT]
    sr = summarise_report(study["sr"])
    assert sr["study_uid"] == study["study_uid"] and sr["modality"] == "SR"
    (finding,) = sr["findings"]
    assert (finding["model_name"], finding["model_version"], finding["device_uid"]) == (SLOT, "1", meta["device_uid"])
    assert finding["probability"] == pytest.approx(lvh["probability"], abs=1e-3)


def test_bundle_loads_in_node_and_matches_infer(workflow) -> None:
    bundle = load_bundle(workflow["bundle"], "cpu")
    assert bundle.task == "lvh" and bundle.version == "1" and bundle.name == SLOT
    cfg = preprocess_config(bundle)
    study = json.loads(workflow["infer_json"])["studies"][0]
    by_sop = {v["sop_uid"]: v for v in study["videos"] if v["used"]}
    checked = 0
    # The study's videos: its folder also holds the sonographer's measurement SR.
    with open(workflow["archive"] / "videos.csv", newline="") as fh:
        videos = [workflow["archive"] / v["path"] for v in csv.DictReader(fh) if v["study_uid"] == workflow["study_uid"]]
    for path in sorted(videos):
        video, frames = preprocess_file(path, cfg)
        probs = bundle.predict(make_eval_clips(frames, cfg))
        assert probs.shape == (cfg.eval_clips,) and np.all((probs >= 0) & (probs <= 1))
        # The node's offline pipeline gives each video the mean of its clips.
        assert float(probs.mean()) == pytest.approx(by_sop[video.sop_uid]["probabilities"]["lvh"], abs=1e-4)
        checked += 1
    assert checked == len(by_sop) > 0


def test_promote_second_version_and_rollback(workflow) -> None:
    root, models = workflow["root"], workflow["models"]
    v2 = root / "lvh-v2"
    run("train", "finetune", "--data", str(workflow["cache"]), "--labels", str(workflow["labels"]), "--task", "lvh",
        "--init", "random", "--out", str(v2), "--preset", "tiny", "--epochs", "1", "--max-steps", "1",
        "--split-seed", "4", "--name", SLOT, "--version", "2", "--bootstrap", "50", "--device", "cpu",
        "--no-progress")  # fmt: skip
    out = run("train", "promote", str(v2), "--models-dir", str(models)).stdout
    assert f"installed {SLOT} 2" in out

    def served() -> str:
        registry = ModelRegistry(models, "cpu")
        registry.refresh(force=True)
        assert not registry.errors
        return registry.current.by_task("lvh").version

    assert served() == "2"
    out = run("train", "promote", "--rollback", SLOT, "--models-dir", str(models)).stdout
    assert f"installed {SLOT} 1" in out
    assert served() == "1"
    assert json.loads((models / SLOT / "bundle.json").read_text())["version"] == "1"
    # Nothing was promoted before version 1: a further rollback is refused and
    # leaves the slot alone.
    with pytest.raises(BundleError, match="no earlier bundle"):
        rollback(models, SLOT)
    assert served() == "1"
