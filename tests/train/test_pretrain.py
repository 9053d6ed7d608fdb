"""Tests for the clip cache (train.index, train.cache) and pretraining (train.pretrain)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from echonode.analyse.preprocess import PreprocessConfig
from echonode.bundles.nets import build_model
from tests.conftest import REPO
from tests.factories import us_multiframe, write
from train.cache import ClipCache
from train.datasets import PairDataset
from train.index import build_index
from train.losses import PERMUTATIONS
from train.pretrain import PretrainModel, main, reorder_at_chance, train_one_epoch


def make_archive(root: Path, n_patients: int = 4, studies: int = 2, videos: int = 3, frames: int = 12) -> Path:
    """DICOM archive + videos.csv: per study ``videos - 1`` PLAX and one A4C,
    except patient 0's first study, which has a single PLAX video."""
    rows = []
    for p in range(n_patients):
        for s in range(studies):
            study = f"1.2.826.0.1.{p}.{s}"
            count = 1 if (p, s) == (0, 0) else videos
            for v in range(count):
                sop = f"{study}.{v}"
                ds = us_multiframe(
                    study_uid=study, sop_uid=sop, frames=frames, rows=32, cols=32, patient_id=f"MRN{p}", seed=p * 100 + s * 10 + v
                )
                write(ds, root / study / f"{sop}.dcm")
                view = "plax" if (v < count - 1 or count == 1) else "a4c"
                rows.append({"patient_id": f"MRN{p}", "study_uid": study, "series_uid": "", "sop_uid": sop, "view": view})
    with open(root / "videos.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    archive = make_archive(root / "archive")
    write(us_multiframe(frames=3, rows=32, cols=32), archive / "short" / "short.dcm")  # too few frames
    (archive / "notes.dcm").write_text("not DICOM")
    report = build_index(archive, root / "cache", PreprocessConfig(size=16), progress=False)
    assert report.added == report.cached == 4 * 2 * 3 - 2
    return root / "cache"


def test_index_manifest_and_incremental(cache: Path, tmp_path: Path) -> None:
    manifest = json.loads((cache / "manifest.json").read_text())
    text = (cache / "manifest.json").read_text()
    assert "MRN" not in text  # no raw patient IDs
    assert {v["view"] for v in manifest["videos"]} == {"plax", "a4c"}
    assert len(manifest["unusable"]) == 1 and manifest["unusable"][0]["reason"]
    entry = manifest["videos"][0]
    assert {"study_uid", "series_uid", "sop_uid", "patient_key", "frames", "fps", "file"} <= set(entry)
    frames = ClipCache(cache).frames(entry["sop_uid"])
    assert frames.dtype.name == "uint8" and frames.shape == (entry["frames"], 16, 16)

    # Incremental: a second run reuses everything; a new study is added only.
    archive = cache.parent / "archive"
    again = build_index(archive, cache, PreprocessConfig(size=16), progress=False)
    assert again.added == 0 and again.reused == 23
    extra = us_multiframe(study_uid="1.2.9", sop_uid="1.2.9.1", frames=12, rows=32, cols=32, patient_id="MRN9")
    write(extra, tmp_path / "a" / "x.dcm")
    copy = tmp_path / "cache"
    import shutil

    shutil.copytree(cache, copy)
    shutil.copytree(archive, tmp_path / "a", dirs_exist_ok=True)
    # Copied files have new mtimes: everything is redone except nothing breaks;
    # then a third run is fully incremental again.
    build_index(tmp_path / "a", copy, PreprocessConfig(size=16), progress=False)
    third = build_index(tmp_path / "a", copy, PreprocessConfig(size=16), progress=False)
    assert third.added == 0 and third.cached == 23
    with pytest.raises(ValueError):
        build_index(archive, cache, PreprocessConfig(size=24), progress=False)


def test_pair_dataset_pairs(cache: Path) -> None:
    c = ClipCache(cache)
    studies = sorted({v["study_uid"] for v in c.videos})
    echo = PairDataset(c, studies, "echoclr", size=16)
    # 7 studies with 2 PLAX videos (1 pair each) + 1 study with a single PLAX
    # video paired with itself; A4C videos never used.
    assert len(echo) == 8
    assert sum(a == b for a, b in echo.pairs) == 1
    plax = {v["sop_uid"] for v in c.videos if v["view"] == "plax"}
    assert all(a in plax and b in plax for a, b in echo.pairs)
    assert all(c.by_sop[a]["study_uid"] == c.by_sop[b]["study_uid"] for a, b in echo.pairs)
    simclr = PairDataset(c, studies, "simclr", size=16, augment=None)
    assert len(simclr) == len(plax) and all(a == b for a, b in simclr.pairs)
    item = simclr[0]
    assert torch.equal(item["x1"], item["x2"])  # one clip; two views differ only by augmentation
    assert PairDataset(c, studies, "simclr", size=16)[0]["x1"].shape == (3, 4, 16, 16)


def test_pair_dataset_reordering_and_epoch_seeding(cache: Path) -> None:
    c = ClipCache(cache)
    studies = sorted({v["study_uid"] for v in c.videos})
    echo = PairDataset(c, studies, "echoclr", size=8, seed=1)
    perms = {int(echo[i]["perm1"]) for i in range(len(echo))} | {int(echo[i]["perm2"]) for i in range(len(echo))}
    assert len(perms) > 3
    a = echo[0]
    assert torch.equal(echo[0]["x1"], a["x1"])  # same epoch, same draw
    echo.set_epoch(1)
    assert not torch.equal(echo[0]["x1"], a["x1"])
    mi = PairDataset(c, studies, "mi-simclr", size=8)
    assert all(int(mi[i]["perm1"]) == 0 == int(mi[i]["perm2"]) for i in range(len(mi)))
    with pytest.raises(ValueError):
        PairDataset(c, studies, "echoclr", clip_frames=8)
    with pytest.raises(ValueError):
        PairDataset(c, studies, "byol")


def _args(cache: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(cache), "--out", str(out), "--preset", "tiny", "--size", "16", "--width", "4",
            "--batch", "4", "--no-progress", *extra]  # fmt: skip


def test_tiny_run_exports_torchvision_encoder(cache: Path, tmp_path: Path) -> None:
    assert main(_args(cache, tmp_path / "run", "--epochs", "1")) == 0
    run = tmp_path / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    split = json.loads((run / "split.json").read_text())
    pairs = len(PairDataset(ClipCache(cache), split["train"], "echoclr", size=16))
    # Batch 4, or the whole training split when it holds fewer pairs; full batches only.
    assert pairs >= 1 and record["epoch"] == 0 and record["steps"] == pairs // min(4, pairs) and record["reorder"] > 0
    assert "data_wait_fraction" in record and record["pairs_per_second"] > 0
    assert not set(split["train"]) & set(split["test"])
    encoder = torch.load(run / "encoder.pt", weights_only=True)
    model = build_model("r3d_18", 1, width=4)
    missing, unexpected = model.load_state_dict(encoder, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and isinstance(ckpt["config"], dict)
    assert set(split) >= {"train", "val", "test", "manifest_sha256", "scheme", "seed", "used"}
    assert set(split["used"]["pretrained"]) <= set(split["train"])


def test_mi_simclr_has_no_reordering_head(cache: Path, tmp_path: Path) -> None:
    assert main(_args(cache, tmp_path / "mi", "--epochs", "1", "--method", "mi-simclr")) == 0
    ckpt = torch.load(tmp_path / "mi" / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("reorder_head") for k in ckpt["model"])
    assert json.loads((tmp_path / "mi" / "metrics.jsonl").read_text())["reorder"] == 0.0
    model = PretrainModel("r3d_18", 64)
    assert [m.in_features for m in model.projector if isinstance(m, torch.nn.Linear)] == [512, 256]
    assert model.projector[2].out_features == 128 and model.projector[0].bias is None
    assert model.reorder_head.out_features == 24


def test_resume_equals_uninterrupted(cache: Path, tmp_path: Path) -> None:
    assert main(_args(cache, tmp_path / "straight", "--epochs", "2")) == 0
    assert main(_args(cache, tmp_path / "resumed", "--epochs", "1")) == 0
    first = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert first["epoch"] == 1
    assert main(_args(cache, tmp_path / "resumed", "--epochs", "2")) == 0
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]  # resumed at epoch 1, did not redo epoch 0
    a = torch.load(tmp_path / "straight" / "encoder.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "encoder.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    # The weights did move (the comparison is not between two untouched nets).
    assert not torch.equal(a["stem.0.weight"], first["model"]["encoder.stem.0.weight"])
    # A changed hyperparameter refuses to resume into the same folder.
    assert main(_args(cache, tmp_path / "resumed", "--epochs", "3", "--lr", "0.5")) == 2


def test_torchrun_two_processes_match_one(cache: Path, tmp_path: Path) -> None:
    """gloo, 2 ranks x 2 pairs = 1 process x 4 pairs with 2 BatchNorm groups."""
    common = ["--epochs", "1", "--max-steps", "1", "--lr", "0.01"]
    single = tmp_path / "single"
    assert main(_args(cache, single, *common, "--bn-groups", "2")) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # --standalone: torchrun picks its own free rendezvous port (no race).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "train.pretrain", *_args(cache, tmp_path / "ddp", *common)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    one = json.loads((single / "metrics.jsonl").read_text())
    two = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text())
    assert one["steps"] == two["steps"] == 1
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    ckpt_one = torch.load(single / "checkpoint.pt", weights_only=True)
    ckpt_two = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    torch.manual_seed(0)  # the runs' seed: their initial weights
    start = PretrainModel("r3d_18", 4).state_dict()
    names = [name for name, _ in PretrainModel("r3d_18", 4).named_parameters()]
    # The gradients are compared through Adam's first moment (0.1 x the
    # gradient after one step), not through the weights: Adam's first step
    # moves every weight by about lr x sign(gradient), so a gradient that is
    # zero up to rounding may take either sign in either run.
    moments_one, moments_two = ckpt_one["optimizer"]["state"], ckpt_two["optimizer"]["state"]
    assert len(moments_one) == len(moments_two) == len(names)
    for index, name in enumerate(names):
        g_one, g_two = moments_one[index]["exp_avg"], moments_two[index]["exp_avg"]
        scale = float(g_one.abs().max()) or 1.0
        torch.testing.assert_close(g_two, g_one, rtol=1e-3, atol=1e-4 * scale, msg=name)
        moved = (ckpt_one["model"][name] - start[name]).abs()
        agree = (ckpt_one["model"][name] - ckpt_two["model"][name]).abs() <= 1e-5 + 1e-3 * moved
        # Where the gradient is clearly away from zero both runs take the same step.
        clear = g_one.abs() > 1e-3 * scale
        assert bool(agree[clear].all()), name
    assert not torch.allclose(ckpt_one["model"]["encoder.stem.0.weight"], start["encoder.stem.0.weight"])
    # Without the BatchNorm grouping the single process computes something else.
    plain = tmp_path / "plain"
    assert main(_args(cache, plain, *common)) == 0
    assert json.loads((plain / "metrics.jsonl").read_text())["loss"] != pytest.approx(two["loss"], rel=1e-4)


def _ramp_cache(root: Path, studies: int = 8, videos: int = 2, frames: int = 10, size: int = 16) -> Path:
    """A clip cache written directly: each video's frame ``t`` is a bright
    square of grey level ``base + step * t`` on black, so the true frame
    order is readable from each frame's mean after any augmentation (every
    frame gets the same geometric transform) and min-max normalisation
    (monotone)."""
    rng = np.random.default_rng(0)
    (root / "videos").mkdir(parents=True)
    entries = []
    for s in range(studies):
        for v in range(videos):
            sop = f"1.2.3.{s}.{v}"
            base, step = int(rng.integers(20, 60)), int(rng.integers(12, 18))
            arr = np.zeros((frames, size, size), np.uint8)
            for t in range(frames):
                arr[t, 3:-3, 3:-3] = base + step * t
            np.save(root / "videos" / f"{sop}.npy", arr)
            entries.append({"sop_uid": sop, "study_uid": f"1.2.3.{s}", "series_uid": "", "patient_key": f"p{s}",
                            "view": "plax", "frames": frames, "fps": 30.0, "size": size,
                            "file": f"videos/{sop}.npy"})  # fmt: skip
    manifest = {"version": 1, "preprocess": {"size": size}, "videos": entries, "unusable": []}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_reorder_label_is_the_permutation_of_consecutive_augmented_frames(tmp_path: Path) -> None:
    """x1/x2 are 4 consecutive frames, augmented, then permuted by perm1/perm2:
    output frame j is source frame PERMUTATIONS[perm][j]."""
    c = ClipCache(_ramp_cache(tmp_path / "ramp"))
    studies = sorted({v["study_uid"] for v in c.videos})
    ds = PairDataset(c, studies, "echoclr", size=16, seed=3)
    seen = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            for x, p in ((item["x1"], int(item["perm1"])), (item["x2"], int(item["perm2"]))):
                means = x[0].mean(dim=(1, 2))
                ranks = tuple(int(r) for r in torch.argsort(torch.argsort(means)))
                assert ranks == PERMUTATIONS[p], (epoch, i, p, means)
                seen.add(p)
    assert len(seen) > 12


def test_reorder_head_learns_an_easy_order(tmp_path: Path) -> None:
    """Dataset -> pretrain_step -> head wiring: on clips whose order is plain
    (brightness rising frame by frame) the 24-way head leaves chance in a few
    dozen steps. A label that did not match the clip, or a head fed other
    features, would keep it at 1/24."""
    c = ClipCache(_ramp_cache(tmp_path / "ramp", studies=16))
    studies = sorted({v["study_uid"] for v in c.videos})
    ds = PairDataset(c, studies, "echoclr", size=16, seed=0, augment=None)
    torch.manual_seed(0)
    model = PretrainModel("r3d_18", 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds), shuffle=True)
    acc = []
    for epoch in range(60):
        ds.set_epoch(epoch)
        stats = train_one_epoch(model, loader, optimizer, device=torch.device("cpu"))
        acc.append(stats["reorder_acc"])
    assert np.mean(acc[-5:]) > 0.3, acc


