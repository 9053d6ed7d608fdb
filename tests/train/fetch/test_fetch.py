"""``echonode-train fetch`` against real peers.

Orthanc plays the PACS (DIMSE and, through the Debian DICOMweb plugin,
QIDO-RS/WADO-RS), loaded with a small synthetic echo archive, a measurement
SR per study, a non-echo series inside one echo study and a CT study that
must not come. What each fetch lands is compared with what Orthanc holds:
the data set bytes for DIMSE (the file meta header is written by the
receiver), the whole file for WADO-RS.

The bad answers a PACS can give (0xA801, 0xB000, 0xA702, an instance that
does not parse, silence) come from a pynetdicom SCP written for each case;
association rejections from a raw socket that answers A-ASSOCIATE-RJ. The
window, the bandwidth cap and the backoff are read from fetch's own journal
and from a fake clock, never from wall-clock sleeps.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import datetime as dt
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import (
    UID,
    ComprehensiveSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from structlog.testing import capture_logs

from echonode.config import to_toml
from echonode.daemon.node import Node
from echonode.studies.journal import Journal
from tests.conftest import REPO, free_port, make_config, wait_for
from tests.factories import us_multiframe, write
from tests.peers import DCMQRIDX, DCMQRSCP, ORTHANC, ORTHANC_DICOMWEB, Orthanc, require_tool
from train.fetch import cli as fetch_cli
from train.fetch.dimse import MAX_CONTEXTS, get_contexts
from train.fetch.journal import FetchJournal
from train.fetch.landing import Archive, Sink
from train.fetch.pacing import FakeClock, RateLimiter, Window
from train.fetch.retrieve import StoreServer
from train.synth import generate_archive

FETCH_AET = "FETCH"
PATIENT_IDS_RE = "SYN"  # synth patient IDs look like SYN0001 / SYNnnnn


# -- the PACS's content ------------------------------------------------------------


def measurement_sr(study: Dataset, ivs_cm: float) -> Dataset:
    """A sonographer's measurement report (Comprehensive SR) in ``study``: one NUM, IVSd."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                    "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        setattr(ds, keyword, study.get(keyword, ""))
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.SeriesNumber = 900
    ds.InstanceNumber = 1
    ds.Manufacturer = "Echo Lab"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "125200", "DCM", "Adult Echocardiography Procedure Report"
    ds.ConceptNameCodeSequence = [title]
    num = Dataset()
    num.RelationshipType = "CONTAINS"
    num.ValueType = "NUM"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "18154-5", "LN", "Interventricular Septum Diastolic Thickness"
    num.ConceptNameCodeSequence = [name]
    value = Dataset()
    value.NumericValue = f"{ivs_cm:.2f}"
    unit = Dataset()
    unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "cm", "UCUM", "centimeter"
    value.MeasurementUnitsCodeSequence = [unit]
    num.MeasuredValueSequence = [value]
    ds.ContentSequence = [num]
    return ds


@dataclass
class Content:
    """What the PACS holds: the files, and which ones an echo fetch must bring."""

    files: list[Path]
    #: study UID -> {sop UID: series UID} of the US and SR instances fetch must land
    echo: dict[str, dict[str, str]]
    #: SOP UIDs that must not come (the OT series of an echo study, the CT study)
    excluded: set[str]
    #: labels.csv rows of synth (study_uid, accession_number, study_date, patient_id)
    labels: list[dict[str, str]]
    patient_ids: set[str] = field(default_factory=set)
    patient_names: set[str] = field(default_factory=set)


def make_content(root: Path) -> Content:
    generate_archive(root / "synth", 2, seed=1, frames=3, rows=120, cols=160)  # 4 studies, 15 videos
    files = sorted((root / "synth" / "dicom").rglob("*.dcm"))
    with open(root / "synth" / "labels.csv", newline="") as fh:
        labels = list(csv.DictReader(fh))
    echo: dict[str, dict[str, str]] = {}
    names: set[str] = set()
    first: dict[str, Dataset] = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        echo.setdefault(str(ds.StudyInstanceUID), {})[str(ds.SOPInstanceUID)] = str(ds.SeriesInstanceUID)
        first.setdefault(str(ds.StudyInstanceUID), ds)
        names.add(str(ds.PatientName))
    extra = root / "extra"
    for i, (study_uid, ds) in enumerate(sorted(first.items())):
        sr = measurement_sr(ds, 0.9 + i / 10)
        files.append(write(sr, extra / f"sr{i}.dcm"))
        echo[study_uid][str(sr.SOPInstanceUID)] = str(sr.SeriesInstanceUID)
    excluded = set()
    # A screen capture filed as "OT" inside the first echo study: not a US or SR series.
    study_uid, ds = min(first.items())
    ot = us_multiframe(study_uid=study_uid, frames=1, rows=8, cols=8, patient_id=str(ds.PatientID),
                       patient_name=str(ds.PatientName))
    ot.SOPClassUID = ot.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ot.Modality = "OT"
    files.append(write(ot, extra / "ot.dcm"))
    excluded.add(str(ot.SOPInstanceUID))
    # A CT study of one of the patients: the study-level query must not find it.
    ct = us_multiframe(frames=1, rows=8, cols=8, patient_id=str(ds.PatientID), patient_name=str(ds.PatientName))
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ct.Modality = "CT"
    ct.StudyDate = ds.StudyDate
    del ct.NumberOfFrames
    ct.PixelData = ct.PixelData[:64]
    files.append(write(ct, extra / "ct.dcm"))
    excluded.add(str(ct.SOPInstanceUID))
    return Content(files, echo, excluded, labels, {r["patient_id"] for r in labels}, names)


class FetchOrthanc(Orthanc):
    """Orthanc with the DICOMweb plugin and fetch (and a node) declared as DICOM nodes."""

    def __init__(self, root: Path, fetch_port: int, node_port: int, extra: dict | None = None) -> None:
        super().__init__(root, node_port)
        config = json.loads(self.config.read_text())
        config["DicomModalities"] = {"fetch": [FETCH_AET, "127.0.0.1", fetch_port],
                                     "node": ["ECHONODE", "127.0.0.1", node_port]}
        config["Plugins"] = [ORTHANC_DICOMWEB]
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        config.update(extra or {})
        self.config.write_text(json.dumps(config, indent=2))
        self.fetch_port = fetch_port
        self.node_port = node_port
        self.credentials: tuple[str, str] | None = None
        self.truth: dict[str, bytes] = {}

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json",
                timeout: float = 30) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        if self.credentials:
            token = base64.b64encode(":".join(self.credentials).encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            return bytes(rsp.read())

    @property
    def peer(self) -> str:
        return f"ORTHANC@127.0.0.1:{self.dicom_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def load(self, files: list[Path]) -> None:
        for f in files:
            self.upload(f)

    def held(self) -> dict[str, bytes]:
        """SOP Instance UID -> the file Orthanc holds, for every instance."""
        out = {}
        for oid in self.get("/instances"):
            sop = self.get(f"/instances/{oid}/simplified-tags")["SOPInstanceUID"]
            out[sop] = self.request("GET", f"/instances/{oid}/file")
        return out


def need_orthanc() -> None:
    require_tool(ORTHANC)
    require_tool(ORTHANC_DICOMWEB)


@pytest.fixture(scope="module")
def content(tmp_path_factory) -> Content:
    return make_content(tmp_path_factory.mktemp("fetch-content"))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, content: Content) -> Iterator[FetchOrthanc]:
    """One Orthanc for the tests that only read from it."""
    need_orthanc()
    o = FetchOrthanc(tmp_path_factory.mktemp("fetch-orthanc"), free_port(), free_port())
    o.start()
    try:
        o.load(content.files)
        o.truth = o.held()
        yield o
    finally:
        o.stop()


