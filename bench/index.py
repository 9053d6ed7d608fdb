"""Benchmark: ``echonode-train index`` throughput against its number of worker processes.

The archive is the real SonoSite cardiac loop (``color3d_jpeg_baseline.dcm``
from pydicom-data: 120 frames, 480x640, JPEG baseline) copied ``--videos``
times with fresh UIDs, three videos a study: what a cart's export holds.
Each timing indexes the whole archive into an empty cache at the paper's
112 px (decode, sector mask, crop, resize, write the frames and the
manifest); worker counts are interleaved round by round (the machine is
shared), best and median kept. The one-off start of the worker processes
(the forkserver importing the decoders, about a second) is measured apart
and left out of the timings: an archive worth indexing on many cores takes
minutes to hours. Beside each worker count, the same number of processes
spinning in pure Python shows what the machine gave in those rounds (the
ceiling of any scaling: on a shared machine it is well under the core
count). Run from the repository root:

    .venv/bin/python -m bench.index [--videos 48] [--workers 1,2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from bench.machine import cpu_flags, cpu_model, load_average
from echonode.analyse.preprocess import PreprocessConfig
from train.index import build_index, default_workers


def make_archive(root: Path, videos: int) -> Path:
    """``videos`` copies of the real loop, fresh SOP/Series/Study UIDs, three per study."""
    source = get_testdata_file("color3d_jpeg_baseline.dcm", download=False)
    if source is None:
        raise SystemExit("pydicom-data is not installed (the test extra)")
    ds = pydicom.dcmread(source)
    for i in range(videos):
        if i % 3 == 0:
            study, patient = generate_uid(), f"BENCH{i // 3}"
        ds.StudyInstanceUID, ds.PatientID = study, patient
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = root / f"study{i // 3:03d}" / f"IM{i % 3}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    return root


def _spin(n: int) -> int:
    """Pure-Python work on one core (no BLAS, no threads)."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def time_spin(workers: int, n: int = 3_000_000) -> float:
    """Wall seconds for ``workers`` processes to spin ``n`` each: what the machine gives right now."""
    import multiprocessing

    with multiprocessing.get_context("forkserver").Pool(workers) as pool:
        pool.map(_spin, [1] * workers)  # started
        started = time.perf_counter()
        pool.map(_spin, [n] * workers)
        return time.perf_counter() - started


def time_index(archive: Path, cache: Path, workers: int) -> tuple[float, int]:
    """Wall seconds to index ``archive`` into an empty ``cache``; videos cached."""
    shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    report = build_index(archive, cache, PreprocessConfig(size=112), progress=False, workers=workers)
    return time.perf_counter() - started, report.cached


def main(argv: list[str] | None = None) -> int:
    cores = default_workers()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=48, help="videos in the archive (default 48)")
    parser.add_argument("--workers", default=None,
                        help=f"comma-separated worker counts (default 1, 2, 4, ... up to the cores, here {cores})")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")] if args.workers else sorted(
        {1, cores, *(2**k for k in range(1, cores.bit_length()) if 2**k <= cores)})
    print(f"# bench/index.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    flags = " ".join(cpu_flags()) or "none listed"
    print(f"machine: {cpu_model()}; {cores} cores usable; ISA flags: {flags}; load average {load_average()}")
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        work = Path(tmp)
        archive = make_archive(work / "archive", args.videos)
        size_mb = sum(p.stat().st_size for p in archive.rglob("*.dcm")) / 2**20
        print(f"archive: {args.videos} x the SonoSite loop (120 frames 480x640 JPEG), {size_mb:.0f} MB; cache at 112 px")
        empty = work / "empty"
        empty.mkdir()
        started = time.perf_counter()
        build_index(empty, work / "warm", PreprocessConfig(size=112), progress=False, workers=2)
        print(f"worker start-up, once per run (forkserver importing the decoders): {time.perf_counter() - started:.2f} s")

        times: dict[int, list[float]] = {w: [] for w in counts}
        spins: dict[int, list[float]] = {w: [] for w in counts}
        for r in range(args.repeats):
            for w in counts if r % 2 == 0 else reversed(counts):
                seconds, cached = time_index(archive, work / "cache", w)
                times[w].append(seconds)
                spins[w].append(time_spin(w))
        base, spin_base = min(times[counts[0]]), min(spins[counts[0]])
        # The ceiling: how much more work w processes of pure-Python spinning
        # got done than one, in the same rounds (other jobs share the cores).
        print(f"\n| workers | best s | median s | videos/s (best) | x {counts[0]} worker(s) | ceiling: spin x |")
        print("|---|---|---|---|---|---|")
        for w in counts:
            best = min(times[w])
            ceiling = w / counts[0] * spin_base / min(spins[w])
            print(f"| {w} | {best:.2f} | {statistics.median(times[w]):.2f} | {cached / best:.1f} | {base / best:.2f} "
                  f"| {ceiling:.2f} |")
    print(f"\nload average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
