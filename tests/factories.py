"""Data built in tests: small DICOM objects, bundles, studies in a journal, labelled archives.

The real echo files come from pydicom-data (tests/conftest.py).
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from echonode.studies.records import Claim, ReportRecord
from echonode.studies.states import StudyState
from echonode.studies.store import StudyStore


def us_multiframe(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    frames: int = 8,
    rows: int = 64,
    cols: int = 64,
    seed: int = 0,
    patient_name: str = "TEST^PATIENT",
    patient_id: str = "TEST001",
) -> Dataset:
    """An uncompressed MONOCHROME2 US multi-frame object with random pixels."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC1"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = "US"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.NumberOfFrames = frames
    ds.FrameTime = 33.3
    ds.FrameIncrementPointer = (0x0018, 0x1063)
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = rng.integers(0, 256, size=(frames, rows, cols), dtype=np.uint8).tobytes()
    return ds


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def tiny_bundle(models_dir: Path, task: str, *, seed: int = 0, name: str | None = None, version: str = "1",
                size: int = 32, clip_frames: int = 8, width: int = 4, threshold: float = 0.5,
                labels: list[str] | None = None, preprocessing: dict | None = None) -> Path:
    """A small random-weight bundle (CPU-fast) installed under ``models_dir``.

    ``preprocessing`` adds to (or overrides) the bundle's preprocessing settings.
    """
    import torch

    from echonode.bundles.manifest import BundleMeta
    from echonode.bundles.nets import build_model
    from echonode.bundles.weights import save_bundle

    meta = BundleMeta.create(
        name=name or f"test-{task}",
        task=task,
        width=width,
        labels=labels,
        preprocessing={"size": size, "clip_frames": clip_frames, **(preprocessing or {})},
        threshold=threshold,
        version=version,
        random_weights=True,
    )
    torch.manual_seed(seed)
    model = build_model("r3d_18", meta.architecture["num_outputs"], width=width)
    return save_bundle(models_dir / (name or f"test-{task}"), meta, model.state_dict())


def make_studies(n_studies: int, per_study: int, seed: int = 0) -> list[list[Dataset]]:
    out = []
    for s in range(n_studies):
        uid = pydicom.uid.generate_uid()
        out.append([us_multiframe(study_uid=uid, frames=16, rows=64, cols=64, seed=seed + 100 * s + i,
                                  patient_id=f"P{s}") for i in range(per_study)])
    return out


#: Seconds in a day, for studies made to look old.
DAY = 86400.0


def receive(store: StudyStore, tmp_path: Path, study_uid: str, frames: int = 8) -> Path:
    """Store one new instance of ``study_uid`` the way the SCP does."""
    ds = us_multiframe(study_uid=study_uid, frames=frames)
    src = write(ds, tmp_path / "in" / f"{ds.SOPInstanceUID}.dcm")
    header, outcome = store.accept(src, "CART")
    assert outcome == "stored"
    return store.instance_path(header)


def make_study(store: StudyStore, tmp_path: Path, state: str, age_days: float, *, frames: int = 8) -> str:
    """A study driven through the journal to ``state``, last active ``age_days`` ago.

    ``state`` is a study state, or ``reported-dead`` (its SR dead-lettered) or
    ``skipped-owed`` (reprocessed into skipped while an earlier SR is dead).
    """
    j = store.journal
    uid = generate_uid()
    receive(store, tmp_path, uid, frames)
    if state != StudyState.RECEIVING:
        j.mark_stable(0.0)
        if state != StudyState.STABLE:
            j.queue_stable()
            claim = j.claim_next(os.getpid())
            assert claim is not None and claim.study_uid == uid
            if state == StudyState.SKIPPED:
                j.finish_skipped(claim, "no usable video")
            elif state == StudyState.FAILED:
                j.finish_failed(claim, "boom", max_attempts=1)
            else:
                report_sr(store, claim, "set1", "sent" if state == StudyState.DELIVERED else
                          "dead" if state in ("reported-dead", "skipped-owed") else "pending")
                if state == "skipped-owed":
                    j.requeue(uid)
                    claim = j.claim_next(os.getpid())
                    assert claim is not None  # requeue just queued it
                    j.finish_skipped(claim, "no usable video")
    when = time.time() - age_days * DAY
    j._connect().execute(
        "UPDATE studies SET first_received = ?, last_received = ?, updated = ? WHERE study_uid = ?",
        (when, when, when, uid),
    )
    return uid


def report_sr(store: StudyStore, claim: Claim, model_set: str, outcome: str,
              supersedes: str | None = None) -> Path:
    """Finish ``claim`` with an SR (its file under ``reports/``) to one PACS; leave its row ``outcome``.

    ``outcome`` is ``sent``, ``pending`` or ``dead``. Returns the SR's path.
    """
    j = store.journal
    uid, sr_uid = claim.study_uid, generate_uid()
    path = store.report_path(uid, sr_uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"SR")
    report = ReportRecord(sr_uid, uid, model_set, generate_uid(), "1.2.840.10008.5.1.4.1.1.88.33", str(path),
                          supersedes)
    j.finish_reported(claim, model_set, [], report, ["pacs"])
    (item,) = [o for o in j.status()["outbox"] if o["sr_sop_uid"] == sr_uid]
    if outcome == "sent":
        j.mark_sent(item["id"])
    elif outcome == "dead":
        j.mark_dead(item["id"], "refused")
    return path


