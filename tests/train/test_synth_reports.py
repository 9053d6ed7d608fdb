"""Tests for the synthetic archive's measurement SRs (train/synth_reports.py).

The archive tests read every SR back with pydicom and walk its content tree
here, with their own table of concepts (not the module's), the way a reader
of echo SRs would: the value the sonographer selected, else the one derived
as the mean, else the mean of the repeats; units converted from UCUM; the
finding site from the measurement or its section.  Those values must equal
``labels.csv``, and the labels must be what the default rules of ``labels``
give from them.
"""

from __future__ import annotations

import csv
import math
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from tests.peers import DCIODVFY, DSRDUMP, require_tool
from tests.report_support import strict_reading
from train import synth
from train import synth_reports as reports
from train.cache import load_study_labels
from train.synth import archive as synth_archive
from train.synth import dicom
from train.synth import truth as T

# Four patients, seed 9: nine studies, every dialect, LVH and severe AS present.
PATIENTS, SEED = 4, 9
PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
    "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
)

# The reader's view: concept -> the codes that carry it (and the finding site
# that must go with a generic code).  SRT codes compare equal to their SCT
# form in pydicom, so the GE-like dialect needs no table of its own.
CONCEPTS: dict[str, list[tuple[Code, Code | None]]] = {
    "ivsd_cm": [(codes.LN.InterventricularSeptumDiastolicThickness, None),
                (codes.LN.InterventricularSeptumDiastolicDimension2D, None)],
    "lvpwd_cm": [(codes.LN.LeftVentriclePosteriorWallDiastolicThickness, None),
                 (codes.LN.LeftVentricularPosteriorWallDiastolicThicknessByUS2D, None)],
    "lvidd_cm": [(codes.LN.LeftVentricleInternalEndDiastolicDimension, None),
                 (codes.LN.LeftVentricularInternalDiastolicDimension2D, None)],
    "lv_mass_index_g_m2": [(codes.LN.LeftVentricularMassDimensionMethod2DBSA, None)],
    "av_vmax_m_s": [(codes.LN.PeakSystolicVelocity, codes.SCT.AorticValve), (codes.LN.AorticValveVmax, None)],
    "av_mean_gradient_mmhg": [(codes.LN.MeanGradient, codes.SCT.AorticValve),
                              (codes.LN.AorticValveMeanGradient, None)],
    "av_area_cm2": [(codes.SCT.CardiovascularOrificeArea, codes.SCT.AorticValve),
                    (codes.LN.AorticValveAreaContinuityVTI, None)],
    "av_cusp_sep_cm": [(codes.LN.AorticValveCuspSeparation, None)],
    "lvot_diameter_cm": [(codes.SCT.CardiovascularOrificeDiameter, codes.SCT.LeftVentricleOutflowTract),
                         (codes.LN.LeftVentricularOutflowTractDimension2D, None)],
    "lvot_vmax_m_s": [(codes.LN.PeakSystolicVelocity, codes.SCT.LeftVentricleOutflowTract),
                      (codes.LN.LeftVentricularOutflowTractVmax, None)],
    "av_peak_gradient_mmhg": [(codes.LN.PeakGradient, codes.SCT.AorticValve),
                              (codes.LN.AorticValvePeakInstantaneousGradient, None)],
}
# To the unit labels.csv uses (cm, m/s, mmHg, cm2, g/m2).
TO_LABEL_UNIT = {"cm": 1.0, "mm": 0.1, "m/s": 1.0, "cm/s": 0.01, "mm[Hg]": 1.0, "cm2": 1.0, "mm2": 0.01,
                 "g/m2": 1.0}


# ------------------------------------------------------------ tree walking


def _code(seq_item: Dataset) -> Code:
    return Code(seq_item.CodeValue, seq_item.CodingSchemeDesignator, seq_item.CodeMeaning)


