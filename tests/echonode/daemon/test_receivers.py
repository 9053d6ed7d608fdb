"""Several receiving processes on one port (``[node] receivers``, SO_REUSEPORT).

Many carts at once: every object acknowledged is stored and recorded once,
whichever process took its connection; a study's lock holds across the
processes; a receiver killed with -9 is restarted and the associations it had
open are ended in the journal (so ``study.after_release_s`` falls back on the
quiet rule for them instead of waiting for ever).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from echonode.config import ConfigError
from echonode.daemon.node import Node
from echonode.studies.locks import StudyLocks
from tests.conftest import make_config
from tests.factories import us_multiframe
from tests.peers import STORESCU, require_tool, wait_for

CT = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage


def test_receivers_setting(tmp_path: Path) -> None:
    assert make_config(tmp_path).node.receivers == 1
    with pytest.raises(ConfigError, match="node.receivers"):
        make_config(tmp_path, node={"receivers": 0})


def _hold(folder: str, study: str, held: mp.Event, release: mp.Event) -> None:
    locks = StudyLocks(folder)
    with locks.hold(study):
        held.set()
        release.wait(30)


def _hold_until_killed(folder: str, study: str, held: mp.Event) -> None:
    locks = StudyLocks(folder)
    with locks.hold(study):
        held.set()
        # A plain sleep: a process killed inside an Event's wait would leave
        # that Event unusable for the test (see echonode.daemon.workerlink).
        time.sleep(120)


def test_a_study_lock_holds_across_processes(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold, args=(str(tmp_path), "1.2.3", held, release))
    child.start()
    try:
        assert held.wait(60)
        locks = StudyLocks(tmp_path)
        got = threading.Event()

        def take() -> None:
            with locks.hold("1.2.3"):
                got.set()

        t = threading.Thread(target=take, daemon=True)
        t.start()
        assert not got.wait(1.0), "the lock was taken while another process held it"
        release.set()
        assert got.wait(30)
        # A process that dies holding a stripe releases it (the kernel drops its flock).
        child.join(30)
        killed_held = ctx.Event()
        killed = ctx.Process(target=_hold_until_killed, args=(str(tmp_path), "1.2.3", killed_held))
        killed.start()
        assert killed_held.wait(60)
        os.kill(killed.pid, signal.SIGKILL)
        killed.join(30)
        with locks.hold("1.2.3"):
            pass
    finally:
        release.set()
        child.join(30)


def _objects(tmp_path: Path, n_studies: int, per_study: int) -> list[list[Path]]:
    out = []
    for s in range(n_studies):
        uid = pydicom.uid.generate_uid()
        files = []
        for i in range(per_study):
            p = tmp_path / "in" / f"s{s}-{i}.dcm"
            p.parent.mkdir(exist_ok=True)
            us_multiframe(study_uid=uid, frames=2, rows=32, cols=32, seed=100 * s + i).save_as(
                p, enforce_file_format=True)
            files.append(p)
        out.append(files)
    return out


def _receiver_pids(node: Node) -> list[int]:
    return [r.process.pid for r in node.receivers.receivers if r.process is not None and r.process.is_alive()]


def _text(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def _accepted_by(log: Path) -> dict[str, int]:
    """``store.accepted`` lines of the receiver processes, by receiver."""
    counts: dict[str, int] = {}
    for line in _text(log).splitlines():
        if '"store.accepted"' in line:
            counts[str(json.loads(line).get("receiver"))] = counts.get(str(json.loads(line).get("receiver")), 0) + 1
    return counts


def test_many_carts_at_once_on_two_receivers(tmp_path: Path) -> None:
    require_tool(STORESCU)
    cfg = make_config(tmp_path, node={"receivers": 2})
    log = tmp_path / "receivers.log"
    node = Node(cfg, start_worker=False, worker_log_path=str(log))
    node.start()
    try:
        wait_for(lambda: len(_receiver_pids(node)) == 1 and '"receiver.started"' in _text(log), timeout=60,
                 what="the receiver process listening")
        batches = _objects(tmp_path, 16, 2)
        procs = [subprocess.Popen([STORESCU, "-aet", "CART", "-aec", cfg.node.ae_title, "127.0.0.1",
                                   str(cfg.node.port), *map(str, b)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE) for b in batches]
        for p in procs:
            _out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for b in batches for f in b}
        records = node.journal.instances()
        assert {r.sop_uid for r in records} == sops and len(records) == len(sops)
        assert all(Path(r.path).exists() for r in records)
        # The kernel spread the 16 connections: the receiver process took some, the node's own SCP the rest.
        in_receiver = _accepted_by(log).get("1", 0)
        assert 0 < in_receiver < len(sops)
        assert node.scp.counters.instances == len(sops) - in_receiver
        # The metrics count every listener (a receiver hands its counts over every second).
        wait_for(lambda: node.receive_counters().instances == len(sops), timeout=30, what="the counts of all")
        assert node.receive_counters().associations == len(batches)
    finally:
        node.stop()
    assert _receiver_pids(node) == []


def test_a_receiver_killed_mid_association_is_restarted_and_its_association_ended(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, node={"receivers": 2},
                      study={"stable_after_s": 0.5, "after_release_s": 3600.0, "check_interval_s": 0.1})
    log = tmp_path / "receivers.log"
    node = Node(cfg, start_worker=False, worker_log_path=str(log))
    node.start()
    try:
        wait_for(lambda: len(_receiver_pids(node)) == 1 and '"receiver.started"' in _text(log), timeout=60,
                 what="the receiver process listening")
        (pid,) = _receiver_pids(node)
        # Open associations until one lands in the receiver process and stores an object there.
        ae = AE(ae_title="CART")
        ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
        held = []
        study = None
        for i in range(40):
            assoc = ae.associate("127.0.0.1", cfg.node.port, ae_title="ECHONODE")
            assert assoc.is_established
            ds = us_multiframe(frames=2, rows=32, cols=32, seed=i)
            assert assoc.send_c_store(ds).Status == 0
            held.append(assoc)
            if _accepted_by(log).get("1"):
                study = str(ds.StudyInstanceUID)
                break
        assert study is not None, "no connection reached the receiver process"
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: (node.loop_once(), _receiver_pids(node) not in ([], [pid]))[1], timeout=60,
                 what="the receiver restarted")
        assert node.receivers.restarts == 1
        # Its association was cut: the study falls back on the quiet rule and completes.
        wait_for(lambda: node.journal.study_state(study) == "stable", timeout=30, what="the study complete")
        for assoc in held:
            assoc.release() if assoc.is_established else None
    finally:
        node.stop()


def test_reload_restarts_the_receivers_with_the_new_settings(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, node={"receivers": 2})
    node = Node(cfg, start_worker=False, worker_log_path=str(tmp_path / "receivers.log"))
    node.start()
    try:
        wait_for(lambda: len(_receiver_pids(node)) == 1, timeout=60, what="the receiver process")
        (first,) = _receiver_pids(node)
        node.receivers.apply_config(cfg)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and _receiver_pids(node) in ([], [first]):
            node.loop_once()
            time.sleep(0.1)
        assert _receiver_pids(node) not in ([], [first])
        assert node.receivers.restarts == 0  # a reload, not a death
    finally:
        node.stop()
