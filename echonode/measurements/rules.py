"""Labels from measurements: the LVH and severe-AS rules and their TOML file.

The rules live in a commented TOML file; the default ships beside this module
(``label_rules.toml``) and reads:

* ``lvh = 1`` when IVSd or LVPWd >= 1.2 cm, or the LV mass index > 115 g/m2
  (male) / > 95 g/m2 (female); ``0`` when neither holds and both walls are
  measured; empty otherwise.
* ``severe_as = 1`` when AV Vmax >= 4.0 m/s or the AV mean gradient >= 40 mmHg;
  empty when the AV area <= 1.0 cm2 while both stay under (low-gradient AS,
  which EchoCLR excluded); ``0`` when neither holds and Vmax is measured;
  empty otherwise.

Every decision carries its reason in words, with the values it used. A
measurement read differently by two image modes or methods (a 2D and an
M-mode IVSd) decides a label only when every reading gives the same label.
The node's agreement figures and ``echonode-train labels`` both call
:func:`decide_labels`, so a study gets one label wherever it is computed.
"""

from __future__ import annotations

import itertools
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from echonode.measurements.concepts import CONCEPTS_BY_KEY

__all__ = [
    "DEFAULT_RULES_FILE",
    "TASKS",
    "LabelDecision",
    "LvhRules",
    "Rules",
    "RulesError",
    "SevereAsRules",
    "decide_labels",
    "decide_lvh",
    "decide_severe_as",
    "load_rules",
    "parse_rules",
]

#: The labels the rules give, in labels.csv's column order.
TASKS: tuple[str, ...] = ("lvh", "severe_as")
#: The default rules file (package data).
DEFAULT_RULES_FILE = "label_rules.toml"

_COLUMN_TO_KEY = {c.column: c.key for c in CONCEPTS_BY_KEY.values()}


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class LvhRules:
    """The ``[lvh]`` table (None turns a criterion off)."""

    wall_thickness_cm: float | None = 1.2
    lv_mass_index_male_g_m2: float | None = 115.0
    lv_mass_index_female_g_m2: float | None = 95.0
    negative_requires: tuple[str, ...] = ("ivsd_cm", "lvpwd_cm")


@dataclass(frozen=True)
class SevereAsRules:
    """The ``[severe_as]`` table (None turns a criterion off)."""

    av_vmax_m_s: float | None = 4.0
    av_mean_gradient_mmhg: float | None = 40.0
    low_gradient_av_area_cm2: float | None = 1.0
    negative_requires: tuple[str, ...] = ("av_vmax_m_s",)


@dataclass(frozen=True)
class Rules:
    """Both tables, and where they were read from."""

    lvh: LvhRules = field(default_factory=LvhRules)
    severe_as: SevereAsRules = field(default_factory=SevereAsRules)
    source: str = "default"


@dataclass(frozen=True)
class LabelDecision:
    """One label of one study: 1, 0 or None (undecided), and why."""

    label: int | None
    reason: str


_TABLES: dict[str, tuple[type, dict[str, str], tuple[str, ...]]] = {
    # table -> (dataclass, numeric key -> what it is, columns negative_requires may name)
    "lvh": (
        LvhRules,
        {
            "wall_thickness_cm": "the wall thickness limit",
            "lv_mass_index_male_g_m2": "the male LV mass index limit",
            "lv_mass_index_female_g_m2": "the female LV mass index limit",
        },
        ("ivsd_cm", "lvpwd_cm", "lv_mass_index_g_m2"),
    ),
    "severe_as": (
        SevereAsRules,
        {
            "av_vmax_m_s": "the AV peak velocity limit",
            "av_mean_gradient_mmhg": "the AV mean gradient limit",
            "low_gradient_av_area_cm2": "the low-gradient AV area limit",
        },
        ("av_vmax_m_s", "av_mean_gradient_mmhg"),
    ),
}
#: Keys that make a label 1, per table: at least one must be given.
_POSITIVE = {
    "lvh": ("wall_thickness_cm", "lv_mass_index_male_g_m2"),
    "severe_as": ("av_vmax_m_s", "av_mean_gradient_mmhg"),
}


