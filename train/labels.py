"""``echonode-train labels``: a labels.csv from the sonographers' own measurement SRs.

Every cart sends its measurements to the PACS beside the cine loops as a
TID 5200 or TID 5300 SR. This command walks one or more archive folders (the
node's ``storage_dir`` or any tree of DICOM files), reads every echo
measurement SR (:mod:`echonode.measurements`), picks each study's current SR
and one value per measurement, applies the label rules, and writes

* ``labels.csv``: one row per study seen (SRs or images), with ``lvh`` and
  ``severe_as`` (1, 0, or empty when the measurements cannot decide), the
  values used and why a label is empty; ``finetune`` and ``evaluate`` read it
  as they read synth's;
* with ``--evidence``, every value read (concept, value, unit as written,
  modifiers, SR and content path, whether it is usable), every SR with what
  became of it, and every label with its reason: CSV, or JSON lines when the
  file name ends in ``.jsonl``/``.ndjson``/``.json``.

Files are told apart by their file meta (SR storage classes are read whole;
any other DICOM file only up to its pixel data, for its study and patient's
sex). Memory stays bounded: an SR's values go to the evidence file as soon as
it is read and only their selection is kept. Under a node's storage_dir the
``incoming/`` folder (transfers in flight) is skipped.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pydicom
from pydicom.filereader import _read_file_meta_info, read_preamble

from echonode.dicomfile import check_inflated_size
from echonode.durable import replacing
from echonode.measurements import (
    CONCEPTS,
    DEFAULT_TOLERANCE,
    TASKS,
    MeasurementDocument,
    Rules,
    RulesError,
    Selection,
    is_sr_sop_class,
    load_rules,
    read_measurement_sr,
    select_values,
    study_reference,
)
from echonode.measurements.reading import patient_key
from echonode.measurements.reference import SEVERAL_PATIENTS, patient_refusal
from echonode.measurements.rules import LabelDecision
from echonode.ops.logs import configure_logging, get_logger

__all__ = [
    "EVIDENCE_COLUMNS",
    "LABEL_COLUMNS",
    "LabelsReport",
    "add_labels_arguments",
    "build_labels",
    "run_labels",
]

#: Columns of the labels file. ``study_uid``, ``lvh``, ``severe_as`` and the
#: value columns are the ones synth's labels.csv has; the rest explain a row.
VALUE_COLUMNS: tuple[str, ...] = tuple(c.column for c in CONCEPTS)
LABEL_COLUMNS: tuple[str, ...] = (
    "study_uid", "lvh", "severe_as",
    "ivsd_cm", "lvpwd_cm", "lvidd_cm", "lv_mass_index_g_m2",
    "av_vmax_m_s", "av_mean_gradient_mmhg", "av_area_cm2", "av_cusp_sep_cm", "lv_mass_g",
    "lvh_reason", "severe_as_reason", "sr_sop_uid",
)  # fmt: skip
#: Columns of the evidence file (CSV); JSON lines carry the same keys.
EVIDENCE_COLUMNS: tuple[str, ...] = (
    "kind", "study_uid", "sr_sop_uid", "file", "content_path", "concept", "value", "unit",
    "raw_value", "raw_unit", "finding_site", "image_mode", "method", "selection_status", "derivation",
    "status", "reason", "template", "manufacturer", "model", "stage",
)  # fmt: skip

log = get_logger("train.labels")

#: Why no SR is used when a study's images carry more than one Patient ID.
IMAGES_OF_SEVERAL_PATIENTS = ("the study's images carry more than one Patient ID (a merged study, or two studies under "
                              "one Study Instance UID): no SR can be shown to be their patient's")

#: Files in an archive that are data about the archive, not DICOM objects.
_SIDECAR_SUFFIXES = {".csv", ".json", ".jsonl", ".txt", ".md", ".toml", ".log", ".npy", ".png", ".part"}
#: Headers of non-SR files are read up to the pixel data; a deflated one may inflate to this at most.
_MAX_HEADER_INFLATE = 64 * 1024**2


@dataclass
class LabelsReport:
    """What :func:`build_labels` did (the command prints it as a summary)."""

    files: int = 0
    not_dicom: int = 0
    unreadable_files: int = 0
    studies: int = 0
    studies_with_report: int = 0
    studies_without_images: int = 0
    srs: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    values_read: int = 0
    values_refused: int = 0
    private_items: int = 0
    other_items: int = 0
    labels: dict[str, Counter[str]] = field(default_factory=lambda: {t: Counter() for t in TASKS})
    out: str = ""
    evidence: str | None = None
    seconds: float = 0.0


@dataclass
class _Study:
    """What is kept of a study while the archive is walked (no measurements: they are in the evidence)."""

    documents: list[MeasurementDocument] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    selections: dict[str, dict[str, Selection]] = field(default_factory=dict)
    images: int = 0
    sex: str | None = None
    #: A digest of the images' Patient ID (compared with the SRs', never kept in clear).
    patient: str | None = None
    #: Every Patient ID digest the study's images carry: more than one is a merged or colliding study.
    patients: set[str] = field(default_factory=set)
    #: SOP Instance UID -> what its first file said (Content Date/Time and values), to tell a copy
    #: from another SR that reuses the UID.
    fingerprints: dict[str, tuple[object, ...]] = field(default_factory=dict)


class _Evidence:
    """The evidence file: CSV or JSON lines, written as it goes."""

    def __init__(self, path: Path | None) -> None:
        self.fh: IO[str] | None = None
        self.writer: Any = None
        self.json = False
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.json = path.suffix.lower() in (".jsonl", ".ndjson", ".json")
        if not self.json:
            self.writer = csv.DictWriter(self.fh, fieldnames=EVIDENCE_COLUMNS, lineterminator="\n")
            self.writer.writeheader()

    def write(self, **row: Any) -> None:
        if self.fh is None:
            return
        if self.json:
            self.fh.write(json.dumps({k: row.get(k) for k in EVIDENCE_COLUMNS if row.get(k) not in (None, "")}) + "\n")
        else:
            self.writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in EVIDENCE_COLUMNS})

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def _fmt(value: float | None) -> str:
    """A value for the CSV: at most 4 decimals, no exponent, '' when None."""
    if value is None:
        return ""
    return f"{value:.4f}".rstrip("0").rstrip(".")


def _walk(archive: Path) -> Iterator[Path]:
    """Files under ``archive`` in a stable order, skipping side-car files and a node's ``incoming/``."""
    node_layout = (archive / "incoming").is_dir() and (archive / "studies").is_dir()
    for root, dirs, files in os.walk(archive):
        dirs.sort()
        if node_layout and Path(root) == archive and "incoming" in dirs:
            dirs.remove("incoming")
        for name in sorted(files):
            if name.startswith(".") or Path(name).suffix.lower() in _SIDECAR_SUFFIXES:
                continue
            path = Path(root) / name
            if path.is_file():  # a FIFO or device would block the run on open; a dangling link has nothing
                yield path


