"""The ``echonode`` command line: status, reprocess, retry, and the demo's plumbing."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import pytest
import structlog

from echonode.commands.main import build_parser, main
from echonode.config import to_toml
from echonode.studies.journal import Journal
from echonode.studies.records import InstanceRecord, ReportRecord, TaskResult
from tests.conftest import make_config, run_cli
from tests.factories import tiny_bundle


def _config_file(tmp_path: Path) -> tuple[Path, Journal]:
    cfg = make_config(tmp_path)
    tiny_bundle(cfg.models_dir, "lvh")
    path = tmp_path / "echonode.toml"
    path.write_text(to_toml(cfg))
    journal = Journal(cfg.journal_path)
    journal.record_instance(InstanceRecord("1.2.3.4", "1.2.3", "1.2.3.1", "1.2.840.10008.5.1.4.1.1.3.1",
                                           "1.2.840.10008.1.2.1", "/x.dcm", 10, time.time() - 100))
    return path, journal


def test_every_help_text_renders() -> None:
    # argparse formats help strings with %: a bare "%" in one breaks `echonode --help`.
    parser = build_parser()
    assert "COMMAND" in parser.format_help()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in sub.choices.items():
        assert command.format_help(), name


def test_status_json_shape(tmp_path: Path) -> None:
    path, _ = _config_file(tmp_path)
    res = run_cli("--config", str(path), "status", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert set(doc) >= {"studies", "outbox", "models"}
    (study,) = doc["studies"]
    assert study["study_uid"] == "1.2.3" and study["state"] == "receiving" and study["instances"] == 1
    (model,) = doc["models"]
    assert model["task"] == "lvh" and model["random_weights"] is True


def test_status_human_and_reprocess(tmp_path: Path) -> None:
    path, journal = _config_file(tmp_path)
    res = run_cli("--config", str(path), "status")
    assert res.returncode == 0
    assert "1.2.3" in res.stdout and "receiving" in res.stdout and "RANDOM WEIGHTS" in res.stdout
    res = run_cli("--config", str(path), "reprocess", "1.2.3")
    assert res.returncode == 0 and journal.study_state("1.2.3") == "queued"
    res = run_cli("--config", str(path), "reprocess", "9.9.9")
    assert res.returncode == 1 and "no stored study" in res.stderr
    res = run_cli("--config", str(path), "retry")
    assert res.returncode == 0 and "0 dead-lettered" in res.stdout


def test_status_on_a_fresh_node_and_bad_config(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    res = run_cli("--config", str(path), "status", "--json")
    assert json.loads(res.stdout)["studies"] == []
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nae_tilte = 'X'\n")
    res = run_cli("--config", str(bad), "serve")
    assert res.returncode == 2 and "node.ae_tilte" in res.stderr and "Traceback" not in res.stderr


def test_demo_with_given_models(tmp_path: Path) -> None:
    """The README's first command, less the first-run training: given models, the whole loop and what it shows."""
    models = tmp_path / "models"
    tiny_bundle(models, "lvh")
    tiny_bundle(models, "severe_as", seed=2)
    res = run_cli("demo", "--models", str(models), "--workdir", str(tmp_path / "work"), timeout=600,
                  env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "NOT FOR DIAGNOSTIC USE" in out
    # Three studies, three SRs: two held-out synthetic studies picked by anatomy, and the real loop.
    assert out.count("Structured Report") == 3
    assert "held-out set (seed 2216" in out and "picked by their TRUE anatomy, not by what the model says" in out
    lvh_part = out.split("=== held-out synthetic study WITH LVH")[1].split("=== held-out synthetic NORMAL study")[0]
    normal_part = out.split("=== held-out synthetic NORMAL study")[1].split("=== the real SonoSite loop")[0]
    for part, lvh in ((lvh_part, "yes"), (normal_part, "no")):
        truth = part.splitlines()[1]
        assert truth.lstrip().startswith("truth") and "IVSd" in truth and "LVPWd" in truth
        assert f"(LVH: {lvh}," in truth and "cusp separation" in truth and "AV Vmax" in truth
        assert "Left ventricular hypertrophy" in part and "aortic stenosis" in part
        # The expectation is printed with its outcome, whatever the model (random weights here) said.
        check = next(line for line in part.splitlines() if "demo check" in line)
        assert (">= 0.8" if lvh == "yes" else "<= 0.2") in check
        assert check.endswith("as expected") or check.endswith("NOT MET")
    sonosite = out.split("=== the real SonoSite loop")[1]
    assert "the view model says: no view model installed" in sonosite
    assert "PLAX" not in sonosite.split("Structured Report")[0]
    assert ("The LVH model called both" in out) != ("did NOT do what the demo expects" in out)
    assert len(os.listdir(tmp_path / "work" / "pacs")) == 3


def test_serve_on_a_busy_port_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        cfg = make_config(tmp_path, node={"port": busy.getsockname()[1]})
        path = tmp_path / "c.toml"
        path.write_text(to_toml(cfg))
        res = run_cli("--config", str(path), "serve", timeout=120)
    finally:
        busy.close()
    assert res.returncode == 1
    assert "Address already in use" in res.stderr and "Traceback" not in res.stderr


def test_check_config_warns_without_destinations_and_refuses_nan(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(to_toml(make_config(tmp_path)))
    res = run_cli("--config", str(path), "check-config")
    assert res.returncode == 0 and "no [[destinations]]" in res.stderr
    path.write_text("[study]\nstable_after_s = nan\n")
    res = run_cli("--config", str(path), "check-config")
    assert res.returncode == 2 and "study.stable_after_s" in res.stderr


def test_status_shows_a_bundle_the_worker_refused(tmp_path: Path) -> None:
    from echonode.analyse.worker import write_models_state
    from echonode.bundles.registry import ModelRegistry

    path, _ = _config_file(tmp_path)
    cfg = make_config(tmp_path)
    broken = tiny_bundle(cfg.models_dir, "severe_as", name="broken")
    (broken / "weights.pt").write_bytes(b"not a state dict")
    reg = ModelRegistry(cfg.models_dir, "cpu", runtime="eager")
    reg.refresh()
    write_models_state(cfg, reg)
    doc = json.loads(run_cli("--config", str(path), "status", "--json").stdout)
    by_name = {m["name"]: m for m in doc["models"]}
    assert by_name["test-lvh"]["loaded"] is True and by_name["test-lvh"]["runtime"] == "eager"
    assert by_name["broken"]["loaded"] is False
    assert "broken" in by_name["broken"]["error"]


def test_status_limit_lists_the_most_recent_and_counts_every_study(tmp_path: Path) -> None:
    path, journal = _config_file(tmp_path)  # study 1.2.3, received 100 s ago
    now = time.time()
    for i in range(4, 9):
        journal.record_instance(InstanceRecord(f"1.2.{i}.1", f"1.2.{i}", f"1.2.{i}.0", "1.2.840.10008.5.1.4.1.1.3.1",
                                               "1.2.840.10008.1.2.1", f"/x{i}.dcm", 10, now - 90 + i))
    journal.mark_stable(0.0)
    journal.requeue("1.2.3")  # the oldest study, but the latest activity

    doc = json.loads(run_cli("--config", str(path), "status", "--json", "--limit", "2").stdout)
    assert [s["study_uid"] for s in doc["studies"]] == ["1.2.3", "1.2.8"]  # in order of first reception
    assert doc["limit"] == 2 and doc["studies_total"] == 6
    assert doc["study_counts"]["stable"] == 5 and doc["study_counts"]["queued"] == 1
    assert doc["study_counts"]["receiving"] == 0 and sum(doc["study_counts"].values()) == 6
    assert doc["outbox"] == [] and doc["outbox_counts"]["pending"] == 0
    assert {m["task"] for m in doc["models"]} == {"lvh"}

    doc = json.loads(run_cli("--config", str(path), "status", "--json").stdout)
    assert doc["limit"] == 50 and len(doc["studies"]) == 6
    assert len(json.loads(run_cli("--config", str(path), "status", "--json", "--limit", "0").stdout)["studies"]) == 6

    res = run_cli("--config", str(path), "status", "--limit", "2")
    assert res.returncode == 0
    assert "studies: 6 (5 stable, 1 queued)" in res.stdout and "the 2 most recently active" in res.stdout
    assert "1.2.8" in res.stdout and "1.2.4" not in res.stdout

    res = run_cli("--config", str(path), "status", "--limit", "-1")
    assert res.returncode == 2 and "must be 0 or more" in res.stderr


def test_a_corrupt_journal_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    cfg.storage_dir.mkdir(parents=True)
    cfg.journal_path.write_bytes(b"this is not a SQLite database" * 100)
    for command in (["status"], ["reprocess", "1.2.3"], ["retry"], ["discard"]):
        res = run_cli("--config", str(path), *command)
        assert res.returncode == 1, (command, res.stderr)
        # The file, not only the error: a path is no patient data.
        assert res.stderr == f"echonode: journal error: file is not a database: {cfg.journal_path}\n", (
            command, res.stderr)
        assert res.stdout == ""


@pytest.fixture
def restore_logging():
    """``echonode discard`` configures logging for this process; later tests must not write to closed streams."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def _dead_letters(journal: Journal, study_uid: str, destinations: dict[str, str]) -> None:
    """Report ``study_uid`` (received by ``_config_file`` or here) to ``destinations``: name -> outbox state."""
    if journal.study(study_uid) is None:
        journal.record_instance(InstanceRecord(study_uid + ".4", study_uid, study_uid + ".1",
                                               "1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.1.2.1",
                                               f"/{study_uid}.dcm", 10, time.time() - 100))
    assert journal.requeue(study_uid)
    claim = journal.claim_next(pid=1)
    report = ReportRecord(study_uid + ".99", study_uid, "set", study_uid + ".98", "1.2.840.10008.5.1.4.1.1.88.33",
                          f"/{study_uid}-sr.dcm")
    journal.finish_reported(claim, "set", [TaskResult("lvh", "m", "1", "1.2.9", 0.7, True, 0.5, 1, {})], report,
                            list(destinations))
    for item in [d for d in journal.due_deliveries() if d.study_uid == study_uid]:
        if destinations[item.destination] == "dead":
            journal.mark_dead(item.id, "destination no longer configured")
        elif destinations[item.destination] == "sent":
            journal.mark_sent(item.id)


def test_discard_gives_up_on_dead_letters(tmp_path: Path, capsys, restore_logging) -> None:
    """Per destination, per study, all; a log line per row; status shows the rows; the studies leave `reported`."""
    path, journal = _config_file(tmp_path)  # no [[destinations]]: "old" and "pacs" are no longer configured
    _dead_letters(journal, "1.2.3", {"old": "dead", "pacs": "dead"})
    _dead_letters(journal, "1.2.5", {"old": "dead", "pacs": "sent"})
    _dead_letters(journal, "1.2.6", {"old": "pending"})

    assert main(["--config", str(path), "discard", "--destination", "old"]) == 0
    out, err = capsys.readouterr()
    assert out == ("2 dead-lettered SR deliveries for destination old discarded; they will never be sent\n"
                   "  old: 2\n")
    logged = [json.loads(line) for line in err.splitlines()]
    assert [(e["event"], e["study_uid"], e["sr_sop_uid"], e["destination"]) for e in logged] == [
        ("delivery.discarded", "1.2.3", "1.2.3.99", "old"), ("delivery.discarded", "1.2.5", "1.2.5.99", "old")]
    assert journal.study_state("1.2.3") == "reported"  # still owed to "pacs"
    assert journal.study_state("1.2.5") == "delivered"  # "pacs" has it
    assert journal.study_state("1.2.6") == "reported"  # pending is never discarded

    assert main(["--config", str(path), "discard", "1.2.3"]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines() == ["1 dead-lettered SR delivery of study 1.2.3 discarded; they will never be sent",
                                "  pacs: 1"]
    assert journal.study_state("1.2.3") == "undelivered"

    assert main(["--config", str(path), "discard"]) == 0
    assert capsys.readouterr().out == "nothing to discard: no dead-lettered SR\n"
    assert main(["--config", str(path), "discard", "9.9.9"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == "echonode: no stored study 9.9.9\n"

    assert main(["--config", str(path), "status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {(o["study_uid"], o["destination"]): o for o in doc["outbox"]}
    assert {k: o["state"] for k, o in rows.items()} == {
        ("1.2.3", "old"): "discarded", ("1.2.3", "pacs"): "discarded", ("1.2.5", "old"): "discarded",
        ("1.2.5", "pacs"): "sent", ("1.2.6", "old"): "pending"}
    assert rows[("1.2.3", "old")]["discarded_at"] > 0
    assert rows[("1.2.3", "old")]["last_error"] == "destination no longer configured"
    assert doc["outbox_counts"]["discarded"] == 3 and doc["study_counts"]["undelivered"] == 1

    assert main(["--config", str(path), "status"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "outbox: 1 not sent (5 in all)" in lines
    assert "  3 discarded (given up with `echonode discard`; never sent):" in lines
    assert "1.2.3 -> old: discarded " in out and "undelivered" in out


def test_discard_on_a_fresh_node(tmp_path: Path, capsys, restore_logging) -> None:
    cfg = make_config(tmp_path)
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert main(["--config", str(path), "discard"]) == 0
    assert capsys.readouterr().out == "nothing to discard: no dead-lettered SR\n"
    assert main(["--config", str(path), "discard", "1.2.3"]) == 1
    assert capsys.readouterr().err == "echonode: no stored study 1.2.3\n"
