"""Faster inference for the video networks, with a safe fallback to eager torch.

:func:`optimise_for_inference` takes a network in eval mode (what
:func:`echonode.bundles.weights.load_bundle` builds) and returns an
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
    oneDNN's bf16 convolutions. A candidate of ``auto`` only on a CPU with
    native bf16 instructions (AVX512-BF16 / AMX); elsewhere bf16 is emulated
    and slower than fp32. Native is not always faster: without AMX it can
    run below eager fp32, which is why ``auto`` measures.
``int8``
    FX graph-mode post-training static quantisation (``torch.ao.quantization``
    ``quantize_fx``, x86/fbgemm backend: quantized Conv3d with BatchNorm and
    ReLU fused, quantized add+ReLU for the residuals; per-channel weights,
    histogram-calibrated activations), then traced and frozen. Calibrated on
    ``calibration`` clips when given, else on deterministic synthetic
    echo-like clips (:func:`synthetic_clips`), so the same bundle always
    gives the same numbers. A candidate of ``auto`` like the others: it is
    kept only where it passes the same accuracy rule.
``compile`` / ``compile_bf16``
    ``torch.compile`` (inductor, static shapes, ``freezing``: weights
    folded and prepacked) of the eager network, fp32 or under bf16 autocast
    with ``channels_last_3d``. Needs the C++ compiler inductor uses
    (:func:`inductor_compiler`). Static shapes: the graph is compiled for
    the example's batch size and every call is run in chunks of that size
    (the last chunk zero-padded), so a new batch size never recompiles. The
    compile (tens of seconds at width 64) is paid when the runtime is built,
    once per process, never in a study.
``openvino`` / ``openvino_bf16``
    The network converted to OpenVINO (``openvino.convert_model``, batch
    dimension dynamic) and compiled for its CPU plugin with an explicit
    inference precision (``f32`` / ``bf16``), one stream and the thread
    count torch uses. Only where the optional ``openvino`` package is
    installed (``pip install echonode[openvino]``); its telemetry is off
    and it writes nothing outside the node's state directory
    (:func:`openvino_home`).
``auto``
    Chosen by measurement (:mod:`echonode.bundles.runtime_select`): every candidate
    the machine supports is built, checked against eager fp32 on
    calibration clips and timed, interleaved; the fastest that passes wins,
    eager when none is faster. :func:`echonode.bundles.runtime_select.runtime_for_bundle`
    does this for a bundle, on the clips stored with it, and caches the
    choice.
``cuda``
    For a network on a GPU: ``channels_last_3d``, ``cudnn.benchmark`` and
    autocast (bf16 where supported, else fp16). **Unmeasured**: no GPU was
    available when this module was written. ``auto`` picks it for a CUDA
    network.

A mode asked for by name is *checked* before it is used: its output on a check
batch (the example, plus calibration clips) is compared with the eager
network's, as probabilities (sigmoid for one output, softmax otherwise). A
mode that raises while building or running, or whose probabilities differ by
more than its tolerance (:data:`TOLERANCES`), is dropped for the next one, and
the reason is kept in :attr:`InferenceRuntime.fallbacks`; ``eager`` always
remains. A runtime that fails at *call* time (an unexpected input shape a
traced graph cannot take, say) answers that call, and every later one, with
the eager network.

Side effects: ``int8`` sets ``torch.backends.quantized.engine`` (process-wide)
to the x86 engine; ``cuda`` sets ``torch.backends.cudnn.benchmark``;
``compile`` points inductor's cache (``TORCHINDUCTOR_CACHE_DIR``) into the
state directory when one is given and the operator has not set it;
``openvino`` points ``HOME`` at the state directory while OpenVINO is
imported and converts (:func:`openvino_home`). The number of threads is
never changed here.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

__all__ = [
    "MODES",
    "TOLERANCES",
    "InferenceRuntime",
    "cpu_has_native_bf16",
    "inductor_compiler",
    "openvino_home",
    "openvino_version",
    "optimise_for_inference",
    "probabilities",
    "synthetic_clips",
]

log = logging.getLogger(__name__)

#: Modes :func:`optimise_for_inference` accepts.
MODES: tuple[str, ...] = (
    "auto",
    "eager",
    "jit",
    "bf16",
    "int8",
    "compile",
    "compile_bf16",
    "openvino",
    "openvino_bf16",
    "cuda",
)

#: Largest accepted |probability - eager probability| on the check batch
#: (two clips) of a mode asked for by name; over it, the mode falls back to
#: eager. ``auto`` has its own rule (:mod:`echonode.bundles.runtime_select`).
TOLERANCES: dict[str, float] = {
    "jit": 1e-4,
    "bf16": 0.03,
    "int8": 0.05,
    "compile": 1e-3,
    "compile_bf16": 0.03,
    "openvino": 1e-3,
    "openvino_bf16": 0.03,
    "cuda": 0.02,
}


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 natively here (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def inductor_compiler() -> str | None:
    """The C++ compiler torch.compile's inductor would use here, or None.

    Inductor tries the entries of ``torch._inductor.config.cpp.cxx`` in turn
    (``$CXX`` or ``g++`` on Linux; ``None`` stands for a conda download that
    is off unless ``TORCH_INDUCTOR_INSTALL_GXX`` is set); this looks each
    name up on ``PATH`` without running anything.
    """
    try:
        # Late: importing inductor takes about 4 s, paid only where compile is asked for or measured.
        from torch._inductor import config as inductor_config
    except Exception:  # noqa: BLE001 - a torch build without inductor
        return None
    names = inductor_config.cpp.cxx
    for name in names if isinstance(names, (list, tuple)) else (names,):
        if isinstance(name, str) and name:
            found = shutil.which(name)
            if found:
                return found
    return None


def openvino_version() -> str | None:
    """The installed ``openvino`` package's version, or None; never imports it.

    Importing OpenVINO starts its telemetry (:func:`openvino_home`), so
    availability is read from the package metadata instead.
    """
    if importlib.util.find_spec("openvino") is None:
        return None
    try:
        return importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:
        return None


_HOME_LOCK = threading.Lock()
#: Where OpenVINO's telemetry looks for its consent file, under its HOME.
_OPENVINO_CONSENT = Path("intel") / "openvino_telemetry"


@contextlib.contextmanager
def openvino_home(state_dir: str | os.PathLike[str] | None) -> Any:
    """Import and use OpenVINO's converter with its telemetry off.

    ``import openvino`` (and every ``convert_model``) initialises Intel's
    telemetry, which, without a recorded decision, *opts in*: it creates
    ``~/intel/openvino_ga_cid`` and ``~/intel/stats`` and queues usage events.
    Its supported opt-out is the consent file ``$HOME/intel/openvino_telemetry``
    holding ``0`` (what ``opt_in_out --opt_out`` writes). This context
    writes that file under ``<state_dir>/openvino/`` and points ``HOME``
    there while it is open, so the decision is read from the node's state
    directory and nothing is written in the real home. ``HOME`` is restored
    on exit. Without a state directory a private temporary folder is used
    and removed.

    ``HOME`` is process-wide: code in other threads that reads it while this
    is open sees the state folder. The worker loads bundles before it
    serves, so nothing else runs then; the lock serialises this module's
    own users.
    """
    temporary = state_dir is None
    base = Path(tempfile.mkdtemp(prefix="echonode-openvino-")) if state_dir is None else Path(state_dir) / "openvino"
    try:
        consent = base / _OPENVINO_CONSENT
        consent.parent.mkdir(parents=True, exist_ok=True)
        if not consent.is_file() or consent.read_text(encoding="ascii", errors="replace").strip() != "0":
            consent.write_text("0", encoding="ascii")
        with _HOME_LOCK:
            previous = os.environ.get("HOME")
            os.environ["HOME"] = str(base)
            try:
                yield base
            finally:
                if previous is None:
                    os.environ.pop("HOME", None)
                else:
                    os.environ["HOME"] = previous
    finally:
        if temporary:
            shutil.rmtree(base, ignore_errors=True)


def synthetic_clips(
    n: int, frames: int, size: int, *, seed: int = 0, channels: int = 3
) -> torch.Tensor:
    """Deterministic echo-like clips for int8 calibration and self-checks.

    Each clip is a fan-shaped sector on black (as after the node's sector
    mask), filled with multiplicative speckle, with bright walls and a dark
    chamber that beat through the clip, per-clip min-max normalised to
    [0, 1] like :func:`echonode.analyse.preprocess.make_eval_clips`. Nothing here
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


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Logits to probabilities: sigmoid for one output, softmax over several."""
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
        Time spent building and checking (for ``auto``: the whole selection,
        builds included).
    selection : dict or None
        For ``auto``: how the mode was chosen (``cached``, the table of
        candidates, the calibration clips' source); see
        :meth:`echonode.bundles.runtime_select.Selection.describe`.
    """

    mode: str
    requested: str
    model: nn.Module
    fn: Callable[[torch.Tensor], torch.Tensor]
    fallbacks: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    build_seconds: float = 0.0
    selection: dict[str, Any] | None = None
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
            **({"selection": self.selection} if self.selection is not None else {}),
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
    # Module.to takes memory_format at run time; torch's overloads leave it out.
    net = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # see above

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
    net = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # as in _build_bf16
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def run(clips: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type="cuda", dtype=dtype):
            return net(clips.contiguous(memory_format=torch.channels_last_3d))

    return run


