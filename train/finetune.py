"""Supervised fine-tuning into a model bundle.

``echonode-train finetune --data CACHE --labels CSV --task T --out BUNDLE
[--init RUN|random|FILE] [--fraction F] [--preset paper|tiny]``

* Tasks: ``lvh`` and ``severe_as`` (binary, PLAX videos, the study's label in
  the *task's own column* of ``labels.csv``; the public code trained its
  "LVH" models on the AS column) and ``view`` (multi-class, every video with
  a known view, the view from the cache manifest).
* Splits by patient (:func:`train.data.split_cache`, the same split as
  pretraining with the same labels file); the label fraction is sampled by
  study among the training studies with a fixed seed.
* Loss: ``BCEWithLogitsLoss(pos_weight = n_neg / n_pos)`` of the training
  videos; cross-entropy for ``view``. Adam; early stopping on the validation
  loss with patience, best weights kept.
* Output: a bundle (``echonode.bundle.save_bundle``) with a new DeviceUID and
  provenance (init, manifest hash, labels hash, config, code revision, split
  sizes) and validation / test metrics at video and study level.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from echonode.bundle import BINARY_TASKS, TASKS, BundleMeta, save_bundle
from echonode.nets import build_model, normalise_for_model
from train.augment import AugmentConfig
from train.data import (
    ClipCache,
    ClipDataset,
    load_study_labels,
    manifest_hash,
    split_cache,
)
from train.metrics import group_mean, multiclass_metrics, ranking_summary
from train.presets import add_preset_argument, apply_preset
from train.splits import sample_label_fraction

__all__ = [
    "EarlyStopping",
    "TaskData",
    "add_finetune_arguments",
    "main",
    "predict_clips",
    "prepare_task",
    "run_finetune",
    "train_one_epoch",
]


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
    """

    task: str
    labels: list[str]
    videos: dict[str, list[dict]]
    targets: dict[str, list[float | int]]
    train_studies: list[str]
    pos_weight: float | None


def prepare_task(
    cache: ClipCache,
    rows: Sequence[Mapping[str, str]],
    task: str,
    splits: Mapping[str, Sequence[str]],
    *,
    fraction: float = 1.0,
    fraction_seed: int = 0,
    views: Sequence[str] | None = None,
) -> TaskData:
    """Select the videos and targets of ``task`` for each split.

    Parameters
    ----------
    cache : ClipCache
    rows : sequence of mapping
        ``labels.csv`` rows (one per study).
    task : {"lvh", "severe_as", "view"}
    splits : mapping
        Split name -> study UIDs (from :func:`train.data.split_cache`).
    fraction : float
        Fraction of the labelled training studies used (by study).
    fraction_seed : int
        Seed of that draw.
    views : sequence of str, optional
        Views used for a binary task (default PLAX only).

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
    videos: dict[str, list[dict]] = {}
    targets: dict[str, list[float | int]] = {}
    if task in BINARY_TASKS:
        if rows and task not in rows[0]:
            raise ValueError(f"the labels file has no {task!r} column (columns: {', '.join(rows[0])})")
        # The label is read from the task's own column and nothing else.
        study_label = {r["study_uid"]: _binary(r[task]) for r in rows}
        study_label = {s: v for s, v in study_label.items() if v is not None}
        use_views = list(views) if views else ["plax"]
        train_pool = [s for s in splits["train"] if s in study_label]
        if not train_pool:
            raise ValueError(f"no labelled training studies for {task}")
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
        pos_weight: float | None = n_neg / n_pos
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
    return TaskData(task, labels, videos, targets, train_studies, pos_weight)


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
) -> float:
    """One pass over the training loader; returns the mean loss."""
    model.train()
    total, steps = 0.0, 0
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="finetune", unit="step", leave=False)
    for x, y in iterator:
        x = normalise_for_model(x.to(device, non_blocking=True), normalisation)
        loss = _loss(criterion, model(x), y.to(device), binary)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        steps += 1
        if max_steps is not None and steps >= max_steps:
            break
    return total / max(steps, 1)


@torch.no_grad()
def predict_clips(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module | None = None,
    *,
    device: torch.device,
    binary: bool,
    normalisation: str = "minmax",
) -> tuple[np.ndarray, float]:
    """Probabilities of every evaluation clip and the mean clip loss.

    Returns
    -------
    probs : numpy.ndarray
        ``(n_videos, n_clips)`` sigmoid probabilities, or
        ``(n_videos, n_clips, K)`` softmax for ``view``.
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
        probs = torch.sigmoid(logits[:, 0]) if binary else torch.softmax(logits.float(), dim=1)
        out.append(probs.reshape((b, k) + tuple(probs.shape[1:])).cpu().numpy())
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
    for m, momentum in zip(norms, saved):
        m.momentum = momentum


