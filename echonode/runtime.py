"""Faster inference for the video networks, with a safe fallback to eager torch.

:func:`optimise_for_inference` takes a network in eval mode (what
:func:`echonode.bundle.load_bundle` builds) and returns an
:class:`InferenceRuntime`: a callable ``runtime(clips) -> float32 logits``
that stands in for ``model(clips)``. Modes (``docs/benchmarks.md``,
"Inference", has the measurements behind them):

``eager``
    The network as it is (the reference).
``jit``
    ``torch.jit.trace`` + ``torch.jit.freeze`` (BatchNorm folded into the
    convolutions) + ``torch.jit.optimize_for_inference`` (oneDNN weight
    prepacking). fp32, same numbers to ~1e-7.
``bf16``
    CPU autocast to bfloat16 with ``channels_last_3d`` weights and inputs:
    oneDNN's bf16 convolutions. Only chosen by ``auto`` on a CPU with native
    bf16 instructions (AVX512-BF16 / AMX); elsewhere bf16 is emulated and
    slower than fp32.
``int8``
    FX graph-mode post-training static quantisation (``torch.ao.quantization``
    ``quantize_fx``, x86/fbgemm backend: quantized Conv3d with BatchNorm and
    ReLU fused, quantized add+ReLU for the residuals; per-channel weights,
    histogram-calibrated activations), then traced and frozen. Calibrated on
    ``calibration`` clips when given, else on deterministic synthetic
    echo-like clips (:func:`synthetic_clips`), so the same bundle always
    gives the same numbers.
``auto``
    ``bf16`` (native bf16 CPUs only), then ``jit``, then ``eager``: the first
    that builds and passes the self-check. ``int8`` is *not* in ``auto``: it
    is about 4x eager on an AVX512-VNNI CPU but moves the outputs about ten
    times more than bf16 does (docs/benchmarks.md, "Inference"); ask for it
    explicitly, per bundle, after checking that bundle's AUROC under int8.
``cuda``
    For a network on a GPU: ``channels_last_3d``, ``cudnn.benchmark`` and
    autocast (bf16 where supported, else fp16). **Unmeasured**: no GPU was
    available when this module was written. ``auto`` picks it for a CUDA
    network.

Every optimised mode is *checked* before it is used: its output on a check
batch (the example, plus calibration clips) is compared with the eager
network's, as probabilities (sigmoid for one output, softmax otherwise). A
mode that raises while building or running, or whose probabilities differ by
more than its tolerance (:data:`TOLERANCES`), is dropped for the next one, and
the reason is kept in :attr:`InferenceRuntime.fallbacks`; ``eager`` always
remains. A runtime that fails at *call* time (an unexpected input shape a
traced graph cannot take, say) answers that call, and every later one, with
the eager network.

Side effects: ``int8`` sets ``torch.backends.quantized.engine`` (process-wide)
to the x86 engine; ``cuda`` sets ``torch.backends.cudnn.benchmark``. The
number of threads is never changed here.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "MODES",
    "TOLERANCES",
    "InferenceRuntime",
    "cpu_has_native_bf16",
    "optimise_for_inference",
    "synthetic_clips",
]

log = logging.getLogger(__name__)

#: Modes :func:`optimise_for_inference` accepts.
MODES: tuple[str, ...] = ("auto", "eager", "jit", "bf16", "int8", "cuda")

#: Largest accepted |probability - eager probability| on the check batch
#: (two clips). A mode over its bound is dropped for the next one.
TOLERANCES: dict[str, float] = {"jit": 1e-4, "bf16": 0.02, "int8": 0.05, "cuda": 0.02}

# The order ``auto`` tries on a CPU (bf16 only where native).
_CPU_AUTO_ORDER: tuple[str, ...] = ("bf16", "jit")


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 natively here (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def synthetic_clips(
    n: int, frames: int, size: int, *, seed: int = 0, channels: int = 3
) -> torch.Tensor:
    """Deterministic echo-like clips for int8 calibration and self-checks.

    Each clip is a fan-shaped sector on black (as after the node's sector
    mask), filled with multiplicative speckle, with bright walls and a dark
    chamber that beat through the clip, per-clip min-max normalised to
    [0, 1] like :func:`echonode.preprocess.make_eval_clips`. Nothing here
    is meant to look like a real heart; it gives activations the value
    ranges real clips give (bright specular walls, dark blood pools, a hard
    sector edge, speckle).

    Parameters
    ----------
    n, frames, size : int
        Clips, frames per clip, side in pixels.
    seed : int, optional
        The same seed gives the same clips.
    channels : int, optional
        The grey frame is repeated to this many channels.

    Returns
    -------
    torch.Tensor
        ``(n, channels, frames, size, size)`` float32 in [0, 1].
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    out = np.empty((n, channels, frames, size, size), dtype=np.float32)
    for i in range(n):
        apex_x = 0.5 + rng.uniform(-0.05, 0.05)
        half_angle = np.deg2rad(rng.uniform(30, 45))
        r = np.hypot(xx - apex_x, yy + 0.02)
        theta = np.arctan2(xx - apex_x, yy + 0.02)
        sector = (np.abs(theta) < half_angle) & (r < rng.uniform(0.9, 1.05))
        gain = rng.uniform(0.5, 1.0)
        cx, cy = rng.uniform(0.35, 0.65), rng.uniform(0.4, 0.65)
        rx, ry = rng.uniform(0.12, 0.22), rng.uniform(0.08, 0.16)
        wall = rng.uniform(0.03, 0.08)
        rate = rng.uniform(0.5, 1.5)
        phase = rng.uniform(0, 2 * np.pi)
        clip = np.empty((frames, size, size), dtype=np.float32)
        for t in range(frames):
            beat = 1.0 + 0.15 * np.sin(phase + 2 * np.pi * rate * t / max(frames, 1))
            d = np.hypot((xx - cx) / (rx * beat), (yy - cy) / (ry * beat))
            tissue = 0.35 + 0.15 * rng.random((size, size), dtype=np.float32)
            tissue = np.where(d < 1.0, 0.05, tissue)  # chamber: blood is dark
            tissue = np.where(np.abs(d - 1.0 - wall * 4) < wall * 4, 0.9, tissue)  # walls: bright
            speckle = rng.rayleigh(0.6, (size, size)).astype(np.float32)
            clip[t] = np.where(sector, gain * tissue * speckle, 0.0)
        lo, hi = float(clip.min()), float(clip.max())
        clip = (clip - lo) / (hi - lo) if hi > lo else np.zeros_like(clip)
        out[i] = clip[None]
    return torch.from_numpy(out)


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if logits.ndim == 2 and logits.shape[1] > 1:
        return torch.softmax(logits, dim=1)
    return torch.sigmoid(logits)


