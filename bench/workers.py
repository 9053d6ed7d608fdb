"""Benchmark: studies analysed per minute with one inference worker and with several (``[models] workers``).

A lab's backlog (a morning's carts, a node restarted after a night down)
arrives as many complete studies at once. For each worker count, in one
run and interleaved (the order rotates between repeats):

1. a fresh ``echonode serve`` (subprocess, CPU, the demo models or
   ``--models DIR``; ``models.threads`` 0, so N workers split the cores)
   and a PACS (a pynetdicom storage SCP in this process);
2. wait until every worker is idle with its models loaded (start-up is not
   counted);
3. dcmtk ``storescu`` sends every study of a synthetic archive (480x640,
   48 frames, several views each) over one association and releases it;
   ``study.after_release_s`` completes them all a second later;
4. wait until every study's SR is acknowledged by the PACS.

Timed from the association's release to the last SR acknowledged; printed
as studies per minute, median of ``--repeats``, and the ratio of each worker
count to one worker. Decoding runs in threads beside inference in each
worker; with several workers on the CPU each gets ``cores / N`` threads.

Run::

    .venv/bin/python -m bench.workers [--workers 1 2] [--patients 6] [--repeats 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.latency import (
    STORESCU,
    PynetdicomPACS,
    demo_models,
    free_port,
    journal_row,
    keep_runtime_choice,
    send_study,
    start_node,
    stop_node,
    wait,
)
from bench.machine import cpu_flags, cpu_model, load_average
from echonode.config import parse_config

REPO = Path(__file__).resolve().parents[1]


def archive_files(work: Path, patients: int, seed: int) -> tuple[list[Path], int]:
    """Every video file of a synthetic archive (made once), and its number of studies."""
    archive = work / "archive"
    if not (archive / "videos.csv").exists():
        subprocess.run([sys.executable, "-m", "train", "synth", "--out", str(archive), "--patients", str(patients),
                        "--seed", str(seed), "--rows", "480", "--cols", "640", "--frames", "48", "--no-reports"],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    lines = (archive / "videos.csv").read_text().splitlines()[1:]
    files = [archive / line.split(",")[5] for line in lines]
    return files, len({line.split(",")[1] for line in lines})


def node_config(work: Path, models: Path, pacs_port: int, workers: int) -> Any:
    return parse_config({
        "node": {"ae_title": "ECHONODE", "host": "127.0.0.1", "port": free_port(), "storage_dir": str(work / "node"),
                 "min_free_disk_mb": 0},
        "study": {"stable_after_s": 600.0, "after_release_s": 1.0, "check_interval_s": 1.0},
        "models": {"dir": str(models), "device": "cpu", "threads": 0, "workers": workers},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        "logging": {"format": "json", "level": "info"},
    })


def workers_ready(storage: Path, workers: int) -> bool:
    """Every worker idle (its heartbeat) with its models loaded."""
    try:
        models = json.loads((storage / "worker-models.json").read_bytes())
        beats = [json.loads((storage / ("worker-heartbeat.json" if i == 0 else f"worker-{i}-heartbeat.json"))
                            .read_bytes()) for i in range(workers)]
    except (OSError, ValueError):
        return False
    return bool(models.get("loaded")) and all(b.get("phase") == "idle" for b in beats)


def one_run(work: Path, models: Path, files: list[Path], studies: int, workers: int) -> float:
    """Seconds from the association's release to the last SR acknowledged, for a node with ``workers``."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    keep_runtime_choice(work.parent / "runtime-cache", work / "node", restore=True)
    pacs = PynetdicomPACS()
    cfg = node_config(work, models, pacs.port, workers)
    node, log = start_node(cfg, work)
    try:
        wait(lambda: workers_ready(cfg.storage_dir, workers), 1800, "every worker idle with its models loaded", 0.2)
        send_study(cfg.node.port, files)
        released = time.time()
        wait(lambda: (journal_row(cfg.journal_path, "SELECT COUNT(DISTINCT study_uid) FROM outbox WHERE state = 'sent'")
                      or (0,))[0] >= studies, 1800, f"{studies} SRs acknowledged by the PACS", 0.2)
        acked = [pacs.ack_time(s) for s in list(pacs.acked)]
        return max(a for a in acked if a is not None) - released
    finally:
        stop_node(node)
        log.close()
        pacs.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, help="models folder (default: the demo models, trained on first use)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare (first: the base)")
    p.add_argument("--patients", type=int, default=6, help="synthetic patients (1-3 studies each)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", type=Path, help="work folder (default: a temp folder, removed)")
    args = p.parse_args(argv)
    if not Path(STORESCU).exists():
        print(f"bench/workers.py: {STORESCU} is missing (apt-get install dcmtk)", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-workers-"))
    try:
        models = demo_models(args.models, work)
        files, studies = archive_files(work, args.patients, args.seed)
        print(f"date: {dt.date.today().isoformat()}; machine: {cpu_model()}, {os.cpu_count()} cores; "
              f"load average {load_average()}; python {platform.python_version()}")
        print(f"CPU flags of note: {' '.join(cpu_flags()) or 'none listed'}")
        print(f"{studies} studies, {len(files)} videos (480x640, 48 frames); models {models}")
        seconds: dict[int, list[float]] = {n: [] for n in args.workers}
        for rep in range(args.repeats):
            order = args.workers[rep % len(args.workers):] + args.workers[: rep % len(args.workers)]
            for n in order:
                s = one_run(work / "run", models, files, studies, n)
                seconds[n].append(s)
                print(f"  run {rep + 1}, {n} worker(s): {s:6.1f} s, {60 * studies / s:5.1f} studies/min", flush=True)
        base = statistics.median(seconds[args.workers[0]])
        print("median of the runs:")
        for n, ts in seconds.items():
            med = statistics.median(ts)
            print(f"  {n} worker(s): {60 * studies / med:5.1f} studies/min ({med:.1f} s); "
                  f"{base / med:.2f}x {args.workers[0]} worker(s)")
        print(f"load average after: {load_average()}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
