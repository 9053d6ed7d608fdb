"""DICOMweb STOW-RS destinations: Orthanc's DICOMweb plugin, and a server in the test that answers as told.

The SR comes from a real worker run (:func:`tests.delivery_support.reported_study`);
its outbox row is for destination "pacs", here a ``kind = "stow"``
destination. :class:`tests.fake_dicomweb.FakeDICOMweb` plays the 202, 409,
401, 5xx, stalled and trickling servers; Orthanc (Debian's
``orthanc-dicomweb``, HTTP basic auth on) the real one; the kill -9 runs
``echonode serve`` as in tests/system/test_stage_recovery.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import ssl
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom.sop_class import Comprehensive3DSRStorage, ComprehensiveSRStorage  # type: ignore[attr-defined]
from structlog.testing import capture_logs

from echonode.config import Config, Destination, TLSConfig, parse_config, to_toml
from echonode.delivery.outbox import Delivery
from echonode.delivery.stow import read_store_response
from echonode.report.sop import derived_sop_instance_uid
from echonode.studies.journal import Journal
from echonode.studies.states import OutboxState, StudyState
from tests.conftest import free_port, make_config, run_cli, wait_for, with_destination
from tests.delivery_support import (
    Reported,
    bounded,
    outbox_rows,
    owe_more,
    reported_study,
    wait_due,
    write_config,
)
from tests.factories import make_studies, tiny_bundle
from tests.fake_dicomweb import Answer, FakeDICOMweb, basic, failed_sop, stored_sop
from tests.peers import (
    Orthanc,
    ServedNode,
    journal_rows,
    send_studies,
    states,
)


@pytest.fixture
def dicomweb() -> Iterator:
    """Start fake DICOMweb servers; all are stopped (threads joined) at the end of the test."""
    started: list[FakeDICOMweb] = []

    def start(answers: list[Answer] | None = None, **kwargs) -> FakeDICOMweb:
        server = FakeDICOMweb(answers, **kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def auth_file(tmp_path: Path, text: str, name: str = "pacs.auth") -> Path:
    path = tmp_path / name
    path.write_text(text + "\n")
    os.chmod(path, 0o600)
    return path


def stow_destination(url: str, *, auth: str = "", auth_file: Path | None = None, ca_file: Path | None = None,
                     name: str = "pacs") -> Destination:
    tls = TLSConfig(ca_file=str(ca_file)) if ca_file else TLSConfig()
    return Destination(name, kind="stow", url=url, auth=auth, auth_file=str(auth_file or ""), tls=tls)


def as_stow(rep: Reported, dest: Destination) -> Reported:
    """``rep`` with its destination "pacs" replaced by ``dest``, the config checked as the node would."""
    cfg = dataclasses.replace(rep.cfg, destinations=(dest,))
    assert parse_config(tomllib.loads(to_toml(cfg))) == cfg
    return dataclasses.replace(rep, cfg=cfg)


def stow_study(tmp_path: Path, loop: Path, url: str, **delivery) -> Reported:
    return as_stow(reported_study(tmp_path, loop, 104, **delivery), stow_destination(url))


# -- what the server says -------------------------------------------------------------


def test_stored_with_200_recorded_and_sent_once(tmp_path: Path, ybr_loop: Path, dicomweb) -> None:
    server = dicomweb()
    rep = stow_study(tmp_path, ybr_loop, server.url)
    delivery = Delivery(rep.cfg, rep.journal)
    with capture_logs() as logs:
        assert delivery.run() == 1
    (post,) = server.posts()
    assert post.path == "/dicom-web/studies"
    assert post.headers["content-type"].startswith('multipart/related; type="application/dicom"; boundary=')
    assert post.headers["accept"] == "application/dicom+json"
    assert "authorization" not in post.headers
    (ds,) = post.datasets
    assert ds == pydicom.dcmread(rep.sr_path)  # the file as written
    row = rep.outbox()
    assert (row["state"], row["attempts"], row["last_error"]) == (OutboxState.SENT, 1, None)
    assert (row["sent_sop_class_uid"], row["sent_sop_uid"]) == (Comprehensive3DSRStorage, rep.sr_uid)
    assert rep.journal.study_state(rep.study_uid) == StudyState.DELIVERED
    (sent,) = [e for e in logs if e["event"] == "delivery.sent"]
    assert (sent["status"], sent["log_level"], sent["warning"]) == ("HTTP 200 OK", "info", None)
    time.sleep(0.2)
    assert delivery.run() == 0 and len(server.posts()) == 1


@pytest.mark.parametrize("answer,text", [
    (lambda uid: Answer(202, stored_sop(uid, Comprehensive3DSRStorage, warning=0xB000)),
     "WarningReason 0xB000 (coercion of data elements)"),
    (lambda uid: Answer(202, stored_sop(uid, Comprehensive3DSRStorage), {"Warning": "299 pacs: Data set coerced"}),
     "Warning: 299 pacs: Data set coerced"),
    (lambda uid: Answer(200, stored_sop(uid, Comprehensive3DSRStorage, warning=0xB006)),
     "WarningReason 0xB006 (elements discarded)"),
], ids=["202-warning-reason", "202-warning-header", "200-warning-reason"])
def test_stored_with_a_warning_is_delivered_and_the_warning_logged(tmp_path: Path, ybr_loop: Path, dicomweb,
                                                                    answer, text: str) -> None:
    server = dicomweb()
    rep = stow_study(tmp_path, ybr_loop, server.url)
    server.script = [answer(rep.sr_uid)]
    with capture_logs() as logs:
        assert Delivery(rep.cfg, rep.journal).run() == 1
    row = rep.outbox()
    assert (row["state"], row["last_error"]) == (OutboxState.SENT, None)
    (sent,) = [e for e in logs if e["event"] == "delivery.sent"]
    assert sent["log_level"] == "warning"
    assert sent["warning"] == text
    assert sent["sr_sop_uid"] == rep.sr_uid


@pytest.mark.parametrize("answer,state,error", [
    (lambda uid: Answer(409, failed_sop(uid, 0x0110)), OutboxState.DEAD,
     "STOW-RS refused: HTTP 409 Conflict, FailureReason 0x0110 (processing failure)"),
    (lambda uid: Answer(409, failed_sop(uid, 0xC000)), OutboxState.DEAD,
     "STOW-RS refused: HTTP 409 Conflict, FailureReason 0xC000 (cannot understand)"),
    (lambda uid: Answer(409, b"", {"Content-Type": "text/plain"}), OutboxState.DEAD,
     "STOW-RS refused: HTTP 409 Conflict with no FailedSOPSequence for the SR"),
    (lambda uid: Answer(409, failed_sop(uid, 0xA700)), OutboxState.PENDING,
     "STOW-RS refused: HTTP 409 Conflict, FailureReason 0xA700 (out of resources)"),
    (lambda uid: Answer(401, b"", {"WWW-Authenticate": 'Basic realm="pacs"'}), OutboxState.DEAD,
     ("STOW-RS refused: HTTP 401 Unauthorized: authentication or authorization refused"
      " (check the destination's auth and auth_file)")),
    (lambda uid: Answer(403, b""), OutboxState.DEAD,
     ("STOW-RS refused: HTTP 403 Forbidden: authentication or authorization refused"
      " (check the destination's auth and auth_file)")),
    (lambda uid: Answer(404, b""), OutboxState.DEAD,
     "STOW-RS refused: HTTP 404 Not Found: no STOW-RS service at {url}/studies (check the destination's url)"),
    (lambda uid: Answer(301, b"", {"Location": "https://pacs/dicom-web/studies"}), OutboxState.DEAD,
     ("STOW-RS answered HTTP 301 Moved Permanently to https://pacs/dicom-web/studies: set the destination's url"
      " to the DICOMweb base URL")),
    (lambda uid: Answer(415, b""), OutboxState.DEAD, "STOW-RS refused: HTTP 415 Unsupported Media Type"),
    (lambda uid: Answer(503, b""), OutboxState.PENDING, "STOW-RS failed: HTTP 503 Service Unavailable"),
    (lambda uid: Answer(500, b"{}"), OutboxState.PENDING, "STOW-RS failed: HTTP 500 Internal Server Error"),
    (lambda uid: Answer(429, b""), OutboxState.PENDING, "STOW-RS failed: HTTP 429 Too Many Requests"),
], ids=["409-processing-failure", "409-cannot-understand", "409-no-body", "409-out-of-resources", "401", "403",
        "404", "301", "415", "503", "500", "429"])
def test_refusals_are_read_as_ps3_18_says(tmp_path: Path, ybr_loop: Path, dicomweb, answer, state: str,
                                          error: str) -> None:
    """Dead letter at once (with the reason the server gave) or retried; a retried SR then goes out, same UID."""
    server = dicomweb()
    rep = stow_study(tmp_path, ybr_loop, server.url, retry_initial_s=0.2)
    server.script = [answer(rep.sr_uid)]
    delivery = Delivery(rep.cfg, rep.journal)
    assert delivery.run() == 0
    row = rep.outbox()
    assert (row["state"], row["attempts"]) == (state, 1), row
    assert row["last_error"] == error.format(url=server.url)
    assert delivery.failures == ({"permanent": 1} if state == OutboxState.DEAD else {"transient": 1})
    if state == OutboxState.DEAD:
        time.sleep(0.3)
        assert delivery.run() == 0 and len(server.posts()) == 1  # no retry storm
        return
    wait_due(rep)
    assert delivery.run() == 1  # the server answers 200 now
    first, second = server.posts()
    assert [str(r.datasets[0].SOPInstanceUID) for r in (first, second)] == [rep.sr_uid] * 2
    assert rep.outbox()["state"] == OutboxState.SENT
    assert rep.journal.study_state(rep.study_uid) == StudyState.DELIVERED


def test_a_409_in_dicom_xml_is_read_too(tmp_path: Path, ybr_loop: Path, dicomweb) -> None:
    """PS3.18's other media type for the answer (older servers answer in XML whatever was asked)."""
    server = dicomweb()
    rep = stow_study(tmp_path, ybr_loop, server.url)
    xml = f"""<?xml version="1.0" encoding="utf-8"?>
<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">
  <DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence">
    <Item number="1">
      <DicomAttribute tag="00081150" vr="UI"><Value number="1">{Comprehensive3DSRStorage}</Value></DicomAttribute>
      <DicomAttribute tag="00081155" vr="UI"><Value number="1">{rep.sr_uid}</Value></DicomAttribute>
      <DicomAttribute tag="00081197" vr="US"><Value number="1">{0xA900}</Value></DicomAttribute>
    </Item>
  </DicomAttribute>
</NativeDicomModel>""".encode()
    server.script = [Answer(409, xml, {"Content-Type": "application/dicom+xml"})]
    assert Delivery(rep.cfg, rep.journal).run() == 0
    row = rep.outbox()
    assert row["state"] == OutboxState.DEAD
    assert row["last_error"] == "STOW-RS refused: HTTP 409 Conflict, FailureReason 0xA900 (data set does not match SOP class)"


