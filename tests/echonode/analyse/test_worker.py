"""The worker: a study from the journal to results and an SR; crashes and timeouts recovered."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import pydicom
import pytest
from structlog.testing import capture_logs

import echonode.analyse.worker
from echonode.analyse.worker import handle_claim, process_study
from echonode.bundles.registry import ModelRegistry
from echonode.daemon.node import Node
from echonode.report.header import COPIED_EXACTLY
from echonode.report.read import summarise_report
from echonode.studies.journal import Journal
from echonode.studies.states import StudyState
from echonode.studies.store import StudyStore
from tests.conftest import make_config, wait_for
from tests.factories import tiny_bundle, us_multiframe, write
from tests.peers import c_store


def _stored_study(tmp_path: Path, cfg, files: list[Path]) -> tuple[Journal, StudyStore, str]:
    journal = Journal(cfg.journal_path)
    store = StudyStore(cfg.storage_dir, journal)
    study_uid = ""
    for f in files:
        tmp = store.incoming / f"t-{f.name}"
        tmp.write_bytes(f.read_bytes())
        header, _ = store.accept(tmp, "CART")
        study_uid = header.study_uid
    journal.mark_stable(-1)
    journal.queue_stable()
    return journal, store, study_uid


def test_process_study_end_to_end(tmp_path: Path, ybr_loop: Path) -> None:
    cfg = make_config(tmp_path)
    tiny_bundle(cfg.models_dir, "lvh", seed=1)
    tiny_bundle(cfg.models_dir, "severe_as", seed=2)
    journal, store, study_uid = _stored_study(tmp_path, cfg, [ybr_loop])
    registry = ModelRegistry(cfg.models_dir, "cpu")
    registry.refresh()
    claim = journal.claim_next(os.getpid())
    outcome = process_study(cfg, journal, store, registry, claim)
    # No destinations configured: nothing to send, the study is done.
    assert outcome.state == StudyState.DELIVERED
    report = journal.report_for(study_uid, registry.key)
    summary = summarise_report(report.path)
    assert summary["study_uid"] == study_uid
    assert {f["task"] for f in summary["findings"]} == {"lvh", "severe_as"}
    src = pydicom.dcmread(ybr_loop, stop_before_pixels=True)
    sr = pydicom.dcmread(report.path)
    for key in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate"):
        assert sr.get(key) == src.get(key)
    st = journal.status()["studies"][0]
    assert {r["task"] for r in st["results"]} == {"lvh", "severe_as"}
    assert all(0.0 <= r["probability"] <= 1.0 for r in st["results"])
    # Reprocessing with the same models sends nothing new.
    journal.requeue(study_uid)
    again = process_study(cfg, journal, store, registry, journal.claim_next(os.getpid()))
    assert again.sr_sop_uid == report.sr_sop_uid
    assert len(list((store.reports / study_uid).iterdir())) == 1


def test_new_model_version_supersedes(tmp_path: Path, ybr_loop: Path) -> None:
    cfg = make_config(tmp_path)
    tiny_bundle(cfg.models_dir, "lvh", version="1")
    journal, store, study_uid = _stored_study(tmp_path, cfg, [ybr_loop])
    registry = ModelRegistry(cfg.models_dir, "cpu")
    registry.refresh()
    first = process_study(cfg, journal, store, registry, journal.claim_next(1))
    import shutil

    shutil.rmtree(cfg.models_dir / "test-lvh")
    tiny_bundle(cfg.models_dir, "lvh", version="2", seed=5)
    registry.refresh()
    journal.requeue(study_uid)
    second = process_study(cfg, journal, store, registry, journal.claim_next(1))
    assert second.sr_sop_uid != first.sr_sop_uid
    summary = summarise_report(journal.report_for(study_uid, registry.key).path)
    assert first.sr_sop_uid in str(summary["predecessors"])


def test_conflicting_patient_identity_is_never_reported(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    tiny_bundle(cfg.models_dir, "lvh")
    study = pydicom.uid.generate_uid()
    a = us_multiframe(study_uid=study, frames=16, rows=64, cols=64, patient_id="A1")
    b = us_multiframe(study_uid=study, frames=16, rows=64, cols=64, patient_id="B2", seed=1)
    files = []
    for i, ds in enumerate((a, b)):
        p = tmp_path / f"{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        files.append(p)
    journal, store, study_uid = _stored_study(tmp_path, cfg, files)
    registry = ModelRegistry(cfg.models_dir, "cpu")
    registry.refresh()
    outcome = process_study(cfg, journal, store, registry, journal.claim_next(1))
    assert outcome.state == "failed"
    assert "PatientID" in outcome.reason and "A1" not in outcome.reason
    assert journal.latest_report(study_uid) is None


def test_nothing_usable_is_skipped_with_reason(tmp_path: Path) -> None:
    from tests.conftest import real_testfile

    cfg = make_config(tmp_path, sr={"report_skipped": False})
    tiny_bundle(cfg.models_dir, "lvh")
    journal, store, study_uid = _stored_study(tmp_path, cfg, [real_testfile("OBXXXX1A.dcm")])
    registry = ModelRegistry(cfg.models_dir, "cpu")
    registry.refresh()
    outcome = process_study(cfg, journal, store, registry, journal.claim_next(1))
    assert outcome.state == "skipped"
    assert "no usable video" in outcome.reason
    assert journal.study(study_uid)["reason"] == outcome.reason
    # By default (sr.report_skipped) the study gets an SR that says so, coded.
    cfg2 = dataclasses.replace(cfg, sr=dataclasses.replace(cfg.sr, report_skipped=True))
    journal.requeue(study_uid)
    outcome = process_study(cfg2, journal, store, registry, journal.claim_next(1))
    summary = summarise_report(journal.latest_report(study_uid).path)
    assert "no usable video" in summary["no_usable_video_reason"]
    (finding,) = summary["findings"]
    assert (finding["task"], finding["evaluation"], finding["not_assessed_reason"]) == (
        "lvh", "Undetermined", "no_usable_video")


def test_node_runs_the_worker_and_survives_its_death(tmp_path: Path, ybr_loop: Path) -> None:
    cfg = make_config(tmp_path, study={"stable_after_s": 0.5, "check_interval_s": 0.2})
    tiny_bundle(cfg.models_dir, "lvh")
    node = Node(cfg)
    node.start()
    try:
        # Kill the worker before it has anything to do: the node restarts it.
        pid = node.worker.process.pid
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: (node.worker.supervise(), node.worker.process is not None
                          and node.worker.process.pid != pid)[1], timeout=30, what="worker restart")
        assert c_store(node.scp.port, [ybr_loop]) == [0]
        study = str(pydicom.dcmread(ybr_loop, stop_before_pixels=True).StudyInstanceUID)
        # The receive side answers while the worker runs.
        t0 = time.monotonic()
        from echonode.delivery.dimse import Peer, echo

        assert echo("CART", Peer("ECHONODE", "127.0.0.1", node.scp.port)) == 0
        assert time.monotonic() - t0 < 5
        wait_for(lambda: (node.worker.supervise(), node.journal.study_state(study) == StudyState.DELIVERED)[1],
                 timeout=120, what="study delivered")
    finally:
        node.stop()


def test_study_timeout_kills_worker_then_fails(tmp_path: Path, ybr_loop: Path) -> None:
    cfg = make_config(tmp_path, models={"study_timeout_s": 0.01, "max_attempts": 2})
    tiny_bundle(cfg.models_dir, "lvh")
    journal, store, study_uid = _stored_study(tmp_path, cfg, [ybr_loop])
    from echonode.daemon.supervisor import WorkerSupervisor

    sup = WorkerSupervisor(cfg)
    sup._next_start = 0
    sup.start()
    try:
        def failed() -> bool:
            sup._next_start = 0  # no backoff in the test
            sup.supervise()
            return journal.study_state(study_uid) == StudyState.FAILED

        wait_for(failed, timeout=120, interval=0.05, what="study to fail after repeated timeouts")
        assert "worker died" in journal.study(study_uid)["reason"]
        assert sup.restarts >= 2
    finally:
        sup.stop()


def test_malformed_patient_values_do_not_block_the_report(tmp_path: Path) -> None:
    """A vendor's '1970-01-01' birth date or 'SECRET-SEX' sex: the SR goes out, for the
    same patient and study, with those values emptied and a warning that quotes neither."""
    cfg = make_config(tmp_path)
    tiny_bundle(cfg.models_dir, "lvh")
    ds = us_multiframe(frames=16, patient_name="SECRET^NAME", patient_id="SECRET-ID")
    ds.PatientBirthDate = "1970-01-01"
    ds.StudyTime = "25:99"
    ds.PatientSex = "SECRET-SEX"
    ds.AccessionNumber = "SECRET-ACC"
    p = tmp_path / "odd.dcm"
    ds.save_as(p, enforce_file_format=True)
    journal, store, study_uid = _stored_study(tmp_path, cfg, [p])
    registry = ModelRegistry(cfg.models_dir, "cpu")
    registry.refresh()
    with capture_logs() as logs:
        outcome = process_study(cfg, journal, store, registry, journal.claim_next(1))
    assert outcome.state == StudyState.DELIVERED, outcome
    sr = pydicom.dcmread(journal.latest_report(study_uid).path)
    assert sr.PatientBirthDate in ("", None) and sr.PatientSex in ("", None)
    for keyword in COPIED_EXACTLY:
        assert sr[keyword].value == ds[keyword].value, keyword
    (event,) = [e for e in logs if e["event"] == "sr.header_normalised"]
    assert event["log_level"] == "warning" and event["study_uid"] == study_uid
    assert event["attributes"] == {"PatientBirthDate": "emptied", "PatientSex": "emptied", "StudyTime": "emptied"}
    assert "SECRET" not in repr(logs)


def _run_worker_until(cfg, journal: Journal, study_uid: str, state: StudyState, log_path: Path) -> None:
    """Run the real worker process on ``cfg`` until ``study_uid`` reaches ``state``."""
    from echonode.daemon.supervisor import WorkerSupervisor

    sup = WorkerSupervisor(cfg, log_path=str(log_path))
    sup.start()
    try:
        wait_for(lambda: journal.study_state(study_uid) == state, timeout=120, interval=0.1,
                 what=f"the worker to take the study to {state}")
    finally:
        sup.stop()


def test_failure_reasons_never_quote_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A library's exception that quotes a patient's data: journal and log say where, not what."""
    cfg = make_config(tmp_path, models={"max_attempts": 2})
    tiny_bundle(cfg.models_dir, "lvh")
    p = write(us_multiframe(frames=16, patient_name="SECRET^NAME", patient_id="SECRET-ID"), tmp_path / "a.dcm")
    journal, store, study_uid = _stored_study(tmp_path, cfg, [p])
    registry = ModelRegistry(cfg.models_dir, "cpu")
    registry.refresh()

    def refuses(header, *args, **kwargs):
        # What highdicom and pydicom do: quote the offending value.
        raise ValueError(f"{header.PatientName!s} / {header.PatientID} is not a valid value")

    monkeypatch.setattr(echonode.analyse.worker, "build_report", refuses)
    for attempt, state in ((1, StudyState.QUEUED), (2, StudyState.FAILED)):
        with capture_logs() as logs:
            handle_claim(cfg, journal, store, registry, journal.claim_next(1))
        reason = journal.study(study_uid)["reason"]
        assert reason.startswith("could not process the study: ValueError at test_worker.py:"), reason
        assert reason.endswith(" in refuses")  # file:line in function
        (error,) = [e for e in logs if e["event"] == "study.error"]
        assert error["study_uid"] == study_uid and error["error"] == "ValueError"
        assert (error["next_state"], journal.study_state(study_uid)) == (state, state), attempt
        assert error["where"] in reason
        assert "SECRET" not in reason and "SECRET" not in repr(logs)
    assert journal.latest_report(study_uid) is None


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        # PatientName with two values: never altered, so no SR.
        ({"PatientName": ["SECRET^ONE", "SECRET^TWO"]},
         "no SR can be built: PatientName has 2 values where DICOM allows one"),
        # The names may have been read wrongly: the node never guesses them.
        ({"SpecificCharacterSet": "SECRET-CHARSET"},
         "no SR can be built: SpecificCharacterSet names a character set"),
    ],
    ids=["two-patient-names", "unknown-character-set"],
)
def test_header_no_sr_can_carry_fails_the_study_for_good(tmp_path: Path, values: dict, reason: str) -> None:
    """No retry, no SR, and a reason that names the attribute, never a value."""
    cfg = make_config(tmp_path, models={"max_attempts": 3})
    tiny_bundle(cfg.models_dir, "lvh")
    ds = us_multiframe(frames=16, patient_id="SECRET-ID")
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    p = tmp_path / "odd.dcm"
    ds.save_as(p, enforce_file_format=True)
    journal, store, study_uid = _stored_study(tmp_path, cfg, [p])
    registry = ModelRegistry(cfg.models_dir, "cpu")
    registry.refresh()
    outcome = process_study(cfg, journal, store, registry, journal.claim_next(1))
    assert outcome.state == "failed"
    assert outcome.reason.startswith(reason)
    assert "SECRET" not in outcome.reason
    study = journal.study(study_uid)
    assert (study["state"], study["reason"]) == (StudyState.FAILED, outcome.reason)  # no retry
    assert journal.latest_report(study_uid) is None
    assert not (store.reports / study_uid).exists()


