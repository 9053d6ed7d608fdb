"""The measurement-SR reader: codes, dialects, units, selection, supersession, bad input.

The SRs are built in tests/echo_sr.py (GE-like and Philips-like TID 5200,
TID 5300) and checked with dicom3tools' dciodvfy, so the reader is tested on
real DICOM; transfer syntaxes other than explicit VR little endian are made
with dcmtk's dcmconv.
"""

from __future__ import annotations

import subprocess
import zlib
from pathlib import Path

import pydicom
import pytest
import structlog
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    SimplifiedAdultEchoSRStorage,
    generate_uid,
)

from echonode.measurements import (
    CONCEPTS_BY_KEY,
    current_document,
    read_measurement_sr,
    select_values,
)
from echonode.measurements.concepts import CONCEPTS, code_key, loinc_check_digit_fails, match_name, normalise_code
from echonode.measurements.selection import select_concept
from echonode.measurements.units import convert, parse_unit
from tests import echo_sr
from tests.echo_sr import (
    DCM,
    LN,
    SCT,
    code_item,
    container,
    document,
    group,
    num_item,
    private_code,
    section,
)
from tests.peers import DCIODVFY, DCMCONV, REPO, require_tool

VALUES = {
    "ivsd": 1.3, "lvpwd": 1.1, "lvidd": 4.8, "lv_mass": 210.0, "lv_mass_index": 118.0,
    "av_vmax": 4.2, "av_mean_gradient": 44.0, "av_area": 0.7, "av_cusp_sep": 0.6,
}  # fmt: skip


def write(ds: pydicom.Dataset, tmp_path: Path, name: str = "sr.dcm") -> Path:
    return echo_sr.save(ds, tmp_path / name)


def dciodvfy(path: Path) -> None:
    proc = subprocess.run([require_tool(DCIODVFY), str(path)], capture_output=True, text=True, check=False)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
    assert not errors, "\n".join(errors)


def values(doc) -> dict[str, float | None]:
    return {k: s.value for k, s in select_values(doc).items()}


# ------------------------------------------------------------------ concepts


def test_codes_come_from_pydicom_with_the_values_the_standard_gives() -> None:
    """Each concept is reached by the codes PS3.16 names, taken from pydicom's codedict."""
    names = {c.key: {code_key(m.code) for m in c.names} for c in CONCEPTS_BY_KEY.values()}
    print({k: sorted(v) for k, v in names.items()})
    assert ("LN", "18154-5") in names["ivsd"] and ("LN", "79969-2") in names["ivsd"]
    assert ("LN", "18152-9") in names["lvpwd"]
    assert ("LN", "29436-3") in names["lvidd"]
    assert ("LN", "18087-7") in names["lv_mass"] and ("LN", "18087-7") in names["lv_mass_index"]
    assert ("LN", "80026-8") in names["lv_mass_index"]
    assert {("LN", "11726-7"), ("LN", "79964-3")} <= names["av_vmax"]
    assert {("LN", "20256-4"), ("LN", "79962-7")} <= names["av_mean_gradient"]
    assert {("SCT", "399367004"), ("LN", "79958-5")} <= names["av_area"]
    assert names["av_cusp_sep"] == {("LN", "17996-0")}
    # The pure flow / orifice properties mean the aortic valve only with its site, and TID 5300's
    # post-coordinated properties (CID 12304) a concept only at its site (and a wall only in diastole).
    needs_site = {code_key(m.code) for c in CONCEPTS_BY_KEY.values() for m in c.names if m.needs_site}
    assert needs_site == {("LN", "11726-7"), ("LN", "59107-3"), ("LN", "20355-4"), ("LN", "20256-4"), ("SCT", "399367004"),
                          ("LN", "59089-3"), ("SCT", "118538004"), ("SCT", "42798000"), ("DCM", "125326")}
    assert [code_key(p) for m in CONCEPTS_BY_KEY["ivsd"].names for p in m.phases] == [("SCT", "416190007"),
                                                                                      ("SCT", "90892000")]
    assert code_key(CONCEPTS_BY_KEY["av_vmax"].site) == ("SCT", "34202007")
    assert codes.LN.AorticValveVmax.value == "79964-3"


def test_srt_codes_are_their_sct_equivalents() -> None:
    assert normalise_code("SRT", "G-C0E3") == code_key(codes.SCT.FindingSite)
    assert normalise_code("SRT", "T-35400") == ("SCT", "34202007")
    assert normalise_code("SRT", "G-038E") == ("SCT", "399367004")
    assert match_name(normalise_code("SRT", "G-038E"))[0][0].key == "av_area"
    assert normalise_code("SRT", "X-NOT-MAPPED") == ("SRT", "X-NOT-MAPPED")


# ------------------------------------------------------------------ dialects


@pytest.mark.parametrize("dialect", ["ge", "philips", "tid5300"])
@pytest.mark.parametrize("sop_class", [ComprehensiveSRStorage, EnhancedSRStorage, Comprehensive3DSRStorage])
def test_each_dialect_is_valid_dicom_and_round_trips(dialect: str, sop_class: str, tmp_path: Path) -> None:
    path = write(echo_sr.echo_sr(dialect, VALUES, sop_class=sop_class), tmp_path)
    dciodvfy(path)
    doc = read_measurement_sr(path)
    assert doc.status == "read", doc.reason
    assert doc.sop_class_uid == sop_class
    assert doc.template == ("5300" if dialect == "tid5300" else "5200")
    got = values(doc)
    for key, expected in VALUES.items():
        assert got[key] == pytest.approx(expected, rel=1e-9), key
    assert all(m.sop_instance_uid == doc.sop_instance_uid and m.content_path for m in doc.measurements)


def test_simplified_adult_echo_sr_class_is_read(tmp_path: Path) -> None:
    """TID 5300's own IOD (dciodvfy of 2022 does not know it, so it is not validated here)."""
    doc = read_measurement_sr(write(echo_sr.tid5300_sr(VALUES, sop_class=SimplifiedAdultEchoSRStorage), tmp_path))
    assert doc.status == "read"
    assert values(doc)["av_vmax"] == pytest.approx(4.2)


def test_ge_doubles_selection_status_srt_modifiers_and_private_codes(tmp_path: Path) -> None:
    doc = read_measurement_sr(write(echo_sr.ge_sr(VALUES), tmp_path))
    ivsd = [m for m in doc.measurements if m.concept == "ivsd"]
    assert len(ivsd) == 2 and [m.selected for m in ivsd] == [False, True]
    assert ivsd[1].selection_status.meaning == "Mean value chosen"
    # SRT-coded modifiers inherited from the section and the group.
    assert ivsd[0].finding_site.key == code_key(SCT.LeftVentricle)
    assert ivsd[0].image_mode.key == code_key(SCT._2DMode)
    vmax = [m for m in doc.measurements if m.concept == "av_vmax"]
    assert [m.raw_unit for m in vmax] == ["UCUM:cm/s", "UCUM:cm/s"] and vmax[0].value == pytest.approx(4.2)
    assert vmax[0].finding_site.key == ("SCT", "34202007") and vmax[0].image_mode.meaning == "Doppler Continuous Wave"
    area = next(m for m in doc.measurements if m.concept == "av_area")
    assert area.method.key == code_key(DCM.ContinuityEquationByVelocityTimeIntegral)
    mass = [m for m in doc.measurements if m.concept in ("lv_mass", "lv_mass_index")]
    assert {(m.concept, m.unit) for m in mass} == {("lv_mass", "g"), ("lv_mass_index", "g/m2")}
    # The LVOT peak velocity has the aortic valve's concept name, in the LVOT section.
    assert doc.counts["other_items"] == 1
    assert doc.counts["private_items"] == 1 and doc.counts["private_modifiers"] == 2
    assert select_values(doc)["ivsd"].rule == "selected"


