"""Benchmark: pulling echo studies from a PACS, ``echonode-train fetch`` beside dcmtk's ``movescu`` and ``getscu``.

Orthanc (the Debian package) plays the PACS, loaded with one of two
archives in turn: a synthetic echo archive (``train.synth``: JPEG-baseline
US multi-frame cines, 480x640, 40-64 frames, as carts store them), then
uncompressed US multi-frame objects. For each, in one run and interleaved
(the order rotates between repeats), every tool fetches every study into
an empty folder of its own:

- ``fetch C-MOVE``: ``python -m train fetch --from ORTHANC@... --port P``
  (its own storage SCP; the study-level C-FIND, one series-level C-FIND per
  study, then C-MOVE);
- ``movescu``: dcmtk's ``movescu -S +xa --port Q`` with one query file per
  study (``QueryRetrieveLevel=STUDY``), all on one association, as it comes
  and with ``TCP_NODELAY=1`` in its environment (dcmtk leaves Nagle's
  algorithm on unless told; ``nodelay`` in the output);
- ``fetch C-GET``: ``python -m train fetch --get``;
- ``getscu``: dcmtk's ``getscu -S +xy``, as it comes and with
  ``TCP_NODELAY=1``, one process per study (given
  several query files, dcmtk 3.6.7's getscu retrieves them all and then
  dies of a segmentation fault).

Each is timed from process start to exit (fetch's Python start-up and its
queries included), every instance is counted on arrival, and the folder is
deleted and ``sync``-ed before the next tool. MB/s is the bytes Orthanc
holds for the studies over that wall time, median of ``--repeats``. All four
use 128 KiB PDUs (Orthanc's ``MaximumPduLength`` too).

A second reading, "on disk", adds the ``sync`` run right after each tool
exits: the time until what it fetched would survive a power cut. fetch
fsyncs as it goes (that sync finds nothing left to write); dcmtk's tools
leave their files in the page cache, and without this reading the kernel's
writeback of them happens outside every timer, in the next tool's
``sync``. The first reading (to exit) is the one the goal is judged by.
Beside each run the CPU seconds (user plus system) of the tool's own
processes are printed: on a virtual machine where the kernel's cost of
filling fresh page-cache memory moves by seconds from run to run, they
say which of the tools spent the time.

Fairness: fetch checks every header, keeps a journal and fsyncs every file
before it records a study complete; movescu and getscu write the files and
nothing else. getscu proposes each storage class in one presentation
context with several transfer syntaxes, and Orthanc accepts Explicit VR
Little Endian there: it decompresses every JPEG cine for getscu, which
receives about ten times the bytes. fetch proposes one context per
encoding and gets the cines as stored. The uncompressed set is the
like-for-like comparison.

Run::

    .venv/bin/python -m bench.fetch [--patients 8] [--repeats 3]
    .venv/bin/python -m bench.fetch --sets raw --only "fetch C-GET" --only "getscu nodelay"
"""

from __future__ import annotations

import argparse
import compileall
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from bench.machine import all_cpu_flags, cpu_model, load_average
from train.synth import generate_archive

REPO = Path(__file__).resolve().parents[1]

ORTHANC = "/usr/sbin/Orthanc"
MOVESCU = "/usr/bin/movescu"
GETSCU = "/usr/bin/getscu"
MAX_PDU = 131072
MB = 1_000_000
#: The tools timed, in the order of the output.
TOOLS = ("fetch C-MOVE", "movescu", "movescu nodelay", "fetch C-GET", "getscu", "getscu nodelay")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Pacs:
    """An Orthanc in the foreground with storage of its own under ``root``."""

    def __init__(self, root: Path, moves: dict[str, tuple[str, int]]) -> None:
        self.root = root
        self.http = free_port()
        self.dicom = free_port()
        config = {
            "Name": "bench-fetch", "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": "ORTHANC",
            "DicomModalities": {name: [aet, "127.0.0.1", port] for name, (aet, port) in moves.items()},
            "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomAssociationCloseDelay": 0, "MaximumPduLength": MAX_PDU, "StorageCompression": False,
            "Plugins": [],
        }
        root.mkdir(parents=True, exist_ok=True)
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = open(root / "orthanc.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not start")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=30) as rsp:
            return json.loads(rsp.read())

    def upload(self, path: Path) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}/instances", data=path.read_bytes(), method="POST")
        req.add_header("Content-Type", "application/dicom")
        urllib.request.urlopen(req, timeout=60).read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def timed(cmds: list[list[str]], env: dict | None = None) -> tuple[float, str, float]:
    """Run the commands one after the other, each checked.

    Returns
    -------
    tuple of (float, str, float)
        Wall seconds, the last command's output, and the CPU seconds (user
        plus system) the commands spent.
    """
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = ""
    for cmd in cmds:
        proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        out = proc.stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.perf_counter() - t0, out, cpu