@pytest.mark.parametrize("report_skipped", [False, True])
def test_study_whose_files_are_gone_fails_with_reason(tmp_path: Path, ybr_loop: Path, report_skipped: bool) -> None:
    # Received, then lost from storage: a fault of the node, not "skipped: no
    # objects"; with sr.report_skipped the worker would otherwise build a
    # "no usable video" SR from a header it no longer has.
    cfg = make_config(tmp_path, sr={"report_skipped": report_skipped})
    tiny_bundle(cfg.models_dir, "lvh")
    journal, store, study_uid = _stored_study(tmp_path, cfg, [ybr_loop])
    for rec in journal.instances(study_uid):
        Path(rec.path).unlink()
    registry = ModelRegistry(cfg.models_dir, "cpu")
    registry.refresh()
    with capture_logs() as logs:
        outcome = process_study(cfg, journal, store, registry, journal.claim_next(1))
    assert (outcome.state, outcome.reason) == ("failed", "the study's files are gone")
    study = journal.study(study_uid)
    assert (study["state"], study["reason"]) == (StudyState.FAILED, "the study's files are gone")
    assert journal.latest_report(study_uid) is None
    assert not (store.reports / study_uid).exists()
    assert [(e["event"], e["log_level"]) for e in logs] == [("study.files_gone", "error")]