def test_philips_millimetres_repeats_and_private_codes(tmp_path: Path) -> None:
    doc = read_measurement_sr(write(echo_sr.philips_sr(VALUES), tmp_path))
    ivsd = [m for m in doc.measurements if m.concept == "ivsd"]
    assert [m.raw_unit for m in ivsd] == ["UCUM:mm"] * 3
    assert [m.value for m in ivsd] == pytest.approx([1.287, 1.3, 1.313])
    sel = select_values(doc)
    assert sel["ivsd"].rule == "mean" and sel["ivsd"].value == pytest.approx(1.3)
    assert sel["av_area"].value == pytest.approx(0.7)  # written as 70 mm2
    assert doc.counts["private_items"] == 2 and doc.counts["private_modifiers"] == 3


def test_tid5300_precoordinated_codes_imply_mode_and_method(tmp_path: Path) -> None:
    doc = read_measurement_sr(write(echo_sr.tid5300_sr(VALUES), tmp_path))
    by = {m.concept: m for m in doc.measurements}
    assert by["ivsd"].name.key == code_key(LN.InterventricularSeptumDiastolicDimension2D)
    assert by["ivsd"].image_mode.key == code_key(SCT._2DMode)
    assert by["av_area"].method.key == code_key(DCM.ContinuityEquationByVelocityTimeIntegral)
    assert by["av_vmax"].selection_status.key == code_key(DCM.MeanValueChosen)
    assert by["av_vmax"].derivation.key == code_key(SCT.Mean)
    assert by["lv_mass_index"].finding_site is None


@pytest.mark.parametrize("option", ["+ti", "+tb", "+td"])
def test_other_transfer_syntaxes_read_the_same(option: str, tmp_path: Path) -> None:
    src = write(echo_sr.ge_sr(VALUES), tmp_path)
    dst = tmp_path / f"conv{option}.dcm"
    subprocess.run([require_tool(DCMCONV), option, str(src), str(dst)], check=True, capture_output=True)
    a, b = read_measurement_sr(src), read_measurement_sr(dst)
    assert b.status == "read", b.reason
    assert [(m.concept, m.value, m.raw_value, m.content_path) for m in a.measurements] == [
        (m.concept, m.value, m.raw_value, m.content_path) for m in b.measurements
    ]


def test_a_dataset_in_memory_reads_as_its_file(tmp_path: Path) -> None:
    path = write(echo_sr.philips_sr(VALUES), tmp_path)
    from_file = read_measurement_sr(path)
    from_ds = read_measurement_sr(pydicom.dcmread(path))
    assert from_ds.path is None and from_ds.measurements == from_file.measurements


# ------------------------------------------------------------------ units


@pytest.mark.parametrize(
    ("code", "value", "dimension", "expected"),
    [
        ("cm", 1.2, "length", 1.2), ("mm", 12, "length", 1.2), ("m", 0.012, "length", 1.2),
        ("m/s", 4.0, "velocity", 4.0), ("cm/s", 400, "velocity", 4.0), ("mm/s", 4000, "velocity", 4.0),
        ("mm[Hg]", 40, "pressure", 40.0), ("mmHg", 40, "pressure", 40.0), ("kPa", 5.33289549, "pressure", 40.0),
        ("cm2", 1.0, "area", 1.0), ("mm2", 100, "area", 1.0), ("cm^2", 1.0, "area", 1.0),
        ("g", 150, "mass", 150.0), ("kg", 0.15, "mass", 150.0),
        ("g/m2", 115, "mass_per_area", 115.0), ("kg/m2", 0.115, "mass_per_area", 115.0),
    ],
)  # fmt: skip
def test_ucum_units_convert_to_one_unit_per_dimension(code: str, value: float, dimension: str, expected: float) -> None:
    unit = parse_unit("UCUM", code)
    assert unit is not None and unit.dimension == dimension
    assert convert(value, unit) == pytest.approx(expected, abs=1e-7)


def test_conversions_land_exactly_on_thresholds() -> None:
    """12 mm is 1.2 cm exactly, not 1.2000000000000002, when it meets a limit of 1.2."""
    assert convert(12, parse_unit("UCUM", "mm")) == 1.2
    assert convert(400, parse_unit("UCUM", "cm/s")) == 4.0
    assert convert(100, parse_unit("UCUM", "mm2")) == 1.0


def test_units_that_are_not_ucum_or_unknown_are_refused() -> None:
    assert parse_unit("99GEMS", "cm") is None
    assert parse_unit("UCUM", "CM") is None  # UCUM is case-sensitive
    assert parse_unit("UCUM", "furlong") is None
    assert parse_unit("UCUM", "g/m2.7") is None


# ------------------------------------------------------------------ selection


def _sr(tmp_path: Path, nums: list, *, name: str = "sr.dcm", site: object = None, **kw: object) -> Path:
    """An SR with the given NUMs in one group of a section at ``site`` (default: the aortic valve)."""
    content = [section(site or SCT.AorticValve, [group(SCT._2DMode, nums)])]
    return write(document(content, template="5200", **kw), tmp_path, name)


SELECTED = code_item("HAS PROPERTIES", DCM.SelectionStatus, DCM.UserChosenValue)


def test_the_selected_value_wins_over_repeats(tmp_path: Path) -> None:
    path = _sr(tmp_path, [
        num_item(LN.AorticValveCuspSeparation, 0.9, "cm"),
        num_item(LN.AorticValveCuspSeparation, 0.7, "cm", modifiers=[SELECTED]),
        num_item(LN.AorticValveCuspSeparation, 1.0, "cm"),
    ])  # fmt: skip
    sel = select_values(read_measurement_sr(path))["av_cusp_sep"]
    assert (sel.value, sel.rule) == (0.7, "selected")


def test_unselected_repeats_are_averaged(tmp_path: Path) -> None:
    path = _sr(tmp_path, [num_item(LN.AorticValveCuspSeparation, v, "cm") for v in (0.6, 0.7, 0.8)])
    sel = select_values(read_measurement_sr(path))["av_cusp_sep"]
    assert sel.rule == "mean" and sel.value == pytest.approx(0.7) and len(sel.used) == 3


def test_selected_values_that_agree_across_units_are_one(tmp_path: Path) -> None:
    path = _sr(tmp_path, [
        num_item(LN.AorticValveCuspSeparation, 7, "mm", modifiers=[SELECTED]),
        num_item(LN.AorticValveCuspSeparation, 0.7, "cm", modifiers=[SELECTED]),
    ])  # fmt: skip
    sel = select_values(read_measurement_sr(path))["av_cusp_sep"]
    assert (sel.value, sel.rule) == (0.7, "selected")


def test_contradictory_selected_values_leave_the_concept_undecided(tmp_path: Path) -> None:
    path = _sr(tmp_path, [
        num_item(LN.AorticValveCuspSeparation, 0.7, "cm", modifiers=[SELECTED]),
        num_item(LN.AorticValveCuspSeparation, 1.4, "cm", modifiers=[SELECTED]),
    ])  # fmt: skip
    sel = select_values(read_measurement_sr(path))["av_cusp_sep"]
    assert sel.value is None and sel.rule == "contradictory"
    assert "disagree" in sel.reason and "0.7 cm" in sel.reason and "1.4 cm" in sel.reason


def test_tolerance_decides_agreement() -> None:
    from echonode.measurements.reading import Coded, Measurement

    def m(v: float) -> Measurement:
        return Measurement("ivsd", v, "cm", str(v), "UCUM:cm", Coded("LN", "18154-5", "IVSd"), None, None, None,
                           Coded("DCM", "121410", "User chosen value"), None, "1.2.3", "1")  # fmt: skip

    assert select_concept("ivsd", [m(1.20), m(1.25)]).value == pytest.approx(1.225)  # 4 % apart
    assert select_concept("ivsd", [m(1.20), m(1.27)]).value is None  # 5.5 % apart
    assert select_concept("ivsd", [m(1.20), m(1.27)], tolerance=0.1).value == pytest.approx(1.235)


