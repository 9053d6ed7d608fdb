"""Delivery of SRs to real peers over loopback.

The outbox rows come from a real worker run (:func:`echonode.analyse.worker.process_study`
with a tiny random-weight bundle on the real echo loop); the destinations are
a pynetdicom Storage SCP in the test process that records what it receives and
answers with chosen statuses, and dcmtk's ``storescp``. :meth:`Delivery.run`
is called directly so that every attempt is counted; one test runs the whole
node with its scheduler and worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
)
from structlog.testing import capture_logs

from echonode.config import TLSConfig
from echonode.delivery.dimse import Peer, echo
from echonode.delivery.outbox import Delivery
from echonode.delivery.outcome import DeliveryError
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
from tests.factories import tiny_bundle
from tests.peers import STORESCP, c_store, require_tool

# -- delivered -------------------------------------------------------------------


def test_sr_delivered_exactly_once(tmp_path: Path, ybr_loop: Path, scps) -> None:
    scp = scps()
    rep = reported_study(tmp_path, ybr_loop, scp.port)
    delivery = Delivery(rep.cfg, rep.journal)
    assert delivery.run() == 1
    (ds,) = scp.received
    assert str(ds.SOPInstanceUID) == rep.sr_uid
    assert str(ds.SOPClassUID) == Comprehensive3DSRStorage  # the default class
    assert str(ds.StudyInstanceUID) == rep.study_uid
    assert ds.Modality == "SR"
    src = pydicom.dcmread(ybr_loop, stop_before_pixels=True)
    assert ds.PatientID == src.PatientID
    row = rep.outbox()
    assert (row["state"], row["attempts"], row["last_error"]) == (OutboxState.SENT, 1, None)
    assert row["sent_at"] is not None
    # What went: the SR as written, recorded per destination.
    assert (row["sent_sop_class_uid"], row["sent_sop_uid"]) == (Comprehensive3DSRStorage, rep.sr_uid)
    assert rep.journal.study_state(rep.study_uid) == StudyState.DELIVERED
    # Nothing left to send: later runs send nothing.
    assert delivery.run() == 0
    assert delivery.run() == 0
    assert len(scp.received) == 1 and scp.requests == 1
    assert delivery.failures == {}


@contextlib.contextmanager
def dcmtk_storescp(out: Path, *options: str) -> Iterator[int]:
    """Run dcmtk's ``storescp`` (AE title PACS) writing into ``out``; yield its port once it answers C-ECHO."""
    require_tool(STORESCP)
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [STORESCP, *options, "--aetitle", "PACS", "--output-directory", str(out), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        def up() -> bool:
            try:
                return echo("ECHONODE", Peer("PACS", "127.0.0.1", port), timeout_s=2) == 0
            except DeliveryError:
                return False

        wait_for(up, timeout=10, what="storescp to listen")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def stored_files(out: Path) -> list[Path]:
    """What storescp has finished writing into ``out``."""
    return wait_for(lambda: [p for p in out.iterdir() if not p.name.endswith(".tmp")], timeout=5,
                    what="storescp to write the SR")


def test_dcmtk_storescp_as_destination(tmp_path: Path, ybr_loop: Path) -> None:
    out = tmp_path / "received"
    with dcmtk_storescp(out) as port:
        rep = reported_study(tmp_path, ybr_loop, port)
        assert Delivery(rep.cfg, rep.journal).run() == 1
        (got,) = stored_files(out)
        ds = pydicom.dcmread(got)
        assert str(ds.SOPInstanceUID) == rep.sr_uid
        assert str(ds.StudyInstanceUID) == rep.study_uid
        assert got.read_bytes().endswith(rep.sr_path.read_bytes()[-512:])
        assert rep.outbox()["state"] == OutboxState.SENT
        assert rep.journal.study_state(rep.study_uid) == StudyState.DELIVERED


def test_destination_taking_implicit_vr_only_gets_the_sr(tmp_path: Path, ybr_loop: Path) -> None:
    """dcmtk ``storescp +xi`` accepts Implicit VR Little Endian only, like many older PACS.

    The node used to propose the SR in its file's Explicit VR alone and
    dead-lettered it as 'the destination does not accept Comprehensive SR'.
    """
    out = tmp_path / "received"
    with dcmtk_storescp(out, "+xi") as port:
        rep = reported_study(tmp_path, ybr_loop, port)
        assert pydicom.dcmread(rep.sr_path).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert Delivery(rep.cfg, rep.journal).run() == 1, rep.outbox()
        (got,) = stored_files(out)
        ds = pydicom.dcmread(got)
        assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert str(ds.SOPInstanceUID) == rep.sr_uid
        sent = pydicom.dcmread(rep.sr_path)
        # The same content, re-encoded: every element the node wrote arrived.
        assert ds.ContentSequence == sent.ContentSequence
        assert (ds.PatientID, str(ds.StudyInstanceUID)) == (sent.PatientID, rep.study_uid)
        assert rep.outbox()["state"] == OutboxState.SENT
        assert rep.journal.study_state(rep.study_uid) == StudyState.DELIVERED


def test_pynetdicom_peer_gets_the_sr_as_written(tmp_path: Path, ybr_loop: Path, scps) -> None:
    """A peer that takes every uncompressed syntax receives the file's own (Explicit VR), not a re-encoding."""
    scp = scps()
    rep = reported_study(tmp_path, ybr_loop, scp.port)
    assert Delivery(rep.cfg, rep.journal).run() == 1
    (ds,) = scp.received
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


# -- transient failures: retried with backoff -------------------------------------


def test_destination_down_then_up_retries_with_backoff(tmp_path: Path, ybr_loop: Path, scps) -> None:
    port = free_port()  # nothing listens there yet
    rep = reported_study(tmp_path, ybr_loop, port, retry_initial_s=0.4, retry_max_s=5.0)
    delivery = Delivery(rep.cfg, rep.journal)

    t0 = time.time()
    assert delivery.run() == 0
    row = rep.outbox()
    assert row["state"] == OutboxState.PENDING and row["attempts"] == 1
    assert "cannot connect" in row["last_error"] and str(port) in row["last_error"]
    first_delay = row["next_attempt"] - t0
    assert 0.8 * 0.4 - 0.05 <= first_delay <= 0.4 + 0.5, first_delay
    # Not due yet: another pass makes no attempt.
    assert delivery.run() == 0
    assert rep.outbox()["attempts"] == 1

    wait_due(rep)
    t1 = time.time()
    assert delivery.run() == 0
    row = rep.outbox()
    assert row["attempts"] == 2
    second_delay = row["next_attempt"] - t1
    # Exponential: the second wait is about twice the first (jitter 0.8-1.0).
    assert 0.8 * 0.8 - 0.05 <= second_delay <= 0.8 + 0.5, second_delay
    assert delivery.failures == {"transient": 2}

    scp = scps(port)
    wait_due(rep)
    assert delivery.run() == 1
    (ds,) = scp.received
    assert str(ds.SOPInstanceUID) == rep.sr_uid
    assert rep.outbox()["state"] == OutboxState.SENT and rep.outbox()["attempts"] == 3
    assert rep.journal.study_state(rep.study_uid) == StudyState.DELIVERED
    time.sleep(0.5)
    assert delivery.run() == 0 and len(scp.received) == 1


def test_unresolvable_host_is_retried_not_blamed_on_the_file(tmp_path: Path, ybr_loop: Path, scps) -> None:
    """A name the resolver does not know is a transient delivery failure that says so.

    pynetdicom lets the resolver's error through; it used to be caught as an
    OSError reading the SR and dead-lettered as 'SR file unreadable: gaierror'.
    """
    rep = reported_study(tmp_path, ybr_loop, 104, retry_initial_s=0.2)
    host = "no-such-host.invalid"  # RFC 2606: never resolves
    cfg = dataclasses.replace(rep.cfg, destinations=(dataclasses.replace(rep.cfg.destinations[0], host=host),))
    delivery = Delivery(cfg, rep.journal)
    assert delivery.run() == 0
    row = rep.outbox()
    assert (row["state"], row["attempts"]) == (OutboxState.PENDING, 1), row
    assert row["last_error"].startswith(f"cannot resolve host {host!r}"), row["last_error"]
    assert delivery.failures == {"transient": 1}
    # The operator corrects the name; the same row goes out.
    scp = scps()
    fixed = dataclasses.replace(rep.cfg.destinations[0], host="127.0.0.1", port=scp.port)
    delivery.apply_config(dataclasses.replace(rep.cfg, destinations=(fixed,)))
    wait_due(rep)
    assert delivery.run() == 1
    assert [str(ds.SOPInstanceUID) for ds in scp.received] == [rep.sr_uid]


def test_unusable_tls_ca_file_goes_dead_saying_so(tmp_path: Path, ybr_loop: Path, scps) -> None:
    """A destination CA file that exists (the config checks that) but holds no certificate.

    It used to read as an OSError from the SR file: 'SR file unreadable: SSLError'.
    """
    scp = scps()
    rep = reported_study(tmp_path, ybr_loop, scp.port)
    ca = tmp_path / "pacs-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    dest = dataclasses.replace(rep.cfg.destinations[0], tls=TLSConfig(enabled=True, ca_file=str(ca)))
    delivery = Delivery(dataclasses.replace(rep.cfg, destinations=(dest,)), rep.journal)
    assert delivery.run() == 0
    row = rep.outbox()
    assert row["state"] == OutboxState.DEAD, row
    assert row["last_error"].startswith(f"TLS setup for 127.0.0.1:{scp.port} failed: "), row["last_error"]
    assert delivery.failures == {"permanent": 1}
    assert scp.connections == 0


@pytest.mark.parametrize("status", [0xA700, 0xA7FF])
def test_out_of_resources_is_retried(tmp_path: Path, ybr_loop: Path, scps, status: int) -> None:
    scp = scps(statuses=[status])
    rep = reported_study(tmp_path, ybr_loop, scp.port, retry_initial_s=0.2)
    delivery = Delivery(rep.cfg, rep.journal)
    assert delivery.run() == 0
    row = rep.outbox()
    assert row["state"] == OutboxState.PENDING
    assert f"0x{status:04X}" in row["last_error"]
    assert (scp.stores, len(scp.received)) == (1, 0)
    wait_due(rep)
    assert delivery.run() == 1
    assert (scp.stores, len(scp.received)) == (2, 1)
    assert str(scp.received[0].SOPInstanceUID) == rep.sr_uid
    assert rep.journal.study_state(rep.study_uid) == StudyState.DELIVERED


# -- warnings: the peer stored the SR ------------------------------------------------


@pytest.mark.parametrize("status", [0xB000, 0xB006, 0xB007, 0x0001, 0x0107, 0x0116], ids=hex)
def test_warning_status_counts_as_delivered(tmp_path: Path, ybr_loop: Path, scps, status: int) -> None:
    """A warning means the PACS stored the SR: delivered, neither retried nor dead-lettered.

    0x0107 (attribute list error) and 0x0116 (attribute value out of range)
    are warnings outside 0xBxxx; they used to dead-letter an SR the PACS held.
    """
    scp = scps(statuses=[status])
    rep = reported_study(tmp_path, ybr_loop, scp.port, retry_initial_s=0.1)
    delivery = Delivery(rep.cfg, rep.journal)
    with capture_logs() as logs:
        assert delivery.run() == 1
    row = rep.outbox()
    assert (row["state"], row["attempts"], row["last_error"]) == (OutboxState.SENT, 1, None)
    assert rep.journal.study_state(rep.study_uid) == StudyState.DELIVERED
    (sent,) = [e for e in logs if e["event"] == "delivery.sent"]
    assert (sent["status"], sent["sr_sop_uid"], sent["study_uid"]) == (f"0x{status:04X}", rep.sr_uid, rep.study_uid)
    time.sleep(0.25)
    assert delivery.run() == 0
    assert scp.stores == 1 and delivery.failures == {}


def test_max_attempts_exhausted_goes_dead(tmp_path: Path, ybr_loop: Path) -> None:
    port = free_port()
    rep = reported_study(tmp_path, ybr_loop, port, retry_initial_s=0.05, retry_max_s=0.1, max_attempts=3)
    delivery = Delivery(rep.cfg, rep.journal)

    def dead() -> bool:
        delivery.run()
        return rep.outbox()["state"] == OutboxState.DEAD

    wait_for(dead, timeout=10, interval=0.05, what="the SR to be dead-lettered")
    row = rep.outbox()
    assert row["attempts"] == 3
    assert row["last_error"].startswith("gave up after 3 attempts: cannot connect")
    assert delivery.failures == {"transient": 2, "exhausted": 1}
    assert rep.journal.study_state(rep.study_uid) == StudyState.REPORTED
    time.sleep(0.3)
    assert delivery.run() == 0 and rep.outbox()["attempts"] == 3


# -- permanent failures: dead letter at once ----------------------------------------


def test_permanent_rejection_dead_letter_status_retry(tmp_path: Path, ybr_loop: Path, scps) -> None:
    scp = scps(ae_title="PACS", require_called_aet=True)
    rep = reported_study(tmp_path, ybr_loop, scp.port, ae_title="WRONGAE", retry_initial_s=0.1)
    conf = write_config(rep.cfg, tmp_path / "echonode.toml")
    delivery = Delivery(rep.cfg, rep.journal)

    assert delivery.run() == 0
    row = rep.outbox()
    assert row["state"] == OutboxState.DEAD and row["attempts"] == 1
    assert row["last_error"] == "association rejected permanently: called AE title not recognized"
    assert delivery.failures == {"permanent": 1}
    # No retry storm: later passes leave the dead letter alone.
    for _ in range(5):
        time.sleep(0.12)
        assert delivery.run() == 0
    assert (scp.requests, scp.stores) == (1, 0)
    assert rep.journal.study_state(rep.study_uid) == StudyState.REPORTED

    text = run_cli("--config", str(conf), "status")
    assert text.returncode == 0, text.stderr
    assert "outbox: 1 not sent (1 in all)" in text.stdout
    assert f"{rep.study_uid} -> pacs: dead, 1 attempt(s); dead letter: `echonode retry`" in text.stdout
    assert "last error: association rejected permanently: called AE title not recognized" in text.stdout
    as_json = run_cli("--config", str(conf), "status", "--json")
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    (o,) = doc["outbox"]
    assert (o["state"], o["destination"], o["sr_sop_uid"]) == ("dead", "pacs", rep.sr_uid)
    assert "called AE title not recognized" in o["last_error"]
    (st,) = doc["studies"]
    assert (st["study_uid"], st["state"]) == (rep.study_uid, "reported")

    other = run_cli("--config", str(conf), "retry", "1.2.3.4.5")
    assert other.returncode == 0 and "0 dead-lettered SR deliveries queued again" in other.stdout
    assert rep.outbox()["state"] == OutboxState.DEAD
    res = run_cli("--config", str(conf), "retry", rep.study_uid)
    assert res.returncode == 0, res.stderr
    assert "1 dead-lettered SR delivery queued again" in res.stdout
    row = rep.outbox()
    assert (row["state"], row["attempts"]) == (OutboxState.PENDING, 0)

    # The operator fixes the destination's AE title; the node picks it up.
    fixed = dataclasses.replace(rep.cfg, destinations=(dataclasses.replace(rep.cfg.destinations[0], ae_title="PACS"),))
    write_config(fixed, conf)
    delivery.apply_config(fixed)
    assert delivery.run() == 1
    (ds,) = scp.received
    assert str(ds.SOPInstanceUID) == rep.sr_uid
    assert rep.outbox()["state"] == OutboxState.SENT
    assert rep.journal.study_state(rep.study_uid) == StudyState.DELIVERED
    doc = json.loads(run_cli("--config", str(conf), "status", "--json").stdout)
    assert doc["studies"][0]["state"] == "delivered" and doc["outbox"][0]["state"] == "sent"


@pytest.mark.parametrize("status", [0xC000, 0xA900, 0x0122])
def test_refusal_goes_dead_without_retry(tmp_path: Path, ybr_loop: Path, scps, status: int) -> None:
    scp = scps(statuses=[status])
    rep = reported_study(tmp_path, ybr_loop, scp.port, retry_initial_s=0.1)
    delivery = Delivery(rep.cfg, rep.journal)
    assert delivery.run() == 0
    row = rep.outbox()
    assert row["state"] == OutboxState.DEAD and row["attempts"] == 1
    assert row["last_error"] == f"C-STORE refused with status 0x{status:04X}"
    time.sleep(0.25)
    assert delivery.run() == 0
    assert (scp.stores, scp.requests, len(scp.received)) == (1, 1, 0)


def test_destination_taking_big_endian_only_goes_dead_saying_why(tmp_path: Path, ybr_loop: Path, scps) -> None:
    """Explicit VR Big Endian (retired) only: dead letter naming the transfer syntax, not the SOP classes."""
    scp = scps(syntaxes=[ExplicitVRBigEndian])
    rep = reported_study(tmp_path, ybr_loop, scp.port, retry_initial_s=0.1)
    delivery = Delivery(rep.cfg, rep.journal)
    assert delivery.run() == 0
    row = rep.outbox()
    assert row["state"] == OutboxState.DEAD, row
    assert row["last_error"] == (
        f"the destination accepts Comprehensive 3D SR Storage ({Comprehensive3DSRStorage}), Comprehensive SR"
        f" Storage ({ComprehensiveSRStorage}), Enhanced SR Storage ({EnhancedSRStorage}) in none of the"
        " transfer syntaxes offered (Explicit VR Little Endian, Implicit VR Little Endian)")
    assert delivery.failures == {"permanent": 1}
    assert (scp.requests, scp.stores) == (1, 0)


def test_destination_without_sr_storage_goes_dead(tmp_path: Path, ybr_loop: Path, scps) -> None:
    scp = scps(sr=False)  # Verification only
    rep = reported_study(tmp_path, ybr_loop, scp.port, retry_initial_s=0.1)
    delivery = Delivery(rep.cfg, rep.journal)
    assert delivery.run() == 0
    row = rep.outbox()
    assert row["state"] == OutboxState.DEAD, row
    assert "does not accept" in row["last_error"]
    time.sleep(0.25)
    assert delivery.run() == 0
    assert (scp.requests, scp.stores) == (1, 0)


# -- the SR class: Comprehensive 3D SR, else the same report in a class the PACS takes ----


@pytest.mark.parametrize("accepts,expected", [
    ((ComprehensiveSRStorage, EnhancedSRStorage), ComprehensiveSRStorage),
    ((EnhancedSRStorage,), EnhancedSRStorage),
], ids=["comprehensive-and-enhanced", "enhanced-only"])
def test_destination_refusing_3d_gets_the_same_report_in_a_class_it_takes(
        tmp_path: Path, ybr_loop: Path, scps, accepts: tuple[str, ...], expected: str) -> None:
    """A PACS whose list of storage classes predates Comprehensive 3D SR.

    It refused the default class at association, and the SR went to the dead
    letter ("the destination does not accept ..."). Now every SR class is
    proposed, the best one it accepts is sent, under a SOP Instance UID
    derived from the SR's (a resend after a crash is the same instance), and
    the outbox row records what was sent.
    """
    scp = scps(sr_classes=accepts, statuses=[0x0000, 0x0111])
    rep = reported_study(tmp_path, ybr_loop, scp.port)
    written = rep.sr_path.read_bytes()
    with capture_logs() as logs:
        assert Delivery(rep.cfg, rep.journal).run() == 1, rep.outbox()
    derived = derived_sop_instance_uid(rep.sr_uid, expected)
    (ds,) = scp.received
    assert (str(ds.SOPClassUID), str(ds.SOPInstanceUID)) == (expected, derived)
    assert ds.file_meta.MediaStorageSOPInstanceUID == derived
    original = pydicom.dcmread(rep.sr_path)
    assert ds.ContentSequence == original.ContentSequence  # the same report
    assert (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)) == (rep.study_uid, str(original.SeriesInstanceUID))
    assert rep.sr_path.read_bytes() == written  # the file as written stays the record
    row = rep.outbox()
    assert (row["state"], row["sent_sop_class_uid"], row["sent_sop_uid"]) == (OutboxState.SENT, expected, derived)
    (fallback,) = [e for e in logs if e["event"] == "delivery.sop_class_fallback"]
    assert (fallback["sop_class_uid"], fallback["next_sop_class_uid"]) == (Comprehensive3DSRStorage, expected)
    (sent,) = [e for e in logs if e["event"] == "delivery.sent"]
    assert (sent["sent_sop_class_uid"], sent["sent_sop_uid"]) == (expected, derived)
    conf = write_config(rep.cfg, tmp_path / "echonode.toml")
    doc = json.loads(run_cli("--config", str(conf), "status", "--json").stdout)
    (o,) = doc["outbox"]
    assert (o["sr_sop_uid"], o["sent_sop_class_uid"], o["sent_sop_uid"]) == (rep.sr_uid, expected, derived)

    # The node died before the row was marked sent: the resend is the same instance.
    con = sqlite3.connect(rep.cfg.journal_path)
    with con:
        con.execute("UPDATE outbox SET state = 'pending', sent_at = NULL, next_attempt = 0,"
                    " sent_sop_class_uid = NULL, sent_sop_uid = NULL")
        con.execute("UPDATE studies SET state = 'reported'")
    con.close()
    journal = Journal(rep.cfg.journal_path)
    assert Delivery(rep.cfg, journal).run() == 1
    assert scp.stores == 2
    first, second = scp.received  # the second answered 0x0111: already there
    assert str(second.SOPInstanceUID) == derived and first == second
    assert journal.status()["outbox"][0]["sent_sop_uid"] == derived


