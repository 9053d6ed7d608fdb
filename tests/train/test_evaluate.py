"""Tests for train.evaluate: the report of a bundle on a cache."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from echonode.analyse.preprocess import PreprocessConfig
from echonode.analyse.preprocess_config import SECTOR_MASK_RULE
from tests.factories import make_labelled_archive
from train.evaluate import main
from train.finetune import main as finetune_main
from train.index import build_index
from train.metrics import auroc, pr_curve, roc_curve


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    archive, labels = make_labelled_archive(root)
    build_index(archive, root / "cache", PreprocessConfig(size=16), progress=False)
    bundle = root / "bundle"
    args = ["--data", str(root / "cache"), "--labels", str(labels), "--out", str(bundle), "--task", "lvh",
            "--preset", "tiny", "--size", "16", "--width", "4", "--frames", "4", "--batch", "8", "--epochs", "3",
            "--lr", "0.01", "--bootstrap", "100", "--val-fraction", "0.25", "--test-fraction", "0.25",
            "--no-progress"]  # fmt: skip
    assert finetune_main(args) == 0
    return root / "cache", labels, bundle


def test_report_files_and_consistency(trained, tmp_path: Path) -> None:
    cache, labels, bundle = trained
    out = tmp_path / "report"
    # Eager: the float32 arithmetic fine-tuning scored its test split with, so
    # the figures below match its record exactly (the default, the node's
    # "auto", may pick bf16 and move an AUROC by a tie or two).
    assert main(["--bundle", str(bundle), "--data", str(cache), "--labels", str(labels), "--out", str(out),
                 "--bootstrap", "500", "--runtime", "eager"]) == 0  # fmt: skip
    report = json.loads((out / "metrics.json").read_text())
    assert report["runtime"]["mode"] == "eager"
    for level in ("video", "study"):
        a = report[level]["auroc"]
        assert a["low"] <= a["estimate"] <= a["high"] and a["level"] == 0.95
        assert report[level]["auprc"]["n_resamples"] == 500
        assert {"accuracy", "balanced_accuracy", "f1", "mcc"} <= set(report[level]["threshold_metrics"])
    for name in ("roc_video.png", "roc_study.png", "pr_video.png", "pr_study.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == report["n_videos"] and {r["view"] for r in rows} == {"plax"}
    # The reported video AUROC is the AUROC of the written predictions, and the
    # study level averages the videos of each study.
    y = [int(r["target"]) for r in rows]
    p = [float(r["probability"]) for r in rows]
    assert report["video"]["auroc"]["estimate"] == pytest.approx(auroc(y, p), abs=1e-5)
    assert report["study"]["n"] == len({r["study_uid"] for r in rows})
    # Test split of the bundle's own settings: the same test studies as finetuning saw.
    bundle_meta = json.loads((bundle / "bundle.json").read_text())
    assert report["study"]["n"] == bundle_meta["metrics"]["test"]["study"]["n"]
    assert report["video"]["auroc"]["estimate"] == pytest.approx(
        bundle_meta["metrics"]["test"]["video"]["auroc"]["estimate"], abs=1e-4
    )


def test_runtime_eager_scores_as_finetuning_did(trained, tmp_path: Path) -> None:
    from train.evaluate import evaluate_bundle

    cache, labels, bundle = trained
    report = evaluate_bundle(bundle, cache, labels, tmp_path / "eager", n_resamples=50, runtime="eager")
    assert report["runtime"]["mode"] == "eager"
    # Fine-tuning scored its test split in float32 eager: the same arithmetic gives the same figures.
    meta = json.loads((bundle / "bundle.json").read_text())
    for level in ("video", "study"):
        assert report[level]["auroc"]["estimate"] == pytest.approx(
            meta["metrics"]["test"][level]["auroc"]["estimate"], abs=1e-9
        )
    # Without runtime=, the node's default ("auto"): chosen by measurement on this
    # machine (two loads may measure differently, so the report's own table is checked).
    default = evaluate_bundle(bundle, cache, labels, tmp_path / "default", n_resamples=50)
    assert default["runtime"]["requested"] == "auto"
    assert default["runtime"]["mode"] == default["runtime"]["selection"]["chosen"]


def test_external_split_all_and_errors(trained, tmp_path: Path, capsys) -> None:
    cache, labels, bundle = trained
    external, external_labels = make_labelled_archive(tmp_path, n_patients=6, uid_root="1.2.826.0.3")
    build_index(external, tmp_path / "cache", PreprocessConfig(size=16), progress=False)
    out = tmp_path / "all"
    assert main(["--bundle", str(bundle), "--data", str(tmp_path / "cache"), "--labels", str(external_labels),
                 "--out", str(out), "--split", "all", "--bootstrap", "50"]) == 0  # fmt: skip
    report = json.loads((out / "metrics.json").read_text())
    assert report["study"]["n"] == 6
    assert main(["--bundle", str(tmp_path / "nope"), "--data", str(cache), "--labels", str(labels),
                 "--out", str(out)]) == 2  # fmt: skip


@pytest.mark.parametrize(("split", "how"), [("all", "trained"), ("train", "trained"), ("val", "early-stopped")])
def test_refuses_to_score_what_the_bundle_was_fitted_on(trained, tmp_path: Path, capsys, split: str, how: str) -> None:
    cache, labels, bundle = trained
    capsys.readouterr()
    assert main(["--bundle", str(bundle), "--data", str(cache), "--labels", str(labels), "--out", str(tmp_path / "r"),
                 "--split", split, "--bootstrap", "50"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert f"evaluation studies were used by bundle {bundle}" in err and how in err
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_curves_match_auroc() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    s = rng.integers(0, 6, 50) / 5
    fpr, tpr = roc_curve(y, s)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(y, s))
    recall, precision = pr_curve(y, s)
    assert recall[-1] == 1 and precision[-1] == pytest.approx(y.mean())


def test_a_cache_framed_otherwise_than_the_bundle_is_refused() -> None:
    from types import SimpleNamespace

    from train.evaluate import _check_cache_matches_bundle

    bundle_pre = {"size": 16, "clip_frames": 4, "eval_clips": 2, "max_frames": 100, "min_fps": 25.0,
                  "normalisation": "minmax", "framing": "frame"}
    sector_cache = SimpleNamespace(manifest={"preprocess": {"size": 16}})  # made before framing was recorded
    with pytest.raises(ValueError, match="framing 'sector', the bundle expects 'frame'.*--framing frame"):
        _check_cache_matches_bundle(sector_cache, bundle_pre, "cache")  # type: ignore[arg-type]
    _check_cache_matches_bundle(SimpleNamespace(manifest={"preprocess": {"size": 16, "framing": "frame"}}), bundle_pre, "cache")  # type: ignore[arg-type]
    old_bundle = {k: v for k, v in bundle_pre.items() if k != "framing"}
    _check_cache_matches_bundle(sector_cache, old_bundle, "cache")  # type: ignore[arg-type]



def test_a_cache_resampled_otherwise_than_the_bundle_is_refused() -> None:
    from types import SimpleNamespace

    from train.evaluate import _check_cache_matches_bundle

    native_bundle = {"size": 16, "clip_frames": 4, "eval_clips": 2, "max_frames": 100, "min_fps": 25.0,
                     "normalisation": "minmax"}
    bundle_at15 = {**native_bundle, "target_fps": 15.0}
    native_cache = SimpleNamespace(manifest={"preprocess": {"size": 16, "target_fps": None}})
    cache_at15 = SimpleNamespace(manifest={"preprocess": {"size": 16, "target_fps": 15.0}})
    with pytest.raises(ValueError, match="cached at native frames, the bundle expects 15 fps.*--target-fps 15"):
        _check_cache_matches_bundle(native_cache, bundle_at15, "cache")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cached at 15 fps, the bundle expects native frames.*without --target-fps"):
        _check_cache_matches_bundle(cache_at15, native_bundle, "cache")  # type: ignore[arg-type]
    _check_cache_matches_bundle(cache_at15, bundle_at15, "cache")  # type: ignore[arg-type]
    _check_cache_matches_bundle(SimpleNamespace(manifest={"preprocess": {"size": 16}}), native_bundle, "cache")  # type: ignore[arg-type]


def test_a_cache_masked_by_an_older_sector_rule_is_scored_with_a_note(capsys) -> None:
    from types import SimpleNamespace

    from train.evaluate import _note_older_mask

    assert _note_older_mask(SimpleNamespace(sector_mask_rule=1), "old")  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert f"old: frames masked with sector-mask rule 1; the node masks with rule {SECTOR_MASK_RULE}" in err and "--out" in err
    assert not _note_older_mask(SimpleNamespace(sector_mask_rule=SECTOR_MASK_RULE), "new")  # type: ignore[arg-type]
    assert capsys.readouterr().err == ""
