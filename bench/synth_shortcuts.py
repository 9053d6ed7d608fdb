"""The synthetic archive: shortcut check, contrast against a real loop, speed.

1. Writes an archive (``--patients``, PLAX and all other views) and scores every
   non-anatomical statistic (:mod:`train.synth.shortcuts`) against LVH and
   severe AS; exit 1 when one leaves AUROC 0.40-0.60.
2. Network-input contrast: the node's own preprocessing
   (``echonode.analyse.preprocess``: sector mask, crop, 112 px, per-clip
   min-max) on the archive's videos and on the real SonoSite loop of
   pydicom-data (``color3d_jpeg_baseline.dcm``); mean, median and 90th
   percentile of the clip values inside the sector.
3. Studies per second of the synth run.

Usage::

    .venv/bin/python -m bench.synth_shortcuts --patients 200 --renderer polar
    .venv/bin/python -m bench.synth_shortcuts --archive /work/bench-runs/cross2/polar   # score an existing archive
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.machine import cpu_flags, cpu_model, load_average
from echonode.analyse.preprocess import make_eval_clips, preprocess_file
from train.synth import generate_archive
from train.synth.shortcuts import score_shortcuts, shortcuts_found

REPO = Path(__file__).resolve().parent.parent


def contrast(path: Path) -> tuple[float, float, float]:
    """Mean, median and 90th percentile of the network input inside the sector."""
    _, frames = preprocess_file(path)
    clips = make_eval_clips(frames)[:, 0]
    inside = frames.max(axis=0) > 0
    values = clips[:, :, inside]
    return float(values.mean()), float(np.median(values)), float(np.percentile(values, 90))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=200)
    p.add_argument("--seed", type=int, default=31)
    p.add_argument("--renderer", default="polar")
    p.add_argument("--frames", type=int, default=16, help="frames per video (default 16)")
    p.add_argument("--contrast-videos", type=int, default=40, help="videos measured for contrast (default 40)")
    p.add_argument("--out", type=Path, default=None, help="archive folder (default: a temporary one)")
    p.add_argument("--archive", type=Path, default=None,
                   help="score this existing synthetic archive instead of writing one (no speed figure)")
    ns = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"synth-shortcuts, {dt.date.today()}, {os.cpu_count()} cores, {cpu_model()}, load {load_average()}")
        print(f"CPU flags of note: {' '.join(cpu_flags()) or 'none listed'}")
        if ns.archive is not None:
            out = ns.archive
            with open(out / "labels.csv", newline="") as fh:
                labels = list(csv.DictReader(fh))
            print(f"archive: {out} (existing), {len(labels)} studies "
                  f"({sum(r['lvh'] == '1' for r in labels)} LVH, {sum(r['severe_as'] == '1' for r in labels)} "
                  "severe AS)")
        else:
            out = ns.out or Path(tmp) / "archive"
            s = generate_archive(out, ns.patients, ns.seed, frames=ns.frames, renderer=ns.renderer)
            print(f"archive: {s.patients} patients, {s.studies} studies ({s.lvh_studies} LVH, "
                  f"{s.severe_as_studies} severe AS), {s.videos} videos of {ns.frames} frames at 480x640, "
                  f"renderer {ns.renderer}: {s.seconds:.0f} s, {s.studies / s.seconds:.2f} studies/s")
        scores = score_shortcuts(out)
        print("| statistic | LVH AUROC | severe AS AUROC |\n|---|---|---|")
        by = {(x.statistic, x.task): x.auroc for x in scores}
        for name in sorted({x.statistic for x in scores}):
            print(f"| {name} | {by.get((name, 'lvh'), float('nan')):.3f} | {by.get((name, 'severe_as'), float('nan')):.3f} |")
        bad = shortcuts_found(scores)
        with open(out / "videos.csv", newline="") as fh:
            videos = list(csv.DictReader(fh))[: ns.contrast_videos]
        synth = np.array([contrast(out / v["path"]) for v in videos])
        from pydicom.data import get_testdata_file

        found = get_testdata_file("color3d_jpeg_baseline.dcm", download=False)
        if not isinstance(found, str):  # a path, or None when pydicom-data is missing (read=False: never a Dataset)
            raise SystemExit("color3d_jpeg_baseline.dcm not found (pip install pydicom-data)")
        real = contrast(Path(found))
        print("network input inside the sector (mean / median / p90):")
        print(f"  real loop color3d_jpeg_baseline.dcm: {real[0]:.3f} / {real[1]:.3f} / {real[2]:.3f}")
        m, lo, hi = synth.mean(axis=0), synth.min(axis=0), synth.max(axis=0)
        print(f"  synth ({len(videos)} videos): {m[0]:.3f} / {m[1]:.3f} / {m[2]:.3f}; "
              f"mean ranges {lo[0]:.3f}-{hi[0]:.3f}")
    if bad:
        print("shortcuts outside 0.40-0.60: " + ", ".join(f"{x.statistic} ({x.task} {x.auroc:.3f})" for x in bad))
        return 1
    print("no statistic outside 0.40-0.60")
    return 0


if __name__ == "__main__":
    sys.exit(main())