@dataclass
class Num:
    """One NUM content item as a reader sees it."""

    name: Code
    value: float
    text: str
    unit: str
    site: Code | None
    modifiers: list[tuple[Code, Code]] = field(default_factory=list)
    properties: list[tuple[Code, Code | str]] = field(default_factory=list)

    def modifier(self, name: Code) -> Code | None:
        return next((v for n, v in self.modifiers if n == name), None)

    def has(self, name: Code, value: Code) -> bool:
        """Whether a concept modifier ``name`` has the value ``value``."""
        found = self.modifier(name)
        return found is not None and found == value

    @property
    def selected(self) -> bool:
        return any(n == codes.DCM.SelectionStatus for n, _ in self.properties)


def _children(item: Dataset, relationship: str) -> Iterator[Dataset]:
    for child in item.get("ContentSequence", []):
        if child.RelationshipType == relationship:
            yield child


def walk(item: Dataset, site: Code | None = None) -> Iterator[Num]:
    """Every NUM under ``item``, with the finding site it or its section gives."""
    for child in item.get("ContentSequence", []):
        own_site = next((_code(c.ConceptCodeSequence[0]) for c in _children(child, "HAS CONCEPT MOD")
                         if c.ValueType == "CODE" and _code(c.ConceptNameCodeSequence[0]) == codes.SCT.FindingSite),
                        None)
        if child.ValueType == "CONTAINER":
            yield from walk(child, own_site or site)
        elif child.ValueType == "NUM" and child.RelationshipType == "CONTAINS":
            mv = child.MeasuredValueSequence[0]
            mods = [(_code(c.ConceptNameCodeSequence[0]), _code(c.ConceptCodeSequence[0]))
                    for c in _children(child, "HAS CONCEPT MOD") if c.ValueType == "CODE"]
            props: list[tuple[Code, Code | str]] = []
            for c in _children(child, "HAS PROPERTIES"):
                value = _code(c.ConceptCodeSequence[0]) if c.ValueType == "CODE" else str(c.get("TextValue", ""))
                props.append((_code(c.ConceptNameCodeSequence[0]), value))
            yield Num(_code(child.ConceptNameCodeSequence[0]), float(mv.NumericValue), str(mv.NumericValue),
                      mv.MeasurementUnitsCodeSequence[0].CodeValue, own_site or site, mods, props)


def concept_values(nums: list[Num], concept: str) -> list[Num]:
    out = []
    for n in nums:
        for code, site in CONCEPTS[concept]:
            if n.name == code and (site is None or n.site == site):
                out.append(n)
    return out


def read_value(nums: list[Num], concept: str) -> float:
    """The selected value, else the one derived as the mean, else the mean of all (label units)."""
    found = concept_values(nums, concept)
    assert found, f"{concept} not in the SR"
    values = {id(n): n.value * TO_LABEL_UNIT[n.unit] for n in found}
    selected = [n for n in found if n.selected]
    if selected:
        assert len({values[id(n)] for n in selected}) == 1
        return values[id(selected[0])]
    means = [n for n in found if n.has(codes.DCM.Derivation, codes.SCT.Mean)]
    if means:
        return values[id(means[0])]
    return float(np.mean(list(values.values())))


# ---------------------------------------------------------------- fixtures


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth-sr") / "a"
    summary = synth.generate_archive(out, PATIENTS, seed=SEED, frames=1, rows=120, cols=160)
    assert summary.reports == summary.studies
    return out


@pytest.fixture(scope="module")
def studies(archive: Path) -> list[dict]:
    """Per study: its labels row, reports row, video rows and the SR read back strictly."""
    labels = {r["study_uid"]: r for r in _read_csv(archive / "labels.csv")}
    videos = _read_csv(archive / "videos.csv")
    out = []
    with strict_reading():
        for row in _read_csv(archive / "reports.csv"):
            ds = pydicom.dcmread(archive / row["path"])
            out.append({
                "labels": labels[row["study_uid"]], "report": row, "ds": ds, "nums": list(walk(ds)),
                "videos": [v for v in videos if v["study_uid"] == row["study_uid"]],
            })
    return out


