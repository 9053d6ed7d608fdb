"""What the SR says: coded views, numbers rounded to what they mean, a plain line per finding,
and a study the models cannot assess reported as such, never left silent.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import highdicom as hd
import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from echonode.analyse.worker import StudyOutcome, process_study
from echonode.bundles.registry import ModelRegistry
from echonode.bundles.weights import load_bundle
from echonode.report.build import build_report
from echonode.report.codes import VIEWS
from echonode.report.findings import NotAssessed, SourceInstance
from echonode.report.read import summarise_report
from echonode.report.summary import finding_line, probability_text, reported_probability
from echonode.studies.journal import Journal
from echonode.studies.states import StudyState
from echonode.studies.store import StudyStore
from tests.conftest import make_config
from tests.factories import tiny_bundle, us_multiframe, write
from tests.report_support import (
    PLA_WARNING,
    SOP_CLASS_UIDS,
    dciodvfy,
    dsrdump,
    example_sources,
    make_findings,
    strict_reading,
    study_header,
    walk,
    write_read,
)

pytestmark = pytest.mark.filterwarnings(PLA_WARNING)

PLAX = ("SCT", "399139001", "Parasternal long axis")
A4C = ("SCT", "399214001", "Apical four chamber")
UNDETERMINED = ("SCT", "373068000", "Undetermined")


@pytest.fixture(scope="module")
def header() -> Dataset:
    return study_header()


def _not_assessed(reason: str = "no_required_view") -> list[NotAssessed]:
    return [
        NotAssessed("lvh", reason, 0.5, "echoclr-lvh", "1.2.0", generate_uid(), {"clip_frames": "16"},
                    ("plax",) if reason == "no_required_view" else ()),
        NotAssessed("severe_as", reason, 0.4, "echoclr-severe-as", "0.9.1", generate_uid(), {},
                    ("plax",) if reason == "no_required_view" else ()),
    ]


def _code(item: Dataset, keyword: str = "ConceptCodeSequence") -> tuple[str, str, str]:
    code = item[keyword][0]
    return (code.CodingSchemeDesignator, code.CodeValue, code.CodeMeaning)


# ---------------------------------------------------------------- views


def test_each_video_carries_its_view_coded_from_cid_12226(header: Dataset, tmp_path: Path) -> None:
    """plax -> SCT 399139001 "Parasternal long axis" (CID 12226), as the video's acquisition context."""
    sources = (*example_sources(header), SourceInstance(header.SOPClassUID, generate_uid(),
                                                        header.SeriesInstanceUID, "plax_zoomed"))
    lvh = dataclasses.replace(make_findings(sources[:3])[0], sources=sources, n_videos=4, video_probabilities={})
    path = tmp_path / "sr.dcm"
    with strict_reading():
        back = write_read(build_report(header, [lvh]), path)
    views = {}
    for item in walk(back.ContentSequence):
        if item.ValueType == "IMAGE" and "ContentSequence" in item:
            (context,) = item.ContentSequence
            assert context.RelationshipType == "HAS ACQ CONTEXT"
            assert _code(context, "ConceptNameCodeSequence") == ("DCM", "111031", "Image View")
            uid = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            views[uid] = _code(context) if context.ValueType == "CODE" else str(context.TextValue)
    assert views == {sources[0].sop_instance_uid: PLAX, sources[1].sop_instance_uid: A4C,
                     sources[2].sop_instance_uid: PLAX, sources[3].sop_instance_uid: "plax_zoomed"}
    (got,) = summarise_report(back)["findings"]
    assert got["views_used"] == ["plax", "a4c", "plax_zoomed"]
    assert got["view_codes"] == ["SCT 399139001", "SCT 399214001"]
    assert got["video_views"] == {s.sop_instance_uid: s.view for s in sources}
    # highdicom's own reader still sees one evaluation per group: the view is not one.
    report = hd.sr.srread(path)
    (group,) = report.content.get_image_measurement_groups()
    assert [(q.name.meaning, q.value.meaning) for q in group.get_qualitative_evaluations()] == [
        ("Left ventricular hypertrophy", "Present")]
    dciodvfy(path)
    assert "Parasternal long axis" in dsrdump(path)


