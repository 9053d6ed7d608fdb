"""Benchmark: ``echonode status``, a retention pass and a metrics scrape on a long-lived node's journal.

Builds a journal of ``--studies`` studies (default 100,000) with
``--instances`` instances each (default 10), two task results, one SR and
one outbox row per study, spread over ``--days`` days of activity, straight
into SQLite with ``executemany`` (no files on disk: status, retention's
journal side and metrics read only the journal). States: mostly
``delivered``, with some ``skipped``, ``failed``, ``reported`` (SR pending),
dead letters and studies still receiving or queued, as a node that has run
for a year holds them.

Then, on copies of that journal (each case starts from the same file):

- ``echonode status``, ``status --json`` (both with the default limit) and
  ``status --json --limit 0`` as subprocesses, wall time, median of
  ``--repeats``; ``python -m echonode --version`` is the interpreter and
  import floor;
- ``Journal.status`` in process, the part that reads the journal;
- retention passes: nothing due; one day of studies past ``max_age_days``;
  the size cap exceeded by about one day of studies; and the worst case, a
  destination dead for the whole period (every study ``reported`` with a
  dead letter, cap exceeded, nothing may go);
- one scrape of the node's metrics collector (journal part only);
- ``status --json`` in that dead-destination case, and the size of its output.

Run::

    .venv/bin/python -m bench.journal_scale [--studies 100000] [--instances 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.machine import cpu_model, load_average
from echonode.config import RetentionConfig, parse_config, to_toml
from echonode.studies.journal import Journal

REPO = Path(__file__).resolve().parents[1]

DAY = 86400.0
SOP_CLASS = "1.2.840.10008.5.1.4.1.1.3.1"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
TSYNTAX = "1.2.840.10008.1.2.4.50"
INSTANCE_BYTES = 12_000_000


def _state(rng: random.Random, age_days: float) -> tuple[str, str | None]:
    """(study state, outbox state or None) for a study last active ``age_days`` ago."""
    if age_days < 0.02:
        return rng.choice([("receiving", None), ("queued", None), ("reported", "pending")])
    x = rng.random()
    if x < 0.01:
        return "skipped", None
    if x < 0.02:
        return "failed", None
    if x < 0.025:
        return "reported", "dead"
    return "delivered", "sent"


def build(path: Path, studies: int, instances: int, days: float, seed: int = 0) -> dict[str, Any]:
    """Write the journal; return what it holds."""
    rng = random.Random(seed)
    journal = Journal(path)
    con = journal._connect()
    now = time.time()
    study_rows, inst_rows, result_rows, report_rows, outbox_rows = [], [], [], [], []
    states: dict[str, int] = {}
    for i in range(studies):
        uid = f"1.2.826.0.1.3680043.10.9999.{i + 1}"
        age = (studies - i) / studies * days
        active = now - age * DAY
        state, outbox = _state(rng, age)
        states[state] = states.get(state, 0) + 1
        study_rows.append((uid, state, None if state != "failed" else "could not process the study",
                           active - 120, active - 60, active, 1, 1))
        for k in range(instances):
            sop = f"{uid}.1.{k + 1}"
            inst_rows.append((sop, uid, f"{uid}.1", SOP_CLASS, TSYNTAX,
                              f"/var/lib/echonode/studies/{uid}/{uid}.1/{sop}.dcm", INSTANCE_BYTES,
                              active - 60, "CART1"))
        if state in ("delivered", "reported") and outbox is not None and state != "queued":
            sr = f"{uid}.99"
            for task, p in (("lvh", rng.random()), ("severe_as", rng.random())):
                result_rows.append((uid, "set1", task, f"echo-{task}", "1", "1.2.3.4", p, int(p > 0.5), 0.5,
                                    instances, json.dumps({"seconds": 8.0, "videos": {}}), active - 30))
            report_rows.append((sr, uid, "set1", f"{uid}.98", SR_CLASS,
                                f"/var/lib/echonode/reports/{uid}/{sr}.dcm", None, active - 30))
            outbox_rows.append((sr, uid, "pacs", outbox, 1, active - 30, "association rejected" if outbox == "dead"
                                else None, active - 30, active if outbox == "sent" else None))
    con.execute("BEGIN")
    con.executemany("INSERT INTO studies (study_uid, state, reason, first_received, last_received, updated,"
                    " attempts, generation) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", study_rows)
    con.executemany("INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", inst_rows)
    con.executemany("INSERT INTO results (study_uid, model_set, task, bundle_name, bundle_version, device_uid,"
                    " probability, positive, threshold, n_videos, detail, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", result_rows)
    con.executemany("INSERT INTO reports VALUES (?, ?, ?, ?, ?, ?, ?, ?)", report_rows)
    con.executemany("INSERT INTO outbox (sr_sop_uid, study_uid, destination, state, attempts, next_attempt,"
                    " last_error, created, sent_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", outbox_rows)
    con.execute("COMMIT")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.execute("ANALYZE")
    journal.close()
    return {"studies": studies, "instances": len(inst_rows), "states": states,
            "outbox": len(outbox_rows), "bytes": len(inst_rows) * INSTANCE_BYTES}


def _copy(src: Path, dest_dir: Path) -> Path:
    if dest_dir.exists():
        shutil.rmtree(dest_dir)
    dest_dir.mkdir(parents=True)
    dest = dest_dir / "journal.sqlite"
    shutil.copyfile(src, dest)
    return dest


def _time_cli(config: Path, args: list[str], repeats: int) -> tuple[float, int]:
    """Median wall seconds of ``python -m echonode --config CONFIG ARGS`` and its output's size."""
    times, size = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "echonode", "--config", str(config), *args],
                             capture_output=True, cwd=REPO, check=True, timeout=1800)
        times.append(time.perf_counter() - t0)
        size = len(out.stdout)
    return statistics.median(times), size


