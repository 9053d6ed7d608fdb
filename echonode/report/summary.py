"""The report in plain language: one line per finding, and numbers rounded to what they mean.

A viewer that renders SR (dcmtk's ``dsr2html``, most PACS viewers) shows the
content tree in order, values without their concept names where a container
says its content is continuous. These lines go first in the report
(:mod:`echonode.report.build`) so that the verdict is what a reader sees
first::

    Left ventricular hypertrophy: not detected by the AI model (probability
    0.43, threshold 0.50, 2 parasternal long-axis videos). Not for diagnostic use.

A probability is a model's score, not a measurement to 14 digits: the report
carries it to 3 decimals and the line to 2 (more when the threshold has
more). Rounding never crosses the threshold: a probability just under it
is rounded down, one at or over it never below it, so that the number a
reader sees agrees with the verdict beside it.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal

from echonode.report.codes import TASKS, VIEWS
from echonode.report.findings import NotAssessed, TaskFinding

__all__ = [
    "DISCLAIMER_SHORT",
    "PROBABILITY_DECIMALS",
    "finding_line",
    "finding_name",
    "not_assessed_line",
    "probability_text",
    "reported_probability",
    "view_phrase",
]

#: Decimals of a probability in the report's numeric content.
PROBABILITY_DECIMALS = 3

#: The sentence every line ends with.
DISCLAIMER_SHORT = "Not for diagnostic use."


def _quantize(value: float, decimals: int, rounding: str) -> Decimal:
    return Decimal(repr(float(value))).quantize(Decimal(1).scaleb(-decimals), rounding=rounding)


def _rounded(probability: float, threshold: float, decimals: int) -> Decimal:
    """``probability`` to ``decimals``, on the same side of ``threshold`` as the unrounded value."""
    present = probability >= threshold
    limit = Decimal(repr(float(threshold)))
    value = _quantize(probability, decimals, ROUND_HALF_UP)
    if present and value < limit:
        value = _quantize(probability, decimals, ROUND_CEILING)
    elif not present and value >= limit:
        value = _quantize(probability, decimals, ROUND_FLOOR)
    return value


def reported_probability(probability: float, threshold: float | None = None) -> float:
    """A probability as the report's numeric content carries it.

    Parameters
    ----------
    probability : float
        In [0, 1].
    threshold : float, optional
        The decision threshold; when given, the rounding never moves the
        value to the other side of it.

    Returns
    -------
    float
        ``probability`` to :data:`PROBABILITY_DECIMALS` decimals.
    """
    if threshold is None:
        return float(_quantize(probability, PROBABILITY_DECIMALS, ROUND_HALF_UP))
    return float(_rounded(probability, threshold, PROBABILITY_DECIMALS))


def _threshold_decimals(threshold: float) -> int:
    """2, or as many as the threshold needs to be shown exactly (at most 4)."""
    text = f"{threshold:.6g}"
    decimals = len(text.partition(".")[2]) if "e" not in text else 4
    return max(2, min(decimals, 4))


def probability_text(probability: float, threshold: float) -> tuple[str, str]:
    """The probability and the threshold as a line shows them.

    Returns
    -------
    tuple of str
        ``("0.43", "0.50")``: both with the same decimals (2, or what the
        threshold needs), the probability rounded on its side of the
        threshold.
    """
    decimals = _threshold_decimals(threshold)
    return (
        str(_rounded(probability, threshold, decimals)),
        str(_quantize(threshold, decimals, ROUND_HALF_UP)),
    )


def finding_name(task: str) -> str:
    """The finding a task reports, as a reader says it ("Severe aortic stenosis")."""
    codes = TASKS[task]
    name = codes.finding.meaning
    if codes.severity is not None:
        name = f"{codes.severity.meaning} {name[:1].lower()}{name[1:]}"
    return name


def view_phrase(label: str) -> str:
    """A view label as an adjective ("parasternal long-axis"); an unknown one as itself."""
    view = VIEWS.get(label)
    return view.phrase if view is not None else f"{label}-view"


def _videos_text(finding: TaskFinding) -> str:
    """``2 parasternal long-axis videos``, ``3 videos: 2 parasternal long-axis, 1 apical four-chamber``."""
    n = finding.n_videos
    noun = "video" if n == 1 else "videos"
    views = collections.Counter(s.view for s in finding.sources)
    if None in views or sum(views.values()) != n:
        return f"{n} {noun}"
    if len(views) == 1:
        (label,) = views
        return f"{n} {view_phrase(str(label))} {noun}"
    parts = [f"{count} {view_phrase(str(label))}" for label, count in sorted(views.items(), key=lambda kv: -kv[1])]
    return f"{n} {noun}: {', '.join(parts)}"


def finding_line(finding: TaskFinding) -> str:
    """The plain-language line of an assessed finding.

    Parameters
    ----------
    finding : TaskFinding

    Returns
    -------
    str
        For example ``"Left ventricular hypertrophy: not detected by the AI
        model (probability 0.43, threshold 0.50, 2 parasternal long-axis
        videos). Not for diagnostic use."``
    """
    verdict = "detected" if finding.probability >= finding.threshold else "not detected"
    p, t = probability_text(finding.probability, finding.threshold)
    return (
        f"{finding_name(finding.task)}: {verdict} by the AI model "
        f"(probability {p}, threshold {t}, {_videos_text(finding)}). {DISCLAIMER_SHORT}"
    )


def _views_text(labels: Sequence[str]) -> str:
    phrases = [view_phrase(v) for v in labels]
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " or " + phrases[-1]


def not_assessed_line(item: NotAssessed) -> str:
    """The plain-language line of a task the models could not assess.

    Parameters
    ----------
    item : NotAssessed

    Returns
    -------
    str
        For example ``"Left ventricular hypertrophy: not assessed by the AI
        model (no parasternal long-axis video in the study). Not for
        diagnostic use."``
    """
    if item.reason == "no_required_view" and item.required_views:
        why = f"no {_views_text(item.required_views)} video in the study"
    elif item.reason == "no_required_view":
        why = "no video of the view the model needs in the study"
    elif item.reason == "no_measurable_video":
        why = "no video in the study that this model could measure"
    else:
        why = "no usable video in the study"
    return f"{finding_name(item.task)}: not assessed by the AI model ({why}). {DISCLAIMER_SHORT}"
