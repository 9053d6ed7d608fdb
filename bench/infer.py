"""Benchmark: every inference runtime side by side, and study latency.

Two measurements with the *same* weights: a random-init r3d_18 bundle of
width 64 (3x16x112x112 clips, unless ``--width``/``--quick`` say otherwise)
whose head is rescaled so that its logits spread like a trained model's
(standard deviation ``--logit-sd``, 2 by default, centred on the threshold),
with ``calibration.npz`` holding real preprocessed clips: the node's own
preprocessing (:func:`echonode.analyse.preprocess.preprocess_file`,
:func:`~echonode.analyse.preprocess.make_eval_clips`) of the real SonoSite loops in
pydicom-data (``color3d_jpeg_baseline.dcm``, 120 frames, and
``examples_ybr_color.dcm``, 30 frames; 4 evaluation clips each). ``--bundle``
measures an installed bundle instead, on its own head and clips.

1. Every runtime the machine supports (``echonode.bundles.runtime_select.supported_modes``,
   or ``--modes``) in ONE interleaved run: exactly the node's ``auto``
   selection (:func:`echonode.bundles.runtime_select.select_runtime`: builds timed
   apart, then rounds in which each candidate runs one batch of calibration
   clips, order rotated every round, first round untimed, median kept; the
   accuracy rule checked on every clip), with more rounds than the node
   uses by default. Printed: clips/s, ratio to eager and to bf16 autocast
   (the previous ``auto``), GFLOP/s achieved, largest probability
   difference from eager, decision flips, build seconds, and which runtime
   ``auto`` picks and why.
2. seconds for one study of ``--videos`` cine loops (copies of the real
   SonoSite cardiac loop ``color3d_jpeg_baseline.dcm`` from pydicom-data, each
   with its own SOP Instance UID):

   - naive: for each file in turn, pydicom ``pixel_array``, RGB->grey,
     area resize to 112, the first 100 frames, 4 evenly spaced 16-frame
     clips, per-clip min-max, one eager forward per clip;
   - echonode: :func:`echonode.analyse.pipeline.analyse_study` (decoding in a thread
     pool ahead of inference, clips of all videos batched by 8) with the
     runtime ``auto`` picked; also with the eager network (decoding hidden,
     no runtime) to show where the gain comes from.

On a CUDA machine (``--device cuda``) the runtime's ``cuda`` mode is timed
and the fraction of the card's peak is printed (``--gpu-peak-tflops``);
that path has not been run by the author (no GPU was available).

Run:

    .venv/bin/python -m bench.infer            # full run (about 10 minutes on 2 cores)
    .venv/bin/python -m bench.infer --quick    # smoke run: width 16, 2 videos, fewer rounds
    .venv/bin/python -m bench.infer --no-study --modes jit,bf16,openvino_bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pydicom.uid
import torch
from pydicom.data import get_testdata_file

from bench.machine import cpu_flags
from bench.machine import cpu_model as _cpu_model
from bench.machine import load_average as _load
from echonode.analyse.pipeline import analyse_study
from echonode.analyse.preprocess import (
    PreprocessConfig,
    eval_clip_starts,
    make_eval_clips,
    normalise_clip,
    preprocess_file,
)
from echonode.bundles.calibration import CALIBRATION_FILE, encode_calibration
from echonode.bundles.manifest import BundleMeta, model_set_key
from echonode.bundles.nets import VideoClassifier, build_model, normalise_for_model
from echonode.bundles.registry import ModelSet
from echonode.bundles.runtime import (
    MODES,
    cpu_has_native_bf16,
    openvino_home,
    openvino_version,
    optimise_for_inference,
    synthetic_clips,
)
from echonode.bundles.runtime_select import (
    Forward,
    Selection,
    builders_for,
    bundle_calibration,
    select_runtime,
    supported_modes,
)
from echonode.bundles.weights import Bundle, load_bundle, save_bundle

#: The real loops whose clips serve as the bench bundle's calibration clips.
REAL_LOOPS = ("color3d_jpeg_baseline.dcm", "examples_ybr_color.dcm")


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


def real_clips(size: int, frames: int) -> np.ndarray:
    """The node's evaluation clips of the real loops: ``(8, 3, frames, size, size)`` in [0, 1]."""
    cfg = PreprocessConfig(size=size, clip_frames=frames)
    clips = []
    for name in REAL_LOOPS:
        path = get_testdata_file(name, download=False)
        if path is None:
            raise SystemExit(f"{name} not found (pip install pydicom-data)")
        _, frames_u8 = preprocess_file(path, cfg)
        clips.append(make_eval_clips(frames_u8, cfg))
    return np.concatenate(clips)


