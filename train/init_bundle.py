"""``echonode-train init``: a model bundle from existing weights, or random ones.

Three kinds of input are accepted (all read with ``weights_only=True``):

- a torchvision-format state dict (``stem.0.weight`` ... ``fc.weight``), such
  as the Kinetics-400 weights of ``r3d_18`` / ``r2plus1d_18``: a head whose
  shape does not fit the task (Kinetics has 400 outputs) is replaced by a new
  one, and Kinetics weights set the bundle's normalisation to ``kinetics``;
- a checkpoint of the original EchoCLR code: ``{"weights": state_dict,
  "optimizer": ...}`` whose keys are ``encoder.*`` (kept), ``projector.*`` and
  ``reordering_head.*`` (dropped); ``{"state_dict": ...}`` / ``{"model": ...}``
  wrappers and DDP ``module.`` prefixes are unwrapped;
- nothing: random weights, and the bundle is marked ``random_weights``.

A bundle whose head was not trained (random weights, or a new head on a
pretrained encoder) gives meaningless probabilities, so it is always marked
``random_weights: true``; it is a starting point for fine-tuning or a smoke
test, never a model to report with.

No training data is at hand here, so the bundle's ``calibration.npz`` (the
clips the node checks inference runtimes on, :mod:`echonode.bundles.calibration`)
holds synthetic echo-like clips (:func:`echonode.bundles.runtime.synthetic_clips`),
marked ``source: synthetic``; a fine-tuned bundle stores real ones.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from echonode.bundles.calibration import (
    CALIBRATION_FILE,
    DEFAULT_CALIBRATION_CLIPS,
    encode_calibration,
)
from echonode.bundles.manifest import (
    BINARY_TASKS,
    DEFAULT_PREPROCESSING,
    DEFAULT_VIEW_LABELS,
    TASKS,
    BundleError,
    BundleMeta,
)
from echonode.bundles.nets import ARCHITECTURES, NORMALISATIONS, build_model
from echonode.bundles.runtime import synthetic_clips
from echonode.bundles.weights import save_bundle, state_dict_problems
from train.provenance import code_revision

__all__ = ["InitError", "add_init_arguments", "extract_state_dict", "init_weights", "run_init"]

PROG = "echonode-train init"

# Keys under which training scripts commonly nest the state dict.
_WRAPPER_KEYS = ("state_dict", "model", "weights", "model_state_dict", "encoder_state_dict")
# Prefixes added by DistributedDataParallel / DataParallel and torch.compile.
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_KINETICS_CLASSES = 400


class InitError(Exception):
    """A user error: a file that is not usable weights, or bad arguments."""


def add_init_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``init`` sub-command's arguments to ``parser``.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The sub-command's parser.

    Returns
    -------
    argparse.ArgumentParser
        The same parser.
    """
    what = parser.add_argument_group("bundle")
    what.add_argument("--task", required=True, choices=TASKS, help="the task the bundle serves")
    what.add_argument("--out", required=True, type=Path, help="bundle folder to create")
    what.add_argument("--name", default=None, help="algorithm name (default: echoclr-TASK)")
    what.add_argument("--version", default="0", help="algorithm version (default: 0)")
    what.add_argument("--threshold", type=float, default=0.5, help="decision threshold on the probability")
    what.add_argument(
        "--labels",
        default=None,
        help=f"comma-separated view labels for --task view (default: {','.join(DEFAULT_VIEW_LABELS)})",
    )
    what.add_argument("--force", action="store_true", help="replace an existing bundle folder")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="torchvision-format state dict or EchoCLR checkpoint (default: random weights, smoke tests only)",
    )
    model.add_argument("--arch", choices=ARCHITECTURES, default="r3d_18", help="network (default: r3d_18)")
    model.add_argument("--width", type=int, default=64, help="base width; 64 is the published network")

    pre = parser.add_argument_group("preprocessing")
    pre.add_argument("--size", type=int, default=DEFAULT_PREPROCESSING["size"], help="frame side in pixels")
    pre.add_argument(
        "--clip-frames", type=int, default=DEFAULT_PREPROCESSING["clip_frames"], help="frames per clip"
    )
    pre.add_argument(
        "--normalisation",
        choices=NORMALISATIONS,
        default=None,
        help="input normalisation (default: kinetics for Kinetics-400 weights, else minmax)",
    )
    return parser


