"""Cross-rendering transfer: train on renderer A (polar), test on renderer B (raster).

A model that learned the anatomy (wall thickness, cusp separation) and not the
look of one generator should score on a different rendering of the same kind
of anatomy about as well as on its own.  Protocol (fixed before any run):

1. ``synth --renderer polar`` a training archive (seed 101) and
   ``synth --renderer raster`` a test archive of other patients (seed 202);
   PLAX videos only (the binary tasks use PLAX), 240x320, 32 frames;
2. index both at ``--size`` pixels;
3. fine-tune LVH and severe AS from random init on the polar archive
   (tiny preset, explicit epochs; early stopping on the polar validation split);
4. evaluate each bundle on *every* study of the raster archive
   (``evaluate --split all``) and, for reference, on the polar test split;
5. print study-level AUROC (mean of a study's PLAX videos) with the machine.

Nothing is tuned on the raster archive.  Every step is skipped when its
output exists, so an interrupted run resumes.

Usage::

    .venv/bin/python -m bench.cross_rendering --out /tmp/xrender            # about 30-60 min on 2 cores
    .venv/bin/python -m bench.cross_rendering --out /tmp/xq --quick         # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.machine import cpu_model, load_average
from train.metrics import auroc, group_mean

REPO = Path(__file__).resolve().parent.parent

TASKS = ("lvh", "severe_as")


def _run(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"echonode-train {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    print(f"  {args[0]} {args[1] if len(args) > 1 else ''}: {time.monotonic() - t0:.0f} s", flush=True)


def _study_auroc(predictions: Path) -> tuple[float, int, int]:
    with open(predictions, newline="") as fh:
        rows = list(csv.DictReader(fh))
    studies = [r["study_uid"] for r in rows]
    _, p = group_mean(studies, np.array([float(r["probability"]) for r in rows]))
    _, y = group_mean(studies, np.array([int(r["target"]) for r in rows]))
    y = y.round().astype(int)
    return auroc(y, p), int(y.sum()), int(len(y) - y.sum())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="work folder (resumable)")
    p.add_argument("--train-patients", type=int, default=150)
    p.add_argument("--test-patients", type=int, default=60)
    p.add_argument("--size", type=int, default=64, help="network input side (default 64)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny archives, 1 epoch")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.quick:
        ns.train_patients, ns.test_patients, ns.epochs = 40, 16, 1
    out = ns.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    archives = {"polar": (out / "polar", 101, ns.train_patients), "raster": (out / "raster", 202, ns.test_patients)}
    for renderer, (path, seed, patients) in archives.items():
        if not (path / "labels.csv").exists():
            _run("synth", "--out", str(path), "--patients", str(patients), "--seed", str(seed), "--renderer", renderer,
                 "--views", "plax", "--rows", "240", "--cols", "320", "--frames", "32")
        if not (out / f"cache-{renderer}").exists():
            _run("index", str(path), "--out", str(out / f"cache-{renderer}"), "--preset", "tiny", "--size", str(ns.size),
                 "--no-progress")
    rows = []
    for task in TASKS:
        bundle = out / f"{task}-bundle"
        if not (bundle / "bundle.json").exists():
            _run("finetune", "--data", str(out / "cache-polar"), "--labels", str(out / "polar" / "labels.csv"),
                 "--task", task, "--init", "random", "--out", str(bundle), "--preset", "tiny", "--size", str(ns.size),
                 "--epochs", str(ns.epochs), "--patience", "3", "--bootstrap", "200", "--device", "cpu",
                 "--no-progress", "--overwrite")
        for name, renderer, split in (("polar test split", "polar", "test"), ("raster, all studies", "raster", "all")):
            report = out / f"{task}-eval-{renderer}"
            if not (report / "predictions.csv").exists():
                _run("evaluate", "--bundle", str(bundle), "--data", str(out / f"cache-{renderer}"), "--labels",
                     str(out / renderer / "labels.csv"), "--out", str(report), "--split", split, "--bootstrap", "200")
            a, npos, nneg = _study_auroc(report / "predictions.csv")
            rows.append((task, name, a, npos, nneg))
    print(f"\ncross-rendering, {dt.date.today()}, {os.cpu_count()} cores, {cpu_model()}, load {load_average()}")
    print(f"train: polar, {ns.train_patients} patients; test: raster, {ns.test_patients} patients; "
          f"size {ns.size}, tiny preset, {ns.epochs} epochs, random init; {time.monotonic() - started:.0f} s")
    print("| task | evaluated on | study AUROC | positives / negatives |")
    print("|---|---|---|---|")
    for task, name, a, npos, nneg in rows:
        print(f"| {task} | {name} | {a:.3f} | {npos} / {nneg} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
