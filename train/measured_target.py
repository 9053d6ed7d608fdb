"""Fine-tuning on the sonographer's measurement instead of the label cut from it.

A binary label is a measurement cut at a threshold (LVH: the thicker of the
septum and the posterior wall at least 1.2 cm). Trained on the label alone, a
network has no reason to order two walls that are both clearly under the
threshold, or both clearly over it: its answer saturates on either side, and
on images drawn a little differently (a scanner or renderer whose walls look
thinner or thicker) the studies near the threshold fall into the flat part and
are ranked by noise. ``finetune --target measurement`` regresses the measured
value instead (z-scored on the training studies, mean squared error, early
stopping on the validation error), so the answer keeps its order across the
whole range; then a logistic fit of the label on the head's output over the
validation clips turns it into a probability of the label, folded into the
head so that the bundle is an ordinary binary bundle (one logit, a sigmoid,
a threshold) that the node and ``evaluate`` read as any other.

The measurements are ``labels.csv``'s CONTRACT columns, the values of the
study's own measurement SR (``echonode-train labels``, or ``synth``), never a
synthetic archive's drawn anatomy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "MEASURED_TARGETS",
    "TARGETS",
    "Calibration",
    "MeasuredTarget",
    "Standardiser",
    "constant_answer_mse",
    "fit_calibration",
    "fold_into_head",
    "study_measurements",
]

#: What ``finetune --target`` trains on: the task's label (the paper) or its measurement.
TARGETS = ("label", "measurement")


@dataclass(frozen=True)
class MeasuredTarget:
    """The measurement a binary task's label is cut from.

    Attributes
    ----------
    task : str
    columns : tuple of str
        ``labels.csv`` columns read; a study's value is the largest of those it has.
    unit : str
    description : str
        For messages and the bundle's provenance.
    """

    task: str
    columns: tuple[str, ...]
    unit: str
    description: str


#: Per binary task. LVH is the thicker wall (either wall at least 1.2 cm, METHOD.md); severe AS the
#: aortic valve's peak velocity (at least 4 m/s in the guidelines), the Doppler measurement every echo
#: lab reports (the valve area and mean gradient are derived from fewer studies' measurements).
MEASURED_TARGETS: dict[str, MeasuredTarget] = {
    "lvh": MeasuredTarget("lvh", ("ivsd_cm", "lvpwd_cm"), "cm", "the thicker of IVSd and LVPWd"),
    "severe_as": MeasuredTarget("severe_as", ("av_vmax_m_s",), "m/s", "the aortic valve's peak velocity"),
}


def _value(text: object) -> float | None:
    try:
        value = float(str(text).strip())
    except ValueError:
        return None
    # A measurement of a wall or a velocity is positive; 0 or less is a placeholder, not a value.
    return value if math.isfinite(value) and value > 0 else None


def study_measurements(rows: Sequence[Mapping[str, str]], target: MeasuredTarget) -> dict[str, float]:
    """Each study's measured value, for the studies that have one.

    Parameters
    ----------
    rows : sequence of mapping
        ``labels.csv`` rows.
    target : MeasuredTarget

    Returns
    -------
    dict
        Study UID -> the largest of the target's columns the study has a
        positive, finite number in; studies with none are left out.

    Raises
    ------
    ValueError
        When the labels have none of the target's columns.
    """
    if rows and not any(c in rows[0] for c in target.columns):
        raise ValueError(
            f"--target measurement for {target.task} reads {', '.join(target.columns)} ({target.description}), "
            f"and the labels file has none of them (columns: {', '.join(rows[0])}); labels.csv from "
            "'echonode-train labels' or 'synth' carries them"
        )
    out: dict[str, float] = {}
    for row in rows:
        values = [v for v in (_value(row.get(c, "")) for c in target.columns) if v is not None]
        if values:
            out[row["study_uid"]] = max(values)
    return out


@dataclass(frozen=True)
class Standardiser:
    """The z-score of a measurement: ``(value - mean) / sd`` of the training studies."""

    mean: float
    sd: float

    @classmethod
    def fit(cls, values: Sequence[float]) -> Standardiser:
        """From the training studies' values (one per study, so a study with many videos weighs once).

        Raises
        ------
        ValueError
            With fewer than two distinct values: nothing to regress.
        """
        v = np.asarray(values, dtype=float)
        if v.size < 2 or float(v.std()) == 0.0:
            raise ValueError(f"--target measurement needs training studies with different values; got {v.size} "
                             f"value(s){'' if v.size == 0 else f', all {v[0]:g}'}")
        return cls(float(v.mean()), float(v.std()))

    def __call__(self, value: float) -> float:
        return (value - self.mean) / self.sd


def constant_answer_mse(z: Sequence[float]) -> float:
    """The squared error of the best constant on ``z`` (their variance): what a model that measures nothing scores."""
    v = np.asarray(z, dtype=float)
    return float(v.var()) if v.size else math.nan


@dataclass(frozen=True)
class Calibration:
    """``logit = slope * output + intercept``: the label's log odds from the regression head's output."""

    slope: float
    intercept: float
    clips: int
    positives: int
    loss: float


def fit_calibration(outputs: np.ndarray, labels: np.ndarray, *, pos_weight: float | None = None,
                    l2: float = 1e-3) -> Calibration:
    """Logistic regression of the label on the head's output (Platt scaling).

    Parameters
    ----------
    outputs : numpy.ndarray
        ``(N,)`` the regression head's outputs, one per clip.
    labels : numpy.ndarray
        ``(N,)`` 0/1, each clip labelled with its study's label.
    pos_weight : float, optional
        Weight of the positives, as a label-trained run's loss weighs them,
        so that the probabilities answer for the same prevalence (one half
        with the default ``balanced`` weighting; the sample's with None).
    l2 : float
        A small penalty on the slope, for outputs that separate the
        classes exactly (with Platt's targets below the optimum is finite
        all the same).

    Returns
    -------
    Calibration

    Raises
    ------
    ValueError
        When the clips lack a class.

    Notes
    -----
    The targets are Platt's (1999): ``(N+ + 1) / (N+ + 2)`` for a positive
    and ``1 / (N- + 2)`` for a negative instead of 1 and 0, so that outputs
    which separate the classes give a finite slope whose confidence grows
    with the number of clips, not one set by the penalty alone.
    """
    x = torch.as_tensor(np.asarray(outputs, dtype=float), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels, dtype=float), dtype=torch.float64)
    positives = int(y.sum())
    if positives == 0 or positives == y.numel():
        raise ValueError(f"calibrating the measurement needs both classes among the validation clips "
                         f"({positives} positive of {y.numel()})")
    negatives = int(y.numel()) - positives
    soft = torch.where(y > 0.5, (positives + 1.0) / (positives + 2.0), 1.0 / (negatives + 2.0))
    centre, scale = float(x.mean()), max(float(x.std()), 1e-6)
    z = (x - centre) / scale
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([pos_weight or 1.0], dtype=torch.float64)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def loss_of() -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(w * z + b, soft, pos_weight=weight)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        slope = float(w) / scale
        return Calibration(slope, float(b) - slope * centre, int(y.numel()), positives, float(loss_of()))


@torch.no_grad()
def fold_into_head(fc: nn.Linear, calibration: Calibration) -> None:
    """Make a one-output head answer ``slope * output + intercept``, in place."""
    if fc.out_features != 1 or fc.bias is None:
        raise ValueError("fold_into_head needs a one-output head with a bias")
    fc.weight.mul_(calibration.slope)
    fc.bias.mul_(calibration.slope).add_(calibration.intercept)
