"""``study.after_release_s``: a study is complete that long after the association that brought it was released.

The rule in the journal (no association open, the last one released, the
quiet rule otherwise), then over the network with pynetdicom and dcmtk's
storescu as the cart, and across a kill -9 of the node between the release
and the completion: the release was committed before the A-RELEASE-RP went,
so the restarted node completes the study by it, not by the quiet period.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from echonode.daemon.node import Node
from echonode.studies.journal import Journal
from echonode.studies.records import InstanceRecord
from echonode.studies.states import StudyState
from tests.conftest import make_config
from tests.factories import us_multiframe
from tests.peers import (
    STORESCU,
    ServedNode,
    journal_rows,
    require_tool,
    states,
    wait_for,
)

HOUR = 3600.0


def _instance(journal: Journal, study: str, n: int, at: float, association: str | None) -> None:
    journal.record_instance(
        InstanceRecord(f"{study}.9.{n}", study, "1.2.5", "1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.1.2.1",
                       f"/x/{study}-{n}.dcm", 1, at, "CART"),
        association,
    )


# -- the rule -----------------------------------------------------------------------------------


def test_the_rule(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.db")
    t = 1_000_000.0
    _instance(j, "1.1", 1, t, "run-1")  # one association, released
    _instance(j, "1.2", 1, t, "run-2")  # still open
    _instance(j, "1.3", 1, t, "run-3")  # aborted
    _instance(j, "1.4", 1, t, "run-4")  # released, then one more without an association
    _instance(j, "1.5", 1, t, "run-5")  # two associations: one released, one open
    _instance(j, "1.5", 2, t, "run-6")
    assert j.association_ended("run-1", released=True, now=t + 1) == 1
    assert j.association_ended("run-3", released=False, now=t + 1) == 1
    assert j.association_ended("run-4", released=True, now=t + 1) == 1
    _instance(j, "1.4", 2, t + 2, None)
    assert j.association_ended("run-5", released=True, now=t + 1) == 1
    assert j.association_ended("run-5", released=True, now=t + 2) == 0  # once

    # Without the setting: the quiet rule alone, whatever the associations.
    assert j.mark_stable(HOUR, now=t + 100) == []
    # With it: 10 s after the release, though far from quiet for an hour.
    assert j.mark_stable(HOUR, now=t + 10, after_release_s=10.0) == []
    assert j.mark_stable(HOUR, now=t + 11, after_release_s=10.0) == ["1.1"]
    # An open association holds its study, however quiet (the other rows fall back on the quiet rule).
    assert sorted(j.mark_stable(5.0, now=t + 100, after_release_s=10.0)) == ["1.3", "1.4"]
    assert j.study_state("1.2") == j.study_state("1.5") == StudyState.RECEIVING
    # A restart ends what was open: counted as aborted, the quiet rule decides.
    assert j.end_open_associations(now=t + 200) == 2
    assert sorted(j.mark_stable(HOUR, now=t + 300, after_release_s=10.0)) == []
    assert sorted(j.mark_stable(5.0, now=t + 300, after_release_s=10.0)) == ["1.2", "1.5"]
    # Nothing is kept for a study once it is complete.
    assert journal_rows_of(j) == []


def journal_rows_of(j: Journal) -> list:
    return j._connect().execute("SELECT * FROM study_associations").fetchall()


def test_a_reopened_study_waits_for_its_new_association(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.db")
    t = 1_000_000.0
    _instance(j, "1.1", 1, t, "run-1")
    j.association_ended("run-1", released=True, now=t + 1)
    assert j.mark_stable(HOUR, now=t + 2, after_release_s=1.0) == ["1.1"]
    _instance(j, "1.1", 2, t + 3, "run-2")  # a late instance re-opens it
    assert j.study_state("1.1") == StudyState.RECEIVING
    assert j.mark_stable(HOUR, now=t + 10, after_release_s=1.0) == []
    j.association_ended("run-2", released=True, now=t + 11)
    assert j.mark_stable(HOUR, now=t + 12, after_release_s=1.0) == ["1.1"]


# -- over the network -------------------------------------------------------------------------


def _study(tmp_path: Path, n: int = 2) -> tuple[str, list[Path]]:
    uid = pydicom.uid.generate_uid()
    paths = []
    for i in range(n):
        ds = us_multiframe(study_uid=uid, frames=4, rows=32, cols=32, seed=i)
        p = tmp_path / f"obj{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return uid, paths


@pytest.fixture
def node(tmp_path: Path):
    cfg = make_config(tmp_path, study={"stable_after_s": 0.5, "after_release_s": 1.0, "check_interval_s": 0.1})
    n = Node(cfg, start_worker=False)
    n.start()
    yield n
    n.stop()


def test_open_association_holds_the_study_then_its_release_completes_it(node: Node, tmp_path: Path) -> None:
    uid, paths = _study(tmp_path)
    ae = AE(ae_title="CART")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="ECHONODE")
    assert assoc.is_established
    for p in paths:
        assert assoc.send_c_store(pydicom.dcmread(p)).Status == 0
    # Quiet for many times stable_after_s, with several stability passes: still receiving.
    time.sleep(2.0)
    assert node.journal.study_state(uid) == StudyState.RECEIVING
    assoc.release()
    wait_for(lambda: node.journal.study_state(uid) == StudyState.STABLE, timeout=30, what="stable after the release")


def test_an_aborted_association_falls_back_on_the_quiet_rule(node: Node, tmp_path: Path) -> None:
    uid, paths = _study(tmp_path, 1)
    ae = AE(ae_title="CART")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="ECHONODE")
    assert assoc.send_c_store(pydicom.dcmread(paths[0])).Status == 0
    assoc.abort()
    wait_for(lambda: node.journal.study_state(uid) == StudyState.STABLE, timeout=30, what="stable by the quiet rule")
    assert journal_rows_of(node.journal) == []


def test_release_survives_a_kill_9_before_completion(tmp_path: Path) -> None:
    """dcmtk's storescu sends a study and releases; the node is killed at once. No quiet
    period can complete the study (an hour); the recorded release does, after the restart."""
    require_tool(STORESCU)
    cfg = make_config(tmp_path, study={"stable_after_s": HOUR, "after_release_s": 5.0, "check_interval_s": 0.1})
    uid, paths = _study(tmp_path, 3)
    node = ServedNode(cfg, tmp_path).start()
    try:
        subprocess.run([STORESCU, "-aet", "CART", "-aec", cfg.node.ae_title, "127.0.0.1", str(cfg.node.port),
                        *map(str, paths)], check=True, timeout=60, capture_output=True)
        # storescu saw its A-RELEASE-RP: the release is in the journal already.
        node.kill()
        rows = journal_rows(cfg, "SELECT study_uid, released FROM study_associations WHERE ended IS NOT NULL")
        assert rows == [(uid, 1)]
        assert states(cfg)[uid] == "receiving"
        node.start()
        wait_for(lambda: states(cfg).get(uid) == "stable", timeout=60, interval=0.2,
                 what="the study complete by its recorded release")
    finally:
        node.stop()
