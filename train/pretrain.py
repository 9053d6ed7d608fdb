"""Self-supervised pretraining: EchoCLR, MI-SimCLR and SimCLR.

``echonode-train pretrain --data CACHE --out RUN [--method ...] [--preset ...]``

* EchoCLR: multi-instance pairs (two distinct PLAX videos of a study) with
  NT-Xent on a projector, plus a 24-way frame-reordering head; loss 1:1.
* MI-SimCLR: the same pairs, no reordering. SimCLR: one clip, two views.

The run folder holds ``config.json``, ``split.json`` (the training studies),
``checkpoint.pt`` (resumable; a plain dict loadable with
``weights_only=True``), ``metrics.jsonl`` (one line per epoch) and, at the
end, ``encoder.pt``: the backbone's state dict in torchvision's layout
(without ``fc``), which ``finetune --init RUN`` and ``init --weights`` load.

Distributed: run under ``torchrun``; gloo on the CPU, nccl on GPUs. ``--batch``
is the *global* number of pairs per step (the paper's 392 = 2 x 196);
NT-Xent gathers negatives across ranks, so a run on W processes takes the same
steps as one process would with the whole batch (up to BatchNorm statistics,
which are per process; ``--bn-groups W`` reproduces those on one process).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from echonode.bundles.nets import build_model
from echonode.durable import replacing, write_json, write_text
from train.augment import AugmentConfig
from train.cache import ClipCache, cache_argument, split_cache
from train.configs import flat_dict, from_namespace
from train.datasets import METHODS, PairDataset
from train.distributed import setup_distributed
from train.losses import NUM_PERMUTATIONS, REORDER_FRAMES, nt_xent_loss, reorder_loss
from train.presets import add_preset_argument, apply_preset
from train.splits import SPLIT_FILE, SplitRecord

__all__ = [
    "PretrainModel",
    "add_pretrain_arguments",
    "main",
    "pretrain_step",
    "reorder_at_chance",
    "run_pretrain",
    "train_one_epoch",
]

CHECKPOINT = "checkpoint.pt"
ENCODER = "encoder.pt"
METRICS = "metrics.jsonl"
# Settings that may differ between a run and its resumption; anything else
# changing would make the checkpoint a different experiment.
# "labels" no longer shapes the split, so a run resumed with or without it is the same run.
_RESUMABLE_CHANGES = {"epochs", "workers", "progress", "device", "max_steps", "data", "out", "amp", "labels"}


class PretrainModel(nn.Module):
    """Backbone + projector (+ reordering head).

    Parameters
    ----------
    arch : str
        ``r3d_18`` or ``r2plus1d_18``.
    width : int
        Base width (64 = the published network, 512-d features).
    reorder : bool
        Add the ``Linear(features, 24)`` frame-reordering head.
    proj_hidden, proj_dim : int, optional
        Projector sizes; default 256 and 128 scaled by ``width / 64``
        (``Linear(512, 256, bias=False) - ReLU - Linear(256, 128, bias=False)``
        at width 64).
    """

    def __init__(
        self,
        arch: str = "r3d_18",
        width: int = 64,
        reorder: bool = True,
        proj_hidden: int | None = None,
        proj_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.encoder = build_model(arch, 1, width=width, dropout=0.0)
        # The SSL model has no classification head; an Identity keeps it out
        # of the state dict and out of DDP's parameter set.
        self.encoder.fc = nn.Identity()  # type: ignore[assignment]  # fc is a Linear in every classifier but this one
        feat = self.encoder.feature_dim
        hidden = proj_hidden or 4 * width
        out = proj_dim or 2 * width
        self.projector = nn.Sequential(
            nn.Linear(feat, hidden, bias=False), nn.ReLU(inplace=True), nn.Linear(hidden, out, bias=False)
        )
        self.reorder_head = nn.Linear(feat, NUM_PERMUTATIONS) if reorder else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return projections ``(B, proj_dim)`` and reordering logits ``(B, 24)`` or None."""
        h = self.encoder.features(x)
        r = self.reorder_head(h) if self.reorder_head is not None else None
        return self.projector(h), r


