"""``echonode-train predict``: a bundle over clip caches, one CSV of video and study probabilities.

::

    echonode-train predict --data CACHE... --bundle B --out predictions.csv
    torchrun --nproc_per_node 8 -m train predict --data CACHE... --bundle B --out predictions.csv

One command for one process and for every rank of a torchrun job (rank and
world size from torchrun's environment; gloo on the CPU, nccl on GPUs, as
:mod:`train.pretrain`). The videos of the caches (read as one, in study,
series and SOP Instance UID order) are cut into parts of ``--part-videos``;
rank r of W predicts parts r, r + W, ... and writes each finished part to
``OUT.parts/`` atomically. A run that stops (a killed job, a lost machine)
is resumed by running the same command again, with any number of ranks:
finished parts are skipped. When every part is done, rank 0 merges them
into ``OUT``. ``OUT.parts/`` must be on a file system every rank sees.

Clips and aggregation are the node's: the bundle's preprocessing settings
(:func:`echonode.analyse.pipeline.preprocess_config`), its evaluation clips
(:func:`echonode.analyse.preprocess.make_eval_clips`) and
:meth:`echonode.bundles.weights.Bundle.predict`; a video's probability is the
mean over its clips, a study's the mean over its videos
(:func:`echonode.analyse.pipeline.analyse_study`). A row therefore reads as
``echonode infer`` reports the same files with this bundle and no view
classifier (``--views`` filters by the cache's view column instead).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from echonode.analyse.pipeline import preprocess_config
from echonode.analyse.preprocess import SECTOR_MASK_RULE, PreprocessConfig, make_eval_clips
from echonode.bundles.manifest import BundleError
from echonode.bundles.runtime import MODES as RUNTIME_MODES
from echonode.bundles.weights import Bundle, load_bundle
from train.cache import ClipCache
from train.distributed import setup_distributed

__all__ = ["COLUMNS", "add_predict_arguments", "main", "predict", "run_predict"]

#: Columns of ``predictions.csv`` (docs/training.md describes each).
COLUMNS: tuple[str, ...] = (
    "level", "study_uid", "series_uid", "sop_uid", "view", "label", "n_videos", "n_clips",
    "probability", "positive", "threshold", "task", "model", "version", "device_uid",
)  # fmt: skip
PARTS_SUFFIX = ".parts"
PLAN_FILE = "plan.json"
#: Ranks wait this long at the end for the slowest one (parts are dealt round
#: robin, so they finish close together; a whole archive can take hours).
_BARRIER_TIMEOUT_S = 24 * 3600.0


@dataclass(frozen=True)
class PredictSettings:
    """What ``predict`` was asked (what ``OUT.parts/plan.json`` checks a resumed run against)."""

    data: tuple[str, ...]
    bundle: str
    out: str
    batch_size: int = 8
    device: str = "auto"
    runtime: str | None = None
    views: tuple[str, ...] | None = None
    part_videos: int = 256
    loader_workers: int | None = None


def _check_cache(cache: ClipCache, cfg: PreprocessConfig, bundle: Bundle) -> None:
    """Refuse a cache whose frames the bundle's preprocessing would not make.

    Raises
    ------
    ValueError
        Naming the settings that differ and how to index for this bundle.
    """
    have = {"framing": "sector", **cache.manifest["preprocess"], "sector_mask": cache.sector_mask_rule}
    want = {"size": cfg.size, "max_frames": cfg.max_frames, "target_fps": cfg.target_fps, "mask_frames": cfg.mask_frames,
            "framing": cfg.framing, "sector_mask": SECTOR_MASK_RULE}
    if cfg.framing == "physical":
        want["field_cm"] = cfg.field_cm
    differ = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
    if differ:
        detail = ", ".join(f"{k} {a} (bundle: {b})" for k, (a, b) in sorted(differ.items()))
        raise ValueError(
            f"{', '.join(map(str, cache.roots))}: indexed with {detail}; bundle {bundle.path} sees other pixels. "
            f"Index for it: echonode-train index ARCHIVE --out CACHE --size {cfg.size} --max-frames {cfg.max_frames}"
            f" --framing {cfg.framing}" + (f" --field-cm {cfg.field_cm:g}" if cfg.framing == "physical" else "")
        )


def _videos(cache: ClipCache, cfg: PreprocessConfig, views: Sequence[str] | None) -> list[dict]:
    """The videos to predict, in study, series and SOP order: those the node would use."""
    allowed = None if views is None else {v.strip().lower() for v in views}
    # The node refuses videos under the bundle's frame rate (Doppler strips).
    chosen = [v for v in cache.videos if float(v["fps"]) >= cfg.min_fps and (allowed is None or v["view"] in allowed)]
    return sorted(chosen, key=lambda v: (v["study_uid"], v["series_uid"], v["sop_uid"]))


class _Clips(Dataset):
    """The node's evaluation clips of each video of a part (read ahead by a DataLoader)."""

    def __init__(self, cache: ClipCache, videos: Sequence[Mapping], cfg: PreprocessConfig) -> None:
        self.cache, self.videos, self.cfg = cache, list(videos), cfg

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> torch.Tensor:
        frames = np.asarray(self.cache.frames(self.videos[index]["sop_uid"]))
        return torch.from_numpy(make_eval_clips(frames, self.cfg))


