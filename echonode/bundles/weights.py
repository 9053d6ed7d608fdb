"""Bundle weights and loading: a :class:`Bundle` is metadata and a network ready to run.

:func:`load_bundle` reads ``bundle.json`` (:mod:`echonode.bundles.manifest`),
checks ``weights.pt`` (read with ``weights_only=True``) against the
architecture, builds the network and its inference runtime; :func:`save_bundle`
writes a bundle folder atomically. Worker process and training only: this
module imports torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from echonode.analyse.preprocess_config import SECTOR_MASK_RULE
from echonode.bundles.device import resolve_device
from echonode.bundles.manifest import BUNDLE_JSON, WEIGHTS_FILE, BundleError, BundleMeta
from echonode.bundles.nets import VideoClassifier, build_model, normalise_for_model
from echonode.bundles.runtime import MODES
from echonode.bundles.runtime_select import runtime_for_bundle
from echonode.durable import publish_folder
from echonode.ops.logs import EventLog

__all__ = [
    "Bundle",
    "check_state_dict",
    "load_bundle",
    "save_bundle",
    "state_dict_problems",
    "warn_if_other_sector_mask",
]

log = EventLog(__name__)


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
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError (bad zip), EOFError, ...
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise BundleError(
            f"bundle {source}: {WEIGHTS_FILE} cannot be read as a plain state dict "
            f"({type(exc).__name__}: {first_line})"
        ) from None


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


def warn_if_other_sector_mask(meta: BundleMeta, folder: Path) -> bool:
    """Log a warning when the bundle was trained on frames masked by another sector-mask rule.

    A bundle fine-tuned from a clip cache records the cache's rule
    (``preprocessing.sector_mask``); the node always crops with the current
    :data:`~echonode.analyse.preprocess_config.SECTOR_MASK_RULE`. Under
    another rule some videos are cropped, and so scaled, otherwise than the
    network saw in training, so its probabilities may move. The bundle still
    loads: the rule changes how some frames are framed, not what the network
    can read, and refusing would stop a working node on upgrade.

    Parameters
    ----------
    meta : BundleMeta
        The bundle's metadata.
    folder : Path
        The bundle folder (for the log line).

    Returns
    -------
    bool
        True when the rules differ (a warning was logged).
    """
    trained = meta.preprocessing.get("sector_mask")
    if trained is None or trained == SECTOR_MASK_RULE:
        return False
    log.warning(
        "bundle.sector_mask_differs", bundle=str(folder), model=meta.name, version=meta.version,
        trained_rule=trained, node_rule=SECTOR_MASK_RULE,
        advice="index the archive again and fine-tune again with this release",
    )  # fmt: skip
    return True


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
    warn_if_other_sector_mask(meta, folder)
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
        torch.save(plain, staging / WEIGHTS_FILE)
        (staging / BUNDLE_JSON).write_text(meta.to_json(), encoding="utf-8")
        for name, content in extras.items():
            if isinstance(content, bytes):
                (staging / name).write_bytes(content)
            else:
                (staging / name).write_text(content, encoding="utf-8")
        publish_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
