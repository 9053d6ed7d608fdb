"""The node's agreement with the sonographers: the journal's references, the job that reads them,
the figures (stratified bootstrap AUROC intervals) and ``echonode agreement``.

The node end to end (dcmtk ``storescu``, the worker, a PACS) is in tests/echonode/agreement/test_agreement_node.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from echonode.agreement.figures import agreement_figures, group_of
from echonode.agreement.record import ReferenceJob, read_reference, rules_id
from echonode.config import Config, ConfigError, to_toml
from echonode.measurements.rules import load_rules
from echonode.stats import bootstrap_ci
from echonode.studies.journal import Journal
from echonode.studies.records import InstanceRecord, TaskResult
from echonode.studies.references import AgreementPair
from echonode.studies.states import StudyState
from echonode.studies.store import StudyStore
from tests.conftest import REPO, make_config, run_cli
from tests.echo_sr import echo_sr
from tests.factories import report_pdf, us_multiframe

#: A study whose measurements say LVH (IVSd 1.4 cm) and no severe AS (Vmax 2.1 m/s).
LVH = {"ivsd": 1.4, "lvpwd": 1.3, "lvidd": 4.8, "av_vmax": 2.1, "av_mean_gradient": 10.0}
#: Neither.
NORMAL = {"ivsd": 0.9, "lvpwd": 0.9, "lvidd": 4.6, "av_vmax": 1.4, "av_mean_gradient": 5.0}


# -- helpers -------------------------------------------------------------------------------------


class Node:
    """A journal and a store as the node has them, and what tests put in."""

    def __init__(self, tmp_path: Path, **sections: dict) -> None:
        self.cfg: Config = make_config(tmp_path, **sections)
        self.journal = Journal(self.cfg.journal_path)
        self.store = StudyStore(self.cfg.storage_dir, self.journal)
        self.n = 0

    def put(self, ds) -> str:
        """Store one object as the SCP does; returns its SOP Instance UID."""
        self.n += 1
        tmp = self.store.incoming / f"t{self.n}.dcm"
        ds.save_as(tmp, enforce_file_format=True)
        self.store.accept(tmp, "CART")
        return str(ds.SOPInstanceUID)

    def image(self, study: str, *, manufacturer: str = "GE Vingmed Ultrasound", model: str = "Vivid E95",
              station: str = "ECHO-3") -> str:
        ds = us_multiframe(study_uid=study, frames=2, rows=16, cols=16, patient_id="ECHO001")  # echo_sr's patient
        ds.Manufacturer, ds.ManufacturerModelName, ds.StationName = manufacturer, model, station
        return self.put(ds)

    def sr(self, study: str, values: dict, dialect: str = "ge", **kw: object) -> str:
        return self.put(echo_sr(dialect, values, study_uid=study, **kw))

    def report(self, study: str, p: float, *, task: str = "lvh", model: str = "test-lvh", version: str = "1",
               threshold: float = 0.5) -> None:
        """The worker's result for ``study`` (no SR, no destination: the study ends ``delivered``)."""
        self.journal.mark_stable(-1)
        self.journal.queue_stable()
        claim = self.journal.claim_next(os.getpid())
        assert claim is not None and claim.study_uid == study
        result = TaskResult(task, model, version, "1.2.3", p, p >= threshold, threshold, 1, {"seconds": 1.0})
        self.journal.finish_reported(claim, f"set-{model}-{version}", [result], None, [])

    def job(self) -> ReferenceJob:
        return ReferenceJob(self.journal, self.cfg)


def pair(label: int | None, p: float, *, positive: bool | None = None, task: str = "lvh",
         manufacturer: str | None = "GE", model_name: str | None = "Vivid", station: str | None = "S1") -> AgreementPair:
    return AgreementPair(generate_uid(), task, "m", "1", p, p >= 0.5 if positive is None else positive, 0.5, label,
                         manufacturer, model_name, station, 0.0)


# -- the figures ---------------------------------------------------------------------------------