def test_dcmtk_storescp_refusing_3d_stores_a_valid_comprehensive_sr(tmp_path: Path, ybr_loop: Path) -> None:
    """dcmtk's storescp with an association profile that lists Comprehensive and Enhanced SR, not 3D.

    The SR it stores is Comprehensive SR under the derived UID, and dciodvfy
    finds no error in it (the conversion is a valid instance of its class).
    """
    from tests.report_support import dciodvfy

    profile = tmp_path / "no3d.cfg"
    profile.write_text(
        "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LocalEndianExplicit\n"
        "TransferSyntax2 = LittleEndianImplicit\n"
        "[[PresentationContexts]]\n[OlderSR]\nPresentationContext1 = VerificationSOPClass\\Uncompressed\n"
        "PresentationContext2 = ComprehensiveSRStorage\\Uncompressed\n"
        "PresentationContext3 = EnhancedSRStorage\\Uncompressed\n"
        "[[Profiles]]\n[OlderSR]\nPresentationContexts = OlderSR\n")
    out = tmp_path / "received"
    with dcmtk_storescp(out, "-xf", str(profile), "OlderSR") as port:
        rep = reported_study(tmp_path, ybr_loop, port)
        assert Delivery(rep.cfg, rep.journal).run() == 1, rep.outbox()
        (got,) = stored_files(out)
    ds = pydicom.dcmread(got)
    derived = derived_sop_instance_uid(rep.sr_uid, ComprehensiveSRStorage)
    assert (str(ds.SOPClassUID), str(ds.SOPInstanceUID)) == (ComprehensiveSRStorage, derived)
    assert str(ds.StudyInstanceUID) == rep.study_uid
    row = rep.outbox()
    assert (row["state"], row["sent_sop_class_uid"], row["sent_sop_uid"]) == (
        OutboxState.SENT, ComprehensiveSRStorage, derived)
    dciodvfy(got)


