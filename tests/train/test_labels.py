"""Label rules at their boundaries, the rules file, and ``echonode-train labels`` end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from echonode.measurements import (
    RulesError,
    load_rules,
    parse_rules,
    read_measurement_sr,
    study_reference,
)
from echonode.measurements.rules import (
    LvhRules,
    Rules,
    SevereAsRules,
    decide_lvh,
    decide_severe_as,
)
from tests import echo_sr
from tests.factories import us_multiframe, write
from train.cli import main as train_main
from train.labels import LABEL_COLUMNS

RULES = load_rules()
NORMAL = {"ivsd": 0.9, "lvpwd": 0.9, "lvidd": 4.6, "lv_mass_index": 80.0, "av_vmax": 1.4, "av_mean_gradient": 5.0,
          "av_area": 3.0, "av_cusp_sep": 1.9}  # fmt: skip


def lvh(sex: str | None = "M", **changes: float | None) -> int | None:
    return decide_lvh({**NORMAL, **changes}, sex, RULES.lvh).label


def severe_as(**changes: float | None) -> int | None:
    return decide_severe_as({**NORMAL, **changes}, RULES.severe_as).label


# ------------------------------------------------------------------ rules at their boundaries


def test_default_rules_are_the_documented_ones() -> None:
    assert RULES.lvh == LvhRules(1.2, 115.0, 95.0, ("ivsd_cm", "lvpwd_cm"))
    assert RULES.severe_as == SevereAsRules(4.0, 40.0, 1.0, ("av_vmax_m_s",))


@pytest.mark.parametrize("wall", ["ivsd", "lvpwd"])
def test_lvh_wall_thickness_boundary(wall: str) -> None:
    assert lvh(**{wall: 1.19}) == 0
    assert lvh(**{wall: 1.2}) == 1


def test_lvh_mass_index_boundaries_by_sex() -> None:
    assert lvh("M", lv_mass_index=115.0) == 0
    assert lvh("M", lv_mass_index=115.1) == 1
    assert lvh("F", lv_mass_index=95.0) == 0
    assert lvh("F", lv_mass_index=95.1) == 1
    # Sex unknown: above both limits counts, at or under both does not, between is undecided.
    assert lvh(None, lv_mass_index=115.1) == 1
    assert lvh(None, lv_mass_index=95.0) == 0
    decision = decide_lvh({**NORMAL, "lv_mass_index": 100.0}, None, RULES.lvh)
    assert decision.label is None and "sex is unknown" in decision.reason
    # Without a mass index, the walls decide alone.
    assert lvh(None, lv_mass_index=None) == 0


def test_lvh_needs_both_walls_for_a_zero() -> None:
    decision = decide_lvh({**NORMAL, "lvpwd": None}, "M", RULES.lvh)
    assert decision.label is None and "posterior wall" in decision.reason
    assert lvh(lvpwd=None, ivsd=1.3) == 1  # one thick wall is enough for a one


def test_severe_as_velocity_and_gradient_boundaries() -> None:
    assert severe_as(av_vmax=3.99) == 0
    assert severe_as(av_vmax=4.0) == 1
    assert severe_as(av_mean_gradient=39.9) == 0
    assert severe_as(av_mean_gradient=40.0) == 1


def test_low_gradient_as_is_excluded() -> None:
    decision = decide_severe_as({**NORMAL, "av_area": 1.0, "av_vmax": 3.5, "av_mean_gradient": 30.0}, RULES.severe_as)
    assert decision.label is None
    assert decision.reason.startswith("low-gradient AS, excluded: AV area 1 cm2 <= 1")
    assert severe_as(av_area=1.01, av_vmax=3.5, av_mean_gradient=30.0) == 0
    assert severe_as(av_area=0.8, av_vmax=4.1) == 1  # high gradient: severe, whatever the area


def test_a_small_valve_without_velocity_or_gradient_is_not_called_low_gradient() -> None:
    decision = decide_severe_as({**NORMAL, "av_area": 0.8, "av_vmax": None, "av_mean_gradient": None},
                                RULES.severe_as, {"av_vmax": "aortic valve peak velocity: not usable (no finding site)"})
    assert decision.label is None and "low-gradient" not in decision.reason
    assert decision.reason == ("aortic valve peak velocity: not usable (no finding site); AV area 0.8 cm2 <= 1, "
                               "which alone does not decide")


def test_severe_as_needs_vmax_for_a_zero() -> None:
    decision = decide_severe_as({**NORMAL, "av_vmax": None}, RULES.severe_as)
    assert decision.label is None and "peak velocity: not measured" in decision.reason


@pytest.mark.parametrize("dialect", ["ge", "philips", "tid5300"])
@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"ivsd": 1.19}, (0, 0)),
        ({"ivsd": 1.2}, (1, 0)),
        ({"lv_mass_index": 115.1}, (1, 0)),
        ({"av_vmax": 3.99}, (0, 0)),
        ({"av_vmax": 4.0}, (0, 1)),
        ({"av_mean_gradient": 40.0}, (0, 1)),
        ({"av_area": 1.0, "av_vmax": 3.6, "av_mean_gradient": 30.0}, (0, None)),
    ],
)
def test_boundaries_through_each_dialect(dialect: str, changes: dict, expected: tuple, tmp_path: Path) -> None:
    """The boundary values survive the SR: mm and cm/s conversions land exactly on the limits."""
    path = echo_sr.save(echo_sr.echo_sr(dialect, {**NORMAL, **changes}, patient_sex="M"), tmp_path / "sr.dcm")
    ref = study_reference([read_measurement_sr(path)], RULES)
    assert (ref.labels["lvh"].label, ref.labels["severe_as"].label) == expected, ref.labels


# ------------------------------------------------------------------ the rules file


def test_a_rules_file_replaces_the_default(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(
        "[lvh]\nwall_thickness_cm = 1.3\nnegative_requires = ['ivsd_cm']\n"
        "[severe_as]\nav_vmax_m_s = 3.5\n"
    )
    rules = load_rules(path)
    assert rules.lvh == LvhRules(1.3, None, None, ("ivsd_cm",))
    assert rules.severe_as == SevereAsRules(3.5, None, None, ())
    assert decide_lvh({**NORMAL, "ivsd": 1.25, "lvpwd": None}, "M", rules.lvh).label == 0
    assert decide_lvh({**NORMAL, "lv_mass_index": 300.0}, "M", rules.lvh).label == 0  # criterion off
    assert decide_severe_as({**NORMAL, "av_vmax": 3.5}, rules.severe_as).label == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[lvh]\nwall_thicknes_cm = 1.2\n[severe_as]\nav_vmax_m_s = 4.0\n", "unknown key [lvh] wall_thicknes_cm"),
        ("[lvh]\nwall_thickness_cm = '1.2'\n[severe_as]\nav_vmax_m_s = 4.0\n",
         "[lvh] wall_thickness_cm must be a positive number"),
        ("[lvh]\nwall_thickness_cm = -1\n[severe_as]\nav_vmax_m_s = 4.0\n", "[lvh] wall_thickness_cm must be a positive"),
        ("[lvh]\nwall_thickness_cm = 1.2\n", "missing table [severe_as]"),
        ("[lvh]\nwall_thickness_cm = 1.2\n[severe_as]\nav_vmax_m_s = 4.0\n[view]\n", "unknown table [view]"),
        ("[lvh]\nnegative_requires = []\n[severe_as]\nav_vmax_m_s = 4.0\n", "[lvh] has no criterion"),
        ("[lvh]\nwall_thickness_cm = 1.2\nnegative_requires = ['ivs_cm']\n[severe_as]\nav_vmax_m_s = 4.0\n",
         "[lvh] negative_requires names 'ivs_cm'"),
        ("[lvh]\nwall_thickness_cm = 1.2\nlv_mass_index_male_g_m2 = 115\n[severe_as]\nav_vmax_m_s = 4.0\n",
         "go together"),
        ("[lvh\n", "not valid TOML"),
    ],
)  # fmt: skip
def test_a_bad_rules_file_names_the_bad_key(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(RulesError) as err:
        load_rules(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_parse_rules_takes_a_mapping() -> None:
    assert isinstance(parse_rules({"lvh": {"wall_thickness_cm": 1.2}, "severe_as": {"av_mean_gradient_mmhg": 40}}), Rules)


# ------------------------------------------------------------------ end to end


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def archive(tmp_path: Path) -> dict:
    """A folder like a PACS export: studies in each dialect, with and without images, and bad files."""
    root = tmp_path / "archive"
    uids: dict[str, str] = {}

    def study(name: str, *, images: int = 1) -> str:
        uid = uids[name] = generate_uid()
        for i in range(images):
            # The patient the SR helpers write (an SR under another Patient ID is not used).
            write(us_multiframe(study_uid=uid, frames=2, rows=16, cols=16, seed=i, patient_id="ECHO001"),
                  root / name / f"img{i}.dcm")
        return uid

    echo_sr.save(echo_sr.ge_sr({**NORMAL, "ivsd": 1.25}, study_uid=study("ge_lvh"), patient_sex="M"), root / "ge_lvh/sr.dcm")
    echo_sr.save(echo_sr.philips_sr({**NORMAL, "av_vmax": 4.3, "av_mean_gradient": 48.0, "av_area": 0.7},
                                    study_uid=study("philips_as")), root / "philips_as/sr.dcm")  # fmt: skip
    echo_sr.save(echo_sr.tid5300_sr(NORMAL, study_uid=study("normal_5300")), root / "normal_5300/sr.dcm")
    # Low-gradient AS: empty label.
    echo_sr.save(echo_sr.tid5300_sr({**NORMAL, "av_area": 0.9, "av_vmax": 3.4, "av_mean_gradient": 28.0},
                                    study_uid=study("low_gradient")), root / "low_gradient/sr.dcm")  # fmt: skip
    # A cart SR, then the workstation's later one with other values: the later counts.
    uid = study("finished_later")
    echo_sr.save(echo_sr.ge_sr(NORMAL, study_uid=uid, content_time="090000"), root / "finished_later/cart.dcm")
    echo_sr.save(echo_sr.tid5300_sr({**NORMAL, "lvpwd": 1.4}, study_uid=uid, content_time="170000"),
                 root / "finished_later/workstation.dcm")  # fmt: skip
    # Only images; only an SR; an SR cut short; a non-echo SR; a stray text file.
    study("images_only", images=2)
    uids["sr_only"] = generate_uid()
    echo_sr.save(echo_sr.tid5300_sr(NORMAL, study_uid=uids["sr_only"]), root / "sr_only/sr.dcm")
    uid = study("cut")
    data = echo_sr.save(echo_sr.ge_sr(NORMAL, study_uid=uid), root / "cut/sr.dcm").read_bytes()
    (root / "cut/sr.dcm").write_bytes(data[: len(data) // 2])
    uid = study("not_echo")
    echo_sr.save(echo_sr.document([], template="1500", title=codes.DCM.ImagingMeasurementReport, study_uid=uid),
                 root / "not_echo/sr.dcm")  # fmt: skip
    (root / "README.txt").write_text("export of 2026-01-02")
    (root / "junk.bin").write_bytes(b"\x00" * 300)
    return {"root": root, "uids": uids}


def test_labels_end_to_end(archive: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, evidence = tmp_path / "out/labels.csv", tmp_path / "out/evidence.csv"
    assert train_main(["labels", str(archive["root"]), "--out", str(out), "--evidence", str(evidence), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "9 studies, 6 with a usable measurement SR (1 of them without images" in printed
    rows = {r["study_uid"]: r for r in _csv(out)}
    assert list(_csv(out)[0]) == list(LABEL_COLUMNS)
    u = archive["uids"]
    assert (rows[u["ge_lvh"]]["lvh"], rows[u["ge_lvh"]]["severe_as"], rows[u["ge_lvh"]]["ivsd_cm"]) == ("1", "0", "1.25")
    assert (rows[u["philips_as"]]["severe_as"], rows[u["philips_as"]]["av_vmax_m_s"]) == ("1", "4.3")
    assert rows[u["philips_as"]]["av_area_cm2"] == "0.7"
    assert (rows[u["normal_5300"]]["lvh"], rows[u["normal_5300"]]["severe_as"]) == ("0", "0")
    low = rows[u["low_gradient"]]
    assert low["severe_as"] == "" and low["severe_as_reason"].startswith("low-gradient AS, excluded")
    later = rows[u["finished_later"]]
    assert (later["lvh"], later["lvpwd_cm"]) == ("1", "1.4")
    for name in ("images_only", "cut", "not_echo"):
        assert (rows[u[name]]["lvh"], rows[u[name]]["severe_as"]) == ("", ""), name
        assert rows[u[name]]["lvh_reason"] == "no echo measurement SR with a usable value in the study"
    assert rows[u["sr_only"]]["lvh"] == "0"

    ev = _csv(evidence)
    srs = {r["file"]: r for r in ev if r["kind"] == "sr"}
    assert srs["finished_later/cart.dcm"]["status"] == "superseded"
    assert "superseded by the later SR" in srs["finished_later/cart.dcm"]["reason"]
    assert srs["finished_later/workstation.dcm"]["status"] == "used"
    assert srs["cut/sr.dcm"]["status"] == "unreadable" and "cut short" in srs["cut/sr.dcm"]["reason"]
    assert srs["not_echo"+"/sr.dcm"]["status"] == "not_echo"
    assert srs["ge_lvh/sr.dcm"]["template"] == "5200" and srs["ge_lvh/sr.dcm"]["manufacturer"] == "GE Vingmed Ultrasound"
    values = [r for r in ev if r["kind"] == "value" and r["file"] == "ge_lvh/sr.dcm" and r["concept"] == "ivsd"]
    assert [r["status"] for r in values] == ["read", "selected"] and values[0]["raw_unit"] == "UCUM:cm"
    assert {r["study_uid"] for r in ev if r["kind"] == "study" and r["status"] == "no images"} == {u["sr_only"]}
    labels = [r for r in ev if r["kind"] == "label" and r["study_uid"] == u["low_gradient"]]
    assert {r["concept"]: r["status"] for r in labels} == {"lvh": "decided", "severe_as": "empty"}
    # No patient data in either file.
    for text in (out.read_text(), evidence.read_text()):
        assert "TEST^ECHO" not in text and "ECHO001" not in text


def test_labels_evidence_as_json_lines_and_several_archives(archive: dict, tmp_path: Path) -> None:
    other = tmp_path / "second"
    uid = generate_uid()
    echo_sr.save(echo_sr.philips_sr({**NORMAL, "lvpwd": 1.5}, study_uid=uid), other / "sr.dcm")
    out, evidence = tmp_path / "labels.csv", tmp_path / "evidence.jsonl"
    code = train_main(["labels", str(archive["root"]), str(other), "--out", str(out), "--evidence", str(evidence),
                       "--no-progress"])  # fmt: skip
    assert code == 0
    assert {r["study_uid"]: r["lvh"] for r in _csv(out)}[uid] == "1"
    lines = [json.loads(line) for line in evidence.read_text().splitlines()]
    assert {line["kind"] for line in lines} == {"value", "sr", "label", "study"}
    assert all("study_uid" in line or line["kind"] == "sr" for line in lines)


def test_labels_reads_a_node_storage_dir_and_skips_incoming(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    uid = generate_uid()
    echo_sr.save(echo_sr.tid5300_sr(NORMAL, study_uid=uid), storage / "studies" / uid / "s" / "sr.dcm")
    # A transfer in flight, in a node's incoming/: not read.
    echo_sr.save(echo_sr.tid5300_sr({**NORMAL, "ivsd": 1.6}, study_uid=generate_uid()), storage / "incoming" / "x.dcm")
    (storage / "reports").mkdir()
    out = tmp_path / "labels.csv"
    assert train_main(["labels", str(storage), "--out", str(out), "--no-progress"]) == 0
    assert [r["study_uid"] for r in _csv(out)] == [uid]


def test_labels_with_rules_file_and_bad_rules(archive: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text("[lvh]\nwall_thickness_cm = 1.3\nnegative_requires = ['ivsd_cm', 'lvpwd_cm']\n"
                     "[severe_as]\nav_vmax_m_s = 4.0\nav_mean_gradient_mmhg = 40.0\n"
                     "negative_requires = ['av_vmax_m_s']\n")  # fmt: skip
    out = tmp_path / "labels.csv"
    assert train_main(["labels", str(archive["root"]), "--out", str(out), "--rules", str(rules), "--no-progress"]) == 0
    rows = {r["study_uid"]: r for r in _csv(out)}
    assert rows[archive["uids"]["ge_lvh"]]["lvh"] == "0"  # 1.25 cm < 1.3
    # Without the low-gradient criterion, the study is a plain 0.
    assert rows[archive["uids"]["low_gradient"]]["severe_as"] == "0"
    rules.write_text("[lvh]\nwall_thickness = 1.3\n[severe_as]\nav_vmax_m_s = 4.0\n")
    capsys.readouterr()
    assert train_main(["labels", str(archive["root"]), "--out", str(tmp_path / "x.csv"), "--rules", str(rules)]) == 2
    assert "unknown key [lvh] wall_thickness" in capsys.readouterr().out
    assert not (tmp_path / "x.csv").exists()
    assert train_main(["labels", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.csv")]) == 2


def test_finetune_and_evaluate_read_the_labels_file(archive: dict, tmp_path: Path) -> None:
    """The trainers' label reader takes the extra columns and treats an empty label as no label."""
    from train.cache import load_study_labels
    from train.finetune import _binary

    out = tmp_path / "labels.csv"
    assert train_main(["labels", str(archive["root"]), "--out", str(out), "--no-progress"]) == 0
    rows = load_study_labels(out)
    u = archive["uids"]
    by = {r["study_uid"]: r for r in rows}
    assert _binary(by[u["ge_lvh"]]["lvh"]) == 1 and _binary(by[u["normal_5300"]]["lvh"]) == 0
    assert _binary(by[u["low_gradient"]]["severe_as"]) is None
    assert _binary(by[u["low_gradient"]]["lvh"]) == 0
    assert _binary(by[u["images_only"]]["lvh"]) is None and _binary(by[u["images_only"]]["severe_as"]) is None