def test_confusion_counts_sensitivity_and_specificity_at_the_threshold() -> None:
    pairs = [pair(1, 0.9), pair(1, 0.8), pair(1, 0.3), pair(0, 0.6), pair(0, 0.2), pair(0, 0.1), pair(None, 0.7)]
    (f,) = agreement_figures(pairs, n_resamples=200)
    assert f.confusion == {"tp": 2, "fp": 1, "tn": 2, "fn": 1}
    assert (f.studies, f.positives, f.negatives, f.undecided) == (6, 3, 3, 1)
    assert f.sensitivity == pytest.approx(2 / 3) and f.specificity == pytest.approx(2 / 3)
    # Mann-Whitney by hand: of 9 pairs, 0.9 and 0.8 beat all three negatives, 0.3 beats 0.2 and 0.1: 8/9.
    assert f.auroc == pytest.approx(8 / 9)
    assert f.threshold == 0.5 and f.auroc_reason is None


def test_the_verdict_is_the_reported_one_not_recomputed() -> None:
    """Sensitivity uses the result's ``positive`` (what the SR said), whatever the probability."""
    (f,) = agreement_figures([pair(1, 0.2, positive=True), pair(0, 0.9, positive=False)], n_resamples=50)
    assert f.confusion == {"tp": 1, "fp": 0, "tn": 1, "fn": 0}
    assert f.auroc == 0.0


@pytest.mark.parametrize("labels, reason", [
    ([1, 1, 1], "every reference label is positive"),
    ([0, 0], "every reference label is negative"),
    ([None, None], "no study with a decided reference label"),
])
def test_auroc_is_undefined_with_one_class_and_says_why(labels: list, reason: str) -> None:
    (f,) = agreement_figures([pair(y, 0.5 + 0.1 * i) for i, y in enumerate(labels)], n_resamples=50)
    assert f.auroc is None and f.auroc_ci is None
    assert reason in f.auroc_reason
    doc = f.as_dict()
    assert doc["auroc"] is None and doc["auroc_ci"] is None
    if 1 not in labels:
        assert f.sensitivity is None  # no positive: not 0
    if 0 not in labels:
        assert f.specificity is None


def test_bootstrap_interval_is_stratified_seeded_and_true_95_percent() -> None:
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(8, int), np.zeros(40, int)]
    s = np.r_[rng.normal(1, 1, 8), rng.normal(0, 1, 40)]
    result, samples = bootstrap_ci(y, s, n_resamples=4000, seed=3, return_samples=True)
    # Stratified: every resample keeps both classes, so no resample is undefined.
    assert np.isfinite(samples).all()
    # A true 95 % interval: the 2.5th and 97.5th percentiles, not the 5th and 95th.
    assert (result.low, result.high) == pytest.approx(tuple(np.percentile(samples, [2.5, 97.5])))
    assert np.mean(samples < result.low) == pytest.approx(0.025, abs=0.002)
    assert result.low <= result.estimate <= result.high
    pairs = [pair(int(a), float(b)) for a, b in zip(y, 1 / (1 + np.exp(-s)), strict=True)]
    first = agreement_figures(pairs, n_resamples=1000, seed=5)[0]
    again = agreement_figures(pairs, n_resamples=1000, seed=5)[0]
    other = agreement_figures(pairs, n_resamples=1000, seed=6)[0]
    assert first.auroc_ci == again.auroc_ci != other.auroc_ci
    assert first.auroc == pytest.approx(result.estimate)


def test_the_interval_narrows_with_more_studies_and_is_a_point_when_perfect() -> None:
    rng = np.random.default_rng(0)

    def width(n: int) -> float:
        y = rng.integers(0, 2, n)
        s = y * 0.3 + rng.uniform(0, 1, n)
        (f,) = agreement_figures([pair(int(a), float(b)) for a, b in zip(y, s, strict=True)], n_resamples=1000)
        return f.auroc_ci[1] - f.auroc_ci[0]

    assert width(2000) < width(40) / 3
    (f,) = agreement_figures([pair(1, 0.9), pair(1, 0.8), pair(0, 0.1)], n_resamples=500)
    assert f.auroc == 1.0 and f.auroc_ci == (1.0, 1.0)


def test_groups_by_cart_model_manufacturer_and_station() -> None:
    a = pair(1, 0.9, manufacturer="GE", model_name="Vivid E95", station="ECHO-1")
    b = pair(0, 0.1, manufacturer="Philips", model_name="EPIQ 7C", station="ECHO-2")
    c = pair(0, 0.2, manufacturer=None, model_name=None, station=None)
    assert [group_of(a, by) for by in ("model", "manufacturer", "station", None)] == [
        "GE Vivid E95", "GE", "ECHO-1", None]
    assert group_of(c, "model") == group_of(c, "station") == "unknown"
    rows = agreement_figures([a, b, c], by="manufacturer", n_resamples=50)
    assert [(r.group, r.studies) for r in rows] == [("GE", 1), ("Philips", 1), ("unknown", 1)]
    with pytest.raises(ValueError, match='"by"'):
        agreement_figures([a], by="patient")