# -- exactly once across a crash -------------------------------------------------------


def test_resend_after_crash_sends_the_same_sr(tmp_path: Path, ybr_loop: Path, scps) -> None:
    # The second time round the peer says it already has the instance (0x0111).
    scp = scps(statuses=[0x0000, 0x0111])
    rep = reported_study(tmp_path, ybr_loop, scp.port)
    assert Delivery(rep.cfg, rep.journal).run() == 1
    sr_bytes = rep.sr_path.read_bytes()

    # The node died after the peer stored the SR but before the row was marked
    # sent: on restart the row is pending again.
    con = sqlite3.connect(rep.cfg.journal_path)
    with con:
        con.execute("UPDATE outbox SET state = 'pending', sent_at = NULL, next_attempt = 0")
        con.execute("UPDATE studies SET state = 'reported'")
    con.close()
    journal = Journal(rep.cfg.journal_path)
    assert Delivery(rep.cfg, journal).run() == 1
    first, second = scp.received
    assert str(first.SOPInstanceUID) == str(second.SOPInstanceUID) == rep.sr_uid
    assert str(first.SeriesInstanceUID) == str(second.SeriesInstanceUID)
    assert first == second
    assert rep.sr_path.read_bytes() == sr_bytes
    assert len(list(rep.sr_path.parent.iterdir())) == 1
    assert journal.status()["outbox"][0]["state"] == "sent"
    assert journal.study_state(rep.study_uid) == StudyState.DELIVERED