def test_read_store_response_ignores_what_is_not_one() -> None:
    assert read_store_response(b"") is None
    assert read_store_response(b"<html>busy</html>", "text/html") is None
    assert read_store_response(b'{"HttpError": "Not Found"}', "application/json") is None
    assert read_store_response(b"not json {", "application/dicom+json") is None
    bomb = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><NativeDicomModel>'
            b'<DicomAttribute tag="00081198" vr="SQ"/></NativeDicomModel>')
    assert read_store_response(bomb, "application/dicom+xml") is None  # no entity expansion
    doc = failed_sop("1.2.3", 0x0110)
    assert read_store_response(json.dumps([doc]).encode()) == ({"1.2.3": 0x0110}, {})


def test_server_refusing_3d_gets_the_same_report_as_comprehensive_sr(tmp_path: Path, ybr_loop: Path,
                                                                     dicomweb) -> None:
    """FailureReason 0x0122 (SOP class not supported): the next class, in the same attempt, recorded."""
    server = dicomweb()
    rep = stow_study(tmp_path, ybr_loop, server.url)
    server.script = [Answer(409, failed_sop(rep.sr_uid, 0x0122))]
    with capture_logs() as logs:
        assert Delivery(rep.cfg, rep.journal).run() == 1
    derived = derived_sop_instance_uid(rep.sr_uid, ComprehensiveSRStorage)
    first, second = server.posts()
    assert (str(first.datasets[0].SOPClassUID), str(first.datasets[0].SOPInstanceUID)) == (
        Comprehensive3DSRStorage, rep.sr_uid)
    got = second.datasets[0]
    assert (str(got.SOPClassUID), str(got.SOPInstanceUID)) == (ComprehensiveSRStorage, derived)
    assert got.ContentSequence == pydicom.dcmread(rep.sr_path).ContentSequence
    row = rep.outbox()
    assert (row["state"], row["attempts"], row["sent_sop_class_uid"], row["sent_sop_uid"]) == (
        OutboxState.SENT, 1, ComprehensiveSRStorage, derived)
    (fallback,) = [e for e in logs if e["event"] == "delivery.sop_class_fallback"]
    assert fallback["next_sop_class_uid"] == ComprehensiveSRStorage


