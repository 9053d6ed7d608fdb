"""Supervised fine-tuning into a model bundle.

``echonode-train finetune --data CACHE --labels CSV --task T --out BUNDLE
[--init RUN|random|FILE] [--fraction F] [--preset paper|tiny]``

* Tasks: ``lvh`` and ``severe_as`` (binary, PLAX videos, the study's label in
  the *task's own column* of ``labels.csv``; the public code trained its
  "LVH" models on the AS column) and ``view`` (multi-class, every video with
  a known view, the view from the cache manifest).
* Splits by patient (:func:`train.cache.split_cache`: a patient's split is a
  seeded hash of its key, the same for pretraining and every task); the
  label fraction is sampled by study among the training studies with a
  fixed seed. A pretraining run that saw a validation or test study is
  refused, and so is a binary task whose validation or test split lacks a
  class (:func:`check_evaluable`).
* Loss: ``BCEWithLogitsLoss(pos_weight = n_neg / n_pos)`` of the training
  videos; cross-entropy for ``view``. Adam; early stopping on the validation
  loss with patience, best weights kept. With ``--target measurement`` a
  binary head regresses the measurement its label is cut from (squared
  error, stopped on the validation error) and is then calibrated to the
  label on the validation clips (:mod:`train.measured_target`).
* Output: a bundle (``echonode.bundles.weights.save_bundle``) with a new DeviceUID,
  provenance (init, manifest hash, labels hash, config, code revision, split
  sizes), validation / test metrics at video and study level, and
  ``split.json`` (:class:`train.splits.SplitRecord`): the studies it was
  trained, early-stopped and pretrained on, which ``evaluate`` refuses.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from echonode.analyse.preprocess_config import PreprocessConfig
from echonode.bundles.calibration import (
    CALIBRATION_FILE,
    DEFAULT_CALIBRATION_CLIPS,
    encode_calibration,
)
from echonode.bundles.device import resolve_device
from echonode.bundles.manifest import BINARY_TASKS, TASKS, BundleMeta
from echonode.bundles.nets import VideoClassifier, build_model, normalise_for_model
from echonode.bundles.weights import save_bundle
from train.augment import AugmentConfig
from train.cache import ClipCache, cache_argument, load_study_labels, split_cache
from train.configs import flat_dict, from_namespace
from train.datasets import ClipDataset
from train.init_bundle import InitError, init_weights
from train.measured_target import (
    MEASURED_TARGETS,
    TARGETS,
    Standardiser,
    constant_answer_mse,
    fit_calibration,
    fold_into_head,
    study_measurements,
)
from train.metrics import group_mean, multiclass_metrics, ranking_summary
from train.presets import add_preset_argument, apply_preset
from train.provenance import code_revision
from train.splits import (
    SPLIT_FILE,
    SPLIT_SCHEME,
    SplitRecord,
    check_no_overlap,
    sample_label_fraction,
)

__all__ = [
    "CLASS_WEIGHTS",
    "PROBABILITY_SCALES",
    "CONSTANT_ANSWER_MARGIN",
    "LR_SCHEDULES",
    "EarlyStopping",
    "TaskData",
    "add_finetune_arguments",
    "check_calibratable",
    "check_evaluable",
    "constant_answer_check",
    "constant_answer_loss",
    "main",
    "make_scheduler",
    "predict_clips",
    "prepare_task",
    "prior_logit",
    "run_finetune",
    "split_record",
    "train_one_epoch",
    "warn_if_constant_answer",
]

#: Learning-rate schedules: ``constant`` (the paper's Adam) or ``onecycle``
#: (a warm-up from lr / 25 to lr over the first 30 % of the planned steps,
#: then a cosine decay towards zero; :class:`torch.optim.lr_scheduler.OneCycleLR`).
LR_SCHEDULES = ("constant", "onecycle")
#: Share of the planned steps the one-cycle schedule spends warming up.
ONECYCLE_WARMUP = 0.3

#: How a binary task weighs its classes: ``balanced`` (the paper: positives
#: by n_neg / n_pos, so probabilities answer for a prevalence of one half) or ``none``.
CLASS_WEIGHTS = ("balanced", "none")

#: What a binary bundle's probabilities answer for. ``balanced``: as the loss
#: leaves them (with ``--class-weight balanced``, a prevalence of one half);
#: ``prevalence``: the head's bias is moved by ``-ln(pos_weight)`` after
#: training, so they answer for the training prevalence, and the decision
#: threshold moves with them (the same decision for every clip; a video's or
#: study's mean of clip probabilities can rarely land on the other side).
PROBABILITY_SCALES = ("balanced", "prevalence")


def _binary(value: object) -> int | None:
    text = str(value).strip().lower()
    if text in ("1", "1.0", "true", "yes"):
        return 1
    if text in ("0", "0.0", "false", "no"):
        return 0
    return None


@dataclass
class TaskData:
    """Videos and targets of one task, per split.

    Attributes
    ----------
    task : str
    labels : list of str
        Bundle labels (``["absent", "present"]`` or the view names).
    videos : dict
        Split name -> manifest entries.
    targets : dict
        Split name -> one target per video (0/1 float or class index).
    train_studies : list of str
        Labelled training studies after the fraction was drawn.
    pos_weight : float or None
        ``n_neg / n_pos`` of the training videos (binary tasks).
    measures : dict or None
        With ``--target measurement``: split name -> each video's measured
        value (NaN where its study has none; the training videos all have
        one). None when training on the label.
    standardiser : Standardiser or None
        The z-score the regression is trained on (training studies' values).
    """

    task: str
    labels: list[str]
    videos: dict[str, list[dict]]
    targets: dict[str, list[float | int]]
    train_studies: list[str]
    pos_weight: float | None
    measures: dict[str, list[float]] | None = None
    standardiser: Standardiser | None = None

    def measured(self, split: str) -> tuple[list[dict], list[float]]:
        """The videos of ``split`` with a measurement and their z-scored values (the regression's targets)."""
        if self.measures is None or self.standardiser is None:
            raise ValueError(f"the {self.task} task was prepared to train on its label, not a measurement")
        pairs = [(v, self.standardiser(m)) for v, m in zip(self.videos[split], self.measures[split], strict=True)
                 if math.isfinite(m)]
        return [v for v, _ in pairs], [z for _, z in pairs]


def prepare_task(
    cache: ClipCache,
    rows: Sequence[Mapping[str, str]],
    task: str,
    splits: Mapping[str, Sequence[str]],
    *,
    fraction: float = 1.0,
    fraction_seed: int = 0,
    views: Sequence[str] | None = None,
    class_weight: str = "balanced",
    target: str = "label",
) -> TaskData:
    """Select the videos and targets of ``task`` for each split.

    Parameters
    ----------
    cache : ClipCache
    rows : sequence of mapping
        ``labels.csv`` rows (one per study).
    task : {"lvh", "severe_as", "view"}
    splits : mapping
        Split name -> study UIDs (from :func:`train.cache.split_cache`).
    fraction : float
        Fraction of the labelled training studies used (by study).
    fraction_seed : int
        Seed of that draw.
    views : sequence of str, optional
        Views used for a binary task (default PLAX only).
    class_weight : {"balanced", "none"}
        Binary tasks: ``balanced`` (the paper) weighs positives by
        ``n_neg / n_pos`` of the training videos, ``none`` by 1.
    target : {"label", "measurement"}
        Binary tasks: train on the label (the paper), or regress the
        measurement it is cut from (:mod:`train.measured_target`); then only
        training studies with both a label and a measurement are trained on.

    Returns
    -------
    TaskData

    Raises
    ------
    ValueError
        If the labels lack the task's column, or a split has no usable video.
    """
    if task not in TASKS:
        raise ValueError(f'Argument "task" must be one of {", ".join(TASKS)}; got {task!r}.')
    if class_weight not in CLASS_WEIGHTS:
        raise ValueError(f'Argument "class_weight" must be one of {", ".join(CLASS_WEIGHTS)}; got {class_weight!r}.')
    if target not in TARGETS:
        raise ValueError(f'Argument "target" must be one of {", ".join(TARGETS)}; got {target!r}.')
    if target == "measurement" and task not in MEASURED_TARGETS:
        raise ValueError(f"--target measurement applies to {', '.join(MEASURED_TARGETS)}, not {task}")
    measured_values: dict[str, float] = {}
    measures: dict[str, list[float]] | None = None
    standardiser: Standardiser | None = None
    videos: dict[str, list[dict]] = {}
    targets: dict[str, list[float | int]] = {}
    if task in BINARY_TASKS:
        if rows and task not in rows[0]:
            raise ValueError(f"the labels file has no {task!r} column (columns: {', '.join(rows[0])})")
        # The label is read from the task's own column and nothing else.
        read = {r["study_uid"]: _binary(r[task]) for r in rows}
        study_label = {s: v for s, v in read.items() if v is not None}
        use_views = list(views) if views else ["plax"]
        train_pool = [s for s in splits["train"] if s in study_label]
        if target == "measurement":
            measured_values = study_measurements(rows, MEASURED_TARGETS[task])
            unmeasured = [s for s in train_pool if s not in measured_values]
            if unmeasured:
                # Scored and early-stopped on by their label where they fall in those splits; not trained on.
                measured_as = MEASURED_TARGETS[task]
                print(f"{len(unmeasured)} labelled training studies have no measurement of {measured_as.description} "
                      f"({', '.join(measured_as.columns)}) and are left out of training", file=sys.stderr)
            train_pool = [s for s in train_pool if s in measured_values]
        if not train_pool:
            with_value = " with a measurement" if target == "measurement" else ""
            raise ValueError(f"no labelled training studies{with_value} for {task}")
        train_studies = sample_label_fraction(train_pool, fraction, seed=fraction_seed, labels=study_label)
        chosen = {"train": train_studies, "val": splits["val"], "test": splits["test"]}
        for name, studies in chosen.items():
            labelled = [s for s in studies if s in study_label]
            videos[name] = cache.videos_of(labelled, None if use_views == ["all"] else use_views)
            targets[name] = [float(study_label[v["study_uid"]]) for v in videos[name]]
        y = np.asarray(targets["train"])
        n_pos, n_neg = float(y.sum()), float(y.size - y.sum())
        if n_pos == 0 or n_neg == 0:
            raise ValueError(f"the training videos of {task} need both classes (positives {n_pos:.0f}, negatives {n_neg:.0f})")
        labels = ["absent", "present"]
        pos_weight: float | None = n_neg / n_pos if class_weight == "balanced" else 1.0
        if target == "measurement":
            # One value per study trained on (a study the view filter left without videos is not).
            standardiser = Standardiser.fit([measured_values[s] for s in sorted({v["study_uid"] for v in videos["train"]})])
            measures = {name: [measured_values.get(v["study_uid"], math.nan) for v in videos[name]] for name in videos}
    else:
        known = sorted({v["view"] for v in cache.videos if v["view"] != "unknown"})
        if "plax" not in known or len(known) < 2:
            raise ValueError(f"the view task needs videos of several views, plax among them; the cache has {known}")
        labels = known
        index = {name: i for i, name in enumerate(labels)}
        studies_with_views = sorted({v["study_uid"] for v in cache.videos if v["view"] in index})
        train_pool = [s for s in splits["train"] if s in set(studies_with_views)]
        train_studies = sample_label_fraction(train_pool, fraction, seed=fraction_seed)
        chosen = {"train": train_studies, "val": splits["val"], "test": splits["test"]}
        for name, studies in chosen.items():
            videos[name] = [v for v in cache.videos_of(studies) if v["view"] in index]
            targets[name] = [index[v["view"]] for v in videos[name]]
        pos_weight = None
    if not videos["train"]:
        raise ValueError(f"no training videos for {task}")
    return TaskData(task, labels, videos, targets, train_studies, pos_weight, measures, standardiser)


def check_evaluable(data: TaskData, *, required: Sequence[str] = ("val", "test")) -> None:
    """Refuse a binary task whose validation or test split cannot be scored.

    A split with labelled studies but no positive (or no negative) one gives
    an AUROC of nothing and an early stopping that watches only one class:
    the run would end with figures that look like results. A split left
    empty on purpose (``--val-fraction 0``) is not checked; an empty split
    the fractions asked for is.

    Parameters
    ----------
    data : TaskData
    required : sequence of str
        The splits that must hold both classes.

    Raises
    ------
    ValueError
        Naming the split, its studies and its positives.
    """
    if data.task not in BINARY_TASKS:
        return
    for name in required:
        study_y: dict[str, float] = {}
        for v, t in zip(data.videos[name], data.targets[name], strict=True):
            study_y[v["study_uid"]] = float(t)
        positives = sum(1 for y in study_y.values() if y >= 0.5)
        negatives = len(study_y) - positives
        if positives and negatives:
            continue
        split = {"val": "validation", "test": "test"}.get(name, name)
        raise ValueError(
            f"the {split} split has {len(study_y)} {data.task} studies with videos, {positives} positive and "
            f"{negatives} negative: its figures would mean nothing. Use a larger archive, or other split "
            f"settings (--split-seed, --val-fraction, --test-fraction; a fraction of 0 means no such split)"
        )


def check_calibratable(data: TaskData) -> None:
    """Refuse, before training, a measurement run that could not stop early or be calibrated.

    Early stopping watches the regression's error on the validation videos
    that have a measurement, and the calibration to the label needs
    validation videos; that they hold both classes :func:`check_evaluable`
    has checked before (it requires the validation split whenever
    ``--val-fraction`` asks for one).

    Raises
    ------
    ValueError
        Naming what the validation split lacks.
    """
    if not data.videos["val"]:
        raise ValueError("--target measurement calibrates the regression to the label on the validation split, "
                         "and this run has none (--val-fraction 0)")
    if not data.measured("val")[0]:
        raise ValueError(f"no validation study has a measurement of {MEASURED_TARGETS[data.task].description}: "
                         "--target measurement stops early on the validation error")


def prior_logit(targets: Sequence[float | int], pos_weight: float | None) -> float:
    """The constant logit that minimises the weighted binary loss on ``targets``.

    With ``pos_weight = n_neg / n_pos`` (the default) each class weighs the
    same and the answer is 0 (probability 0.5); without weighting it is the
    log odds of the training prevalence.

    Raises
    ------
    ValueError
        When ``targets`` lack a class.
    """
    y = np.asarray(targets, dtype=float)
    n_pos, n_neg = float(y.sum()), float(y.size - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("the prior needs both classes")
    return math.log((pos_weight or 1.0) * n_pos / n_neg)


#: A binary run whose lowest training loss stays within this share of a constant
#: answer's has not learnt to tell the classes apart.
CONSTANT_ANSWER_MARGIN = 0.03


def constant_answer_loss(targets: Sequence[float | int], pos_weight: float | None) -> float:
    """The loss of the best constant answer: what a model that tells nothing apart scores.

    The weighted binary cross-entropy (as ``BCEWithLogitsLoss(pos_weight)``
    averages it) of :func:`prior_logit` on ``targets``, the lowest a
    constant can score on them. With the paper's weighting it is ``2 log 2``
    times the share of negatives (1.275 at 8 % positives, 0.93 at 33 %).
    """
    y = np.asarray(targets, dtype=float)
    w = pos_weight or 1.0
    p = 1.0 / (1.0 + math.exp(-prior_logit(targets, pos_weight)))
    return float(np.mean(w * y * -math.log(p) + (1.0 - y) * -math.log(1.0 - p)))


def constant_answer_check(history: Sequence[dict[str, float]], targets: Sequence[float | int],
                          pos_weight: float | None,
                          val_targets: Sequence[float | int] | None = None) -> dict[str, float | bool] | None:
    """A run's lowest losses against a constant answer's, as the bundle records them.

    Parameters
    ----------
    history : sequence of dict
        The run's epochs, each with a ``train_loss`` (and a ``val_loss``).
    targets : sequence of int
        The training videos' labels.
    pos_weight : float or None
        The loss's positive-class weight.
    val_targets : sequence of int, optional
        The validation videos' labels. A training loss can fall a little
        under the constant answer's while the model tells nothing apart on
        other videos (it learnt its training videos, or stopped on a
        plateau): the kept epoch is the one of lowest validation loss, so
        that loss is checked too, against the best constant for the
        validation videos themselves (stricter than the training prior's).
        Skipped when the validation videos hold one class only (``finetune``
        refuses such a split) or no epoch has a finite validation loss (then
        the initial weights are kept, and ``finetune`` warns of that).

    Returns
    -------
    dict or None
        ``constant_answer_loss``, ``lowest_train_loss`` and ``learnt`` (the
        lowest loss fell more than :data:`CONSTANT_ANSWER_MARGIN` under the
        constant answer's); with ``val_targets`` and a finite validation
        loss also ``constant_answer_val_loss``, ``lowest_val_loss`` and
        ``learnt_on_validation``, the same test on the validation videos.
        None when no epoch has a finite training loss.
    """
    losses = [h["train_loss"] for h in history if math.isfinite(h.get("train_loss", math.nan))]
    if not losses:
        return None
    floor = constant_answer_loss(targets, pos_weight)
    check: dict[str, float | bool] = {
        "constant_answer_loss": round(floor, 6), "lowest_train_loss": round(min(losses), 6),
        "learnt": min(losses) < (1.0 - CONSTANT_ANSWER_MARGIN) * floor}
    val_losses = [h["val_loss"] for h in history if math.isfinite(h.get("val_loss", math.nan))]
    if val_targets is not None and len(set(val_targets)) == 2 and val_losses:
        val_floor = constant_answer_loss(val_targets, pos_weight)
        check.update({"constant_answer_val_loss": round(val_floor, 6), "lowest_val_loss": round(min(val_losses), 6),
                      "learnt_on_validation": min(val_losses) < (1.0 - CONSTANT_ANSWER_MARGIN) * val_floor})
    return check


def warn_if_constant_answer(history: Sequence[dict[str, float]], targets: Sequence[float | int],
                            pos_weight: float | None, val_targets: Sequence[float | int] | None = None) -> bool:
    """Warn (stderr) when the training or the kept validation loss never left a constant answer's.

    Returns whether it warned.
    """
    check = constant_answer_check(history, targets, pos_weight, val_targets)
    if check is None:
        return False
    if not check["learnt"]:
        print(
            f"warning: the training loss never fell {CONSTANT_ANSWER_MARGIN:.0%} under a constant answer's "
            f"({check['constant_answer_loss']:.3f}; lowest {check['lowest_train_loss']:.3f}): the model has not "
            "learnt to tell the classes apart. "
            "Try a lower --lr or more --epochs; for a label seen in part of each beat (severe AS), index with "
            "--target-fps (docs/training.md, 'Frame rate')",
            file=sys.stderr,
        )
        return True
    if check.get("learnt_on_validation") is False:
        print(
            f"warning: the kept epoch's validation loss ({check['lowest_val_loss']:.3f}) is not "
            f"{CONSTANT_ANSWER_MARGIN:.0%} under a constant answer's on the validation videos "
            f"({check['constant_answer_val_loss']:.3f}): the bundle tells the classes apart no better than a "
            "constant on videos it did not train on. A run stopped on a plateau may need a larger --patience "
            "and more --epochs; one whose training loss fell fast has learnt its training videos only (more "
            "labelled studies, or a pretrained --init, may help)",
            file=sys.stderr,
        )
        return True
    return False


class EarlyStopping:
    """Stop when the validation loss has not improved for ``patience`` epochs.

    Parameters
    ----------
    patience : int
        Epochs without improvement tolerated.
    """

    def __init__(self, patience: int) -> None:
        self.patience = int(patience)
        self.best = math.inf
        self.best_epoch = -1
        self.bad_epochs = 0

    def step(self, loss: float, epoch: int) -> tuple[bool, bool]:
        """Record an epoch; return ``(improved, stop)``."""
        if loss < self.best:
            self.best, self.best_epoch, self.bad_epochs = float(loss), int(epoch), 0
            return True, False
        self.bad_epochs += 1
        return False, self.bad_epochs >= self.patience


def _criterion(task: str, pos_weight: float | None, device: torch.device) -> nn.Module:
    if task in BINARY_TASKS:
        return nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight], device=device))
    return nn.CrossEntropyLoss()


