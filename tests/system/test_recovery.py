"""Crash and stop behaviour of ``echonode serve`` as a real process.

The node runs as a subprocess (``python -m echonode --config CFG serve``) and
is killed with SIGKILL at the awkward moments: in the middle of a large
transfer (while its temp file in ``incoming/`` grows), right after an
acknowledgement, and while idle with complete (``stable``) studies. After a
restart every acknowledged object must be in the journal and on disk with
its pixel data byte for byte, ``incoming/`` must be empty, nothing partial
may sit under ``studies/``, and the sender must be able to send the
interrupted object again. A SIGTERM with an association open must let the
association finish and exit 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import UltrasoundMultiFrameImageStorage, Verification  # type: ignore[attr-defined]

from echonode.config import Config, to_toml
from echonode.studies.journal import Journal
from echonode.studies.states import StudyState
from echonode.studies.store import read_header
from tests.conftest import REPO, echonode_cmd, make_config, wait_for
from tests.factories import tiny_bundle, us_multiframe

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

#: About 61 MB of pixel data: long enough on the wire to catch its temp file growing.
LARGE_FRAMES, LARGE_ROWS, LARGE_COLS = 200, 480, 640


class Serve:
    """``echonode serve`` as a subprocess in its own session (so that a test can
    reap the worker a SIGKILLed node leaves behind)."""

    def __init__(self, tmp_path: Path, cfg: Config) -> None:
        self.cfg = cfg
        self.tmp_path = tmp_path
        self.config_path = tmp_path / "echonode.toml"
        self.config_path.write_text(to_toml(cfg))
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def storage(self) -> Path:
        return self.cfg.storage_dir

    @property
    def port(self) -> int:
        return self.cfg.node.port

    def start(self) -> Serve:
        self.starts += 1
        log = open(self.tmp_path / f"serve-{self.starts}.log", "wb")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(
            echonode_cmd("--config", str(self.config_path), "serve"),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_for(self._answers_echo, timeout=60, interval=0.05, what="the node to answer C-ECHO")
        return self

    def _answers_echo(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"echonode serve exited with {self.proc.returncode}:\n{self.log_text()}")
        ae = scu()
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.cfg.node.ae_title)
        if not assoc.is_established:
            return False
        ok = int(assoc.send_c_echo().Status) == 0
        assoc.release()
        return ok

    def kill(self) -> None:
        """SIGKILL the node process (only it, as ``kill -9 PID`` would), then reap its children."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._reap_group()

    def _reap_group(self) -> None:
        # The worker and multiprocessing's resource tracker survive their
        # parent's SIGKILL (under systemd the unit's cgroup is killed).
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(10)
            self._reap_group()

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.tmp_path.glob("serve-*.log")))

    def journal(self) -> Journal:
        return Journal(self.cfg.journal_path)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    cfg = make_config(tmp_path, logging={"format": "json", "level": "info"})
    s = Serve(tmp_path, cfg)
    try:
        yield s
    finally:
        s.close()


def scu(ae_title: str = "CART", timeout: float = 20) -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.maximum_pdu_size = 131072
    return ae


