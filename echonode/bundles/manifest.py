"""The bundle format without torch: ``bundle.json``, its checks, the models folder.

A bundle is a folder (CONTRACT.md, "Model bundle")::

    <bundle>/bundle.json   metadata: task, labels, architecture, preprocessing,
                           threshold, version, DeviceUID, provenance and metrics
    <bundle>/weights.pt    a plain state dict, read with weights_only=True
    <bundle>/...           further files a bundle may carry (split.json,
                           calibration.npz)

The node keeps one sub-folder per bundle under ``[models] dir``. Folders
whose name starts with ``.`` are ignored: :func:`echonode.bundles.weights.save_bundle`
(and any installer) stages a bundle in such a folder and renames it into
place, so a half-written bundle is never seen (:func:`bundle_dirs` is the one
definition of "an installed bundle").

This module is what the node process needs of a bundle (which are
installed, what they are, the key of a set of models); it never imports
torch. Loading weights and running networks is :mod:`echonode.bundles.weights`
and :mod:`echonode.bundles.registry`, in the worker process.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import pydicom.uid

from echonode.analyse.preprocess_config import FRAMINGS, REQUIRED_KEYS, PreprocessConfig

__all__ = [
    "ARCHITECTURES",
    "BINARY_LABELS",
    "BINARY_TASKS",
    "BUNDLE_JSON",
    "DEFAULT_PREPROCESSING",
    "DEFAULT_VIEW_LABELS",
    "FORMAT_VERSION",
    "NORMALISATIONS",
    "TASKS",
    "WEIGHTS_FILE",
    "BundleError",
    "BundleMeta",
    "bundle_dirs",
    "dir_signature",
    "folder_signature",
    "model_set_key",
    "model_set_key_of",
]

#: Architectures the networks module builds, by torchvision's name.
ARCHITECTURES: tuple[str, ...] = ("r3d_18", "r2plus1d_18")
#: Input normalisations a model may expect (see ``nets.normalise_for_model``).
NORMALISATIONS: tuple[str, ...] = ("minmax", "kinetics")

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
DEFAULT_PREPROCESSING: dict[str, Any] = {**PreprocessConfig().to_meta(), "normalisation": "minmax"}

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


def _is_int(value: Any) -> TypeGuard[int]:
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
    _check_keys(data, problems)
    _check_identity(data, problems)
    task = data.get("task")
    if "task" in data and task not in TASKS:
        problems.append(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    num_outputs = _check_architecture(data, problems)
    _check_labels(data, task, num_outputs, problems)
    for key in ("clip_frames", "frame_size"):
        if key in data and (not _is_int(data[key]) or data[key] < 1):
            problems.append(f"{key} must be a positive integer, not {data[key]!r}")
    _check_preprocessing(data, problems)
    _check_rest(data, problems)
    return problems


def _check_keys(data: Mapping[str, Any], problems: list[str]) -> None:
    missing = [k for k in _META_KEYS if k not in data]
    extra = sorted(k for k in data if k not in _META_KEYS)
    if missing:
        problems.append(f"missing key(s) {', '.join(missing)}")
    if extra:
        problems.append(f"unknown key(s) {', '.join(extra)}")


def _check_identity(data: Mapping[str, Any], problems: list[str]) -> None:
    """The format version, the names, the creation time and the DeviceUID."""
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
    device_uid = data.get("device_uid")
    if isinstance(device_uid, str) and device_uid.strip() and not _is_uid(device_uid):
        problems.append(f"device_uid {device_uid!r} is not a valid DICOM UID")


def _check_architecture(data: Mapping[str, Any], problems: list[str]) -> int | None:
    """Check ``architecture``; return its ``num_outputs`` when that is valid."""
    if "architecture" not in data:
        return None
    arch = data["architecture"]
    if not isinstance(arch, Mapping):
        problems.append("architecture must be an object with name, width, num_outputs")
        return None
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
        if _is_int(arch["num_outputs"]) and arch["num_outputs"] >= 1:
            return int(arch["num_outputs"])
        problems.append(f"architecture.num_outputs must be a positive integer, not {arch['num_outputs']!r}")
    return None


def _check_labels(data: Mapping[str, Any], task: Any, num_outputs: int | None, problems: list[str]) -> None:
    """The labels against the task and the number of outputs."""
    if "labels" not in data:
        return
    labels = data["labels"]
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


def _check_preprocessing(data: Mapping[str, Any], problems: list[str]) -> None:
    """The ``preprocessing`` object and its agreement with ``frame_size`` and ``clip_frames``."""
    if "preprocessing" not in data:
        return
    pre = data["preprocessing"]
    if not isinstance(pre, Mapping):
        problems.append("preprocessing must be an object")
        return
    # Extra preprocessing keys are allowed: a newer preprocessing step
    # may record more, and a reader takes what it knows.
    p_missing = [k for k in (*REQUIRED_KEYS, "normalisation") if k not in pre]
    if p_missing:
        problems.append(f"preprocessing lacks {', '.join(p_missing)}")
    if "framing" in pre and pre["framing"] not in FRAMINGS:
        problems.append(f"preprocessing.framing must be one of {', '.join(FRAMINGS)}, not {pre['framing']!r}")
    for key in ("size", "clip_frames", "eval_clips", "max_frames"):
        if key in pre and (not _is_int(pre[key]) or pre[key] < 1):
            problems.append(f"preprocessing.{key} must be a positive integer, not {pre[key]!r}")
    if "sector_mask" in pre and (not _is_int(pre["sector_mask"]) or pre["sector_mask"] < 1):
        problems.append(f"preprocessing.sector_mask must be a positive integer, not {pre['sector_mask']!r}")
    if "field_cm" in pre and (not _is_number(pre["field_cm"]) or not 2.0 <= pre["field_cm"] <= 40.0):
        problems.append(f"preprocessing.field_cm must be a number of cm in [2, 40], not {pre['field_cm']!r}")
    if "min_fps" in pre and (not _is_number(pre["min_fps"]) or pre["min_fps"] < 0):
        problems.append(f"preprocessing.min_fps must be a non-negative number, not {pre['min_fps']!r}")
    if "normalisation" in pre and pre["normalisation"] not in NORMALISATIONS:
        problems.append(
            f"preprocessing.normalisation must be one of {', '.join(NORMALISATIONS)}, not {pre['normalisation']!r}"
        )
    if pre.get("size") != data.get("frame_size") and "size" in pre and "frame_size" in data:
        problems.append(f"preprocessing.size {pre['size']} differs from frame_size {data['frame_size']}")
    if "clip_frames" in pre and "clip_frames" in data and pre["clip_frames"] != data["clip_frames"]:
        problems.append(f"preprocessing.clip_frames {pre['clip_frames']} differs from clip_frames {data['clip_frames']}")


def _check_rest(data: Mapping[str, Any], problems: list[str]) -> None:
    """The threshold, the free-form objects and the flags."""
    if "threshold" in data and (not _is_number(data["threshold"]) or not 0.0 <= data["threshold"] <= 1.0):
        problems.append(f"threshold must be a number in [0, 1], not {data['threshold']!r}")
    for key in ("provenance", "metrics"):
        if key in data and not isinstance(data[key], Mapping):
            problems.append(f"{key} must be an object")
    for key in ("random_weights", "clinical_use"):
        if key in data and not isinstance(data[key], bool):
            problems.append(f"{key} must be true or false, not {data[key]!r}")


def _json_default(value: Any) -> Any:
    """Let metrics and provenance hold numpy scalars/arrays and paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if type(value).__module__.split(".")[0] == "torch" and hasattr(value, "tolist"):
        return value.tolist()  # a tensor, without importing torch here
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
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
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
# The models folder
# ---------------------------------------------------------------------------