def _loss(criterion: nn.Module, logits: torch.Tensor, y: torch.Tensor, binary: bool) -> torch.Tensor:
    if binary:
        return criterion(logits[:, 0].float(), y.float())
    return criterion(logits.float(), y.long())


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    *,
    device: torch.device,
    binary: bool,
    normalisation: str = "minmax",
    max_steps: int | None = None,
    progress: bool = False,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> float:
    """One pass over the training loader; returns the mean loss.

    ``scheduler``, when given, steps after every optimiser step.
    """
    model.train()
    total, steps = 0.0, 0
    iterator = loader
    if progress:
        # Late: tqdm comes with the train extra, needed only for a progress bar.
        from tqdm import tqdm

        iterator = tqdm(loader, desc="finetune", unit="step", leave=False)
    for x, y in iterator:
        x = normalise_for_model(x.to(device, non_blocking=True), normalisation)
        loss = _loss(criterion, model(x), y.to(device), binary)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach())
        steps += 1
        if max_steps is not None and steps >= max_steps:
            break
    return total / max(steps, 1)


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, lr: float, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning-rate schedule of a fine-tuning run, stepped once per optimiser step.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
    schedule : str
        One of :data:`LR_SCHEDULES`.
    lr : float
        The peak learning rate (``--lr``).
    total_steps : int
        The steps the run plans (epochs x steps an epoch); early stopping may end it sooner.

    Returns
    -------
    torch.optim.lr_scheduler.LRScheduler or None
        None for ``constant``.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f'Argument "schedule" must be one of {", ".join(LR_SCHEDULES)}; got {schedule!r}.')
    if schedule == "constant":
        return None
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(total_steps, 1),
                                               pct_start=ONECYCLE_WARMUP)


