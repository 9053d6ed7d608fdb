"""Evaluate a bundle on a clip cache: metrics.json, predictions and plots.

``echonode-train evaluate --bundle BUNDLE --data CACHE --labels CSV --out DIR``

The bundle is loaded and run exactly as the node runs it
(:func:`echonode.bundles.weights.load_bundle`, :meth:`Bundle.predict` on the node's
evaluation clips), so the figures describe the model the node would serve.

By default the *test* split is evaluated, recomputed with the split settings
stored with the bundle (``split.json``: the same patients fall where they
fell in training); for an external test set (another archive) pass
``--split all``. Studies the bundle was trained, early-stopped or pretrained
on are refused whatever the split asked for (exit 2).

Outputs in DIR: ``metrics.json`` (AUROC and AUPRC with stratified-bootstrap
95 % CIs, and threshold metrics, at video and study level; accuracy and
one-vs-rest AUROC for ``view``), ``predictions.csv`` (one row per video), and
``roc_video.png``, ``roc_study.png``, ``pr_video.png``, ``pr_study.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from echonode.analyse.preprocess import SECTOR_MASK_RULE
from echonode.analyse.preprocess_config import PreprocessConfig
from echonode.bundles.manifest import BINARY_TASKS, BundleError, BundleMeta
from echonode.bundles.runtime import MODES as RUNTIME_MODES
from echonode.bundles.weights import Bundle, load_bundle
from echonode.durable import write_text
from train.cache import (
    CacheDirs,
    ClipCache,
    cache_argument,
    load_study_labels,
    split_cache,
)
from train.datasets import ClipDataset
from train.finetune import prepare_task, summarise
from train.metrics import auroc, average_precision, group_mean, pr_curve, roc_curve
from train.splits import SPLIT_FILE, SPLIT_SCHEME, SplitRecord, check_no_overlap

__all__ = ["add_evaluate_arguments", "evaluate_bundle", "main", "plot_curves", "run_evaluate"]


def plot_curves(y: np.ndarray, prob: np.ndarray, out_dir: Path, level: str, title: str) -> list[Path]:
    """Write ``roc_<level>.png`` and ``pr_<level>.png``; nothing for a single class.

    Returns
    -------
    list of Path
        The files written.
    """
    # Late: matplotlib comes with the train extra, and the Agg backend must be chosen before pyplot is imported.
    import matplotlib

    matplotlib.use("Agg")  # no display on a training server
    import matplotlib.pyplot as plt

    y = np.asarray(y, dtype=int)
    if y.min(initial=1) == y.max(initial=0):
        return []
    written = []
    fpr, tpr = roc_curve(y, prob)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {auroc(y, prob):.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"{title} ({level})", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = out_dir / f"roc_{level}.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)

    recall, precision = pr_curve(y, prob)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.step(recall, precision, where="post", lw=2, label=f"AUPRC {average_precision(y, prob):.3f}")
    ax.axhline(y.mean(), ls="--", c="grey", lw=1, label=f"prevalence {y.mean():.2f}")
    ax.set(xlabel="recall", ylabel="precision", title=f"{title} ({level})", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left")
    fig.tight_layout()
    path = out_dir / f"pr_{level}.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    return written


def _rate_text(fps: float | None) -> str:
    return "native frames" if fps is None else f"{fps:g} fps"


def _check_cache_matches_bundle(cache: ClipCache, bundle_pre: dict, cache_dir: object) -> None:
    """Refuse a cache whose frames were framed or resampled in time otherwise than the bundle's inputs."""
    cached = cache.manifest["preprocess"]
    wanted = PreprocessConfig.from_meta(bundle_pre)
    framing = str(cached.get("framing", "sector"))
    if framing != wanted.framing:
        raise ValueError(
            f"{cache_dir}: frames cached with framing {framing!r}, the bundle expects {wanted.framing!r}; "
            f"index the archive again with --framing {wanted.framing}"
        )
    if framing == "physical" and float(cached.get("field_cm", 16.0)) != wanted.field_cm:
        raise ValueError(
            f"{cache_dir}: frames cached with a {float(cached.get('field_cm', 16.0)):g} cm window, the bundle expects "
            f"{wanted.field_cm:g} cm; index the archive again with --framing physical --field-cm {wanted.field_cm:g}"
        )
    fps = None if cached.get("target_fps") is None else float(cached["target_fps"])
    if fps != wanted.target_fps:
        again = "without --target-fps" if wanted.target_fps is None else f"with --target-fps {wanted.target_fps:g}"
        raise ValueError(
            f"{cache_dir}: frames cached at {_rate_text(fps)}, the bundle expects {_rate_text(wanted.target_fps)}; "
            f"index the archive again {again}"
        )


def _note_older_mask(cache: ClipCache, cache_dir: object) -> bool:
    """Say (stderr) when the cache's frames were masked by an older sector rule than the node's."""
    rule = cache.sector_mask_rule
    if rule == SECTOR_MASK_RULE:
        return False
    print(
        f"note: {cache_dir}: frames masked with sector-mask rule {rule}; the node masks with rule "
        f"{SECTOR_MASK_RULE}, so these figures are for other pixels than it sees. Index the archive again "
        "into a new --out to score what the node would",
        file=sys.stderr,
    )
    return True


