"""``echonode-train promote BUNDLE --models-dir DIR``: install a bundle into a running node.

The models folder holds one entry per task slot, named after the bundle
(``lvh``, ``severe_as`` ...). Each entry is a symbolic link into
``DIR/.store/``, where every promoted bundle is kept under a unique name.
Promotion copies the bundle into the store, validates it there by loading
it as the node would (``weights_only``, every bundle check; eager, see
``_check``), then swaps the link with one ``rename``: the node's hot reload
sees the old bundle or the new one, never a half-written folder, and the
previous bundle stays in the store for ``--rollback``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from echonode.bundles.manifest import BundleError
from echonode.bundles.weights import Bundle, load_bundle
from echonode.durable import publish_folder, replace_symlink

STORE = ".store"


def _check(path: Path) -> Bundle:
    """Load ``path`` to check it, ``eager``: the runtime optimisation the node
    does on load (bf16, TorchScript) costs seconds a load and never refuses a
    bundle (it falls back to eager), so it proves nothing here."""
    return load_bundle(path, "cpu", runtime="eager")


def _slot_name(meta_name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", meta_name).strip(".-") or "bundle"
    return name[:64]


def promote(bundle: Path, models_dir: Path, *, name: str | None = None) -> Path:
    """Install ``bundle`` under ``models_dir``; return the slot path.

    Raises
    ------
    BundleError
        When the bundle does not load (it is not installed then).
    """
    loaded = _check(bundle)
    slot = _slot_name(name or loaded.meta.name)
    store = models_dir / STORE
    store.mkdir(mode=0o750, parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    unique = f"{slot}-{loaded.meta.version}-{loaded.meta.device_uid[-12:]}-{stamp}"
    target = store / unique
    staging = store / f".{unique}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(bundle, staging)
    _check(staging)  # the copy, not only the source, must load
    # copytree copies the source folder's times; stamp the promotion time,
    # which is what history() orders by.
    os.utime(staging)
    publish_folder(staging, target)
    _swap_link(models_dir / slot, Path(STORE) / unique)
    return models_dir / slot


def _swap_link(link: Path, target: Path) -> None:
    if link.exists() and not link.is_symlink():
        # A plain folder installed by hand: keep it in the store for rollback.
        kept = link.parent / STORE / f"{link.name}-manual-{time.strftime('%Y%m%dT%H%M%S')}"
        os.replace(link, kept)
    replace_symlink(link, target)


def history(models_dir: Path, slot: str) -> list[Path]:
    """Bundles once promoted into ``slot``, oldest first."""
    store = models_dir / STORE
    if not store.is_dir():
        return []
    return sorted((p for p in store.iterdir() if p.name.startswith(f"{slot}-") and p.is_dir()),
                  key=lambda p: p.stat().st_mtime)


def rollback(models_dir: Path, slot: str) -> Path:
    """Point ``slot`` back at the bundle promoted before the current one.

    Repeated rollbacks walk further back in promotion order.
    """
    link = models_dir / slot
    current = link.resolve() if link.is_symlink() else None
    promoted = history(models_dir, slot)
    resolved = [p.resolve() for p in promoted]
    if current in resolved:
        previous = promoted[: resolved.index(current)]
    else:
        previous = promoted
    if not previous:
        raise BundleError(f"no earlier bundle for {slot!r} in {models_dir / STORE}")
    _check(previous[-1])
    _swap_link(link, Path(STORE) / previous[-1].name)
    return link


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, nargs="?", help="the bundle folder to install")
    parser.add_argument("--models-dir", type=Path, required=True, help="the node's [models] dir")
    parser.add_argument("--name", help="slot name (default: the bundle's name)")
    parser.add_argument("--rollback", metavar="SLOT", help="re-install the previous bundle of SLOT instead")


def run_promote(ns: argparse.Namespace) -> int:
    try:
        if ns.rollback:
            link = rollback(ns.models_dir, ns.rollback)
        elif ns.bundle is None:
            print("echonode-train promote: give a BUNDLE folder or --rollback SLOT", file=sys.stderr)
            return 2
        else:
            link = promote(ns.bundle, ns.models_dir, name=ns.name)
    except (BundleError, OSError) as exc:
        print(f"echonode-train promote: {exc}", file=sys.stderr)
        return 2
    meta = json.loads((link / "bundle.json").read_text())
    print(f"installed {meta['name']} {meta['version']} (task {meta['task']}) as {link} -> {os.readlink(link)}")
    return 0
