"""Tests for echonode.report: build the SR, write it, read it back strictly, validate.

What we *produce* is read back with pydicom's strict validation
(``reading_validation_mode = RAISE``) and checked with dicom3tools'
``dciodvfy`` (no ``Error`` line) and dcmtk's ``dsrdump``.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import re
import warnings
from collections.abc import Iterator

import highdicom as hd
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

import echonode
from echonode.report.build import SERIES_DESCRIPTION, build_report
from echonode.report.findings import SourceInstance
from echonode.report.header import COPIED_EXACTLY, HeaderRefused
from echonode.report.read import summarise_report
from echonode.report.summary import reported_probability
from tests.report_support import (
    PLA_WARNING,
    SOP_CLASS_UIDS,
    codes_in,
    dciodvfy,
    dsrdump,
    evidence_refs,
    example_sources,
    make_findings,
    strict_reading,
    study_header,
    walk,
    write_read,
)

PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
    "AccessionNumber", "ReferringPhysicianName",
)

pytestmark = pytest.mark.filterwarnings(PLA_WARNING)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def header() -> Dataset:
    return study_header()


@pytest.fixture
def strict() -> Iterator[None]:
    with strict_reading():
        yield


@pytest.fixture
def sources(header: Dataset) -> tuple[SourceInstance, ...]:
    return example_sources(header)


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("sop_class", sorted(SOP_CLASS_UIDS))
def test_round_trip(sop_class, header, sources, strict, tmp_path):
    findings = make_findings(sources)
    sr = build_report(header, findings, sop_class=sop_class, institution_name="Test Hospital")
    back = write_read(sr, tmp_path / "sr.dcm")

    # Same patient and study, new series, Modality SR, the chosen SOP class.
    for keyword in PATIENT_STUDY:
        assert back.get(keyword) == header.get(keyword), keyword
    assert back.SOPClassUID == SOP_CLASS_UIDS[sop_class]
    assert back.file_meta.MediaStorageSOPClassUID == back.SOPClassUID
    assert back.Modality == "SR"
    assert back.SeriesInstanceUID not in {s.series_instance_uid for s in sources}
    assert back.SeriesInstanceUID != header.SeriesInstanceUID
    assert back.SeriesNumber == 9001 and back.InstanceNumber == 1
    assert back.SeriesDescription == SERIES_DESCRIPTION
    assert "NOT FOR DIAGNOSTIC USE" in back.SeriesDescription
    assert back.Manufacturer == "echonode"
    assert back.ManufacturerModelName == "echonode"
    assert back.SoftwareVersions == echonode.__version__
    assert back.InstitutionName == "Test Hospital"
    assert back.CompletionFlag == "COMPLETE"
    assert back.VerificationFlag == "UNVERIFIED"
    assert back.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    # The codes the contract names, with pydicom's meanings.
    found = codes_in(back)
    for code in [
        ("DCM", "126000", "Imaging Measurement Report"),
        ("SCT", "55827005", "Left ventricular hypertrophy"),
        ("SCT", "60573004", "Aortic stenosis"),
        ("SCT", "87878005", "Left ventricle"),
        ("SCT", "34202007", "Aortic Valve"),
        ("SCT", "52101004", "Present"),
        ("SCT", "272519000", "Absent"),
        ("SCT", "24484000", "Severe"),
        ("DCM", "122157", "Probability"),
        ("DCM", "111001", "Algorithm Name"),
        ("DCM", "111003", "Algorithm Version"),
        ("DCM", "121071", "Finding"),
        ("SCT", "363698007", "Finding Site"),
        ("DCM", "121007", "Device"),
        ("DCM", "111031", "Image View"),
    ]:
        assert code in found, code

    # Every source is evidence, in this study; nothing else is.
    expected = {
        (header.StudyInstanceUID, s.series_instance_uid, s.sop_class_uid, s.sop_instance_uid)
        for s in sources
    }
    assert evidence_refs(back, "CurrentRequestedProcedureEvidenceSequence") == expected
    assert "PertinentOtherEvidenceSequence" not in back

    # Contributing equipment: one "Processing Algorithm" (IHE AIR) item per model.
    algorithms = [
        item for item in back.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
    ]
    assert {(a.ManufacturerModelName, a.SoftwareVersions, a.DeviceUID) for a in algorithms} == {
        (f.model_name, f.model_version, f.device_uid) for f in findings
    }
    for item in algorithms:
        code = item.PurposeOfReferenceCodeSequence[0]
        assert (code.CodingSchemeDesignator, code.CodeValue) == ("99IHE", "Newcode1")
        assert item.Manufacturer == "echonode"
    schemes = {i.CodingSchemeDesignator for i in back.CodingSchemeIdentificationSequence}
    assert {"99ECHONODE", "99IHE"} <= schemes

    # What the SR says.
    summary = summarise_report(back)
    assert summary["study_uid"] == header.StudyInstanceUID
    assert summary["sop_class_uid"] == SOP_CLASS_UIDS[sop_class]
    by_task = {f["task"]: f for f in summary["findings"]}
    assert set(by_task) == {"lvh", "severe_as"}
    for f in findings:
        got = by_task[f.task]
        # 3 decimals: what a probability means, not 14 digits.
        assert got["probability"] == reported_probability(f.probability, f.threshold)
        assert got["probability"] == pytest.approx(f.probability, abs=5e-4)
        assert got["threshold"] == pytest.approx(f.threshold)
        assert got["present"] is (f.probability >= f.threshold)
        assert got["model_name"] == f.model_name
        assert got["model_version"] == f.model_version
        assert got["device_uid"] == f.device_uid
        assert got["n_videos"] == f.n_videos
        assert got["video_views"] == {s.sop_instance_uid: s.view for s in f.sources}
        assert got["views_used"] == list(dict.fromkeys(s.view for s in f.sources))
        assert got["videos"] == [s.sop_instance_uid for s in f.sources]
        assert got["video_probabilities"] == {uid: round(p, 3) for uid, p in f.video_probabilities.items()}
    assert by_task["lvh"]["present"] is True
    assert by_task["severe_as"]["present"] is False
    assert by_task["severe_as"]["severity"] == "Severe"
    assert by_task["lvh"]["finding_site"] == "Left ventricle"
    assert by_task["lvh"]["parameters"]["frame_size"] == "112"
    # The threshold is always among the parameters, even when not given.
    assert by_task["severe_as"]["parameters"]["threshold"] == "0.4"


@pytest.mark.parametrize("sop_class", sorted(SOP_CLASS_UIDS))
def test_validates_clean(sop_class, header, sources, tmp_path):
    path = tmp_path / "sr.dcm"
    build_report(header, make_findings(sources), sop_class=sop_class).save_as(
        path, enforce_file_format=True
    )
    dciodvfy(path)
    text = dsrdump(path)
    for meaning in ("Left ventricular hypertrophy", "Aortic stenosis", "Present",
                    "Absent", "Probability", "Imaging Measurement Report"):
        assert meaning in text, meaning


def test_bytesio_round_trip(header, sources, strict):
    sr = build_report(header, make_findings(sources))
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    back = pydicom.dcmread(buf)
    assert summarise_report(back)["findings"][0]["probability"] == 0.873


def test_summarise_from_path_and_dataset_agree(header, sources, strict, tmp_path):
    sr = build_report(header, make_findings(sources))
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert summarise_report(path) == summarise_report(pydicom.dcmread(path))
    assert summarise_report(str(path))["sop_uid"] == sr.SOPInstanceUID


def test_given_uids_and_numbers_are_used(header, sources, strict, tmp_path):
    series, sop = generate_uid(), generate_uid()
    sr = build_report(header, make_findings(sources), series_instance_uid=series,
                      sop_instance_uid=sop, series_number=42, instance_number=7,
                      manufacturer="Acme", software_version="9.9")
    back = write_read(sr, tmp_path / "sr.dcm")
    assert (back.SeriesInstanceUID, back.SOPInstanceUID) == (series, sop)
    assert (back.SeriesNumber, back.InstanceNumber) == (42, 7)
    assert back.Manufacturer == "Acme" and back.SoftwareVersions == "9.9"


def test_two_reports_get_new_uids(header, sources):
    a = build_report(header, make_findings(sources))
    b = build_report(header, make_findings(sources))
    assert a.SeriesInstanceUID != b.SeriesInstanceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID


def test_observer_contexts(header, sources, strict, tmp_path):
    """Document-level device observers, one per bundle; none inside a group."""
    one = write_read(
        build_report(header, make_findings(sources, same_device=True)), tmp_path / "one.dcm"
    )
    two = write_read(build_report(header, make_findings(sources)), tmp_path / "two.dcm")
    s1, s2 = summarise_report(one), summarise_report(two)
    assert len(s1["device_observers"]) == 1
    assert sorted(s2["device_observers"]) == sorted(f["device_uid"] for f in s2["findings"])
    assert len({f["device_uid"] for f in s1["findings"]}) == 1
    assert len({f["device_uid"] for f in s2["findings"]}) == 2
    for ds in (one, two):
        for item in walk(ds.ContentSequence):
            if item.ConceptNameCodeSequence[0].CodeValue == "125007":  # Measurement Group
                for sub in item.ContentSequence:
                    assert sub.ConceptNameCodeSequence[0].CodeValue != "121012"


def test_highdicom_reads_it_back(header, sources, tmp_path):
    """highdicom's own TID 1500 reader sees the groups as we meant them."""
    path = tmp_path / "sr.dcm"
    build_report(header, make_findings(sources)).save_as(path, enforce_file_format=True)
    report = hd.sr.srread(path)
    assert isinstance(report, hd.sr.Comprehensive3DSR)  # the default class
    groups = report.content.get_image_measurement_groups()
    assert [g.finding_type.meaning for g in groups] == [
        "Left ventricular hypertrophy", "Aortic stenosis"
    ]
    lvh = groups[0]
    assert [(q.name.meaning, q.value.meaning) for q in lvh.get_qualitative_evaluations()] == [
        ("Left ventricular hypertrophy", "Present")
    ]
    assert lvh.get_measurements(name=codes.DCM.Probability)[0].value == 0.873
    assert len(lvh.source_images) == len(sources)
    assert lvh.finding_sites[0].value.meaning == "Left ventricle"
    assert len(report.content.get_observer_contexts()) == 2