def _one_per_dialect(studies: list[dict]) -> dict[str, dict]:
    return {d: next(s for s in studies if s["report"]["dialect"] == d) for d in reports.DIALECTS}


# ----------------------------------------------------------------- archive


def test_every_study_has_one_sr_and_every_dialect_appears(archive: Path, studies: list[dict]) -> None:
    labels = _read_csv(archive / "labels.csv")
    assert sorted(s["report"]["study_uid"] for s in studies) == sorted(r["study_uid"] for r in labels)
    assert {s["report"]["dialect"] for s in studies} == set(reports.DIALECTS)
    # Vendors map to dialects one way only.
    for s in studies:
        vendor = next(v for v in synth.VENDORS if v.manufacturer == s["ds"].Manufacturer)
        assert vendor.report_dialect == s["report"]["dialect"]
    assert any(r["lvh"] == "1" for r in labels) and any(r["severe_as"] == "1" for r in labels)
    # The SR is a file of the archive like the videos: dicom/<patient>/<accession>/900.dcm.
    assert all(s["report"]["path"].endswith("/900.dcm") for s in studies)


def test_training_reads_the_wider_labels_csv(archive: Path) -> None:
    rows = load_study_labels(archive / "labels.csv")
    assert list(rows[0]) == list(synth.LABEL_COLUMNS)
    for column in ("ivsd_cm", "lvpwd_cm", "lvidd_cm", "lv_mass_index_g_m2", "av_vmax_m_s",
                   "av_mean_gradient_mmhg", "av_area_cm2"):
        assert all(float(r[column]) > 0 for r in rows), column
    assert all(r["lvh"] in ("0", "1") and r["severe_as"] in ("0", "1") for r in rows)


