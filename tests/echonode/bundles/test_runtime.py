"""Tests for echonode.bundles.runtime: optimised inference agrees with eager, falls back safely."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from echonode.bundles import runtime as rt
from echonode.bundles import runtime_select as rs
from echonode.bundles.calibration import (
    CALIBRATION_FILE,
    CalibrationError,
    encode_calibration,
    read_calibration,
)
from echonode.bundles.manifest import BundleMeta
from echonode.bundles.nets import build_model, normalise_for_model
from echonode.bundles.runtime import (
    MODES,
    InferenceRuntime,
    cpu_has_native_bf16,
    optimise_for_inference,
    synthetic_clips,
)
from echonode.bundles.weights import load_bundle, save_bundle
from tests.conftest import REPO
from tests.factories import tiny_bundle

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
    from echonode.bundles.manifest import BundleMeta
    from echonode.bundles.weights import load_bundle, save_bundle

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
    from echonode.bundles.runtime import MODES
    from echonode.config import RUNTIME_MODES

    assert RUNTIME_MODES == MODES


# ---------------------------------------------------------------------------
# auto: selection by measurement (echonode.bundles.runtime_select), with fake runtimes
# on a fake clock so that speed and accuracy are exactly what each test says.
# ---------------------------------------------------------------------------



class FakeClock:
    """The selection's timer; fake runtimes advance it by their cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def _calibration(probs: list[float]) -> torch.Tensor:
    """Clips whose eager logit is their first value (see _fake_eager)."""
    x = torch.zeros(len(probs), 1, 1, 1, 2)
    x[:, 0, 0, 0, 0] = torch.tensor([_logit(p) for p in probs])
    return x


def _fake(clock: FakeClock, cost: float, shift=None, log: list[str] | None = None, name: str = ""):
    """A runtime: eager's logits (optionally moved per clip), ``cost`` seconds per clip."""

    def run(x: torch.Tensor) -> torch.Tensor:
        clock.now += cost * x.shape[0]
        if log is not None:
            log.append(name)
        logits = x[:, 0, 0, 0, :1].clone()
        if shift is not None:
            logits = shift(logits)
        return logits

    return run


PROBS = [0.1, 0.3, 0.46, 0.49, 0.6, 0.9, 0.97, 0.2]  # eager's probabilities on the 8 clips


def _select(builders, clock, **kwargs):
    eager = _fake(clock, 1.0)
    return rs.select_runtime(eager, _calibration(PROBS), builders, timer=clock, **kwargs)


def _moved(index: int, to: float):
    """Move one clip's probability to ``to`` (identified by its eager logit)."""
    target = _logit(PROBS[index])

    def shift(logits: torch.Tensor) -> torch.Tensor:
        hit = (logits - target).abs() < 1e-4
        return torch.where(hit, torch.full_like(logits, _logit(to)), logits)

    return shift


def test_selection_keeps_the_fastest_that_passes_and_never_a_slow_one() -> None:
    clock = FakeClock()
    builders = {
        "slow": lambda: _fake(clock, 2.0),
        "fast": lambda: _fake(clock, 0.5),
        "faster_but_wrong": lambda: _fake(clock, 0.1, shift=lambda z: z + 0.5),
    }
    selection, built = _select(builders, clock)
    assert selection.chosen == "fast" and set(built) == {"eager", "slow", "fast"}
    rows = {row["mode"]: row for row in selection.rows()}
    assert rows["fast"]["clips_per_s"] == pytest.approx(2.0) and rows["fast"]["vs_eager"] == pytest.approx(2.0)
    assert rows["slow"]["vs_eager"] == pytest.approx(0.5) and rows["slow"]["result"] == "passed; slower than fast"
    assert rows["faster_but_wrong"]["result"].startswith("refused: probability differs from eager by")
    # Only slow candidates: eager stays.
    clock = FakeClock()
    selection, _ = _select({"slow": lambda: _fake(clock, 1.5), "slower": lambda: _fake(clock, 4.0)}, clock)
    assert selection.chosen == "eager"
    assert "chosen (reference" in selection.table() and "not 5 % faster than eager" in selection.table()


