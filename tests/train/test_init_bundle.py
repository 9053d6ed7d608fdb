"""Tests for ``echonode-train init`` (train/init_bundle.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from echonode.bundles.manifest import BUNDLE_JSON
from echonode.bundles.nets import build_model
from echonode.bundles.weights import load_bundle
from train.init_bundle import add_init_arguments, extract_state_dict, run_init

WIDTH = 4
TINY = ["--width", str(WIDTH), "--size", "16", "--clip-frames", "4"]


def _run(*argv: str) -> int:
    parser = add_init_arguments(argparse.ArgumentParser())
    return run_init(parser.parse_args(list(argv)))


def _json(folder: Path) -> dict:
    return json.loads((folder / BUNDLE_JSON).read_text())


def _encoder_equal(bundle_model: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    got = bundle_model.state_dict()
    for key, value in source.items():
        if key.startswith("fc."):
            continue
        assert torch.equal(got[key], value), key


def _source(arch: str = "r3d_18", outputs: int = 400, width: int = WIDTH, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(arch, outputs, width=width)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "running" in name:
                tensor.uniform_(0.5, 1.5)  # distinguishable from a fresh network
    return model.state_dict()


def test_random_weights_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    assert _run("--task", "lvh", "--out", str(out), *TINY) == 0
    meta = _json(out)
    assert meta["random_weights"] is True
    assert meta["provenance"]["init"] == "random"
    assert meta["name"] == "echoclr-lvh"
    assert meta["preprocessing"]["normalisation"] == "minmax"
    assert meta["architecture"] == {"name": "r3d_18", "width": WIDTH, "num_outputs": 1}
    assert meta["provenance"]["config"]["task"] == "lvh"
    bundle = load_bundle(out)
    assert bundle.predict(torch.rand(2, 3, 4, 16, 16)).shape == (2,)
    assert "RANDOM WEIGHTS" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["r3d_18", "r2plus1d_18"])
def test_kinetics_torchvision_state_dict(tmp_path: Path, arch: str) -> None:
    source = _source(arch)
    weights = tmp_path / "kinetics.pth"
    torch.save(source, weights)
    out = tmp_path / "b"
    assert _run("--task", "severe_as", "--out", str(out), "--weights", str(weights), "--arch", arch, *TINY) == 0
    meta = _json(out)
    assert meta["provenance"]["init"] == "kinetics"
    assert meta["provenance"]["head"] == "new"
    assert "fc.weight" in meta["provenance"]["dropped_keys"]
    assert meta["preprocessing"]["normalisation"] == "kinetics"
    assert meta["random_weights"] is True  # the head is untrained
    bundle = load_bundle(out)
    _encoder_equal(bundle.model, source)
    assert bundle.model.fc.weight.shape == (1, 8 * WIDTH)


def _echoclr_weights(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # SimCLR(encoder=r3d_18 with fc=Identity) + projector + reordering head.
    feat = 8 * WIDTH
    weights = {f"encoder.{k}": v for k, v in source.items() if not k.startswith("fc.")}
    weights["reordering_head.weight"] = torch.randn(24, feat)
    weights["reordering_head.bias"] = torch.randn(24)
    weights["projector.0.weight"] = torch.randn(feat // 2, feat)
    weights["projector.2.weight"] = torch.randn(128, feat // 2)
    return weights


def _adam_state(weights: dict[str, torch.Tensor]) -> dict:
    params = [torch.nn.Parameter(v.float().clone()) for v in list(weights.values())[:2]]
    opt = torch.optim.Adam(params, lr=0.1)
    sum(p.sum() for p in params).backward()
    opt.step()
    return opt.state_dict()


@pytest.mark.parametrize("wrapper", ["weights+optimizer", "state_dict", "model", "bare", "ddp"])
def test_echoclr_checkpoint(tmp_path: Path, wrapper: str) -> None:
    source = _source(seed=1)
    weights = _echoclr_weights(source)
    if wrapper == "weights+optimizer":  # what the original ssl_pretraining/main.py saves
        checkpoint: object = {"weights": weights, "optimizer": _adam_state(weights)}
    elif wrapper == "state_dict":
        checkpoint = {"state_dict": weights, "epoch": 300}
    elif wrapper == "model":
        checkpoint = {"model": weights}
    elif wrapper == "ddp":
        checkpoint = {"state_dict": {f"module.{k}": v for k, v in weights.items()}}
    else:
        checkpoint = weights
    path = tmp_path / "chkpt_epoch-300.pt"
    torch.save(checkpoint, path)
    out = tmp_path / "b"
    assert _run("--task", "lvh", "--out", str(out), "--weights", str(path), *TINY) == 0
    meta = _json(out)
    prov = meta["provenance"]
    assert prov["init"] == "echoclr"
    assert prov["head"] == "new"
    assert prov["dropped_count"] == 4
    assert all(k.startswith(("projector.", "reordering_head.")) for k in prov["dropped_keys"])
    assert len(prov["weights_sha256"]) == 64
    assert meta["preprocessing"]["normalisation"] == "minmax"
    _encoder_equal(load_bundle(out).model, source)


def test_fine_tuned_checkpoint_keeps_its_head(tmp_path: Path) -> None:
    # The original fine-tuning code: r3d_18 with fc = Sequential(Linear(512, 1), Dropout)
    source = _source(outputs=1, seed=2)
    state = {k.replace("fc.", "fc.0."): v for k, v in source.items()}
    path = tmp_path / "best.pt"
    torch.save({"weights": state}, path)
    out = tmp_path / "b"
    assert _run("--task", "severe_as", "--out", str(out), "--weights", str(path), *TINY) == 0
    meta = _json(out)
    assert meta["provenance"]["head"] == "from weights"
    assert meta["random_weights"] is False
    got = load_bundle(out).model.state_dict()
    assert torch.equal(got["fc.weight"], source["fc.weight"])


def test_view_bundle_with_labels(tmp_path: Path) -> None:
    out = tmp_path / "v"
    assert _run("--task", "view", "--labels", "plax,a4c,psax", "--out", str(out), *TINY) == 0
    bundle = load_bundle(out)
    assert bundle.labels == ["plax", "a4c", "psax"]
    assert bundle.predict(torch.rand(1, 3, 4, 16, 16)).shape == (1, 3)


def _fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert _run(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("echonode-train init: error: ")
    assert "Traceback" not in err
    return err


def test_wrong_width_or_arch_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "wide.pth"
    torch.save(_source(width=WIDTH * 2), path)
    err = _fails(capsys, "--task", "lvh", "--out", str(tmp_path / "b"), "--weights", str(path), *TINY)
    assert "do not fit r3d_18 width 4" in err and f"width {WIDTH * 2}" in err and "stem.0.weight" in err
    err = _fails(capsys, "--task", "lvh", "--out", str(tmp_path / "b"), "--weights", str(path),
                 "--arch", "r2plus1d_18", "--width", str(WIDTH * 2))
    assert "look like r3d_18" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("content", ["list", "no-tensors", "text", "empty"])
def test_not_a_state_dict(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str) -> None:
    path = tmp_path / "w.pt"
    if content == "list":
        torch.save([torch.zeros(1)], path)
    elif content == "no-tensors":
        torch.save({"epoch": 3, "args": {"lr": 0.1}}, path)
    elif content == "text":
        path.write_text("hello")
    else:
        path.write_bytes(b"")
    err = _fails(capsys, "--task", "lvh", "--out", str(tmp_path / "b"), "--weights", str(path), *TINY)
    assert str(path) in err


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_pickle_with_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weights": {"encoder.stem.0.weight": torch.zeros(1)}, "args": _Payload(marker)}, path)
    err = _fails(capsys, "--task", "lvh", "--out", str(tmp_path / "b"), "--weights", str(path), *TINY)
    assert "weights_only" in err
    assert not marker.exists()
    assert not (tmp_path / "b").exists()


def test_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, "--task", "lvh", "--out", str(tmp_path / "b"), "--weights", str(tmp_path / "nope.pt"), *TINY)
    _fails(capsys, "--task", "lvh", "--out", str(tmp_path / "b"), "--labels", "plax,a4c", *TINY)
    _fails(capsys, "--task", "view", "--out", str(tmp_path / "b"), "--labels", "a4c,psax", *TINY)
    _fails(capsys, "--task", "lvh", "--out", str(tmp_path / "b"), "--threshold", "2", *TINY)
    assert _run("--task", "lvh", "--out", str(tmp_path / "b"), *TINY) == 0
    err = _fails(capsys, "--task", "lvh", "--out", str(tmp_path / "b"), *TINY)
    assert "--force" in err
    assert _run("--task", "lvh", "--out", str(tmp_path / "b"), "--force", *TINY) == 0


def test_extract_state_dict_prefixes() -> None:
    t = torch.zeros(1)
    state, kind, dropped = extract_state_dict(
        {"model": {"module._orig_mod.encoder.stem.0.weight": t, "module.projector.0.weight": t}}
    )
    assert (list(state), kind, dropped) == (["stem.0.weight"], "echoclr", ["projector.0.weight"])
    state, kind, _ = extract_state_dict({"stem.0.weight": t, "fc.0.weight": t})
    assert kind == "torchvision" and set(state) == {"stem.0.weight", "fc.weight"}