def _in_fixed_batches(
    step: Callable[[torch.Tensor], torch.Tensor], clips: torch.Tensor, batch: int
) -> torch.Tensor:
    """Run ``step`` on chunks of exactly ``batch`` clips (the last zero-padded)."""
    outputs = []
    for start in range(0, clips.shape[0], batch):
        chunk = clips[start : start + batch]
        n = chunk.shape[0]
        if n < batch:
            pad = chunk.new_zeros((batch - n, *chunk.shape[1:]))
            chunk = torch.cat([chunk, pad])
        outputs.append(step(chunk)[:n])
    return torch.cat(outputs)


def _use_state_dir_for_inductor(state_dir: str | os.PathLike[str] | None) -> None:
    """Point inductor's cache into the state directory unless the operator chose one.

    Inductor keeps generated code and compiled kernels in a cache folder
    (default ``/tmp/torchinductor_<user>``); in the state directory it stays
    with the node's other state and lets a restart reuse the kernels.
    Importing ``torch._inductor.config`` already writes the default into
    ``TORCHINDUCTOR_CACHE_DIR``, so the default value counts as unset.
    """
    if state_dir is None:
        return
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        # Late: importing inductor takes about 4 s (see inductor_compiler).
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        default: str | None = os.path.abspath(default_cache_dir())
    except Exception:  # noqa: BLE001 - a torch without that helper: only an unset variable counts
        default = None
    if current is None or (default is not None and os.path.abspath(current) == default):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(state_dir).absolute() / "inductor")


