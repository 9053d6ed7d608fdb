"""Memory per study is bounded: the large elements carts write into every object are never read or held.

Each test object carries a private OB element of 64 MiB ahead of its pixel
data (a cart's raw data) and, where it matters, a GE-style private sequence
of undefined length after it. The peak is measured with tracemalloc (every
byte pydicom reads and every numpy array is traced; torch's own allocator is
not, and is the same before and after).
"""

from __future__ import annotations

import os
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from echonode.analyse.decode import decode_video
from echonode.analyse.pipeline import StudyRefused, analyse_study
from echonode.analyse.worker import process_study
from echonode.bundles.registry import ModelRegistry
from echonode.report.build import build_report
from echonode.report.findings import SourceInstance, TaskFinding
from echonode.studies.journal import Journal
from echonode.studies.states import StudyState
from echonode.studies.store import StudyStore
from tests.conftest import make_config
from tests.factories import tiny_bundle, us_multiframe, write

MIB = 1 << 20
T = TypeVar("T")


def _peak(fn: Callable[[], T]) -> tuple[T, int]:
    """``fn()`` and the peak of traced memory while it ran, bytes."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _with_raw_data(ds: Dataset, *, before: int = 0, after: int = 0) -> Dataset:
    """Add a private OB of ``before`` bytes ahead of the pixel data, and a GE-style
    private sequence (undefined length, in 7FE1) holding ``after`` bytes behind it."""
    if before:
        ds.private_block(0x0009, "ECHONODE TEST RAW", create=True).add_new(0x10, "OB", bytes(before))
    if after:
        item = Dataset()
        item.private_block(0x7FE1, "ECHONODE TEST MOVIE", create=True).add_new(0x20, "OB", bytes(after))
        block = ds.private_block(0x7FE1, "ECHONODE TEST MOVIE", create=True)
        block.add_new(0x01, "SQ", Sequence([item]))
        ds[block.get_tag(0x01)].is_undefined_length = True
    return ds


def _study(tmp_path: Path, n: int, **raw: int) -> tuple[str, list[Path]]:
    study_uid = pydicom.uid.generate_uid()
    files = [
        write(_with_raw_data(us_multiframe(study_uid=study_uid, frames=16, rows=64, cols=64, seed=i), **raw),
              tmp_path / "src" / f"{i}.dcm")
        for i in range(n)
    ]
    return study_uid, files


def test_a_study_of_objects_with_large_private_elements_is_processed_in_bounded_memory(tmp_path: Path) -> None:
    """Five loops, each with 64 MiB of private raw data: the worker held every header
    (320 MiB) until the study was done, and each decode read its object's 64 MiB again."""
    cfg = make_config(tmp_path)
    tiny_bundle(cfg.models_dir, "lvh")
    journal = Journal(cfg.journal_path)
    store = StudyStore(cfg.storage_dir, journal)
    registry = ModelRegistry(cfg.models_dir, "cpu")
    registry.refresh()

    def process(files: list[Path]) -> Any:
        for f in files:
            tmp = store.incoming / f"t-{f.name}"
            shutil.copyfile(f, tmp)
            store.accept(tmp, "CART")
        journal.mark_stable(-1)
        journal.queue_stable()
        return process_study(cfg, journal, store, registry, journal.claim_next(os.getpid()))

    # A first study warms the worker: highdicom loads its tables of the
    # standard (about 100 MiB of Python objects, once per process) on the
    # first SR it builds.
    assert process(_study(tmp_path / "warm", 1)[1]).state == StudyState.DELIVERED
    study_uid, files = _study(tmp_path, 5, before=64 * MIB, after=8 * MIB)

    outcome, peak = _peak(lambda: process(files))

    assert outcome.state == StudyState.DELIVERED
    assert peak < 16 * MIB, f"peak {peak / MIB:.0f} MiB for a study holding 5 x 64 MiB of private data"
    # The SR still carries the study as received, and references every loop.
    sr = pydicom.dcmread(journal.report_for(study_uid, registry.key).path)
    src = pydicom.dcmread(files[0], stop_before_pixels=True, defer_size=MIB)
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber"):
        assert sr[keyword].value == src[keyword].value
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    referenced = {r.ReferencedSOPInstanceUID for s in study.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert len(referenced) == 5


def test_decoding_reads_neither_private_element(tmp_path: Path) -> None:
    """The decoder needs the pixel data and a few attributes: the 64 MiB ahead of the
    pixel data and the private sequence after it stay in the file."""
    plain = us_multiframe(frames=16, rows=64, cols=64, seed=3)
    plain_path = write(plain, tmp_path / "plain.dcm")
    heavy_path = write(_with_raw_data(us_multiframe(frames=16, rows=64, cols=64, seed=3), before=64 * MIB,
                                      after=16 * MIB), tmp_path / "heavy.dcm")

    video, peak = _peak(lambda: decode_video(heavy_path, target_side=32))

    assert peak < 4 * MIB, f"peak {peak / MIB:.0f} MiB decoding a 64x64x16 loop"
    assert np.array_equal(video.frames, decode_video(plain_path, target_side=32).frames)
    assert video.fps == pytest.approx(1000 / 33.3)


def test_a_header_is_read_without_its_large_elements(tmp_path: Path) -> None:
    from echonode.header import read_header

    _, (path,) = _study(tmp_path, 1, before=64 * MIB)

    header, peak = _peak(lambda: read_header(path))

    assert peak < MIB
    private = header.dataset.private_block(0x0009, "ECHONODE TEST RAW").get_tag(0x10)
    assert dict(header.skipped) == {private: 64 * MIB}
    assert private not in header.dataset
    # Every other element is there as pydicom reads it in full.
    full = pydicom.dcmread(path, stop_before_pixels=True)
    del full[private]
    assert header.dataset == full


def test_the_report_copies_the_study_exactly_from_a_bounded_header(tmp_path: Path) -> None:
    """What the SR copies from the header (Patient, Study, the acquisition equipment) is
    the same as from the header read whole; only the large private element is not read."""
    from echonode.report.header import read_study_header

    ds = _with_raw_data(us_multiframe(frames=8), before=2 * MIB)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"
    ds.Manufacturer, ds.StationName, ds.InstitutionName = "ACME", "CART7", "General Hospital"
    ds.StudyDescription = "Echo  transthoracic "
    path = write(ds, tmp_path / "obj.dcm")
    finding = TaskFinding(
        task="lvh", probability=0.7, threshold=0.5, model_name="m", model_version="1", device_uid="1.2.3",
        parameters={}, sources=(SourceInstance(ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID, "plax"),),
        n_videos=1,
    )
    uids = {"series_instance_uid": "1.2.826.0.1.3680043.8.498.1", "sop_instance_uid": "1.2.826.0.1.3680043.8.498.2"}

    whole = build_report(pydicom.dcmread(path, stop_before_pixels=True), [finding], **uids)
    bounded = build_report(read_study_header(path), [finding], **uids)

    # Creation times differ between two builds; the content items and the
    # equipment item echonode adds carry them too.
    varying = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime", "ContentSequence",
               "ContributingEquipmentSequence"}
    assert {e.keyword for e in whole} == {e.keyword for e in bounded}
    for elem in whole:
        if elem.keyword not in varying:
            assert bounded[elem.tag] == elem, elem.keyword
    # The first equipment item is the source's acquisition equipment, copied from the header.
    assert bounded.ContributingEquipmentSequence[0] == whole.ContributingEquipmentSequence[0]
    assert bounded.PatientName == "Müller^Jürgen"