def test_models_versions_and_tasks_are_apart() -> None:
    p1 = pair(1, 0.9)
    p2 = AgreementPair(p1.study_uid, "lvh", "m", "2", 0.4, False, 0.5, 1, None, None, None, 0.0)
    p3 = AgreementPair(p1.study_uid, "severe_as", "as", "1", 0.1, False, 0.5, 0, None, None, None, 0.0)
    rows = agreement_figures([p1, p2, p3], n_resamples=50)
    assert [(r.model, r.version, r.task, r.confusion["tp"], r.confusion["fn"], r.confusion["tn"]) for r in rows] == [
        ("as", "1", "severe_as", 0, 0, 1), ("m", "1", "lvh", 1, 0, 0), ("m", "2", "lvh", 0, 1, 0)]


# -- the journal ---------------------------------------------------------------------------------


def test_an_sr_queues_its_study_for_reading_an_image_does_not(tmp_path: Path) -> None:
    node = Node(tmp_path)
    study = generate_uid()
    node.image(study)
    assert node.journal.due_references() == []
    node.sr(study, LVH)
    # Still receiving: read once the study is complete.
    assert node.journal.due_references() == []
    node.journal.mark_stable(-1)
    (due,) = node.journal.due_references()
    assert due.study_uid == study and due.state == StudyState.STABLE


def test_a_late_sr_keeps_the_study_as_it_is(tmp_path: Path) -> None:
    """Delivered stays delivered (no second AI SR); a running claim stays valid; skipped is not re-opened."""
    node = Node(tmp_path)
    done, running, skipped = generate_uid(), generate_uid(), generate_uid()
    node.image(done)
    node.report(done, 0.8)
    assert node.journal.study_state(done) == StudyState.DELIVERED
    node.sr(done, LVH)
    assert node.journal.study_state(done) == StudyState.DELIVERED
    assert [d.study_uid for d in node.journal.due_references()] == [done]

    node.image(running)
    node.journal.mark_stable(-1)
    node.journal.queue_stable()
    claim = node.journal.claim_next(os.getpid())
    node.sr(running, LVH)
    assert node.journal.study_state(running) == StudyState.RUNNING
    node.journal.finish_reported(claim, "set", [], None, [])  # not a StaleClaim
    assert node.journal.study_state(running) == StudyState.DELIVERED

    node.image(skipped)
    node.journal.mark_stable(-1)
    node.journal.queue_stable()
    node.journal.finish_skipped(node.journal.claim_next(os.getpid()), "no usable video")
    node.sr(skipped, LVH)
    assert node.journal.study_state(skipped) == StudyState.SKIPPED
    # An image still re-opens it, as before.
    node.image(skipped)
    assert node.journal.study_state(skipped) == StudyState.RECEIVING