def parse_rules(data: Mapping[str, Any], source: str = "rules") -> Rules:
    """Check and convert a parsed rules document.

    Parameters
    ----------
    data : mapping
        What :func:`tomllib.loads` returned.
    source : str
        Where it came from, for messages.

    Returns
    -------
    Rules

    Raises
    ------
    RulesError
        Naming the table and key at fault.
    """
    unknown = sorted(set(data) - set(_TABLES))
    if unknown:
        raise RulesError(f"{source}: unknown table [{unknown[0]}] (known: {', '.join(f'[{t}]' for t in _TABLES)})")
    tables: dict[str, Any] = {}
    for name, (cls, numeric, columns) in _TABLES.items():
        table = data.get(name)
        if table is None:
            raise RulesError(f"{source}: missing table [{name}]")
        if not isinstance(table, Mapping):
            raise RulesError(f"{source}: [{name}] must be a table")
        allowed = set(numeric) | {"negative_requires"}
        for key in sorted(table):
            if key not in allowed:
                raise RulesError(f"{source}: unknown key [{name}] {key} (known: {', '.join(sorted(allowed))})")
        values: dict[str, Any] = {}
        for key in numeric:
            value = table.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
            ):
                raise RulesError(f"{source}: [{name}] {key} must be a positive number, got {value!r}")
            values[key] = float(value) if value is not None else None
        if not any(values.get(k) is not None for k in _POSITIVE[name]):
            raise RulesError(f"{source}: [{name}] has no criterion that makes the label 1 "
                             f"(give one of {', '.join(_POSITIVE[name])})")
        if name == "lvh" and (values["lv_mass_index_male_g_m2"] is None) != (values["lv_mass_index_female_g_m2"] is None):
            raise RulesError(f"{source}: [lvh] lv_mass_index_male_g_m2 and lv_mass_index_female_g_m2 go together")
        requires = table.get("negative_requires", [])
        if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
            raise RulesError(f"{source}: [{name}] negative_requires must be a list of column names")
        for column in requires:
            if column not in columns:
                raise RulesError(
                    f"{source}: [{name}] negative_requires names {column!r}; it may name {', '.join(columns)}"
                )
        values["negative_requires"] = tuple(requires)
        tables[name] = cls(**values)
    return Rules(lvh=tables["lvh"], severe_as=tables["severe_as"], source=source)


def load_rules(path: str | Path | None = None) -> Rules:
    """Read a rules file, or the default one when ``path`` is None.

    Raises
    ------
    RulesError
        When the file cannot be read, is not TOML, or a key is wrong.
    """
    if path is None:
        text = resources.files("echonode.measurements").joinpath(DEFAULT_RULES_FILE).read_text(encoding="utf-8")
        source = "default rules"
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise RulesError(f"{source}: cannot read the rules file ({exc.strerror or type(exc).__name__})") from exc
        except UnicodeDecodeError as exc:
            raise RulesError(f"{source}: the rules file is not UTF-8 text") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{source}: not valid TOML ({exc})") from exc
    return parse_rules(data, source)


def _fmt(value: float) -> str:
    return f"{value:g}"


def _missing(key: str, why: Mapping[str, str]) -> str:
    return why.get(key) or f"{CONCEPTS_BY_KEY[key].label}: not measured"


def decide_lvh(
    values: Mapping[str, float | None],
    sex: str | None,
    rules: LvhRules,
    why_missing: Mapping[str, str] | None = None,
) -> LabelDecision:
    """The LVH label of one study.

    Parameters
    ----------
    values : mapping
        Concept key (``ivsd``, ``lvpwd``, ``lv_mass_index`` ...) -> value in
        the concept's unit, or None.
    sex : {"M", "F", None}
        The patient's sex, for the LV mass index limits.
    rules : LvhRules
    why_missing : mapping, optional
        Concept key -> why its value is None (from the selection), for the reason.

    Returns
    -------
    LabelDecision
    """
    why = why_missing or {}
    ivsd, lvpwd, lvmi = values.get("ivsd"), values.get("lvpwd"), values.get("lv_mass_index")
    positive: list[str] = []
    notes: list[str] = []
    undecided: list[str] = []
    if rules.wall_thickness_cm is not None:
        limit = rules.wall_thickness_cm
        for name, value in (("IVSd", ivsd), ("LVPWd", lvpwd)):
            if value is None:
                continue
            if value >= limit:
                positive.append(f"{name} {_fmt(value)} cm >= {_fmt(limit)}")
            else:
                notes.append(f"{name} {_fmt(value)} cm < {_fmt(limit)}")
    male, female = rules.lv_mass_index_male_g_m2, rules.lv_mass_index_female_g_m2
    if male is not None and female is not None and lvmi is not None:
        if sex in ("M", "F"):
            limit = male if sex == "M" else female
            text = f"LV mass index {_fmt(lvmi)} g/m2 {'>' if lvmi > limit else '<='} {_fmt(limit)} ({sex})"
            (positive if lvmi > limit else notes).append(text)
        elif lvmi > max(male, female):
            positive.append(f"LV mass index {_fmt(lvmi)} g/m2 > {_fmt(max(male, female))} (either sex)")
        elif lvmi <= min(male, female):
            notes.append(f"LV mass index {_fmt(lvmi)} g/m2 <= {_fmt(min(male, female))} (either sex)")
        else:
            undecided.append(
                f"LV mass index {_fmt(lvmi)} g/m2 is between the female ({_fmt(female)}) and male ({_fmt(male)}) "
                "limits and the patient's sex is unknown"
            )
    if positive:
        return LabelDecision(1, "; ".join(positive))
    for column in rules.negative_requires:
        key = _COLUMN_TO_KEY[column]
        if values.get(key) is None:
            undecided.append(_missing(key, why))
    if undecided:
        return LabelDecision(None, "; ".join(undecided))
    if not notes:
        return LabelDecision(None, "no measurement the LVH rules use")
    return LabelDecision(0, "; ".join(notes))


