"""Tests for train.finetune: task labels, fractions, early stopping, bundles."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from echonode.analyse.preprocess import PreprocessConfig
from echonode.analyse.preprocess_config import SECTOR_MASK_RULE
from echonode.bundles.weights import load_bundle
from tests.factories import finetune_args, make_labelled_archive
from train.cache import ClipCache, load_study_labels, split_cache
from train.finetune import (
    EarlyStopping,
    check_evaluable,
    constant_answer_check,
    constant_answer_loss,
    main,
    make_scheduler,
    prepare_task,
    prior_logit,
    warn_if_constant_answer,
)
from train.index import build_index
from train.splits import SplitRecord


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("finetune")
    archive, labels = make_labelled_archive(root)
    build_index(archive, root / "cache", PreprocessConfig(size=16), progress=False)
    return root / "cache", labels


def _split(cache: Path, labels: Path):
    c = ClipCache(cache)
    rows = load_study_labels(labels)
    return c, rows, split_cache(c, val_fraction=0.25, test_fraction=0.25)


def test_lvh_uses_lvh_labels_and_severe_as_its_own(labelled) -> None:
    cache, labels = labelled
    c, rows, splits = _split(cache, labels)
    by_study = {r["study_uid"]: r for r in rows}
    lvh = prepare_task(c, rows, "lvh", splits)
    sas = prepare_task(c, rows, "severe_as", splits)
    for data, column in ((lvh, "lvh"), (sas, "severe_as")):
        for name in ("train", "val", "test"):
            assert data.videos[name], name
            for video, target in zip(data.videos[name], data.targets[name], strict=True):
                assert target == float(by_study[video["study_uid"]][column])
                assert video["view"] == "plax"
    # The two columns disagree on some training videos, so mixing them up
    # (the public code's defect) would change the targets.
    assert lvh.targets["train"] != sas.targets["train"]
    y = np.asarray(lvh.targets["train"])
    assert lvh.pos_weight == pytest.approx((y == 0).sum() / (y == 1).sum())
    ys = np.asarray(sas.targets["train"])
    assert sas.pos_weight == pytest.approx((ys == 0).sum() / (ys == 1).sum())


def test_view_task_and_fraction_by_study(labelled) -> None:
    cache, labels = labelled
    c, rows, splits = _split(cache, labels)
    view = prepare_task(c, rows, "view", splits)
    assert view.labels == ["a4c", "plax"] and view.pos_weight is None
    assert all(view.labels[t] == v["view"] for v, t in zip(view.videos["train"], view.targets["train"], strict=True))
    full = prepare_task(c, rows, "lvh", splits, fraction=1.0)
    half = prepare_task(c, rows, "lvh", splits, fraction=0.5)
    assert len(half.train_studies) == round(0.5 * len(full.train_studies))
    assert set(half.train_studies) <= set(full.train_studies)
    # Whole studies: every PLAX video of a chosen study comes along.
    assert len(half.videos["train"]) == 2 * len(half.train_studies)
    assert {int(t) for t in half.targets["train"]} == {0, 1}
    with pytest.raises(ValueError):
        prepare_task(c, [{"study_uid": r["study_uid"], "lvh": r["lvh"]} for r in rows], "severe_as", splits)


def test_early_stopping() -> None:
    stopper = EarlyStopping(patience=2)
    assert stopper.step(1.0, 0) == (True, False)
    assert stopper.step(0.8, 1) == (True, False)
    assert stopper.step(0.9, 2) == (False, False)
    assert stopper.step(0.8, 3) == (False, True)
    assert stopper.best_epoch == 1 and stopper.best == 0.8


def test_finetune_writes_a_loadable_bundle_that_learns(labelled, tmp_path: Path) -> None:
    cache, labels = labelled
    out = tmp_path / "lvh"
    assert main(finetune_args(cache, labels, out, "--task", "lvh", "--epochs", "6", "--patience", "6", "--lr", "0.01")) == 0
    bundle = load_bundle(out)
    meta = bundle.meta
    assert meta.task == "lvh" and meta.frame_size == 16 and meta.clip_frames == 4
    prov = meta.provenance
    assert prov["task_column"] == "lvh" and len(prov["data_manifest_sha256"]) == 64
    assert prov["config"]["task"] == "lvh" and prov["init"]["init"] == "random"
    assert "test" in meta.metrics and "val" in meta.metrics
    assert meta.metrics["test"]["study"]["auroc"]["level"] == 0.95
    # A bright block is easy: the model must beat chance clearly on test videos.
    assert meta.metrics["test"]["video"]["auroc"]["estimate"] > 0.8
    # A reader of the bundle alone sees that it learnt (the stderr warning's figures).
    check = meta.metrics["constant_answer"]
    assert check["learnt"] is True and check["lowest_train_loss"] < 0.97 * check["constant_answer_loss"]
    assert check["learnt_on_validation"] is True
    assert check["lowest_val_loss"] < 0.97 * check["constant_answer_val_loss"]
    # Same data, new run: a new DeviceUID; an existing folder is not replaced.
    again = tmp_path / "again"
    assert main(finetune_args(cache, labels, again, "--task", "lvh", "--epochs", "1")) == 0
    assert load_bundle(again).meta.device_uid != meta.device_uid
    assert main(finetune_args(cache, labels, again, "--task", "lvh", "--epochs", "1")) == 2


def test_finetune_from_pretraining_run_and_view_task(labelled, tmp_path: Path) -> None:
    from train.pretrain import main as pretrain_main

    cache, labels = labelled
    run = tmp_path / "run"
    assert pretrain_main(["--data", str(cache), "--out", str(run), "--preset", "tiny", "--size", "16", "--width", "4",
                          "--batch", "4", "--epochs", "1", "--labels", str(labels), "--val-fraction", "0.25",
                          "--test-fraction", "0.25", "--no-progress"]) == 0  # fmt: skip
    out = tmp_path / "sas"
    assert main(finetune_args(cache, labels, out, "--task", "severe_as", "--epochs", "1", "--init", str(run))) == 0
    prov = load_bundle(out).meta.provenance
    assert prov["init"]["pretrain_run"] == str(run)
    # Same split settings: pretraining saw no evaluation study, and the bundle says what it was made from.
    assert prov["init"]["pretrain_split"].startswith("checked")
    record = SplitRecord.read(out)
    pretrained = SplitRecord.read(run)
    assert record is not None and pretrained is not None
    assert set(record.used["pretrained"]) == set(pretrained.used["pretrained"]) <= set(record.train)
    assert set(record.used["trained"]) <= set(record.train) and set(record.used["early-stopped"]) <= set(record.val)
    assert not set(record.used["pretrained"]) & (set(record.val) | set(record.test))
    encoder = torch.load(run / "encoder.pt", weights_only=True)
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert weights["stem.0.weight"].shape == encoder["stem.0.weight"].shape

    view = tmp_path / "view"
    assert main(finetune_args(cache, labels, view, "--task", "view", "--epochs", "1")) == 0
    meta = load_bundle(view).meta
    assert meta.labels == ["a4c", "plax"] and meta.architecture["num_outputs"] == 2
    assert json.loads(json.dumps(meta.metrics))["test"]["video"]["n"] > 0


def test_epoch_samples_repeat_videos_with_fresh_clips(labelled, tmp_path: Path) -> None:
    from train.datasets import ClipDataset

    cache, labels = labelled
    c, rows, splits = _split(cache, labels)
    task = prepare_task(c, rows, "lvh", splits, fraction=0.25)
    videos, targets = task.videos["train"], task.targets["train"]
    once = ClipDataset(c, videos, targets, clip_frames=4, size=16, seed=3)
    thrice = ClipDataset(c, videos, targets, clip_frames=4, size=16, seed=3, repeats=3)
    n = len(videos)
    assert len(thrice) == 3 * n
    # The first visit is the one-pass epoch; later visits are the same video
    # and target with a different clip or augmentation.
    for i in range(n):
        assert torch.equal(thrice[i][0], once[i][0])
        for visit in (1, 2):
            x, y = thrice[visit * n + i]
            assert float(y) == float(targets[i])
            assert not torch.equal(x, once[i][0])
    # Evaluation never repeats.
    assert len(ClipDataset(c, videos, targets, clip_frames=4, size=16, train=False, repeats=3)) == n
    with pytest.raises(ValueError):
        ClipDataset(c, videos, targets, repeats=0)
    out = tmp_path / "small"
    assert main(finetune_args(cache, labels, out, "--task", "lvh", "--fraction", "0.25", "--epochs", "1",
                      "--epoch-samples", str(4 * n))) == 0  # fmt: skip
    prov = load_bundle(out).meta.provenance
    assert prov["train_visits_per_epoch"] == 4 and prov["config"]["epoch_samples"] == 4 * n
    for bad in ("0", "-5"):
        with pytest.raises(SystemExit):  # argparse: a usage error, nothing written
            main(finetune_args(cache, labels, tmp_path / "bad", "--task", "lvh", "--epoch-samples", bad))
    assert not (tmp_path / "bad").exists()


def test_appearance_changes_the_training_clips_and_is_recorded(labelled, tmp_path: Path, monkeypatch) -> None:
    import train.finetune as finetune_module

    cache, labels = labelled
    seen: list[object] = []
    real = finetune_module.ClipDataset

    def recording(*args, **kwargs):
        seen.append(kwargs.get("augment"))
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "ClipDataset", recording)
    for flag, out in (((), tmp_path / "plain"), (("--appearance",), tmp_path / "look")):
        seen.clear()
        assert main(finetune_args(cache, labels, out, "--task", "lvh", "--epochs", "1", *flag)) == 0
        train_augment = seen[0]  # the training set comes first; evaluation sets have none
        assert (train_augment.appearance is not None) == bool(flag)  # type: ignore[attr-defined]
        assert load_bundle(out).meta.provenance["config"]["appearance"] is bool(flag)


def test_class_weight_none_weighs_every_video_alike(labelled, tmp_path: Path, monkeypatch) -> None:
    import train.finetune as finetune_module

    cache, labels = labelled
    weights: list[float | None] = []
    real = finetune_module._criterion

    def recording(task, pos_weight, device):
        weights.append(pos_weight)
        return real(task, pos_weight, device)

    monkeypatch.setattr(finetune_module, "_criterion", recording)
    assert main(finetune_args(cache, labels, tmp_path / "balanced", "--task", "lvh", "--epochs", "1")) == 0
    assert main(finetune_args(cache, labels, tmp_path / "plain", "--task", "lvh", "--epochs", "1",
                              "--class-weight", "none")) == 0  # fmt: skip
    balanced = load_bundle(tmp_path / "balanced").meta.provenance
    plain = load_bundle(tmp_path / "plain").meta.provenance
    assert balanced["pos_weight"] != 1.0 and balanced["config"]["class_weight"] == "balanced"
    assert plain["pos_weight"] == 1.0 and plain["config"]["class_weight"] == "none"
    assert weights[0] == balanced["pos_weight"] and weights[-1] == 1.0
    with pytest.raises(SystemExit):
        main(finetune_args(cache, labels, tmp_path / "bad", "--task", "lvh", "--class-weight", "sometimes"))


def test_head_init_probe_fits_the_head_before_fine_tuning(labelled, tmp_path: Path, capsys) -> None:
    from torch.utils.data import DataLoader

    from echonode.bundles.nets import build_model
    from train.datasets import ClipDataset
    from train.finetune import fit_linear_head
    from train.metrics import auroc

    cache, labels = labelled
    c, rows, splits = _split(cache, labels)
    task = prepare_task(c, rows, "lvh", splits)
    torch.manual_seed(0)
    model = build_model("r3d_18", 1, width=4)
    data = ClipDataset(c, task.videos["train"], task.targets["train"], clip_frames=4, size=16, train=False, eval_clips=2)
    loader = DataLoader(data, batch_size=4)
    fit = fit_linear_head(model, loader, device=torch.device("cpu"), pos_weight=task.pos_weight)
    assert fit["clips"] == 2 * len(task.videos["train"])
    # BatchNorm statistics were re-estimated on the labelled clips (a new network's are 0 and 1).
    bn = model.stem[1]
    assert float(bn.running_mean.abs().sum()) > 0 and bn.momentum == 0.1
    # The folded standardisation gives the head the fitted logistic regression:
    # the bright block is separable even in random features.
    from train.finetune import predict_clips

    probs, _ = predict_clips(model, loader, device=torch.device("cpu"), binary=True)
    assert auroc(np.asarray(task.targets["train"]), probs.mean(1)) > 0.9
    # Through the command line: recorded in the bundle's metrics.
    out = tmp_path / "lpft"
    assert main(finetune_args(cache, labels, out, "--task", "lvh", "--epochs", "1", "--head-init", "probe")) == 0
    meta = load_bundle(out).meta
    assert meta.metrics["head_fit"]["clips"] > 0 and meta.provenance["config"]["head_init"] == "probe"
    # A head that already fits the task is not re-fitted.
    again = tmp_path / "again"
    assert main(finetune_args(cache, labels, again, "--task", "lvh", "--epochs", "1", "--init", str(out / "weights.pt"),
                      "--head-init", "probe")) == 2  # fmt: skip
    assert "fits a new head" in capsys.readouterr().err


def test_fit_logistic_acts_on_raw_features_binary_and_multiclass() -> None:
    from train.finetune import fit_logistic

    gen = torch.Generator().manual_seed(0)
    # Encoder-like features (comparable scales) with an offset, one of them
    # nearly constant in the few training samples but not elsewhere: the
    # weights apply to x as given, and the constant one is not blown up.
    x = torch.randn(40, 5, generator=gen) + 3.0
    x[:, 2] = 3.0 + 1e-4 * torch.randn(40, generator=gen)
    y = (x[:, 1] > 3.0).long()
    held = torch.randn(200, 5, generator=gen) + 3.0
    held_y = (held[:, 1] > 3.0).long()
    w, b, loss = fit_logistic(x, y, pos_weight=1.0)
    assert w.shape == (5, 1) and b.shape == (1,) and loss < 0.5
    assert float(((held.double() @ w + b)[:, 0] > 0).long().eq(held_y).float().mean()) > 0.9
    classes = torch.bucketize(x[:, 1].contiguous(), torch.tensor([2.5, 3.5]))
    w3, b3, _ = fit_logistic(x, classes, n_outputs=3)
    held_c = torch.bucketize(held[:, 1].contiguous(), torch.tensor([2.5, 3.5]))
    # Ordered classes on one feature under a strong penalty: well above chance (about 0.38).
    assert float((held.double() @ w3 + b3).argmax(1).eq(held_c).float().mean()) > 0.6


def test_finetune_refuses_a_pretraining_run_that_saw_its_evaluation_studies(labelled, tmp_path: Path, capsys) -> None:
    from train.pretrain import main as pretrain_main

    cache, labels = labelled
    run = tmp_path / "run"
    # Another split seed: another split, so some of fine-tuning's val/test studies were pretrained on.
    assert pretrain_main(["--data", str(cache), "--out", str(run), "--preset", "tiny", "--size", "16", "--width", "4",
                          "--batch", "4", "--epochs", "1", "--val-fraction", "0.25", "--test-fraction", "0.25",
                          "--split-seed", "7", "--no-progress"]) == 0  # fmt: skip
    seen = set(SplitRecord.read(run).used["pretrained"])  # type: ignore[union-attr]
    splits = split_cache(ClipCache(cache), val_fraction=0.25, test_fraction=0.25)
    overlap = seen & (set(splits["val"]) | set(splits["test"]))
    assert overlap, "the two seeds should disagree on some patients"
    capsys.readouterr()
    out = tmp_path / "leaky"
    assert main(finetune_args(cache, labels, out, "--task", "lvh", "--epochs", "1", "--init", str(run))) == 2
    err = capsys.readouterr().err
    assert f"{len(overlap)} of the" in err and f"pretraining run {run}" in err and "pretrained" in err
    assert not out.exists()


def _task_with(targets: dict[str, list[float]]):
    from train.finetune import TaskData

    videos = {name: [{"study_uid": f"{name}{i}"} for i in range(len(t))] for name, t in targets.items()}
    return TaskData("lvh", ["absent", "present"], videos, targets, [v["study_uid"] for v in videos["train"]], 1.0)


def test_check_evaluable_refuses_a_split_without_a_class() -> None:
    fine = _task_with({"train": [0, 1], "val": [0, 1, 0], "test": [1, 0]})
    check_evaluable(fine)
    with pytest.raises(ValueError, match=r"the validation split has 3 lvh studies with videos, 0 positive and 3 negative"):
        check_evaluable(_task_with({"train": [0, 1], "val": [0, 0, 0], "test": [1, 0]}))
    with pytest.raises(ValueError, match=r"the test split has 2 lvh studies with videos, 2 positive and 0 negative"):
        check_evaluable(_task_with({"train": [0, 1], "val": [0, 1], "test": [1, 1]}))
    with pytest.raises(ValueError, match=r"the test split has 0 lvh studies"):
        check_evaluable(_task_with({"train": [0, 1], "val": [0, 1], "test": []}))
    # A split the settings leave out on purpose is not checked.
    check_evaluable(_task_with({"train": [0, 1], "val": [0, 1], "test": []}), required=["val"])


def test_finetune_refuses_a_validation_split_without_positives(labelled, tmp_path: Path, capsys) -> None:
    cache, source = labelled
    splits = split_cache(ClipCache(cache), val_fraction=0.25, test_fraction=0.25)
    # Mark every validation study negative: the split can no longer be scored.
    labels = tmp_path / "labels.csv"
    rows = load_study_labels(source)
    for row in rows:
        if row["study_uid"] in splits["val"]:
            row["lvh"] = "0"
    assert splits["val"]
    with open(labels, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "bundle"
    assert main(finetune_args(cache, labels, out, "--task", "lvh", "--epochs", "1")) == 2
    assert "the validation split has" in capsys.readouterr().err and not out.exists()


def test_prior_logit_and_new_head_bias() -> None:
    assert prior_logit([0, 0, 0, 1], pos_weight=3.0) == pytest.approx(0.0)
    assert prior_logit([0, 0, 0, 1], pos_weight=None) == pytest.approx(np.log(1 / 3))
    with pytest.raises(ValueError):
        prior_logit([1, 1], pos_weight=None)


def test_early_stopping_that_never_improves_says_it_kept_the_initial_weights(labelled, tmp_path: Path, capsys) -> None:
    from train import finetune as ft

    cache, labels = labelled
    argv = finetune_args(cache, labels, tmp_path / "x", "--task", "lvh", "--epochs", "2")
    config = ft._config_from(_parser().parse_args(argv))
    run = ft._load_task(config)
    ft._initial_model(run)
    initial = {k: v.clone() for k, v in run.model.state_dict().items()}
    loaders = ft._Loaders(run)
    real = ft.predict_clips
    try:
        ft.predict_clips = lambda *a, **k: (np.zeros((0, 0)), float("nan"))  # a diverged run: no finite loss
        history, best = ft._fit(run, loaders)
    finally:
        ft.predict_clips = real
    assert best == -1 and len(history) == 2
    assert "INITIAL (untrained) weights" in capsys.readouterr().err
    assert all(torch.equal(v, initial[k]) for k, v in run.model.state_dict().items())


def _parser():
    import argparse

    from train.finetune import add_finetune_arguments

    parser = argparse.ArgumentParser()
    add_finetune_arguments(parser)
    return parser


def test_no_test_score_leaves_the_test_split_unscored(labelled, tmp_path: Path) -> None:
    """A hyperparameter search fits and scores on validation; the bundle carries no test figure."""
    cache, labels = labelled
    out = tmp_path / "search"
    assert main(finetune_args(cache, labels, out, "--task", "lvh", "--epochs", "1", "--no-test-score")) == 0
    meta = load_bundle(out).meta
    assert "val" in meta.metrics and "test" not in meta.metrics
    assert meta.provenance["config"]["score_test"] is False


def test_prepare_task_weighs_classes_as_asked(labelled) -> None:
    c, rows, splits = _split(*labelled)
    balanced = prepare_task(c, rows, "lvh", splits)
    plain = prepare_task(c, rows, "lvh", splits, class_weight="none")
    y = balanced.targets["train"]
    assert balanced.pos_weight == pytest.approx((len(y) - sum(y)) / sum(y))
    assert plain.pos_weight == 1.0
    assert prepare_task(c, rows, "view", splits, class_weight="none").pos_weight is None
    with pytest.raises(ValueError, match="class_weight"):
        prepare_task(c, rows, "lvh", splits, class_weight="inverse")


def test_onecycle_warms_up_to_the_peak_then_decays() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=0.01)
    assert make_scheduler(optimizer, "constant", 0.01, 100) is None
    scheduler = make_scheduler(optimizer, "onecycle", 0.01, 100)
    assert scheduler is not None
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.01 / 25)
    assert max(lrs) == pytest.approx(0.01) and 25 <= int(np.argmax(lrs)) <= 35
    assert lrs[-1] < 0.01 / 100
    with pytest.raises(ValueError, match="schedule"):
        make_scheduler(optimizer, "cyclic", 0.01, 100)


def test_lr_schedule_onecycle_runs_every_planned_step(labelled, tmp_path: Path, monkeypatch) -> None:
    import train.finetune as finetune_module

    cache, labels = labelled
    made: list[torch.optim.lr_scheduler.LRScheduler | None] = []
    real = finetune_module.make_scheduler

    def recording(optimizer, schedule, lr, total_steps):
        made.append(real(optimizer, schedule, lr, total_steps))
        return made[-1]

    monkeypatch.setattr(finetune_module, "make_scheduler", recording)
    # No early stop (patience above the epochs): the schedule must fit the steps the run takes exactly.
    assert main(finetune_args(cache, labels, tmp_path / "cycle", "--task", "lvh", "--epochs", "3", "--patience", "9",
                              "--lr", "3e-3", "--lr-schedule", "onecycle")) == 0  # fmt: skip
    scheduler = made[0]
    assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)
    assert scheduler.last_epoch == scheduler.total_steps  # every planned step taken, none past the end
    assert load_bundle(tmp_path / "cycle").meta.provenance["config"]["lr_schedule"] == "onecycle"
    assert main(finetune_args(cache, labels, tmp_path / "flat", "--task", "lvh", "--epochs", "1")) == 0
    assert made[-1] is None


def test_a_patience_shorter_than_the_schedule_is_pointed_out(labelled, tmp_path: Path, capsys) -> None:
    cache, labels = labelled
    assert main(finetune_args(cache, labels, tmp_path / "short", "--task", "lvh", "--epochs", "4", "--patience", "2",
                              "--lr-schedule", "onecycle")) == 0  # fmt: skip
    assert "can stop this run before its one-cycle decay" in capsys.readouterr().err
    assert main(finetune_args(cache, labels, tmp_path / "whole", "--task", "lvh", "--epochs", "4", "--patience", "4",
                              "--lr-schedule", "onecycle")) == 0  # fmt: skip
    assert main(finetune_args(cache, labels, tmp_path / "flat", "--task", "lvh", "--epochs", "4", "--patience", "1")) == 0
    assert "one-cycle" not in capsys.readouterr().err


def test_a_bundle_asks_the_node_for_the_frame_rate_its_cache_was_resampled_to(labelled, tmp_path: Path) -> None:
    from echonode.analyse.preprocess_config import PreprocessConfig as NodeConfig
    from train.evaluate import main as evaluate_main

    cache, labels = labelled
    at15 = tmp_path / "cache15"
    build_index(labels.parent, at15, PreprocessConfig(size=16, target_fps=15.0), progress=False)
    out = tmp_path / "lvh15"
    assert main(finetune_args(at15, labels, out, "--task", "lvh", "--epochs", "1")) == 0
    assert NodeConfig.from_meta(load_bundle(out).meta.preprocessing).target_fps == 15.0
    # Scored on frames at another rate, it would see other motion: refused.
    assert evaluate_main(["--bundle", str(out), "--data", str(cache), "--labels", str(labels),
                          "--out", str(tmp_path / "eval"), "--bootstrap", "10"]) == 2


@pytest.mark.parametrize("pos_weight", [None, "balanced"])
def test_constant_answer_loss_is_the_weighted_loss_at_the_prior(pos_weight) -> None:
    y = [1] * 8 + [0] * 92
    w = 92 / 8 if pos_weight == "balanced" else None
    z = torch.full((100,), prior_logit(y, w))
    criterion = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([w or 1.0]))
    expected = float(criterion(z, torch.tensor(y, dtype=torch.float32)))
    assert constant_answer_loss(y, w) == pytest.approx(expected, rel=1e-6)
    if w is not None:
        assert constant_answer_loss(y, w) == pytest.approx(2 * np.log(2) * 0.92)  # the 1.275 of a flat severe-AS run
    # No constant does better: the prior is the minimum.
    for dz in (-0.3, 0.3):
        assert float(criterion(z + dz, torch.tensor(y, dtype=torch.float32))) > expected


def test_a_run_that_never_left_the_constant_answer_is_called_so(capsys) -> None:
    y = [1] * 8 + [0] * 92
    w = 92 / 8
    floor = constant_answer_loss(y, w)
    flat = [{"epoch": e, "train_loss": floor * f} for e, f in enumerate((1.01, 0.995, 0.99, 0.985))]
    assert warn_if_constant_answer(flat, y, w)
    err = capsys.readouterr().err
    assert "never fell 3% under a constant answer's (1.275" in err and "--target-fps" in err
    learnt = [*flat, {"epoch": 4, "train_loss": floor * 0.9}]
    assert not warn_if_constant_answer(learnt, y, w)
    assert not warn_if_constant_answer([{"epoch": 0, "train_loss": float("nan")}], y, w)
    assert capsys.readouterr().err == ""
    assert constant_answer_check(flat, y, w) == {"constant_answer_loss": round(floor, 6),
                                                 "lowest_train_loss": round(floor * 0.985, 6), "learnt": False}
    assert constant_answer_check(learnt, y, w)["learnt"] is True
    assert constant_answer_check([{"epoch": 0, "train_loss": float("nan")}], y, w) is None


def test_a_run_whose_validation_loss_never_left_the_constant_answer_is_called_so(capsys) -> None:
    # The figures of a real 112 px severe-AS run that stopped on a plateau: its training loss fell 3.7 %
    # under the constant answer's (so the training check passed) while its best validation loss stayed
    # above the best constant's on the validation videos, and every band of opening scored about 0.5.
    train_y = [1] * 172 + [0] * 2004
    val_y = [1] * 37 + [0] * 302
    w = 2004 / 172
    floor, val_floor = constant_answer_loss(train_y, w), constant_answer_loss(val_y, w)
    assert floor == pytest.approx(1.277, abs=1e-3) and val_floor == pytest.approx(1.465, abs=1e-3)
    plateau = [{"epoch": e, "train_loss": t, "val_loss": v}
               for e, (t, v) in enumerate(((1.289, 1.479), (1.262, 1.474), (1.230, 2.297)))]
    assert warn_if_constant_answer(plateau, train_y, w, val_y)
    err = capsys.readouterr().err
    assert "validation loss (1.474) is not 3% under a constant answer's on the validation videos (1.465)" in err
    assert "--patience" in err and "training loss never fell" not in err
    check = constant_answer_check(plateau, train_y, w, val_y)
    assert check["learnt"] is True and check["learnt_on_validation"] is False
    assert check["lowest_val_loss"] == 1.474 and check["constant_answer_val_loss"] == round(val_floor, 6)
    # The floor is the best constant for the validation videos, not the training prior scored on them: a
    # model that only moved its bias towards the validation share would pass a check against the prior
    # (1.499 here) without telling anything apart.
    bias_only = [{"epoch": 0, "train_loss": 1.2, "val_loss": 1.44}]
    assert constant_answer_check(bias_only, train_y, w, val_y)["learnt_on_validation"] is False
    # The run that left it (the varied-look arm: 0.874 at its best epoch) is not warned about.
    left = [*plateau, {"epoch": 3, "train_loss": 0.923, "val_loss": 0.874}]
    assert not warn_if_constant_answer(left, train_y, w, val_y)
    assert constant_answer_check(left, train_y, w, val_y)["learnt_on_validation"] is True
    # No finite validation loss, or validation videos of one class (whose best constant is perfect, and
    # which finetune refuses anyway): only the training check, as before.
    no_val = [{"epoch": 0, "train_loss": 1.1, "val_loss": float("nan")}]
    assert "learnt_on_validation" not in constant_answer_check(no_val, train_y, w, val_y)
    assert not warn_if_constant_answer(no_val, train_y, w, val_y)
    one_class = [{"epoch": 0, "train_loss": 1.1, "val_loss": 0.2}]
    assert "learnt_on_validation" not in constant_answer_check(one_class, train_y, w, [0] * 40)
    assert not warn_if_constant_answer(one_class, train_y, w, [0] * 40)
    assert capsys.readouterr().err == ""


def test_probabilities_prevalence_moves_the_bias_and_the_threshold_not_the_decisions(labelled, tmp_path: Path) -> None:
    from train.evaluate import evaluate_bundle

    cache, labels = labelled
    args = ("--task", "lvh", "--epochs", "1", "--seed", "3", "--calibration-clips", "0")
    assert main(finetune_args(cache, labels, tmp_path / "loss", *args)) == 0
    assert main(finetune_args(cache, labels, tmp_path / "prev", *args, "--probabilities", "prevalence")) == 0
    as_trained, shifted = load_bundle(tmp_path / "loss"), load_bundle(tmp_path / "prev")
    w = shifted.meta.provenance["pos_weight"]
    assert w > 1.0  # the fixture has fewer positives than negatives, so the shift is not zero
    record = shifted.meta.metrics["probabilities"]
    assert record["scale"] == "prevalence" and record["logit_offset"] == pytest.approx(-np.log(w))
    assert as_trained.meta.metrics["probabilities"] == {"scale": "balanced", "pos_weight": w}
    # Only the head's bias differs (the same seed trains the same weights) ...
    a, b = as_trained.model.state_dict(), shifted.model.state_dict()
    for key in a:
        if key == "fc.bias":
            assert float(b[key] - a[key]) == pytest.approx(-np.log(w), abs=1e-6)
        else:
            assert torch.equal(a[key], b[key]), key
    # ... and the threshold moved with it: 0.5 on the loss's scale is 1 / (1 + w) on the prevalence scale.
    assert as_trained.meta.threshold == 0.5
    assert shifted.meta.threshold == pytest.approx(1.0 / (1.0 + w))
    # The bundle's metrics describe the probabilities it ships, at the threshold it ships: evaluate agrees.
    test = shifted.meta.metrics["test"]
    assert test["study"]["threshold_metrics"]["threshold"] == shifted.meta.threshold
    report = evaluate_bundle(tmp_path / "prev", cache, labels, tmp_path / "eval", n_resamples=50, runtime="eager")
    for level in ("video", "study"):
        assert report[level]["auroc"]["estimate"] == pytest.approx(test[level]["auroc"]["estimate"], abs=1e-9)
        assert report[level]["threshold_metrics"] == pytest.approx(test[level]["threshold_metrics"], abs=1e-9)
    # Both record the sector-mask rule of the cache they were trained from.
    assert as_trained.meta.preprocessing["sector_mask"] == ClipCache(cache).sector_mask_rule == SECTOR_MASK_RULE


def test_probabilities_prevalence_is_refused_for_the_view_task(labelled, tmp_path: Path, capsys) -> None:
    cache, labels = labelled
    assert main(finetune_args(cache, labels, tmp_path / "view", "--task", "view", "--epochs", "1",
                              "--probabilities", "prevalence")) == 2  # fmt: skip
    assert "applies to the binary tasks" in capsys.readouterr().err
    assert not (tmp_path / "view").exists()


def test_shift_to_prevalence_keeps_every_decision() -> None:
    from echonode.bundles.nets import build_model
    from train.finetune import shift_to_prevalence

    model = build_model("r3d_18", 1, width=4)
    with torch.no_grad():
        model.fc.bias.fill_(0.3)
    logits = torch.linspace(-4.0, 4.0, 401) + 0.3
    for threshold in (0.5, 0.2, 0.8):
        before = torch.sigmoid(logits) >= threshold
        offset, moved = shift_to_prevalence(model, 3.0, threshold)
        assert offset == pytest.approx(-np.log(3.0))
        after = torch.sigmoid(logits + offset) >= moved
        assert torch.equal(before, after)
        with torch.no_grad():
            model.fc.bias.fill_(0.3)
    assert float(model.fc.bias.detach()) == pytest.approx(0.3)
    assert shift_to_prevalence(model, 1.0, 0.5) == (0.0, 0.5)
    assert shift_to_prevalence(model, None, 0.4) == (0.0, 0.4)
    assert float(model.fc.bias.detach()) == pytest.approx(0.3)
    # A prevalence of one half at the loss's scale reads as the training prevalence after the shift.
    shift_to_prevalence(model, 3.0, 0.5)
    assert float(torch.sigmoid(model.fc.bias.detach())) == pytest.approx(1.0 / (1.0 + 3.0 * np.exp(-0.3)), rel=1e-5)
