"""``echonode serve`` as a process: SIGHUP reload without dropping associations, SIGTERM stop."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from echonode.config import to_toml
from tests.conftest import REPO, make_config, wait_for


def _assoc(port: int, calling: str):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="ECHONODE")


def test_sighup_applies_allow_list_and_keeps_open_associations(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, node={"allowed_calling_aets": ["CART1"]})
    path = tmp_path / "echonode.toml"
    path.write_text(to_toml(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "echonode", "--config", str(path), "serve"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def up():
            a = _assoc(cfg.node.port, "CART1")
            if a.is_established:
                return a
            return None

        open_assoc = wait_for(up, timeout=60, what="node listening")
        assert _assoc(cfg.node.port, "CART2").is_rejected
        # Allow CART2, reload.
        new = dataclasses.replace(cfg, node=dataclasses.replace(cfg.node, allowed_calling_aets=("CART1", "CART2")))
        path.write_text(to_toml(new))
        os.kill(proc.pid, signal.SIGHUP)

        def admitted() -> bool:
            a = _assoc(cfg.node.port, "CART2")
            if a.is_established:
                a.release()
                return True
            return False

        wait_for(admitted, timeout=30, what="reload to admit CART2")
        # The association opened before the reload still works.
        assert open_assoc.is_established
        assert open_assoc.send_c_echo().Status == 0
        open_assoc.release()
        # A broken config on reload is refused; the node keeps running with the old one.
        path.write_text("[node]\nport = 'x'\n")
        os.kill(proc.pid, signal.SIGHUP)
        time.sleep(3.0)
        assert proc.poll() is None
        a = _assoc(cfg.node.port, "CART2")
        assert a.is_established
        a.release()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:]
    assert "node.reload_failed" in out and "node.reloaded" in out, out[-3000:]


def test_reload_keeps_restart_only_keys(tmp_path: Path) -> None:
    from echonode.daemon.node import Node

    cfg = make_config(tmp_path)
    path = tmp_path / "echonode.toml"
    path.write_text(to_toml(cfg))
    node = Node(cfg, str(path), start_worker=False)
    node.start()
    try:
        new = dataclasses.replace(cfg, node=dataclasses.replace(
            cfg.node, storage_dir=str(tmp_path / "elsewhere"), ae_title="OTHER", max_associations=2,
            allowed_calling_aets=("CART9",)))
        path.write_text(to_toml(new))
        node.reload()
        assert node.cfg.storage_dir == cfg.storage_dir
        assert node.cfg.node.ae_title == "ECHONODE" and node.cfg.node.max_associations == cfg.node.max_associations
        assert node.cfg.node.allowed_calling_aets == ("CART9",)
        assert node.scp.policy.calling_aets == frozenset({"CART9"})
    finally:
        node.stop()
