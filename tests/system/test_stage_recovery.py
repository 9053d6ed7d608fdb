"""kill -9 at each stage of a study's life, restart: nothing acknowledged is lost, one SR per study.

``echonode serve`` runs as a subprocess in its own session (node and worker,
as systemd's cgroup holds them); the test watches the journal (SQLite, read
while the node writes) until a study reaches the stage, then SIGKILLs the
whole group and starts the node again on the same storage. The PACS is a
pynetdicom SCP in the test process that records every SR it is sent: a
resend of the *same* SR (same SOP Instance UID) after a kill while sending
is expected; two different SRs for one study are not.

tests/system/test_recovery.py kills the node in the middle of transfers; here the
stages after receiving are the point.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from echonode.config import Config
from tests.conftest import free_port, make_config, wait_for, with_destination
from tests.factories import make_studies, tiny_bundle
from tests.peers import ServedNode, SlowPACS, journal_rows, send_studies, states

STAGES = ("receiving", "stable", "queued", "running", "sending")


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
