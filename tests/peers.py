"""The peers tests talk to: DICOM clients, a recording PACS, a served node, Orthanc, external tools.

Every test that sends to a node, plays the PACS or runs a dcmtk/Orthanc
tool takes it from here, so that a client's timeouts, a PACS's answers and
the rule for a missing tool are the same everywhere.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    Verification,
)

from echonode.config import Config, to_toml
from echonode.delivery.dimse import Peer, echo
from echonode.delivery.outcome import DeliveryError

REPO = Path(__file__).resolve().parent.parent

# -- external tools -------------------------------------------------------------------
# dcmtk's tools by full path: pynetdicom installs its own under the same names.
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
STORESCP = "/usr/bin/storescp"
DCMQRSCP = "/usr/bin/dcmqrscp"
DCMQRIDX = "/usr/bin/dcmqridx"
DCMCONV = "/usr/bin/dcmconv"
DSRDUMP = "/usr/bin/dsrdump"
DSR2HTML = "/usr/bin/dsr2html"
#: dicom3tools' validator.
DCIODVFY = "/usr/bin/dciodvfy"
ORTHANC = "/usr/sbin/Orthanc"
#: Debian's orthanc-dicomweb: QIDO-RS, WADO-RS and STOW-RS for Orthanc.
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
#: Debian's orthanc-python.
ORTHANC_PYTHON = "/usr/share/orthanc/plugins/libOrthancPython.so"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"


def require(available: bool, what: str, install: str) -> None:
    """Fail in CI (``CI`` set, as ``.ci/run`` does) when ``what`` is missing; skip locally, saying why.

    Parameters
    ----------
    available : bool
        Whether the thing the test needs is there.
    what : str
        What is missing, for the message.
    install : str
        How to get it (a Debian package, an extra).
    """
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing in CI: .ci/run must install {install}")
    pytest.skip(f"{what} not installed (install {install})")


#: The Debian package of each tool (.ci/run installs them all).
PACKAGES = {
    STORESCU: "dcmtk", ECHOSCU: "dcmtk", STORESCP: "dcmtk", DCMCONV: "dcmtk", DSRDUMP: "dcmtk", DSR2HTML: "dcmtk",
    DCMQRSCP: "dcmtk", DCMQRIDX: "dcmtk",
    DCIODVFY: "dicom3tools", ORTHANC: "orthanc", ORTHANC_DICOMWEB: "orthanc-dicomweb",
    ORTHANC_PYTHON: "orthanc-python", CHROMIUM: "chromium", CHROMEDRIVER: "chromium-driver",
    SYSTEMD_ANALYZE: "systemd",
}


def require_tool(path: str) -> str:
    """``path`` when that tool exists; otherwise fail in CI, skip locally (see :func:`require`)."""
    require(Path(path).exists(), path, PACKAGES.get(path, "its Debian package"))
    return path


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


# -- DICOM clients --------------------------------------------------------------------


def scu(ae_title: str = "CART", timeout: float = 10) -> AE:
    """A pynetdicom AE with every timeout bounded: a test fails instead of hanging."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    # Bounds the TCP connect and the TLS handshake too.
    ae.connection_timeout = timeout
    return ae


def _datasets(objects: Iterable[Dataset | Path]) -> list[Dataset]:
    return [obj if isinstance(obj, Dataset) else pydicom.dcmread(obj) for obj in objects]


def associate(port: int, datasets: Sequence[Dataset], *, calling: str = "CART", called: str = "ECHONODE",
              tls_args: Any = None, timeout: float = 10) -> Association:
    """An association proposing each dataset's class in its own transfer syntax (maybe not established)."""
    ae = scu(calling, timeout)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    return ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)


def status_of(rsp: Dataset | None) -> int:
    """A C-STORE/C-ECHO answer's status; -1 when none came."""
    return int(rsp.Status) if rsp is not None and "Status" in rsp else -1


def c_store(port: int, objects: Iterable[Dataset | Path], *, calling: str = "CART", called: str = "ECHONODE",
            tls_args: Any = None, timeout: float = 10) -> list[int]:
    """C-STORE datasets (or files, parsed) over one association; their statuses (-1: no answer).

    The association must be accepted (the test fails otherwise).
    """
    datasets = _datasets(objects)
    assoc = associate(port, datasets, calling=calling, called=called, tls_args=tls_args, timeout=timeout)
    assert assoc.is_established, f"association from {calling} to {called} on port {port} not accepted"
    try:
        return [status_of(assoc.send_c_store(ds)) for ds in datasets]
    finally:
        assoc.release()


def c_store_one(port: int, obj: Dataset | Path, *, calling: str = "CART", called: str = "ECHONODE") -> int | None:
    """C-STORE one object; its status, or None when the association is rejected."""
    (ds,) = _datasets([obj])
    assoc = associate(port, [ds], calling=calling, called=called)
    if not assoc.is_established:
        return None
    try:
        return status_of(assoc.send_c_store(ds))
    finally:
        assoc.release()