def test_inaccurate_runtime_is_refused_however_fast() -> None:
    clock = FakeClock()
    builders = {
        "off_by_0.04": lambda: _fake(clock, 0.1, shift=_moved(0, PROBS[0] + 0.04)),
        "nan": lambda: _fake(clock, 0.1, shift=lambda z: z * float("nan")),
        "wrong_shape": lambda: _fake(clock, 0.1, shift=lambda z: z[:1]),
        "within_0.03": lambda: _fake(clock, 0.5, shift=_moved(0, PROBS[0] + 0.029)),
    }
    selection, built = _select(builders, clock)
    assert selection.chosen == "within_0.03"
    refused = {t.mode: t for t in selection.trials if not t.passed}
    assert set(refused) == {"off_by_0.04", "nan", "wrong_shape"}
    assert refused["off_by_0.04"].why_not == "probability differs from eager by 0.04 > 0.03"
    assert "inf > 0.03" in refused["nan"].why_not and "inf > 0.03" in refused["wrong_shape"].why_not
    assert "nan" not in built
    # A refused candidate stops running: the one wrong clip is in the first batch.
    assert refused["off_by_0.04"].clips_checked == 2 and refused["off_by_0.04"].seconds_per_clip == []


def test_decision_flip_outside_the_band_refuses_inside_it_is_allowed() -> None:
    clock = FakeClock()
    builders = {
        # Clip 2: eager 0.46, 0.04 below the threshold; moved across it. The
        # tolerance is loosened so that only the flip rule can refuse it.
        "flips_far": lambda: _fake(clock, 0.5, shift=_moved(2, 0.52)),
        # Clip 3: eager 0.49, within 0.03 of 0.5; crossing it is allowed.
        "flips_near": lambda: _fake(clock, 0.6, shift=_moved(3, 0.51)),
    }
    selection, _ = _select(builders, clock, tolerance=0.1)
    far, near = selection.trial("flips_far"), selection.trial("flips_near")
    assert far is not None and near is not None
    assert not far.passed and far.flips == 1 and "1 decision(s) flip" in far.why_not
    assert near.passed and near.flips == 0 and near.flips_in_band == 1
    assert selection.chosen == "flips_near"
    # The threshold is the bundle's: at 0.45, clip 2 (0.46) is inside the band.
    clock = FakeClock()
    selection, _ = _select({"flips_far": lambda: _fake(clock, 0.5, shift=_moved(2, 0.44))}, clock, threshold=0.45)
    assert selection.chosen == "flips_far" and selection.trial("flips_far").flips_in_band == 1  # type: ignore[union-attr]


def test_compare_multiclass_band_is_the_top_two_margin() -> None:
    ref = torch.log(torch.tensor([[0.50, 0.45, 0.05], [0.60, 0.30, 0.10]]))
    near = torch.log(torch.tensor([[0.47, 0.48, 0.05], [0.60, 0.30, 0.10]]))  # top-two margin 0.05 <= 0.06
    far = torch.log(torch.tensor([[0.50, 0.45, 0.05], [0.40, 0.50, 0.10]]))  # margin 0.30: a real flip
    assert rs.compare(ref, near)[1:] == (0, 1)
    diff, outside, inside = rs.compare(ref, far)
    assert (outside, inside) == (1, 0) and diff == pytest.approx(0.2, abs=1e-6)


def test_eager_wins_ties() -> None:
    clock = FakeClock()
    selection, _ = _select({"about_the_same": lambda: _fake(clock, 0.97)}, clock)
    assert selection.chosen == "eager"
    clock = FakeClock()
    selection, _ = _select({"clearly_faster": lambda: _fake(clock, 0.9)}, clock)
    assert selection.chosen == "clearly_faster"


def test_candidates_are_interleaved_and_rotated_and_every_clip_checked() -> None:
    clock, calls = FakeClock(), []
    eager = _fake(clock, 1.0, log=calls, name="eager")
    builders = {name: (lambda n=name: _fake(clock, 0.5, log=calls, name=n)) for name in ("a", "b")}
    selection, _ = rs.select_runtime(eager, _calibration(PROBS), builders, timer=clock, warmup=1, rounds=4)
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == 5 and all(sorted(r) == ["a", "b", "eager"] for r in rounds)
    assert len({tuple(r) for r in rounds[:3]}) == 3  # the order rotates
    assert all(t.clips_checked == 8 and len(t.seconds_per_clip) == 4 for t in selection.trials)
    assert (selection.rounds, selection.warmup, selection.batch, selection.clips) == (4, 1, 2, 8)