# -- echonode echo -----------------------------------------------------------------------


def test_echo_cli(tmp_path: Path, scps) -> None:
    scp = scps()
    strict = scps(ae_title="STRICT", require_called_aet=True)
    down = free_port()
    cfg = with_destination(make_config(tmp_path), "pacs", "PACS", scp.port)
    cfg = with_destination(cfg, "offline", "PACS", down)
    conf = write_config(cfg, tmp_path / "echonode.toml")

    res = run_cli("--config", str(conf), "echo", "pacs")
    assert res.returncode == 0, res.stderr
    assert f"C-ECHO PACS@127.0.0.1:{scp.port}: success" in res.stdout

    res = run_cli("--config", str(conf), "echo", f"ANYAE@127.0.0.1:{scp.port}")
    assert res.returncode == 0, res.stderr
    assert f"C-ECHO ANYAE@127.0.0.1:{scp.port}: success" in res.stdout

    res = run_cli("--config", str(conf), "echo", "offline", "--timeout", "3")
    assert res.returncode == 1
    assert f"echonode: C-ECHO to PACS@127.0.0.1:{down} failed: cannot connect to 127.0.0.1:{down}" in res.stderr
    assert "Traceback" not in res.stderr

    res = run_cli("--config", str(conf), "echo", f"WRONG@127.0.0.1:{strict.port}", "--timeout", "3")
    assert res.returncode == 1
    assert "association rejected permanently: called AE title not recognized" in res.stderr

    res = run_cli("--config", str(conf), "echo", "nosuch")
    assert res.returncode == 2
    assert "unknown destination 'nosuch'" in res.stderr and "pacs, offline" in res.stderr
    assert "Traceback" not in res.stderr


