"""The installed model bundles, and what the worker really loaded of them.

The models folder says what is installed (:func:`installed_bundles`, the one
definition the node, the CLI and the metrics use); the worker's models state
file (:data:`MODELS_STATE`, written by
:func:`echonode.analyse.worker.write_models_state` at every load) says what it
loaded, with which runtime, and why it refused the rest (wrong shapes, an
unknown task, a newer format). ``echonode status`` and the status page show
both side by side. Reading them imports no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from echonode.bundles.manifest import BUNDLE_JSON, bundle_dirs
from echonode.config import Config

__all__ = ["MODELS_STATE", "has_task_models", "installed_bundles", "models_summary", "worker_models_state"]

#: The worker's models state file, in the storage folder.
MODELS_STATE = "worker-models.json"


def installed_bundles(models_dir: Path) -> list[Path]:
    """The installed bundle folders: visible sub-folders that hold a ``bundle.json``.

    A hidden folder is a bundle being written (staged, then renamed into
    place): it is not installed yet, whatever it holds.
    """
    return [d for d in bundle_dirs(models_dir) if (d / BUNDLE_JSON).is_file()]


def has_task_models(models_dir: Path) -> bool:
    """True when a bundle other than a view classifier is installed."""
    for b in installed_bundles(models_dir):
        try:
            task = json.loads((b / BUNDLE_JSON).read_text()).get("task")
        except (OSError, ValueError):
            continue
        if task and task != "view":
            return True
    return False


def worker_models_state(cfg: Config) -> dict[str, Any] | None:
    """The worker's last models state file, or None when there is none (yet) or it does not read.

    Parameters
    ----------
    cfg : Config

    Returns
    -------
    dict or None
        ``loaded`` (bundle names), ``model_set``, ``errors`` (bundle path ->
        reason), ``runtime`` (name -> mode), ``updated`` (epoch seconds).
    """
    try:
        state = json.loads((cfg.storage_dir / MODELS_STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def models_summary(cfg: Config, worker: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One entry per installed bundle: its metadata and whether the worker loaded it.

    Parameters
    ----------
    cfg : Config
    worker : dict, optional
        The worker's models state (:func:`worker_models_state`); read when
        not given.

    Returns
    -------
    list of dict
        ``name``, ``path``, ``task``, ``version``, ``device_uid``,
        ``random_weights``; with a models state, ``loaded`` and either
        ``runtime`` (loaded) or ``error`` (refused); ``error`` alone when
        the bundle's ``bundle.json`` does not read.
    """
    if worker is None:
        worker = worker_models_state(cfg)
    out: list[dict[str, Any]] = []
    for b in installed_bundles(cfg.models_dir):
        try:
            meta = json.loads((b / BUNDLE_JSON).read_text())
        except (OSError, ValueError) as exc:
            out.append({"name": b.name, "path": str(b), "error": f"unreadable bundle.json: {exc}"})
            continue
        out.append(
            {
                "name": meta.get("name", b.name),
                "path": str(b),
                "task": meta.get("task"),
                "version": meta.get("version"),
                "device_uid": meta.get("device_uid"),
                "random_weights": bool(meta.get("random_weights", False)),
            }
        )
        if worker is not None:
            loaded = meta.get("name", b.name) in worker.get("loaded", [])
            out[-1]["loaded"] = loaded
            if not loaded:
                errs = [e for p, e in worker.get("errors", {}).items() if Path(p).name == b.name]
                out[-1]["error"] = errs[0] if errs else "not loaded by the worker"
            else:
                out[-1]["runtime"] = worker.get("runtime", {}).get(meta.get("name", b.name))
    return out
