"""Tests for echonode.runtime: optimised inference agrees with eager, falls back safely."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from echonode import runtime as rt
from echonode.nets import build_model, normalise_for_model
from echonode.runtime import (
    MODES,
    InferenceRuntime,
    cpu_has_native_bf16,
    optimise_for_inference,
    synthetic_clips,
)

torch.set_num_threads(2)

WIDTH = 4
FRAMES = 8
SIZE = 32

#: Largest relative logit error ||runtime - eager|| / ||eager|| accepted per
#: mode over a batch of echo-like clips. Measured on these narrow random
#: networks (width 4-8, 8x32x32): jit ~1e-7, bf16 0.005-0.01, int8 0.04-0.08;
#: docs/benchmarks.md ("Inference") has the width-64 and trained-bundle figures.
TOL = {"eager": 1e-6, "jit": 1e-5, "bf16": 0.03, "int8": 0.15}


def _model(num_outputs: int = 8, arch: str = "r3d_18", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(arch, num_outputs, width=WIDTH).eval().requires_grad_(False)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


@pytest.fixture(scope="module")
def clips() -> torch.Tensor:
    return synthetic_clips(5, FRAMES, SIZE, seed=7)


def test_synthetic_clips_deterministic_and_in_range() -> None:
    a = synthetic_clips(3, FRAMES, SIZE, seed=1)
    b = synthetic_clips(3, FRAMES, SIZE, seed=1)
    c = synthetic_clips(3, FRAMES, SIZE, seed=2)
    assert a.shape == (3, 3, FRAMES, SIZE, SIZE) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) == 0.0 and float(a.max()) == 1.0
    # A black border outside the sector, as after the node's mask.
    assert float(a[:, :, :, -1, 0].abs().max()) == 0.0
    assert torch.equal(a[:, 0], a[:, 2])


@pytest.mark.parametrize("mode", ["eager", "jit", "int8"] + (["bf16"] if cpu_has_native_bf16() else []))
def test_mode_matches_eager(mode: str, clips: torch.Tensor) -> None:
    model = _model()
    runtime = optimise_for_inference(model, clips[:2], mode)
    assert runtime.mode == mode, runtime.fallbacks
    assert runtime.requested == mode
    with torch.inference_mode():
        want = model(clips)
        got = torch.cat([runtime(clips[:1]), runtime(clips[1:4]), runtime(clips[4:])])  # batch sizes 1, 3, 1
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert _rel(got, want) <= TOL[mode]
        assert _rel(runtime(clips), want) <= TOL[mode]


def test_bf16_mode_matches_eager_when_forced(clips: torch.Tensor) -> None:
    # bf16 works (slowly, emulated) on any CPU; auto only picks it where native.
    model = _model()
    runtime = optimise_for_inference(model, clips[:2], "bf16")
    assert runtime.mode == "bf16", runtime.fallbacks
    with torch.inference_mode():
        assert _rel(runtime(clips), model(clips)) <= TOL["bf16"]


def test_multiclass_and_r2plus1d(clips: torch.Tensor) -> None:
    model = _model(num_outputs=3, arch="r2plus1d_18")
    runtime = optimise_for_inference(model, clips[:2], "int8")
    assert runtime.mode == "int8", runtime.fallbacks
    with torch.inference_mode():
        got, want = runtime(clips), model(clips)
    assert got.shape == (5, 3)
    assert _rel(got, want) <= TOL["int8"]


def test_auto_picks_by_measurement(clips: torch.Tensor) -> None:
    runtime = optimise_for_inference(_model(), clips[:2], "auto", order=("jit",))
    table = {row["mode"]: row for row in runtime.selection["table"]}
    assert set(table) == {"eager", "jit"}
    # Whichever was faster here; an optimised mode only when it passed the check.
    assert runtime.mode in ("eager", "jit") and table[runtime.mode]["result"].startswith("chosen")
    assert table["jit"]["max_prob_diff"] <= 1e-4 and table["jit"]["flips"] == 0
    assert runtime.selection["calibration"] == "synthetic" and runtime.selection["clips"] == 8
    assert runtime.describe()["mode"] == runtime.mode


def test_kinetics_normalisation_calibrates_on_normalised_clips(clips: torch.Tensor) -> None:
    model = _model()
    norm = lambda x: normalise_for_model(x, "kinetics")  # noqa: E731
    runtime = optimise_for_inference(model, norm(clips[:2]), "int8", normalise=norm)
    assert runtime.mode == "int8", runtime.fallbacks
    with torch.inference_mode():
        assert _rel(runtime(norm(clips)), model(norm(clips))) <= TOL["int8"]


def test_build_failure_falls_back(monkeypatch: pytest.MonkeyPatch, clips: torch.Tensor) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no quantized engine")

    monkeypatch.setitem(rt._BUILDERS, "int8", broken)
    model = _model()
    runtime = optimise_for_inference(model, clips[:2], "auto", order=("int8", "jit"))
    assert runtime.mode in ("jit", "eager")
    assert any(f.startswith("int8: build failed (RuntimeError: no quantized engine") for f in runtime.fallbacks)
    only = optimise_for_inference(model, clips[:2], "int8")
    assert only.mode == "eager" and only.requested == "int8"
    assert only.fallbacks[0].startswith("int8: RuntimeError: no quantized engine")
    with torch.inference_mode():
        assert torch.equal(only(clips), model(clips))


def test_self_check_rejects_inaccurate_mode(clips: torch.Tensor) -> None:
    model = _model()
    runtime = optimise_for_inference(model, clips[:2], "auto", order=("int8", "jit"), tolerance=0.0)
    # int8 cannot be bit-exact: refused; jit (exact here) or eager is chosen, never int8.
    assert runtime.mode in ("jit", "eager")
    assert any(f.startswith("int8: probability differs from eager") for f in runtime.fallbacks)


def test_nan_output_is_rejected(monkeypatch: pytest.MonkeyPatch, clips: torch.Tensor) -> None:
    monkeypatch.setitem(rt._BUILDERS, "jit", lambda model, example, **kw: (lambda x: model(x) * float("nan")))
    runtime = optimise_for_inference(_model(), clips[:2], "jit")
    assert runtime.mode == "eager" and "self-check" in runtime.fallbacks[0]


def test_runtime_failure_at_call_time_falls_back_to_eager(clips: torch.Tensor) -> None:
    model = _model()
    calls = {"n": 0}

    def flaky(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        raise RuntimeError("shape the graph cannot take")

    runtime = InferenceRuntime(mode="jit", requested="jit", model=model, fn=flaky)
    with torch.inference_mode():
        want = model(clips)
    assert torch.equal(runtime(clips), want)
    assert runtime.mode == "eager" and "failed at run time" in runtime.fallbacks[0]
    assert torch.equal(runtime(clips), want)
    assert calls["n"] == 1  # not retried


def test_cuda_mode_on_cpu_network_falls_back(clips: torch.Tensor) -> None:
    runtime = optimise_for_inference(_model(), clips[:2], "cuda")
    assert runtime.mode == "eager" and "not on a CUDA device" in runtime.fallbacks[0]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        optimise_for_inference(_model(), synthetic_clips(1, FRAMES, SIZE), "tensorrt")
    with pytest.raises(ValueError, match="example"):
        optimise_for_inference(_model(), torch.zeros(3, FRAMES, SIZE, SIZE), "jit")
    assert set(MODES) >= {"auto", "eager", "jit", "bf16", "int8", "cuda"}


def test_model_left_unchanged(clips: torch.Tensor) -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimise_for_inference(model, clips[:2], "int8")
    optimise_for_inference(model, clips[:2], "bf16")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


def test_bundle_predict_with_runtime(tmp_path, clips: torch.Tensor) -> None:
    """The wiring bundle.py would use: Bundle.model replaced by the runtime.

    The bundle's fresh head gives probabilities near 0.5, so this checks the
    plumbing (shapes, dtype, batching, sigmoid), not accuracy."""
    from echonode.bundle import BundleMeta, load_bundle, save_bundle

    meta = BundleMeta.create(name="t", task="lvh", width=WIDTH, preprocessing={"size": SIZE, "clip_frames": FRAMES})
    save_bundle(tmp_path / "b", meta, _model(num_outputs=1).state_dict())
    # Eager: a runner built at load would stand in front of the replaced model.
    bundle = load_bundle(tmp_path / "b", runtime="eager")
    want = bundle.predict(clips.numpy(), batch_size=2)
    bundle.model = optimise_for_inference(bundle.model, clips[:2], "int8")
    got = bundle.predict(clips.numpy(), batch_size=2)
    assert got.shape == want.shape == (5,)
    np.testing.assert_allclose(got, want, atol=0.01)


def test_config_knows_every_runtime_mode() -> None:
    from echonode.config import RUNTIME_MODES
    from echonode.runtime import MODES

    assert RUNTIME_MODES == MODES
