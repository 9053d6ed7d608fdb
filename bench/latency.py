"""Benchmark: a study's latency, from its last acknowledged object to its SR acknowledged by the PACS.

In one run, for each completeness rule (the quiet period ``study.stable_after_s``
alone, then ``study.after_release_s``) and each repeat:

1. a fresh ``echonode serve`` (subprocess, CPU, the demo models: trained on
   first use as ``echonode demo`` does, or ``--models DIR``) with its own
   storage, and a PACS: a pynetdicom storage SCP in this process that notes
   when it acknowledges each SR (``--pacs pynetdicom``), or dcmtk's
   ``storescp`` (``--pacs storescp``: the ack time is then the node's
   ``outbox.sent_at``, written when the C-STORE-RSP arrived);
2. wait until the worker is idle with its models loaded (its heartbeat), so
   that start-up is not counted;
3. dcmtk ``storescu`` sends a 5-video synthetic study (480x640, 48 frames:
   PLAX views among them) over one association, then releases it;
4. wait for the SR's outbox row to be ``sent``; read the stages from the
   journal: the last instance recorded (``instances.received``; the C-STORE
   ack follows its commit), the study complete (``studies.stable_at``),
   claimed by the worker (``studies.claimed_at``), the analysis split by the
   worker (``results.detail.timings``: inference waiting on decoding, the
   networks, the rest), the SR recorded (``reports.created``) and
   acknowledged by the PACS (``outbox.sent_at``).

Stages printed (median over ``--repeats``):
``complete`` (waiting for completeness), ``claim`` (the stability pass queues
the study, the worker picks it up), ``decode`` (inference waiting for decoded
videos; decoding runs in threads ahead of inference, its busy time is shown
beside it), ``infer`` (view classifier and task networks), ``analysis_other``
(clips, aggregation), ``sr`` (header, SR build and write, journal commit),
``delivery`` (until the PACS acknowledged), ``total``.

Run::

    .venv/bin/python -m bench.latency [--repeats 2] [--after-release-s 5] [--pacs storescp]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import pydicom

from bench.machine import cpu_flags, cpu_model, load_average
from echonode.config import parse_config, to_toml

REPO = Path(__file__).resolve().parents[1]

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
VIDEOS = 5
STAGES = ("complete", "claim", "decode", "infer", "analysis_other", "sr", "delivery", "total")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- inputs -------------------------------------------------------------------------------


def demo_models(models: Path | None, work: Path) -> Path:
    """The models folder: ``models``, or the demo bundles (trained into ``echonode demo``'s cache on first use)."""
    from echonode.commands.demo import _cache_dir, build_demo_models

    folder = models or _cache_dir()
    if not folder.exists():
        print(f"training the demo models into {folder} (first run only, minutes) ...", flush=True)
        (work / "demo-train").mkdir(parents=True, exist_ok=True)
        build_demo_models(work / "demo-train", folder)
    return folder


def five_video_study(work: Path, seed: int) -> list[Path]:
    """The files of a synthetic study with :data:`VIDEOS` videos (``echonode-train synth``)."""
    archive = work / "archive"
    if not (archive / "videos.csv").exists():
        subprocess.run([sys.executable, "-m", "train", "synth", "--out", str(archive), "--patients", "12",
                        "--seed", str(seed), "--rows", "480", "--cols", "640", "--frames", "48"],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    with (archive / "videos.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    by_study: dict[str, list[Path]] = {}
    for r in rows:
        by_study.setdefault(r["study_uid"], []).append(archive / r["path"])
    for files in by_study.values():
        if len(files) == VIDEOS:
            return files
    raise SystemExit(f"no study with {VIDEOS} videos in {archive}; try another --seed")


# -- the PACS -------------------------------------------------------------------------------


class PynetdicomPACS:
    """A storage SCP that notes when it acknowledges each SR (the handler's return)."""

    def __init__(self) -> None:
        from pynetdicom import (
            AE,
            ALL_TRANSFER_SYNTAXES,
            AllStoragePresentationContexts,
            evt,
        )

        self.acked: dict[str, float] = {}
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is None:  # every context of pynetdicom's list names one
                raise RuntimeError("pynetdicom's AllStoragePresentationContexts has a context without an abstract syntax")
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        if server is None:  # None is the blocking mode's return; block=False returns the running server
            raise RuntimeError("pynetdicom's AE.start_server(block=False) returned no server")
        self.server = server
        self.port = int(server.server_address[1])

    def _on_store(self, event: Any) -> int:
        study = str(event.dataset.StudyInstanceUID)
        with self._lock:
            self.acked[study] = time.time()
        return 0

    def ack_time(self, study_uid: str) -> float | None:
        with self._lock:
            return self.acked.get(study_uid)

    def stop(self) -> None:
        self.server.shutdown()


class StorescpPACS:
    """dcmtk's ``storescp`` as the PACS (ack times from the node's journal)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen([STORESCP, "-aet", "PACS", "-od", str(folder), str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait(lambda: subprocess.run([ECHOSCU, "-aec", "PACS", "127.0.0.1", str(self.port)],
                                    capture_output=True).returncode == 0, 30, "storescp to answer")

    def ack_time(self, study_uid: str) -> float | None:
        return None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# -- the node -------------------------------------------------------------------------------


def wait(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def node_config(work: Path, models: Path, pacs_port: int, args: argparse.Namespace, after_release: bool) -> Any:
    study: dict[str, Any] = {"stable_after_s": args.stable_after_s, "check_interval_s": args.check_interval_s}
    if after_release:
        study["after_release_s"] = args.after_release_s
    return parse_config({
        "node": {"ae_title": "ECHONODE", "host": "127.0.0.1", "port": free_port(), "storage_dir": str(work / "node"),
                 "min_free_disk_mb": 0},
        "study": study,
        "models": {"dir": str(models), "device": "cpu", "threads": args.threads},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        "logging": {"format": "json", "level": "info"},
    })


def journal_row(db: Path, sql: str, params: tuple = ()) -> tuple | None:
    if not db.exists():
        return None
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, params).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        con.close()


def journal_one(db: Path, sql: str, params: tuple = ()) -> tuple:
    """The row ``sql`` selects from the journal ``db``, which must be there.

    Parameters
    ----------
    db : Path
        The node's journal.
    sql : str
        A query that selects one row.
    params : tuple
        The query's parameters.

    Returns
    -------
    tuple
        The row.

    Raises
    ------
    SystemExit
        When the journal is missing, locked, or has no such row.
    """
    row = journal_row(db, sql, params)
    if row is None:
        raise SystemExit(f"no row in the journal {db} for: {sql}")
    return row


#: What ``models.runtime = "auto"`` keeps in the storage folder: its choice per
#: bundle and machine, and the compilers' caches. Carried from run to run, so
#: that each fresh node does not measure every runtime again (minutes on 2
#: cores; start-up is not what is timed).
RUNTIME_STATE = ("runtime-choices.json", "inductor", "openvino")


def keep_runtime_choice(cache: Path, storage: Path, *, restore: bool) -> None:
    """Copy the runtime choice into a fresh node's ``storage`` (``restore``) or out of a ready one."""
    src, dst = (cache, storage) if restore else (storage, cache)
    for name in RUNTIME_STATE:
        if not (src / name).exists():
            continue
        dst.mkdir(parents=True, exist_ok=True)
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, dirs_exist_ok=True)
        else:
            shutil.copy2(src / name, dst / name)


def worker_ready(cfg: Any) -> bool:
    try:
        beat = json.loads((cfg.storage_dir / "worker-heartbeat.json").read_bytes())
        state = json.loads((cfg.storage_dir / "worker-models.json").read_bytes())
    except (OSError, ValueError):
        return False
    return beat.get("phase") == "idle" and bool(state.get("loaded"))


def start_node(cfg: Any, work: Path) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """Start ``echonode serve`` on ``cfg`` (written to ``work/echonode.toml``), its output in ``work/node.log``."""
    conf = work / "echonode.toml"
    conf.write_text(to_toml(cfg))
    log = (work / "node.log").open("wb")
    node = subprocess.Popen([sys.executable, "-m", "echonode", "--config", str(conf), "serve"], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return node, log


def send_study(port: int, files: list[Path]) -> None:
    """Send ``files`` to the node on ``port`` with dcmtk's ``storescu``, one association; exit on failure."""
    sent = subprocess.run([STORESCU, "-aet", "CART", "-aec", "ECHONODE", "-xy", "--max-pdu", "131072", "127.0.0.1",
                           str(port), *map(str, files)], capture_output=True, text=True)
    if sent.returncode != 0:
        raise SystemExit(f"storescu failed: {sent.stderr[-500:]}")


def stop_node(node: subprocess.Popen[bytes]) -> None:
    """Stop an ``echonode serve`` subprocess: SIGTERM, then its whole process group after 60 s."""
    node.send_signal(signal.SIGTERM)
    try:
        node.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait(10)


def one_run(work: Path, models: Path, files: list[Path], args: argparse.Namespace, after_release: bool) -> dict:
    """Start a node and a PACS, send the study, return its stages in seconds."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    keep_runtime_choice(work.parent / "runtime-cache", work / "node", restore=True)
    pacs = StorescpPACS(work / "pacs") if args.pacs == "storescp" else PynetdicomPACS()
    cfg = node_config(work, models, pacs.port, args, after_release)
    node, log = start_node(cfg, work)
    try:
        wait(lambda: worker_ready(cfg), 1800, "the worker idle with its models loaded", 0.2)
        keep_runtime_choice(work.parent / "runtime-cache", work / "node", restore=False)
        send_study(cfg.node.port, files)
        study = journal_one(cfg.journal_path, "SELECT study_uid FROM instances LIMIT 1")[0]
        wait(lambda: journal_row(cfg.journal_path, "SELECT 1 FROM outbox WHERE study_uid = ? AND state = 'sent'",
                                 (study,)), 900, "the SR acknowledged by the PACS")
        return stages(cfg.journal_path, study, pacs.ack_time(study))
    finally:
        stop_node(node)
        log.close()
        pacs.stop()


def stages(db: Path, study: str, pacs_ack: float | None) -> dict:
    """The stages of ``study`` from the journal (and the PACS's own ack time when it has one)."""
    last, stable, claimed = journal_one(
        db, "SELECT (SELECT MAX(received) FROM instances WHERE study_uid = s.study_uid), stable_at, claimed_at"
            " FROM studies s WHERE study_uid = ?", (study,))
    detail = json.loads(journal_one(db, "SELECT detail FROM results WHERE study_uid = ? LIMIT 1", (study,))[0])
    (created,) = journal_one(db, "SELECT created FROM reports WHERE study_uid = ?", (study,))
    (sent,) = journal_one(db, "SELECT MAX(sent_at) FROM outbox WHERE study_uid = ?", (study,))
    t = detail.get("timings", {})
    analysis = float(detail["seconds"])
    acked = pacs_ack if pacs_ack is not None else sent
    return {
        "complete": stable - last,
        "claim": claimed - stable,
        "decode": t.get("decode_wait_s", 0.0),
        "decode_busy": t.get("decode_s", 0.0),
        "infer": t.get("infer_s", 0.0),
        "analysis_other": analysis - t.get("decode_wait_s", 0.0) - t.get("infer_s", 0.0),
        "sr": created - claimed - analysis,
        "delivery": acked - created,
        "total": acked - last,
        "pacs_ack_minus_sent_at": None if pacs_ack is None else pacs_ack - sent,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, help="models folder (default: the demo models, trained on first use)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--stable-after-s", type=float, default=60.0, help="study.stable_after_s (the shipped default)")
    p.add_argument("--check-interval-s", type=float, default=5.0, help="study.check_interval_s (the shipped default)")
    p.add_argument("--after-release-s", type=float, default=5.0, help="study.after_release_s for the second rule")
    p.add_argument("--threads", type=int, default=0, help="models.threads (0: torch decides)")
    p.add_argument("--pacs", choices=("pynetdicom", "storescp"), default="pynetdicom")
    p.add_argument("--seed", type=int, default=3, help="synthetic archive seed")
    p.add_argument("--work", type=Path, help="work folder (default: a temp folder, removed)")
    args = p.parse_args(argv)
    for tool in (STORESCU, ECHOSCU) + ((STORESCP,) if args.pacs == "storescp" else ()):
        if not Path(tool).exists():
            raise SystemExit(f"{tool} is needed (apt-get install dcmtk)")
    work = args.work or Path(tempfile.mkdtemp(prefix="echonode-latency-"))
    models = demo_models(args.models, work)
    files = five_video_study(work, args.seed)
    mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"date: {datetime.now(UTC).isoformat(timespec='seconds')}")
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}; ISA flags: {' '.join(cpu_flags()) or 'n/a'};"
          f" load {load_average()}; python {platform.python_version()}")
    syntaxes = sorted({str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID.name)
                       for f in files})
    print(f"study: {len(files)} videos, {mb:.1f} MB (480x640, 48 frames, {', '.join(syntaxes)}); models: {models}")
    print(f"PACS: {args.pacs}; stable_after_s={args.stable_after_s:g}, check_interval_s={args.check_interval_s:g},"
          f" after_release_s={args.after_release_s:g}, threads={args.threads}\n")
    results: dict[str, list[dict]] = {"quiet period": [], "after release": []}
    for i in range(args.repeats):
        # Alternate the order so that neither rule always runs on a warmer machine.
        order = list(results) if i % 2 == 0 else list(reversed(results))
        for rule in order:
            r = one_run(work / "run", models, files, args, after_release=(rule == "after release"))
            results[rule].append(r)
            print(f"  {rule:13s} run {i + 1}: " + ", ".join(f"{k} {r[k]:.2f}" for k in STAGES), flush=True)
    print("\nseconds, median of", args.repeats, "runs:")
    print(f"{'stage':16s}" + "".join(f"{rule:>16s}" for rule in results))
    for stage in (*STAGES[:3], "decode_busy", *STAGES[3:]):
        print(f"{stage:16s}" + "".join(f"{statistics.median(r[stage] for r in runs):16.2f}"
                                       for runs in results.values()))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
