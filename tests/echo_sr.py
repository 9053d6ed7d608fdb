"""Echo measurement SRs built in tests: TID 5200 (GE-like, Philips-like) and TID 5300.

They follow PS3.16 (TID 5200/5202/5203, TID 5300/5301) and PS3.3 (the SR
IODs), take their codes from pydicom's dictionaries, and pass dciodvfy with
no Error line (checked in tests/echonode/measurements/test_measurements.py). The vendor habits are
the ones echonode must read:

* ``ge``: TID 5200, SNOMED codes in their SRT form (``G-C0E3`` Finding Site,
  ``T-35400`` Aortic Valve), every measurement written twice, once plainly and
  once with Selection Status "Mean value chosen" (HAS PROPERTIES), velocities
  in cm/s, a numeric value with both DS and FD, private 99GEMS items mixed in,
  and an LVOT peak velocity (same concept name as the aortic valve's) in the
  LVOT section.
* ``philips``: TID 5200 with SCT codes, lengths in mm and area in mm2,
  repeated beats without any Selection Status, private 99PHILIPS
  measurements and a private modifier.
* ``tid5300``: TID 5300 with the pre-coordinated CID 12300 codes in the
  Pre-coordinated Measurements container, Selection Status and Derivation
  (TID 5301 rows).

``values`` are keyed like labels.csv without units (``ivsd``, ``lvpwd``,
``lvidd``, ``lv_mass``, ``lv_mass_index``, ``av_vmax``, ``av_mean_gradient``,
``av_area``, ``av_cusp_sep``), in cm, m/s, mmHg, cm2, g and g/m2; a missing
key is not measured.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr._snomed_dict import mapping as snomed_mapping
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

LN, SCT, DCM = codes.LN, codes.SCT, codes.DCM

DIALECT_CLASSES = {"ge": ComprehensiveSRStorage, "philips": EnhancedSRStorage, "tid5300": Comprehensive3DSRStorage}

UCUM = {
    "cm": "centimeter", "mm": "millimeter", "m/s": "meter per second", "cm/s": "centimeter per second",
    "mm[Hg]": "millimeter of mercury", "cm2": "square centimeter", "mm2": "square millimeter", "g": "gram",
    "g/m2": "gram per square meter", "m2": "square meter",
}  # fmt: skip


def coded(code: Code, *, srt: bool = False) -> Dataset:
    """A code sequence item; SCT in its SRT form when ``srt`` (older carts)."""
    item = Dataset()
    value, scheme = code.value, code.scheme_designator
    if srt and scheme == "SCT" and value in snomed_mapping["SCT"]:
        value, scheme = snomed_mapping["SCT"][value], "SRT"
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = code.meaning
    return item


def private_code(value: str, scheme: str, meaning: str) -> Code:
    return Code(value, scheme, meaning)


def code_item(relationship: str, name: Code, value: Code, *, srt: bool = False) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = "CODE"
    item.ConceptNameCodeSequence = [coded(name, srt=srt)]
    item.ConceptCodeSequence = [coded(value, srt=srt)]
    return item


def uid_item(relationship: str, name: Code, uid: str) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = "UIDREF"
    item.ConceptNameCodeSequence = [coded(name)]
    item.UID = uid
    return item


def num_item(
    name: Code,
    value: float | str | None,
    unit: str | None,
    *,
    modifiers: Sequence[Dataset] = (),
    srt: bool = False,
    float_value: bool = False,
    unit_scheme: str = "UCUM",
    qualifier: Code | None = None,
) -> Dataset:
    """A CONTAINS NUM item; ``value=None`` leaves the Measured Value Sequence empty."""
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "NUM"
    item.ConceptNameCodeSequence = [coded(name, srt=srt)]
    if value is None:
        item.MeasuredValueSequence = []
        if qualifier is not None:
            item.NumericValueQualifierCodeSequence = [coded(qualifier)]
    else:
        mv = Dataset()
        if isinstance(value, str):
            # Written as is, even when it is not a number (a bad input to test).
            raw = value.encode("ascii") + (b" " if len(value) % 2 else b"")
            mv._dict[BaseTag(0x0040A30A)] = RawDataElement(BaseTag(0x0040A30A), "DS", len(raw), raw, 0, False, True)
        else:
            mv.NumericValue = ds_text(value)
        if float_value and not isinstance(value, str):
            mv.FloatingPointValue = float(value)
        if unit is not None:
            mv.MeasurementUnitsCodeSequence = [coded(Code(unit, unit_scheme, UCUM.get(unit, unit)))]
        else:
            mv.MeasurementUnitsCodeSequence = []
        item.MeasuredValueSequence = [mv]
    if modifiers:
        item.ContentSequence = list(modifiers)
    return item


def container(relationship: str | None, name: Code, children: Iterable[Dataset], *, srt: bool = False) -> Dataset:
    item = Dataset()
    if relationship:
        item.RelationshipType = relationship
    item.ValueType = "CONTAINER"
    item.ConceptNameCodeSequence = [coded(name, srt=srt)]
    item.ContinuityOfContent = "SEPARATE"
    item.ContentSequence = list(children)
    return item


def ds_text(value: float) -> str:
    """A DS string (at most 16 characters)."""
    text = format(float(value), ".10g")
    return text[:16]


def observer_context(uid: str) -> list[Dataset]:
    return [
        code_item("HAS OBS CONTEXT", DCM.ObserverType, DCM.Device),
        uid_item("HAS OBS CONTEXT", DCM.DeviceObserverUID, uid),
    ]


def document(
    content: Sequence[Dataset],
    *,
    template: str,
    sop_class: str = ComprehensiveSRStorage,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    content_date: str = "20260102",
    content_time: str = "101500",
    instance_number: int = 1,
    patient_sex: str = "M",
    manufacturer: str = "Test Ultrasound",
    model: str = "Cart 1",
    predecessors: Sequence[str] = (),
    image_uids: Sequence[str] = (),
    title: Code | None = None,
) -> Dataset:
    """A complete SR instance (Patient, Study, SR Document Series/General/Content, SOP Common)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "TEST^ECHO"
    ds.PatientID = "ECHO001"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = patient_sex
    ds.StudyDate = content_date
    ds.StudyTime = "100000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC1"
    ds.Modality = "SR"
    ds.SeriesNumber = 90
    ds.InstanceNumber = instance_number
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.ContentDate = content_date
    ds.ContentTime = content_time
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = []
    images = list(image_uids) or [generate_uid()]
    ds.CurrentRequestedProcedureEvidenceSequence = [_hierarchical(ds.StudyInstanceUID, UltrasoundMultiFrameImageStorage, images)]
    if predecessors:
        ds.PredecessorDocumentsSequence = [_hierarchical(ds.StudyInstanceUID, sop_class, list(predecessors))]
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [coded(title or DCM.AdultEchocardiographyProcedureReport)]
    ds.ContinuityOfContent = "SEPARATE"
    tpl = Dataset()
    tpl.MappingResource = "DCMR"
    tpl.TemplateIdentifier = template
    ds.ContentTemplateSequence = [tpl]
    ds.ContentSequence = list(content)
    return ds


