"""Benchmark: receiving over C-STORE, echonode beside dcmtk's ``storescp``.

In one run, for each receiver (dcmtk ``storescp`` and ``echonode serve`` as a
subprocess, no models installed, so its worker process idles):

1. start it on a free loopback port, writing to a temp folder of its own,
   and wait until ``echoscu`` gets an answer;
2. time the *same* dcmtk ``storescu --max-pdu 131072`` sending the same
   objects (distinct uncompressed US multi-frame objects, 480x640 grey,
   about 10 MB each) over one association;
3. check that every object arrived (files counted; for echonode also the
   journal's rows), then delete what was received and ``sync`` so that one
   receiver's dirty pages are not written back during the other's run.

Throughput is bytes of the sent files over the wall time of ``storescu``
(process start to exit), median of ``--repeats``; the receivers alternate
order between repeats. echonode's memory is the peak RSS (``VmHWM``) of the
``serve`` process and of its child processes, read from ``/proc`` before the
node is stopped, both right after start (idle) and after receiving. Memory
runs with 4, 10 and 40 MB objects (same count each, a fresh node each) show
whether it grows with the object size.

Note on fairness: echonode fsyncs every object and its folder and commits
the journal (``synchronous=FULL``) before acknowledging; ``storescp`` does
not fsync at all.

Concurrent mode (``--senders 8``): carts sending at once. Each of the
senders is its own dcmtk ``storescu`` with its own association and its own
objects (``--count`` of them, fresh UIDs, one study per sender), all started
together; the aggregate throughput is every byte sent over the wall time
from the first start to the last exit. Receivers: echonode, Orthanc
(``/usr/sbin/Orthanc``, its default DICOM threads) and ``storescp --fork``
(a process per association), side by side in one run, order alternating;
``--echonode-receivers N`` adds echonode with ``node.receivers = N``.

Run::

    .venv/bin/python -m bench.receive [--repeats 3] [--count 40]
    .venv/bin/python -m bench.receive --senders 8 --count 5 [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from bench.machine import all_cpu_flags
from bench.machine import cpu_model as _cpu_model
from echonode.config import parse_config, to_toml

REPO = Path(__file__).resolve().parents[1]

# dcmtk's tools by full path: pynetdicom installs its own under the same names.
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"
MAX_PDU = 131072
ROWS, COLS = 480, 640
MB = 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- input objects ----------------------------------------------------------------


def us_object(frames: int, rng: np.random.Generator, study_uid: str, series_uid: str) -> Dataset:
    """An uncompressed 8-bit MONOCHROME2 US multi-frame object, ``frames`` x 480 x 640."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = "BENCH^RECEIVE"
    ds.PatientID = "BENCH001"
    ds.StudyDate = "20260101"
    ds.Modality = "US"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ROWS
    ds.Columns = COLS
    ds.NumberOfFrames = frames
    ds.FrameTime = 33.3
    ds.FrameIncrementPointer = (0x0018, 0x1063)
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = rng.integers(0, 256, size=frames * ROWS * COLS, dtype=np.uint8).tobytes()
    return ds