def own_seconds(output: str) -> str:
    """fetch's own account of its run (from its query to its last study), for the start-up share."""
    m = re.search(r"MB in ([0-9.]+) s", output)
    return f"  (fetch's own run: {m.group(1)} s)" if m else ""


def dicom_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and ".fetch" not in p.parts]


def raw_archive(folder: Path, studies: int, per_study: int, size_mb: float, seed: int) -> list[Path]:
    """Uncompressed 8-bit US multi-frame objects of about ``size_mb`` MB: no PACS transcodes these."""
    rng = np.random.default_rng(seed)
    rows, cols = 480, 640
    frames = max(1, round(size_mb * MB / (rows * cols)))
    paths = []
    for s in range(studies):
        study = generate_uid()
        for i in range(per_study):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
            ds.SOPClassUID = UltrasoundMultiFrameImageStorage
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
            ds.PatientName, ds.PatientID = "BENCH^FETCH", f"BENCH{s:03d}"
            ds.StudyDate, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "20260101", "US", i + 1, 1
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
            ds.PixelData = rng.integers(0, 256, size=frames * rows * cols, dtype=np.uint8).tobytes()
            path = folder / f"s{s:03d}_{i:02d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def run_dataset(label: str, files: list[Path], tmp: Path, repeats: int,
                only: list[str] | None = None, fetch_args: list[str] | None = None) -> dict[str, float]:
    """Load ``files`` into a fresh Orthanc, time the tools ``repeats`` times (interleaved); MB/s by tool.

    ``only`` names the tools to time (all when None); ``fetch_args`` go on
    fetch's command line.
    """
    fetch_port, movescu_port = free_port(), free_port()
    # Orthanc answers a C-GET only from an AE it knows: getscu is declared too (its port is unused).
    pacs = Pacs(tmp / f"orthanc-{label}", {"fetch": ("FETCH", fetch_port), "movescu": ("MOVESCU", movescu_port),
                                            "getscu": ("GETSCU", free_port())})
    try:
        for f in files:
            pacs.upload(f)
        total = int(pacs.get("/statistics")["TotalDiskSize"])
        n = len(files)
        study_uids = [s["MainDicomTags"]["StudyInstanceUID"] for s in pacs.get("/studies?expand")]
        queries = []
        for i, uid in enumerate(study_uids):
            q = tmp / f"queries-{label}" / f"q{i:03d}.dcm"
            q.parent.mkdir(exist_ok=True)
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID = uid
            ds.save_as(q, implicit_vr=True, little_endian=True)
            queries.append(str(q))
        print(f"\n{label}: Orthanc {pacs.get('/system')['Version']}, "
              f"{len(study_uids)} studies, {n} instances, {total / MB:.0f} MB ({total / n / MB:.2f} MB per instance)")

        env = {**os.environ, "PYTHONPATH": str(REPO)}
        fetch = [sys.executable, "-m", "train", "fetch", "--from", f"ORTHANC@127.0.0.1:{pacs.dicom}", "--aet",
                 "FETCH", "--no-progress", "--max-pdu", str(MAX_PDU), *(fetch_args or [])]
        movescu = [MOVESCU, "-S", "+xa", "-aet", "MOVESCU", "-aec", "ORTHANC", "-aem", "MOVESCU", "--port",
                   str(movescu_port), "-pdu", str(MAX_PDU)]
        getscu = [GETSCU, "-S", "+xy", "-aet", "GETSCU", "-aec", "ORTHANC", "-pdu", str(MAX_PDU)]
        nodelay = {**env, "TCP_NODELAY": "1"}  # dcmtk leaves Nagle's algorithm on unless told
        tools: dict[str, tuple[Any, dict]] = {
            "fetch C-MOVE": (lambda out: [fetch + ["--out", str(out), "--port", str(fetch_port),
                                                   "--listen", "127.0.0.1"]], env),
            "movescu": (lambda out: [movescu + ["-od", str(out), "127.0.0.1", str(pacs.dicom), *queries]], env),
            "movescu nodelay": (lambda out: [movescu + ["-od", str(out), "127.0.0.1", str(pacs.dicom), *queries]],
                                nodelay),
            "fetch C-GET": (lambda out: [fetch + ["--out", str(out), "--get"]], env),
            "getscu": (lambda out: [getscu + ["-od", str(out), "127.0.0.1", str(pacs.dicom), q] for q in queries], env),
            "getscu nodelay": (lambda out: [getscu + ["-od", str(out), "127.0.0.1", str(pacs.dicom), q]
                                            for q in queries], nodelay),
        }
        assert tuple(tools) == TOOLS
        names = [name for name in tools if only is None or name in only]
        times: dict[str, list[float]] = {name: [] for name in names}
        on_disk: dict[str, list[float]] = {name: [] for name in names}
        # CPU seconds of the tool's own processes (not the PACS's, not the kernel's writeback).
        cpu_s: dict[str, list[float]] = {name: [] for name in names}
        received: dict[str, int] = {}
        for rep in range(repeats):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for name in order:
                out = tmp / "out"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                subprocess.run(["sync"], check=False)
                make, tool_env = tools[name]
                elapsed, output, cpu = timed(make(out), tool_env)
                flushed, _, _ = timed([["sync"]])
                got = dicom_files(out)
                if len(got) != n:
                    raise RuntimeError(f"{name}: {len(got)} of {n} instances arrived")
                received[name] = sum(p.stat().st_size for p in got)
                times[name].append(elapsed)
                on_disk[name].append(elapsed + flushed)
                cpu_s[name].append(cpu)
                print(f"  run {rep + 1} {name:>15}: {elapsed:6.2f} s  {total / elapsed / MB:6.1f} MB/s"
                      f"  (on disk {elapsed + flushed:.2f} s; CPU {cpu:.2f} s)" + own_seconds(output))
        shutil.rmtree(tmp / "out", ignore_errors=True)
    finally:
        pacs.stop()
        shutil.rmtree(tmp / f"orthanc-{label}", ignore_errors=True)
    rate = {name: total / statistics.median(ts) / MB for name, ts in times.items()}
    disk_rate = {name: total / statistics.median(ts) / MB for name, ts in on_disk.items()}
    print(f"{label}, median of {repeats} (MB/s of the bytes Orthanc holds, 10^6 bytes/s):")
    for name in names:
        runs = ", ".join(f"{total / t / MB:.1f}" for t in times[name])
        print(f"  {name:>15}: {rate[name]:6.1f} MB/s  (runs: {runs}); on disk {disk_rate[name]:6.1f} MB/s; "
              f"CPU {statistics.median(cpu_s[name]):.2f} s (user + system); received {received[name] / MB:.0f} MB")
    for verb, tool in (("C-MOVE", "movescu"), ("C-GET", "getscu")):
        candidates = [name for name in (tool, f"{tool} nodelay") if name in rate]
        if candidates and f"fetch {verb}" in rate:
            best = max(rate[name] for name in candidates)
            best_disk = max(disk_rate[name] for name in candidates)
            print(f"  ratio fetch {verb} / best {tool}: {rate[f'fetch {verb}'] / best:.2f}x to exit (goal >= 1), "
                  f"{disk_rate[f'fetch {verb}'] / best_disk:.2f}x on disk")
    return rate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=6, help="synthetic patients (1-3 studies of 3-5 cines each)")
    ap.add_argument("--raw-studies", type=int, default=12, help="studies of the uncompressed set")
    ap.add_argument("--raw-per-study", type=int, default=4, help="instances per study of the uncompressed set")
    ap.add_argument("--raw-mb", type=float, default=8.0, help="size of each uncompressed instance, MB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--sets", choices=("both", "jpeg", "raw"), default="both",
                    help="which archive(s) to time: the JPEG cines, the uncompressed objects, or both")
    ap.add_argument("--only", choices=TOOLS, action="append",
                    help="time only this tool (repeatable; default: all six)")
    ap.add_argument("--fetch-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for fetch's command line (repeatable), e.g. "
                         "--fetch-arg=--max-studies-in-flight --fetch-arg=2")
    args = ap.parse_args(argv)
    for tool in (ORTHANC, MOVESCU, GETSCU):
        if not Path(tool).exists():
            print(f"bench/fetch.py: {tool} is missing (apt-get install orthanc dcmtk)", file=sys.stderr)
            return 2
    print(f"date: {dt.date.today().isoformat()}; machine: {cpu_model()}, {os.cpu_count()} cores; "
          f"load average {load_average()}; python {platform.python_version()}")
    print(f"lscpu flags: {' '.join(all_cpu_flags()) or 'n/a'}")
    # fetch as installed: pip byte-compiles a package it installs, and an editable
    # checkout run under PYTHONDONTWRITEBYTECODE would compile fetch's modules on every run.
    for package in ("echonode", "train"):
        compileall.compile_dir(REPO / package, quiet=1)
    if args.fetch_arg:
        print(f"fetch's command line also has: {' '.join(args.fetch_arg)}")
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp_str:
        tmp = Path(tmp_str)
        if args.sets in ("both", "jpeg"):
            generate_archive(tmp / "synth", args.patients, args.seed)
            jpeg = sorted((tmp / "synth" / "dicom").rglob("*.dcm"))
            run_dataset("JPEG-baseline cines (synth, 480x640, 40-64 frames)", jpeg, tmp, args.repeats, args.only,
                        args.fetch_arg)
            shutil.rmtree(tmp / "synth")
        if args.sets in ("both", "raw"):
            raw = raw_archive(tmp / "raw", args.raw_studies, args.raw_per_study, args.raw_mb, args.seed)
            run_dataset(f"uncompressed US multi-frame ({args.raw_mb:g} MB each)", raw, tmp, args.repeats, args.only,
                        args.fetch_arg)
    print(f"\nload average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
