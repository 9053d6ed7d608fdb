"""Shared fixtures: configs on free ports, real echo files, a running node."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from echonode.config import Config, Destination, parse_config

REPO = Path(__file__).resolve().parent.parent

# ``[models] runtime = auto`` measures every runtime the machine supports when
# a bundle loads; torch.compile's compile (tens of seconds), int8's calibration
# and OpenVINO's conversion would make every test that loads a bundle slow.
# The suite measures the cheap candidates (node subprocesses inherit this);
# tests/test_runtime.py exercises the others by name.
os.environ.setdefault("ECHONODE_RUNTIME_CANDIDATES", "jit,bf16")

# dcmtk's tools, by full path: pynetdicom installs its own under the same names.
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
STORESCP = "/usr/bin/storescp"
DCIODVFY = "/usr/bin/dciodvfy"
DSRDUMP = "/usr/bin/dsrdump"
ORTHANC = "/usr/sbin/Orthanc"
#: Debian's orthanc-dicomweb: QIDO-RS, WADO-RS and STOW-RS for Orthanc.
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``slow`` tests (soak, full load, long training) run only when asked: ``-m slow``."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow test: opt in with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def need(tool: str) -> str:
    """Skip unless ``tool`` exists (.ci/run installs them all)."""
    if not Path(tool).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing in CI: .ci/run must install it")
        pytest.skip(f"{tool} not installed")
    return tool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def real_testfile(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(f"test file {name} not found: install the 'test' extra (pydicom-data)")
    return Path(path)


@pytest.fixture(scope="session")
def sonosite_loop() -> Path:
    """The real 120-frame SonoSite cardiac cine (labelled "PLA" by the cart) (JPEG baseline, YBR_FULL_422)."""
    return real_testfile("color3d_jpeg_baseline.dcm")


@pytest.fixture(scope="session")
def ybr_loop() -> Path:
    """The same loop, 30 frames, 240x320; shares its SOP Instance UID with sonosite_loop."""
    return real_testfile("examples_ybr_color.dcm")


def make_config(tmp_path: Path, **sections: dict) -> Config:
    """A valid config under ``tmp_path`` on a free port; ``sections`` override tables."""
    data: dict = {
        "node": {
            "ae_title": "ECHONODE",
            "host": "127.0.0.1",
            "port": free_port(),
            "storage_dir": str(tmp_path / "storage"),
            "min_free_disk_mb": 0,
        },
        "study": {"stable_after_s": 1.0, "check_interval_s": 0.2},
        "models": {"dir": str(tmp_path / "models"), "device": "cpu"},
        "delivery": {"retry_initial_s": 0.5, "retry_max_s": 2.0, "check_interval_s": 0.2, "timeout_s": 5.0},
        "logging": {"format": "json", "level": "info"},
    }
    for name, table in sections.items():
        if isinstance(table, list):
            data[name] = table
        else:
            data.setdefault(name, {}).update(table)
    return parse_config(data)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
def running_node(config: Config) -> Iterator:
    """A node (no worker process) listening on loopback."""
    from echonode.daemon.node import Node

    node = Node(config, start_worker=False)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def with_destination(cfg: Config, name: str, ae_title: str, port: int, host: str = "127.0.0.1") -> Config:
    return dataclasses.replace(cfg, destinations=(*cfg.destinations, Destination(name, ae_title, host, port)))


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def echonode_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "echonode", *args]


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        echonode_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


@pytest.fixture(scope="session")
def dcmtk() -> None:
    need(STORESCU)
    need(ECHOSCU)


def copy_testfile(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(src, dst_dir / src.name))