def c_echo(port: int, *, calling: str = "CART", called: str = "ECHONODE", timeout: float = 10) -> int | None:
    """C-ECHO; its status, or None when the association is rejected or no answer came."""
    ae = scu(calling, timeout)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, contexts=[build_context(Verification)])
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if rsp and "Status" in rsp else None
    finally:
        assoc.release()


def send_files(port: int, paths: Iterable[Path], *, calling: str = "CART",
               called: str = "ECHONODE") -> list[int]:
    """C-STORE each file's bytes as they are (streamed, never parsed or re-encoded); one association each.

    A cut or malformed file reaches the node as it is: parsed first, pydicom
    would send what it made of it.
    """
    statuses = []
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        for path in paths:
            meta = read_file_meta_info(path)
            ae = scu(calling, timeout=30)
            ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
            assoc = ae.associate("127.0.0.1", port, ae_title=called)
            assert assoc.is_established
            try:
                statuses.append(status_of(assoc.send_c_store(path)))
            finally:
                assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    return statuses


def send_studies(port: int, studies: list[list[Dataset]]) -> set[str]:
    """C-STORE every object (one association per study); return the acknowledged SOP Instance UIDs."""
    acked = set()
    for objs in studies:
        statuses = c_store(port, objs, timeout=30)
        acked |= {str(ds.SOPInstanceUID) for ds, status in zip(objs, statuses, strict=True) if status == 0}
    return acked


def storescu(port: int, *paths: Path, calling: str = "CART") -> subprocess.CompletedProcess:
    """dcmtk's storescu: each file in its own SOP class (-R), JPEG baseline or uncompressed proposed (-xy)."""
    return subprocess.run([require_tool(STORESCU), "-R", "-xy", "-aet", calling, "-aec", "ECHONODE",
                           "127.0.0.1", str(port), *map(str, paths)], capture_output=True, text=True, timeout=120)


def echoscu(port: int, *, calling: str = "CART") -> subprocess.CompletedProcess:
    """dcmtk's echoscu with bounded timeouts."""
    return subprocess.run([require_tool(ECHOSCU), "-to", "10", "-ta", "10", "-aet", calling,
                           "-aec", "ECHONODE", "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60)


# -- a PACS in the test process -------------------------------------------------------

SR_CLASSES = (ComprehensiveSRStorage, EnhancedSRStorage, Comprehensive3DSRStorage)


def stored_by_peer(status: int) -> bool:
    """Whether a peer that answers ``status`` keeps the instance: success, any warning (PS3.7 C.4), 0x0111."""
    return status in (0x0000, 0x0111, 0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF


class RecordingSCP:
    """A Storage SCP in the test process that records what it gets.

    Parameters
    ----------
    port : int
        Where to listen (loopback).
    ae_title : str
        Its AE title; with ``require_called_aet`` an association calling any
        other title is rejected permanently (called AE title not recognized).
    statuses : list of int
        C-STORE statuses to answer with, in order; 0x0000 once used up.
    sr : bool
        Accept the SR storage classes (otherwise Verification only).
    syntaxes : list of str, optional
        The transfer syntaxes it accepts them in (pynetdicom's default:
        the uncompressed ones).
    sr_classes : tuple of str
        The SR storage classes it accepts (all three by default; a PACS
        whose list predates Comprehensive 3D SR lacks that one).
    """

    def __init__(self, port: int, ae_title: str = "PACS", *, statuses: list[int] | None = None,
                 require_called_aet: bool = False, sr: bool = True, syntaxes: list[str] | None = None,
                 sr_classes: tuple[str, ...] = SR_CLASSES) -> None:
        self.port = port
        self.ae = AE(ae_title=ae_title)
        self.ae.require_called_aet = require_called_aet
        self.ae.add_supported_context(Verification)
        if sr:
            for uid in sr_classes:
                if syntaxes:
                    self.ae.add_supported_context(uid, syntaxes)
                else:
                    self.ae.add_supported_context(uid)
        self.statuses = list(statuses or [])
        self.received: list[Dataset] = []  # stored (status 0x0000 / warning / 0x0111)
        self.stores = 0  # C-STORE requests, whatever the answer
        self.connections = 0  # TCP connections (association attempts)
        self.requests = 0  # A-ASSOCIATE-RQs
        self._lock = threading.Lock()
        self.server: Any = None

    def _on_conn(self, event: evt.Event) -> None:
        with self._lock:
            self.connections += 1

    def _on_request(self, event: evt.Event) -> None:
        with self._lock:
            self.requests += 1

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.stores += 1
            status = self.statuses.pop(0) if self.statuses else 0x0000
            if stored_by_peer(status):
                self.received.append(ds)
        return status

    def start(self) -> RecordingSCP:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, self._on_conn),
                (evt.EVT_REQUESTED, self._on_request),
                (evt.EVT_C_STORE, self._on_store),
            ],
        )
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