def test_peer_parse(tmp_path: Path) -> None:
    cfg = with_destination(make_config(tmp_path), "pacs", "PACS", 104, host="10.0.0.9")
    assert Peer.parse("pacs", cfg) == Peer("PACS", "10.0.0.9", 104)
    assert Peer.parse("ORTHANC@127.0.0.1:4242", cfg) == Peer("ORTHANC", "127.0.0.1", 4242)
    assert Peer.parse("AE@[::1]:104", cfg) == Peer("AE", "::1", 104)
    for bad in ("nosuch", "AE@host", "@host:104", "WAYTOOLONGAETITLE17@h:104"):
        with pytest.raises(ValueError, match="unknown destination"):
            Peer.parse(bad, cfg)


# -- the whole node ---------------------------------------------------------------------


def test_node_delivers_through_its_scheduler(tmp_path: Path, ybr_loop: Path, scps) -> None:
    from echonode.daemon.node import Node

    port = free_port()  # the destination is down when the SR is ready
    cfg = make_config(tmp_path, study={"stable_after_s": 0.5, "check_interval_s": 0.2},
                      delivery={"retry_initial_s": 0.3, "retry_max_s": 1.0, "check_interval_s": 0.1})
    cfg = with_destination(cfg, "pacs", "PACS", port)
    tiny_bundle(cfg.models_dir, "lvh", seed=1)
    node = Node(cfg)
    node.start()
    try:
        src = pydicom.dcmread(ybr_loop)
        assert c_store(node.scp.port, [src]) == [0]
        study = str(src.StudyInstanceUID)

        def retried() -> bool:
            node.worker.supervise()
            rows = node.journal.status()["outbox"]
            return bool(rows) and rows[0]["attempts"] >= 2

        wait_for(retried, timeout=60, what="the SR to be reported and its delivery retried")
        assert node.journal.study_state(study) == StudyState.REPORTED
        scp = scps(port)
        wait_for(lambda: node.journal.study_state(study) == StudyState.DELIVERED, timeout=20,
                 what="the study to be delivered")
        (ds,) = scp.received
        report = node.journal.latest_report(study)
        assert str(ds.SOPInstanceUID) == report.sr_sop_uid
        assert str(ds.StudyInstanceUID) == study
        time.sleep(0.5)
        assert len(scp.received) == 1
    finally:
        node.stop()


def test_a_silent_destination_does_not_hold_up_the_others(tmp_path: Path, ybr_loop: Path, scps) -> None:
    """A PACS that accepts TCP but never answers costs one timeout per pass, not one per SR."""
    import socket

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)  # accepts connections in the kernel, never answers
    try:
        rep = reported_study(tmp_path, ybr_loop, hole.getsockname()[1], timeout_s=1.0)
        good = scps()
        cfg = with_destination(rep.cfg, "good", "PACS", good.port)
        now = time.time() - 10  # all due; the good row sorts last
        con = sqlite3.connect(rep.journal.path)
        with con:
            for i in range(3):  # three more SRs owed to the silent PACS
                uid = f"{rep.sr_uid}.{i + 1}"
                con.execute(
                    "INSERT INTO reports (sr_sop_uid, study_uid, model_set, series_uid, sop_class_uid, path, created)"
                    " VALUES (?, ?, ?, '1.2.3', '1.2.840.10008.5.1.4.1.1.88.33', ?, ?)",
                    (uid, rep.study_uid, f"set{i}", str(rep.sr_path), now),
                )
                con.execute(
                    "INSERT INTO outbox (sr_sop_uid, study_uid, destination, state, next_attempt, created)"
                    " VALUES (?, ?, 'pacs', 'pending', ?, ?)", (uid, rep.study_uid, now, now))
            con.execute(
                "INSERT INTO outbox (sr_sop_uid, study_uid, destination, state, next_attempt, created)"
                " VALUES (?, ?, 'good', 'pending', ?, ?)", (rep.sr_uid, rep.study_uid, now + 0.001, now))
        con.close()
        delivery = Delivery(cfg, rep.journal)
        t0 = time.monotonic()
        assert delivery.run() == 1
        elapsed = time.monotonic() - t0
        assert good.stores == 1
        rows = {(r["destination"], r["sr_sop_uid"]): r for r in rep.journal.status()["outbox"]}
        tried = [r for (d, _), r in rows.items() if d == "pacs" and r["attempts"] > 0]
        assert len(tried) == 1, "only one SR per pass goes to a destination that failed"
        assert elapsed < 3 * cfg.delivery.timeout_s
    finally:
        hole.close()