def test_contradictions_and_srs_without_images_are_logged_with_uids_only(tmp_path: Path) -> None:
    import structlog

    from tests.echo_sr import DCM, LN, SCT, code_item, document, group, num_item, section
    from train.labels import build_labels

    chosen = code_item("HAS PROPERTIES", DCM.SelectionStatus, DCM.UserChosenValue)
    uid = generate_uid()
    nums = [num_item(LN.InterventricularSeptumDiastolicThickness, v, "cm", modifiers=[chosen]) for v in (1.0, 1.4)]
    nums.append(num_item(LN.LeftVentriclePosteriorWallDiastolicThickness, 0.9, "cm"))
    echo_sr.save(document([section(SCT.LeftVentricle, [group(SCT._2DMode, nums)])], template="5200", study_uid=uid),
                 tmp_path / "a" / "sr.dcm")  # fmt: skip
    with structlog.testing.capture_logs() as logs:
        report = build_labels([tmp_path / "a"], tmp_path / "labels.csv", evidence=tmp_path / "ev.csv", progress=False)
    (row,) = _csv(tmp_path / "labels.csv")
    assert row["lvh"] == "" and row["ivsd_cm"] == "" and "selected values disagree" in row["lvh_reason"]
    events = {e["event"]: e for e in logs}
    assert events["labels.contradictory_values"]["concepts"] == ["ivsd"]
    assert events["labels.sr_without_images"]["study_uid"] == uid
    assert report.studies_without_images == 1
    assert "TEST^ECHO" not in repr(logs) and "ECHO001" not in repr(logs)


