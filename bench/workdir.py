"""The label-efficiency work folder (``bench/label_efficiency.py --out``) as the probes read it."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_work_arguments(parser: argparse.ArgumentParser) -> None:
    """``--work``, ``--size``, the split fractions and ``--threads``: what every probe of a work folder takes."""
    parser.add_argument("--work", type=Path, required=True, help="label-efficiency work folder (archive/, cache-SIZE/)")
    parser.add_argument("--size", type=int, default=48, help="frame side of the cache (cache-SIZE/)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="split settings the pretraining runs used")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")


def open_work(work: Path, size: int, val_fraction: float, test_fraction: float):
    """Clip cache, label rows and patient split of a work folder.

    Parameters
    ----------
    work : Path
        Holds ``archive/labels.csv`` and ``cache-SIZE/``.
    size : int
        Frame side of the cache to open.
    val_fraction, test_fraction : float
        The split settings the pretraining runs used (split seed 0).

    Returns
    -------
    tuple
        ``(ClipCache, rows, splits)`` with ``splits`` keyed train/val/test.
    """
    from train.cache import ClipCache, load_study_labels, split_cache

    cache = ClipCache(work / f"cache-{size}")
    rows = load_study_labels(work / "archive" / "labels.csv")
    splits = split_cache(cache, val_fraction=val_fraction, test_fraction=test_fraction, seed=0)
    return cache, rows, splits
