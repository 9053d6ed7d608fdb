"""Measurement units: UCUM codes to one unit per dimension.

An SR codes a NUM's unit in the Measurement Units Code Sequence, scheme
``UCUM`` (PS3.16 CID 7181 and the echo CIDs' unit constraints). UCUM codes
are case-sensitive (``mm[Hg]``, ``cm2``); a few spellings carts write that
are not UCUM but cannot be misread (``mmHg``, ``cm^2``) are accepted as
aliases. Anything else is refused with a reason, never guessed.

Values are converted to ``cm``, ``m/s``, ``mm[Hg]``, ``cm2``, ``g`` and
``g/m2`` and rounded to 9 decimals, so that 12 mm is exactly 1.2 cm when it
meets a threshold of 1.2.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CANONICAL_UNIT", "UCUM_SCHEMES", "Unit", "convert", "parse_unit"]

#: Coding scheme designators that mean UCUM (``UCUM`` with or without a version).
UCUM_SCHEMES = frozenset({"UCUM"})


@dataclass(frozen=True)
class Unit:
    """A recognised unit: its dimension and the factor to the dimension's unit."""

    ucum: str
    dimension: str
    factor: float


_UNITS: dict[str, Unit] = {
    u.ucum: u
    for u in (
        Unit("cm", "length", 1.0),
        Unit("mm", "length", 0.1),
        Unit("m", "length", 100.0),
        Unit("m/s", "velocity", 1.0),
        Unit("cm/s", "velocity", 0.01),
        Unit("mm/s", "velocity", 0.001),
        Unit("mm[Hg]", "pressure", 1.0),
        # 1 kPa = 1000 / 133.322387415 mmHg (UCUM's definition of mm[Hg]).
        Unit("kPa", "pressure", 1000.0 / 133.322387415),
        Unit("cm2", "area", 1.0),
        Unit("mm2", "area", 0.01),
        Unit("m2", "area", 10000.0),
        Unit("g", "mass", 1.0),
        Unit("kg", "mass", 1000.0),
        Unit("g/m2", "mass_per_area", 1.0),
        Unit("kg/m2", "mass_per_area", 1000.0),
    )
}

#: Other spellings of the same units: valid UCUM (a product with a negative exponent, a
#: parenthesised term) and spellings that are not UCUM but that carts write and that mean one unit only.
_ALIASES: dict[str, str] = {
    "m.s-1": "m/s",
    "cm.s-1": "cm/s",
    "mm.s-1": "mm/s",
    "g.m-2": "g/m2",
    "kg.m-2": "kg/m2",
    "g/(m2)": "g/m2",
    "kg/(m2)": "kg/m2",
    "mmHg": "mm[Hg]",
    "mm Hg": "mm[Hg]",
    "cm^2": "cm2",
    "mm^2": "mm2",
    "g/m^2": "g/m2",
    "cm/sec": "cm/s",
    "m/sec": "m/s",
}

#: The unit values of each dimension are converted to.
CANONICAL_UNIT: dict[str, str] = {
    "length": "cm",
    "velocity": "m/s",
    "pressure": "mm[Hg]",
    "area": "cm2",
    "mass": "g",
    "mass_per_area": "g/m2",
}


def parse_unit(scheme: str, value: str) -> Unit | None:
    """The :class:`Unit` of a Measurement Units code, or None when not recognised.

    Parameters
    ----------
    scheme : str
        Its Coding Scheme Designator; only UCUM is read.
    value : str
        Its Code Value (the UCUM expression).
    """
    if scheme.strip() not in UCUM_SCHEMES:
        return None
    text = value.strip()
    return _UNITS.get(_ALIASES.get(text, text))


def convert(value: float, unit: Unit) -> float:
    """``value`` in ``unit`` expressed in its dimension's canonical unit."""
    return round(value * unit.factor, 9)
