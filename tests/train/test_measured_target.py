"""Tests for train.measured_target and ``finetune --target measurement``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from echonode.analyse.preprocess import PreprocessConfig
from echonode.bundles.weights import load_bundle
from tests.factories import finetune_args, make_measured_archive
from train import finetune as finetune_module
from train.cache import ClipCache, load_study_labels, split_cache
from train.evaluate import main as evaluate_main
from train.finetune import main, prepare_task
from train.index import build_index
from train.measured_target import (
    MEASURED_TARGETS,
    Calibration,
    Standardiser,
    constant_answer_mse,
    fit_calibration,
    fold_into_head,
    study_measurements,
)


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("measured")
    archive, labels = make_measured_archive(root)
    build_index(archive, root / "cache", PreprocessConfig(size=16), progress=False)
    return root / "cache", labels


def test_a_studys_value_is_the_thicker_wall_and_placeholders_are_not_values() -> None:
    rows = [
        {"study_uid": "1", "ivsd_cm": "1.3", "lvpwd_cm": "0.9"},
        {"study_uid": "2", "ivsd_cm": "", "lvpwd_cm": "1.25"},
        {"study_uid": "3", "ivsd_cm": "0", "lvpwd_cm": "nan"},
        {"study_uid": "4", "ivsd_cm": "thick", "lvpwd_cm": "-1"},
        {"study_uid": "5", "ivsd_cm": "inf", "lvpwd_cm": ""},
    ]
    assert study_measurements(rows, MEASURED_TARGETS["lvh"]) == {"1": 1.3, "2": 1.25}
    with pytest.raises(ValueError, match="av_vmax_m_s"):
        study_measurements(rows, MEASURED_TARGETS["severe_as"])


def test_the_standardiser_needs_values_that_differ() -> None:
    z = Standardiser.fit([1.0, 2.0, 3.0])
    assert z(2.0) == pytest.approx(0.0) and z(3.0) == pytest.approx(1.0 / np.std([1.0, 2.0, 3.0]))
    for values in ([], [1.1], [1.1, 1.1]):
        with pytest.raises(ValueError, match="different values"):
            Standardiser.fit(values)
    assert constant_answer_mse([1.0, -1.0]) == pytest.approx(1.0) and math.isnan(constant_answer_mse([]))


def test_calibration_orders_as_the_output_does_and_folds_into_the_head() -> None:
    rng = np.random.default_rng(0)
    outputs = rng.normal(size=400)
    labels = (outputs + rng.normal(scale=0.5, size=400) > 0.8).astype(float)
    cal = fit_calibration(outputs, labels)
    assert cal.slope > 0 and cal.clips == 400 and cal.positives == int(labels.sum())
    # The fitted log odds cross zero where the label's rate is one half (about 0.8 here).
    assert -cal.intercept / cal.slope == pytest.approx(0.8, abs=0.2)
    # A class weight lifts the positives' odds by its log (weighted logistic regression's prior shift).
    weighted = fit_calibration(outputs, labels, pos_weight=4.0)
    assert weighted.intercept - cal.intercept == pytest.approx(math.log(4.0), abs=0.3)
    # Reversed labels give a negative slope: it is not forced positive, finetune warns of it.
    assert fit_calibration(outputs, 1.0 - labels).slope < 0
    with pytest.raises(ValueError, match="both classes"):
        fit_calibration(outputs, np.zeros(400))
    # Outputs that separate the classes exactly: Platt's targets give a finite slope without any penalty,
    # steeper with more clips (the targets move towards 0 and 1).
    few, many = (np.r_[-np.ones(n), np.ones(n)] for n in (10, 1000))
    finite = fit_calibration(few, (few > 0).astype(float), l2=0.0)
    assert 0 < finite.slope < 10 and finite.slope == pytest.approx(fit_calibration(few, (few > 0).astype(float)).slope,
                                                                    rel=0.05)
    assert fit_calibration(many, (many > 0).astype(float), l2=0.0).slope > finite.slope + 1
    fc = nn.Linear(3, 1)
    x = torch.randn(5, 3)
    before = fc(x).detach()
    fold_into_head(fc, cal)
    assert torch.allclose(fc(x).detach(), cal.slope * before + cal.intercept, atol=1e-5)
    with pytest.raises(ValueError, match="one-output"):
        fold_into_head(nn.Linear(3, 2), cal)


def test_prepare_task_trains_only_on_measured_studies_with_z_scored_targets(measured, capsys) -> None:
    cache, labels = measured
    c, rows = ClipCache(cache), load_study_labels(labels)
    splits = split_cache(c, val_fraction=0.25, test_fraction=0.25)
    data = prepare_task(c, rows, "lvh", splits, target="measurement")
    walls = study_measurements(rows, MEASURED_TARGETS["lvh"])
    unmeasured = "1.2.826.0.3.3"
    assert unmeasured not in walls
    assert all(v["study_uid"] in walls for v in data.videos["train"])
    assert data.standardiser is not None and data.measures is not None
    train_walls = [walls[s] for s in data.train_studies]
    assert data.standardiser.mean == pytest.approx(np.mean(train_walls))
    videos, z = data.measured("train")
    assert len(videos) == len(data.videos["train"])
    assert z == pytest.approx([(walls[v["study_uid"]] - data.standardiser.mean) / data.standardiser.sd for v in videos])
    # The labels stay the scored targets, for every split.
    by_study = {r["study_uid"]: float(r["lvh"]) for r in rows}
    for name in ("train", "val", "test"):
        assert data.targets[name] == [by_study[v["study_uid"]] for v in data.videos[name]]
    # The fixture's split puts the unmeasured study among the training studies: it is named as left out.
    assert unmeasured in splits["train"] and unmeasured not in data.train_studies
    assert "1 labelled training studies have no measurement of the thicker" in capsys.readouterr().err
    label_only = prepare_task(c, rows, "lvh", splits)
    assert label_only.measures is None
    with pytest.raises(ValueError, match="not a measurement"):
        label_only.measured("train")
    with pytest.raises(ValueError, match="not view"):
        prepare_task(c, rows, "view", splits, target="measurement")


def test_finetune_on_the_measurement_writes_a_calibrated_binary_bundle(measured, tmp_path: Path, capsys) -> None:
    cache, labels = measured
    out = tmp_path / "lvh-measured"
    args = finetune_args(cache, labels, out, "--task", "lvh", "--target", "measurement", "--epochs", "8",
                         "--patience", "8", "--lr", "0.003", "--epoch-samples", "96")
    assert main(args) == 0
    meta = load_bundle(out).meta
    assert meta.task == "lvh" and meta.labels == ["absent", "present"]
    assert meta.provenance["target"] == "measurement"
    record = meta.metrics["measurement"]
    assert record["columns"] == ["ivsd_cm", "lvpwd_cm"] and record["unit"] == "cm"
    assert record["calibration"]["slope"] > 0 and record["calibration"]["fitted_on"] == "validation clips"
    # It measured the band: its error is well under a constant's, and the calibrated bundle ranks the label.
    assert record["lowest_val_mse"] < 0.5 * record["constant_answer_val_mse"]
    assert meta.metrics["test"]["video"]["auroc"]["estimate"] > 0.8
    # Each clip is calibrated against its own video's label: outputs paired with other videos' labels would
    # give a slope near 0 (or below it), not a steep one.
    assert record["calibration"]["slope"] > 1.5 and record["dropout"] == 0.25
    assert "calibrated on" in capsys.readouterr().out
    # evaluate reads the calibrated bundle as any binary bundle, and finds the figures the bundle states.
    report = tmp_path / "eval"
    assert evaluate_main(["--bundle", str(out), "--data", str(cache), "--labels", str(labels), "--out", str(report),
                          "--split", "test", "--bootstrap", "200"]) == 0
    scored = json.loads((report / "metrics.json").read_text())
    assert scored["study"]["auroc"]["estimate"] == pytest.approx(meta.metrics["test"]["study"]["auroc"]["estimate"])
    # A bundle's own head cannot be regressed from: a new head is trained.
    again = finetune_args(cache, labels, tmp_path / "from-bundle", "--task", "lvh", "--target", "measurement",
                          "--init", str(out / "weights.pt"), "--epochs", "1")
    assert main(again) == 2
    assert "brings its own one-output head" in capsys.readouterr().err


def test_probabilities_prevalence_moves_a_calibrated_head_as_any_other(measured, tmp_path: Path) -> None:
    cache, labels = measured
    common = ("--task", "lvh", "--target", "measurement", "--epochs", "4", "--patience", "4", "--lr", "0.003",
              "--epoch-samples", "96")
    assert main(finetune_args(cache, labels, tmp_path / "balanced", *common)) == 0
    assert main(finetune_args(cache, labels, tmp_path / "prevalence", *common, "--probabilities", "prevalence")) == 0
    balanced, prevalence = (load_bundle(tmp_path / name).meta for name in ("balanced", "prevalence"))
    record = prevalence.metrics["probabilities"]
    assert record["scale"] == "prevalence" and record["logit_offset"] == pytest.approx(-math.log(record["pos_weight"]))
    assert prevalence.threshold == pytest.approx(record["threshold"]) and prevalence.threshold != 0.5
    # Calibrated first (weighted by the validation clips' own balance, so for a prevalence of one half), then
    # moved by -ln(training n_neg / n_pos) as a label-trained head is.
    calibration = prevalence.metrics["measurement"]["calibration"]
    val_pos = calibration["positives"]
    assert calibration["pos_weight"] == pytest.approx((calibration["clips"] - val_pos) / val_pos)
    bias = {name: load_bundle(tmp_path / name).model.fc.bias.item() for name in ("balanced", "prevalence")}
    assert bias["prevalence"] == pytest.approx(bias["balanced"] + record["logit_offset"], abs=1e-4)
    # The same run (same seed) moved by the prevalence shift: the same calibration, and the ranking changed
    # only where averaging a study's clips does not commute with the shift.
    assert (prevalence.metrics["measurement"]["calibration"]["slope"]
            == pytest.approx(balanced.metrics["measurement"]["calibration"]["slope"]))
    for level in ("video", "study"):
        assert (prevalence.metrics["test"][level]["auroc"]["estimate"]
                == pytest.approx(balanced.metrics["test"][level]["auroc"]["estimate"], abs=0.02))


def _edited(labels: Path, out: Path, edit, drop: tuple[str, ...] = ()) -> Path:
    """``labels`` with ``edit(row)`` applied to every row and the ``drop`` columns left out, written to ``out``."""
    with open(labels, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        edit(row)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[k for k in rows[0] if k not in drop], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_finetune_on_the_measurement_refuses_what_it_cannot_do(measured, tmp_path: Path, capsys) -> None:
    cache, labels = measured
    bare = _edited(labels, tmp_path / "labels.csv", lambda row: None, drop=("ivsd_cm", "lvpwd_cm"))
    assert main(finetune_args(cache, bare, tmp_path / "a", "--task", "lvh", "--target", "measurement",
                              "--epochs", "1")) == 2
    assert "has none of them" in capsys.readouterr().err
    assert main(finetune_args(cache, labels, tmp_path / "b", "--task", "lvh", "--target", "measurement",
                              "--head-init", "probe", "--epochs", "1")) == 2
    assert "--head-init probe" in capsys.readouterr().err
    assert main(finetune_args(cache, labels, tmp_path / "c", "--task", "severe_as", "--target", "measurement",
                              "--epochs", "1")) == 2
    assert "av_vmax_m_s" in capsys.readouterr().err
    # Refused before training: no validation split to stop early on or calibrate with.
    no_val = finetune_args(cache, labels, tmp_path / "d", "--task", "lvh", "--target", "measurement", "--epochs", "1")
    no_val[no_val.index("--val-fraction") + 1] = "0"
    assert main(no_val) == 2
    said = capsys.readouterr()
    assert "has none (--val-fraction 0)" in said.err and "epoch 0" not in said.out


def test_no_value_to_train_on_or_one_value_for_all_is_refused(measured, tmp_path: Path, capsys) -> None:
    cache, labels = measured
    empty = _edited(labels, tmp_path / "empty.csv", lambda row: row.update(ivsd_cm="", lvpwd_cm=""))
    assert main(finetune_args(cache, empty, tmp_path / "a", "--task", "lvh", "--target", "measurement",
                              "--epochs", "1")) == 2
    assert "no labelled training studies with a measurement for lvh" in capsys.readouterr().err
    same = _edited(labels, tmp_path / "same.csv", lambda row: row.update(ivsd_cm="1.0", lvpwd_cm="0.9"))
    assert main(finetune_args(cache, same, tmp_path / "b", "--task", "lvh", "--target", "measurement",
                              "--epochs", "1")) == 2
    assert "different values" in capsys.readouterr().err


def test_severe_as_regresses_the_peak_velocity(measured, tmp_path: Path) -> None:
    cache, labels = measured
    c = ClipCache(cache)
    splits = split_cache(c, val_fraction=0.25, test_fraction=0.25)
    rows = load_study_labels(labels)
    for i, row in enumerate(rows):
        row["severe_as"], row["av_vmax_m_s"] = str(i % 2), f"{2.0 + 2.5 * (i % 2) + 0.01 * i:.2f}"
    data = prepare_task(c, rows, "severe_as", splits, target="measurement")
    assert data.measures is not None
    velocity = {r["study_uid"]: float(r["av_vmax_m_s"]) for r in rows}
    for name in ("train", "val", "test"):
        assert data.measures[name] == [velocity[v["study_uid"]] for v in data.videos[name]]


def test_a_validation_split_without_measurements_is_refused_before_training(measured, tmp_path: Path, capsys) -> None:
    cache, labels = measured
    splits = split_cache(ClipCache(cache), val_fraction=0.25, test_fraction=0.25)
    unmeasured_val = _edited(labels, tmp_path / "labels.csv", lambda row: row.update(ivsd_cm="", lvpwd_cm="")
                             if row["study_uid"] in splits["val"] else None)
    assert main(finetune_args(cache, unmeasured_val, tmp_path / "b", "--task", "lvh", "--target", "measurement",
                              "--epochs", "1")) == 2
    said = capsys.readouterr()
    assert "no validation study has a measurement" in said.err and "epoch 0" not in said.out


@pytest.mark.parametrize(("slope", "warning"), [(0.0, "the same probability of lvh for every study"),
                                                (-2.0, "the regression does not track the label")])
def test_a_calibration_that_does_not_rise_with_the_measurement_is_called_so(
        measured, tmp_path: Path, capsys, monkeypatch, slope: float, warning: str) -> None:
    cache, labels = measured
    monkeypatch.setattr(finetune_module, "fit_calibration",
                        lambda outputs, labels, pos_weight=None: Calibration(slope, 0.1, len(outputs), 1, 0.7))
    assert main(finetune_args(cache, labels, tmp_path / "b", "--task", "lvh", "--target", "measurement",
                              "--epochs", "1")) == 0
    assert warning in capsys.readouterr().err
    assert load_bundle(tmp_path / "b").meta.metrics["measurement"]["calibration"]["slope"] == slope