def _sop_class(path: Path) -> str | None:
    """The Media Storage SOP Class UID from the file meta; None when the file is not Part 10 DICOM."""
    try:
        with open(path, "rb") as fp:
            if read_preamble(fp, False) is None:  # pragma: no cover - read_preamble raises instead
                return None
            meta = _read_file_meta_info(fp)
    except Exception:  # noqa: BLE001 - not DICOM, or a broken meta: pydicom raises many types
        return None
    return str(meta.get("MediaStorageSOPClassUID", "") or "") or ""


def _image_header(path: Path) -> tuple[str, str | None, str | None] | None:
    """``(study UID, patient's sex, Patient ID digest)`` of a non-SR object, read up to its pixel data.

    None when unreadable.
    """
    try:
        check_inflated_size(path, _MAX_HEADER_INFLATE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["StudyInstanceUID", "PatientSex", "PatientID"])
        study = str(ds.get("StudyInstanceUID", "") or "").strip()
        sex = str(ds.get("PatientSex", "") or "").strip().upper()
        patient = patient_key(str(ds.get("PatientID", "") or ""))
    except Exception:  # noqa: BLE001 - a broken header: the file is counted, not read
        return None
    if not study:
        return None
    return study, sex if sex in ("M", "F") else None, patient


def _value_rows(doc: MeasurementDocument, file: str, evidence: _Evidence) -> None:
    for m in doc.measurements:
        evidence.write(
            kind="value", study_uid=doc.study_instance_uid, sr_sop_uid=doc.sop_instance_uid, file=file,
            content_path=m.content_path, concept=m.concept, value=_fmt(m.value), unit=m.unit,
            raw_value=m.raw_value, raw_unit=m.raw_unit,
            finding_site=m.finding_site and m.finding_site.meaning, image_mode=m.image_mode and m.image_mode.meaning,
            method=m.method and m.method.meaning, selection_status=m.selection_status and m.selection_status.meaning,
            derivation=m.derivation and m.derivation.meaning, stage=m.stage and m.stage.meaning,
            status="refused" if m.problem else ("selected" if m.selected else "read"), reason=m.problem,
        )  # fmt: skip


