"""The demo's synthetic studies: a held-out set, two studies picked by their anatomy, and what to expect of each.

The studies the demo sends come from a synthetic archive of their own seed
(:data:`HELDOUT_SEED`), never one the demo models were trained, validated or
tested on. Two are picked by their *true* anatomy from ``labels.csv``, never
by what a model says of them: a clear LVH study (thicker wall at least
:data:`CLEAR_LVH_CM`) and a clear normal one (both walls at most
:data:`CLEAR_NORMAL_CM`). The seed was chosen, before any model saw it, as
one whose first two patients have one study each and one of each kind, so
the demo renders two studies and no more. Picking by anatomy is fair;
picking by the model's output would be choosing the model's answer.

This module reads CSV and does arithmetic only: the node-side demo imports
it, and it never imports ``train``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CLEAR_LVH_CM",
    "CLEAR_NORMAL_CM",
    "HELDOUT_PATIENTS",
    "HELDOUT_SEED",
    "LVH_NEGATIVE_MAX_P",
    "LVH_POSITIVE_MIN_P",
    "DemoStudy",
    "lvh_verdict",
    "pick_demo_studies",
    "read_truth",
]

HELDOUT_SEED = 2216
"""Seed of the held-out archive (the training archives use other seeds)."""
HELDOUT_PATIENTS = 2
"""Patients rendered from it: one study each at this seed."""
CLEAR_LVH_CM = 1.7
"""A clear LVH study: its thicker wall (IVSd or LVPWd) is at least this."""
CLEAR_NORMAL_CM = 1.0
"""A clear normal study: both walls are at most this (LVH starts at 1.2 cm)."""
LVH_POSITIVE_MIN_P = 0.8
"""What the demo expects of the LVH model on the clear LVH study."""
LVH_NEGATIVE_MAX_P = 0.2
"""What the demo expects of the LVH model on the clear normal study."""


@dataclass(frozen=True)
class DemoStudy:
    """One synthetic study's true anatomy, as ``labels.csv`` states it.

    Attributes
    ----------
    study_uid, accession : str
    ivs_cm, lvpw_cm : float
        True end-diastolic septum and posterior wall thickness.
    av_cusp_sep_cm : float
        True aortic cusp separation at mid-systole.
    av_vmax_m_s : float or None
        Aortic valve peak velocity of the study's measurement SR (None when
        the archive has no such column).
    lvh, severe_as : bool
        The labels, from the anatomy (METHOD.md).
    """

    study_uid: str
    accession: str
    ivs_cm: float
    lvpw_cm: float
    av_cusp_sep_cm: float
    av_vmax_m_s: float | None
    lvh: bool
    severe_as: bool

    @property
    def thicker_wall_cm(self) -> float:
        """The thicker of IVSd and LVPWd, the wall that decides LVH."""
        return max(self.ivs_cm, self.lvpw_cm)

    def truth_line(self) -> str:
        """The true measurements in one line, as a reader compares them with the SR."""
        vmax = "" if self.av_vmax_m_s is None else f", AV Vmax {self.av_vmax_m_s:.2f} m/s"
        return (f"IVSd {self.ivs_cm:.2f} cm, LVPWd {self.lvpw_cm:.2f} cm "
                f"(LVH: {'yes' if self.lvh else 'no'}, threshold 1.2 cm); "
                f"aortic cusp separation {self.av_cusp_sep_cm:.2f} cm{vmax} "
                f"(severe AS: {'yes' if self.severe_as else 'no'}, under 0.8 cm)")


def _float(row: dict[str, str], key: str) -> float | None:
    value = (row.get(key) or "").strip()
    return float(value) if value else None


def read_truth(labels_csv: Path) -> list[DemoStudy]:
    """Every study of a synthetic archive's ``labels.csv``, with its true anatomy.

    Parameters
    ----------
    labels_csv : pathlib.Path
        ``labels.csv`` written by ``echonode-train synth``.

    Returns
    -------
    list of DemoStudy
        In file order.

    Raises
    ------
    ValueError
        When a row lacks the anatomy columns (not a synthetic archive).
    """
    studies = []
    with Path(labels_csv).open(newline="") as fh:
        for row in csv.DictReader(fh):
            ivs, lvpw, sep = (_float(row, k) for k in ("ivs_cm", "lvpw_cm", "av_cusp_sep_cm"))
            if ivs is None or lvpw is None or sep is None:
                raise ValueError(f"{labels_csv}: study {row.get('study_uid')} has no true anatomy "
                                 "(ivs_cm, lvpw_cm, av_cusp_sep_cm): not a synthetic archive")
            studies.append(DemoStudy(
                study_uid=row["study_uid"], accession=row.get("accession_number", ""), ivs_cm=ivs,
                lvpw_cm=lvpw, av_cusp_sep_cm=sep, av_vmax_m_s=_float(row, "av_vmax_m_s"),
                lvh=row.get("lvh") == "1", severe_as=row.get("severe_as") == "1",
            ))
    return studies


def pick_demo_studies(studies: list[DemoStudy]) -> tuple[DemoStudy, DemoStudy]:
    """The clearest LVH study and the clearest normal one, by their anatomy alone.

    Parameters
    ----------
    studies : list of DemoStudy

    Returns
    -------
    (DemoStudy, DemoStudy)
        The study with the thickest wall, at least :data:`CLEAR_LVH_CM`;
        the study with the thinnest thicker wall, at most
        :data:`CLEAR_NORMAL_CM`.

    Raises
    ------
    ValueError
        When the archive has no such study.
    """
    lvh = max((s for s in studies if s.thicker_wall_cm >= CLEAR_LVH_CM), key=lambda s: s.thicker_wall_cm,
              default=None)
    normal = min((s for s in studies if s.thicker_wall_cm <= CLEAR_NORMAL_CM), key=lambda s: s.thicker_wall_cm,
                 default=None)
    if lvh is None or normal is None:
        missing = (f"a wall of at least {CLEAR_LVH_CM:.1f} cm" if lvh is None
                   else f"walls of at most {CLEAR_NORMAL_CM:.1f} cm")
        raise ValueError(f"no study with {missing} among {len(studies)} held-out studies")
    return lvh, normal


def lvh_verdict(study: DemoStudy, probability: float | None) -> tuple[bool, str]:
    """Whether the LVH model did what the demo expects of it on ``study``, and a line that says so.

    Parameters
    ----------
    study : DemoStudy
        A study from :func:`pick_demo_studies`.
    probability : float or None
        The LVH probability the SR reports (None when not assessed).

    Returns
    -------
    (bool, str)
        True when a positive got at least :data:`LVH_POSITIVE_MIN_P` or a
        negative at most :data:`LVH_NEGATIVE_MAX_P`; the line names the
        expectation and the result either way.
    """
    if study.lvh:
        wanted, met = f">= {LVH_POSITIVE_MIN_P:g} (called present)", (
            probability is not None and probability >= LVH_POSITIVE_MIN_P)
    else:
        wanted, met = f"<= {LVH_NEGATIVE_MAX_P:g} (called absent)", (
            probability is not None and probability <= LVH_NEGATIVE_MAX_P)
    got = "not assessed" if probability is None else f"{probability:.3f}"
    return met, f"LVH probability {got}, expected {wanted}: {'as expected' if met else 'NOT MET'}"