def test_a_flow_property_needs_the_aortic_valve_site(tmp_path: Path) -> None:
    """11726-7 is the AV peak velocity in the AV section, the LVOT's in the LVOT section, and
    nobody's without a site; a finding site on the NUM overrides its section's."""
    lvot_site = code_item("HAS CONCEPT MOD", SCT.FindingSite, SCT.LeftVentricleOutflowTract)
    content = [
        section(SCT.AorticValve, [group(SCT.DopplerContinuousWave, [
            num_item(LN.PeakSystolicVelocity, 4.5, "m/s"),
            num_item(LN.PeakSystolicVelocity, 1.1, "m/s", modifiers=[lvot_site]),
        ])]),
        section(SCT.LeftVentricleOutflowTract, [group(None, [num_item(LN.PeakSystolicVelocity, 0.9, "m/s")])]),
        container("CONTAINS", DCM.MeasurementGroup, [num_item(LN.PeakSystolicVelocity, 2.0, "m/s")]),
    ]  # fmt: skip
    doc = read_measurement_sr(write(document(content, template="5200"), tmp_path))
    # The unsited one is kept, refused with its reason, so that a study's evidence shows it.
    assert [m.value for m in doc.measurements] == [4.5, None]
    assert doc.measurements[1].problem == (
        "no finding site: read as the aortic valve peak velocity only at the aortic valve")
    assert doc.counts["other_items"] == 2 and doc.counts["unsited_items"] == 1
    sel = select_values(doc)["av_vmax"]
    assert (sel.value, sel.rule) == (4.5, "single")


def test_an_unsited_flow_says_so_instead_of_not_measured(tmp_path: Path) -> None:
    content = [container("CONTAINS", DCM.MeasurementGroup, [num_item(LN.PeakSystolicVelocity, 4.5, "m/s")])]
    sel = select_values(read_measurement_sr(write(document(content, template="5200"), tmp_path)))["av_vmax"]
    assert sel.value is None and sel.rule == "unusable"
    assert sel.reason == ("aortic valve peak velocity: not usable (no finding site: read as the aortic valve peak "
                          "velocity only at the aortic valve)")


def test_a_container_named_by_a_site_gives_its_items_that_site(tmp_path: Path) -> None:
    """Some carts name the section "Aortic Valve" instead of carrying a Finding Site modifier."""
    content = [container("CONTAINS", SCT.AorticValve, [
        group(SCT.DopplerContinuousWave, [num_item(LN.PeakSystolicVelocity, 4.5, "m/s")])])]
    doc = read_measurement_sr(write(document(content, template="5200"), tmp_path))
    assert [(m.concept, m.value) for m in doc.measurements] == [("av_vmax", 4.5)]
    assert doc.measurements[0].finding_site is not None and doc.counts["unsited_items"] == 0
    # A Finding Site modifier still wins over the container's name.
    lvot_site = code_item("HAS CONCEPT MOD", SCT.FindingSite, SCT.LeftVentricleOutflowTract)
    content = [container("CONTAINS", SCT.AorticValve, [
        lvot_site, group(None, [num_item(LN.PeakSystolicVelocity, 1.1, "m/s")])])]
    doc = read_measurement_sr(write(document(content, template="5200"), tmp_path, "lvot.dcm"))
    assert doc.measurements == [] and doc.counts["other_items"] == 1


DERIVATION = DCM.Derivation


def _derived(statistic: object) -> object:
    return code_item("HAS CONCEPT MOD", DERIVATION, statistic)


def _ivsd_mm(value: float, *statistic: object) -> object:
    mods = [_derived(statistic[0])] if statistic and statistic[0] is not SELECTED else list(statistic)
    return num_item(LN.InterventricularSeptumDiastolicThickness, value, "mm", modifiers=mods)


@pytest.mark.parametrize(
    ("extra", "rule", "expected", "used"),
    [
        # A cart writes the beats, their Mean and their Maximum: the lab's value is the Mean.
        ([(11.77, SCT.Mean), (13.3, SCT.Maximum)], "derived mean", 1.177, 1),
        # No Mean: the other statistics are not averaged with the beats (they would count them twice).
        ([(13.3, SCT.Maximum), (11.0, SCT.Minimum)], "mean", (1.1 + 1.1 + 1.33) / 3, 3),
        # The sonographer's selection still comes first.
        ([(11.77, SCT.Mean), (13.0, SELECTED)], "selected", 1.3, 1),
    ],
)
def test_the_statistics_a_report_derives_from_its_beats(tmp_path: Path, extra, rule, expected, used) -> None:
    beats = [_ivsd_mm(v) for v in (11.0, 11.0, 13.3)]
    path = _sr(tmp_path, [*beats, *(_ivsd_mm(v, stat) for v, stat in extra)], site=SCT.LeftVentricle)
    sel = select_values(read_measurement_sr(path))["ivsd"]
    assert (sel.value, sel.rule, len(sel.used)) == (pytest.approx(expected), rule, used)


def test_a_lone_statistic_is_still_the_reports_value(tmp_path: Path) -> None:
    path = _sr(tmp_path, [_ivsd_mm(13.3, SCT.Maximum)], site=SCT.LeftVentricle)
    assert select_values(read_measurement_sr(path))["ivsd"].value == pytest.approx(1.33)


# ------------------------------------------------------------------ supersession


def _study_sr(tmp_path: Path, name: str, study: str, ivsd: float, **kw: object):
    return read_measurement_sr(write(echo_sr.tid5300_sr({"ivsd": ivsd}, study_uid=study, **kw), tmp_path, name))


def test_a_later_sr_supersedes_an_earlier_one(tmp_path: Path) -> None:
    study = generate_uid()
    early = _study_sr(tmp_path, "a.dcm", study, 1.0, content_time="090000")
    late = _study_sr(tmp_path, "b.dcm", study, 1.4, content_time="160000")
    for order in ([early, late], [late, early]):
        current, reasons = current_document(order)
        assert current is late
        assert reasons == {early.sop_instance_uid: f"superseded by the later SR {late.sop_instance_uid}"}


def test_a_predecessor_is_replaced_whatever_the_dates(tmp_path: Path) -> None:
    """An amended SR names the one it replaces; a cart clock set wrong must not undo that."""
    study = generate_uid()
    original = _study_sr(tmp_path, "a.dcm", study, 1.0, content_time="160000")
    amended = _study_sr(tmp_path, "b.dcm", study, 1.4, content_time="090000", predecessors=[original.sop_instance_uid])
    current, reasons = current_document([original, amended])
    assert current is amended
    assert "Predecessor Documents Sequence" in reasons[original.sop_instance_uid]


def test_same_time_falls_back_to_instance_number_then_uid(tmp_path: Path) -> None:
    study = generate_uid()
    one = _study_sr(tmp_path, "a.dcm", study, 1.0, instance_number=2)
    two = _study_sr(tmp_path, "b.dcm", study, 1.4, instance_number=1)
    assert current_document([one, two])[0] is one
    low = _study_sr(tmp_path, "c.dcm", study, 1.0, sop_uid="1.2.3.9")
    high = _study_sr(tmp_path, "d.dcm", study, 1.0, sop_uid="1.2.3.10")
    assert current_document([high, low])[0] is high  # 10 > 9 component-wise


def _flagged_sr(tmp_path: Path, name: str, study: str, ivsd: float, verification: str, completion: str,
                time: str, **kw: object):
    ds = echo_sr.tid5300_sr({"ivsd": ivsd}, study_uid=study, content_time=time, **kw)
    ds.VerificationFlag, ds.CompletionFlag = verification, completion
    return read_measurement_sr(write(ds, tmp_path, name))


def test_a_verified_complete_sr_outranks_a_later_preliminary_one(tmp_path: Path) -> None:
    """The signed report is the lab's word, whatever the clock says of a preliminary one."""
    study = generate_uid()
    signed = _flagged_sr(tmp_path, "signed.dcm", study, 1.3, "VERIFIED", "COMPLETE", "110000")
    draft = _flagged_sr(tmp_path, "draft.dcm", study, 1.0, "UNVERIFIED", "COMPLETE", "120000")
    partial = _flagged_sr(tmp_path, "partial.dcm", study, 1.0, "VERIFIED", "PARTIAL", "130000")
    current, reasons = current_document([signed, draft, partial])
    assert current is signed
    assert reasons[draft.sop_instance_uid] == f"superseded by the verified SR {signed.sop_instance_uid}"
    assert reasons[partial.sop_instance_uid] == f"superseded by the complete SR {signed.sop_instance_uid}"
    # Among unverified ones the later still wins, and a predecessor is replaced whatever its flags.
    later = _flagged_sr(tmp_path, "later.dcm", study, 1.1, "UNVERIFIED", "COMPLETE", "140000")
    assert current_document([draft, later])[0] is later
    amending = _flagged_sr(tmp_path, "amending.dcm", study, 1.5, "UNVERIFIED", "COMPLETE", "090000",
                           predecessors=[signed.sop_instance_uid])
    current, reasons = current_document([signed, amending])
    assert current is amending and "Predecessor Documents Sequence" in reasons[signed.sop_instance_uid]