def test_sr_in_the_study_of_its_videos(archive: Path, studies: list[dict]) -> None:
    for s in studies:
        ds = s["ds"]
        video = pydicom.dcmread(archive / s["videos"][0]["path"], stop_before_pixels=True)
        for keyword in PATIENT_STUDY:
            assert ds.get(keyword) == video.get(keyword), keyword
        assert (ds.PatientSize, ds.PatientWeight) == (video.PatientSize, video.PatientWeight)
        assert ds.Modality == "SR" and ds.SeriesNumber == reports.REPORT_SERIES_NUMBER
        assert ds.SeriesInstanceUID not in {v["series_uid"] for v in s["videos"]}
        assert ds.SOPInstanceUID == s["report"]["sop_uid"] and ds.SeriesInstanceUID == s["report"]["series_uid"]
        # UIDs are the seed's: the same derivation as every other synth UID.
        p = int(ds.PatientID[3:]) - 1
        n = int(ds.AccessionNumber[-2:]) - 1
        assert ds.SOPInstanceUID == dicom.uid(SEED, "report-sop", p, n)
        # Evidence: exactly the study's videos.
        refs = {(r.ReferencedSOPInstanceUID, series.SeriesInstanceUID)
                for study in ds.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
        assert refs == {(v["sop_uid"], v["series_uid"]) for v in s["videos"]}
        assert ds.CompletionFlag == "COMPLETE" and ds.VerificationFlag == "UNVERIFIED"
        # No wall clock: the SR carries the exam's date and time.
        assert (ds.InstanceCreationDate, ds.ContentDate) == (ds.StudyDate, ds.StudyDate)


def test_sr_values_equal_labels_csv(studies: list[dict]) -> None:
    columns = ("ivsd_cm", "lvpwd_cm", "lvidd_cm", "lv_mass_index_g_m2", "av_vmax_m_s",
               "av_mean_gradient_mmhg", "av_area_cm2", "av_cusp_sep_cm")
    for s in studies:
        row = s["labels"]
        for column in columns:
            got = read_value(s["nums"], column)
            assert math.isclose(got, float(row[column]), abs_tol=1e-9), (s["report"]["dialect"], column, got, row)
        # The new columns are the truth the renderer drew.
        assert (row["ivsd_cm"], row["lvpwd_cm"], row["lvidd_cm"]) == (row["ivs_cm"], row["lvpw_cm"], row["lvid_cm"])


def _sex(ds: Dataset) -> str:
    for item in ds.ContentSequence:
        if _code(item.ConceptNameCodeSequence[0]) == codes.DCM.PatientCharacteristics:
            for c in item.ContentSequence:
                if _code(c.ConceptNameCodeSequence[0]) == codes.DCM.SubjectSex:
                    return str(c.ConceptCodeSequence[0].CodeValue)
    raise AssertionError("no Subject Sex in the SR")


def test_labels_are_what_the_rules_give_from_the_sr(studies: list[dict]) -> None:
    for s in studies:
        nums, row = s["nums"], s["labels"]
        vmax, mg = read_value(nums, "av_vmax_m_s"), read_value(nums, "av_mean_gradient_mmhg")
        ava = read_value(nums, "av_area_cm2")
        severe = vmax >= 4.0 or mg >= 40.0
        assert int(row["severe_as"]) == int(severe), (vmax, mg, row)
        assert severe or ava > 1.0, "low-gradient AS: labels would leave it empty"
        # Severe AS is both criteria at once, never one alone.
        assert (vmax >= 4.0) == (mg >= 40.0) == severe
        sex = _sex(s["ds"])
        assert sex == s["ds"].PatientSex
        wall = max(read_value(nums, "ivsd_cm"), read_value(nums, "lvpwd_cm")) >= 1.2
        mass = read_value(nums, "lv_mass_index_g_m2") > {"M": 115.0, "F": 95.0}[sex]
        assert int(row["lvh"]) == int(wall or mass)
        assert mass <= wall, "the mass-index rule calls LVH where the walls do not"


def test_physics_in_the_sr(studies: list[dict]) -> None:
    for s in studies:
        nums = s["nums"]
        vmax = read_value(nums, "av_vmax_m_s")
        lvot_v = read_value(nums, "lvot_vmax_m_s")
        lvot_area = math.pi / 4 * read_value(nums, "lvot_diameter_cm") ** 2
        ava = read_value(nums, "av_area_cm2")
        # Continuity, within the rounding of AVA (0.01 cm2) and Vmax (0.01 m/s).
        assert abs(ava * vmax - lvot_area * lvot_v) <= 0.005 * vmax + 0.005 * ava + 1e-9
        # Simplified Bernoulli: peak 4 V^2; mean of 4 v(t)^2 over the rounded envelope.
        assert read_value(nums, "av_peak_gradient_mmhg") == pytest.approx(4 * vmax**2, abs=0.05)
        assert read_value(nums, "av_mean_gradient_mmhg") == pytest.approx(8 / math.pi * vmax**2, abs=0.05)


# ---------------------------------------------------------------- dialects


def test_ge_dialect_doubles_with_selection_status_and_srt(studies: list[dict]) -> None:
    s = _one_per_dialect(studies)[reports.DIALECT_GE]
    ds = s["ds"]
    assert ds.SOPClassUID == reports.COMPREHENSIVE_SR
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "5200"
    assert _code(ds.ConceptNameCodeSequence[0]) == codes.DCM.AdultEchocardiographyProcedureReport
    for concept in CONCEPTS:
        found = concept_values(s["nums"], concept)
        assert len(found) == 2, concept
        assert found[0].text == found[1].text and [n.selected for n in found] == [False, True], concept
        assert found[1].properties[0][1] == codes.DCM.UserChosenValue
    # Sections per TID 5202: Findings containers with a Finding Site, modifiers in SRT.
    sections = [i for i in ds.ContentSequence if _code(i.ConceptNameCodeSequence[0]) == codes.DCM.Findings]
    assert len(sections) == 2
    site_mod = sections[0].ContentSequence[0]
    assert site_mod.ConceptNameCodeSequence[0].CodingSchemeDesignator == "SRT"
    assert _code(site_mod.ConceptNameCodeSequence[0]) == codes.SCT.FindingSite
    vmax = [n for n in concept_values(s["nums"], "av_vmax_m_s")]
    assert vmax[0].has(codes.SCT.ImageMode, codes.SCT.DopplerContinuousWave)
    assert {n.unit for c in CONCEPTS for n in concept_values(s["nums"], c)} == {"cm", "m/s", "mm[Hg]", "cm2", "g/m2"}


def test_philips_dialect_mm_repeats_and_private_codes(studies: list[dict]) -> None:
    s = _one_per_dialect(studies)[reports.DIALECT_PHILIPS]
    ds, nums = s["ds"], s["nums"]
    units = {c: {n.unit for n in concept_values(nums, c)} for c in CONCEPTS}
    assert units["ivsd_cm"] == units["lvidd_cm"] == units["av_cusp_sep_cm"] == {"mm"}
    assert units["av_vmax_m_s"] == {"cm/s"} and units["av_area_cm2"] == {"mm2"}
    for concept in ("ivsd_cm", "lvpwd_cm", "lvidd_cm", "av_cusp_sep_cm", "av_vmax_m_s"):
        found = concept_values(nums, concept)
        repeats = [n.value for n in found if n.modifier(codes.DCM.Derivation) is None]
        mean = [n.value for n in found if n.has(codes.DCM.Derivation, codes.SCT.Mean)]
        assert len(repeats) == 3 and len(set(repeats)) > 1 and len(mean) == 1, concept
        assert np.mean(repeats) == pytest.approx(mean[0], abs=1e-9), concept
        assert not any(n.selected for n in found)
    private = [n for n in nums if n.name.scheme_designator == reports.PRIVATE_SCHEME]
    assert len(private) >= 3
    assert [i.CodingSchemeDesignator for i in ds.CodingSchemeIdentificationSequence] == [reports.PRIVATE_SCHEME]
    # Modifiers in SCT here.
    sites = [n.modifier(codes.SCT.FindingSite) for n in nums]
    assert all(site.scheme_designator == "SCT" for site in sites if site is not None)


def test_tid5300_dialect_precoordinated_codes(studies: list[dict]) -> None:
    s = _one_per_dialect(studies)[reports.DIALECT_TID5300]
    ds, nums = s["ds"], s["nums"]
    assert ds.SOPClassUID == reports.ENHANCED_SR
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "5300"
    containers = {_code(i.ConceptNameCodeSequence[0]).value: i for i in ds.ContentSequence if i.ValueType == "CONTAINER"}
    pre = containers[codes.DCM.PreCoordinatedMeasurements.value]
    names = {_code(i.ConceptNameCodeSequence[0]) for i in pre.ContentSequence}
    for code in (codes.LN.AorticValveVmax, codes.LN.AorticValveMeanGradient, codes.LN.AorticValveAreaContinuityVTI,
                 codes.LN.InterventricularSeptumDiastolicDimension2D, codes.LN.LeftVentricularMassDimensionMethod2DBSA):
        assert code in names
    # Pre-coordinated: no Finding Site or other modifier, a Short Label on each.
    for item in pre.ContentSequence:
        kids = list(item.ContentSequence)
        assert all(k.RelationshipType == "HAS PROPERTIES" for k in kids)
        assert any(_code(k.ConceptNameCodeSequence[0]) == codes.DCM.ShortLabel for k in kids)
    vmax = concept_values(nums, "av_vmax_m_s")
    assert len(vmax) == 3 and sum(n.selected for n in vmax) == 1
    post = containers[codes.DCM.PostCoordinatedMeasurements.value]
    sep = post.ContentSequence[0]
    assert _code(sep.ConceptNameCodeSequence[0]) == codes.LN.AorticValveCuspSeparation
    mods = {_code(k.ConceptNameCodeSequence[0]) for k in sep.ContentSequence if k.RelationshipType == "HAS CONCEPT MOD"}
    assert {codes.DCM.MeasurementType, codes.SCT.FindingSite, codes.DCM.FindingObservationType,
            codes.DCM.MeasuredProperty} <= mods


def _codes_in(item: Dataset) -> Iterator[Dataset]:
    for keyword in ("ConceptNameCodeSequence", "ConceptCodeSequence", "MeasurementUnitsCodeSequence"):
        yield from item.get(keyword, [])
    for child in (*item.get("MeasuredValueSequence", []), *item.get("ContentSequence", [])):
        yield from _codes_in(child)


def test_every_code_is_from_pydicoms_dictionaries(studies: list[dict]) -> None:
    """Concept codes come from pydicom.sr.codedict (SRT through pydicom's SCT table);
    only the vendor's private codes and four UCUM units pydicom lacks are not."""
    from pydicom.sr import _concepts_dict, _snomed_dict

    concepts: dict[str, dict[str, dict[str, object]]] = _concepts_dict.concepts  # type: ignore[assignment]
    known = {(scheme, value) for scheme, names in concepts.items() for values in names.values() for value in values}
    outside = set()
    for s in _one_per_dialect(studies).values():
        for code in _codes_in(s["ds"]):
            key = (str(code.CodingSchemeDesignator), str(code.CodeValue))
            if key[0] == "SRT":
                key = ("SCT", _snomed_dict.mapping["SRT"][key[1]])
            if key not in known:
                outside.add(key)
    assert {k for k in outside if k[0] != reports.PRIVATE_SCHEME} == {
        ("UCUM", "m/s"), ("UCUM", "g"), ("UCUM", "g/m2"), ("UCUM", "m2")}


def test_highdicom_reads_every_dialect(studies: list[dict]) -> None:
    for d, s in _one_per_dialect(studies).items():
        cls = hd.sr.EnhancedSR if d == reports.DIALECT_TID5300 else hd.sr.ComprehensiveSR
        doc = cls.from_dataset(s["ds"])
        assert doc.SOPInstanceUID == s["ds"].SOPInstanceUID


def test_dciodvfy_reports_no_error_for_any_dialect(archive: Path, studies: list[dict]) -> None:
    require_tool(DCIODVFY)
    for d, s in _one_per_dialect(studies).items():
        proc = subprocess.run([DCIODVFY, str(archive / s["report"]["path"])], capture_output=True, text=True, check=False,
                              timeout=60)
        out = proc.stdout + proc.stderr
        errors = [line for line in out.splitlines() if "Error" in line]
        assert not errors, (d, errors)
        assert ("EnhancedSR" if d == reports.DIALECT_TID5300 else "ComprehensiveSR") in out


def test_dsrdump_reads_every_dialect(archive: Path, studies: list[dict]) -> None:
    require_tool(DSRDUMP)
    for d, s in _one_per_dialect(studies).items():
        proc = subprocess.run([DSRDUMP, str(archive / s["report"]["path"])], capture_output=True, text=True, check=False,
                              timeout=60)
        assert proc.returncode == 0, (d, proc.stderr)
        assert "Adult Echocardiography Procedure Report" in proc.stdout


# ----------------------------------------------------------------- physics


def test_bsa_and_lv_mass_formulas() -> None:
    # Mosteller from the header's values; ASE cube formula, 0.8 x 1.04 x (...) + 0.6 g.
    assert float(reports.Body("M", 1.70, 70.0).bsa_m2) == pytest.approx(math.sqrt(170 * 70 / 3600), abs=0.005)
    assert float(reports.lv_mass_g(1.0, 1.0, 5.0)) == pytest.approx(0.832 * (7.0**3 - 5.0**3) + 0.6, abs=0.05)


def test_aortic_valve_area_rises_with_cusp_separation() -> None:
    seps = np.linspace(0.1, 3.0, 300)
    dvi = np.array([reports.doppler_velocity_index(float(x)) for x in seps])
    assert np.all(np.diff(dvi) > 0)
    assert dvi.min() > 0.13 and dvi.max() < 0.95
    # The step at 0.8 cm is in the Doppler values only: severe keeps DVI <= 0.205,
    # anything from 0.8 cm on has DVI >= 0.42 (AVA > 1 cm2 for every LVOT: no low-gradient AS).
    assert dvi[seps < 0.8].max() <= 0.205 and dvi[seps >= 0.8].min() >= 0.42
    # For one patient (one LVOT), AVA and V_AV follow the separation monotonically.
    body = reports.Body("F", 1.62, 64.0)
    rng_seed = 3
    out = [reports.measure_study(ivs_cm=0.9, lvpw_cm=0.9, lvid_cm=4.6, av_cusp_sep_cm=float(x), body=body,
                                 age_years=70, lvot_diameter_cm=2.0, heart_rate_bpm=70,
                                 rng=np.random.default_rng(rng_seed))
           for x in (0.35, 0.5, 0.75, 1.5, 2.0, 2.5)]
    ava = [float(m.av_area_cm2) for m in out]
    vmax = [float(m.av_vmax_m_s) for m in out]
    assert ava == sorted(ava) and vmax == sorted(vmax, reverse=True)


@pytest.mark.parametrize("sex", ["F", "M"])
def test_severe_as_exactly_below_0_8_cm_over_the_whole_range(sex: str) -> None:
    """Every separation the sampler draws, continuously through 0.8 cm (severe,
    moderate, sclerosis and normal valves), every LVOT, many LVOT velocities and
    heart rates: the rules call severe AS exactly when the separation is under
    0.8 cm, both criteria agree, and there is no low-gradient AS."""
    lo, hi = (1.8, 2.2) if sex == "F" else (2.0, 2.4)
    body = reports.Body(sex, 1.70, 70.0)
    for sep in (*np.linspace(0.35, 0.799, 10), 0.8, 0.801, *np.linspace(0.85, 2.5, 12)):
        for d in (lo, (lo + hi) / 2, hi):
            for k in range(12):
                m = reports.measure_study(ivs_cm=0.9, lvpw_cm=0.9, lvid_cm=4.6, av_cusp_sep_cm=float(sep),
                                          body=body, age_years=60, lvot_diameter_cm=d, heart_rate_bpm=50 + 5 * k,
                                          rng=np.random.default_rng(k))
                severe = m.severe_as_by_rules()
                assert severe is bool(sep < 0.8)
                assert (float(m.av_vmax_m_s) >= 4.0) is (float(m.av_mean_gradient_mmhg) >= 40.0) is bool(sep < 0.8)
                assert float(m.av_vmax_m_s) < 7.0  # no impossible jets
                if sep >= 0.8:
                    assert float(m.av_area_cm2) > 1.0


def test_normal_walls_are_fitted_to_the_mass_index_limit() -> None:
    small_woman = reports.Body("F", 1.50, 42.0)
    ivs, lvpw = reports.fit_normal_walls(1.1, 0.6, 6.0, small_woman)
    assert ivs < 1.1 and lvpw < 0.6
    assert ivs / lvpw == pytest.approx(1.1 / 0.6, rel=0.01)  # one factor for both walls
    index = float(reports.lv_mass_g(ivs, lvpw, 6.0) / small_woman.bsa_m2)
    assert 90.0 < index <= 94.05
    # Unchanged: LVH walls (LVH by either rule), and walls already under the limit.
    assert reports.fit_normal_walls(1.3, 1.0, 6.0, small_woman) == (1.3, 1.0)
    big_man = reports.Body("M", 1.90, 95.0)
    assert reports.fit_normal_walls(0.9, 0.9, 4.8, big_man) == (0.9, 0.9)


def test_fitting_keeps_labels_and_lvid_label_independent() -> None:
    """Over the archive's own streams: the rules agree with the wall label
    everywhere, labels are untouched, LVIDd stays label-independent."""
    changed = total = 0
    lvid_lvh: list[float] = []
    lvid_normal: list[float] = []
    for p in range(400):
        r = T.keyed_rng(123, T.PURPOSE_PATIENT, p)
        n = int(r.integers(1, 4))
        sex = "F" if r.random() < 0.5 else "M"
        height = float(r.uniform(1.50, 1.75) if sex == "F" else r.uniform(1.62, 1.92))
        weight = float(r.uniform(18.5, 38.0)) * height**2
        body = reports.Body(sex, float(f"{height:.2f}"), float(f"{weight:.1f}"))
        for s in range(n):
            truth = synth.sample_truth(T.keyed_rng(123, T.PURPOSE_TRUTH, p, s))
            fitted = synth_archive.fit_to_mass_index(truth, body)
            total += 1
            changed += fitted != truth
            assert (fitted.lvh, fitted.severe_as, fitted.lvid_cm) == (truth.lvh, truth.severe_as, truth.lvid_cm)
            m = reports.measure_study(ivs_cm=fitted.ivs_cm, lvpw_cm=fitted.lvpw_cm, lvid_cm=fitted.lvid_cm,
                                      av_cusp_sep_cm=fitted.av_cusp_sep_cm, body=body, age_years=60,
                                      lvot_diameter_cm=2.1, heart_rate_bpm=70, rng=np.random.default_rng(s))
            assert m.lvh_by_rules() is fitted.lvh
            (lvid_lvh if fitted.lvh else lvid_normal).append(fitted.lvid_cm)
    assert 0.03 < changed / total < 0.2  # the studies whose walls (and images) differ from earlier releases
    assert abs(np.mean(lvid_lvh) - np.mean(lvid_normal)) < 0.15


def test_label_stream_pinned() -> None:
    """The label sampler's draws are pinned (golden values): changing them changes
    every archive of a seed, which must be a deliberate, documented step."""
    assert synth.sample_truth(T.keyed_rng(123, T.PURPOSE_TRUTH, 0, 0)) == synth.StudyTruth(
        ivs_cm=1.236, lvpw_cm=1.643, lvid_cm=5.213, av_cusp_sep_cm=1.8, av_leaflet_cm=0.131, ao_root_cm=2.952,
        av_calcification=0.032, av_state="normal")
    assert synth.sample_truth(T.keyed_rng(123, T.PURPOSE_TRUTH, 5, 1)) == synth.StudyTruth(
        ivs_cm=0.707, lvpw_cm=0.822, lvid_cm=4.777, av_cusp_sep_cm=1.772, av_leaflet_cm=0.085, ao_root_cm=2.61,
        av_calcification=0.051, av_state="normal")


def test_unknown_dialect_and_no_evidence_are_refused() -> None:
    m = reports.measure_study(ivs_cm=0.9, lvpw_cm=0.9, lvid_cm=4.6, av_cusp_sep_cm=2.0,
                              body=reports.Body("M", 1.8, 80.0), age_years=50, lvot_diameter_cm=2.1,
                              heart_rate_bpm=60, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="dialect"):
        reports.build_measurement_report("tid9999", m, [Dataset()], series_uid="1.2", sop_uid="1.3",
                                         rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="evidence"):
        reports.build_measurement_report(reports.DIALECT_GE, m, [], series_uid="1.2", sop_uid="1.3",
                                         rng=np.random.default_rng(0))
