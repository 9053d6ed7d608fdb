"""``echonode-train synth``: options and the run (train/cli.py wires them)."""

from __future__ import annotations

import argparse
from pathlib import Path

from train.synth.acquisition import VIEWS
from train.synth.archive import RENDERERS, generate_archive
from train.synth.look import LOOKS

__all__ = ["add_synth_arguments", "run_synth"]


def add_synth_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``synth`` options to ``parser`` and return it."""
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--patients", required=True, type=int, help="number of patients")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--frames", type=int, default=None, help="frames per video (default 40-64)")
    parser.add_argument("--rows", type=int, default=480, help="image rows (default 480)")
    parser.add_argument("--cols", type=int, default=640, help="image columns (default 640)")
    parser.add_argument("--renderer", default="polar", metavar="NAME[,NAME...]",
                        help=f"how pixels are formed: {', '.join(RENDERERS)} (polar, the default; the others "
                             "are independent renderers of the same anatomy, for transfer checks: raster paints "
                             "on a raster, scatter beamforms moving point scatterers, fieldwarp convolves a "
                             "tissue-borne scattering field with a beam-oriented PSF on the screen's grid), or "
                             "several joined by commas (each study drawn by one of them)")
    parser.add_argument("--look", choices=LOOKS, default="standard",
                        help="standard (default: each scanner's own look) or varied (renderer polar's videos: a "
                             "grey map, speckle grain and filtering, edge softness and tissue contrast drawn per "
                             "video from wide ranges, so that models cannot lean on one way of drawing tissue), "
                             "or varied-valves (that, and the valve leaflets' echo strength, calcium contrast and "
                             "bloom drawn per video too), or varied-leaflets (that, with half the videos' "
                             "leaflets faded into the tissue's blur), or varied-walls (varied-valves with every "
                             "tissue edge moved in or out by up to a few millimetres, as gain and grey maps do)")
    parser.add_argument("--views", default=None,
                        help=f"comma-separated views to write (default all: {','.join(VIEWS)})")
    parser.add_argument("--no-reports", dest="reports", action="store_false",
                        help="videos only: no measurement SRs (labels.csv still holds their values); "
                             "a quicker archive for training, not for `labels`")
    return parser


def run_synth(ns: argparse.Namespace) -> int:
    """Run ``echonode-train synth`` from parsed arguments; returns an exit status."""
    views = getattr(ns, "views", None)
    try:
        summary = generate_archive(
            ns.out, ns.patients, ns.seed, frames=getattr(ns, "frames", None),
            rows=getattr(ns, "rows", 480), cols=getattr(ns, "cols", 640),
            renderer=getattr(ns, "renderer", "polar"),
            views=None if views is None else [v.strip().lower() for v in views.split(",") if v.strip()],
            reports=getattr(ns, "reports", True), look=getattr(ns, "look", "standard"),
        )
    except ValueError as exc:
        print(f"echonode-train synth: {exc}")
        return 2
    print(
        f"wrote {summary.videos} videos in {summary.studies} studies of {summary.patients} patients "
        f"to {summary.out_dir} ({summary.lvh_studies} LVH, {summary.severe_as_studies} severe AS, "
        f"renderer {summary.renderer}, look {summary.look}) in {summary.seconds:.1f} s "
        f"({summary.reports} measurement SRs, {summary.report_seconds:.1f} s)"
    )
    return 0