@torch.no_grad()
def predict_clips(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module | None = None,
    *,
    device: torch.device,
    binary: bool,
    normalisation: str = "minmax",
    raw: bool = False,
) -> tuple[np.ndarray, float]:
    """Probabilities of every evaluation clip and the mean clip loss.

    Parameters
    ----------
    raw : bool
        Binary tasks: the head's outputs as they are, not through the sigmoid
        (a regression head's, before it is calibrated).

    Returns
    -------
    probs : numpy.ndarray
        ``(n_videos, n_clips)`` sigmoid probabilities (the outputs with
        ``raw``), or ``(n_videos, n_clips, K)`` softmax for ``view``.
    loss : float
        Mean loss over clips (each clip labelled with its video's target);
        NaN without a criterion.
    """
    model.eval()
    out, total, count = [], 0.0, 0
    for x, y in loader:
        b, k = x.shape[:2]
        flat = normalise_for_model(x.flatten(0, 1).to(device), normalisation)
        logits = model(flat)
        if criterion is not None:
            total += float(_loss(criterion, logits, y.to(device).repeat_interleave(k), binary)) * b * k
            count += b * k
        if binary:
            clip_probs = logits[:, 0].float() if raw else torch.sigmoid(logits[:, 0].float())
        else:
            clip_probs = torch.softmax(logits.float(), dim=1)
        out.append(clip_probs.reshape((b, k) + tuple(clip_probs.shape[1:])).cpu().numpy())
    probs = np.concatenate(out) if out else np.zeros((0, 0))
    return probs, (total / count if count else float("nan"))


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, *, n_outputs: int = 1, pos_weight: float | None = None, l2: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """L2-penalised logistic regression (L-BFGS) on features ``x``.

    Features are centred and divided by one scale common to all of them,
    not one per feature: with a handful of labelled samples some features
    barely vary, and a per-feature standardisation would blow them up on
    every other sample. The penalty applies to the weights of the scaled
    features; the returned weights act on ``x`` as given.

    Parameters
    ----------
    x : torch.Tensor
        ``(N, D)`` features.
    y : torch.Tensor
        ``(N,)`` targets: 0/1 for ``n_outputs == 1`` (sigmoid), class
        indices otherwise (softmax).
    n_outputs : int
    pos_weight : float, optional
        Weight of the positive class (binary only), as in the fine-tuning loss.
    l2 : float
        Penalty (strong by default: a few samples are separable in any
        512-d feature space, and an unpenalised fit has huge logits).

    Returns
    -------
    weight : torch.Tensor
        ``(D, n_outputs)``, float64; logits are ``x @ weight + bias``.
    bias : torch.Tensor
        ``(n_outputs,)``.
    loss : float
        Unpenalised training loss of the fit.
    """
    x = x.double()
    mean = x.mean(0)
    scale = (x - mean).std().clamp_min(1e-6)
    z = (x - mean) / scale
    w = torch.zeros(z.shape[1], n_outputs, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_outputs, dtype=torch.float64, requires_grad=True)
    if n_outputs == 1:
        pw = torch.tensor([pos_weight or 1.0], dtype=torch.float64)
        loss_fn = lambda logits: nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.double(), pos_weight=pw)  # noqa: E731
    else:
        loss_fn = lambda logits: nn.functional.cross_entropy(logits, y.long())  # noqa: E731
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(z @ w + b) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        fitted = float(loss_fn(z @ w + b))
        # Fold the scaling into the weights: (x - mean) / scale @ w + b.
        weight = w / scale
        bias = b - mean @ weight
    return weight.detach(), bias.detach(), fitted