# -- a server that does not answer ------------------------------------------------------


@pytest.mark.parametrize("mode", ["stall", "trickle"])
def test_a_server_that_stalls_or_trickles_is_cut_at_timeout(tmp_path: Path, ybr_loop: Path, dicomweb,
                                                            mode: str) -> None:
    """No answer at all, or one byte every 0.2 s (each read gets its byte long before a socket timeout).

    The whole request ends at delivery.timeout_s, retried with backoff like a DIMSE destination that stalls.
    """
    server = dicomweb([Answer(mode=mode)], trickle_s=0.2)
    rep = stow_study(tmp_path, ybr_loop, server.url, timeout_s=1.0, retry_initial_s=30.0, retry_max_s=60.0)
    delivery = Delivery(rep.cfg, rep.journal)
    t0 = time.monotonic()
    assert bounded(delivery.run, 15, f"a delivery pass to a server that does {mode}") == 0
    elapsed = time.monotonic() - t0
    row = rep.outbox()
    assert (row["state"], row["attempts"]) == (OutboxState.PENDING, 1), row
    assert row["last_error"] == f"no response from {server.url} within 1 s (connection closed)"
    assert row["next_attempt"] > time.time() + 20
    assert server.stalled == 1
    assert [(lane.destination, lane.timeouts) for lane in delivery.lanes()] == [("pacs", 1)]
    assert not [t for t in threading.enumerate() if t.name.startswith("echonode-")]
    print(f"{mode}: the pass returned after {elapsed:.2f} s")