@pytest.fixture
def own_pacs(tmp_path: Path, content: Content) -> Iterator[FetchOrthanc]:
    """An Orthanc of this test's own (stopped, killed, restarted)."""
    need_orthanc()
    o = FetchOrthanc(tmp_path / "orthanc", free_port(), free_port())
    o.start()
    try:
        o.load(content.files)
        o.truth = o.held()
        yield o
    finally:
        o.stop()


# -- helpers -------------------------------------------------------------------------


def dataset_bytes(data: bytes) -> bytes:
    """A Part 10 file's bytes after its file meta header."""
    fp = io.BytesIO(data)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return data[fp.tell():]


def landed(archive: Path) -> dict[str, Path]:
    """SOP UID -> file, for every instance under ARCHIVE/<Study>/<Series>/."""
    return {p.stem: p for p in archive.glob("*/*/*.dcm") if p.parts[-3] != ".fetch"}


def assert_archive(archive: Path, truth: dict[str, bytes], expected: dict[str, dict[str, str]],
                   whole_file: bool = False) -> None:
    """The archive holds exactly the expected instances, at their UID paths, with the PACS's bytes."""
    files = landed(archive)
    want = {sop: (study, series) for study, sops in expected.items() for sop, series in sops.items()}
    assert set(files) == set(want)
    for sop, (study, series) in want.items():
        path = files[sop]
        assert path == archive / study / series / f"{sop}.dcm"
        mine = path.read_bytes()
        if whole_file:
            assert mine == truth[sop], sop
        else:
            assert dataset_bytes(mine) == dataset_bytes(truth[sop]), sop
    assert not [p for p in archive.rglob("*") if p.is_file() and ".fetch" not in p.parts and p.suffix != ".dcm"]


def fetch(*argv: str, clock: Any = None) -> tuple[int, str]:
    """Run fetch in this process; (exit code, what it printed)."""
    out = io.StringIO()
    code = fetch_cli.main([*argv, "--no-progress"], clock=clock, out=out)
    return code, out.getvalue()


def journal_rows(archive: Path) -> dict[str, tuple]:
    with sqlite3.connect(archive / ".fetch" / "journal.sqlite") as db:
        return {r[0]: r[1:] for r in db.execute("SELECT study_uid, state, reason, received, attempts FROM studies")}


def move_args(pacs: FetchOrthanc, out: Path) -> list[str]:
    return ["--out", str(out), "--from", pacs.peer, "--aet", FETCH_AET, "--port", str(pacs.fetch_port),
            "--listen", "127.0.0.1", "--timeout", "10"]


# -- happy paths -------------------------------------------------------------------


def test_c_move_fetches_the_us_and_sr_series_of_echo_studies_only(pacs, content, tmp_path):
    out = tmp_path / "archive"
    code, text = fetch(*move_args(pacs, out))
    assert code == 0, text
    assert_archive(out, pacs.truth, content.echo)
    rows = journal_rows(out)
    assert set(rows) == set(content.echo)  # the CT study was not even found
    for study, (state, reason, received, attempts) in rows.items():
        assert (state, reason, received, attempts) == ("complete", None, len(content.echo[study]), 1)
    assert "0 failed" in text
    # The archive holds patient data: owner only.
    for path in landed(out).values():
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == path.parent.parent.stat().st_mode & 0o777 == 0o700
    # A re-run finds every study complete and retrieves nothing.
    before = {p: p.stat().st_mtime_ns for p in landed(out).values()}
    code, text = fetch(*move_args(pacs, out))
    assert code == 0 and f"0 to fetch ({len(content.echo)} already here)" in text
    assert {p: p.stat().st_mtime_ns for p in landed(out).values()} == before
    assert all(r[3] == 1 for r in journal_rows(out).values())


def test_c_get_proposes_echo_contexts_only_and_lands_the_same(pacs, content, tmp_path):
    contexts = get_contexts()
    assert len(contexts) <= MAX_CONTEXTS
    assert {c[0] for c in contexts[1:]} == {
        "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.5.1.4.1.1.3",
        "1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.6.2", "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33",
        "1.2.840.10008.5.1.4.1.1.88.34"}
    out = tmp_path / "archive"
    code, text = fetch("--out", str(out), "--from", pacs.peer, "--aet", FETCH_AET, "--get", "--timeout", "10")
    assert code == 0, text
    assert_archive(out, pacs.truth, content.echo)


@pytest.mark.parametrize("idle_s", [5.0, 0.0])
def test_c_get_keeps_one_association_for_consecutive_studies(pacs, content, tmp_path, monkeypatch, idle_s):
    """A retrieval association that went well carries the next study, unless it waited too long; none is left open."""
    import train.fetch.sources as sources

    opened: list[Any] = []
    original = sources.associate

    def counting(*args: Any, **kwargs: Any) -> Any:
        assoc = original(*args, **kwargs)
        opened.append(assoc)
        return assoc

    monkeypatch.setattr(sources, "associate", counting)
    monkeypatch.setattr(sources, "REUSE_IDLE_S", idle_s)
    out = tmp_path / "archive"
    code, text = fetch("--out", str(out), "--from", pacs.peer, "--aet", FETCH_AET, "--get", "--timeout", "10")
    assert code == 0, text
    assert_archive(out, pacs.truth, content.echo)
    studies = len(content.echo)
    assert studies > 1
    # One association for the query and every study, or (kept too long) one for the query and one each.
    assert len(opened) == (1 if idle_s else 1 + studies)
    assert not any(a.is_established for a in opened)


@contextlib.contextmanager
def dcmqrscp(root: Path, files: list[Path]) -> Iterator[str]:
    """dcmtk's own PACS, ``dcmqrscp``, holding ``files``; accepts JPEG baseline beside uncompressed (``+xy``).

    It sends each C-GET sub-operation over the first context it accepted
    for the SOP class, whatever the file's transfer syntax: a JPEG cine
    fails over the usual contexts. Yields its ``AET@HOST:PORT``.
    """
    require_tool(DCMQRSCP)
    require_tool(DCMQRIDX)
    db = root / "qrdb"
    db.mkdir(parents=True)
    port = free_port()
    config = root / "dcmqrscp.cfg"
    config.write_text(f"NetworkTCPPort = {port}\nMaxPDUSize = 131072\nMaxAssociations = 16\n"
                      "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
                      f"AETable BEGIN\nQRSCP {db} RW (200, 1024mb) ANY\nAETable END\n")
    subprocess.run([DCMQRIDX, str(db), *map(str, files)], check=True, timeout=60)
    with (root / "dcmqrscp.log").open("wb") as log:
        proc = subprocess.Popen([DCMQRSCP, "+xy", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
        try:
            def answers() -> bool:
                with socket.socket() as s:
                    return s.connect_ex(("127.0.0.1", port)) == 0

            wait_for(answers, timeout=20, what="dcmqrscp")
            yield f"QRSCP@127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)


def _transfer_syntax(data: bytes) -> UID:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID


def test_c_get_from_a_pacs_that_serves_the_first_context_asks_again_in_each_encoding(content, tmp_path):
    """dcmqrscp fails the JPEG cines over the usual contexts; fetch asks again in JPEG only and lands them as stored."""
    out = tmp_path / "archive"
    with dcmqrscp(tmp_path / "pacs", content.files) as pacs, capture_logs() as logs:
        code, text = fetch("--out", str(out), "--from", pacs, "--aet", FETCH_AET, "--get", "--timeout", "10",
                           "--retry-after", "1")
    assert code == 0, text
    held = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f.read_bytes() for f in content.files}
    assert_archive(out, held, content.echo)
    rows = journal_rows(out)
    assert {rows[study][0] for study in content.echo} == {"complete"}
    # dcmqrscp does not match ModalitiesInStudy: the CT study is found, and its series query finds nothing to take.
    assert {r[0] for study, r in rows.items() if study not in content.echo} <= {"skipped"}
    again = [e for e in logs if e["event"] == "fetch.get_other_encodings"]
    assert again and all(e["missing"] == 0 and not e["pacs_converts"] for e in again)
    assert sum(e["landed_now"] for e in again) == sum(
        1 for sops in content.echo.values() for sop in sops if _transfer_syntax(held[sop]).is_compressed)


def test_a_study_of_jpeg_cines_alone_is_waited_out_once_then_asked_again_in_jpeg(content, tmp_path):
    """All of a study failed (0xA702): a busy PACS at first sight; the second try asks in each encoding."""
    cines = [f for f in content.files if _transfer_syntax(f.read_bytes()).is_compressed]
    study = str(pydicom.dcmread(cines[0], stop_before_pixels=True).StudyInstanceUID)
    cines = [f for f in cines if str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) == study]
    out = tmp_path / "archive"
    with dcmqrscp(tmp_path / "pacs", cines) as pacs:
        code, text = fetch("--out", str(out), "--from", pacs, "--aet", FETCH_AET, "--get", "--timeout", "10",
                           "--retry-after", "1")
    assert code == 0, text
    assert "busy or not answering: pausing 1 s" in text
    assert {sop: dataset_bytes(p.read_bytes()) for sop, p in landed(out).items()} == {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(f.read_bytes()) for f in cines}
    (row,) = journal_rows(out).values()
    assert row[0] == "complete" and row[3] == 2


