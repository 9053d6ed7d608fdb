"""``echonode infer``: the pipeline offline, one result per study."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom

from echonode.report.read import summarise_report
from tests.conftest import run_cli
from tests.factories import tiny_bundle, us_multiframe, write


def test_infer_json_and_sr(tmp_path: Path, ybr_loop: Path) -> None:
    models = tmp_path / "models"
    tiny_bundle(models, "lvh")
    tiny_bundle(models, "severe_as", seed=3)
    other = tmp_path / "other"
    study = pydicom.uid.generate_uid()
    for i in range(2):
        write(us_multiframe(study_uid=study, frames=20, seed=i), other / f"{i}.dcm")
    (other / "notes.txt").write_text("not dicom")
    res = run_cli("infer", str(ybr_loop), str(other), "--models", str(models), "--json",
                  "--sr-out", str(tmp_path / "sr"), "--device", "cpu")
    assert res.returncode in (0, 1), res.stderr
    doc = json.loads(res.stdout)
    by_uid = {s["study_uid"]: s for s in doc["studies"]}
    src_uid = str(pydicom.dcmread(ybr_loop, stop_before_pixels=True).StudyInstanceUID)
    assert set(by_uid) == {src_uid, study}
    real = by_uid[src_uid]
    assert set(real["tasks"]) == {"lvh", "severe_as"}
    assert real["tasks"]["lvh"]["random_weights"] is True
    assert real["videos"][0]["used"] and real["videos"][0]["frames"] == 30
    assert "no view classifier" in real["view_filter"]
    sr = summarise_report(real["sr"])
    assert sr["study_uid"] == src_uid
    # The SR carries 3 decimals (the journal and the JSON the full value).
    assert abs(sr["findings"][0]["probability"] - real["tasks"][sr["findings"][0]["task"]]["probability"]) <= 5e-4
    assert any(s["reason"] == "not a DICOM file" for s in doc["skipped_files"])


def test_infer_human_output_and_errors(tmp_path: Path, ybr_loop: Path) -> None:
    models = tmp_path / "models"
    tiny_bundle(models, "lvh")
    res = run_cli("infer", str(ybr_loop), "--models", str(models), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "lvh" in res.stdout and "RANDOM WEIGHTS" in res.stdout
    res = run_cli("infer", str(ybr_loop), "--models", str(tmp_path / "none"))
    assert res.returncode == 2 and "models folder not found" in res.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_cli("infer", str(empty), "--models", str(models), "--device", "cpu")
    assert res.returncode == 2 and "no DICOM study" in res.stderr
    res = run_cli("infer", str(ybr_loop), "--models", str(empty))
    assert res.returncode == 2 and "no usable task model" in res.stderr


def test_infer_sr_out_refuses_an_identity_value_it_may_not_alter(tmp_path: Path) -> None:
    models = tmp_path / "models"
    tiny_bundle(models, "lvh")
    ds = us_multiframe(frames=20)
    ds.PatientName = ["SECRET^ONE", "SECRET^TWO"]
    write(ds, tmp_path / "in" / "0.dcm")
    res = run_cli("infer", str(tmp_path / "in"), "--models", str(models), "--json",
                  "--sr-out", str(tmp_path / "sr"), "--device", "cpu")
    assert res.returncode == 1, res.stderr
    (study,) = json.loads(res.stdout)["studies"]
    assert study["error"].startswith("no SR can be built: PatientName has 2 values")
    assert "SECRET" not in res.stdout + res.stderr
    assert not (tmp_path / "sr").exists() or not any((tmp_path / "sr").iterdir())
