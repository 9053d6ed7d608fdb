"""Model bundles: a trained network and everything needed to run it.

A bundle is a folder (CONTRACT.md, "Model bundle")::

    <bundle>/bundle.json   metadata: task, labels, architecture, preprocessing,
                           threshold, version, DeviceUID, provenance, metrics
    <bundle>/weights.pt    a plain state dict, read with weights_only=True

The node keeps one sub-folder per bundle under ``[models] dir``;
:class:`ModelRegistry` loads them, notices when the folder changes and reloads
(hot reload), and gives each set of models a stable key so that a study is
never reported twice by the same model set.

Folders whose name starts with ``.`` are ignored: :func:`save_bundle` (and any
installer) stages a bundle in such a folder and renames it into place, so a
half-written bundle is never seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom.uid
import torch

from echonode.studies.journal import model_set_key_of
from echonode.bundles.nets import ARCHITECTURES, NORMALISATIONS, VideoClassifier, build_model, normalise_for_model

__all__ = [
    "BINARY_LABELS",
    "BINARY_TASKS",
    "BUNDLE_JSON",
    "DEFAULT_PREPROCESSING",
    "DEFAULT_VIEW_LABELS",
    "FORMAT_VERSION",
    "TASKS",
    "WEIGHTS_FILE",
    "Bundle",
    "BundleError",
    "BundleMeta",
    "ModelRegistry",
    "ModelSet",
    "check_state_dict",
    "folder_signature",
    "load_bundle",
    "load_bundles",
    "model_set_key",
    "resolve_device",
    "save_bundle",
]

#: Version of the bundle layout this code writes and reads.
FORMAT_VERSION = 1
BUNDLE_JSON = "bundle.json"
WEIGHTS_FILE = "weights.pt"

#: Binary tasks have one logit and the labels ``["absent", "present"]``.
BINARY_TASKS: tuple[str, ...] = ("lvh", "severe_as")
#: Every task a bundle may serve; ``view`` is multi-class (softmax over labels).
TASKS: tuple[str, ...] = (*BINARY_TASKS, "view")
BINARY_LABELS: tuple[str, str] = ("absent", "present")
#: A default view label set for ``view`` bundles made without explicit labels.
DEFAULT_VIEW_LABELS: tuple[str, ...] = ("plax", "a4c", "psax", "other")

#: METHOD.md's inference preprocessing; ``bundle.json`` records the values used.
DEFAULT_PREPROCESSING: dict[str, Any] = {
    "size": 112,
    "clip_frames": 16,
    "eval_clips": 4,
    "max_frames": 100,
    "min_fps": 25.0,
    "normalisation": "minmax",
}

# The order bundle.json is written in; also the exact set of keys it must hold.
_META_KEYS: tuple[str, ...] = (
    "format_version",
    "name",
    "task",
    "labels",
    "architecture",
    "clip_frames",
    "frame_size",
    "preprocessing",
    "threshold",
    "version",
    "device_uid",
    "created",
    "provenance",
    "metrics",
    "random_weights",
    "clinical_use",
)
_ARCH_KEYS = ("name", "width", "num_outputs")


class BundleError(Exception):
    """A bundle cannot be used; the message names the bundle and the problem."""


# ---------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def _is_uid(value: str) -> bool:
    """DICOM UID syntax (PS3.5 9.1); checked here so no pydicom warning is raised."""
    return len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _meta_problems(data: Any) -> list[str]:
    """Every problem with a ``bundle.json`` mapping, as human-readable lines."""
    if not isinstance(data, Mapping):
        return [f"{BUNDLE_JSON} must hold a JSON object, not {type(data).__name__}"]
    problems: list[str] = []
    missing = [k for k in _META_KEYS if k not in data]
    extra = sorted(k for k in data if k not in _META_KEYS)
    if missing:
        problems.append(f"missing key(s) {', '.join(missing)}")
    if extra:
        problems.append(f"unknown key(s) {', '.join(extra)}")

    fv = data.get("format_version")
    if "format_version" in data:
        if not _is_int(fv):
            problems.append(f"format_version must be an integer, not {fv!r}")
        elif fv > FORMAT_VERSION:
            problems.append(f"format_version {fv} is newer than this echonode reads ({FORMAT_VERSION}); upgrade echonode")
        elif fv < 1:
            problems.append(f"format_version must be at least 1, not {fv}")
    for key in ("name", "version", "created", "device_uid"):
        if key in data and (not isinstance(data[key], str) or not data[key].strip()):
            problems.append(f"{key} must be a non-empty string")
    if isinstance(data.get("created"), str) and data["created"].strip():
        try:
            _dt.datetime.fromisoformat(data["created"])
        except ValueError:
            problems.append(f"created must be an ISO 8601 date-time, not {data['created']!r}")
    if isinstance(data.get("device_uid"), str) and data["device_uid"].strip():
        if not _is_uid(data["device_uid"]):
            problems.append(f"device_uid {data['device_uid']!r} is not a valid DICOM UID")

    task = data.get("task")
    if "task" in data and task not in TASKS:
        problems.append(f"unknown task {task!r} (known: {', '.join(TASKS)})")

    arch = data.get("architecture")
    num_outputs: int | None = None
    if "architecture" in data:
        if not isinstance(arch, Mapping):
            problems.append("architecture must be an object with name, width, num_outputs")
        else:
            a_missing = [k for k in _ARCH_KEYS if k not in arch]
            a_extra = sorted(k for k in arch if k not in _ARCH_KEYS)
            if a_missing:
                problems.append(f"architecture lacks {', '.join(a_missing)}")
            if a_extra:
                problems.append(f"architecture has unknown key(s) {', '.join(a_extra)}")
            if "name" in arch and arch["name"] not in ARCHITECTURES:
                problems.append(f"unknown architecture {arch['name']!r} (known: {', '.join(ARCHITECTURES)})")
            if "width" in arch and (not _is_int(arch["width"]) or arch["width"] < 1):
                problems.append(f"architecture.width must be a positive integer, not {arch['width']!r}")
            if "num_outputs" in arch:
                if not _is_int(arch["num_outputs"]) or arch["num_outputs"] < 1:
                    problems.append(f"architecture.num_outputs must be a positive integer, not {arch['num_outputs']!r}")
                else:
                    num_outputs = arch["num_outputs"]

    labels = data.get("labels")
    if "labels" in data:
        if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
            problems.append("labels must be a list of non-empty strings")
        elif task in BINARY_TASKS:
            if labels != list(BINARY_LABELS):
                problems.append(f"labels of binary task {task} must be {list(BINARY_LABELS)}, not {labels}")
            if num_outputs is not None and num_outputs != 1:
                problems.append(f"binary task {task} needs architecture.num_outputs 1, not {num_outputs}")
        elif task == "view":
            if len(labels) < 2:
                problems.append("a view bundle needs at least two labels")
            if len(set(labels)) != len(labels):
                problems.append(f"labels are not unique: {labels}")
            if "plax" not in labels:
                problems.append("a view bundle's labels must include 'plax'")
            if num_outputs is not None and num_outputs != len(labels):
                problems.append(f"{len(labels)} labels but architecture.num_outputs is {num_outputs}")

    for key in ("clip_frames", "frame_size"):
        if key in data and (not _is_int(data[key]) or data[key] < 1):
            problems.append(f"{key} must be a positive integer, not {data[key]!r}")

    pre = data.get("preprocessing")
    if "preprocessing" in data:
        if not isinstance(pre, Mapping):
            problems.append("preprocessing must be an object")
        else:
            # Extra preprocessing keys are allowed: a newer preprocessing step
            # may record more, and a reader takes what it knows.
            p_missing = [k for k in DEFAULT_PREPROCESSING if k not in pre]
            if p_missing:
                problems.append(f"preprocessing lacks {', '.join(p_missing)}")
            for key in ("size", "clip_frames", "eval_clips", "max_frames"):
                if key in pre and (not _is_int(pre[key]) or pre[key] < 1):
                    problems.append(f"preprocessing.{key} must be a positive integer, not {pre[key]!r}")
            if "min_fps" in pre and (not _is_number(pre["min_fps"]) or pre["min_fps"] < 0):
                problems.append(f"preprocessing.min_fps must be a non-negative number, not {pre['min_fps']!r}")
            if "normalisation" in pre and pre["normalisation"] not in NORMALISATIONS:
                problems.append(
                    f"preprocessing.normalisation must be one of {', '.join(NORMALISATIONS)}, not {pre['normalisation']!r}"
                )
            if pre.get("size") != data.get("frame_size") and "size" in pre and "frame_size" in data:
                problems.append(f"preprocessing.size {pre['size']} differs from frame_size {data['frame_size']}")
            if "clip_frames" in pre and "clip_frames" in data and pre["clip_frames"] != data["clip_frames"]:
                problems.append(
                    f"preprocessing.clip_frames {pre['clip_frames']} differs from clip_frames {data['clip_frames']}"
                )

    if "threshold" in data and (not _is_number(data["threshold"]) or not 0.0 <= data["threshold"] <= 1.0):
        problems.append(f"threshold must be a number in [0, 1], not {data['threshold']!r}")
    for key in ("provenance", "metrics"):
        if key in data and not isinstance(data[key], Mapping):
            problems.append(f"{key} must be an object")
    for key in ("random_weights", "clinical_use"):
        if key in data and not isinstance(data[key], bool):
            problems.append(f"{key} must be true or false, not {data[key]!r}")
    return problems


def _json_default(value: Any) -> Any:
    """Let metrics and provenance hold numpy scalars/arrays and paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@dataclass
