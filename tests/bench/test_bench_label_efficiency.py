"""bench/label_efficiency.py: variants of the protocol never overwrite the documented one's runs or results."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench import label_efficiency as le


def test_run_and_cell_names() -> None:
    ns = le.parse_args(["--out", "/tmp/x"])
    assert le.seeds_of(ns.pretrain_seeds) == [0] and le.results_suffix(ns) == ""
    # Seed 0 keeps the names runs had before pretraining seeds existed.
    assert le.pretrain_name("echoclr", 0) == "echoclr" and le.pretrain_name("echoclr", 2) == "echoclr-s2"
    # Random init has no pretraining run: its cells are shared by every pretraining seed.
    assert le.pretrain_name("random", 2) == "random"
    probe = le.parse_args(["--out", "/tmp/x", "--finetune-head-init", "probe"])
    assert le.results_suffix(probe) == "_head_probe"


def _perfect_and_chance(y):
    good = le.pairwise(y, y.astype(float))  # every positive above every negative
    flat = le.pairwise(y, np.zeros(len(y)))  # all ties: AUROC 0.5
    return good, flat


def test_replicate_bootstrap_one_replicate_is_the_test_study_bootstrap() -> None:
    y = np.array([1] * 20 + [0] * 40)
    rng = np.random.default_rng(1)
    p = y + rng.normal(0, 1.0, len(y))
    boot = le.replicate_bootstrap(y, {("a", 0.1): [(0, 0, le.pairwise(y, p))]}, 2000)
    samples = boot[("a", 0.1)]
    assert abs(samples.mean() - le.pairwise(y, p).mean()) < 0.01
    assert 0.02 < samples.std() < 0.1  # test-set sampling alone


def test_replicate_bootstrap_carries_the_spread_between_pretraining_runs() -> None:
    y = np.array([1] * 20 + [0] * 40)
    good, flat = _perfect_and_chance(y)
    # One run perfect, one at chance: the mean is 0.75, and the interval must
    # reach both ends (a run drawn twice), where the test-study bootstrap alone
    # would give a single point (neither matrix varies with the test studies).
    groups = {("echoclr", 0.1): [(0, 0, good), (1, 0, flat)], ("random", 0.1): [(None, 0, flat)]}
    boot = le.replicate_bootstrap(y, groups, 4000)
    s = boot[("echoclr", 0.1)]
    assert abs(s.mean() - 0.75) < 0.02
    assert np.isclose(np.percentile(s, 2.5), 0.5) and np.isclose(np.percentile(s, 97.5), 1.0)
    assert np.allclose(boot[("random", 0.1)], 0.5)


def test_eval_device_resolves_auto() -> None:
    import torch

    assert le.eval_device("cpu") == "cpu"
    assert le.eval_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def _result(init: str, pseed: int | None, seed: int, y: np.ndarray, probs: np.ndarray, fraction: float = 0.01) -> dict:
    studies = [f"1.2.{i}" for i in range(len(y))]
    return {"task": "lvh", "init": init, "pretrain_seed": pseed, "fraction": fraction, "seed": seed,
            "train_studies": 7, "study_auroc": {"estimate": float(le.pairwise(y, probs).mean())},
            "study_probs": dict(zip(studies, map(float, probs), strict=True)),
            "study_targets": dict(zip(studies, map(int, y), strict=True))}


def test_verdict_on_both_kinds_of_interval() -> None:
    ns = le.parse_args(["--out", "/tmp/x", "--bootstrap", "500"])
    y = np.array([1] * 20 + [0] * 40)
    flat = np.zeros(len(y))
    # One EchoCLR run ranks perfectly, the other not at all; random init is flat.
    results = [_result("echoclr", 0, 0, y, y.astype(float)), _result("echoclr", 1, 0, y, flat),
               _result("random", None, 0, y, flat)]
    summary = le.summarise(ns, results)
    cell = {c["init"]: c for c in summary["lvh"]["cells"]}["echoclr"]
    assert cell["auroc"] == 0.75 and cell["pretrain_seeds"] == [0, 1]
    # Runs held fixed, the mean ranking is 0.75 on every resample: apart from
    # random's 0.5. Runs resampled, a draw of the flat run twice reaches 0.5.
    assert cell["test_only"] == {"low": 0.75, "high": 0.75}
    assert cell["low"] == 0.5 and cell["high"] == 1.0
    (line,) = le.target_verdict(summary)
    assert "target not met; on test-study intervals alone [0.750, 0.750] vs [0.500, 0.500]: met" in line


def test_work_summary_counts_cached_work(tmp_path: Path) -> None:
    """A re-run from cache still says what the runs and cells took to make."""
    runs = []
    for name, epochs in (("a", [100.0, 200.0]), ("b", [60.0])):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(f'{{"epoch": {i}, "seconds": {s}}}\n' for i, s in enumerate(epochs)))
        runs.append(run)
    # Run b was killed after its epoch-0 line and before its checkpoint: on
    # resume it ran epoch 0 again; that epoch counts once, at its last time.
    with open(runs[1] / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 0, "seconds": 70.0}\n')
    results = [{"finetune_seconds": 30.0}, {"finetune_seconds": 90.4}]
    text = le.work_summary(runs, results, elapsed=5.0)
    assert "2 pretraining runs of 1.2-5.0 min" in text
    assert "2 fine-tuning cells of 30-90 s" in text
    assert "0.1 h in all" in text and "this invocation took 0 min" in text