def test_labels_over_a_synthetic_archive_reproduce_its_labels_csv(tmp_path: Path) -> None:
    """The reader and synth's writer follow the standard independently: the labels read
    from synth's measurement SRs are synth's own truth, label for label and value for value."""
    archive = tmp_path / "archive"
    assert train_main(["synth", "--out", str(archive), "--patients", "12", "--seed", "11", "--frames", "8",
                       "--rows", "120", "--cols", "160"]) == 0  # fmt: skip
    out = tmp_path / "labels.csv"
    assert train_main(["labels", str(archive), "--out", str(out), "--no-progress"]) == 0
    with open(archive / "labels.csv", newline="") as fh:
        truth = {r["study_uid"]: r for r in csv.DictReader(fh)}
    with open(out, newline="") as fh:
        read = {r["study_uid"]: r for r in csv.DictReader(fh)}
    assert read.keys() == truth.keys() and len(truth) > 12
    assert {r["lvh"] for r in truth.values()} == {r["severe_as"] for r in truth.values()} == {"0", "1"}
    for study, row in truth.items():
        got = read[study]
        assert (got["lvh"], got["severe_as"]) == (row["lvh"], row["severe_as"]), study
        for column in ("ivsd_cm", "lvpwd_cm", "lvidd_cm", "lv_mass_index_g_m2", "av_vmax_m_s",
                       "av_mean_gradient_mmhg", "av_area_cm2"):
            assert float(got[column]) == pytest.approx(float(row[column]), abs=1e-6), (study, column)