def trained_looking_head(model: VideoClassifier, clips: torch.Tensor, sd: float, threshold: float) -> None:
    """Rescale the binary head so that its logits on ``clips`` have std ``sd``, centred on ``threshold``.

    A random head reads a random direction of nearly identical features:
    its probabilities sit near 0.5 and every runtime looks accurate. A
    trained head spreads its logits (sd about 2), which amplifies the
    numerical error of bf16 and int8 in probability space.
    """
    captured: list[torch.Tensor] = []
    handle = model.fc.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach()))
    try:
        with torch.inference_mode():
            model(clips)
    finally:
        handle.remove()
    features = captured[0].double()
    with torch.no_grad():
        weight = model.fc.weight.double()
        logits = features @ weight.T
        weight = weight * (sd / float(logits.std()))
        bias = float(np.log(threshold / (1 - threshold))) - float((features @ weight.T).mean())
        model.fc.weight.copy_(weight.float())
        model.fc.bias.fill_(bias)


def make_bench_bundle(folder: Path, width: int, logit_sd: float, extra_synthetic: int = 0) -> Path:
    """A width-``width`` r3d_18 bundle with a trained-looking head and real calibration clips.

    The head is scaled so that its logits have std ``logit_sd`` over the
    calibration clips, plus ``extra_synthetic`` synthetic echo-like clips
    when asked: the 8 real clips come from two loops of one heart, so
    spreading them alone to sd 2 takes a much larger head gain than a
    varied set does (a harsher test of bf16 and int8 than a trained head).
    """
    frames, size = 16, 112
    torch.manual_seed(0)
    model = build_model("r3d_18", 1, width=width).eval().requires_grad_(False)
    clips = real_clips(size, frames)
    fit = torch.from_numpy(clips)
    if extra_synthetic:
        fit = torch.cat([fit, synthetic_clips(extra_synthetic, frames, size, seed=5)])
    trained_looking_head(model, fit, logit_sd, 0.5)
    meta = BundleMeta.create(name="bench-r3d18", task="lvh", width=width, random_weights=True)
    source = f"real: node-preprocessed evaluation clips of {REAL_LOOPS[0]} (4) and {REAL_LOOPS[1]} (4)"
    return save_bundle(folder, meta, model.state_dict(), extra_files={CALIBRATION_FILE: encode_calibration(clips, source)})


def openvino_default_precision() -> str | None:
    """OpenVINO's CPU plugin default inference precision here (None without OpenVINO)."""
    if openvino_version() is None:
        return None
    with openvino_home(None):
        import openvino as ov

    value = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    return str(value.get_type_name()) if hasattr(value, "get_type_name") else str(value)