class BundleMeta:
    """The contents of ``bundle.json``.

    Attributes
    ----------
    name : str
        Algorithm name (reported in the SR's algorithm identification).
    task : str
        ``"lvh"``, ``"severe_as"`` (binary) or ``"view"`` (multi-class).
    labels : list of str
        ``["absent", "present"]`` for binary tasks; the view names (``"plax"``
        among them) for ``view``, in logit order.
    architecture : dict
        ``{"name": "r3d_18" | "r2plus1d_18", "width": int, "num_outputs": int}``.
    clip_frames : int
        Frames per clip the network was trained on.
    frame_size : int
        Side of the square frames, in pixels.
    preprocessing : dict
        ``size``, ``clip_frames``, ``eval_clips``, ``max_frames``, ``min_fps``,
        ``normalisation`` (``"minmax"`` or ``"kinetics"``).
    threshold : float
        Decision threshold on the probability (binary tasks).
    version : str
        Algorithm version (reported in the SR).
    device_uid : str
        A DICOM UID, new for every training run; identifies the model in the SR.
    created : str
        ISO 8601 creation time (UTC).
    provenance : dict
        ``init``, ``data_manifest`` hash, ``code_revision``, ``config`` ...
    metrics : dict
        Validation/test figures.
    random_weights : bool
        True for smoke-test bundles whose weights were never trained.
    clinical_use : bool
        Always False for this project's bundles.
    format_version : int
        Bundle layout version.
    """

    name: str
    task: str
    labels: list[str]
    architecture: dict[str, Any]
    clip_frames: int
    frame_size: int
    preprocessing: dict[str, Any]
    threshold: float
    version: str
    device_uid: str
    created: str
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    random_weights: bool = False
    clinical_use: bool = False
    format_version: int = FORMAT_VERSION

    @classmethod
    def create(
        cls,
        *,
        name: str,
        task: str,
        arch: str = "r3d_18",
        width: int = 64,
        labels: Iterable[str] | None = None,
        preprocessing: Mapping[str, Any] | None = None,
        threshold: float = 0.5,
        version: str = "1",
        provenance: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        random_weights: bool = False,
    ) -> BundleMeta:
        """Metadata for a new training run: a fresh DeviceUID and creation time.

        Parameters
        ----------
        name, task, arch, width, threshold, version, random_weights
            As the attributes of the same name.
        labels : iterable of str, optional
            Required labels for binary tasks are filled in; ``view`` defaults
            to :data:`DEFAULT_VIEW_LABELS`.
        preprocessing : mapping, optional
            Overrides of :data:`DEFAULT_PREPROCESSING`; ``clip_frames`` and
            ``frame_size`` are taken from it.
        provenance, metrics : mapping, optional
            Copied.

        Returns
        -------
        BundleMeta
            Validated metadata.

        Raises
        ------
        BundleError
            If the result would not be a valid bundle.
        """
        if task in BINARY_TASKS:
            label_list = list(BINARY_LABELS) if labels is None else list(labels)
            num_outputs = 1
        else:
            label_list = list(DEFAULT_VIEW_LABELS) if labels is None else list(labels)
            num_outputs = len(label_list)
        pre = {**DEFAULT_PREPROCESSING, **(preprocessing or {})}
        meta = cls(
            name=name,
            task=task,
            labels=label_list,
            architecture={"name": arch, "width": int(width), "num_outputs": num_outputs},
            clip_frames=pre["clip_frames"],
            frame_size=pre["size"],
            preprocessing=pre,
            threshold=float(threshold),
            version=str(version),
            device_uid=str(pydicom.uid.generate_uid()),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            provenance=dict(provenance or {}),
            metrics=dict(metrics or {}),
            random_weights=bool(random_weights),
            clinical_use=False,
        )
        meta.validate()
        return meta

    # Convenience views of the architecture block.
    @property
    def arch(self) -> str:
        """Architecture name (``architecture["name"]``)."""
        return str(self.architecture["name"])

    @property
    def width(self) -> int:
        """Base width (``architecture["width"]``)."""
        return int(self.architecture["width"])

    @property
    def num_outputs(self) -> int:
        """Number of logits (``architecture["num_outputs"]``)."""
        return int(self.architecture["num_outputs"])

    @property
    def is_binary(self) -> bool:
        """True for ``lvh`` and ``severe_as``."""
        return self.task in BINARY_TASKS

    @property
    def normalisation(self) -> str:
        """Input normalisation on top of per-clip min-max (``preprocessing``)."""
        return str(self.preprocessing.get("normalisation", "minmax"))

    def to_dict(self) -> dict[str, Any]:
        """Return the ``bundle.json`` mapping, keys in the documented order."""
        data = dataclasses.asdict(self)
        return {key: data[key] for key in _META_KEYS}

    def to_json(self) -> str:
        """Return ``bundle.json``'s text (indented, newline-terminated)."""
        return json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, source: str | os.PathLike[str] = "<dict>") -> BundleMeta:
        """Validate a ``bundle.json`` mapping and build the dataclass.

        Parameters
        ----------
        data : Any
            The parsed JSON.
        source : str or path-like, optional
            Named in error messages.

        Returns
        -------
        BundleMeta

        Raises
        ------
        BundleError
            Listing every problem found.
        """
        problems = _meta_problems(data)
        if problems:
            raise BundleError(f"bundle {os.fspath(source)}: " + "; ".join(problems))
        values = {key: data[key] for key in _META_KEYS}
        values["architecture"] = dict(values["architecture"])
        values["preprocessing"] = dict(values["preprocessing"])
        values["labels"] = list(values["labels"])
        values["threshold"] = float(values["threshold"])
        values["provenance"] = dict(values["provenance"])
        values["metrics"] = dict(values["metrics"])
        return cls(**values)

    def validate(self, *, source: str | os.PathLike[str] = "<meta>") -> None:
        """Raise :class:`BundleError` if this metadata is not a valid bundle's."""
        # Round-trip through JSON so that what is checked is what gets written.
        problems = _meta_problems(json.loads(self.to_json()))
        if problems:
            raise BundleError(f"bundle {os.fspath(source)}: " + "; ".join(problems))


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------


