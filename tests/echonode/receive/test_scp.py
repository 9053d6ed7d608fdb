"""The SCP against real peers over loopback: pynetdicom, dcmtk, TLS, access control."""

from __future__ import annotations

import dataclasses
import ssl
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pynetdicom import build_context
from pynetdicom.sop_class import UltrasoundMultiFrameImageStorage, Verification  # type: ignore[attr-defined]
from structlog.testing import capture_logs

from echonode.config import TLSConfig
from echonode.daemon.node import Node
from echonode.studies.states import StudyState
from tests.conftest import make_config, wait_for
from tests.factories import us_multiframe, write
from tests.peers import ECHOSCU, STORESCU, c_store, require_tool, scu


def pixel_fragments(path: Path) -> list[bytes]:
    ds = pydicom.dcmread(path)
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


def test_real_echo_loops_stored_byte_for_byte(running_node: Node, sonosite_loop: Path, ybr_loop: Path) -> None:
    ybr = pydicom.dcmread(ybr_loop)
    statuses = c_store(running_node.scp.port, [ybr])
    assert statuses == [0]
    stored = running_node.store.instance_path(_header(ybr))
    assert pydicom.dcmread(stored).PixelData == ybr.PixelData
    # The big loop shares the SOP Instance UID: it replaces the small one.
    big = pydicom.dcmread(sonosite_loop)
    assert c_store(running_node.scp.port, [big]) == [0]
    assert pixel_fragments(stored) == pixel_fragments(sonosite_loop)
    assert pydicom.dcmread(stored).PixelData == big.PixelData
    instances = running_node.journal.instances()
    assert len(instances) == 1 and instances[0].transfer_syntax == "1.2.840.10008.1.2.4.50"
    assert running_node.journal.study_state(str(big.StudyInstanceUID)) == StudyState.RECEIVING
    # With a model installed the study would be queued; without one it waits as stable.
    wait_for(lambda: running_node.journal.study_state(str(big.StudyInstanceUID)) == StudyState.STABLE,
             what="study to become stable")


def _header(ds):
    from echonode.studies.store import Header

    return Header(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                  str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))


