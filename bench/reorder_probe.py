"""Frame reordering: does the data carry the order, and does the network learn it?

EchoCLR's second loss asks a 24-way head which of the 4! orderings a 4-frame
clip was shuffled by. When that head stays at chance (accuracy 1/24, loss
ln 24) its loss adds only gradient noise to pretraining. This script tells
apart the two reasons it can stay there, on a label-efficiency work folder
(``bench/label_efficiency.py --out``):

1. **cue**: a multinomial logistic regression on hand-made features of each
   permuted clip (the mean absolute difference between every pair of its 4
   frames, divided by their mean so that it ignores how fast the heart
   moves) fitted on clips of the training split and scored on clips of the
   validation split. Well above chance means the frames carry their order at
   this frame size.
2. **network**: the r3d_18 encoder plus the ``Linear(features, 24)`` head,
   trained on the reordering loss *alone* (``--epochs`` over the training
   pairs, the pretraining data pipeline and augmentation), scored on the same
   held-out clips; and, for each ``--runs`` folder, an EchoCLR pretraining
   run's own encoder and head.

The ratio printed is network accuracy over cue accuracy: 1 means the network
finds what the frames hold.

Usage::

    .venv/bin/python -m bench.reorder_probe --work ~/.cache/echonode/le-v2 --runs pretrain/echoclr
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parent.parent

CHANCE = 1 / 24


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bench.workdir import add_work_arguments

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_work_arguments(p)
    p.add_argument("--runs", nargs="*", default=[], help="EchoCLR pretraining run folders to score (relative to --work)")
    p.add_argument("--width", type=int, default=8, help="width of the network trained on reordering alone")
    p.add_argument("--epochs", type=int, default=20, help="epochs of reordering-only training (0: skip)")
    p.add_argument("--batch", type=int, default=32, help="pairs a step (two clips each)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cue-passes", type=int, default=3, help="passes over the training pairs for the cue's clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def pair_dataset(cache, studies: list[str], ns: argparse.Namespace, seed: int):
    """EchoCLR pairs as pretraining draws them (augmented, then permuted)."""
    from train.augment import AugmentConfig
    from train.datasets import PairDataset

    return PairDataset(cache, studies, method="echoclr", clip_frames=4, size=ns.size, views=("plax",),
                       augment=AugmentConfig(), seed=seed)  # fmt: skip


def clips_of(dataset, passes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every clip (both views of every pair) of ``passes`` epochs, and its permutation label."""
    xs, ys = [], []
    for epoch in range(passes):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            item = dataset[i]
            xs += [item["x1"], item["x2"]]
            ys += [int(item["perm1"]), int(item["perm2"])]
    return torch.stack(xs), torch.tensor(ys)


def difference_features(clips: torch.Tensor) -> torch.Tensor:
    """Mean |frame i - frame j| for the 6 frame pairs, over their mean, and their products.

    ``clips`` is ``(N, C, 4, S, S)``; the result ``(N, 42)``: the 6 scaled
    differences and their 36 pairwise products.
    """
    f = clips[:, 0]
    d = torch.stack([(f[:, i] - f[:, j]).abs().mean((1, 2)) for i in range(4) for j in range(i + 1, 4)], 1)
    d = d / d.mean(1, keepdim=True).clamp_min(1e-8)
    return torch.cat([d, (d[:, :, None] * d[:, None, :]).flatten(1)], 1)


