"""The SR's storage class: Comprehensive 3D SR by default, the same report in another class on demand.

A PACS that refuses Comprehensive 3D SR at association is sent the report
converted by :func:`echonode.report.sop.as_sop_class`; these tests check the
conversion the delivery relies on: valid (dciodvfy, dsrdump) both ways, the
same content, and the same SOP Instance UID every time it is made.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from echonode.config import SR_SOP_CLASSES, SRConfig, parse_config
from echonode.report.build import SOP_CLASSES, build_report
from echonode.report.read import summarise_report
from echonode.report.sop import (
    COMPREHENSIVE,
    COMPREHENSIVE_3D,
    ENHANCED,
    SR_SOP_CLASS_UIDS,
    as_sop_class,
    derived_sop_instance_uid,
    fallback_sop_class,
    sendable_classes,
)
from tests.conftest import REPO
from tests.report_support import (
    PLA_WARNING,
    SOP_CLASS_UIDS,
    dciodvfy,
    dsrdump,
    example_sources,
    make_findings,
    strict_reading,
    study_header,
    write_read,
)

pytestmark = pytest.mark.filterwarnings(PLA_WARNING)


@pytest.fixture(scope="module")
def header() -> Dataset:
    return study_header()


def _summary_without_identity(ds: Dataset) -> dict:
    s = summarise_report(ds)
    for key in ("sop_uid", "sop_class_uid"):
        s.pop(key)
    return s


def test_comprehensive_3d_is_the_default(header: Dataset, tmp_path: Path) -> None:
    """The IHE AI Results IOD unless the administrator says otherwise: config, builder and example file."""
    assert SRConfig().sop_class == "comprehensive3d"
    assert parse_config({}).sr.sop_class == "comprehensive3d"
    example = parse_config(_sr_table(REPO / "etc" / "echonode.toml"))
    assert example.sr.sop_class == "comprehensive3d"
    sr = build_report(header, make_findings(example_sources(header)))
    assert str(sr.SOPClassUID) == COMPREHENSIVE_3D == SOP_CLASS_UIDS["comprehensive3d"]
    # One list of classes: the config's names, the builder's and the converter's agree.
    assert list(SR_SOP_CLASSES) == list(SR_SOP_CLASS_UIDS) == list(SOP_CLASSES)
    for name, cls in SOP_CLASSES.items():
        built = build_report(header, make_findings(example_sources(header)), sop_class=name)
        assert isinstance(built, cls) and str(built.SOPClassUID) == SR_SOP_CLASS_UIDS[name]


def _sr_table(path: Path) -> dict:
    import tomllib

    with path.open("rb") as fh:
        data = tomllib.load(fh)
    # Its [sr] table alone: the rest names folders that need not exist here.
    return {"sr": data["sr"]}


@pytest.mark.parametrize(
    ("source", "target"),
    [("comprehensive3d", "comprehensive"), ("comprehensive3d", "enhanced"),
     ("comprehensive", "comprehensive3d"), ("enhanced", "comprehensive3d")],
)
def test_same_report_in_another_class_validates_both_ways(
    source: str, target: str, header: Dataset, tmp_path: Path
) -> None:
    original_path = tmp_path / "original.dcm"
    build_report(header, make_findings(example_sources(header)), sop_class=source).save_as(
        original_path, enforce_file_format=True
    )
    original = pydicom.dcmread(original_path)
    converted = as_sop_class(original, SR_SOP_CLASS_UIDS[target])
    with strict_reading():
        back = write_read(converted, tmp_path / "converted.dcm")

    assert str(back.SOPClassUID) == SR_SOP_CLASS_UIDS[target]
    assert back.file_meta.MediaStorageSOPClassUID == back.SOPClassUID
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
    assert back.SOPInstanceUID == derived_sop_instance_uid(original.SOPInstanceUID, SR_SOP_CLASS_UIDS[target])
    assert back.SOPInstanceUID != original.SOPInstanceUID
    # The same report: content, patient, study, series and evidence unchanged.
    assert back.ContentSequence == original.ContentSequence
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber", "SeriesInstanceUID",
                    "InstanceNumber", "ContentDate", "ContentTime", "CurrentRequestedProcedureEvidenceSequence"):
        assert back.get(keyword) == original.get(keyword), keyword
    assert _summary_without_identity(back) == _summary_without_identity(original)
    # The original read from its file is untouched.
    assert str(original.SOPClassUID) == SR_SOP_CLASS_UIDS[source]

    dciodvfy(original_path)
    dciodvfy(tmp_path / "converted.dcm")
    text = dsrdump(tmp_path / "converted.dcm")
    assert "Left ventricular hypertrophy" in text and "Imaging Measurement Report" in text


def test_conversion_is_the_same_instance_every_time(header: Dataset, tmp_path: Path) -> None:
    """A resend after a crash converts the file again: it must be the same instance, not a second report."""
    path = tmp_path / "sr.dcm"
    build_report(header, make_findings(example_sources(header))).save_as(path, enforce_file_format=True)
    first = as_sop_class(pydicom.dcmread(path), COMPREHENSIVE)
    second = as_sop_class(pydicom.dcmread(path), COMPREHENSIVE)
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first == second
    enhanced = as_sop_class(pydicom.dcmread(path), ENHANCED)
    assert len({first.SOPInstanceUID, enhanced.SOPInstanceUID, pydicom.dcmread(path).SOPInstanceUID}) == 3
    assert pydicom.uid.UID(first.SOPInstanceUID).is_valid
    # Already of that class: a copy with the same UIDs.
    same = as_sop_class(pydicom.dcmread(path), COMPREHENSIVE_3D)
    assert (same.SOPClassUID, same.SOPInstanceUID) == (COMPREHENSIVE_3D, pydicom.dcmread(path).SOPInstanceUID)


def test_predecessor_is_named_as_the_destination_holds_it(header: Dataset, tmp_path: Path) -> None:
    """A PACS that refuses 3D was sent the superseded report converted too: the new one names that one."""
    sources = example_sources(header)
    first = build_report(header, make_findings(sources))
    earlier = (str(first.SOPClassUID), str(first.SOPInstanceUID), str(first.SeriesInstanceUID))
    second = build_report(header, make_findings(sources), supersedes=earlier, instance_number=2)
    converted = write_read(as_sop_class(second, COMPREHENSIVE), tmp_path / "second.dcm")
    first_there = derived_sop_instance_uid(first.SOPInstanceUID, COMPREHENSIVE)
    assert summarise_report(converted)["predecessors"] == [first_there]
    ref = converted.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPClassUID == COMPREHENSIVE
    text = summarise_report(converted)["supersedes_text"]
    assert first_there in text and str(first.SOPInstanceUID) not in text
    dciodvfy(tmp_path / "second.dcm")

    # A predecessor of another class (the setting changed in between) was
    # sent as it was: its reference stays.
    other = ("1.2.840.10008.5.1.4.1.1.88.33", generate_uid(), generate_uid())
    third = build_report(header, make_findings(sources), supersedes=other)
    assert summarise_report(as_sop_class(third, ENHANCED))["predecessors"] == [other[1]]


def test_fallback_picks_what_the_destination_accepted() -> None:
    assert sendable_classes(COMPREHENSIVE_3D) == (COMPREHENSIVE_3D, COMPREHENSIVE, ENHANCED)
    assert sendable_classes(ENHANCED) == (ENHANCED, COMPREHENSIVE_3D, COMPREHENSIVE)
    assert fallback_sop_class(COMPREHENSIVE_3D, {COMPREHENSIVE_3D, COMPREHENSIVE}) == COMPREHENSIVE_3D
    assert fallback_sop_class(COMPREHENSIVE_3D, [COMPREHENSIVE, ENHANCED]) == COMPREHENSIVE
    assert fallback_sop_class(COMPREHENSIVE_3D, [ENHANCED]) == ENHANCED
    assert fallback_sop_class(COMPREHENSIVE_3D, ["1.2.840.10008.5.1.4.1.1.88.11"]) is None
    assert fallback_sop_class(COMPREHENSIVE_3D, []) is None


def test_bad_arguments_are_named(header: Dataset) -> None:
    sr = build_report(header, make_findings(example_sources(header)))
    with pytest.raises(ValueError, match='"sop_class_uid"'):
        as_sop_class(sr, "1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    with pytest.raises(ValueError, match='"ds"'):
        as_sop_class(header, COMPREHENSIVE)
    with pytest.raises(ValueError, match='"sop_class_uid"'):
        sendable_classes("1.2.3")
    # A Key Object Selection document: SR-like, of a class no report is written in.
    kos = Dataset()
    kos.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.59"
    kos.SOPInstanceUID = generate_uid()
    kos.ContentSequence = []
    with pytest.raises(ValueError, match='"ds.SOPClassUID"'):
        as_sop_class(kos, COMPREHENSIVE)


def test_content_the_target_cannot_carry_is_refused(header: Dataset, tmp_path: Path) -> None:
    """Not echonode's content today; the check keeps a later change from sending an invalid object."""
    sr = write_read(build_report(header, make_findings(example_sources(header))), tmp_path / "sr.dcm")
    scoord3d = Dataset()
    scoord3d.ValueType = "SCOORD3D"
    sr.ContentSequence[-1].ContentSequence.append(scoord3d)
    with pytest.raises(ValueError, match="3D spatial coordinates"):
        as_sop_class(sr, COMPREHENSIVE)
    by_reference = Dataset()
    by_reference.ReferencedContentItemIdentifier = [1, 1]
    sr.ContentSequence[-1].ContentSequence[-1] = by_reference
    assert as_sop_class(sr, COMPREHENSIVE).SOPClassUID == COMPREHENSIVE
    with pytest.raises(ValueError, match="by-reference"):
        as_sop_class(sr, ENHANCED)