def evaluate_bundle(
    bundle_path: str | Path,
    cache_dir: CacheDirs,
    labels_csv: str | Path,
    out_dir: str | Path,
    *,
    split: str = "test",
    n_resamples: int = 10_000,
    seed: int = 0,
    device: str = "cpu",
    batch_videos: int = 8,
    views: Sequence[str] | None = None,
    runtime: str | None = None,
) -> dict[str, object]:
    """Evaluate a bundle and write the report files.

    Parameters
    ----------
    bundle_path, labels_csv, out_dir : path
    cache_dir : path or sequence of paths
        One clip cache, or several read as one (:class:`train.cache.ClipCache`).
    split : {"test", "val", "train", "all"}
        Which studies; the split settings come from the bundle's provenance.
    n_resamples : int
        Bootstrap resamples.
    seed : int
        Bootstrap seed.
    device : str
    batch_videos : int
        Videos per forward pass (each has ``eval_clips`` clips).
    views : sequence of str, optional
        Views for a binary task (default: as the bundle was trained, PLAX).
    runtime : str, optional
        Inference runtime (:func:`echonode.bundles.weights.load_bundle`); default the
        node's, so that the figures are the ones the node would produce.
        Experiments comparing bundles made at different times pass
        ``"eager"`` to score every one by the same float32 arithmetic.

    Returns
    -------
    dict
        What ``metrics.json`` holds.
    """
    bundle = load_bundle(bundle_path, device) if runtime is None else load_bundle(bundle_path, device, runtime=runtime)
    meta = bundle.meta
    cache = ClipCache(cache_dir)
    _check_cache_matches_bundle(cache, meta.preprocessing, cache_dir)
    _note_older_mask(cache, cache_dir)
    videos, targets = _evaluation_videos(bundle_path, meta, cache, load_study_labels(labels_csv), split, views)
    clip_probs = _clip_probabilities(bundle, cache, videos, targets, batch_videos)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {
        "bundle": {"name": meta.name, "task": meta.task, "version": meta.version, "device_uid": meta.device_uid},
        "data": {"cache": [str(r) for r in cache.roots] if len(cache.roots) > 1 else str(cache.root),
                 "manifest_sha256": cache.manifest_sha256, "split": split},
        "n_videos": len(videos),
        "bootstrap": {"n_resamples": n_resamples, "level": 0.95, "stratified": True, "seed": seed},
        "aggregation": "video = mean over clips; study = mean over videos",
        # Which arithmetic produced the probabilities (float32 eager, bf16, TorchScript...).
        "runtime": bundle.describe()["runtime"],
    }
    report.update(
        summarise(
            meta.task, videos, targets, clip_probs, meta.labels, threshold=meta.threshold, n_resamples=n_resamples, seed=seed
        )
    )
    video_probs = clip_probs.mean(axis=1)
    _write_predictions(out / "predictions.csv", meta, videos, targets, video_probs)
    report["plots"] = _plots(out, meta, videos, targets, video_probs)
    write_text(out / "metrics.json", json.dumps(report, indent=1, default=float) + "\n")
    return report


def _evaluation_videos(
    bundle_path: str | Path,
    meta: BundleMeta,
    cache: ClipCache,
    rows: Sequence[Mapping[str, str]],
    split: str,
    views: Sequence[str] | None,
) -> tuple[list[dict], list[int]]:
    """The videos of ``split`` with the bundle's task labels, and their targets (in the bundle's label order).

    The split settings are the bundle's own, so the same patients fall where
    they fell in training; a bundle that trained or early-stopped on any of
    these studies is refused (:func:`train.splits.check_no_overlap`).
    """
    config = meta.provenance.get("config", {}) if isinstance(meta.provenance, dict) else {}
    record = SplitRecord.read(bundle_path)
    if split == "all":
        splits = {"train": [], "val": [], "test": studies_placeholder(cache)}
        split_name = "test"
    else:
        if record is not None and record.scheme == SPLIT_SCHEME:
            val_fraction, test_fraction, split_seed = record.val_fraction, record.test_fraction, record.seed
        else:
            val_fraction = float(config.get("val_fraction", 0.1))
            test_fraction = float(config.get("test_fraction", 0.2))
            split_seed = int(config.get("split_seed", 0))
        splits = split_cache(cache, val_fraction=val_fraction, test_fraction=test_fraction, seed=split_seed)
        split_name = split
    if views is None and config.get("views"):
        views = [v.strip() for v in str(config["views"]).split(",")]
    # prepare_task needs training data to exist; evaluation only reads one split.
    chosen = {"train": splits[split_name] or studies_placeholder(cache), "val": [], "test": splits[split_name]}
    data = prepare_task(cache, rows, meta.task, chosen, views=views)
    videos, targets = data.videos["test"], data.targets["test"]
    if not videos:
        raise ValueError(f"no {split} videos with {meta.task} labels in {', '.join(map(str, cache.roots))}")
    if record is None:
        print(
            f"warning: {bundle_path} has no {SPLIT_FILE}: cannot check that it was not trained on these studies",
            file=sys.stderr,
        )
    else:
        check_no_overlap(record, {v["study_uid"] for v in videos}, source=f"bundle {bundle_path}", purpose="evaluation")
    if meta.task not in BINARY_TASKS and list(data.labels) != list(meta.labels):
        # Map the cache's view names onto the bundle's logit order.
        index = {name: i for i, name in enumerate(meta.labels)}
        videos = [v for v in videos if v["view"] in index]
        targets = [index[v["view"]] for v in videos]
    return videos, [int(t) for t in targets]


