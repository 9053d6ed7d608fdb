"""``echonode demo``: the whole loop on embedded defaults, in one command.

1. Demo models (view and LVH): trained on first use from synthetic archives
   with ``echonode-train`` (:mod:`echonode.commands.demo_models`), cached in
   ``~/.cache/echonode/demo-models-<version>``. They are marked *not
   clinical*: they have seen only synthetic hearts.
2. Two synthetic studies from a held-out archive no model was trained on,
   picked by their true anatomy (:mod:`echonode.commands.demo_studies`): a
   clear LVH study and a clear normal one.
3. A node on a free port with local storage, SQLite and the CPU, whose SR
   destination is a small PACS stand-in (a pynetdicom storage SCP) in this
   process; the two studies and the real SonoSite cardiac loop from
   ``pydicom-data`` (labelled "PLA" on screen by the cart, though its
   picture reads more like an apical view) sent to it over DICOM.
4. The SRs that come back, each printed beside the study's true
   measurements, with what the LVH model was expected to say and whether it
   did; for the real loop, what the view model says of it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

from echonode.bundles.installed import installed_bundles
from echonode.commands.demo_models import (
    DEMO_MODELS_VERSION,
    DEMO_TASKS,
    build_demo_models,
    run_train,
    start_train,
)
from echonode.commands.demo_studies import (
    HELDOUT_PATIENTS,
    HELDOUT_SEED,
    DemoStudy,
    lvh_verdict,
    pick_demo_studies,
    read_truth,
)
from echonode.config import parse_config
from echonode.daemon.node import Node
from echonode.ops.logs import configure_logging
from echonode.report.read import summarise_report

__all__ = ["DEMO_MODELS_VERSION", "DEMO_TASKS", "describe_report", "run_demo"]


# The demo's networks are tiny: measuring which runtime is fastest (the
# default, "auto") would cost more than all their inference.
_RUNTIME = "eager"


def _say(text: str) -> None:
    print(text, flush=True)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "echonode" / f"demo-models-{DEMO_MODELS_VERSION}"


class _DemoPACS:
    """A stand-in PACS: a storage SCP that keeps what it receives."""

    def __init__(self, folder: Path) -> None:
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


def _study_files(archive: Path, study_uid: str) -> list[Path]:
    """The video files of one study of a synthetic archive (its ``videos.csv``)."""
    with (archive / "videos.csv").open(newline="") as fh:
        return [archive / r["path"] for r in csv.DictReader(fh) if r["study_uid"] == study_uid]


def _heldout_command(out: Path) -> list[str]:
    """``synth`` of the held-out studies: at the size of a cart's loop, unlike the training archives."""
    return ["synth", "--out", str(out), "--patients", str(HELDOUT_PATIENTS), "--seed", str(HELDOUT_SEED),
            "--rows", "480", "--cols", "640", "--frames", "48"]


def _installed_tasks(models: Path) -> dict[str, dict[str, Any]]:
    """``bundle.json`` of each installed bundle, by task."""
    metas = (json.loads((b / "bundle.json").read_text()) for b in installed_bundles(models))
    return {m["task"]: m for m in metas if m.get("task")}


def _test_figure(meta: dict[str, Any]) -> str:
    """What fine-tuning measured on the bundle's own test split: study AUROC (binary task) or video accuracy (view)."""
    test = (meta.get("metrics") or {}).get("test") or {}
    auroc = (test.get("study") or {}).get("auroc")
    if isinstance(auroc, dict) and isinstance(auroc.get("estimate"), (int, float)):
        return (f"test AUROC {auroc['estimate']:.2f} [{auroc['low']:.2f}, {auroc['high']:.2f}] "
                f"on {test.get('n_studies')} studies of its archive's test split")
    video = test.get("video") or {}
    if isinstance(video.get("accuracy"), (int, float)):
        return f"test accuracy {video['accuracy']:.2f} on {video.get('n')} videos of its archive's test split"
    return "no test figure"


def _view_of(path: Path, models: Path, work: Path) -> str:
    """What the view model says of the video at ``path``: ``"LABEL (p)"``, or why there is no answer.

    The SR names the views of the videos it used, not the view model's
    probability; ``echonode infer`` (a separate process: it loads torch)
    reports both.
    """
    if "view" not in _installed_tasks(models):
        return "no view model installed"
    config = work / "infer.toml"
    config.write_text(f'[models]\ndevice = "cpu"\nruntime = "{_RUNTIME}"\n')
    cmd = [sys.executable, "-m", "echonode", "--config", str(config), "infer", str(path), "--models", str(models),
           "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    with (work / "infer.log").open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n" + res.stderr)
    try:
        video = json.loads(res.stdout)["studies"][0]["videos"][0]
    except (ValueError, KeyError, IndexError):
        return f"no answer (echonode infer exit {res.returncode}; see {work / 'infer.log'})"
    if video.get("view") is None:
        return f"no answer ({video.get('reason') or 'video not usable'})"
    return f"{video['view']} ({video['view_probability']:.2f})"


def _lvh_probability(sr: Path) -> float | None:
    """The LVH probability an SR reports (None when LVH was not assessed)."""
    for f in summarise_report(sr)["findings"]:
        if f["task"] == "lvh":
            return None if f.get("probability") is None else float(f["probability"])
    return None


def _sr_by_study(paths: list[Path]) -> dict[str, Path]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID): p for p in paths}