def _write_archive_lists(archive: Path, labels: list[dict], videos: list[dict]) -> Path:
    """Write an archive's ``labels.csv`` and ``videos.csv``; returns the labels file."""
    for name, rows in (("labels.csv", labels), ("videos.csv", videos)):
        with open(archive / name, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return archive / "labels.csv"


def make_labelled_archive(root: Path, n_patients: int = 16, uid_root: str = "1.2.826.0.2") -> tuple[Path, Path]:
    """Archive whose LVH label is visible (a bright block in every frame of
    the study's videos); severe AS is an unrelated column.

    Another ``uid_root`` makes another archive (other studies, other patients).

    Returns ``(archive, labels_csv)``.
    """
    archive = root / "archive"
    labels, videos = [], []
    for p in range(n_patients):
        study = f"{uid_root}.{p}"
        patient = f"MRN{p}" if uid_root == "1.2.826.0.2" else f"MRN{uid_root}.{p}"
        lvh = p % 2
        severe_as = int(p % 4 == 1 or p % 4 == 2)  # differs from lvh for half the studies
        labels.append({"patient_id": patient, "study_uid": study, "accession_number": f"A{p}",
                       "study_date": "20240101", "lvh": lvh, "severe_as": severe_as})  # fmt: skip
        for v, view in enumerate(("plax", "plax", "a4c")):
            sop = f"{study}.{v}"
            # Fixed UIDs: the cache's order, and so the training run, is the same every time.
            ds = us_multiframe(study_uid=study, series_uid=f"{study}.9", sop_uid=sop, frames=10, rows=32, cols=32,
                               patient_id=patient, seed=p * 10 + v)  # fmt: skip
            rng = np.random.default_rng(p * 10 + v)
            pixels = rng.integers(0, 90, size=(10, 32, 32), dtype=np.uint8)
            if lvh:
                pixels[:, 8:24, 8:24] = 250
            ds.PixelData = pixels.tobytes()
            write(ds, archive / study / f"{sop}.dcm")
            videos.append({"patient_id": patient, "study_uid": study, "series_uid": "", "sop_uid": sop, "view": view})
    return archive, _write_archive_lists(archive, labels, videos)


def make_measured_archive(root: Path, n_patients: int = 24) -> tuple[Path, Path]:
    """Archive whose LVH label is cut from a measured wall drawn to scale.

    Each study's thicker wall (``ivsd_cm``, with ``lvpwd_cm`` thinner) is
    spread over 0.6-2.0 cm and drawn as a bright band whose width grows with
    it (8 px a centimetre); ``lvh`` is 1 at
    1.2 cm and over, as METHOD.md defines it. Patient 3 has a label and no
    measurement.

    Returns ``(archive, labels_csv)``.
    """
    archive = root / "archive"
    labels, videos = [], []
    for p in range(n_patients):
        study, patient = f"1.2.826.0.3.{p}", f"MRW{p}"
        wall = round(0.6 + 1.4 * ((p * 7) % n_patients) / (n_patients - 1), 3)
        row = {"patient_id": patient, "study_uid": study, "accession_number": f"W{p}", "study_date": "20240101",
               "lvh": int(wall >= 1.2), "severe_as": 0, "ivsd_cm": wall, "lvpwd_cm": round(wall - 0.1, 3)}
        if p == 3:
            row["ivsd_cm"] = row["lvpwd_cm"] = ""
        labels.append(row)
        for v in range(2):
            sop = f"{study}.{v}"
            ds = us_multiframe(study_uid=study, series_uid=f"{study}.9", sop_uid=sop, frames=10, rows=32, cols=32,
                               patient_id=patient, seed=p * 10 + v)  # fmt: skip
            rng = np.random.default_rng(p * 10 + v)
            pixels = rng.integers(0, 90, size=(10, 32, 32), dtype=np.uint8)
            width = int(round(wall * 8))
            pixels[:, 16 - width // 2:16 - width // 2 + width, 4:28] = 230
            ds.PixelData = pixels.tobytes()
            write(ds, archive / study / f"{sop}.dcm")
            videos.append({"patient_id": patient, "study_uid": study, "series_uid": "", "sop_uid": sop,
                           "view": "plax"})
    return archive, _write_archive_lists(archive, labels, videos)


def finetune_args(cache: Path, labels: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(cache), "--labels", str(labels), "--out", str(out), "--preset", "tiny", "--size", "16",
            "--width", "4", "--frames", "4", "--batch", "8", "--bootstrap", "200", "--val-fraction", "0.25",
            "--test-fraction", "0.25", "--no-progress", *extra]  # fmt: skip


def report_pdf(study: str, *, station: str) -> Dataset:
    """An Encapsulated PDF of the study, as a reporting system files its report."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.Modality, ds.PatientID, ds.StationName, ds.Manufacturer = "DOC", "ECHO001", station, "Reports Inc"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    return ds