def _expected_shapes(arch: str, num_outputs: int, width: int) -> dict[str, tuple[int, ...]]:
    # Built on the meta device: shapes only, no memory, no initialisation cost.
    with torch.device("meta"):
        model = build_model(arch, num_outputs, width=width)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def state_dict_problems(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Compare a state dict with the expected key -> shape map.

    Missing BatchNorm ``num_batches_tracked`` counters (absent from some older
    checkpoints, irrelevant to inference) are filled with zeros.

    Returns
    -------
    tuple of (dict, list of str)
        The completed state dict and the problems (missing keys, unexpected
        keys, wrong shapes; the first few of each named); empty when it fits.
    """
    completed = dict(state_dict)
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in completed:
            completed[key] = torch.zeros((), dtype=torch.long)
    missing = [k for k in expected if k not in completed]
    extra = [k for k in completed if k not in expected]
    wrong = [
        f"{k} {tuple(completed[k].shape)} (expected {tuple(expected[k])})"
        for k in expected
        if k in completed and tuple(completed[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
    if extra:
        problems.append(f"{len(extra)} unexpected key(s) ({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''})")
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s): {'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''}")
    return completed, problems


def check_state_dict(
    state_dict: Any, arch: str, num_outputs: int, width: int, *, source: str | os.PathLike[str] = "<weights>"
) -> dict[str, torch.Tensor]:
    """Check a state dict against an architecture and return it, completed.

    Missing BatchNorm ``num_batches_tracked`` counters (absent from some older
    checkpoints, and irrelevant to inference) are filled with zeros; anything
    else missing, extra or of the wrong shape is an error.

    Parameters
    ----------
    state_dict : Any
        What ``torch.load`` returned.
    arch, num_outputs, width
        The architecture it must fit.
    source : str or path-like, optional
        Named in error messages.

    Returns
    -------
    dict of str to torch.Tensor
        The state dict, with any missing counters added.

    Raises
    ------
    BundleError
        Naming the source and the first few offending keys.
    """
    where = os.fspath(source)
    if not isinstance(state_dict, Mapping):
        raise BundleError(f"bundle {where}: {WEIGHTS_FILE} holds a {type(state_dict).__name__}, not a state dict")
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise BundleError(f"bundle {where}: {WEIGHTS_FILE} has non-tensor entries: {', '.join(map(str, bad[:5]))}")
    completed, problems = state_dict_problems(state_dict, _expected_shapes(arch, num_outputs, width))
    if problems:
        raise BundleError(
            f"bundle {where}: weights do not fit {arch} width {width} with {num_outputs} output(s): " + ", ".join(problems)
        )
    return completed


def _load_weights(path: Path, source: Path) -> Any:
    try:
        # weights_only refuses any pickle that would build arbitrary objects or
        # call code: a bundle is data, never a program.
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BundleError(f"bundle {source}: {WEIGHTS_FILE} is missing") from None
    except Exception as exc:  # UnpicklingError, RuntimeError (bad zip), EOFError, ...
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise BundleError(
            f"bundle {source}: {WEIGHTS_FILE} cannot be read as a plain state dict "
            f"({type(exc).__name__}: {first_line})"
        ) from None


# ---------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """Turn a ``[models] device`` setting into a torch device.

    Parameters
    ----------
    spec : str or torch.device
        ``"auto"`` (the first GPU when CUDA is available, else the CPU),
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        For an unknown setting, or a GPU that is not there.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str):
        raise ValueError(f'Argument "spec" must be a string, not {type(spec).__name__}.')
    text = spec.strip().lower()
    if text == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index = 0
        if text != "cuda":
            suffix = text.split(":", 1)[1]
            if not suffix.isdigit():
                raise ValueError(f"device {spec!r}: expected cuda:N with N a GPU index")
            index = int(suffix)
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: CUDA is not available on this machine (use 'auto' or 'cpu')")
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} GPU(s) present")
        return torch.device("cuda", index)
    raise ValueError(f"device {spec!r}: expected auto, cpu, cuda or cuda:N")