def associate(s: Serve, timeout: float = 20):
    ae = scu(timeout=timeout)
    ae.add_requested_context(UltrasoundMultiFrameImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", s.port, ae_title=s.cfg.node.ae_title, max_pdu=131072)
    assert assoc.is_established
    return assoc


def send(s: Serve, datasets) -> list[int]:
    """Send over one association; the statuses (-1 where none came back)."""
    assoc = associate(s)
    try:
        return [_status(assoc.send_c_store(ds)) for ds in datasets]
    finally:
        if assoc.is_established:
            assoc.release()


def _status(rsp) -> int:
    return int(rsp.Status) if "Status" in rsp else -1


def small_objects(n: int, study_uid: str | None = None, seed: int = 0) -> list[pydicom.Dataset]:
    study = study_uid or pydicom.uid.generate_uid()
    return [us_multiframe(study_uid=study, frames=8, rows=64, cols=64, seed=seed + i) for i in range(n)]


def large_object() -> pydicom.Dataset:
    return us_multiframe(frames=LARGE_FRAMES, rows=LARGE_ROWS, cols=LARGE_COLS, seed=99)


def assert_consistent(s: Serve, acknowledged: list[pydicom.Dataset], absent: list[pydicom.Dataset] = (),
                      maybe: list[pydicom.Dataset] = ()) -> None:
    """The store after a restart: acknowledged objects whole, nothing else, nothing partial.

    ``maybe``: sent but not acknowledged to the sender (the node may have
    stored one and died before its response left); if stored, it is whole.
    """
    assert sorted(p.name for p in (s.storage / "incoming").iterdir()) == [], "incoming/ not emptied"
    journal = s.journal()
    recorded = {r.sop_uid: r for r in journal.instances()}
    on_disk = sorted((s.storage / "studies").glob("**/*"))
    files = [p for p in on_disk if p.is_file()]
    optional = {str(ds.SOPInstanceUID): ds for ds in maybe}
    assert sorted(set(recorded) - set(optional)) == sorted(str(ds.SOPInstanceUID) for ds in acknowledged)
    assert sorted(str(p) for p in files) == sorted(r.path for r in recorded.values()), "stray or missing files"
    for ds in [*acknowledged, *(optional[u] for u in recorded if u in optional)]:
        rec = recorded[str(ds.SOPInstanceUID)]
        path = Path(rec.path)
        assert rec.size == path.stat().st_size
        assert read_header(path).study_uid == str(ds.StudyInstanceUID)  # parses, not truncated
        assert pydicom.dcmread(path).PixelData == ds.PixelData
    for ds in absent:
        assert str(ds.SOPInstanceUID) not in recorded
        assert not list((s.storage / "studies").glob(f"**/{ds.SOPInstanceUID}*"))
    journal.close()


def _incoming_size(s: Serve) -> int:
    sizes = []
    with contextlib.suppress(FileNotFoundError):
        for p in (s.storage / "incoming").iterdir():
            with contextlib.suppress(FileNotFoundError):
                sizes.append(p.stat().st_size)
    return max(sizes, default=0)


# -- kill -9 -----------------------------------------------------------------------------


def test_kill_during_large_transfer_then_resend(serve: Serve) -> None:
    s = serve.start()
    acked = small_objects(3)
    assert send(s, acked) == [0, 0, 0]
    big = large_object()
    total = len(big.PixelData)

    statuses: list[int] = []
    sender = threading.Thread(target=lambda: statuses.extend(_send_quietly(s, [big])), daemon=True)
    sender.start()
    # Kill while the temp file grows: past 4 MB, well before the end.
    seen = wait_for(lambda: (n := _incoming_size(s)) > 4_000_000 and n, timeout=30, interval=0.002,
                    what="the large object's temp file to grow")
    s.kill()
    sender.join(30)
    assert not sender.is_alive()
    assert seen < total, "the transfer finished before the kill: the test did not test anything"
    assert statuses != [0], "an interrupted transfer must not be acknowledged"
    # The half-written temp file is still there until the next start.
    assert list((s.storage / "incoming").iterdir())

    s.start()
    assert_consistent(s, acked, absent=[big])
    # The sender still has it and sends it again.
    assert send(s, [big]) == [0]
    assert_consistent(s, [*acked, big])


def _send_quietly(s: Serve, datasets) -> list[int]:
    try:
        return send(s, datasets)
    except Exception:  # noqa: BLE001 - the peer dies mid-transfer on purpose
        return [-1]


def test_kill_right_after_acknowledgement(serve: Serve) -> None:
    s = serve.start()
    objs = small_objects(4, seed=10)
    assoc = associate(s)
    statuses = [_status(assoc.send_c_store(ds)) for ds in objs[:2]]
    assert statuses == [0, 0]
    s.kill()  # the association is still open; the third object was never sent
    assoc.abort()

    s.start()
    assert_consistent(s, objs[:2], absent=objs[2:])
    # The sender retries the whole batch: the two it has are identical duplicates.
    assert send(s, objs) == [0, 0, 0, 0]
    assert_consistent(s, objs)
    journal = s.journal()
    assert journal.study_state(str(objs[0].StudyInstanceUID)) == StudyState.RECEIVING
    journal.close()


def test_kill_idle_node_with_stable_studies_then_they_are_processed(serve: Serve, tmp_path: Path) -> None:
    s = serve.start()
    studies = [small_objects(2, seed=20), small_objects(1, seed=30)]
    for objs in studies:
        assert send(s, objs) == [0] * len(objs)
    uids = [str(objs[0].StudyInstanceUID) for objs in studies]
    journal = s.journal()
    # No model installed: complete studies wait as `stable`.
    wait_for(lambda: all(journal.study_state(u) == StudyState.STABLE for u in uids), timeout=20,
             what="both studies to become stable")
    s.kill()

    assert all(journal.study_state(u) == StudyState.STABLE for u in uids)
    tiny_bundle(s.cfg.models_dir, "lvh", size=32, clip_frames=8, width=4)
    s.start()
    assert_consistent(s, [ds for objs in studies for ds in objs])
    done = (StudyState.REPORTED, StudyState.DELIVERED, StudyState.SKIPPED)
    wait_for(lambda: all(journal.study_state(u) in done for u in uids), timeout=90, interval=0.2,
             what="the stable studies to be queued and processed after the restart")
    journal.close()


def test_worker_exits_when_the_node_is_killed(serve: Serve) -> None:
    s = serve.start()
    assert s.proc is not None
    node_pid = s.proc.pid
    worker = wait_for(lambda: _children(node_pid), timeout=20, what="the worker process")
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait(10)
    try:
        wait_for(lambda: not any(_alive(p) for p in worker), timeout=5, what="the orphaned worker to exit")
    finally:
        s._reap_group()


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(x) for x in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- SIGTERM -----------------------------------------------------------------------------


def test_sigterm_lets_the_open_association_finish_and_exits_0(serve: Serve) -> None:
    s = serve.start()
    objs = small_objects(3, seed=40)
    assoc = associate(s)
    assert _status(assoc.send_c_store(objs[0])) == 0
    assert s.proc is not None
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # Stopping: no new association, but the open one is served to its end.
    ae = scu()
    ae.add_requested_context(Verification)
    late = ae.associate("127.0.0.1", s.port, ae_title=s.cfg.node.ae_title)
    assert not late.is_established
    assert [_status(assoc.send_c_store(ds)) for ds in objs[1:]] == [0, 0]
    assoc.release()
    # The SCP's grace is 30 s, the worker's 20 s; with the association gone it stops at once.
    assert s.proc.wait(15) == 0
    s.proc = None
    log = s.log_text()
    assert "node.stopped" in log and "scp.aborted_on_stop" not in log
    s.start()
    assert_consistent(s, objs)


@pytest.mark.slow
def test_sigterm_aborts_an_association_left_open_after_the_grace(serve: Serve) -> None:
    s = serve.start()
    objs = small_objects(1, seed=50)
    assoc = associate(s, timeout=120)  # longer than the node's grace, so the SCU never gives up first
    assert _status(assoc.send_c_store(objs[0])) == 0
    assert s.proc is not None
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    # The peer never releases: the node aborts it after its 30 s grace.
    assert s.proc.wait(60) == 0
    elapsed = time.monotonic() - t0
    s.proc = None
    assert 29 <= elapsed < 45
    assert "scp.aborted_on_stop" in s.log_text()
    wait_for(lambda: not assoc.is_established, timeout=10, what="the SCU to see the abort")
    s.start()
    assert_consistent(s, objs)


# -- soak ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_soak_repeated_kills_at_random_moments(serve: Serve) -> None:
    """Twenty kills at random times into a stream of mixed sizes; after each
    restart the store holds exactly the acknowledged objects, whole."""
    import random

    rng = random.Random(7)
    s = serve.start()
    acked: dict[str, pydicom.Dataset] = {}
    for round_ in range(20):
        batch = [us_multiframe(frames=rng.choice([8, 40, 120]), rows=240, cols=320, seed=1000 * round_ + i)
                 for i in range(6)]
        got: list[tuple[pydicom.Dataset, int]] = []

        def stream(batch=batch, got=got) -> None:
            with contextlib.suppress(Exception):
                assoc = associate(s)
                for ds in batch:
                    got.append((ds, _status(assoc.send_c_store(ds))))
                assoc.release()

        sender = threading.Thread(target=stream, daemon=True)
        sender.start()
        time.sleep(rng.uniform(0.0, 1.5))
        s.kill()
        sender.join(30)
        acked.update({str(ds.SOPInstanceUID): ds for ds, st in got if st == 0})
        s.start()
        unacked = [ds for ds in batch if str(ds.SOPInstanceUID) not in acked]
        assert_consistent(s, list(acked.values()), maybe=unacked)
        # Whatever the node kept unacknowledged counts as stored from now on.
        stored = {r.sop_uid for r in s.journal().instances()}
        acked.update({str(ds.SOPInstanceUID): ds for ds in unacked if str(ds.SOPInstanceUID) in stored})