def _in_process_cli(config: Path, argv: list[str]) -> int:
    """``echonode --config CONFIG ARGV`` in this process, its output thrown away."""
    import contextlib
    import io

    from echonode.commands import main as cli

    with contextlib.redirect_stdout(io.StringIO()):
        return cli.main(["--config", str(config), *argv])


def _timed(fn: Any, repeats: int = 1) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def _retention(db: Path, storage: Path, settings: RetentionConfig, now: float) -> tuple[float, int]:
    from echonode.studies.retention import Retention
    from echonode.studies.store import StudyStore

    journal = Journal(db)
    store = StudyStore(storage, journal)
    seconds, purged = _timed(lambda: Retention(settings, journal, store).run(now=now))
    journal.close()
    return seconds, len(purged)


def _scrape(db: Path, storage: Path) -> float:
    """Seconds of one collection of the node's metrics (its journal reads), on a stand-in node."""
    from echonode.daemon.node import ErrorCounts
    from echonode.ops.prometheus import NodeCollector
    from echonode.receive.scp import ReceiveCounters

    journal = Journal(db)
    # The node's own counter types (all zero), so that the stand-in follows what the collector reads.
    node = SimpleNamespace(
        scp=SimpleNamespace(counters=ReceiveCounters(), listening=True),
        journal=journal, store=SimpleNamespace(root=storage), delivery=None, worker=None, _start_worker=False,
        loop_errors=ErrorCounts(), job_errors=ErrorCounts(),
        cfg=SimpleNamespace(models_dir=storage / "models"),
    )
    collector = NodeCollector(node)
    seconds, _ = _timed(lambda: list(collector.collect()), repeats=3)
    journal.close()
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's command line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    argparse.Namespace
        ``studies``, ``instances``, ``days``, ``repeats`` and ``workdir``.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--instances", type=int, default=10, help="instances per study")
    parser.add_argument("--days", type=float, default=365.0, help="the period the studies' activity spans")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    return parser.parse_args(argv)


def build_base(work: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """Build the base journal every case copies, and start the figures with what it holds.

    Parameters
    ----------
    work : Path
        The bench's folder; the journal is ``work/base.sqlite`` (replaced when present).
    args : argparse.Namespace
        The command line (:func:`parse_args`).

    Returns
    -------
    base : Path
        The journal file.
    held : dict
        What :func:`build` wrote.
    out : dict
        The figures so far: ``machine``, ``date`` and ``journal``.
    """
    base = work / "base.sqlite"
    if base.exists():
        base.unlink()
    t0 = time.perf_counter()
    held = build(base, args.studies, args.instances, args.days)
    built_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average": load_average(),
                    "python": sys.version.split()[0]},
        "date": time.strftime("%Y-%m-%d"),
        "journal": {**held, "file_mb": round(base.stat().st_size / 1e6, 1), "build_s": round(built_s, 1)},
    }
    return base, held, out


def write_config(work: Path, storage: Path) -> Path:
    """An ``echonode.toml`` in ``work`` for a node whose storage (and journal) is ``storage``."""
    cfg = parse_config({"node": {"storage_dir": str(storage), "min_free_disk_mb": 0},
                        "models": {"dir": str(storage / "models")},
                        "logging": {"format": "json", "level": "warning"}})
    config = work / "echonode.toml"
    config.write_text(to_toml(cfg))
    return config


