"""The node's agreement job: read each study's measurement SRs and record its reference in the journal.

A scheduled job of the node process (:class:`ReferenceJob`, beside
stability, delivery and retention), not a step of the worker, because

* one path serves both cases: the SR that came with the images and the SR
  the sonographer sends hours after the AI SR was delivered (a study the
  worker will never see again: the late SR neither re-opens the study nor
  leads to a second AI SR, see :meth:`~echonode.studies.journal.Journal.record_instance`);
* the journal's triggers queue a study (``references_due``) in the very
  transaction that records its SR, so nothing is missed across a crash or
  a restart, and a study is read once it is complete (not ``receiving``);
* reading an SR is cheap (the raw-bytes reader of :mod:`echonode.measurements`,
  milliseconds, no torch), and the job is apart from the analysis: a broken
  cart SR can neither delay nor block the study's AI SR. Its reason is
  logged and stored with the study's reference row.

Per study, every SR object is read; :func:`~echonode.measurements.reference.study_reference`
picks the current measurement SR (a later SR supersedes an earlier one;
one named as predecessor is replaced), one value per concept, and the
labels by the rules (``[agreement] rules``, the default rules otherwise).
The cart (Manufacturer, Manufacturer's Model Name, Station Name) comes from
the header of the study's first image, else from the SR.

After each pass with news (a reference recorded, a new result) the job
recomputes the summary that ``status``, the metrics and the status page
read, at most every ``summary_interval_s``.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import pydicom

from echonode.agreement.figures import agreement_figures
from echonode.config import AgreementConfig, Config
from echonode.dicomfile import check_inflated_size
from echonode.measurements.concepts import CONCEPTS_BY_KEY
from echonode.measurements.reading import patient_key, read_measurement_sr
from echonode.measurements.reference import NO_REPORT, REFERENCE_VERSION, patient_refusal, study_reference
from echonode.measurements.rules import TASKS, Rules, load_rules
from echonode.measurements.selection import select_values
from echonode.ops.logs import get_logger
from echonode.studies.connection import is_disk_full
from echonode.studies.journal import Journal
from echonode.studies.references import ReferenceRecord
from echonode.studies.store import MAX_INFLATED_BYTES

__all__ = ["SUMMARY_RESAMPLES", "Cart", "ReferenceJob", "read_cart", "read_reference", "rules_id"]

log = get_logger(__name__)

#: Bootstrap resamples of the summary's intervals (``echonode agreement`` takes 10,000).
SUMMARY_RESAMPLES = 2000
#: Studies read per pass at most.
BATCH = 50
#: Stored reasons are cut to this length.
MAX_REASON = 2000

Cart = tuple[str | None, str | None, str | None]
_CART_KEYWORDS = ("Manufacturer", "ManufacturerModelName", "StationName")


def rules_id(rules: Rules) -> str:
    """The rules' source and a digest of their content and of the reading's version, as recorded
    with each reference: a new rules file or a new way of reading SRs reads every study again."""
    digest = hashlib.sha256(repr((REFERENCE_VERSION, rules.lvh, rules.severe_as)).encode()).hexdigest()[:12]
    return f"{rules.source} ({digest})"


def _clean(value: Any) -> str | None:
    text = "".join(ch for ch in str(value or "") if ch.isprintable()).strip()
    return text[:64] or None


def read_cart(path: str | Path) -> tuple[Cart, str | None]:
    """The cart that acquired an image, from its header, and the patient's sex there.

    Returns
    -------
    ((manufacturer, model_name, station_name), sex)
        Each None when absent or unreadable; ``sex`` is ``M``, ``F`` or None.
    """
    try:
        check_inflated_size(Path(path), MAX_INFLATED_BYTES)
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[*_CART_KEYWORDS, "PatientSex"])
    except Exception:  # noqa: BLE001 - the cart is a grouping, never a reason to fail
        return (None, None, None), None
    cart = tuple(_clean(ds.get(k)) for k in _CART_KEYWORDS)
    sex = _clean(ds.get("PatientSex"))
    return (cart[0], cart[1], cart[2]), (sex if sex in ("M", "F") else None)


def read_patient_id(path: str | Path) -> str | None:
    """An object's Patient ID as stored (compared, never logged); None when absent or unreadable."""
    try:
        check_inflated_size(Path(path), MAX_INFLATED_BYTES)
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # noqa: BLE001 - an unreadable SR is named by the reader's own status
        return None
    value = str(ds.get("PatientID", "") or "").strip()
    return value or None