def _heldout_studies(work: Path, proc: subprocess.Popen[bytes] | None) -> tuple[Path, DemoStudy, DemoStudy]:
    """The held-out archive (waiting for its ``synth`` when one runs) and the two studies picked from it."""
    archive = work / "heldout"
    if proc is not None and proc.wait() != 0:
        raise RuntimeError(f"'echonode-train synth' of the held-out studies failed; see {work / 'train.log'}")
    if not (archive / "labels.csv").exists():
        run_train(_heldout_command(archive), work / "train.log")
    lvh, normal = pick_demo_studies(read_truth(archive / "labels.csv"))
    return archive, lvh, normal


def _print_results(received: list[Path], sonosite: Path, lvh: DemoStudy, normal: DemoStudy,
                   models: Path, work: Path) -> list[tuple[bool, str]]:
    """Each SR beside the study's truth; returns the LVH verdict of each synthetic study."""
    by_study = _sr_by_study(received)
    verdicts = []
    for title, study in (("held-out synthetic study WITH LVH", lvh), ("held-out synthetic NORMAL study", normal)):
        _say(f"=== {title} (accession {study.accession})")
        _say(f"  truth            {study.truth_line()}")
        sr = by_study.get(study.study_uid)
        if sr is None:
            _say("  no SR came back for this study\n")
            verdicts.append((False, "no SR"))
            continue
        _say(describe_report(sr))
        verdicts.append(lvh_verdict(study, _lvh_probability(sr)))
        _say(f"  demo check       {verdicts[-1][1]}\n")
    _say("=== the real SonoSite loop (labelled 'PLA' by the cart; no true measurements known)")
    _say(f"  the view model says: {_view_of(sonosite, models, work)}")
    for path in received:
        if path not in (by_study.get(lvh.study_uid), by_study.get(normal.study_uid)):
            _say(describe_report(path))
    _say("")
    return verdicts


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every SR came back (whatever the model said: that is reported, not hidden)."""
    found = get_testdata_file("color3d_jpeg_baseline.dcm", download=False)
    if found is None:
        print("echonode demo: the real echo loop comes from the 'pydicom-data' package: pip install pydicom-data",
              file=sys.stderr)
        return 2
    sonosite = Path(str(found))
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="echonode-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    _say("echonode demo - NOT FOR DIAGNOSTIC USE: the demo models have only seen synthetic hearts.\n")
    # The held-out studies render while the models train (both take minutes the first time).
    heldout = None
    if not (work / "heldout" / "labels.csv").exists():
        heldout = start_train(_heldout_command(work / "heldout"), work / "train.log")
    models = Path(args.models) if args.models else _cache_dir()
    if not models.exists():
        _say(f"[1/4] training the demo models (first run only; cached in {models})")
        build_demo_models(work, models, say=_say)
    else:
        _say(f"[1/4] demo models: {models}")
    for task, meta in sorted(_installed_tasks(models).items()):
        _say(f"      {task:<5} {meta.get('name')} {meta.get('version')}: {_test_figure(meta)}")
    archive, lvh, normal = _heldout_studies(work, heldout)
    _say(f"[2/4] two synthetic studies from a held-out set (seed {HELDOUT_SEED}; no demo model was trained, "
         "validated or tested on it),")
    _say("      picked by their TRUE anatomy, not by what the model says of them:")
    _say(f"      - with LVH: thicker wall {lvh.thicker_wall_cm:.2f} cm (the clearest at or above 1.7 cm)")
    _say(f"      - normal:   thicker wall {normal.thicker_wall_cm:.2f} cm (the clearest at or under 1.0 cm)")
    files = [sonosite, *_study_files(archive, lvh.study_uid), *_study_files(archive, normal.study_uid)]
    received = _run_node(work, models, files, expected=3)
    if received is None:
        return 1
    _say(f"[4/4] {len(received)} SRs received by the demo PACS ({work / 'pacs'}):\n")
    verdicts = _print_results(received, sonosite, lvh, normal, models, work)
    met = sum(ok for ok, _ in verdicts)
    if met == len(verdicts):
        _say("The LVH model called both held-out studies as expected (p >= 0.8 with LVH, p <= 0.2 without).")
    else:
        _say(f"The LVH model did NOT do what the demo expects on {len(verdicts) - met} of {len(verdicts)} "
             "held-out studies (see 'demo check' above): a model trained in minutes on synthetic hearts.")
    _say(f"done in {time.monotonic() - t0:.0f} s. Node storage: {work / 'node'}")
    return 0


def _run_node(work: Path, models: Path, files: list[Path], expected: int) -> list[Path] | None:
    """Start a node and a PACS, send ``files``, and return the SRs the PACS received (None: too few came)."""
    pacs = _DemoPACS(work / "pacs")
    port = _free_port()
    cfg = parse_config(
        {
            "node": {"ae_title": "ECHONODE", "host": "127.0.0.1", "port": port,
                     "storage_dir": str(work / "node"), "min_free_disk_mb": 0},
            "study": {"stable_after_s": 3.0, "check_interval_s": 0.5},
            "models": {"dir": str(models), "device": "cpu", "runtime": _RUNTIME},
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
        _say(f"      - the real SonoSite cardiac loop labelled 'PLA' by the cart ({files[0].name}, 120 frames, "
             "JPEG baseline)")
        _say(f"      - the two synthetic studies ({len(files) - 1} videos: PLAX, PSAX, A4C)")
        _send(port, files)
        _say("      waiting for the studies to be complete, classified and reported ...")
        deadline = time.monotonic() + 600
        while len(pacs.received) < expected and time.monotonic() < deadline:
            if node.worker is not None:  # started with the node
                node.worker.supervise()
            time.sleep(0.5)
        if len(pacs.received) < expected:
            _say(f"echonode demo: only {len(pacs.received)} of {expected} SRs came back; see {log_path} "
                 "and `echonode status`")
            return None
        return sorted(pacs.received)
    finally:
        node.stop()
        pacs.stop()
        log_file.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