def test_a_journal_from_before_the_triggers_queues_its_srs_once(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    Journal(path).close()
    con = sqlite3.connect(path)
    for trigger in ("references_due_insert", "references_due_update"):
        con.execute(f"DROP TRIGGER {trigger}")
    con.execute("DELETE FROM journal_marks")
    study = generate_uid()
    for sop, cls in (("1.1", "1.2.840.10008.5.1.4.1.1.88.33"), ("1.2", "1.2.840.10008.5.1.4.1.1.3.1")):
        con.execute("INSERT INTO studies (study_uid, state, first_received, last_received, updated)"
                    " VALUES (?, 'delivered', 1, 1, 1) ON CONFLICT DO NOTHING", (study,))
        con.execute("INSERT INTO instances VALUES (?, ?, 's', ?, '1.2.840.10008.1.2.1', '/x', 1, 5, NULL)",
                    (sop, study, cls))
    con.commit()
    con.close()
    journal = Journal(path)
    assert [(d.study_uid, d.state) for d in journal.due_references()] == [(study, "delivered")]
    journal.done_reference(study, 0)
    assert Journal(path).due_references() == []  # once


def test_purge_removes_the_reference(tmp_path: Path) -> None:
    node = Node(tmp_path)
    study = generate_uid()
    node.image(study)
    node.sr(study, LVH)
    node.report(study, 0.7)
    node.job().run()
    assert node.journal.reference(study) is not None
    assert node.journal.purge_study(study) is not None
    assert node.journal.reference(study) is None
    assert node.journal.due_references() == [] and node.journal.agreement_pairs() == []


# -- the job -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["ge", "philips", "tid5300"])
def test_the_job_records_values_labels_and_the_cart(dialect: str, tmp_path: Path) -> None:
    node = Node(tmp_path)
    study = generate_uid()
    node.image(study, manufacturer="Philips Medical Systems", model="EPIQ 7C", station="ECHO-7")
    sr = node.sr(study, LVH, dialect=dialect)
    node.report(study, 0.3)
    assert node.job().run() == 1
    ref = node.journal.reference(study)
    assert ref.sr_sop_uid == sr and ref.reason is None and ref.srs == 1
    assert ref.labels["lvh"][0] == 1 and "IVSd 1.4 cm >= 1.2" in ref.labels["lvh"][1]
    assert ref.labels["severe_as"][0] == 0
    assert ref.measured["ivsd_cm"] == pytest.approx(1.4) and ref.measured["av_vmax_m_s"] == pytest.approx(2.1)
    assert (ref.manufacturer, ref.model_name, ref.station_name) == ("Philips Medical Systems", "EPIQ 7C", "ECHO-7")
    assert ref.rules == rules_id(load_rules())
    (p,) = node.journal.agreement_pairs()
    assert (p.study_uid, p.task, p.label, p.positive) == (study, "lvh", 1, False)  # a false negative
    assert node.journal.due_references() == []
    # Nothing of the patient's in the journal's reference rows.
    row = node.journal._connect().execute("SELECT * FROM study_references").fetchone()
    assert not any(isinstance(v, str) and ("TEST" in v or "ECHO001" in v) for v in dict(row).values())


def test_a_later_sr_supersedes_and_an_sr_that_came_meanwhile_is_read_again(tmp_path: Path) -> None:
    node = Node(tmp_path)
    study = generate_uid()
    node.image(study)
    node.sr(study, NORMAL, content_time="101500")
    node.report(study, 0.9)
    job = node.job()
    job.run()
    assert node.journal.reference(study).labels["lvh"][0] == 0
    later = node.sr(study, LVH, content_time="160000", instance_number=2)
    (due,) = node.journal.due_references()
    # A third SR recorded while the job reads: the row stays for the next pass.
    ref = read_reference(node.journal, study, job.rules)
    node.sr(study, LVH, dialect="philips", content_time="090000", instance_number=3)  # earlier content: not current
    assert node.journal.record_reference(ref, due.seq)
    assert len(node.journal.due_references()) == 1
    job.run()
    ref = node.journal.reference(study)
    assert ref.sr_sop_uid == later and ref.srs == 3 and ref.labels["lvh"][0] == 1
    assert sum("superseded by the later SR" in why for why in ref.not_used.values()) == 2
    (p,) = node.journal.agreement_pairs()
    assert p.label == 1


def test_a_broken_cart_sr_stores_its_reason_and_never_raises(tmp_path: Path) -> None:
    node = Node(tmp_path)
    truncated, private, none = generate_uid(), generate_uid(), generate_uid()
    for study in (truncated, private, none):
        node.image(study)
    cut_uid = node.sr(truncated, LVH)
    (rec,) = [i for i in node.journal.instances(truncated) if i.sop_uid == cut_uid]
    data = Path(rec.path).read_bytes()
    Path(rec.path).write_bytes(data[: len(data) * 2 // 3])  # cut short on disk
    node.put(echo_sr("philips", {}, study_uid=private))  # only private codes
    node.journal.mark_stable(-1)
    job = node.job()
    assert job.run() == 2
    ref = node.journal.reference(truncated)
    assert ref.sr_sop_uid is None and "no echo measurement SR with a usable value" in ref.reason
    assert cut_uid in ref.reason and cut_uid in ref.not_used
    assert all(label is None for label, _ in ref.labels.values())
    ref = node.journal.reference(private)
    assert ref.sr_sop_uid is None and ref.reason
    assert node.journal.reference(none) is None  # no SR: nothing to read
    assert node.journal.agreement_pairs() == []
    summary = node.journal.agreement_summary()
    assert summary["references"] == {"studies": 2, "with_reference": 0, "due": 0}


def test_an_unexpected_error_is_stored_for_that_study_only(tmp_path: Path, monkeypatch) -> None:
    node = Node(tmp_path)
    bad, good = generate_uid(), generate_uid()
    for study in (bad, good):
        node.image(study)
        node.sr(study, LVH)
    node.journal.mark_stable(-1)
    import echonode.agreement.record as record

    real = record.study_reference

    def boom(docs, rules, **kw):
        if docs and docs[0].study_instance_uid == bad:
            raise KeyError("boom")
        return real(docs, rules, **kw)

    monkeypatch.setattr(record, "study_reference", boom)
    assert node.job().run() == 2
    assert "could not be read (KeyError)" in node.journal.reference(bad).reason
    assert node.journal.reference(good).labels["lvh"][0] == 1


def test_new_rules_read_every_reference_again(tmp_path: Path) -> None:
    node = Node(tmp_path)
    study = generate_uid()
    node.image(study)
    node.sr(study, {**NORMAL, "ivsd": 1.0})
    node.journal.mark_stable(-1)
    node.job().run()
    assert node.journal.reference(study).labels["lvh"][0] == 0
    rules = tmp_path / "rules.toml"
    default = REPO / "echonode" / "measurements" / "label_rules.toml"
    rules.write_text(default.read_text().replace("wall_thickness_cm = 1.2", "wall_thickness_cm = 1.0"))
    cfg = make_config(tmp_path, agreement={"rules": str(rules)})
    job = ReferenceJob(node.journal, cfg)  # a restart with the new rules
    assert len(node.journal.due_references()) == 1
    job.run()
    ref = node.journal.reference(study)
    assert ref.labels["lvh"][0] == 1 and ref.rules.startswith(str(rules))


def test_a_bad_rules_file_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text("[lvh]\nwall_thickness_cm = -1\n[severe_as]\nav_vmax_m_s = 4.0\n")
    with pytest.raises(ConfigError, match=r"agreement\.rules: .*wall_thickness_cm"):
        make_config(tmp_path, agreement={"rules": str(rules)})


def test_the_summary_follows_news_within_its_interval(tmp_path: Path) -> None:
    node = Node(tmp_path, agreement={"summary_interval_s": 3600.0})
    study = generate_uid()
    node.image(study)
    node.sr(study, LVH)
    node.report(study, 0.9)
    job = node.job()
    job.run()
    (row,) = node.journal.agreement_summary()["models"]
    assert (row["model"], row["task"], row["studies"], row["confusion"]["tp"]) == ("test-lvh", "lvh", 1, 1)
    other = generate_uid()
    node.image(other)
    node.sr(other, NORMAL)
    node.report(other, 0.1)
    job.run()
    assert node.journal.agreement_summary()["models"][0]["studies"] == 1  # within the interval
    assert job.summarise(force=True)
    (row,) = node.journal.agreement_summary()["models"]
    assert row["studies"] == 2 and row["auroc"] == 1.0 and row["auroc_ci"] == [1.0, 1.0]
    assert not job.summarise()  # nothing new


# -- the command ---------------------------------------------------------------------------------


def _journal_with_studies(tmp_path: Path) -> tuple[Path, Node, dict]:
    node = Node(tmp_path)
    studies = {}
    carts = [("GE Vingmed Ultrasound", "Vivid E95", "ECHO-1"), ("Philips", "EPIQ 7C", "ECHO-2")]
    for i, (values, p) in enumerate([(LVH, 0.9), (LVH, 0.3), (NORMAL, 0.2), (NORMAL, 0.6), (NORMAL, 0.1)]):
        study = generate_uid()
        manufacturer, model, station = carts[i % 2]
        node.image(study, manufacturer=manufacturer, model=model, station=station)
        node.sr(study, values)
        node.report(study, p)
        studies[study] = (values is LVH, p)
    node.job().run()
    path = tmp_path / "echonode.toml"
    path.write_text(to_toml(node.cfg))
    return path, node, studies


def test_agreement_json_counts_each_study_in_its_cell(tmp_path: Path) -> None:
    path, _, _ = _journal_with_studies(tmp_path)
    res = run_cli("agreement", "--json", "--config", str(path), "--resamples", "500")  # --config after the command
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    (row,) = doc["agreement"]
    assert (row["model"], row["task"], row["group"], row["studies"], row["positives"]) == ("test-lvh", "lvh", None, 5, 2)
    assert row["confusion"] == {"tp": 1, "fp": 1, "tn": 2, "fn": 1}
    assert row["sensitivity"] == 0.5 and row["specificity"] == pytest.approx(2 / 3)
    assert row["auroc"] == pytest.approx(5 / 6)
    lo, hi = row["auroc_ci"]
    assert 0 <= lo <= row["auroc"] <= hi <= 1
    assert doc["resamples"] == 500 and doc["references"]["with_reference"] == 5
    res = run_cli("--config", str(path), "agreement", "--json", "--by", "manufacturer", "--resamples", "100")
    rows = json.loads(res.stdout)["agreement"]
    assert [(r["group"], r["studies"]) for r in rows] == [("GE Vingmed Ultrasound", 3), ("Philips", 2)]
    assert sum(r["confusion"]["tp"] for r in rows) == 1


def test_agreement_since_and_the_table(tmp_path: Path) -> None:
    path, _, _ = _journal_with_studies(tmp_path)
    res = run_cli("--config", str(path), "agreement", "--since", "2999-01-01", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["agreement"] == []
    # The reference counts cover the same studies as the rows.
    assert json.loads(res.stdout)["references"] == {"studies": 0, "with_reference": 0, "due": 0}
    res = run_cli("--config", str(path), "agreement", "--since", "2000-01-01", "--json")
    assert json.loads(res.stdout)["references"]["with_reference"] == 5
    res = run_cli("--config", str(path), "agreement", "--since", "2000-01-01", "--by", "station", "--resamples", "200")
    assert res.returncode == 0, res.stderr
    assert "test-lvh" in res.stdout and "ECHO-1" in res.stdout and "ECHO-2" in res.stdout
    assert "few studies" in res.stdout  # the small-n caveat
    for bad, why in ((["--since", "yesterday"], "not a date"), (["--since", "0001-01-01"], "out of range"),
                     (["--by", "patient"], "invalid choice"), (["--resamples", "0"], "1 or more")):
        res = run_cli("--config", str(path), "agreement", *bad)
        assert res.returncode == 2 and "Traceback" not in res.stderr and why in res.stderr, bad


def test_agreement_on_a_fresh_node(tmp_path: Path) -> None:
    path = tmp_path / "echonode.toml"
    path.write_text(to_toml(make_config(tmp_path)))
    res = run_cli("--config", str(path), "agreement", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["agreement"] == []
    res = run_cli("--config", str(path), "agreement")
    assert res.returncode == 0 and "no study" in res.stdout


def test_status_json_carries_the_summary(tmp_path: Path) -> None:
    path, node, _ = _journal_with_studies(tmp_path)
    res = run_cli("--config", str(path), "status", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)["agreement"]
    assert summary["references"]["with_reference"] == 5
    (row,) = summary["models"]
    assert row["confusion"] == {"tp": 1, "fp": 1, "tn": 2, "fn": 1} and row["auroc"] == pytest.approx(5 / 6)
    res = run_cli("--config", str(path), "status")
    assert "agreement" in res.stdout and "test-lvh" in res.stdout


def test_instance_record_of_an_sr_class_is_what_the_triggers_match() -> None:
    from echonode.measurements.reading import SR_SOP_CLASS_PREFIX
    from echonode.studies.schema import AGREEMENT_SCHEMA, SR_CLASS_PREFIX

    assert SR_CLASS_PREFIX == SR_SOP_CLASS_PREFIX
    assert f"substr(NEW.sop_class_uid, 1, {len(SR_CLASS_PREFIX)}) = '{SR_CLASS_PREFIX}'" in AGREEMENT_SCHEMA
    assert InstanceRecord  # the record the triggers see


def test_metrics_and_the_status_page_read_the_summary(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from echonode.ops.prometheus import agreement_families
    from echonode.ops.statuspage import agreement_rows

    _, node, _ = _journal_with_studies(tmp_path)
    families = {f.name: f for f in agreement_families(node.journal.agreement_summary())}
    labels = {"model": "test-lvh", "version": "1", "task": "lvh"}
    (auroc,) = families["echonode_agreement_auroc"].samples
    assert auroc.labels == labels and auroc.value == pytest.approx(5 / 6)
    assert families["echonode_agreement_studies"].samples[0].value == 5
    assert families["echonode_agreement_sensitivity"].samples[0].value == 0.5
    refs = {s.labels["kind"]: s.value for s in families["echonode_agreement_references"].samples}
    assert refs == {"with_reference": 5, "without": 0, "due": 0}
    (row,) = agreement_rows(SimpleNamespace(journal=node.journal))
    assert (row.model, row.task, row.studies) == ("test-lvh 1", "lvh", 5) and row.auroc_ci is not None
    # One class only: NaN, not a made-up figure; nothing at all before the first summary.
    one = {"models": [{"model": "m", "version": "1", "task": "lvh", "studies": 2, "positives": 2, "auroc": None,
                       "sensitivity": 1.0, "specificity": None}], "references": {}}
    fam = {f.name: f for f in agreement_families(one)}
    assert np.isnan(fam["echonode_agreement_auroc"].samples[0].value)
    assert all(not f.samples for f in agreement_families(None))


@pytest.mark.parametrize(("sr_patient", "why"), [("OTHER-PATIENT-4711", "another Patient ID"),
                                                  ("", "without a Patient ID")])
def test_an_sr_filed_under_another_patient_is_not_the_reference(tmp_path: Path, sr_patient: str, why: str) -> None:
    """A worklist mix-up at the cart: the measurement SR names another Patient ID than the
    study's images, or none. It is not used (its values cannot be shown to be this patient's),
    the reason says so, and the log names UIDs, never either ID."""
    node = Node(tmp_path)
    mixed, same = generate_uid(), generate_uid()
    for study in (mixed, same):
        node.image(study)
    image_id = str(pydicom.dcmread(node.journal.first_image_path(mixed), stop_before_pixels=True).PatientID)
    wrong = echo_sr("ge", LVH, study_uid=mixed)
    wrong.PatientID = sr_patient
    wrong_uid = node.put(wrong)
    right = echo_sr("ge", LVH, study_uid=same)
    right.PatientID = str(pydicom.dcmread(node.journal.first_image_path(same), stop_before_pixels=True).PatientID)
    node.put(right)
    node.journal.mark_stable(-1)
    with capture_logs() as logs:
        assert node.job().run() == 2
    ref = node.journal.reference(mixed)
    assert ref.sr_sop_uid is None and why in ref.not_used[wrong_uid]
    assert all(label is None for label, _ in ref.labels.values())
    assert node.journal.reference(same).labels["lvh"][0] == 1
    (line,) = [entry for entry in logs if entry["event"] == "agreement.sr_other_patient"]
    assert line["sr_sop_uid"] == wrong_uid
    assert "OTHER-PATIENT-4711" not in repr(logs) and image_id not in repr(logs)


def test_the_cart_comes_from_the_images_and_an_early_sr_is_read_again_with_them(tmp_path: Path) -> None:
    """An SR read before its study had an image is read again when the first image comes (the
    Patient ID check and the cart are the images'); images that name no cart give none, and
    the SR's equipment is used only while the study has no image at all."""
    node = Node(tmp_path)
    early, blank = generate_uid(), generate_uid()
    node.sr(early, LVH)
    node.put(report_pdf(early, station="REPORTING-1"))  # the reporting system's PDF is not an image either
    node.journal.mark_stable(-1)
    assert node.job().run() == 1
    sr_only = node.journal.reference(early)
    assert sr_only.manufacturer is not None and sr_only.station_name is None  # the SR's equipment
    assert node.journal.reference_counts()["due"] == 0
    node.image(early, station="ECHO-9")
    node.journal.mark_stable(-1)
    assert node.job().run() == 1
    ref = node.journal.reference(early)
    assert (ref.manufacturer, ref.station_name) == ("GE Vingmed Ultrasound", "ECHO-9")
    assert ref.labels["lvh"][0] == 1
    node.image(early, station="ECHO-10")  # only the first image queues the study again
    assert node.journal.reference_counts()["due"] == 0
    node.image(blank, manufacturer="", model="", station="")
    node.sr(blank, LVH)
    node.journal.mark_stable(-1)
    assert node.job().run() == 1
    ref = node.journal.reference(blank)
    assert (ref.manufacturer, ref.model_name, ref.station_name) == (None, None, None)
