"""Benchmark: ``echonode recover-journal`` on a storage tree of ``--studies`` reported studies.

Builds the tree the way a node does (objects accepted by the store, each
study analysed by the worker's ``process_study`` with a tiny random-weight
model, its SR written to ``reports/``), deletes the journal, then times
``python -m echonode recover-journal`` as a subprocess (wall time, interpreter
and imports included) and checks what it recorded.

Run::

    .venv/bin/python -m bench.recover_journal [--studies 200] [--objects 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import cpu_model, load_average

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--objects", type=int, default=3, help="objects per study")
    args = parser.parse_args()

    import pydicom
    import torch

    from echonode.analyse.worker import process_study
    from echonode.bundles.registry import ModelRegistry
    from echonode.config import parse_config, to_toml
    from echonode.ops.logs import configure_logging
    from echonode.studies.journal import Journal
    from echonode.studies.store import StudyStore
    from tests.factories import tiny_bundle, us_multiframe, write

    configure_logging("json", "warning", stream=sys.stderr)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="echonode-recover-"))
    cfg = parse_config({"node": {"storage_dir": str(work / "storage"), "min_free_disk_mb": 0},
                        "models": {"dir": str(work / "models"), "device": "cpu"},
                        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}],
                        "logging": {"format": "json", "level": "warning"}})
    (work / "echonode.toml").write_text(to_toml(cfg))
    tiny_bundle(cfg.models_dir, "lvh")
    journal = Journal(cfg.journal_path)
    store = StudyStore(cfg.storage_dir, journal)
    registry = ModelRegistry(cfg.models_dir, "cpu")
    registry.refresh()
    t0 = time.perf_counter()
    for n in range(args.studies):
        study = pydicom.uid.generate_uid()
        for i in range(args.objects):
            store.accept(write(us_multiframe(study_uid=study, frames=8, seed=i), store.incoming / "t.dcm"), None)
        journal.mark_stable(-1)
        journal.queue_stable()
        claim = journal.claim_next(1)
        if claim is None:
            raise SystemExit(f"study {n + 1} of {args.studies}: marked stable, but the journal queued nothing to claim")
        process_study(cfg, journal, store, registry, claim)
    built_s = time.perf_counter() - t0
    journal.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{cfg.journal_path}{suffix}").unlink(missing_ok=True)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "echonode", "--config", str(work / "echonode.toml"),
                          "recover-journal"], capture_output=True, text=True, cwd=REPO, check=True)
    seconds = time.perf_counter() - t0
    journal = Journal(cfg.journal_path)
    counts = journal.counts()
    n_reports = journal._connect().execute("SELECT COUNT(*) FROM reports").fetchone()[0]
    journal.close()
    print(json.dumps({
        "machine": {"cpu": cpu_model(), "load_average": load_average(), "python": sys.version.split()[0]},
        "date": time.strftime("%Y-%m-%d"),
        "studies": args.studies, "objects": args.studies * args.objects, "tree_built_s": round(built_s, 1),
        "recover_journal_s": round(seconds, 2), "study_states_after": counts, "reports": n_reports,
        "summary": res.stdout.splitlines()[:4],
    }, indent=1))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
