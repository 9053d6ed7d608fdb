"""Tests for train.splits: patient-level splits and study-level label fractions."""

from __future__ import annotations

import random

import pytest

from train.splits import patient_key, sample_label_fraction, split_by_patient


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
    study_patient, labels = _archive()
    splits = split_by_patient(study_patient, labels, seed=1)
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
    assert len(patients["test"]) == pytest.approx(0.2 * n, abs=2)
    assert len(patients["val"]) == pytest.approx(0.1 * n, abs=2)


def test_split_is_stratified_seeded_and_order_independent() -> None:
    study_patient, labels = _archive(200)
    a = split_by_patient(study_patient, labels, seed=3)
    shuffled = dict(sorted(study_patient.items(), key=lambda kv: kv[0][::-1]))
    assert split_by_patient(shuffled, labels, seed=3) == a
    assert split_by_patient(study_patient, labels, seed=4) != a
    positive_patients = {p for s, p in study_patient.items() if labels[s]}
    total = len(positive_patients)
    test_pos = {study_patient[s] for s in a["test"]} & positive_patients
    # Stratified: the test split holds ~20 % of the positive patients.
    assert abs(len(test_pos) - 0.2 * total) <= 1


def test_split_without_labels_and_bad_fractions() -> None:
    study_patient, _ = _archive(10)
    splits = split_by_patient(study_patient, None, val_fraction=0.0, test_fraction=0.5)
    assert splits["val"] == []
    assert len({study_patient[s] for s in splits["test"]}) == 5
    with pytest.raises(ValueError):
        split_by_patient(study_patient, None, val_fraction=0.5, test_fraction=0.5)


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