def test_a_backlog_for_a_down_destination_does_not_starve_the_others(tmp_path: Path, ybr_loop: Path,
                                                                      scps) -> None:
    """A PACS down for a weekend owes hundreds of SRs, all due before anything new.

    A pass used to read the 32 rows due first; with the down PACS resting
    after one failure, the other 31 were skipped and the healthy
    destination's SR, due later, was not even read: it waited one pass per
    backlog row (a silent PACS costs timeout_s a pass, so hours).
    """
    down = free_port()  # nothing listens: connection refused
    rep = reported_study(tmp_path, ybr_loop, down, retry_initial_s=60.0, retry_max_s=600.0)
    good = scps()
    cfg = with_destination(rep.cfg, "good", "PACS", good.port)
    now = time.time()
    owe_more(rep, "pacs", 40, now - 100)  # the backlog, due first
    (fresh,) = owe_more(rep, "good", 1, now - 1)
    delivery = Delivery(cfg, rep.journal)
    assert delivery.run() == 1
    assert [str(ds.SOPInstanceUID) for ds in good.received] == [rep.sr_uid]  # the file it names
    rows = {(r["destination"], r["sr_sop_uid"]): r for r in rep.journal.status()["outbox"]}
    assert rows[("good", fresh)]["state"] == OutboxState.SENT
    # Still one attempt per pass for the destination that is down.
    assert sum(r["attempts"] for (d, _), r in rows.items() if d == "pacs") == 1
    assert delivery.failures == {"transient": 1}


def test_an_unreadable_sr_file_does_not_block_the_queue(tmp_path: Path, ybr_loop: Path, scps) -> None:
    good = scps()
    rep = reported_study(tmp_path, ybr_loop, good.port)
    # A second SR row whose file is garbage, due first.
    bad = rep.sr_path.with_name("bad.dcm")
    bad.write_bytes(b"not dicom at all")
    now = time.time() - 10
    con = sqlite3.connect(rep.journal.path)
    with con:
        con.execute(
            "INSERT INTO reports (sr_sop_uid, study_uid, model_set, series_uid, sop_class_uid, path, created)"
            " VALUES ('1.2.3.999', ?, 'other', '1.2.3', '1.2.840.10008.5.1.4.1.1.88.33', ?, ?)",
            (rep.study_uid, str(bad), now))
        con.execute(
            "INSERT INTO outbox (sr_sop_uid, study_uid, destination, state, next_attempt, created)"
            " VALUES ('1.2.3.999', ?, 'pacs', 'pending', ?, ?)", (rep.study_uid, now, now))
    con.close()
    assert Delivery(rep.cfg, rep.journal).run() == 1
    rows = {r["sr_sop_uid"]: r for r in rep.journal.status()["outbox"]}
    assert rows["1.2.3.999"]["state"] == OutboxState.DEAD
    assert "unreadable" in rows["1.2.3.999"]["last_error"]
    assert rows[rep.sr_uid]["state"] == OutboxState.SENT


def test_an_unexpected_error_is_retried_not_fatal(tmp_path: Path, ybr_loop: Path, scps, monkeypatch) -> None:
    import echonode.delivery.outbox as delivery_mod

    good = scps()
    rep = reported_study(tmp_path, ybr_loop, good.port, max_attempts=2)

    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(delivery_mod, "store_file", boom)
    delivery = Delivery(rep.cfg, rep.journal)
    assert delivery.run() == 0
    row = rep.outbox()
    assert row["state"] == OutboxState.PENDING and row["last_error"] == "unexpected error: RuntimeError"
    wait_due(rep)
    delivery.run()
    row = rep.outbox()
    assert row["state"] == OutboxState.DEAD  # max_attempts reached, as for any transient failure
    assert row["last_error"] == "gave up after 2 attempts: unexpected error: RuntimeError"
    assert delivery.failures["unexpected"] == 2


# -- a destination that stops in the middle of an answer ------------------------------


@pytest.fixture
def fake_pacs() -> Iterator:
    """Start misbehaving raw-socket peers (:mod:`tests.fake_pacs`); all are stopped at the end."""
    from tests.fake_pacs import FakePACS

    started: list[FakePACS] = []

    def start(mode: str = "stall_reply", **kwargs) -> FakePACS:
        peer = FakePACS(mode, **kwargs).start()
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.stop()


def due_first(rep: Reported, destination: str) -> None:
    """Make ``destination``'s rows the longest due, so that a serial pass would try them first."""
    con = sqlite3.connect(rep.journal.path)
    with con:
        con.execute("UPDATE outbox SET next_attempt = ? WHERE destination = ?", (time.time() - 1000, destination))
    con.close()


def test_a_destination_stuck_mid_answer_is_cut_at_timeout_and_holds_up_no_other(
        tmp_path: Path, ybr_loop: Path, scps, fake_pacs) -> None:
    """A PACS that sends half of its C-STORE answer and goes silent, the socket left open.

    pynetdicom's reader thread waited for the rest of the PDU for ever on a
    blocking socket; none of delivery.timeout_s applied, and the pass (and
    every later one) never came back, so the healthy destination never got
    its SR. Now the deadline cuts the association from outside at timeout_s.
    """
    stuck = fake_pacs("stall_reply")
    rep = reported_study(tmp_path, ybr_loop, stuck.port, timeout_s=1.0, retry_initial_s=30.0, retry_max_s=60.0)
    good = scps()
    cfg = with_destination(rep.cfg, "good", "PACS", good.port)
    (fresh,) = owe_more(rep, "good", 1, time.time() - 1)
    due_first(rep, "pacs")
    delivery = Delivery(cfg, rep.journal)
    assert bounded(delivery.run, 15, "a delivery pass beside a stalled destination") == 1
    assert [str(ds.SOPInstanceUID) for ds in good.received] == [rep.sr_uid]
    rows = outbox_rows(rep)
    assert rows[("good", fresh)]["state"] == OutboxState.SENT
    row = rows[("pacs", rep.sr_uid)]
    assert (row["state"], row["attempts"]) == (OutboxState.PENDING, 1), row
    assert row["last_error"] == f"no response from PACS@127.0.0.1:{stuck.port} within 1 s (association aborted)"
    assert row["next_attempt"] > time.time() + 20  # backed off like any transient failure
    assert stuck.stalled == 1
    assert delivery.failures == {"transient": 1}
    assert [(lane.destination, lane.in_flight, lane.timeouts) for lane in delivery.lanes()] == [
        ("good", False, 0), ("pacs", False, 1)]
    assert not [t for t in threading.enumerate() if t.name.startswith("echonode-")]