@pytest.mark.parametrize(("sr_patient", "why"), [("PAT-2", "another Patient ID"), ("", "without a Patient ID")])
def test_an_sr_filed_under_another_patient_gives_no_label(tmp_path: Path, sr_patient: str, why: str) -> None:
    """A worklist mix-up at the cart: the SR names another Patient ID than the study's images, or
    none. Its values cannot be shown to be this patient's, so the study gets no label, and the
    evidence says why."""
    from train.labels import build_labels

    uid = generate_uid()
    write(us_multiframe(study_uid=uid, frames=2, rows=16, cols=16, patient_id="PAT-1"), tmp_path / "a" / "img.dcm")
    sr = echo_sr.ge_sr({**NORMAL, "ivsd": 1.5}, study_uid=uid)
    sr.PatientID = sr_patient
    echo_sr.save(sr, tmp_path / "a" / "sr.dcm")
    build_labels([tmp_path / "a"], tmp_path / "labels.csv", evidence=tmp_path / "ev.csv", progress=False)
    (row,) = _csv(tmp_path / "labels.csv")
    assert row["study_uid"] == uid and row["lvh"] == "" and row["ivsd_cm"] == ""
    evidence = (tmp_path / "ev.csv").read_text()
    assert why in evidence and "PAT-1" not in evidence and "PAT-2" not in evidence