def measure_status(config: Path, db: Path, repeats: int) -> dict[str, Any]:
    """``echonode status`` on the node's journal: as subprocesses, ``Journal.status``, in process.

    Parameters
    ----------
    config : Path
        The node's configuration (:func:`write_config`).
    db : Path
        The node's journal, a copy of the base journal.
    repeats : int
        Timed repeats of each case; medians are kept.

    Returns
    -------
    dict
        Seconds (and output sizes of the subprocesses) by case, the interpreter floor first.
    """
    floor, _ = _time_cli(config, ["--version"], repeats)
    cli: dict[str, Any] = {"python -m echonode --version (floor)": round(floor, 3)}
    for label, argv in (("status", ["status"]), ("status --json", ["status", "--json"]),
                        ("status --json --limit 0", ["status", "--json", "--limit", "0"])):
        seconds, size = _time_cli(config, argv, repeats)
        cli[label] = {"s": round(seconds, 3), "output_bytes": size}
    journal = Journal(db)
    inproc, _ = _timed(lambda: journal.status(limit=50), repeats=repeats)
    journal.close()
    status = {**cli, "Journal.status(limit=50) in process": round(inproc, 3)}
    # The whole command in this process, imports done by a first call: what
    # a long-lived node adds to it, without the interpreter's start.
    for label, argv in (("status", ["status"]), ("status --json", ["status", "--json"])):
        _in_process_cli(config, argv)
        seconds, _ = _timed(lambda argv=argv: _in_process_cli(config, argv), repeats=repeats)
        status[f"{label} in process, imports done"] = round(seconds, 3)
    return status


def retention_cases(total_gb: float, days: float) -> dict[str, RetentionConfig]:
    """The retention settings of the ordinary passes: nothing due, one day past the age, one day over the cap.

    Parameters
    ----------
    total_gb : float
        The instances' total size in the journal, in GB.
    days : float
        The period the studies' activity spans.

    Returns
    -------
    dict
        Settings by case label, in the order they are run.
    """
    day_gb = total_gb / days
    return {
        "nothing due": RetentionConfig(enabled=True, max_age_days=int(days) + 30, max_total_gb=total_gb * 2),
        "age: one day due": RetentionConfig(enabled=True, max_age_days=int(days) - 1, max_total_gb=0),
        "size: one day over the cap": RetentionConfig(enabled=True, max_age_days=0,
                                                      max_total_gb=total_gb - day_gb),
    }


def kill_destination(db: Path) -> None:
    """Make ``db`` a node whose destination was dead for the whole period: every SR owed, nothing may go.

    The few skipped studies are made failed, so that a retention pass is all reading.
    """
    journal = Journal(db)
    con = journal._connect()
    con.execute("UPDATE studies SET state = 'reported' WHERE state = 'delivered'")
    con.execute("UPDATE studies SET state = 'failed' WHERE state = 'skipped'")
    con.execute("UPDATE outbox SET state = 'dead', last_error = 'association rejected' WHERE state = 'sent'")
    journal.close()


def measure_retention(base: Path, storage: Path, held: dict[str, Any], days: float, now: float) -> dict[str, Any]:
    """Retention passes, each on a fresh copy of the base journal, the dead-destination case last.

    Parameters
    ----------
    base : Path
        The base journal.
    storage : Path
        The node's storage folder; its journal is replaced by each copy.
    held : dict
        What :func:`build` wrote (its ``bytes`` size the cap).
    days : float
        The period the studies' activity spans.
    now : float
        The passes' clock, the same for every case.

    Returns
    -------
    dict
        Seconds and studies purged by case. The node's journal is left in
        the dead-destination state, which the next measurements read.
    """
    retention: dict[str, Any] = {}
    for label, settings in retention_cases(held["bytes"] / 1e9, days).items():
        db = _copy(base, storage)
        seconds, purged = _retention(db, storage, settings, now)
        retention[label] = {"s": round(seconds, 3), "purged": purged}
    db = _copy(base, storage)
    kill_destination(db)
    seconds, purged = _retention(db, storage, RetentionConfig(enabled=True, max_age_days=30, max_total_gb=1.0),
                                 now)
    retention["dead destination, age and cap, nothing may go"] = {"s": round(seconds, 3), "purged": purged}
    return retention


def measure_dead_status(config: Path, repeats: int) -> dict[str, Any]:
    """``status --json`` as a subprocess and in process, on the dead-destination journal the node holds now."""
    dead_status, dead_size = _time_cli(config, ["status", "--json"], repeats)
    seconds, _ = _timed(lambda: _in_process_cli(config, ["status", "--json"]), repeats=repeats)
    return {"status --json, dead destination": {"s": round(dead_status, 3), "output_bytes": dead_size},
            "status --json, dead destination, in process": round(seconds, 3)}


def main(argv: list[str] | None = None) -> None:
    """Run every case and print the figures as one JSON document on stdout.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when None.
    """
    args = parse_args(argv)
    from echonode.ops.logs import configure_logging

    # Retention logs a line per purged study: to stderr, the figures go to stdout.
    configure_logging("json", "warning", stream=sys.stderr)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="echonode-journal-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    base, held, out = build_base(work, args)
    storage = work / "node"
    db = _copy(base, storage)
    config = write_config(work, storage)
    out["status"] = measure_status(config, db, args.repeats)
    out["retention"] = measure_retention(base, storage, held, args.days, time.time())
    out["status"].update(measure_dead_status(config, args.repeats))
    out["metrics_scrape_s"] = {"normal": round(_scrape(_copy(base, storage), storage), 3)}
    print(json.dumps(out, indent=1))
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