def test_a_stalled_stow_destination_holds_up_no_dimse_one(tmp_path: Path, ybr_loop: Path, dicomweb,
                                                          scps) -> None:
    """The same lanes: a STOW-RS server that never answers costs its own lane, nothing else."""
    server = dicomweb([Answer(mode="stall")])
    rep = stow_study(tmp_path, ybr_loop, server.url, timeout_s=1.0, retry_initial_s=30.0, retry_max_s=60.0)
    good = scps()
    cfg = with_destination(rep.cfg, "good", "PACS", good.port)
    (fresh,) = owe_more(rep, "good", 1, time.time() - 1)
    delivery = Delivery(cfg, rep.journal)
    assert bounded(delivery.run, 15, "a pass beside a stalled STOW-RS server") == 1
    assert len(good.received) == 1
    rows = outbox_rows(rep)
    assert rows[("good", fresh)]["state"] == OutboxState.SENT
    assert rows[("pacs", rep.sr_uid)]["last_error"].startswith(f"no response from {server.url} within 1 s")


def test_unreachable_server_is_retried(tmp_path: Path, ybr_loop: Path) -> None:
    port = free_port()  # nothing listens
    rep = stow_study(tmp_path, ybr_loop, f"http://127.0.0.1:{port}/dicom-web", retry_initial_s=0.2)
    assert Delivery(rep.cfg, rep.journal).run() == 0
    row = rep.outbox()
    assert row["state"] == OutboxState.PENDING
    assert row["last_error"].startswith(f"cannot connect to 127.0.0.1:{port}: ")


# -- auth and TLS -----------------------------------------------------------------------