@dataclass
class InferenceRuntime:
    """A callable replacing ``model(clips)`` in inference.

    Attributes
    ----------
    mode : str
        The mode in use (``eager`` after a fallback).
    requested : str
        The mode asked for.
    fallbacks : list of str
        ``"mode: reason"`` for each mode tried and dropped, in order.
    max_abs_diff : float or None
        The self-check's largest probability difference from eager.
    build_seconds : float
        Time spent building and checking.
    """

    mode: str
    requested: str
    model: nn.Module
    fn: Callable[[torch.Tensor], torch.Tensor]
    fallbacks: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    build_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_outputs)`` as float32, under ``inference_mode``."""
        with torch.inference_mode():
            if self.mode != "eager":
                try:
                    return self.fn(clips).float()
                except Exception as exc:  # noqa: BLE001 - never fail inference for speed
                    with self._lock:
                        if self.mode != "eager":
                            reason = f"{self.mode}: failed at run time ({type(exc).__name__}: {str(exc)[:200]})"
                            log.warning("runtime fell back to eager: %s", reason)
                            self.fallbacks.append(reason)
                            self.mode = "eager"
                            self.fn = self.model
            return self.model(clips).float()

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (for status pages and logs)."""
        return {
            "mode": self.mode,
            "requested": self.requested,
            "fallbacks": list(self.fallbacks),
            "max_abs_diff": self.max_abs_diff,
            "build_seconds": round(self.build_seconds, 3),
        }


# ---------------------------------------------------------------------------
# Builders: each returns a callable clips -> logits, or raises.
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Any:
    # torch.jit and torch.ao.quantization warn about their own deprecation
    # and about tracing details that do not apply to this network.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _build_jit(model: nn.Module, example: torch.Tensor, **_: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
        frozen = torch.jit.freeze(traced)
        return torch.jit.optimize_for_inference(frozen)