def test_build_and_call_failures_are_refused() -> None:
    clock = FakeClock()

    def broken() -> None:
        raise RuntimeError("no compiler")

    def flaky(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("graph cannot take this")

    selection, built = _select({"broken": broken, "flaky": lambda: flaky}, clock)
    assert selection.chosen == "eager" and set(built) == {"eager"}
    assert selection.trial("broken").why_not == "build failed (RuntimeError: no compiler)"  # type: ignore[union-attr]
    assert selection.trial("flaky").why_not.startswith("failed at run time (RuntimeError")  # type: ignore[union-attr]


def test_auto_candidates_and_the_environment_knob() -> None:
    supported = rs.supported_modes()
    assert supported[0] == "jit" and set(supported) <= set(MODES)
    assert ("bf16" in supported) == cpu_has_native_bf16()
    assert rs.auto_candidates({}) == supported
    assert rs.auto_candidates({rs.CANDIDATES_ENV: "bf16, jit,tensorrt"}) == [m for m in supported if m in ("jit", "bf16")]
    # No compiler where inductor looks: no compile candidate, and the mode refuses to build.
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"cpp.cxx": (None, "no-such-compiler-echonode")}):
        assert rt.inductor_compiler() is None
        assert "compile" not in rs.supported_modes() and "compile_bf16" not in rs.supported_modes()
        with pytest.raises(RuntimeError, match="no C.. compiler"):
            rt.build_mode("compile", _model(), synthetic_clips(2, FRAMES, SIZE), calibration=synthetic_clips(2, FRAMES, SIZE))


def test_inductor_cache_goes_to_the_state_dir_unless_the_operator_chose_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Importing inductor's config sets the variable to its default: that counts as unset.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    rt._use_state_dir_for_inductor(tmp_path)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    rt._use_state_dir_for_inductor(tmp_path / "s")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "s" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "operator"))
    rt._use_state_dir_for_inductor(tmp_path)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "operator")


def test_fixed_batches_pad_and_slice() -> None:
    seen = []

    def step(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return x[:, :1, 0, 0, 0] * 2

    x = torch.arange(5, dtype=torch.float32).reshape(5, 1, 1, 1, 1).expand(5, 2, 1, 1, 1)
    out = rt._in_fixed_batches(step, x, 2)
    assert seen == [2, 2, 2] and out[:, 0].tolist() == [0, 2, 4, 6, 8]


def test_machine_signature_names_what_the_choice_depends_on() -> None:
    sig = rs.machine_signature(["jit"])
    assert sig["torch"] == torch.__version__ and sig["threads"] == torch.get_num_threads()
    assert sig["cpu_model"] and len(sig["cpu_flags_sha256"]) == 16 and sig["candidates"] == ["jit"]
    assert rs.machine_signature(["jit", "bf16"]) != sig
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if before != 1 else 2)
        assert rs.machine_signature(["jit"]) != sig
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------
# auto at bundle load: calibration clips, the cache
# ---------------------------------------------------------------------------





