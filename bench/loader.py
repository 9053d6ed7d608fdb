"""Benchmark: the pretraining data loader, echonode's clip cache against a naive loader.

The issue asks for "a data loader that keeps the accelerator busy (measure
it)". In one run:

1. a small synthetic archive at cart size (:func:`train.synth.generate_archive`,
   480x640 JPEG, ``--patients`` 6 by default) is written and indexed into a
   clip cache at the paper's 112 px (:func:`train.index.build_index`); with
   ``--work DIR`` both are kept in ``DIR`` and reused by the next run;
2. echonode's loader: :class:`train.datasets.PairDataset` (EchoCLR pairs of the
   training split's PLAX videos, 4-frame clips, 112 px, the paper's
   augmentation, frame reordering) read from the cache, in a
   ``torch.utils.data.DataLoader`` (``--batch`` 32 pairs, shuffled,
   ``drop_last``) with ``--workers`` 0, 1, 2;
3. the peer, a naive loader with the same output: the same dataset class
   and the same pairs, sampler and random draws, but each item reads both
   DICOM files and runs the node's decode + preprocessing
   (:func:`echonode.analyse.preprocess.preprocess_file`, one decode thread) every
   time, as a training script that reads videos per sample does; the first
   items of both loaders are checked to be identical tensors. It is a strong
   peer: it decodes with echonode's fast path (reduced greyscale JPEG
   decode), 10-45x faster than pydicom's ``pixel_array`` (docs/benchmarks.md,
   "Decode");
4. the consumer, for context: the paper network
   (:class:`train.pretrain.PretrainModel` width 64, reordering head) forward
   + backward + Adam step on a loader batch (``--model-batch``, default the
   loader's batch) on this machine (``--device``), and the tiny width 8 too
   (``--widths``).

Loader figures are pairs per second over ``--batches`` batches, timed from
the arrival of the first round of batches (one batch per worker, which also
hides worker start-up) so that every worker count is timed in steady state;
the number of timed batches is rounded up to a multiple of the worker count.
Nothing is asserted: these are measurements (the machines are shared; the
load average is printed). Files come from the page cache after the first
read, for both loaders alike.

Run:

    .venv/bin/python -m bench.loader                 # full run, a few minutes on 2 cores
    .venv/bin/python -m bench.loader --quick         # smoke run, under a minute
    .venv/bin/python -m bench.loader --work /tmp/lb --json loader.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from bench.machine import cpu_model, load_average
from echonode.analyse.decode import DecodeOptions
from echonode.analyse.preprocess import PreprocessConfig, preprocess_file, training_clip
from train.augment import AugmentConfig
from train.cache import ClipCache, split_cache
from train.datasets import PairDataset, _resize
from train.index import build_index
from train.pretrain import PretrainModel, pretrain_step
from train.synth import generate_archive

SIZE = 112
CLIP_FRAMES = 4


class NaivePairDataset(PairDataset):
    """:class:`PairDataset` that decodes the DICOM files for every item.

    Same pairs, same per-item random draws, same augmentation and
    normalisation as the cache-based dataset; the only difference is where
    the ``(T, 112, 112)`` frames come from: ``preprocess_file`` on the
    stored object, each time. The list of pairs and file paths is taken from
    the cache's manifest (a naive script gets it from a CSV listing).
    """

    def __init__(self, archive: Path, cache: ClipCache, studies: list[str], cfg: PreprocessConfig, **kwargs) -> None:
        super().__init__(cache, studies, **kwargs)
        self.cfg = cfg
        self.paths = {sop: Path(archive) / v["source"]["path"] for sop, v in cache.by_sop.items()}

    def _train_clip(
        self,
        sop_uid: str,
        clip_frames: int,
        rng: np.random.Generator,
        gen: torch.Generator,
        augment: AugmentConfig | None,
        raw: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if raw is None:
            _, frames = preprocess_file(self.paths[sop_uid], self.cfg, DecodeOptions(threads=1))
            u8 = training_clip(frames, clip_frames, rng)
            raw = _resize(torch.from_numpy(np.array(u8, dtype=np.float32)).unsqueeze(0), self.size)
        return super()._train_clip(sop_uid, clip_frames, rng, gen, augment, raw=raw)


def prepare(work: Path, patients: int, seed: int) -> tuple[Path, Path, dict[str, float]]:
    """Synthetic archive and its 112 px clip cache under ``work`` (reused when present)."""
    archive, cache = work / "archive", work / "cache"
    took: dict[str, float] = {}
    if not (archive / "videos.csv").is_file():
        summary = generate_archive(archive, patients, seed=seed)
        took["synth_s"] = summary.seconds
        print(f"archive: {summary.patients} patients, {summary.studies} studies, {summary.videos} videos, "
              f"{summary.frames} frames at 480x640 JPEG, written in {summary.seconds:.1f} s", flush=True)
    else:
        print(f"archive: reusing {archive}", flush=True)
    report = build_index(archive, cache, PreprocessConfig(size=SIZE), progress=False)
    took["index_s"] = report.seconds
    print(f"cache: {report.cached} videos ({report.added} indexed now, {report.reused} reused), "
          f"{report.unusable} unusable, {report.seconds:.1f} s", flush=True)
    return archive, cache, took


def _loader(ds: PairDataset, batch: int, workers: int, n_batches: int, seed: int) -> DataLoader:
    # shuffle=True is a RandomSampler; num_samples lets a small archive give
    # as many batches as asked (successive permutations, no replacement).
    sampler = RandomSampler(ds, num_samples=n_batches * batch, generator=torch.Generator().manual_seed(seed))
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                      persistent_workers=False)


def time_loader(ds: PairDataset, batch: int, workers: int, batches: int, seed: int) -> dict[str, float]:
    """Steady-state pairs/s: timed from the arrival of the first round of batches."""
    warm = max(1, workers)
    timed = -(-batches // warm) * warm
    loader = _loader(ds, batch, workers, warm + timed, seed)
    it = iter(loader)
    t_start = time.perf_counter()
    for _ in range(warm):
        next(it)
    t0 = time.perf_counter()
    for _ in range(timed):
        next(it)
    t1 = time.perf_counter()
    del it
    return {"pairs_per_s": timed * batch / (t1 - t0), "batches": timed, "warmup_s": t0 - t_start}


def same_items(a: PairDataset, b: PairDataset, n: int) -> bool:
    """Whether the first ``n`` items of both datasets are identical."""
    for i in range(min(n, len(a))):
        x, y = a[i], b[i]
        if not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


class ModelTiming(TypedDict):
    """What :func:`time_model` measures: pairs/s, the batch, and each timed step's seconds."""

    pairs_per_s: float
    batch: int
    steps: int
    step_s: list[float]


