"""Small DICOM objects built in tests (the real echo files come from pydicom-data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)


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
                labels: list[str] | None = None) -> Path:
    """A small random-weight bundle (CPU-fast) installed under ``models_dir``."""
    import torch

    from echonode.bundles.manifest import BundleMeta
    from echonode.bundles.nets import build_model
    from echonode.bundles.weights import save_bundle

    meta = BundleMeta.create(
        name=name or f"test-{task}",
        task=task,
        width=width,
        labels=labels,
        preprocessing={"size": size, "clip_frames": clip_frames},
        threshold=threshold,
        version=version,
        random_weights=True,
    )
    torch.manual_seed(seed)
    model = build_model("r3d_18", meta.architecture["num_outputs"], width=width)
    return save_bundle(models_dir / (name or f"test-{task}"), meta, model.state_dict())