def print_selection(selection: Selection, flops: float, peak_gflops: float | None) -> None:
    """The side-by-side table: speed, ratios, accuracy, result."""
    eager = selection.trial("eager")
    bf16 = selection.trial("bf16")
    eager_cps = eager.clips_per_s if eager else None
    bf16_cps = bf16.clips_per_s if bf16 and bf16.seconds_per_clip else None
    header = (f"{'mode':14s} {'clips/s':>8s} {'[min..max]':>14s} {'vs eager':>8s} {'vs bf16':>8s} {'GFLOP/s':>8s}"
              + (f" {'% peak':>7s}" if peak_gflops else "") + f" {'max|dp|':>8s} {'flips':>6s} {'build s':>8s}  result")
    print(header)
    rows = {row["mode"]: row for row in selection.rows()}
    for t in selection.trials:
        row = rows[t.mode]
        cps = t.clips_per_s
        spread = (f"[{1 / max(t.seconds_per_clip):.2f}..{1 / min(t.seconds_per_clip):.2f}]"
                  if t.seconds_per_clip else "-")
        gflops = cps * flops / 1e9 if cps else None
        line = (f"{t.mode:14s} {(f'{cps:.3f}' if cps else '-'):>8s} {spread:>14s} "
                f"{(f'{cps / eager_cps:.2f}x' if cps and eager_cps else '-'):>8s} "
                f"{(f'{cps / bf16_cps:.2f}x' if cps and bf16_cps else '-'):>8s} "
                f"{(f'{gflops:.0f}' if gflops else '-'):>8s}")
        if peak_gflops:
            line += f" {(f'{100 * gflops / peak_gflops:.1f}' if gflops else '-'):>7s}"
        diff = "-" if t.max_prob_diff is None else f"{t.max_prob_diff:.4f}"
        line += f" {diff:>8s} {t.flips:>3d}/{t.flips_in_band:<2d} {t.build_s:>8.1f}  {row['result']}"
        print(line, flush=True)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The bench's command line, and the runtimes to compare with eager.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    args : argparse.Namespace
        The parsed options (sizes left unset are filled in by :func:`main`).
    modes : list of str
        ``--modes`` without eager, else every mode this machine supports
        (without the compile modes in a ``--quick`` run).

    Raises
    ------
    SystemExit
        When ``--modes`` names something that is not a CPU runtime.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="width 16, 2 videos, 3 timed rounds, no compile: a smoke run")
    parser.add_argument("--width", type=int, default=None, help="network base width (64 = r3d_18)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default=None,
                        help="candidates besides eager, comma-separated (default: every mode this machine supports)")
    parser.add_argument("--batch", type=int, default=2, help="clips per timed call (the node's auto uses 2)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 6; the node's auto uses 4)")
    parser.add_argument("--logit-sd", type=float, default=2.0, help="spread of the bench head's logits")
    parser.add_argument("--head-fit-synthetic", type=int, default=0,
                        help="also spread the head's logits over N synthetic echo-like clips (a milder head)")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="measure this bundle (its head, its calibration.npz) instead of the bench bundle")
    parser.add_argument("--bf16-peak-gflops", type=float, default=None,
                        help="the CPU's bf16 peak for these threads, for a fraction-of-peak column")
    parser.add_argument("--videos", type=int, default=None, help="videos in the study (default 4)")
    parser.add_argument("--study-repeats", type=int, default=None, help="timed repeats of each study pipeline (default 2)")
    parser.add_argument("--no-study", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--gpu-peak-tflops", type=float, default=None,
                        help="the card's peak dense bf16/fp16 TFLOP/s for the fraction-of-peak figure")
    args = parser.parse_args(argv)
    if args.modes:
        modes = [m.strip() for m in args.modes.split(",") if m.strip() and m.strip() != "eager"]
        unknown = [m for m in modes if m not in MODES or m in ("auto", "cuda")]
        if unknown:
            parser.error(f"--modes: not a CPU runtime: {', '.join(unknown)} (choose from {', '.join(supported_modes())})")
    else:
        modes = [m for m in supported_modes() if not (args.quick and m.startswith("compile"))]
    return args, modes


def print_machine(threads: int) -> None:
    """One line on what decides the runtimes' speed here: cores, ISA flags, torch and OpenVINO."""
    print(f"machine: {os.cpu_count()} cores, {_cpu_model()}; ISA flags: {' '.join(cpu_flags()) or 'n/a'}; "
          f"native bf16 (oneDNN): {cpu_has_native_bf16()}; torch {torch.__version__}, {threads} threads; "
          f"openvino {openvino_version() or 'not installed'} (default CPU precision: {openvino_default_precision()}); "
          f"load average {_load()}")


@dataclass
class BenchNetwork:
    """The measured bundle, loaded eager, with what every measurement needs of it."""

    #: The bundle's folder.
    path: Path
    #: The bundle; its ``model`` is the eager network.
    bundle: Bundle
    #: FLOPs of one clip (:func:`conv_flops`).
    flops: float
    #: The calibration clips, normalised for the network, on the device.
    calibration: torch.Tensor