def test_an_sr_without_values_does_not_supersede(tmp_path: Path) -> None:
    study = generate_uid()
    good = _study_sr(tmp_path, "a.dcm", study, 1.0, content_time="090000")
    private_only = read_measurement_sr(write(document(
        [container("CONTAINS", DCM.PreCoordinatedMeasurements,
                   [num_item(private_code("X1", "99PHILIPS", "x"), 1.0, "cm")])],
        template="5300", study_uid=study, content_time="170000"), tmp_path, "b.dcm"))  # fmt: skip
    current, reasons = current_document([good, private_only])
    assert current is good
    assert reasons[private_only.sop_instance_uid].startswith("only private codes")


# -------------------------------------------- vendor shapes that change a label

FLOW_DIRECTION = Code("260674002", "SCT", "Direction of flow")
STAGE = Code("18139-6", "LN", "Stage")
MEAN_CHOSEN = code_item("HAS PROPERTIES", DCM.SelectionStatus, DCM.MeanValueChosen, srt=True)
WALLS_NORMAL = [num_item(LN.InterventricularSeptumDiastolicThickness, 1.0, "cm"),
                num_item(LN.LeftVentriclePosteriorWallDiastolicThickness, 0.9, "cm")]


def _labels(*docs) -> dict[str, int | None]:
    from echonode.measurements import load_rules, study_reference

    ref = study_reference(list(docs), load_rules())
    return {task: decision.label for task, decision in ref.labels.items()}


def _av_sr(tmp_path: Path, av_nums: list, *, name: str = "sr.dcm", **kw: object):
    content = [section(SCT.LeftVentricle, [group(SCT._2DMode, WALLS_NORMAL)], srt=True),
               section(SCT.AorticValve, [group(SCT.DopplerContinuousWave, av_nums, srt=True)], srt=True)]
    return read_measurement_sr(write(document(content, template="5200", **kw), tmp_path, name))


@pytest.mark.parametrize("srt", [True, False])
def test_a_regurgitant_jet_is_not_the_stenotic_jet(srt: bool, tmp_path: Path) -> None:
    """The AR jet's peak velocity sits in the AV section under the forward jet's concept name and
    site; only TID 5203's Flow Direction (CID 12221) tells them apart (written SRT G-C048 by GE)."""
    regurgitant = code_item("HAS CONCEPT MOD", FLOW_DIRECTION, SCT.RegurgitantFlow, srt=srt)
    antegrade = code_item("HAS CONCEPT MOD", FLOW_DIRECTION, SCT.AntegradeFlow, srt=srt)
    doc = _av_sr(tmp_path, [
        num_item(LN.PeakSystolicVelocity, 350.0, "cm/s", srt=True, modifiers=[antegrade]),
        num_item(LN.MeanGradient, 30.0, "mm[Hg]", srt=True),
        num_item(LN.PeakSystolicVelocity, 460.0, "cm/s", srt=True, modifiers=[regurgitant]),
        num_item(LN.MeanGradient, 45.0, "mm[Hg]", srt=True, modifiers=[regurgitant]),
    ])  # fmt: skip
    assert values(doc)["av_vmax"] == 3.5 and values(doc)["av_mean_gradient"] == 30.0
    assert doc.counts["reverse_flow_items"] == 2
    assert _labels(doc)["severe_as"] == 0
    # A study with only the regurgitant jet measured has no AV peak velocity at all.
    only_ar = _av_sr(tmp_path, [num_item(LN.PeakSystolicVelocity, 450.0, "cm/s", srt=True, modifiers=[regurgitant])],
                     name="ar.dcm")
    assert select_values(only_ar)["av_vmax"].rule == "not measured" and _labels(only_ar)["severe_as"] is None


def test_a_flow_direction_on_a_group_and_tid5300_retrograde_direction(tmp_path: Path) -> None:
    """The direction is inherited from a Measurement Group, and CID 12306's Retrograde Direction
    (TID 5300 post-coordinated) counts as CID 12221's Regurgitant Flow does."""
    retro_group = container("CONTAINS", DCM.MeasurementGroup, [
        code_item("HAS CONCEPT MOD", FLOW_DIRECTION, SCT.RegurgitantFlow),
        num_item(LN.PeakSystolicVelocity, 4.8, "m/s"),
    ])  # fmt: skip
    ds = pydicom.dcmread(write(document([section(SCT.AorticValve, [
        group(SCT.DopplerContinuousWave, [num_item(LN.PeakSystolicVelocity, 2.4, "m/s")]), retro_group])],
        template="5200"), tmp_path, "group.dcm"))  # fmt: skip
    doc = read_measurement_sr(ds)
    assert values(doc)["av_vmax"] == 2.4
    site = code_item("HAS CONCEPT MOD", SCT.FindingSite, SCT.AorticValve)
    post = container("CONTAINS", DCM.PostCoordinatedMeasurements, [
        num_item(LN.PeakBloodVelocity, 3.2, "m/s",
                 modifiers=[site, code_item("HAS CONCEPT MOD", FLOW_DIRECTION, SCT.AntegradeDirection)]),
        num_item(LN.PeakBloodVelocity, 5.0, "m/s",
                 modifiers=[site, code_item("HAS CONCEPT MOD", FLOW_DIRECTION, SCT.RetrogradeDirection)]),
    ])  # fmt: skip
    doc = read_measurement_sr(write(document([post], template="5300"), tmp_path, "5300.dcm"))
    assert values(doc)["av_vmax"] == 3.2


def _staged(stage: Code, nums: list) -> pydicom.Dataset:
    return container("CONTAINS", DCM.MeasurementGroup, [
        code_item("HAS CONCEPT MOD", SCT.ImageMode, SCT.DopplerContinuousWave),
        code_item("HAS ACQ CONTEXT", STAGE, stage), *nums])  # fmt: skip


def _av(vmax: float, gradient: float) -> list:
    return [num_item(LN.PeakSystolicVelocity, vmax, "m/s"), num_item(LN.MeanGradient, gradient, "mm[Hg]")]


def test_stress_and_procedure_stages_are_never_averaged_with_rest(tmp_path: Path) -> None:
    """TID 5202: every measurement of a group is acquired at its Stage. A stress echo's peak
    values or a procedure's after-values are not the patient's resting valve."""
    def doc(name: str, *groups: pydicom.Dataset):
        content = [section(SCT.LeftVentricle, [group(SCT._2DMode, WALLS_NORMAL)]), section(SCT.AorticValve, groups)]
        return read_measurement_sr(write(document(content, template="5200"), tmp_path, name))

    stress = doc("stress.dcm", _staged(SCT.RestingState, _av(3.4, 27.0)), _staged(SCT.PeakCardiacStressState, _av(4.8, 55.0)))
    assert (values(stress)["av_vmax"], values(stress)["av_mean_gradient"]) == (3.4, 27.0)
    assert _labels(stress)["severe_as"] == 0
    procedure = doc("tavi.dcm", _staged(SCT.BeforeProcedure, _av(4.6, 48.0)), _staged(SCT.AfterProcedure, _av(2.2, 9.0)))
    assert values(procedure)["av_vmax"] == 4.6 and _labels(procedure)["severe_as"] == 1
    assert [m.stage.meaning for m in procedure.measurements if m.concept == "av_vmax"] == ["Before Procedure",
                                                                                          "After Procedure"]
    only_stress = doc("peak.dcm", _staged(SCT.PeakCardiacStressState, _av(4.8, 55.0)))
    sel = select_values(only_stress)["av_vmax"]
    assert sel.value is None and sel.rule == "not at rest" and "Peak" in sel.reason
    assert _labels(only_stress)["severe_as"] is None