def build_labels(
    archives: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    rules: Rules | None = None,
    evidence: str | os.PathLike[str] | None = None,
    progress: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
) -> LabelsReport:
    """Write ``labels.csv`` (and the evidence) for the studies of ``archives``.

    Parameters
    ----------
    archives : sequence of path
        Folders of DICOM files (a node's storage_dir, a PACS export ...).
    out : path
        The labels file to write.
    rules : Rules, optional
        Default: :func:`echonode.measurements.load_rules` ().
    evidence : path, optional
        Where to write every value read, every SR and every label's reason.
    progress : bool
        Show a tqdm progress bar.
    tolerance : float
        See :func:`echonode.measurements.select_values`.

    Returns
    -------
    LabelsReport

    Raises
    ------
    FileNotFoundError
        When an archive folder does not exist.
    """
    started = time.monotonic()
    rules = rules or load_rules()
    roots = [Path(a) for a in archives]
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: not a folder")
    report = LabelsReport(out=str(out), evidence=str(evidence) if evidence else None)
    total = sum(1 for root in roots for _ in _walk(root))
    files: Iterator[tuple[Path, Path]] = ((root, p) for root in roots for p in _walk(root))
    bar = None
    if progress:
        # Late: tqdm comes with the train extra, needed only for a progress bar.
        from tqdm import tqdm

        bar = tqdm(total=total, desc="labels", unit="file")
    studies: dict[str, _Study] = defaultdict(_Study)
    ev = _Evidence(Path(evidence) if evidence else None)
    try:
        for root, path in files:
            report.files += 1
            if bar is not None:
                bar.update(1)
            _visit(root, path, studies, ev, report, tolerance)
        _finish(studies, Path(out), rules, ev, report, tolerance)
    finally:
        ev.close()
        if bar is not None:
            bar.close()
    report.seconds = time.monotonic() - started
    return report