def _build_compile(
    model: nn.Module,
    example: torch.Tensor,
    *,
    bf16: bool = False,
    state_dir: str | os.PathLike[str] | None = None,
    **_: Any,
) -> Callable[[torch.Tensor], torch.Tensor]:
    if inductor_compiler() is None:
        raise RuntimeError("no C++ compiler for torch.compile (inductor looks for $CXX or g++)")
    _use_state_dir_for_inductor(state_dir)
    net = copy.deepcopy(model)
    if bf16:
        net = net.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # torch's stubs lack it
    # Static shapes (dynamic=False): one graph for the example's batch size;
    # freezing folds BatchNorm and prepacks the weights, as jit's freeze does.
    compiled = torch.compile(net, dynamic=False, options={"freezing": True})
    batch = int(example.shape[0])

    def step(x: torch.Tensor) -> torch.Tensor:
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return compiled(x.contiguous(memory_format=torch.channels_last_3d))
        return compiled(x)

    def run(clips: torch.Tensor) -> torch.Tensor:
        return _in_fixed_batches(step, clips, batch)

    # torch.compile is lazy: compile now, at load, not in the first study.
    with _quiet(), torch.inference_mode():
        run(example)
    return run


def _build_compile_bf16(model: nn.Module, example: torch.Tensor, **kwargs: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    return _build_compile(model, example, **{**kwargs, "bf16": True})


def _build_openvino(
    model: nn.Module,
    example: torch.Tensor,
    *,
    bf16: bool = False,
    state_dir: str | os.PathLike[str] | None = None,
    **_: Any,
) -> Callable[[torch.Tensor], torch.Tensor]:
    if openvino_version() is None:
        raise RuntimeError("openvino is not installed (pip install echonode[openvino])")
    with openvino_home(state_dir), _quiet():
        # Late: an optional extra, and its telemetry must be off before it is imported.
        import openvino as ov

        _batch, c, t, h, w = example.shape
        # Batch dynamic: any batch size runs without converting again.
        converted = ov.convert_model(model, example_input=example[:1], input=[(-1, int(c), int(t), int(h), int(w))])
    core = ov.Core()
    if bf16 and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise RuntimeError("OpenVINO's CPU plugin has no native bf16 on this CPU")
    compiled = core.compile_model(
        converted,
        "CPU",
        {
            # Explicit, so that the numbers do not depend on the plugin's
            # per-CPU default (bf16 on AMX machines, f32 elsewhere).
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
            "INFERENCE_NUM_THREADS": max(1, torch.get_num_threads()),
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
        },
    )
    request = compiled.create_infer_request()
    lock = threading.Lock()  # one infer request: one call at a time

    def run(clips: torch.Tensor) -> torch.Tensor:
        array = clips.detach().to("cpu", torch.float32).contiguous().numpy()
        with lock:
            result = request.infer([array])
            logits = np.array(result[0], dtype=np.float32, copy=True)
        return torch.from_numpy(logits)

    return run


def _build_openvino_bf16(model: nn.Module, example: torch.Tensor, **kwargs: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    return _build_openvino(model, example, **{**kwargs, "bf16": True})


_BUILDERS: dict[str, Callable[..., Callable[[torch.Tensor], torch.Tensor]]] = {
    "jit": _build_jit,
    "bf16": _build_bf16,
    "int8": _build_int8,
    "compile": _build_compile,
    "compile_bf16": _build_compile_bf16,
    "openvino": _build_openvino,
    "openvino_bf16": _build_openvino_bf16,
    "cuda": _build_cuda,
}


def build_mode(
    name: str,
    model: nn.Module,
    example: torch.Tensor,
    *,
    calibration: torch.Tensor,
    state_dir: str | os.PathLike[str] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Build one mode's forward (no check); raises when it cannot be built.

    Parameters
    ----------
    name : str
        A mode of :data:`MODES` other than ``auto`` and ``eager``.
    model : torch.nn.Module
        The eval-mode network (not modified).
    example : torch.Tensor
        Input of the shape the runtime will see (``compile`` compiles for
        its batch size).
    calibration : torch.Tensor
        Clips ``int8`` calibrates on.
    state_dir : path-like, optional
        The node's state directory (OpenVINO's consent file, inductor's
        cache).

    Returns
    -------
    callable
        ``clips -> logits``.
    """
    device = _device_of(model)
    if name == "cuda" and device.type != "cuda":
        raise RuntimeError("the network is not on a CUDA device")
    if name != "cuda" and device.type != "cpu":
        raise RuntimeError(f"mode {name} is for CPU networks")
    with torch.inference_mode(False):
        return _BUILDERS[name](model, example, calibration=calibration, state_dir=state_dir)


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
    threshold: float = 0.5,
    state_dir: str | os.PathLike[str] | None = None,
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
        Clips normalised like ``example``: what ``int8`` calibrates on and,
        for ``auto``, what every candidate is checked and timed on. Default:
        ``n_calibration`` :func:`synthetic_clips` of ``example``'s shape
        (8 for ``auto``), passed through ``normalise``.
    normalise : callable, optional
        Applied to the default synthetic clips (e.g. the bundle's Kinetics
        normalisation); identity when omitted.
    n_calibration : int, optional
        Synthetic calibration clips when ``calibration`` is omitted.
    tolerance : float, optional
        Override :data:`TOLERANCES` for the self-check of a named mode, or
        ``auto``'s largest accepted probability difference (0.03).
    order : sequence of str, optional
        The candidates ``auto`` measures besides eager (default: every mode
        this machine supports, :func:`echonode.bundles.runtime_select.auto_candidates`).
    threshold : float, optional
        The bundle's decision threshold (``auto``'s decision-flip rule).
    state_dir : path-like, optional
        The node's state directory (OpenVINO's consent file, inductor's
        cache); a private temporary folder for OpenVINO when omitted.

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
    elif mode == "eager":
        candidates = []
    elif mode == "auto":
        return _measured(model, example, calibration, normalise, tolerance, order, threshold, state_dir, started)
    else:
        candidates = [mode]

    runtime = InferenceRuntime(mode="eager", requested=mode, model=model, fn=model)
    if candidates:
        if calibration is None:
            n = n_calibration if "int8" in candidates else 1  # else only the self-check uses it
            calibration = _default_calibration(example, n, normalise)
        calibration = calibration.to(device=device, dtype=torch.float32)
        # Self-check on one example clip and one calibration clip, run as a
        # batch of two and a batch of one, so that a graph specialised to
        # the example's batch size is caught too. Cheap: 2 eager clips.
        check = torch.cat([example[:1], calibration[:1]])
        with torch.inference_mode():
            reference = probabilities(model(check))
        for name in candidates:
            try:
                fn = build_mode(name, model, example, calibration=calibration, state_dir=state_dir)
                with torch.inference_mode():
                    got = probabilities(fn(check))
                    got_one = probabilities(fn(check[:1]))
                diff = max(
                    float((got - reference).abs().max()), float((got_one - reference[:1]).abs().max())
                )
                limit = TOLERANCES[name] if tolerance is None else float(tolerance)
                if not diff <= limit:  # also catches NaN
                    raise RuntimeError(f"self-check: probabilities differ from eager by {diff:.3g} > {limit:g}")
            except Exception as exc:  # noqa: BLE001 - any failure means: try the next mode
                reason = f"{name}: {describe_error(exc)}"
                log.info("runtime mode dropped: %s", reason)
                runtime.fallbacks.append(reason)
                continue
            runtime.mode, runtime.fn, runtime.max_abs_diff = name, fn, diff
            break
    runtime.build_seconds = time.perf_counter() - started
    return runtime


def describe_error(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters of it)."""
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def _default_calibration(
    example: torch.Tensor, n: int, normalise: Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    _, c, t, h, w = example.shape
    if h != w:
        raise ValueError('Argument "example" must have square frames (H == W).')
    clips = synthetic_clips(n, t, h, seed=0, channels=c)
    return normalise(clips) if normalise is not None else clips


def _measured(
    model: nn.Module,
    example: torch.Tensor,
    calibration: torch.Tensor | None,
    normalise: Callable[[torch.Tensor], torch.Tensor] | None,
    tolerance: float | None,
    order: Sequence[str] | None,
    threshold: float,
    state_dir: str | os.PathLike[str] | None,
    started: float,
) -> InferenceRuntime:
    """``auto`` on a CPU network: every candidate measured, the fastest that passes kept."""
    # Late: runtime_select imports this module.
    from echonode.bundles import runtime_select

    if calibration is None:
        calibration = _default_calibration(example, runtime_select.DEFAULT_CALIBRATION_CLIPS, normalise)
        source = "synthetic"
    else:
        source = "given"
    calibration = calibration.to(device=example.device, dtype=torch.float32)
    candidates = list(order) if order is not None else runtime_select.auto_candidates()
    selection, built = runtime_select.select_runtime(
        model,
        calibration,
        runtime_select.builders_for(candidates, model, calibration, state_dir=state_dir),
        threshold=threshold,
        tolerance=runtime_select.DEFAULT_TOLERANCE if tolerance is None else float(tolerance),
    )
    selection.calibration_source = source
    return runtime_select.runtime_from(model, selection, built, started=started)
