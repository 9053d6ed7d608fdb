"""Cross-rendering transfer: train on renderer A (polar), test on renderer B (raster) or C (scatter).

A model that learned the anatomy (wall thickness, cusp separation) and not the
look of one generator should score on a different rendering of the same kind
of anatomy about as well as on its own.  Protocol (fixed before any run of
this recipe; the recipe itself was chosen on renderer-A archives of other
seeds only, by the demo's experiments in docs/training.md):

1. ``synth --renderer polar`` a training archive (seed 101, 400 patients) and
   ``synth --renderer raster`` a test archive of other patients (seed 202,
   120 patients); PLAX videos only (the binary tasks use PLAX), 240x320,
   32 frames, no measurement SRs (``labels.csv`` holds the truth);
2. index both at ``--size`` pixels (48);
3. fine-tune LVH and severe AS from random init on the polar archive, side
   by side (one thread each): tiny preset, Adam 1e-3, 800 clips an epoch,
   12 epochs, patience 4, early stopping on the polar validation split;
4. evaluate each bundle on *every* study of the raster archive
   (``evaluate --split all``) and, for reference, on the polar test split;
5. print study-level AUROC (mean of a study's PLAX videos) with the machine.

``--more-test-seeds S ...`` draws further raster archives of those seeds
(``raster-sS``) and evaluates every bundle on them too: renderer B's seed
202 has been read many times, a new seed's patients never.

Nothing is tuned on the raster archive.  Every step is skipped when its
output exists, so an interrupted run resumes.

``--test-renderer scatter --test-seed S`` measures transfer on renderer C
(:mod:`train.synth.render_scatter`, written by someone who had not read A's
or B's drawing code) instead of B, in archives named ``scatter-sS``.
Renderer B has been looked at while diagnosing A; C has not.
``--train-renderer polar,raster`` trains on an archive whose studies are
each drawn by A or B (``synth --renderer polar,raster``; archive, caches,
bundles and reports named ``*-polar+raster*``): whether two renderings of
the anatomy teach a model more of the anatomy than one is measured on a
third.  The renderer tested on may not draw the training archive.

``--appearance`` fine-tunes with ``finetune --appearance`` as well (a change
of grey map, gain, blur and speckle grain per clip, :mod:`train.augment`;
its ranges were fixed before it was first run here) into bundles of their
own beside the plain ones, on the same archives: run the script without it
and then with it on one ``--out`` for a paired comparison.

``--framing physical`` indexes both archives with ``index --framing physical
--field-cm CM`` (a window of CM centimetres at the pixel size each video's
calibrated region states, so a wall of 1.2 cm is the same number of input
pixels at any depth and in either renderer) into caches and bundles named
``*-cmCM``.

``--look varied`` trains on renderer A drawn with ``synth --look varied`` (a
wide spread of grey maps, speckle, edges and tissue contrast per video) into
an archive, caches and bundles named ``*-varied``; renderer B is unchanged.
``--look varied-valves`` varies the valve leaflets' look as well (``*-varied-valves``);
``--look varied-leaflets`` also fades half the videos' leaflets into the tissue's blur;
``--look varied-walls`` moves every tissue edge of the varied-valves look in or out.
``--tasks severe_as`` fine-tunes and scores one task only.

``--target measurement`` fine-tunes on the measurement each label is cut
from (``finetune --target measurement``: the thicker wall for LVH, the
aortic peak velocity for severe AS) into bundles named ``*-measurement``,
beside the label-trained ones of the same settings.

``--pretrain-epochs N`` first pretrains EchoCLR (``pretrain``, tiny preset,
``--size``, N epochs; it reads every training video and no label) on the
training archive's cache into ``echoclr-<archive><cache>-s<size>-eN[-tT]`` and
fine-tunes from that run (``--init RUN``) instead of random init, into
bundles named ``*-echoclrN``. A random-init fine-tuning of severe AS leaves
the constant answer's plateau late or never (docs/benchmarks.md, V6), so
whether a look transfers is confounded with whether its run got off it.

Usage::

    .venv/bin/python -m bench.cross_rendering --out /tmp/xrender            # about 40-60 min on 2 cores
    .venv/bin/python -m bench.cross_rendering --out /tmp/xq --quick         # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.machine import cpu_flags, cpu_model, load_average
from bench.paired_auroc import study_scores
from train.measured_target import TARGETS
from train.metrics import auroc, bootstrap_ci
from train.synth.archive import RENDERERS, parse_renderers
from train.synth.look import LOOKS

REPO = Path(__file__).resolve().parent.parent

TASKS = ("lvh", "severe_as")


def _train_env(threads: int = 1) -> dict[str, str]:
    """``threads`` per process (one by default: two chains run side by side on two cores)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    return env