def test_a_pacs_that_converts_is_asked_again_once_and_what_landed_stays(tmp_path):
    """It fails an instance for good and sends the others again, converted: fetch stops asking and keeps the first copies."""
    from pydicom.uid import RLELossless
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    fake_pacs = FakePacs(studies=1, storage_syntaxes=list(ALL_TRANSFER_SYNTAXES)).start()
    try:
        _converting_pacs_fails_one(fake_pacs, tmp_path, RLELossless)
    finally:
        fake_pacs.stop()


def _converting_pacs_fails_one(fake_pacs: FakePacs, tmp_path: Path, encoding: UID) -> None:
    calls = {"n": 0}

    def get(event, datasets):
        calls["n"] += 1
        yield len(datasets)
        for ds in datasets[:-1]:
            if calls["n"] > 1:  # asked in one encoding: the PACS converts to it
                ds = ds.copy()
                ds.compress(encoding, encoding_plugin="pydicom", generate_instance_uid=False)
            yield 0xFF00, ds
        yield 0xB000, Dataset()  # the last one fails, whatever it is asked in

    fake_pacs.on_get = get
    ((_study, items),) = fake_pacs.studies.items()
    out = tmp_path / "archive"
    with capture_logs() as logs:
        code, text = fetch("--out", str(out), "--from", fake_pacs.peer, "--aet", FETCH_AET, "--get", "--timeout",
                           "5", "--attempts", "1")
    assert code == 1 and "0xB000 1 instance(s) failed at the PACS" in text, text
    (again,) = [e for e in logs if e["event"] == "fetch.get_other_encodings"]
    assert (again["encodings_tried"], again["pacs_converts"], again["landed_now"], again["missing"]) == (1, True, 0, 1)
    assert calls["n"] == 2
    got = landed(out)
    assert sorted(got) == sorted(str(ds.SOPInstanceUID) for ds in items[:-1])
    for ds in items[:-1]:  # the first, uncompressed copies
        assert _transfer_syntax(got[str(ds.SOPInstanceUID)].read_bytes()) == ExplicitVRLittleEndian


def _pacs_failing_the_last_instance_first(fake_pacs: FakePacs, later: Callable[[int], None]) -> dict[str, int]:
    """The first C-GET sends all but the last instance (0xB000); ``later(n)`` runs for every later one."""
    calls = {"n": 0}

    def get(event, datasets):
        calls["n"] += 1
        if calls["n"] > 1:
            later(calls["n"])
        yield len(datasets)
        for ds in datasets[:-1]:
            yield 0xFF00, ds
        yield 0xB000, Dataset()

    fake_pacs.on_get = get
    return calls


def _fetch_one_try(fake_pacs: FakePacs, out: Path, timeout_s: str = "5") -> tuple[int, str, list[dict]]:
    with capture_logs() as logs:
        code, text = fetch("--out", str(out), "--from", fake_pacs.peer, "--aet", FETCH_AET, "--get", "--timeout",
                           timeout_s, "--attempts", "1")
    return code, text, logs


def _send_all(datasets: list[Dataset]) -> Iterator:
    """A C-GET handler's answer in pynetdicom's protocol: the count, then each data set, pending."""
    yield len(datasets)
    for ds in datasets:
        yield 0xFF00, ds


def test_a_c_get_cut_off_in_the_middle_of_a_data_set_leaves_nothing_in_tmp(tmp_path):
    """The PACS's link drops in the middle of a C-STORE of a C-GET: the part received stayed in
    .fetch/tmp until the run ended. Now it is deleted once the association has ended, with one log
    line, while the run goes on (the next study's retrieval finds tmp/ empty)."""
    fake_pacs = FakePacs(studies=2, per_study=1)
    for study, items in fake_pacs.studies.items():  # 5.5 MB each: many PDUs
        fake_pacs.studies[study] = [us_multiframe(study_uid=study, series_uid=str(items[0].SeriesInstanceUID),
                                                  frames=24, rows=240, cols=320)]
    out = tmp_path / "archive"
    tmp = out / ".fetch" / "tmp"
    seen: dict[str, Any] = {"calls": 0}

    def get(event, datasets):
        seen["calls"] += 1
        if seen["calls"] == 1:
            seen["cut"] = str(datasets[0].SOPInstanceUID)
            sent = {"n": 0}

            def cut(pdu_event: Any) -> None:
                if type(pdu_event.pdu).__name__ == "P_DATA_TF":
                    sent["n"] += 1
                    if sent["n"] == 6:  # the command and a few fragments of the data set
                        pdu_event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

            event.assoc.bind(evt.EVT_PDU_SENT, cut)
        else:
            seen["tmp_empty_before_next"] = bool(wait_for(lambda: not list(tmp.iterdir()), timeout=20,
                                                          what="tmp/ to be emptied"))
        yield from _send_all(datasets)

    fake_pacs.on_get = get
    fake_pacs.start()
    try:
        with capture_logs() as logs:
            # A fake clock: the backoff after the cut study passes at once.
            code, text = fetch("--out", str(out), "--from", fake_pacs.peer, "--aet", FETCH_AET, "--get",
                               "--timeout", "5", "--attempts", "1", clock=FakeClock(time.time()))
    finally:
        fake_pacs.stop()
    assert code == 1 and seen["calls"] == 2 and seen["tmp_empty_before_next"], (text, seen)
    [line] = [e for e in logs if e["event"] == "fetch.partial_discarded"]
    assert line["sop_uid"] == seen["cut"] and 0 < line["bytes"] < 5_000_000
    assert seen["cut"] not in landed(out) and len(landed(out)) == 1


