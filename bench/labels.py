"""Benchmark: reading echo measurement SRs, and ``echonode-train labels`` over an archive.

Builds an archive of ``--studies`` studies (default 2,000), each with one
measurement SR in one of the three dialects of tests/echo_sr.py, in turn
(GE-like TID 5200 with every value twice, Philips-like TID 5200 in mm with
repeated beats and private codes, TID 5300), values drawn so that about a
third of the studies have LVH and a tenth severe AS, and (unless
``--images 0``) one small US multi-frame object per study beside it. Then,
pinned to one core:

1. SRs parsed per second: :func:`echonode.measurements.read_measurement_sr`
   + :func:`~echonode.measurements.select_values` over every SR file
   (files in the page cache), per dialect and overall; beside it the same
   reports walked through pydicom's Dataset (``dcmread`` + a recursive walk
   that reads every NUM's name, value and unit), the cost the reader avoids;
2. ``labels`` end to end (:func:`train.labels.build_labels`, with the
   evidence file): wall time for the whole archive.

Run:

    .venv/bin/python -m bench.labels [--studies 2000] [--images 1] [--work DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from bench.machine import cpu_model as _cpu_model
from echonode.measurements import read_measurement_sr, select_values
from tests import echo_sr
from tests.factories import us_multiframe, write
from train.labels import build_labels

DIALECTS = ("ge", "philips", "tid5300")


def _cpu_flags() -> str:
    """The lscpu flags that matter for Python speed here (vector extensions)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "n/a"
    for line in out.splitlines():
        if line.startswith("Flags:"):
            flags = line.split(":", 1)[1].split()
            keep = [f for f in flags if f.startswith(("avx", "amx", "sse4", "sha"))]
            return " ".join(keep)
    return "n/a"


def _values(rng: np.random.Generator) -> dict[str, float]:
    lvh = rng.random() < 0.33
    severe = rng.random() < 0.10
    ivsd = rng.uniform(1.2, 1.7) if lvh else rng.uniform(0.6, 1.15)
    vmax = rng.uniform(4.0, 5.5) if severe else rng.uniform(1.0, 3.0)
    return {
        "ivsd": round(ivsd, 2), "lvpwd": round(rng.uniform(0.6, 1.15), 2), "lvidd": round(rng.uniform(3.8, 6.0), 2),
        "lv_mass": round(rng.uniform(100, 300), 1),
        "lv_mass_index": round(rng.uniform(116, 160) if lvh else rng.uniform(60, 94), 1),
        "av_vmax": round(vmax, 2), "av_mean_gradient": round(vmax**2 * 2.4, 1),
        "av_area": round(rng.uniform(0.6, 0.95) if severe else rng.uniform(1.5, 3.5), 2),
        "av_cusp_sep": round(rng.uniform(0.4, 0.75) if severe else rng.uniform(1.5, 2.4), 2),
    }  # fmt: skip


def build_archive(root: Path, studies: int, images: int, seed: int = 0) -> dict[str, list[Path]]:
    """The archive; returns the SR files per dialect."""
    rng = np.random.default_rng(seed)
    srs: dict[str, list[Path]] = {d: [] for d in DIALECTS}
    for i in range(studies):
        dialect = DIALECTS[i % len(DIALECTS)]
        uid = pydicom.uid.generate_uid()
        folder = root / f"study{i:05d}"
        sr = echo_sr.echo_sr(dialect, _values(rng), study_uid=uid, patient_sex="MF"[i % 2])
        srs[dialect].append(echo_sr.save(sr, folder / "sr.dcm"))
        for j in range(images):
            write(us_multiframe(study_uid=uid, frames=4, rows=32, cols=32, seed=j), folder / f"img{j}.dcm")
    return srs


def _walk_pydicom(items: pydicom.Sequence, found: list) -> None:
    for item in items:
        if item.ValueType == "NUM" and "MeasuredValueSequence" in item and item.MeasuredValueSequence:
            mv = item.MeasuredValueSequence[0]
            name = item.ConceptNameCodeSequence[0]
            unit = mv.MeasurementUnitsCodeSequence[0]
            found.append((name.CodeValue, name.CodingSchemeDesignator, float(mv.NumericValue), unit.CodeValue))
            for mod in item.get("ContentSequence", []):
                mod.ConceptNameCodeSequence[0].CodeValue  # noqa: B018 - the modifiers a reader must look at
                if "ConceptCodeSequence" in mod:
                    mod.ConceptCodeSequence[0].CodeValue  # noqa: B018
        elif "ContentSequence" in item:
            _walk_pydicom(item.ContentSequence, found)


def _rate(paths: list[Path], fn, repeats: int) -> float:
    """Files per second, best of ``repeats`` passes after a warm-up pass."""
    for p in paths:
        fn(p)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in paths:
            fn(p)
        best = min(best, time.perf_counter() - t0)
    return len(paths) / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=2000)
    parser.add_argument("--images", type=int, default=1, help="US objects per study beside the SR")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None, help="archive folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write the figures here too")
    args = parser.parse_args(argv)

    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        archive = work / "archive"
        t0 = time.perf_counter()
        srs = build_archive(archive, args.studies, args.images)
        built = time.perf_counter() - t0
        print(f"machine: {_cpu_model()}; pinned to cpu {cpus[0]} of {len(cpus)}; flags: {_cpu_flags()}")
        print(f"python {platform.python_version()}, pydicom {pydicom.__version__}; "
              f"{datetime.date.today().isoformat()}; load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
        print(f"archive: {args.studies} studies, {args.images} image(s) each, built in {built:.1f} s")
        sizes = {d: int(np.mean([p.stat().st_size for p in ps])) for d, ps in srs.items() if ps}
        figures: dict[str, object] = {"studies": args.studies, "images_per_study": args.images, "sr_bytes": sizes}

        def reader(p: Path) -> object:
            return select_values(read_measurement_sr(p))

        def through_pydicom(p: Path) -> object:
            found: list = []
            _walk_pydicom(pydicom.dcmread(p).ContentSequence, found)
            return found

        print(f"\nSRs parsed per second, one core (best of {args.repeats} passes):")
        print(f"{'dialect':10s} {'SR bytes':>9s} {'echonode':>10s} {'pydicom walk':>13s}")
        rates: dict[str, dict[str, float]] = {}
        for dialect, paths in [*srs.items(), ("all", [p for ps in srs.values() for p in ps])]:
            if not paths:
                continue
            sample = paths[: min(len(paths), 400)]
            ours = _rate(sample, reader, args.repeats)
            theirs = _rate(sample[:100], through_pydicom, 1)
            rates[dialect] = {"echonode": ours, "pydicom_walk": theirs}
            size = sizes.get(dialect, int(np.mean([p.stat().st_size for p in paths])))
            print(f"{dialect:10s} {size:9d} {ours:10.0f} {theirs:13.0f}")
        figures["parse_per_s"] = rates

        out = work / "labels.csv"
        t0 = time.perf_counter()
        report = build_labels([archive], out, evidence=work / "evidence.csv", progress=False)
        seconds = time.perf_counter() - t0
        figures["labels"] = {
            "seconds": seconds, "files": report.files, "studies": report.studies,
            "lvh": dict(report.labels["lvh"]), "severe_as": dict(report.labels["severe_as"]),
        }  # fmt: skip
        print(f"\nlabels over the archive ({report.files} files, {report.studies} studies), with evidence: {seconds:.1f} s "
              f"({report.studies / seconds:.0f} studies/s); lvh {dict(report.labels['lvh'])}, "
              f"severe_as {dict(report.labels['severe_as'])}")  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
