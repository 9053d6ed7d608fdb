"""How dependably a demo recipe trains models that pass the demo's check, across training seeds.

``make demo`` trains its models on the user's machine, so the models differ
from one CPU to the next (other vector instructions, other rounding, another
trajectory). A recipe is only worth shipping when its models do what the
demo expects on *any* such run, not on the one run of the machine it was
tuned on. Training seeds stand in for that spread: each seed is another
initialisation and another order of batches, a larger change than the
rounding of another CPU.

For each recipe and each seed this trains the demo's bundles exactly as
``echonode demo`` does (the same ``echonode-train`` commands, one thread
each, side by side), then runs the node's own study pipeline
(``echonode infer``) on a validation archive of its own seed
(:data:`VALIDATION_SEED`; never the demo's held-out seed, never a training
seed), rendered at the size of a cart's loop like the demo's studies, and
reports:

* the view model's accuracy on every video, and how many non-PLAX videos
  it calls PLAX (those reach the LVH model);
* for every *clear* LVH study (thicker wall >= 1.7 cm) and every *clear*
  normal study (both walls <= 1.0 cm), the study's LVH probability, and the
  share that meets the demo's expectation (>= 0.8 and <= 0.2).

The recipe is chosen on these figures; the demo's held-out pair is not
looked at.

Usage::

    .venv/bin/python -m bench.demo_recipe --out /tmp/demo-recipe --recipe shipped --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import cpu_flags, cpu_model, load_average
from echonode.analyse.preprocess_config import SECTOR_MASK_RULE
from echonode.commands.demo_models import LVH_SEED, RECIPES, Recipe, recipe_commands, run_train
from echonode.commands.demo_studies import (
    CLEAR_LVH_CM,
    CLEAR_NORMAL_CM,
    LVH_NEGATIVE_MAX_P,
    LVH_POSITIVE_MIN_P,
    read_truth,
)
from train.metrics import auroc

REPO = Path(__file__).resolve().parent.parent

VALIDATION_SEED = 3301
"""Seed of the validation archive (the demo trains on 7 and 8 and shows 2216)."""


def _with_seed(recipe: Recipe, seed: int) -> Recipe:
    return replace(recipe, finetune_args=(*recipe.finetune_args, "--seed", str(seed)))


def _changed(recipe: Recipe, **flags: str) -> Recipe:
    """``recipe`` with other fine-tuning flags (``epochs="24"`` sets ``--epochs 24``)."""
    args = list(recipe.finetune_args)
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return replace(recipe, finetune_args=tuple(args))


_SHIPPED = {r.task: r for r in RECIPES}
#: The view recipe every candidate shares (unchanged since demo models v5).
_VIEW = _SHIPPED["view"]
#: The archive options every recipe before lvh-phase used (their shared folders keep their names).
_SMALL_ARCHIVE_ARGS = {
    "view": ("--rows", "120", "--cols", "160", "--frames", "16", "--no-reports"),
    "lvh": ("--rows", "120", "--cols", "160", "--frames", "16", "--no-reports", "--views", "plax"),
}

# The earlier LVH recipes are written out here rather than derived from what
# the demo ships, so that a name keeps meaning what was run under it.
#: The LVH recipe of demo models v6 (48 px, 4-frame clips, up to 600 steps at a
#: constant 3e-3); the candidates after it are defined from it.
_V6_LVH = Recipe("lvh", LVH_SEED, 200, _SMALL_ARCHIVE_ARGS["lvh"], 48, (
    "--preset", "tiny", "--init", "random", "--lr", "3e-3", "--epoch-samples", "800", "--epochs", "12",
    "--patience", "6", "--frames", "4"))
#: The LVH recipe of demo models v5 (32 px, 8-frame clips, up to 400 steps).
_V5_LVH = replace(_V6_LVH, size=32, finetune_args=(
    "--preset", "tiny", "--init", "random", "--lr", "3e-3", "--epoch-samples", "800", "--epochs", "8", "--patience", "4"))
_V6 = {"view": _VIEW, "lvh": _V6_LVH}

#: The LVH recipe of demo models v7 (lvh-onecycle3-full below).
_V7_LVH = _changed(_V6_LVH, lr_schedule="onecycle", patience="12")

#: v7 on clips that span most of a heartbeat (candidate lvh-phase).
_LVH_PHASE = replace(
    _V7_LVH, synth_args=("--rows", "120", "--cols", "160", "--frames", "48", "--no-reports", "--views", "plax"),
    index_args=("--target-fps", "8"), finetune_args=_changed(_V7_LVH, frames="6").finetune_args)

#: The candidates, each fixed before it was first run (in this order: v5,
#: lvh48, lvh48-unweighted, v6, lvh400, lvh-b8, lvh-onecycle, lvh-onecycle3,
#: lvh-onecycle3-full, lvh-phase, then v7-prevalence and lvh-phase-prevalence
#: together, then lvh-phase-prevalence-physical); "shipped" is whatever
#: ``echonode demo`` trains now.
CANDIDATES: dict[str, dict[str, Recipe]] = {
    "v5": {"view": _VIEW, "lvh": _V5_LVH},
    # LVH at 48 px (walls of 1.0 and 1.7 cm differ by about 2 px at 32 px),
    # clips of 4 frames (the label is a thickness, not a motion) to pay for
    # it, up to 1,200 steps.
    "lvh48": {**_V6, "lvh": _changed(_V6_LVH, epochs="24", patience="8")},
    # The same without the paper's class weighting: its probabilities answer
    # for a prevalence of one half, so a normal study whose true chance is
    # 0.1 reads about 0.2 at this archive's 30 % prevalence. Chosen after
    # seeing lvh48's clear normal studies sit around 0.2.
    "lvh48-unweighted": {**_V6, "lvh": _changed(_V6_LVH, epochs="24", patience="8",
                                                      class_weight="none")},
    # Demo models v6: lvh48 in half the steps, to fit the demo's few minutes
    # (run under the name "shipped" while it was).
    "v6": _V6,
    # v6 on twice the patients, the same steps: v6 sees its 760 PLAX videos
    # about 12 times each, and lvh48 (twice the steps on the same videos)
    # put more clear normals under 0.2; more videos for the same steps asks
    # whether the gap is memorising. Fixed after v6's validation run.
    "lvh400": {**_V6, "lvh": replace(_V6_LVH, patients=400)},
    # v6 in batches of 8: twice the updates for the same clips and about the
    # same compute, since every run so far stopped undertrained and lvh400's
    # seed 1 spent ten epochs on the constant-answer plateau. Fixed after
    # lvh400's run.
    "lvh-b8": {**_V6, "lvh": _changed(_V6_LVH, batch="8")},
    # v6 with a one-cycle schedule peaking at 1e-2 (warm-up from 4e-4 over
    # the first 30 % of the 600 planned steps, then a cosine decay): a
    # higher peak to leave the plateau sooner, the decay to end each run
    # settled instead of undertrained. Fixed after lvh-b8's run.
    "lvh-onecycle": {**_V6, "lvh": _changed(_V6_LVH, lr="1e-2", lr_schedule="onecycle")},
    # The same schedule peaking at v6's own rate: the peak of 1e-2 kept a
    # seed on the plateau, the decay may still end each run settled. Fixed
    # after lvh-onecycle's run.
    "lvh-onecycle3": {**_V6, "lvh": _changed(_V6_LVH, lr_schedule="onecycle")},
    # lvh-onecycle3 with the whole schedule run (patience 12 of 12 epochs;
    # the best validation epoch is still the one kept): its seed 1 stopped
    # at epoch 6, in the peak's noisy validation losses, on its epoch-0
    # weights. Fixed after lvh-onecycle3's run.
    "lvh-onecycle3-full": {**_V6, "lvh": _changed(_V6_LVH, lr_schedule="onecycle", patience="12")},
    # v7 on clips that span most of a heartbeat: a longer training archive
    # (48 frames, like a cart's loop), indexed at 8 frames/s, clips of 6
    # frames (0.75 s, more than half of any R-R interval of 50-110 bpm, so
    # every clip holds diastolic frames). The labels are end-diastolic
    # thicknesses, and walls thicken by about a quarter in systole: a
    # 4-frame clip at the native rate (0.07-0.13 s) of a normal heart in
    # systole shows walls near the LVH threshold, and the node averages
    # clips from every phase of the study's loops. Fixed after v7's
    # validation run under the new sector mask.
    "lvh-phase": {"view": _VIEW, "lvh": _LVH_PHASE},
    # v7 and lvh-phase with probabilities that answer for the training
    # prevalence (``finetune --probabilities prevalence``: the head's bias
    # moved by -ln(pos_weight) after training, the threshold with it). The
    # paper's weighting lifts every clip's logit by that much (ln 2.35 =
    # 0.85 here). Fixed after lvh-phase's and
    # v7's validation runs on the AMD machine, whose probabilities with the
    # shift applied by hand foretold these runs to within a few studies
    # (only the bias moves; a seed trained again is close, not identical).
    "v7-prevalence": {"view": _VIEW, "lvh": _changed(_V7_LVH, probabilities="prevalence")},
    "lvh-phase-prevalence": {"view": _VIEW, "lvh": _changed(_LVH_PHASE, probabilities="prevalence")},
    # lvh-phase-prevalence (demo models v8) framed in cm (``index --framing
    # physical --field-cm 16``: 0.33 cm an input pixel in every video, where
    # the sector framing gives 0.29-0.48 cm by depth and sector width). On
    # the cross-rendering bench's renderer-A archives the physical framing
    # turned the LVH model's answer from a creep (0.22 at a 0.7 cm septum,
    # 0.82 at 2.0) into a step (0.03 to 0.97) and raised A's test AUROC from
    # 0.86 to 0.93. Fixed after those runs, before any demo run with it.
    # The rule to ship it as demo models v9, fixed before its run: at least
    # 108 of 135 clear normals <= 0.2 over seeds 0-2 (v8: 98), the clear LVH
    # study >= 0.8 in every seed, LVH AUROC >= 0.906 in every seed (v8's
    # lowest, 0.916, less 0.01), and a first ``make demo`` within 5 min 15 s
    # here with both demo checks met. It met all of it under sector-mask
    # rule 2 (119/135; 0.82-0.93; 0.970-0.988; 4 min 9 s). Under rule 3
    # (frames decoded to >= 112 px, a node-wide fix made after) it trained
    # on other pixels and met all but the positive (0.61, 0.795, 0.87).
    # The rule under rule 3, fixed before lvh-phase-prevalence's run under
    # it: ship the candidate whose clear LVH study is >= 0.8 in more seeds,
    # then the one with more clear normals <= 0.2; if neither meets the
    # positive in all three seeds, say the demo's positive is not dependable.
    "lvh-phase-prevalence-physical": {"view": _VIEW, "lvh": replace(
        _changed(_LVH_PHASE, probabilities="prevalence"),
        index_args=(*_LVH_PHASE.index_args, "--framing", "physical", "--field-cm", "16"))},
    # The recipe echonode demo ships now.
    "shipped": _SHIPPED,
}


def _recipe_stamp(recipe_set: dict[str, Recipe]) -> str:
    # The mask rule too: models trained on frames masked by another rule are trained again.
    return json.dumps({**{task: asdict(r) for task, r in sorted(recipe_set.items())},
                       "sector_mask": SECTOR_MASK_RULE}, sort_keys=True)


def _cache_is_current(cache: Path) -> bool:
    """Whether a shared cache exists and was masked by the node's rule (else it is made again)."""
    manifest = cache / "manifest.json"
    if not manifest.exists():
        return False
    if json.loads(manifest.read_text())["preprocess"].get("sector_mask", 1) == SECTOR_MASK_RULE:
        return True
    shutil.rmtree(cache)
    return False


