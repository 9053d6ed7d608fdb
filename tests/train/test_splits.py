"""Tests for train.splits: patient-level splits and study-level label fractions."""

from __future__ import annotations

import random

import pytest

from train.splits import (
    SPLIT_FILE,
    SplitRecord,
    assign_split,
    check_no_overlap,
    patient_key,
    sample_label_fraction,
    split_by_patient,
)


def _archive(n_patients: int = 60, seed: int = 0) -> tuple[dict[str, str], dict[str, int]]:
    rng = random.Random(seed)
    study_patient, study_label = {}, {}
    for p in range(n_patients):
        for s in range(rng.randint(1, 3)):
            uid = f"1.2.{p}.{s}"
            study_patient[uid] = patient_key(f"MRN{p}")
            study_label[uid] = int(rng.random() < 0.3)
    return study_patient, study_label


def test_no_patient_or_study_crosses_splits() -> None:
    study_patient, _ = _archive(400)
    splits = split_by_patient(study_patient, seed=1)
    seen_studies: set[str] = set()
    patients = {name: {study_patient[s] for s in studies} for name, studies in splits.items()}
    for name, studies in splits.items():
        assert not seen_studies & set(studies), name
        seen_studies |= set(studies)
    assert seen_studies == set(study_patient)
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    n = len(set(study_patient.values()))
    # Hashing gives the fractions in expectation: binomial, 3 sd.
    assert abs(len(patients["test"]) - 0.2 * n) <= 3 * (n * 0.2 * 0.8) ** 0.5
    assert abs(len(patients["val"]) - 0.1 * n) <= 3 * (n * 0.1 * 0.9) ** 0.5


def test_split_is_seeded_order_independent_and_label_free() -> None:
    study_patient, _ = _archive(200)
    a = split_by_patient(study_patient, seed=3)
    shuffled = dict(sorted(study_patient.items(), key=lambda kv: kv[0][::-1]))
    assert split_by_patient(shuffled, seed=3) == a
    assert split_by_patient(study_patient, seed=4) != a
    # A patient's split is a function of its key and the settings only.
    for name, studies in a.items():
        for study in studies:
            assert assign_split(study_patient[study], seed=3) == name


def test_growing_the_archive_moves_no_study() -> None:
    """180 patients, then 200: every old study stays in its split (the old stratified split moved 48 of 80)."""
    small, _ = _archive(180, seed=5)
    grown = dict(small)
    more, _ = _archive(200, seed=5)
    grown.update({s: p for s, p in more.items() if s not in small})
    before = split_by_patient(small, seed=0)
    after = split_by_patient(grown, seed=0)
    where_after = {s: name for name, studies in after.items() for s in studies}
    moved = [s for name, studies in before.items() for s in studies if where_after[s] != name]
    assert moved == []
    assert len(grown) > len(small)


def test_larger_test_fraction_only_adds_to_test() -> None:
    study_patient, _ = _archive(300)
    a = split_by_patient(study_patient, val_fraction=0.1, test_fraction=0.2)
    b = split_by_patient(study_patient, val_fraction=0.1, test_fraction=0.3)
    assert set(a["test"]) <= set(b["test"])


def test_split_fractions_and_bad_fractions() -> None:
    study_patient, _ = _archive(10)
    splits = split_by_patient(study_patient, val_fraction=0.0, test_fraction=0.5)
    assert splits["val"] == []
    with pytest.raises(ValueError):
        split_by_patient(study_patient, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError):
        assign_split("k", val_fraction=-0.1)


def test_split_record_round_trip_and_overlap(tmp_path) -> None:
    record = SplitRecord(
        train=("a", "b"), val=("c",), test=("d", "e"), used={"trained": ("a",), "early-stopped": ("c",)}, seed=2,
        manifest_sha256="f" * 64,
    )
    (tmp_path / SPLIT_FILE).write_text(record.to_json())
    back = SplitRecord.read(tmp_path)
    assert back == SplitRecord(
        train=("a", "b"), val=("c",), test=("d", "e"), used={"trained": ("a",), "early-stopped": ("c",)}, seed=2,
        manifest_sha256="f" * 64,
    )
    check_no_overlap(back, ["d", "e", "b"], source="bundle X", purpose="evaluation")  # b: in train split, not fitted on
    with pytest.raises(ValueError, match=r"2 of the 3 evaluation studies were used by bundle X \(1 trained, 1 early-stopped"):
        check_no_overlap(back, ["a", "c", "d"], source="bundle X", purpose="evaluation")
    assert SplitRecord.read(tmp_path / "nowhere") is None
    (tmp_path / SPLIT_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a split record"):
        SplitRecord.read(tmp_path)


def test_old_pretraining_record_counts_its_train_split_as_pretrained(tmp_path) -> None:
    (tmp_path / SPLIT_FILE).write_text('{"manifest_sha256": "x", "train": ["a"], "val": ["b"], "test": ["c"]}')
    record = SplitRecord.read(tmp_path)
    assert record is not None and record.used == {"pretrained": ("a",)} and record.scheme == ""
    with pytest.raises(ValueError, match="1 pretrained"):
        check_no_overlap(record, ["a", "c"], source="run R", purpose="validation and test")


def test_fraction_is_by_study_nested_and_seeded() -> None:
    studies = [f"s{i}" for i in range(200)]
    labels = {s: int(i % 10 == 0) for i, s in enumerate(studies)}
    ten = sample_label_fraction(studies, 0.1, seed=0, labels=labels)
    fifty = sample_label_fraction(studies, 0.5, seed=0, labels=labels)
    assert len(ten) == 20 and len(fifty) == 100
    assert set(ten) <= set(fifty)
    assert sample_label_fraction(list(reversed(studies)), 0.1, seed=0, labels=labels) == ten
    assert sample_label_fraction(studies, 0.1, seed=1, labels=labels) != ten
    assert sample_label_fraction(studies, 1.0) == sorted(studies)


def test_fraction_keeps_both_classes() -> None:
    studies = [f"s{i:03d}" for i in range(100)]
    labels = {s: int(s == "s042") for s in studies}  # a single positive
    for seed in range(5):
        chosen = sample_label_fraction(studies, 0.02, seed=seed, labels=labels)
        assert len(chosen) == 2
        assert {labels[s] for s in chosen} == {0, 1}
    # Even a fraction that rounds to one study keeps one of each class.
    assert {labels[s] for s in sample_label_fraction(studies, 0.001, labels=labels)} == {0, 1}


def test_fraction_errors() -> None:
    with pytest.raises(ValueError):
        sample_label_fraction(["a"], 0.0)
    with pytest.raises(ValueError):
        sample_label_fraction([], 0.5)


def test_patient_key_stable_and_pseudonymous() -> None:
    assert patient_key("MRN1") == patient_key(" MRN1 ")
    assert patient_key("MRN1") != patient_key("MRN2")
    assert "MRN1" not in patient_key("MRN1") and len(patient_key("x")) == 16
