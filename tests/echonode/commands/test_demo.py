"""The demo's choices: held-out studies picked by anatomy, what is expected of the model, the training recipe."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from echonode.commands.demo_models import (
    DEMO_TASKS,
    RECIPES,
    recipe_commands,
    train_env,
)
from echonode.commands.demo_studies import (
    CLEAR_LVH_CM,
    CLEAR_NORMAL_CM,
    HELDOUT_SEED,
    DemoStudy,
    lvh_verdict,
    pick_demo_studies,
    read_truth,
)

COLUMNS = ["patient_id", "study_uid", "accession_number", "lvh", "severe_as", "ivs_cm", "lvpw_cm",
           "av_cusp_sep_cm", "av_vmax_m_s"]


def _labels(path: Path, walls: list[tuple[float, float]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for i, (ivs, lvpw) in enumerate(walls):
            w.writerow({"patient_id": f"P{i}", "study_uid": f"1.2.{i}", "accession_number": f"A{i}",
                        "lvh": int(max(ivs, lvpw) >= 1.2), "severe_as": 0, "ivs_cm": ivs, "lvpw_cm": lvpw,
                        "av_cusp_sep_cm": 1.9, "av_vmax_m_s": "1.10"})
    return path


def test_the_studies_are_picked_by_true_wall_thickness(tmp_path: Path) -> None:
    studies = read_truth(_labels(tmp_path / "labels.csv",
                                 [(1.25, 1.0), (0.95, 0.9), (1.1, 1.75), (0.8, 0.7), (1.85, 1.3), (1.05, 0.9)]))
    lvh, normal = pick_demo_studies(studies)
    # The clearest of each kind: the thickest wall at or over 1.7 cm, the thinnest walls at or under 1.0 cm.
    assert (lvh.study_uid, normal.study_uid) == ("1.2.4", "1.2.3")
    assert lvh.thicker_wall_cm >= CLEAR_LVH_CM and lvh.lvh
    assert normal.thicker_wall_cm <= CLEAR_NORMAL_CM and not normal.lvh
    line = lvh.truth_line()
    assert "IVSd 1.85 cm" in line and "LVPWd 1.30 cm" in line and "AV Vmax 1.10 m/s" in line
    assert "cusp separation 1.90 cm" in line


def test_no_clear_study_is_an_error_not_a_borderline_pick(tmp_path: Path) -> None:
    borderline = read_truth(_labels(tmp_path / "a.csv", [(1.25, 1.0), (1.05, 0.9), (1.6, 1.2)]))
    with pytest.raises(ValueError, match="at least 1.7 cm"):
        pick_demo_studies(borderline)
    no_normal = read_truth(_labels(tmp_path / "b.csv", [(1.8, 1.0), (1.05, 0.9)]))
    with pytest.raises(ValueError, match="at most 1.0 cm"):
        pick_demo_studies(no_normal)


def test_labels_without_anatomy_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("patient_id,study_uid,lvh,severe_as\nP1,1.2.3,1,0\n")
    with pytest.raises(ValueError, match="not a synthetic archive"):
        read_truth(path)


@pytest.mark.parametrize(
    ("lvh", "p", "met"),
    [(True, 0.93, True), (True, 0.8, True), (True, 0.79, False), (True, None, False),
     (False, 0.05, True), (False, 0.2, True), (False, 0.21, False), (False, None, False)],
)
def test_the_verdict_names_the_expectation_and_says_when_it_is_not_met(lvh: bool, p: float | None,
                                                                       met: bool) -> None:
    study = DemoStudy("1.2.3", "A1", 1.8 if lvh else 0.8, 1.0, 1.9, 1.1, lvh, False)
    ok, line = lvh_verdict(study, p)
    assert ok is met
    assert (">= 0.8" if lvh else "<= 0.2") in line
    assert line.endswith("as expected" if met else "NOT MET")
    assert ("not assessed" in line) is (p is None)


def test_the_training_recipe_never_uses_the_held_out_seed(tmp_path: Path) -> None:
    assert DEMO_TASKS == ("view", "lvh")  # severe AS: too few positives at this size to mean anything
    for recipe in RECIPES:
        assert recipe.seed != HELDOUT_SEED
        steps = recipe_commands(recipe, tmp_path, tmp_path / "models")
        assert [s[0] for s in steps] == ["synth", "index", "finetune", "promote"]
        synth = steps[0]
        assert synth[synth.index("--seed") + 1] == str(recipe.seed)
        finetune = steps[2]
        assert finetune[finetune.index("--task") + 1] == recipe.task
        assert finetune[finetune.index("--init") + 1] == "random"
    assert len({r.seed for r in RECIPES}) == len(RECIPES)
    assert train_env()["OMP_NUM_THREADS"] == "1"
