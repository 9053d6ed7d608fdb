"""The architecture's rules, checked: the node process never imports torch; echonode never imports train.

The node process (receiving, the journal, delivery, the scheduler, the CLI's
journal commands, metrics and the status page) must stay small and must not
load torch: a CUDA build alone is gigabytes, and a crash in a native
inference library must not take the SCP down. Inference runs in the worker
process (``echonode.analyse.worker``), which the node starts as a child.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

ECHONODE = REPO / "echonode"

#: Modules the node process and the torch-free CLI commands import.
NODE_SIDE = (
    "echonode.commands.main",
    "echonode.commands.common",
    "echonode.commands.serve",
    "echonode.commands.status",
    "echonode.commands.echo",
    "echonode.commands.maintenance",
    "echonode.commands.agreement",
    "echonode.daemon.node",
    "echonode.daemon.supervisor",
    "echonode.ops.prometheus",
    "echonode.ops.statuspage",
    "echonode.receive.scp",
    "echonode.delivery.outbox",
    "echonode.delivery.stow",
    "echonode.studies.journal",
    "echonode.studies.store",
    "echonode.studies.rebuild",
    "echonode.studies.retention",
    "echonode.bundles.manifest",
    "echonode.bundles.installed",
    "echonode.measurements",
    "echonode.report.read",
    "echonode.report.sop",
)

#: Packages whose every module runs in the node process, lazily imported code included.
NODE_PACKAGES = ("receive", "network", "studies", "delivery", "ops", "daemon", "measurements")

#: Modules that load torch (directly or through the networks).
TORCH_MODULES = (
    "torch",
    "echonode.bundles.weights",
    "echonode.bundles.registry",
    "echonode.bundles.device",
    "echonode.bundles.nets",
    "echonode.bundles.runtime",
    "echonode.bundles.runtime_select",
    "echonode.bundles.calibration",
    "echonode.analyse.worker",
    "echonode.analyse.pipeline",
)

#: Where the node-side code may name a torch module anyway, and why.
ALLOWED = {
    # The child process's target: the worker's module is imported in the child.
    ("echonode/daemon/supervisor.py", "echonode.analyse.worker"),
    ("echonode/daemon/supervisor.py", "echonode.analyse.worker.worker_process"),
}


def test_the_node_process_imports_no_torch() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in NODE_SIDE)
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'train', 'openvino', 'torchvision'))\n"
        + "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the node process loaded: {out.stdout.strip()}"


def test_reading_the_config_imports_no_dicom_library() -> None:
    # check-config, the service's pre-start check and fetch's start-up read the
    # config; a rules file, when one is configured, is the only reason to load pydicom.
    code = (
        "import sys\n"
        "from echonode.config import parse_config\n"
        "parse_config({'node': {'ae_title': 'ECHONODE'}})\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('pydicom', 'pynetdicom', 'numpy'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"reading the config loaded: {out.stdout.strip()[:300]}"


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at any depth (inside functions too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{a.name}" for a in node.names]
    return names


def _node_side_files() -> list[Path]:
    return sorted(p for pkg in NODE_PACKAGES for p in (ECHONODE / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", _node_side_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_node_side_code_never_names_a_torch_module(path: Path) -> None:
    rel = str(path.relative_to(REPO))
    bad = [
        name for name in _imports(path)
        if any(name == t or name.startswith(t + ".") for t in TORCH_MODULES) and (rel, name) not in ALLOWED
    ]
    assert bad == [], f"{rel} imports {bad}: the node process must not load torch"


def test_echonode_never_imports_train() -> None:
    offenders = {
        str(p.relative_to(REPO)): [n for n in _imports(p) if n == "train" or n.startswith("train.")]
        for p in ECHONODE.rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