@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts full selections; candidates narrowed to jit (cheap, always supported)."""
    monkeypatch.setenv(rs.CANDIDATES_ENV, "jit")
    calls: list[int] = []
    real = rs.select_runtime

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rs, "select_runtime", counting)
    return calls


def _bundle_files(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}


def test_choice_is_cached_per_bundle_and_machine(tmp_path: Path, counted: list[int]) -> None:
    folder = tiny_bundle(tmp_path / "models", "lvh")
    state = tmp_path / "state"
    before = _bundle_files(folder)
    with capture_logs() as logs:
        first = load_bundle(folder, state_dir=state)
    assert len(counted) == 1 and first.runner.selection["cached"] is False
    events = [e["event"] for e in logs]
    assert events.count("runtime.candidate") == 2 and "runtime.selected" in events
    assert "runtime.calibration_synthetic" in events  # tiny_bundle stores no clips
    cache = json.loads((state / rs.CACHE_FILE).read_text())
    (record,) = cache["choices"][first.device_uid].values()
    assert record["mode"] == first.runner.mode and record["machine"]["candidates"] == ["jit"]
    assert {row["mode"] for row in record["selection"]["table"]} == {"eager", "jit"}
    # A restart: the cached choice, no measuring.
    with capture_logs() as logs:
        second = load_bundle(folder, state_dir=state)
    assert len(counted) == 1 and second.runner.mode == first.runner.mode
    assert second.runner.selection["cached"] is True
    assert next(e for e in logs if e["event"] == "runtime.selected")["cached"] is True
    # Another machine (here: another thread count) measures again, and keeps both records.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads != 1 else 2)
        load_bundle(folder, state_dir=state)
    finally:
        torch.set_num_threads(threads)
    assert len(counted) == 2
    assert len(json.loads((state / rs.CACHE_FILE).read_text())["choices"][first.device_uid]) == 2
    # Another bundle (a new DeviceUID) with the very same weights measures again.
    meta = BundleMeta.from_dict(json.loads((folder / "bundle.json").read_text()))
    other = BundleMeta.create(name=meta.name, task=meta.task, width=meta.width, preprocessing=meta.preprocessing,
                              random_weights=True)  # fmt: skip
    assert other.device_uid != meta.device_uid
    save_bundle(tmp_path / "other", other, torch.load(folder / "weights.pt", weights_only=True))
    load_bundle(tmp_path / "other", state_dir=state)
    assert len(counted) == 3
    # The bundle folder was only read.
    assert _bundle_files(folder) == before
    # Without a state directory nothing is cached: every load measures.
    load_bundle(folder)
    load_bundle(folder)
    assert len(counted) == 5


def test_broken_cache_and_a_cached_choice_that_fails_are_measured_again(
    tmp_path: Path, counted: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tiny_bundle(tmp_path / "models", "lvh")
    state = tmp_path / "state"
    state.mkdir()
    (state / rs.CACHE_FILE).write_text("{not json")
    with capture_logs() as logs:
        bundle = load_bundle(folder, state_dir=state)
    assert len(counted) == 1 and any(e["event"] == "runtime.cache_unreadable" for e in logs)
    assert bundle.device_uid in json.loads((state / rs.CACHE_FILE).read_text())["choices"]
    # A cached mode that no longer passes its check (a changed library, say) is measured again.
    data = json.loads((state / rs.CACHE_FILE).read_text())
    (key,) = data["choices"][bundle.device_uid]
    data["choices"][bundle.device_uid][key]["mode"] = "jit"
    (state / rs.CACHE_FILE).write_text(json.dumps(data))
    monkeypatch.setitem(rt._BUILDERS, "jit", lambda model, example, **kw: (lambda x: model(x) + 3.0))
    with capture_logs() as logs:
        again = load_bundle(folder, state_dir=state)
    assert len(counted) == 2 and again.runner.mode == "eager"
    assert any(e["event"] == "runtime.cached_choice_failed" for e in logs)


def test_unwritable_state_dir_still_loads(tmp_path: Path, counted: list[int]) -> None:
    folder = tiny_bundle(tmp_path / "models", "lvh")
    state = tmp_path / "state-is-a-file"
    state.write_text("")
    with capture_logs() as logs:
        bundle = load_bundle(folder, state_dir=state)
    assert bundle.runner.mode in ("eager", "jit")
    assert any(e["event"] == "runtime.cache_unwritable" for e in logs)


def test_registry_caches_in_the_models_folders_parent(tmp_path: Path, counted: list[int]) -> None:
    from echonode.bundles.registry import ModelRegistry

    tiny_bundle(tmp_path / "models", "lvh")
    registry = ModelRegistry(tmp_path / "models", "cpu")
    registry.refresh()
    assert (tmp_path / rs.CACHE_FILE).is_file() and registry.state_dir == tmp_path
    assert ModelRegistry(tmp_path / "models", "cpu", state_dir=tmp_path / "s").state_dir == tmp_path / "s"
    ModelRegistry(tmp_path / "models", "cpu").refresh()
    assert len(counted) == 1


def test_calibration_file_round_trip_and_refusals(tmp_path: Path) -> None:
    clips = synthetic_clips(3, FRAMES, SIZE, seed=3).numpy()
    (tmp_path / CALIBRATION_FILE).write_bytes(encode_calibration(clips, "validation:3"))
    got, source = read_calibration(tmp_path, FRAMES, SIZE)
    assert source == "validation:3" and got.shape == (3, 3, FRAMES, SIZE, SIZE) and got.dtype == np.float32
    np.testing.assert_allclose(got, clips, atol=5e-4)  # float16 storage
    with pytest.raises(CalibrationError, match="the bundle needs"):
        read_calibration(tmp_path, FRAMES, SIZE * 2)
    with pytest.raises(CalibrationError, match=r"\[0, 1\]"):
        encode_calibration(clips * 2, "x")
    (tmp_path / CALIBRATION_FILE).write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="unreadable"):
        read_calibration(tmp_path, FRAMES, SIZE)
    # A pickled object array is refused, never unpickled.
    np.savez(tmp_path / CALIBRATION_FILE, clips=np.array([object()]), format=np.array(1))
    with pytest.raises(CalibrationError, match="unreadable"):
        read_calibration(tmp_path, FRAMES, SIZE)
    with pytest.raises(FileNotFoundError):
        read_calibration(tmp_path / "nowhere", FRAMES, SIZE)


def test_a_bundle_with_unusable_clips_falls_back_to_synthetic_with_a_warning(tmp_path: Path, counted: list[int]) -> None:
    folder = tiny_bundle(tmp_path / "models", "lvh")
    (folder / CALIBRATION_FILE).write_bytes(encode_calibration(synthetic_clips(2, FRAMES, 16).numpy(), "validation:2"))
    with capture_logs() as logs:
        bundle = load_bundle(folder)
    warnings = [e for e in logs if e["event"] == "runtime.calibration_synthetic"]
    assert len(warnings) == 1
    warning = warnings[0]
    assert "the bundle needs" in warning["reason"] and warning["log_level"] == "warning"
    assert bundle.runner.selection["calibration"].startswith("synthetic (")


def test_init_bundle_stores_synthetic_calibration_clips_and_says_so(tmp_path: Path, counted: list[int], capsys) -> None:
    from train.init_bundle import main as init_main

    out = tmp_path / "b"
    assert init_main(["--task", "lvh", "--out", str(out), "--width", "4", "--size", str(SIZE),
                      "--clip-frames", str(FRAMES)]) == 0  # fmt: skip
    assert "calibration: 8 synthetic echo-like clips (no real data)" in capsys.readouterr().out
    clips, source = read_calibration(out, FRAMES, SIZE)
    assert source == "synthetic" and clips.shape[0] == 8
    assert "synthetic" in load_bundle(out, runtime="eager").meta.provenance["calibration"]
    with capture_logs() as logs:
        bundle = load_bundle(out)
    assert not any(e["event"] == "runtime.calibration_synthetic" for e in logs)  # it has its clips
    assert bundle.runner.selection["calibration"] == "synthetic"


def test_save_bundle_writes_bytes_extra_files(tmp_path: Path) -> None:
    meta = BundleMeta.create(name="t", task="lvh", width=WIDTH, preprocessing={"size": SIZE, "clip_frames": FRAMES})
    payload = bytes(range(256))
    save_bundle(tmp_path / "b", meta, _model(num_outputs=1).state_dict(), extra_files={"blob.bin": payload, "n.txt": "é"})
    assert (tmp_path / "b" / "blob.bin").read_bytes() == payload
    assert (tmp_path / "b" / "n.txt").read_text(encoding="utf-8") == "é"


def test_finetune_stores_its_evaluation_clips_and_load_checks_on_them(tmp_path: Path, counted: list[int]) -> None:
    from echonode.analyse.preprocess import PreprocessConfig
    from tests.factories import finetune_args, make_labelled_archive
    from train.cache import ClipCache
    from train.finetune import main as finetune_main
    from train.index import build_index

    archive, labels = make_labelled_archive(tmp_path)
    build_index(archive, tmp_path / "cache", PreprocessConfig(size=16), progress=False)
    out = tmp_path / "lvh"
    assert finetune_main(finetune_args(tmp_path / "cache", labels, out, "--task", "lvh", "--epochs", "1",
                               "--calibration-clips", "5")) == 0  # fmt: skip
    bundle = load_bundle(out, state_dir=tmp_path / "state")
    clips, source = read_calibration(out, bundle.meta.clip_frames, bundle.meta.frame_size)
    assert clips.shape == (5, 3, 4, 16, 16) and source.startswith("validation:")
    assert bundle.meta.provenance["calibration"].startswith(f"5 evaluation clips ({source})")
    # Each stored clip is one of the node's evaluation clips of a video of the cache.
    cache = ClipCache(tmp_path / "cache")
    from echonode.analyse.preprocess import make_eval_clips

    every = np.concatenate([
        make_eval_clips(np.asarray(cache.frames(v["sop_uid"])), PreprocessConfig(size=16, clip_frames=4))[:, 0]
        for v in cache.manifest["videos"]
    ])  # fmt: skip
    for clip in clips[:, 0]:
        assert np.abs(every - clip).reshape(len(every), -1).max(axis=1).min() < 1e-3
    # The selection at load ran on these clips, and the choice is cached under the DeviceUID.
    assert bundle.runner.selection["calibration"] == source and bundle.runner.selection["clips"] == 5
    assert bundle.device_uid in json.loads((tmp_path / "state" / rs.CACHE_FILE).read_text())["choices"]
    # --calibration-clips 0: none stored.
    out0 = tmp_path / "lvh0"
    assert finetune_main(finetune_args(tmp_path / "cache", labels, out0, "--task", "lvh", "--epochs", "1",
                               "--calibration-clips", "0")) == 0  # fmt: skip
    assert not (out0 / CALIBRATION_FILE).exists()


# ---------------------------------------------------------------------------
# The optional runtimes: OpenVINO (when installed) and torch.compile (slow)
# ---------------------------------------------------------------------------

needs_openvino = pytest.mark.skipif(
    rt.openvino_version() is None,
    reason="openvino is not installed (optional extra: pip install echonode[openvino])",
)
_TELEMETRY_ENV = ("CI", "TF_BUILD", "JENKINS_URL")  # OpenVINO's telemetry also stays off in CI; not what is tested


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@needs_openvino
@pytest.mark.parametrize("mode", ["openvino"] + (["openvino_bf16"] if cpu_has_native_bf16() else []))
def test_openvino_mode_matches_eager(mode: str, clips: torch.Tensor, tmp_path: Path) -> None:
    model = _model()
    home = os.environ.get("HOME")
    runtime = optimise_for_inference(model, clips[:2], mode, state_dir=tmp_path)
    assert runtime.mode == mode, runtime.fallbacks
    assert os.environ.get("HOME") == home
    with torch.inference_mode():
        want = model(clips)
        got = torch.cat([runtime(clips[:1]), runtime(clips[1:4]), runtime(clips[4:])])  # any batch size
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert _rel(got, want) <= (1e-4 if mode == "openvino" else TOL["bf16"])
    assert _files(tmp_path) == ["openvino", "openvino/intel", "openvino/intel/openvino_telemetry"]


_OPENVINO_SCRIPT = """
import sys, torch
from echonode.bundles.nets import build_model
from echonode.bundles.runtime import build_mode, synthetic_clips
torch.set_num_threads(1)
model = build_model("r3d_18", 1, width=4).eval().requires_grad_(False)
x = synthetic_clips(2, 8, 32)
fn = build_mode("openvino", model, x, calibration=x, state_dir=sys.argv[1])
with torch.inference_mode():
    print(float((fn(x) - model(x)).abs().max()))