def _row_and_srs(root: Path, tmp_path: Path) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    out, evidence = tmp_path / "out.csv", tmp_path / "ev.csv"
    assert train_main(["labels", str(root), "--out", str(out), "--evidence", str(evidence), "--no-progress"]) == 0
    (row,) = _csv(out)
    return row, {r["file"]: r for r in _csv(evidence) if r["kind"] == "sr"}


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_a_study_whose_images_name_two_patients_gets_no_label(order: tuple[str, str], tmp_path: Path) -> None:
    """A merged study (or two patients' studies under one UID): whichever image is read first, no
    SR is shown to be the images' patient's, so no label reaches either patient's videos."""
    root, uid = tmp_path / "archive", generate_uid()
    for folder, patient in zip(order, ("PAT-A", "PAT-B"), strict=True):
        write(us_multiframe(study_uid=uid, frames=2, rows=16, cols=16, patient_id=patient), root / folder / "img.dcm")
    ds = echo_sr.tid5300_sr({**NORMAL, "ivsd": 1.5}, study_uid=uid)
    ds.PatientID = "PAT-B"
    echo_sr.save(ds, root / "b" / "sr.dcm")
    row, srs = _row_and_srs(root, tmp_path)
    assert (row["lvh"], row["severe_as"]) == ("", "")
    assert row["lvh_reason"].startswith("the study's images carry more than one Patient ID")
    assert srs["b/sr.dcm"]["status"] == "other_patient"