@dataclass
class StepOutput:
    """Losses of one step (tensors; ``loss`` carries the graph)."""

    loss: torch.Tensor
    nce: torch.Tensor
    reorder: torch.Tensor
    reorder_correct: torch.Tensor
    n: int


def _forward_groups(
    model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, bn_groups: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Forward both views, BatchNorm statistics computed per group of pairs.

    Group ``g`` holds pairs ``g, g + G, ...``: the pairs a ``DistributedSampler``
    gives rank ``g`` of ``G``, so one process with ``bn_groups=G`` computes
    what ``G`` processes compute.
    """
    n = x1.shape[0]
    if bn_groups <= 1:
        z, r = model(torch.cat([x1, x2]))
        return z[:n], z[n:], (r[:n], r[n:]) if r is not None else None
    # Group by group, in order: item g of each list is group g's.
    z1: list[torch.Tensor] = []
    z2: list[torch.Tensor] = []
    r1: list[torch.Tensor] = []
    r2: list[torch.Tensor] = []
    for g in range(bn_groups):
        idx = torch.arange(g, n, bn_groups, device=x1.device)
        m = idx.numel()
        z, r = model(torch.cat([x1[idx], x2[idx]]))
        z1.append(z[:m])
        z2.append(z[m:])
        if r is not None:
            r1.append(r[:m])
            r2.append(r[m:])
    order = torch.cat([torch.arange(g, n, bn_groups) for g in range(bn_groups)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    inverse = inverse.to(x1.device)
    z1c, z2c = torch.cat(z1)[inverse], torch.cat(z2)[inverse]
    if not r1:
        return z1c, z2c, None
    return z1c, z2c, (torch.cat(r1)[inverse], torch.cat(r2)[inverse])


def pretrain_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    temperature: float = 0.05,
    reorder: bool = True,
    bn_groups: int = 1,
) -> StepOutput:
    """Loss of one batch of pairs (no backward).

    Parameters
    ----------
    model : nn.Module
        A :class:`PretrainModel` (possibly DDP-wrapped).
    batch : dict
        ``x1``, ``x2`` ``(N, 3, T, S, S)`` and ``perm1``, ``perm2`` ``(N,)``, on
        the model's device.
    temperature : float
        NT-Xent temperature.
    reorder : bool
        Add the reordering cross-entropy (EchoCLR), weight 1.
    bn_groups : int
        See :func:`_forward_groups`.
    """
    z1, z2, r = _forward_groups(model, batch["x1"], batch["x2"], bn_groups)
    nce = nt_xent_loss(z1, z2, temperature)
    zero = nce.new_zeros(())
    if reorder and r is not None:
        logits = torch.cat(r)
        labels = torch.cat([batch["perm1"], batch["perm2"]])
        rl = reorder_loss(logits, labels)
        correct = (logits.argmax(1) == labels).sum()
        return StepOutput(nce + rl, nce.detach(), rl.detach(), correct.detach(), int(labels.numel()))
    return StepOutput(nce, nce.detach(), zero, zero, 0)


#: Epochs after which a reordering head still at chance earns a warning.
REORDER_WARN_AFTER_EPOCHS = 5


def reorder_at_chance(accuracy: float, clips: int) -> bool:
    """Whether a reordering accuracy is indistinguishable from guessing.

    Parameters
    ----------
    accuracy : float
        Share of clips whose permutation the head named (an epoch's mean).
    clips : int
        Clips it was measured on.

    Returns
    -------
    bool
        True when ``accuracy`` is below chance (1/24) plus three binomial
        standard errors: the head has learned nothing that shows, and its
        loss adds only gradient noise to the encoder.
    """
    if clips < 1:
        return False
    chance = 1.0 / NUM_PERMUTATIONS
    return accuracy < chance + 3.0 * (chance * (1.0 - chance) / clips) ** 0.5


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _mean_over_ranks(values: list[float]) -> list[float]:
    rank, world = _world()
    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = t.to(backend_device)
        dist.all_reduce(t)
        t = t.cpu() / world
    return t.tolist()


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    temperature: float = 0.05,
    reorder: bool = True,
    bn_groups: int = 1,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    max_steps: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean losses (averaged over ranks).

    Parameters
    ----------
    model, loader, optimizer
        As usual; ``model`` in training mode is set here.
    device : torch.device
    temperature, reorder, bn_groups
        See :func:`pretrain_step`.
    amp_dtype : torch.dtype, optional
        Autocast dtype on CUDA (bf16 or fp16); None for full precision.
    scaler : torch.amp.GradScaler, optional
        For fp16.
    max_steps : int, optional
        Stop after this many steps (smoke tests).
    progress : bool
        tqdm bar.

    Returns
    -------
    dict
        Mean ``loss``, ``nce``, ``reorder``, ``reorder_acc`` (over ranks),
        ``steps``, and this rank's ``data_wait_fraction`` (share of the epoch
        spent waiting for the loader) and ``pairs_per_second``.
    """
    model.train()
    totals = np.zeros(4)
    steps = pairs = 0
    iterator: Iterable[dict[str, torch.Tensor]] = loader
    bar = None
    if progress:
        # Late: tqdm comes with the train extra, needed only for a progress bar.
        from tqdm import tqdm

        iterator = bar = tqdm(loader, desc="pretrain", unit="step", leave=False)
    # Time spent waiting for the loader vs the whole epoch: the measure of
    # whether the data pipeline keeps the accelerator busy (add --workers
    # while data_wait_fraction is more than a few per cent). The loss read
    # below synchronises CUDA every step, so the step time is real.
    batches = iter(iterator)
    started = time.perf_counter()
    waited = 0.0
    while True:
        before = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            break
        waited += time.perf_counter() - before
        pairs += int(batch["x1"].shape[0])
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        autocast: AbstractContextManager[object]
        if amp_dtype is not None:
            autocast = torch.autocast(device.type, dtype=amp_dtype)
        else:
            autocast = nullcontext()
        with autocast:
            out = pretrain_step(model, batch, temperature=temperature, reorder=reorder, bn_groups=bn_groups)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(out.loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            out.loss.backward()
            optimizer.step()
        acc = float(out.reorder_correct) / out.n if out.n else 0.0
        totals += [float(out.loss.detach()), float(out.nce), float(out.reorder), acc]
        steps += 1
        if bar is not None:
            bar.set_postfix(loss=f"{float(out.loss.detach()):.3f}")
        if max_steps is not None and steps >= max_steps:
            break
    elapsed = max(time.perf_counter() - started, 1e-9)
    means = (totals / max(steps, 1)).tolist()
    loss, nce, rl, acc = _mean_over_ranks(means)
    return {
        "loss": loss, "nce": nce, "reorder": rl, "reorder_acc": acc, "steps": steps,
        # Per rank (rank 0 writes the metrics): pairs this process trained on per second.
        "data_wait_fraction": round(waited / elapsed, 4), "pairs_per_second": round(pairs / elapsed, 2),
    }  # fmt: skip


# --------------------------------------------------------------------------
# Wiring


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``echonode-train pretrain``, grouped by concern.

    Every hyperparameter defaults to None and is filled from ``--preset``.
    """
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, nargs="+", metavar="CACHE",
                      help="clip cache folder(s) from `echonode-train index` (several: read as one, e.g. shards)")
    data.add_argument(
        "--labels", default=None,
        help="ignored: the patient split no longer depends on labels (accepted so that older command lines run)",
    )  # fmt: skip
    data.add_argument("--views", default="plax", help="comma-separated views to use, or 'all' (default: plax)")
    data.add_argument("--val-fraction", type=float, default=0.1)
    data.add_argument("--test-fraction", type=float, default=0.2)
    data.add_argument("--split-seed", type=int, default=0)
    data.add_argument("--size", type=int, default=None, help="frame side fed to the network")
    data.add_argument("--frames", type=int, default=None, help="frames per clip (4 for reordering)")
    data.add_argument("--workers", type=int, default=None, help="data-loader workers per process")

    model = parser.add_argument_group("model")
    model.add_argument("--method", choices=METHODS, default="echoclr")
    model.add_argument("--arch", choices=("r3d_18", "r2plus1d_18"), default=None)
    model.add_argument("--width", type=int, default=None, help="base width (64 = published network)")
    model.add_argument("--proj-hidden", type=int, default=None)
    model.add_argument("--proj-dim", type=int, default=None)

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch", type=int, default=None, help="pairs per step over all processes")
    optim.add_argument("--lr", type=float, default=None)
    optim.add_argument("--epochs", type=int, default=None)
    optim.add_argument("--max-steps", type=int, default=None, help="stop each epoch after N steps (smoke tests)")
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument("--bn-groups", type=int, default=1, help="BatchNorm groups per process (emulate N GPUs)")

    loss = parser.add_argument_group("loss")
    loss.add_argument("--temperature", type=float, default=None)

    run = parser.add_argument_group("run")
    run.add_argument("--out", required=True, help="run folder (resumed when it holds a checkpoint)")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (under torchrun: the local rank's GPU)")
    run.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto", help="mixed precision on CUDA")
    run.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs")
    run.add_argument("--no-progress", action="store_true")
    add_preset_argument(parser)


@dataclass(frozen=True)
class PretrainData:
    """The cache, the views, the patient split and the clips."""

    #: One cache's path, or several (:func:`train.cache.cache_argument`).
    data: str | tuple[str, ...]
    labels: str | None = None
    views: str = "plax"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    size: int = 112
    frames: int = REORDER_FRAMES
    workers: int = 8


@dataclass(frozen=True)
class PretrainModelSettings:
    """The method (EchoCLR or an ablation) and the network."""

    method: str = "echoclr"
    arch: str = "r3d_18"
    width: int = 64
    proj_hidden: int | None = None
    proj_dim: int | None = None


@dataclass(frozen=True)
class PretrainOptim:
    """Optimisation: pairs per step over all processes, Adam, epochs."""

    batch: int = 392
    lr: float = 0.1
    epochs: int = 300
    max_steps: int | None = None
    seed: int = 0
    bn_groups: int = 1


@dataclass(frozen=True)
class PretrainLoss:
    """NT-Xent's temperature (the reordering term has no setting)."""

    temperature: float = 0.05


@dataclass(frozen=True)
class PretrainRun:
    """Where the run goes and how it runs."""

    out: str
    device: str = "auto"
    amp: str = "auto"
    sync_bn: bool = False
    progress: bool = True
    preset: str = "paper"


@dataclass(frozen=True)
class PretrainConfig:
    """Every setting of ``echonode-train pretrain``, by concern.

    The checkpoint and ``config.json`` store it as one flat plain dict
    (:func:`train.configs.flat_dict`), the keys older runs have.
    """

    dataset: PretrainData
    model: PretrainModelSettings
    optim: PretrainOptim
    loss: PretrainLoss
    run: PretrainRun


def _config_from(ns: argparse.Namespace) -> PretrainConfig:
    ns.data = cache_argument(ns.data)
    apply_preset(
        ns,
        {
            "frames": "pretrain_frames",
            "batch": "pretrain_batch",
            "lr": "pretrain_lr",
            "epochs": "pretrain_epochs",
        },
    )
    return from_namespace(PretrainConfig, ns, progress=not ns.no_progress)


def _amp(device: torch.device, choice: str) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    if device.type != "cuda" or choice == "off":
        return None, None
    if choice == "bf16" or (choice == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def _atomic_torch_save(obj: object, path: Path) -> None:
    with replacing(path) as tmp:
        torch.save(obj, tmp)


def _rng_state() -> dict[str, object]:
    state: dict[str, object] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _check_resume(saved: Mapping[str, object], config: Mapping[str, object]) -> None:
    changed = {k for k in config if k not in _RESUMABLE_CHANGES and saved.get(k) != config.get(k)}
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in sorted(changed))
        raise ValueError(f"{config['out']}: the checkpoint was made with other settings ({detail}); use a new --out")


def run_pretrain(ns: argparse.Namespace) -> int:
    """Run ``echonode-train pretrain``; returns the exit status.

    Resumes from ``RUN/checkpoint.pt`` when present. Returns 2 for a
    user error (message printed, no traceback).
    """
    config = _config_from(ns)
    try:
        return _pretrain(config)
    except (FileNotFoundError, ValueError) as exc:
        print(f"echonode-train pretrain: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Processes:
    """This process's place in the run: device, rank and world size."""

    device: torch.device
    rank: int
    world: int

    @property
    def leader(self) -> bool:
        return self.rank == 0


@dataclass
class _State:
    """The model, its optimiser and mixed-precision state, and where the run is."""

    model: PretrainModel
    optimizer: torch.optim.Optimizer
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    epoch: int = 0
    step: int = 0


def _pretrain(config: PretrainConfig) -> int:
    """Wire the steps: processes, data, model, resume, epochs, export."""
    device, rank, world, _ = setup_distributed(config.run.device)
    procs = _Processes(device, rank, world)
    out = Path(config.run.out)
    if procs.leader:
        out.mkdir(parents=True, exist_ok=True)
    if config.optim.batch % world:
        raise ValueError(f"--batch {config.optim.batch} must be divisible by the number of processes ({world})")
    _seed_everything(config.optim.seed)
    cache, splits, dataset = _training_pairs(config, procs)
    sampler, loader, per_rank = _pair_loader(dataset, config, procs)
    state = _build_state(config, procs)
    _resume_or_start(out, config, state, procs, record=_split_record(config, cache, splits, dataset))
    net = _distributed(state.model, config, procs)
    _train_epochs(out, config, state, net, sampler, loader, dataset, per_rank, procs)
    if procs.leader:
        _atomic_torch_save(state.model.encoder.state_dict(), out / ENCODER)
    if world > 1:
        dist.barrier()
    return 0


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _training_pairs(config: PretrainConfig, procs: _Processes) -> tuple[ClipCache, dict[str, list[str]], PairDataset]:
    """The cache, its patient split, and the positive pairs of the training split."""
    d = config.dataset
    cache = ClipCache(d.data)
    if d.labels and procs.leader:
        print("note: --labels is ignored; the patient split depends on the split settings only", file=sys.stderr)
    splits = split_cache(cache, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.split_seed)
    views = None if d.views.lower() == "all" else [v.strip() for v in d.views.split(",")]
    dataset = PairDataset(
        cache, splits["train"], method=config.model.method, clip_frames=d.frames, size=d.size, views=views,
        augment=AugmentConfig.for_size(d.size), seed=config.optim.seed,
    )  # fmt: skip
    if len(dataset) == 0:
        raise ValueError(
            f"{d.data}: no training videos of view(s) {d.views}; index with a videos.csv that names views, or pass --views all"
        )
    return cache, splits, dataset


def _pair_loader(
    dataset: PairDataset, config: PretrainConfig, procs: _Processes
) -> tuple[DistributedSampler[int], DataLoader, int]:
    """The sampler, the loader and the pairs per process and step."""
    # A cache smaller than one batch (tests, demos) still trains.
    per_rank = max(1, min(config.optim.batch // procs.world, len(dataset) // procs.world))
    # DistributedSampler also on one process: the order of pairs is then the
    # same whatever the number of processes, which is what makes a run on W
    # processes comparable with one process.
    sampler: DistributedSampler[int] = DistributedSampler(
        dataset, num_replicas=procs.world, rank=procs.rank, shuffle=True, seed=config.optim.seed, drop_last=False
    )
    loader = DataLoader(
        dataset, batch_size=per_rank, sampler=sampler, num_workers=config.dataset.workers,
        pin_memory=procs.device.type == "cuda", drop_last=True, persistent_workers=False,
    )  # fmt: skip
    return sampler, loader, per_rank


def _build_state(config: PretrainConfig, procs: _Processes) -> _State:
    m = config.model
    model = PretrainModel(
        m.arch, m.width, reorder=m.method == "echoclr", proj_hidden=m.proj_hidden, proj_dim=m.proj_dim
    ).to(procs.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr, weight_decay=0.0)
    amp_dtype, scaler = _amp(procs.device, config.run.amp)
    return _State(model, optimizer, amp_dtype, scaler)


def _split_record(
    config: PretrainConfig, cache: ClipCache, splits: Mapping[str, Sequence[str]], dataset: PairDataset
) -> SplitRecord:
    d = config.dataset
    return SplitRecord(
        train=tuple(splits["train"]), val=tuple(splits["val"]), test=tuple(splits["test"]),
        used={"pretrained": dataset.studies}, seed=d.split_seed, val_fraction=d.val_fraction,
        test_fraction=d.test_fraction, manifest_sha256=cache.manifest_sha256,
    )  # fmt: skip


def _resume_or_start(out: Path, config: PretrainConfig, state: _State, procs: _Processes, *, record: SplitRecord) -> None:
    """Load the run's checkpoint when it has one (same settings only); else write its config and split."""
    flat = flat_dict(config)
    ckpt_path = out / CHECKPOINT
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=procs.device, weights_only=True)
        _check_resume(ckpt["config"], flat)
        state.model.load_state_dict(ckpt["model"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
        if state.scaler is not None and ckpt.get("scaler"):
            state.scaler.load_state_dict(ckpt["scaler"])
        state.epoch, state.step = int(ckpt["epoch"]), int(ckpt["step"])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if procs.leader:
            print(f"resuming {out} at epoch {state.epoch}")
    elif procs.leader:
        write_json(out / "config.json", flat)
        write_text(out / SPLIT_FILE, record.to_json())


def _distributed(model: nn.Module, config: PretrainConfig, procs: _Processes) -> nn.Module:
    if procs.world == 1:
        return model
    net = model
    if config.run.sync_bn and procs.device.type == "cuda":
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return DistributedDataParallel(net, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)


def _train_epochs(
    out: Path,
    config: PretrainConfig,
    state: _State,
    net: nn.Module,
    sampler: DistributedSampler[int],
    loader: DataLoader,
    dataset: PairDataset,
    per_rank: int,
    procs: _Processes,
) -> None:
    """Run the remaining epochs; the leader logs and checkpoints each one."""
    reorder = config.model.method == "echoclr"
    warned = False
    for epoch in range(state.epoch, config.optim.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        started = time.monotonic()
        stats = train_one_epoch(
            net, loader, state.optimizer, device=procs.device, temperature=config.loss.temperature, reorder=reorder,
            bn_groups=config.optim.bn_groups, amp_dtype=state.amp_dtype, scaler=state.scaler,
            max_steps=config.optim.max_steps, progress=config.run.progress and procs.leader,
        )  # fmt: skip
        state.step += int(stats["steps"])
        state.epoch = epoch + 1
        if not procs.leader:
            continue
        seconds = round(time.monotonic() - started, 3)
        _checkpoint(out, config, state, {"epoch": epoch, "step": state.step, "seconds": seconds, **stats})
        print(
            f"epoch {epoch}: loss {stats['loss']:.4f} (nce {stats['nce']:.4f}, reorder {stats['reorder']:.4f}), "
            f"{stats['pairs_per_second']:.0f} pairs/s, waiting for data {stats['data_wait_fraction']:.0%}"
        )
        clips = int(stats["steps"]) * per_rank * 2 * procs.world
        if reorder and not warned and epoch + 1 >= REORDER_WARN_AFTER_EPOCHS and reorder_at_chance(stats["reorder_acc"], clips):
            warned = True
            print(
                f"warning: after {epoch + 1} epochs the frame-reordering head is at chance (accuracy "
                f"{stats['reorder_acc']:.3f}, chance {1 / NUM_PERMUTATIONS:.3f}): its loss adds only noise to the "
                "encoder. See docs/training.md, 'When the reordering head stays at chance'.",
                file=sys.stderr,
            )


def _checkpoint(out: Path, config: PretrainConfig, state: _State, record: Mapping[str, object]) -> None:
    """Append the epoch's figures to metrics.jsonl and write the resumable checkpoint."""
    with open(out / METRICS, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    _atomic_torch_save(
        {
            "model": state.model.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scaler": state.scaler.state_dict() if state.scaler is not None else None,
            "epoch": state.epoch,
            "step": state.step,
            "config": flat_dict(config),
            "rng": _rng_state(),
        },
        out / CHECKPOINT,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m train.pretrain`` (what torchrun launches)."""
    parser = argparse.ArgumentParser(prog="echonode-train pretrain", description=__doc__.splitlines()[0])
    add_pretrain_arguments(parser)
    return run_pretrain(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