def time_model(width: int, batch: dict[str, torch.Tensor], steps: int, device: torch.device) -> ModelTiming:
    """Training pairs/s of ``PretrainModel(width)``: forward, backward, Adam step."""
    torch.manual_seed(0)
    model = PretrainModel("r3d_18", width, reorder=True).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    b = {k: v.to(device) for k, v in batch.items()}

    def step() -> float:
        out = pretrain_step(model, b, temperature=0.05, reorder=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return float(out.loss.detach())  # synchronises CUDA

    step()  # warm-up (oneDNN primitives, cudnn autotune)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    n = int(b["x1"].shape[0])
    return {"pairs_per_s": n / statistics.median(times), "batch": n, "steps": steps,
            "step_s": [round(t, 3) for t in times]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's command line; unset sizes are filled in by :func:`settings_from`.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    argparse.Namespace
        The parsed options.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 patients, batch 8, 3 batches, workers 0,1, width 8 only")
    parser.add_argument("--work", default=None, help="folder for the archive and cache (kept and reused)")
    parser.add_argument("--patients", type=int, default=None, help="synthetic patients (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=None, help="pairs per batch (default 32)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per loader (default 10)")
    parser.add_argument("--workers", default=None, help="comma-separated worker counts (default 0,1,2)")
    parser.add_argument("--widths", default=None, help="network widths for the consumer (default 64,8; '' for none)")
    parser.add_argument("--model-batch", type=int, default=None, help="pairs per model step (default --batch)")
    parser.add_argument("--model-steps", type=int, default=None, help="timed model steps after one warm-up (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process (default 1)")
    parser.add_argument("--device", default="cpu", help="device of the consumer model (cpu or cuda)")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Settings:
    """The run's sizes: the command line's, else the full run's or the ``--quick`` run's defaults."""

    patients: int
    seed: int
    batch: int
    batches: int
    workers: list[int]
    widths: list[int]
    model_batch: int
    model_steps: int
    device: torch.device


def settings_from(args: argparse.Namespace) -> Settings:
    """The sizes of this run from the parsed command line (:func:`parse_args`)."""
    q = args.quick
    batch = args.batch or (8 if q else 32)
    widths_arg = args.widths if args.widths is not None else ("8" if q else "64,8")
    return Settings(
        patients=args.patients or (3 if q else 6),
        seed=args.seed,
        batch=batch,
        batches=args.batches or (3 if q else 10),
        workers=[int(w) for w in (args.workers or ("0,1" if q else "0,1,2")).split(",")],
        widths=[int(w) for w in widths_arg.split(",") if w.strip()],
        model_batch=args.model_batch or batch,
        model_steps=args.model_steps or (1 if q else 2),
        device=torch.device(args.device),
    )


def measure_loaders(ours: PairDataset, naive: PairDataset, s: Settings) -> list[dict[str, object]]:
    """Pairs per second of both loaders at each worker count, printed as they come.

    Parameters
    ----------
    ours, naive : PairDataset
        echonode's cache-based dataset and the decode-per-item peer.
    s : Settings
        Batch size, timed batches, worker counts and seed.

    Returns
    -------
    list of dict
        One row per worker count and loader: ``loader``, ``workers`` and :func:`time_loader`'s figures.
    """
    rows: list[dict[str, object]] = []
    for w in s.workers:
        for name, ds in (("echonode (clip cache)", ours), ("naive (decode per item)", naive)):
            r = time_loader(ds, s.batch, w, s.batches, s.seed)
            rows.append({"loader": name, "workers": w, **r})
            print(f"  {name:24s} workers {w}: {r['pairs_per_s']:8.1f} pairs/s over {r['batches']} batches "
                  f"(load {load_average()})", flush=True)
    return rows


def measure_models(ours: PairDataset, s: Settings) -> list[dict[str, object]]:
    """Training pairs per second of the consumer network at each width, on one loader batch.

    Parameters
    ----------
    ours : PairDataset
        The dataset the batch (``s.model_batch`` pairs) is drawn from.
    s : Settings
        Widths, model batch, timed steps, device and seed.

    Returns
    -------
    list of dict
        One row per width: ``width``, ``device`` and :func:`time_model`'s figures; empty without widths.
    """
    model_rows: list[dict[str, object]] = []
    if s.widths:
        mb = next(iter(_loader(ours, s.model_batch, 0, 1, s.seed + 1)))
        for width in s.widths:
            r = time_model(width, mb, s.model_steps, s.device)
            model_rows.append({"width": width, "device": str(s.device), **r})
            print(f"  model width {width} on {s.device}: {r['pairs_per_s']:.2f} pairs/s "
                  f"(batch {r['batch']}, steps {r['step_s']} s; load {load_average()})", flush=True)
    return model_rows


def print_report(rows: list[dict[str, object]], model_rows: list[dict[str, object]],
                 workers: list[int]) -> dict[int, float]:
    """The summary table, echonode's speed-up over the naive loader, and how many consumers one worker feeds.

    Parameters
    ----------
    rows : list of dict
        :func:`measure_loaders`'s rows.
    model_rows : list of dict
        :func:`measure_models`'s rows.
    workers : list of int
        The worker counts measured.

    Returns
    -------
    dict
        echonode's pairs/s over the naive loader's, by worker count.
    """
    print()
    print("| loader | workers | pairs/s |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['loader']} | {r['workers']} | {r['pairs_per_s']:.1f} |")
    for m in model_rows:
        print(f"| consumer: PretrainModel width {m['width']}, fwd+bwd+Adam, batch {m['batch']}, "
              f"{m['device']} | - | {m['pairs_per_s']:.2f} |")
    print()
    rate = {(str(r["loader"]).split()[0], r["workers"]): float(r["pairs_per_s"]) for r in rows}  # type: ignore[arg-type]
    ratios = {w: rate[("echonode", w)] / rate[("naive", w)] for w in workers}
    for w, v in ratios.items():
        print(f"echonode / naive at {w} worker(s): {v:.1f}x")
    one = {k: v for k, v in rate.items() if k[1] == 1}
    if one and model_rows:
        for m in model_rows:
            c = float(m["pairs_per_s"])  # type: ignore[arg-type]
            print(f"one worker supplies {one[('echonode', 1)]:.1f} pairs/s (naive {one[('naive', 1)]:.1f}); "
                  f"the width-{m['width']} model consumes {c:.2f} pairs/s here: one echonode worker "
                  f"feeds {one[('echonode', 1)] / c:.1f} such consumers (naive: {one[('naive', 1)] / c:.1f})")
    print(f"load average at the end: {load_average()}")
    return ratios


def run(work: Path, s: Settings, machine: str, json_path: str | None) -> int:
    """Prepare the data in ``work``, measure both loaders and the consumer, report.

    Parameters
    ----------
    work : Path
        Folder of the archive and cache (reused when present).
    s : Settings
        The run's sizes.
    machine : str
        The machine line, also written to the JSON file.
    json_path : str, optional
        Where to write the figures; nothing is written when None.

    Returns
    -------
    int
        The exit status: 0, or 2 when the training split has no PLAX pair.
    """
    archive, cache_dir, prep = prepare(work, s.patients, s.seed)
    cache = ClipCache(cache_dir)
    train = split_cache(cache)["train"]
    kwargs: dict[str, Any] = {"method": "echoclr", "clip_frames": CLIP_FRAMES, "size": SIZE, "seed": s.seed}
    ours = PairDataset(cache, train, **kwargs)
    naive = NaivePairDataset(archive, cache, train, PreprocessConfig(size=SIZE), **kwargs)
    if len(ours) == 0:
        print("no PLAX pairs in the training split; use more --patients", file=sys.stderr)
        return 2
    n_videos = len({v for p in ours.pairs for v in p})
    identical = same_items(ours, naive, 2)
    print(f"training split: {len(train)} studies, {n_videos} PLAX videos, {len(ours)} EchoCLR pairs "
          f"(sampled repeatedly); batches of {s.batch} pairs of 3x{CLIP_FRAMES}x{SIZE}x{SIZE} clips; "
          f"first items of both loaders identical: {identical}", flush=True)
    rows = measure_loaders(ours, naive, s)
    model_rows = measure_models(ours, s)
    ratios = print_report(rows, model_rows, s.workers)
    if json_path:
        Path(json_path).write_text(json.dumps({
            "machine": machine, "load_average_end": load_average(), "patients": s.patients,
            "train_studies": len(train), "plax_videos": n_videos, "pairs": len(ours), "batch": s.batch,
            "identical_items": identical, "prep": prep, "loaders": rows, "models": model_rows,
            "ratio_echonode_over_naive": {str(k): v for k, v in ratios.items()},
        }, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the bench in ``--work`` or a temporary folder (removed at the end); return the exit status.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when None.
    """
    args = parse_args(argv)
    s = settings_from(args)
    torch.set_num_threads(args.threads)
    machine = (f"{os.cpu_count()} cores, {cpu_model()}; torch {torch.__version__}, "
               f"{args.threads} thread(s) in the main process")
    print(f"machine: {machine}; load average {load_average()}", flush=True)
    tmp = None
    if args.work:
        work = Path(args.work)
    else:
        tmp = work = Path(tempfile.mkdtemp(prefix="echonode-bench-loader-"))
    try:
        return run(work, s, machine, args.json)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