@pytest.mark.parametrize(("ivsd_2d", "ivsd_mm", "lvh"), [
    (0.95, 1.05, 0),    # both readings under 1.2: no hypertrophy
    (1.30, 1.45, 1),    # both at or over: hypertrophy
    (1.15, 1.25, None),  # one on each side: the readings do not decide
])  # fmt: skip
def test_2d_and_m_mode_readings_decide_only_when_they_agree_on_the_label(
    ivsd_2d: float, ivsd_mm: float, lvh: int | None, tmp_path: Path
) -> None:
    """GE selects both a 2D and an M-mode reading of one wall: two readings, not a contradiction."""
    def wall(value: float) -> list:
        return [num_item(LN.InterventricularSeptumDiastolicThickness, value, "cm", srt=True),
                num_item(LN.InterventricularSeptumDiastolicThickness, value, "cm", srt=True, modifiers=[MEAN_CHOSEN]),
                num_item(LN.LeftVentriclePosteriorWallDiastolicThickness, 0.9, "cm", srt=True, modifiers=[MEAN_CHOSEN])]

    content = [section(SCT.LeftVentricle, [group(SCT._2DMode, wall(ivsd_2d), srt=True),
                                           group(SCT.MMode, wall(ivsd_mm), srt=True)], srt=True)]
    doc = read_measurement_sr(write(document(content, template="5200"), tmp_path))
    sel = select_values(doc)["ivsd"]
    assert sel.rule == "selected" and sel.value == pytest.approx((ivsd_2d + ivsd_mm) / 2)
    assert sel.span == (ivsd_2d, ivsd_mm)
    from echonode.measurements import load_rules, study_reference

    decision = study_reference([doc], load_rules()).labels["lvh"]
    assert decision.label == lvh
    if lvh is None:
        assert decision.reason.startswith("the readings by different image modes or methods disagree on the label")


def test_selected_readings_of_one_mode_that_disagree_are_still_contradictory(tmp_path: Path) -> None:
    content = [section(SCT.LeftVentricle, [
        group(SCT._2DMode, [num_item(LN.InterventricularSeptumDiastolicThickness, 1.0, "cm", modifiers=[SELECTED]),
                            num_item(LN.InterventricularSeptumDiastolicThickness, 1.4, "cm", modifiers=[SELECTED])]),
        group(SCT.MMode, [num_item(LN.InterventricularSeptumDiastolicThickness, 1.2, "cm", modifiers=[SELECTED])]),
    ])]  # fmt: skip
    sel = select_values(read_measurement_sr(write(document(content, template="5200"), tmp_path)))["ivsd"]
    assert sel.rule == "contradictory" and "1 cm" in sel.reason and "1.4 cm" in sel.reason


def test_signed_velocities_qualified_values_and_ucum_spellings(tmp_path: Path) -> None:
    """A velocity is signed by its direction to the probe; a value with a Numeric Value Qualifier
    (CID 42) is not a measurement; m.s-1 and g/(m2) are UCUM for m/s and g/m2."""
    doc = _av_sr(tmp_path, [num_item(LN.PeakSystolicVelocity, -430.0, "cm/s"), num_item(LN.MeanGradient, 38.0, "mm[Hg]")])
    assert values(doc)["av_vmax"] == 4.3 and _labels(doc)["severe_as"] == 1
    qualified = num_item(LN.PeakSystolicVelocity, 4.5, "m/s")
    qualified.NumericValueQualifierCodeSequence = [echo_sr.coded(Code("114010", "DCM", "Value unknown"))]
    doc = _av_sr(tmp_path, [qualified], name="q.dcm")
    sel = select_values(doc)["av_vmax"]
    assert sel.value is None and "qualified as 'Value unknown'" in sel.reason
    assert convert(4.4, parse_unit("UCUM", "m.s-1")) == 4.4
    assert convert(440.0, parse_unit("UCUM", "cm.s-1")) == 4.4
    assert parse_unit("UCUM", "g/(m2)").dimension == "mass_per_area"


def _equipment_sr(tmp_path: Path, name: str, study: str, nums: list, manufacturer: str, model: str, time: str, **kw):
    content = [section(SCT.LeftVentricle, [group(SCT._2DMode, nums)])]
    ds = document(content, template="5200", study_uid=study, manufacturer=manufacturer, model=model,
                  content_time=time, **kw)
    return read_measurement_sr(write(ds, tmp_path, name))


def test_an_offline_tool_sr_supplements_the_carts_instead_of_erasing_it(tmp_path: Path) -> None:
    """A later SR from other equipment that measures other things (an analysis package's LV
    dimensions) does not erase the cart's walls; a later SR from the same cart does."""
    from echonode.measurements import load_rules, study_reference

    study = generate_uid()
    walls = [num_item(LN.InterventricularSeptumDiastolicThickness, 1.45, "cm"),
             num_item(LN.LeftVentriclePosteriorWallDiastolicThickness, 1.3, "cm")]
    cart = _equipment_sr(tmp_path, "cart.dcm", study, walls, "Philips Medical Systems", "EPIQ 7C", "100000")
    tool = _equipment_sr(tmp_path, "tool.dcm", study, [num_item(LN.LeftVentricleInternalEndDiastolicDimension, 5.1, "cm")],
                         "TOMTEC Imaging Systems", "TOMTEC-ARENA", "120000")
    ref = study_reference([cart, tool], load_rules())
    assert ref.document is tool and ref.values["ivsd"] == 1.45 and ref.values["lvidd"] == 5.1
    assert ref.labels["lvh"].label == 1
    assert ref.supplements == {cart.sop_instance_uid: ("ivsd", "lvpwd")}
    assert "from other equipment" in ref.not_used[cart.sop_instance_uid]
    # The cart's own later export is its final word: what it no longer lists is gone.
    resent = _equipment_sr(tmp_path, "resent.dcm", study, [num_item(LN.LeftVentricleInternalEndDiastolicDimension, 5.1, "cm")],
                           "Philips Medical Systems", "EPIQ 7C", "130000")
    ref = study_reference([cart, resent], load_rules())
    assert ref.values["ivsd"] is None and ref.supplements == {} and ref.labels["lvh"].label is None
    # Nor does an SR that another names as its predecessor, nor one that names no manufacturer.
    amended = _equipment_sr(tmp_path, "amended.dcm", study, [num_item(LN.LeftVentricleInternalEndDiastolicDimension, 5.1, "cm")],
                            "TOMTEC Imaging Systems", "TOMTEC-ARENA", "140000", predecessors=[cart.sop_instance_uid])
    assert study_reference([cart, amended], load_rules()).values["ivsd"] is None
    anonymous = _equipment_sr(tmp_path, "anon.dcm", study, walls, "", "", "090000")
    assert study_reference([anonymous, tool], load_rules()).values["ivsd"] is None


def test_supplements_come_from_each_equipments_own_current_sr_and_one_patient(tmp_path: Path) -> None:
    """Another equipment's SR supplements only as that equipment's final word, and only when it is
    filed under the current SR's Patient ID."""
    from echonode.measurements import load_rules, study_reference

    study = generate_uid()
    av = [num_item(LN.AorticValveVmax, 4.6, "m/s"), num_item(LN.AorticValveMeanGradient, 45.0, "mm[Hg]")]
    v1 = _equipment_sr(tmp_path, "v1.dcm", study, [*WALLS_NORMAL, *av], "GE Vingmed Ultrasound", "Vivid E95", "090000")
    v2 = _equipment_sr(tmp_path, "v2.dcm", study, WALLS_NORMAL, "GE Vingmed Ultrasound", "Vivid E95", "100000")
    tool = _equipment_sr(tmp_path, "tool.dcm", study, [num_item(LN.LeftVentricleInternalEndDiastolicDimension, 5.1, "cm")],
                         "TOMTEC Imaging Systems", "TOMTEC-ARENA", "120000")
    ref = study_reference([v1, v2, tool], load_rules())
    # v2 is the cart's final word: the AV values it dropped do not come back through v1.
    assert ref.values["av_vmax"] is None and ref.labels["severe_as"].label is None
    assert ref.supplements == {v2.sop_instance_uid: ("ivsd", "lvpwd")}
    ds = document([section(SCT.LeftVentricle, [group(SCT._2DMode, WALLS_NORMAL)])], template="5200", study_uid=study,
                  manufacturer="GE Vingmed Ultrasound", model="Vivid E95", content_time="090000")
    ds.PatientID = "SOMEONE-ELSE"
    other = read_measurement_sr(write(ds, tmp_path, "other.dcm"))
    ref = study_reference([other, tool], load_rules())
    assert ref.document is None and ref.labels["lvh"].reason.startswith("the study's measurement SRs are filed under")