def test_a_read_that_never_returns_holds_only_its_own_lane(tmp_path: Path, ybr_loop: Path, scps,
                                                           monkeypatch) -> None:
    """Even an attempt that nothing can end (a read the deadline cannot reach) blocks only its destination.

    The stuck destination's attempt here blocks in a read of its own, out of
    the deadline's reach. The other destination keeps getting its SRs pass
    after pass, the metrics show the lane stuck, stop() returns within its
    grace, and the abandoned row is left pending with no attempt counted: a
    later start sends the same SR (same SOP Instance UID), once.
    """
    import socket

    import echonode.delivery.outbox as delivery_mod

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(4)  # the kernel accepts; nobody ever answers
    hole_port = hole.getsockname()[1]
    real_store_file = delivery_mod.store_file
    blocked: list[socket.socket] = []

    def store_file(local_ae_title, peer, path, timeout_s=30.0, deadline=None):
        if peer.port != hole_port:
            return real_store_file(local_ae_title, peer, path, timeout_s, deadline=deadline)
        conn = socket.create_connection(("127.0.0.1", hole_port))
        blocked.append(conn)
        conn.recv(1)  # until the test closes the hole: the peer resets the connection
        raise DeliveryError("connection reset", permanent=False)

    monkeypatch.setattr(delivery_mod, "store_file", store_file)
    rep = reported_study(tmp_path, ybr_loop, hole_port, timeout_s=0.5, retry_initial_s=0.2)
    good = scps()
    cfg = with_destination(rep.cfg, "good", "PACS", good.port)
    due_first(rep, "pacs")
    delivery = Delivery(cfg, rep.journal)
    delivery.STUCK_AFTER_S = 0.5
    try:
        sent: list[str] = []
        for i in range(3):
            (uid,) = owe_more(rep, "good", 1, time.time() - 1, start=i + 1)
            assert bounded(delivery.run, 10, f"pass {i + 1} beside a lane blocked for good") == 1
            sent.append(uid)
        assert len(good.received) == 3
        assert all(outbox_rows(rep)[("good", uid)]["state"] == OutboxState.SENT for uid in sent)
        (stuck,) = [lane for lane in delivery.lanes() if lane.destination == "pacs"]
        assert stuck.in_flight and stuck.stuck and stuck.attempt_s > 1.0, stuck
        from echonode.ops.prometheus import delivery_families

        text = "\n".join(f"{fam.name} {s.labels} {s.value}" for fam in delivery_families(delivery)
                         for s in fam.samples)
        assert "echonode_delivery_stuck {'destination': 'pacs'} 1" in text, text
        assert "echonode_delivery_stuck {'destination': 'good'} 0" in text, text
        assert "echonode_delivery_in_flight {'destination': 'pacs'} 1" in text, text

        with capture_logs() as logs:
            t0 = time.monotonic()
            abandoned = bounded(lambda: delivery.stop(grace_s=0.5), 10, "Delivery.stop")
            stop_s = time.monotonic() - t0
        assert abandoned == ["pacs"]
        assert stop_s < 0.5 + delivery.CUT_GRACE_S + 2, stop_s
        assert any(e["event"] == "delivery.abandoned" and e["destination"] == "pacs" for e in logs), logs
        row = outbox_rows(rep)[("pacs", rep.sr_uid)]
        assert (row["state"], row["attempts"], row["last_error"]) == (OutboxState.PENDING, 0, None), row
        assert delivery.dispatch() == []  # stopped: nothing new starts
    finally:
        hole.close()  # resets the blocked connection: the abandoned thread comes back
        for lane_thread in [t for t in threading.enumerate() if t.name == "echonode-delivery-pacs"]:
            lane_thread.join(10)
            assert not lane_thread.is_alive()
        for conn in blocked:
            conn.close()
    # Back from its read after the stop, the attempt wrote nothing.
    row = outbox_rows(rep)[("pacs", rep.sr_uid)]
    assert (row["state"], row["attempts"]) == (OutboxState.PENDING, 0), row

    # The next start: the destination answers now, and gets the SR it was owed, under the same UID.
    monkeypatch.setattr(delivery_mod, "store_file", real_store_file)
    pacs = scps()
    fixed = dataclasses.replace(cfg, destinations=tuple(
        dataclasses.replace(d, port=pacs.port) if d.name == "pacs" else d for d in cfg.destinations))
    assert Delivery(fixed, Journal(rep.cfg.journal_path)).run() == 1
    assert [str(ds.SOPInstanceUID) for ds in pacs.received] == [rep.sr_uid]
    assert outbox_rows(rep)[("pacs", rep.sr_uid)]["state"] == OutboxState.SENT


def test_node_keeps_delivering_beside_a_destination_stuck_mid_answer(tmp_path: Path, ybr_loop: Path,
                                                                      scps, fake_pacs) -> None:
    """The running node, its scheduler and a real stall: the healthy PACS gets every SR, stop is bounded.

    The scheduler's delivery job used to sit in the stalled pass for ever
    (max_instances=1 skipped every later run) and SIGTERM waited on it.
    """
    from echonode.daemon.node import Node

    stuck = fake_pacs("stall_reply")
    rep = reported_study(tmp_path, ybr_loop, stuck.port, timeout_s=0.5, retry_initial_s=0.2, retry_max_s=0.4,
                         check_interval_s=0.1)
    good = scps()
    cfg = with_destination(rep.cfg, "good", "PACS", good.port)
    (first,) = owe_more(rep, "good", 1, time.time())
    due_first(rep, "pacs")
    node = Node(cfg, start_worker=False)
    t0 = time.monotonic()
    node.start()
    try:
        wait_for(lambda: good.received, timeout=10, what="the healthy destination's SR")
        first_s = time.monotonic() - t0
        more = owe_more(rep, "good", 2, time.time(), start=2)
        wait_for(lambda: len(good.received) == 3, timeout=10, what="the healthy destination's later SRs")
        wait_for(lambda: stuck.stalled >= 3, timeout=15, what="the stalled destination to be tried again")
        row = outbox_rows(rep)[("pacs", rep.sr_uid)]
        assert row["state"] == OutboxState.PENDING and row["attempts"] >= 2, row
        assert row["last_error"] == f"no response from PACS@127.0.0.1:{stuck.port} within 0.5 s (association aborted)"
        assert all(outbox_rows(rep)[("good", uid)]["state"] == OutboxState.SENT for uid in [first, *more])
    finally:
        t1 = time.monotonic()
        bounded(node.stop, 20, "Node.stop beside a stalled destination")
        stop_s = time.monotonic() - t1
    print(f"healthy SR after {first_s:.2f} s; stop took {stop_s:.2f} s")
    assert stop_s < Delivery.STOP_GRACE_S + Delivery.CUT_GRACE_S + 5
    assert outbox_rows(rep)[("pacs", rep.sr_uid)]["state"] == OutboxState.PENDING


