"""``[models] runtime = auto``: each bundle's inference runtime chosen by measurement.

At bundle load (in the worker process; the node process never imports
torch) :func:`runtime_for_bundle` builds every candidate runtime this
machine supports (:func:`auto_candidates`: TorchScript, bf16 autocast,
int8, torch.compile fp32/bf16 where inductor has a C++ compiler, OpenVINO
f32/bf16 where the optional package is installed; the bf16 variants only on
CPUs with native bf16), runs each beside eager fp32 on the bundle's
calibration clips (:mod:`echonode.bundles.calibration`), and keeps the fastest that
passes the accuracy rule:

- its largest probability difference from eager on any calibration clip is
  at most :data:`DEFAULT_TOLERANCE` (0.03), and
- no clip's decision flips unless the eager probability lies within
  :data:`DEFAULT_BAND` (0.03) of the bundle's threshold. For a multi-class
  (view) bundle the decision is the arg-max and "within 0.03 of the
  threshold" means the eager top two probabilities are within 0.06 of each
  other (each within 0.03 of their midpoint, the boundary between them).
  With both figures at 0.03 a flip from outside the band also breaks the
  first rule; the second still states the intent, and binds on its own
  when the tolerance is loosened.

Eager fp32 is always a candidate and wins ties: another runtime is chosen
only when its median time per clip is at least :data:`TIE_MARGIN` (5 %)
below eager's, so ``auto`` is never slower than eager fp32 on any CPU by
more than the noise of the measurement.

How the time is measured (:func:`select_runtime`): the calibration clips
are cut into batches of :data:`DEFAULT_BATCH`; in each round every
surviving candidate runs one batch, in an order rotated every round, so
that load from other processes falls on all alike; the first
:data:`DEFAULT_WARMUP` round is not timed (oneDNN primitive creation,
TorchScript profiling); the next :data:`DEFAULT_ROUNDS` are, and the
median seconds per clip is kept. The first pass over the batches also
gives the accuracy check, so each candidate runs ``batch x (warmup +
rounds)`` clips (10 by default), and a candidate that fails the check stops
running at once. Builds are timed separately: ``torch.compile``'s compile
(tens of seconds at width 64) and int8's calibration happen while the
candidate is built, before the timed rounds, once per process.

The choice is cached per bundle (its DeviceUID) and machine
(:func:`machine_signature`: CPU model and flags, torch version, thread
count, the candidate set and the libraries behind it) in
``<state_dir>/runtime-choices.json`` (:class:`ChoiceCache`), never in the
bundle folder; a restart builds the cached runtime and checks it on one
batch instead of measuring again (a compiled runtime still compiles once
per process: compiled code does not survive the process, though inductor's
kernel cache in ``<state_dir>/inductor`` makes the second compile
quicker).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from echonode.bundles.calibration import (
    DEFAULT_CALIBRATION_CLIPS,
    CalibrationError,
    read_calibration,
)
from echonode.bundles.runtime import (
    MODES,
    InferenceRuntime,
    build_mode,
    cpu_has_native_bf16,
    describe_error,
    inductor_compiler,
    openvino_version,
    optimise_for_inference,
    probabilities,
    synthetic_clips,
)
from echonode.durable import write_json
from echonode.ops.logs import EventLog

__all__ = [
    "AUTO_ORDER",
    "CACHE_FILE",
    "CANDIDATES_ENV",
    "DEFAULT_BAND",
    "DEFAULT_BATCH",
    "DEFAULT_CALIBRATION_CLIPS",
    "DEFAULT_ROUNDS",
    "DEFAULT_TOLERANCE",
    "DEFAULT_WARMUP",
    "TIE_MARGIN",
    "ChoiceCache",
    "Selection",
    "Trial",
    "auto_candidates",
    "builders_for",
    "bundle_calibration",
    "compare",
    "machine_signature",
    "runtime_for_bundle",
    "runtime_from",
    "select_runtime",
    "supported_modes",
]

log = EventLog(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]

#: Largest accepted |probability - eager probability| on any calibration clip.
DEFAULT_TOLERANCE = 0.03
#: A decision may flip only where eager's probability is this close to the threshold.
DEFAULT_BAND = 0.03
#: Clips per timed call (also the batch ``compile`` compiles for).
DEFAULT_BATCH = 2
#: Untimed rounds first.
DEFAULT_WARMUP = 1
#: Timed rounds; the median is kept.
DEFAULT_ROUNDS = 4
#: A runtime must beat eager's median time per clip by this fraction to be chosen.
TIE_MARGIN = 0.05
#: Comma-separated modes that narrow ``auto``'s candidates (eager is always one).
CANDIDATES_ENV = "ECHONODE_RUNTIME_CANDIDATES"
#: The cache's file name in the state directory.
CACHE_FILE = "runtime-choices.json"
#: Candidates in the order they are built (cheap builds first).
AUTO_ORDER: tuple[str, ...] = ("jit", "bf16", "openvino", "openvino_bf16", "int8", "compile", "compile_bf16")
# Bumped when the rule or the measurement changes, so that cached choices
# made under another rule are measured again.
_SELECTION_VERSION = 1
# ISA flags that decide which runtime is fast (shown in the cache; the
# signature hashes the whole flag set).
_RELEVANT_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
_CACHE_FORMAT = 1
_MAX_MACHINES_PER_BUNDLE = 8
_MAX_BUNDLES = 128


# ---------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------


def _has_quantized_engine() -> bool:
    return any(name in torch.backends.quantized.supported_engines for name in ("x86", "fbgemm"))


def supported_modes() -> list[str]:
    """CPU modes this machine can run, in :data:`AUTO_ORDER`.

    bf16 variants only with native bf16 (emulated bf16 is several times
    slower than fp32 and would only cost measuring time); ``compile`` only
    where inductor finds its C++ compiler; ``openvino`` only where the
    optional package is installed; ``int8`` where torch has the x86 engine.
    """
    native_bf16 = cpu_has_native_bf16()
    compiler = inductor_compiler() is not None
    openvino = openvino_version() is not None
    available = {
        "jit": True,
        "bf16": native_bf16,
        "int8": _has_quantized_engine(),
        "compile": compiler,
        "compile_bf16": compiler and native_bf16,
        "openvino": openvino,
        "openvino_bf16": openvino and native_bf16,
    }
    return [mode for mode in AUTO_ORDER if available[mode]]


def auto_candidates(environ: Mapping[str, str] | None = None) -> list[str]:
    """The modes ``auto`` measures besides eager.

    Parameters
    ----------
    environ : mapping, optional
        Read for :data:`CANDIDATES_ENV` (default ``os.environ``): a
        comma-separated list that narrows the supported modes (for instance
        ``jit,bf16,openvino`` to spare torch.compile's compile time).
        Unknown names are ignored; ``eager`` is always measured.

    Returns
    -------
    list of str
        In :data:`AUTO_ORDER`.
    """
    supported = supported_modes()
    env = os.environ if environ is None else environ
    wanted = env.get(CANDIDATES_ENV)
    if wanted is None or not wanted.strip():
        return supported
    names = {name.strip() for name in wanted.split(",")}
    unknown = sorted(names - set(MODES) - {""})
    if unknown:
        log.warning("runtime.unknown_candidates", names=unknown, setting=CANDIDATES_ENV)
    return [mode for mode in supported if mode in names]


def builders_for(
    candidates: Sequence[str],
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    batch: int = DEFAULT_BATCH,
    state_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Callable[[], Forward]]:
    """One deferred builder per candidate mode, for :func:`select_runtime`."""
    example = calibration[:batch]

    def builder(name: str) -> Callable[[], Forward]:
        return lambda: build_mode(name, model, example, calibration=calibration, state_dir=state_dir)

    return {name: builder(name) for name in candidates if name != "eager"}


# ---------------------------------------------------------------------------
# The accuracy rule
# ---------------------------------------------------------------------------


def compare(
    reference: torch.Tensor, logits: torch.Tensor, *, threshold: float = 0.5, band: float = DEFAULT_BAND
) -> tuple[float, int, int]:
    """Compare a runtime's logits with eager's on the same clips.

    Parameters
    ----------
    reference, logits : torch.Tensor
        ``(B, K)`` logits of eager and of the runtime.
    threshold : float, optional
        The decision threshold on the probability (one output).
    band : float, optional
        Half-width of the band around the decision boundary in which a flip
        is allowed.

    Returns
    -------
    max_diff : float
        Largest |probability difference| (``inf`` for a non-finite output or
        a shape mismatch).
    flips_outside : int
        Clips whose decision flips while eager's probability is outside the
        band (refusals).
    flips_inside : int
        Flips inside the band (allowed).
    """
    if logits.ndim == 0 or logits.shape[0] != reference.shape[0]:
        return float("inf"), 0, 0
    ref = probabilities(reference).reshape(reference.shape[0], -1)
    got = probabilities(logits).reshape(logits.shape[0], -1)
    if got.shape != ref.shape:
        return float("inf"), 0, 0
    diff = (got - ref).abs()
    max_diff = float(diff.max()) if bool(torch.isfinite(diff).all()) else float("inf")
    if ref.shape[1] == 1:
        r, g = ref[:, 0], got[:, 0]
        flipped = (r >= threshold) != (g >= threshold)
        near = (r - threshold).abs() <= band
    else:
        flipped = ref.argmax(dim=1) != got.argmax(dim=1)
        top = ref.topk(2, dim=1).values
        near = (top[:, 0] - top[:, 1]) <= 2 * band
    return max_diff, int((flipped & ~near).sum()), int((flipped & near).sum())


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


@dataclass
class Trial:
    """One candidate's measurement.

    Attributes
    ----------
    mode : str
    build_s : float
        Seconds to build (compile, calibrate, convert), measured apart.
    seconds_per_clip : list of float
        One per timed round.
    max_prob_diff : float or None
        Largest probability difference from eager over the clips checked.
    flips, flips_in_band : int
        Decision flips outside / inside the band.
    clips_checked : int
    passed : bool
        Built, ran, and met the accuracy rule on every calibration clip.
    why_not : str
        Why it did not pass ("" when it did).
    """

    mode: str
    build_s: float = 0.0
    seconds_per_clip: list[float] = field(default_factory=list)
    max_prob_diff: float | None = None
    flips: int = 0
    flips_in_band: int = 0
    clips_checked: int = 0
    passed: bool = False
    why_not: str = ""

    @property
    def median_s(self) -> float | None:
        """Median seconds per clip over the timed rounds (None if untimed)."""
        return statistics.median(self.seconds_per_clip) if self.seconds_per_clip else None

    @property
    def clips_per_s(self) -> float | None:
        """Throughput from the median."""
        m = self.median_s
        return 1.0 / m if m else None


@dataclass
class Selection:
    """The outcome of :func:`select_runtime`: the choice and the table behind it."""

    chosen: str
    trials: list[Trial]
    threshold: float
    tolerance: float
    band: float
    batch: int
    warmup: int
    rounds: int
    clips: int
    measure_s: float
    build_s: float
    tie_margin: float = TIE_MARGIN
    calibration_source: str = ""
    cached: bool = False

    def trial(self, mode: str) -> Trial | None:
        """The trial of ``mode``, if it was a candidate."""
        return next((t for t in self.trials if t.mode == mode), None)

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-able row per candidate: mode, clips/s, ratio to eager, accuracy, result."""
        eager = self.trial("eager")
        eager_cps = eager.clips_per_s if eager is not None else None
        out = []
        for t in self.trials:
            cps = t.clips_per_s
            if t.mode == self.chosen:
                result = "chosen" if t.mode != "eager" else "chosen (reference; nothing faster passed)"
            elif t.mode == "eager":
                result = "reference"
            elif t.passed and self.chosen == "eager":
                result = f"passed; not {100 * self.tie_margin:.0f} % faster than eager"
            elif t.passed:
                result = f"passed; slower than {self.chosen}"
            else:
                result = f"refused: {t.why_not}"
            out.append({
                "mode": t.mode,
                "clips_per_s": None if cps is None else round(cps, 4),
                "vs_eager": None if cps is None or not eager_cps else round(cps / eager_cps, 3),
                "max_prob_diff": None if t.max_prob_diff is None else round(t.max_prob_diff, 5),
                "flips": t.flips,
                "flips_in_band": t.flips_in_band,
                "build_s": round(t.build_s, 2),
                "result": result,
            })  # fmt: skip
        return out

    def table(self) -> str:
        """The rows as a fixed-width text table."""
        lines = [f"{'mode':14s} {'clips/s':>8s} {'vs eager':>8s} {'max|dp|':>8s} {'flips':>7s} {'build s':>8s}  result"]
        for row in self.rows():
            cps = "-" if row["clips_per_s"] is None else f"{row['clips_per_s']:.3f}"
            ratio = "-" if row["vs_eager"] is None else f"{row['vs_eager']:.2f}x"
            diff = "-" if row["max_prob_diff"] is None else f"{row['max_prob_diff']:.4f}"
            flips = f"{row['flips']}/{row['flips_in_band']}"
            lines.append(f"{row['mode']:14s} {cps:>8s} {ratio:>8s} {diff:>8s} {flips:>7s} {row['build_s']:>8.1f}  "
                         f"{row['result']}")
        return "\n".join(lines)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (the cache record and ``Bundle.describe``)."""
        return {
            "chosen": self.chosen,
            "cached": self.cached,
            "calibration": self.calibration_source,
            "clips": self.clips,
            "batch": self.batch,
            "warmup": self.warmup,
            "rounds": self.rounds,
            "tolerance": self.tolerance,
            "band": self.band,
            "tie_margin": self.tie_margin,
            "threshold": self.threshold,
            "measure_s": round(self.measure_s, 2),
            "build_s": round(self.build_s, 2),
            "table": self.rows(),
        }


def select_runtime(
    model: Forward,
    calibration: torch.Tensor,
    builders: Mapping[str, Callable[[], Forward]],
    *,
    threshold: float = 0.5,
    tolerance: float = DEFAULT_TOLERANCE,
    band: float = DEFAULT_BAND,
    batch: int = DEFAULT_BATCH,
    warmup: int = DEFAULT_WARMUP,
    rounds: int = DEFAULT_ROUNDS,
    tie_margin: float = TIE_MARGIN,
    timer: Callable[[], float] = time.perf_counter,
) -> tuple[Selection, dict[str, Forward]]:
    """Build, check and time every candidate beside eager; choose.

    Parameters
    ----------
    model : callable
        The eager fp32 network (the reference; also the ``eager`` candidate).
    calibration : torch.Tensor
        ``(N, C, T, H, W)`` clips, normalised as the network expects.
    builders : mapping of str to callable
        Mode name -> zero-argument builder returning ``clips -> logits``
        (:func:`builders_for`). A builder that raises refuses its mode.
    threshold, tolerance, band : float, optional
        The accuracy rule (:func:`compare`).
    batch : int, optional
        Clips per call.
    warmup, rounds : int, optional
        Untimed, then timed rounds. There are at least as many rounds as
        calibration batches, so every clip is checked.
    tie_margin : float, optional
        Fraction by which a runtime must beat eager's median.
    timer : callable, optional
        Clock for the per-call times (tests pass a fake one).

    Returns
    -------
    selection : Selection
    built : dict of str to callable
        The forward of every candidate that was built and not refused
        (eager included), by mode.
    """
    if batch < 1 or warmup < 0 or rounds < 1:
        raise ValueError('Arguments "batch" and "rounds" must be positive and "warmup" not negative.')
    if calibration.ndim != 5 or calibration.shape[0] < 1:
        raise ValueError('Argument "calibration" must be a (N, C, T, H, W) tensor with N >= 1.')
    n = int(calibration.shape[0])
    batches = [calibration[i : i + batch] for i in range(0, n, batch)]
    trials: dict[str, Trial] = {"eager": Trial("eager", passed=True)}
    active: dict[str, Forward] = {"eager": model}
    build_started = time.perf_counter()
    _build_candidates(builders, trials, active)
    build_s = time.perf_counter() - build_started

    measure_started = time.perf_counter()
    total_rounds = max(len(batches), warmup + rounds)
    with torch.inference_mode():
        for r in range(total_rounds):
            outputs = _run_round(r, batches[r % len(batches)], active, trials, timer, timed=r >= warmup)
            if r < len(batches):  # later rounds only time: every clip has been checked
                _check_round(outputs, trials, active, threshold, tolerance, band)
    measure_s = time.perf_counter() - measure_started

    chosen = _choose(trials, active, n, tie_margin)
    selection = Selection(
        chosen=chosen,
        trials=list(trials.values()),
        threshold=float(threshold),
        tolerance=float(tolerance),
        band=float(band),
        batch=int(batch),
        warmup=int(warmup),
        rounds=int(total_rounds - warmup),
        clips=n,
        measure_s=measure_s,
        build_s=build_s,
        tie_margin=float(tie_margin),
    )
    built = {name: fn for name, fn in active.items() if trials[name].passed}
    return selection, built


def _build_candidates(builders: Mapping[str, Callable[[], Forward]], trials: dict[str, Trial],
                      active: dict[str, Forward]) -> None:
    """Build each candidate, recording its build time; one that raises is refused with the reason."""
    for name, build in builders.items():
        if name == "eager" or name in trials:
            continue
        trial = trials[name] = Trial(name)
        started = time.perf_counter()
        try:
            active[name] = build()
        except Exception as exc:  # noqa: BLE001 - a candidate that does not build is refused
            trial.why_not = f"build failed ({describe_error(exc)})"
        trial.build_s = time.perf_counter() - started


def _run_round(r: int, x: torch.Tensor, active: dict[str, Forward], trials: dict[str, Trial],
               timer: Callable[[], float], *, timed: bool) -> dict[str, torch.Tensor]:
    """One batch through every active candidate, in an order that rotates by round.

    Rotation spreads cache and frequency effects evenly over the candidates.
    A candidate that raises is refused and leaves ``active``; eager raising
    means the network itself fails, and that propagates.
    """
    names = list(active)
    shift = r % len(names)
    outputs: dict[str, torch.Tensor] = {}
    for name in names[shift:] + names[:shift]:
        fn = active[name]
        started = timer()
        try:
            out = fn(x)
        except Exception as exc:
            if name == "eager":
                raise  # the network itself fails: nothing to choose
            trials[name].why_not = f"failed at run time ({describe_error(exc)})"
            del active[name]
            continue
        elapsed = timer() - started
        if timed:
            trials[name].seconds_per_clip.append(elapsed / x.shape[0])
        outputs[name] = out
    return outputs


def _check_round(outputs: dict[str, torch.Tensor], trials: dict[str, Trial], active: dict[str, Forward],
                 threshold: float, tolerance: float, band: float) -> None:
    """Hold each candidate's output of one batch against eager's; a refused one leaves ``active``."""
    reference = outputs["eager"].float()
    clips = int(reference.shape[0])
    for name, out in outputs.items():
        if name == "eager":
            trials[name].clips_checked += clips
            continue
        _check(trials[name], reference, out.float(), threshold, tolerance, band, clips)
        if trials[name].why_not:
            del active[name]  # refused: no more time spent on it


def _choose(trials: dict[str, Trial], active: dict[str, Forward], clips: int, tie_margin: float) -> str:
    """Mark who passed (built, never refused, every clip checked) and pick the fastest that beats eager."""
    for name, trial in trials.items():
        if name != "eager" and not trial.why_not and name in active:
            trial.passed = trial.clips_checked == clips
            if not trial.passed:
                trial.why_not = f"checked on {trial.clips_checked} of {clips} clips"
    eager_s = trials["eager"].median_s
    passing = [t for t in trials.values() if t.passed and t.mode != "eager" and t.median_s is not None]
    if passing and eager_s is not None:
        best = min(passing, key=lambda t: t.median_s or float("inf"))
        if best.median_s is not None and best.median_s < eager_s * (1.0 - tie_margin):
            return best.mode
    return "eager"


def _check(
    trial: Trial,
    reference: torch.Tensor,
    logits: torch.Tensor,
    threshold: float,
    tolerance: float,
    band: float,
    clips: int,
) -> None:
    diff, outside, inside = compare(reference, logits, threshold=threshold, band=band)
    trial.max_prob_diff = diff if trial.max_prob_diff is None else max(trial.max_prob_diff, diff)
    trial.flips += outside
    trial.flips_in_band += inside
    trial.clips_checked += clips
    if not trial.max_prob_diff <= tolerance:
        trial.why_not = f"probability differs from eager by {trial.max_prob_diff:.3g} > {tolerance:g}"
    elif trial.flips:
        trial.why_not = f"{trial.flips} decision(s) flip with eager's probability more than {band:g} from the threshold"


def runtime_from(
    model: nn.Module, selection: Selection, built: Mapping[str, Forward], *, started: float | None = None
) -> InferenceRuntime:
    """The :class:`~echonode.bundles.runtime.InferenceRuntime` of a selection's choice."""
    chosen = selection.chosen
    trial = selection.trial(chosen)
    return InferenceRuntime(
        mode=chosen,
        requested="auto",
        model=model,
        fn=built.get(chosen, model),
        fallbacks=[f"{t.mode}: {t.why_not}" for t in selection.trials if t.why_not],
        max_abs_diff=trial.max_prob_diff if trial is not None and chosen != "eager" else None,
        build_seconds=(time.perf_counter() - started) if started is not None else selection.measure_s + selection.build_s,
        selection=selection.describe(),
    )


# ---------------------------------------------------------------------------
# The machine and the cache
# ---------------------------------------------------------------------------


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = "", list[str]()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = value.split()
        if model and flags:
            break
    return model or platform.processor() or platform.machine() or "unknown", sorted(set(flags))


def machine_signature(candidates: Sequence[str]) -> dict[str, Any]:
    """What a cached choice depends on besides the bundle.

    Parameters
    ----------
    candidates : sequence of str
        The modes measured (installing OpenVINO, say, adds candidates).

    Returns
    -------
    dict
        CPU model, a hash of the CPU flags and the ISA flags that matter,
        torch version, thread count, OpenVINO version, the C++ compiler,
        oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA``), the candidates and the
        selection rule's version.
    """
    model, flags = _cpuinfo()
    return {
        "cpu_model": model,
        "cpu_flags_sha256": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16],
        "isa": [f for f in _RELEVANT_FLAGS if f in flags],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "openvino": openvino_version(),
        "compiler": inductor_compiler(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
        "candidates": sorted(candidates),
        "selection_version": _SELECTION_VERSION,
    }


def _signature_key(signature: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]


class ChoiceCache:
    """Runtime choices per bundle (DeviceUID) and machine, in one small JSON file.

    Layout: ``{"format": 1, "choices": {device_uid: {machine_key: record}}}``
    where ``machine_key`` hashes :func:`machine_signature` and ``record``
    holds ``mode``, ``machine`` (the signature), ``bundle`` (name and
    version), ``chosen_at`` and ``selection`` (the table). A record for
    another machine or another DeviceUID is never used. Writes are atomic
    (temporary file, fsync, rename) under an advisory lock, so two workers
    never interleave; an unreadable file is treated as empty and rewritten.

    Parameters
    ----------
    path : path-like
        The JSON file (``<state_dir>/runtime-choices.json``).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"format": _CACHE_FORMAT, "choices": {}}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.warning("runtime.cache_unreadable", path=str(self.path), error=type(exc).__name__)
            return {"format": _CACHE_FORMAT, "choices": {}}
        if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT or not isinstance(data.get("choices"), dict):
            log.warning("runtime.cache_unreadable", path=str(self.path), error="unknown layout")
            return {"format": _CACHE_FORMAT, "choices": {}}
        return data

    def get(self, device_uid: str, signature: Mapping[str, Any]) -> dict[str, Any] | None:
        """The record for this bundle on this machine, or None."""
        record = self._read()["choices"].get(device_uid, {})
        found = record.get(_signature_key(signature)) if isinstance(record, dict) else None
        if not isinstance(found, dict) or found.get("mode") not in MODES or found.get("machine") != dict(signature):
            return None
        return found

    def put(self, device_uid: str, signature: Mapping[str, Any], record: Mapping[str, Any]) -> bool:
        """Store a record; False (and a warning) when the file cannot be written."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                data = self._read()
                choices: dict[str, Any] = data["choices"]
                machines = choices.get(device_uid)
                if not isinstance(machines, dict):
                    machines = {}
                machines[_signature_key(signature)] = {**record, "machine": dict(signature)}
                choices[device_uid] = dict(_newest(machines, _MAX_MACHINES_PER_BUNDLE))
                newest_bundles = sorted(
                    choices, key=lambda uid: max((_stamp(r) for r in choices[uid].values()), default=""), reverse=True
                )
                data["choices"] = {uid: choices[uid] for uid in newest_bundles[:_MAX_BUNDLES]}
                self._write(data)
        except OSError as exc:
            log.warning("runtime.cache_unwritable", path=str(self.path), error=type(exc).__name__)
            return False
        return True

    def _write(self, data: Mapping[str, Any]) -> None:
        write_json(self.path, data)


def _stamp(record: Any) -> str:
    return str(record.get("chosen_at", "")) if isinstance(record, dict) else ""


def _newest(records: Mapping[str, Any], keep: int) -> list[tuple[str, Any]]:
    return sorted(records.items(), key=lambda item: _stamp(item[1]), reverse=True)[:keep]


# ---------------------------------------------------------------------------
# Bundles
# ---------------------------------------------------------------------------


def bundle_calibration(folder: str | os.PathLike[str], clip_frames: int, size: int) -> tuple[torch.Tensor, str]:
    """A bundle's calibration clips, or synthetic ones with a warning.

    Returns
    -------
    clips : torch.Tensor
        ``(N, 3, clip_frames, size, size)`` float32 in [0, 1], before the
        bundle's normalisation.
    source : str
        The stored source, or ``"synthetic (...)"`` saying why.
    """
    try:
        clips, source = read_calibration(folder, clip_frames, size)
        return torch.from_numpy(clips), source
    except FileNotFoundError:
        reason = "the bundle has no calibration clips"
        log.warning("runtime.calibration_synthetic", bundle=str(folder), reason=reason)
    except CalibrationError as exc:
        reason = str(exc)
        log.warning("runtime.calibration_synthetic", bundle=str(folder), reason=reason)
    clips_t = synthetic_clips(DEFAULT_CALIBRATION_CLIPS, clip_frames, size)
    return clips_t, f"synthetic ({reason}; echo-like clips drawn at load)"


def runtime_for_bundle(
    model: nn.Module,
    *,
    folder: str | os.PathLike[str],
    device_uid: str,
    label: str,
    clip_frames: int,
    frame_size: int,
    threshold: float,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    mode: str = "auto",
    state_dir: str | os.PathLike[str] | None = None,
) -> InferenceRuntime:
    """The runtime a loaded bundle predicts with.

    Parameters
    ----------
    model : torch.nn.Module
        The bundle's eval-mode network on its device.
    folder : path-like
        The bundle folder (read only: its ``calibration.npz``).
    device_uid, label : str
        The bundle's DeviceUID (cache key, logs) and ``name version`` (logs).
    clip_frames, frame_size : int
        The clip shape.
    threshold : float
        The bundle's decision threshold (binary bundles).
    normalise : callable
        The bundle's input normalisation (applied to the calibration clips).
    mode : str, optional
        A mode of :data:`echonode.bundles.runtime.MODES` other than ``eager``.
    state_dir : path-like, optional
        Where the choice is cached (``runtime-choices.json``) and OpenVINO
        and inductor keep their files; without one nothing is cached and
        every load measures.

    Returns
    -------
    InferenceRuntime
    """
    started = time.perf_counter()
    device = next(iter(model.parameters())).device
    raw, source = bundle_calibration(folder, clip_frames, frame_size)
    calibration = normalise(raw).to(device)
    if mode != "auto" or device.type != "cpu":
        return optimise_for_inference(
            model, calibration[:DEFAULT_BATCH], mode, calibration=calibration, threshold=threshold, state_dir=state_dir
        )
    candidates = auto_candidates()
    signature = machine_signature(candidates)
    cache = ChoiceCache(Path(state_dir) / CACHE_FILE) if state_dir is not None else None
    if cache is not None:
        record = cache.get(device_uid, signature)
        if record is not None:
            runtime = _from_record(model, record, calibration, threshold, state_dir, device_uid, started)
            if runtime is not None:
                return runtime
    selection, built = select_runtime(
        model, calibration, builders_for(candidates, model, calibration, state_dir=state_dir), threshold=threshold
    )
    selection.calibration_source = source
    _log_selection(selection, device_uid, label)
    if cache is not None:
        cache.put(device_uid, signature, {
            "mode": selection.chosen,
            "bundle": label,
            "chosen_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "selection": selection.describe(),
        })  # fmt: skip
    return runtime_from(model, selection, built, started=started)


def _from_record(
    model: nn.Module,
    record: Mapping[str, Any],
    calibration: torch.Tensor,
    threshold: float,
    state_dir: str | os.PathLike[str] | None,
    device_uid: str,
    started: float,
) -> InferenceRuntime | None:
    """Build a cached choice and check it on one batch; None sends the caller back to measuring."""
    mode = str(record["mode"])
    described = dict(record.get("selection") or {})
    described["cached"] = True
    runtime = InferenceRuntime(mode="eager", requested="auto", model=model, fn=model, selection=described)
    if mode != "eager":
        check = calibration[:DEFAULT_BATCH]
        try:
            fn = build_mode(mode, model, check, calibration=calibration, state_dir=state_dir)
            with torch.inference_mode():
                diff, outside, _ = compare(model(check), fn(check), threshold=threshold)
        except Exception as exc:  # noqa: BLE001 - measure again rather than fail the bundle
            log.warning("runtime.cached_choice_failed", device_uid=device_uid, mode=mode, error=describe_error(exc))
            return None
        if not diff <= DEFAULT_TOLERANCE or outside:
            log.warning("runtime.cached_choice_failed", device_uid=device_uid, mode=mode,
                        error=f"check: max probability difference {diff:.3g}, {outside} flip(s)")  # fmt: skip
            return None
        runtime.mode, runtime.fn, runtime.max_abs_diff = mode, fn, diff
    runtime.build_seconds = time.perf_counter() - started
    log.info("runtime.selected", device_uid=device_uid, mode=mode, cached=True,
             chosen_at=record.get("chosen_at"), seconds=round(runtime.build_seconds, 2))  # fmt: skip
    return runtime


def _log_selection(selection: Selection, device_uid: str, label: str) -> None:
    for row in selection.rows():
        log.info("runtime.candidate", device_uid=device_uid, **row)
    log.info(
        "runtime.selected",
        device_uid=device_uid,
        bundle=label,
        mode=selection.chosen,
        cached=False,
        calibration=selection.calibration_source,
        clips=selection.clips,
        measure_s=round(selection.measure_s, 2),
        build_s=round(selection.build_s, 2),
        table="\n" + selection.table(),
    )