def test_reload_restarts_the_worker_with_the_new_config(tmp_path: Path) -> None:
    from echonode.bundles.installed import MODELS_STATE
    from echonode.daemon.supervisor import WorkerSupervisor

    cfg = make_config(tmp_path)
    state_file = cfg.storage_dir / MODELS_STATE

    def models_state() -> dict:
        try:
            return json.loads(state_file.read_text())
        except (OSError, ValueError):
            return {}

    sup = WorkerSupervisor(cfg)
    sup.start()
    try:
        # The worker reports its (here: missing) models folder once it runs.
        wait_for(lambda: str(cfg.models_dir) in str(models_state().get("errors")), timeout=120,
                 what="the first worker to start")
        first_pid = sup.process.pid
        journal = sup._open_journal()
        new_dir = tmp_path / "other-models"
        sup.apply_config(dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, dir=str(new_dir))))
        # The old worker finishes on its own (no kill): supervise() then starts the next.
        wait_for(lambda: (sup.supervise(), sup.process.pid != first_pid)[1], timeout=60,
                 what="the worker to restart after the reload")
        assert sup.restarts == 0  # a reload is not a death
        wait_for(lambda: str(new_dir) in str(models_state().get("errors")), timeout=120,
                 what="the new worker to run with the new models.dir")
        assert sup.process.is_alive()
        assert sup._open_journal() is journal  # kept, not reopened per worker
        moved = dataclasses.replace(cfg, node=dataclasses.replace(cfg.node, storage_dir=str(tmp_path / "elsewhere")))
        with pytest.raises(ValueError, match="storage_dir"):
            sup.apply_config(moved)
    finally:
        sup.stop()
    assert sup.process is None and sup._journal is None