def _hierarchical(study_uid: str, sop_class: str, sop_uids: list[str]) -> Dataset:
    study = Dataset()
    study.StudyInstanceUID = study_uid
    series = Dataset()
    series.SeriesInstanceUID = generate_uid()
    refs = []
    for uid in sop_uids:
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class
        ref.ReferencedSOPInstanceUID = uid
        refs.append(ref)
    series.ReferencedSOPSequence = refs
    study.ReferencedSeriesSequence = [series]
    return study


def section(site: Code, groups: Iterable[Dataset], *, srt: bool = False) -> Dataset:
    """TID 5202: Findings with its Finding Site, holding Measurement Groups."""
    return container(
        "CONTAINS", DCM.Findings, [code_item("HAS CONCEPT MOD", SCT.FindingSite, site, srt=srt), *groups], srt=srt
    )


def group(mode: Code | None, nums: Iterable[Dataset], *, srt: bool = False) -> Dataset:
    """A Measurement Group (TID 5202 row 3) with its Image Mode."""
    mods = [code_item("HAS CONCEPT MOD", SCT.ImageMode, mode, srt=srt)] if mode is not None else []
    return container("CONTAINS", DCM.MeasurementGroup, [*mods, *nums], srt=srt)


# ----------------------------------------------------------------- dialects


