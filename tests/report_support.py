"""What the report tests share: a real study header, example findings, the validators.

What we *produce* is read back with pydicom's strict validation
(:func:`strict_reading`) and checked with dicom3tools' ``dciodvfy`` (no
``Error`` line) and dcmtk's ``dsrdump``; both are called by full path.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from echonode.report.findings import SourceInstance, TaskFinding
from tests.conftest import real_testfile
from tests.peers import DCIODVFY, DSRDUMP, require_tool

SOP_CLASS_UIDS = {
    "comprehensive3d": "1.2.840.10008.5.1.4.1.1.88.34",
    "comprehensive": "1.2.840.10008.5.1.4.1.1.88.33",
    "enhanced": "1.2.840.10008.5.1.4.1.1.88.22",
}

#: The warning highdicom gives for the test file's one-component Patient's Name "PLA".
PLA_WARNING = "ignore:The string \"PLA\" is unlikely:UserWarning"


def study_header() -> Dataset:
    """The header of pydicom's real SonoSite loop (30 frames), without pixel data."""
    return pydicom.dcmread(real_testfile("examples_ybr_color.dcm"), stop_before_pixels=True)


@contextmanager
def strict_reading() -> Iterator[None]:
    """Read with pydicom's strict validation: for objects *we* produce."""
    old = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
    try:
        yield
    finally:
        pydicom_config.settings.reading_validation_mode = old


def example_sources(header: Dataset) -> tuple[SourceInstance, ...]:
    """Three videos of the header's study: PLAX, A4C, and PLAX in a second series."""
    second_series = generate_uid()
    return (
        SourceInstance(header.SOPClassUID, header.SOPInstanceUID, header.SeriesInstanceUID, "plax"),
        SourceInstance(header.SOPClassUID, generate_uid(), header.SeriesInstanceUID, "a4c"),
        SourceInstance(header.SOPClassUID, generate_uid(), second_series, "plax"),
    )


def make_findings(sources: tuple[SourceInstance, ...], *, same_device: bool = False) -> list[TaskFinding]:
    """LVH present (all three videos) and severe AS absent (the first one)."""
    lvh_device = generate_uid()
    lvh = TaskFinding(
        task="lvh",
        probability=0.8731234567891,
        threshold=0.5,
        model_name="echoclr-lvh",
        model_version="1.2.0",
        device_uid=lvh_device,
        parameters={"clip_frames": "16", "frame_size": "112", "threshold": "0.5"},
        sources=sources,
        n_videos=len(sources),
        video_probabilities={
            sources[0].sop_instance_uid: 0.91,
            sources[1].sop_instance_uid: 0.80,
            sources[2].sop_instance_uid: 0.9103703703703,
        },
    )
    severe_as = TaskFinding(
        task="severe_as",
        probability=0.125,
        threshold=0.4,
        model_name="echoclr-severe-as",
        model_version="0.9.1",
        device_uid=lvh_device if same_device else generate_uid(),
        parameters={"clip_frames": "16", "frame_size": "112"},
        sources=sources[:1],
        n_videos=1,
    )
    return [lvh, severe_as]


def write_read(sr: Dataset, path: Path) -> Dataset:
    """Write ``sr`` as a DICOM file and read it back."""
    sr.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def walk(items: Iterable[Dataset]) -> Iterator[Dataset]:
    """Every content item of a tree, depth first."""
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def codes_in(ds: Dataset) -> set[tuple[str, str, str]]:
    """(scheme, value, meaning) of every concept name and coded value."""
    found = set()
    for item in [ds, *walk(ds.ContentSequence)]:
        for keyword in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            for code in item.get(keyword, []):
                found.add((code.CodingSchemeDesignator, code.CodeValue, code.CodeMeaning))
    return found


def evidence_refs(ds: Dataset, keyword: str) -> set[tuple[str, str, str, str]]:
    """(study, series, class, instance) of every reference in an evidence sequence."""
    return {
        (study.StudyInstanceUID, series.SeriesInstanceUID,
         inst.ReferencedSOPClassUID, inst.ReferencedSOPInstanceUID)
        for study in ds.get(keyword, [])
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    }


def dciodvfy(path: Path) -> str:
    """Run dciodvfy; fail on any Error line; return (and print) the rest."""
    proc = subprocess.run([require_tool(DCIODVFY), str(path)], capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    print(out)
    errors = [line for line in out.splitlines() if "Error" in line]
    assert not errors, "\n".join(errors)
    return out


def dsrdump(path: Path) -> str:
    """dcmtk's dump of the SR tree; fails when dsrdump cannot read it."""
    proc = subprocess.run([require_tool(DSRDUMP), str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