def make_objects(folder: Path, count: int, size_mb: float, seed: int) -> list[Path]:
    """``count`` distinct objects of about ``size_mb`` MB, one study, one series."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = max(1, round(size_mb * MB / (ROWS * COLS)))
    rng = np.random.default_rng(seed)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds = us_object(frames, rng, study, series)
        ds.InstanceNumber = i + 1
        path = folder / f"obj{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# -- memory --------------------------------------------------------------------------


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """All descendant process ids of ``pid`` (from /proc/*/task/*/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


@dataclass
class Memory:
    """Peak RSS in MiB: the serve process, and the largest of its children."""

    serve_mib: float
    children_mib: float

    @classmethod
    def read(cls, pid: int) -> Memory:
        kids = descendants(pid)
        return cls(
            _status_kb(pid, "VmHWM") / 1024,
            max((_status_kb(k, "VmHWM") for k in kids), default=0) / 1024,
        )


# -- receivers -----------------------------------------------------------------------


def wait_accepting(port: int, aet: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with status {proc.returncode} before accepting")
        r = subprocess.run(
            [ECHOSCU, "-to", "2", "-aec", aet, "127.0.0.1", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"receiver on port {port} did not answer C-ECHO within {timeout:.0f}s")


class Receiver:
    name = ""
    aet = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        raise NotImplementedError

    def received(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)
        os.sync()


class Storescp(Receiver):
    name = "dcmtk storescp"
    aet = "STORESCP"

    def start(self) -> None:
        self.out = self.workdir / "out"
        self.out.mkdir(parents=True)
        self.proc = subprocess.Popen(
            [STORESCP, "--max-pdu", str(MAX_PDU), "-aet", self.aet, "-od", str(self.out), "-fe", ".dcm",
             str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_accepting(self.port, self.aet, self.proc)

    def received(self) -> int:
        return len(list(self.out.glob("*.dcm")))


def _heartbeat_phase(storage: Path) -> str | None:
    try:
        return json.loads((storage / "worker-heartbeat.json").read_bytes()).get("phase")
    except (OSError, ValueError):
        return None


class Echonode(Receiver):
    name = "echonode"
    aet = "ECHONODE"
    #: ``node.receivers``.
    receivers = 1

    def start(self) -> None:
        self.storage = self.workdir / "storage"
        cfg = parse_config(
            {
                "node": {
                    "ae_title": self.aet,
                    "host": "127.0.0.1",
                    "port": self.port,
                    "storage_dir": str(self.storage),
                    "min_free_disk_mb": 0,
                    "max_pdu": MAX_PDU,
                    "receivers": self.receivers,
                },
                "models": {"dir": str(self.workdir / "models"), "device": "cpu"},
                "logging": {"format": "json", "level": "warning"},
            }
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.journal = cfg.journal_path
        config = self.workdir / "echonode.toml"
        config.write_text(to_toml(cfg))
        self.log = open(self.workdir / "serve.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "echonode", "--config", str(config), "serve"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        wait_accepting(self.port, self.aet, self.proc)
        # The worker process imports torch as the node starts: on a few cores
        # that would be timed as receiving. Wait until it idles.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and _heartbeat_phase(self.storage) != "idle":
            time.sleep(0.1)
        self.idle = Memory.read(self.proc.pid)

    def received(self) -> int:
        files = len(list((self.storage / "studies").glob("*/*/*.dcm")))
        with sqlite3.connect(self.journal) as con:
            rows = con.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
        con.close()
        return files if files == rows else -1

    def memory(self) -> Memory:
        assert self.proc is not None
        return Memory.read(self.proc.pid)

    def stop(self) -> None:
        super().stop()
        self.log.close()


class StorescpFork(Storescp):
    name = "storescp --fork"
    aet = "STORESCP"

    def start(self) -> None:
        self.out = self.workdir / "out"
        self.out.mkdir(parents=True)
        self.proc = subprocess.Popen(
            [STORESCP, "--fork", "--max-pdu", str(MAX_PDU), "-aet", self.aet, "-od", str(self.out), "-fe", ".dcm",
             str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_accepting(self.port, self.aet, self.proc)


class Orthanc(Receiver):
    name = "Orthanc"
    aet = "ORTHANC"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http = free_port()
        config = self.workdir / "orthanc.json"
        config.write_text(json.dumps({
            "Name": "bench", "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"), "DicomAet": self.aet, "DicomPort": self.port,
            "HttpPort": self.http, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "MaximumPduLength": MAX_PDU, "Plugins": [],
        }))
        self.log = open(self.workdir / "orthanc.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([ORTHANC, str(config)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_accepting(self.port, self.aet, self.proc)

    def received(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/statistics", timeout=30) as r:
            return int(json.loads(r.read())["CountInstances"])

    def stop(self) -> None:
        super().stop()
        self.log.close()


def send_concurrently(receiver: Receiver, batches: list[list[Path]]) -> tuple[float, float]:
    """Wall seconds from starting one ``storescu`` per batch (all at once) to the last one's exit,
    and the receiver's CPU seconds meanwhile (its child processes included)."""
    assert receiver.proc is not None
    pids = [receiver.proc.pid]
    cpu0 = sum(cpu_seconds(p) for p in pids)
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen([STORESCU, "--max-pdu", str(MAX_PDU), "-aec", receiver.aet, "127.0.0.1",
                          str(receiver.port), *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for files in batches
    ]
    errors = []
    for proc in procs:
        _out, err = proc.communicate()
        if proc.returncode != 0:
            errors.append(err.decode(errors="replace")[-500:])
    dt = time.perf_counter() - t0
    # The main process only: storescp --fork's children are gone by now (see the note printed).
    cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    if errors:
        raise RuntimeError(f"storescu to {receiver.name} failed: {errors[0]}")
    return dt, cpu


def run_concurrent(args: argparse.Namespace, base: Path) -> None:
    """``--senders N``: N storescu at once, each with its own ``--count`` objects, to each receiver."""
    batches = [make_objects(base / f"sender{i}", args.count, args.size_mb, seed=100 + i) for i in range(args.senders)]
    total = sum(f.stat().st_size for b in batches for f in b)
    print(f"machine: {_cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()};"
          f" load average {os.getloadavg()[0]:.1f}; CPU flags: {' '.join(all_cpu_flags()) or 'n/a'}")
    print(f"input: {args.senders} senders x {args.count} objects x {args.size_mb:g} MB, {total / MB:.0f} MB in all;"
          f" storescu --max-pdu {MAX_PDU}, one association each, all started together")
    receivers: list[type[Receiver]] = [Echonode, StorescpFork]
    if args.echonode_receivers > 1:
        several = type("EchonodeReceivers", (Echonode,),
                       {"receivers": args.echonode_receivers, "name": f"echonode x{args.echonode_receivers}"})
        receivers.insert(1, several)
    if Path(ORTHANC).exists():
        receivers.insert(1, Orthanc)
    else:
        print(f"({ORTHANC} is missing: Orthanc left out)")
    os.sync()
    for cls in receivers:  # warm-up, not timed
        rx = cls(Path(tempfile.mkdtemp(prefix=cls.aet.lower() + "-", dir=base)))
        rx.start()
        try:
            send_concurrently(rx, [b[:1] for b in batches[:2]])
        finally:
            rx.stop()
    times: dict[str, list[float]] = {cls.name: [] for cls in receivers}
    for rep in range(args.repeats):
        order = receivers if rep % 2 == 0 else list(reversed(receivers))
        for cls in order:
            rx = cls(Path(tempfile.mkdtemp(prefix=cls.aet.lower() + "-", dir=base)))
            rx.start()
            try:
                dt, cpu = send_concurrently(rx, batches)
                n = rx.received()
                if n != sum(len(b) for b in batches):
                    raise RuntimeError(f"{rx.name}: {n} of {sum(len(b) for b in batches)} objects arrived")
                mem = rx.memory() if isinstance(rx, Echonode) else None
            finally:
                rx.stop()
            times[cls.name].append(dt)
            print(f"  run {rep + 1} {cls.name:>16}: {dt:6.2f} s  {total / dt / MB:6.1f} MB/s  receiver CPU {cpu:5.2f} s"
                  f"  load {os.getloadavg()[0]:.1f}"
                  + (f"  peak RSS serve {mem.serve_mib:.0f} MiB" if mem else ""), flush=True)
    print()
    print(f"aggregate, median of {args.repeats} (MB/s = 10^6 bytes/s):")
    rate = {name: total / statistics.median(ts) / MB for name, ts in times.items()}
    for name, ts in times.items():
        print(f"  {name:>16}: {rate[name]:6.1f} MB/s  (runs: {', '.join(f'{total / t / MB:.1f}' for t in ts)})")
    for name in rate:
        if name != Echonode.name:
            print(f"  echonode / {name}: {rate[Echonode.name] / rate[name]:.2f}x")
    print("  (receiver CPU: the receiver's main process only; storescp --fork's children are not counted)")


def send(receiver: Receiver, files: list[Path]) -> tuple[float, float]:
    """Wall seconds of one ``storescu`` sending ``files`` over one association,
    and the receiver process's CPU seconds meanwhile."""
    assert receiver.proc is not None
    cpu0 = cpu_seconds(receiver.proc.pid)
    cmd = [STORESCU, "--max-pdu", str(MAX_PDU), "-aec", receiver.aet, "127.0.0.1", str(receiver.port),
           *map(str, files)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    cpu = cpu_seconds(receiver.proc.pid) - cpu0
    if r.returncode != 0:
        raise RuntimeError(f"storescu to {receiver.name} failed ({r.returncode}): {r.stderr[-2000:]}")
    return dt, cpu


def run_once(
    cls: type[Receiver], base: Path, files: list[Path]
) -> tuple[float, float, Memory | None, Memory | None]:
    rx = cls(Path(tempfile.mkdtemp(prefix=cls.aet.lower() + "-", dir=base)))
    rx.start()
    try:
        dt, cpu = send(rx, files)
        n = rx.received()
        if n != len(files):
            raise RuntimeError(f"{rx.name}: {n} of {len(files)} objects arrived")
        mem = rx.memory() if isinstance(rx, Echonode) else None
        idle = rx.idle if isinstance(rx, Echonode) else None
    finally:
        rx.stop()
    return dt, cpu, idle, mem


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per receiver (default 3); median reported")
    p.add_argument("--count", type=int, default=40, help="objects per run (default 40)")
    p.add_argument("--size-mb", type=float, default=10.0, help="object size for the throughput runs (default 10)")
    p.add_argument("--memory-sizes", default="4,10,40", help="object sizes (MB) of the memory runs ('' to skip)")
    p.add_argument("--memory-count", type=int, default=8, help="objects per memory run (default 8)")
    p.add_argument("--tmp", default=None, help="folder for inputs and receivers (default: system temp)")
    p.add_argument("--senders", type=int, default=0,
                   help="concurrent mode: this many storescu at once, --count objects each (e.g. 8 and 5)")
    p.add_argument("--echonode-receivers", type=int, default=0,
                   help="concurrent mode: also run echonode with node.receivers = this many processes")
    args = p.parse_args(argv)
    for tool in (STORESCU, STORESCP, ECHOSCU):
        if not Path(tool).exists():
            print(f"bench/receive.py: {tool} is missing (apt-get install dcmtk)", file=sys.stderr)
            return 2

    base = Path(tempfile.mkdtemp(prefix="echonode-bench-receive-", dir=args.tmp))
    if args.senders:
        try:
            run_concurrent(args, base)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return 0
    try:
        files = make_objects(base / "input", args.count, args.size_mb, seed=1)
        total = sum(f.stat().st_size for f in files)
        print(f"machine: {_cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()};"
              f" load average {os.getloadavg()[0]:.1f}; CPU flags: {' '.join(all_cpu_flags()) or 'n/a'}")
        print(f"input: {len(files)} objects, {total / len(files) / MB:.1f} MB each, {total / MB:.0f} MB in all; "
              f"storescu --max-pdu {MAX_PDU}, one association")
        os.sync()
        # Warm-up (page cache of the inputs, Python imports), not timed.
        run_once(Storescp, base, files[:2])
        run_once(Echonode, base, files[:2])

        times: dict[str, list[float]] = {Storescp.name: [], Echonode.name: []}
        cpus: dict[str, list[float]] = {Storescp.name: [], Echonode.name: []}
        mems: list[Memory] = []
        for rep in range(args.repeats):
            order = (Storescp, Echonode) if rep % 2 == 0 else (Echonode, Storescp)
            for cls in order:
                dt, cpu, _idle, mem = run_once(cls, base, files)
                times[cls.name].append(dt)
                cpus[cls.name].append(cpu)
                if mem is not None:
                    mems.append(mem)
                print(f"  run {rep + 1} {cls.name:>15}: {dt:6.2f} s  {total / dt / MB:6.1f} MB/s  receiver CPU {cpu:5.2f} s"
                      f"  load {os.getloadavg()[0]:.1f}"
                      + (f"  peak RSS serve {mem.serve_mib:.0f} MiB, worker {mem.children_mib:.0f} MiB" if mem else ""),
                      flush=True)

        print()
        print(f"median of {args.repeats} (MB/s = 10^6 bytes/s):")
        rate = {name: total / statistics.median(ts) / MB for name, ts in times.items()}
        for name, ts in times.items():
            print(f"  {name:>15}: {rate[name]:6.1f} MB/s  (runs: {', '.join(f'{total / t / MB:.1f}' for t in ts)});"
                  f" receiver CPU {statistics.median(cpus[name]) / (total / 1e9):.2f} s per GB")
        print(f"  ratio echonode / storescp: {rate[Echonode.name] / rate[Storescp.name]:.2f}x (target >= 1.5x)")
        print(f"  echonode peak RSS over the throughput runs: serve {max(m.serve_mib for m in mems):.0f} MiB, "
              f"largest child {max(m.children_mib for m in mems):.0f} MiB")

        sizes = [float(s) for s in args.memory_sizes.split(",") if s.strip()]
        if sizes:
            print()
            print(f"echonode peak RSS (VmHWM) by object size, {args.memory_count} objects each, fresh node each:")
            for size in sizes:
                mfiles = make_objects(base / f"mem{size:g}", args.memory_count, size, seed=2)
                msize = sum(f.stat().st_size for f in mfiles) / len(mfiles) / MB
                dt, _cpu, idle, mem = run_once(Echonode, base, mfiles)
                assert idle is not None and mem is not None
                print(f"  {msize:5.1f} MB objects: serve idle {idle.serve_mib:.0f} MiB -> after {mem.serve_mib:.0f} MiB"
                      f" (+{mem.serve_mib - idle.serve_mib:.1f}); largest child {mem.children_mib:.0f} MiB;"
                      f" {sum(f.stat().st_size for f in mfiles) / dt / MB:.0f} MB/s")
                shutil.rmtree(base / f"mem{size:g}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
