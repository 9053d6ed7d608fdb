"""Train / validation / test splits by patient, and label fractions by study.

Splitting by patient (and therefore by study, and never by video) keeps every
video of a heart on one side of the line: videos of one study are near copies
of each other, and so are a patient's follow-up studies.

A patient's split is a pure function of its pseudonymous key and the split
settings (:func:`assign_split`): a seeded hash of the key read as a number in
[0, 1), compared with the fractions. It depends on nothing else, not on the
labels, not on which other patients the cache holds, not on the task. So:

* pretraining and every fine-tuning task of one archive get the same split
  without being given the same labels file;
* a cache that grows (new patients indexed) keeps every old study where it
  was; the new patients fall where their own keys put them;
* the split of a finished run can be checked later against a grown cache.

The price of not stratifying is that a small archive's validation or test
split may hold few or no positives for a rare label;
:func:`train.finetune.prepare_task` refuses such a split rather than report a
figure computed from nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "SPLITS",
    "SPLIT_FILE",
    "SPLIT_SCHEME",
    "SplitRecord",
    "assign_split",
    "check_no_overlap",
    "patient_key",
    "sample_label_fraction",
    "split_by_patient",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Names the hashing rule of :func:`assign_split`; stored with every split so
#: that a later rule cannot be mistaken for this one.
SPLIT_SCHEME = "sha256-patient-key-v1"


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


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0.0 <= val_fraction < 1 and 0.0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f'Arguments "val_fraction" and "test_fraction" must be in [0, 1) and sum below 1; '
            f"got {val_fraction} and {test_fraction}."
        )


def assign_split(key: str, *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> str:
    """The split of one patient: ``"train"``, ``"val"`` or ``"test"``.

    The first 64 bits of SHA-256 over the scheme, the seed and the key give
    a number ``u`` uniform in [0, 1); ``u < test_fraction`` is test, the next
    ``val_fraction`` is validation, the rest training. Growing
    ``test_fraction`` therefore only moves patients into test, never out.

    Parameters
    ----------
    key : str
        The patient's pseudonymous key (:func:`patient_key`).
    seed : int
        Split seed; another seed is another, independent split.
    val_fraction, test_fraction : float
        Expected fractions of patients.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        If the fractions are out of range.
    """
    _check_fractions(val_fraction, test_fraction)
    digest = hashlib.sha256(f"{SPLIT_SCHEME}\0{int(seed)}\0{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def split_by_patient(
    study_patient: Mapping[str, str],
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Assign whole patients to train / val / test (:func:`assign_split`).

    Parameters
    ----------
    study_patient : Mapping[str, str]
        Study UID -> patient key.
    val_fraction, test_fraction : float
        Expected fractions of patients.
    seed : int
        Split seed.

    Returns
    -------
    dict
        ``{"train": [...], "val": [...], "test": [...]}``, sorted study UIDs.

    Raises
    ------
    ValueError
        If the fractions are out of range.
    """
    _check_fractions(val_fraction, test_fraction)
    out: dict[str, list[str]] = {name: [] for name in SPLITS}
    for study, key in study_patient.items():
        out[assign_split(key, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)].append(study)
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


#: The file holding a run's or a bundle's split (:class:`SplitRecord`).
SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class SplitRecord:
    """The archive's split when a run was made, and which studies shaped its weights.

    Written as ``split.json`` into every pretraining run and every bundle, so
    that a later step can refuse to validate or evaluate on what was trained
    on.

    Attributes
    ----------
    train, val, test : tuple of str
        Study UIDs of each split of the archive (the clip cache) at the time.
    used : dict of str to tuple of str
        How studies shaped the weights: ``"pretrained"`` (their images, no
        labels, in self-supervised pretraining), ``"trained"`` (fitted on,
        after the label fraction), ``"early-stopped"`` (validation loss read
        to pick the epoch). A bundle carries its pretraining run's
        ``"pretrained"`` studies too.
    scheme, seed, val_fraction, test_fraction :
        The split settings (:func:`assign_split`); ``scheme`` is empty for a
        record written before the scheme was recorded.
    manifest_sha256 : str
        The clip cache's manifest hash at the time.
    """

    train: tuple[str, ...] = ()
    val: tuple[str, ...] = ()
    test: tuple[str, ...] = ()
    used: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    scheme: str = SPLIT_SCHEME
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    manifest_sha256: str = ""

    def to_json(self) -> str:
        """The record as ``split.json`` text (plain JSON, sorted lists)."""
        data = {
            "scheme": self.scheme,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "manifest_sha256": self.manifest_sha256,
            "train": sorted(self.train),
            "val": sorted(self.val),
            "test": sorted(self.test),
            "used": {how: sorted(studies) for how, studies in self.used.items()},
        }
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def read(cls, folder: str | os.PathLike[str]) -> SplitRecord | None:
        """The record in ``folder/split.json``, or None when the folder has none.

        A record without ``used`` is a pretraining run's from before it was
        written: its training split is what it pretrained on.

        Raises
        ------
        ValueError
            When the file exists but is not a split record.
        """
        path = Path(folder) / SPLIT_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            lists = {name: tuple(str(s) for s in data.get(name, ())) for name in SPLITS}
            used_data = data.get("used")
            if used_data is None:
                used = {"pretrained": lists["train"]}
            else:
                used = {str(how): tuple(str(s) for s in studies) for how, studies in used_data.items()}
            return cls(
                **lists,
                used=used,
                scheme=str(data.get("scheme", "")),
                seed=int(data.get("seed", 0)),
                val_fraction=float(data.get("val_fraction", 0.1)),
                test_fraction=float(data.get("test_fraction", 0.2)),
                manifest_sha256=str(data.get("manifest_sha256", "")),
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: not a split record ({type(exc).__name__})") from None


def check_no_overlap(record: SplitRecord, studies: Iterable[str], *, source: str, purpose: str) -> None:
    """Refuse when any of ``studies`` shaped the weights ``record`` describes.

    Parameters
    ----------
    record : SplitRecord
        The split of the pretraining run or bundle.
    studies : iterable of str
        The studies about to be used for ``purpose``.
    source : str
        The run or bundle, named in the message.
    purpose : str
        What the studies are for (``"validation and test"``, ``"evaluation"``).

    Raises
    ------
    ValueError
        Naming how many studies overlap, how they were used, and ``source``.
    """
    wanted = set(studies)
    overlaps = {how: wanted & set(seen) for how, seen in record.used.items()}
    found = {how: len(s) for how, s in overlaps.items() if s}
    if not found:
        return
    total = len(set().union(*overlaps.values()))
    how = ", ".join(f"{n} {name}" for name, n in found.items())
    example = sorted(set().union(*overlaps.values()))[0]
    raise ValueError(
        f"{total} of the {len(wanted)} {purpose} studies were used by {source} ({how} on; e.g. {example}); "
        "use the split settings that run was made with, or another archive"
    )
