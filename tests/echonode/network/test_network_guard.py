"""Protocol attacks over raw sockets: what a peer can make the node read, hold and leave behind.

The node is a real ``Node`` on loopback; the peers are raw sockets speaking
hand-made PDUs (``tests/rawdicom.py``), dcmtk's ``echoscu`` and pynetdicom.
Loopback addresses other than 127.0.0.1 (all of 127.0.0.0/8 is local) play
hosts outside ``allowed_networks``.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom.association import Association
from pynetdicom.dsutils import encode
from structlog.testing import capture_logs

from echonode.daemon.node import Node
from echonode.delivery.dimse import Peer, echo, store_file
from echonode.delivery.outcome import DeliveryError
from echonode.network import pdu_guard
from echonode.receive import spool
from echonode.receive.scp import STOP_JOIN_S
from tests import rawdicom as raw
from tests.conftest import REPO, FullDisk, echonode_cmd, make_config, wait_for
from tests.factories import us_multiframe, write
from tests.peers import ECHOSCU, c_echo, c_store, echoscu, require_tool
from tests.peers import associate as scu_associate
from tests.rawdicom import connect

US_MULTIFRAME = b"1.2.840.10008.5.1.4.1.1.3.1"
GIB2 = 2**31 - 1


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start nodes (no worker) with ``[node]`` overrides; all stopped at teardown."""
    nodes: list[Node] = []

    def start(**node: object) -> Node:
        n = Node(make_config(tmp_path / f"node{len(nodes)}", node=node), start_worker=False)
        n.start()
        nodes.append(n)
        return n

    yield start
    for n in nodes:
        n.stop()


def associate(port: int, opened: list[socket.socket], calling: bytes = b"CART", **rq: object) -> socket.socket:
    s = connect(port, opened)
    s.sendall(raw.associate_rq(calling=calling, **rq))  # type: ignore[arg-type]
    ac = raw.read_pdu(s)
    assert ac is not None and ac.type == raw.ASSOCIATE_AC, ac
    return s


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


# -- 1. nothing allocated on a peer's word ------------------------------------------------


def test_associate_request_declaring_2_gib_is_aborted_without_allocating(start_node, sockets) -> None:
    """A 6-byte A-ASSOCIATE-RQ header that declares 2 GiB: pynetdicom allocated and zeroed
    2 GiB at once and waited for the rest. Now: A-ABORT (invalid PDU parameter value),
    closed, logged with the peer and the length, counted; the slot is free at once."""
    node = start_node(acse_timeout_s=30.0)
    before = rss_mib()
    with capture_logs() as logs:
        s = connect(node.scp.port, sockets)
        s.sendall(raw.header(raw.ASSOCIATE_RQ, GIB2))
        took, pdus = raw.wait_closed(s, timeout=10)
        wait_for(lambda: events(logs, "association.pdu_too_large"), timeout=5, what="the log line")
    assert [p.type for p in pdus] == [raw.ABORT] and pdus[0].abort_source_reason == (2, 6)
    assert rss_mib() - before < 200
    [line] = events(logs, "association.pdu_too_large")
    assert line["peer"] == "127.0.0.1" and line["declared_bytes"] == GIB2
    assert line["pdu_type"] == "A-ASSOCIATE-RQ" and line["limit_bytes"] == pdu_guard.ASSOCIATE_PDU_CEILING
    assert node.scp.counters.aborted == {"pdu_too_large": 1}
    # The acceptor thread does not wait out acse_timeout_s for a request that cannot come.
    wait_for(lambda: node.scp.active_associations() == 0, timeout=5, what="the slot to be freed")
    assert echoscu(node.scp.port).returncode == 0


def test_p_data_over_the_advertised_maximum_is_aborted(start_node, sockets) -> None:
    """After negotiation a P-DATA-TF PDU may be as long as the maximum length the node
    advertised (node.max_pdu), as DCMTK enforces it; at that length it is taken."""
    require_tool(ECHOSCU)
    node = start_node(max_pdu=16384)
    # A sender that fills PDUs to exactly the maximum is served.
    ds = us_multiframe(frames=16, rows=128, cols=128)  # 256 KiB: sixteen full PDUs
    assert c_store(node.scp.port, [ds]) == [0]
    with capture_logs() as logs:
        s = associate(node.scp.port, sockets)
        s.sendall(raw.header(raw.P_DATA_TF, 16385))
        _, pdus = raw.wait_closed(s, timeout=10)
        wait_for(lambda: events(logs, "association.aborted"), timeout=5, what="the association to end")
    assert [p.abort_source_reason for p in pdus] == [(2, 6)]
    [line] = events(logs, "association.pdu_too_large")
    assert (line["declared_bytes"], line["limit_bytes"], line["pdu_type"]) == (16385, 16384, "P-DATA-TF")
    assert node.scp.counters.aborted == {"pdu_too_large": 1}


def test_a_pdu_body_is_allocated_as_it_arrives(start_node, sockets) -> None:
    """With max_pdu = 0 ("unlimited") a 60 MiB P-DATA-TF is allowed, but the node holds
    only what has arrived, not what was declared; over 64 MiB it is refused."""
    node = start_node(max_pdu=0, network_timeout_s=30.0)
    s = associate(node.scp.port, sockets)
    before = rss_mib()
    s.sendall(raw.header(raw.P_DATA_TF, 60 << 20) + bytes(1000))
    time.sleep(1.0)
    grown = rss_mib() - before
    assert grown < 20, f"{grown:.0f} MiB held for 1000 bytes received"
    s.close()
    with capture_logs() as logs:
        s = associate(node.scp.port, sockets)
        s.sendall(raw.header(raw.P_DATA_TF, pdu_guard.UNLIMITED_PDU_CEILING + 1))
        _, pdus = raw.wait_closed(s, timeout=10)
    assert [p.abort_source_reason for p in pdus] == [(2, 6)]
    assert events(logs, "association.pdu_too_large")[0]["limit_bytes"] == pdu_guard.UNLIMITED_PDU_CEILING


# -- 2. the address allow-list at connection time -----------------------------------------


