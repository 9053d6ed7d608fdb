"""bench/valve_opening.py: whether a severe-AS model's scores follow the valve's opening or only its disease."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from bench import valve_opening


def _valves(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cusp separations (cm) and a diseased flag, drawn like train/synth/truth.py's four valve states."""
    rng = np.random.default_rng(seed)
    state = rng.choice(4, n, p=(0.52, 0.28, 0.12, 0.08))
    ranges = np.array([(1.5, 2.5), (1.3, 2.3), (0.8, 1.4), (0.35, 0.799)])
    sep = ranges[state, 0] + (ranges[state, 1] - ranges[state, 0]) * rng.random(n)
    return sep, state > 0


def _scores(p: np.ndarray, sep: np.ndarray) -> tuple[dict[str, tuple[float, int]], dict[str, float]]:
    keys = [f"1.2.{i}" for i in range(len(p))]
    return ({k: (float(pi), int(s < 0.8)) for k, pi, s in zip(keys, p, sep, strict=True)},
            {k: float(s) for k, s in zip(keys, sep, strict=True)})


def test_a_model_that_reads_only_the_diseased_look_is_at_chance_against_the_narrow_band() -> None:
    sep, diseased = _valves()
    rng = np.random.default_rng(1)
    scores, separation = _scores(diseased + 0.1 * rng.normal(size=len(sep)), sep)
    r = valve_opening.opening_report(scores, separation, n_resamples=300)
    assert 0.70 <= r.overall[0] <= 0.86  # the "diseased" ceiling, about 0.78
    assert r.severe_vs_narrow[1] < 0.5 < r.severe_vs_narrow[2]


def test_a_model_that_measures_the_opening_beats_the_narrow_band_and_falls_as_the_cusps_open() -> None:
    sep, _ = _valves()
    rng = np.random.default_rng(2)
    scores, separation = _scores(-sep + 0.15 * rng.normal(size=len(sep)), sep)
    r = valve_opening.opening_report(scores, separation, n_resamples=300)
    assert r.severe_vs_narrow[0] > 0.9 and r.severe_vs_narrow[1] > 0.8
    assert r.spearman[2] < -0.8
    means = [m for _, n, m in r.band_means if n]
    assert means == sorted(means, reverse=True)
    assert sum(n for _, n, _ in r.band_means) == len(sep)


def test_spearman_gives_ties_their_mean_rank() -> None:
    # Ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): Pearson of the ranks.
    expected = np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1]
    assert valve_opening.spearman(np.array([0.1, 0.5, 0.5, 0.9]), np.array([3.0, 4.0, 5.0, 6.0])) == \
        pytest.approx(expected)
    assert np.isnan(valve_opening.spearman(np.ones(4), np.arange(4.0)))


def test_reports_that_do_not_match_the_labels_are_refused() -> None:
    sep, diseased = _valves(60)
    scores, separation = _scores(diseased.astype(float), sep)
    with pytest.raises(ValueError, match="no separation"):
        valve_opening.opening_report(scores, {k: v for k, v in list(separation.items())[1:]})
    wrong = dict(scores)
    key = next(k for k, (_, y) in scores.items() if y == 0)
    wrong[key] = (0.5, 1)  # an LVH report, say: its labels are not the separation's
    with pytest.raises(ValueError, match="disagrees"):
        valve_opening.opening_report(wrong, separation)
    wide = {k: s for k, s in separation.items() if not 0.8 <= s < 1.4}  # no diseased valve that opens little
    with pytest.raises(ValueError, match="narrow band are needed"):
        valve_opening.opening_report({k: scores[k] for k in wide}, wide)


def test_the_command_reads_evaluate_reports_and_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sep, _ = _valves(120, seed=3)
    report = tmp_path / "eval"
    report.mkdir()
    with open(report / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study_uid", "sop_uid", "probability", "target"])
        for i, s in enumerate(sep):
            for v in range(2):  # two videos a study, averaged
                w.writerow([f"1.2.{i}", f"1.2.{i}.{v}", 1.0 / (1.0 + s) + 0.01 * v, int(s < 0.8)])
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study_uid", "severe_as", "av_cusp_sep_cm"])
        w.writerows([f"1.2.{i}", int(s < 0.8), s] for i, s in enumerate(sep))
    assert valve_opening.main(["--report", str(report), "--labels", str(labels), "--name", "m",
                               "--resamples", "50"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith("| m | 1.000 [1.000, 1.000] | 1.000")
    assert valve_opening.main(["--report", str(report), "--labels", str(tmp_path / "missing.csv")]) == 2
    assert "valve_opening:" in capsys.readouterr().err
