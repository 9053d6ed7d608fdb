"""bench/paired_auroc.py: two models' study AUROCs on the same studies and their paired difference."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from bench import paired_auroc


def _report(folder: Path, studies: dict[str, tuple[list[float], int]]) -> Path:
    folder.mkdir(parents=True)
    with open(folder / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study_uid", "sop_uid", "probability", "target"])
        for study, (probs, label) in studies.items():
            for i, p in enumerate(probs):
                w.writerow([study, f"{study}.{i}", p, label])
    return folder


def _studies(seed: int, separation: float, n: int = 60) -> dict[str, tuple[list[float], int]]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3 == 0
    return {f"1.2.{i}": ([float(rng.normal(separation * y)), float(rng.normal(separation * y))], int(y))
            for i, y in enumerate(labels)}


def test_a_study_is_the_mean_of_its_videos_and_pooled_reports_add_studies(tmp_path: Path) -> None:
    one = _report(tmp_path / "one", {"1.1": ([0.2, 0.4], 1), "1.2": ([0.1], 0)})
    two = _report(tmp_path / "two", {"1.3": ([0.9], 0)})
    scores = paired_auroc.study_scores([one, two])
    assert scores == {"1.1": (pytest.approx(0.3), 1), "1.2": (0.1, 0), "1.3": (0.9, 0)}
    with pytest.raises(ValueError, match="more than one report"):
        paired_auroc.study_scores([one, one])


def test_the_same_scores_differ_by_exactly_zero_and_a_better_model_by_more(tmp_path: Path) -> None:
    weak, strong = _studies(0, 0.3), _studies(0, 3.0)
    a = paired_auroc.study_scores([_report(tmp_path / "a", weak)])
    same = paired_auroc.paired_auroc(a, a, n_resamples=200)
    assert same.difference == (0.0, 0.0, 0.0) and same.positives == 20 and same.negatives == 40
    better = paired_auroc.paired_auroc(a, paired_auroc.study_scores([_report(tmp_path / "b", strong)]),
                                       n_resamples=200)
    assert better.difference[1] > 0 and better.b[0] > better.a[0]
    assert better.a[1] <= better.a[0] <= better.a[2]


def test_other_studies_or_labels_are_refused(tmp_path: Path, capsys) -> None:
    base = _studies(1, 1.0)
    a = _report(tmp_path / "a", base)
    fewer = _report(tmp_path / "fewer", dict(list(base.items())[1:]))
    relabelled = _report(tmp_path / "relabelled", {k: (p, 1 - y) for k, (p, y) in base.items()})
    assert paired_auroc.main(["--a", str(a), "--b", str(fewer)]) == 2
    assert "other studies" in capsys.readouterr().out
    assert paired_auroc.main(["--a", str(a), "--b", str(relabelled)]) == 2
    assert "label some study differently" in capsys.readouterr().out
    assert paired_auroc.main(["--a", str(a), "--b", str(a), "--name", "same", "--resamples", "50"]) == 0
    assert "| same | 20 / 40 | " in capsys.readouterr().out