def test_a_supplement_gives_only_usable_values(tmp_path: Path) -> None:
    from echonode.measurements import load_rules, study_reference

    study = generate_uid()
    cart = _equipment_sr(tmp_path, "cart.dcm", study, WALLS_NORMAL, "Philips", "EPIQ 7C", "120000")
    # A usable SR (its LVIDd reads) whose AV peak velocity does not: it must not block the next one's.
    late = _equipment_sr(tmp_path, "late.dcm", study, [num_item(LN.AorticValveVmax, 4.4, "m/s/s"),
                                                       num_item(LN.LeftVentricleInternalEndDiastolicDimension, 5.0, "cm")],
                         "TOMTEC", "ARENA", "110000")
    early = _equipment_sr(tmp_path, "early.dcm", study, [num_item(LN.AorticValveVmax, 3.2, "m/s")], "Canon", "Aplio", "100000")
    ref = study_reference([cart, late, early], load_rules())
    assert late.usable and ref.values["av_vmax"] == 3.2
    assert ref.supplements == {late.sop_instance_uid: ("lvidd",), early.sop_instance_uid: ("av_vmax",)}


def test_private_stage_and_direction_codes_are_read_by_their_meaning_only_when_plain(tmp_path: Path) -> None:
    """A cart's own "Rest" stage or "Forward" direction is read as such; a private code that
    says nothing plain (or says stress, or regurgitant) is not taken for rest or forward flow."""
    def vmax(mod_name: Code, value: Code, name: str) -> float | None:
        nums = [num_item(LN.PeakSystolicVelocity, 4.5, "m/s", modifiers=[code_item("HAS CONCEPT MOD", mod_name, value)])]
        return values(_av_sr(tmp_path, nums, name=name))["av_vmax"]

    assert vmax(STAGE, private_code("REST", "99GEMS", "Rest"), "rest.dcm") == 4.5
    assert vmax(STAGE, private_code("ST1", "99GEMS", "Peak stress"), "peak.dcm") is None
    assert vmax(STAGE, private_code("S1", "99GEMS", "Stage 1"), "stage1.dcm") is None
    assert vmax(FLOW_DIRECTION, private_code("FWD", "99PHILIPS", "Forward"), "fwd.dcm") == 4.5
    assert vmax(FLOW_DIRECTION, private_code("AR", "99PHILIPS", "Regurgitant"), "ar.dcm") is None
    assert vmax(FLOW_DIRECTION, private_code("D1", "99PHILIPS", "Direction 1"), "d1.dcm") is None


def test_a_flow_direction_does_not_touch_walls_and_pisa_is_not_the_av_area(tmp_path: Path) -> None:
    regurgitant = code_item("HAS CONCEPT MOD", FLOW_DIRECTION, SCT.RegurgitantFlow)
    content = [container("CONTAINS", DCM.Findings, [code_item("HAS CONCEPT MOD", SCT.FindingSite, SCT.LeftVentricle),
                                                    regurgitant, *WALLS_NORMAL])]
    assert values(read_measurement_sr(write(document(content, template="5200"), tmp_path)))["ivsd"] == 1.0
    pisa = _postcoordinated(tmp_path, [num_item(DCM.EffectiveOrificeArea, 0.25, "cm2", modifiers=[
        _mod(SCT.FindingSite, SCT.AorticValve), _mod(SCT.MeasurementMethod, DCM.ProximalIsovelocitySurfaceArea)])])
    sel = select_values(pisa)["av_area"]
    assert sel.value is None and "regurgitant orifice" in sel.reason


def test_the_nodes_recorded_references_are_read_again_when_reading_changes() -> None:
    from echonode.agreement import record
    from echonode.measurements import load_rules

    rules = load_rules()
    now = record.rules_id(rules)
    version = record.REFERENCE_VERSION
    try:
        record.REFERENCE_VERSION = version + 1  # type: ignore[misc]
        assert record.rules_id(rules) != now
    finally:
        record.REFERENCE_VERSION = version  # type: ignore[misc]


def _postcoordinated(tmp_path: Path, nums: list, *, name: str = "post.dcm", pre: list | None = None):
    content = [container("CONTAINS", DCM.PreCoordinatedMeasurements, pre)] if pre else []
    content.append(container("CONTAINS", DCM.PostCoordinatedMeasurements, nums))
    return read_measurement_sr(write(document(content, template="5300"), tmp_path, name))


def _mod(name: Code, value: Code) -> pydicom.Dataset:
    return code_item("HAS CONCEPT MOD", name, value)


def test_tid5300_post_coordinated_mass_area_and_wall_thickness(tmp_path: Path) -> None:
    """CID 12304 properties with a CID 12305 site: what CID 12300 has no pre-coordinated code for
    (3D LV mass and its index, an AV area by planimetry, a wall by cardiac phase)."""
    lv, av, ivs = (_mod(SCT.FindingSite, s) for s in (SCT.LeftVentricle, SCT.AorticValve, SCT.InterventricularSeptum))
    phase = SCT.CardiovascularCyclePoint
    doc = _postcoordinated(tmp_path, [
        num_item(SCT.MassQuantity, 140.0, "g/m2", modifiers=[lv, _mod(SCT.ImageMode, SCT._3DMode),
                                                           _mod(DCM.MeasurementType, DCM.Indexed)]),
        num_item(SCT.MassQuantity, 260.0, "g", modifiers=[lv, _mod(SCT.ImageMode, SCT._3DMode)]),
        num_item(SCT.Area, 0.8, "cm2", modifiers=[av, _mod(SCT.MeasurementMethod, DCM.Planimetry)]),
        num_item(LN.Thickness, 1.4, "cm", modifiers=[ivs, _mod(phase, SCT.EndDiastole)]),
        num_item(LN.Thickness, 1.7, "cm", modifiers=[ivs, _mod(phase, SCT.EndSystole)]),
        num_item(LN.Thickness, 1.6, "cm", modifiers=[ivs]),  # no phase: not said to be diastolic
        num_item(SCT.MassQuantity, 90.0, "g", modifiers=[_mod(SCT.FindingSite, SCT.LeftAtrium)]),
        num_item(SCT.Area, 4.0, "cm2", modifiers=[_mod(SCT.FindingSite, SCT.MitralValve)]),
    ])  # fmt: skip
    got = values(doc)
    assert (got["lv_mass_index"], got["lv_mass"], got["av_area"], got["ivsd"]) == (140.0, 260.0, 0.8, 1.4)
    assert doc.counts["other_items"] == 4
    eoa = _postcoordinated(tmp_path, [num_item(DCM.EffectiveOrificeArea, 0.75, "cm2", modifiers=[av])], name="eoa.dcm")
    assert values(eoa)["av_area"] == 0.75


def test_a_container_named_by_another_site_overrides_the_inherited_one(tmp_path: Path) -> None:
    """An LVOT container inside an Aortic Valve container (sites given by container names, no
    Finding Site modifier) holds the LVOT's velocity, not the valve's."""
    content = [container("CONTAINS", SCT.AorticValve, [
        num_item(LN.PeakSystolicVelocity, 4.4, "m/s"), num_item(LN.MeanGradient, 42.0, "mm[Hg]"),
        container("CONTAINS", SCT.LeftVentricleOutflowTract, [
            num_item(LN.PeakSystolicVelocity, 1.1, "m/s"), num_item(LN.MeanGradient, 3.0, "mm[Hg]")]),
    ])]  # fmt: skip
    doc = read_measurement_sr(write(document(content, template="5200"), tmp_path))
    assert (values(doc)["av_vmax"], values(doc)["av_mean_gradient"]) == (4.4, 42.0)