def test_a_model_framing_in_cm_reports_only_the_calibrated_videos_and_says_so(
    tmp_path: Path, sonosite_loop: Path
) -> None:
    # The real loop states its pixel size; a generated video of the same
    # patient and study states none. The LVH model frames in cm: its finding
    # rests on the real loop alone and its parameters say why.
    cfg = make_config(tmp_path)
    tiny_bundle(cfg.models_dir, "lvh", seed=1, preprocessing={"framing": "physical", "field_cm": 16.0})
    tiny_bundle(cfg.models_dir, "severe_as", seed=2)
    src = pydicom.dcmread(sonosite_loop, stop_before_pixels=True)
    generated = us_multiframe(study_uid=str(src.StudyInstanceUID), frames=24, rows=96, cols=128,
                              patient_name=str(src.PatientName), patient_id=str(src.PatientID))
    generated.PatientBirthDate = src.get("PatientBirthDate", "")
    journal, store, study_uid = _stored_study(tmp_path, cfg, [sonosite_loop, write(generated, tmp_path / "g.dcm")])
    registry = ModelRegistry(cfg.models_dir, "cpu")
    registry.refresh()
    process_study(cfg, journal, store, registry, journal.claim_next(os.getpid()))
    summary = summarise_report(journal.report_for(study_uid, registry.key).path)
    findings = {f["task"]: f for f in summary["findings"]}
    assert findings["lvh"]["videos"] == [str(src.SOPInstanceUID)] and findings["lvh"]["n_videos"] == 1
    assert findings["lvh"]["parameters"]["framing"] == "physical 16 cm, calibrated videos only"
    assert findings["severe_as"]["n_videos"] == 2 and "framing" not in findings["severe_as"]["parameters"]