def test_every_view_label_has_one_cid_12226_code() -> None:
    from pydicom.sr._cid_dict import cid_concepts

    cid = {name for names in cid_concepts[12226].values() for name in names}
    coded = [view.code for view in VIEWS.values()]
    assert len(set(coded)) == len(coded)  # a report reads back to the labels it was built from
    for view in VIEWS.values():
        assert view.code.scheme_designator == "SCT"  # not the retired SRT
        assert any(getattr(codes.cid12226, n) == view.code for n in cid)


# ---------------------------------------------------------------- numbers and lines


def test_numbers_are_rounded_to_what_they_mean(header: Dataset, tmp_path: Path) -> None:
    """0.42841299250722 was 14 decimals and a count read 2.0: 3 decimals and an integer now."""
    src = example_sources(header)[:2]
    lvh = dataclasses.replace(
        make_findings(example_sources(header))[0], probability=0.42841299250722, sources=src, n_videos=2,
        video_probabilities={src[0].sop_instance_uid: 0.42883140593767, src[1].sop_instance_uid: 0.42799457907677},
    )
    back = write_read(build_report(header, [lvh]), tmp_path / "sr.dcm")
    values: dict[str, list[tuple[str, float | None]]] = {}
    for item in walk(back.ContentSequence):
        if item.ValueType == "NUM":
            mv = item.MeasuredValueSequence[0]
            values.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(
                (str(mv.NumericValue), mv.get("FloatingPointValue")))
    assert values == {
        "Probability": [("0.428", 0.428)],
        "Number of videos used": [("2", None)],
        "Video-level probability": [("0.429", 0.429), ("0.428", 0.428)],
    }


@pytest.mark.parametrize(
    ("probability", "threshold", "shown", "stored"),
    [
        (0.42841299250722, 0.5, ("0.43", "0.50"), 0.428),
        (0.4999, 0.5, ("0.49", "0.50"), 0.499),     # under the threshold: never rounded up to it
        (0.49951, 0.5, ("0.49", "0.50"), 0.499),
        (0.5, 0.5, ("0.50", "0.50"), 0.5),
        (0.50049, 0.5, ("0.50", "0.50"), 0.5),
        (0.4566, 0.4567, ("0.4566", "0.4567"), 0.456),  # a threshold with 4 decimals is shown with 4
        (0.45671, 0.4567, ("0.4567", "0.4567"), 0.457),
        (1.0, 0.35, ("1.00", "0.35"), 1.0),
        (0.0, 0.35, ("0.00", "0.35"), 0.0),
    ],
)
def test_rounding_never_crosses_the_threshold(probability: float, threshold: float, shown: tuple[str, str],
                                              stored: float) -> None:
    assert probability_text(probability, threshold) == shown
    assert reported_probability(probability, threshold) == stored
    assert (reported_probability(probability, threshold) >= threshold) is (probability >= threshold)