def test_one_c_get_association_holds_no_spool_file_open_between_studies(tmp_path):
    """pynetdicom leaves a C-GET's spool files to the handler: tracked and never closed, each
    instance held a descriptor for as long as the association lasted (a whole run, since it is
    kept from study to study), until the run died of EMFILE. Each is now released after its
    C-STORE: no descriptor to an instance (in .fetch/tmp or, renamed, in place) is open when
    the next study is asked for."""
    fake_pacs = FakePacs(studies=3, per_study=5)
    archive = (tmp_path / "archive").resolve()
    open_at_each_get: list[int] = []

    def spool_descriptors() -> int:
        n = 0
        for fd in Path("/proc/self/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                n += target.startswith(str(archive)) and target.endswith(".dcm")
        return n

    def get(event, datasets):
        open_at_each_get.append(spool_descriptors())
        yield from _send_all(datasets)

    fake_pacs.on_get = get
    fake_pacs.start()
    try:
        code, text = fetch("--out", str(tmp_path / "archive"), "--from", fake_pacs.peer, "--aet", FETCH_AET,
                           "--get", "--timeout", "5")
    finally:
        fake_pacs.stop()
    assert code == 0, text
    assert open_at_each_get == [0, 0, 0]
    assert len(landed(tmp_path / "archive")) == 15


def test_a_busy_pacs_ends_asking_in_other_encodings_and_the_first_outcome_stands(tmp_path):
    """The PACS refuses the further association (too many open): fetch stops, keeps what landed, counts the failure."""
    fake_pacs = FakePacs(studies=1).start()
    try:
        calls = _pacs_failing_the_last_instance_first(fake_pacs, lambda n: None)
        # fetch keeps its first association open while it asks again, so a
        # PACS that allows one association answers the second "busy".
        fake_pacs.ae.maximum_associations = 1
        ((_study, items),) = fake_pacs.studies.items()
        out = tmp_path / "archive"
        code, text, logs = _fetch_one_try(fake_pacs, out)
    finally:
        fake_pacs.stop()
    assert code == 1 and "0xB000 1 instance(s) failed at the PACS" in text, text
    assert calls["n"] == 1
    (again,) = [e for e in logs if e["event"] == "fetch.get_other_encodings"]
    assert (again["encodings_tried"], again["landed_now"], again["missing"], again["pacs_converts"]) == (1, 0, 1, False)
    assert sorted(landed(out)) == sorted(str(ds.SOPInstanceUID) for ds in items[:-1])
    (row,) = journal_rows(out).values()
    assert row[0] == "failed"


def test_a_pacs_that_stops_answering_a_further_c_get_ends_asking_and_the_first_outcome_stands(tmp_path):
    """The C-GET in one encoding gets no answer within the timeout: fetch gives up on it, the run goes on."""
    fake_pacs = FakePacs(studies=1).start()
    release = threading.Event()
    try:
        calls = _pacs_failing_the_last_instance_first(fake_pacs, lambda n: release.wait(20))
        ((_study, items),) = fake_pacs.studies.items()
        out = tmp_path / "archive"
        code, text, logs = _fetch_one_try(fake_pacs, out, timeout_s="2")
    finally:
        release.set()
        fake_pacs.stop()
    assert code == 1 and "0xB000 1 instance(s) failed at the PACS" in text, text
    assert calls["n"] == 2  # one C-GET that timed out, not one per encoding
    (again,) = [e for e in logs if e["event"] == "fetch.get_other_encodings"]
    assert (again["encodings_tried"], again["landed_now"], again["missing"]) == (1, 0, 1)
    assert sorted(landed(out)) == sorted(str(ds.SOPInstanceUID) for ds in items[:-1])


def test_an_instance_landed_is_kept_while_a_c_get_asks_again(tmp_path):
    """A PACS that converts sends every instance again in the other encoding: the first copy stays, no count grows."""
    archive = Archive(tmp_path / "archive")
    archive.tmp.mkdir(parents=True, exist_ok=True)
    sink = Sink(archive, FetchJournal(archive.journal_path), FakeClock(time.time()))
    ds = us_multiframe(frames=2, rows=8, cols=8)
    first = write(ds, archive.tmp / "a.dcm")
    flight = sink.begin(str(ds.StudyInstanceUID), 1)
    assert sink.accept(first) == 0x0000
    path = archive.root / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    original = path.read_bytes()
    ds.PixelData = bytes(len(ds.PixelData))  # "converted": other bytes, same instance
    flight.keep_landed = True
    assert sink.accept(write(ds, archive.tmp / "b.dcm")) == 0x0000
    assert path.read_bytes() == original
    assert (flight.instances, flight.landed_in(None), flight.landed_in(str(ds.SeriesInstanceUID))) == (1, 1, 1)
    assert flight.resent == 1
    sink.end(str(ds.StudyInstanceUID))
    # A later attempt asking again in one encoding: the file of the earlier one stays, and counts as arrived.
    later = sink.begin(str(ds.StudyInstanceUID), 2)
    later.keep_landed = True
    assert sink.accept(write(ds, archive.tmp / "c.dcm")) == 0x0000
    assert path.read_bytes() == original
    assert (later.instances, later.landed_in(None), later.resent) == (1, 1, 0)
    assert not list(archive.tmp.iterdir())
    sink.close()


def test_dicomweb_lands_the_pacs_files_unchanged(pacs, content, tmp_path):
    out = tmp_path / "archive"
    code, text = fetch("--out", str(out), "--dicomweb", pacs.dicomweb, "--timeout", "10")
    assert code == 0, text
    assert_archive(out, pacs.truth, content.echo, whole_file=True)
    assert {r[0] for r in journal_rows(out).values()} == {"complete"}


def test_dry_run_counts_without_retrieving(pacs, content, tmp_path):
    out = tmp_path / "archive"
    code, text = fetch("--out", str(out), "--from", pacs.peer, "--aet", FETCH_AET, "--dry-run")
    assert code == 0, text
    n = sum(len(v) for v in content.echo.values())
    assert f"to fetch: {len(content.echo)} studies, {n} series (US and SR), {n} instances" in text
    assert not out.exists()
    for study in content.echo:
        assert study in text


def test_date_range_and_accession_list_pick_their_studies(pacs, content, tmp_path):
    dates = sorted({r["study_date"] for r in content.labels})
    lo, hi = dates[1], dates[-2]
    in_range = {r["study_uid"] for r in content.labels if lo <= r["study_date"] <= hi}
    assert 0 < len(in_range) < len(content.labels)

    def iso(d: str) -> str:
        return f"{d[:4]}-{d[4:6]}-{d[6:]}"

    out = tmp_path / "by-date"
    code, text = fetch(*move_args(pacs, out), "--since", iso(lo), "--until", iso(hi))
    assert code == 0, text
    assert set(journal_rows(out)) == in_range
    assert_archive(out, pacs.truth, {s: content.echo[s] for s in in_range})

    picked = content.labels[::2]
    studies = tmp_path / "accessions.csv"
    studies.write_text("AccessionNumber\n" + "".join(f"{r['accession_number']}\n" for r in picked) + "NOSUCHACC\n")
    out = tmp_path / "by-accession"
    code, text = fetch("--out", str(out), "--dicomweb", pacs.dicomweb, "--studies", str(studies))
    assert code == 0, text
    assert set(journal_rows(out)) == {r["study_uid"] for r in picked}


def test_patient_ids_never_reach_logs_journal_or_output(pacs, content, tmp_path):
    """A --studies list of patient IDs: fetch sends them to the PACS and nowhere else."""
    ids = sorted(content.patient_ids)[:1]
    studies = tmp_path / "patients.csv"
    studies.write_text("PatientID\n" + "".join(f"{i}\n" for i in ids))
    out = tmp_path / "archive"
    proc = subprocess.run(
        [sys.executable, "-m", "train", "fetch", *move_args(pacs, out), "--studies", str(studies),
         "--log-level", "debug"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(journal_rows(out)) == {r["study_uid"] for r in content.labels if r["patient_id"] in ids}
    meta = out / ".fetch"
    texts = {"stdout": proc.stdout, "stderr": proc.stderr}
    for f in meta.iterdir():
        if f.is_file():
            texts[f.name] = f.read_bytes().decode("latin-1")
    assert "fetch.study_complete" in texts["fetch.log"]
    for where, text in texts.items():
        for secret in [*content.patient_ids, *content.patient_names]:
            assert secret not in text, f"{where} holds a patient identifier"


def test_into_node_moves_studies_to_the_running_node(pacs, content, tmp_path):
    cfg = make_config(tmp_path, node={"port": pacs.node_port})
    config_file = tmp_path / "echonode.toml"
    config_file.write_text(to_toml(cfg))
    node = Node(cfg, start_worker=False)
    node.start()
    try:
        out = tmp_path / "journal-only"
        code, text = fetch("--out", str(out), "--from", pacs.peer, "--aet", FETCH_AET, "--into-node",
                           "--config", str(config_file), "--timeout", "10")
        assert code == 0, text
        held = {rec.sop_uid: rec for rec in Journal(cfg.journal_path).instances()}
        want = {sop for sops in content.echo.values() for sop in sops}
        assert set(held) == want
        for sop, rec in held.items():
            assert dataset_bytes(Path(rec.path).read_bytes()) == dataset_bytes(pacs.truth[sop])
        rows = journal_rows(out)
        assert {s: (r[0], r[2]) for s, r in rows.items()} == {s: ("complete", len(v)) for s, v in content.echo.items()}
        assert landed(out) == {}
    finally:
        node.stop()


def test_dicomweb_credentials_come_from_a_file_or_the_environment(tmp_path, content, monkeypatch):
    need_orthanc()
    o = FetchOrthanc(tmp_path / "orthanc", free_port(), free_port(),
                     {"AuthenticationEnabled": True, "RegisteredUsers": {"fetcher": "s3cret-pw"}})
    o.credentials = ("fetcher", "s3cret-pw")
    o.start()
    try:
        o.upload(content.files[0])
        study = str(pydicom.dcmread(content.files[0], stop_before_pixels=True).StudyInstanceUID)
        web = o.url + "/dicom-web"

        good = tmp_path / "auth"
        good.write_text("basic fetcher:s3cret-pw\n")
        os.chmod(good, 0o600)
        code, text = fetch("--out", str(tmp_path / "a1"), "--dicomweb", web, "--auth-file", str(good))
        assert code == 0, text
        assert set(journal_rows(tmp_path / "a1")) == {study}

        bad = tmp_path / "bad"
        bad.write_text("fetcher:wrong-pw")
        code, text = fetch("--out", str(tmp_path / "a2"), "--dicomweb", web, "--auth-file", str(bad))
        assert code == 3 and "HTTP 401" in text and "wrong-pw" not in text

        code, text = fetch("--out", str(tmp_path / "a3"), "--dicomweb", web)
        assert code == 3 and "HTTP 401" in text  # no credentials at all
        monkeypatch.setenv("MY_PACS_AUTH", "fetcher:s3cret-pw")
        code, text = fetch("--out", str(tmp_path / "a3"), "--dicomweb", web, "--auth-env", "MY_PACS_AUTH")
        assert code == 0, text
        monkeypatch.setenv("ECHONODE_DICOMWEB_AUTH", "basic fetcher:s3cret-pw")
        code, text = fetch("--out", str(tmp_path / "a4"), "--dicomweb", web)
        assert code == 0, text
    finally:
        o.stop()


# -- interruptions -------------------------------------------------------------------


def test_pacs_stopped_mid_study_then_started_again_rerun_completes(own_pacs, content, tmp_path, monkeypatch):
    from train.fetch.landing import Sink

    out = tmp_path / "archive"
    original_accept, original_begin = Sink.accept, Sink.begin
    count = {"studies": 0, "in_second": 0}

    def begin(self, *args, **kwargs):
        count["studies"] += 1
        return original_begin(self, *args, **kwargs)

    def accept(self, *args, **kwargs):
        status = original_accept(self, *args, **kwargs)
        if count["studies"] == 2:
            count["in_second"] += 1
            if count["in_second"] == 2:  # inside the second study: the PACS goes down at once (a
                own_pacs.proc.kill()  # graceful stop would first finish the C-MOVE it is serving)
        return status

    monkeypatch.setattr(Sink, "begin", begin)
    monkeypatch.setattr(Sink, "accept", accept)
    code, text = fetch(*move_args(own_pacs, out), "--attempts", "2", "--retry-after", "0.05", "--retry-max", "0.1",
                       "--timeout", "5")
    monkeypatch.undo()
    own_pacs.stop()
    assert code == 1, text
    rows = journal_rows(out)
    states = [r[0] for r in rows.values()]
    assert states.count("complete") == 1 and states.count("failed") == len(rows) - 1, rows
    assert "run the same command again" in text
    assert any("cannot connect" in (r[1] or "") for r in rows.values())
    # What did land is whole: every file is the PACS's instance.
    for sop, path in landed(out).items():
        assert dataset_bytes(path.read_bytes()) == dataset_bytes(own_pacs.truth[sop])
    assert len(landed(out)) < sum(len(v) for v in content.echo.values())

    own_pacs.start()
    code, text = fetch(*move_args(own_pacs, out))
    assert code == 0, text
    assert_archive(out, own_pacs.truth, content.echo)
    rows = journal_rows(out)
    assert {r[0] for r in rows.values()} == {"complete"}
    assert sorted(r[3] for r in rows.values()).count(1) == 1  # the study complete before the stop was not fetched again


class CuttingProxy:
    """A TCP relay to the PACS that drops one connection: the first that brings ``cut_at`` bytes back."""

    def __init__(self, target_port: int, cut_at: int) -> None:
        self.target_port = target_port
        self.cut_at = cut_at
        self.cut = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = False
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for src, dst, budget in ((client, upstream, None), (upstream, client, self.cut_at)):
                t = threading.Thread(target=self._pump, args=(src, dst, budget, client, upstream), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, budget: int | None, *both: socket.socket) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if budget is not None and not self.cut and sent + len(data) >= budget:
                    self.cut = True
                    dst.sendall(data[: budget - sent])
                    break  # the cable is pulled: both sides see the connection go
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in both:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        for t in self._threads:
            t.join(5)


def test_network_drop_mid_instance_leaves_no_partial_file(pacs, content, tmp_path, monkeypatch):
    """The connection drops inside an instance (C-GET through a relay): nothing half-written lands,
    and nothing half-written stays in .fetch/tmp."""
    from train.fetch.landing import Archive

    cleared: list[int] = []
    original = Archive.clear_tmp

    def clear_tmp(self):
        cleared.extend(p.stat().st_size for p in self.tmp.iterdir())
        return original(self)

    monkeypatch.setattr(Archive, "clear_tmp", clear_tmp)
    proxy = CuttingProxy(pacs.dicom_port, cut_at=30_000)
    try:
        out = tmp_path / "archive"
        args = ["--out", str(out), "--from", f"ORTHANC@127.0.0.1:{proxy.port}", "--aet", FETCH_AET, "--get",
                "--timeout", "5", "--attempts", "1", "--retry-after", "0.1"]
        with capture_logs() as logs:
            code, text = fetch(*args)
            # The part received is deleted when its association ends (logged), or at the end of
            # the run when that comes first; never both.
            wait_for(lambda: cleared or [e for e in logs if e["event"] == "fetch.partial_discarded"], timeout=10,
                     what="the partial file to be deleted")
        assert code == 1, text
        rows = journal_rows(out)
        failed = [s for s, r in rows.items() if r[0] == "failed"]
        assert len(failed) == 1
        assert "aborted or the connection dropped" in rows[failed[0]][1]
        # The cut fell inside a PDU of a C-STORE (fetch's reader: the connection closed with part
        # of a PDU read), whose temp file in .fetch/tmp never got a final name and was removed.
        cut = [e for e in logs if e["event"] == "fetch.connection_closed_mid_pdu"]
        assert len(cut) == 1 and cut[0]["received_bytes"] < (cut[0]["expected_bytes"] or 6), cut
        discarded = [e for e in logs if e["event"] == "fetch.partial_discarded"]
        assert len(cleared) + len(discarded) == 1, (cleared, discarded)
        assert not list((out / ".fetch" / "tmp").iterdir())
        got = landed(out)
        assert 0 < len([s for s in got if s in content.echo[failed[0]]]) < len(content.echo[failed[0]])
        for sop, path in got.items():
            assert dataset_bytes(path.read_bytes()) == dataset_bytes(pacs.truth[sop])
        code, text = fetch(*args)
        assert code == 0, text
        assert_archive(out, pacs.truth, content.echo)
        assert not list((out / ".fetch" / "tmp").iterdir())
    finally:
        proxy.close()


def _sigint_as_from_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _inside_a_study(path: Path, instances: int) -> bool:
    """At least ``instances`` recorded and a study still being fetched (both: a tuple's >= would be
    true for any run past ``instances``, finished ones too)."""
    landed_so_far, fetching = _journal_counts(path)
    return landed_so_far >= instances and fetching >= 1


def _journal_counts(path: Path) -> tuple[int, int]:
    """(instances recorded, studies fetching) read by another process, as the kill test watches."""
    if not path.exists():
        return 0, 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            n = db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
            f = db.execute("SELECT COUNT(*) FROM studies WHERE state = 'fetching'").fetchone()[0]
            return int(n), int(f)
    except sqlite3.Error:
        return 0, 0


def test_kill_9_mid_study_loses_nothing_and_the_rerun_completes(pacs, content, tmp_path):
    out = tmp_path / "archive"
    # 30 KB/s: an instance every 0.6 s or so, so the kill lands inside a study.
    proc = subprocess.Popen(
        [sys.executable, "-m", "train", "fetch", *move_args(pacs, out), "--max-mb-s", "0.03", "--no-progress"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        wait_for(lambda: _inside_a_study(out / ".fetch" / "journal.sqlite", 3), timeout=60,
                 what="fetch to be inside a study")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    journal = FetchJournal(out / ".fetch" / "journal.sqlite")
    try:
        fetching = [s for s in journal.studies() if s.state == "fetching"]
        assert len(fetching) == 1
        recorded = {sop for s in content.echo for sop in journal.instances_of(s)}
    finally:
        journal.close()
    got = landed(out)
    assert recorded <= set(got)  # everything acknowledged is on disk
    for sop, path in got.items():  # and nothing on disk is partial
        assert dataset_bytes(path.read_bytes()) == dataset_bytes(pacs.truth[sop])
    code, text = fetch(*move_args(pacs, out))
    assert code == 0, text
    assert_archive(out, pacs.truth, content.echo)
    assert not list((out / ".fetch" / "tmp").iterdir())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_fetch_stops_promptly_and_the_rerun_completes(pacs, content, tmp_path, sig):
    """Ctrl-C or SIGTERM inside a capped C-GET: exit 130 within seconds, not at the DIMSE timeout."""
    out = tmp_path / "archive"
    proc = subprocess.Popen(
        [sys.executable, "-m", "train", "fetch", "--out", str(out), "--from", pacs.peer, "--aet", FETCH_AET, "--get",
         "--max-mb-s", "0.02", "--timeout", "60", "--no-progress"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)},
        # As from a terminal: a suite started in the background (`cmd &` in a
        # script) passes SIGINT on ignored, and Python then never raises
        # KeyboardInterrupt.
        preexec_fn=_sigint_as_from_a_terminal,
    )
    try:
        wait_for(lambda: _inside_a_study(out / ".fetch" / "journal.sqlite", 2), timeout=60,
                 what="fetch to be inside a study")
        sent = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert code == 130
    assert took < 10, f"{took:.1f} s to stop"  # the DIMSE timeout is 60 s
    assert ("failed", "interrupted") in {r[:2] for r in journal_rows(out).values()}
    for sop, path in landed(out).items():
        assert dataset_bytes(path.read_bytes()) == dataset_bytes(pacs.truth[sop])
    code, text = fetch("--out", str(out), "--from", pacs.peer, "--aet", FETCH_AET, "--get")
    assert code == 0, text
    assert_archive(out, pacs.truth, content.echo)


# -- pacing ---------------------------------------------------------------------------


def test_window_and_bandwidth_cap_from_the_journal(pacs, content, tmp_path):
    """A fake clock: studies start only inside the window; bytes never run ahead of the cap."""
    noon = dt.datetime(2026, 12, 1, 12, 0)
    clock = FakeClock(noon.timestamp())
    out = tmp_path / "archive"
    rate = 2_500.0  # bytes/s: about 25 s of clock per study, so four do not fit in one minute
    code, text = fetch("--out", str(out), "--from", pacs.peer, "--aet", FETCH_AET, "--get", "--window",
                       "19:00-19:01", "--max-mb-s", str(rate / 1e6), "--timeout", "10", clock=clock)
    assert code == 0, text
    assert "outside the window 19:00-19:01: resuming at 2026-12-01 19:00" in text
    assert_archive(out, pacs.truth, content.echo)
    journal = FetchJournal(out / ".fetch" / "journal.sqlite")
    try:
        attempts = journal.attempts()
        times = journal.instance_times()
    finally:
        journal.close()
    window = Window.parse("19:00-19:01")
    starts = [dt.datetime.fromtimestamp(a.started_at) for a in attempts]
    assert all(window.contains(t) for t in starts), starts
    # The window closed with studies left: they waited for the next evening.
    assert {t.date() for t in starts} == {dt.date(2026, 12, 1), dt.date(2026, 12, 2)}
    # The cap: by any moment, no more bytes landed than the budget allowed since the first start.
    # (A file is 300-odd bytes longer than what crossed the wire: the preamble and file meta.)
    t0 = attempts[0].started_at
    total = 0
    for n, (t, size) in enumerate(times, start=1):
        total += size
        assert total <= rate * 1.0 + rate * (t - t0) + 512 * n, (n, total, t - t0)
    assert total / (times[-1][0] - t0) <= rate * 1.1 or times[-1][0] - t0 > 86400


def test_window_arithmetic():
    w = Window.parse("19:00-07:00")
    day = dt.datetime(2026, 3, 2)
    assert not w.contains(day.replace(hour=12))
    assert w.contains(day.replace(hour=23, minute=59)) and w.contains(day.replace(hour=6, minute=59))
    assert not w.contains(day.replace(hour=7))
    assert w.next_open(day.replace(hour=12)) == day.replace(hour=19)
    assert w.next_open(day.replace(hour=20)) == day.replace(hour=20)
    assert Window.parse("08:00-08:00").contains(day)  # all day
    for bad in ("19-07", "25:00-07:00", "19:00", "19:00-07:60"):
        with pytest.raises(ValueError):
            Window.parse(bad)


def test_rate_limiter_holds_the_average_on_a_fake_clock():
    clock = FakeClock(1000.0)
    limiter = RateLimiter(1000.0, clock)
    for _ in range(50):
        limiter.take(100)
    # 5000 bytes at 1000 B/s with a 1 s bucket: 4 s of waiting.
    assert clock.time() - 1000.0 == pytest.approx(4.0)
    unlimited = RateLimiter(None, clock)
    assert unlimited.take(10**9) == 0.0


def test_studies_csv_refuses_wildcards_without_quoting_the_value(tmp_path):
    f = tmp_path / "list.csv"
    f.write_text("patient_id,other\nSECRET-ID*,x\n")
    code, text = fetch("--out", str(tmp_path / "a"), "--from", "PACS@127.0.0.1:1", "--get", "--studies", str(f))
    assert code == 2 and "row 2" in text and "SECRET" not in text
    f.write_text("name\nx\n")
    code, text = fetch("--out", str(tmp_path / "a"), "--from", "PACS@127.0.0.1:1", "--get", "--studies", str(f))
    assert code == 2 and "names none of" in text


# -- bad answers ------------------------------------------------------------------------


class FakePacs:
    """A pynetdicom Q/R SCP holding a few small studies; each test says how it answers retrievals.

    ``on_move(event, datasets)`` and ``on_get(event, datasets)`` are generators in
    pynetdicom's handler protocol; ``find_gate`` (an Event), when set, makes the
    C-FIND handler wait on it: a PACS that stops answering.
    """

    def __init__(self, studies: int = 2, per_study: int = 3, storage_syntaxes: list[str] | None = None) -> None:
        self.studies: dict[str, list[Dataset]] = {}
        for i in range(studies):
            study = generate_uid()
            series = generate_uid()
            self.studies[study] = [
                us_multiframe(study_uid=study, series_uid=series, frames=2, rows=16, cols=16, seed=10 * i + j)
                for j in range(per_study)
            ]
        self.ae = AE("FAKEPACS")
        self.ae.network_timeout = 10
        for model in (StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove,
                      StudyRootQueryRetrieveInformationModelGet):
            self.ae.add_supported_context(model)
        for cx in StoragePresentationContexts[:40]:
            self.ae.add_supported_context(cx.abstract_syntax, storage_syntaxes, scu_role=True, scp_role=True)
        self.ae.add_requested_context("1.2.840.10008.5.1.4.1.1.3.1", ExplicitVRLittleEndian)
        self.on_move: Callable | None = None
        self.on_get: Callable | None = None
        self.find_gate: threading.Event | None = None
        self.destinations: dict[str, tuple[str, int]] = {}
        self.calls: list[str] = []
        self.server: Any = None

    def start(self) -> FakePacs:
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
            (evt.EVT_C_FIND, self._find), (evt.EVT_C_MOVE, self._move), (evt.EVT_C_GET, self._get)])
        return self

    @property
    def peer(self) -> str:
        return f"FAKEPACS@127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        if self.find_gate is not None:
            self.find_gate.set()
        self.server.shutdown()

    def _find(self, event: Any) -> Iterator:
        self.calls.append("find")
        if self.find_gate is not None:
            self.find_gate.wait(30)
            return
        ident = event.identifier
        if ident.QueryRetrieveLevel == "STUDY":
            for study, items in self.studies.items():
                rsp = Dataset()
                rsp.QueryRetrieveLevel = "STUDY"
                rsp.StudyInstanceUID = study
                rsp.StudyDate = "20260101"
                rsp.NumberOfStudyRelatedInstances = len(items)
                yield 0xFF00, rsp
        else:
            items = self.studies.get(str(ident.StudyInstanceUID), [])
            if items:
                rsp = Dataset()
                rsp.QueryRetrieveLevel = "SERIES"
                rsp.StudyInstanceUID = ident.StudyInstanceUID
                rsp.SeriesInstanceUID = items[0].SeriesInstanceUID
                rsp.Modality = "US"
                rsp.NumberOfSeriesRelatedInstances = len(items)
                yield 0xFF00, rsp

    def _datasets(self, event: Any) -> list[Dataset]:
        return self.studies.get(str(event.identifier.StudyInstanceUID), [])

    def _move(self, event: Any) -> Iterator:
        self.calls.append("move")
        assert self.on_move is not None
        yield from self.on_move(event, self._datasets(event))

    def _get(self, event: Any) -> Iterator:
        self.calls.append("get")
        assert self.on_get is not None
        yield from self.on_get(event, self._datasets(event))


@pytest.fixture
def fake_pacs() -> Iterator[FakePacs]:
    p = FakePacs().start()
    try:
        yield p
    finally:
        p.stop()


def _move_args(p: FakePacs, out: Path, port: int) -> list[str]:
    return ["--out", str(out), "--from", p.peer, "--aet", FETCH_AET, "--port", str(port), "--listen", "127.0.0.1",
            "--timeout", "5"]


@pytest.mark.parametrize("status", [0xA801, 0xC801])
def test_unknown_or_refused_move_destination_stops_the_run(fake_pacs, tmp_path, status):
    port = free_port()

    def move(event, datasets):
        if status == 0xA801:
            yield None, None  # pynetdicom answers 0xA801
            return
        yield "127.0.0.1", port
        yield len(datasets)
        yield status, Dataset()  # dcm4chee: "Move Destination not allowed"

    fake_pacs.on_move = move
    out = tmp_path / "archive"
    code, text = fetch(*_move_args(fake_pacs, out, port))
    assert code == 3, text
    assert {0xA801: "0xA801 move destination unknown", 0xC801: "0xC801 move destination not allowed"}[status] in text
    assert fake_pacs.calls.count("move") == 1  # the second study was not tried
    rows = journal_rows(out)
    assert sorted(r[0] for r in rows.values()) == ["failed", "found"]


def test_stores_from_an_address_outside_move_from_are_refused_and_the_run_says_so(fake_pacs, tmp_path):
    """A PACS whose stores leave from another address than the one fetch connects to (a cluster, NAT,
    a container) is refused by default; the run's output names the address and the option."""
    port = free_port()
    fake_pacs.destinations[FETCH_AET] = ("127.0.0.1", port)

    def move(event, datasets):
        yield "127.0.0.1", port
        yield len(datasets)
        for ds in datasets:
            yield 0xFF00, ds

    fake_pacs.on_move = move
    fake_pacs.studies = dict(list(fake_pacs.studies.items())[:1])
    out = tmp_path / "archive"
    code, text = fetch(*_move_args(fake_pacs, out, port), "--move-from", "127.0.0.3", "--attempts", "1")
    assert code != 0, text
    assert landed(out) == {}
    assert "refused" in text and "from 127.0.0.1" in text and "--move-from 127.0.0.1" in text
    # The same run with the PACS's address allowed fetches the study.
    code, text = fetch(*_move_args(fake_pacs, out, port), "--move-from", "localhost")
    assert code == 0, text
    assert len(landed(out)) == 3 and "refused" not in text
    # Where nothing listens for the PACS, the option would be silently ignored: refused instead.
    for other in (["--get"], ["--dicomweb", "http://127.0.0.1:1/dicom-web"]):
        source = [] if "--dicomweb" in other else ["--from", fake_pacs.peer]
        code, text = fetch("--out", str(tmp_path / "b"), *source, *other, "--move-from", "127.0.0.1")
        assert code == 2 and "--move-from is for fetch's storage SCP" in text, text

def test_partial_failure_is_retried_then_recorded_with_its_count(fake_pacs, tmp_path):
    port = free_port()
    fake_pacs.destinations[FETCH_AET] = ("127.0.0.1", port)

    def move(event, datasets):
        yield "127.0.0.1", port
        yield len(datasets)
        yield 0xFF00, datasets[0]
        yield 0xB000, Dataset()  # the other two failed at the PACS

    fake_pacs.on_move = move
    fake_pacs.studies = dict(list(fake_pacs.studies.items())[:1])
    out = tmp_path / "archive"
    clock = FakeClock(time.time())
    code, text = fetch(*_move_args(fake_pacs, out, port), "--attempts", "2", clock=clock)
    assert code == 1, text
    (row,) = journal_rows(out).values()
    assert row[0] == "failed" and row[3] == 2, row
    assert "0xB000 2 instance(s) failed at the PACS" in row[1]
    ((_study, items),) = fake_pacs.studies.items()
    got = landed(out)
    assert list(got) == [str(items[0].SOPInstanceUID)]
    assert pydicom.dcmread(got[str(items[0].SOPInstanceUID)]).PixelData == items[0].PixelData


def test_out_of_resources_backs_off_then_succeeds(fake_pacs, tmp_path):
    tries = {"n": 0}

    def get(event, datasets):
        tries["n"] += 1
        yield len(datasets)
        if tries["n"] == 1:
            yield 0xA702, Dataset()  # out of resources: unable to perform sub-operations
            return
        for ds in datasets:
            yield 0xFF00, ds

    fake_pacs.on_get = get
    fake_pacs.studies = dict(list(fake_pacs.studies.items())[:1])
    out = tmp_path / "archive"
    clock = FakeClock(time.time())
    code, text = fetch("--out", str(out), "--from", fake_pacs.peer, "--aet", FETCH_AET, "--get", "--timeout", "5",
                       "--retry-after", "30", clock=clock)
    assert code == 0, text
    assert "busy or not answering: pausing 30 s" in text
    assert sum(clock.sleeps) >= 30
    (row,) = journal_rows(out).values()
    assert row[0] == "complete" and row[3] == 2
    journal = FetchJournal(out / ".fetch" / "journal.sqlite")
    try:
        first, second = journal.attempts()
    finally:
        journal.close()
    assert "0xA702" in first.reason and second.outcome == "complete"
    assert second.started_at - first.finished_at >= 30  # on the fake clock: the backoff was waited


def test_a_peer_that_stops_answering_meets_the_deadline(fake_pacs, tmp_path):
    fake_pacs.find_gate = threading.Event()
    clock = FakeClock(time.time())
    started = time.monotonic()
    code, text = fetch("--out", str(tmp_path / "archive"), "--from", fake_pacs.peer, "--aet", FETCH_AET, "--get",
                       "--timeout", "1", "--attempts", "2", clock=clock)
    assert code == 3, text
    assert "no answer from the PACS within 1 s" in text
    assert fake_pacs.calls.count("find") == 2
    assert time.monotonic() - started < 15  # two deadlines of 1 s, not a hang


def test_an_instance_that_does_not_parse_is_refused_and_recorded(fake_pacs, tmp_path, monkeypatch):
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes as they are
    (study, items), = list(fake_pacs.studies.items())[:1]
    fake_pacs.studies = {study: items[:1]}
    cut = tmp_path / "cut.dcm"
    write(items[0], cut)
    cut.write_bytes(cut.read_bytes()[:-200])  # the pixel data declares 200 bytes more than follow

    def get(event, datasets):
        yield 1
        status = event.assoc.send_c_store(cut)
        assert status.Status == 0xC210
        yield 0xB000, Dataset()

    fake_pacs.on_get = get
    out = tmp_path / "archive"
    code, text = fetch("--out", str(out), "--from", fake_pacs.peer, "--aet", FETCH_AET, "--get", "--timeout", "5",
                       "--attempts", "3")
    assert code == 1, text
    (row,) = journal_rows(out).values()
    assert row[0] == "failed" and row[3] == 1  # refused here: trying again would get the same bytes
    assert "refused here: 1 (0xC210: cannot parse the data set" in row[1]
    assert landed(out) == {}
    journal = FetchJournal(out / ".fetch" / "journal.sqlite")
    try:
        assert [(s, r[:6]) for s, _sop, r in journal.refused()] == [(study, "0xC210")]
    finally:
        journal.close()


class RejectingPeer:
    """A raw socket that answers every A-ASSOCIATE-RQ with an A-ASSOCIATE-RJ (result, source, reason)."""

    def __init__(self, result: int, source: int, reason: int) -> None:
        self.pdu = bytes([0x03, 0x00, 0, 0, 0, 4, 0x00, result, source, reason])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            # A thread per connection: the wait for one client to close must
            # not leave the next one unanswered (fetch's deadline is 5 s too).
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                # Read the whole A-ASSOCIATE-RQ first: closing with unread bytes sends a TCP reset,
                # which can reach the caller before the rejection and read as a network failure.
                header = self._read_exactly(conn, 6)
                self._read_exactly(conn, int.from_bytes(header[2:6], "big"))
                conn.sendall(self.pdu)
                while conn.recv(65536):  # until the caller closes
                    pass

    @staticmethod
    def _read_exactly(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed mid-PDU")
            data += chunk
        return data

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        self._thread.join(5)


@pytest.mark.parametrize("transient", [False, True])
def test_association_rejections(tmp_path, transient):
    peer = RejectingPeer(2, 3, 1) if transient else RejectingPeer(1, 1, 3)
    clock = FakeClock(time.time())
    try:
        code, text = fetch("--out", str(tmp_path / "archive"), "--from", f"PACS@127.0.0.1:{peer.port}", "--aet",
                           FETCH_AET, "--get", "--timeout", "5", "--attempts", "3", "--retry-after", "30", clock=clock)
    finally:
        peer.close()
    assert code == 3, text
    if transient:
        assert "rejected transiently" in text and "temporary congestion" in text
        assert peer.connections == 3
        waits = [s for s in clock.sleeps if s > 1]
        assert sum(waits) >= 30 + 60  # backed off, doubling
    else:
        assert "rejected permanently" in text and "calling AE title not recognized" in text
        assert peer.connections == 1


@pytest.mark.parametrize("in_flight", [1, 2])
def test_studies_in_flight_never_exceed_the_limit(pacs, content, tmp_path, monkeypatch, in_flight):
    from train.fetch.landing import Sink

    lock = threading.Lock()
    now = {"n": 0, "max": 0}
    begin, end = Sink.begin, Sink.end

    def counted_begin(self, *args):
        with lock:
            now["n"] += 1
            now["max"] = max(now["max"], now["n"])
        time.sleep(0.2)  # long enough for a second worker to start, if it may
        return begin(self, *args)

    def counted_end(self, *args):
        with lock:
            now["n"] -= 1
        return end(self, *args)

    monkeypatch.setattr(Sink, "begin", counted_begin)
    monkeypatch.setattr(Sink, "end", counted_end)
    out = tmp_path / "archive"
    code, text = fetch("--out", str(out), "--from", pacs.peer, "--aet", FETCH_AET, "--get", "--timeout", "10",
                       "--max-studies-in-flight", str(in_flight))
    assert code == 0, text
    assert now["max"] == in_flight
    assert_archive(out, pacs.truth, content.echo)


def test_the_move_scp_shares_its_presentation_contexts(tmp_path):
    """Orthanc opens one association back per study: none may pay pynetdicom's per-connection copy
    of every storage class in every syntax (about 50 ms of CPU each)."""
    archive = Archive(tmp_path / "archive")
    clock = FakeClock(time.time())
    sink = Sink(archive, FetchJournal(archive.journal_path), clock)
    server = StoreServer("FETCH", "127.0.0.1", 0, sink, RateLimiter(None, clock), 5.0, 131072).start()
    try:
        ae = AE(ae_title="ORTHANC")
        ae.acse_timeout = ae.network_timeout = 5
        ae.add_requested_context(UltrasoundMultiFrameImageStorage)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="FETCH")
        try:
            assert assoc.is_established
            wait_for(lambda: len(server._server.active_associations) == 1, timeout=5, what="the association")
            [theirs] = server._server.active_associations
            assert all(a is b for a, b in zip(theirs.acceptor.supported_contexts, server._server.contexts, strict=True))
        finally:
            assoc.release()
    finally:
        server.stop()