@torch.no_grad()
def _recalibrate_batchnorm(model: nn.Module, loader: DataLoader, *, device: torch.device, normalisation: str) -> None:
    """Re-estimate BatchNorm running statistics on ``loader`` (cumulative average).

    Fine-tuning runs BatchNorm in training mode, on batch statistics of the
    labelled clips; features read in eval mode with the statistics of
    another dataset (the pretraining archive, or none at all for a random
    network) are not the features fine-tuning starts from. Re-estimating
    them first makes the head fitted in eval mode fit the fine-tuning regime.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the pass
    model.train()
    for x, _ in loader:
        model(normalise_for_model(x.flatten(0, 1).to(device), normalisation))
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum


@torch.no_grad()
def _frozen_features(
    model: VideoClassifier, loader: DataLoader, *, device: torch.device, normalisation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder features of every evaluation clip (eval mode) and each clip's target."""
    model.eval()
    feats, targets = [], []
    for x, y in loader:
        k = x.shape[1]
        feats.append(model.features(normalise_for_model(x.flatten(0, 1).to(device), normalisation)).float().cpu())
        targets.append(y.repeat_interleave(k))
    return torch.cat(feats), torch.cat(targets)


def fit_linear_head(
    model: VideoClassifier,
    loader: DataLoader,
    *,
    device: torch.device,
    pos_weight: float | None,
    normalisation: str = "minmax",
    l2: float = 0.1,
) -> dict[str, float]:
    """Set ``model.fc`` to the logistic regression fitted on frozen features.

    The first step of LP-FT (Kumar et al., 2022, "Fine-Tuning can Distort
    Pretrained Features"): a new head fitted to the frozen encoder before
    end-to-end fine-tuning starts, so the first gradients reaching the
    encoder come from a head that already reads its features instead of from
    a random projection, which with few labels distorts the pretrained
    features before the head has learned anything. BatchNorm statistics are
    first re-estimated on the same clips (see :func:`_recalibrate_batchnorm`).

    Parameters
    ----------
    model : VideoClassifier
    loader : DataLoader
        The training videos' evaluation clips (no augmentation).
    device : torch.device
    pos_weight : float or None
        As in the fine-tuning loss.
    normalisation : str
        The model's input normalisation.
    l2 : float
        Penalty on the weights of the standardised features (strong: a few
        labelled studies are separable in any 512-d feature space, and an
        unpenalised fit would start fine-tuning from huge logits).

    Returns
    -------
    dict
        ``train_loss`` of the fitted head on the clips, ``clips``.
    """
    _recalibrate_batchnorm(model, loader, device=device, normalisation=normalisation)
    x, y = _frozen_features(model, loader, device=device, normalisation=normalisation)
    weight, bias, fitted = fit_logistic(x, y, n_outputs=model.fc.out_features, pos_weight=pos_weight, l2=l2)
    with torch.no_grad():
        model.fc.weight.copy_(weight.T.to(model.fc.weight))
        model.fc.bias.copy_(bias.to(model.fc.bias))
    return {"train_loss": fitted, "clips": int(y.numel())}


def summarise(
    task: str, videos: Sequence[dict], targets: Sequence[float | int], clip_probs: np.ndarray, labels: Sequence[str],
    *, threshold: float = 0.5, n_resamples: int = 10_000, seed: int = 0,
) -> dict[str, object]:  # fmt: skip
    """Video- and study-level metrics from clip probabilities.

    Video probability = mean over its clips; study probability = mean over
    its videos (binary tasks; the view task is per video only).
    """
    if len(videos) == 0:
        return {"n_videos": 0}
    video_probs = clip_probs.mean(axis=1)
    if task not in BINARY_TASKS:
        return {"video": multiclass_metrics(np.asarray(targets), video_probs, labels)}
    y = np.asarray(targets, dtype=int)
    studies = [v["study_uid"] for v in videos]
    study_ids, study_probs = group_mean(studies, video_probs)
    _, study_y = group_mean(studies, y)
    return {
        "video": ranking_summary(y, video_probs, threshold=threshold, n_resamples=n_resamples, seed=seed),
        "study": ranking_summary(
            study_y.round().astype(int), study_probs, threshold=threshold, n_resamples=n_resamples, seed=seed
        ),
        "n_studies": len(study_ids),
    }


