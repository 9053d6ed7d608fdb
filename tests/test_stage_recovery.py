"""kill -9 at each stage of a study's life, restart: nothing acknowledged is lost, one SR per study.

``echonode serve`` runs as a subprocess in its own session (node and worker,
as systemd's cgroup holds them); the test watches the journal (SQLite, read
while the node writes) until a study reaches the stage, then SIGKILLs the
whole group and starts the node again on the same storage. The PACS is a
pynetdicom SCP in the test process that records every SR it is sent: a
resend of the *same* SR (same SOP Instance UID) after a kill while sending
is expected; two different SRs for one study are not.

tests/test_recovery.py kills the node in the middle of transfers; here the
stages after receiving are the point.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from echonode.config import Config, to_toml
from echonode.delivery.dimse import Peer, echo
from echonode.delivery.outcome import DeliveryError
from tests.conftest import (
    REPO,
    echonode_cmd,
    free_port,
    make_config,
    wait_for,
    with_destination,
)
from tests.factories import tiny_bundle, us_multiframe
from tests.test_delivery import RecordingSCP

STAGES = ("receiving", "stable", "queued", "running", "sending")


class SlowPACS(RecordingSCP):
    """A RecordingSCP that can hold its answer to a C-STORE (to kill the node while it waits)."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.hold = threading.Event()  # set: hold the next answer until released
        self.holding = threading.Event()
        self.release = threading.Event()

    def _on_store(self, event):  # type: ignore[no-untyped-def]
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
        try:
            return echo("CART", Peer(self.cfg.node.ae_title, "127.0.0.1", self.cfg.node.port), timeout_s=2) == 0
        except DeliveryError:
            return False

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
    return dict(journal_rows(cfg, "SELECT study_uid, state FROM studies"))


def send_studies(port: int, studies: list[list[pydicom.Dataset]]) -> set[str]:
    """C-STORE every object (one association per study); return the acknowledged SOP Instance UIDs."""
    acked = set()
    ae = AE(ae_title="CART")
    ae.add_requested_context(studies[0][0].SOPClassUID, studies[0][0].file_meta.TransferSyntaxUID)
    for objs in studies:
        assoc = ae.associate("127.0.0.1", port, ae_title="ECHONODE")
        assert assoc.is_established
        for ds in objs:
            rsp = assoc.send_c_store(ds)
            if "Status" in rsp and rsp.Status == 0:
                acked.add(str(ds.SOPInstanceUID))
        assoc.release()
    return acked


def make_studies(n_studies: int, per_study: int, seed: int = 0) -> list[list[pydicom.Dataset]]:
    out = []
    for s in range(n_studies):
        uid = pydicom.uid.generate_uid()
        out.append([us_multiframe(study_uid=uid, frames=16, rows=64, cols=64, seed=seed + 100 * s + i,
                                  patient_id=f"P{s}") for i in range(per_study)])
    return out


@pytest.fixture
def pacs() -> Iterator[SlowPACS]:
    scp = SlowPACS(free_port())
    scp.start()
    yield scp
    scp.release.set()
    scp.stop()


def _config(tmp_path: Path, pacs_port: int, *, stable_after_s: float = 0.5, max_attempts: int = 3) -> Config:
    cfg = make_config(tmp_path, study={"stable_after_s": stable_after_s, "check_interval_s": 0.1},
                      models={"max_attempts": max_attempts, "threads": 1},
                      delivery={"retry_initial_s": 0.3, "retry_max_s": 1.0, "check_interval_s": 0.1,
                                "timeout_s": 30.0})
    return with_destination(cfg, "pacs", "PACS", pacs_port)


def kill_at(stage: str, tmp_path: Path, pacs: SlowPACS, *, n_studies: int = 2, per_study: int = 2) -> dict:
    """Run one kill at ``stage`` and the restart; assert the invariants; return figures."""
    cfg = _config(tmp_path, pacs.port, stable_after_s=30.0 if stage == "receiving" else 0.5)
    if stage != "stable":  # without a model a complete study waits as "stable"
        tiny_bundle(cfg.models_dir, "lvh", seed=1)
    studies = make_studies(n_studies, per_study)
    study_uids = {str(objs[0].StudyInstanceUID) for objs in studies}
    node = ServedNode(cfg, tmp_path)
    if stage == "sending":
        pacs.hold.set()
    node.start()
    try:
        acked = send_studies(cfg.node.port, studies)
        assert len(acked) == n_studies * per_study

        def reached() -> bool:
            if stage == "sending":
                return pacs.holding.is_set()
            return stage in states(cfg).values()

        wait_for(reached, timeout=120, interval=0.02, what=f"a study in {stage}")
        if stage == "sending" and n_studies > 1:
            # While the PACS holds the first SR the worker runs the next study:
            # try to kill with one study in each of the two last stages.
            deadline = time.monotonic() + 10
            while "running" not in states(cfg).values() and time.monotonic() < deadline:
                time.sleep(0.02)
        at_kill = states(cfg)
        node.kill()
        if stage == "sending":
            assert "reported" in at_kill.values(), at_kill  # the held SR was not acknowledged
        pacs.release.set()
        if stage == "stable":
            tiny_bundle(cfg.models_dir, "lvh", seed=1)
        if stage == "receiving":  # the restarted node need not wait 30 s
            cfg = _config(tmp_path, pacs.port)
            node = ServedNode(cfg, tmp_path)
        node.start()

        def delivered() -> bool:
            st = states(cfg)
            return set(st) == study_uids and all(v == "delivered" for v in st.values())

        wait_for(delivered, timeout=240, interval=0.2, what="every study delivered after the restart")
        # Every acknowledged instance is recorded and on disk.
        rows = journal_rows(cfg, "SELECT sop_uid, path FROM instances")
        assert {r[0] for r in rows} == acked
        assert all(Path(r[1]).exists() for r in rows)
        # One SR per study at the PACS (a resend of the same one is fine), as in the journal.
        time.sleep(0.5)
        got = pacs.sr_uids()
        assert set(got) == study_uids
        assert all(len(uids) == 1 for uids in got.values()), got
        reports = journal_rows(cfg, "SELECT study_uid, sr_sop_uid FROM reports")
        assert {s: {u} for s, u in reports} == got
        outbox = journal_rows(cfg, "SELECT state FROM outbox")
        assert [r[0] for r in outbox] == ["sent"] * n_studies
        assert list((cfg.storage_dir / "incoming").iterdir()) == []
        return {"stage": stage, "states_at_kill": sorted(at_kill.values()), "sr_stores": pacs.stores,
                "distinct_srs": sum(len(u) for u in got.values()), "studies": n_studies, "instances": len(acked)}
    finally:
        node.stop()


def test_kill_while_sending_and_running(tmp_path: Path, pacs: SlowPACS) -> None:
    """The default suite's short version: one kill with an SR at the PACS unanswered
    and (nearly always) the next study running in the worker."""
    figures = kill_at("sending", tmp_path, pacs)
    print(figures)
    # The held SR reached the PACS before the kill and is sent again after it.
    assert figures["sr_stores"] >= figures["distinct_srs"] + 1


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_kill_at_every_stage(stage: str, tmp_path: Path, pacs: SlowPACS) -> None:
    print(kill_at(stage, tmp_path, pacs, n_studies=3, per_study=3))