def _visit(
    root: Path, path: Path, studies: dict[str, _Study], ev: _Evidence, report: LabelsReport, tolerance: float
) -> None:
    """Read one file of the archive into ``studies``."""
    rel = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    sop_class = _sop_class(path)
    if sop_class is None:
        report.not_dicom += 1
        return
    if not is_sr_sop_class(sop_class):
        header = _image_header(path)
        if header is None:
            report.unreadable_files += 1
            return
        study = studies[header[0]]
        study.images += 1
        study.sex = study.sex or header[1]
        study.patient = study.patient or header[2]
        if header[2]:
            study.patients.add(header[2])
        return
    doc = read_measurement_sr(path)
    report.srs["read"] += 1
    if doc.status == "unreadable" or not doc.study_instance_uid:
        report.srs["unreadable"] += 1
        reason = doc.reason if doc.status == "unreadable" else (
            "no Study Instance UID: the SR cannot be placed in a study" + (f" ({doc.reason})" if doc.reason else ""))
        ev.write(kind="sr", sr_sop_uid=doc.sop_instance_uid or None, file=rel, status="unreadable", reason=reason)
        return
    study = studies[doc.study_instance_uid]
    chosen = select_values(doc, tolerance=tolerance) if doc.usable else {}
    fingerprint = (doc.content_datetime, doc.patient_key, tuple(sorted((k, s.value) for k, s in chosen.items())))
    if doc.sop_instance_uid in study.files:
        report.duplicates += 1
        first = study.files[doc.sop_instance_uid]
        copy = study.fingerprints.get(doc.sop_instance_uid) == fingerprint
        if not copy:
            # Two different reports under one UID: neither can be told to be the study's.
            for kept in study.documents:
                if kept.sop_instance_uid == doc.sop_instance_uid:
                    kept.status = "conflict"
                    kept.reason = f"another file with its SOP Instance UID ({rel}) holds a different report"
            study.selections.pop(doc.sop_instance_uid, None)
            log.warning("labels.sr_uid_reused", study_uid=doc.study_instance_uid, sr_sop_uid=doc.sop_instance_uid)
        ev.write(
            kind="sr", study_uid=doc.study_instance_uid, sr_sop_uid=doc.sop_instance_uid, file=rel,
            status="duplicate" if copy else "conflict",
            reason=f"another file of the SR at {first}" if copy
            else f"the SR at {first} has its SOP Instance UID and a different report: neither is used",
        )  # fmt: skip
        return
    study.fingerprints[doc.sop_instance_uid] = fingerprint
    _value_rows(doc, rel, ev)
    report.values_read += len(doc.measurements)
    report.values_refused += sum(1 for m in doc.measurements if m.problem)
    report.private_items += doc.counts["private_items"]
    report.other_items += doc.counts["other_items"]
    if doc.usable:
        # Keep the selection, not the items: they are in the evidence already.
        study.selections[doc.sop_instance_uid] = {k: dataclasses.replace(s, used=()) for k, s in chosen.items()}
        contradictory = sorted(k for k, s in chosen.items() if s.rule == "contradictory")
        if contradictory:
            log.warning(
                "labels.contradictory_values", sop_uid=doc.sop_instance_uid, study_uid=doc.study_instance_uid,
                concepts=contradictory,
            )  # fmt: skip
    doc.measurements = []
    study.documents.append(doc)
    study.files[doc.sop_instance_uid] = rel


def _drop_other_patients(study_uid: str, study: _Study) -> None:
    """An SR filed under another Patient ID than the study's images is not the study's reference,
    and no SR is when the images themselves name more than one patient."""
    merged = len(study.patients) > 1
    for doc in study.documents:
        if merged and doc.usable:
            doc.status, doc.reason = "other_patient", IMAGES_OF_SEVERAL_PATIENTS
            study.selections.pop(doc.sop_instance_uid, None)
            log.warning("labels.study_of_several_patients", study_uid=study_uid, sr_sop_uid=doc.sop_instance_uid)
            continue
        refusal = patient_refusal(study.patient, doc.patient_key) if doc.usable else None
        if refusal is not None:
            doc.status, doc.reason = "other_patient", refusal
            study.selections.pop(doc.sop_instance_uid, None)
            log.warning("labels.sr_other_patient", study_uid=study_uid, sr_sop_uid=doc.sop_instance_uid)