def _shared_name(recipe: Recipe) -> str:
    """The folder of a recipe's archive and cache: shared by recipes that make the same ones."""
    name = f"{recipe.task}-{recipe.patients}-patients-{recipe.size}px"
    default = _SMALL_ARCHIVE_ARGS[recipe.task]
    if recipe.synth_args != default or recipe.index_args:
        made = json.dumps([recipe.seed, list(recipe.synth_args), list(recipe.index_args)])
        name += "-" + hashlib.sha256(made.encode()).hexdigest()[:10]
    return name


def _trained_by(work: Path, recipe_set: dict[str, Recipe]) -> bool:
    """Whether ``work/models`` holds the finished models of exactly ``recipe_set``."""
    stamp = work / "recipe.json"
    return ((work / "models").exists() and (work / "seconds").exists() and stamp.exists()
            and stamp.read_text() == _recipe_stamp(recipe_set))


def _train(recipe_set: dict[str, Recipe], seed: int, shared_root: Path, work: Path) -> float:
    """Train one seed's bundles side by side into ``work/models``; seconds of the longer fine-tune and promote.

    The archives and caches do not depend on the training seed: each is made
    once, under ``shared_root``.
    """
    models = work / "models"
    if _trained_by(work, recipe_set):
        return float((work / "seconds").read_text())
    # Models of another recipe under this name (a resumed folder, or "shipped"
    # after the demo changed): train again rather than score them.
    shutil.rmtree(models, ignore_errors=True)
    staging = work / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    errors: list[str] = []
    seconds: dict[str, float] = {}

    def chain(recipe: Recipe) -> None:
        shared = shared_root / _shared_name(recipe)
        shared.mkdir(parents=True, exist_ok=True)
        synth, index, finetune, promote = recipe_commands(_with_seed(recipe, seed), shared, staging)
        bundle = work / f"bundle-{recipe.task}"
        finetune[finetune.index("--out") + 1] = str(bundle)
        finetune.append("--overwrite")  # a bundle an interrupted run left
        promote[1] = str(bundle)
        try:
            if not _cache_is_current(shared / f"cache-{recipe.task}"):
                # The archive does not depend on the mask rule: a cache of an older rule is indexed again from it.
                made = (shared / f"archive-{recipe.task}" / "labels.csv").exists()
                for args in ((index,) if made else (synth, index)):
                    run_train(args, shared / f"prepare-{recipe.task}.log")
            t0 = time.monotonic()
            for args in (finetune, promote):
                run_train(args, work / f"train-{recipe.task}.log")
            seconds[recipe.task] = time.monotonic() - t0
        except RuntimeError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=chain, args=(r,)) for r in recipe_set.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        sys.exit("; ".join(errors))
    staging.rename(models)
    (work / "seconds").write_text(f"{max(seconds.values()):.1f}")
    (work / "recipe.json").write_text(_recipe_stamp(recipe_set))  # last: a run cut before it trains again
    return max(seconds.values())