@pytest.mark.parametrize("result,source,reason,text", [
    (1, 3, 1, "temporary congestion"),
    (1, 3, 2, "local limit exceeded"),
])
def test_permanent_rejection_with_a_temporary_reason_is_retried(
        tmp_path: Path, ybr_loop: Path, fake_pacs, scps, result: int, source: int, reason: int, text: str) -> None:
    """PS3.8 9.3.4: congestion and local limits are temporary, whatever result code the PACS sends with them.

    An A-ASSOCIATE-RJ 'rejected-permanent, presentation provider, local limit
    exceeded' (a PACS at its association limit) used to dead-letter the SR.
    """
    busy = fake_pacs("reject", reject=(result, source, reason))
    rep = reported_study(tmp_path, ybr_loop, busy.port, retry_initial_s=0.2)
    delivery = Delivery(rep.cfg, rep.journal)
    with capture_logs() as logs:
        assert delivery.run() == 0
    row = rep.outbox()
    assert (row["state"], row["attempts"]) == (OutboxState.PENDING, 1), row
    assert row["last_error"] == (f"association rejected: {text} (sent as rejected-permanent, source {source}"
                                 f" reason {reason}; retried, the reason is temporary)")
    (retry,) = [e for e in logs if e["event"] == "delivery.retry"]
    assert retry["error"] == row["last_error"]
    assert delivery.failures == {"transient": 1}
    # The PACS has room again: the same SR goes out.
    scp = scps()
    fixed = dataclasses.replace(rep.cfg.destinations[0], port=scp.port)
    delivery.apply_config(dataclasses.replace(rep.cfg, destinations=(fixed,)))
    wait_due(rep)
    assert delivery.run() == 1
    assert [str(ds.SOPInstanceUID) for ds in scp.received] == [rep.sr_uid]


@pytest.mark.parametrize("result,source,reason,permanent,text", [
    (1, 1, 3, True, "association rejected permanently: calling AE title not recognized"),
    (1, 2, 2, True, "association rejected permanently: protocol version not supported"),
    (2, 3, 2, False, "association rejected transiently: local limit exceeded"),
])
def test_other_rejections_keep_their_kind(tmp_path: Path, ybr_loop: Path, fake_pacs, result: int, source: int,
                                          reason: int, permanent: bool, text: str) -> None:
    peer = fake_pacs("reject", reject=(result, source, reason))
    rep = reported_study(tmp_path, ybr_loop, peer.port, retry_initial_s=0.2)
    assert Delivery(rep.cfg, rep.journal).run() == 0
    row = rep.outbox()
    assert row["state"] == (OutboxState.DEAD if permanent else OutboxState.PENDING), row
    assert row["last_error"] == text


@pytest.mark.parametrize("mode", ["stall_reply", "stall_accept"])
def test_echo_to_a_peer_stuck_mid_answer_fails_within_the_timeout(tmp_path: Path, fake_pacs, mode: str) -> None:
    """``echonode echo`` against a peer that sends half a PDU (of the C-ECHO answer, or of the A-ASSOCIATE-AC).

    It used to wait for the rest of the PDU for ever, whatever --timeout said.
    """
    peer = fake_pacs(mode)
    conf = write_config(make_config(tmp_path), tmp_path / "echonode.toml")
    t0 = time.monotonic()
    res = run_cli("--config", str(conf), "echo", f"PACS@127.0.0.1:{peer.port}", "--timeout", "2", timeout=60)
    elapsed = time.monotonic() - t0
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert (f"echonode: C-ECHO to PACS@127.0.0.1:{peer.port} failed: no response from PACS@127.0.0.1:{peer.port}"
            " within 2 s (association aborted)") in res.stderr
    assert "Traceback" not in res.stderr
    assert peer.stalled == 1
    assert elapsed < 30, elapsed  # the CLI's own start included


def test_echo_returns_within_its_timeout_in_process(fake_pacs) -> None:
    """The library call behind ``echonode echo``: a DeliveryError, not a hang, and no thread left behind."""
    peer = fake_pacs("stall_reply")
    with pytest.raises(DeliveryError, match=r"within 1 s \(association aborted\)") as info:
        bounded(lambda: echo("ECHONODE", Peer("PACS", "127.0.0.1", peer.port), timeout_s=1.0), 15, "echo")
    assert not info.value.permanent
    wait_for(lambda: not [t for t in threading.enumerate() if t.name == "echonode-association-deadline"],
             timeout=5, what="the deadline thread to end")


def test_a_tls_destination_stuck_mid_answer_is_cut_at_timeout(tmp_path: Path, ybr_loop: Path, fake_pacs,
                                                              self_signed: dict[str, Path]) -> None:
    """The deadline shuts a TLS association down too (the read blocks inside the TLS layer)."""
    import ssl

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(self_signed["cert"]), str(self_signed["key"]))
    stuck = fake_pacs("stall_reply", tls=server)
    rep = reported_study(tmp_path, ybr_loop, stuck.port, timeout_s=1.0, retry_initial_s=30.0, retry_max_s=60.0)
    dest = dataclasses.replace(rep.cfg.destinations[0], tls=TLSConfig(enabled=True, ca_file=str(self_signed["cert"])))
    delivery = Delivery(dataclasses.replace(rep.cfg, destinations=(dest,)), rep.journal)
    assert bounded(delivery.run, 15, "a delivery pass to a stalled TLS destination") == 0
    assert stuck.stalled == 1  # the handshake and the association went through; the answer stopped halfway
    row = rep.outbox()
    assert (row["state"], row["attempts"]) == (OutboxState.PENDING, 1), row
    assert row["last_error"] == f"no response from PACS@127.0.0.1:{stuck.port} within 1 s (association aborted)"
