"""Fetch's storage SCP for C-MOVE under the attacks the node's own SCP is guarded against.

It listens on the network for as long as a run lasts. A raw socket (``tests/rawdicom.py``)
plays the hostile peer; pynetdicom plays the PACS. Loopback addresses other than 127.0.0.1
(all of 127.0.0.0/8 is local) play hosts that are not the PACS.
"""

from __future__ import annotations

import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import UltrasoundMultiFrameImageStorage  # type: ignore[attr-defined]
from structlog.testing import capture_logs

from echonode.network import pdu_guard
from echonode.receive import spool
from tests import rawdicom as raw
from tests.conftest import FullDisk, wait_for
from tests.factories import us_multiframe
from tests.rawdicom import connect
from train.fetch.errors import UsageError
from train.fetch.journal import FetchJournal
from train.fetch.landing import Archive, Sink
from train.fetch.pacing import FakeClock, RateLimiter
from train.fetch.retrieve import StoreServer, discard_leftovers, resolve_peers

US_MULTIFRAME = b"1.2.840.10008.5.1.4.1.1.3.1"
MOVE_AET = b"FETCH"


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., tuple[StoreServer, Sink]]]:
    """Start fetch's move SCP (as ``fetch`` does, a study in flight); stopped at teardown."""
    servers: list[StoreServer] = []

    def start(allowed: frozenset[str] | None = None, timeout_s: float = 30.0,
              max_pdu: int = 131072) -> tuple[StoreServer, Sink]:
        archive = Archive(tmp_path / f"archive{len(servers)}")
        clock = FakeClock(time.time())
        sink = Sink(archive, FetchJournal(archive.journal_path), clock)
        server = StoreServer(MOVE_AET.decode(), "127.0.0.1", 0, sink, RateLimiter(None, clock), timeout_s, max_pdu,
                             allowed).start()
        servers.append(server)
        return server, sink

    yield start
    for server in servers:
        server.stop()


def pacs_store(port: int, ds) -> int | None:
    """One C-STORE from a pynetdicom PACS; its status, or None when no association was made."""
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(UltrasoundMultiFrameImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=MOVE_AET.decode())
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_store(ds)
        return int(rsp.Status) if "Status" in rsp else None
    finally:
        assoc.release()


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


def test_a_connection_from_another_address_than_the_pacs_is_closed_before_it_is_read(start_server, sockets) -> None:
    """Anyone who could reach the port could add instances to the study in flight, or replace
    those the PACS had delivered. Only the PACS's addresses (``--move-from``) get a hearing."""
    server, sink = start_server(allowed=resolve_peers(["127.0.0.1"]))
    ds = us_multiframe()
    sink.begin(str(ds.StudyInstanceUID), 1)
    with capture_logs() as logs:
        s = connect(server.port, sockets, source="127.0.0.2")
        s.sendall(raw.associate_rq(called=MOVE_AET, calling=b"EVIL", abstract_syntax=US_MULTIFRAME))
        _, pdus = raw.wait_closed(s, timeout=5)
    assert all(p.type == raw.ABORT for p in pdus), pdus  # never an A-ASSOCIATE-AC
    [line] = events(logs, "fetch.association_refused")
    assert line["peer"] == "127.0.0.2" and "--move-from" in line["reason"]
    # The PACS itself is served.
    assert pacs_store(server.port, ds) == 0x0000
    assert sink.total_instances == 1


def test_move_from_names_resolve_and_a_bad_name_is_a_usage_error() -> None:
    assert resolve_peers(["localhost"]) >= {"127.0.0.1"}
    assert resolve_peers(["::ffff:127.0.0.1", "127.0.0.1"]) == frozenset({"127.0.0.1"})
    with pytest.raises(UsageError, match="does not resolve"):
        resolve_peers(["no-such-host.invalid"])


def test_connect_and_close_bursts_never_lock_the_pacs_out(start_server) -> None:
    """Each connection closed before its request held one of the 32 association slots for the
    whole timeout: 33 of them stopped a fetch run (the PACS's stores rejected 2/3/2)."""
    server, sink = start_server(timeout_s=60.0)
    ds = us_multiframe()
    sink.begin(str(ds.StudyInstanceUID), 1)
    for _ in range(100):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            pass
    wait_for(lambda: len(server._server.active_associations) == 0, timeout=10, what="the closed connections' slots")
    assert pacs_store(server.port, ds) == 0x0000