def _clip_probabilities(bundle: Bundle, clips: Iterator[torch.Tensor], batch_size: int) -> Iterator[np.ndarray]:
    """Each video's clip probabilities, in order; clips of several videos share a forward pass."""
    pending: list[torch.Tensor] = []
    held = 0
    for video_clips in clips:
        pending.append(video_clips)
        held += len(video_clips)
        if held >= batch_size:
            yield from _split(bundle.predict(torch.cat(pending), batch_size=batch_size), pending)
            pending, held = [], 0
    if pending:
        yield from _split(bundle.predict(torch.cat(pending), batch_size=batch_size), pending)


def _split(probs: np.ndarray, pending: Sequence[torch.Tensor]) -> Iterator[np.ndarray]:
    start = 0
    for video_clips in pending:
        yield probs[start : start + len(video_clips)]
        start += len(video_clips)


def _bundle_columns(bundle: Bundle) -> dict[str, str]:
    return {
        "threshold": repr(float(bundle.threshold)), "task": bundle.task, "model": bundle.name,
        "version": bundle.version, "device_uid": bundle.device_uid,
    }  # fmt: skip


def _video_row(bundle: Bundle, video: Mapping, probs: np.ndarray) -> dict[str, str]:
    row = {
        "level": "video", "study_uid": video["study_uid"], "series_uid": video["series_uid"],
        "sop_uid": video["sop_uid"], "view": video["view"], "n_videos": "1", "n_clips": str(len(probs)),
        **_bundle_columns(bundle),
    }  # fmt: skip
    if bundle.is_binary:
        # As the node: the mean of the clips' probabilities.
        p = float(np.mean([float(x) for x in probs]))
        row.update(label="", probability=f"{p:.9f}", positive=str(int(p >= bundle.threshold)))
    else:
        mean = probs.mean(axis=0)
        best = int(np.argmax(mean))
        row.update(label=bundle.labels[best], probability=f"{float(mean[best]):.9f}", positive="")
    return row


def _predict_part(bundle: Bundle, cache: ClipCache, videos: Sequence[Mapping], cfg: PreprocessConfig,
                  settings: PredictSettings, workers: int) -> list[dict[str, str]]:
    loader = DataLoader(
        _Clips(cache, videos, cfg), batch_size=None, num_workers=workers,
        pin_memory=bundle.device.type == "cuda",
    )  # fmt: skip
    probs = _clip_probabilities(bundle, iter(loader), settings.batch_size)
    return [_video_row(bundle, video, p) for video, p in zip(videos, probs, strict=True)]


def _write_csv(path: Path, rows: Sequence[Mapping[str, str]]) -> None:
    """Write rows atomically: a part or the result is whole or absent."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write_text(path, buffer.getvalue())


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _study_rows(bundle: Bundle, video_rows: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Each study's row (the node's study probability: the mean over its videos) before its videos' rows."""
    by_study: dict[str, list[Mapping[str, str]]] = {}
    for row in video_rows:
        by_study.setdefault(row["study_uid"], []).append(row)
    out: list[dict[str, str]] = []
    for study, rows in sorted(by_study.items()):
        if bundle.is_binary:
            p = float(np.mean([float(r["probability"]) for r in rows]))
            out.append({
                "level": "study", "study_uid": study, "series_uid": "", "sop_uid": "", "view": "", "label": "",
                "n_videos": str(len(rows)), "n_clips": str(sum(int(r["n_clips"]) for r in rows)),
                "probability": f"{p:.9f}", "positive": str(int(p >= bundle.threshold)), **_bundle_columns(bundle),
            })  # fmt: skip
        out.extend(dict(r) for r in rows)
    return out


def _plan(settings: PredictSettings, bundle: Bundle, cache: ClipCache, n_videos: int) -> dict[str, object]:
    """What the parts depend on: a resumed run must match it."""
    return {
        "bundle_device_uid": bundle.device_uid, "bundle_version": bundle.version,
        "manifest_sha256": cache.manifest_sha256, "videos": n_videos, "part_videos": settings.part_videos,
        "views": list(settings.views) if settings.views else None, "runtime": settings.runtime,
    }  # fmt: skip


