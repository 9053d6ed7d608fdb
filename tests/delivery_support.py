"""A study the worker has reported, its SR in the outbox: the starting point of the delivery tests."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from echonode.analyse.worker import process_study
from echonode.bundles.registry import ModelRegistry
from echonode.config import Config, to_toml
from echonode.studies.journal import Journal
from echonode.studies.states import StudyState
from echonode.studies.store import StudyStore
from tests.conftest import make_config, with_destination
from tests.factories import tiny_bundle


@dataclasses.dataclass
class Reported:
    """A study the worker has reported, its SR waiting in the outbox."""

    cfg: Config
    journal: Journal
    study_uid: str
    sr_uid: str
    sr_path: Path

    def outbox(self) -> dict:
        (row,) = self.journal.status()["outbox"]
        return row


def reported_study(tmp_path: Path, loop: Path, port: int, *, ae_title: str = "PACS", **delivery) -> Reported:
    """Store ``loop``, run the worker on it, leave one outbox row for destination "pacs"."""
    cfg = make_config(tmp_path, delivery=delivery) if delivery else make_config(tmp_path)
    cfg = with_destination(cfg, "pacs", ae_title, port)
    tiny_bundle(cfg.models_dir, "lvh", seed=1)
    journal = Journal(cfg.journal_path)
    store = StudyStore(cfg.storage_dir, journal)
    tmp = store.incoming / f"t-{loop.name}"
    tmp.write_bytes(loop.read_bytes())
    header, _ = store.accept(tmp, "CART")
    journal.mark_stable(-1)
    journal.queue_stable()
    registry = ModelRegistry(cfg.models_dir, "cpu")
    registry.refresh()
    outcome = process_study(cfg, journal, store, registry, journal.claim_next(os.getpid()))
    assert outcome.state == StudyState.REPORTED, outcome
    report = journal.latest_report(header.study_uid)
    return Reported(cfg, journal, header.study_uid, report.sr_sop_uid, Path(report.path))


def write_config(cfg: Config, path: Path) -> Path:
    path.write_text(to_toml(cfg))
    return path


def wait_due(rep: Reported) -> None:
    """Sleep until the outbox row's next attempt is due."""
    delay = rep.outbox()["next_attempt"] - time.time()
    if delay > 0:
        time.sleep(delay + 0.02)


def owe_more(rep: Reported, destination: str, count: int, due: float, *, sr_path: Path | None = None,
             start: int = 1) -> list[str]:
    """Put ``count`` more SRs for ``destination`` in the outbox, all due at ``due``; return their SOP UIDs.

    Each is the study's SR file under a new SOP Instance UID, as the journal
    records it (a report row per model set); what the peer stores is the file.
    ``start`` numbers them, so that later calls add new ones.
    """
    uids = [f"{rep.sr_uid}.{destination}.{start + i}" for i in range(count)]
    con = sqlite3.connect(rep.journal.path)
    with con:
        for i, uid in enumerate(uids):
            con.execute(
                "INSERT INTO reports (sr_sop_uid, study_uid, model_set, series_uid, sop_class_uid, path, created)"
                " VALUES (?, ?, ?, '1.2.3', '1.2.840.10008.5.1.4.1.1.88.33', ?, ?)",
                (uid, rep.study_uid, f"{destination}-set{start + i}", str(sr_path or rep.sr_path), due),
            )
            con.execute(
                "INSERT INTO outbox (sr_sop_uid, study_uid, destination, state, next_attempt, created)"
                " VALUES (?, ?, ?, 'pending', ?, ?)", (uid, rep.study_uid, destination, due, due))
    con.close()
    return uids


def bounded(fn, within_s: float, what: str):
    """Run ``fn`` in a thread; its result, or fail the test when it has not returned within ``within_s``.

    A call that hangs (the bug these tests look for) fails the test instead
    of hanging the suite; its thread is freed when the fixtures stop the peer.
    """
    out: dict = {}

    def call() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    t = threading.Thread(target=call, name=f"bounded-{what}", daemon=True)
    t.start()
    t.join(within_s)
    if t.is_alive():
        pytest.fail(f"{what} did not return within {within_s} s")
    if "error" in out:
        raise out["error"]
    return out["value"]


def outbox_rows(rep: Reported) -> dict:
    return {(r["destination"], r["sr_sop_uid"]): r for r in rep.journal.status()["outbox"]}