@pytest.mark.parametrize(
    ("rq", "expected", "reason"),
    [
        ({"transfer_syntaxes": ()}, (1, 1, 1), "malformed presentation context: context 1 proposes no transfer syntax"),
        ({"application_context": b"1.2.3.4"}, (1, 1, 2), "not the DICOM application context"),
        ({"called": b"NOTFETCH"}, (1, 1, 7), None),
    ],
)
def test_a_request_fetch_cannot_serve_is_rejected_not_left_hanging(start_server, sockets, rq, expected,
                                                                   reason) -> None:
    """A context without a transfer syntax made pynetdicom raise in the acceptor thread: no
    answer, and the thread and socket held for as long as the peer kept them."""
    server, _ = start_server(timeout_s=600.0)
    with capture_logs() as logs:
        s = connect(server.port, sockets)
        s.sendall(raw.associate_rq(**{"called": MOVE_AET, **rq}))
        got = raw.read_pdu(s)
        assert got is not None and got.type == raw.ASSOCIATE_RJ and got.reject == expected, got
        raw.wait_closed(s, timeout=5)
    if reason is not None:
        [line] = events(logs, "fetch.association_refused")
        assert line["reason"] == reason


@pytest.mark.parametrize("attack", ["even_context_id", "p_data_first"])
def test_protocol_errors_before_the_request_are_aborted_at_once(start_server, sockets, attack: str) -> None:
    server, _ = start_server(timeout_s=600.0)
    with capture_logs() as logs:
        s = connect(server.port, sockets)
        if attack == "even_context_id":
            s.sendall(raw.associate_rq(called=MOVE_AET, context_id=2))
        else:
            s.sendall(raw.p_data(1, 0x03, raw.echo_rq_command()))
        _, pdus = raw.wait_closed(s, timeout=5)
    expected = (2, 6) if attack == "even_context_id" else (2, 2)
    assert [(p.type, p.abort_source_reason) for p in pdus] == [(raw.ABORT, expected)]
    assert events(logs, "association.bad_pdu")
    wait_for(lambda: len(server._server.active_associations) == 0, timeout=5, what="the slot freed")


def test_a_command_that_never_ends_is_aborted_before_it_fills_memory(start_server, sockets) -> None:
    """pynetdicom holds a command set in memory until its last fragment: a stream of fragments
    grew fetch by what was sent. Past MAX_COMMAND_BYTES the association is aborted."""
    server, _ = start_server(max_pdu=16384)
    with capture_logs() as logs:
        s = connect(server.port, sockets)
        s.sendall(raw.associate_rq(called=MOVE_AET, abstract_syntax=US_MULTIFRAME))
        ac = raw.read_pdu(s)
        assert ac is not None and ac.type == raw.ASSOCIATE_AC, ac
        pdus = raw.send_endless_command(s, 16 * pdu_guard.MAX_COMMAND_BYTES)
    assert any(p.type == raw.ABORT for p in pdus), pdus
    [line] = [e for e in events(logs, "fetch.bad_pdu") if e["reason"] == "command set too long"]
    assert pdu_guard.MAX_COMMAND_BYTES < line["received_bytes"] <= pdu_guard.MAX_COMMAND_BYTES + raw.COMMAND_FRAGMENT


def test_a_store_on_another_class_s_context_is_refused(start_server, sockets) -> None:
    """A C-STORE on the Verification context, or naming another class than its context's,
    landed in the archive: PS3.7 sends each on a context of its own SOP class (0x0122)."""
    server, sink = start_server()
    ds = us_multiframe()
    sink.begin(str(ds.StudyInstanceUID), 1)
    def open_association(**rq: object):
        s = connect(server.port, sockets)
        s.sendall(raw.associate_rq(called=MOVE_AET, **rq))  # type: ignore[arg-type]
        assert raw.read_pdu(s).type == raw.ASSOCIATE_AC  # type: ignore[union-attr]
        return s

    with capture_logs() as logs:
        on_verification, other_class = raw.stores_on_wrong_contexts(open_association, ds)
    assert on_verification.Status == 0x0122 and other_class.Status == 0x0122  # type: ignore[attr-defined]
    lines = events(logs, "fetch.store_refused")
    assert [line["status"] for line in lines] == ["0x0122", "0x0122"]
    assert sink.total_instances == 0