def test_a_disallowed_address_is_turned_away_before_a_byte_is_read(start_node, sockets) -> None:
    """It never gets an association (nor a max_associations slot): the connection is
    closed at accept, logged and counted."""
    require_tool(ECHOSCU)
    node = start_node(allowed_networks=["127.0.0.1/32"], max_associations=1)
    with capture_logs() as logs:
        held = []
        for _ in range(5):
            s = connect(node.scp.port, sockets, source="127.0.0.2")
            with contextlib.suppress(OSError):  # already closed by the node
                s.sendall(raw.header(raw.ASSOCIATE_RQ, 200))  # and then nothing
            held.append(s)
        for s in held:
            took, pdus = raw.wait_closed(s, timeout=5)
            assert pdus == []
        # The one slot is free for an allowed cart.
        assert echoscu(node.scp.port).returncode == 0
    rejected = events(logs, "association.rejected")
    assert len(rejected) == 5
    assert all(e["reason"] == "address not allowed" and e["peer"] == "127.0.0.2" for e in rejected)
    assert node.scp.counters.rejected == 5
    assert node.scp.counters.associations == 1
    assert len(events(logs, "association.requested")) == 1  # the echo


# -- 3. every read has a deadline --------------------------------------------------------


def _stall_store(port: int, opened: list[socket.socket], sop_uid: str) -> socket.socket:
    """An association that sends a C-STORE command, half its data set, then 10 bytes of a PDU and stops."""
    ds = us_multiframe(frames=8, rows=64, cols=64, sop_uid=sop_uid)
    s = associate(port, opened, abstract_syntax=US_MULTIFRAME, transfer_syntaxes=(raw.EXPLICIT_VR_LE,))
    s.sendall(raw.p_data(1, 0x03, raw.store_rq_command(ds.SOPClassUID, sop_uid)))
    data = encode(ds, False, True)
    s.sendall(raw.p_data(1, 0x00, data[: len(data) // 2]))
    s.sendall(raw.header(raw.P_DATA_TF, 1000) + bytes(10))
    return s


def test_stalled_peers_from_an_allowed_address_are_reaped(start_node, sockets) -> None:
    """A peer that stops mid-PDU (before the association: acse_timeout_s; after it:
    network_timeout_s) is aborted and closed, counted and logged, and its partial spool
    file removed; the slots it held are free again."""
    require_tool(ECHOSCU)
    node = start_node(acse_timeout_s=1.0, network_timeout_s=1.0, max_associations=2)
    with capture_logs() as logs:
        before = connect(node.scp.port, sockets)
        before.sendall(raw.header(raw.ASSOCIATE_RQ, 200) + bytes(10))
        after = _stall_store(node.scp.port, sockets, "1.2.826.0.1.3680043.8.498.77")
        wait_for(lambda: list(node.store.incoming.iterdir()), timeout=5, what="the spool file")
        t0 = time.monotonic()
        took_before, pdus_before = raw.wait_closed(before, timeout=15)
        took_after, pdus_after = raw.wait_closed(after, timeout=15)
        reaped = time.monotonic() - t0
        wait_for(lambda: not list(node.store.incoming.iterdir()), timeout=5, what="the spool file to go")
        wait_for(lambda: node.scp.active_associations() == 0, timeout=5, what="the slots to be freed")
        wait_for(lambda: events(logs, "store.partial_discarded"), timeout=5, what="the discard to be logged")
    print({"reaped_s": round(reaped, 2)})
    assert [p.abort_source_reason for p in pdus_before] == [(2, 0)]
    assert [p.abort_source_reason for p in pdus_after] == [(2, 0)]
    stalled = sorted(events(logs, "association.stalled"), key=lambda e: e["phase"])
    assert [e["phase"] for e in stalled] == ["PDU", "association negotiation"]
    assert stalled[0]["received_bytes"] == 16 and stalled[0]["expected_bytes"] == 1006
    assert stalled[0]["deadline"] == "network_timeout_s" and stalled[1]["deadline"] == "acse_timeout_s"
    assert node.scp.counters.aborted == {"stalled": 2}
    [discarded] = events(logs, "store.partial_discarded")
    assert discarded["sop_uid"] == "1.2.826.0.1.3680043.8.498.77"
    assert node.scp.counters.failures == {"incomplete": 1}
    assert echoscu(node.scp.port).returncode == 0


def test_a_partial_spool_file_that_cannot_be_deleted_is_logged_and_counted(start_node, sockets) -> None:
    """When the leftover of a cut-off data set cannot be deleted, the node says so (with the
    SOP Instance UID and the file), counts the instance failed and goes on serving."""
    require_tool(ECHOSCU)
    node = start_node(network_timeout_s=1.0)
    with capture_logs() as logs:
        stalled = _stall_store(node.scp.port, sockets, "1.2.826.0.1.3680043.8.498.78")
        [spooled] = wait_for(lambda: list(node.store.incoming.iterdir()), timeout=5, what="the spool file")
        # A directory where the file was: deleting it fails as no permission would, even as root.
        spooled.unlink()
        spooled.mkdir()
        raw.wait_closed(stalled, timeout=15)
        wait_for(lambda: events(logs, "store.partial_not_removed"), timeout=5, what="the failure to be logged")
    [line] = events(logs, "store.partial_not_removed")
    assert line["sop_uid"] == "1.2.826.0.1.3680043.8.498.78" and line["path"] == str(spooled)
    assert line["error"].startswith("IsADirectoryError") and line["handled"] is False
    assert not events(logs, "store.partial_discarded")
    assert node.scp.counters.failures == {"incomplete": 1}
    assert echoscu(node.scp.port).returncode == 0


def _deletes_fail_in(directory: Path, monkeypatch: pytest.MonkeyPatch, error: OSError,
                     times: int | None = None) -> dict[str, int | None]:
    """Make deleting a file in ``directory`` fail with ``error`` (``times`` times, or always), as a
    read-only or failing file system would, for pynetdicom's delete and the node's alike."""
    real_unlink = os.unlink
    left: dict[str, int | None] = {"left": times}

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).parent == directory and left["left"] != 0:
            if left["left"] is not None:
                left["left"] -= 1
            raise error
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(os, "remove", unlink)
    return left


def _refused_object(sop_uid: str) -> Any:
    """An object the node answers 0xC220 (no Study Instance UID)."""
    ds = us_multiframe(sop_uid=sop_uid)
    del ds.StudyInstanceUID
    return ds


def test_a_refused_object_whose_spool_file_cannot_be_deleted_is_logged_once_not_counted_twice(
        start_node, monkeypatch) -> None:
    """A data set the node answered with a failure status whose spool file then cannot be
    deleted is named in a log line when its association ends (so no file is left without one),
    and counted only under the status it got."""
    node = start_node()
    _deletes_fail_in(node.store.incoming, monkeypatch, PermissionError(13, "Permission denied"))
    with capture_logs() as logs:
        assert c_store(node.scp.port, [_refused_object("1.2.826.0.1.3680043.8.498.79")]) == [0xC220]
        wait_for(lambda: events(logs, "store.partial_not_removed"), timeout=5, what="the failure to be logged")
    [line] = events(logs, "store.partial_not_removed")
    assert line["sop_uid"] == "1.2.826.0.1.3680043.8.498.79" and line["handled"] is True
    assert line["error"].startswith("PermissionError")
    assert Path(line["path"]).parent == node.store.incoming and Path(line["path"]).exists()
    assert node.scp.counters.failures == {"0xC220": 1}


def test_a_refused_object_whose_spool_file_goes_only_at_the_association_end_is_not_a_partial(
        start_node, monkeypatch) -> None:
    """A refused object's spool file whose deletion fails after the answer (pynetdicom's and
    the node's, a passing fault) and works when the association ends is neither counted again
    nor called a partial transfer."""
    node = start_node()
    failures = _deletes_fail_in(node.store.incoming, monkeypatch, OSError(16, "Device or resource busy"), times=2)
    with capture_logs() as logs:
        assert c_store(node.scp.port, [_refused_object("1.2.826.0.1.3680043.8.498.80")]) == [0xC220]
        wait_for(lambda: events(logs, "store.refused_spool_removed"), timeout=5, what="the late removal")
    assert failures["left"] == 0
    assert events(logs, "store.refused_spool_removed")[0]["sop_uid"] == "1.2.826.0.1.3680043.8.498.80"
    assert not events(logs, "store.partial_discarded") and not events(logs, "store.partial_not_removed")
    assert list(node.store.incoming.iterdir()) == []
    assert node.scp.counters.failures == {"0xC220": 1}


def test_echo_answers_while_50_stalled_sockets_are_open(start_node, sockets) -> None:
    """50 connections that sent 6 bytes and stopped, from outside the allow-list: carts'
    C-ECHOs (dcmtk echoscu, pynetdicom) are still answered, promptly."""
    require_tool(ECHOSCU)
    node = start_node(allowed_networks=["127.0.0.1/32"], max_associations=3, acse_timeout_s=600.0,
                      network_timeout_s=600.0)
    for i in range(50):
        s = connect(node.scp.port, sockets, source=f"127.0.0.{2 + i % 5}")
        with contextlib.suppress(OSError):
            s.sendall(raw.header(raw.ASSOCIATE_RQ, 200))
    latencies = []
    for _ in range(5):
        t0 = time.monotonic()
        assert echoscu(node.scp.port).returncode == 0
        assert c_echo(node.scp.port) == 0
        latencies.append(time.monotonic() - t0)
    print({"echo_pair_max_s": round(max(latencies), 3), "echo_pair_median_s": round(sorted(latencies)[2], 3)})
    assert max(latencies) < 5.0  # liveness: a held listener would not answer at all
    assert node.scp.counters.rejected == 50


def test_silent_connections_from_an_allowed_address_never_lock_carts_out(start_node, sockets) -> None:
    """With no allow-list (the default), 50 connections that send 6 bytes and stop used
    to hold every max_associations slot until acse_timeout_s: carts got "local limit
    exceeded". Silent connections no longer count against the limit, and past
    MAX_AWAITING_REQUEST the one that waited longest is closed."""
    from echonode.receive.scp import MAX_AWAITING_REQUEST

    require_tool(ECHOSCU)
    node = start_node(max_associations=3, acse_timeout_s=600.0, network_timeout_s=600.0)
    silent = []
    with capture_logs() as logs:
        for _ in range(50):
            s = connect(node.scp.port, sockets)
            with contextlib.suppress(OSError):
                s.sendall(raw.header(raw.ASSOCIATE_RQ, 200))
            silent.append(s)
        wait_for(lambda: len(events(logs, "association.evicted")) >= 50 - MAX_AWAITING_REQUEST, timeout=10,
                 what="the longest-waiting silent connections to be closed")
        latencies = []
        for _ in range(5):
            t0 = time.monotonic()
            assert echoscu(node.scp.port).returncode == 0
            assert c_echo(node.scp.port) == 0
            latencies.append(time.monotonic() - t0)
    print({"echo_pair_max_s": round(max(latencies), 3), "echo_pair_median_s": round(sorted(latencies)[2], 3)})
    assert max(latencies) < 5.0  # liveness: a locked-out cart would be rejected, not slow
    evicted = events(logs, "association.evicted")
    assert node.scp.counters.aborted.get("evicted", 0) == len(evicted) >= 50 - MAX_AWAITING_REQUEST
    assert not events(logs, "association.rejected")
    # The first silent connections were the ones closed; the newest still waits.
    raw.wait_closed(silent[0], timeout=5)
    with pytest.raises(TimeoutError):
        raw.wait_closed(silent[-1], timeout=0.5)


def test_connect_and_close_bursts_never_lock_carts_out(start_node, sockets) -> None:
    """Connections closed before any request (a port scan, a load balancer's health check,
    an attacker's burst) used to leave pynetdicom's acceptor thread waiting out
    acse_timeout_s for each; past its thread limit every cart was rejected "local limit
    exceeded" until then. The guard ends that wait when the peer closes."""
    from echonode.receive.scp import MAX_AWAITING_REQUEST

    require_tool(ECHOSCU)
    node = start_node(max_associations=3, acse_timeout_s=600.0, network_timeout_s=600.0)
    backstop = 3 + 4 * MAX_AWAITING_REQUEST  # pynetdicom's own limit, over every connection's thread
    with capture_logs() as logs:
        for _ in range(backstop + 40):
            s = connect(node.scp.port, sockets)
            s.close()
        for _ in range(3):
            assert echoscu(node.scp.port).returncode == 0
            assert c_echo(node.scp.port) == 0
    assert not events(logs, "association.rejected")
    # The burst's threads end at once, not after acse_timeout_s.
    wait_for(lambda: threading.active_count() < 40, timeout=10, what="the burst's threads to end")


class _ReleasedAssociation:
    """An association the peer has released whose thread has not quite ended yet."""

    is_acceptor, is_established, is_released, is_aborted = True, False, True, False

    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def is_alive(self) -> bool:
        return False

    def join(self, timeout: float | None = None) -> None:
        return None


def test_stop_does_not_abort_or_report_an_association_already_released(start_node, monkeypatch) -> None:
    """Under load a released association's thread can still be listed when stop() looks:
    it has nothing left to abort, and the log must not tell the administrator it was."""
    node = start_node()
    released = _ReleasedAssociation()
    monkeypatch.setattr(type(node.scp.ae), "active_associations", property(lambda ae: [released]))
    with capture_logs() as logs:
        node.scp.stop(grace_s=5.0)
    assert not released.aborted
    assert not events(logs, "scp.aborted_on_stop")
    assert events(logs, "scp.stopped")


def test_stop_closes_a_released_association_whose_peer_stops_mid_pdu(start_node, sockets) -> None:
    """A peer that, after its A-RELEASE-RP, starts a PDU and stops leaves the node's reader
    waiting for the rest until its deadline (here 600 s). stop() closes the connection without
    an A-ABORT (the peer had its answer) and without calling the association aborted, and the
    association's thread has ended when stop() returns."""
    node = start_node(acse_timeout_s=600.0, network_timeout_s=600.0)
    s = associate(node.scp.port, sockets, abstract_syntax=US_MULTIFRAME, transfer_syntaxes=(raw.EXPLICIT_VR_LE,))
    s.sendall(raw.RELEASE_RQ_PDU)
    rp = raw.read_pdu(s)
    assert rp is not None and rp.type == raw.RELEASE_RP
    s.sendall(raw.header(raw.P_DATA_TF, 1000) + bytes(10))
    released = wait_for(lambda: [a for a in node.scp.ae.active_associations if a.is_acceptor and a.is_released],
                        timeout=5, what="the node's released association")
    with capture_logs() as logs:
        t0 = time.monotonic()
        node.scp.stop(grace_s=30.0)
        took = time.monotonic() - t0
    assert not [a for a in released if a.is_alive()]
    assert took < STOP_JOIN_S
    assert not events(logs, "scp.aborted_on_stop")
    _, after = raw.wait_closed(s, timeout=5.0)
    assert [p.type for p in after] == []


def test_stop_sends_no_abort_to_an_association_that_released_after_stop_looked(
        start_node, sockets, monkeypatch) -> None:
    """An association that finishes its release between stop()'s look and its abort (the look
    is stale: here it is made to say "still open") gets no A-ABORT after its A-RELEASE-RP, and
    the administrator is not told it was aborted."""
    import echonode.receive.scp as scp_module

    node = start_node(acse_timeout_s=600.0, network_timeout_s=600.0)
    s = associate(node.scp.port, sockets, abstract_syntax=US_MULTIFRAME, transfer_syntaxes=(raw.EXPLICIT_VR_LE,))
    s.sendall(raw.RELEASE_RQ_PDU)
    rp = raw.read_pdu(s)
    assert rp is not None and rp.type == raw.RELEASE_RP
    s.sendall(raw.header(raw.P_DATA_TF, 1000) + bytes(10))  # keeps the node's thread in a read
    wait_for(lambda: [a for a in node.scp.ae.active_associations if a.is_acceptor and a.is_released],
             timeout=5, what="the node's released association")
    monkeypatch.setattr(scp_module, "association_ending", lambda assoc: False)
    with capture_logs() as logs:
        node.scp.stop(grace_s=1.0)
    assert not events(logs, "scp.aborted_on_stop")
    _, after = raw.wait_closed(s, timeout=5.0)
    assert [p.type for p in after] == []


def test_stop_ends_connections_stalled_mid_request_at_once(start_node, sockets, monkeypatch) -> None:
    """Connections that sent 6 bytes of an A-ASSOCIATE-RQ and nothing more have no transfer to
    finish: stop() neither spends its grace on them nor waits for their read deadline
    (acse_timeout_s, 600 s here; pynetdicom's own abort would wait that long for a reader in
    the middle of a PDU). Each is sent an A-ABORT and closed, every thread has ended when
    stop() returns, and the wait for the threads is one deadline, not one per connection."""
    node = start_node(acse_timeout_s=600.0, network_timeout_s=600.0)
    silent = []
    for _ in range(6):
        s = connect(node.scp.port, sockets)
        s.sendall(raw.header(raw.ASSOCIATE_RQ, 200))
        silent.append(s)
    wait_for(lambda: node.scp.active_associations() == 6, timeout=10, what="six silent connections")
    assocs = [a for a in node.scp.ae.active_associations if a.is_acceptor]
    waits: list[float] = []
    join = Association.join

    def recording_join(self: Association, timeout: float | None = None) -> None:
        waits.append(float("inf") if timeout is None else timeout)
        join(self, timeout)

    monkeypatch.setattr(Association, "join", recording_join)
    with capture_logs() as logs:
        node.scp.stop(grace_s=3600.0)
    assert events(logs, "scp.aborted_on_stop")[0]["associations"] == 6
    assert not node.scp.listening
    assert not [a for a in assocs if a.is_alive()]
    # one shared deadline: each join is given what is left of STOP_JOIN_S
    assert len(waits) >= 6 and all(w <= STOP_JOIN_S for w in waits) and waits == sorted(waits, reverse=True)
    for s in silent:
        _, seen = raw.wait_closed(s, timeout=5.0)
        assert [p.type for p in seen] == [raw.ABORT]


# -- 4. the same guard on outgoing associations ------------------------------------------


class FakePacs:
    """A raw-socket PACS: accepts the association with a hand-made A-ASSOCIATE-AC, then
    answers the first P-DATA-TF with ``then`` and holds the connection until closed."""

    def __init__(self, then: bytes) -> None:
        self.then = then
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.received: list[raw.Pdu] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-pacs", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conns.append(conn)
            try:
                rq = raw.read_pdu(conn)
                assert rq is not None
                conn.sendall(raw.associate_ac(raw.header(rq.type, rq.length) + rq.body))
                first = raw.read_pdu(conn)
                if first is not None:
                    self.received.append(first)
                    conn.sendall(self.then)
                # Hold on, reading whatever else comes (an A-ABORT) until the peer closes.
                while not self._stop.is_set():
                    got = raw.read_pdu(conn, timeout=0.2)
                    if got is None:
                        break
                    self.received.append(got)
            except (TimeoutError, OSError, AssertionError):
                continue

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for c in self.conns:
            c.close()
        self._thread.join(timeout=10)


@pytest.fixture
def fake_pacs() -> Iterator[Callable[[bytes], FakePacs]]:
    made: list[FakePacs] = []

    def make(then: bytes) -> FakePacs:
        made.append(FakePacs(then))
        return made[-1]

    yield make
    for p in made:
        p.close()


def _in_thread(fn: Callable[[], object], timeout: float) -> tuple[object, float]:
    """Run ``fn``; its result (or exception) and seconds taken. Fails if it runs past ``timeout``."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    t0 = time.monotonic()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"still blocked after {timeout} s"
    return out[0], time.monotonic() - t0


def test_a_destination_that_stops_mid_pdu_fails_the_store_within_the_deadline(fake_pacs, tmp_path: Path) -> None:
    """pynetdicom puts an outgoing socket back to blocking: a PACS that stops in the
    middle of its answer held the sender for ever (delivery.timeout_s did not apply)."""
    pacs = fake_pacs(raw.header(raw.P_DATA_TF, 1000) + bytes(10))
    sr = write(us_multiframe(), tmp_path / "sr.dcm")
    with capture_logs() as logs:
        result, took = _in_thread(lambda: store_file("ECHONODE", Peer("PACS", "127.0.0.1", pacs.port), str(sr), 1.0),
                                  timeout=30)
        result_echo, took_echo = _in_thread(lambda: echo("ECHONODE", Peer("PACS", "127.0.0.1", pacs.port), 1.0),
                                            timeout=30)
    print({"store_failed_after_s": round(took, 2), "echo_failed_after_s": round(took_echo, 2)})
    assert isinstance(result, DeliveryError) and not result.permanent, result
    assert isinstance(result_echo, DeliveryError), result_echo
    # Two bounds hold here: the guard's read deadline (pynetdicom's timers, set just
    # past the attempt's limit) and the attempt's own deadline kept from outside
    # (deadline.py), which comes first; either way the sender is free in seconds.
    stalled = events(logs, "association.stalled")
    assert all(e["role"] == "requestor" and e["phase"] == "PDU" for e in stalled)
    assert len(stalled) == 2 or all("within" in str(r) for r in (result, result_echo)), (stalled, result, result_echo)
    assert took < 10 and took_echo < 10


def test_a_destination_declaring_4_gib_costs_the_sender_nothing(fake_pacs, tmp_path: Path) -> None:
    """``echonode echo`` against a PACS that answers with a P-DATA-TF header declaring
    4 GiB: pynetdicom allocated (and zeroed) 4 GiB. Now it is refused at once, and the
    process's peak memory stays that of a small Python program."""
    pacs = fake_pacs(raw.header(raw.P_DATA_TF, 0xFFFFFFFF))
    cfg = make_config(tmp_path)
    config = tmp_path / "echonode.toml"
    from echonode.config import to_toml

    config.write_text(to_toml(cfg))

    # Should the guard be gone: a MemoryError rather than 4 GiB on a shared machine.
    cmd = ["prlimit", f"--as={3 << 30}", *echonode_cmd("--config", str(config), "echo",
                                                      f"PACS@127.0.0.1:{pacs.port}", "--timeout", "5")]
    t0 = time.monotonic()
    with open(tmp_path / "out.txt", "wb") as out:
        # A child's peak RSS counts the pages it had before its exec: a fork
        # (or vfork) of this test process, 1.7 GB late in a full run. A small
        # launcher forks the command instead and reports its child's peak.
        launcher = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, st, ru = os.wait4(p.pid, 0); "
                    "print(f'CHILD_MAXRSS_KIB={ru.ru_maxrss}'); sys.exit(os.waitstatus_to_exitcode(st))")
        proc = subprocess.Popen([sys.executable, "-c", launcher, *cmd], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        try:
            status = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    took = time.monotonic() - t0
    text = (tmp_path / "out.txt").read_text(errors="replace")
    peak_mib = int(re.search(r"CHILD_MAXRSS_KIB=(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]
    print({"echo_failed_after_s": round(took, 2), "sender_peak_rss_mib": round(peak_mib)})
    assert status == 1, text
    assert "association.pdu_too_large" in text and "4294967295" in text, text
    assert "C-ECHO to PACS@127.0.0.1" in text and "failed" in text, text
    assert took < 30
    assert peak_mib < 1024
    assert any(p.type == raw.ABORT and p.abort_source_reason == (2, 6) for p in pacs.received), pacs.received


# -- 5. no spool file escapes the node ---------------------------------------------------


def test_a_new_message_in_the_middle_of_a_data_set_leaves_no_spool_file(start_node, sockets) -> None:
    """pynetdicom reuses the message object for a command that arrives before the data
    set ended, opening a second spool file and forgetting the first."""
    node = start_node()
    first, second = us_multiframe(sop_uid="1.2.826.0.1.3680043.8.498.101"), us_multiframe()
    with capture_logs() as logs:
        s = associate(node.scp.port, sockets, abstract_syntax=US_MULTIFRAME, transfer_syntaxes=(raw.EXPLICIT_VR_LE,))
        s.sendall(raw.p_data(1, 0x03, raw.store_rq_command(first.SOPClassUID, first.SOPInstanceUID)))
        data = encode(first, False, True)
        s.sendall(raw.p_data(1, 0x00, data[: len(data) // 2]))
        # A new C-STORE-RQ before the first data set ended, then its whole data set.
        s.sendall(raw.p_data(1, 0x03, raw.store_rq_command(second.SOPClassUID, second.SOPInstanceUID,
                                                              message_id=2)))
        s.sendall(raw.p_data(1, 0x02, encode(second, False, True)))
        raw.read_command(s)  # whatever the node made of it, it answers
        s.sendall(raw.RELEASE_RQ_PDU)
        raw.wait_closed(s, timeout=10)
        wait_for(lambda: events(logs, "store.partial_discarded"), timeout=10, what="the first file to be discarded")
    assert list(node.store.incoming.iterdir()) == []
    assert [e["sop_uid"] for e in events(logs, "store.partial_discarded")] == [str(first.SOPInstanceUID)]


def test_a_long_association_keeps_no_record_of_the_data_sets_it_carried(start_node) -> None:
    """Each spool file is forgotten once its C-STORE is answered: an association that stays
    open for a day's studies holds no growing list of them (and nothing is left at the end)."""
    node = start_node()
    objects = [us_multiframe(frames=2, rows=16, cols=16) for _ in range(4)]
    assoc = scu_associate(node.scp.port, objects[:1])
    assert assoc.is_established
    try:
        [node_side] = wait_for(lambda: list(node.scp._assoc_ids.keys()), timeout=5, what="the node's association")
        tracker = spool.tracker_of(node_side)
        assert tracker is not None
        held = []
        for ds in objects:
            assert assoc.send_c_store(ds).Status == 0
            held.append(len(tracker.files))
    finally:
        assoc.release()
    assert held == [0, 0, 0, 0]
    wait_for(lambda: node.scp.counters.instances == 4, timeout=5, what="the instances to be counted")
    assert list(node.store.incoming.iterdir()) == []


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (needs root and mount): a disk that really fills."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()}); the injected variant runs instead")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("disk", ["tmpfs", "injected"])
def test_a_full_disk_while_spooling_answers_out_of_resources(disk: str, start_node, request, monkeypatch,
                                                             capfd) -> None:
    """ENOSPC while pynetdicom writes the spool file killed its reader thread (a raw
    traceback on stderr), and the sender got no answer. Now the rest of the data set is
    read and dropped, the C-STORE answered 0xA700 with one log line, the file removed,
    and the space given back: the next object is stored."""
    if disk == "tmpfs":
        node = start_node(storage_dir=str(request.getfixturevalue("small_tmpfs") / "storage"))
    else:
        import tempfile

        from echonode.receive import spool

        calls = {"n": 0}

        def filling(*args: object, **kwargs: object) -> object:
            calls["n"] += 1
            f = tempfile.NamedTemporaryFile(*args, **kwargs)  # type: ignore[call-overload]  # noqa: SIM115
            return FullDisk(f, 4 << 20) if calls["n"] == 1 else f

        monkeypatch.setattr(spool, "_new_temp_file", filling)
        node = start_node()
    big, small = us_multiframe(frames=40, rows=480, cols=640), us_multiframe()  # 12 MB, 32 KiB
    with capture_logs() as logs:
        assoc = scu_associate(node.scp.port, [big])
        assert assoc.is_established
        try:
            rsp = assoc.send_c_store(big)
            assert rsp is not None and "Status" in rsp, "no answer"
            assert int(rsp.Status) == 0xA700
            assert int(assoc.send_c_store(small).Status) == 0
        finally:
            assoc.release()
    [line] = events(logs, "store.refused_disk_full")
    assert line["stage"] == "spool" and line["error"] == "ENOSPC"
    assert node.scp.counters.failures == {"out_of_disk": 1}
    assert list(node.store.incoming.iterdir()) == []
    assert [r.sop_uid for r in node.journal.instances()] == [str(small.SOPInstanceUID)]
    assert "Traceback" not in capfd.readouterr().err


def test_an_exception_in_the_protocol_machine_aborts_the_association(start_node, sockets, capfd) -> None:
    """A C-STORE command on a presentation context that was never accepted makes
    pynetdicom's message decoder raise in its reader thread, which died of it (a raw
    traceback, the half-opened spool file left). Now: A-ABORT, one log line, file removed."""
    node = start_node()
    ds = us_multiframe()
    with capture_logs() as logs:
        s = associate(node.scp.port, sockets, abstract_syntax=US_MULTIFRAME, transfer_syntaxes=(raw.EXPLICIT_VR_LE,))
        s.sendall(raw.p_data(3, 0x03, raw.store_rq_command(ds.SOPClassUID, ds.SOPInstanceUID)))
        _, pdus = raw.wait_closed(s, timeout=10)
        wait_for(lambda: not node.scp.active_associations(), timeout=10, what="the association to end")
        wait_for(lambda: not list(node.store.incoming.iterdir()), timeout=10, what="the spool file to go")
    assert [p.abort_source_reason for p in pdus] == [(2, 0)]
    [line] = events(logs, "association.failed")
    assert line["log_level"] == "error" and line["exc_info"]  # logs.py renders it as type and frames
    assert node.scp.counters.aborted == {"failed": 1}
    assert "Traceback" not in capfd.readouterr().err


# -- 6. AE titles: only spaces are padding ------------------------------------------------


@pytest.mark.parametrize(
    "calling, called, answer, reason",
    [
        (b"CART1", b"ECHONODE", "accepted", None),
        (b"  CART1", b"ECHONODE  ", "accepted", None),
        (b"CART1\t", b"ECHONODE", (1, 1, 3), "calling AE title is not a valid AE title"),
        (b"CART1\n", b"ECHONODE", (1, 1, 3), "calling AE title is not a valid AE title"),
        (b"\tCART1", b"ECHONODE", (1, 1, 3), "calling AE title is not a valid AE title"),
        (b"CART2", b"ECHONODE", (1, 1, 3), "calling AE title not allowed"),
        (b"CART1", b"ECHONODE\r", (1, 1, 7), "called AE title is not a valid AE title"),
    ],
)
def test_ae_titles_are_compared_without_their_space_padding_only(start_node, sockets, calling: bytes,
                                                                 called: bytes, answer, reason) -> None:
    """pynetdicom strips AE titles with str.strip(): "CART1\\t" passed an allow-list
    of ["CART1"]. A control character is refused, logged escaped, and counted."""
    node = start_node(allowed_calling_aets=["CART1"])
    with capture_logs() as logs:
        s = connect(node.scp.port, sockets)
        s.sendall(raw.associate_rq(calling=calling, called=called))
        got = raw.read_pdu(s)
    assert got is not None
    if answer == "accepted":
        assert got.type == raw.ASSOCIATE_AC
        assert node.scp.counters.rejected == 0
        return
    assert got.type == raw.ASSOCIATE_RJ and got.reject == answer
    [line] = events(logs, "association.rejected")
    assert line["reason"] == reason
    assert line["calling_ae"] == repr(calling.strip(b" "))[2:-1]  # "CART1\\t": printable, escaped
    assert node.scp.counters.rejected == 1


@pytest.mark.parametrize(
    ("rq", "reason"),
    [
        ({"transfer_syntaxes": ()}, "malformed presentation context: context 1 proposes no transfer syntax"),
        ({"application_context": b"1.2.3.4"}, "not the DICOM application context"),
    ],
)
def test_a_malformed_association_request_is_rejected_not_left_hanging(start_node, sockets, rq, reason) -> None:
    """pynetdicom's negotiation raised on a context without a transfer syntax: the peer got no
    answer and its connection, with a thread, stayed open as long as the peer wanted."""
    node = start_node(acse_timeout_s=600.0, network_timeout_s=600.0)
    before = threading.active_count()
    with capture_logs() as logs:
        held = []
        for _ in range(20):
            s = connect(node.scp.port, sockets)
            s.sendall(raw.associate_rq(**rq))
            got = raw.read_pdu(s)
            expected = (1, 1, 2) if "application_context" in rq else (1, 1, 1)
            assert got is not None and got.type == raw.ASSOCIATE_RJ and got.reject == expected, got
            held.append(s)
        # The node closes each one: nothing is held for a peer that keeps its socket open.
        for s in held:
            raw.wait_closed(s, timeout=5)
        assert c_echo(node.scp.port) == 0
    lines = events(logs, "association.rejected")
    assert len(lines) == 20 and {line["reason"] for line in lines} == {reason}
    assert node.scp.counters.rejected == 20
    wait_for(lambda: threading.active_count() <= before + 1, timeout=10, what="the rejected connections' threads")


def test_malformed_context_names_what_is_wrong() -> None:
    from pynetdicom.presentation import PresentationContext

    from echonode.network.contexts import malformed_context

    def cx(cid: int, abstract: str | None = "1.2.840.10008.1.1", *syntaxes: str) -> PresentationContext:
        context = PresentationContext()
        context.context_id = cid
        if abstract is not None:
            context.abstract_syntax = abstract
        context.transfer_syntax = list(syntaxes)
        return context

    ts = "1.2.840.10008.1.2"
    assert malformed_context([cx(1, "1.2.840.10008.1.1", ts), cx(3, "1.2.840.10008.1.1", ts)]) is None
    assert malformed_context([]) == "no presentation context proposed"
    assert malformed_context([cx(1, "1.2.840.10008.1.1", ts), cx(1, "1.2.3", ts)]) == "context ID 1 is proposed twice"
    assert malformed_context([cx(5, None, ts)]) == "context 5 names no abstract syntax"
    assert malformed_context([cx(7)]) == "context 7 proposes no transfer syntax"


@pytest.mark.parametrize("context_id", [0, 2, 254])
def test_an_even_presentation_context_id_is_aborted_as_an_invalid_parameter(start_node, sockets,
                                                                         context_id: int) -> None:
    """An even ID made pynetdicom raise in its state machine: a raw traceback, and the acceptor
    negotiated the abort that followed as if it were the request."""
    node = start_node(acse_timeout_s=600.0, network_timeout_s=600.0)
    with capture_logs() as logs:
        s = connect(node.scp.port, sockets)
        s.sendall(raw.associate_rq(context_id=context_id))
        got = raw.read_pdu(s)
        assert got is not None and got.type == raw.ABORT and got.abort_source_reason == (2, 6), got
        raw.wait_closed(s, timeout=5)
        assert c_echo(node.scp.port) == 0
    [line] = events(logs, "association.bad_pdu")
    assert line["reason"] == f"presentation context ID {context_id} is not an odd number from 1 to 255"


@pytest.mark.parametrize("first", ["p_data", "release"])
def test_a_pdu_before_the_request_is_aborted_with_a_log_line(start_node, sockets, first: str) -> None:
    node = start_node(acse_timeout_s=600.0, network_timeout_s=600.0)
    pdu = raw.p_data(1, 0x03, raw.echo_rq_command()) if first == "p_data" else raw.RELEASE_RQ_PDU
    with capture_logs() as logs:
        s = connect(node.scp.port, sockets)
        s.sendall(pdu)
        _, pdus = raw.wait_closed(s, timeout=5)
        assert c_echo(node.scp.port) == 0
    assert [(p.type, p.abort_source_reason) for p in pdus] == [(raw.ABORT, (2, 2))]
    [line] = events(logs, "association.bad_pdu")
    assert line["reason"] == "a PDU other than an A-ASSOCIATE-RQ before the request"
    assert line["pdu_type"] == ("P-DATA-TF" if first == "p_data" else "A-RELEASE-RQ")


def test_pdv_command_bytes_are_counted_per_command() -> None:
    two_pdvs = raw.p_data(1, 0x01, b"x" * 100) + raw.p_data(1, 0x00, b"d" * 50)[6:]
    # The second PDV is data: only the command's 100 bytes count, and the command is still open.
    assert pdu_guard.command_bytes(raw.pdu(raw.P_DATA_TF, two_pdvs[6:]), 40) == (140, 140)
    # Its last fragment completes it: the count starts again, but the size it reached is reported.
    assert pdu_guard.command_bytes(raw.p_data(1, 0x03, b"x" * 30), 140) == (170, 0)
    # A PDV claiming more than the PDU holds counts what is there.
    cut = raw.pdu(raw.P_DATA_TF, struct.pack(">IBB", 1000, 1, 0x01) + b"x" * 10)
    assert pdu_guard.command_bytes(cut, 0) == (10, 10)


def test_a_command_that_never_ends_is_aborted_before_it_fills_memory(start_node, sockets) -> None:
    """pynetdicom holds a command set in memory until its last fragment: 200 MiB of
    fragments grew the node by 200 MiB. Past MAX_COMMAND_BYTES the association is aborted."""
    node = start_node(max_pdu=16384, network_timeout_s=30.0)
    with capture_logs() as logs:
        s = associate(node.scp.port, sockets)
        pdus = raw.send_endless_command(s, 4 * pdu_guard.MAX_COMMAND_BYTES)
        assert c_echo(node.scp.port) == 0
    assert any(p.type == raw.ABORT and p.abort_source_reason == (2, 6) for p in pdus), pdus
    [line] = events(logs, "association.command_too_large")
    assert pdu_guard.MAX_COMMAND_BYTES < line["received_bytes"] <= pdu_guard.MAX_COMMAND_BYTES + raw.COMMAND_FRAGMENT
    assert node.scp.counters.aborted.get("command_too_large") == 1


# -- 7. a C-STORE without a data set -----------------------------------------------------


def test_a_store_without_a_data_set_gets_a_clear_status(start_node, sockets) -> None:
    from echonode.receive.scp import NO_DATA_SET

    node = start_node()
    ds = us_multiframe()
    with capture_logs() as logs:
        s = associate(node.scp.port, sockets, abstract_syntax=US_MULTIFRAME, transfer_syntaxes=(raw.EXPLICIT_VR_LE,))
        s.sendall(raw.p_data(1, 0x03, raw.store_rq_command(ds.SOPClassUID, ds.SOPInstanceUID, with_data_set=False)))
        rsp = raw.read_command(s)
        # The association goes on.
        s.sendall(raw.p_data(1, 0x03, raw.store_rq_command(ds.SOPClassUID, ds.SOPInstanceUID, message_id=2)))
        s.sendall(raw.p_data(1, 0x02, encode(ds, False, True)))
        second = raw.read_command(s)
        s.sendall(raw.RELEASE_RQ_PDU)
    assert rsp.Status == 0xC210 and rsp.ErrorComment == NO_DATA_SET[:64]  # type: ignore[attr-defined]
    assert second.Status == 0  # type: ignore[attr-defined]
    [line] = events(logs, "store.refused")
    assert line["status"] == "0xC210" and line["error"] == NO_DATA_SET
    assert node.scp.counters.failures == {"0xC210": 1}


def test_a_store_on_another_class_s_context_is_refused(start_node, sockets) -> None:
    """A C-STORE sent on the Verification context, or naming another class than its context's,
    was stored: PS3.7 sends each on a context of its own SOP class (0x0122 otherwise)."""
    node = start_node()
    ds = us_multiframe()
    with capture_logs() as logs:
        on_verification, other_class = raw.stores_on_wrong_contexts(
            lambda **rq: associate(node.scp.port, sockets, **rq), ds)
    assert on_verification.Status == 0x0122 and other_class.Status == 0x0122  # type: ignore[attr-defined]
    lines = events(logs, "store.refused")
    assert [line["status"] for line in lines] == ["0x0122", "0x0122"]
    assert lines[1]["sop_class"] == raw.CT_IMAGE and lines[1]["context_sop_class"] == US_MULTIFRAME.decode()
    assert node.scp.counters.instances == 0


def test_a_data_set_of_another_class_than_the_request_is_refused(start_node, sockets) -> None:
    """The request names US Multi-frame, the data set says CT: the stored file's meta header
    would have said one and its data set the other (0xA900, as for a differing instance UID)."""
    node = start_node()
    ds = us_multiframe()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    with capture_logs() as logs:
        s = associate(node.scp.port, sockets, abstract_syntax=US_MULTIFRAME, transfer_syntaxes=(raw.EXPLICIT_VR_LE,))
        s.sendall(raw.p_data(1, 0x03, raw.store_rq_command(US_MULTIFRAME.decode(), ds.SOPInstanceUID)))
        s.sendall(raw.p_data(1, 0x02, encode(ds, False, True)))
        rsp = raw.read_command(s)
        s.sendall(raw.RELEASE_RQ_PDU)
    assert rsp.Status == 0xA900  # type: ignore[attr-defined]
    [line] = events(logs, "store.refused")
    assert line["error"] == "SOPClassUID in the data set differs from the C-STORE request's"
    assert node.scp.counters.instances == 0


def test_protocol_aborts_are_exported_as_metrics(start_node, sockets) -> None:
    from echonode.ops.prometheus import NodeCollector

    node = start_node()
    s = connect(node.scp.port, sockets)
    s.sendall(raw.header(raw.ASSOCIATE_RQ, GIB2))
    raw.wait_closed(s, timeout=10)
    fams = {f.name: f for f in NodeCollector(node).collect()}
    samples = {tuple(x.labels.items()): x.value for x in fams["echonode_associations_aborted"].samples}
    assert samples[(("reason", "pdu_too_large"),)] == 1


def test_ended_associations_are_not_kept_alive(start_node, sockets) -> None:
    """Each association is garbage once it has ended: a registry keyed by it that its
    guard referred back to kept every one (1.4 MiB each) for the node's life."""
    import gc

    from pynetdicom.association import Association

    def alive() -> int:
        gc.collect()
        return sum(isinstance(o, Association) and o.is_acceptor for o in gc.get_objects())

    node = start_node()
    before = alive()
    for i in range(20):
        if i % 2:
            s = connect(node.scp.port, sockets)
            s.sendall(raw.header(raw.ASSOCIATE_RQ, GIB2))
        else:
            s = associate(node.scp.port, sockets)
            s.sendall(raw.header(raw.P_DATA_TF, GIB2))
        raw.wait_closed(s, timeout=10)
        s.close()
    wait_for(lambda: node.scp.active_associations() == 0, timeout=10, what="the associations to end")
    time.sleep(0.5)  # the connection threads' clean-up
    assert alive() - before < 5
