"""fetch's buffered PDU reader (train/fetch/reader.py) against a peer that sends PDUs by hand.

A pynetdicom storage SCP reads through the reader (installed at
EVT_CONN_OPEN, as fetch's own SCP does); a raw socket plays the sender, so
that the PDUs arrive as the test cuts them: many per read, several PDVs per
PDU, a command and data in one PDU, a header that declares too much.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UltrasoundMultiFrameImageStorage, generate_uid
from pynetdicom import AE, evt
from structlog.testing import capture_logs

import train.fetch.reader as reader_module
import train.fetch.retrieve  # noqa: F401 - fetch's settings: C-STORE data sets streamed to temp files
from tests import rawdicom as raw
from train.fetch.reader import READ_CHUNK, BufferedReader, install_on_connection, reader_of

MAX_PDU = 16384


@dataclass
class Scp:
    port: int
    stored: dict[str, bytes] = field(default_factory=dict)
    readers: list[BufferedReader] = field(default_factory=list)


@pytest.fixture
def scp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Scp]:
    """A storage SCP (US Multi-frame, Explicit VR Little Endian) reading through fetch's reader."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ae = AE(ae_title="FETCH")
    ae.maximum_pdu_size = MAX_PDU
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 10
    ae.add_supported_context(UltrasoundMultiFrameImageStorage, raw.EXPLICIT_VR_LE.decode())
    state = Scp(port=0)

    def on_open(event: Any) -> None:
        install_on_connection(event)
        reader = reader_of(event.assoc)
        assert reader is not None
        state.readers.append(reader)

    def on_store(event: Any) -> int:
        state.stored[str(event.request.AffectedSOPInstanceUID)] = Path(event.dataset_path).read_bytes()
        return 0x0000

    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_C_STORE, on_store)])
    state.port = int(server.server_address[1])
    try:
        yield state
    finally:
        server.shutdown()


def _associate(port: int) -> socket.socket:
    sock, answer = raw.associate(port, called=b"FETCH", abstract_syntax=UltrasoundMultiFrameImageStorage.encode(),
                                 transfer_syntaxes=(raw.EXPLICIT_VR_LE,), max_length=MAX_PDU)
    assert answer is not None and answer.type == raw.ASSOCIATE_AC, answer
    return sock


def _data_set(sop_uid: str, nbytes: int) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = UltrasoundMultiFrameImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.BitsAllocated = 8
    ds.PixelData = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue()


def _pdv(control: int, payload: bytes) -> bytes:
    return struct.pack(">IBB", len(payload) + 2, 1, control) + payload


def _status(sock: socket.socket) -> int:
    return int(raw.read_command(sock).Status)  # type: ignore[attr-defined]


def test_pdus_that_arrive_together_are_handed_on_joined_and_land_byte_for_byte(scp: Scp) -> None:
    """Many small PDUs in one send, two PDVs in each: the SCP stores the exact bytes, from far fewer hand-offs."""
    sock = _associate(scp.port)
    try:
        sop = generate_uid()
        data = _data_set(sop, 300_000)
        chunks = [data[i:i + 3000] for i in range(0, len(data), 3000)]
        stream = raw.p_data(1, 0x03, raw.store_rq_command(UltrasoundMultiFrameImageStorage, sop))
        for i, chunk in enumerate(chunks):
            last = 0x02 if i == len(chunks) - 1 else 0x00
            stream += raw.pdu(raw.P_DATA_TF, _pdv(0x00, chunk[:1000]) + _pdv(last, chunk[1000:]))
        sock.sendall(stream)
        assert _status(sock) == 0x0000
        assert scp.stored[sop].endswith(data)

        # A command and the start of its data in one PDU, the data's end in the next.
        sop2 = generate_uid()
        data2 = _data_set(sop2, 50_000)
        command = raw.store_rq_command(UltrasoundMultiFrameImageStorage, sop2, message_id=2)
        rest = [data2[i:i + 7000] for i in range(7000, len(data2), 7000)]
        sock.sendall(raw.pdu(raw.P_DATA_TF, _pdv(0x03, command) + _pdv(0x00, data2[:7000]))
                     + b"".join(raw.pdu(raw.P_DATA_TF, _pdv(0x00, part)) for part in rest[:-1])
                     + raw.pdu(raw.P_DATA_TF, _pdv(0x02, rest[-1])))
        assert _status(sock) == 0x0000
        assert scp.stored[sop2].endswith(data2)
        sock.sendall(raw.RELEASE_RQ_PDU)
        raw.wait_closed(sock, timeout=10)
    finally:
        sock.close()
    reader = scp.readers[0]
    # A-ASSOCIATE-RQ, release and the P-DATA-TF PDUs all read; the data went on in far fewer.
    assert reader.pdus_read == 2 + 1 + len(chunks) + 1 + len(rest)
    assert reader.pdus_handed < reader.pdus_read / 2