def test_a_data_set_cut_off_halfway_is_deleted_when_its_association_ends(start_server, sockets, tmp_path,
                                                                           monkeypatch) -> None:
    """The part of a data set an association ended in the middle of stayed in .fetch/tmp until the
    run ended (days, for a whole archive; an interrupted cine is easily 100 MB). Now it is deleted
    once the association's thread has ended, with one log line; the PACS's next store lands."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool_dir))
    server, sink = start_server()
    ds = us_multiframe()
    sink.begin(str(ds.StudyInstanceUID), 1)
    with capture_logs() as logs:
        s = connect(server.port, sockets)
        s.sendall(raw.associate_rq(called=MOVE_AET, abstract_syntax=US_MULTIFRAME,
                                   transfer_syntaxes=(raw.EXPLICIT_VR_LE,)))
        assert raw.read_pdu(s).type == raw.ASSOCIATE_AC  # type: ignore[union-attr]
        s.sendall(raw.p_data(1, 0x03, raw.store_rq_command(str(ds.SOPClassUID), str(ds.SOPInstanceUID))))
        s.sendall(raw.p_data(1, 0x00, encode(ds, False, True)[:20000]))  # type: ignore[index]  # not the last fragment
        wait_for(lambda: list(spool_dir.iterdir()), timeout=10, what="the spool file")
        s.close()
        wait_for(lambda: not list(spool_dir.iterdir()), timeout=10, what="the partial data set to be deleted")
    [line] = events(logs, "fetch.partial_discarded")
    assert line["sop_uid"] == str(ds.SOPInstanceUID) and line["bytes"] > 20000 - 500
    assert sink.total_instances == 0
    assert pacs_store(server.port, ds) == 0 and sink.total_instances == 1


def test_a_write_error_while_spooling_answers_out_of_resources(start_server, tmp_path, monkeypatch) -> None:
    """A full disk under .fetch/tmp killed pynetdicom's reader thread and left the PACS without an
    answer. Now the C-STORE gets 0xA700 with one log line, nothing lands, the file is removed."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool_dir))
    calls = {"n": 0}

    def filling(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        f = tempfile.NamedTemporaryFile(*args, **kwargs)  # type: ignore[call-overload]  # noqa: SIM115
        return FullDisk(f, 0) if calls["n"] == 1 else f

    monkeypatch.setattr(spool, "_new_temp_file", filling)
    server, sink = start_server()
    ds = us_multiframe()
    sink.begin(str(ds.StudyInstanceUID), 1)
    with capture_logs() as logs:
        assert pacs_store(server.port, ds) == 0xA700
        assert pacs_store(server.port, ds) == 0
    [line] = events(logs, "fetch.store_not_written")
    assert line["sop_uid"] == str(ds.SOPInstanceUID) and line["error"].startswith("OSError: No space left")
    assert sink.total_instances == 1
    wait_for(lambda: not list(spool_dir.iterdir()), timeout=10, what="the spool files to go")


class _EndingAssociation:
    """Stands in for an association whose thread ends when told to."""

    is_requestor = False

    def __init__(self) -> None:
        self.alive = True
        self.requestor = type("Peer", (), {"address": "127.0.0.1"})()

    def is_alive(self) -> bool:
        return self.alive

    def join(self, timeout: float) -> None:
        time.sleep(timeout)


def test_leftovers_wait_for_the_association_s_thread_and_are_kept_while_it_runs(tmp_path) -> None:
    """A spool file is never deleted under a C-STORE handler that may still run: while the
    association's thread is alive past the wait it is kept (logged), once it has ended it goes."""
    assoc = _EndingAssociation()
    tracker = spool.track(assoc, tmp_path)  # type: ignore[arg-type]
    partial = tmp_path / "partial.dcm"
    partial.write_bytes(b"\0" * 1000)
    tracker.add(spool.SpoolFile(None, str(partial), "1.2.3"))
    with capture_logs() as logs:
        assert discard_leftovers(assoc, wait_s=0.05) == 0  # type: ignore[arg-type]
        assert partial.exists()
        assoc.alive = False
        assert discard_leftovers(assoc, wait_s=0.05) == 1  # type: ignore[arg-type]
    assert not partial.exists()
    assert [e["event"] for e in logs] == ["fetch.partial_kept", "fetch.partial_discarded"]
    assert events(logs, "fetch.partial_discarded")[0]["bytes"] == 1000


def _ended_with_a_stuck_and_a_plain_file(
        tmp_path: Path, name: str) -> tuple[_EndingAssociation, spool.SpoolTracker, Path, Path]:
    """An ended association's tracker in ``tmp_path``, a file there that cannot be deleted (a
    directory: deleting it as a file fails, even as root) and a plain 10-byte file ``name``."""
    assoc = _EndingAssociation()
    assoc.alive = False
    tracker = spool.track(assoc, tmp_path)  # type: ignore[arg-type]
    stuck, plain = tmp_path / "stuck.dcm", tmp_path / name
    stuck.mkdir()
    plain.write_bytes(b"\0" * 10)
    return assoc, tracker, stuck, plain


def test_a_leftover_that_cannot_be_deleted_is_logged_and_stops_none_of_the_others(tmp_path) -> None:
    """Each leftover is tried: one that cannot be deleted is logged with its SOP Instance UID
    and file, and the others still go."""
    assoc, tracker, stuck, partial = _ended_with_a_stuck_and_a_plain_file(tmp_path, "partial.dcm")
    tracker.add(spool.SpoolFile(None, str(stuck), "1.2.3"))
    tracker.add(spool.SpoolFile(None, str(partial), "1.2.4"))
    with capture_logs() as logs:
        assert discard_leftovers(assoc) == 1  # type: ignore[arg-type]
    assert not partial.exists() and stuck.is_dir()
    [failed] = events(logs, "fetch.partial_not_removed")
    assert failed["sop_uid"] == "1.2.3" and failed["path"] == str(stuck) and failed["peer"] == "127.0.0.1"
    assert failed["handled"] is False
    assert failed["error"].startswith("IsADirectoryError")
    assert [e["sop_uid"] for e in events(logs, "fetch.partial_discarded")] == ["1.2.4"]


def test_a_handled_spool_file_that_cannot_be_deleted_stays_tracked_until_the_association_ends(tmp_path) -> None:
    """After a C-STORE handler, a file that is deleted is forgotten; one whose deletion fails is
    kept on the tracker, so the sweep at the association's end tries again and logs it."""
    assoc, tracker, stuck, handled = _ended_with_a_stuck_and_a_plain_file(tmp_path, "handled.dcm")
    files = [spool.SpoolFile(None, str(stuck), "1.2.3"), spool.SpoolFile(None, str(handled), "1.2.4")]
    for f in files:
        tracker.add(f)
        spool.release(assoc, type("Request", (), {"_dataset_file": f})())  # type: ignore[arg-type]
    assert not handled.exists() and stuck.is_dir()
    assert tracker.files == [files[0]]
    with capture_logs() as logs:
        assert discard_leftovers(assoc) == 0  # type: ignore[arg-type]
    [failed] = events(logs, "fetch.partial_not_removed")
    assert failed["sop_uid"] == "1.2.3" and failed["path"] == str(stuck) and failed["handled"] is True


def test_a_refused_instance_s_file_removed_at_the_association_end_is_not_a_partial(tmp_path) -> None:
    """A file whose handler ran (fetch answered a failure) and whose deletion failed then but
    works at the association's end is removed without being called a partial transfer or counted
    among the partials."""
    assoc = _EndingAssociation()
    assoc.alive = False
    tracker = spool.track(assoc, tmp_path)  # type: ignore[arg-type]
    refused = tmp_path / "refused.dcm"
    refused.write_bytes(b"\0" * 10)
    handled = spool.SpoolFile(None, str(refused), "1.2.5")
    handled.handled = True
    tracker.add(handled)
    with capture_logs() as logs:
        assert discard_leftovers(assoc) == 0  # type: ignore[arg-type]
    assert not refused.exists()
    assert [e["event"] for e in logs] == ["fetch.refused_spool_removed"]
    assert logs[0]["sop_uid"] == "1.2.5" and logs[0]["bytes"] == 10