def test_reorder_at_chance_allows_for_sampling_noise() -> None:
    assert reorder_at_chance(1 / 24, 1000)
    assert not reorder_at_chance(0.10, 1000)
    # 5 % of 100 clips is 5 hits: chance gives that often; of 100,000 clips it does not.
    assert reorder_at_chance(0.05, 100)
    assert not reorder_at_chance(0.05, 100_000)
    assert not reorder_at_chance(0.0, 0)


def test_pretraining_warns_once_when_the_reordering_head_stays_at_chance(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The test cache's clips are too few and too small for the head to learn
    # anything in six epochs: the run says so once, after the fifth epoch.
    assert main(_args(cache, tmp_path / "run", "--epochs", "6")) == 0
    err = capsys.readouterr().err
    assert err.count("frame-reordering head is at chance") == 1, err
    assert "after 5 epochs" in err
    assert main(_args(cache, tmp_path / "mi", "--epochs", "6", "--method", "mi-simclr")) == 0
    assert "reordering head" not in capsys.readouterr().err


class _SlowPairs(torch.utils.data.Dataset):
    """Pairs that take 50 ms each to load: a loader that cannot keep up."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        import time

        time.sleep(0.05)
        x = torch.rand(3, 4, 8, 8)
        return {"x1": x, "x2": x.flip(-1), "perm1": torch.tensor(0), "perm2": torch.tensor(1)}


def test_epoch_reports_the_time_spent_waiting_for_data() -> None:
    model = PretrainModel(width=4)
    loader = torch.utils.data.DataLoader(_SlowPairs(), batch_size=2)
    stats = train_one_epoch(model, loader, torch.optim.Adam(model.parameters(), 1e-3), device=torch.device("cpu"))
    # 0.1 s of loading per step against a few ms of compute on 8 px clips.
    assert stats["steps"] == 4 and stats["data_wait_fraction"] > 0.5
    assert 0 < stats["pairs_per_second"] < 8 / 0.4


def test_pretraining_reads_the_shards_of_an_archive_as_one(cache: Path, tmp_path: Path) -> None:
    """Two shards given to --data train as the unsharded cache does: same split, same pairs, same weights."""
    from train.index import Shard

    archive = cache.parent / "archive"
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        build_index(archive, part, PreprocessConfig(size=16), progress=False, shard=Shard(i, 2))
    common = ["--epochs", "1", "--max-steps", "1"]
    assert main(_args(cache, tmp_path / "whole", *common)) == 0
    assert main(["--data", str(parts[0]), str(parts[1]), *_args(cache, tmp_path / "sharded", *common)[2:]]) == 0
    whole = json.loads((tmp_path / "whole" / "split.json").read_text())
    sharded = json.loads((tmp_path / "sharded" / "split.json").read_text())
    assert {k: whole[k] for k in ("train", "val", "test", "used")} == {k: sharded[k] for k in ("train", "val", "test", "used")}
    assert sharded["manifest_sha256"] != whole["manifest_sha256"]  # provenance names the caches it read
    assert json.loads((tmp_path / "sharded" / "config.json").read_text())["data"] == [str(p) for p in parts]
    a = torch.load(tmp_path / "whole" / "encoder.pt", weights_only=True)
    b = torch.load(tmp_path / "sharded" / "encoder.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
