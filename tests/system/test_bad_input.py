"""Malformed objects (tests/corpus.py) through the receive path and the worker.

Each object gets a C-STORE failure status or is stored and then skipped by
the worker with a reason; the node answers C-ECHO afterwards, the worker
never dies or times out, its memory stays bounded, and no temporary or
half-written file is left anywhere under the storage folder.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from echonode.daemon.node import Node
from echonode.delivery.dimse import Peer, echo
from echonode.report.read import summarise_report
from echonode.studies.states import StudyState
from tests.conftest import REPO, make_config, wait_for
from tests.corpus import REFUSED, SKIPPED, Bad, corpus, good_object, part10
from tests.factories import tiny_bundle
from tests.peers import send_files

#: Statuses a malformed object may get: success (then the worker judges it)
#: or "cannot understand" and its refinements. 0xC211 (an exception in the
#: handler) and 0xA700 (out of resources: the sender would retry for ever)
#: are bugs here.
ACCEPTABLE = {0x0000, 0xC210, 0xC220, 0xC221, 0xA900}

#: Peak resident memory allowed to the worker process on the whole corpus.
WORKER_MAX_RSS_MB = 2048


@pytest.fixture(scope="module")
def bad() -> list[Bad]:
    return corpus()


def leftovers(storage: Path) -> list[Path]:
    """Temporary or half-written files anywhere under the storage folder."""
    out = [p for p in (storage / "incoming").iterdir()]
    out += [p for p in storage.rglob("*") if p.is_file() and (p.suffix in (".part", ".tmp") or p.name.startswith("t-"))]
    return out


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


_DECODE_ALL = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
resource.setrlimit(resource.RLIMIT_AS, (__LIMIT__, __LIMIT__))
from pydicom import config
config.settings.reading_validation_mode = config.IGNORE
from echonode.analyse.decode import UnusableObject, decode_video
from echonode.analyse.preprocess import PreprocessConfig, preprocess_video
cfg = PreprocessConfig(size=32, clip_frames=8)
out = {}
for path in sys.argv[1:]:
    t0 = time.monotonic()
    try:
        v = decode_video(path, target_side=cfg.size, max_frames=cfg.max_frames, threads=1)
        preprocess_video(v, cfg)
        result = "usable"
    except UnusableObject as exc:
        result = "unusable: " + exc.reason
    except Exception as exc:
        result = "CRASH " + type(exc).__name__ + ": " + str(exc)[:200]
    out[path] = {"result": result, "seconds": round(time.monotonic() - t0, 3)}
print(json.dumps(out))
"""