# ---------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------


def _has_tensors(obj: Mapping[Any, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) for v in obj.values())


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def extract_state_dict(obj: Any, *, source: str = "<weights>") -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Find the network weights in a loaded checkpoint.

    Parameters
    ----------
    obj : Any
        What ``torch.load(..., weights_only=True)`` returned.
    source : str, optional
        Named in error messages.

    Returns
    -------
    state : dict of str to torch.Tensor
        torchvision-format keys (wrappers and prefixes removed); may include
        ``fc.*``.
    kind : str
        ``"echoclr"`` (keys were under ``encoder.``) or ``"torchvision"``.
    dropped : list of str
        Keys left out (SSL projector and reordering head, ...).

    Raises
    ------
    InitError
        If no state dict can be found.
    """
    for _ in range(4):
        if not isinstance(obj, Mapping) or _has_tensors(obj):
            break
        nested = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping):
        raise InitError(f"{source}: holds a {type(obj).__name__}, not a state dict")
    if not _has_tensors(obj):
        raise InitError(
            f"{source}: no tensors found (looked under {', '.join(_WRAPPER_KEYS)}); not a state dict or checkpoint"
        )
    non_tensor = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)]
    if non_tensor:
        raise InitError(f"{source}: the state dict has non-tensor entries: {', '.join(non_tensor[:5])}")

    state = {_strip(k): v for k, v in obj.items()}
    dropped: list[str] = []
    if any(k.startswith("encoder.") for k in state):
        # EchoCLR: SimCLR(encoder=r3d_18 with fc=Identity, projector, reordering_head).
        kind = "echoclr"
        dropped = sorted(k for k in state if not k.startswith("encoder."))
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    else:
        kind = "torchvision"
    # The original fine-tuning code used fc = Sequential(Linear, Dropout).
    for part in ("weight", "bias"):
        if f"fc.0.{part}" in state and f"fc.{part}" not in state:
            state[f"fc.{part}"] = state.pop(f"fc.0.{part}")
    return state, kind, dropped


def _shape_hint(state: Mapping[str, torch.Tensor]) -> str:
    """Guess the architecture a state dict was made for, from its stem."""
    stem = state.get("stem.0.weight")
    if stem is None or stem.ndim != 5:
        return ""
    if tuple(stem.shape[2:]) == (3, 7, 7):
        return f" (these look like r3d_18 weights of width {stem.shape[0]})"
    if tuple(stem.shape[2:]) == (1, 7, 7) and isinstance(state.get("stem.3.weight"), torch.Tensor):
        return f" (these look like r2plus1d_18 weights of width {state['stem.3.weight'].shape[0]})"
    return ""


def init_weights(
    weights: Path | None, arch: str, width: int, num_outputs: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Build the network's initial state dict.

    Parameters
    ----------
    weights : Path or None
        A checkpoint file, or None for random weights.
    arch, width, num_outputs
        The network to build.

    Returns
    -------
    state_dict : dict of str to torch.Tensor
        A complete state dict for ``build_model(arch, num_outputs, width)``.
    info : dict
        ``init`` (``random``, ``kinetics``, ``torchvision`` or ``echoclr``),
        ``head`` (``new`` or ``from weights``), and for a file its name,
        SHA-256 and the keys dropped.

    Raises
    ------
    InitError
        If the file is missing, not a plain state dict, or does not fit.
    """
    model = build_model(arch, num_outputs, width=width)
    if weights is None:
        return model.state_dict(), {"init": "random", "head": "new"}

    path = Path(weights)
    if not path.is_file():
        raise InitError(f"{path}: no such file")
    try:
        # weights_only: a checkpoint is data; a pickle that wants to build
        # objects or run code is refused.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError (bad zip), EOFError, ...
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise InitError(
            f"{path}: cannot be read as a plain state dict with weights_only=True ({type(exc).__name__}: {first_line})"
        ) from None

    state, kind, dropped = extract_state_dict(loaded, source=str(path))
    expected = model.state_dict()
    head_keys = ("fc.weight", "fc.bias")

    head_fits = all(k in state and tuple(state[k].shape) == tuple(expected[k].shape) for k in head_keys)
    head_in_file = [k for k in head_keys if k in state]
    fc = state.get("fc.weight")
    if kind == "torchvision" and fc is not None and fc.ndim == 2 and fc.shape[0] == _KINETICS_CLASSES:
        kind = "kinetics"
    want = {k: tuple(v.shape) for k, v in expected.items() if k not in head_keys}
    body, problems = state_dict_problems({k: v for k, v in state.items() if k not in head_keys}, want)
    if problems:
        raise InitError(
            f"{path}: weights do not fit {arch} width {width}{_shape_hint(state)}: " + "; ".join(problems)
        )

    merged = dict(expected)  # the new, randomly initialised head by default
    merged.update(body)
    if head_fits:
        merged.update({k: state[k] for k in head_keys})
    model.load_state_dict(merged, strict=True)

    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    info: dict[str, Any] = {
        "init": kind,
        "head": "from weights" if head_fits else "new",
        "weights_file": path.name,
        "weights_sha256": sha.hexdigest(),
    }
    if head_in_file and not head_fits:
        dropped = sorted(set(dropped) | set(head_in_file))
    if dropped:
        info["dropped_keys"] = dropped[:50]
        info["dropped_count"] = len(dropped)
    return model.state_dict(), info


