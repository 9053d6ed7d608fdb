"""``echonode demo``: the whole loop on embedded defaults, in one command.

1. A demo model: trained on first use from a synthetic archive with
   ``echonode-train`` (synth, index, finetune ``--preset tiny``), cached in
   ``~/.cache/echonode/demo-models``. It is marked *not clinical*: it has
   seen only synthetic hearts.
2. A node on a free port with local storage, SQLite and the CPU, whose SR
   destination is a small PACS stand-in (a pynetdicom storage SCP) in this
   process.
3. Two studies sent over DICOM: the real SonoSite cardiac loop from
   ``pydicom-data`` (labelled "PLA" on screen by the cart, though its
   picture reads more like an apical view) and a synthetic study.
4. The SRs that come back, printed as a person reads them.

``train`` is run as a separate program (``python -m train``) because the
node's package never imports the training package.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from echonode.durable import publish_folder

DEMO_MODELS_VERSION = "v3"
# Severe AS is left out: the demo archive holds about two positive studies,
# too few for fine-tuning to train and validate on (it refuses such splits).
DEMO_TASKS = ("view", "lvh")


def _say(text: str) -> None:
    print(text, flush=True)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "echonode" / f"demo-models-{DEMO_MODELS_VERSION}"


def _train(args: list[str], log: Path) -> None:
    cmd = [sys.executable, "-m", "train", *args]
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        res = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise RuntimeError(f"'{' '.join(args[:1])}' failed; see {log}")


def build_demo_models(work: Path, models: Path) -> None:
    """Train the demo bundles (a few minutes on 2 CPU cores) and install them in ``models``."""
    log = work / "train.log"
    archive, cache = work / "archive", work / "cache"
    _say(f"  synthetic archive ...            (log: {log})")
    _train(["synth", "--out", str(archive), "--patients", "24", "--seed", "7", "--rows", "240", "--cols", "320",
            "--frames", "40"], log)
    _say("  clip cache ...")
    _train(["index", str(archive), "--out", str(cache), "--preset", "tiny", "--no-progress"], log)
    staging = models.with_name(models.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for task in DEMO_TASKS:
        _say(f"  fine-tuning {task} (--preset tiny) ...")
        out = work / f"bundle-{task}"
        _train(["finetune", "--data", str(cache), "--labels", str(archive / "labels.csv"), "--task", task,
                "--out", str(out), "--preset", "tiny", "--init", "random", "--epochs", "6",
                "--name", f"echonode-demo-{task}", "--version", f"demo-{DEMO_MODELS_VERSION}", "--no-progress"], log)
        _train(["promote", str(out), "--models-dir", str(staging)], log)
    publish_folder(staging, models)


class _DemoPACS:
    """A stand-in PACS: a storage SCP that keeps what it receives."""

    def __init__(self, folder: Path) -> None:
        from pynetdicom import (
            AE,
            ALL_TRANSFER_SYNTAXES,
            AllStoragePresentationContexts,
            evt,
        )

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.received: list[Path] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="DEMOPACS")
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None  # every context of pynetdicom's list names one
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        assert server is not None  # block=False returns the running server
        self.server = server
        self.port = int(self.server.server_address[1])

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = self.folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        with self._lock:
            self.received.append(path)
        return 0

    def stop(self) -> None:
        self.server.shutdown()


def _send(port: int, files: list[Path]) -> None:
    """C-STORE files to the node as a cart would (dcmtk's storescu when installed)."""
    if Path("/usr/bin/storescu").exists():
        cmd = ["/usr/bin/storescu", "-aet", "DEMOCART", "-aec", "ECHONODE", "-xy", "--max-pdu", "131072",
               "127.0.0.1", str(port), *map(str, files)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"storescu failed: {res.stderr.strip()[:300]}")
        return
    import pydicom
    from pynetdicom import AE

    ae = AE(ae_title="DEMOCART")
    datasets = [pydicom.dcmread(f) for f in files]
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="ECHONODE")
    if not assoc.is_established:
        raise RuntimeError("could not associate with the node")
    for ds in datasets:
        assoc.send_c_store(ds)
    assoc.release()