def _start(log: Path, *args: str, threads: int = 1) -> subprocess.Popen[bytes]:
    with log.open("a") as fh:
        fh.write("$ echonode-train " + " ".join(args) + "\n")
        fh.flush()
        return subprocess.Popen([sys.executable, "-m", "train", *args], cwd=REPO, env=_train_env(threads),
                                stdout=fh, stderr=subprocess.STDOUT)


def _run_side_by_side(steps: dict[str, tuple[str, ...]], log: Path, threads: int = 1) -> None:
    """Run ``echonode-train`` commands concurrently, ``threads`` each; exit with the log's tail if one fails."""
    t0 = time.monotonic()
    procs = {name: _start(log, *args, threads=threads) for name, args in steps.items()}
    for name, proc in procs.items():
        if proc.wait() != 0:
            sys.exit(f"{name} failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
        print(f"  {name}: {time.monotonic() - t0:.0f} s", flush=True)


def study_auroc(predictions: Path) -> tuple[float, float, float, int, int]:
    """Study AUROC of an ``evaluate`` predictions.csv (mean of each study's videos), its 95 % CI, positives, negatives."""
    scores = study_scores([Path(predictions).parent])
    p = np.array([s for s, _ in scores.values()])
    y = np.array([label for _, label in scores.values()])
    ci = bootstrap_ci(y, p, "auroc", n_resamples=2000, seed=0)
    return auroc(y, p), ci.low, ci.high, int(y.sum()), int(len(y) - y.sum())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="work folder (resumable)")
    p.add_argument("--train-patients", type=int, default=400)
    p.add_argument("--test-patients", type=int, default=120)
    p.add_argument("--size", type=int, default=48, help="network input side (default 48)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--lr", default="1e-3", help="Adam learning rate of both fine-tunings (default 1e-3)")
    p.add_argument("--target-fps", type=float, default=None,
                   help="index both archives resampled to this frame rate (index --target-fps); "
                   "caches, bundles and reports named *-fpsN")
    p.add_argument("--framing", choices=("sector", "physical"), default="sector",
                   help="index --framing of both archives (physical: caches, bundles and reports named *-cmN)")
    p.add_argument("--field-cm", type=float, default=16.0, help="the physical framing's window in cm (default 16)")
    p.add_argument("--train-renderer", default="polar", metavar="NAME[,NAME...]",
                   help="synth --renderer of the training archive (default polar); several joined by commas "
                   "draw each study by one of them (archive, caches, bundles and reports named *-A+B)")
    p.add_argument("--test-renderer", choices=tuple(RENDERERS), default="raster",
                   help=f"the renderer transfer is measured on: one of {', '.join(RENDERERS)} (default raster); "
                   "never one that draws the training archive")
    p.add_argument("--test-seed", type=int, default=202,
                   help="seed of the first test archive (default 202; new seeds mean patients never read)")
    p.add_argument("--more-test-seeds", type=int, nargs="*", default=[],
                   help="further test archives of these seeds (new patients), each evaluated on every study")
    p.add_argument("--train-only", action="store_true",
                   help="draw, index and fine-tune, then stop (a later run on the same --out tests the bundles)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny archives, 1 epoch")
    p.add_argument("--look", choices=LOOKS, default="standard",
                   help="renderer A's look (synth --look): varied trains on a wide spread of looks, "
                   "varied-valves on that spread with the leaflets' look varied too, varied-leaflets with "
                   "half the leaflets faded, varied-walls with every tissue edge moved in or out (archive, "
                   "caches, bundles and reports named *-LOOK)")
    p.add_argument("--tasks", default=",".join(TASKS), metavar="TASK[,TASK...]",
                   help=f"the tasks to fine-tune and score (default {','.join(TASKS)}; the fine-tunings "
                   "run side by side, --threads each)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads of each fine-tuning and of the pretraining (default 1, for two side by side on "
                   "two cores; bundles, pretraining runs and "
                   "reports of another count named *-tN, since thread counts change the arithmetic's order)")
    p.add_argument("--pretrain-epochs", type=int, default=0, metavar="N",
                   help="pretrain EchoCLR for N epochs on the training archive first and fine-tune from it "
                   "(bundles named *-echoclrN); 0 (default): random init")
    p.add_argument("--target", choices=TARGETS, default="label",
                   help="what fine-tuning learns: the label, or the measurement it is cut from (finetune --target)")
    p.add_argument("--appearance", action="store_true",
                   help="fine-tune with --appearance (bundles and reports named *-appearance-*)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    tasks = tuple(t for t in ns.tasks.split(",") if t)
    if not tasks or set(tasks) - set(TASKS):
        print(f"cross_rendering: --tasks must name some of {', '.join(TASKS)}, got {ns.tasks!r}", file=sys.stderr)
        return 2
    if ns.threads < 1:
        print(f"cross_rendering: --threads must be at least 1, got {ns.threads}", file=sys.stderr)
        return 2
    if ns.pretrain_epochs < 0:
        print(f"cross_rendering: --pretrain-epochs must be 0 or more, got {ns.pretrain_epochs}", file=sys.stderr)
        return 2
    if ns.quick:
        ns.train_patients, ns.test_patients, ns.epochs = 40, 16, 1
    train_renderers = parse_renderers(ns.train_renderer)
    if ns.test_renderer in train_renderers and not ns.train_only:
        print(f"cross_rendering: renderer {ns.test_renderer} draws the training archive too; testing on it "
              "would not measure transfer", file=sys.stderr)
        return 2
    out = ns.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "steps.log"
    started = time.monotonic()
    trained_on = "+".join(train_renderers)
    train_name = trained_on if ns.look == "standard" else f"{trained_on}-{ns.look}"
    archives = {train_name: (",".join(train_renderers), ns.look, 101, ns.train_patients)}
    tests = {held_out_archive_name(ns.test_renderer, seed): seed for seed in (ns.test_seed, *ns.more_test_seeds)}
    for name, seed in ({} if ns.train_only else tests).items():
        archives[name] = (ns.test_renderer, "standard", seed, ns.test_patients)
    _run_side_by_side({f"synth {name}": ("synth", "--out", str(out / name), "--patients", str(n), "--seed", str(seed),
                                         "--renderer", renderer, "--look", look, "--views", "plax", "--rows", "240",
                                         "--cols", "320", "--frames", "32", "--no-reports")
                       for name, (renderer, look, seed, n) in archives.items()
                       if not (out / name / "labels.csv").exists()}, log)
    # Caches are named by how their frames were made: the time resampling and the framing.
    fps = ("" if ns.target_fps is None else f"-fps{ns.target_fps:g}") + (
        "" if ns.framing == "sector" else f"-cm{ns.field_cm:g}")
    fps_args = (() if ns.target_fps is None else ("--target-fps", f"{ns.target_fps:g}")) + (
        () if ns.framing == "sector" else ("--framing", "physical", "--field-cm", f"{ns.field_cm:g}"))
    _run_side_by_side({f"index {r}": ("index", str(out / r), "--out", str(out / f"cache-{r}{fps}"), "--preset", "tiny",
                                      "--size", str(ns.size), "--workers", "1", "--no-progress", *fps_args)
                       for r in archives if not (out / f"cache-{r}{fps}").exists()}, log)
    init = "random"
    if ns.pretrain_epochs:
        run = out / (f"echoclr-{train_name}{fps}-s{ns.size}-e{ns.pretrain_epochs}"
                     + ("" if ns.threads == 1 else f"-t{ns.threads}"))
        if not (run / "encoder.pt").exists():  # written when the last epoch has ended; else pretrain resumes
            _run_side_by_side({"pretrain": (
                "pretrain", "--data", str(out / f"cache-{train_name}{fps}"), "--out", str(run), "--preset", "tiny",
                "--size", str(ns.size), "--epochs", str(ns.pretrain_epochs), "--device", "cpu", "--no-progress")},
                log, ns.threads)
        init = str(run)
    schedule = ("" if (ns.epochs, ns.patience) == (12, 4) else f"-e{ns.epochs}p{ns.patience}") + (
        "" if ns.threads == 1 else f"-t{ns.threads}") + (f"-echoclr{ns.pretrain_epochs}" if ns.pretrain_epochs else "")
    variant = (("" if trained_on == "polar" else f"-{trained_on}") + ("" if ns.look == "standard" else f"-{ns.look}")
               + ("-appearance" if ns.appearance else "") + fps + schedule + ("" if ns.lr == "1e-3" else f"-lr{ns.lr}")
               + ("" if ns.target == "label" else f"-{ns.target}"))
    _run_side_by_side({f"finetune {task}": (
        "finetune", "--data", str(out / f"cache-{train_name}{fps}"), "--labels", str(out / train_name / "labels.csv"),
        "--task", task, "--init", init, "--out", str(out / f"{task}{variant}-bundle"), "--preset", "tiny",
        "--size", str(ns.size), "--lr", ns.lr, "--epoch-samples", "800", "--epochs", str(ns.epochs),
        "--patience", str(ns.patience), "--bootstrap", "200", "--device", "cpu", "--no-progress", "--overwrite",
        *(("--appearance",) if ns.appearance else ()), "--target", ns.target)
        for task in tasks if not (out / f"{task}{variant}-bundle" / "bundle.json").exists()}, log, ns.threads)
    if ns.train_only:
        print(f"trained {', '.join(f'{task}{variant}-bundle' for task in tasks)} in {out} "
              f"({time.monotonic() - started:.0f} s); run again without --train-only to test them")
        return 0
    rows = []
    for task in tasks:
        bundle = out / f"{task}{variant}-bundle"
        evaluations = [(f"{train_name} test split", train_name, "test")]
        evaluations += [(f"{ns.test_renderer} seed {seed}, all studies", name, "all") for name, seed in tests.items()]
        for name, archive, split in evaluations:
            # The training archive's report is named by its first renderer alone (polar), as before.
            suffix = archive.split("-")[0] if archive == train_name else archive
            report = out / f"{task}{variant}-eval-{suffix}"
            if not (report / "predictions.csv").exists():
                _run_side_by_side({f"evaluate {task} {archive}": (
                    "evaluate", "--bundle", str(bundle), "--data", str(out / f"cache-{archive}{fps}"), "--labels",
                    str(out / archive / "labels.csv"), "--out", str(report), "--split", split,
                    "--bootstrap", "200")}, log)
            rows.append((task, name, *study_auroc(report / "predictions.csv")))
    print(f"\ncross-rendering, {dt.date.today()}, {os.cpu_count()} cores, {cpu_model()}, load {load_average()}")
    print(f"CPU flags of note: {' '.join(cpu_flags()) or 'none listed'}")
    print(f"train: {trained_on} ({ns.look} look), {ns.train_patients} patients; test: {ns.test_renderer}, "
          f"{ns.test_patients} patients a seed; "
          f"size {ns.size}, tiny preset, Adam {ns.lr}, {ns.epochs} epochs (patience {ns.patience}), "
          f"{f'EchoCLR init ({ns.pretrain_epochs} epochs)' if ns.pretrain_epochs else 'random init'}, "
          f"{ns.threads} thread{'s' if ns.threads > 1 else ''} a fine-tuning"
          f"{', appearance augmentation' if ns.appearance else ''}"
          f"{', trained on the measurement' if ns.target == 'measurement' else ''}"
          f"{'' if ns.target_fps is None else f', frames resampled to {ns.target_fps:g} fps'}"
          f"{'' if ns.framing == 'sector' else f', physical framing ({ns.field_cm:g} cm window)'}; "
          f"{time.monotonic() - started:.0f} s")
    print("| task | evaluated on | study AUROC [95 % CI, 2000 resamples of studies] | positives / negatives |")
    print("|---|---|---|---|")
    for task, name, a, lo, hi, npos, nneg in rows:
        print(f"| {task} | {name} | {a:.3f} [{lo:.3f}, {hi:.3f}] | {npos} / {nneg} |")
    return 0


def held_out_archive_name(renderer: str, seed: int) -> str:
    """The folder of a test archive: ``raster`` for renderer B's first seed (202), as every earlier run named it,
    otherwise ``<renderer>-s<seed>``."""
    return "raster" if (renderer, seed) == ("raster", 202) else f"{renderer}-s{seed}"


if __name__ == "__main__":
    sys.exit(main())
