"""A lost journal: telling it from a new node's, and rebuilding it from storage (``echonode recover-journal``).

The journal is what says which SR each study already got. A node that
starts with a new, empty journal over a storage tree that holds studies
records every stored file again at start-up, analyses every study again and
sends each destination a second SR (a new SOP Instance UID, with no
reference to the first). So ``serve`` (and the commands that read the
journal) refuse to run when the journal is missing, empty, not echonode's,
or records no study while ``studies/`` or ``reports/`` hold files
(:func:`journal_loss`); ``recover-journal`` rebuilds it (:func:`rebuild_journal`):

- every object in ``studies/`` is recorded, as start-up recovery records a
  file the journal lacks;
- every SR in ``reports/`` is read back (``sr.summarise_report``) and
  recorded as its study's report for the models it names, ``sent`` to every
  configured destination, the study ``delivered``: whether a destination took
  it is not known any more, and the side to err on is never sending an SR
  twice;
- a study with objects and no SR is left ``receiving``: the node analyses and
  reports it as usual;
- an SR file that does not read is reported and left where it is, and its
  study is held ``failed`` (it may have reached the PACS: a person checks
  before ``echonode reprocess`` sends another).

A damaged journal (SQLite cannot read it) is refused by its own error when
the node opens it; ``recover-journal`` moves it aside and rebuilds as well.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from echonode.bundles.manifest import model_set_key_of
from echonode.config import Config
from echonode.durable import move_into_place
from echonode.ops.logs import get_logger
from echonode.report.read import summarise_report
from echonode.studies.journal import Journal
from echonode.studies.records import ReportRecord, SopInOtherStudy, TaskResult
from echonode.studies.store import BadObject, StudyStore, is_valid_uid, read_header

#: What to do, in the message that refuses to start.
WHAT_TO_DO = (
    "run `echonode recover-journal` (it rebuilds the journal from the stored objects and marks the SRs "
    "already in reports/ as sent), or put back a copy of the journal from a backup"
)


class JournalLost(RuntimeError):
    """The journal is gone (missing, empty, not echonode's, or records no study) while storage holds data.

    Parameters
    ----------
    journal_path : Path
    why : str
        What is wrong with it ("is missing", "is empty (0 bytes)" ...).
    storage_dir : Path
    """

    def __init__(self, journal_path: Path, why: str, storage_dir: Path) -> None:
        super().__init__(
            f"the journal {journal_path} {why}, but {storage_dir} holds received studies or SRs: starting with "
            "a new journal would analyse every study again and send each destination a second SR. "
            f"Nothing was started; {WHAT_TO_DO}."
        )
        self.journal_path = journal_path
        self.why = why


class RebuildRefused(RuntimeError):
    """``recover-journal`` has nothing to do, or must not run now (the message says which)."""


def holds_data(storage_dir: Path) -> bool:
    """True when ``studies/`` or ``reports/`` under ``storage_dir`` hold a stored object or an SR."""
    patterns = ("studies/*/*/*.dcm", "reports/*/*.dcm")
    return any(next(storage_dir.glob(pattern), None) is not None for pattern in patterns)


def journal_loss(journal_path: Path, storage_dir: Path) -> str | None:
    """Why the journal counts as lost, or None when it does not.

    Parameters
    ----------
    journal_path : Path
    storage_dir : Path
        The storage tree the journal describes.

    Returns
    -------
    str or None
        "is missing", "is empty (0 bytes)", "holds no echonode tables" or
        "records no study", when ``storage_dir`` holds objects or SRs; None
        otherwise. A journal SQLite cannot read gives None: opening it
        fails with SQLite's own error, which names it. Nothing is written.
    """
    if not holds_data(storage_dir):
        return None
    if not journal_path.exists():
        return "is missing"
    if journal_path.stat().st_size == 0:
        return "is empty (0 bytes)"
    try:
        con = sqlite3.connect(journal_path.resolve().as_uri() + "?mode=ro", uri=True, timeout=60)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "studies" not in tables:
                return "holds no echonode tables"
            if con.execute("SELECT 1 FROM studies LIMIT 1").fetchone() is None:
                return "records no study"
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return None


def check_journal(cfg: Config) -> None:
    """Refuse to go on with a lost journal (``serve`` and the commands that read it).

    Raises
    ------
    JournalLost
        When :func:`journal_loss` finds it lost.
    """
    why = journal_loss(cfg.journal_path, cfg.storage_dir)
    if why is not None:
        raise JournalLost(cfg.journal_path, why, cfg.storage_dir)


def _damage(journal_path: Path) -> str | None:
    """SQLite's error when it cannot read the journal; None when it reads."""
    try:
        con = sqlite3.connect(journal_path.resolve().as_uri() + "?mode=ro", uri=True, timeout=60)
        try:
            con.execute("SELECT COUNT(*) FROM studies").fetchone()
        finally:
            con.close()
    except sqlite3.Error as exc:
        return str(exc)
    return None


def _node_listening(cfg: Config) -> bool:
    """True when something accepts connections on the node's DICOM port (a running node, most likely)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(cfg.node.host, cfg.node.host)
    try:
        with socket.create_connection((host, cfg.node.port), timeout=2):
            return True
    except OSError:
        return False


@dataclass
class Rebuilt:
    """What :func:`rebuild_journal` did (or, in a dry run, would do)."""

    journal: Path
    why: str
    dry_run: bool
    instances: int = 0
    reports: int = 0
    #: Studies recorded ``delivered`` from their SRs.
    delivered: list[str] = field(default_factory=list)
    #: Studies with objects and no SR: the node will analyse them.
    to_analyse: list[str] = field(default_factory=list)
    #: Studies held ``failed``: their only SRs do not read.
    held: list[str] = field(default_factory=list)
    #: Files left alone, relative to ``storage_dir``, with the reason.
    left_alone: list[tuple[str, str]] = field(default_factory=list)
    #: Where the old journal went (None: there was none, or a dry run).
    moved_aside: Path | None = None


def _sr_record(path: Path, summary: dict[str, Any], taken: set[str]) -> tuple[ReportRecord, list[TaskResult]]:
    """The journal's report row and results for an SR read back; ``taken``: model-set keys the study already uses."""
    findings = summary["findings"]
    models = [(f["model_name"], f["model_version"], f["device_uid"]) for f in findings
              if f["model_name"] and f["model_version"] and f["device_uid"]]
    key = model_set_key_of(models)
    n = 1
    while key in taken:  # two SRs naming the same models (a view classifier's change is not in the SR)
        n += 1
        key = f"{model_set_key_of(models)}-{n}"
    taken.add(key)
    results = [
        TaskResult(task=f["task"], bundle_name=f["model_name"], bundle_version=f["model_version"],
                   device_uid=f["device_uid"], probability=float(f["probability"]), positive=bool(f["present"]),
                   threshold=float(f["threshold"]), n_videos=int(f["n_videos"] or 0),
                   detail={"videos": f["video_probabilities"], "recovered_from_sr": True})
        for f in findings
        if f["task"] and f["probability"] is not None and f["threshold"] is not None and f["present"] is not None
        and f["model_name"] and f["model_version"] and f["device_uid"]
    ]
    predecessors = summary["predecessors"]
    report = ReportRecord(
        sr_sop_uid=summary["sop_uid"], study_uid=summary["study_uid"], model_set=key,
        series_uid=summary["series_uid"], sop_class_uid=summary["sop_class_uid"], path=str(path),
        supersedes=predecessors[-1] if predecessors else None,
    )
    return report, results


def _record_instances(store: StudyStore, out: Rebuilt) -> set[str]:
    """Record every object in ``studies/``, oldest first; returns the studies seen."""
    root = store.root
    files = sorted(store.studies.glob("*/*/*.dcm"), key=lambda p: (p.stat().st_mtime, str(p)))
    studies: set[str] = set()
    for path in files:
        rel = str(path.relative_to(root))
        try:
            header = read_header(path)
        except BadObject as exc:
            out.left_alone.append((rel, f"does not read as a DICOM object: {exc}"))
            continue
        except OSError as exc:
            out.left_alone.append((rel, f"cannot be read: {exc.strerror}"))
            continue
        if store.instance_path(header) != path:
            out.left_alone.append((rel, "its UIDs do not match its place in studies/"))
            continue
        try:
            store.record_file(header, path, path.stat().st_mtime)
        except SopInOtherStudy:
            out.left_alone.append((rel, "its SOP Instance UID is already recorded under another study"))
            continue
        out.instances += 1
        studies.add(header.study_uid)
    return studies


def _record_reports(cfg: Config, journal: Journal, store: StudyStore, out: Rebuilt) -> tuple[set[str], set[str]]:
    """Record every SR in ``reports/`` that reads.

    Returns
    -------
    (set of str, set of str)
        The studies with an SR recorded, and those with an SR that does not read.
    """
    destinations = [d.name for d in cfg.destinations]
    by_study: dict[str, list[Path]] = defaultdict(list)
    for path in store.reports.glob("*/*.dcm"):
        by_study[path.parent.name].append(path)
    reported: set[str] = set()
    unreadable: set[str] = set()
    for study_uid in sorted(by_study):
        taken: set[str] = set()
        for path in sorted(by_study[study_uid], key=lambda p: (p.stat().st_mtime, str(p))):
            rel = str(path.relative_to(store.root))
            try:
                summary = summarise_report(path)
            except Exception as exc:  # noqa: BLE001 - any file that does not read is reported, never fatal
                out.left_alone.append((rel, f"does not read as an echonode SR: {type(exc).__name__}"))
                unreadable.add(study_uid)
                continue
            if summary["study_uid"] != study_uid or summary["sop_uid"] != path.stem or not is_valid_uid(study_uid):
                out.left_alone.append((rel, "its UIDs do not match its place in reports/"))
                unreadable.add(study_uid)
                continue
            report, results = _sr_record(path, summary, taken)
            journal.record_recovered_report(report, results, destinations, path.stat().st_mtime)
            out.reports += 1
            reported.add(study_uid)
    return reported, unreadable


def rebuild_journal(cfg: Config, *, dry_run: bool = False) -> Rebuilt:
    """Rebuild a lost journal from the storage tree and the SRs already written.

    Parameters
    ----------
    cfg : Config
        The node's config: its storage folder, journal and destinations.
    dry_run : bool, optional
        Build the journal aside and report what it holds, then delete it:
        nothing under ``storage_dir`` changes.

    Returns
    -------
    Rebuilt

    Raises
    ------
    RebuildRefused
        When the journal is not lost (it records studies), when the storage
        tree holds nothing to recover, or while a node listens on the
        configured port (it must be stopped first).
    """
    path, root = cfg.journal_path, cfg.storage_dir
    why = journal_loss(path, root)
    if why is None:
        if not holds_data(root):
            raise RebuildRefused(f"nothing to recover: {root} holds no received object and no SR")
        damage = _damage(path)
        if damage is None:
            raise RebuildRefused(f"the journal {path} records studies: it is not lost, nothing to recover")
        why = f"does not read ({damage})"
    if _node_listening(cfg):
        raise RebuildRefused(
            f"something listens on port {cfg.node.port}, most likely the node: stop it first "
            "(a running node keeps writing to the journal it has open)"
        )
    out = Rebuilt(journal=path, why=why, dry_run=dry_run)
    building = path.with_name(path.name + ".rebuild")
    _remove_sqlite_files(building)
    # Not fsynced commit by commit: the file is fsynced once, whole, before
    # it is renamed into place (a crash before leaves only the .rebuild file).
    journal = Journal(building, durable=False)
    try:
        store = StudyStore(root, journal)
        studies = _record_instances(store, out)
        reported, unreadable = _record_reports(cfg, journal, store, out)
        for study_uid in sorted(unreadable - reported):
            reason = ("recover-journal: its SR in reports/ does not read, so whether the PACS has it is not known;"
                      " check there, then `echonode reprocess` to send a new one")
            if journal.hold_study(study_uid, reason):
                out.held.append(study_uid)
        out.delivered = sorted(reported)
        out.to_analyse = sorted(studies - reported - unreadable)
        # One file, no WAL beside it: what is renamed into place is the whole journal.
        journal.close_as_one_file()
    finally:
        journal.close()
    if dry_run:
        _remove_sqlite_files(building)
        return out
    if any(Path(f"{path}{suffix}").exists() for suffix in ("", "-wal", "-shm")):
        aside = path.with_name(f"{path.name}.lost-{time.strftime('%Y%m%d-%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            # A stale WAL beside the new file would be replayed into it.
            src = Path(f"{path}{suffix}")
            if src.exists():
                os.replace(src, Path(f"{aside}{suffix}"))
        out.moved_aside = aside
    move_into_place(building, path)
    get_logger(__name__).warning(
        "journal.rebuilt", instances=out.instances, reports=out.reports, delivered=len(out.delivered),
        to_analyse=len(out.to_analyse), held=out.held, left_alone=len(out.left_alone),
        moved_aside=str(out.moved_aside) if out.moved_aside else None,
    )
    return out


def _remove_sqlite_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