def test_plain_lines_say_the_verdict_first(header: Dataset, tmp_path: Path) -> None:
    sources = example_sources(header)
    lvh, severe_as = make_findings(sources)
    absent = dataclasses.replace(lvh, probability=0.42841299250722, sources=(sources[0], sources[2]), n_videos=2,
                                 video_probabilities={})
    assert finding_line(absent) == (
        "Left ventricular hypertrophy: not detected by the AI model (probability 0.43, threshold 0.50,"
        " 2 parasternal long-axis videos). Not for diagnostic use.")
    assert finding_line(lvh) == (
        "Left ventricular hypertrophy: detected by the AI model (probability 0.87, threshold 0.50,"
        " 3 videos: 2 parasternal long-axis, 1 apical four-chamber). Not for diagnostic use.")
    assert finding_line(severe_as) == (
        "Severe aortic stenosis: not detected by the AI model (probability 0.13, threshold 0.40,"
        " 1 parasternal long-axis video). Not for diagnostic use.")
    unclassified = dataclasses.replace(
        lvh, sources=tuple(dataclasses.replace(s, view=None) for s in sources), video_probabilities={})
    assert "(probability 0.87, threshold 0.50, 3 videos)" in finding_line(unclassified)

    back = write_read(build_report(header, [lvh, severe_as]), tmp_path / "sr.dcm")
    # The first item of the document: a line per finding, then the disclaimer.
    first = back.ContentSequence[0]
    assert _code(first, "ConceptNameCodeSequence") == ("UMLS", "C0034375", "Qualitative Evaluations")
    assert [(_code(i, "ConceptNameCodeSequence")[2], i.TextValue) for i in first.ContentSequence[:2]] == [
        ("Finding", finding_line(lvh)), ("Finding", finding_line(severe_as))]
    assert summarise_report(back)["summary_lines"] == [finding_line(lvh), finding_line(severe_as)]
    # Every container says its items are separate statements, so a viewer names each one.
    containers = [i for i in [back, *walk(back.ContentSequence)] if i.get("ValueType", "CONTAINER") == "CONTAINER"]
    assert containers and {c.ContinuityOfContent for c in containers} == {"SEPARATE"}


# ---------------------------------------------------------------- not assessed


@pytest.mark.parametrize("sop_class", sorted(SOP_CLASS_UIDS))
@pytest.mark.parametrize(("reason", "code", "line"), [
    ("no_required_view", ("99ECHONODE", "EN0006", "No video of the required view"),
     "not assessed by the AI model (no parasternal long-axis video in the study)"),
    ("no_usable_video", ("99ECHONODE", "EN0003", "No usable video"),
     "not assessed by the AI model (no usable video in the study)"),
    ("no_measurable_video", ("99ECHONODE", "EN0007", "No video the model could measure"),
     "not assessed by the AI model (no video in the study that this model could measure)"),
])
def test_not_assessed_is_said_in_coded_form(sop_class: str, reason: str, code: tuple[str, str, str], line: str,
                                            header: Dataset, tmp_path: Path) -> None:
    """Each finding Undetermined (CID 240) with the coded reason: silence is never read as "absent"."""
    tasks = _not_assessed(reason)
    path = tmp_path / "sr.dcm"
    with strict_reading():
        back = write_read(build_report(header, [], sop_class=sop_class, not_assessed=tasks,
                                       no_usable_video_reason="no video of view plax"), path)
    assert back.SOPClassUID == SOP_CLASS_UIDS[sop_class]
    summary = summarise_report(back)
    assert [(f["task"], f["evaluation"], f["present"], f["assessed"], f["not_assessed_reason"], f["probability"])
            for f in summary["findings"]] == [
        ("lvh", "Undetermined", None, False, reason, None),
        ("severe_as", "Undetermined", None, False, reason, None),
    ]
    assert [(f["model_name"], f["device_uid"], f["threshold"]) for f in summary["findings"]] == [
        (t.model_name, t.device_uid, t.threshold) for t in tasks]
    assert summary["summary_lines"] == [
        f"Left ventricular hypertrophy: {line}. Not for diagnostic use.",
        f"Severe aortic stenosis: {line}. Not for diagnostic use.",
    ]
    assert summary["no_usable_video_reason"] == "no video of view plax"
    assert summary["evidence"] == []
    for group in (i for i in walk(back.ContentSequence) if _code(i, "ConceptNameCodeSequence")[2] == "Measurement Group"):
        evaluations = [(_code(i, "ConceptNameCodeSequence")[2], _code(i)) for i in group.ContentSequence
                       if i.ValueType == "CODE" and i.RelationshipType == "CONTAINS"
                       and _code(i, "ConceptNameCodeSequence")[2] not in ("Finding",)]
        assert evaluations[0][1] == UNDETERMINED
        assert evaluations[1] == ("Reason not assessed", code)
    report = hd.sr.srread(path)
    for group in report.content.get_image_measurement_groups():
        assert [q.value.meaning for q in group.get_qualitative_evaluations()] == ["Undetermined", code[2]]
    dciodvfy(path)
    text = dsrdump(path)
    assert "Undetermined" in text and "Reason not assessed" in text