def test_a_pdu_longer_than_announced_is_aborted_without_waiting_for_its_body(scp: Scp) -> None:
    """A P-DATA-TF that declares more than this side's maximum length: A-ABORT, closed, nothing allocated for it."""
    sock = _associate(scp.port)
    try:
        with capture_logs() as logs:
            sock.sendall(raw.header(raw.P_DATA_TF, 64 * MAX_PDU) + bytes(100))
            _took, seen = raw.wait_closed(sock, timeout=10)
    finally:
        sock.close()
    assert [p.type for p in seen] == [raw.ABORT]
    bad = [e for e in logs if e["event"] == "fetch.bad_pdu"]
    assert bad and bad[0]["reason"] == "PDU too long" and bad[0]["limit_bytes"] == MAX_PDU
    assert len(scp.readers[0].buf) == READ_CHUNK


def test_a_connection_cut_inside_a_pdu_is_reported_and_nothing_is_stored(scp: Scp) -> None:
    """The sender goes away in the middle of a data PDU: the reader says so; the instance is not stored."""
    sock = _associate(scp.port)
    sop = generate_uid()
    data = _data_set(sop, 20_000)
    with capture_logs() as logs:
        sock.sendall(raw.p_data(1, 0x03, raw.store_rq_command(UltrasoundMultiFrameImageStorage, sop))
                     + raw.p_data(1, 0x00, data[:5000]) + raw.p_data(1, 0x02, data[5000:])[:3000])
        sock.close()
        for _ in range(200):
            if any(e["event"] == "fetch.connection_closed_mid_pdu" for e in logs):
                break
            time.sleep(0.05)
    cut = [e for e in logs if e["event"] == "fetch.connection_closed_mid_pdu"]
    assert cut and cut[0]["received_bytes"] == 3000 and cut[0]["expected_bytes"] == 6 + 6 + len(data) - 5000
    assert sop not in scp.stored


def test_the_reactor_is_woken_by_what_it_must_send_not_by_its_wait_running_out(
    scp: Scp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the idle wait at 60 s, a C-STORE is answered and a release confirmed within the sender's 10 s.

    The response and the release's answer are queued for sending by another
    thread while the reactor waits on the socket: only the wake-up turns it.
    """
    monkeypatch.setattr(reader_module, "IDLE_WAIT_S", 60.0)
    sock = _associate(scp.port)
    try:
        sop = generate_uid()
        data = _data_set(sop, 10_000)
        sock.sendall(raw.p_data(1, 0x03, raw.store_rq_command(UltrasoundMultiFrameImageStorage, sop))
                     + raw.p_data(1, 0x02, data))
        sock.settimeout(10)
        assert _status(sock) == 0x0000
        assert scp.stored[sop].endswith(data)
        sock.sendall(raw.RELEASE_RQ_PDU)
        _took, seen = raw.wait_closed(sock, timeout=10)
        assert [p.type for p in seen] == [raw.RELEASE_RP]
    finally:
        sock.close()


def test_every_read_leaves_delayed_ack_mode(scp: Scp, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that splits a small PDU in two under Nagle's algorithm gets each piece acknowledged at once."""
    acked: list[int] = []
    quick_ack = reader_module.quick_ack
    monkeypatch.setattr(reader_module, "quick_ack", lambda s: (acked.append(s.fileno()), quick_ack(s)))
    sock = _associate(scp.port)
    try:
        sop = generate_uid()
        command = raw.p_data(1, 0x03, raw.store_rq_command(UltrasoundMultiFrameImageStorage, sop))
        sock.sendall(command[:12])  # the PDU's first piece, as Orthanc writes a small PDU
        time.sleep(0.2)
        sock.sendall(command[12:] + raw.p_data(1, 0x02, _data_set(sop, 1000)))
        sock.settimeout(10)
        assert _status(sock) == 0x0000
    finally:
        sock.close()
    # The association request, the first piece and the rest: each read acknowledged.
    assert len(acked) >= 3 and len(set(acked)) == 1
