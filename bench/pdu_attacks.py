"""Raw-socket attacks on the DICOM listener: echonode beside dcmtk ``storescp`` and Orthanc.

Each receiver runs as a process of its own on a loopback port with the same
5 s timeouts (echonode ``acse_timeout_s`` / ``network_timeout_s``, storescp
``--acse-timeout 5 --dimse-timeout 5 --socket-timeout 5``, Orthanc ``DicomScpTimeout: 5``) and
gets, one after another, on fresh connections:

``rq_2gib``
    a 6-byte A-ASSOCIATE-RQ header declaring 2 GiB, then silence;
``pdata_2gib``
    a proper association, then a 6-byte P-DATA-TF header declaring 2 GiB;
``rq_stall``
    an A-ASSOCIATE-RQ header declaring 200 bytes, 10 of them, then silence;
``pdata_stall``
    a proper association, then a P-DATA-TF header declaring 1000 bytes, 10
    of them, then silence;
``slots``
    50 connections that each send a 6-byte header and stall (from 127.0.0.2,
    which echonode's allow-list leaves out), while a probe C-ECHOes from
    127.0.0.1 every 0.25 s with dcmtk's ``echoscu`` (a process each time, so
    the latency includes its start).

For each attack it reports what came back (``A-ABORT src/reason``,
``closed``), how long the receiver held the connection (capped at 20 s),
and the growth of the receiver's resident memory while it lasted (sampled
every 50 ms). Run::

    .venv/bin/python -m bench.pdu_attacks [--echonode-repo /path/to/checkout] [--only echonode]

``--echonode-repo`` runs ``python -m echonode`` from another checkout (an
older commit, for before/after figures).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.machine import cpu_model
from echonode.config import parse_config, to_toml
from tests import rawdicom as raw

REPO = Path(__file__).resolve().parents[1]

STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"
AET = "ECHONODE"
TIMEOUT_S = 5
HOLD_CAP_S = 20.0
GIB2 = 2**31 - 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler:
    """Peak VmRSS of a process while a block runs (50 ms samples)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.base, self.peak = pid, rss_kib(pid), 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.05)

    def __enter__(self) -> Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    @property
    def growth_mib(self) -> float:
        return round(max(0, self.peak - self.base) / 1024, 1)


