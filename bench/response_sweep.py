"""What a model measures: its output as one label-defining size changes, on every renderer.

AUROC says whether a model ranks studies, not what it reads in them. This
diagnostic takes ``--acquisitions`` PLAX acquisitions of hearts drawn
without the label (label seed 777), draws each with renderers A, B and C,
and changes one size only: the septum (the posterior wall 0.9 of it) for
``--task lvh``, the cusp separation for ``--task severe_as``. Each video goes
through the node's own preprocessing (the bundle's settings, sector mask
included) and the bundle. A model that measures the size rises or falls with
it on every renderer; one that reads something else stays flat, or answers
differently from one acquisition to the next.

``--valve diseased`` draws the hearts with a diseased aortic valve (its
calcification and leaflet thickness), so that a severe-AS model's response
to the opening is seen apart from its response to the valve's look.

Usage::

    .venv/bin/python -m bench.response_sweep --bundle BUNDLE --task lvh
    .venv/bin/python -m bench.response_sweep --bundle BUNDLE --task severe_as --valve diseased
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import torch

from bench.machine import cpu_flags, cpu_model, load_average
from echonode.analyse.pipeline import preprocess_config
from echonode.analyse.preprocess import make_eval_clips, preprocess_video
from echonode.analyse.regions import PixelSpacing
from echonode.bundles.weights import load_bundle
from train.synth import render, render_alt, render_scatter
from train.synth.acquisition import plan_study, plan_video
from train.synth.anatomy import sample_anatomy
from train.synth.dicom import encode_jpeg
from train.synth.truth import keyed_rng, sample_truth

SIZES_CM = {"lvh": (0.7, 0.9, 1.05, 1.15, 1.25, 1.4, 1.6, 1.8, 2.0),
            "severe_as": (0.3, 0.5, 0.65, 0.75, 0.85, 1.0, 1.3, 1.6, 1.9)}
RENDERERS = {"A (polar)": render.render_video, "B (raster)": render_alt.render_video,
             "C (scatter)": render_scatter.render_video}
LABEL_SEED = 777


def _grey_through_jpeg(rgb: np.ndarray) -> np.ndarray:
    """The frames as the archive stores them (JPEG) and the node decodes them (grey)."""
    out: list[np.ndarray] = []
    for frame in rgb:
        grey = cv2.imdecode(np.frombuffer(encode_jpeg(frame, 75), np.uint8), cv2.IMREAD_GRAYSCALE)
        assert grey is not None  # our own encoder's output
        out.append(grey)
    return np.stack(out)


def sweep(bundle_path: Path, task: str, acquisitions: int, diseased_valve: bool) -> dict[str, np.ndarray]:
    """Each renderer's ``(acquisitions, sizes)`` array of study probabilities."""
    bundle = load_bundle(bundle_path)
    cfg = preprocess_config(bundle)
    result = {}
    for name, draw in RENDERERS.items():
        probs = np.empty((acquisitions, len(SIZES_CM[task])))
        for i in range(acquisitions):
            truth = sample_truth(keyed_rng(LABEL_SEED, 1, i), force_lvh=False, force_as=diseased_valve)
            study = plan_study(keyed_rng(LABEL_SEED, 2, i))
            plan = plan_video(keyed_rng(LABEL_SEED, 3, i), "plax", 1, study, 32, 1000 + i)
            anatomy = sample_anatomy(truth, keyed_rng(LABEL_SEED, 4, i), 2.0)
            for j, size in enumerate(SIZES_CM[task]):
                changed = (dataclasses.replace(truth, ivs_cm=size, lvpw_cm=max(0.6, 0.9 * size)) if task == "lvh"
                           else dataclasses.replace(truth, av_cusp_sep_cm=min(size, truth.ao_root_cm - 0.8)))
                rgb, geo, _ = draw(dataclasses.replace(anatomy, truth=changed), plan, 240, 320, None)
                # The calibration the archive's DICOM region states (train.synth.dicom).
                spacing = PixelSpacing(geo.delta_cm, geo.delta_cm, (0, 0, geo.cols - 1, geo.rows - 1),
                                       (float(geo.apex_row), float(geo.apex_col)))
                video = SimpleNamespace(frames=_grey_through_jpeg(rgb), fps=float(plan.fps), spacing=spacing)
                clips = make_eval_clips(preprocess_video(video, cfg), cfg)  # type: ignore[arg-type]
                probs[i, j] = float(np.mean(bundle.predict(torch.from_numpy(clips))))
        result[name] = probs
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--task", choices=tuple(SIZES_CM), required=True)
    p.add_argument("--acquisitions", type=int, default=12)
    p.add_argument("--valve", choices=("normal", "diseased"), default="normal",
                   help="draw the hearts with a normal (default) or a diseased aortic valve")
    p.add_argument("--threads", type=int, default=1)
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    result = sweep(ns.bundle, ns.task, ns.acquisitions, ns.valve == "diseased")
    size_name = "septum" if ns.task == "lvh" else "cusp separation"
    print(f"response sweep, {dt.date.today()}, {os.cpu_count()} cores, {cpu_model()}, load {load_average()}")
    print(f"CPU flags of note: {' '.join(cpu_flags()) or 'none listed'}")
    print(f"bundle {ns.bundle}, task {ns.task}, {ns.acquisitions} acquisitions, {ns.valve} valve")
    sizes = SIZES_CM[ns.task]
    print(f"| renderer | {' | '.join(f'{size_name} {s:g} cm' for s in sizes)} |")
    print("|---|" + "---|" * len(sizes))
    for name, probs in result.items():
        mean = probs.mean(axis=0)
        print(f"| {name}, mean | {' | '.join(f'{m:.2f}' for m in mean)} |")
        print(f"| {name}, spread between acquisitions (sd) | "
              f"{' | '.join(f'{s:.2f}' for s in probs.std(axis=0))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
