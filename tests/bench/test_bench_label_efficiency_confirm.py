"""bench/label_efficiency_confirm.py: the frozen protocol, tuning that never reads the test split, the verdict.

The pipeline runs end to end with the training and evaluation commands
replaced by recorders (the real ones take hours at the protocol's sizes;
``--quick`` exercises them): what is pinned here is which split each step
reads and which bundles reach the test split.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import label_efficiency as le
from bench import label_efficiency_confirm as lec

REPO = Path(__file__).resolve().parents[2]
#: Each protocol's hash as committed before any of its runs; a change to a protocol must change
#: its line here and the protocol file.
FROZEN_SHA256 = {
    1: "799376eb993eb1adb28e7fe74722f601a5aa53de7233ddb50a5199b71ae55f45",
    2: "90c185aa4f120cc318db78d39c70c83cf1b97a17d73e30841798e9eb85049d7e",
    3: "3f5370f192bc0be91453a1b883cf7c5331a95e9479c296dfb45262ac1cbafc14",
}


@pytest.mark.parametrize("version", sorted(FROZEN_SHA256))
def test_protocol_hash_is_stable_and_documented(version: int) -> None:
    proto, frozen = lec.PROTOCOLS[version], FROZEN_SHA256[version]
    assert proto["version"] == version
    assert lec.protocol_sha256(proto) == frozen
    # Key order does not matter; values do.
    shuffled = dict(reversed(list(proto.items())))
    assert lec.protocol_sha256(shuffled) == frozen
    changed = json.loads(json.dumps(proto))
    changed["tuning"]["lr_grid"] = [1e-4, 3e-4]
    assert lec.protocol_sha256(changed) != frozen
    doc = (REPO / "bench" / "label_efficiency_protocol.md").read_text()
    assert frozen in doc
    # The quick smoke is another protocol, on a seed that is not the confirmatory one.
    quick = lec.quick_protocol(proto)
    assert lec.protocol_sha256(quick) != frozen
    assert quick["archive"]["synth_seed"] not in {p["archive"]["synth_seed"] for p in lec.PROTOCOLS.values()}


def test_each_protocol_has_a_synth_seed_of_its_own() -> None:
    assert [p["archive"]["synth_seed"] for _, p in sorted(lec.PROTOCOLS.items())] == [4242, 5151, 6464]
    assert lec.PROTOCOL is lec.PROTOCOLS[max(lec.PROTOCOLS)]


def test_v3_asks_severe_as_on_resampled_frames(tmp_path: Path, monkeypatch) -> None:
    proto = lec.PROTOCOLS[3]
    assert proto["finetuning"]["tasks"] == ["severe_as"]
    tuning = lec.tuning_cells(proto)
    assert len(tuning) == 1 * 2 * 2 * 3 and {c.lr for c in tuning} == {1e-4, 3e-4, 1e-3}
    rest = lec.remaining_cells(proto, {c.key: 3e-4 for c in tuning})
    assert len(rest) == 2 * 7
    # The archive is indexed at 15 frames/s into a folder of its own; protocol 2's stays native.
    ns = lec.bench_namespace(proto, tmp_path, "cpu")
    assert ns.target_fps == 15.0 and ns.frames == 48
    assert lec.bench_namespace(lec.PROTOCOLS[2], tmp_path, "cpu").target_fps is None
    seen: dict[str, Any] = {}

    def fake_index(archive: Path, cache: Path, cfg: Any, progress: bool) -> argparse.Namespace:
        seen.update(cache=cache, cfg=cfg)
        return argparse.Namespace(cached=0, added=0, unusable=0, seconds=0.0)

    monkeypatch.setattr("train.index.build_index", fake_index)
    ns.archive = tmp_path / "archive"
    ns.archive.mkdir()
    (ns.archive / "labels.csv").write_text("study_uid\n")
    _, cache = le.make_archive(ns)
    assert cache == seen["cache"] == tmp_path / "cache-48-fps15" and seen["cfg"].target_fps == 15.0


def test_v2_tunes_on_draw_0_and_fits_every_other_replicate_at_the_chosen_rate_only() -> None:
    proto = lec.PROTOCOLS[2]
    tuning = lec.tuning_cells(proto)
    assert {c.draw for c in tuning} == {0} and {c.pretrain_seed for c in tuning} == {0, None}
    assert len(tuning) == 2 * 2 * 2 * 3  # tasks x fractions x inits x learning rates
    chosen = {c.key: (1e-3 if c.init == "echoclr" else 3e-3) for c in tuning}
    rest = lec.remaining_cells(proto, chosen)
    assert all(c.lr == chosen[c.key] for c in rest)
    # Random init: draws 1 and 2; EchoCLR run 0: draws 1 and 2; run 1: every draw.
    per_key = {(c.init, c.pretrain_seed, c.draw) for c in rest}
    assert per_key == {("random", None, 1), ("random", None, 2), ("echoclr", 0, 1), ("echoclr", 0, 2),
                       ("echoclr", 1, 0), ("echoclr", 1, 1), ("echoclr", 1, 2)}
    assert len(rest) == 2 * 2 * 7
    # Nothing is fitted twice.
    assert not {(c.task, c.init, c.pretrain_seed, c.fraction, c.draw, c.lr) for c in rest} & {
        (c.task, c.init, c.pretrain_seed, c.fraction, c.draw, c.lr) for c in tuning}
    # v1 tuned on every draw: its remaining cells are EchoCLR's other pretraining runs only.
    v1 = lec.PROTOCOLS[1]
    rest1 = lec.remaining_cells(v1, {c.key: 1e-3 for c in lec.tuning_cells(v1)})
    assert {c.init for c in rest1} == {"echoclr"} and {c.pretrain_seed for c in rest1} == {1, 2}


def _cell(c: dict[str, Any], e: tuple[float, float, float], r: tuple[float, float, float], f: float) -> None:
    c[f] = [{"init": "echoclr", "fraction": f, "auroc": e[0], "low": e[1], "high": e[2], "train_studies": [7],
             "delta_vs_random": {"estimate": e[0] - r[0], "low": -0.01, "high": 0.2}},
            {"init": "random", "fraction": f, "auroc": r[0], "low": r[1], "high": r[2], "train_studies": [7]}]


def test_verdict_says_not_met_when_the_cis_overlap() -> None:
    cells: dict[float, list] = {}
    _cell(cells, (0.80, 0.70, 0.90), (0.60, 0.50, 0.71), 0.01)  # overlap by 0.01
    _cell(cells, (0.90, 0.85, 0.95), (0.70, 0.60, 0.80), 0.1)  # apart
    _cell(cells, (0.95, 0.92, 0.97), (0.96, 0.93, 0.98), 1.0)
    summary = {"lvh": {"cells": [c for f in (0.01, 0.1, 1.0) for c in cells[f]]}}
    one, ten, full = lec.verdict_lines(summary, [0.01, 0.1])
    assert one.startswith("lvh at 1%: EchoCLR - random init +0.200 [-0.010, +0.200] (paired, 95 % CI; includes zero)")
    assert one.endswith("the CIs overlap: target not met (CIs overlap)")
    assert ten.endswith("the CIs do not overlap: target met")
    assert "reference, no target" in full and "target met" not in full
    below: dict[float, list] = {}
    _cell(below, (0.50, 0.40, 0.55), (0.80, 0.70, 0.90), 0.1)
    (line,) = lec.verdict_lines({"severe_as": {"cells": below[0.1]}}, [0.1])
    assert line.endswith("target not met (EchoCLR below random init)")


def test_selection_uses_validation_auroc_then_loss_then_the_smaller_lr() -> None:
    def rec(lr: float, auroc: float, loss: float, seed: int) -> dict[str, Any]:
        return {"task": "lvh", "init": "random", "pretrain_seed": None, "fraction": 0.1, "seed": seed, "lr": lr,
                "val_study_auroc": auroc, "val_loss": loss, "best_epoch": 39 if lr == 1e-4 else 3}
    records = [rec(1e-4, 0.8, 0.5, s) for s in (0, 1)] + [rec(1e-3, 0.9, 0.7, s) for s in (0, 1)]
    sel = lec.select_lr(records, [1e-4, 1e-3], epoch_cap=40)
    assert sel.chosen == {("lvh", "random", 0.1): 1e-3}
    assert [g["best_epoch_at_cap"] for g in sel.grid] == [2, 0]
    tie = [rec(1e-4, 0.9, 0.6, s) for s in (0, 1)] + [rec(1e-3, 0.9, 0.5, s) for s in (0, 1)]
    assert lec.select_lr(tie, [1e-4, 1e-3], 40).chosen[("lvh", "random", 0.1)] == 1e-3
    same = [rec(1e-4, 0.9, 0.5, s) for s in (0, 1)] + [rec(1e-3, 0.9, 0.5, s) for s in (0, 1)]
    assert lec.select_lr(same, [1e-4, 1e-3], 40).chosen[("lvh", "random", 0.1)] == 1e-4
    with pytest.raises(ValueError, match="unequal tuning replicates"):
        lec.select_lr(records[:3], [1e-4, 1e-3], 40)


def test_score_test_refuses_a_grid_point_that_was_not_chosen(tmp_path: Path) -> None:
    sel = lec.Selection({("lvh", "random", 0.1): 1e-3}, [])
    record = {"task": "lvh", "init": "random", "fraction": 0.1, "lr": 1e-4, "bundle": str(tmp_path / "b")}
    with pytest.raises(ValueError, match="not the chosen configuration"):
        lec.score_test(sel, record, tmp_path, tmp_path / "labels.csv", tmp_path, "cpu", 10)


def test_video_level_interval_resamples_studies_not_videos() -> None:
    # One positive and one negative study with many identical videos each: by
    # video there would be 40 x 40 pairs; by study the interval is that of 2 studies.
    study_y = {"p1": 1, "p2": 1, "n1": 0, "n2": 0}
    studies = ["p1"] * 20 + ["p2"] * 20 + ["n1"] * 20 + ["n2"] * 20
    probs = np.array([0.9] * 20 + [0.2] * 20 + [0.5] * 20 + [0.1] * 20)
    sums, counts = le.study_pair_sums(study_y, studies, probs)
    assert sums.shape == (2, 2) and list(counts[0]) == [20, 20] and list(counts[1]) == [20, 20]
    y = np.array([1, 1, 0, 0])
    boot = le.replicate_bootstrap(y, {("a", 0.1): [(0, 0, sums)]}, 2000, counts=counts)[("a", 0.1)]
    # Video AUROC: p1 beats both negatives, p2 beats n2 only: (400 + 400 + 0 + 400) / 1600.
    assert np.isclose(sums.sum() / (counts[0].sum() * counts[1].sum()), 0.75)
    # Resampling studies reaches 0 (p2 and n1 each drawn twice) and 1 (p1 twice): resampling the
    # 80 videos one by one would keep every resample near 0.75.
    assert np.isclose(boot.min(), 0.0) and np.isclose(boot.max(), 1.0) and boot.std() > 0.15
    # Without counts every study counts once, as the study-level summary does.
    plain = le.replicate_bootstrap(y, {("a", 0.1): [(0, 0, le.pairwise(y, np.array([0.9, 0.2, 0.5, 0.1])))]}, 50)
    with_ones = le.replicate_bootstrap(
        y, {("a", 0.1): [(0, 0, le.pairwise(y, np.array([0.9, 0.2, 0.5, 0.1])))]}, 50, counts=(np.ones(2), np.ones(2))
    )
    assert np.allclose(plain[("a", 0.1)], with_ones[("a", 0.1)])


class _Recorder:
    """Stand-ins for the archive, pretraining, fine-tuning and evaluation steps, recording what each read."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.finetunes: list[list[str]] = []
        self.evaluations: list[tuple[Path, str]] = []
        self.rng = np.random.default_rng(0)
        self.test = [(f"1.2.{i}", f"1.3.{i}.{k}", int(i < 6)) for i in range(20) for k in range(1 + i % 3)]

    def make_archive(self, ns: argparse.Namespace) -> tuple[Path, Path]:
        archive, cache = self.root / "archive", self.root / "cache"
        archive.mkdir(exist_ok=True)
        cache.mkdir(exist_ok=True)
        (archive / "labels.csv").write_text("study_uid,lvh,severe_as\n" + "1.2.0,1,0\n" * 20)
        (cache / "manifest.json").write_text(json.dumps({"videos": [{}] * len(self.test)}))
        return archive, cache

    def pretrain(self, ns: argparse.Namespace, method: str, pseed: int, cache: Path, labels: Path) -> Path:
        return self.root / "pretrain" / le.pretrain_name(method, pseed)

    def finetune(self, argv: list[str]) -> int:
        self.finetunes.append(list(argv))
        get = dict(zip(argv, argv[1:], strict=False))
        lr, out = float(get["--lr"]), Path(get["--out"])
        out.mkdir(parents=True, exist_ok=True)
        # Validation prefers lr 1e-3 for every cell.
        auroc = 0.9 if lr == 1e-3 else 0.7 + self.rng.uniform(0, 0.1)
        meta = {"metrics": {"best_epoch": 1, "history": [{}, {}],
                            "val": {"loss": 0.5, "study": {"auroc": {"estimate": auroc}},
                                    "video": {"auroc": {"estimate": auroc}}}},
                "provenance": {"train_studies_used": 7, "train_videos": 21}}  # fmt: skip
        (out / "bundle.json").write_text(json.dumps(meta))
        return 0

    def evaluate(self, bundle: Path, cache: Path, labels: Path, out_dir: Path, *, split: str, **_: object) -> dict:
        self.evaluations.append((Path(bundle), split))
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "predictions.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["study_uid", "sop_uid", "view", "target", "probability"])
            for study, sop, t in self.test:
                w.writerow([study, sop, "plax", t, f"{t * 0.3 + self.rng.uniform(0, 0.7):.6f}"])
        a = {"estimate": 0.8, "low": 0.7, "high": 0.9}
        return {"study": {"auroc": a}, "video": {"auroc": a}}


