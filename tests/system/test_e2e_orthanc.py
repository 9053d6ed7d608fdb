"""End to end with Orthanc as the PACS.

Orthanc holds the real echo loop, sends the study to a running echonode (SCP,
worker, scheduler) by C-STORE; echonode classifies it and sends the SR back
into the same study. Orthanc runs in the foreground as a subprocess with its
own storage under ``tmp_path``; REST on loopback only.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from echonode.daemon.node import Node
from echonode.report.read import summarise_report
from echonode.report.summary import reported_probability
from echonode.studies.states import StudyState
from tests.conftest import free_port, make_config, wait_for, with_destination
from tests.factories import tiny_bundle
from tests.peers import ORTHANC, ORTHANC_DICOMWEB, Orthanc, require_tool


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator:
    """Start Orthanc instances; every one is stopped at the end of the test."""
    require_tool(ORTHANC)
    started: list[Orthanc] = []

    def make(node_port: int, **kwargs: Any) -> Orthanc:
        if kwargs.get("dicomweb"):
            require_tool(ORTHANC_DICOMWEB)
        o = Orthanc(tmp_path / f"orthanc{len(started)}", node_port, **kwargs)
        started.append(o)
        return o.start()

    yield make
    for o in started:
        o.stop()


def _node_config(tmp_path: Path, node_port: int, orthanc: Orthanc, stable_after_s: float = 0.5):
    cfg = make_config(
        tmp_path,
        node={"port": node_port},
        study={"stable_after_s": stable_after_s, "check_interval_s": 0.2},
        delivery={"retry_initial_s": 0.5, "retry_max_s": 1.0, "check_interval_s": 0.2, "timeout_s": 5.0},
    )
    cfg = with_destination(cfg, "orthanc", "ORTHANC", orthanc.dicom_port)
    tiny_bundle(cfg.models_dir, "lvh", seed=1)
    tiny_bundle(cfg.models_dir, "severe_as", seed=2)
    return cfg


def _send_to_node(orthanc: Orthanc, loop: Path) -> str:
    """Upload the loop to Orthanc and have Orthanc C-STORE its study to echonode; the Orthanc study ID."""
    up = orthanc.upload(loop)
    study_id = up["ParentStudy"]
    job = orthanc.post("/modalities/echonode/store", {"Resources": [study_id], "Synchronous": True})
    assert job.get("FailedInstancesCount", 0) == 0, job
    assert job.get("InstancesCount") == 1, job
    return study_id


def _wait_study(node: Node, study_uid: str, predicate, timeout: float, what: str) -> None:
    def check() -> bool:
        node.worker.supervise()
        return bool(predicate())

    wait_for(check, timeout=timeout, what=what)


def test_orthanc_sends_study_and_gets_the_sr_back(tmp_path: Path, ybr_loop: Path, orthanc_factory) -> None:
    node_port = free_port()
    orthanc = orthanc_factory(node_port)
    cfg = _node_config(tmp_path, node_port, orthanc)
    node = Node(cfg)
    node.start()
    try:
        # Orthanc and echonode see each other.
        orthanc.request("POST", "/modalities/echonode/echo", b"{}")
        src = pydicom.dcmread(ybr_loop, stop_before_pixels=True)
        study_uid = str(src.StudyInstanceUID)
        study_id = _send_to_node(orthanc, ybr_loop)

        sr_ids = wait_for(lambda: (node.worker.supervise(), orthanc.sr_instances(study_id))[1], timeout=60,
                          what="the SR to arrive in Orthanc's study")
        wait_for(lambda: node.journal.study_state(study_uid) == StudyState.DELIVERED, timeout=10,
                 what="the study to be marked delivered")
        (sr_id,) = sr_ids
        # The SR joined the source's study: one study in Orthanc, two series.
        assert orthanc.get("/studies") == [study_id]
        assert len(orthanc.get(f"/studies/{study_id}/series")) == 2
        path = tmp_path / "sr.dcm"
        path.write_bytes(orthanc.request("GET", f"/instances/{sr_id}/file"))
        sr = pydicom.dcmread(path)
        assert sr.Modality == "SR"
        assert str(sr.StudyInstanceUID) == study_uid
        assert sr.PatientID == src.PatientID
        assert str(sr.PatientName) == str(src.PatientName)
        report = node.journal.latest_report(study_uid)
        assert str(sr.SOPInstanceUID) == report.sr_sop_uid
        assert sr == pydicom.dcmread(report.path)  # the data set echonode wrote, element for element

        summary = summarise_report(path)
        assert summary["study_uid"] == study_uid
        assert str(src.SOPInstanceUID) in summary["evidence"]
        recorded = {r["task"]: r for r in node.journal.status()["studies"][0]["results"]}
        found = {f["task"]: f for f in summary["findings"]}
        assert set(found) == set(recorded) == {"lvh", "severe_as"}
        for task, f in found.items():
            # 3 decimals, rounded toward its own side of the threshold (0.49976 under 0.5 reads 0.499).
            rec = recorded[task]
            assert f["probability"] == pytest.approx(reported_probability(rec["probability"], rec["threshold"]))
            assert f["present"] == recorded[task]["positive"]
            assert f["model_name"] == recorded[task]["model"]
        (row,) = node.journal.status()["outbox"]
        assert (row["destination"], row["state"], row["attempts"]) == ("orthanc", "sent", 1)
        # Orthanc takes Comprehensive 3D SR (the IHE AI Results IOD) at association: no fallback.
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
        assert (row["sent_sop_class_uid"], row["sent_sop_uid"]) == (sr.SOPClassUID, report.sr_sop_uid)
    finally:
        node.stop()


def test_orthanc_down_when_sr_is_due_gets_it_once(tmp_path: Path, ybr_loop: Path, orthanc_factory) -> None:
    node_port = free_port()
    orthanc = orthanc_factory(node_port)
    # Quiet time long enough for Orthanc's shutdown (seconds) to finish
    # before the study is complete: the SR must find the PACS gone.
    cfg = _node_config(tmp_path, node_port, orthanc, stable_after_s=8.0)
    node = Node(cfg)
    node.start()
    try:
        study_uid = str(pydicom.dcmread(ybr_loop, stop_before_pixels=True).StudyInstanceUID)
        study_id = _send_to_node(orthanc, ybr_loop)
        orthanc.stop()  # the PACS goes away before the SR is ready
        assert node.journal.latest_report(study_uid) is None, "the study completed before Orthanc stopped"

        def retried() -> bool:
            rows = node.journal.status()["outbox"]
            return bool(rows) and rows[0]["attempts"] >= 2

        _wait_study(node, study_uid, retried, 60, "the SR delivery to fail and be retried")
        row = node.journal.status()["outbox"][0]
        assert row["state"] == "pending" and "cannot connect" in row["last_error"]
        assert node.journal.study_state(study_uid) == StudyState.REPORTED

        orthanc.start()  # same ports, same storage
        sr_ids = wait_for(lambda: orthanc.sr_instances(study_id), timeout=30, what="the SR after Orthanc's restart")
        wait_for(lambda: node.journal.study_state(study_uid) == StudyState.DELIVERED, timeout=10,
                 what="the study to be marked delivered")
        time.sleep(1.0)  # a few more delivery passes: nothing else goes out
        assert len(orthanc.sr_instances(study_id)) == len(sr_ids) == 1
        report = node.journal.latest_report(study_uid)
        sr = orthanc.get(f"/instances/{sr_ids[0]}/simplified-tags")
        assert sr["SOPInstanceUID"] == report.sr_sop_uid

        # The node crashes after Orthanc stored the SR but before the outbox row
        # was marked sent: the same SR goes again and Orthanc still has one.
        attempts = node.journal.status()["outbox"][0]["attempts"]
        con = sqlite3.connect(cfg.journal_path)
        with con:
            con.execute("UPDATE outbox SET state = 'pending', sent_at = NULL, next_attempt = 0")
            con.execute("UPDATE studies SET state = 'reported'")
        con.close()
        wait_for(lambda: node.journal.status()["outbox"][0]["state"] == "sent", timeout=10,
                 what="the resend after the simulated crash")
        assert node.journal.status()["outbox"][0]["attempts"] == attempts + 1
        assert orthanc.sr_instances(study_id) == sr_ids
        assert node.journal.study_state(study_uid) == StudyState.DELIVERED
    finally:
        node.stop()
