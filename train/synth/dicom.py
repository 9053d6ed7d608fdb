"""DICOM writing: a video as an Ultrasound Multi-frame object, deterministic UIDs.

UIDs come from :func:`pydicom.uid.generate_uid` with seed-derived entropy and
no wall clock is written into the files: same seed, same bytes.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import UID, JPEGBaseline8Bit, UltrasoundMultiFrameImageStorage, generate_uid

from train.synth.acquisition import VIEW_CODES, VIEW_DESCRIPTIONS, VideoPlan
from train.synth.geometry import Geometry

__all__ = ["build_dataset", "encode_jpeg", "uid"]


def uid(seed: int, *parts: object) -> str:
    """A UID that is a function of the archive seed and ``parts`` only."""
    # generate_uid joins the sources without a separator: add our own.
    return generate_uid(entropy_srcs=["echonode-synth", *[f"|{p}" for p in (seed, *parts)]])


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """One RGB frame as JPEG baseline with 4:2:2 chroma subsampling."""
    buf = io.BytesIO()
    # subsampling=1 is 4:2:2, matching PhotometricInterpretation YBR_FULL_422.
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=quality, subsampling=1)
    return buf.getvalue()


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def build_dataset(ctx: dict, plan: VideoPlan, geo: Geometry, frames: list[bytes], uncompressed: int) -> Dataset:
    """The Ultrasound Multi-frame object of one video (JPEG baseline, YBR_FULL_422).

    ``ctx`` holds the patient, study and UIDs (see
    :func:`train.synth.archive.generate_archive`); ``frames`` the encoded frames.
    """
    ds = _header(ctx, plan)
    ds.SequenceOfUltrasoundRegions = Sequence([_region(plan, geo)])
    _set_pixels(ds, geo, frames, uncompressed)
    ds.file_meta = _file_meta(ds)
    ds.set_original_encoding(False, True)
    return ds


def _header(ctx: dict, plan: VideoPlan) -> Dataset:
    """Patient, study, series, equipment and cine attributes of one video."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "", "0001"]  # 0001 = 2D imaging
    ds.InstanceCreationDate = ctx["study_date"]
    ds.InstanceCreationTime = ctx["study_time"]
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = ctx["sop_uid"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ctx["study_date"]
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ctx["study_time"]
    ds.AcquisitionDateTime = ctx["study_date"] + ctx["study_time"]
    ds.AccessionNumber = ctx["accession"]
    ds.Modality = "US"
    ds.Laterality = ""  # type 2C; dciodvfy asks for it, the heart is unpaired
    ds.Manufacturer = plan.vendor.manufacturer
    ds.InstitutionName = "Synthetic Echo Lab"
    ds.ReferringPhysicianName = ctx["referring"]
    ds.StationName = "SYNTHUS1"
    ds.StudyDescription = "Echocardiogram (synthetic)"
    ds.SeriesDescription = VIEW_DESCRIPTIONS[plan.view]
    ds.ManufacturerModelName = plan.vendor.model
    ds.PatientName = ctx["patient_name"]
    ds.PatientID = ctx["patient_id"]
    ds.PatientBirthDate = ctx["birth_date"]
    ds.PatientSex = ctx["sex"]
    ds.PatientAge = ctx["age"]
    ds.PatientSize = f"{ctx['height_m']:.2f}"
    ds.PatientWeight = f"{ctx['weight_kg']:.1f}"
    ds.PatientIdentityRemoved = "NO"
    ds.BurnedInAnnotation = "YES"
    ds.CineRate = plan.fps
    ds.EffectiveDuration = f"{plan.frames / plan.fps:.4f}"
    ds.SoftwareVersions = plan.vendor.software
    ds.FrameTime = f"{1000.0 / plan.fps:.4f}"
    ds.HeartRate = int(round(plan.heart_rate_bpm))
    ds.TransducerData = [f"{plan.vendor.model}-P", "", ""]
    ds.ProcessingFunction = "CARDIAC"
    ds.StudyInstanceUID = ctx["study_uid"]
    ds.SeriesInstanceUID = ctx["series_uid"]
    ds.StudyID = ctx["study_id"]
    ds.SeriesNumber = plan.series_number
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.ViewCodeSequence = Sequence([_code_item(*VIEW_CODES[plan.view])])
    return ds


def _region(plan: VideoPlan, geo: Geometry) -> Dataset:
    """The one ultrasound region: the sector's bounds, its apex and its pixel spacing."""
    region = Dataset()
    x0, y0, x1, y1 = geo.region_bounds()
    region.RegionSpatialFormat = 1  # 2D
    region.RegionDataType = 1  # tissue
    region.RegionFlags = 0
    region.RegionLocationMinX0 = x0
    region.RegionLocationMinY0 = y0
    region.RegionLocationMaxX1 = x1
    region.RegionLocationMaxY1 = y1
    # The reference pixel is relative to the region's upper-left corner (PS3.3
    # C.8.5.5.1.12): the transducer apex, where depth and lateral offset are 0.
    region.ReferencePixelX0 = geo.apex_col - x0
    region.ReferencePixelY0 = geo.apex_row - y0
    region.PhysicalUnitsXDirection = 3  # cm
    region.PhysicalUnitsYDirection = 3  # cm
    region.ReferencePixelPhysicalValueX = 0.0
    region.ReferencePixelPhysicalValueY = 0.0
    region.PhysicalDeltaX = round(geo.delta_cm, 8)
    region.PhysicalDeltaY = round(geo.delta_cm, 8)
    region.TransducerFrequency = int(round(plan.freq_mhz * 1000))  # kHz
    return region


def _set_pixels(ds: Dataset, geo: Geometry, frames: list[bytes], uncompressed: int) -> None:
    """The image pixel module: JPEG-baseline YBR_FULL_422 frames, encapsulated with a basic offset table."""
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.NumberOfFrames = len(frames)
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.Rows = geo.rows
    ds.Columns = geo.cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    compressed = sum(len(f) for f in frames)
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = f"{uncompressed / max(compressed, 1):.2f}"[:16]
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds["PixelData"].VR = "OB"


def _file_meta(ds: Dataset) -> FileMetaDataset:
    """File meta information for a JPEG-baseline Part 10 file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    meta.ImplementationVersionName = "ECHONODE_SYNTH"
    return meta