def test_tuning_never_reads_the_test_split_and_only_chosen_bundles_are_scored(tmp_path: Path, monkeypatch) -> None:
    rec = _Recorder(tmp_path)
    monkeypatch.setattr(le, "make_archive", rec.make_archive)
    monkeypatch.setattr(le, "pretrain", rec.pretrain)
    monkeypatch.setattr(lec, "finetune_main", rec.finetune)
    monkeypatch.setattr(lec, "evaluate_bundle", rec.evaluate)
    out = tmp_path / "out"
    assert lec.main(["--quick", "--out", str(out)]) == 0
    proto = lec.quick_protocol()
    # Every fine-tuning, grid point or not, left the test split unread.
    assert rec.finetunes and all("--no-test-score" in argv for argv in rec.finetunes)
    # Only the test split was ever evaluated, and only at the chosen learning rate.
    assert rec.evaluations and {split for _, split in rec.evaluations} == {"test"}
    assert all(b.parent.name == "lr0.001" for b, _ in rec.evaluations)
    tasks, inits, fractions = (proto["finetuning"][k] for k in ("tasks", "inits", "fractions"))
    grid = proto["tuning"]["lr_grid"]
    tuning = sum(len(lec.tuning_draws_at(proto, f)) for f in fractions) * len(tasks) * len(inits) * len(grid)
    # Every replicate is scored once: random init per draw, EchoCLR per draw and pretraining run.
    replicates = sum(len(lec.draws_at(proto, f)) for f in fractions) * len(tasks) * (1 + len(proto["pretraining"]["seeds"]))
    assert len(rec.finetunes) == tuning + replicates - tuning // len(grid)
    assert len(rec.evaluations) == replicates
    # The choice was written, with every validation figure, before the test split was read.
    results = json.loads((out / "results.json").read_text())
    assert results["protocol_sha256"] == lec.protocol_sha256(proto)
    assert len(results["selection"]["grid"]) == len(tasks) * len(inits) * len(fractions) * len(grid)
    assert {c["lr"] for c in results["selection"]["chosen"]} == {1e-3}
    assert all(len(g["val_study_auroc"]) == len(lec.tuning_draws_at(proto, g["fraction"]))
               for g in results["selection"]["grid"])
    assert len(results["verdict"]) == len(tasks) * len(fractions)
    assert all(("target met" in v) or ("target not met" in v) or ("reference" in v) for v in results["verdict"])
    assert set(results["video_summary"]) == set(tasks)
    # A rerun reuses every cell: nothing is fitted or scored again.
    before = (len(rec.finetunes), len(rec.evaluations))
    assert lec.main(["--quick", "--out", str(out)]) == 0
    assert (len(rec.finetunes), len(rec.evaluations)) == before


def test_a_resumed_run_is_held_to_the_commit_it_started_from(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = {"commit": "a" * 40, "dirty": False}
    assert lec.pin_code(out, first, strict=True) is None
    assert json.loads((out / "code.json").read_text()) == first
    assert lec.pin_code(out, first, strict=True) is None  # the same code resumes
    refusal = lec.pin_code(out, {"commit": "b" * 40, "dirty": False}, strict=True)
    assert refusal is not None and "a" * 40 in refusal and "git worktree add" in refusal
    # The confirmatory run never starts from uncommitted changes; the smoke run may.
    fresh = tmp_path / "fresh"
    assert lec.pin_code(fresh, {"commit": "c" * 40, "dirty": True}, strict=True) is not None
    assert not (fresh / "code.json").exists()
    assert lec.pin_code(fresh, {"commit": "c" * 40, "dirty": True}, strict=False) is None


def test_code_version_names_this_checkout() -> None:
    version = lec.code_version()
    assert set(version) == {"commit", "dirty"}
    assert version["commit"] == "unknown" or len(version["commit"]) == 40