def test_the_mass_index_is_derived_from_mass_and_body_surface_area(tmp_path: Path) -> None:
    """A cart that writes the LV mass and the patient's BSA (TID 5201) but no index: walls under
    the limit with an index over it is eccentric hypertrophy, not a normal ventricle."""
    from echonode.measurements import load_rules, study_reference

    bsa = container("CONTAINS", DCM.PatientCharacteristics, [num_item(Code("8277-6", "LN", "Body Surface Area"), 1.8, "m2")])
    content = [bsa, section(SCT.LeftVentricle, [group(SCT._2DMode, [*WALLS_NORMAL, num_item(LN.LeftVentricleMass, 260.0, "g")])])]
    doc = read_measurement_sr(write(document(content, template="5200", patient_sex="M"), tmp_path))
    assert doc.body_surface_area_m2 == 1.8
    ref = study_reference([doc], load_rules())
    index = ref.selections["lv_mass_index"]
    assert index.rule == "derived from LV mass and BSA" and index.value == pytest.approx(260 / 1.8)
    assert ref.labels["lvh"].label == 1
    # A measured index is never replaced, and a BSA in an impossible unit or range is not used.
    measured = [*WALLS_NORMAL, num_item(LN.LeftVentricleMass, 260.0, "g"), num_item(LN.LeftVentricleMass, 100.0, "g/m2")]
    doc = read_measurement_sr(write(document([bsa, section(SCT.LeftVentricle, [group(SCT._2DMode, measured)])],
                                             template="5200", patient_sex="M"), tmp_path, "measured.dcm"))
    assert study_reference([doc], load_rules()).values["lv_mass_index"] == 100.0
    wrong = container("CONTAINS", DCM.PatientCharacteristics, [num_item(Code("8277-6", "LN", "Body Surface Area"), 180.0, "cm")])
    doc = read_measurement_sr(write(document([wrong, content[1]], template="5200"), tmp_path, "wrong.dcm"))
    assert doc.body_surface_area_m2 is None and study_reference([doc], load_rules()).values["lv_mass_index"] is None


def test_sequences_nested_too_deep_are_unreadable_not_a_crash(tmp_path: Path) -> None:
    import sys

    inner = group(SCT._2DMode, WALLS_NORMAL)
    for _ in range(200):  # past the reader's limit of 128
        inner = container("CONTAINS", DCM.MeasurementGroup, [inner])
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)  # only so that pydicom can write the file
    try:
        path = write(document([inner], template="5200"), tmp_path)
    finally:
        sys.setrecursionlimit(limit)
    doc = read_measurement_sr(path)
    assert doc.status == "unreadable" and "nested more than 128 deep" in doc.reason


# ------------------------------------------------------------------ bad input


BAD_VALUES = {
    # case: (NUM builder, problem, valid DICOM (dciodvfy clean))
    "wrong unit": (lambda: num_item(LN.AorticValveCuspSeparation, 7.0, "m/s"), "unit 'm/s' is a velocity, not a length", True),
    "no unit": (lambda: num_item(LN.AorticValveCuspSeparation, 7.0, None), "no unit", False),
    "private unit scheme": (lambda: num_item(LN.AorticValveCuspSeparation, 7.0, "cm", unit_scheme="99GEMS"),
                            "is not a UCUM unit", True),
    "unknown unit": (lambda: num_item(LN.AorticValveCuspSeparation, 7.0, "inch"), "is not a UCUM unit", True),
    "not a number": (lambda: num_item(LN.AorticValveCuspSeparation, "n/a", "cm"), "the value is not a number", False),
    "no value": (lambda: num_item(LN.AorticValveCuspSeparation, None, "cm", qualifier=DCM.MeasurementFailure),
                 "no value (Measurement failure)", True),
    "implausible": (lambda: num_item(LN.AorticValveCuspSeparation, 7.0, "cm"), "outside the plausible 0.05-4 cm", True),
    "mass in cm": (lambda: num_item(LN.LeftVentricleMass, 110.0, "cm"), "not a mass or mass per area", True),
    "indexed to height": (lambda: num_item(LN.LeftVentricleMass, 60.0, "g/m2", modifiers=[code_item(
        "HAS CONCEPT MOD", SCT.MeasurementMethod, DCM.LeftVentricleMassByMModeAdjustedByHeight)]),
        "not indexed to body surface area", True),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_a_value_that_cannot_be_used_says_why(case: str, tmp_path: Path) -> None:
    build, problem, valid = BAD_VALUES[case]
    path = _sr(tmp_path, [build()], site=SCT.LeftVentricle)
    if valid:
        dciodvfy(path)
    with structlog.testing.capture_logs() as logs:
        doc = read_measurement_sr(path)
    (m,) = doc.measurements
    assert m.value is None and problem in m.problem, m.problem
    assert doc.status == "read" and not doc.usable
    sel = select_values(doc)[m.concept]
    assert sel.value is None and problem in sel.reason
    (line,) = [e for e in logs if e["event"] == "measurement_sr.values_refused"]
    assert line["sop_uid"] == doc.sop_instance_uid and any(problem in r for r in line["reasons"])
    assert "TEST^ECHO" not in repr(logs) and "ECHO001" not in repr(logs)


def test_an_sr_with_only_private_codes_says_so(tmp_path: Path) -> None:
    nums = [num_item(private_code(f"P{i}", "99PHILIPS", "LV thing"), 1.0, "cm") for i in range(3)]
    doc = read_measurement_sr(_sr(tmp_path, nums))
    assert doc.status == "no_measurements" and not doc.usable
    assert doc.reason.startswith("only private codes: 3 measurements")


@pytest.mark.parametrize(
    ("title", "sop_class"),
    [(codes.DCM.ImagingMeasurementReport, ComprehensiveSRStorage), (codes.LN.EchocardiographyReport, EnhancedSRStorage),
     (codes.DCM.AdultEchocardiographyProcedureReport, BasicTextSRStorage)],
)  # fmt: skip
def test_a_non_echo_sr_is_ignored_with_the_reason(title: object, sop_class: str, tmp_path: Path) -> None:
    ds = document([], template="1500", title=title, sop_class=ComprehensiveSRStorage)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class if sop_class != BasicTextSRStorage else "1.2.3"
    with structlog.testing.capture_logs() as logs:
        doc = read_measurement_sr(write(ds, tmp_path))
    if sop_class == BasicTextSRStorage:
        assert doc.status == "not_sr"
    else:
        assert doc.status == "not_echo" and title.value in doc.reason and "not DCM 125200" in doc.reason
    assert logs and logs[0]["event"] == "measurement_sr.ignored" and logs[0]["sop_uid"] == doc.sop_instance_uid


@pytest.mark.filterwarnings('ignore:The string "PLA" is unlikely:UserWarning')
def test_the_node_own_ai_sr_is_not_an_echo_measurement_report(tmp_path: Path) -> None:
    """echonode's TID 1500 result sits in the same study; it is not the sonographers' report."""
    from pydicom.data import get_testdata_file

    from echonode.report.build import build_report
    from echonode.report.findings import SourceInstance, TaskFinding

    header = pydicom.dcmread(get_testdata_file("examples_ybr_color.dcm", download=False), stop_before_pixels=True)
    source = SourceInstance(header.SOPClassUID, header.SOPInstanceUID, header.SeriesInstanceUID, "plax")
    finding = TaskFinding(task="lvh", probability=0.8, threshold=0.5, model_name="m", model_version="1",
                          device_uid=generate_uid(), parameters={}, sources=(source,), n_videos=1)
    path = tmp_path / "ai.dcm"
    build_report(header, [finding]).save_as(path, enforce_file_format=True)
    doc = read_measurement_sr(path)
    assert doc.status == "not_echo" and "126000" in doc.reason


def test_a_truncated_sr_is_unreadable_wherever_it_is_cut(tmp_path: Path) -> None:
    data = write(echo_sr.ge_sr(VALUES), tmp_path).read_bytes()
    cut = tmp_path / "cut.dcm"
    statuses = set()
    for end in range(400, len(data), 97):
        cut.write_bytes(data[:end])
        with structlog.testing.capture_logs() as logs:
            doc = read_measurement_sr(cut)
        statuses.add(doc.status)
        assert doc.status != "read", end  # never a smaller report taken for the whole one
        assert not doc.measurements
        if doc.status == "unreadable":
            assert "cut short" in doc.reason
            assert logs[0]["event"] == "measurement_sr.unreadable" and logs[0]["log_level"] == "warning"
    assert "unreadable" in statuses


def test_pydicom_alone_would_read_a_cut_sr_as_a_smaller_one(tmp_path: Path) -> None:
    """Why the reader walks the encoding itself: pydicom says nothing about a cut file."""
    data = write(echo_sr.ge_sr(VALUES), tmp_path).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) * 2 // 3])
    ds = pydicom.dcmread(cut)  # no exception
    assert "ContentSequence" in ds
    assert read_measurement_sr(cut).status == "unreadable"


