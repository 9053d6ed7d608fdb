"""DICOMweb STOW-RS: an SR to a DICOMweb store, under the attempt's hard deadline.

One request per attempt: ``POST {url}/studies`` with the SR file as the one
part of a ``multipart/related; type="application/dicom"`` body (PS3.18
10.5), on a connection of its own (``Connection: close``). The answer is
read as PS3.18 10.5.3 says:

- 200 (or another 2xx): stored; 202 too, with the warning logged (the
  instance's WarningReason, or the ``Warning`` header). A 2xx whose
  FailedSOPSequence names our instance is read as that failure.
- 409 with a FailedSOPSequence: the instance's FailureReason, read as a
  C-STORE status is (:func:`echonode.delivery.outcome.classify_store_status`):
  0xA7xx (out of resources) and 0x0210/0x0213 are retried, 0x0111 (the
  instance is already there: our own resend) counts as stored, any other is
  a dead letter with the reason. 0x0122 (SOP class not supported) first
  tries the same report in the next SR class (:mod:`echonode.report.sop`),
  in the same attempt: the per-destination fallback, as DIMSE destinations
  negotiate it at association.
- 401 and 403: a dead letter (the credentials or their rights); other 4xx
  and 3xx: a dead letter with the status (3xx names where it points: fix
  ``url``); 408, 425, 429, 5xx, a refused or cut connection: retried.

Why the standard library and not ``dicomweb-client``/``requests``: the
attempt's hard deadline (:mod:`echonode.network.deadline`) is kept by shutting the
socket down from outside, which needs the socket, and ``requests`` hides it
in a pool; its ``timeout`` bounds each read, not the answer, so a server
that trickles its answer holds the request for ever. ``dicomweb-client``
also raises on a 409 before reading its FailedSOPSequence, ignores a 202's
warnings and retries inside the call, beyond the outbox's backoff.

Credentials are read from ``auth_file`` at each attempt
(:func:`echonode.credentials.load_credentials`) and never logged.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from pydicom import dcmread
from pydicom.dataset import Dataset

from echonode import __version__
from echonode.config import Destination
from echonode.credentials import authorization_header, load_credentials
from echonode.delivery.outcome import (
    DeliveryError,
    Sent,
    classify_store_status,
    converted_report,
)
from echonode.network.deadline import STOP, AssociationDeadline
from echonode.ops.logs import get_logger
from echonode.report.sop import SR_SOP_CLASS_UIDS, sendable_classes

log = get_logger(__name__)

#: Bytes of an answer read at most: a STOW-RS answer for one instance is a few kB.
MAX_RESPONSE_BYTES = 1 << 20
#: How far beyond the deadline a socket's own timeout is set: a backstop.
SOCKET_TIMEOUT_MARGIN_S = 1.0
#: FailureReason "Referenced SOP Class not supported" (PS3.18 table 10.5.3-3): try the next class.
SOP_CLASS_NOT_SUPPORTED = 0x0122

_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"

_FAILURE_NAMES = {
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xC122: "transfer syntax not supported",
}
_WARNING_NAMES = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}
#: 4xx statuses that a later try can clear (timeout, too early, too many requests).
_RETRIED_4XX = {408, 425, 429}


def failure_name(code: int) -> str:
    """A STOW-RS FailureReason (or C-STORE status) as words."""
    if code in _FAILURE_NAMES:
        return _FAILURE_NAMES[code]
    if 0xA700 <= code <= 0xA7FF:
        return "out of resources"
    if 0xA900 <= code <= 0xA9FF:
        return "data set does not match SOP class"
    if 0xC000 <= code <= 0xCFFF:
        return "cannot understand"
    return "unknown reason"


def _warning_name(code: int) -> str:
    return _WARNING_NAMES.get(code, "warning")


@dataclass
class StoreAnswer:
    """A STOW-RS answer as read: the HTTP status and the Store Instances Response module.

    Attributes
    ----------
    status, reason : int, str
        The HTTP status line.
    headers : dict
        Response headers, names in lower case.
    failed : dict
        SOP Instance UID -> FailureReason, from the FailedSOPSequence.
    stored : dict
        SOP Instance UID -> WarningReasons, from the ReferencedSOPSequence.
    readable : bool
        Whether a Store Instances Response could be read from the body.
    """

    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    stored: dict[str, list[int]] = field(default_factory=dict)
    readable: bool = False

    @property
    def line(self) -> str:
        return f"HTTP {self.status} {self.reason}".rstrip()

    def failure_of(self, sop_uid: str) -> int | None:
        """The FailureReason given for ``sop_uid``, or None when it is not listed as failed."""
        failure = self.failed.get(sop_uid)
        if failure is None and len(self.failed) == 1 and not self.stored:
            # One instance sent, one failure listed: ours, whatever UID the server wrote.
            failure = next(iter(self.failed.values()))
        return failure


def read_store_response(body: bytes, content_type: str = "") -> tuple[dict[str, int], dict[str, list[int]]] | None:
    """The FailedSOPSequence and ReferencedSOPSequence of a STOW-RS answer (DICOM JSON or XML).

    Parameters
    ----------
    body : bytes
        The answer's body.
    content_type : str
        Its Content-Type, when given (some servers give none: the body's
        first character decides then).

    Returns
    -------
    tuple of dict, or None
        (SOP Instance UID -> FailureReason, SOP Instance UID -> WarningReasons),
        or None when the body holds no Store Instances Response.
    """
    text = body.lstrip()
    if not text:
        return None
    kind = content_type.split(";")[0].strip().lower()
    try:
        if kind.endswith("json") or text[:1] in (b"{", b"["):
            return _read_json(json.loads(text))
        if kind.endswith("xml") or text[:1] == b"<":
            return _read_xml(text)
    except (ValueError, TypeError, AttributeError, ET.ParseError):
        return None
    return None


def _read_json(doc: Any) -> tuple[dict[str, int], dict[str, list[int]]] | None:
    if isinstance(doc, list) and len(doc) == 1:
        doc = doc[0]
    if not isinstance(doc, dict) or not ({_FAILED_SOP_SEQUENCE, _REFERENCED_SOP_SEQUENCE} & set(doc)):
        return None

    def items(tag: str) -> list[dict[str, Any]]:
        value = doc.get(tag, {}).get("Value", [])
        return [i for i in value if isinstance(i, dict)] if isinstance(value, list) else []

    def values(item: dict[str, Any], tag: str) -> list[Any]:
        value = item.get(tag, {}).get("Value", [])
        return value if isinstance(value, list) else []

    failed: dict[str, int] = {}
    for item in items(_FAILED_SOP_SEQUENCE):
        uid = next(iter(values(item, _REFERENCED_SOP_INSTANCE_UID)), "")
        reasons = [int(v) for v in values(item, _FAILURE_REASON) if isinstance(v, int)]
        failed[str(uid)] = reasons[0] if reasons else 0x0110
    stored: dict[str, list[int]] = {}
    for item in items(_REFERENCED_SOP_SEQUENCE):
        uid = next(iter(values(item, _REFERENCED_SOP_INSTANCE_UID)), "")
        stored[str(uid)] = [int(v) for v in values(item, _WARNING_REASON) if isinstance(v, int)]
    return failed, stored


def _read_xml(text: bytes) -> tuple[dict[str, int], dict[str, list[int]]] | None:
    if b"<!DOCTYPE" in text.upper() or b"<!ENTITY" in text.upper():
        return None  # no entity expansion from a server's answer
    root = ET.fromstring(text)

    def local(tag: str) -> str:
        return tag.rsplit("}", 1)[-1]

    def attribute(parent: ET.Element, tag: str) -> ET.Element | None:
        return next((e for e in parent if local(e.tag) == "DicomAttribute" and e.get("tag", "").upper() == tag),
                    None)

    def items(tag: str) -> list[ET.Element]:
        seq = attribute(root, tag)
        return [] if seq is None else [e for e in seq if local(e.tag) == "Item"]

    def values(item: ET.Element, tag: str) -> list[str]:
        attr = attribute(item, tag)
        return [] if attr is None else [(v.text or "").strip() for v in attr if local(v.tag) == "Value"]

    if attribute(root, _FAILED_SOP_SEQUENCE) is None and attribute(root, _REFERENCED_SOP_SEQUENCE) is None:
        return None
    failed: dict[str, int] = {}
    for item in items(_FAILED_SOP_SEQUENCE):
        uid = next(iter(values(item, _REFERENCED_SOP_INSTANCE_UID)), "")
        reasons = [int(v) for v in values(item, _FAILURE_REASON) if v.isdigit()]
        failed[uid] = reasons[0] if reasons else 0x0110
    stored: dict[str, list[int]] = {}
    for item in items(_REFERENCED_SOP_SEQUENCE):
        uid = next(iter(values(item, _REFERENCED_SOP_INSTANCE_UID)), "")
        stored[uid] = [int(v) for v in values(item, _WARNING_REASON) if v.isdigit()]
    return failed, stored


def judge(answer: StoreAnswer, sop_uid: str, url: str) -> tuple[str, str | None]:
    """Whether the server stored the instance: (status text, warning or None), or raise why not.

    Parameters
    ----------
    answer : StoreAnswer
    sop_uid : str
        The SOP Instance UID sent.
    url : str
        The destination's base URL, for messages.

    Raises
    ------
    DeliveryError
        When the instance was not stored; ``permanent`` as the module's
        docstring lists.
    """
    code = answer.status
    failure = answer.failure_of(sop_uid)
    if 200 <= code < 300 and failure is None:
        warnings = answer.stored.get(sop_uid, [])
        notes = [f"WarningReason 0x{w:04X} ({_warning_name(w)})" for w in warnings]
        if answer.headers.get("warning"):
            notes.append(f"Warning: {answer.headers['warning'][:200]}")
        if code == 202 and not notes:
            notes.append("202 Accepted with no warning given")
        return answer.line, "; ".join(notes) or None
    if failure is not None:
        stored, permanent = classify_store_status(failure)
        if stored:  # 0x0111: the server has it already (our own resend)
            return f"{answer.line}, FailureReason 0x{failure:04X} ({failure_name(failure)})", None
        raise DeliveryError(f"STOW-RS refused: {answer.line}, FailureReason 0x{failure:04X}"
                            f" ({failure_name(failure)})", permanent=permanent)
    if code == 409:
        raise DeliveryError(f"STOW-RS refused: {answer.line} with no FailedSOPSequence for the SR", permanent=True)
    if code in (401, 403):
        raise DeliveryError(f"STOW-RS refused: {answer.line}: authentication or authorization refused"
                            " (check the destination's auth and auth_file)", permanent=True)
    if 300 <= code < 400:
        where = answer.headers.get("location", "")
        raise DeliveryError(f"STOW-RS answered {answer.line}" + (f" to {where[:200]}" if where else "")
                            + ": set the destination's url to the DICOMweb base URL", permanent=True)
    if code == 404:
        raise DeliveryError(f"STOW-RS refused: {answer.line}: no STOW-RS service at {url}/studies"
                            " (check the destination's url)", permanent=True)
    if 500 <= code < 600 or code in _RETRIED_4XX:
        raise DeliveryError(f"STOW-RS failed: {answer.line}", permanent=False)
    if 400 <= code < 500:
        raise DeliveryError(f"STOW-RS refused: {answer.line}", permanent=True)
    raise DeliveryError(f"STOW-RS: unexpected answer {answer.line}", permanent=False)


# -- the connection -------------------------------------------------------------------


def _parts(url: str) -> SplitResult:
    return urlsplit(url.rstrip("/"))


def ssl_context(dest: Destination) -> ssl.SSLContext:
    """The TLS context for an ``https://`` STOW-RS destination.

    The server's name is checked against its certificate (it is addressed by
    URL, unlike a DICOM peer); trust comes from ``tls.ca_file`` when set,
    else from the system's store.

    Raises
    ------
    DeliveryError
        Permanent, when the CA or client certificate files are unusable.
    """
    tls = dest.tls
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.cert_file:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ValueError) as exc:
        raise DeliveryError(f"TLS setup for {dest.url} failed: {exc}", permanent=True) from exc
    return ctx


def _connect(dest: Destination, parts: SplitResult, deadline: AssociationDeadline) -> http.client.HTTPConnection:
    """A connection to the destination's server, its socket (plain, then TLS) watched by ``deadline``."""
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    ctx = ssl_context(dest) if https else None
    try:
        sock = socket.create_connection((host, port), timeout=max(deadline.remaining(), 0.01))
    except socket.gaierror as exc:
        raise DeliveryError(f"cannot resolve host {host!r}: {exc.strerror or exc}", permanent=False) from exc
    except OSError as exc:
        raise DeliveryError(f"cannot connect to {host}:{port}: {exc}", permanent=False) from exc
    deadline.watch(sock)
    # A backstop only: the deadline ends the request, whatever each read waits for.
    sock.settimeout(deadline.remaining() + SOCKET_TIMEOUT_MARGIN_S)
    conn: http.client.HTTPConnection
    if ctx is not None:
        try:
            tls = ctx.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
            deadline.watch(tls)  # the same connection; the plain socket object is detached now
            tls.do_handshake()
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise DeliveryError(f"TLS: the certificate of {host} is not trusted: {exc.verify_message}"
                                " (check the destination's tls.ca_file)", permanent=True) from exc
        except OSError as exc:
            sock.close()
            raise DeliveryError(f"TLS handshake with {host}:{port} failed: {exc}", permanent=False) from exc
        conn = http.client.HTTPSConnection(host, port, context=ctx)
        conn.sock = tls
    else:
        conn = http.client.HTTPConnection(host, port)
        conn.sock = sock
    return conn