def test_basic_and_bearer_auth_from_a_file(tmp_path: Path, ybr_loop: Path, dicomweb) -> None:
    """The credentials are read from the file at each attempt: a rotated token is used without a reload."""
    server = dicomweb(credentials="Bearer token-1")
    rep = reported_study(tmp_path, ybr_loop, 104, retry_initial_s=0.2)
    token = auth_file(tmp_path, "token-1")
    rep = as_stow(rep, stow_destination(server.url, auth="bearer", auth_file=token))
    assert Delivery(rep.cfg, rep.journal).run() == 1
    assert server.posts()[0].headers["authorization"] == "Bearer token-1"

    # The token is rotated (another program rewrites the file); the server wants the new one.
    server.credentials = "Bearer token-2"
    token.write_text("token-2\n")
    owe_more(rep, "pacs", 1, time.time() - 1)
    assert Delivery(rep.cfg, rep.journal).run() == 1
    assert server.posts()[-1].headers["authorization"] == "Bearer token-2"

    server.credentials = basic("echonode", "pa:ss word")
    creds = auth_file(tmp_path, "echonode:pa:ss word", "basic.auth")
    cfg = as_stow(rep, stow_destination(server.url, auth="basic", auth_file=creds)).cfg
    owe_more(rep, "pacs", 1, time.time() - 1, start=2)
    assert Delivery(cfg, rep.journal).run() == 1
    assert server.posts()[-1].headers["authorization"] == basic("echonode", "pa:ss word")


def test_credentials_file_gone_at_send_time_is_a_dead_letter_saying_so(tmp_path: Path, ybr_loop: Path,
                                                                       dicomweb) -> None:
    server = dicomweb()
    rep = reported_study(tmp_path, ybr_loop, 104)
    creds = auth_file(tmp_path, "echonode:pw")
    rep = as_stow(rep, stow_destination(server.url, auth="basic", auth_file=creds))
    creds.unlink()
    assert Delivery(rep.cfg, rep.journal).run() == 0
    row = rep.outbox()
    assert row["state"] == OutboxState.DEAD
    assert row["last_error"] == f"credentials for pacs: no such file: {creds}"
    assert server.posts() == []


def test_https_with_the_servers_ca_and_without(tmp_path: Path, ybr_loop: Path, dicomweb,
                                               self_signed: dict[str, Path]) -> None:
    """The server's certificate is checked (name included) against tls.ca_file, else the system's store."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(self_signed["cert"]), str(self_signed["key"]))
    server = dicomweb(tls=ctx)
    assert server.url.startswith("https://")
    rep = reported_study(tmp_path, ybr_loop, 104)
    untrusted = as_stow(rep, stow_destination(server.url))
    assert Delivery(untrusted.cfg, rep.journal).run() == 0
    row = rep.outbox()
    assert row["state"] == OutboxState.DEAD
    assert row["last_error"].startswith("TLS: the certificate of 127.0.0.1 is not trusted: ")
    assert row["last_error"].endswith("(check the destination's tls.ca_file)")
    rep.journal.retry_dead()
    trusted = as_stow(rep, stow_destination(server.url, ca_file=self_signed["cert"]))
    assert Delivery(trusted.cfg, rep.journal).run() == 1
    assert [str(r.datasets[0].SOPInstanceUID) for r in server.posts()] == [rep.sr_uid]


# -- echonode echo ------------------------------------------------------------------------


def test_echo_a_stow_destination(tmp_path: Path, dicomweb) -> None:
    """A QIDO-RS query for a study that cannot exist, with the destination's auth, under --timeout."""
    server = dicomweb(credentials=basic("echonode", "pw"))
    stalled = dicomweb([Answer(mode="stall")])
    good = auth_file(tmp_path, "echonode:pw", "good.auth")
    bad = auth_file(tmp_path, "echonode:nope", "bad.auth")
    cfg = make_config(tmp_path)
    cfg = dataclasses.replace(cfg, destinations=(
        stow_destination(server.url, auth="basic", auth_file=good, name="vna"),
        stow_destination(server.url, auth="basic", auth_file=bad, name="wrong"),
        stow_destination(stalled.url, name="stalled")))
    conf = write_config(cfg, tmp_path / "echonode.toml")

    res = run_cli("--config", str(conf), "echo", "vna")
    assert res.returncode == 0, res.stderr
    assert f"QIDO-RS {server.url}/studies: success (HTTP 200 OK" in res.stdout
    (get,) = [r for r in server.requests if r.method == "GET"]
    assert get.path.startswith("/dicom-web/studies?StudyInstanceUID=2.25.") and get.path.endswith("&limit=1")
    assert get.headers["authorization"] == basic("echonode", "pw")

    res = run_cli("--config", str(conf), "echo", "wrong")
    assert res.returncode == 1
    assert (f"echonode: QIDO-RS to {server.url} failed: HTTP 401 Unauthorized: authentication or authorization"
            " refused (check the destination's auth and auth_file)") in res.stderr
    assert "nope" not in res.stderr + res.stdout

    t0 = time.monotonic()
    res = run_cli("--config", str(conf), "echo", "stalled", "--timeout", "2", timeout=60)
    assert res.returncode == 1
    assert f"echonode: QIDO-RS to {stalled.url} failed: no response from {stalled.url} within 2 s" in res.stderr
    assert time.monotonic() - t0 < 30  # the CLI's start included
    assert "Traceback" not in res.stderr