"""


@needs_openvino
def test_openvino_writes_nothing_outside_the_state_dir(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in _TELEMETRY_ENV}
    env["PYTHONPATH"] = str(REPO)
    # The control: a plain import with an empty HOME leaves telemetry files there,
    # so an empty HOME below means the opt-out worked, not that nothing is detected.
    plain_home = tmp_path / "plain-home"
    plain_home.mkdir()
    subprocess.run([sys.executable, "-c", "import openvino"], env={**env, "HOME": str(plain_home)},
                   cwd=tmp_path, check=True, timeout=120)  # fmt: skip
    assert any(name.startswith("intel") for name in _files(plain_home)), _files(plain_home)

    home, state, cwd = tmp_path / "home", tmp_path / "state", tmp_path / "cwd"
    for folder in (home, state, cwd):
        folder.mkdir()
    result = subprocess.run([sys.executable, "-c", _OPENVINO_SCRIPT, str(state)], env={**env, "HOME": str(home)},
                            cwd=cwd, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-3
    assert _files(home) == [] and _files(cwd) == []
    assert _files(state) == ["openvino", "openvino/intel", "openvino/intel/openvino_telemetry"]
    assert (state / "openvino" / "intel" / "openvino_telemetry").read_text() == "0"


@pytest.mark.slow
@pytest.mark.skipif(rt.inductor_compiler() is None, reason="no C++ compiler for torch.compile")
@pytest.mark.parametrize("mode", ["compile"] + (["compile_bf16"] if cpu_has_native_bf16() else []))
def test_compile_mode_matches_eager_at_any_batch_size(mode: str, clips: torch.Tensor, tmp_path: Path) -> None:
    model = _model()
    runtime = optimise_for_inference(model, clips[:2], mode, state_dir=tmp_path)
    assert runtime.mode == mode, runtime.fallbacks
    with torch.inference_mode():
        want = model(clips)
        got = torch.cat([runtime(clips[:1]), runtime(clips[1:4]), runtime(clips[4:])])
    assert _rel(got, want) <= (1e-4 if mode == "compile" else TOL["bf16"])