@pytest.mark.parametrize(
    "name, flag",
    [
        ("color3d_jpeg_baseline.dcm", "-xy"),
        ("OBXXXX1A_rle.dcm", "-xr"),
        ("US1_J2KR.dcm", "-xv"),
        ("OBXXXX1A.dcm", None),
    ],
)
def test_dcmtk_storescu(running_node: Node, tmp_path: Path, name: str, flag: str | None) -> None:
    require_tool(STORESCU)
    src = Path(get_testdata_file(name, download=False))
    cmd = [STORESCU, "-aet", "CART", "-aec", "ECHONODE", "--max-pdu", "131072"]
    if flag:
        cmd.append(flag)
    res = subprocess.run([*cmd, "127.0.0.1", str(running_node.scp.port), str(src)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    sent = pydicom.dcmread(src)
    stored = running_node.store.instance_path(_header(sent))
    got = pydicom.dcmread(stored)
    assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert got.PixelData == sent.PixelData


@pytest.mark.parametrize(
    "name, flags, retired_class",
    [
        ("examples_ybr_color.dcm", ["-xy"], "1.2.840.10008.5.1.4.1.1.3"),  # Ultrasound Multi-frame (Retired)
        ("OBXXXX1A.dcm", [], "1.2.840.10008.5.1.4.1.1.6"),  # Ultrasound Image Storage (Retired)
    ],
)
def test_retired_ultrasound_sop_classes_are_accepted(
    running_node: Node, tmp_path: Path, name: str, flags: list[str], retired_class: str
) -> None:
    """Echo loops from older carts and archives migrated through the PACS
    still carry the retired (pre-1996) US SOP classes; dcmtk's storescp
    accepts them and so must we, or the sender gets "no presentation context"."""
    require_tool(STORESCU)
    ds = pydicom.dcmread(get_testdata_file(name, download=False))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = retired_class
    path = tmp_path / name
    ds.save_as(path)
    # -R: propose the file's own SOP class (storescu's default list lacks the retired ones).
    res = subprocess.run([STORESCU, "-R", *flags, "-aet", "CART", "-aec", "ECHONODE", "127.0.0.1",
                          str(running_node.scp.port), str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    rec = running_node.journal.get_instance(str(ds.SOPInstanceUID))
    assert rec is not None and rec.sop_class_uid == retired_class
    assert pydicom.dcmread(rec.path).PixelData == ds.PixelData


def test_echo_with_dcmtk_and_wrong_called_ae(running_node: Node) -> None:
    require_tool(ECHOSCU)
    ok = subprocess.run([ECHOSCU, "-aet", "CART", "-aec", "ECHONODE", "127.0.0.1", str(running_node.scp.port)],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([ECHOSCU, "-aet", "CART", "-aec", "WRONG", "127.0.0.1", str(running_node.scp.port)],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0
    assert "Called AE Title Not Recognized" in bad.stdout + bad.stderr


def _reject_reason(port: int, calling: str = "CART", called: str = "ECHONODE", tls_args=None):
    ae = scu(calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)
    if assoc.is_established:
        assoc.release()
        return None
    if assoc.is_rejected:
        p = assoc.acceptor.primitive
        return (p.result, p.result_source, p.diagnostic)
    return "failed"


def test_rejections_by_called_ae_and_association_limit_are_logged_and_counted(tmp_path: Path) -> None:
    """pynetdicom itself refuses a wrong called AE title and the association
    over max_associations, after our EVT_REQUESTED handler ran: those must
    still give an association.rejected line with the reason, count as
    rejected and not as accepted associations."""
    require_tool(ECHOSCU)
    cfg = make_config(tmp_path, node={"max_associations": 1})
    node = Node(cfg, start_worker=False)
    node.start()
    try:
        with capture_logs() as logs:
            held = scu().associate("127.0.0.1", node.scp.port, ae_title="ECHONODE",
                                   contexts=[build_context(Verification)])
            assert held.is_established
            assert _reject_reason(node.scp.port, calling="CART2") == (2, 3, 2)
            held.release()
            bad = subprocess.run([ECHOSCU, "-aet", "CART", "-aec", "WRONG", "127.0.0.1", str(node.scp.port)],
                                 capture_output=True, text=True, timeout=30)
            assert bad.returncode != 0
            wait_for(lambda: len([e for e in logs if e["event"] == "association.rejected"]) == 2, timeout=10,
                     what="both rejections to be logged")
        rejected = [e for e in logs if e["event"] == "association.rejected"]
        by_reason = {e["reason"]: e for e in rejected}
        assert set(by_reason) == {"max_associations reached", "called AE title not recognized"}
        assert by_reason["called AE title not recognized"]["called_ae"] == "WRONG"
        assert all(e["log_level"] == "warning" for e in rejected)
        assert node.scp.counters.rejected == 2
        assert node.scp.counters.associations == 1
    finally:
        node.stop()


def test_calling_ae_allow_list(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, node={"allowed_calling_aets": ["CART1", "PACS"]})
    node = Node(cfg, start_worker=False)
    node.start()
    try:
        assert _reject_reason(node.scp.port, calling="CART1") is None
        assert _reject_reason(node.scp.port, calling="INTRUDER") == (1, 1, 3)
        assert node.scp.counters.rejected == 1
    finally:
        node.stop()


def test_network_allow_list(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, node={"allowed_networks": ["10.0.0.0/8", "192.168.0.0/16"]})
    node = Node(cfg, start_worker=False)
    node.start()
    try:
        # Turned away at connection time, before a byte is read: no A-ASSOCIATE-RJ.
        assert _reject_reason(node.scp.port) == "failed"
        assert node.scp.counters.rejected == 1
        # A reload that allows loopback lets the next association in.
        node.scp.apply_config(dataclasses.replace(cfg, node=dataclasses.replace(cfg.node, allowed_networks=("127.0.0.0/8",))))
        assert _reject_reason(node.scp.port) is None
    finally:
        node.stop()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=echonode test CA",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(d / f"{name}.key"),
                 "-out", str(d / f"{name}.csr"))
        ext = d / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey",
                 str(d / "ca.key"), "-CAcreateserial", "-days", "2", "-out", str(d / f"{name}.pem"),
                 "-extfile", str(ext))
    return {k: d / k for k in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_tls_with_client_certificate(tmp_path: Path, pki: dict[str, Path]) -> None:
    tls = {"enabled": True, "cert_file": str(pki["server.pem"]), "key_file": str(pki["server.key"]),
           "ca_file": str(pki["ca.pem"]), "require_client_cert": True}
    cfg = make_config(tmp_path, node={"tls": tls})
    node = Node(cfg, start_worker=False)
    node.start()
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
        ctx.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
        ds = us_multiframe()
        assert c_store(node.scp.port, [ds], tls_args=(ctx, "127.0.0.1")) == [0]
        assert node.journal.get_instance(str(ds.SOPInstanceUID)) is not None
        # Without a client certificate the handshake fails: no association.
        bare = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
        assert _reject_reason(node.scp.port, tls_args=(bare, "127.0.0.1")) == "failed"
        # Plain TCP to a TLS port fails too.
        assert _reject_reason(node.scp.port) == "failed"
        # And echonode's own client side (delivery, echo) speaks TLS with a client certificate.
        from echonode.delivery.dimse import Peer, echo

        peer = Peer("ECHONODE", "127.0.0.1", node.scp.port,
                    TLSConfig(enabled=True, ca_file=str(pki["ca.pem"]), cert_file=str(pki["client.pem"]),
                              key_file=str(pki["client.key"])))
        assert echo("CART", peer) == 0
    finally:
        node.stop()


def test_tls_peer_that_never_handshakes_does_not_block_the_listener(tmp_path: Path, pki: dict[str, Path]) -> None:
    """A TCP connection to the TLS port that sends nothing (a load balancer's
    TCP check, a half-open link) must not hold up other senders: the
    handshake runs in the connection's own thread, bounded by acse_timeout_s."""
    import socket

    tls = {"enabled": True, "cert_file": str(pki["server.pem"]), "key_file": str(pki["server.key"])}
    cfg = make_config(tmp_path, node={"tls": tls, "acse_timeout_s": 2.0})
    node = Node(cfg, start_worker=False)
    node.start()
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
    try:
        with capture_logs() as logs, socket.create_connection(("127.0.0.1", node.scp.port)) as silent:
            # While the silent peer is connected, a real sender gets through.
            assert _reject_reason(node.scp.port, tls_args=(ctx, "127.0.0.1")) is None
            ds = us_multiframe()
            assert c_store(node.scp.port, [ds], tls_args=(ctx, "127.0.0.1")) == [0]
            # The node gives up on the silent peer after acse_timeout_s and says so.
            silent.settimeout(30)
            assert silent.recv(1) == b""
            wait_for(lambda: any(e["event"] == "association.tls_failed" for e in logs), timeout=10,
                     what="the failed handshake to be logged")
        [line] = [e for e in logs if e["event"] == "association.tls_failed"]
        assert line["peer"] == "127.0.0.1" and line["log_level"] == "warning"
        assert node.journal.get_instance(str(ds.SOPInstanceUID)) is not None
    finally:
        node.stop()


def test_stop_does_not_wait_for_a_silent_tls_peer(tmp_path: Path, pki: dict[str, Path]) -> None:
    """A peer stuck in the TLS handshake must not hold the node's stop for acse_timeout_s."""
    import socket

    tls = {"enabled": True, "cert_file": str(pki["server.pem"]), "key_file": str(pki["server.key"])}
    cfg = make_config(tmp_path, node={"tls": tls, "acse_timeout_s": 600.0})
    node = Node(cfg, start_worker=False)
    node.start()
    with socket.create_connection(("127.0.0.1", node.scp.port)) as silent:
        wait_for(lambda: bool(node.scp._server.handshaking), timeout=30,
                 what="the server to take the connection into the TLS handshake")
        stopper = threading.Thread(target=node.stop, name="stopper")
        stopper.start()
        # Liveness, not speed: far under the 600 s the handshake could take.
        stopper.join(timeout=120)
        assert not stopper.is_alive(), "node.stop() waited for the silent peer's handshake"
        silent.settimeout(30)
        assert silent.recv(1) == b""  # and the connection is closed


PETABYTE_MB = 1024 * 1024 * 1024


def test_low_disk_rejects_associations_transiently(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, node={"min_free_disk_mb": PETABYTE_MB})
    node = Node(cfg, start_worker=False)
    node.start()
    try:
        # Transient, service-provider (presentation), local limit exceeded: the sender retries later.
        with capture_logs() as logs:
            assert _reject_reason(node.scp.port) == (2, 3, 2)  # echo-only associations too
        [line] = [e for e in logs if e["event"] == "association.rejected"]
        assert line["reason"] == "low disk" and line["log_level"] == "error"
        ae = scu()
        ae.add_requested_context(UltrasoundMultiFrameImageStorage, "1.2.840.10008.1.2.1")
        assert ae.associate("127.0.0.1", node.scp.port, ae_title="ECHONODE").is_rejected
        assert node.scp.counters.rejected == 2
        assert node.scp.counters.associations == 0
        assert node.journal.instances() == []
        assert list(node.store.incoming.iterdir()) == []
        # A reload with a threshold the disk meets lets the next association in.
        node.scp.apply_config(dataclasses.replace(cfg, node=dataclasses.replace(cfg.node, min_free_disk_mb=1)))
        ds = us_multiframe()
        assert c_store(node.scp.port, [ds]) == [0]
        assert node.journal.get_instance(str(ds.SOPInstanceUID)) is not None
    finally:
        node.stop()


def test_low_disk_rejection_as_dcmtk_sees_it(tmp_path: Path) -> None:
    require_tool(STORESCU)
    cfg = make_config(tmp_path, node={"min_free_disk_mb": PETABYTE_MB})
    node = Node(cfg, start_worker=False)
    node.start()
    try:
        src = Path(get_testdata_file("OBXXXX1A.dcm", download=False))
        res = subprocess.run([STORESCU, "-aet", "CART", "-aec", "ECHONODE", "127.0.0.1", str(node.scp.port),
                              str(src)], capture_output=True, text=True, timeout=60)
        assert res.returncode != 0
        out = res.stdout + res.stderr
        assert "Rejected Transient" in out and "Local Limit Exceeded" in out, out
        assert node.journal.instances() == []
    finally:
        node.stop()


def test_low_disk_during_an_association_gets_out_of_resources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_config(tmp_path, node={"min_free_disk_mb": 1})
    node = Node(cfg, start_worker=False)
    node.start()
    # Room when the association is requested, none once objects arrive (a
    # large object from another sender filled the disk in between).
    readings = iter([10 << 20])
    monkeypatch.setattr(node.store, "free_bytes", lambda: next(readings, 0))
    try:
        assert c_store(node.scp.port, [us_multiframe(), us_multiframe(seed=1)]) == [0xA700, 0xA700]
        assert node.scp.counters.failures == {"out_of_disk": 2}
        assert node.scp.counters.rejected == 0
        assert node.journal.instances() == []
        assert list(node.store.incoming.iterdir()) == []
    finally:
        node.stop()


def test_bad_objects_get_specific_statuses_and_the_association_goes_on(running_node: Node) -> None:
    no_study = us_multiframe()
    del no_study.StudyInstanceUID
    bad_uid = us_multiframe()
    bad_uid.SeriesInstanceUID = "1.2.abc"
    first = us_multiframe(sop_uid="1.2.826.0.1.3680043.8.498.1")
    moved = us_multiframe(sop_uid="1.2.826.0.1.3680043.8.498.1")  # same SOP UID, another study
    good = us_multiframe()
    statuses = c_store(running_node.scp.port, [no_study, bad_uid, first, moved, good])
    assert statuses == [0xC220, 0xC221, 0, 0xC230, 0]
    assert {r.sop_uid for r in running_node.journal.instances()} == {str(first.SOPInstanceUID),
                                                                       str(good.SOPInstanceUID)}
    assert list(running_node.store.incoming.iterdir()) == []
    assert running_node.scp.counters.failures == {"0xC220": 1, "0xC221": 1, "0xC230": 1}


def test_sop_class_mismatch_between_request_and_dataset(running_node: Node) -> None:
    # The C-STORE request names one SOP Instance, the data set another.
    ds = us_multiframe()
    ae = scu()
    ae.add_requested_context(UltrasoundMultiFrameImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", running_node.scp.port, ae_title="ECHONODE")
    try:
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_dataset
        from pynetdicom.dimse_primitives import C_STORE

        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = ds.SOPClassUID
        req.AffectedSOPInstanceUID = "1.2.3.4.5.6.7"
        req.Priority = 2
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_dataset(buf, ds)
        import io

        req.DataSet = io.BytesIO(buf.getvalue())
        cx_id = assoc.accepted_contexts[0].context_id
        assoc.dimse.send_msg(req, cx_id)
        # The response is consumed by the SCU's own reactor; read the node's side.
        wait_for(lambda: running_node.scp.counters.failures.get("0xA900") == 1, timeout=10,
                 what="0xA900 refusal")
        assert running_node.journal.instances() == []
    finally:
        assoc.release()


def _send_half_then(assoc, ds, end: str) -> None:
    """Send a C-STORE's command and half its data set as raw P-DATA PDUs, then end the link.

    pynetdicom's SCU queues a whole C-STORE before an abort, so the PDUs go
    straight to the association's socket (the SCU's DUL only reads it).
    ``end``: ``"abort"`` sends an A-ABORT PDU, ``"drop"`` shuts the TCP
    connection as a cart switched off mid-transfer does.
    """
    import io
    import socket
    import struct

    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    req = C_STORE()
    req.MessageID, req.Priority = 1, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    req.DataSet = io.BytesIO(b"-")  # only so that the command says a data set follows
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    cx_id = assoc.accepted_contexts[0].context_id

    def p_data(control: int, payload: bytes) -> bytes:
        pdv = struct.pack(">IBB", len(payload) + 2, cx_id, control) + payload
        return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv

    raw = assoc.dul.socket.socket
    raw.sendall(p_data(0x03, encode(msg.command_set, True, True)))  # command, last fragment
    data = encode(ds, False, True)
    for i in range(0, len(data) // 2, 16_000):
        raw.sendall(p_data(0x00, data[i : i + 16_000]))  # data, more to come
    if end == "abort":
        raw.sendall(bytes.fromhex("07000000000400000000"))  # A-ABORT, service-user
    else:
        raw.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("end", ["abort", "drop"])
def test_transfer_ended_mid_object_leaves_no_temp_file(running_node: Node, end: str) -> None:
    """A sender that aborts (or vanishes) halfway through a large object: the
    node never acknowledged it, so nothing is recorded, and the partial
    spool file goes at once instead of filling incoming/ until a restart."""
    ds = us_multiframe(frames=20, rows=480, cols=640)  # 6 MB: several hundred P-DATA PDUs
    ae = scu()
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", running_node.scp.port, ae_title="ECHONODE")
    assert assoc.is_established
    incoming = running_node.store.incoming
    with capture_logs() as logs:
        _send_half_then(assoc, ds, end)
        wait_for(lambda: any(e["event"] == "association.aborted" for e in logs), timeout=20,
                 what="the node to see the association end")
        wait_for(lambda: list(incoming.iterdir()) == [], timeout=10, what="the partial spool file to go")
        # The file goes first, then the line is logged: wait for the line too.
        wait_for(lambda: any(e["event"] == "store.partial_discarded" for e in logs), timeout=10,
                 what="the discarded partial file to be logged")
    [line] = [e for e in logs if e["event"] == "store.partial_discarded"]
    assert line["sop_uid"] == str(ds.SOPInstanceUID) and line["bytes"] > 1_000_000
    assert running_node.journal.instances() == []
    assert running_node.scp.counters.instances == 0
    # The sender resends on a new association; it is stored as usual.
    assert c_store(running_node.scp.port, [ds]) == [0]
    assert list(incoming.iterdir()) == []


def test_node_restart_keeps_everything(tmp_path: Path, ybr_loop: Path) -> None:
    cfg = make_config(tmp_path)
    node = Node(cfg, start_worker=False)
    node.start()
    ds = [us_multiframe(seed=i) for i in range(3)]
    try:
        assert c_store(node.scp.port, ds) == [0, 0, 0]
    finally:
        node.stop()
    node = Node(cfg, start_worker=False)
    node.start()
    try:
        assert {r.sop_uid for r in node.journal.instances()} == {str(d.SOPInstanceUID) for d in ds}
        for d in ds:
            stored = node.store.instance_path(_header(d))
            assert pydicom.dcmread(stored).PixelData == d.PixelData
    finally:
        node.stop()


def test_write_helper_roundtrip(tmp_path: Path) -> None:
    # factories.write produces Part 10 files dcmtk accepts (used by the kill test).
    p = write(us_multiframe(), tmp_path / "x.dcm")
    assert pydicom.dcmread(p).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


def test_associations_share_the_servers_presentation_contexts(running_node: Node) -> None:
    """pynetdicom deep-copies the acceptor's contexts per connection (about 50 ms of CPU for the
    node's 170 classes x 45 syntaxes); negotiation only reads them, so each association gets
    the server's own context objects, and still negotiates what the cart proposed."""
    server = running_node.scp._server
    assert server is not None
    ae = scu()
    ae.add_requested_context(UltrasoundMultiFrameImageStorage, "1.2.840.10008.1.2.4.50")  # JPEG baseline
    assoc = ae.associate("127.0.0.1", running_node.scp.port, ae_title="ECHONODE")
    try:
        assert assoc.is_established
        [accepted] = assoc.accepted_contexts
        assert accepted.transfer_syntax[0] == "1.2.840.10008.1.2.4.50"
        wait_for(lambda: running_node.scp.active_associations() == 1, timeout=5, what="the association")
        [theirs] = [a for a in running_node.scp.ae.active_associations if a.is_acceptor]
        assert all(a is b for a, b in zip(theirs.acceptor.supported_contexts, server.contexts, strict=True))
    finally:
        assoc.release()