def test_srs_of_two_patients_in_a_study_without_patient_ids_are_not_merged(tmp_path: Path) -> None:
    """No image Patient ID to compare with: a cart's SR of one patient and a workstation's of
    another are a conflict, not one report supplementing the other."""
    root, uid = tmp_path / "archive", generate_uid()
    write(us_multiframe(study_uid=uid, frames=2, rows=16, cols=16, patient_id=""), root / "img.dcm")
    cart = echo_sr.ge_sr({**NORMAL, "ivsd": 1.5}, study_uid=uid, content_time="090000")
    cart.PatientID = "PAT-A"
    tool = echo_sr.tid5300_sr({"av_vmax": 4.6}, study_uid=uid, content_time="120000")
    tool.PatientID = "PAT-B"
    echo_sr.save(cart, root / "cart.dcm")
    echo_sr.save(tool, root / "tool.dcm")
    row, srs = _row_and_srs(root, tmp_path)
    assert (row["lvh"], row["severe_as"]) == ("", "")
    assert "more than one Patient ID" in row["severe_as_reason"]
    assert srs["cart.dcm"]["status"] == srs["tool.dcm"]["status"] == "other_patient"


def test_two_different_reports_under_one_sop_instance_uid_are_both_refused(tmp_path: Path) -> None:
    root, uid, sop = tmp_path / "archive", generate_uid(), generate_uid()
    write(us_multiframe(study_uid=uid, frames=2, rows=16, cols=16, patient_id="ECHO001"), root / "img.dcm")
    echo_sr.save(echo_sr.tid5300_sr(NORMAL, study_uid=uid, sop_uid=sop, content_time="090000"), root / "a_old.dcm")
    echo_sr.save(echo_sr.tid5300_sr({**NORMAL, "ivsd": 1.5}, study_uid=uid, sop_uid=sop, content_time="170000"),
                 root / "b_new.dcm")
    echo_sr.save(echo_sr.tid5300_sr({**NORMAL, "ivsd": 1.5}, study_uid=uid, sop_uid=sop, content_time="170000"),
                 root / "c_copy.dcm")  # a true copy of b_new: still one of the two
    row, srs = _row_and_srs(root, tmp_path)
    assert (row["lvh"], row["lvh_reason"]) == ("", "no echo measurement SR with a usable value in the study")
    assert srs["a_old.dcm"]["status"] == srs["b_new.dcm"]["status"] == "conflict"
    # A plain copy of one SR stays a duplicate.
    other = tmp_path / "copies"
    write(us_multiframe(study_uid=uid, frames=2, rows=16, cols=16, patient_id="ECHO001"), other / "img.dcm")
    echo_sr.save(echo_sr.tid5300_sr(NORMAL, study_uid=uid, sop_uid=sop), other / "a.dcm")
    echo_sr.save(echo_sr.tid5300_sr(NORMAL, study_uid=uid, sop_uid=sop), other / "b.dcm")
    row, srs = _row_and_srs(other, tmp_path)
    assert row["lvh"] == "0" and srs["b.dcm"]["status"] == "duplicate"


def test_a_fifo_in_the_archive_does_not_block_the_run(tmp_path: Path) -> None:
    import os

    root, uid = tmp_path / "archive", generate_uid()
    write(us_multiframe(study_uid=uid, frames=2, rows=16, cols=16, patient_id="ECHO001"), root / "img.dcm")
    echo_sr.save(echo_sr.tid5300_sr(NORMAL, study_uid=uid), root / "sr.dcm")
    os.mkfifo(root / "pipe.dcm")  # opening it would wait for a writer forever
    row, _ = _row_and_srs(root, tmp_path)
    assert row["lvh"] == "0"


def test_an_sr_without_a_study_instance_uid_says_so(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    ds = echo_sr.tid5300_sr(NORMAL)
    del ds.StudyInstanceUID
    echo_sr.save(ds, root / "sr.dcm")
    out, evidence = tmp_path / "out.csv", tmp_path / "ev.csv"
    assert train_main(["labels", str(root), "--out", str(out), "--evidence", str(evidence), "--no-progress"]) == 0
    (row,) = [r for r in _csv(evidence) if r["kind"] == "sr"]
    assert row["status"] == "unreadable" and row["reason"].startswith("no Study Instance UID")