def _check_plan(parts_dir: Path, plan: Mapping[str, object]) -> None:
    path = parts_dir / PLAN_FILE
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    if old != plan:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {plan.get(k)!r}" for k in sorted(plan) if old.get(k) != plan.get(k))
        raise ValueError(
            f"{parts_dir}: parts of another run ({detail}); delete the folder or write to another --out"
        )


def predict(settings: PredictSettings) -> int:
    """Predict this rank's parts; on rank 0, merge every part into ``settings.out``.

    Returns
    -------
    int
        Videos in the merged file (rank 0), or this rank's (others).

    Raises
    ------
    ValueError, FileNotFoundError, BundleError
        User errors: a cache the bundle cannot read, parts of another run,
        a missing cache or bundle.
    """
    device, rank, world, _ = setup_distributed(settings.device, timeout_s=_BARRIER_TIMEOUT_S)
    cache = ClipCache(settings.data)
    bundle = load_bundle(settings.bundle, device) if settings.runtime is None else load_bundle(
        settings.bundle, device, runtime=settings.runtime)
    cfg = preprocess_config(bundle)
    _check_cache(cache, cfg, bundle)
    videos = _videos(cache, cfg, settings.views)
    out = Path(settings.out)
    parts_dir = out.with_name(out.name + PARTS_SUFFIX)
    plan = _plan(settings, bundle, cache, len(videos))
    _check_plan(parts_dir, plan)
    if rank == 0:
        parts_dir.mkdir(parents=True, exist_ok=True)
        if not (parts_dir / PLAN_FILE).is_file():
            _atomic_write_text(parts_dir / PLAN_FILE, json.dumps(plan, indent=1, sort_keys=True) + "\n")
    if world > 1:
        dist.barrier()
    workers = settings.loader_workers
    if workers is None:
        workers = 0 if device.type == "cpu" else min(4, max(1, (os.cpu_count() or 1) // world))
    size = settings.part_videos
    parts = [videos[i : i + size] for i in range(0, len(videos), size)]
    mine = 0
    for index in range(rank, len(parts), world):
        path = parts_dir / f"part-{index:06d}.csv"
        mine += len(parts[index])
        if not path.is_file():
            _write_csv(path, _predict_part(bundle, cache, parts[index], cfg, settings, workers))
    if world > 1:
        dist.barrier()
    if rank != 0:
        return mine
    rows: list[dict[str, str]] = []
    for index in range(len(parts)):
        with open(parts_dir / f"part-{index:06d}.csv", newline="") as fh:
            rows.extend(csv.DictReader(fh))
    _write_csv(out, _study_rows(bundle, rows))
    return len(rows)


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``echonode-train predict``."""
    parser.add_argument("--data", required=True, nargs="+", metavar="CACHE",
                        help="clip cache folder(s), indexed at the bundle's size (several: read as one, e.g. shards)")
    parser.add_argument("--bundle", required=True, help="bundle folder")
    parser.add_argument("--out", required=True, help="predictions CSV (parts beside it in OUT.parts/)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per forward pass (default 8)")
    parser.add_argument("--device", default="auto",
                        help="auto | cpu | cuda | cuda:N (under torchrun: each rank its local GPU)")
    parser.add_argument("--runtime", choices=RUNTIME_MODES, default=None,
                        help="inference runtime (default: the node's, [models] runtime = auto)")
    parser.add_argument("--views", default=None,
                        help="only videos of these views in the cache's view column (default: every video, "
                             "as the node without a view classifier)")
    parser.add_argument("--part-videos", type=int, default=256, help="videos per resumable part (default 256)")
    parser.add_argument("--loader-workers", type=int, default=None,
                        help="processes reading clips ahead (default: 0 on the CPU, up to 4 per GPU)")  # fmt: skip


def run_predict(ns: argparse.Namespace) -> int:
    """Run ``echonode-train predict``; returns the exit status (2: user error)."""
    settings = PredictSettings(
        data=tuple(ns.data), bundle=ns.bundle, out=ns.out, batch_size=ns.batch_size, device=ns.device,
        runtime=ns.runtime, views=tuple(v for v in ns.views.split(",") if v.strip()) if ns.views else None,
        part_videos=ns.part_videos, loader_workers=ns.loader_workers,
    )  # fmt: skip
    try:
        if settings.batch_size < 1 or settings.part_videos < 1:
            raise ValueError("--batch-size and --part-videos must be at least 1")
        n = predict(settings)
    except (BundleError, FileNotFoundError, ValueError) as exc:
        print(f"echonode-train predict: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"predictions for {n} videos written to {settings.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m train.predict``."""
    parser = argparse.ArgumentParser(prog="echonode-train predict", description=__doc__.splitlines()[0])
    add_predict_arguments(parser)
    return run_predict(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