@torch.no_grad()
def _frozen_features(model: nn.Module, loader: DataLoader, *, device: torch.device, normalisation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder features of every evaluation clip (eval mode) and each clip's target."""
    model.eval()
    feats, targets = [], []
    for x, y in loader:
        k = x.shape[1]
        feats.append(model.features(normalise_for_model(x.flatten(0, 1).to(device), normalisation)).float().cpu())
        targets.append(y.repeat_interleave(k))
    return torch.cat(feats), torch.cat(targets)


def fit_linear_head(
    model: nn.Module,
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
        "study": ranking_summary(study_y.round().astype(int), study_probs, threshold=threshold, n_resamples=n_resamples, seed=seed),
        "n_studies": len(study_ids),
    }


def code_revision() -> str | None:
    """The git commit of this checkout, if any (for provenance)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def _file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def resolve_init(init: str, arch: str, width: int, num_outputs: int) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Initial weights for ``--init RUN|random|FILE``.

    A folder is a pretraining run: its ``encoder.pt`` (or, before the run
    finished, its ``checkpoint.pt``). Files go through
    :func:`train.init_bundle.init_weights`, which reads torchvision-format
    state dicts and EchoCLR checkpoints.
    """
    from train.init_bundle import InitError, init_weights

    if init == "random":
        return init_weights(None, arch, width, num_outputs)
    path = Path(init)
    info_extra: dict[str, object] = {}
    if path.is_dir():
        run = path
        path = run / "encoder.pt" if (run / "encoder.pt").is_file() else run / "checkpoint.pt"
        info_extra["pretrain_run"] = str(run)
        if (run / "split.json").is_file():
            info_extra["pretrain_split"] = json.loads((run / "split.json").read_text())
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


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``echonode-train finetune``, grouped by concern."""
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="clip cache folder")
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
    optim.add_argument("--max-steps", type=int, default=None, help="stop each epoch after N steps (smoke tests)")
    optim.add_argument("--seed", type=int, default=0)

    run = parser.add_argument_group("output")
    run.add_argument("--out", required=True, help="bundle folder to write")
    run.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    run.add_argument("--name", default=None, help="algorithm name (default echonode-<task>)")
    run.add_argument("--version", default="1")
    run.add_argument("--threshold", type=float, default=0.5)
    run.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples for the CIs")
    run.add_argument("--device", default="auto")
    run.add_argument("--no-progress", action="store_true")
    add_preset_argument(parser)


def _config_from(ns: argparse.Namespace) -> dict[str, object]:
    apply_preset(
        ns,
        {
            "frames": "finetune_frames",
            "batch": "finetune_batch",
            "lr": "finetune_lr",
            "epochs": "finetune_epochs",
        },
    )
    keys = (
        "data labels task fraction fraction_seed views val_fraction test_fraction split_seed size frames eval_clips "
        "workers init arch width dropout head_init batch lr epochs patience epoch_samples max_steps seed out name version threshold "
        "bootstrap device preset"
    ).split()
    config = {k: getattr(ns, k) for k in keys}
    config["progress"] = not ns.no_progress
    config["overwrite"] = bool(ns.overwrite)
    return config


def run_finetune(ns: argparse.Namespace) -> int:
    """Run ``echonode-train finetune``; returns the exit status (2: user error)."""
    config = _config_from(ns)
    try:
        finetune(config)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"echonode-train finetune: {exc}", file=sys.stderr)
        return 2
    return 0


def finetune(config: dict[str, object]) -> Path:
    """Fine-tune per ``config`` (see :func:`add_finetune_arguments`); returns the bundle path."""
    out = Path(str(config["out"]))
    if out.exists() and not config.get("overwrite"):
        raise FileExistsError(f"{out} exists; pass --overwrite or choose another --out")
    device_arg = str(config["device"])
    device = torch.device("cuda" if device_arg == "auto" and torch.cuda.is_available() else ("cpu" if device_arg == "auto" else device_arg))
    seed = int(config["seed"])
    torch.manual_seed(seed)
    task = str(config["task"])
    binary = task in BINARY_TASKS

    cache = ClipCache(str(config["data"]))
    rows = load_study_labels(str(config["labels"]))
    splits = split_cache(
        cache, rows, val_fraction=float(config["val_fraction"]), test_fraction=float(config["test_fraction"]),
        seed=int(config["split_seed"]),
    )  # fmt: skip
    views = [v.strip() for v in str(config["views"]).split(",")] if config["views"] else None
    data = prepare_task(
        cache, rows, task, splits, fraction=float(config["fraction"]), fraction_seed=int(config["fraction_seed"]), views=views
    )
    num_outputs = 1 if binary else len(data.labels)
    arch, width = str(config["arch"]), int(config["width"])
    state, init_info = resolve_init(str(config["init"]), arch, width, num_outputs)
    pretrain_split = init_info.pop("pretrain_split", None)
    if isinstance(pretrain_split, Mapping):
        # Pretraining must not have seen this run's evaluation patients.
        seen = set(pretrain_split.get("train", []))
        leak = sorted(seen & (set(splits["val"]) | set(splits["test"])))
        init_info["pretrain_eval_overlap_studies"] = len(leak)
        if leak:
            print(
                f"warning: {len(leak)} validation/test studies were in the pretraining split; "
                "pretrain with the same --labels and split settings",
                file=sys.stderr,
            )
    normalisation = "kinetics" if init_info.get("init") == "kinetics" else "minmax"
    model = build_model(arch, num_outputs, width=width, dropout=float(config["dropout"]))
    model.load_state_dict(state, strict=True)
    model.to(device)

    size, frames, eval_clips = int(config["size"]), int(config["frames"]), int(config["eval_clips"])
    workers = int(config["workers"])
    n_train = len(data.videos["train"])
    epoch_samples = config.get("epoch_samples")
    repeats = max(1, math.ceil(int(epoch_samples) / n_train)) if epoch_samples else 1
    train_ds = ClipDataset(
        cache, data.videos["train"], data.targets["train"], frames, size, train=True, augment=AugmentConfig(), seed=seed,
        repeats=repeats,
    )  # fmt: skip
    loader = DataLoader(
        train_ds, batch_size=int(config["batch"]), shuffle=True, num_workers=workers, drop_last=False,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip

    def eval_loader(name: str) -> DataLoader:
        ds = ClipDataset(cache, data.videos[name], data.targets[name], frames, size, train=False, eval_clips=eval_clips)
        return DataLoader(ds, batch_size=max(1, int(config["batch"]) // eval_clips), num_workers=workers)

    criterion = _criterion(task, data.pos_weight, device)
    head_fit = None
    if config.get("head_init", "random") == "probe":
        if init_info.get("head") != "new":
            raise ValueError("--head-init probe fits a new head; the init already has one for this task")
        head_fit = fit_linear_head(
            model, eval_loader("train"), device=device, pos_weight=data.pos_weight, normalisation=normalisation
        )
        print(f"head fitted on frozen features: loss {head_fit['train_loss']:.4f} over {head_fit['clips']} clips")
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config["lr"]))
    stopper = EarlyStopping(int(config["patience"]))
    best_state = copy.deepcopy(model.state_dict())
    history = []
    has_val = bool(data.videos["val"])
    for epoch in range(int(config["epochs"])):
        train_ds.set_epoch(epoch)
        started = time.monotonic()
        train_loss = train_one_epoch(
            model, loader, optimizer, criterion, device=device, binary=binary, normalisation=normalisation,
            max_steps=config["max_steps"], progress=bool(config["progress"]),  # type: ignore[arg-type]
        )  # fmt: skip
        val_loss = float("nan")
        if has_val:
            _, val_loss = predict_clips(model, eval_loader("val"), criterion, device=device, binary=binary, normalisation=normalisation)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "seconds": round(time.monotonic() - started, 3)})
        val_text = f"{val_loss:.4f}" if has_val else "n/a (no validation videos)"
        print(f"epoch {epoch}: train loss {train_loss:.4f}, val loss {val_text}")
        # Without a validation split the last epoch is kept.
        improved, stop = stopper.step(val_loss if has_val else -epoch, epoch)
        if improved:
            best_state = copy.deepcopy(model.state_dict())
        if stop:
            break
    model.load_state_dict(best_state)

    metrics: dict[str, object] = {"best_epoch": stopper.best_epoch, "history": history}
    if head_fit is not None:
        metrics["head_fit"] = head_fit
    for name in ("val", "test"):
        if not data.videos[name]:
            continue
        probs, loss = predict_clips(model, eval_loader(name), criterion, device=device, binary=binary, normalisation=normalisation)
        metrics[name] = {
            "loss": loss,
            **summarise(
                task, data.videos[name], data.targets[name], probs, data.labels, threshold=float(config["threshold"]),
                n_resamples=int(config["bootstrap"]), seed=seed,
            ),
        }  # fmt: skip

    provenance = {
        "init": init_info,
        "data_manifest_sha256": manifest_hash(cache.root),
        "labels_sha256": _file_sha256(str(config["labels"])),
        "code_revision": code_revision(),
        "config": config,
        "task_column": task if binary else "view (cache manifest)",
        "split": {name: len(studies) for name, studies in splits.items()},
        "train_studies_used": len(data.train_studies),
        "train_videos": len(data.videos["train"]),
        "train_visits_per_epoch": repeats,
        "pos_weight": data.pos_weight,
        "method": "EchoCLR fine-tuning (echonode)",
    }
    preprocessing = {
        "size": size,
        "clip_frames": frames,
        "eval_clips": eval_clips,
        "max_frames": int(cache.manifest["preprocess"].get("max_frames", 100)),
        "min_fps": float(cache.manifest["preprocess"].get("min_fps", 25.0)),
        "normalisation": normalisation,
    }
    meta = BundleMeta.create(
        name=str(config["name"] or f"echonode-{task}"),
        task=task,
        arch=arch,
        width=width,
        labels=data.labels,
        preprocessing=preprocessing,
        threshold=float(config["threshold"]),
        version=str(config["version"]),
        provenance=provenance,
        metrics=metrics,
    )
    path = save_bundle(out, meta, {k: v.cpu() for k, v in model.state_dict().items()}, overwrite=bool(config.get("overwrite")))
    print(f"bundle {path} (DeviceUID {meta.device_uid})")
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m train.finetune``."""
    parser = argparse.ArgumentParser(prog="echonode-train finetune", description=__doc__.splitlines()[0])
    add_finetune_arguments(parser)
    return run_finetune(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
