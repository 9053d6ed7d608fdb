"""Shared fixtures: configs on free ports, real echo files, a running node, the peers of tests/peers.py.

The process-wide settings every test runs under are set once, in
:func:`process_settings`; no test module sets them at import.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import config as pydicom_config
from pydicom.data import get_testdata_file

from echonode.config import Config, Destination, parse_config
from tests.peers import (
    CHROMEDRIVER,
    CHROMIUM,
    ECHOSCU,
    REPO,
    STORESCU,
    RecordingSCP,
    echonode_cmd,
    free_port,
    require,
    require_tool,
    wait_for,
)

__all__ = ["REPO", "echonode_cmd", "free_port", "wait_for"]  # tests import these from here too

#: torch's intra-op threads in the test process: one, so that tests running beside
#: each other (and beside the nodes they start) do not fight over the cores.
TORCH_THREADS = 1


@pytest.fixture(scope="session", autouse=True)
def process_settings() -> Iterator[None]:
    """The process-wide settings of the test process, set once for the session.

    - torch runs on :data:`TORCH_THREADS` threads;
    - pydicom reads without validating values (``IGNORE``), as the node and
      the worker do with what carts send; tests of objects the node *writes*
      read them back under :func:`tests.report_support.strict_reading`;
    - ``[models] runtime = auto`` measures only the cheap runtimes (jit,
      bf16) when a bundle loads: torch.compile's compile (tens of seconds),
      int8's calibration and OpenVINO's conversion would make every test that
      loads a bundle slow. Node subprocesses inherit it; tests/echonode/bundles/test_runtime.py
      exercises the others by name.
    """
    import torch

    torch.set_num_threads(TORCH_THREADS)
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    os.environ.setdefault("ECHONODE_RUNTIME_CANDIDATES", "jit,bf16")
    yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``slow`` tests (soak, full load, long training) run only when asked: ``-m slow``."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow test: opt in with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """What the fuzz tests of this run tried, by outcome (the figures of docs/reliability.md)."""
    from tests.corpus import FUZZ_OUTCOMES

    if FUZZ_OUTCOMES:
        terminalreporter.write_sep("-", "fuzz inputs tried")
        for outcome, count in sorted(FUZZ_OUTCOMES.items()):
            terminalreporter.write_line(f"{outcome}: {count}")
        terminalreporter.write_line(f"total: {sum(FUZZ_OUTCOMES.values())}")


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
def sockets() -> Iterator[list[socket.socket]]:
    """Raw sockets a test opens (``tests.rawdicom.connect``); closed at teardown."""
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


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
    require_tool(STORESCU)
    require_tool(ECHOSCU)


@pytest.fixture
def scps() -> Iterator:
    """Start :class:`~tests.peers.RecordingSCP` peers; all are shut down at the end of the test."""
    started: list[RecordingSCP] = []

    def start(port: int | None = None, **kwargs: Any) -> RecordingSCP:
        scp = RecordingSCP(port or free_port(), **kwargs).start()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed server certificate for 127.0.0.1, its own CA."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=pacs",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    return {"cert": d / "cert.pem", "key": d / "key.pem"}


#: A laptop's browser window: what "sees first" means (no scrolling).
WINDOW = (1280, 800)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium with a fresh profile and no network of its own; quit at the end."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    require(webdriver is not None, "selenium", "the 'test' extra")
    options = webdriver.ChromeOptions()
    options.binary_location = require_tool(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
                f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(arg)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    driver = webdriver.Chrome(service=Service(require_tool(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def copy_testfile(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(src, dst_dir / src.name))


class FullDisk:
    """A temp file whose writes fail with ENOSPC once ``room`` bytes are written (a disk that fills)."""

    def __init__(self, f: object, room: int) -> None:
        self._f, self.room, self.name = f, room, f.name  # type: ignore[attr-defined]

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self._f.write(data)  # type: ignore[attr-defined,no-any-return]

    def __getattr__(self, name: str) -> object:
        return getattr(self._f, name)