def load_network(args: argparse.Namespace, work: Path, width: int, device: torch.device) -> BenchNetwork:
    """Load ``--bundle`` or a new bench bundle, and describe it and its calibration clips.

    Parameters
    ----------
    args : argparse.Namespace
        The command line (:func:`parse_args`): ``bundle``, ``logit_sd``, ``head_fit_synthetic``.
    work : Path
        The bench's folder; the bench bundle is written to ``work/bundle``.
    width : int
        The bench bundle's network width.
    device : torch.device
        Where the network and the calibration clips go.

    Returns
    -------
    BenchNetwork
        The bundle, eager, its clips' FLOPs and its calibration clips.
    """
    bundle_path = args.bundle or make_bench_bundle(work / "bundle", width, args.logit_sd, args.head_fit_synthetic)
    # Eager: the runtimes are built below; a runner built on load would also
    # take precedence over bundle.model in predict, so the study latency's
    # "echonode eager" row would not be eager.
    bundle = load_bundle(bundle_path, device, runtime="eager")
    eager = bundle.model
    frames, size = bundle.meta.clip_frames, bundle.meta.frame_size
    flops = conv_flops(eager, (3, frames, size, size))
    raw, source = bundle_calibration(bundle_path, frames, size)
    calibration = normalise_for_model(raw, bundle.meta.normalisation).to(device)
    with torch.inference_mode():
        logits = eager(calibration).float()
    probs = torch.sigmoid(logits[:, 0]) if bundle.is_binary else torch.softmax(logits, 1).max(1).values
    print(f"network: {bundle.meta.arch} width {bundle.meta.architecture['width']}, clips 3x{frames}x{size}x{size}, "
          f"{flops / 1e9:.1f} GFLOP a clip; "
          + (f"bench bundle, random weights, head rescaled to logit sd {args.logit_sd:g} over the calibration clips"
             + (f" and {args.head_fit_synthetic} synthetic clips" if args.head_fit_synthetic else "")
             if args.bundle is None else str(bundle_path)))
    print(f"calibration: {raw.shape[0]} clips, {source}; eager logits sd {float(logits.std()):.2f}, "
          f"probabilities {float(probs.min()):.3f}..{float(probs.max()):.3f}, threshold {bundle.threshold}")
    return BenchNetwork(path=bundle_path, bundle=bundle, flops=flops, calibration=calibration)


def compare_runtimes(net: BenchNetwork, modes: list[str], batch: int, rounds: int, work: Path,
                     peak_gflops: float | None) -> tuple[Selection, dict[str, Forward]]:
    """Every runtime side by side: the node's ``auto`` selection in one interleaved run, printed.

    Parameters
    ----------
    net : BenchNetwork
        The eager network and its calibration clips.
    modes : list of str
        The candidates besides eager.
    batch : int
        Clips per timed call.
    rounds : int
        Timed rounds.
    work : Path
        The bench's folder; the runtimes keep their state in ``work/state``.
    peak_gflops : float, optional
        The CPU's bf16 peak, for a fraction-of-peak column.

    Returns
    -------
    selection : Selection
        Every candidate's figures and the runtime ``auto`` picks.
    built : dict
        The runtimes built, by mode.
    """
    eager, calibration = net.bundle.model, net.calibration
    print(f"\ncandidates: eager, {', '.join(modes)}; one interleaved run, batch {batch}, 1 untimed + "
          f"{rounds} timed rounds, medians (min..max in brackets)", flush=True)
    t0 = time.perf_counter()
    selection, built = select_runtime(
        eager, calibration, builders_for(modes, eager, calibration, batch=batch, state_dir=work / "state"),
        threshold=net.bundle.threshold, batch=batch, rounds=rounds,
    )
    print(f"(builds {selection.build_s:.0f} s, measuring {selection.measure_s:.0f} s, total {time.perf_counter() - t0:.0f} s; "
          f"load average {_load()})")
    print_selection(selection, net.flops, peak_gflops)
    print_choice(selection)
    return selection, built


def print_choice(selection: Selection) -> None:
    """Which runtime ``auto`` picks, how much faster than eager, and which the accuracy rule refused."""
    chosen = selection.trial(selection.chosen)
    assert chosen is not None
    refused = [t.mode for t in selection.trials if not t.passed]
    print(f"\nauto picks: {selection.chosen} ({chosen.clips_per_s:.3f} clips/s, "
          f"{(chosen.clips_per_s or 0) / (selection.trial('eager').clips_per_s or 1):.2f}x eager): the fastest of the "  # type: ignore[union-attr]
          f"runtimes that passed the accuracy rule (max |dp| <= {selection.tolerance:g}, no flip outside "
          f"{selection.band:g} of the threshold); refused here: {', '.join(refused) or 'none'}")