def test_files_that_are_not_srs_or_not_dicom(tmp_path: Path) -> None:
    text = tmp_path / "notes.dcm"
    text.write_bytes(b"not dicom at all" * 20)
    assert read_measurement_sr(text).reason == "not a DICOM Part 10 file"
    assert read_measurement_sr(tmp_path / "missing.dcm").status == "unreadable"
    big = write(echo_sr.ge_sr(VALUES), tmp_path, "big.dcm")
    doc = read_measurement_sr(big, max_bytes=1000)
    assert doc.status == "unreadable" and "over the" in doc.reason


def test_a_deflate_bomb_is_refused_without_inflating_it(tmp_path: Path) -> None:
    ds = echo_sr.ge_sr(VALUES)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    path = write(ds, tmp_path)
    data = path.read_bytes()
    # The data set starts after group 0002, whose length (0002,0000) gives.
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    bomb = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = bomb.compress(b"\0" * (64 << 20)) + bomb.flush()
    path.write_bytes(data[:meta_end] + body)
    doc = read_measurement_sr(path, max_bytes=8 << 20)
    assert doc.status == "unreadable" and "inflates to more than 8 MiB" in doc.reason


def test_patient_sex_from_subject_sex_then_header(tmp_path: Path) -> None:
    chars = container("CONTAINS", DCM.PatientCharacteristics, [code_item("CONTAINS", DCM.SubjectSex, DCM.Female)])
    ds = document([chars, section(SCT.AorticValve, [group(None, [num_item(LN.AorticValveCuspSeparation, 0.7, "cm")])])],
                  template="5200", patient_sex="M")  # fmt: skip
    assert read_measurement_sr(write(ds, tmp_path)).patient_sex == "F"
    ds = document([section(SCT.AorticValve, [group(None, [num_item(LN.AorticValveCuspSeparation, 0.7, "cm")])])],
                  template="5200", patient_sex="O")  # fmt: skip
    assert read_measurement_sr(write(ds, tmp_path, "b.dcm")).patient_sex is None


# ------------------------------------------------------------------ the raw reader


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    head = tag.to_bytes(4, "big")
    group, element = head[:2][::-1], head[2:][::-1]
    if vr in (b"SQ", b"UN", b"OB", b"UT"):
        return group + element + vr + b"\0\0" + len(value).to_bytes(4, "little") + value
    return group + element + vr + len(value).to_bytes(2, "little") + value


def _implicit(tag: int, value: bytes) -> bytes:
    head = tag.to_bytes(4, "big")
    return head[:2][::-1] + head[2:][::-1] + len(value).to_bytes(4, "little") + value


def test_raw_reader_follows_un_sequences_and_a_switch_to_implicit_vr() -> None:
    """What pydicom also reads: an undefined-length UN holding items (PS3.5 6.2.2), and a
    writer that switches to implicit VR inside a sequence item."""
    from echonode.measurements.rawtree import decode_text, parse_dataset

    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + _implicit(0x0040A040, b"NUM ") + b"\xfe\xff\x0d\xe0\0\0\0\0"
    seq_end = b"\xfe\xff\xdd\xe0\0\0\0\0"
    undefined = b"\xff\xff\xff\xff"
    data = (
        _explicit(0x00080016, b"UI", b"1.2\0")
        + b"\x09\x00\x10\x10UN\0\0" + undefined + item + seq_end  # private, undefined-length UN
        + b"\x40\x00\x30\xa7SQ\0\0" + undefined + item + seq_end  # SQ whose item switches to implicit VR
    )
    ds = parse_dataset(data, implicit=False, little=True)
    assert decode_text(ds[0x00080016]) == "1.2"
    assert decode_text(ds[0x00091010][0][0x0040A040]) == "NUM"
    assert decode_text(ds[0x0040A730][0][0x0040A040]) == "NUM"


def test_character_sets_and_pydicom_in_raise_mode(tmp_path: Path) -> None:
    """Text is decoded with the SR's Specific Character Set; an unknown one, even with pydicom
    set to raise on bad values (as tests of objects we produce do), does not stop the read."""
    from tests.report_support import strict_reading

    ds = echo_sr.tid5300_sr(VALUES, manufacturer="Échographes Réunis")
    assert read_measurement_sr(write(ds, tmp_path, "utf8.dcm")).manufacturer == "Échographes Réunis"
    ds = echo_sr.tid5300_sr(VALUES, manufacturer="Échographes Réunis")
    ds.SpecificCharacterSet = "ISO_IR 100"
    path = write(ds, tmp_path, "latin1.dcm")
    data = path.read_bytes().replace(b"ISO_IR 100", b"ISO_IR 999")
    path.write_bytes(data)
    with strict_reading():
        doc = read_measurement_sr(path)
    assert doc.status == "read" and doc.manufacturer == "Échographes Réunis"
    assert values(doc)["av_vmax"] == pytest.approx(4.2)


def test_the_reader_imports_neither_torch_nor_train() -> None:
    """The node process reads measurement SRs too; it never imports torch, and echonode never imports train."""
    import sys

    code = (
        "import sys, echonode.measurements, echonode.measurements.rules;"
        "bad = [m for m in ('torch', 'train') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_loinc_check_digits_are_judged_by_loincs_mod_10_rule() -> None:
    used = {m.code.value for c in CONCEPTS for m in c.names if m.code.scheme_designator == "LN"}
    assert used and not any(loinc_check_digit_fails(v) for v in used)
    # Hand-typed neighbours of the IVSd (18154-5) and LVPWd (18152-9) codes, as one template had them.
    assert loinc_check_digit_fails("18154-7") and loinc_check_digit_fails("18152-1")
    # Shapes the rule does not cover are not judged (LOINC Part and answer codes).
    assert not loinc_check_digit_fails("LP7839-6") and not loinc_check_digit_fails("LA6576-8")


def test_a_mistyped_loinc_code_says_so_instead_of_not_measured(tmp_path: Path) -> None:
    """A wrong check digit under a standard meaning: refused with its reason, never read by the meaning."""
    wrong_ivsd = Code("18154-7", "LN", "Interventricular Septum Diastolic Thickness")
    wrong_unknown = Code("18150-1", "LN", "Something Else Entirely")
    content = [container("CONTAINS", DCM.MeasurementGroup, [
        num_item(wrong_ivsd, 13.0, "mm"), num_item(wrong_unknown, 2.0, "cm"),
        num_item(LN.InterventricularSeptumDiastolicThickness, None, "mm")])]  # fmt: skip
    doc = read_measurement_sr(write(document(content, template="5200"), tmp_path))
    refused = [m for m in doc.measurements if m.raw_value]
    assert [(m.concept, m.value) for m in refused] == [("ivsd", None)]
    assert refused[0].problem is not None and "'18154-7' is not a LOINC code" in refused[0].problem
    assert "LN 18154-5" in refused[0].problem
    assert doc.counts["other_items"] == 1  # the unknown meaning: another concept, as any code echonode does not read
    sel = select_values(doc)["ivsd"]
    assert sel.value is None and sel.rule == "unusable"
    assert "check digit is wrong" in sel.reason