def cue_accuracy(train: tuple[torch.Tensor, torch.Tensor], held_out: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Held-out accuracy of a multinomial logistic regression on :func:`difference_features`."""
    x, y = difference_features(train[0]), train[1]
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], 24, requires_grad=True)
    b = torch.zeros(24, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    xt = (difference_features(held_out[0]) - mean) / std
    with torch.no_grad():
        return float(((xt @ w + b).argmax(1) == held_out[1]).float().mean())


@torch.no_grad()
def network_accuracy(model, held_out: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Held-out accuracy of a :class:`train.pretrain.PretrainModel`'s reordering head."""
    model.eval()
    x, y = held_out
    logits = torch.cat([model(x[i : i + 128])[1] for i in range(0, len(x), 128)])
    return float((logits.argmax(1) == y).float().mean())


def train_reorder_only(cache, studies: list[str], ns: argparse.Namespace, held_out) -> list[dict[str, float]]:
    """Train encoder + head on the reordering loss alone; one record per epoch."""
    from torch.utils.data import DataLoader

    from train.losses import reorder_loss
    from train.pretrain import PretrainModel

    torch.manual_seed(ns.seed)
    dataset = pair_dataset(cache, studies, ns, ns.seed)
    loader = DataLoader(dataset, batch_size=ns.batch, shuffle=True, drop_last=True)
    model = PretrainModel("r3d_18", ns.width, reorder=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=ns.lr)
    history = []
    for epoch in range(ns.epochs):
        dataset.set_epoch(epoch)
        model.train()
        started, total, correct, n = time.monotonic(), 0.0, 0, 0
        for batch in loader:
            x = torch.cat([batch["x1"], batch["x2"]])
            y = torch.cat([batch["perm1"], batch["perm2"]])
            logits = model(x)[1]
            loss = reorder_loss(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
        record = {"epoch": epoch, "loss": total / n, "train_acc": correct / n,
                  "held_out_acc": network_accuracy(model, held_out), "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
        history.append(record)
        print(f"  reordering only, epoch {epoch}: loss {record['loss']:.3f} (chance {math.log(24):.3f}), "
              f"held-out accuracy {record['held_out_acc']:.3f}", flush=True)  # fmt: skip
    return history


def run_accuracy(run: Path, held_out) -> float:
    """Held-out reordering accuracy of an EchoCLR pretraining run's encoder and head."""
    from train.pretrain import PretrainModel

    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    config = ckpt["config"]
    if config.get("method") != "echoclr":
        raise SystemExit(f"{run}: a {config.get('method')} run has no reordering head")
    model = PretrainModel(str(config["arch"]), int(config["width"]), reorder=True,
                          proj_hidden=config.get("proj_hidden"), proj_dim=config.get("proj_dim"))  # fmt: skip
    model.load_state_dict(ckpt["model"])
    return network_accuracy(model, held_out)


def main(argv: list[str] | None = None) -> int:
    from bench.workdir import open_work

    ns = parse_args(argv)
    torch.set_num_threads(ns.threads)
    cache, _, splits = open_work(ns.work, ns.size, ns.val_fraction, ns.test_fraction)
    started = time.monotonic()
    train = clips_of(pair_dataset(cache, splits["train"], ns, ns.seed), ns.cue_passes)
    # Held-out clips: the validation split, drawn with another seed.
    held_out = clips_of(pair_dataset(cache, splits["val"], ns, ns.seed + 1), ns.cue_passes)
    cue = cue_accuracy(train, held_out)
    del train
    print(f"cue (frame differences, logistic regression): held-out accuracy {cue:.3f} "
          f"on {len(held_out[1])} clips (chance {CHANCE:.3f})", flush=True)  # fmt: skip
    results: dict[str, object] = {"chance": CHANCE, "cue": cue, "held_out_clips": len(held_out[1])}
    if ns.epochs > 0:
        history = train_reorder_only(cache, splits["train"], ns, held_out)
        # The mean of the last epochs, not the best: a maximum over noisy scores flatters chance.
        last = float(np.mean([r["held_out_acc"] for r in history[-5:]]))
        results["reorder_only"] = {"width": ns.width, "lr": ns.lr, "batch": ns.batch, "last5_held_out_acc": last,
                                   "history": history}  # fmt: skip
        print(f"network, reordering only (width {ns.width}, {ns.epochs} epochs): held-out accuracy {last:.3f} "
              f"(mean of the last 5 epochs), {last / cue:.2f} x cue", flush=True)  # fmt: skip
    runs: dict[str, float] = {}
    for name in ns.runs:
        run = Path(name) if Path(name).is_absolute() else ns.work / name
        acc = run_accuracy(run, held_out)
        runs[name] = acc
        print(f"network, pretraining run {name}: held-out accuracy {acc:.3f}, {acc / cue:.2f} x cue", flush=True)
    if runs:  # the key only when runs were asked for, as the JSON always had it
        results["runs"] = runs
    results["seconds"] = round(time.monotonic() - started, 1)
    if ns.json:
        config = {k: str(v) for k, v in vars(ns).items()}
        ns.json.write_text(json.dumps({"config": config, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