# ---------------------------------------------------------------------------
# Bundles
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class Bundle:
    """A loaded bundle: metadata and a network in eval mode on its device.

    Attributes
    ----------
    path : Path
        The bundle folder.
    meta : BundleMeta
        Its metadata.
    model : VideoClassifier
        The network, eval mode, gradients off.
    device : torch.device
        Where the network lives.
    amp : bool
        Autocast (bf16 where supported, else fp16) on CUDA.
    """

    path: Path
    meta: BundleMeta
    model: VideoClassifier
    device: torch.device
    amp: bool = True
    #: Optimised forward (echonode.bundles.runtime.InferenceRuntime); None = eager ``model``.
    runner: Any = None

    @property
    def name(self) -> str:
        """Algorithm name."""
        return self.meta.name

    @property
    def task(self) -> str:
        """``lvh``, ``severe_as`` or ``view``."""
        return self.meta.task

    @property
    def labels(self) -> list[str]:
        """Labels in logit order."""
        return self.meta.labels

    @property
    def version(self) -> str:
        """Algorithm version."""
        return self.meta.version

    @property
    def device_uid(self) -> str:
        """The training run's DeviceUID."""
        return self.meta.device_uid

    @property
    def threshold(self) -> float:
        """Decision threshold on the probability."""
        return self.meta.threshold

    @property
    def is_binary(self) -> bool:
        """True for binary tasks (one sigmoid output)."""
        return self.meta.is_binary

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for ``echonode status`` (no weights)."""
        return {
            "name": self.meta.name,
            "task": self.meta.task,
            "version": self.meta.version,
            "device_uid": self.meta.device_uid,
            "labels": list(self.meta.labels),
            "architecture": dict(self.meta.architecture),
            "threshold": self.meta.threshold,
            "created": self.meta.created,
            "random_weights": self.meta.random_weights,
            "path": str(self.path),
            "device": str(self.device),
            "runtime": self.runner.describe() if self.runner is not None else {"mode": "eager"},
        }

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not (self.amp and self.device.type == "cuda"):
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)

    def predict(self, clips: torch.Tensor | np.ndarray, batch_size: int = 8) -> np.ndarray:
        """Probabilities for a stack of clips.

        Parameters
        ----------
        clips : torch.Tensor or numpy.ndarray
            ``(N, 3, clip_frames, frame_size, frame_size)`` float clips scaled
            per clip to [0, 1] (``preprocess.make_eval_clips``). The bundle's
            own normalisation (Kinetics mean/std for ``"kinetics"``) is applied
            here, so callers never need to know it.
        batch_size : int, optional
            Clips per forward pass.

        Returns
        -------
        numpy.ndarray
            float32; ``(N,)`` sigmoid probabilities of "present" for binary
            tasks, ``(N, len(labels))`` softmax for ``view``.

        Raises
        ------
        ValueError
            If ``clips`` has the wrong shape or ``batch_size`` is not positive.
        """
        if isinstance(clips, np.ndarray):
            tensor = torch.from_numpy(np.ascontiguousarray(clips, dtype=np.float32))
        elif isinstance(clips, torch.Tensor):
            tensor = clips
        else:
            raise ValueError(f'Argument "clips" must be a numpy array or tensor, not {type(clips).__name__}.')
        if int(batch_size) < 1:
            raise ValueError(f'Argument "batch_size" must be positive, not {batch_size!r}.')
        want = (3, self.meta.clip_frames, self.meta.frame_size, self.meta.frame_size)
        if tensor.ndim != 5 or tuple(tensor.shape[1:]) != want:
            raise ValueError(
                f'Argument "clips" must have shape (N, {", ".join(map(str, want))}) for bundle '
                f"{self.meta.name}; got {tuple(tensor.shape)}."
            )
        n = tensor.shape[0]
        if n == 0:
            shape = (0,) if self.is_binary else (0, len(self.meta.labels))
            return np.zeros(shape, dtype=np.float32)
        outputs: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, n, int(batch_size)):
                batch = tensor[start : start + int(batch_size)].to(self.device, dtype=torch.float32, non_blocking=True)
                batch = normalise_for_model(batch, self.meta.normalisation)
                with self._autocast():
                    logits = (self.runner or self.model)(batch)
                logits = logits.float()
                if self.is_binary:
                    probs = torch.sigmoid(logits[:, 0])
                else:
                    probs = torch.softmax(logits, dim=1)
                outputs.append(probs.cpu())
        return torch.cat(outputs).numpy().astype(np.float32, copy=False)


def load_bundle(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    amp: bool = True,
    runtime: str = "auto",
    state_dir: str | os.PathLike[str] | None = None,
) -> Bundle:
    """Load and validate a bundle folder.

    Parameters
    ----------
    path : str or path-like
        The bundle folder.
    device : str or torch.device, optional
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
    amp : bool, optional
        Autocast on CUDA in :meth:`Bundle.predict`.
    runtime : str, optional
        One of :data:`echonode.bundles.runtime.MODES`; the default is ``[models]
        runtime``'s, so that a bundle loaded here predicts as in the node.
        Any mode but ``"eager"`` puts a checked optimised forward in
        :attr:`Bundle.runner` (falling back to the eager network when none
        passes); ``"eager"`` builds none. ``"auto"`` measures the candidates
        on the bundle's ``calibration.npz``
        (:func:`echonode.bundles.runtime_select.runtime_for_bundle`).
    state_dir : str or path-like, optional
        The node's state directory: ``auto`` caches its choice there
        (``runtime-choices.json``), per DeviceUID and machine. Without one
        nothing is cached. Never the bundle folder.

    Returns
    -------
    Bundle
        With the network in eval mode on ``device``.

    Raises
    ------
    BundleError
        If the folder, its metadata or its weights are unusable; the message
        names the bundle and the problem. A ``weights.pt`` that is not a plain
        state dict (a pickle that would build objects or run code) is refused.
    ValueError
        If ``device`` is not available or ``runtime`` is not a mode.
    """
    from echonode.bundles.runtime import MODES

    if runtime not in MODES:
        raise ValueError(f'Argument "runtime" must be one of {", ".join(MODES)}; got {runtime!r}.')
    folder = Path(path)
    torch_device = resolve_device(device)
    if not folder.is_dir():
        raise BundleError(f"bundle {folder}: not a folder")
    meta_path = folder / BUNDLE_JSON
    try:
        data = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"bundle {folder}: {BUNDLE_JSON} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle {folder}: {BUNDLE_JSON} is not valid JSON ({exc})") from None
    meta = BundleMeta.from_dict(data, source=folder)
    state = _load_weights(folder / WEIGHTS_FILE, folder)
    state = check_state_dict(state, meta.arch, meta.num_outputs, meta.width, source=folder)
    # Build on the meta device and adopt the loaded tensors: no random
    # initialisation of a network whose every weight is about to be replaced.
    with torch.device("meta"):
        model = build_model(meta.arch, meta.num_outputs, width=meta.width)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=torch_device, dtype=torch.float32)
    model.eval().requires_grad_(False)
    runner = None
    if runtime != "eager":
        from echonode.bundles.runtime_select import runtime_for_bundle

        def _norm(x: torch.Tensor) -> torch.Tensor:
            return normalise_for_model(x, meta.normalisation)

        runner = runtime_for_bundle(
            model, folder=folder, device_uid=meta.device_uid, label=f"{meta.name} {meta.version}",
            clip_frames=meta.clip_frames, frame_size=meta.frame_size, threshold=meta.threshold,
            normalise=_norm, mode=runtime, state_dir=state_dir,
        )  # fmt: skip
    return Bundle(path=folder, meta=meta, model=model, device=torch_device, amp=amp, runner=runner)


def save_bundle(
    path: str | os.PathLike[str],
    meta: BundleMeta,
    state_dict: Mapping[str, torch.Tensor],
    *,
    overwrite: bool = False,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """Write a bundle folder atomically.

    The bundle is written to a hidden sibling folder, flushed to disk, then
    renamed into place, so a reader (the node's hot reload) sees either no
    bundle or a complete one.

    Parameters
    ----------
    path : str or path-like
        The bundle folder to create.
    meta : BundleMeta
        Metadata; validated first.
    state_dict : mapping of str to torch.Tensor
        Weights; checked against ``meta.architecture`` first.
    overwrite : bool, optional
        Replace an existing folder (briefly absent during the swap).
    extra_files : mapping of str to str or bytes, optional
        Further files of the bundle by plain file name: text (e.g.
        ``split.json``, the studies it was trained on) written as UTF-8,
        bytes as they are (e.g. ``calibration.npz``).

    Returns
    -------
    Path
        The bundle folder.

    Raises
    ------
    BundleError
        If ``meta`` or ``state_dict`` is invalid.
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    """
    target = Path(path)
    meta.validate(source=target)
    checked = check_state_dict(state_dict, meta.arch, meta.num_outputs, meta.width, source=target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"bundle {target} already exists")
    extras = dict(extra_files or {})
    for name in extras:
        if name in (BUNDLE_JSON, WEIGHTS_FILE) or Path(name).name != name or name.startswith("."):
            raise BundleError(f"{target}: extra bundle file name {name!r} is not a plain file name of its own")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Clone to CPU so that views do not drag whole shared storages along, and
    # save a plain dict: nothing in weights.pt needs more than weights_only.
    plain = {key: value.detach().to("cpu").clone() for key, value in checked.items()}
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        weights_path = staging / WEIGHTS_FILE
        torch.save(plain, weights_path)
        _fsync_file(weights_path)
        meta_path = staging / BUNDLE_JSON
        meta_path.write_text(meta.to_json(), encoding="utf-8")
        _fsync_file(meta_path)
        for name, content in extras.items():
            if isinstance(content, bytes):
                (staging / name).write_bytes(content)
            else:
                (staging / name).write_text(content, encoding="utf-8")
            _fsync_file(staging / name)
        _fsync_dir(staging)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            retired.rmdir()
            os.rename(target, retired)
            os.rename(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes the rename durable; not every platform allows it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# The models folder
# ---------------------------------------------------------------------------


def _bundle_dirs(models_dir: Path) -> list[Path]:
    """Bundle sub-folders in a stable order; hidden (staging) folders skipped."""
    try:
        entries = sorted(models_dir.iterdir(), key=lambda p: p.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [p for p in entries if not p.name.startswith(".") and p.is_dir()]


def _stat_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _dir_signature(folder: Path) -> tuple[Any, ...]:
    return (folder.name, _stat_key(folder / BUNDLE_JSON), _stat_key(folder / WEIGHTS_FILE))


def folder_signature(models_dir: str | os.PathLike[str]) -> tuple[Any, ...]:
    """A cheap fingerprint of a models folder.

    Parameters
    ----------
    models_dir : str or path-like
        The node's models folder.

    Returns
    -------
    tuple
        ``(sub-folder name, bundle.json (mtime_ns, size), weights.pt
        (mtime_ns, size))`` per bundle folder; equal tuples mean nothing to
        reload.
    """
    return tuple(_dir_signature(p) for p in _bundle_dirs(Path(models_dir)))


def _created_key(bundle: Bundle) -> tuple[str, str]:
    try:
        created = _dt.datetime.fromisoformat(bundle.meta.created)
        if created.tzinfo is None:
            created = created.replace(tzinfo=_dt.timezone.utc)
        stamp = created.astimezone(_dt.timezone.utc).isoformat()
    except ValueError:
        stamp = bundle.meta.created
    return (stamp, bundle.path.name)


def _one_per_task(bundles: list[Bundle]) -> tuple[list[Bundle], list[tuple[Path, str]]]:
    """Keep the newest bundle per task; report the others.

    Two bundles for one task would put two findings for the same question in
    one SR; an operator who installs a new version beside the old one wants
    the new one.
    """
    newest: dict[str, Bundle] = {}
    for bundle in bundles:
        held = newest.get(bundle.task)
        if held is None or _created_key(bundle) > _created_key(held):
            newest[bundle.task] = bundle
    kept = [b for b in bundles if newest[b.task] is b]
    superseded = [
        (
            b.path,
            f"bundle {b.path}: ignored; task {b.task} is served by the newer bundle "
            f"{newest[b.task].path.name} ({newest[b.task].name} {newest[b.task].version})",
        )
        for b in bundles
        if newest[b.task] is not b
    ]
    return kept, superseded


def load_bundles(
    models_dir: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    amp: bool = True,
    one_per_task: bool = True,
    runtime: str = "auto",
    state_dir: str | os.PathLike[str] | None = None,
) -> tuple[list[Bundle], list[tuple[Path, str]]]:
    """Load every bundle under a models folder, collecting failures.

    Parameters
    ----------
    models_dir : str or path-like
        One sub-folder per bundle; hidden sub-folders are skipped.
    device : str or torch.device, optional
        Where to put the networks.
    amp : bool, optional
        Autocast on CUDA.
    one_per_task : bool, optional
        Keep only the newest bundle (by ``created``) of each task; the others
        are reported in the errors.
    runtime, state_dir : optional
        See :func:`load_bundle`.

    Returns
    -------
    bundles : list of Bundle
        The usable bundles, in folder-name order.
    errors : list of (Path, str)
        Each unusable folder and why; the node logs these and carries on with
        the good bundles.
    """
    folder = Path(models_dir)
    if not folder.is_dir():
        return [], [(folder, f"models folder {folder} does not exist")]
    bundles: list[Bundle] = []
    errors: list[tuple[Path, str]] = []
    for sub in _bundle_dirs(folder):
        try:
            bundles.append(load_bundle(sub, device, amp=amp, runtime=runtime, state_dir=state_dir))
        except BundleError as exc:
            errors.append((sub, str(exc)))
        except Exception as exc:  # noqa: BLE001 - one bad bundle must not stop the node
            errors.append((sub, f"bundle {sub}: {type(exc).__name__}: {exc}"))
    if one_per_task:
        bundles, superseded = _one_per_task(bundles)
        errors.extend(superseded)
    return bundles, errors


def model_set_key(bundles: Iterable[Bundle | BundleMeta]) -> str:
    """A stable key for a set of models.

    Parameters
    ----------
    bundles : iterable of Bundle or BundleMeta
        The models that would produce a report.

    Returns
    -------
    str
        32 hex digits from the sorted ``(name, version, device_uid)`` triples;
        independent of load order and folder names. The node records it with
        each report so that it never sends two SRs for the same study and
        model set.
    """
    return model_set_key_of(
        (m.name, m.version, m.device_uid) for m in ((b.meta if isinstance(b, Bundle) else b) for b in bundles)
    )


@dataclass(frozen=True)
class ModelSet:
    """An immutable snapshot of the installed models.

    Attributes
    ----------
    bundles : tuple of Bundle
        Usable bundles.
    errors : tuple of (Path, str)
        Folders that could not be used, and why.
    key : str
        :func:`model_set_key` of ``bundles``.
    signature : tuple or None
        The :func:`folder_signature` this snapshot was loaded from.
    loaded_at : float
        ``time.time()`` of the load.
    """

    bundles: tuple[Bundle, ...] = ()
    errors: tuple[tuple[Path, str], ...] = ()
    key: str = field(default_factory=lambda: model_set_key(()))
    signature: tuple[Any, ...] | None = None
    loaded_at: float = 0.0

    def by_task(self, task: str) -> Bundle | None:
        """The bundle serving ``task``, or None."""
        for bundle in self.bundles:
            if bundle.task == task:
                return bundle
        return None

    @property
    def tasks(self) -> tuple[str, ...]:
        """Tasks served, in bundle order."""
        return tuple(b.task for b in self.bundles)


class ModelRegistry:
    """The node's installed models, reloaded when the models folder changes.

    Readers take :attr:`current`, an immutable :class:`ModelSet`, and use it
    for a whole study; :meth:`refresh` builds a new snapshot under a lock and
    swaps it in with one assignment, so a reader never sees a half-loaded set
    and a study in progress keeps the models it started with. Unchanged
    bundle folders are not loaded again.

    Parameters
    ----------
    models_dir : str or path-like
        The ``[models] dir`` folder.
    device : str or torch.device, optional
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; resolved once here.
    amp : bool, optional
        Autocast on CUDA.
    one_per_task : bool, optional
        See :func:`load_bundles`.
    runtime : str, optional
        See :func:`load_bundle`; ``"auto"`` like ``[models] runtime``.
    state_dir : str or path-like, optional
        Where ``auto`` caches its runtime choices; default the models
        folder's parent (the node's ``storage_dir`` in the default layout).
    """

    def __init__(
        self,
        models_dir: str | os.PathLike[str],
        device: str | torch.device = "auto",
        *,
        amp: bool = True,
        one_per_task: bool = True,
        runtime: str = "auto",
        state_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.state_dir = Path(state_dir) if state_dir is not None else self.models_dir.absolute().parent
        self.device = resolve_device(device)
        self.amp = amp
        self.one_per_task = one_per_task
        self.runtime = runtime
        self._lock = threading.Lock()
        self._current = ModelSet()
        # Per folder: its signature when last loaded and the outcome.
        self._cache: dict[str, tuple[tuple[Any, ...], Bundle | str]] = {}

    @property
    def current(self) -> ModelSet:
        """The latest snapshot (empty until the first :meth:`refresh`)."""
        return self._current

    @property
    def bundles(self) -> tuple[Bundle, ...]:
        """Usable bundles of the current snapshot."""
        return self._current.bundles

    @property
    def errors(self) -> tuple[tuple[Path, str], ...]:
        """Problems of the current snapshot."""
        return self._current.errors

    @property
    def key(self) -> str:
        """Model-set key of the current snapshot."""
        return self._current.key

    def refresh(self, *, force: bool = False) -> bool:
        """Reload if the models folder changed since the last load.

        Parameters
        ----------
        force : bool, optional
            Reload every bundle even if nothing changed.

        Returns
        -------
        bool
            True when a new snapshot was installed.
        """
        with self._lock:
            signature = folder_signature(self.models_dir)
            if not force and signature == self._current.signature:
                return False
            if force:
                self._cache.clear()
            bundles: list[Bundle] = []
            errors: list[tuple[Path, str]] = []
            if not self.models_dir.is_dir():
                errors.append((self.models_dir, f"models folder {self.models_dir} does not exist"))
            cache: dict[str, tuple[tuple[Any, ...], Bundle | str]] = {}
            for sub in _bundle_dirs(self.models_dir):
                # The signature is taken *before* loading: if a file changes
                # while it is read, the next refresh sees a difference.
                entry = _dir_signature(sub)
                cached = self._cache.get(sub.name)
                if cached is not None and cached[0] == entry:
                    outcome = cached[1]
                else:
                    try:
                        outcome = load_bundle(
                            sub, self.device, amp=self.amp, runtime=self.runtime, state_dir=self.state_dir
                        )
                    except BundleError as exc:
                        outcome = str(exc)
                    except Exception as exc:  # noqa: BLE001 - keep serving the good ones
                        outcome = f"bundle {sub}: {type(exc).__name__}: {exc}"
                cache[sub.name] = (entry, outcome)
                if isinstance(outcome, Bundle):
                    bundles.append(outcome)
                else:
                    errors.append((sub, outcome))
            if self.one_per_task:
                bundles, superseded = _one_per_task(bundles)
                errors.extend(superseded)
            self._cache = cache
            self._current = ModelSet(
                bundles=tuple(bundles),
                errors=tuple(errors),
                key=model_set_key(bundles),
                signature=signature,
                loaded_at=time.time(),
            )
            return True
