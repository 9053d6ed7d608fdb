"""Train / validation / test splits by patient, and label fractions by study.

Splitting by patient (and therefore by study, and never by video) keeps every
video of a heart on one side of the line: videos of one study are near copies
of each other, and so are a patient's follow-up studies.

The split is a property of the *archive*, not of a task: patients are
stratified on the joint value of every binary label column given (e.g.
``(lvh, severe_as)``), so pretraining and every fine-tuning task see the same
training patients and no task's test patients leak into the SSL encoder.

Everything is seeded and independent of input order (inputs are sorted
before shuffling), so the same archive and seed always give the same split.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

__all__ = ["SPLITS", "STRATIFY_COLUMNS", "patient_key", "sample_label_fraction", "split_by_patient", "study_strata"]

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Binary label columns of ``labels.csv`` the split is stratified on, jointly.
STRATIFY_COLUMNS: tuple[str, ...] = ("lvh", "severe_as")


def _as_binary(value: object) -> int | None:
    text = str(value).strip().lower()
    if text in ("1", "1.0", "true", "yes"):
        return 1
    if text in ("0", "0.0", "false", "no"):
        return 0
    return None


def study_strata(
    rows: Sequence[Mapping[str, str]], columns: Sequence[str] = STRATIFY_COLUMNS
) -> dict[str, tuple[int, ...]]:
    """Study UID -> tuple of its binary labels, for :func:`split_by_patient`.

    The same strata serve every task, so every task (and pretraining) gets
    the same split. A missing or unparsable value is -1 (not None), so that
    strata stay comparable with ``max``.
    """
    present = [c for c in columns if rows and c in rows[0]]
    out: dict[str, tuple[int, ...]] = {}
    for row in rows:
        values = tuple(_as_binary(row.get(c)) for c in present)
        out[row["study_uid"]] = tuple(-1 if v is None else v for v in values)
    return out


def patient_key(patient_id: str) -> str:
    """A stable pseudonymous key for a patient ID (manifests hold no raw IDs).

    Parameters
    ----------
    patient_id : str
        The DICOM PatientID (or the labels file's ``patient_id``).

    Returns
    -------
    str
        16 hex digits of SHA-256 of the stripped ID.
    """
    return hashlib.sha256(str(patient_id).strip().encode("utf-8")).hexdigest()[:16]


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items into counts proportional to ``fractions`` (largest remainder)."""
    raw = [n * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (raw[i] - counts[i], -i), reverse=True)
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def split_by_patient(
    study_patient: Mapping[str, str],
    study_stratum: Mapping[str, Hashable] | None = None,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Assign whole patients to train / val / test.

    Parameters
    ----------
    study_patient : Mapping[str, str]
        Study UID -> patient key.
    study_stratum : Mapping[str, Hashable], optional
        Study UID -> stratum (e.g. a tuple of binary labels). A patient's
        stratum is the maximum of its studies' (any positive study makes a
        positive patient). Studies without a stratum share the ``None`` one.
    val_fraction, test_fraction : float
        Fractions of patients per stratum.
    seed : int
        Shuffling seed.

    Returns
    -------
    dict
        ``{"train": [...], "val": [...], "test": [...]}``, sorted study UIDs.

    Raises
    ------
    ValueError
        If the fractions are out of range.
    """
    if not (0.0 <= val_fraction < 1 and 0.0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f'Arguments "val_fraction" and "test_fraction" must be in [0, 1) and sum below 1; '
            f"got {val_fraction} and {test_fraction}."
        )
    studies_of: dict[str, list[str]] = defaultdict(list)
    for study, patient in study_patient.items():
        studies_of[patient].append(study)

    def patient_stratum(patient: str) -> Hashable:
        if study_stratum is None:
            return None
        values = [study_stratum.get(s) for s in studies_of[patient]]
        known = [v for v in values if v is not None]
        return max(known) if known else None

    by_stratum: dict[Hashable, list[str]] = defaultdict(list)
    for patient in sorted(studies_of):
        by_stratum[patient_stratum(patient)].append(patient)

    rng = np.random.default_rng(seed)
    fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    out: dict[str, list[str]] = {name: [] for name in SPLITS}
    # Strata in a fixed order so the draw does not depend on dict ordering.
    for stratum in sorted(by_stratum, key=repr):
        patients = by_stratum[stratum]
        order = rng.permutation(len(patients))
        counts = _allocate(len(patients), fractions)
        start = 0
        for name, count in zip(SPLITS, counts):
            for i in order[start : start + count]:
                out[name].extend(studies_of[patients[i]])
            start += count
    return {name: sorted(studies) for name, studies in out.items()}


def sample_label_fraction(
    studies: Sequence[str],
    fraction: float,
    *,
    seed: int = 0,
    labels: Mapping[str, Hashable] | None = None,
) -> list[str]:
    """The labelled subset of the training studies for a label-fraction run.

    Studies are drawn in one seeded permutation and the first
    ``round(fraction * n)`` (at least one) are kept, so a smaller fraction is
    a subset of a larger one. When ``labels`` are given, every class present
    in ``studies`` is kept present (at least one positive and one negative
    for a binary task) by swapping in the first study of a missing class.

    Parameters
    ----------
    studies : sequence of str
        Training study UIDs.
    fraction : float
        In (0, 1].
    seed : int
        Sampling seed (fixed, so fractions are comparable across inits).
    labels : Mapping[str, Hashable], optional
        Study UID -> class.

    Returns
    -------
    list of str
        Sorted selected study UIDs.

    Raises
    ------
    ValueError
        If ``fraction`` is outside (0, 1] or ``studies`` is empty.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f'Argument "fraction" must be in (0, 1]; got {fraction}.')
    pool = sorted(set(studies))
    if not pool:
        raise ValueError('Argument "studies" must not be empty.')
    order = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
    k = min(len(pool), max(1, int(round(fraction * len(pool)))))
    chosen = order[:k]
    if labels is not None:
        classes = sorted({labels[s] for s in pool if labels.get(s) is not None}, key=repr)
        if k < len(classes):
            k = len(classes)
            chosen = order[:k]
        for cls in classes:
            if any(labels.get(s) == cls for s in chosen):
                continue
            # Replace the last chosen study of the most represented class.
            counts: dict[Hashable, int] = defaultdict(int)
            for s in chosen:
                counts[labels.get(s)] += 1
            for j in range(len(chosen) - 1, -1, -1):
                if counts[labels.get(chosen[j])] > 1:
                    chosen[j] = next(s for s in order if labels.get(s) == cls)
                    break
    return sorted(chosen)