def _request(dest: Destination, method: str, path: str, headers: Mapping[str, str], body: bytes | None,
             deadline: AssociationDeadline) -> StoreAnswer:
    """One HTTP request on a connection of its own; the answer with at most MAX_RESPONSE_BYTES of body read."""
    parts = _parts(dest.url)
    conn = _connect(dest, parts, deadline)
    try:
        conn.request(method, path, body=body, headers={**headers, "Connection": "close",
                                                       "User-Agent": f"echonode/{__version__}"})
        rsp = conn.getresponse()
        answer = StoreAnswer(rsp.status, rsp.reason or "", {k.lower(): v for k, v in rsp.getheaders()})
        # The whole answer, not its status line: a 2xx can still list the
        # instance as failed. A read returns what has come so far.
        data = b""
        while len(data) < MAX_RESPONSE_BYTES:
            chunk = rsp.read(min(65536, MAX_RESPONSE_BYTES - len(data)))
            if not chunk:
                break
            data += chunk
        # A cut socket reads as the end of the answer, which http.client
        # does not check against Content-Length: neither counts as an answer.
        if deadline.reason is not None or (rsp.length and len(data) < MAX_RESPONSE_BYTES):
            raise http.client.IncompleteRead(data, rsp.length)
    except (OSError, http.client.HTTPException) as exc:
        raise DeliveryError(f"{method} {dest.url}: no complete answer ({type(exc).__name__})",
                            permanent=False) from exc
    finally:
        conn.close()
    read = read_store_response(data, answer.headers.get("content-type", "")) if method == "POST" else None
    if read is not None:
        answer.failed, answer.stored = read
        answer.readable = True
    return answer


