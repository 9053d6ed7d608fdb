"""A DICOMweb server in the test process that answers STOW-RS (and QIDO-RS) as a test tells it.

Each request takes the next :class:`Answer` of the script (then the default:
200 with a Store Instances Response that lists what it got). An answer can:

- ``answer``: a status, headers and a body (a DICOM JSON document, or bytes);
- ``stall``: read the request and send nothing, the connection left open;
- ``trickle``: send the status line, headers and a body one byte at a time,
  every ``trickle_s``, never reaching its Content-Length: every read gets a
  byte long before any socket timeout, so only a deadline on the whole
  answer ends it;
- ``hold``: record the request and hold the answer (200) until the test
  calls :meth:`FakeDICOMweb.release` (to kill the node while it waits).

Every STOW-RS body is split into its parts and read with pydicom;
:attr:`FakeDICOMweb.stored` lists the data sets received (whatever the
answer). :meth:`FakeDICOMweb.stop` ends every handler and joins its thread.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from typing import Any

import pydicom
from pydicom.dataset import Dataset


@dataclass
class Answer:
    """What the server does with one request."""

    status: int = 200
    body: Any = None  # dict/list: sent as DICOM JSON; bytes: as they are; None: the default answer
    headers: dict[str, str] = field(default_factory=dict)
    mode: str = "answer"  # answer | stall | trickle | hold


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    datasets: list[Dataset]


def failed_sop(uid: str, reason: int, sop_class: str = "1.2.840.10008.5.1.4.1.1.88.34") -> dict:
    """A Store Instances Response whose FailedSOPSequence names ``uid`` with ``reason`` (DICOM JSON)."""
    return {"00081198": {"vr": "SQ", "Value": [{
        "00081150": {"vr": "UI", "Value": [sop_class]},
        "00081155": {"vr": "UI", "Value": [uid]},
        "00081197": {"vr": "US", "Value": [reason]}}]},
        "00081199": {"vr": "SQ"}}


def stored_sop(uid: str, sop_class: str, warning: int | None = None) -> dict:
    """A Store Instances Response whose ReferencedSOPSequence names ``uid`` (with a WarningReason)."""
    item: dict = {"00081150": {"vr": "UI", "Value": [sop_class]}, "00081155": {"vr": "UI", "Value": [uid]}}
    if warning is not None:
        item["00081196"] = {"vr": "US", "Value": [warning]}
    return {"00081198": {"vr": "SQ"}, "00081199": {"vr": "SQ", "Value": [item]}}


def split_multipart(body: bytes, content_type: str) -> list[bytes]:
    """The parts of a multipart/related body, without their headers."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        return []
    delimiter = b"--" + m.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, content = chunk.partition(b"\r\n\r\n")
        parts.append(content[:-2] if content.endswith(b"\r\n") else content)
    return parts


class FakeDICOMweb:
    """The server; ``url`` is its DICOMweb base URL (``.../dicom-web``).

    Parameters
    ----------
    answers : list of Answer, optional
        The script, one per request, in order.
    credentials : str, optional
        The ``Authorization`` header value it requires (401 otherwise).
    tls : ssl.SSLContext, optional
        Serve HTTPS with this context.
    trickle_s : float
        The pause between two bytes of a ``trickle`` answer.
    """

    def __init__(self, answers: list[Answer] | None = None, *, credentials: str | None = None,
                 tls: ssl.SSLContext | None = None, trickle_s: float = 0.2) -> None:
        self.script = list(answers or [])
        self.credentials = credentials
        self.trickle_s = trickle_s
        self.requests: list[Received] = []
        self.stalled = 0
        self.holding = threading.Event()
        self._release = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # http.server's name
                pass

            def do_GET(self) -> None:  # http.server's name
                fake._handle(self, b"")

            def do_POST(self) -> None:  # http.server's name
                length = int(self.headers.get("Content-Length", "0"))
                fake._handle(self, self.rfile.read(length))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}/dicom-web"
        self._serving = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                         name="fake-dicomweb", daemon=True)

    # -- the test's side ---------------------------------------------------------------

    def start(self) -> FakeDICOMweb:
        self._serving.start()
        return self

    def release(self) -> None:
        """Let a held answer go (and every later ``hold``)."""
        self._release.set()

    @property
    def stored(self) -> list[Dataset]:
        with self._lock:
            return [ds for r in self.requests if r.method == "POST" for ds in r.datasets]

    def posts(self) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.method == "POST"]

    def stop(self) -> None:
        self._stop.set()
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
        self._serving.join(5)
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(5)
            assert not t.is_alive(), "a fake DICOMweb handler did not end"

    # -- the server's side -------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        with self._lock:
            self._threads.append(threading.current_thread())
        headers = {k.lower(): v for k, v in h.headers.items()}
        datasets = [pydicom.dcmread(BytesIO(p)) for p in split_multipart(body, headers.get("content-type", ""))]
        with self._lock:
            self.requests.append(Received(h.command, h.path, headers, datasets))
        if self.credentials is not None and headers.get("authorization") != self.credentials:
            self._send(h, Answer(401, b"", {"WWW-Authenticate": 'Basic realm="fake"'}))
            return
        with self._lock:
            answer = self.script.pop(0) if self.script else Answer()
        if answer.mode == "stall":
            with self._lock:
                self.stalled += 1
            self._stop.wait(60)
            h.close_connection = True
            return
        if answer.mode == "hold":
            self.holding.set()
            self._release.wait(60)
            if self._stop.is_set():
                h.close_connection = True
                return
        if answer.mode == "trickle":
            with self._lock:
                self.stalled += 1
            self._trickle(h)
            return
        if answer.body is None and h.command == "POST":
            answer.body = {"00081198": {"vr": "SQ"}, "00081199": {"vr": "SQ", "Value": [
                {"00081150": {"vr": "UI", "Value": [str(ds.SOPClassUID)]},
                 "00081155": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]}} for ds in datasets]}}
        if answer.body is None:
            answer.body = []
        self._send(h, answer)

    def _send(self, h: BaseHTTPRequestHandler, answer: Answer) -> None:
        if isinstance(answer.body, (dict, list)):
            data = json.dumps(answer.body).encode()
            content_type = "application/dicom+json"
        else:
            data = bytes(answer.body or b"")
            content_type = answer.headers.get("Content-Type", "application/octet-stream")
        try:
            h.send_response(answer.status)
            for k, v in {"Content-Type": content_type, **answer.headers}.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except OSError:
            pass  # the client is gone (a cut attempt, a killed node)

    def _trickle(self, h: BaseHTTPRequestHandler) -> None:
        try:
            h.send_response(200)
            h.send_header("Content-Type", "application/dicom+json")
            h.send_header("Content-Length", "100000")
            h.end_headers()
            h.wfile.flush()
            while not self._stop.wait(self.trickle_s):
                h.wfile.write(b" ")
                h.wfile.flush()
        except OSError:
            pass
        h.close_connection = True


def basic(user: str, password: str) -> str:
    """The Authorization header value of HTTP basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