def _file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def resolve_init(init: str, arch: str, width: int, num_outputs: int) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Initial weights for ``--init RUN|random|FILE``.

    A folder is a pretraining run: its ``encoder.pt`` (or, before the run
    finished, its ``checkpoint.pt``). Files go through
    :func:`train.init_bundle.init_weights`, which reads torchvision-format
    state dicts and EchoCLR checkpoints.
    """
    if init == "random":
        return init_weights(None, arch, width, num_outputs)
    path = Path(init)
    info_extra: dict[str, object] = {}
    if path.is_dir():
        run = path
        path = run / "encoder.pt" if (run / "encoder.pt").is_file() else run / "checkpoint.pt"
        info_extra["pretrain_run"] = str(run)
    try:
        state, info = init_weights(path, arch, width, num_outputs)
    except InitError as exc:
        raise ValueError(str(exc)) from None
    return state, {**info, **info_extra}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


@dataclass(frozen=True)
class FinetuneData:
    """What to learn from: the cache, the labels, the task, the split and the clips."""

    #: One cache's path, or several (:func:`train.cache.cache_argument`).
    data: str | tuple[str, ...]
    labels: str
    task: str
    fraction: float = 1.0
    fraction_seed: int = 0
    views: str | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    size: int = 112
    frames: int = 16
    eval_clips: int = 4
    workers: int = 0
    #: Change the look of training clips too (:class:`train.augment.AppearanceConfig`).
    appearance: bool = False
    #: One of :data:`train.measured_target.TARGETS`: the label (the paper) or the measurement it is cut from.
    target: str = "label"


@dataclass(frozen=True)
class FinetuneModel:
    """The network and where its weights start."""

    init: str = "random"
    arch: str = "r3d_18"
    width: int = 64
    dropout: float = 0.25
    head_init: str = "random"


@dataclass(frozen=True)
class FinetuneOptim:
    """Optimisation and early stopping."""

    batch: int = 88
    lr: float = 1e-4
    epochs: int = 30
    patience: int = 5
    epoch_samples: int | None = None
    max_steps: int | None = None
    seed: int = 0
    #: ``balanced`` (the paper): positives weigh ``n_neg / n_pos``; ``none``: every video weighs 1.
    class_weight: str = "balanced"
    #: One of :data:`LR_SCHEDULES`; ``constant`` is the paper's.
    lr_schedule: str = "constant"


@dataclass(frozen=True)
class FinetuneOutput:
    """The bundle written, its name and threshold, and how the run reports."""

    out: str
    overwrite: bool = False
    name: str | None = None
    version: str = "1"
    threshold: float = 0.5
    bootstrap: int = 10_000
    device: str = "auto"
    progress: bool = True
    preset: str = "paper"
    #: False: the test split is neither checked nor scored (a hyperparameter search scores it later, once).
    score_test: bool = True
    calibration_clips: int = DEFAULT_CALIBRATION_CLIPS
    #: One of :data:`PROBABILITY_SCALES`.
    probabilities: str = "balanced"


@dataclass(frozen=True)
class FinetuneConfig:
    """Every setting of ``echonode-train finetune``, by concern.

    Stored in the bundle's provenance as one flat plain dict
    (:func:`train.configs.flat_dict`).
    """

    dataset: FinetuneData
    model: FinetuneModel
    optim: FinetuneOptim
    output: FinetuneOutput


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``echonode-train finetune``, grouped by concern."""
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, nargs="+", metavar="CACHE",
                      help="clip cache folder(s) (several: read as one, e.g. shards)")
    data.add_argument("--labels", required=True, help="labels.csv (one row per study)")
    data.add_argument("--task", required=True, choices=TASKS)
    data.add_argument("--fraction", type=float, default=1.0, help="fraction of labelled training studies (by study)")
    data.add_argument("--fraction-seed", type=int, default=0)
    data.add_argument("--views", default=None, help="views for binary tasks (default plax; 'all' for every view)")
    data.add_argument("--val-fraction", type=float, default=0.1)
    data.add_argument("--test-fraction", type=float, default=0.2)
    data.add_argument("--split-seed", type=int, default=0)
    data.add_argument("--size", type=int, default=None)
    data.add_argument("--frames", type=int, default=None, help="frames per clip")
    data.add_argument("--eval-clips", type=int, default=None)
    data.add_argument("--workers", type=int, default=None)
    data.add_argument(
        "--appearance", action="store_true",
        help="also change the look of training clips (grey map, gain, blur, speckle grain): for models that must "
        "hold up on another cart's or renderer's images (default: the paper's augmentations only)",
    )  # fmt: skip
    data.add_argument(
        "--target", choices=TARGETS, default="label",
        help="binary tasks: train on the label (the paper), or 'measurement': regress the value it is cut from "
        "(lvh: the thicker of ivsd_cm and lvpwd_cm; severe_as: av_vmax_m_s) and calibrate the output to the "
        "label on the validation clips, so the answer keeps its order on both sides of the threshold "
        "(docs/training.md, 'Training on the measurement')",
    )  # fmt: skip

    model = parser.add_argument_group("model")
    model.add_argument("--init", default="random", help="RUN folder, 'random', or a weights FILE")
    model.add_argument("--arch", choices=("r3d_18", "r2plus1d_18"), default=None)
    model.add_argument("--width", type=int, default=None)
    model.add_argument("--dropout", type=float, default=None)
    model.add_argument(
        "--head-init", choices=("random", "probe"), default="random",
        help="new head: random (the paper), or 'probe': fitted on the frozen encoder's features first (LP-FT)",
    )  # fmt: skip

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch", type=int, default=None)
    optim.add_argument("--lr", type=float, default=None)
    optim.add_argument("--epochs", type=int, default=None)
    optim.add_argument("--patience", type=int, default=None)
    optim.add_argument(
        "--epoch-samples", type=_positive_int, default=None,
        help="at least N training clips per epoch: a small label fraction visits its videos several times "
        "per epoch, each a fresh clip (default: one pass)",
    )  # fmt: skip
    optim.add_argument(
        "--lr-schedule", choices=LR_SCHEDULES, default="constant",
        help="'constant' (the paper), or 'onecycle': warm up from lr/25 to --lr over the first 30%% of the planned "
        "steps (--epochs), then decay towards zero",
    )  # fmt: skip
    optim.add_argument("--max-steps", type=int, default=None, help="stop each epoch after N steps (smoke tests)")
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument(
        "--class-weight", choices=CLASS_WEIGHTS, default="balanced",
        help="binary tasks: 'balanced' (the paper) weighs positives n_neg / n_pos, so the model's probabilities "
        "answer for a prevalence of one half; 'none' weighs every video alike, so they answer for the training "
        "prevalence",
    )  # fmt: skip

    run = parser.add_argument_group("output")
    run.add_argument("--out", required=True, help="bundle folder to write")
    run.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    run.add_argument("--name", default=None, help="algorithm name (default echonode-<task>)")
    run.add_argument("--version", default="1")
    run.add_argument(
        "--threshold", type=float, default=0.5,
        help="decision threshold on the probability as trained (with --probabilities prevalence, the bundle "
        "stores it moved with the probabilities, so the decisions stay the same)",
    )  # fmt: skip
    run.add_argument(
        "--probabilities", choices=PROBABILITY_SCALES, default="balanced",
        help="binary tasks: 'balanced' keeps the probabilities the weighted loss gives (with --class-weight "
        "balanced they answer for a prevalence of one half, which lifts a negative study's); 'prevalence' moves "
        "the head's bias by -ln(pos_weight) after training so they answer for the training prevalence, and the "
        "threshold with it (every clip's decision and order unchanged; a study's mean of clips can rarely differ)",
    )  # fmt: skip
    run.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples for the CIs")
    run.add_argument("--device", default="auto")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument(
        "--no-test-score", action="store_true",
        help="score the validation split only and leave the test split unread (a hyperparameter search: score "
        "the chosen bundle on test afterwards, with 'evaluate')",
    )  # fmt: skip
    run.add_argument(
        "--calibration-clips", type=int, default=DEFAULT_CALIBRATION_CLIPS,
        help=f"preprocessed evaluation clips stored in the bundle ({CALIBRATION_FILE}) for the node's runtime "
        f"check (default {DEFAULT_CALIBRATION_CLIPS}; 0 stores none: the node then checks on synthetic clips)",
    )  # fmt: skip
    add_preset_argument(parser)


def _config_from(ns: argparse.Namespace) -> FinetuneConfig:
    ns.data = cache_argument(ns.data)
    apply_preset(
        ns,
        {
            "frames": "finetune_frames",
            "batch": "finetune_batch",
            "lr": "finetune_lr",
            "epochs": "finetune_epochs",
        },
    )
    return from_namespace(
        FinetuneConfig, ns, progress=not ns.no_progress, overwrite=bool(ns.overwrite),
        score_test=not ns.no_test_score,
    )  # fmt: skip


def run_finetune(ns: argparse.Namespace) -> int:
    """Run ``echonode-train finetune``; returns the exit status (2: user error)."""
    config = _config_from(ns)
    try:
        finetune(config)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"echonode-train finetune: {exc}", file=sys.stderr)
        return 2
    return 0


@dataclass
class _Run:
    """What the steps of :func:`finetune` hand each other."""

    config: FinetuneConfig
    device: torch.device
    cache: ClipCache
    splits: dict[str, list[str]]
    data: TaskData
    model: VideoClassifier | None = None
    normalisation: str = "minmax"
    init_info: dict[str, object] = field(default_factory=dict)
    pretrained_on: tuple[str, ...] = ()
    #: The bundle's decision threshold (``--threshold``, moved by :func:`shift_to_prevalence`).
    threshold: float = 0.5

    @property
    def binary(self) -> bool:
        return self.data.task in BINARY_TASKS

    @property
    def regresses(self) -> bool:
        """Trained on a measurement (``--target measurement``), calibrated to the label afterwards."""
        return self.data.measures is not None