# -- Orthanc with its DICOMweb plugin ---------------------------------------------------------


def test_orthanc_dicomweb_with_basic_auth(tmp_path: Path, ybr_loop: Path) -> None:
    """STOW-RS into Orthanc 1.10 (orthanc-dicomweb 1.7) with HTTP basic auth: stored once, resent once,
    a wrong password dead-lettered with the reason, fixed, `echonode retry`, stored; echo both ways."""
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), dicomweb=True, users={"echonode": "s3cret"}).start()
    try:
        rep = reported_study(tmp_path, ybr_loop, 104, retry_initial_s=0.2)
        creds = auth_file(tmp_path, "echonode:s3cret")
        rep = as_stow(rep, stow_destination(f"{orthanc.url}/dicom-web", auth="basic", auth_file=creds))
        conf = write_config(rep.cfg, tmp_path / "echonode.toml")
        res = run_cli("--config", str(conf), "echo", "pacs")
        assert res.returncode == 0, res.stderr
        assert f"QIDO-RS {orthanc.url}/dicom-web/studies: success (HTTP 200 OK" in res.stdout

        delivery = Delivery(rep.cfg, rep.journal)
        assert delivery.run() == 1
        (sr_id,) = orthanc.get("/instances")
        tags = orthanc.get(f"/instances/{sr_id}/simplified-tags")
        assert (tags["SOPInstanceUID"], tags["SOPClassUID"]) == (rep.sr_uid, Comprehensive3DSRStorage)
        assert tags["StudyInstanceUID"] == rep.study_uid
        got = tmp_path / "from-orthanc.dcm"
        got.write_bytes(orthanc.request("GET", f"/instances/{sr_id}/file"))
        assert pydicom.dcmread(got) == pydicom.dcmread(rep.sr_path)
        row = rep.outbox()
        assert (row["state"], row["sent_sop_class_uid"], row["sent_sop_uid"]) == (
            OutboxState.SENT, Comprehensive3DSRStorage, rep.sr_uid)

        # The node died after Orthanc stored it, before the row was marked: the same SR again, still one.
        pending_again(rep)
        assert Delivery(rep.cfg, rep.journal).run() == 1
        assert orthanc.get("/instances") == [sr_id]

        # A wrong password: a dead letter that says why; echo says the same.
        creds.write_text("echonode:wrong\n")
        pending_again(rep)
        assert delivery.run() == 0
        row = rep.outbox()
        assert row["state"] == OutboxState.DEAD
        assert row["last_error"] == ("STOW-RS refused: HTTP 401 Unauthorized: authentication or authorization"
                                     " refused (check the destination's auth and auth_file)")
        res = run_cli("--config", str(conf), "echo", "pacs")
        assert res.returncode == 1 and "HTTP 401 Unauthorized" in res.stderr
        creds.write_text("echonode:s3cret\n")
        res = run_cli("--config", str(conf), "retry")
        assert res.returncode == 0 and "1 dead-lettered SR delivery queued again" in res.stdout
        assert delivery.run() == 1
        assert orthanc.get("/instances") == [sr_id]
        assert rep.journal.study_state(rep.study_uid) == StudyState.DELIVERED
    finally:
        orthanc.stop()


def pending_again(rep: Reported) -> None:
    """What a kill -9 between the server's answer and the journal's commit leaves: the row pending."""
    con = sqlite3.connect(rep.cfg.journal_path)
    with con:
        con.execute("UPDATE outbox SET state = 'pending', sent_at = NULL, next_attempt = 0,"
                    " sent_sop_class_uid = NULL, sent_sop_uid = NULL")
        con.execute("UPDATE studies SET state = 'reported'")
    con.close()


