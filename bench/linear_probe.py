"""Linear probe: does a pretrained encoder carry the label, before any fine-tuning?

Fine-tuning on a handful of labelled studies is noisy (one draw of studies,
one optimisation); a linear probe on frozen features separates "the
pretraining learned the anatomy" from "the fine-tuning used it". For each
encoder (a pretraining run folder, or ``random`` for an untrained network of
the same shape):

1. encode every PLAX video of the training and test splits of a label
   efficiency work folder (``bench/label_efficiency.py --out``) with the
   frozen encoder (mean over the node's evaluation clips), a study's
   feature being the mean of its videos';
2. fit an L2-regularised logistic regression (``train.finetune.fit_logistic``,
   the fit ``finetune --head-init probe`` uses) on the labelled training
   studies (all of them, or ``--fractions`` of them drawn by study as
   ``echonode-train finetune --fraction`` draws them, one draw per seed);
3. report the test-study AUROC (mean over seeds) with a stratified
   bootstrap 95 % CI of that mean.

Usage::

    .venv/bin/python -m bench.linear_probe --work ~/.cache/echonode/le-v2 random pretrain/echoclr
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bench.workdir import add_work_arguments

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_work_arguments(p)
    p.add_argument("encoders", nargs="+", help="pretraining run folders (relative to --work or absolute), or 'random'")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--clip-frames", type=int, default=8)
    p.add_argument("--tasks", default="lvh,severe_as")
    p.add_argument("--fractions", default="0.01,0.1,1.0")
    p.add_argument("--seeds", type=int, default=10, help="label draws per fraction below 1")
    p.add_argument("--l2", type=float, default=0.1, help="L2 penalty (see train.finetune.fit_logistic)")
    p.add_argument("--bootstrap", type=int, default=10_000)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


@torch.no_grad()
def study_features(encoder: str, ns: argparse.Namespace, cache, splits: dict[str, list[str]]) -> dict[str, dict[str, np.ndarray]]:
    """Frozen features, one vector per study, for the train and test splits."""
    from echonode.bundles.nets import build_model
    from train.datasets import ClipDataset
    from train.finetune import resolve_init

    torch.manual_seed(0)  # the random encoder is the same network every run
    model = build_model("r3d_18", 1, width=ns.width, dropout=0.0)
    digest = f"random-w{ns.width}"
    if encoder != "random":
        run = Path(encoder) if Path(encoder).is_absolute() else ns.work / encoder
        digest = hashlib.sha256((run / "encoder.pt").read_bytes()).hexdigest()[:16]
    # Encoding is the slow part: features are kept per encoder file and settings.
    split = f"v{ns.val_fraction:g}-t{ns.test_fraction:g}"
    store = ns.work / "probe-features" / f"{digest}-s{ns.size}-f{ns.clip_frames}-{split}.npz"
    if store.is_file():
        saved = np.load(store)
        return {part: {k.split("/", 1)[1]: saved[k] for k in saved.files if k.startswith(part + "/")}
                for part in ("train", "test")}
    # The finetune command's loader: the same checks of arch, width and keys.
    if encoder != "random":
        model.load_state_dict(resolve_init(str(run), "r3d_18", ns.width, 1)[0])
    model.eval()
    out: dict[str, dict[str, np.ndarray]] = {}
    for part in ("train", "test"):
        videos = cache.videos_of(splits[part], ["plax"])
        data = ClipDataset(cache, videos, [0.0] * len(videos), ns.clip_frames, ns.size, train=False)
        by_study: dict[str, list[np.ndarray]] = defaultdict(list)
        # Index i of an evaluation dataset is video i's clips (its indexes go round the videos).
        for i, video in enumerate(videos):
            clips, _ = data[i]
            by_study[video["study_uid"]].append(model.features(clips).mean(0).numpy())
        out[part] = {s: np.mean(f, axis=0) for s, f in by_study.items()}
    store.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{part}/{s}": v for part, d in out.items() for s, v in d.items()}
    # allow_pickle spelled out (its default): otherwise mypy matches the ** dict against that bool parameter.
    np.savez(store, allow_pickle=True, **arrays)
    return out


def main(argv: list[str] | None = None) -> int:
    from bench.workdir import open_work
    from train.finetune import fit_logistic
    from train.metrics import auroc
    from train.splits import sample_label_fraction

    ns = parse_args(argv)
    torch.set_num_threads(ns.threads)
    cache, rows, splits = open_work(ns.work, ns.size, ns.val_fraction, ns.test_fraction)
    label = {r["study_uid"]: r for r in rows}
    tasks = [t.strip() for t in ns.tasks.split(",") if t.strip()]
    fractions = [float(f) for f in ns.fractions.split(",")]
    results: dict = {}
    for encoder in ns.encoders:
        started = time.monotonic()
        feats = study_features(encoder, ns, cache, splits)
        train_pool, test = sorted(feats["train"]), sorted(feats["test"])
        x_test = np.stack([feats["test"][s] for s in test])
        for task in tasks:
            y_test = np.array([int(label[s][task]) for s in test])
            y_pool = {s: int(label[s][task]) for s in train_pool}
            pos, neg = np.flatnonzero(y_test == 1), np.flatnonzero(y_test == 0)
            # One set of stratified resamples of the test studies per task, the
            # same for every encoder and fraction whatever the argument order.
            rng = np.random.default_rng(0)
            boot = [np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)]) for _ in range(ns.bootstrap)]
            for fraction in fractions:
                draws = [0] if fraction >= 1.0 else list(range(ns.seeds))
                scores, n_used = [], []
                for seed in draws:
                    chosen = sample_label_fraction(train_pool, fraction, seed=seed, labels=y_pool)
                    x = torch.from_numpy(np.stack([feats["train"][s] for s in chosen]))
                    w, b, _ = fit_logistic(x, torch.tensor([y_pool[s] for s in chosen]), l2=ns.l2)
                    scores.append((x_test @ w.numpy() + b.numpy())[:, 0])
                    n_used.append(len(chosen))
                estimate = float(np.mean([auroc(y_test, s) for s in scores]))
                samples = [np.mean([auroc(y_test[i], s[i]) for s in scores]) for i in boot]
                cell = {"auroc": estimate, "low": float(np.percentile(samples, 2.5)), "high": float(np.percentile(samples, 97.5)),
                        "train_studies": int(np.median(n_used)), "draws": len(draws)}  # fmt: skip
                results.setdefault(encoder, {}).setdefault(task, {})[str(fraction)] = cell
                print(f"{encoder:<24} {task:<9} {fraction:>5g}: AUROC {estimate:.3f} [{cell['low']:.3f}, {cell['high']:.3f}] "
                      f"({cell['train_studies']} studies x {len(draws)} draws)", flush=True)  # fmt: skip
        print(f"{encoder}: {time.monotonic() - started:.0f} s", flush=True)
    if ns.json:
        ns.json.write_text(json.dumps({"config": {k: str(v) for k, v in vars(ns).items()}, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
