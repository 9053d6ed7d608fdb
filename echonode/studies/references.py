"""The journal's side of the agreement: each study's reference from its measurement SRs, and the summary.

The agreement job (:mod:`echonode.agreement.record`) takes the studies whose
SRs changed (``references_due``, filled by triggers in the transaction that
records each SR), reads them and records the reference here, beside the
models' results (``results``). ``echonode agreement`` reads the pairs of
result and reference label (:meth:`ReferenceRows.agreement_pairs`);
``status``, the metrics and the status page read the one summary document
the job keeps (:meth:`ReferenceRows.agreement_summary`), never every pair.

Nothing here holds a patient identifier: UIDs, values, reasons in words and
the cart's manufacturer, model and station name.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from echonode.studies.connection import JournalConnection
from echonode.studies.schema import SR_CLASS_PREFIX, document_class_sql
from echonode.studies.states import StudyState

__all__ = ["AgreementPair", "DueReference", "ReferenceRecord", "ReferenceRows"]

_IS_SR = f"substr(sop_class_uid, 1, {len(SR_CLASS_PREFIX)}) = ?"


@dataclass(frozen=True)
class DueReference:
    """A study whose SRs changed since its reference was last read."""

    study_uid: str
    #: Bumped by every SR recorded for the study: the row is done only if it is unchanged.
    seq: int
    #: The study's state; None when the study is gone from the journal (purged).
    state: str | None


@dataclass(frozen=True)
class ReferenceRecord:
    """One study's reference as the journal keeps it.

    Attributes
    ----------
    study_uid : str
    sr_sop_uid : str or None
        The measurement SR whose values count; None when no SR of the study gives one.
    reason : str or None
        Why there is no reference (None when there is one).
    srs : int
        SR objects of the study read.
    not_used : dict
        SOP Instance UID -> why that SR is not used (superseded, unreadable, not an echo report ...).
    measured : dict
        labels.csv column (``ivsd_cm`` ...) -> the value used, None when undecided.
    labels : dict
        Task -> ``(label, reason)``: 1, 0 or None (undecided), and why.
    rules : str
        Where the label rules came from.
    manufacturer, model_name, station_name : str or None
        The cart that acquired the images.
    recorded : float
        When the reference was read.
    """

    study_uid: str
    sr_sop_uid: str | None
    reason: str | None
    srs: int
    not_used: dict[str, str] = field(default_factory=dict)
    measured: dict[str, float | None] = field(default_factory=dict)
    labels: dict[str, tuple[int | None, str]] = field(default_factory=dict)
    rules: str = "default rules"
    manufacturer: str | None = None
    model_name: str | None = None
    station_name: str | None = None
    recorded: float = 0.0


@dataclass(frozen=True)
class AgreementPair:
    """One model's result for one study and task, beside the study's reference label."""

    study_uid: str
    task: str
    #: The bundle's name and version.
    model: str
    version: str
    probability: float
    #: The model's verdict at its bundle's threshold, as reported in the SR.
    positive: bool
    threshold: float
    #: The reference label: 1, 0, or None (the measurements do not decide).
    label: int | None
    manufacturer: str | None
    model_name: str | None
    station_name: str | None
    #: When the node first received the study.
    first_received: float


class ReferenceRows(JournalConnection):
    """The references and the agreement summary (mixed into :class:`echonode.studies.journal.Journal`)."""

    def due_references(self, limit: int = 100) -> list[DueReference]:
        """Studies whose reference must be read (again), longest waiting first.

        A study still ``receiving`` waits: its images and SRs are read once
        it is complete. A study gone from the journal comes with state None.

        Parameters
        ----------
        limit : int
            Studies at most.

        Returns
        -------
        list of DueReference
        """
        rows = self._connect().execute(
            "SELECT d.study_uid, d.seq, s.state FROM references_due d"
            " LEFT JOIN studies s ON s.study_uid = d.study_uid"
            " WHERE s.state IS NULL OR s.state != ? ORDER BY d.since, d.study_uid LIMIT ?",
            (StudyState.RECEIVING, max(int(limit), 1)),
        ).fetchall()
        return [DueReference(r["study_uid"], int(r["seq"]), r["state"]) for r in rows]

    def sr_instances(self, study_uid: str) -> list[tuple[str, str]]:
        """``(sop_uid, path)`` of every SR object of the study, in receive order."""
        rows = self._connect().execute(
            f"SELECT sop_uid, path FROM instances WHERE study_uid = ? AND {_IS_SR} ORDER BY received, sop_uid",
            (study_uid, SR_CLASS_PREFIX),
        ).fetchall()
        return [(r["sop_uid"], r["path"]) for r in rows]

    def first_image_path(self, study_uid: str) -> str | None:
        """The file of the study's first received image (the cart's header), or None.

        SRs and other documents (a report's PDF, a presentation state) are
        not the cart's: a workstation or reporting system writes them.
        """
        row = self._connect().execute(
            f"SELECT path FROM instances WHERE study_uid = ? AND NOT {document_class_sql('sop_class_uid')}"
            " ORDER BY received, sop_uid LIMIT 1",
            (study_uid,),
        ).fetchone()
        return None if row is None else str(row["path"])

    def done_reference(self, study_uid: str, seq: int) -> None:
        """Drop a due row that needs no reference (its study is gone), unless an SR came since."""
        with self._tx() as con:
            con.execute("DELETE FROM references_due WHERE study_uid = ? AND seq = ?", (study_uid, int(seq)))

    def record_reference(self, ref: ReferenceRecord, seq: int) -> bool:
        """Record (or replace) a study's reference and its labels in one transaction.

        Parameters
        ----------
        ref : ReferenceRecord
        seq : int
            The due row's ``seq`` when the SRs were read: the row is removed
            only if no SR was recorded since (else the next pass reads again).

        Returns
        -------
        bool
            False when the study is gone from the journal (nothing recorded).
        """
        with self._tx() as con:
            if con.execute("SELECT 1 FROM studies WHERE study_uid = ?", (ref.study_uid,)).fetchone() is None:
                con.execute("DELETE FROM references_due WHERE study_uid = ?", (ref.study_uid,))
                return False
            con.execute(
                "INSERT OR REPLACE INTO study_references (study_uid, sr_sop_uid, reason, srs, not_used, measured,"
                " rules, manufacturer, model_name, station_name, recorded) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (ref.study_uid, ref.sr_sop_uid, ref.reason, int(ref.srs), json.dumps(ref.not_used, sort_keys=True),
                 json.dumps(ref.measured, sort_keys=True), ref.rules, ref.manufacturer, ref.model_name,
                 ref.station_name, ref.recorded or time.time()),
            )
            con.execute("DELETE FROM reference_labels WHERE study_uid = ?", (ref.study_uid,))
            con.executemany(
                "INSERT INTO reference_labels (study_uid, task, label, reason) VALUES (?, ?, ?, ?)",
                [(ref.study_uid, task, label, reason) for task, (label, reason) in sorted(ref.labels.items())],
            )
            con.execute("DELETE FROM references_due WHERE study_uid = ? AND seq = ?", (ref.study_uid, int(seq)))
        return True

    def requeue_references(self, *, other_than_rules: str) -> int:
        """Queue again every study whose reference was read under other label rules.

        Parameters
        ----------
        other_than_rules : str
            The rules now in force, as recorded in ``study_references.rules``.

        Returns
        -------
        int
            Studies queued.
        """
        con = self._connect()
        # Read first, without the write lock: at most starts nothing differs.
        if con.execute("SELECT 1 FROM study_references WHERE rules != ? LIMIT 1", (other_than_rules,)).fetchone() is None:
            return 0
        with self._tx() as con:
            cur = con.execute(
                "INSERT INTO references_due (study_uid, since) SELECT study_uid, recorded FROM study_references"
                " WHERE rules != ? ON CONFLICT(study_uid) DO UPDATE SET seq = seq + 1",
                (other_than_rules,),
            )
            return int(cur.rowcount)

    def reference(self, study_uid: str) -> ReferenceRecord | None:
        """The recorded reference of one study, or None."""
        con = self._connect()
        row = con.execute("SELECT * FROM study_references WHERE study_uid = ?", (study_uid,)).fetchone()
        if row is None:
            return None
        labels = {
            r["task"]: (None if r["label"] is None else int(r["label"]), r["reason"])
            for r in con.execute("SELECT task, label, reason FROM reference_labels WHERE study_uid = ?", (study_uid,))
        }
        return ReferenceRecord(
            study_uid=row["study_uid"], sr_sop_uid=row["sr_sop_uid"], reason=row["reason"], srs=int(row["srs"]),
            not_used=json.loads(row["not_used"]), measured=json.loads(row["measured"]), labels=labels,
            rules=row["rules"], manufacturer=row["manufacturer"], model_name=row["model_name"],
            station_name=row["station_name"], recorded=float(row["recorded"]),
        )  # fmt: skip

    def agreement_pairs(self, since: float | None = None) -> list[AgreementPair]:
        """Every model result of a study with a reference, beside its label (``echonode agreement``).

        One pair per study, model (name and version) and task: when a study
        was analysed more than once by the same model version, its latest
        result counts. This reads every study with a reference (through the
        study's and the results' primary keys and ``results_study``): it is
        for the command and the agreement job's summary, never for a scrape.

        Parameters
        ----------
        since : float, optional
            Only studies the node first received at or after this time (epoch seconds).

        Returns
        -------
        list of AgreementPair
            Ordered by result row (oldest first).
        """
        where = "sr.sr_sop_uid IS NOT NULL"
        args: tuple[Any, ...] = ()
        if since is not None:
            where += " AND s.first_received >= ?"
            args = (float(since),)
        rows = self._connect().execute(
            "SELECT r.id, r.study_uid, r.task, r.bundle_name, r.bundle_version, r.probability, r.positive,"
            " r.threshold, l.label, sr.manufacturer, sr.model_name, sr.station_name, s.first_received"
            " FROM study_references sr JOIN studies s ON s.study_uid = sr.study_uid"
            " JOIN reference_labels l ON l.study_uid = sr.study_uid"
            " JOIN results r ON r.study_uid = sr.study_uid AND r.task = l.task"
            f" WHERE {where} ORDER BY r.id",
            args,
        ).fetchall()
        latest: dict[tuple[str, str, str, str], AgreementPair] = {}
        for r in rows:
            key = (r["study_uid"], r["bundle_name"], r["bundle_version"], r["task"])
            latest.pop(key, None)  # re-inserted: the dict keeps result order
            latest[key] = AgreementPair(
                study_uid=r["study_uid"], task=r["task"], model=r["bundle_name"], version=r["bundle_version"],
                probability=float(r["probability"]), positive=bool(r["positive"]), threshold=float(r["threshold"]),
                label=None if r["label"] is None else int(r["label"]), manufacturer=r["manufacturer"],
                model_name=r["model_name"], station_name=r["station_name"],
                first_received=float(r["first_received"]),
            )  # fmt: skip
        return list(latest.values())

    def reference_counts(self, since: float | None = None) -> dict[str, int]:
        """``{"studies": ..., "with_reference": ..., "due": ...}``: studies whose SRs were read, those
        with a usable measurement SR, and those waiting to be read (scans the references; for the job).

        Parameters
        ----------
        since : float, optional
            Only studies first received at or after this time (epoch seconds), as
            :meth:`agreement_pairs` counts them.
        """
        con = self._connect()
        # Without ``since`` every row counts, a study gone from the journal too.
        where = "" if since is None else " JOIN studies s ON s.study_uid = t.study_uid WHERE s.first_received >= ?"
        args = () if since is None else (float(since),)
        row = con.execute(f"SELECT COUNT(*) AS n, COUNT(t.sr_sop_uid) AS ref FROM study_references t{where}",
                          args).fetchone()
        due = con.execute(f"SELECT COUNT(*) AS n FROM references_due t{where}", args).fetchone()
        return {"studies": int(row["n"]), "with_reference": int(row["ref"]), "due": int(due["n"])}

    def save_agreement_summary(self, document: dict[str, Any], computed: float | None = None) -> None:
        """Replace the summary that ``status``, the metrics and the status page read."""
        with self._tx() as con:
            con.execute(
                "INSERT OR REPLACE INTO agreement_summary (id, computed, document) VALUES (1, ?, ?)",
                (time.time() if computed is None else float(computed), json.dumps(document, sort_keys=True)),
            )

    def agreement_summary(self) -> dict[str, Any] | None:
        """The summary document with its ``computed`` time, or None before the first (one row)."""
        row = self._connect().execute("SELECT computed, document FROM agreement_summary WHERE id = 1").fetchone()
        if row is None:
            return None
        try:
            doc = json.loads(row["document"])
        except ValueError:
            return None
        return {**doc, "computed": float(row["computed"])} if isinstance(doc, dict) else None