def finetune(config: FinetuneConfig) -> Path:
    """Fine-tune per ``config`` (see :func:`add_finetune_arguments`); returns the bundle path."""
    out = Path(config.output.out)
    if out.exists() and not config.output.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite or choose another --out")
    torch.manual_seed(config.optim.seed)
    run = _load_task(config)
    _initial_model(run)
    loaders = _Loaders(run)
    head_fit = _fit_probe_head(run, loaders) if config.model.head_init == "probe" else None
    history, best_epoch = _fit(run, loaders)
    metrics: dict[str, object] = {"best_epoch": best_epoch, "history": history}
    if run.regresses:
        metrics["measurement"] = _calibrate_measurement(run, loaders, history)
    elif run.data.task in BINARY_TASKS:
        # In the bundle as well as on stderr: a reader of the bundle alone sees it too.
        metrics["constant_answer"] = constant_answer_check(
            history, run.data.targets["train"], run.data.pos_weight, run.data.targets["val"])
    if head_fit is not None:
        metrics["head_fit"] = head_fit
    if run.binary:
        # Before scoring, so that the bundle's metrics describe the probabilities it ships: a video's and a
        # study's probability is the mean of its clips', which the shift does not commute with.
        metrics["probabilities"] = _apply_probability_scale(run)
    metrics.update(_score(run, loaders))
    return _write_bundle(run, out, loaders.repeats, metrics)


def _calibrate_measurement(run: _Run, loaders: _Loaders, history: Sequence[dict[str, float]]) -> dict[str, object]:
    """Turn the regression head into the label's log odds (:func:`train.measured_target.fit_calibration`).

    Fitted on every labelled validation clip (a study without a measurement
    has a label all the same), weighted so the probabilities answer for the
    prevalence a label-trained bundle's would under the same
    ``--class-weight``; then folded into the head (``--probabilities
    prevalence`` moves it afterwards as it moves any bundle's).
    Returns what the bundle records: the target, its z-score, the
    regression's errors against a constant's, and the calibration.
    """
    data, model = run.data, run.model
    assert model is not None and data.standardiser is not None
    target = MEASURED_TARGETS[data.task]
    outputs, _ = predict_clips(model, loaders.evaluation("val"), device=run.device, binary=True,
                               normalisation=run.normalisation, raw=True)
    # predict_clips gives (videos, clips) in the loader's order, which is the split's: each row is one video.
    clip_labels = np.repeat(np.asarray(data.targets["val"], dtype=float), outputs.shape[1])
    # Weighted so the probabilities answer for the prevalence a label-trained bundle's would: one half with
    # --class-weight balanced (the validation clips' own n_neg / n_pos, as they are what it is fitted on), the
    # training videos' with none (that weight times pos_weight / the training n_neg / n_pos); --probabilities
    # prevalence then moves them as it moves any bundle's.
    n_pos = float(clip_labels.sum())
    train_y = np.asarray(data.targets["train"], dtype=float)
    train_balance = (train_y.size - train_y.sum()) / train_y.sum()
    weight = ((clip_labels.size - n_pos) / n_pos) * (data.pos_weight or 1.0) / train_balance
    calibration = fit_calibration(outputs.reshape(-1), clip_labels, pos_weight=weight)
    fold_into_head(model.fc, calibration)
    train_floor = constant_answer_mse(data.measured("train")[1])
    val_floor = constant_answer_mse(data.measured("val")[1])
    train_losses = [h["train_loss"] for h in history if math.isfinite(h["train_loss"])]
    val_losses = [h["val_loss"] for h in history if math.isfinite(h["val_loss"])]
    record: dict[str, object] = {
        "target": "measurement", "task": data.task, "columns": list(target.columns), "unit": target.unit,
        "description": target.description, "mean": data.standardiser.mean, "sd": data.standardiser.sd,
        "constant_answer_mse": round(train_floor, 6), "lowest_train_mse": round(min(train_losses, default=math.nan), 6),
        "constant_answer_val_mse": round(val_floor, 6), "lowest_val_mse": round(min(val_losses, default=math.nan), 6),
        "calibration": {"slope": calibration.slope, "intercept": calibration.intercept, "clips": calibration.clips,
                        "positives": calibration.positives, "loss": calibration.loss,
                        "pos_weight": weight, "fitted_on": "validation clips"},
        # The paper's dropout acts on the head's output: under a squared error it shrinks the answer towards the
        # mean by (1 - p), a scale the calibration undoes, and it inflates the training error (measured in
        # training mode) against the constant's; the validation error is measured without it.
        "dropout": run.config.model.dropout,
    }
    print(f"regressed {target.description} (z-scored: mean {data.standardiser.mean:.3f}, sd "
          f"{data.standardiser.sd:.3f} {target.unit}); calibrated on {calibration.clips} validation clips: "
          f"log odds = {calibration.slope:.3f} x output {calibration.intercept:+.3f}")
    if not val_losses or min(val_losses) >= (1.0 - CONSTANT_ANSWER_MARGIN) * val_floor:
        print(f"warning: the validation error never fell {CONSTANT_ANSWER_MARGIN:.0%} under a constant answer's "
              f"({val_floor:.3f}): the model does not measure {target.description}", file=sys.stderr)
    if calibration.slope == 0:
        print(f"warning: the head gives every validation clip the same output: the bundle answers the same "
              f"probability of {data.task} for every study", file=sys.stderr)
    elif calibration.slope < 0:
        print(f"warning: on the validation clips a larger {target.description} predicted lower odds of "
              f"{data.task} (slope {calibration.slope:.3f}): the regression does not track the label",
              file=sys.stderr)
    return record


def shift_to_prevalence(model: VideoClassifier, pos_weight: float | None, threshold: float) -> tuple[float, float]:
    """Move a binary head so its probabilities answer for the training prevalence.

    Training with ``BCEWithLogitsLoss(pos_weight=w)`` makes the optimal logit
    ``ln(w) + logit(p)``, where ``p`` is the probability at the training
    prevalence: subtracting ``ln(w)`` from the head's bias undoes it (the
    prior correction of weighted logistic regression). The threshold moves by
    the same amount on the logit scale, so every clip's decision stays as it
    was. A video's or study's probability is the mean of its clips', which
    the shift does not commute with: where its clips disagree strongly, a
    study's decision or its order against another study can change.

    Parameters
    ----------
    model : VideoClassifier
        A one-output model; its ``fc.bias`` is changed in place.
    pos_weight : float or None
        The loss's positive-class weight (None or 1: nothing moves).
    threshold : float
        The decision threshold on the probability as trained, in (0, 1).

    Returns
    -------
    logit_offset : float
        What was added to the bias (``-ln(pos_weight)``).
    threshold : float
        The threshold on the new probabilities.
    """
    if model.fc.bias is None or model.fc.bias.numel() != 1:
        raise ValueError("shift_to_prevalence needs a one-output head with a bias")
    offset = -math.log(pos_weight or 1.0)
    if offset == 0.0:
        return 0.0, threshold
    with torch.no_grad():
        model.fc.bias.add_(offset)
    if threshold <= 0.0 or threshold >= 1.0:
        return offset, threshold
    moved = 1.0 / (1.0 + math.exp(-(math.log(threshold / (1.0 - threshold)) + offset)))
    return offset, moved


def _apply_probability_scale(run: _Run) -> dict[str, object]:
    """Apply ``--probabilities`` to the fitted binary model; returns what the bundle records of it."""
    output = run.config.output
    record: dict[str, object] = {"scale": output.probabilities, "pos_weight": run.data.pos_weight}
    if output.probabilities == "prevalence":
        assert run.model is not None
        offset, run.threshold = shift_to_prevalence(run.model, run.data.pos_weight, output.threshold)
        record.update(logit_offset=offset, threshold_as_trained=output.threshold, threshold=run.threshold)
        print(f"probabilities answer for the training prevalence: bias moved by {offset:+.4f}, "
              f"threshold {output.threshold:g} -> {run.threshold:.4f} (the same decision for every clip)")
    return record


