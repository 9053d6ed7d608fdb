"""Writing a synthetic archive: patients, studies, videos, measurement SRs, CSVs.

``dicom/<patient_id>/<accession>/<series_number:03d>.dcm`` holds the videos
(series 1, 2, ...) and the study's measurement SR (series 900); ``labels.csv``
has one row per study, ``videos.csv`` one per video, ``reports.csv`` one per
SR.  Every draw comes from a stream keyed by the seed and a purpose
(:func:`train.synth.truth.keyed_rng`): labels, patient, study, video, report.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from train import synth_reports
from train.synth import render, render_alt, render_fieldwarp, render_scatter
from train.synth.acquisition import (
    VIEWS,
    StudyPlan,
    plan_study,
    plan_video,
    study_views,
)
from train.synth.anatomy import Anatomy, sample_anatomy
from train.synth.dicom import build_dataset, encode_jpeg, uid
from train.synth.look import LOOKS, VARIED_LOOKS, vary_named
from train.synth.truth import (
    PURPOSE_LOOK,
    PURPOSE_PATIENT,
    PURPOSE_RENDERER,
    PURPOSE_REPORT,
    PURPOSE_STUDY,
    PURPOSE_VIDEO,
    StudyTruth,
    keyed_rng,
    sample_study_truths,
)

__all__ = [
    "LABEL_COLUMNS",
    "RENDERERS",
    "REPORT_COLUMNS",
    "VIDEO_COLUMNS",
    "ArchiveSummary",
    "fit_to_mass_index",
    "generate_archive",
    "parse_renderers",
]

RENDERERS: dict[str, Callable] = {"polar": render.render_video, "raster": render_alt.render_video,
                                   "scatter": render_scatter.render_video,
                                   "fieldwarp": render_fieldwarp.render_video}
"""Renderers by name: ``polar`` (:mod:`train.synth.render`, the default),
``raster`` (:mod:`train.synth.render_alt`), ``scatter``
(:mod:`train.synth.render_scatter`, moving point scatterers beamformed as RF)
and ``fieldwarp`` (:mod:`train.synth.render_fieldwarp`, a scattering field
carried by a cardiac deformation field and convolved on the screen's grid
with a beam-oriented point-spread function); the last three were written
apart, each without reading the others' drawing code, to measure transfer
on a rendering nobody tuned against."""


def parse_renderers(spec: str) -> tuple[str, ...]:
    """The renderers a ``synth --renderer`` value names, in its order.

    Parameters
    ----------
    spec : str
        One name of :data:`RENDERERS`, or several joined by commas
        (``"polar,raster"``): each study of the archive is then drawn by one
        of them, chosen with equal odds from a stream of its own.

    Returns
    -------
    tuple of str

    Raises
    ------
    ValueError
        If a name is unknown, repeated or missing.
    """
    names = tuple(n.strip() for n in str(spec).split(","))
    if not all(names) or len(set(names)) != len(names) or set(names) - set(RENDERERS):
        raise ValueError(f'Argument "renderer" must be one of {", ".join(RENDERERS)} or several of them joined '
                         f"by commas, got {spec!r}.")
    return names

LABEL_COLUMNS = ("patient_id", "study_uid", "accession_number", "study_date", "lvh", "severe_as",
                 "ivs_cm", "lvpw_cm", "lvid_cm", "av_cusp_sep_cm",
                 # CONTRACT.md's measurement columns, the values of the study's SR.
                 "ivsd_cm", "lvpwd_cm", "lvidd_cm", "lv_mass_index_g_m2", "av_vmax_m_s",
                 "av_mean_gradient_mmhg", "av_area_cm2")
VIDEO_COLUMNS = ("patient_id", "study_uid", "series_uid", "sop_uid", "view", "path", "frames", "fps")
REPORT_COLUMNS = ("patient_id", "study_uid", "series_uid", "sop_uid", "dialect", "path")


@dataclass
class ArchiveSummary:
    """What :func:`generate_archive` wrote."""

    out_dir: Path
    patients: int
    studies: int
    videos: int
    lvh_studies: int
    severe_as_studies: int
    frames: int
    seconds: float
    reports: int = 0
    report_seconds: float = 0.0
    renderer: str = "polar"
    look: str = "standard"
    labels_csv: Path = field(init=False)
    videos_csv: Path = field(init=False)
    reports_csv: Path = field(init=False)

    def __post_init__(self) -> None:
        self.labels_csv = self.out_dir / "labels.csv"
        self.videos_csv = self.out_dir / "videos.csv"
        self.reports_csv = self.out_dir / "reports.csv"


def fit_to_mass_index(truth: StudyTruth, body: synth_reports.Body) -> StudyTruth:
    """``truth`` with normal walls thinned, if need be, so that the LV mass
    index does not call LVH either (:func:`train.synth_reports.fit_normal_walls`)."""
    ivs, lvpw = synth_reports.fit_normal_walls(truth.ivs_cm, truth.lvpw_cm, truth.lvid_cm, body)
    if (ivs, lvpw) == (truth.ivs_cm, truth.lvpw_cm):
        return truth
    return dataclasses.replace(truth, ivs_cm=ivs, lvpw_cm=lvpw)


@dataclass
class _Patient:
    pid: str
    sex: str
    height: float
    weight: float
    chest_cm: float
    birth_year: int
    birth: str
    body: synth_reports.Body
    lvot_cm: float


def _patient(seed: int, p: int, r: np.random.Generator) -> _Patient:
    sex = "F" if r.random() < 0.5 else "M"
    height = float(r.uniform(1.50, 1.75) if sex == "F" else r.uniform(1.62, 1.92))
    bmi = float(r.uniform(18.5, 38.0))
    weight = bmi * height ** 2
    # Chest wall thickness follows body habitus, never the labels.
    chest = float(np.clip(0.8 + (bmi - 18.5) / 20.0 * 1.2 + r.uniform(-0.2, 0.2), 0.8, 2.2))
    birth_year = int(r.integers(1935, 2000))
    birth = f"{birth_year:04d}{int(r.integers(1, 13)):02d}{int(r.integers(1, 29)):02d}"
    # The patient as the headers state it: the SR's BSA is recomputable from them.
    body = synth_reports.Body(sex=sex, height_m=float(f"{height:.2f}"), weight_kg=float(f"{weight:.1f}"))
    lvot_cm = synth_reports.draw_lvot_diameter(keyed_rng(seed, PURPOSE_REPORT, p), sex)
    return _Patient(f"SYN{p + 1:04d}", sex, height, weight, chest, birth_year, birth, body, lvot_cm)


@dataclass
class _Writer:
    """Everything one archive run shares, and what it has written."""

    out_dir: Path
    seed: int
    frames: int | None
    rows: int
    cols: int
    quality: int
    renderers: tuple[str, ...]
    views: tuple[str, ...] | None
    tag: str
    reports: bool = True
    look: str = "standard"
    label_rows: list[dict] = field(default_factory=list)
    video_rows: list[dict] = field(default_factory=list)
    report_rows: list[dict] = field(default_factory=list)
    n_frames: int = 0
    report_seconds: float = 0.0

    def study(self, p: int, s: int, pat: _Patient, truth: StudyTruth) -> None:
        sr = keyed_rng(self.seed, PURPOSE_STUDY, p, s)
        truth = fit_to_mass_index(truth, pat.body)
        an = sample_anatomy(truth, sr, pat.chest_cm)
        day = int(sr.integers(0, 5 * 365))
        study_date = str(np.datetime64("2019-01-01") + np.timedelta64(day, "D")).replace("-", "")
        study_time = f"{int(sr.integers(7, 18)):02d}{int(sr.integers(0, 60)):02d}{int(sr.integers(0, 60)):02d}"
        plan = plan_study(sr)
        study_uid = uid(self.seed, "study", p, s)
        accession = f"SY{self.tag}{p + 1:04d}{s + 1:02d}"
        age = int(study_date[:4]) - pat.birth_year
        ctx = {
            "study_uid": study_uid, "accession": accession, "study_id": str(s + 1),
            "study_date": study_date, "study_time": study_time,
            "patient_name": f"SYNTH^P{p + 1:04d}", "patient_id": pat.pid, "birth_date": pat.birth,
            "sex": pat.sex, "age": f"{age:03d}Y", "height_m": pat.height, "weight_kg": pat.weight,
            "referring": f"REFERRER^R{int(sr.integers(1, 20)):02d}",
        }
        header = {"initials": f"P{p + 1:04d} S.", "date": f"{study_date[6:8]}/{study_date[4:6]}/{study_date[:4]}"}
        measured = synth_reports.measure_study(
            ivs_cm=truth.ivs_cm, lvpw_cm=truth.lvpw_cm, lvid_cm=truth.lvid_cm,
            av_cusp_sep_cm=truth.av_cusp_sep_cm, body=pat.body, age_years=age, lvot_diameter_cm=pat.lvot_cm,
            heart_rate_bpm=plan.heart_rate_bpm, rng=keyed_rng(self.seed, PURPOSE_REPORT, p, s),
        )
        self.label_rows.append({
            "patient_id": pat.pid, "study_uid": study_uid, "accession_number": accession,
            "study_date": study_date, "lvh": int(truth.lvh), "severe_as": int(truth.severe_as),
            "ivs_cm": f"{truth.ivs_cm:.3f}", "lvpw_cm": f"{truth.lvpw_cm:.3f}",
            "lvid_cm": f"{truth.lvid_cm:.3f}", "av_cusp_sep_cm": f"{truth.av_cusp_sep_cm:.3f}",
            **measured.label_columns(),
        })
        views = study_views(sr)
        # A study comes from one scanner, so one renderer draws all of it.
        renderer = self.renderers[0] if len(self.renderers) == 1 else \
            self.renderers[int(keyed_rng(self.seed, PURPOSE_RENDERER, p, s).integers(len(self.renderers)))]
        evidence = [self.video(p, s, k, view, an, plan, ctx, header, renderer) for k, view in enumerate(views)
                    if self.views is None or view in self.views]
        if self.reports:
            self.report(p, s, pat, ctx, plan, measured, evidence)

    def video(self, p: int, s: int, k: int, view: str, an: Anatomy, study: StudyPlan, ctx: dict,
              header: dict[str, str], renderer: str) -> Dataset:
        vr = keyed_rng(self.seed, PURPOSE_VIDEO, p, s, k)
        plan = plan_video(vr, view, k + 1, study, self.frames, int(vr.integers(0, 2**63)))
        if self.look in VARIED_LOOKS and renderer == "polar":
            plan = vary_named(plan, keyed_rng(self.seed, PURPOSE_LOOK, p, s, k), self.look)
        rgb, geo, _ = RENDERERS[renderer](an, plan, self.rows, self.cols, header)
        jpegs = [encode_jpeg(f, self.quality) for f in rgb]
        ctx["series_uid"] = uid(self.seed, "series", p, s, k)
        ctx["sop_uid"] = uid(self.seed, "sop", p, s, k)
        ds = build_dataset(ctx, plan, geo, jpegs, rgb.nbytes)
        rel = Path("dicom") / ctx["patient_id"] / ctx["accession"] / f"{plan.series_number:03d}.dcm"
        (self.out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(self.out_dir / rel, enforce_file_format=True)
        del ds.PixelData  # the header stays, as the measurement SR's evidence
        self.video_rows.append({
            "patient_id": ctx["patient_id"], "study_uid": ctx["study_uid"], "series_uid": ctx["series_uid"],
            "sop_uid": ctx["sop_uid"], "view": view, "path": rel.as_posix(),
            "frames": plan.frames, "fps": plan.fps,
        })
        self.n_frames += plan.frames
        return ds

    def report(self, p: int, s: int, pat: _Patient, ctx: dict, plan: StudyPlan,
               measured: synth_reports.EchoMeasurements, evidence: list[Dataset]) -> None:
        t_report = time.perf_counter()
        report = synth_reports.build_measurement_report(
            plan.vendor.report_dialect, measured, evidence,
            series_uid=uid(self.seed, "report-series", p, s), sop_uid=uid(self.seed, "report-sop", p, s),
            rng=keyed_rng(self.seed, PURPOSE_REPORT, p, s, 1),
        )
        rel = Path("dicom") / pat.pid / ctx["accession"] / f"{synth_reports.REPORT_SERIES_NUMBER:03d}.dcm"
        (self.out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        report.save_as(self.out_dir / rel, enforce_file_format=True)
        self.report_rows.append({
            "patient_id": pat.pid, "study_uid": ctx["study_uid"], "series_uid": report.SeriesInstanceUID,
            "sop_uid": report.SOPInstanceUID, "dialect": plan.vendor.report_dialect, "path": rel.as_posix(),
        })
        self.report_seconds += time.perf_counter() - t_report


def _check_arguments(patients: object, frames: int | None, rows: int, cols: int, renderer: str,
                     views: Sequence[str] | None, look: str = "standard") -> None:
    if not isinstance(patients, int) or isinstance(patients, bool) or patients < 1:
        raise ValueError('Argument "patients" must be a positive integer.')
    if frames is not None and frames < 1:
        raise ValueError('Argument "frames" must be a positive integer or None.')
    if rows < 120 or cols < 160:
        raise ValueError('Arguments "rows" and "cols" must be at least 120 and 160.')
    names = parse_renderers(renderer)
    if views is not None and (not views or set(views) - set(VIEWS)):
        raise ValueError(f'Argument "views" must name some of {", ".join(VIEWS)}, got {list(views)!r}.')
    if look not in LOOKS:
        raise ValueError(f'Argument "look" must be one of {", ".join(LOOKS)}, got {look!r}.')
    if look != "standard" and "polar" not in names:
        raise ValueError(f'Argument "look" {look!r} is renderer polar\'s; renderer {renderer!r} draws its own '
                         "fixed look (it is another rendering that transfer is measured on).")


def generate_archive(out_dir: Path, patients: int, seed: int = 0, *, frames: int | None = None,
                     rows: int = 480, cols: int = 640, quality: int = 75, renderer: str = "polar",
                     views: Sequence[str] | None = None, reports: bool = True,
                     look: str = "standard") -> ArchiveSummary:
    """Write a synthetic echo archive.

    Parameters
    ----------
    out_dir : pathlib.Path
        Destination; created if missing.  Files:
        ``dicom/<patient_id>/<accession>/<series_number:03d>.dcm`` (the
        videos, series 1, 2, ..., and the measurement SR, series 900),
        ``labels.csv`` (one row per study), ``videos.csv`` (one per video)
        and ``reports.csv`` (one per measurement SR).
    patients : int
        Number of patients (each gets 1-3 studies of 3-5 videos).
    seed : int
        Everything, UIDs included, is a function of the seed.
    frames : int, optional
        Frames per video; default 40-64 (about two heartbeats).
    rows, cols : int
        Image size.
    quality : int
        JPEG quality.
    renderer : str
        A name in :data:`RENDERERS`, or several joined by commas
        (:func:`parse_renderers`: each study drawn by one of them).  The
        anatomy, labels, headers and SRs of a seed are the same whichever
        renderer draws the pixels.
    views : sequence of str, optional
        Write only videos of these views (the studies, labels and SRs are
        unchanged); None for every view.
    reports : bool
        Write each study's measurement SR (series 900). Without them the
        archive is videos only; ``labels.csv`` still carries the values the
        SR would hold, drawn the same way, so labels and images are those
        of the same seed with reports.
    look : str
        A name in :data:`~train.synth.look.LOOKS`: ``"standard"`` (each
        scanner's own look), ``"varied"`` (renderer ``polar``'s videos only: a look
        per video from the wide ranges of :mod:`train.synth.look`, drawn from
        a stream of its own, so everything but the pixels is the standard
        archive's) or ``"varied-valves"`` (that, and the valve leaflets' echo
        strength, calcium contrast and bloom drawn per video too) or
        ``"varied-leaflets"`` (that, and half the videos' leaflets faded into
        the tissue's decibel blur) or ``"varied-walls"`` (the varied-valves
        look with every tissue edge moved in or out by up to a few
        millimetres).

    Returns
    -------
    ArchiveSummary

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    _check_arguments(patients, frames, rows, cols, renderer, views, look)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(f"echonode-synth|{seed}".encode()).hexdigest()[:4].upper()
    w = _Writer(out_dir, seed, frames, rows, cols, quality, parse_renderers(renderer),
                None if views is None else tuple(views), tag, reports, look)
    prng = [keyed_rng(seed, PURPOSE_PATIENT, p) for p in range(patients)]
    n_studies = [int(r.integers(1, 4)) for r in prng]
    truths = sample_study_truths(seed, n_studies)
    for p in range(patients):
        pat = _patient(seed, p, prng[p])
        for s in range(n_studies[p]):
            w.study(p, s, pat, truths[p][s])
    for name, cols_, rows_ in (("labels.csv", LABEL_COLUMNS, w.label_rows),
                               ("videos.csv", VIDEO_COLUMNS, w.video_rows),
                               ("reports.csv", REPORT_COLUMNS, w.report_rows)):
        with open(out_dir / name, "w", newline="") as fh:
            dw = csv.DictWriter(fh, fieldnames=cols_, lineterminator="\n")
            dw.writeheader()
            dw.writerows(rows_)
    return ArchiveSummary(
        out_dir=out_dir, patients=patients, studies=len(w.label_rows), videos=len(w.video_rows),
        lvh_studies=sum(r["lvh"] for r in w.label_rows),
        severe_as_studies=sum(r["severe_as"] for r in w.label_rows),
        frames=w.n_frames, seconds=time.perf_counter() - t0, reports=len(w.report_rows),
        report_seconds=w.report_seconds, renderer=renderer, look=look,
    )