def _clip_probabilities(
    bundle: Bundle, cache: ClipCache, videos: list[dict], targets: list[int], batch_videos: int
) -> np.ndarray:
    """``(videos, eval_clips[, classes])`` probabilities, clips cut as the node cuts them."""
    pre = PreprocessConfig.from_meta(bundle.meta.preprocessing)
    dataset = ClipDataset(
        cache, videos, targets, clip_frames=pre.clip_frames, size=pre.size, train=False, eval_clips=pre.eval_clips,
    )  # fmt: skip
    probs = []
    for x, _ in DataLoader(dataset, batch_size=batch_videos):
        b, k = x.shape[:2]
        p = bundle.predict(x.flatten(0, 1))
        probs.append(p.reshape((b, k) + p.shape[1:]))
    return np.concatenate(probs)


def _write_predictions(path: Path, meta: BundleMeta, videos: list[dict], targets: list[int], video_probs: np.ndarray) -> None:
    """``predictions.csv``: one row per video, its target and probability (or one per class)."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        if meta.task in BINARY_TASKS:
            writer.writerow(["study_uid", "sop_uid", "view", "target", "probability"])
            for v, t, p in zip(videos, targets, video_probs, strict=True):
                writer.writerow([v["study_uid"], v["sop_uid"], v["view"], int(t), f"{float(p):.6f}"])
        else:
            writer.writerow(["study_uid", "sop_uid", "view", "target", *meta.labels])
            for v, t, p in zip(videos, targets, video_probs, strict=True):
                writer.writerow([v["study_uid"], v["sop_uid"], v["view"], meta.labels[int(t)], *(f"{x:.6f}" for x in p)])


def _plots(out: Path, meta: BundleMeta, videos: list[dict], targets: list[int], video_probs: np.ndarray) -> list[str]:
    """ROC and PR curves at video and study level (binary tasks); the files' names."""
    if meta.task not in BINARY_TASKS:
        return []
    y = np.asarray(targets, dtype=int)
    plots = [p.name for p in plot_curves(y, video_probs, out, "video", meta.task)]
    studies = [v["study_uid"] for v in videos]
    _, study_probs = group_mean(studies, video_probs)
    _, study_y = group_mean(studies, y)
    plots += [p.name for p in plot_curves(study_y.round().astype(int), study_probs, out, "study", meta.task)]
    return plots


def studies_placeholder(cache: ClipCache) -> list[str]:
    """All studies; stands in for a training split that evaluation ignores."""
    return sorted({v["study_uid"] for v in cache.videos})


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``echonode-train evaluate``."""
    parser.add_argument("--bundle", required=True, help="bundle folder")
    parser.add_argument("--data", required=True, nargs="+", metavar="CACHE",
                        help="clip cache folder(s) (several: read as one, e.g. shards)")
    parser.add_argument("--labels", required=True, help="labels.csv")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--split", choices=("test", "val", "train", "all"), default="test",
                        help="studies to evaluate (all: an external test archive)")  # fmt: skip
    parser.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--views", default=None, help="views for binary tasks (default: the bundle's, plax)")
    parser.add_argument("--runtime", choices=RUNTIME_MODES, default=None,
                        help="inference runtime (default: the node's, [models] runtime = auto); "
                             "eager reproduces fine-tuning's float32 figures exactly")  # fmt: skip


def run_evaluate(ns: argparse.Namespace) -> int:
    """Run ``echonode-train evaluate``; returns the exit status (2: user error)."""
    views = [v.strip() for v in ns.views.split(",")] if ns.views else None
    try:
        report = evaluate_bundle(
            ns.bundle, cache_argument(ns.data), ns.labels, ns.out, split=ns.split, n_resamples=ns.bootstrap,
            seed=ns.seed, device=ns.device, views=views, runtime=ns.runtime,
        )  # fmt: skip
    except (BundleError, FileNotFoundError, ValueError) as exc:
        print(f"echonode-train evaluate: {exc}", file=sys.stderr)
        return 2
    for level in ("video", "study"):
        part = report.get(level)
        if isinstance(part, dict) and isinstance(part.get("auroc"), dict):
            a = part["auroc"]
            print(f"{level}: AUROC {a['estimate']:.3f} [{a['low']:.3f}, {a['high']:.3f}] (n={part['n']})")
    print(f"report written to {ns.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m train.evaluate``."""
    parser = argparse.ArgumentParser(prog="echonode-train evaluate", description=__doc__.splitlines()[0])
    add_evaluate_arguments(parser)
    return run_evaluate(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