def bundle_dirs(models_dir: Path) -> list[Path]:
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


def dir_signature(folder: Path) -> tuple[Any, ...]:
    """The fingerprint of one bundle folder (:func:`folder_signature` is a tuple of them)."""
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
    return tuple(dir_signature(p) for p in bundle_dirs(Path(models_dir)))


def model_set_key_of(models: Iterable[tuple[str, str, str]]) -> str:
    """The key a report is recorded under for a set of models.

    Parameters
    ----------
    models : iterable of (str, str, str)
        ``(name, version, device_uid)`` of each model that produced the report.

    Returns
    -------
    str
        32 hex digits from the sorted triples, independent of their order.
        One SR per study and key (:meth:`Journal.report_for`); the worker
        keys its models this way (``bundle.model_set_key``) and so does
        ``echonode recover-journal`` with the models an SR names.
    """
    triples = sorted((str(n), str(v), str(d)) for n, v, d in models)
    return hashlib.sha256(json.dumps(triples).encode("utf-8")).hexdigest()[:32]


def model_set_key(bundles: Iterable[Any]) -> str:
    """A stable key for a set of models.

    Parameters
    ----------
    bundles : iterable of Bundle or BundleMeta
        (anything with a ``meta``, or a :class:`BundleMeta`)
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
        (m.name, m.version, m.device_uid) for m in (getattr(b, "meta", b) for b in bundles)
    )