# -- kill -9 of the node mid-delivery ----------------------------------------------------------


def test_kill_9_while_the_server_holds_the_answer_resends_the_same_sr(tmp_path: Path, dicomweb) -> None:
    """``echonode serve`` is SIGKILLed (node and worker) while the server holds its answer to the STOW.

    The server has the SR; the journal does not know. At the restart the row
    is pending and the same SR (same SOP Instance UID) goes again: one
    instance at the server, the study delivered.
    """

    server = dicomweb([Answer(mode="hold")])
    cfg = make_config(tmp_path, study={"stable_after_s": 0.5, "check_interval_s": 0.1},
                      models={"threads": 1},
                      delivery={"retry_initial_s": 0.3, "retry_max_s": 1.0, "check_interval_s": 0.1,
                                "timeout_s": 30.0})
    cfg = dataclasses.replace(cfg, destinations=(stow_destination(server.url),))
    tiny_bundle(cfg.models_dir, "lvh", seed=1)
    studies = make_studies(1, 2)
    study_uid = str(studies[0][0].StudyInstanceUID)
    node = ServedNode(cfg, tmp_path).start()
    try:
        assert len(send_studies(cfg.node.port, studies)) == 2
        wait_for(server.holding.is_set, timeout=120, interval=0.02, what="the STOW-RS request to be held")
        at_kill = states(cfg)
        node.kill()
        assert at_kill == {study_uid: "reported"}, at_kill
        server.release()
        t0 = time.monotonic()
        node.start()
        wait_for(lambda: states(cfg) == {study_uid: "delivered"}, timeout=120, interval=0.2,
                 what="the study delivered after the restart")
        recovered_s = time.monotonic() - t0
        time.sleep(0.5)
        uids = [str(ds.SOPInstanceUID) for ds in server.stored]
        ((sr_uid,),) = journal_rows(cfg, "SELECT sr_sop_uid FROM reports")
        assert len(uids) >= 2 and set(uids) == {sr_uid}, uids
        assert journal_rows(cfg, "SELECT state, sent_sop_uid FROM outbox") == [("sent", sr_uid)]
        print(f"STOW-RS requests: {len(uids)}, distinct SRs: {len(set(uids))};"
              f" restart to delivered: {recovered_s:.1f} s")
    finally:
        node.stop()


def test_outbox_row_of_a_stow_destination_is_retried_and_discarded_like_any(tmp_path: Path, ybr_loop: Path,
                                                                           dicomweb) -> None:
    """`echonode retry` and `echonode discard` take STOW-RS dead letters as they take DIMSE ones."""
    server = dicomweb([Answer(409, b"")])
    rep = stow_study(tmp_path, ybr_loop, server.url)
    conf = write_config(rep.cfg, tmp_path / "echonode.toml")
    delivery = Delivery(rep.cfg, rep.journal)
    assert delivery.run() == 0 and rep.outbox()["state"] == OutboxState.DEAD
    text = run_cli("--config", str(conf), "status").stdout
    assert f"{rep.study_uid} -> pacs: dead, 1 attempt(s)" in text
    assert "last error: STOW-RS refused: HTTP 409 Conflict with no FailedSOPSequence for the SR" in text
    assert run_cli("--config", str(conf), "retry", rep.study_uid).returncode == 0
    server.script = [Answer(409, b"")]
    assert delivery.run() == 0 and rep.outbox()["state"] == OutboxState.DEAD
    res = run_cli("--config", str(conf), "discard", "--destination", "pacs")
    assert res.returncode == 0, res.stderr
    assert rep.outbox()["state"] == OutboxState.DISCARDED
    assert Journal(rep.cfg.journal_path).study_state(rep.study_uid) == StudyState.UNDELIVERED


def test_config_round_trip_keeps_a_stow_destination(tmp_path: Path) -> None:
    creds = auth_file(tmp_path, "echonode:pw")
    cfg: Config = make_config(tmp_path)
    cfg = dataclasses.replace(cfg, destinations=(
        stow_destination("https://vna.example.org/dicom-web/", auth="basic", auth_file=creds, name="vna"),))
    path = write_config(cfg, tmp_path / "c.toml")
    res = run_cli("--config", str(path), "check-config")
    assert res.returncode == 0, res.stderr
