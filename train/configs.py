"""Typed run configurations, grouped by concern, stored as plain dicts.

A training command's settings are a frozen dataclass of groups (data,
model, optimisation, loss, run), each a frozen dataclass of its own, so code
reads ``config.optim.lr`` as a float instead of casting ``config["lr"]``.
Checkpoints and bundles keep storing them as one *flat* plain dict (the
keys are unique across groups): that is what ``weights_only`` loading
accepts, what older runs hold, and what a person reads in ``bundle.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["flat_dict", "from_flat", "from_namespace"]

_Config = TypeVar("_Config")


def _groups(cls: type) -> list[dataclasses.Field[Any]]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    return list(dataclasses.fields(cls))


def flat_dict(config: object) -> dict[str, object]:
    """``config`` as one flat plain dict (group names dropped).

    Raises
    ------
    ValueError
        If two groups define the same key.
    """
    flat: dict[str, object] = {}
    for group in _groups(type(config)):
        for item in dataclasses.fields(getattr(config, group.name)):
            if item.name in flat:
                raise ValueError(f"configuration key {item.name!r} is defined by two groups")
            flat[item.name] = getattr(getattr(config, group.name), item.name)
    return flat


def from_flat(cls: type[_Config], flat: Mapping[str, object]) -> _Config:
    """Build ``cls`` from a flat mapping (:func:`flat_dict`'s inverse).

    Keys ``flat`` lacks take the field's default; a key no group defines is
    ignored (a setting an older or newer release wrote).

    Raises
    ------
    TypeError
        If a key without a default is missing.
    """
    groups = {}
    for group in _groups(cls):
        group_cls = group.type if isinstance(group.type, type) else _resolve(cls, group.name)
        values = {f.name: flat[f.name] for f in dataclasses.fields(group_cls) if f.name in flat}
        groups[group.name] = group_cls(**values)
    return cls(**groups)


def from_namespace(cls: type[_Config], ns: argparse.Namespace, **overrides: object) -> _Config:
    """Build ``cls`` from parsed arguments named like its keys, with ``overrides``."""
    flat = {**vars(ns), **overrides}
    return from_flat(cls, flat)


def _resolve(cls: type, name: str) -> type:
    # Under ``from __future__ import annotations`` field types are strings.
    hints = typing.get_type_hints(cls)
    resolved = hints[name]
    if not isinstance(resolved, type):
        raise TypeError(f"{cls.__name__}.{name} must be a dataclass type")
    return resolved