def read_reference(journal: Journal, study_uid: str, rules: Rules) -> ReferenceRecord:
    """Read a study's SRs and the cart into the record the journal keeps.

    Never raises for bad input: an SR that cannot be read, is not an echo
    report or gives no usable value is named in ``not_used`` with its
    reason, and a study without a usable one gets ``reason``.
    """
    srs = journal.sr_instances(study_uid)
    image = journal.first_image_path(study_uid)
    # The reference must be this patient's: an SR whose Patient ID differs
    # from the images' (a worklist mix-up at the cart) is not used.
    image_patient = patient_key(read_patient_id(image)) if image else None
    selections = {}
    docs = []
    for sop_uid, path in srs:
        doc = read_measurement_sr(path)
        if not doc.sop_instance_uid:  # unreadable before its UID: name it by the journal's
            doc.sop_instance_uid = sop_uid
        refusal = patient_refusal(image_patient, doc.patient_key) if doc.usable and image_patient else None
        if refusal is not None:
            doc.status, doc.reason = "other_patient", refusal
            log.warning("agreement.sr_other_patient", study_uid=study_uid, sr_sop_uid=doc.sop_instance_uid)
        if doc.usable:
            selections[doc.sop_instance_uid] = select_values(doc)
        doc.measurements = []  # the selections are all that is kept
        docs.append(doc)
    (cart, sex) = read_cart(image) if image else ((None, None, None), None)
    ref = study_reference(docs, rules, sex=sex, selections=selections)
    if image is None and ref.document is not None:
        # An SR-only study: the equipment the SR names.
        cart = (_clean(ref.document.manufacturer), _clean(ref.document.model_name),
                _clean(ref.document.station_name))
    reason = None
    if ref.document is None:
        why = "; ".join(f"{uid}: {text}" for uid, text in sorted(ref.not_used.items()))
        reason = (f"{NO_REPORT}: {why}" if why else NO_REPORT)[:MAX_REASON]
    measured = {CONCEPTS_BY_KEY[key].column: value for key, value in ref.values.items()
                if CONCEPTS_BY_KEY[key].column}
    return ReferenceRecord(
        study_uid=study_uid,
        sr_sop_uid=ref.document.sop_instance_uid if ref.document is not None else None,
        reason=reason,
        srs=len(srs),
        not_used={uid: text[:MAX_REASON] for uid, text in ref.not_used.items()},
        measured=measured,
        labels={task: (ref.labels[task].label, ref.labels[task].reason[:MAX_REASON]) for task in TASKS
                if task in ref.labels},
        rules=rules_id(rules),
        manufacturer=cart[0],
        model_name=cart[1],
        station_name=cart[2],
        recorded=time.time(),
    )


class ReferenceJob:
    """The scheduled job: references of the studies due, then the summary when something changed.

    Parameters
    ----------
    journal : Journal
    cfg : Config
        Its ``[agreement]`` table.
    """

    def __init__(self, journal: Journal, cfg: Config) -> None:
        self.journal = journal
        self.settings: AgreementConfig = cfg.agreement
        self.rules: Rules = load_rules(cfg.agreement.rules or None)
        self._dirty = True
        self._seen_result_id = -1
        self._summarised_at: float | None = None
        self._requeue_for_rules()

    def apply_config(self, cfg: Config) -> None:
        """New settings (SIGHUP); new rules re-read every reference recorded under others."""
        rules = load_rules(cfg.agreement.rules or None)
        self.settings = cfg.agreement
        if rules_id(rules) != rules_id(self.rules):
            self.rules = rules
            self._requeue_for_rules()
        self._dirty = True

    def _requeue_for_rules(self) -> None:
        n = self.journal.requeue_references(other_than_rules=rules_id(self.rules))
        if n:
            log.info("agreement.rules_changed", studies=n, rules=rules_id(self.rules))

    def run(self) -> int:
        """One pass: record the due references, then the summary if due. Returns the studies read."""
        n = self.record_due()
        self.summarise()
        return n

    def record_due(self, limit: int = BATCH) -> int:
        """Read and record the references of up to ``limit`` due studies."""
        done = 0
        for due in self.journal.due_references(limit):
            if due.state is None:
                self.journal.done_reference(due.study_uid, due.seq)
                continue
            bound = log.bind(study_uid=due.study_uid)
            try:
                ref = read_reference(self.journal, due.study_uid, self.rules)
            except (sqlite3.Error, OSError) as exc:
                if is_disk_full(exc) or isinstance(exc, sqlite3.Error):
                    raise  # the node's fault, not the study's: the next pass tries again
                ref = self._unreadable(due.study_uid, exc)
            except Exception as exc:  # noqa: BLE001 - one study's SRs never stop the others
                bound.exception("agreement.reference_failed")
                ref = self._unreadable(due.study_uid, exc)
            if not self.journal.record_reference(ref, due.seq):
                continue
            done += 1
            self._dirty = True
            if ref.sr_sop_uid is None:
                bound.warning("agreement.no_reference", srs=ref.srs, reason=ref.reason)
            else:
                bound.info("agreement.reference_recorded", sr_sop_uid=ref.sr_sop_uid, srs=ref.srs,
                           **{f"label_{task}": label for task, (label, _) in ref.labels.items()})
        return done

    def _unreadable(self, study_uid: str, exc: BaseException) -> ReferenceRecord:
        return ReferenceRecord(study_uid=study_uid, sr_sop_uid=None,
                               reason=f"the study's SRs could not be read ({type(exc).__name__})",
                               srs=len(self.journal.sr_instances(study_uid)),
                               rules=rules_id(self.rules), recorded=time.time())

    def summarise(self, *, force: bool = False) -> bool:
        """Recompute the summary when a reference or a result is new and the interval has passed.

        Returns
        -------
        bool
            True when it was recomputed.
        """
        last_id = self.journal.last_result_id()
        if not force and not self._dirty and last_id == self._seen_result_id:
            return False
        now = time.monotonic()
        if (not force and self._summarised_at is not None
                and now - self._summarised_at < self.settings.summary_interval_s):
            return False
        figures = agreement_figures(self.journal.agreement_pairs(), n_resamples=SUMMARY_RESAMPLES, seed=0)
        document = {
            "references": self.journal.reference_counts(),
            "rules": rules_id(self.rules),
            "resamples": SUMMARY_RESAMPLES,
            "models": [f.as_dict() for f in figures],
        }
        self.journal.save_agreement_summary(document)
        self._dirty, self._seen_result_id, self._summarised_at = False, last_id, now
        return True
