"""Benchmark: decode + preprocess of a real echo loop, against the baselines.

On the real SonoSite cardiac loop (``color3d_jpeg_baseline.dcm`` from
pydicom-data: 120 frames, 480x640, JPEG baseline YBR_FULL_422), in one run:

1. pydicom ``pixel_array`` (each decoding plugin, and pydicom's default
   choice) + RGB->grey + area resize to 112x112: what a straightforward
   implementation does;
2. OpenCV ``imdecode`` of the raw JPEG fragments at full resolution, colour,
   one thread, fragments already in memory: the raw decoder speed;
3. echonode: ``preprocess_file`` (read, fast-path decode, sector mask, crop,
   resize) + ``make_eval_clips`` to model-ready clips, from the file on disk.

Figures are frames per second of source frames consumed; each timing is the
best of several repeats (the machine is shared). Run:

    .venv/bin/python -m bench.decode [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import cv2
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames

from bench.machine import cpu_model as _cpu_model
from echonode.analyse.decode import DecodeOptions
from echonode.analyse.preprocess import (
    PreprocessConfig,
    make_eval_clips,
    preprocess_file,
)


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(best, median) wall seconds over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--file", default="color3d_jpeg_baseline.dcm")
    args = parser.parse_args(argv)

    path = get_testdata_file(args.file, download=False)
    if path is None:
        print(f"{args.file} not found (pip install pydicom-data)", file=sys.stderr)
        return 2
    ds = pydicom.dcmread(path)
    n = int(ds.NumberOfFrames)
    print(f"file: {args.file}: {n} frames, {ds.Rows}x{ds.Columns}, "
          f"{ds.PhotometricInterpretation}, {ds.file_meta.TransferSyntaxUID.name}")
    print(f"machine: {os.cpu_count()} cores, {_cpu_model()}; opencv {cv2.__version__}, "
          f"pydicom {pydicom.__version__}, numpy {np.__version__}")
    print()
    rows: list[tuple[str, float, float, int]] = []

    def pydicom_pipeline(plugin: str) -> Callable[[], object]:
        def run() -> object:
            d = pydicom.dcmread(path)
            arr = pydicom.pixels.pixel_array(d, decoding_plugin=plugin) if plugin else d.pixel_array
            return np.stack([
                cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (112, 112),
                           interpolation=cv2.INTER_AREA)
                for f in arr
            ])
        return run

    pyd_repeats = max(1, min(args.repeats, 3))
    for plugin in ("", "pylibjpeg", "gdcm", "pillow"):
        label = f"pydicom pixel_array [{plugin or 'default plugin'}] + grey + resize 112"
        try:
            best, med = _time(pydicom_pipeline(plugin), pyd_repeats)
        except Exception as exc:  # noqa: BLE001 - a plugin may be missing on another machine
            print(f"{label}: skipped ({type(exc).__name__})")
            continue
        rows.append((label, best, med, n))

    fragments = list(generate_frames(ds.PixelData, number_of_frames=n))
    buffers = [np.frombuffer(f, np.uint8) for f in fragments]
    best, med = _time(lambda: [cv2.imdecode(b, cv2.IMREAD_COLOR) for b in buffers], args.repeats)
    rows.append(("OpenCV imdecode full-res colour, 1 thread (fragments in memory)", best, med, n))
    best, med = _time(lambda: [cv2.imdecode(b, cv2.IMREAD_GRAYSCALE) for b in buffers], args.repeats)
    rows.append(("OpenCV imdecode full-res grey, 1 thread (fragments in memory)", best, med, n))

    for max_frames in (n, 100):
        cfg = PreprocessConfig(max_frames=max_frames)
        for threads in (1, None):
            def echonode_run(cfg: PreprocessConfig = cfg, threads: int | None = threads) -> object:
                _, frames = preprocess_file(path, cfg, DecodeOptions(threads=threads))
                return make_eval_clips(frames, cfg)
            best, med = _time(echonode_run, args.repeats)
            t_label = "1 thread" if threads == 1 else f"{min(4, os.cpu_count() or 1)} threads"
            rows.append((f"echonode decode+preprocess+clips, first {max_frames}, {t_label}",
                         best, med, min(n, max_frames)))

    width = max(len(r[0]) for r in rows)
    print(f"{'pipeline':<{width}}  {'frames/s (best)':>15}  {'(median)':>9}")
    fps: dict[str, float] = {}
    for label, best, med, frames in rows:
        fps[label] = frames / best
        print(f"{label:<{width}}  {frames / best:15.0f}  {frames / med:9.0f}")

    ours = max(v for k, v in fps.items() if k.startswith("echonode") and f"first {n}," in k)
    ours_1t = next(v for k, v in fps.items() if k.startswith("echonode") and f"first {n}," in k
                   and "1 thread" in k)
    opencv = fps["OpenCV imdecode full-res colour, 1 thread (fragments in memory)"]
    pyd = {k: v for k, v in fps.items() if k.startswith("pydicom")}
    print()
    print(f"echonode (all {n} frames, best threads) / OpenCV full-res colour decode: "
          f"{ours / opencv:.1f}x (1 thread: {ours_1t / opencv:.1f}x)")
    for k, v in pyd.items():
        print(f"echonode / {k}: {ours / v:.1f}x (1 thread: {ours_1t / v:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