def _build_bf16(model: nn.Module, example: torch.Tensor, **_: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    net = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)

    def run(clips: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net(clips.contiguous(memory_format=torch.channels_last_3d))

    return run


def _quant_engine() -> str:
    engines = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm"):
        if name in engines:
            return name
    raise RuntimeError(f"no x86/fbgemm quantized engine in this torch (have {engines})")


def _build_int8(
    model: nn.Module, example: torch.Tensor, *, calibration: torch.Tensor, batch_size: int = 4, **_: Any
) -> Callable[[torch.Tensor], torch.Tensor]:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engine = _quant_engine()
    torch.backends.quantized.engine = engine
    with _quiet(), torch.no_grad():
        net = copy.deepcopy(model).eval()
        prepared = prepare_fx(net, get_default_qconfig_mapping(engine), (example[:1],))
        for start in range(0, calibration.shape[0], batch_size):
            prepared(calibration[start : start + batch_size])
        quantised = convert_fx(prepared)
        traced = torch.jit.freeze(torch.jit.trace(quantised, example, check_trace=False))
    return traced


def _build_cuda(model: nn.Module, example: torch.Tensor, **_: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    # UNMEASURED: written for a GPU node, never timed (no GPU was available).
    torch.backends.cudnn.benchmark = True
    net = model.to(memory_format=torch.channels_last_3d)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def run(clips: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type="cuda", dtype=dtype):
            return net(clips.contiguous(memory_format=torch.channels_last_3d))

    return run


_BUILDERS: dict[str, Callable[..., Callable[[torch.Tensor], torch.Tensor]]] = {
    "jit": _build_jit,
    "bf16": _build_bf16,
    "int8": _build_int8,
    "cuda": _build_cuda,
}


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def optimise_for_inference(
    model: nn.Module,
    example: torch.Tensor,
    mode: str = "auto",
    *,
    calibration: torch.Tensor | None = None,
    normalise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    n_calibration: int = 16,
    tolerance: float | None = None,
    order: Sequence[str] | None = None,
) -> InferenceRuntime:
    """Build the fastest checked runtime for ``model``; never raises for speed's sake.

    Parameters
    ----------
    model : torch.nn.Module
        A network in eval mode, gradients off (a bundle's ``model``). It is
        not modified (except ``cuda`` mode, which converts it to
        ``channels_last_3d`` in place; numerically the same network).
    example : torch.Tensor
        ``(B, 3, T, H, W)`` input of the shape the runtime will see, already
        normalised as the network expects; ``B`` may differ at call time.
        ``synthetic_clips(2, T, H)`` suits.
    mode : str, optional
        One of :data:`MODES`.
    calibration : torch.Tensor, optional
        Clips for int8 calibration, normalised like ``example``. Default:
        ``n_calibration`` :func:`synthetic_clips` of ``example``'s shape,
        passed through ``normalise``.
    normalise : callable, optional
        Applied to the default synthetic clips (e.g. the bundle's Kinetics
        normalisation); identity when omitted.
    n_calibration : int, optional
        Synthetic calibration clips when ``calibration`` is omitted.
    tolerance : float, optional
        Override :data:`TOLERANCES` for the self-check.
    order : sequence of str, optional
        Modes ``auto`` tries, in order (default: bf16 on native-bf16 CPUs,
        then jit).

    Returns
    -------
    InferenceRuntime
        Whose :attr:`~InferenceRuntime.mode` says what was chosen.

    Raises
    ------
    ValueError
        For an unknown ``mode`` or a malformed ``example`` (a caller's bug,
        not a runtime failure).
    """
    if mode not in MODES:
        raise ValueError(f'Argument "mode" must be one of {", ".join(MODES)}; got {mode!r}.')
    if not isinstance(example, torch.Tensor) or example.ndim != 5 or example.shape[0] < 1:
        raise ValueError('Argument "example" must be a (B, C, T, H, W) tensor with B >= 1.')
    started = time.perf_counter()
    device = _device_of(model)
    example = example.to(device=device, dtype=torch.float32)
    if device.type == "cuda":
        candidates = ["cuda"] if mode in ("auto", "cuda") else ([] if mode == "eager" else [mode])
    elif mode == "auto":
        candidates = list(order) if order is not None else [
            m for m in _CPU_AUTO_ORDER if m != "bf16" or cpu_has_native_bf16()
        ]
    elif mode == "eager":
        candidates = []
    else:
        candidates = [mode]

    runtime = InferenceRuntime(mode="eager", requested=mode, model=model, fn=model)
    if candidates:
        if calibration is None:
            _, c, t, h, w = example.shape
            if h != w:
                raise ValueError('Argument "example" must have square frames (H == W).')
            n = n_calibration if "int8" in candidates else 1  # else only the self-check uses it
            calibration = synthetic_clips(n, t, h, seed=0, channels=c)
            if normalise is not None:
                calibration = normalise(calibration)
        calibration = calibration.to(device=device, dtype=torch.float32)
        # Self-check on one example clip and one calibration clip, run as a
        # batch of two and a batch of one, so that a graph specialised to
        # the example's batch size is caught too. Cheap: 2 eager clips.
        check = torch.cat([example[:1], calibration[:1]])
        with torch.inference_mode():
            reference = _probabilities(model(check))
        for name in candidates:
            try:
                if name == "cuda" and device.type != "cuda":
                    raise RuntimeError("the network is not on a CUDA device")
                if name != "cuda" and device.type != "cpu":
                    raise RuntimeError(f"mode {name} is for CPU networks")
                with torch.inference_mode(False):
                    fn = _BUILDERS[name](model, example, calibration=calibration)
                with torch.inference_mode():
                    got = _probabilities(fn(check))
                    got_one = _probabilities(fn(check[:1]))
                diff = max(
                    float((got - reference).abs().max()), float((got_one - reference[:1]).abs().max())
                )
                limit = TOLERANCES[name] if tolerance is None else float(tolerance)
                if not diff <= limit:  # also catches NaN
                    raise RuntimeError(f"self-check: probabilities differ from eager by {diff:.3g} > {limit:g}")
            except Exception as exc:  # noqa: BLE001 - any failure means: try the next mode
                reason = f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                log.info("runtime mode dropped: %s", reason)
                runtime.fallbacks.append(reason)
                continue
            runtime.mode, runtime.fn, runtime.max_abs_diff = name, fn, diff
            break
    runtime.build_seconds = time.perf_counter() - started
    return runtime