def echo_ok(port: int, timeout: int = 5) -> bool:
    cmd = [ECHOSCU, "-to", str(timeout), "-ta", str(timeout), "-aec", AET, "-aet", "PROBE", "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


class Receiver:
    name = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = open(self.work / "log.txt", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT, cwd=self.cwd())
        deadline = time.monotonic() + 60
        while not echo_ok(self.port, 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start: {(self.work / 'log.txt').read_text()[-2000:]}")
            time.sleep(0.2)

    def cwd(self) -> Path:
        return self.work

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Storescp(Receiver):
    name = "dcmtk storescp 3.6.7"

    def command(self) -> list[str]:
        (self.work / "out").mkdir(parents=True, exist_ok=True)
        return [STORESCP, "-aet", AET, "--max-pdu", "131072", "--acse-timeout", str(TIMEOUT_S),
                "--dimse-timeout", str(TIMEOUT_S), "--socket-timeout", str(TIMEOUT_S), "-od", str(self.work / "out"),
                str(self.port)]


class Orthanc(Receiver):
    name = "Orthanc 1.10.1"

    def command(self) -> list[str]:
        cfg = {
            "Name": "bench", "StorageDirectory": str(self.work / "db"), "IndexDirectory": str(self.work / "db"),
            "HttpPort": free_port(), "DicomPort": self.port, "DicomAet": AET, "DicomScpTimeout": TIMEOUT_S,
            "RemoteAccessAllowed": False, "DicomCheckCalledAet": False, "Plugins": [],
        }
        path = self.work / "orthanc.json"
        path.write_text(json.dumps(cfg))
        return [ORTHANC, str(path)]


class Echonode(Receiver):
    name = "echonode"

    def __init__(self, work: Path, repo: Path) -> None:
        super().__init__(work)
        self.repo = repo

    def cwd(self) -> Path:
        return self.repo

    def command(self) -> list[str]:
        cfg = parse_config({
            "node": {"ae_title": AET, "host": "0.0.0.0", "port": self.port, "storage_dir": str(self.work / "storage"),
                     "min_free_disk_mb": 0, "allowed_networks": ["127.0.0.1/32"],
                     "acse_timeout_s": TIMEOUT_S, "network_timeout_s": TIMEOUT_S, "dimse_timeout_s": TIMEOUT_S},
            "models": {"dir": str(self.work / "models"), "device": "cpu"},
            "logging": {"format": "json", "level": "info"},
        })
        self.work.mkdir(parents=True, exist_ok=True)
        path = self.work / "echonode.toml"
        path.write_text(to_toml(cfg))
        return [sys.executable, "-m", "echonode", "--config", str(path), "serve"]


def _describe(pdus: list[raw.Pdu]) -> str:
    out = []
    for p in pdus:
        if p.type == raw.ABORT:
            out.append("A-ABORT " + "/".join(str(v) for v in p.abort_source_reason))
        elif p.type == raw.ASSOCIATE_RJ:
            out.append("A-ASSOCIATE-RJ " + "/".join(str(v) for v in p.reject))
        else:
            out.append(f"PDU type {p.type}")
    return ", ".join(out) or "nothing"


def _held(sock: socket.socket) -> tuple[str, str]:
    try:
        took, pdus = raw.wait_closed(sock, HOLD_CAP_S)
        return f"{took:.1f} s", _describe(pdus) + ", closed"
    except TimeoutError:
        return f"> {HOLD_CAP_S:.0f} s", "still open"


def attack(rx: Receiver, name: str) -> dict[str, object]:
    assert rx.proc is not None
    with Sampler(rx.proc.pid) as mem:
        if name.startswith("rq"):
            sock = socket.create_connection(("127.0.0.1", rx.port), timeout=10)
        else:
            sock, ans = raw.associate(rx.port, calling=b"CART")
            if ans is None or ans.type != raw.ASSOCIATE_AC:
                return {"attack": name, "result": f"association not accepted: {ans}"}
        if name == "rq_2gib":
            sock.sendall(raw.header(raw.ASSOCIATE_RQ, GIB2))
        elif name == "pdata_2gib":
            sock.sendall(raw.header(raw.P_DATA_TF, GIB2))
        elif name == "rq_stall":
            sock.sendall(raw.header(raw.ASSOCIATE_RQ, 200) + bytes(10))
        elif name == "pdata_stall":
            sock.sendall(raw.header(raw.P_DATA_TF, 1000) + bytes(10))
        held, answer = _held(sock)
        time.sleep(0.3)
        sock.close()
    return {"attack": name, "answer": answer, "held": held, "rss_growth_mib": mem.growth_mib}


def slots(rx: Receiver, n: int = 50, seconds: float = 8.0) -> dict[str, object]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", rx.port))
            s.sendall(raw.header(raw.ASSOCIATE_RQ, 200))
        except OSError:
            pass
        socks.append(s)
    lat: list[float] = []
    failed = 0
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        t0 = time.monotonic()
        if echo_ok(rx.port, 5):
            lat.append(time.monotonic() - t0)
        else:
            failed += 1
        time.sleep(0.25)
    for s in socks:
        s.close()
    return {
        "attack": f"slots ({n} stalled)", "echo_ok": len(lat), "echo_failed": failed,
        "echo_median_ms": round(statistics.median(lat) * 1000) if lat else None,
        "echo_max_ms": round(max(lat) * 1000) if lat else None,
    }


def run(rx: Receiver) -> list[dict[str, object]]:
    rx.start()
    rows = []
    try:
        for name in ("rq_2gib", "pdata_2gib", "rq_stall", "pdata_stall"):
            row = attack(rx, name)
            # The receiver may still be stuck with the last attack (storescp
            # serves one association at a time): wait until it answers again.
            t0 = time.monotonic()
            while not echo_ok(rx.port, 2) and time.monotonic() - t0 < 60:
                time.sleep(0.5)
            row["echo_back_after_s"] = round(time.monotonic() - t0, 1)
            row["rss_now_mib"] = round(rss_kib(rx.proc.pid) / 1024, 1) if rx.proc else None
            rows.append(row)
            print(rx.name, row, flush=True)
        row = slots(rx)
        rows.append(row)
        print(rx.name, row, flush=True)
    finally:
        rx.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--echonode-repo", type=Path, default=REPO)
    ap.add_argument("--only", choices=["echonode", "storescp", "orthanc"])
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="pdu-attacks-"))
    print(f"cpu: {cpu_model()}; echonode from {args.echonode_repo}")
    receivers: list[Receiver] = []
    if args.only in (None, "echonode"):
        receivers.append(Echonode(base / "echonode", args.echonode_repo))
    if args.only in (None, "storescp") and Path(STORESCP).exists():
        receivers.append(Storescp(base / "storescp"))
    if args.only in (None, "orthanc") and Path(ORTHANC).exists():
        receivers.append(Orthanc(base / "orthanc"))
    results = {}
    try:
        for rx in receivers:
            results[rx.name] = run(rx)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