def ge_sr(values: Mapping[str, float], **kw: object) -> Dataset:
    """TID 5200 as a GE cart writes it (see the module docstring)."""
    srt = True
    selected = code_item("HAS PROPERTIES", DCM.SelectionStatus, DCM.MeanValueChosen, srt=srt)

    def twice(name: Code, key: str, unit: str, scale: float = 1.0, extra: Sequence[Dataset] = ()) -> list[Dataset]:
        if key not in values:
            return []
        v = values[key] * scale
        return [
            num_item(name, v, unit, srt=srt, float_value=True, modifiers=list(extra)),
            num_item(name, v, unit, srt=srt, float_value=True, modifiers=[*extra, selected]),
        ]

    private = num_item(private_code("GEMS-0042", "99GEMS", "IVSd Z-score"), 0.4, "1", srt=srt)
    private_mod = code_item("HAS CONCEPT MOD", private_code("GEMS-M1", "99GEMS", "Measurement Label"),
                            private_code("GEMS-V1", "99GEMS", "IVSd"))  # fmt: skip
    lv_2d = [
        *twice(LN.InterventricularSeptumDiastolicThickness, "ivsd", "cm", extra=[private_mod]),
        *twice(LN.LeftVentriclePosteriorWallDiastolicThickness, "lvpwd", "cm"),
        *twice(LN.LeftVentricleInternalEndDiastolicDimension, "lvidd", "cm"),
        private,
    ]
    mass_method = code_item("HAS CONCEPT MOD", SCT.MeasurementMethod, DCM.LeftVentricleMassByMMode, srt=srt)
    lv_mm = [
        *twice(LN.LeftVentricleMass, "lv_mass", "g", extra=[mass_method]),
        *twice(LN.LeftVentricleMass, "lv_mass_index", "g/m2", extra=[mass_method]),
    ]
    av_cw = [
        *twice(LN.PeakSystolicVelocity, "av_vmax", "cm/s", scale=100.0),
        *twice(LN.MeanGradient, "av_mean_gradient", "mm[Hg]"),
    ]
    continuity = code_item("HAS CONCEPT MOD", SCT.MeasurementMethod, DCM.ContinuityEquationByVelocityTimeIntegral, srt=srt)
    av_2d = twice(SCT.CardiovascularOrificeArea, "av_area", "cm2", extra=[continuity])
    av_mm = twice(LN.AorticValveCuspSeparation, "av_cusp_sep", "cm")
    lvot = [num_item(LN.PeakSystolicVelocity, 105.0, "cm/s", srt=srt)]
    sections = [
        section(SCT.LeftVentricle, [g for g in (
            group(SCT._2DMode, lv_2d, srt=srt) if lv_2d else None,
            group(SCT.MMode, lv_mm, srt=srt) if lv_mm else None,
        ) if g is not None], srt=srt),
        section(SCT.AorticValve, [g for g in (
            group(SCT.DopplerContinuousWave, av_cw, srt=srt) if av_cw else None,
            group(SCT._2DMode, av_2d, srt=srt) if av_2d else None,
            group(SCT.MMode, av_mm, srt=srt) if av_mm else None,
        ) if g is not None], srt=srt),
        section(SCT.LeftVentricleOutflowTract, [group(SCT.DopplerPulsed, lvot, srt=srt)], srt=srt),
    ]  # fmt: skip
    sections = [s for s in sections if len(s.ContentSequence) > 1]
    kw.setdefault("manufacturer", "GE Vingmed Ultrasound")
    kw.setdefault("model", "Vivid E95")
    kw.setdefault("sop_class", DIALECT_CLASSES["ge"])
    return document([*observer_context(generate_uid()), *sections], template="5200", **kw)  # type: ignore[arg-type]