def _load_task(config: FinetuneConfig) -> _Run:
    """The cache, the archive's split and the task's videos; refuses splits that cannot be scored."""
    d = config.dataset
    if config.output.probabilities not in PROBABILITY_SCALES:
        raise ValueError(f"--probabilities must be one of {', '.join(PROBABILITY_SCALES)}, "
                         f"not {config.output.probabilities!r}")
    if config.output.probabilities != "balanced" and d.task not in BINARY_TASKS:
        # A softmax over views has no class weight to undo: say so rather than ignore the flag.
        raise ValueError(f"--probabilities {config.output.probabilities} applies to the binary tasks "
                         f"({', '.join(BINARY_TASKS)}), not {d.task}")
    cache = ClipCache(d.data)
    rows = load_study_labels(d.labels)
    splits = split_cache(cache, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.split_seed)
    views = [v.strip() for v in d.views.split(",")] if d.views else None
    if d.target == "measurement" and config.model.head_init == "probe":
        raise ValueError("--head-init probe fits a logistic head on the label; with --target measurement the head "
                         "regresses, so start it at random")
    data = prepare_task(cache, rows, d.task, splits, fraction=d.fraction, fraction_seed=d.fraction_seed, views=views,
                        class_weight=config.optim.class_weight, target=d.target)
    # A split the fractions leave empty on purpose is not scored; one they asked for must be scorable.
    required = [name for name, fraction in (("val", d.val_fraction), ("test", d.test_fraction)) if fraction > 0]
    if not config.output.score_test:
        # A search that must not see the test split does not read its labels' balance either.
        required = [name for name in required if name != "test"]
    check_evaluable(data, required=required)
    if data.measures is not None:
        check_calibratable(data)
    device = resolve_device(config.output.device)
    return _Run(config, device, cache, splits, data, threshold=config.output.threshold)


def _initial_model(run: _Run) -> None:
    """Build the model from ``--init``; refuse a pretraining run that saw this run's evaluation studies."""
    m, data = run.config.model, run.data
    num_outputs = 1 if run.binary else len(data.labels)
    state, init_info = resolve_init(m.init, m.arch, m.width, num_outputs)
    pretrain_run = init_info.get("pretrain_run")
    if pretrain_run:
        record = SplitRecord.read(str(pretrain_run))
        if record is None:
            init_info["pretrain_split"] = "unknown (the run has no split.json)"
        else:
            # Its images shaped the encoder: no validation or test study may be among them.
            check_no_overlap(
                record, [*run.splits["val"], *run.splits["test"]], source=f"pretraining run {pretrain_run}",
                purpose="validation and test",
            )  # fmt: skip
            init_info["pretrain_split"] = "checked: no validation or test study was pretrained on"
            run.pretrained_on = tuple(record.used.get("pretrained", ()))
    model = build_model(m.arch, num_outputs, width=m.width, dropout=m.dropout)
    model.load_state_dict(state, strict=True)
    if init_info.get("head") == "new":
        _set_prior_bias(model, data)
    elif data.measures is not None:
        raise ValueError(f"--target measurement trains a new head; the init {m.init} brings its own one-output head "
                         "(a bundle's or a checkpoint's): start from a pretraining run, random or a backbone")
    run.model = model.to(run.device)
    run.normalisation = "kinetics" if init_info.get("init") == "kinetics" else "minmax"
    run.init_info = init_info


def _set_prior_bias(model: VideoClassifier, data: TaskData) -> None:
    """Start a new head at the training labels' prior, so early steps do not spend themselves on the bias."""
    fc = model.fc
    with torch.no_grad():
        if data.measures is not None:
            fc.bias.zero_()  # the z-scored training values' mean
        elif data.task in BINARY_TASKS:
            fc.bias.fill_(prior_logit(data.targets["train"], data.pos_weight))
        else:
            counts = np.bincount(np.asarray(data.targets["train"], dtype=int), minlength=len(data.labels)) + 1.0
            fc.bias.copy_(torch.as_tensor(np.log(counts / counts.sum()), dtype=fc.bias.dtype))


