"""Benchmark: r3d_18 inference and study latency, echonode's runtime vs the naive way.

Two measurements, with the *same* weights (a random-init r3d_18 bundle of
width 64, 3x16x112x112 clips, unless ``--width``/``--quick`` say otherwise):

1. clips/s of plain eager torch (``model(x)`` under ``torch.inference_mode``)
   against :func:`echonode.runtime.optimise_for_inference` (``--modes``,
   default ``auto``), at batch 1, 4 and 8, on ``--threads`` threads. Timings
   are interleaved (eager, runtime, eager, ...) so that load from other jobs
   on a shared machine hits both alike; medians are reported.
2. seconds for one study of ``--videos`` cine loops (copies of the real
   SonoSite cardiac loop ``color3d_jpeg_baseline.dcm`` from pydicom-data, each
   with its own SOP Instance UID):

   - naive: for each file in turn, pydicom ``pixel_array``, RGB->grey,
     area resize to 112, the first 100 frames, 4 evenly spaced 16-frame
     clips, per-clip min-max, one eager forward per clip;
   - echonode: :func:`echonode.pipeline.analyse_study` (decoding in a thread
     pool ahead of inference, clips of all videos batched by 8) with the
     bundle's network replaced by the runtime; also with the eager network
     (decoding hidden, no runtime) to show where the gain comes from.

On a CUDA machine (``--device cuda``) the runtime's ``cuda`` mode is timed
and the fraction of the card's peak is printed (``--gpu-peak-tflops``);
that path has not been run by the author (no GPU was available).

Run:

    .venv/bin/python bench/infer.py            # full run (about 10 minutes on 2 cores)
    .venv/bin/python bench/infer.py --quick    # smoke run: width 16, 2 videos, 1 repeat
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pydicom.uid
import torch
from pydicom.data import get_testdata_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_model as _cpu_model  # noqa: E402
from bench.machine import load_average as _load  # noqa: E402

from echonode.bundle import BundleMeta, ModelSet, load_bundle, model_set_key, save_bundle  # noqa: E402
from echonode.nets import build_model  # noqa: E402
from echonode.pipeline import analyse_study  # noqa: E402
from echonode.preprocess import eval_clip_starts, normalise_clip  # noqa: E402
from echonode.runtime import cpu_has_native_bf16, optimise_for_inference, synthetic_clips  # noqa: E402


def conv_flops(model: torch.nn.Module, clip_shape: tuple[int, ...]) -> float:
    """Multiply-add FLOPs (2 per MAC) of the convolutions and fc for one clip."""
    total = 0.0

    def hook(mod: torch.nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, torch.nn.Conv3d):
            k = int(np.prod(mod.kernel_size)) * mod.in_channels // mod.groups
            total += 2.0 * k * out.numel()
        elif isinstance(mod, torch.nn.Linear):
            total += 2.0 * mod.in_features * out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Linear))]
    try:
        with torch.inference_mode():
            model(torch.zeros((1, *clip_shape), device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_throughput(
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    x: torch.Tensor,
    rounds: int,
) -> dict[str, list[float]]:
    """Seconds per clip for each callable, interleaved over ``rounds`` rounds."""
    device = x.device
    per_clip: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up (oneDNN primitive creation, cudnn autotune)
            fn(x)
            _sync(device)
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                _sync(device)
                per_clip[name].append((time.perf_counter() - t0) / x.shape[0])
    return per_clip


def make_study(folder: Path, n_videos: int) -> list[Path]:
    """``n_videos`` copies of the SonoSite loop, one study, distinct SOP UIDs."""
    src = get_testdata_file("color3d_jpeg_baseline.dcm", download=False)
    if src is None:
        raise SystemExit("color3d_jpeg_baseline.dcm not found (pip install pydicom-data)")
    paths = []
    for i in range(n_videos):
        ds = pydicom.dcmread(src)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = i + 1
        path = folder / f"video{i:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def naive_study(paths: list[Path], model: torch.nn.Module, size: int, clip_frames: int) -> list[float]:
    """What a straightforward implementation does: sequential, one forward per clip."""
    video_probs = []
    for path in paths:
        ds = pydicom.dcmread(path)
        rgb = ds.pixel_array[:100]  # pydicom converts YBR to RGB
        grey = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in rgb]
        frames = np.stack([cv2.resize(g, (size, size), interpolation=cv2.INTER_AREA) for g in grey])
        probs = []
        for start in eval_clip_starts(frames.shape[0], clip_frames, 4):
            clip = np.zeros((clip_frames, size, size), np.float32)
            real = frames[start : start + clip_frames]
            clip[: real.shape[0]] = normalise_clip(real)
            x = torch.from_numpy(np.repeat(clip[None, None], 3, axis=1))
            with torch.inference_mode():
                probs.append(float(torch.sigmoid(model(x))[0, 0]))
        video_probs.append(float(np.mean(probs)))
    return video_probs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="width 16, 2 videos, 1 round: a smoke run")
    parser.add_argument("--width", type=int, default=None, help="network base width (64 = r3d_18)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4,8)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per batch size (default 3)")
    parser.add_argument("--modes", default="auto", help="runtime modes to time, comma-separated (auto,jit,bf16,int8)")
    parser.add_argument("--videos", type=int, default=None, help="videos in the study (default 4)")
    parser.add_argument("--study-repeats", type=int, default=None, help="timed repeats of each study pipeline (default 2)")
    parser.add_argument("--no-study", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--gpu-peak-tflops", type=float, default=None,
                        help="the card's peak dense bf16/fp16 TFLOP/s for the fraction-of-peak figure")
    args = parser.parse_args(argv)
    width = args.width or (16 if args.quick else 64)
    batches = [int(b) for b in (args.batches or ("4" if args.quick else "1,4,8")).split(",")]
    rounds = args.rounds or (1 if args.quick else 3)
    n_videos = args.videos or (2 if args.quick else 4)
    study_repeats = args.study_repeats or (1 if args.quick else 2)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        modes = ["cuda"]

    print(f"machine: {os.cpu_count()} cores, {_cpu_model()}; native bf16: {cpu_has_native_bf16()}; "
          f"torch {torch.__version__}, {args.threads} threads; load average {_load()}")
    frames, size = 16, 112
    work = Path(tempfile.mkdtemp(prefix="echonode-bench-infer-"))
    torch.manual_seed(0)
    meta = BundleMeta.create(name="bench-r3d18", task="lvh", width=width, random_weights=True)
    save_bundle(work / "bundle", meta, build_model("r3d_18", 1, width=width).state_dict())
    # Eager: the runtimes timed here are built below; a runner built on load
    # would also take precedence over bundle.model in predict, so the study
    # latency's "echonode eager" row would not be eager.
    bundle = load_bundle(work / "bundle", device, runtime="eager")
    eager = bundle.model
    clip_shape = (3, frames, size, size)
    flops = conv_flops(eager, clip_shape)
    print(f"network: r3d_18 width {width}, clips 3x{frames}x{size}x{size}, {flops / 1e9:.1f} GFLOP a clip; "
          f"same random-init weights for every variant")

    # --- 1. throughput --------------------------------------------------------------
    example = synthetic_clips(2, frames, size).to(device)
    runtimes = {}
    for mode in modes:
        t0 = time.perf_counter()
        rt = optimise_for_inference(eager, example, mode)
        print(f"runtime {mode}: chose {rt.mode} in {time.perf_counter() - t0:.1f} s "
              f"(self-check max |dp| {rt.max_abs_diff}); dropped: {rt.fallbacks or 'none'}", flush=True)
        runtimes[f"runtime[{mode}->{rt.mode}]"] = rt
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"eager": eager, **runtimes}
    print(f"\nclips/s, median of {rounds} interleaved round(s) (min..max in brackets):")
    summary: dict[int, dict[str, float]] = {}
    for b in batches:
        x = synthetic_clips(b, frames, size, seed=b).to(device)
        res = time_throughput(fns, x, rounds)
        summary[b] = {k: 1.0 / statistics.median(v) for k, v in res.items()}
        line = []
        for name, v in res.items():
            cps = 1.0 / statistics.median(v)
            ratio = cps * statistics.median(res["eager"])
            line.append(f"{name} {cps:.2f} [{1 / max(v):.2f}..{1 / min(v):.2f}]" + ("" if name == "eager" else f" = {ratio:.2f}x"))
        print(f"  batch {b}: " + "; ".join(line) + f"   (load {_load()})", flush=True)
    best_b = max(batches)
    for name, cps in summary[best_b].items():
        gflops = cps * flops / 1e9
        extra = ""
        if device.type == "cuda":
            peak = args.gpu_peak_tflops
            if peak is None and "H100" in torch.cuda.get_device_name(device):
                peak = 989.0  # H100 SXM dense bf16
            if peak:
                extra = f", {100 * gflops / (peak * 1e3):.1f} % of {peak:g} TFLOP/s peak"
        print(f"  batch {best_b} {name}: {gflops:.0f} GFLOP/s achieved{extra}")

    # --- 2. study latency ----------------------------------------------------------------
    if not args.no_study:
        paths = make_study(work, n_videos)
        rt = next(iter(runtimes.values()))
        print(f"\nstudy: {n_videos} copies of the SonoSite loop (120 frames 480x640 JPEG; 100 used, 4 clips each = "
              f"{4 * n_videos} clips); median of {study_repeats} run(s)")

        def echonode_with(model_fn) -> float:
            bundle.model = model_fn
            models = ModelSet(bundles=(bundle,), key=model_set_key([bundle]))
            t0 = time.perf_counter()
            result = analyse_study("1.2.3", paths, models, batch_size=8, decode_threads=2)
            took = time.perf_counter() - t0
            assert result.tasks, result.skipped_reason
            return took

        times: dict[str, list[float]] = {"naive": [], "echonode eager": [], "echonode runtime": []}
        for _ in range(study_repeats):
            t0 = time.perf_counter()
            naive_study(paths, eager, size, frames)
            times["naive"].append(time.perf_counter() - t0)
            times["echonode eager"].append(echonode_with(eager))
            times["echonode runtime"].append(echonode_with(rt))
        bundle.model = eager
        naive_s = statistics.median(times["naive"])
        for name, v in times.items():
            s = statistics.median(v)
            print(f"  {name:17s} {s:7.2f} s  ({', '.join(f'{t:.2f}' for t in v)})"
                  + ("" if name == "naive" else f"  = {naive_s / s:.2f}x faster than naive"))
        print(f"  (runtime mode {rt.mode}; load average {_load()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