def philips_sr(values: Mapping[str, float], **kw: object) -> Dataset:
    """TID 5200 as a Philips cart writes it (see the module docstring)."""

    def beats(name: Code, key: str, unit: str, scale: float, extra: Sequence[Dataset] = ()) -> list[Dataset]:
        if key not in values:
            return []
        v = values[key] * scale
        step = 0.01 * v
        # Three beats whose mean is the value.
        return [num_item(name, x, unit, modifiers=list(extra)) for x in (v - step, v, v + step)]

    private_mod = code_item("HAS CONCEPT MOD", private_code("PHI-77", "99PHILIPS", "Sub-measurement"),
                            private_code("PHI-78", "99PHILIPS", "Beat"))  # fmt: skip
    lv = [
        *beats(LN.InterventricularSeptumDiastolicThickness, "ivsd", "mm", 10.0, extra=[private_mod]),
        *beats(LN.LeftVentriclePosteriorWallDiastolicThickness, "lvpwd", "mm", 10.0),
        *beats(LN.LeftVentricleInternalEndDiastolicDimension, "lvidd", "mm", 10.0),
        num_item(private_code("PHI-1001", "99PHILIPS", "LV Wall Stress"), 80.0, "g/cm2"),
    ]
    if "lv_mass" in values:
        lv.append(num_item(LN.LeftVentricleMass, values["lv_mass"], "g"))
    if "lv_mass_index" in values:
        lv.append(num_item(LN.LeftVentricleMass, values["lv_mass_index"], "g/m2"))
    av = [
        *beats(LN.PeakSystolicVelocity, "av_vmax", "m/s", 1.0),
        *beats(LN.MeanGradient, "av_mean_gradient", "mm[Hg]", 1.0),
        num_item(private_code("PHI-2002", "99PHILIPS", "AV Dimensionless Index"), 0.3, "1"),
    ]
    if "av_area" in values:
        av.append(num_item(SCT.CardiovascularOrificeArea, values["av_area"] * 100.0, "mm2"))
    av_mm = beats(LN.AorticValveCuspSeparation, "av_cusp_sep", "mm", 10.0)
    sections = [
        section(SCT.LeftVentricle, [group(SCT._2DMode, lv)]),
        section(SCT.AorticValve, [g for g in (
            group(SCT.DopplerContinuousWave, av),
            group(SCT.MMode, av_mm) if av_mm else None,
        ) if g is not None]),
    ]  # fmt: skip
    kw.setdefault("manufacturer", "Philips Medical Systems")
    kw.setdefault("model", "EPIQ 7C")
    kw.setdefault("sop_class", DIALECT_CLASSES["philips"])
    return document([*observer_context(generate_uid()), *sections], template="5200", **kw)  # type: ignore[arg-type]


def tid5300_sr(values: Mapping[str, float], **kw: object) -> Dataset:
    """TID 5300 with pre-coordinated codes (see the module docstring)."""
    codes_of = {
        "ivsd": (LN.InterventricularSeptumDiastolicDimension2D, "cm"),
        "lvpwd": (LN.LeftVentricularPosteriorWallDiastolicThicknessByUS2D, "cm"),
        "lvidd": (LN.LeftVentricularInternalDiastolicDimension2D, "cm"),
        "lv_mass": (LN.LeftVentricularMass, "g"),
        "lv_mass_index": (LN.LeftVentricularMassTruncatedEllipseBSA, "g/m2"),
        "av_vmax": (LN.AorticValveVmax, "m/s"),
        "av_mean_gradient": (LN.AorticValveMeanGradient, "mm[Hg]"),
        "av_area": (LN.AorticValveAreaContinuityVTI, "cm2"),
        "av_cusp_sep": (LN.AorticValveCuspSeparation, "cm"),
    }
    preferred = code_item("HAS CONCEPT MOD", DCM.SelectionStatus, DCM.MeanValueChosen)
    derived = code_item("HAS CONCEPT MOD", DCM.Derivation, SCT.Mean)
    nums = [
        num_item(name, values[key], unit, modifiers=[preferred, derived])
        for key, (name, unit) in codes_of.items()
        if key in values
    ]
    content = [*observer_context(generate_uid()), container("CONTAINS", DCM.PreCoordinatedMeasurements, nums)]
    kw.setdefault("manufacturer", "Canon Medical Systems")
    kw.setdefault("model", "Aplio i900")
    kw.setdefault("sop_class", DIALECT_CLASSES["tid5300"])
    return document(content, template="5300", **kw)  # type: ignore[arg-type]


BUILDERS = {"ge": ge_sr, "philips": philips_sr, "tid5300": tid5300_sr}


def echo_sr(dialect: str, values: Mapping[str, float], **kw: object) -> Dataset:
    """A measurement SR in one of the dialects (``ge``, ``philips``, ``tid5300``)."""
    return BUILDERS[dialect](values, **kw)


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