def describe_report(path: Path) -> str:
    """The SR at ``path`` as lines a person reads: its plain-language lines, then the details."""
    import pydicom

    from echonode.report.read import summarise_report

    ds = pydicom.dcmread(path)
    s = summarise_report(ds)
    lines = [
        f"Structured Report {s['sop_uid']}",
        f"  study            {s['study_uid']}",
        f"  series           {s['series_description']}",
    ]
    lines += [f"  {line}" for line in s["summary_lines"]]
    if s["no_usable_video_reason"]:
        lines.append(f"  no result: {s['no_usable_video_reason']}")
    for f in s["findings"]:
        name = f.get("finding") or f["task"]
        if f.get("severity"):
            name = f"{f['severity'].lower()} {name.lower()}"
        model = f"      model {f.get('model_name')} {f.get('model_version')}"
        if f.get("probability") is None:
            reason = (f.get("not_assessed_reason") or "unknown").replace("_", " ")
            lines.append(f"  {name:<34} {'NOT ASSESSED':<12} ({reason})")
            lines.append(model)
            continue
        verdict = "PRESENT" if f.get("present") else "absent"
        lines.append(
            f"  {name:<34} {verdict:<12} probability {f['probability']:.3f}"
            f" (threshold {f.get('threshold', 0.5):g})"
        )
        lines.append(f"{model}; {f.get('n_videos')} video(s) used; "
                     f"views {', '.join(f.get('views_used') or []) or 'not classified'}")
    lines.append(f"  evidence         {len(s['evidence'])} source instance(s) referenced")
    return "\n".join(lines)


def _study_files(archive: Path) -> list[Path]:
    import csv

    with (archive / "videos.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    first = rows[0]["study_uid"]
    return [archive / r["path"] for r in rows if r["study_uid"] == first]


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; 0 when both SRs came back."""
    from pydicom.data import get_testdata_file

    from echonode.config import parse_config
    from echonode.daemon.node import Node
    from echonode.ops.logs import configure_logging

    sonosite = get_testdata_file("color3d_jpeg_baseline.dcm", download=False)
    if sonosite is None:
        print("echonode demo: the real echo loop comes from the 'pydicom-data' package: pip install pydicom-data",
              file=sys.stderr)
        return 2
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="echonode-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    _say("echonode demo - NOT FOR DIAGNOSTIC USE: the demo model has only seen synthetic hearts.\n")

    models = Path(args.models) if args.models else _cache_dir()
    if not models.exists():
        _say(f"[1/4] training the demo model (first run only; cached in {models})")
        build_demo_models(work, models)
    else:
        _say(f"[1/4] demo model: {models}")

    _say("[2/4] a synthetic study to send beside the real loop")
    synth_dir = work / "synthetic-study"
    if not (synth_dir / "videos.csv").exists():
        _train(["synth", "--out", str(synth_dir), "--patients", "1", "--seed", "2026", "--rows", "480",
                "--cols", "640", "--frames", "48"], work / "train.log")
    synthetic = _study_files(synth_dir)

    pacs = _DemoPACS(work / "pacs")
    port = _free_port()
    cfg = parse_config(
        {
            "node": {"ae_title": "ECHONODE", "host": "127.0.0.1", "port": port,
                     "storage_dir": str(work / "node"), "min_free_disk_mb": 0},
            "study": {"stable_after_s": 3.0, "check_interval_s": 0.5},
            "models": {"dir": str(models), "device": "cpu"},
            "delivery": {"retry_initial_s": 1.0, "check_interval_s": 0.5},
            "destinations": [{"name": "demo-pacs", "ae_title": "DEMOPACS", "host": "127.0.0.1", "port": pacs.port}],
            "logging": {"format": "json", "level": "info"},
        },
        source="<demo>",
    )
    log_path = work / "node.log"
    log_file = log_path.open("a")
    configure_logging("json", "info", stream=log_file)
    node = Node(cfg, worker_log_path=str(log_path))
    node.start()
    try:
        _say(f"[3/4] node ECHONODE listening on 127.0.0.1:{port} (log: {log_path}); sending over DICOM:")
        _say(f"      - the real SonoSite cardiac loop labelled 'PLA' by the cart ({Path(sonosite).name}, 120 frames, "
             "JPEG baseline)")
        _say(f"      - a synthetic study ({len(synthetic)} videos: PLAX, PSAX, A4C)")
        _send(port, [Path(sonosite), *synthetic])
        _say("      waiting for the study to be complete, classified and reported ...")
        deadline = time.monotonic() + 600
        while len(pacs.received) < 2 and time.monotonic() < deadline:
            node.worker.supervise()
            time.sleep(0.5)
        if len(pacs.received) < 2:
            _say(f"echonode demo: only {len(pacs.received)} of 2 SRs came back; see {log_path} and `echonode status`")
            return 1
        _say(f"[4/4] {len(pacs.received)} SRs received by the demo PACS ({pacs.folder}):\n")
        for path in sorted(pacs.received):
            _say(describe_report(path) + "\n")
        _say(f"done in {time.monotonic() - t0:.0f} s. Node storage: {work / 'node'}")
        return 0
    finally:
        node.stop()
        pacs.stop()
        log_file.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