def test_decode_and_preprocess_each_object_within_limits(tmp_path: Path, bad: list[Bad]) -> None:
    """Every object through decode + preprocess in a process capped at 3 GiB of address space."""
    # The deflate bomb is refused on receive (see the next test); inflating it
    # here only shows that 3 GiB of zeros do not fit in 3 GiB (MemoryError, as
    # an UnusableObject) after 13 s of work.
    paths = [b.write(tmp_path) for b in bad if b.name != "deflate_bomb"]
    limit = 3 * 2**30
    proc = subprocess.run(
        [sys.executable, "-c", _DECODE_ALL.replace("__LIMIT__", str(limit)), *map(str, paths)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    for p, r in results.items():
        print(f"{Path(p).stem:28s} {r['seconds']:7.3f}s  {r['result']}")
    by_name = {Path(p).stem: r for p, r in results.items()}
    for b in bad:
        if b.name not in by_name:
            continue
        r = by_name[b.name]["result"]
        assert not r.startswith("CRASH"), (b.name, r)
        # (REFUSED objects never reach the worker; a lenient decode of them is fine.)
        if b.expect == SKIPPED:
            assert r.startswith("unusable: ") and len(r) > len("unusable: "), (b.name, r)
        # Not an assertion on speed: a generous bound that only a hang would break.
        assert by_name[b.name]["seconds"] < 60, (b.name, by_name[b.name])


def test_node_and_worker_survive_the_corpus(tmp_path: Path, bad: list[Bad]) -> None:
    """The whole corpus, one study per object, plus one good study, through a running node."""
    # The kinds of damage a cart or a broken disk produces, each sent to the node below.
    assert {b.name for b in bad} >= {
        "truncated_in_pixels", "wrong_length_date", "bad_vr_rows", "huge_rows_cols", "huge_frames",
        "missing_pixel_data", "short_pixel_data", "jpeg_garbage", "photometric_rgb_1_sample",
        "deflate_bomb", "jpeg_sof_bomb", "rle_bomb"}
    cfg = make_config(tmp_path, study={"stable_after_s": 0.5, "check_interval_s": 0.2},
                      models={"study_timeout_s": 120.0, "max_attempts": 2})
    tiny_bundle(cfg.models_dir, "lvh", seed=1)
    good = good_object(seed=3)
    good_path = tmp_path / "good.dcm"
    good_path.write_bytes(part10(good))
    files = [b.write(tmp_path / "corpus") for b in bad]
    node = Node(cfg)
    node.start()
    try:
        statuses = send_files(node.scp.port, [*files, good_path])
        by_name = dict(zip([b.name for b in bad] + ["good"], statuses, strict=True))
        assert by_name["good"] == 0
        for b in bad:
            s = by_name[b.name]
            assert s in ACCEPTABLE, f"{b.name}: status 0x{s:04X}"
            if b.expect == REFUSED:
                assert s != 0, f"{b.name} was stored"
            if b.expect == SKIPPED:
                assert s == 0, f"{b.name} was refused with 0x{s:04X}"
        # The receive side answers while the worker chews on the corpus.
        assert echo("CART", Peer("ECHONODE", "127.0.0.1", node.scp.port), timeout_s=10) == 0

        stored = {b.study_uid: b for b in bad if by_name[b.name] == 0}
        settled = {StudyState.SKIPPED, StudyState.FAILED, StudyState.DELIVERED}
        worker_pid = node.worker.process.pid
        peak = [0.0]

        def all_settled() -> bool:
            node.worker.supervise()
            if node.worker.process.pid == worker_pid:
                peak[0] = max(peak[0], peak_rss_mb(worker_pid))
            states = {uid: node.journal.study_state(uid) for uid in [*stored, str(good.StudyInstanceUID)]}
            return all(s in settled for s in states.values())

        wait_for(all_settled, timeout=240, interval=0.2, what="every corpus study to be skipped or delivered")
        assert node.worker.restarts == 0, "the worker died or was killed for a timeout"
        assert node.worker.process.pid == worker_pid
        print(f"worker peak RSS {peak[0]:.0f} MiB; statuses {by_name}")
        assert peak[0] < WORKER_MAX_RSS_MB, f"worker peak RSS {peak[0]:.0f} MiB"
        assert node.journal.study_state(str(good.StudyInstanceUID)) == StudyState.DELIVERED
        for uid, b in stored.items():
            st = node.journal.study(uid)
            if b.expect == SKIPPED:
                # Nothing usable: by default (sr.report_skipped) an SR says so, each finding
                # Undetermined with the coded reason; no destination here, so delivered.
                assert st["state"] == StudyState.DELIVERED, (b.name, st["state"], st["reason"])
                summary = summarise_report(node.journal.latest_report(uid).path)
                assert [(f["task"], f["evaluation"], f["not_assessed_reason"]) for f in summary["findings"]] == [
                    ("lvh", "Undetermined", "no_usable_video")], b.name
                assert summary["no_usable_video_reason"].startswith("no usable video"), b.name
            if st["state"] != StudyState.DELIVERED:
                assert st["reason"], f"{b.name}: {st['state']} without a reason"
        assert echo("CART", Peer("ECHONODE", "127.0.0.1", node.scp.port), timeout_s=10) == 0
        assert leftovers(cfg.storage_dir) == []
        # Every stored file is in the journal and nothing refused is on disk.
        on_disk = {str(p) for p in node.store.studies.rglob("*.dcm")}
        assert on_disk == {r.path for r in node.journal.instances()}
        refused = {b.study_uid for b in bad if by_name[b.name] != 0}
        assert not [p for p in on_disk if any(u in p for u in refused)]
    finally:
        node.stop()


def test_no_half_written_file_after_a_kill_during_a_bomb(tmp_path: Path, bad: list[Bad]) -> None:
    """kill -9 while the node inflates/decodes the worst objects: nothing half-written survives a restart."""
    import threading

    from echonode.config import to_toml
    from tests.conftest import echonode_cmd

    cfg = make_config(tmp_path)
    cfg_path = tmp_path / "echonode.toml"
    cfg_path.write_text(to_toml(cfg))
    worst = [b for b in bad if b.name in ("deflate_bomb", "jpeg_sof_bomb", "pixel_length_past_end")]
    files = [b.write(tmp_path / "worst") for b in worst]
    proc = subprocess.Popen(echonode_cmd("--config", str(cfg_path), "serve"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def up() -> bool:
            try:
                return echo("CART", Peer("ECHONODE", "127.0.0.1", cfg.node.port), timeout_s=2) == 0
            except Exception:  # noqa: BLE001 - not listening yet
                return False

        wait_for(up, timeout=60, what="node to listen")
        t = threading.Thread(target=lambda: _swallow(send_files, cfg.node.port, files), daemon=True)
        t.start()
        time.sleep(0.5)  # mid-transfer or mid-check
        proc.kill()
        proc.wait(10)
        t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    node = Node(cfg, start_worker=False)
    node.start()
    try:
        assert leftovers(cfg.storage_dir) == []
        on_disk = {str(p) for p in node.store.studies.rglob("*.dcm")}
        assert on_disk == {r.path for r in node.journal.instances()}
    finally:
        node.stop()


def _swallow(fn, *args) -> None:
    with contextlib.suppress(Exception):  # the node was killed under it
        fn(*args)