def _finish(studies: dict[str, _Study], out: Path, rules: Rules, ev: _Evidence, report: LabelsReport, tolerance: float) -> None:
    """Decide every study's labels and write labels.csv."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=LABEL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for study_uid in sorted(studies):
            study = studies[study_uid]
            _drop_other_patients(study_uid, study)
            ref = study_reference(study.documents, rules, sex=study.sex, tolerance=tolerance, selections=study.selections)
            if len(study.patients) > 1:
                ref = dataclasses.replace(ref, labels={t: LabelDecision(None, IMAGES_OF_SEVERAL_PATIENTS) for t in TASKS})
            report.studies += 1
            for doc in study.documents:
                uid = doc.sop_instance_uid
                if ref.document is not None and uid == ref.document.sop_instance_uid:
                    status, reason = "used", None
                elif uid in ref.supplements:
                    status, reason = "supplements", ref.not_used.get(uid)
                else:
                    reason = ref.not_used.get(uid, doc.reason)
                    status = "other_patient" if reason == SEVERAL_PATIENTS else "superseded" if doc.usable else doc.status
                report.srs[status] += 1
                ev.write(
                    kind="sr", study_uid=study_uid, sr_sop_uid=uid, file=study.files.get(uid), status=status,
                    reason=reason, template=doc.template, manufacturer=doc.manufacturer, model=doc.model_name,
                )  # fmt: skip
            if ref.document is not None:
                report.studies_with_report += 1
                if not study.images:
                    report.studies_without_images += 1
                    log.info("labels.sr_without_images", study_uid=study_uid, sop_uid=ref.document.sop_instance_uid)
                    ev.write(
                        kind="study", study_uid=study_uid, sr_sop_uid=ref.document.sop_instance_uid,
                        status="no images", reason="the study's measurement SR is in the archive, none of its images",
                    )  # fmt: skip
            row: dict[str, str] = {"study_uid": study_uid, "sr_sop_uid": ref.document.sop_instance_uid if ref.document else ""}
            for concept in CONCEPTS:
                sel = ref.selections.get(concept.key)
                row[concept.column] = _fmt(sel.value if sel else None)
            for task in TASKS:
                decision = ref.labels[task]
                row[task] = "" if decision.label is None else str(decision.label)
                row[f"{task}_reason"] = decision.reason
                report.labels[task]["empty" if decision.label is None else str(decision.label)] += 1
                ev.write(
                    kind="label", study_uid=study_uid, sr_sop_uid=row["sr_sop_uid"] or None, concept=task,
                    value=row[task], status="empty" if decision.label is None else "decided", reason=decision.reason,
                )  # fmt: skip
            writer.writerow({k: row.get(k, "") for k in LABEL_COLUMNS})


# --------------------------------------------------------------------------
# CLI glue (train/cli.py wires these as the ``labels`` subcommand)


def add_labels_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``echonode-train labels``."""
    parser.add_argument("archives", nargs="+", metavar="ARCHIVE",
                        help="folders of DICOM files (a node's storage_dir or any tree)")
    parser.add_argument("--out", required=True, help="labels.csv to write")
    parser.add_argument("--rules", default=None, help="a rules TOML that replaces the default (see docs/training.md)")
    parser.add_argument(
        "--evidence", default=None,
        help="write every value read, its SR, and why a label is empty (CSV; JSON lines for .jsonl)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--log-level", default="warning", choices=("debug", "info", "warning", "error"),
        help="log level (default warning: unreadable SRs and refused values; info adds ignored SRs)",
    )  # fmt: skip


def run_labels(ns: argparse.Namespace) -> int:
    """Run ``echonode-train labels``; returns the exit status."""
    configure_logging(level=ns.log_level)
    try:
        rules = load_rules(ns.rules)
    except RulesError as exc:
        print(f"echonode-train labels: {exc}")
        return 2
    try:
        report = build_labels(ns.archives, ns.out, rules=rules, evidence=ns.evidence, progress=not ns.no_progress)
    except (FileNotFoundError, OSError) as exc:
        print(f"echonode-train labels: {exc}")
        return 2
    srs = report.srs
    print(
        f"{report.out}: {report.studies} studies, {report.studies_with_report} with a usable measurement SR "
        f"({report.studies_without_images} of them without images in the archive)"
    )
    for task in TASKS:
        c = report.labels[task]
        print(f"  {task}: {c['1']} x 1, {c['0']} x 0, {c['empty']} empty")
    print(
        f"SRs: {srs['read']} read, {srs['used']} used, {srs['supplements']} supplementing, {srs['superseded']} superseded, "
        f"{srs['not_echo'] + srs['not_sr']} not echo measurement reports, {srs['no_measurements']} without measurements, "
        f"{srs['unreadable']} unreadable, {report.duplicates} duplicate files"
    )
    print(
        f"values: {report.values_read} read, {report.values_refused} refused; "
        f"{report.private_items} private-code measurements ignored, {report.other_items} of other concepts or "
        "sites (not read); "
        f"{report.files} files ({report.not_dicom} not DICOM, {report.unreadable_files} unreadable), {report.seconds:.1f} s"
    )
    if report.evidence:
        print(f"evidence: {report.evidence}")
    return 0