class SlowPACS(RecordingSCP):
    """A RecordingSCP that can hold its answer to a C-STORE (to kill the node while it waits)."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.hold = threading.Event()  # set: hold the next answer until released
        self.holding = threading.Event()
        self.release = threading.Event()

    def _on_store(self, event: evt.Event) -> int:
        status = super()._on_store(event)
        if self.hold.is_set():
            self.hold.clear()
            self.holding.set()
            self.release.wait(30)
        return status

    def sr_uids(self) -> dict[str, set[str]]:
        """Study Instance UID -> the distinct SR SOP Instance UIDs received for it."""
        out: dict[str, set[str]] = {}
        with self._lock:
            for ds in self.received:
                out.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.SOPInstanceUID))
        return out


# -- a node started for a test --------------------------------------------------------


def echonode_cmd(*args: str) -> list[str]:
    """The ``echonode`` command line of this tree's code."""
    return [sys.executable, "-m", "echonode", *args]


def answers_echo(cfg: Config) -> bool:
    """Whether the node of ``cfg`` answers C-ECHO now."""
    try:
        return echo("CART", Peer(cfg.node.ae_title, "127.0.0.1", cfg.node.port), timeout_s=2) == 0
    except DeliveryError:
        return False


class ServedNode:
    """``echonode serve`` in its own session; ``kill()`` is kill -9 of node and worker."""

    def __init__(self, cfg: Config, tmp_path: Path) -> None:
        self.cfg = cfg
        self.path = tmp_path / "echonode.toml"
        self.path.write_text(to_toml(cfg))
        self.log = tmp_path / "serve.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> ServedNode:
        self.starts += 1
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(echonode_cmd("--config", str(self.path), "serve"), cwd=REPO,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.answers, timeout=90, interval=0.2, what="the node to listen")
        return self

    def answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"node exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        return answers_echo(self.cfg)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        else:
            # The worker is in the same session; make sure nothing outlives the test.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None


def journal_rows(cfg: Config, sql: str, args: tuple = ()) -> list[tuple]:
    """Rows of ``sql`` on the node's journal, read beside the node; none before the schema exists."""
    db = cfg.journal_path
    if not db.exists():
        return []
    con = sqlite3.connect(db, timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # schema not there yet
        return []
    finally:
        con.close()


def states(cfg: Config) -> dict[str, str]:
    """Study Instance UID -> state, from the node's journal."""
    return dict(journal_rows(cfg, "SELECT study_uid, state FROM studies"))


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of the node's /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get_health(port: int) -> tuple[int, dict]:
    """The node's /health: HTTP status and JSON body."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# -- Orthanc --------------------------------------------------------------------------


class Orthanc:
    """An Orthanc process with a config and storage of its own.

    Parameters
    ----------
    root : Path
        Where its config, storage, index and log go.
    node_port : int
        The echonode SCP port, registered as modality "echonode".
    dicomweb : bool
        Load Debian's DICOMweb plugin (``orthanc-dicomweb``): QIDO-RS,
        WADO-RS and STOW-RS under ``/dicom-web/``.
    users : dict, optional
        HTTP basic auth users (``RegisteredUsers``); REST calls from the
        test use the first one. None: no authentication.
    """

    def __init__(self, root: Path, node_port: int, *, dicomweb: bool = False,
                 users: dict[str, str] | None = None) -> None:
        require_tool(ORTHANC)
        if dicomweb:
            require_tool(ORTHANC_DICOMWEB)
        self.root = root
        self.users = dict(users or {})
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.config = root / "orthanc.json"
        root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            json.dumps(
                {
                    "Name": "echonode-test",
                    "HttpPort": self.http_port,
                    "DicomPort": self.dicom_port,
                    "DicomAet": "ORTHANC",
                    "DicomModalities": {"echonode": ["ECHONODE", "127.0.0.1", node_port]},
                    "StorageDirectory": str(root / "storage"),
                    "IndexDirectory": str(root / "index"),
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": bool(self.users),
                    "RegisteredUsers": self.users,
                    "DicomCheckCalledAet": False,
                    "DicomAssociationCloseDelay": 0,
                    "HttpServerThreads": 4,
                    "Plugins": [ORTHANC_DICOMWEB] if dicomweb else [],
                    "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
                },
                indent=2,
            )
        )
        self.proc: subprocess.Popen | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Orthanc:
        self._log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=self._log, stderr=subprocess.STDOUT)
        self.proc = proc

        def up() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"Orthanc exited with {proc.returncode}: {self.log_tail()}")
            try:
                return bool(self.get("/system")["DicomAet"] == "ORTHANC")
            except (urllib.error.URLError, ConnectionError, OSError):
                return False

        wait_for(up, timeout=20, interval=0.1, what="Orthanc's REST API")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, n: int = 2000) -> str:
        path = self.root / "orthanc.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json",
                timeout: float = 30) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        if body is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            return rsp.read()

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, doc: Any) -> Any:
        return json.loads(self.request("POST", path, json.dumps(doc).encode()))

    def upload(self, path: Path) -> dict:
        return json.loads(self.request("POST", "/instances", path.read_bytes(), "application/dicom"))

    def sr_instances(self, study_id: str) -> list[str]:
        """Orthanc IDs of the SR instances in a study."""
        out = []
        for series in self.get(f"/studies/{study_id}/series"):
            if series["MainDicomTags"].get("Modality") == "SR":
                out.extend(series["Instances"])
        return out