class _Loaders:
    """The training loader and the evaluation loaders of one run."""

    def __init__(self, run: _Run) -> None:
        d, optim, data = run.config.dataset, run.config.optim, run.data
        self.run = run
        self.frames, self.size, self.eval_clips, self.workers = d.frames, d.size, d.eval_clips, d.workers
        self.batch = optim.batch
        seed = optim.seed
        n_train = len(data.videos["train"])
        self.repeats = max(1, math.ceil(optim.epoch_samples / n_train)) if optim.epoch_samples else 1
        # Every training video has a measurement when the run regresses one (prepare_task kept only those).
        train_targets = data.measured("train")[1] if run.regresses else data.targets["train"]
        self.train_set = ClipDataset(
            run.cache, data.videos["train"], train_targets, self.frames, self.size, train=True,
            augment=AugmentConfig.for_size(self.size, appearance=d.appearance), seed=seed, repeats=self.repeats,
        )  # fmt: skip
        self.train = DataLoader(
            self.train_set, batch_size=self.batch, shuffle=True, num_workers=self.workers, drop_last=False,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    def evaluation(self, name: str, *, measured: bool = False) -> DataLoader:
        """Uniformly spaced clips of every video of split ``name``.

        With ``measured``: only the videos with a measurement, their targets
        the z-scored values (the regression's validation loss).
        """
        data = self.run.data
        videos, targets = data.measured(name) if measured else (data.videos[name], data.targets[name])
        ds = ClipDataset(
            self.run.cache, videos, targets, self.frames, self.size, train=False, eval_clips=self.eval_clips,
        )  # fmt: skip
        return DataLoader(ds, batch_size=max(1, self.batch // self.eval_clips), num_workers=self.workers)


def _fit_probe_head(run: _Run, loaders: _Loaders) -> dict[str, float]:
    """LP-FT's first step (:func:`fit_linear_head`)."""
    if run.init_info.get("head") != "new":
        raise ValueError("--head-init probe fits a new head; the init already has one for this task")
    assert run.model is not None
    fitted = fit_linear_head(
        run.model, loaders.evaluation("train"), device=run.device, pos_weight=run.data.pos_weight,
        normalisation=run.normalisation,
    )  # fmt: skip
    print(f"head fitted on frozen features: loss {fitted['train_loss']:.4f} over {fitted['clips']} clips")
    return fitted


def _fit(run: _Run, loaders: _Loaders) -> tuple[list[dict[str, float]], int]:
    """Train with early stopping on the validation loss; the model ends at its best epoch.

    Returns
    -------
    history : list of dict
        One record per epoch.
    best_epoch : int
        The epoch whose weights the model holds; -1 when no epoch had a
        finite validation loss, in which case the initial weights are kept
        and a warning says so.
    """
    optim, model = run.config.optim, run.model
    assert model is not None
    # A regression is early-stopped on its own error over the validation videos that have a measurement.
    criterion = nn.MSELoss() if run.regresses else _criterion(run.data.task, run.data.pos_weight, run.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=optim.lr)
    steps_per_epoch = len(loaders.train) if optim.max_steps is None else min(len(loaders.train), optim.max_steps)
    scheduler = make_scheduler(optimizer, optim.lr_schedule, optim.lr, optim.epochs * steps_per_epoch)
    stopper = EarlyStopping(optim.patience)
    initial_state = copy.deepcopy(model.state_dict())
    best_state = initial_state
    history: list[dict[str, float]] = []
    has_val = bool(run.data.measured("val")[0] if run.regresses else run.data.videos["val"])
    _warn_short_patience(optim, has_val)
    for epoch in range(optim.epochs):
        loaders.train_set.set_epoch(epoch)
        started = time.monotonic()
        train_loss = train_one_epoch(
            model, loaders.train, optimizer, criterion, device=run.device, binary=run.binary,
            normalisation=run.normalisation, max_steps=optim.max_steps, progress=run.config.output.progress,
            scheduler=scheduler,
        )  # fmt: skip
        val_loss = float("nan")
        if has_val:
            _, val_loss = predict_clips(
                model, loaders.evaluation("val", measured=run.regresses), criterion, device=run.device,
                binary=run.binary, normalisation=run.normalisation,
            )  # fmt: skip
        seconds = round(time.monotonic() - started, 3)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "seconds": seconds})
        val_text = f"{val_loss:.4f}" if has_val else "n/a (no validation videos)"
        print(f"epoch {epoch}: train loss {train_loss:.4f}, val loss {val_text}")
        # Without a validation split the last epoch is kept.
        improved, stop = stopper.step(val_loss if has_val else -epoch, epoch)
        if improved:
            best_state = copy.deepcopy(model.state_dict())
        if stop:
            break
    model.load_state_dict(best_state)
    _say_where_stopped(stopper.best_epoch, len(history), has_val)
    if run.data.task in BINARY_TASKS and not run.regresses:
        warn_if_constant_answer(history, run.data.targets["train"], run.data.pos_weight, run.data.targets["val"])
    return history, stopper.best_epoch


def _warn_short_patience(optim: FinetuneOptim, has_val: bool) -> None:
    """Say when early stopping can end a one-cycle run before its decay (a seen failure, not a guess)."""
    if optim.lr_schedule == "onecycle" and has_val and optim.patience < optim.epochs:
        peak = math.ceil(ONECYCLE_WARMUP * optim.epochs)
        print(
            f"note: --patience {optim.patience} can stop this run before its one-cycle decay: validation losses "
            f"are noisiest around the peak (epoch {peak} of {optim.epochs}); a patience of {optim.epochs} runs "
            "the whole schedule and still keeps the best validation epoch",
            file=sys.stderr,
        )


def _say_where_stopped(best_epoch: int, epochs_run: int, has_val: bool) -> None:
    """Say when the kept weights are not what a reader would assume."""
    if best_epoch < 0:
        print(
            f"warning: no epoch of {epochs_run} had a finite validation loss; the bundle holds the INITIAL "
            "(untrained) weights. Lower --lr, or check the labels and the cache",
            file=sys.stderr,
        )
    elif has_val and best_epoch == epochs_run - 1 and epochs_run > 1:
        print(
            f"note: the validation loss was still falling at the last epoch ({best_epoch}); more --epochs may help",
            file=sys.stderr,
        )
    elif has_val and best_epoch == 0 and epochs_run > 1:
        print(
            "note: the best validation loss came after the first epoch; later epochs only overfit "
            "(a lower --lr may help)",
            file=sys.stderr,
        )


def _score(run: _Run, loaders: _Loaders) -> dict[str, object]:
    """Validation and test metrics of the fitted model, video and study level."""
    output, model = run.config.output, run.model
    assert model is not None
    criterion = _criterion(run.data.task, run.data.pos_weight, run.device)
    scored: dict[str, object] = {}
    for name in ("val", "test") if output.score_test else ("val",):
        if not run.data.videos[name]:
            continue
        probs, loss = predict_clips(
            model, loaders.evaluation(name), criterion, device=run.device, binary=run.binary,
            normalisation=run.normalisation,
        )  # fmt: skip
        scored[name] = {
            "loss": loss,
            **summarise(
                run.data.task, run.data.videos[name], run.data.targets[name], probs, run.data.labels,
                threshold=run.threshold, n_resamples=output.bootstrap, seed=run.config.optim.seed,
            ),
        }  # fmt: skip
    return scored


def split_record(run: _Run) -> SplitRecord:
    """What the bundle was made from: the archive's split and how each study was used."""
    d, data = run.config.dataset, run.data
    used: dict[str, tuple[str, ...]] = {
        "trained": tuple(sorted(data.train_studies)),
        "early-stopped": tuple(sorted({v["study_uid"] for v in data.videos["val"]})),
    }
    if run.pretrained_on:
        used["pretrained"] = run.pretrained_on
    return SplitRecord(
        train=tuple(run.splits["train"]), val=tuple(run.splits["val"]), test=tuple(run.splits["test"]), used=used,
        seed=d.split_seed, val_fraction=d.val_fraction, test_fraction=d.test_fraction,
        manifest_sha256=run.cache.manifest_sha256,
    )  # fmt: skip


def _write_bundle(run: _Run, out: Path, repeats: int, metrics: dict[str, object]) -> Path:
    """Save the bundle with its provenance and its split record."""
    config, data, model = run.config, run.data, run.model
    assert model is not None
    provenance = {
        "init": run.init_info,
        "data_manifest_sha256": run.cache.manifest_sha256,
        "labels_sha256": _file_sha256(config.dataset.labels),
        "code_revision": code_revision(),
        "config": flat_dict(config),
        "task_column": data.task if run.binary else "view (cache manifest)",
        "split": {name: len(studies) for name, studies in run.splits.items()},
        "split_scheme": SPLIT_SCHEME,
        "train_studies_used": len(data.train_studies),
        "train_videos": len(data.videos["train"]),
        "train_visits_per_epoch": repeats,
        "pos_weight": data.pos_weight,
        "target": config.dataset.target,
        "method": "EchoCLR fine-tuning (echonode)",
    }
    manifest_pre = run.cache.manifest["preprocess"]
    cache_cfg = PreprocessConfig()
    preprocessing = {
        **PreprocessConfig(
            size=config.dataset.size,
            clip_frames=config.dataset.frames,
            eval_clips=config.dataset.eval_clips,
            max_frames=int(manifest_pre.get("max_frames", cache_cfg.max_frames)),
            min_fps=float(manifest_pre.get("min_fps", cache_cfg.min_fps)),
            framing=str(manifest_pre.get("framing", cache_cfg.framing)),
            field_cm=float(manifest_pre.get("field_cm", cache_cfg.field_cm)),
            target_fps=None if manifest_pre.get("target_fps") is None else float(manifest_pre["target_fps"]),
        ).to_meta(),
        "normalisation": run.normalisation,
        # The node warns at load when it crops with another rule than these frames were.
        "sector_mask": run.cache.sector_mask_rule,
    }
    meta = BundleMeta.create(
        name=config.output.name or f"echonode-{data.task}",
        task=data.task,
        arch=config.model.arch,
        width=config.model.width,
        labels=data.labels,
        preprocessing=preprocessing,
        threshold=run.threshold,
        version=config.output.version,
        provenance=provenance,
        metrics=metrics,
    )
    extra_files: dict[str, str | bytes] = {SPLIT_FILE: split_record(run).to_json()}
    if config.output.calibration_clips > 0:
        clips, source = calibration_clips(run, config.output.calibration_clips)
        if clips is not None:
            extra_files[CALIBRATION_FILE] = encode_calibration(clips, source)
            meta.provenance["calibration"] = f"{clips.shape[0]} evaluation clips ({source}) in {CALIBRATION_FILE}"
    path = save_bundle(
        out, meta, {k: v.cpu() for k, v in model.state_dict().items()}, overwrite=config.output.overwrite,
        extra_files=extra_files,
    )  # fmt: skip
    print(f"bundle {path} (DeviceUID {meta.device_uid})")
    return path


def calibration_clips(run: _Run, n: int) -> tuple[np.ndarray | None, str]:
    """Up to ``n`` evaluation clips for the bundle's ``calibration.npz``.

    Validation videos first (the model did not learn them), then training
    videos; at most one clip per video, drawn by a seeded permutation, and
    the clip's position within the video varies from video to video. Each
    clip is made by the evaluation loader, so it is exactly what the
    node's preprocessing gives the network (before the bundle's
    normalisation).

    Returns
    -------
    clips : numpy.ndarray or None
        ``(k, T, S, S)`` grey clips in [0, 1], k <= n; None when the run has
        no videos.
    source : str
        ``"validation:a,training:b"``.
    """
    d = run.config.dataset
    rng = np.random.default_rng(run.config.optim.seed)
    picked: list[tuple[str, int]] = []
    for split in ("val", "train"):
        videos = run.data.videos.get(split, [])
        for index in rng.permutation(len(videos)):
            if len(picked) >= n:
                break
            picked.append((split, int(index)))
    if not picked:
        return None, "none"
    clips = []
    for i, (split, index) in enumerate(picked):
        dataset = ClipDataset(
            run.cache, [run.data.videos[split][index]], [run.data.targets[split][index]], d.frames, d.size,
            train=False, eval_clips=d.eval_clips,
        )  # fmt: skip
        video_clips, _ = dataset[0]
        clips.append(video_clips[i % video_clips.shape[0], 0].numpy())
    counts = {name: sum(1 for split, _ in picked if split == key) for key, name in (("val", "validation"), ("train", "training"))}
    return np.stack(clips), ",".join(f"{name}:{count}" for name, count in counts.items() if count)


def main(argv: list[str] | None = None) -> int:
    """``python -m train.finetune``."""
    parser = argparse.ArgumentParser(prog="echonode-train finetune", description=__doc__.splitlines()[0])
    add_finetune_arguments(parser)
    return run_finetune(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
