"""Lenient readers of header values: a number, or None when the element is absent, empty or not one.

A header written by a cart, a PACS or an anonymiser can hold an empty
string, a stray text, NaN or a multi-valued element where one number is
expected. The decoder, the frame timing and the region calibration all read
such values and treat "not a usable number" as "not stated".
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["as_float", "as_int"]


def as_float(value: Any) -> float | None:
    """``value`` as a finite float, or None."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def as_int(value: Any) -> int | None:
    """``value`` as an int, or None."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
