"""The installed models as the worker serves them: load them all, reload on change.

:class:`ModelRegistry` loads every bundle of the models folder
(:func:`load_bundles`), notices when the folder changes (its
:func:`~echonode.bundles.manifest.folder_signature`) and reloads (hot
reload), and gives each set of models a stable key
(:func:`~echonode.bundles.manifest.model_set_key`) so that a study is never
reported twice by the same model set. Worker process only (imports torch).
"""

from __future__ import annotations

import datetime as _dt
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from echonode.bundles.device import resolve_device
from echonode.bundles.manifest import (
    BundleError,
    bundle_dirs,
    dir_signature,
    folder_signature,
    model_set_key,
)
from echonode.bundles.weights import Bundle, load_bundle

__all__ = ["ModelRegistry", "ModelSet", "load_bundles"]


def _created_key(bundle: Bundle) -> tuple[str, str]:
    try:
        created = _dt.datetime.fromisoformat(bundle.meta.created)
        if created.tzinfo is None:
            created = created.replace(tzinfo=_dt.UTC)
        stamp = created.astimezone(_dt.UTC).isoformat()
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
    for sub in bundle_dirs(folder):
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
            for sub in bundle_dirs(self.models_dir):
                # The signature is taken *before* loading: if a file changes
                # while it is read, the next refresh sees a difference.
                entry = dir_signature(sub)
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