def time_echonode(bundle: Bundle, model: Forward, paths: list[Path]) -> float:
    """Seconds of :func:`~echonode.analyse.pipeline.analyse_study` on ``paths`` with ``model`` as the bundle's network."""
    # predict only calls bundle.model, so a built runtime can stand in for the network.
    bundle.model = model  # type: ignore[assignment]
    models = ModelSet(bundles=(bundle,), key=model_set_key([bundle]))
    t0 = time.perf_counter()
    result = analyse_study("1.2.3", paths, models, batch_size=8, decode_threads=2)
    took = time.perf_counter() - t0
    assert result.tasks, result.skipped_reason
    return took


def study_latency(net: BenchNetwork, runtime: Forward, chosen: str, work: Path, n_videos: int, repeats: int) -> None:
    """Seconds for one study: the naive implementation against echonode, eager and with ``auto``'s runtime.

    Parameters
    ----------
    net : BenchNetwork
        The bundle, eager.
    runtime : Forward
        The runtime ``auto`` picked (the eager network when it picked eager).
    chosen : str
        Its mode, for the printout.
    work : Path
        The bench's folder; the study's files are written there.
    n_videos : int
        Videos in the study.
    repeats : int
        Timed repeats of each pipeline; medians are printed.
    """
    bundle = net.bundle
    eager = bundle.model
    frames, size = bundle.meta.clip_frames, bundle.meta.frame_size
    paths = make_study(work, n_videos)
    print(f"\nstudy: {n_videos} copies of the SonoSite loop (120 frames 480x640 JPEG; 100 used, 4 clips each = "
          f"{4 * n_videos} clips); median of {repeats} run(s)")
    times: dict[str, list[float]] = {"naive": [], "echonode eager": [], "echonode auto": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        naive_study(paths, eager, size, frames)
        times["naive"].append(time.perf_counter() - t0)
        times["echonode eager"].append(time_echonode(bundle, eager, paths))
        times["echonode auto"].append(time_echonode(bundle, runtime, paths))
    bundle.model = eager
    naive_s = statistics.median(times["naive"])
    for name, v in times.items():
        med = statistics.median(v)
        print(f"  {name:17s} {med:7.2f} s  ({', '.join(f'{t:.2f}' for t in v)})"
              + ("" if name == "naive" else f"  = {naive_s / med:.2f}x faster than naive"))
    print(f"  (auto's runtime: {chosen}; load average {_load()})")


def main(argv: list[str] | None = None) -> int:
    """Run the bench; return the exit status.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when None.
    """
    args, modes = parse_args(argv)
    width = args.width or (16 if args.quick else 64)
    rounds = args.rounds or (3 if args.quick else 6)
    n_videos = args.videos or (2 if args.quick else 4)
    study_repeats = args.study_repeats or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print_machine(args.threads)
    work = Path(tempfile.mkdtemp(prefix="echonode-bench-infer-"))
    net = load_network(args, work, width, device)
    if device.type == "cuda":
        return _cuda(net.bundle.model, net.calibration, net.flops, args)
    selection, built = compare_runtimes(net, modes, args.batch, rounds, work, args.bf16_peak_gflops)
    if not args.no_study:
        runtime = built.get(selection.chosen, net.bundle.model)
        study_latency(net, runtime, selection.chosen, work, n_videos, study_repeats)
    return 0


def _cuda(eager: torch.nn.Module, calibration: torch.Tensor, flops: float, args: argparse.Namespace) -> int:
    """GPU: eager against the ``cuda`` mode (UNMEASURED: no GPU was available to the author)."""
    rt = optimise_for_inference(eager, calibration[:2], "cuda")
    print(f"runtime cuda: chose {rt.mode}; dropped: {rt.fallbacks or 'none'}")
    x = calibration[:8] if calibration.shape[0] >= 8 else calibration
    res = time_throughput({"eager": eager, "cuda": rt}, x, args.rounds or 6)
    peak = args.gpu_peak_tflops
    if peak is None and "H100" in torch.cuda.get_device_name(calibration.device):
        peak = 989.0  # H100 SXM dense bf16
    for name, v in res.items():
        cps = 1.0 / statistics.median(v)
        gflops = cps * flops / 1e9
        extra = f", {100 * gflops / (peak * 1e3):.1f} % of {peak:g} TFLOP/s peak" if peak else ""
        print(f"  batch {x.shape[0]} {name}: {cps:.1f} clips/s, {gflops:.0f} GFLOP/s{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
