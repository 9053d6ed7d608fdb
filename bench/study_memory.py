"""Benchmark: peak memory of the worker's pipeline over a study whose objects carry large private elements.

Some carts write large private elements into every object (raw data,
vendor blobs of tens to hundreds of MiB) next to a small cine loop. This
builds a study of ``--objects`` such loops, each with one private OB
element of ``--private-mib`` MiB ahead of the pixel data, and runs
``pipeline.analyse_study`` on it in a fresh process with a tiny
random-weight model, as the worker does. It prints the process's resident
set before the study (torch and the model loaded) and its peak during it
(VmHWM, reset just before the study), as JSON.

    .venv/bin/python -m bench.study_memory [--objects 5] [--private-mib 200]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from bench.machine import cpu_model, load_average


def write_loop(path: Path, study_uid: str, private_bytes: int, seed: int) -> None:
    """A 24-frame 96x128 MONOCHROME2 loop with one private OB element of ``private_bytes``."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "BENCH^MEMORY", "BENCH1", "19600101"
    ds.Modality = "US"
    block = ds.private_block(0x0009, "BENCH RAW DATA", create=True)
    block.add_new(0x10, "OB", b"\x5a" * private_bytes)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.FrameTime = 96, 128, 24, 33.3
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rng.integers(0, 256, size=(24, 96, 128), dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Restart the kernel's peak-RSS count (VmHWM) from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=5)
    parser.add_argument("--private-mib", type=int, default=200)
    args = parser.parse_args()

    import torch

    from echonode.analyse.pipeline import analyse_study
    from echonode.bundles.manifest import BundleMeta
    from echonode.bundles.nets import build_model
    from echonode.bundles.registry import ModelRegistry
    from echonode.bundles.weights import save_bundle

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        study_uid = generate_uid()
        paths = []
        for i in range(args.objects):
            paths.append(root / f"obj{i}.dcm")
            write_loop(paths[-1], study_uid, args.private_mib << 20, i)
        meta = BundleMeta.create(name="bench-lvh", task="lvh", width=4,
                                 preprocessing={"size": 32, "clip_frames": 8}, random_weights=True)
        save_bundle(root / "models" / "bench-lvh", meta, build_model("r3d_18", 1, width=4).state_dict())
        registry = ModelRegistry(root / "models", "cpu")
        registry.refresh()
        # Warm the model and the decoders on one object without its large
        # element, so the peak below is the study's, not the first call's.
        warm = root / "warm.dcm"
        write_loop(warm, generate_uid(), 0, 99)
        analyse_study(str(pydicom.dcmread(warm, stop_before_pixels=True).StudyInstanceUID), [warm],
                      registry.current)
        # Writing the objects held their large elements in this process:
        # count the peak from here.
        reset_peak()
        before = status_mib("VmRSS")
        analysis = analyse_study(study_uid, paths, registry.current)
        peak = status_mib("VmHWM")
    print(json.dumps({
        "objects": args.objects,
        "private_mib_each": args.private_mib,
        "used_videos": len(analysis.used_videos),
        "rss_before_mib": round(before),
        "peak_rss_mib": round(peak),
        "peak_over_before_mib": round(peak - before),
        "cpu": cpu_model(),
        "load": load_average(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