def _labels(ns: argparse.Namespace) -> list[str] | None:
    if ns.labels is None:
        return None
    if ns.task in BINARY_TASKS:
        raise InitError("--labels applies to --task view only; binary tasks use absent,present")
    labels = [x.strip() for x in ns.labels.split(",") if x.strip()]
    return labels


def run_init(ns: argparse.Namespace) -> int:
    """Run ``echonode-train init``.

    Parameters
    ----------
    ns : argparse.Namespace
        Parsed arguments (see :func:`add_init_arguments`).

    Returns
    -------
    int
        0 on success; 2 for a user error (message on stderr, no traceback).
    """
    try:
        if ns.width < 1:
            raise InitError(f"--width must be at least 1, not {ns.width}")
        if not 0.0 <= ns.threshold <= 1.0:
            raise InitError(f"--threshold must be in [0, 1], not {ns.threshold}")
        if ns.size < 1 or ns.clip_frames < 1:
            raise InitError("--size and --clip-frames must be positive")
        out = Path(ns.out)
        if out.exists() and not ns.force:
            raise InitError(f"{out} already exists (use --force to replace it)")
        labels = _labels(ns)
        num_outputs = 1 if ns.task in BINARY_TASKS else len(labels or DEFAULT_VIEW_LABELS)
        state, info = init_weights(ns.weights, ns.arch, ns.width, num_outputs)
        normalisation = ns.normalisation or ("kinetics" if info["init"] == "kinetics" else "minmax")
        config = {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in sorted(vars(ns).items())
            if isinstance(value, (str, int, float, bool, Path, type(None)))
        }
        meta = BundleMeta.create(
            name=ns.name or f"echoclr-{ns.task}",
            task=ns.task,
            arch=ns.arch,
            width=ns.width,
            labels=labels,
            preprocessing={"size": ns.size, "clip_frames": ns.clip_frames, "normalisation": normalisation},
            threshold=ns.threshold,
            version=ns.version,
            provenance={
                **info,
                "data_manifest": None,
                "code_revision": code_revision(),
                "config": config,
                "calibration": f"{DEFAULT_CALIBRATION_CLIPS} synthetic echo-like clips in {CALIBRATION_FILE} "
                "(no training data at hand; a fine-tuned bundle stores real ones)",
            },
            # An untrained head gives meaningless probabilities.
            random_weights=info["head"] == "new",
        )
        calibration = synthetic_clips(DEFAULT_CALIBRATION_CLIPS, ns.clip_frames, ns.size).numpy()
        save_bundle(out, meta, state, overwrite=bool(ns.force),
                    extra_files={CALIBRATION_FILE: encode_calibration(calibration, "synthetic")})  # fmt: skip
    except (InitError, BundleError, FileExistsError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {out}: task {meta.task}, {meta.arch} width {meta.width}, init {info['init']}, "
        f"head {info['head']}{', RANDOM WEIGHTS (smoke tests only)' if meta.random_weights else ''}; "
        f"calibration: {DEFAULT_CALIBRATION_CLIPS} synthetic echo-like clips (no real data)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the sub-command standalone (``python -m train.init_bundle``)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add_init_arguments(parser)
    return run_init(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