def test_threshold_boundary_is_present(header, sources):
    lvh = dataclasses.replace(make_findings(sources)[0], probability=0.5, threshold=0.5)
    summary = summarise_report(build_report(header, [lvh]))
    assert summary["findings"][0]["present"] is True


def test_header_without_type2_attributes(header, sources, strict, tmp_path):
    """A vendor header lacking Type 2 patient/study attributes still works."""
    bare = pydicom.Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                    "SeriesInstanceUID", "PatientID", "PatientName"):
        setattr(bare, keyword, header.get(keyword))
    back = write_read(build_report(bare, make_findings(sources)), tmp_path / "sr.dcm")
    assert back.StudyInstanceUID == header.StudyInstanceUID
    assert back.PatientID == header.PatientID
    assert "AccessionNumber" in back and not back.AccessionNumber


# ---------------------------------------------------------------- vendor values


def vendor(ds: Dataset, **values) -> Dataset:
    """A copy of ``ds`` with values as read from a vendor's file (encoded, not validated)."""
    out = copy.deepcopy(ds)
    for keyword, value in values.items():
        tag = Tag(pydicom.datadict.tag_for_keyword(keyword))
        vr = pydicom.datadict.dictionary_VR(tag)
        raw = ("\\".join(value) if isinstance(value, list) else value).encode()
        raw += (b"\0" if vr == "UI" else b" ") * (len(raw) % 2)
        out[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
    return out


@pytest.mark.parametrize(
    ("received", "sent"),
    [("SECRET-SEX", ""), ("MALE", ""), (" m ", "M"), ("f", "F"), ("o", "O"), ("F", "F"), (["M", "F"], "")],
)
def test_patient_sex_highdicom_refuses_is_normalised(received, sent, header, sources, tmp_path):
    """A PatientSex other than M, F, O or empty would make highdicom refuse the SR."""
    odd = vendor(header, PatientSex=received)
    with capture_logs() as logs:
        sr = build_report(odd, make_findings(sources))
    back = write_read(sr, tmp_path / "sr.dcm")
    assert back.PatientSex == sent
    for keyword in COPIED_EXACTLY:
        assert back.get(keyword) == header.get(keyword), keyword
    events = [e for e in logs if e["event"] == "sr.header_normalised"]
    if received == sent:
        assert events == []
    else:
        (event,) = events
        assert event["log_level"] == "warning"
        assert event["attributes"] == {"PatientSex": "normalised" if sent else "emptied"}
        assert event["study_uid"] == header.StudyInstanceUID
        assert event["sop_instance_uid"] == header.SOPInstanceUID
        assert "SECRET" not in repr(logs)
    dciodvfy(tmp_path / "sr.dcm")


# Values a vendor gets wrong in the other patient and study attributes
# highdicom copies: emptied (Type 2 present and empty; Type 3 empty).
INVALID = {
    "PatientBirthDate": "1970-01-01",
    "PatientBirthTime": "25",
    "StudyDate": "2020-13-40",
    "StudyTime": "25:99",
    "PatientAge": "45",
    "PatientWeight": "seventy",
    "StudyID": "S" * 17,                          # SH: 16 at most
    "StudyDescription": "D" * 65,                 # LO: 64 at most
    "ReferringPhysicianName": "R" * 65 + "^A",    # PN: 64 a component
    "IssuerOfPatientID": "I" * 65,
    "AdditionalPatientHistory": "H" * 10241,      # LT: 10240 at most
}
VALID = {"PatientAge": "045Y", "PatientWeight": "70.5", "PatientSize": "1.75", "StudyTime": "101530.25"}


def test_other_invalid_patient_study_values_are_emptied(header, sources, tmp_path):
    odd = vendor(header, **INVALID)
    with capture_logs() as logs:
        back = write_read(build_report(odd, make_findings(sources)), tmp_path / "sr.dcm")
    for keyword in INVALID:
        assert keyword in back and back[keyword].value in ("", None), keyword
    for keyword in COPIED_EXACTLY:
        assert back.get(keyword) == header.get(keyword), keyword
    (event,) = [e for e in logs if e["event"] == "sr.header_normalised"]
    assert event["attributes"] == dict.fromkeys(INVALID, "emptied")
    dciodvfy(tmp_path / "sr.dcm")

    # Valid values are kept as they are (a DS or IS value was once emptied for its type).
    fine = vendor(header, **VALID)
    with capture_logs() as logs:
        back = write_read(build_report(fine, make_findings(sources)), tmp_path / "fine.dcm")
    assert {k: str(back[k].value) for k in VALID} == VALID
    assert not [e for e in logs if e["event"] == "sr.header_normalised"]


def test_identity_values_are_copied_exactly(header, sources, tmp_path):
    """Invalid but accepted by highdicom: the PACS holds the same value, so the SR carries it."""
    odd = vendor(header, PatientID="P" * 70,        # LO: 64 at most
                 AccessionNumber="A" * 20,              # SH: 16 at most
                 PatientName="N" * 70)                  # PN: 64 a component
    back = write_read(build_report(odd, make_findings(sources)), tmp_path / "sr.dcm")
    for keyword in ("PatientID", "AccessionNumber", "PatientName"):
        assert back[keyword].value == odd[keyword].value, keyword


@pytest.mark.parametrize("keyword", ["PatientName", "StudyInstanceUID"])
def test_identity_values_highdicom_refuses_refuse_the_report(keyword, header, sources):
    two = ["SECRET^ONE", "SECRET^TWO"] if keyword == "PatientName" else ["1.2.3", "1.2.4"]
    odd = vendor(header, **{keyword: two})
    with pytest.raises(HeaderRefused, match=f"^{keyword} has 2 values") as info:
        build_report(odd, make_findings(sources))
    assert "SECRET" not in str(info.value) and "1.2.3" not in str(info.value)


def _latin1_header(header, charset):
    """``header`` as a vendor writes it: a latin-1 name under the given Specific Character Set."""
    out = vendor(header, SpecificCharacterSet=charset)
    raw = "Müller^Jörg".encode("latin-1")
    tag = Tag(pydicom.datadict.tag_for_keyword("PatientName"))
    out[tag] = RawDataElement(tag, "PN", len(raw), raw, 0, False, True)
    return out


@pytest.mark.parametrize("charset", ["ISO-IR 100", "ISO IR 100", "ISO_IR 100"])
def test_misspelt_character_set_is_corrected(charset, header, sources, tmp_path):
    """pydicom reads "ISO-IR 100" as latin-1; the report declares the set it was read with."""
    odd = _latin1_header(header, charset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own warning about the misspelling
        with capture_logs() as logs:
            sr = build_report(odd, make_findings(sources))
    path = tmp_path / "sr.dcm"
    back = write_read(sr, path)
    assert back.SpecificCharacterSet == "ISO_IR 100"
    assert str(back.PatientName) == "Müller^Jörg"
    assert "Müller^Jörg".encode("latin-1") in path.read_bytes()  # the PACS's bytes, unchanged
    events = [e for e in logs if e["event"] == "sr.header_normalised"]
    if charset == "ISO_IR 100":
        assert events == []
    else:
        (event,) = events
        assert event["attributes"] == {"SpecificCharacterSet": "normalised"}
        assert "Müller" not in repr(logs)
    dciodvfy(path)


@pytest.mark.parametrize("charset", ["", "ISO_IR 6"])
def test_empty_character_set_is_the_default_repertoire(charset, header, sources, tmp_path):
    odd = vendor(header, SpecificCharacterSet=charset)
    with capture_logs() as logs:
        back = write_read(build_report(odd, make_findings(sources)), tmp_path / "sr.dcm")
    assert back.get("SpecificCharacterSet", "") in ("", "ISO_IR 6")
    assert back.PatientName == header.PatientName
    assert not [e for e in logs if e["event"] == "sr.header_normalised"]


def test_misspelt_code_extension_is_corrected(header, sources, tmp_path):
    odd = vendor(header, SpecificCharacterSet=["", "ISO_2022_IR 100"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = write_read(build_report(odd, make_findings(sources)), tmp_path / "sr.dcm")
    assert list(back.SpecificCharacterSet) == ["ISO 2022 IR 6", "ISO 2022 IR 100"]


# "ISO-IR_192" is no misspelling pydicom corrects: it read the names with its
# default, so declaring UTF-8 would carry a mangled name.
@pytest.mark.parametrize("charset", ["SECRET-CHARSET", "latin_1", "ISO_IR 999", "ISO-IR 999", "ISO-IR_192"])
def test_unknown_character_set_refuses_the_report(charset, header, sources):
    """The names may have been decoded wrongly: the node never guesses a patient's name."""
    odd = _latin1_header(header, charset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(HeaderRefused, match="^SpecificCharacterSet names a character set") as info:
            build_report(odd, make_findings(sources))
    assert "SECRET" not in str(info.value) and "Müller" not in str(info.value)


@pytest.mark.parametrize("retired", ["1.2.840.10008.5.1.4.1.1.3", "1.2.840.10008.5.1.4.1.1.6"])
def test_retired_ultrasound_classes_are_referenced_as_they_are(retired, header, sources, tmp_path):
    """Older carts send the retired US classes (the SCP takes them); highdicom knows no IOD for them."""
    old = copy.deepcopy(header)
    old.SOPClassUID = retired
    old_sources = tuple(dataclasses.replace(s, sop_class_uid=retired) for s in sources)
    path = tmp_path / "sr.dcm"
    back = write_read(build_report(old, make_findings(old_sources)), path)
    refs = [
        r.ReferencedSOPClassUID
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for r in series.ReferencedSOPSequence
    ]
    assert refs == [retired] * len(sources)
    for keyword in COPIED_EXACTLY:
        assert back.get(keyword) == header.get(keyword), keyword
    dciodvfy(path)


# ---------------------------------------------------------------- supersedes


def test_supersedes(header, sources, strict, tmp_path):
    first = build_report(header, make_findings(sources))
    earlier = (first.SOPClassUID, first.SOPInstanceUID, first.SeriesInstanceUID)
    second = build_report(header, make_findings(sources), supersedes=earlier,
                          series_instance_uid=first.SeriesInstanceUID, instance_number=2)
    path = tmp_path / "sr.dcm"
    back = write_read(second, path)
    assert evidence_refs(back, "PredecessorDocumentsSequence") == {
        (header.StudyInstanceUID, first.SeriesInstanceUID, first.SOPClassUID,
         first.SOPInstanceUID)
    }
    summary = summarise_report(back)
    assert summary["predecessors"] == [first.SOPInstanceUID]
    assert first.SOPInstanceUID in summary["supersedes_text"]
    assert back.SOPInstanceUID != first.SOPInstanceUID
    dciodvfy(path)


# ---------------------------------------------------------------- no usable video


@pytest.mark.parametrize("sop_class", sorted(SOP_CLASS_UIDS))
def test_no_usable_video_report(sop_class, header, strict, tmp_path):
    reason = "No usable video: 3 instances, none a cine loop of at least 8 frames"
    sr = build_report(header, [], sop_class=sop_class, no_usable_video_reason=reason)
    path = tmp_path / "sr.dcm"
    back = write_read(sr, path)
    for keyword in PATIENT_STUDY:
        assert back.get(keyword) == header.get(keyword), keyword
    assert back.Modality == "SR"
    summary = summarise_report(back)
    assert summary["findings"] == []
    assert summary["no_usable_video_reason"] == reason
    assert summary["evidence"] == []
    names = {code[2] for code in codes_in(back)}
    assert "Measurement Group" not in names and "Imaging Measurements" not in names
    assert "No usable video" in names
    dciodvfy(path)
    assert "No usable video" in dsrdump(path)


# ---------------------------------------------------------------- bad arguments


def _bad(findings, **changes):
    return [dataclasses.replace(findings[0], **changes)]


@pytest.mark.parametrize(
    ("make_args", "argument"),
    [
        (lambda f: dict(findings=[]), "findings"),
        (lambda f: dict(findings=f, sop_class="basic"), "sop_class"),
        (lambda f: dict(findings=_bad(f, probability=1.5)), "findings[0].probability"),
        (lambda f: dict(findings=_bad(f, probability=-0.1)), "findings[0].probability"),
        (lambda f: dict(findings=_bad(f, probability=float("nan"))), "findings[0].probability"),
        (lambda f: dict(findings=_bad(f, threshold=2.0)), "findings[0].threshold"),
        (lambda f: dict(findings=_bad(f, task="view")), "findings[0].task"),
        (lambda f: dict(findings=_bad(f, sources=())), "findings[0].sources"),
        (lambda f: dict(findings=_bad(f, n_videos=0)), "findings[0].n_videos"),
        (lambda f: dict(findings=_bad(f, device_uid="")), "findings[0].device_uid"),
        (lambda f: dict(findings=_bad(f, video_probabilities={"1.2.3": 0.5})),
         "findings[0].video_probabilities"),
        (lambda f: dict(findings=[f[0], f[0]]), "findings"),
        (lambda f: dict(findings=f, no_usable_video_reason="none"), "no_usable_video_reason"),
        (lambda f: dict(findings=[], no_usable_video_reason="  "), "no_usable_video_reason"),
        (lambda f: dict(findings=f, supersedes=("1.2", "1.3")), "supersedes"),
        (lambda f: dict(findings=f, series_number=0), "series_number"),
    ],
)
def test_bad_arguments(make_args, argument, header, sources):
    with pytest.raises(ValueError, match=f'"{re.escape(argument)}"'):
        build_report(header, **make_args(make_findings(sources)))


def test_header_without_study_uid(header, sources):
    bare = pydicom.Dataset()
    bare.PatientID = "1"
    with pytest.raises(ValueError, match='"study_header"'):
        build_report(bare, make_findings(sources))


def test_summarise_rejects_other_objects(header):
    with pytest.raises(ValueError, match='"ds"'):
        summarise_report(header)