def decide_severe_as(
    values: Mapping[str, float | None],
    rules: SevereAsRules,
    why_missing: Mapping[str, str] | None = None,
) -> LabelDecision:
    """The severe-AS label of one study (parameters as :func:`decide_lvh`, without sex)."""
    why = why_missing or {}
    vmax, gradient, area = values.get("av_vmax"), values.get("av_mean_gradient"), values.get("av_area")
    positive: list[str] = []
    notes: list[str] = []
    if rules.av_vmax_m_s is not None and vmax is not None:
        (positive if vmax >= rules.av_vmax_m_s else notes).append(
            f"AV Vmax {_fmt(vmax)} m/s {'>=' if vmax >= rules.av_vmax_m_s else '<'} {_fmt(rules.av_vmax_m_s)}"
        )
    if rules.av_mean_gradient_mmhg is not None and gradient is not None:
        limit = rules.av_mean_gradient_mmhg
        (positive if gradient >= limit else notes).append(
            f"AV mean gradient {_fmt(gradient)} mmHg {'>=' if gradient >= limit else '<'} {_fmt(limit)}"
        )
    if positive:
        return LabelDecision(1, "; ".join(positive))
    missing = [_missing(_COLUMN_TO_KEY[c], why) for c in rules.negative_requires if values.get(_COLUMN_TO_KEY[c]) is None]
    if rules.low_gradient_av_area_cm2 is not None and area is not None and area <= rules.low_gradient_av_area_cm2:
        small = f"AV area {_fmt(area)} cm2 <= {_fmt(rules.low_gradient_av_area_cm2)}"
        if not notes:
            # Neither velocity nor gradient: nothing says the gradient is low, so do not call it low-gradient AS.
            unmeasured = "; ".join(missing) if missing else "AV Vmax and mean gradient not measured"
            return LabelDecision(None, f"{unmeasured}; {small}, which alone does not decide")
        return LabelDecision(None, f"low-gradient AS, excluded: {small} while {'; '.join(notes)}")
    if missing:
        return LabelDecision(None, "; ".join(missing))
    if not notes:
        return LabelDecision(None, "no measurement the severe-AS rules use")
    return LabelDecision(0, "; ".join(notes))


#: The concepts each label's rules read (a span elsewhere cannot change it).
_TASK_CONCEPTS = {"lvh": ("ivsd", "lvpwd", "lv_mass_index"), "severe_as": ("av_vmax", "av_mean_gradient", "av_area")}


def decide_labels(
    values: Mapping[str, float | None],
    sex: str | None,
    rules: Rules,
    why_missing: Mapping[str, str] | None = None,
    spans: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, LabelDecision]:
    """``{"lvh": ..., "severe_as": ...}`` for one study (see :func:`decide_lvh`).

    Parameters
    ----------
    values, sex, rules, why_missing :
        As :func:`decide_lvh`.
    spans : mapping, optional
        Concept key -> ``(low, high)``: the readings of a measurement by
        different image modes or methods
        (:attr:`~echonode.measurements.selection.Selection.span`). A label
        is given only when it is the same at every combination of their
        ends; otherwise it is empty and the reason gives the readings.

    Returns
    -------
    dict
        Task -> :class:`LabelDecision`.
    """
    def decide(task: str, at: Mapping[str, float | None]) -> LabelDecision:
        if task == "lvh":
            return decide_lvh(at, sex, rules.lvh, why_missing)
        return decide_severe_as(at, rules.severe_as, why_missing)

    readings_of: Mapping[str, tuple[float, float]] = spans or {}
    decided: dict[str, LabelDecision] = {}
    for task in TASKS:
        decision = decide(task, values)
        spread = [k for k in _TASK_CONCEPTS[task] if readings_of.get(k) and values.get(k) is not None]
        labels = {decision.label}
        for ends in itertools.product(*(readings_of[k] for k in spread)):
            labels.add(decide(task, {**values, **dict(zip(spread, ends, strict=True))}).label)
        if len(labels) > 1:
            readings = "; ".join(
                f"{CONCEPTS_BY_KEY[k].label} {_fmt(readings_of[k][0])} to {_fmt(readings_of[k][1])} "
                f"{CONCEPTS_BY_KEY[k].unit}" for k in spread
            )
            decision = LabelDecision(
                None, f"the readings by different image modes or methods disagree on the label ({readings})"
            )
        decided[task] = decision
    return decided