def _authorization(dest: Destination) -> dict[str, str]:
    if not dest.auth:
        return {}
    try:
        return {"Authorization": authorization_header(load_credentials(dest.auth, dest.auth_file, single=True))}
    except ValueError as exc:
        # Read at each attempt: the file changed since the config was checked.
        raise DeliveryError(f"credentials for {dest.name}: {exc}", permanent=True) from exc


def _cut_reason(exc: DeliveryError, deadline: AssociationDeadline, url: str) -> DeliveryError:
    """Say that the deadline (or the node's stop) ended the request, rather than what the socket saw then."""
    if deadline.reason is None or exc.permanent:
        return exc
    if deadline.reason == STOP:
        return DeliveryError("interrupted: the node is stopping", permanent=False)
    return DeliveryError(f"no response from {url} within {deadline.seconds:g} s (connection closed)",
                         permanent=False)


# -- STOW-RS and the check -------------------------------------------------------------


def _multipart(part: bytes) -> tuple[bytes, str]:
    boundary = f"echonode-{uuid.uuid4().hex}"
    while boundary.encode() in part:  # pragma: no cover - 128 random bits
        boundary = f"echonode-{uuid.uuid4().hex}"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part
            + f"\r\n--{boundary}--\r\n".encode())
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _encoded(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def stow_file(dest: Destination, path: str, timeout_s: float = 30.0,
              deadline: AssociationDeadline | None = None) -> Sent:
    """STOW-RS one SR file to ``dest``; what was stored, or raise :class:`DeliveryError`.

    Everything on the network (connect, TLS, request, answer) ends within
    ``timeout_s``: ``deadline`` (started here when the caller has not), or
    one of its own. A server that refuses the SR's class (FailureReason
    0x0122) is sent the same report in the next class of
    :func:`echonode.report.sop.sendable_classes`, under the same deadline.

    Raises
    ------
    DeliveryError
        Why the SR was not stored, and whether retrying can help.
    OSError, pydicom.errors.InvalidDicomError
        When the SR file cannot be read.
    """
    raw = Path(path).read_bytes()
    ds = dcmread(BytesIO(raw))
    own_class, own_uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    classes = sendable_classes(own_class) if own_class in SR_SOP_CLASS_UIDS.values() else (own_class,)
    headers = {"Accept": "application/dicom+json", **_authorization(dest)}
    stow_path = (_parts(dest.url).path or "") + "/studies"
    clock = AssociationDeadline(timeout_s) if deadline is None else deadline
    clock.start()
    try:
        for i, sop_class in enumerate(classes):
            if sop_class == own_class:
                part, uid = raw, own_uid
            else:
                converted = converted_report(ds, sop_class)
                part, uid = _encoded(converted), str(converted.SOPInstanceUID)
            body, content_type = _multipart(part)
            answer = _request(dest, "POST", stow_path, {**headers, "Content-Type": content_type}, body, clock)
            if answer.failure_of(uid) == SOP_CLASS_NOT_SUPPORTED and i + 1 < len(classes):
                log.info("delivery.sop_class_fallback", destination=dest.name, sop_class_uid=sop_class,
                         sr_sop_uid=uid, next_sop_class_uid=classes[i + 1])
                continue
            status, warning = judge(answer, uid, dest.url)
            return Sent(status, sop_class, uid, warning)
        raise AssertionError("unreachable")  # pragma: no cover - the last class is judged above
    except DeliveryError as exc:
        raise _cut_reason(exc, clock, dest.url) from exc
    finally:
        if deadline is None:
            clock.cancel()


def check(dest: Destination, timeout_s: float = 10.0) -> str:
    """``echonode echo`` for a STOW-RS destination: a QIDO-RS query with the same auth and deadline.

    ``GET {url}/studies?StudyInstanceUID=<a new UID>&limit=1``: a study that
    cannot exist, so that no patient's data crosses the wire. A 200 or 204
    says that the server is reached (TLS and its certificate included),
    serves DICOMweb at ``url`` and takes the credentials for reading; it
    does not prove that they may store.

    Returns
    -------
    str
        The HTTP status line.

    Raises
    ------
    DeliveryError
        Why not (a 404 or 405 says that the server may still take STOW-RS).
    """
    query = f"{_parts(dest.url).path or ''}/studies?StudyInstanceUID=2.25.{uuid.uuid4().int}&limit=1"
    with AssociationDeadline(timeout_s) as clock:
        try:
            answer = _request(dest, "GET", query, {"Accept": "application/dicom+json", **_authorization(dest)},
                              None, clock)
        except DeliveryError as exc:
            raise _cut_reason(exc, clock, dest.url) from exc
    if answer.status in (200, 204):
        return answer.line
    if answer.status in (401, 403):
        raise DeliveryError(f"{answer.line}: authentication or authorization refused"
                            " (check the destination's auth and auth_file)", permanent=True)
    if answer.status in (404, 405, 501):
        raise DeliveryError(f"{answer.line}: no QIDO-RS at {dest.url}/studies (check the url; a server that"
                            " offers STOW-RS alone may still take the SRs)", permanent=True)
    raise DeliveryError(f"QIDO-RS answered {answer.line}", permanent=500 > answer.status >= 300)
