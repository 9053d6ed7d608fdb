"""The node end to end: images and the sonographers' measurement SRs in through dcmtk ``storescu``,
the AI SR out to a PACS, and ``echonode agreement --json`` counting each study in its confusion cell.

Three studies through one node and one worker:

* images and a measurement SR together;
* images alone, the AI SR delivered, and only then the measurement SR
  (finished later at a workstation): counted, no second AI SR, the study
  not re-opened;
* images and broken cart SRs: one with private codes only and no birth date
  (the reason is stored, the AI SR is delivered all the same) and one cut
  short on the wire (refused by the SCP, 0xC210, never stored). An SR cut
  short in storage is tests/echonode/agreement/test_agreement.py's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from echonode.config import to_toml
from echonode.daemon.node import Node
from echonode.studies.states import StudyState
from tests.conftest import free_port, make_config, run_cli, wait_for, with_destination
from tests.echo_sr import echo_sr, save
from tests.factories import report_pdf, tiny_bundle
from tests.peers import STORESCU, RecordingSCP, require_tool, send_files, storescu

LVH = {"ivsd": 1.4, "lvpwd": 1.3, "lvidd": 4.8, "av_vmax": 2.1, "av_mean_gradient": 10.0}
#: Who the test studies are about: must appear nowhere in what the node prints.
PATIENT = {"PatientID": "PAT-7731", "PatientName": "DOE^JANE", "PatientBirthDate": "19700101"}
NORMAL = {"ivsd": 0.9, "lvpwd": 0.9, "lvidd": 4.6, "av_vmax": 1.4, "av_mean_gradient": 5.0}


def image(src: Path, out: Path, study: str, manufacturer: str, model: str, station: str) -> tuple[Path, str]:
    """The real echo loop as a new study of a given cart."""
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Manufacturer, ds.ManufacturerModelName, ds.StationName = manufacturer, model, station
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    path = out / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


def same_patient(sr, *, birth_date: bool = True):
    """The cart's SR filed under the images' patient (a cart writes the worklist's); optionally no birth date."""
    sr.PatientID, sr.PatientName = PATIENT["PatientID"], PATIENT["PatientName"]
    sr.PatientBirthDate = PATIENT["PatientBirthDate"] if birth_date else ""
    return sr


def test_agreement_end_to_end_with_storescu(tmp_path: Path, ybr_loop: Path) -> None:
    require_tool(STORESCU)
    pacs = RecordingSCP(free_port()).start()
    cfg = make_config(tmp_path, study={"stable_after_s": 0.5, "check_interval_s": 0.2},
                      agreement={"check_interval_s": 0.2, "summary_interval_s": 0.0})
    cfg = with_destination(cfg, "pacs", "PACS", pacs.port)
    config_file = tmp_path / "echonode.toml"
    config_file.write_text(to_toml(cfg))
    tiny_bundle(cfg.models_dir, "lvh", seed=1)
    out = tmp_path / "send"
    out.mkdir()
    together, late, broken = generate_uid(), generate_uid(), generate_uid()
    node = Node(cfg)
    node.start()
    try:
        # 1. Images and the measurement SR together.
        img, img_uid = image(ybr_loop, out, together, "GE Vingmed Ultrasound", "Vivid E95", "ECHO-1")
        sr = save(same_patient(echo_sr("ge", LVH, study_uid=together, image_uids=[img_uid])),
                  out / "sr-together.dcm")
        # 3. Images and two broken cart SRs: one cut short, one with private codes only.
        img3, img3_uid = image(ybr_loop, out, broken, "Philips", "EPIQ 7C", "ECHO-2")
        # The private one without a birth date, as carts leave it: it must not hold back the AI SR either.
        private = save(same_patient(echo_sr("philips", {}, study_uid=broken, image_uids=[img3_uid]),
                                    birth_date=False), out / "sr-private.dcm")
        assert storescu(node.scp.port, img, sr, img3, private).returncode == 0
        whole = save(same_patient(echo_sr("tid5300", LVH, study_uid=broken)), out / "sr-whole.dcm")
        cut = out / "sr-cut.dcm"
        cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 3 // 4])
        cut_uid = str(pydicom.dcmread(whole, stop_before_pixels=True).SOPInstanceUID)
        # The node's SCP parses what it stores: an SR cut short on the wire is refused (0xC210,
        # "cannot understand"); the cart knows, and the study goes on without it.
        assert send_files(node.scp.port, [cut], calling="WORKSTATION") == [0xC210]
        # 2. Images alone first.
        img2, _ = image(ybr_loop, out, late, "SonoSite", "M-Turbo", "ECHO-3")
        assert storescu(node.scp.port, img2).returncode == 0

        def delivered(*studies: str) -> bool:
            node.worker.supervise()
            return all(node.journal.study_state(s) == StudyState.DELIVERED for s in studies)

        wait_for(lambda: delivered(together, late, broken), timeout=300, what="the three AI SRs delivered")
        ai_srs = lambda study: [d for d in pacs.received if str(d.StudyInstanceUID) == study]  # noqa: E731
        assert len(ai_srs(late)) == 1
        # ... then its measurement SR, after the AI SR was delivered.
        late_sr = save(same_patient(echo_sr("philips", LVH, study_uid=late)), out / "sr-late.dcm")
        assert storescu(node.scp.port, late_sr).returncode == 0
        wait_for(lambda: (r := node.journal.reference(late)) is not None and r.sr_sop_uid is not None,
                 timeout=30, what="the late SR's reference")
        wait_for(lambda: node.journal.reference(broken) is not None and node.journal.reference(together) is not None,
                 timeout=30, what="the references")
        time.sleep(1.0)  # several stability and delivery passes: nothing may follow the late SR
        assert node.journal.study_state(late) == StudyState.DELIVERED  # not re-opened
        assert len(ai_srs(late)) == 1  # no second AI SR
        assert all(len(ai_srs(s)) == 1 for s in (together, broken))

        ref = node.journal.reference(broken)
        assert ref.sr_sop_uid is None and ref.srs == 1 and cut_uid not in ref.not_used
        assert "no echo measurement SR with a usable value" in ref.reason and "only private codes" in ref.reason
        ref = node.journal.reference(together)
        assert ref.labels["lvh"][0] == 1 and (ref.manufacturer, ref.model_name) == ("GE Vingmed Ultrasound", "Vivid E95")

        results = {s["study_uid"]: s["results"][0] for s in node.journal.status()["studies"] if s["results"]}
        wait_for(lambda: (node.journal.agreement_summary() or {}).get("models"), timeout=30, what="the summary")
    finally:
        node.stop()
        pacs.stop()

    res = run_cli("agreement", "--json", "--config", str(config_file), "--resamples", "200")
    assert res.returncode == 0, res.stderr
    (row,) = json.loads(res.stdout)["agreement"]
    assert (row["model"], row["task"], row["studies"], row["positives"]) == ("test-lvh", "lvh", 2, 2)
    said = [results[s]["positive"] for s in (together, late)]
    assert row["confusion"] == {"tp": sum(said), "fp": 0, "tn": 0, "fn": 2 - sum(said)}
    assert row["auroc"] is None and "positive" in row["auroc_reason"]
    res = run_cli("agreement", "--json", "--by", "station", "--config", str(config_file), "--resamples", "200")
    rows = json.loads(res.stdout)["agreement"]
    assert [(r["group"], r["studies"]) for r in rows] == [("ECHO-1", 1), ("ECHO-3", 1)]
    status = json.loads(run_cli("--config", str(config_file), "status", "--json").stdout)
    assert status["agreement"]["references"] == {"studies": 3, "with_reference": 2, "due": 0}
    (summary,) = status["agreement"]["models"]
    assert summary["confusion"] == row["confusion"]
    for text in (res.stdout, json.dumps(status["agreement"])):
        assert "PAT-7731" not in text and "DOE" not in text



def test_an_sr_forwarded_before_its_images_waits_for_them_and_is_read_again(tmp_path: Path, ybr_loop: Path) -> None:
    """A PACS or workstation forwards the measurement SR ahead of the loops, past the quiet period.

    The SR-only study is not analysed (no "not assessed" SR goes to the PACS,
    which would be the study's answer for good); the first image re-opens it
    and it gets one AI SR. The reference is read again with the images: an SR
    filed under another patient is refused then, and the cart comes from the
    images, not from the SR.
    """
    pacs = RecordingSCP(free_port()).start()
    cfg = make_config(tmp_path, study={"stable_after_s": 0.5, "check_interval_s": 0.2},
                      agreement={"check_interval_s": 0.2, "summary_interval_s": 0.0})
    cfg = with_destination(cfg, "pacs", "PACS", pacs.port)
    tiny_bundle(cfg.models_dir, "lvh", seed=1)
    out = tmp_path / "send"
    mine, other = generate_uid(), generate_uid()
    own_sr = save(same_patient(echo_sr("philips", LVH, study_uid=mine)), out / "sr-mine.dcm")
    pdf = report_pdf(mine, station="REPORTING-1")  # and the reporting system's PDF: no image either
    pdf.PatientID = PATIENT["PatientID"]
    own_pdf = save(pdf, out / "report-mine.dcm")
    foreign = echo_sr("philips", LVH, study_uid=other)
    foreign.PatientID, foreign.PatientName = "PAT-OTHER", "ROE^RICHARD"
    foreign_sr = save(foreign, out / "sr-other.dcm")
    node = Node(cfg)
    node.start()
    try:
        assert send_files(node.scp.port, [own_sr, own_pdf, foreign_sr], calling="WORKSTATION") == [0x0000] * 3

        def settled(*studies: str, state: StudyState) -> bool:
            node.worker.supervise()
            return all(node.journal.study_state(s) == state for s in studies)

        wait_for(lambda: settled(mine, other, state=StudyState.SKIPPED), timeout=120, what="the SR-only studies skipped")
        assert "no images yet" in (node.journal.status()["studies"][0]["reason"] or "")
        wait_for(lambda: node.journal.reference(other) is not None, timeout=30, what="the early reference")
        time.sleep(1.0)  # several passes: nothing goes to the PACS for an SR-only study
        assert pacs.received == []

        img, _ = image(ybr_loop, out, mine, "GE Vingmed Ultrasound", "Vivid E95", "ECHO-4")
        img2, _ = image(ybr_loop, out, other, "GE Vingmed Ultrasound", "Vivid E95", "ECHO-5")
        assert send_files(node.scp.port, [img, img2], calling="CART") == [0x0000, 0x0000]
        wait_for(lambda: settled(mine, other, state=StudyState.DELIVERED), timeout=300, what="the AI SRs delivered")

        def read_with_images(study: str) -> bool:
            ref = node.journal.reference(study)
            return ref is not None and ref.station_name is not None

        wait_for(lambda: read_with_images(mine) and read_with_images(other), timeout=30, what="the references re-read")
        ref = node.journal.reference(mine)
        assert ref.labels["lvh"][0] == 1 and (ref.manufacturer, ref.station_name) == ("GE Vingmed Ultrasound", "ECHO-4")
        ref = node.journal.reference(other)
        assert ref.sr_sop_uid is None and "another Patient ID" in ref.reason
        assert sorted(str(d.StudyInstanceUID) for d in pacs.received) == sorted([mine, other])
    finally:
        node.stop()
        pacs.stop()


@pytest.fixture(autouse=True)
def _quiet_pynetdicom() -> None:
    import logging

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