def test_an_identifying_attribute_too_large_to_read_stops_the_report(tmp_path: Path) -> None:
    """No valid PatientID is a MiB long; one that is cannot be compared or copied, so the
    study is refused rather than reported with the attribute left out."""
    from echonode.header import MAX_ELEMENT_BYTES
    from echonode.report.header import HeaderRefused, read_study_header

    models = tmp_path / "models"
    tiny_bundle(models, "lvh")
    registry = ModelRegistry(models, "cpu")
    registry.refresh()
    study_uid, files = _study(tmp_path, 2)
    huge = pydicom.dcmread(files[1])
    huge.PatientID = "X" * (MAX_ELEMENT_BYTES + 2)
    huge.save_as(files[1], enforce_file_format=True)

    with pytest.raises(StudyRefused, match="an object's PatientID is over 1 MiB and was not read") as info:
        analyse_study(study_uid, files, registry.current)
    assert "XXX" not in str(info.value)

    accession = pydicom.dcmread(files[0])
    accession.AccessionNumber = "7" * (MAX_ELEMENT_BYTES + 2)
    accession.save_as(files[0], enforce_file_format=True)
    with pytest.raises(HeaderRefused, match="AccessionNumber is over 1 MiB"):
        read_study_header(files[0])


def test_the_index_reads_no_large_private_element(tmp_path: Path) -> None:
    """``echonode-train index`` reads every header of an archive, then decodes: the same
    bounded reads as the worker."""
    from echonode.analyse.preprocess import PreprocessConfig
    from train.index import build_index

    archive = tmp_path / "archive"
    _study(archive, 2, before=64 * MIB, after=8 * MIB)

    report, peak = _peak(lambda: build_index(archive, tmp_path / "cache", PreprocessConfig(size=32, clip_frames=8)))

    assert report.added == 2 and report.unusable == 0
    assert peak < 16 * MIB, f"peak {peak / MIB:.0f} MiB indexing two loops"


def test_an_object_that_ends_in_a_private_sequence_is_received(tmp_path: Path) -> None:
    """GE ends objects with its raw data in a private sequence of undefined length after
    the pixel data; the receive path's completeness check took it for an error (0xC211)."""
    from echonode.studies.store import read_header as read_received_header

    _, (path,) = _study(tmp_path, 1, after=MIB)
    header = read_received_header(path)
    assert header.sop_uid == pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