@pytest.mark.parametrize("sop_class", sorted(SOP_CLASS_UIDS))
def test_a_task_not_assessed_beside_a_finding_is_said_too(sop_class: str, header: Dataset, tmp_path: Path) -> None:
    """One model measured the study and another could not: the SR says both, the second Undetermined."""
    sources = example_sources(header)
    lvh, _ = make_findings(sources)
    _, severe_as = _not_assessed("no_measurable_video")
    path = tmp_path / "sr.dcm"
    with strict_reading():
        back = write_read(build_report(header, [lvh], sop_class=sop_class, not_assessed=[severe_as]), path)
    summary = summarise_report(back)
    assert [(f["task"], f["evaluation"], f["assessed"], f["not_assessed_reason"], f["probability"] is None)
            for f in summary["findings"]] == [
        ("lvh", "Present", True, None, False),
        ("severe_as", "Undetermined", False, "no_measurable_video", True),
    ]
    assert summary["summary_lines"] == [
        finding_line(lvh),
        "Severe aortic stenosis: not assessed by the AI model (no video in the study that this model could "
        "measure). Not for diagnostic use.",
    ]
    assert summary["no_usable_video_reason"] is None
    # The evidence is what the finding used; the task not assessed used nothing.
    assert sorted(summary["evidence"]) == sorted(s.sop_instance_uid for s in sources)
    report = hd.sr.srread(path)
    groups = report.content.get_image_measurement_groups()
    assert [[q.value.meaning for q in g.get_qualitative_evaluations()] for g in groups] == [
        ["Present"], ["Undetermined", "No video the model could measure"]]
    dciodvfy(path)
    text = dsrdump(path)
    assert "Undetermined" in text and "No video the model could measure" in text


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"not_assessed": _not_assessed(), "with_findings": True}, "not_assessed"),  # a task both ways
        ({"not_assessed": [dataclasses.replace(_not_assessed()[0], reason="tired")],
          "no_usable_video_reason": "x"}, "not_assessed[0].reason"),
        ({"not_assessed": [dataclasses.replace(_not_assessed()[0], task="view")],
          "no_usable_video_reason": "x"}, "not_assessed[0].task"),
        ({"not_assessed": [_not_assessed()[0]] * 2, "no_usable_video_reason": "x"}, "not_assessed"),
        ({"not_assessed": [dataclasses.replace(_not_assessed()[0], required_views="plax")],
          "no_usable_video_reason": "x"}, "not_assessed[0].required_views"),
        ({"not_assessed": "lvh", "no_usable_video_reason": "x"}, "not_assessed"),
    ],
)
def test_bad_not_assessed_arguments_are_named(kwargs: dict, argument: str, header: Dataset) -> None:
    kwargs = dict(kwargs)
    findings = make_findings(example_sources(header)) if kwargs.pop("with_findings", False) else []
    with pytest.raises(ValueError, match=re.escape(f'"{argument}"')):
        build_report(header, findings, **kwargs)


# ---------------------------------------------------------------- the worker


def _view_bundle(models: Path, favour: str) -> None:
    """A view classifier that always answers ``favour`` (zero weights, biased head)."""
    path = tiny_bundle(models, "view", name="views")
    sd = torch.load(path / "weights.pt", weights_only=True)
    labels = load_bundle(path).labels
    sd["fc.weight"].zero_()
    sd["fc.bias"].zero_()
    sd["fc.bias"][labels.index(favour)] = 10.0
    torch.save(sd, path / "weights.pt")