def _infer(archive: Path, models: Path, work: Path) -> dict[str, Any]:
    config = work / "infer.toml"
    config.write_text('[models]\ndevice = "cpu"\nruntime = "eager"\n')
    res = subprocess.run([sys.executable, "-m", "echonode", "--config", str(config), "infer", str(archive / "dicom"),
                          "--models", str(models), "--json"], capture_output=True, text=True, cwd=REPO)
    if not res.stdout.strip():
        sys.exit(f"echonode infer failed ({res.returncode}): {res.stderr[-2000:]}")
    return {s["study_uid"]: s for s in json.loads(res.stdout)["studies"]}


def _true_views(archive: Path) -> dict[str, str]:
    with (archive / "videos.csv").open(newline="") as fh:
        return {r["sop_uid"]: r["view"] for r in csv.DictReader(fh)}


def _score(archive: Path, results: dict[str, Any]) -> dict[str, Any]:
    views = _true_views(archive)
    n = right = plax_wrong = 0
    for study in results.values():
        for v in study["videos"]:
            if v["view"] is None:
                continue
            n += 1
            right += v["view"] == views.get(v["sop_uid"])
            plax_wrong += v["view"] == "plax" and views.get(v["sop_uid"]) != "plax"
    pos, neg = [], []
    labels, probabilities = [], []
    for s in read_truth(archive / "labels.csv"):
        lvh = (results.get(s.study_uid) or {}).get("tasks", {}).get("lvh") or {}
        p = lvh.get("probability")
        if p is not None:
            labels.append(int(s.lvh))
            probabilities.append(float(p))
        if s.thicker_wall_cm >= CLEAR_LVH_CM:
            pos.append(p)
        elif s.thicker_wall_cm <= CLEAR_NORMAL_CM:
            neg.append(p)
    return {
        "view_accuracy": right / max(n, 1), "videos": n, "non_plax_called_plax": plax_wrong,
        "clear_lvh": pos, "clear_normal": neg,
        "lvh_auroc": auroc(np.array(labels), np.array(probabilities)) if 0 < sum(labels) < len(labels) else None,
        "lvh_assessed": len(labels),
        "lvh_met": sum(p is not None and p >= LVH_POSITIVE_MIN_P for p in pos),
        "normal_met": sum(p is not None and p <= LVH_NEGATIVE_MAX_P for p in neg),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="work folder (resumable)")
    p.add_argument("--recipe", choices=sorted(CANDIDATES), default="shipped")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--patients", type=int, default=40, help="patients of the validation archive")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    ns.out.mkdir(parents=True, exist_ok=True)
    archive = ns.out / "validation"
    if not (archive / "labels.csv").exists():
        run_train(["synth", "--out", str(archive), "--patients", str(ns.patients), "--seed", str(VALIDATION_SEED),
                   "--rows", "480", "--cols", "640", "--frames", "48"], ns.out / "synth.log")
    print(f"demo recipe {ns.recipe!r}, {dt.date.today()}, {os.cpu_count()} cores, {cpu_model()}, "
          f"load {load_average()}; CPU flags of note: {' '.join(cpu_flags()) or 'none listed'}")
    print(f"validation archive: seed {VALIDATION_SEED}, {ns.patients} patients, 480x640, 48 frames")
    print("| seed | fine-tuning s | view accuracy | non-PLAX called PLAX | LVH study AUROC (all assessed) "
          "| clear LVH p >= 0.8 | clear normal p <= 0.2 | LVH p (clear LVH) | LVH p (clear normal) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seed in ns.seeds:
        work = ns.out / ns.recipe / f"seed{seed}"
        work.mkdir(parents=True, exist_ok=True)
        seconds = _train(CANDIDATES[ns.recipe], seed, ns.out / "shared", work)
        s = _score(archive, _infer(archive, work / "models", work))
        (work / "score.json").write_text(json.dumps(s, indent=1))

        def fmt(ps: list[float | None]) -> str:
            return " ".join("-" if p is None else f"{p:.2f}" for p in ps)

        area = "-" if s["lvh_auroc"] is None else f"{s['lvh_auroc']:.3f} of {s['lvh_assessed']}"
        print(f"| {seed} | {seconds:.0f} | {s['view_accuracy']:.2f} of {s['videos']} | {s['non_plax_called_plax']} "
              f"| {area} | {s['lvh_met']}/{len(s['clear_lvh'])} | {s['normal_met']}/{len(s['clear_normal'])} "
              f"| {fmt(s['clear_lvh'])} | {fmt(s['clear_normal'])} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
