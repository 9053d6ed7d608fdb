"""bench/as_recipe.py and bench/cross_rendering.py: candidates change only what they name; frame rates reach index."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pytest

from bench import as_recipe, cross_rendering


def test_candidates_change_only_what_they_name() -> None:
    base = as_recipe.CANDIDATES["native"]
    assert base.target_fps is None and (base.size, base.epochs, base.patience) == (48, 12, 4)
    fps15 = as_recipe.CANDIDATES["fps15"]
    assert replace(fps15, tasks=base.tasks) == replace(base, target_fps=15.0)
    assert as_recipe.CANDIDATES["fps15-long"] == replace(fps15, epochs=24, patience=8, tasks=("severe_as",))
    assert as_recipe.CANDIDATES["fps15-96"] == replace(fps15, size=96, tasks=("severe_as",))
    assert as_recipe.CANDIDATES["fps15-onecycle"] == replace(as_recipe.CANDIDATES["fps15-long"], patience=24, lr=3e-3,
                                                             lr_schedule="onecycle")
    assert as_recipe.CANDIDATES["fps15-lr3e-4"] == replace(as_recipe.CANDIDATES["fps15-long"], lr=3e-4)
    assert as_recipe.VALIDATION_SEED not in (as_recipe.TRAIN_SEED, 202)  # never the transfer bench's test archive


def test_a_candidates_frame_rate_reaches_index_and_its_cache_name(tmp_path: Path, monkeypatch) -> None:
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(as_recipe, "_train", lambda log, *args: calls.append(args))
    archive = tmp_path / "validation"
    native = as_recipe._cache(archive, tmp_path, 48, None, tmp_path / "log")
    at15 = as_recipe._cache(archive, tmp_path, 96, 15.0, tmp_path / "log")
    assert native.name == "cache-validation-48px-native" and at15.name == "cache-validation-96px-15fps"
    assert "--target-fps" not in calls[0]
    assert calls[1][calls[1].index("--target-fps") + 1] == "15" and calls[1][calls[1].index("--size") + 1] == "96"


def test_study_auroc_is_over_studies(tmp_path: Path) -> None:
    predictions = tmp_path / "predictions.csv"
    with predictions.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study_uid", "probability", "target"])
        # Two videos of a positive study, one of each negative: a perfect ranking of studies.
        w.writerows([["s1", "0.9", "1"], ["s1", "0.7", "1"], ["s2", "0.2", "0"], ["s3", "0.75", "0"]])
    got = as_recipe._study_auroc(predictions)
    assert got["auroc"] == pytest.approx(1.0) and (got["positives"], got["negatives"]) == (1, 2)


def test_cross_rendering_resamples_both_archives_when_asked(tmp_path: Path, monkeypatch) -> None:
    steps: list[tuple[str, ...]] = []
    monkeypatch.setattr(cross_rendering, "_run_side_by_side", lambda s, log, threads=1: steps.extend(s.values()))
    monkeypatch.setattr(cross_rendering, "study_auroc", lambda path: (0.5, 0.4, 0.6, 1, 1))
    out = tmp_path / "x"
    assert cross_rendering.main(["--out", str(out), "--target-fps", "15", "--epochs", "24", "--patience", "8",
                                 "--lr", "3e-4"]) == 0
    index = [s for s in steps if s[0] == "index"]
    assert len(index) == 2 and all(s[s.index("--target-fps") + 1] == "15" for s in index)
    assert {Path(s[s.index("--out") + 1]).name for s in index} == {"cache-polar-fps15", "cache-raster-fps15"}
    finetune = [s for s in steps if s[0] == "finetune"]
    assert len(finetune) == 2
    for s in finetune:
        assert Path(s[s.index("--data") + 1]).name == "cache-polar-fps15"
        assert Path(s[s.index("--out") + 1]).name.endswith("-fps15-e24p8-lr3e-4-bundle")
        assert (s[s.index("--epochs") + 1], s[s.index("--patience") + 1], s[s.index("--lr") + 1]) == ("24", "8", "3e-4")
    assert all(Path(s[s.index("--data") + 1]).name.endswith("-fps15") for s in steps if s[0] == "evaluate")
    assert all(s[s.index("--target") + 1] == "label" for s in finetune)


def test_cross_rendering_fine_tunes_on_the_measurement_into_bundles_of_their_own(tmp_path: Path, monkeypatch) -> None:
    steps: list[tuple[str, ...]] = []
    monkeypatch.setattr(cross_rendering, "_run_side_by_side", lambda s, log, threads=1: steps.extend(s.values()))
    monkeypatch.setattr(cross_rendering, "study_auroc", lambda path: (0.5, 0.4, 0.6, 1, 1))
    assert cross_rendering.main(["--out", str(tmp_path / "x"), "--tasks", "lvh", "--target", "measurement"]) == 0
    finetune = [s for s in steps if s[0] == "finetune"]
    assert len(finetune) == 1 and finetune[0][finetune[0].index("--target") + 1] == "measurement"
    assert Path(finetune[0][finetune[0].index("--out") + 1]).name == "lvh-measurement-bundle"
    evaluated = [Path(s[s.index("--bundle") + 1]).name for s in steps if s[0] == "evaluate"]
    assert evaluated and set(evaluated) == {"lvh-measurement-bundle"}


def test_a_cached_cell_is_reused_only_for_the_settings_that_made_it(tmp_path: Path, monkeypatch) -> None:
    import json

    class Trained(Exception):
        pass

    def train(log, *args):
        raise Trained(args[0])

    monkeypatch.setattr(as_recipe, "_train", train)
    cand = as_recipe.CANDIDATES["fps15-long"]
    cell = tmp_path / "cells" / "fps15-long" / "severe_as" / "seed0"
    cell.mkdir(parents=True)
    settings = {"size": 48, "target_fps": 15.0, "epochs": 24, "patience": 8, "lr": 1e-3, "lr_schedule": "constant"}
    (cell / "result.json").write_text(json.dumps({"candidate": "fps15-long", "settings": settings, "seed": 0}))
    args = ("fps15-long", cand, "severe_as", 0, tmp_path / "train", tmp_path / "validation", tmp_path, tmp_path / "log")
    assert as_recipe.run_cell(*args)["settings"] == settings
    # The same name with another learning rate (or a record without settings) trains again.
    for record in ({"candidate": "fps15-long", "settings": {**settings, "lr": 3e-4}}, {"candidate": "fps15-long"}):
        (cell / "result.json").write_text(json.dumps(record))
        with pytest.raises(Trained):
            as_recipe.run_cell(*args)


def test_cross_rendering_trains_and_scores_only_the_tasks_asked_for(tmp_path: Path, monkeypatch, capsys) -> None:
    steps: list[tuple[str, ...]] = []
    monkeypatch.setattr(cross_rendering, "_run_side_by_side", lambda s, log, threads=1: steps.extend(s.values()))
    monkeypatch.setattr(cross_rendering, "study_auroc", lambda path: (0.5, 0.4, 0.6, 1, 1))
    assert cross_rendering.main(["--out", str(tmp_path / "x"), "--tasks", "severe_as", "--look", "varied-valves",
                                 "--test-renderer", "scatter", "--test-seed", "7"]) == 0
    synth = [s for s in steps if s[0] == "synth"]
    assert {(Path(s[s.index("--out") + 1]).name, s[s.index("--look") + 1]) for s in synth} == {
        ("polar-varied-valves", "varied-valves"), ("scatter-s7", "standard")}
    finetune = [s for s in steps if s[0] == "finetune"]
    assert [s[s.index("--task") + 1] for s in finetune] == ["severe_as"]
    assert Path(finetune[0][finetune[0].index("--out") + 1]).name == "severe_as-varied-valves-bundle"
    assert {s[s.index("--bundle") + 1] for s in steps if s[0] == "evaluate"} == {
        str(tmp_path / "x" / "severe_as-varied-valves-bundle")}
    assert "| lvh |" not in capsys.readouterr().out
    assert cross_rendering.main(["--out", str(tmp_path / "y"), "--tasks", "lvh,mitral"]) == 2


def test_cross_rendering_gives_each_fine_tuning_the_threads_asked_for(tmp_path: Path, monkeypatch) -> None:
    """--threads reaches the fine-tunings alone (drawing and indexing keep one each), and a bundle
    trained on another thread count is another bundle: its arithmetic ran in another order."""
    threads: dict[str, int] = {}

    def record(steps: dict[str, tuple[str, ...]], log: Path, threads_each: int = 1) -> None:
        for args in steps.values():
            threads[args[0]] = threads_each
            if args[0] == "finetune":
                threads["bundle:" + Path(args[args.index("--out") + 1]).name] = threads_each

    monkeypatch.setattr(cross_rendering, "_run_side_by_side", record)
    assert cross_rendering.main(["--out", str(tmp_path / "x"), "--tasks", "severe_as", "--epochs", "48",
                                 "--patience", "48", "--threads", "2", "--train-only"]) == 0
    assert threads == {"synth": 1, "index": 1, "finetune": 2, "bundle:severe_as-e48p48-t2-bundle": 2}
    assert cross_rendering._train_env(2)["OMP_NUM_THREADS"] == "2"
    assert cross_rendering._train_env()["OMP_NUM_THREADS"] == "1"
    assert cross_rendering.main(["--out", str(tmp_path / "y"), "--threads", "0"]) == 2


def test_cross_rendering_fine_tunes_from_an_echoclr_run_of_the_training_archive_when_asked(
        tmp_path: Path, monkeypatch) -> None:
    """--pretrain-epochs pretrains on the training archive's cache, before and apart from the
    fine-tunings, which start from that run; a run whose encoder is written is not pretrained again."""
    steps: list[tuple[str, ...]] = []
    threads: dict[str, int] = {}

    def record(s: dict[str, tuple[str, ...]], log: Path, threads_each: int = 1) -> None:
        steps.extend(s.values())
        threads.update({args[0]: threads_each for args in s.values()})

    monkeypatch.setattr(cross_rendering, "_run_side_by_side", record)
    out = tmp_path / "x"
    args = ["--out", str(out), "--tasks", "severe_as", "--size", "112", "--target-fps", "15",
            "--pretrain-epochs", "20", "--threads", "2", "--train-only"]
    assert cross_rendering.main(args) == 0
    commands = [s[0] for s in steps]
    assert commands.index("pretrain") < commands.index("finetune")
    [pretrain] = [s for s in steps if s[0] == "pretrain"]
    run = out / "echoclr-polar-fps15-s112-e20-t2"
    assert threads["pretrain"] == 2 and threads["finetune"] == 2
    assert pretrain[pretrain.index("--data") + 1] == str(out / "cache-polar-fps15")
    assert pretrain[pretrain.index("--out") + 1] == str(run)
    assert (pretrain[pretrain.index("--epochs") + 1], pretrain[pretrain.index("--size") + 1]) == ("20", "112")
    assert "--labels" not in pretrain
    [finetune] = [s for s in steps if s[0] == "finetune"]
    assert finetune[finetune.index("--init") + 1] == str(run)
    assert Path(finetune[finetune.index("--out") + 1]).name == "severe_as-fps15-t2-echoclr20-bundle"
    steps.clear()
    run.mkdir()
    (run / "encoder.pt").write_bytes(b"")
    assert cross_rendering.main(args) == 0
    assert "pretrain" not in [s[0] for s in steps]
    assert cross_rendering.main(["--out", str(out), "--pretrain-epochs", "-1"]) == 2