def _process(tmp_path: Path, favour: str, **sr: object) -> tuple[Journal, str, StudyOutcome]:
    cfg = make_config(tmp_path, sr=dict(sr),
                      destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}])
    tiny_bundle(cfg.models_dir, "lvh")
    _view_bundle(cfg.models_dir, favour)
    journal = Journal(cfg.journal_path)
    store = StudyStore(cfg.storage_dir, journal)
    study_uid = generate_uid()
    for i in range(2):
        tmp = store.incoming / f"t-{i}.dcm"
        write(us_multiframe(study_uid=study_uid, frames=16, rows=64, cols=64, seed=i), tmp)
        store.accept(tmp, "CART")
    journal.mark_stable(-1)
    journal.queue_stable()
    registry = ModelRegistry(cfg.models_dir, "cpu")
    registry.refresh()
    outcome = process_study(cfg, journal, store, registry, journal.claim_next(os.getpid()))
    return journal, study_uid, outcome


def test_study_without_plax_video_gets_a_not_assessed_sr(tmp_path: Path) -> None:
    """By default the worker builds, writes and journals it like any SR: an outbox row per destination."""
    journal, study_uid, outcome = _process(tmp_path, "a4c")
    try:
        assert outcome.state == StudyState.REPORTED  # owed to the destination
        report = journal.latest_report(study_uid)
        assert report is not None and outcome.sr_sop_uid == report.sr_sop_uid
        assert report.sop_class_uid == SOP_CLASS_UIDS["comprehensive3d"]
        assert [(r["destination"], r["state"]) for r in journal.status()["outbox"]] == [("pacs", "pending")]
        summary = summarise_report(report.path)
        (lvh,) = summary["findings"]
        assert (lvh["task"], lvh["evaluation"], lvh["not_assessed_reason"], lvh["model_name"]) == (
            "lvh", "Undetermined", "no_required_view", "test-lvh")
        assert summary["summary_lines"] == [(
            "Left ventricular hypertrophy: not assessed by the AI model (no parasternal long-axis video in the"
            " study). Not for diagnostic use.")]
        assert summary["no_usable_video_reason"] == "no video of view plax"
        dciodvfy(Path(report.path))
    finally:
        journal.close()


def test_report_skipped_false_keeps_silence(tmp_path: Path) -> None:
    journal, study_uid, outcome = _process(tmp_path, "a4c", report_skipped=False)
    try:
        assert (outcome.state, outcome.reason) == ("skipped", "no video of view plax")
        assert journal.latest_report(study_uid) is None
        assert journal.status()["outbox"] == []
    finally:
        journal.close()


def test_worker_codes_the_view_the_classifier_found(tmp_path: Path) -> None:
    journal, study_uid, _ = _process(tmp_path, "plax")
    try:
        report = journal.latest_report(study_uid)
        assert report is not None
        summary = summarise_report(report.path)
        (lvh,) = summary["findings"]
        assert lvh["evaluation"] in ("Present", "Absent")
        assert (lvh["views_used"], lvh["view_codes"], lvh["n_videos"]) == (["plax"], ["SCT 399139001"], 2)
        assert summary["summary_lines"][0].endswith("2 parasternal long-axis videos). Not for diagnostic use.")
    finally:
        journal.close()


def test_demo_prints_what_the_sr_says(header: Dataset, tmp_path: Path) -> None:
    """``echonode demo``'s summary of a received SR: the plain lines first, then each finding."""
    from echonode.commands.demo import describe_report

    sources = example_sources(header)
    found = tmp_path / "found.dcm"
    build_report(header, make_findings(sources)).save_as(found, enforce_file_format=True)
    text = describe_report(found).splitlines()
    assert text[3] == "  " + finding_line(make_findings(sources)[0])
    assert any(line.split()[:4] == ["Left", "ventricular", "hypertrophy", "PRESENT"] for line in text)
    assert any("probability 0.873 (threshold 0.5)" in line for line in text)

    silent = tmp_path / "not_assessed.dcm"
    build_report(header, [], not_assessed=_not_assessed(), no_usable_video_reason="no video of view plax").save_as(
        silent, enforce_file_format=True)
    said = describe_report(silent)
    assert "Left ventricular hypertrophy: not assessed by the AI model" in said
    assert "NOT ASSESSED" in said and "(no required view)" in said and "absent" not in said
