"""A lost journal is not a new start: ``serve`` refuses, ``recover-journal`` rebuilds it, no SR is sent twice.

The journal is what says which SR each study already got; a node that took a
missing or empty one for a fresh start re-recorded every stored file,
analysed every study again and sent every PACS a second SR (a new SOP
Instance UID, no reference to the first).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import structlog

from echonode.analyse.worker import process_study
from echonode.bundles.registry import ModelRegistry
from echonode.commands import main as cli
from echonode.config import Config, to_toml
from echonode.studies.journal import Journal
from echonode.studies.states import OutboxState, StudyState
from echonode.studies.store import StudyStore
from tests.conftest import (
    REPO,
    echonode_cmd,
    free_port,
    make_config,
    run_cli,
    wait_for,
    with_destination,
)
from tests.factories import make_studies, tiny_bundle, us_multiframe, write
from tests.peers import (
    RecordingSCP,
    ServedNode,
    journal_rows,
    send_studies,
)

LOSSES = ("deleted", "truncated to 0 bytes", "not echonode's", "new and empty")


def lose(cfg: Config, how: str) -> None:
    """Lose the journal of a stopped node as an operator, a script or a disk might."""
    path = cfg.journal_path
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    if how == "deleted":
        path.unlink()
    elif how == "truncated to 0 bytes":
        os.truncate(path, 0)
    elif how == "not echonode's":  # a SQLite file, but someone else's
        path.unlink()
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE notes (x)")
        con.commit()
        con.close()
    elif how == "new and empty":  # what an older node made of a deleted one
        path.unlink()
        Journal(path).close()
    else:
        raise ValueError(how)


def _config_file(cfg: Config, tmp_path: Path) -> Path:
    path = tmp_path / "echonode.toml"
    path.write_text(to_toml(cfg))
    return path


def _store_one(cfg: Config) -> str:
    journal = Journal(cfg.journal_path)
    store = StudyStore(cfg.storage_dir, journal)
    header, _ = store.accept(write(us_multiframe(), store.incoming / "t.dcm"), "CART")
    journal.close()
    return header.study_uid


@pytest.mark.parametrize("how", LOSSES)
def test_serve_and_status_refuse_a_lost_journal_over_stored_studies(tmp_path: Path, how: str) -> None:
    cfg = make_config(tmp_path)
    config = _config_file(cfg, tmp_path)
    _store_one(cfg)
    lose(cfg, how)
    before = cfg.journal_path.read_bytes() if cfg.journal_path.exists() else None
    res = run_cli("--config", str(config), "serve", timeout=60)
    assert res.returncode == 3, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr  # one message, not a log
    assert str(cfg.journal_path) in lines[0] and "echonode recover-journal" in lines[0], lines[0]
    # Nothing was started or written: no journal made in its place.
    assert (cfg.journal_path.read_bytes() if cfg.journal_path.exists() else None) == before
    res = run_cli("--config", str(config), "status", "--json")
    assert res.returncode == 3 and res.stdout == "" and "echonode recover-journal" in res.stderr


def test_a_damaged_journal_is_still_refused_with_sqlite_s_error(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    config = _config_file(cfg, tmp_path)
    _store_one(cfg)
    size = cfg.journal_path.stat().st_size
    os.truncate(cfg.journal_path, size // 2)
    res = run_cli("--config", str(config), "serve", timeout=60)
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("echonode: journal error: ") and str(cfg.journal_path) in res.stderr


def test_a_new_node_starts_on_an_empty_storage(tmp_path: Path) -> None:
    """No journal and nothing stored is a first start, not a loss (the check must not stop one)."""
    from echonode.studies.rebuild import journal_loss

    cfg = make_config(tmp_path)
    assert journal_loss(cfg.journal_path, cfg.storage_dir) is None
    cfg.storage_dir.mkdir(parents=True)
    (cfg.storage_dir / "reports").mkdir()
    assert journal_loss(cfg.journal_path, cfg.storage_dir) is None


# -- recover-journal in process ----------------------------------------------------------------


def _node_history(tmp_path: Path) -> dict:
    """A node's storage as it stood when its journal was lost: studies delivered, one SR still owed,
    one study not analysed yet, one whose SR file was damaged, and a file that does not read."""
    cfg = with_destination(make_config(tmp_path), "pacs", "PACS", free_port())
    tiny_bundle(cfg.models_dir, "lvh")
    journal = Journal(cfg.journal_path)
    store = StudyStore(cfg.storage_dir, journal)
    registry = ModelRegistry(cfg.models_dir, "cpu")
    registry.refresh()
    uids: dict[str, str] = {}
    for name in ("delivered", "owed", "damaged_sr", "not_analysed"):
        study = pydicom.uid.generate_uid()
        for i in range(2):
            store.accept(write(us_multiframe(study_uid=study, frames=16, seed=i), store.incoming / "t.dcm"), "CART")
        uids[name] = study
        if name == "not_analysed":
            continue
        journal.mark_stable(-1)
        journal.queue_stable()
        process_study(cfg, journal, store, registry, journal.claim_next(1))
        if name != "owed":
            for item in journal.due_deliveries():
                journal.mark_sent(item.id)
    damaged = journal.latest_report(uids["damaged_sr"])
    Path(damaged.path).write_bytes(b"not an SR at all" * 64)
    garbage = store.studies / uids["not_analysed"] / "1.2.3" / "1.2.3.4.dcm"
    garbage.parent.mkdir()
    garbage.write_bytes(b"garbage")
    srs = {name: journal.latest_report(uid) for name, uid in uids.items()}
    instances = {r.sop_uid: r.path for r in journal.instances()}
    journal.close()
    return {"cfg": cfg, "uids": uids, "srs": srs, "instances": instances, "key": registry.key, "garbage": garbage}


@pytest.fixture
def restore_logging():
    """``recover-journal`` configures logging for this process; later tests must not write to closed streams."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def test_recover_journal_rebuilds_from_storage_and_marks_every_sr_sent(tmp_path: Path, capsys,
                                                                       restore_logging) -> None:
    h = _node_history(tmp_path)
    capsys.readouterr()
    cfg, uids, srs = h["cfg"], h["uids"], h["srs"]
    config = _config_file(cfg, tmp_path)
    lose(cfg, "truncated to 0 bytes")

    assert cli.main(["--config", str(config), "recover-journal", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dry run:") and "2 study(ies) delivered" in out, out
    assert cfg.journal_path.stat().st_size == 0  # a dry run writes nothing
    assert not list(cfg.storage_dir.glob("journal.sqlite.*"))

    assert cli.main(["--config", str(config), "recover-journal"]) == 0
    out = capsys.readouterr().out
    assert "journal rebuilt" in out and "1 study(ies) with no SR" in out and "held as failed" in out, out
    assert str(h["garbage"].relative_to(cfg.storage_dir)) in out
    (aside,) = cfg.storage_dir.glob("journal.sqlite.lost-*")
    assert aside.stat().st_size == 0  # the lost file kept, not overwritten

    journal = Journal(cfg.journal_path)
    # Every stored object recorded where it is (the garbage file left alone).
    assert {r.sop_uid: r.path for r in journal.instances()} == h["instances"]
    # The SRs already written are the studies' reports, sent to every destination, under the
    # models' key: the worker, with the same models, finds them and sends nothing new.
    for name in ("delivered", "owed"):
        uid = uids[name]
        assert journal.study_state(uid) == StudyState.DELIVERED
        report = journal.report_for(uid, h["key"])
        assert report is not None and report.sr_sop_uid == srs[name].sr_sop_uid
        rows = [o for o in journal.status()["outbox"] if o["study_uid"] == uid]
        assert [(o["destination"], o["state"]) for o in rows] == [("pacs", OutboxState.SENT)]
        [summary] = [s for s in journal.status()["studies"] if s["study_uid"] == uid]
        assert [r["task"] for r in summary["results"]] == ["lvh"]  # status shows what the SR says
    held = journal.study(uids["damaged_sr"])
    assert held["state"] == StudyState.FAILED and "does not read" in held["reason"]
    assert journal.study_state(uids["not_analysed"]) == StudyState.RECEIVING
    assert journal.due_deliveries() == []
    journal.close()

    # Not lost any more: a second run refuses, serve's check passes.
    assert cli.main(["--config", str(config), "recover-journal"]) == 1
    assert "not lost" in capsys.readouterr().err


def test_recover_journal_refuses_while_the_node_listens(tmp_path: Path, capsys, restore_logging) -> None:
    cfg = make_config(tmp_path)
    _store_one(cfg)
    lose(cfg, "deleted")
    config = _config_file(cfg, tmp_path)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", cfg.node.port))
        listener.listen()
        assert cli.main(["--config", str(config), "recover-journal"]) == 1
    assert "stop it first" in capsys.readouterr().err
    assert not cfg.journal_path.exists()


# -- the whole node ----------------------------------------------------------------------------------


def test_a_lost_journal_recovered_sends_no_second_sr(tmp_path: Path) -> None:
    """serve, deliver, stop, lose the journal: serve refuses; recover-journal; serve: no SR twice."""
    pacs = RecordingSCP(free_port()).start()
    cfg = make_config(tmp_path, study={"stable_after_s": 0.5, "check_interval_s": 0.1},
                      models={"threads": 1},
                      delivery={"retry_initial_s": 0.3, "retry_max_s": 1.0, "check_interval_s": 0.1})
    cfg = with_destination(cfg, "pacs", "PACS", pacs.port)
    tiny_bundle(cfg.models_dir, "lvh", seed=1)
    node = ServedNode(cfg, tmp_path)
    try:
        node.start()
        studies = make_studies(2, 2)
        assert len(send_studies(cfg.node.port, studies)) == 4
        first = {str(objs[0].StudyInstanceUID) for objs in studies}
        wait_for(lambda: {s for s, st in journal_rows(cfg, "SELECT study_uid, state FROM studies")
                          if st == "delivered"} == first, timeout=180, what="both studies delivered")
        node.stop()

        def srs_by_study() -> dict[str, set[str]]:
            # Distinct SOP Instance UIDs: a resend of the same SR (a delivery
            # timed out on a loaded machine after the PACS stored it) is not a second SR.
            out: dict[str, set[str]] = {}
            for ds in list(pacs.received):
                out.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.SOPInstanceUID))
            return out

        sent_before = srs_by_study()
        assert set(sent_before) == first and all(len(u) == 1 for u in sent_before.values())

        # Lost: serve refuses, whichever way it went.
        for how in ("truncated to 0 bytes", "deleted"):
            if not cfg.journal_path.exists():
                Journal(cfg.journal_path).close()  # a journal to truncate
                os.truncate(cfg.journal_path, 0)
            lose(cfg, how)
            res = subprocess.run(echonode_cmd("--config", str(node.path), "serve"), cwd=REPO,
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 3 and "recover-journal" in res.stderr, res.stderr
        # A study received but not analysed when the journal went (its file put in place by hand).
        late = us_multiframe(frames=16, seed=9)
        write(late, cfg.storage_dir / "studies" / late.StudyInstanceUID / late.SeriesInstanceUID
              / f"{late.SOPInstanceUID}.dcm")

        res = run_cli("--config", str(node.path), "recover-journal")
        assert res.returncode == 0, res.stderr
        node.start()
        wait_for(lambda: dict(journal_rows(cfg, "SELECT study_uid, state FROM studies")).get(
            str(late.StudyInstanceUID)) == "delivered", timeout=180, what="the late study delivered")
        time.sleep(2)  # any second SR for the first studies would be on its way by now
        sent_after = srs_by_study()
        assert {s: sent_after[s] for s in first} == sent_before  # no new SR for a study the PACS had
        assert len(sent_after[str(late.StudyInstanceUID)]) == 1 and len(sent_after) == 3
        status = run_cli("--config", str(node.path), "status", "--json")
        assert status.returncode == 0, status.stderr
        states = {s["study_uid"]: s["state"] for s in json.loads(status.stdout)["studies"]}
        assert states == {**{s: "delivered" for s in first}, str(late.StudyInstanceUID): "delivered"}
    finally:
        node.stop()
        pacs.stop()
