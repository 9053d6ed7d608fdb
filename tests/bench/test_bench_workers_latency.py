"""bench/workers.py and bench/latency.py: readiness as the node writes it, and each bench end to end (slow)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import latency, workers
from tests.factories import tiny_bundle
from tests.peers import require_tool


def _beat(storage: Path, name: str, phase: str) -> None:
    (storage / name).write_text(json.dumps({"phase": phase}))


def test_workers_ready_waits_for_every_worker_and_the_models(tmp_path: Path) -> None:
    assert not workers.workers_ready(tmp_path, 2)  # nothing written yet
    (tmp_path / "worker-models.json").write_text(json.dumps({"loaded": True}))
    _beat(tmp_path, "worker-heartbeat.json", "idle")
    assert not workers.workers_ready(tmp_path, 2)  # the second worker has not beaten
    _beat(tmp_path, "worker-1-heartbeat.json", "loading")
    assert not workers.workers_ready(tmp_path, 2)
    _beat(tmp_path, "worker-1-heartbeat.json", "idle")
    assert workers.workers_ready(tmp_path, 2)
    (tmp_path / "worker-models.json").write_text("{not json")  # caught mid-write
    assert not workers.workers_ready(tmp_path, 2)


def test_latency_worker_ready_needs_models_loaded(tmp_path: Path) -> None:
    cfg = SimpleNamespace(storage_dir=tmp_path)
    _beat(tmp_path, "worker-heartbeat.json", "idle")
    assert not latency.worker_ready(cfg)
    (tmp_path / "worker-models.json").write_text(json.dumps({"loaded": False}))
    assert not latency.worker_ready(cfg)
    (tmp_path / "worker-models.json").write_text(json.dumps({"loaded": True}))
    assert latency.worker_ready(cfg)


def test_runtime_choice_is_carried_between_fresh_nodes(tmp_path: Path) -> None:
    ready, cache, fresh = tmp_path / "ready", tmp_path / "cache", tmp_path / "fresh"
    (ready / "inductor").mkdir(parents=True)
    (ready / "inductor" / "kernel.so").write_bytes(b"x")
    (ready / "runtime-choices.json").write_text("{}")
    (ready / "journal.sqlite").write_text("not carried")
    latency.keep_runtime_choice(cache, ready, restore=False)
    latency.keep_runtime_choice(cache, fresh, restore=True)
    assert sorted(p.relative_to(fresh).as_posix() for p in fresh.rglob("*")) == [
        "inductor", "inductor/kernel.so", "runtime-choices.json"]


@pytest.fixture()
def tiny_models(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    tiny_bundle(models, "lvh", seed=1)
    return models


@pytest.mark.slow
def test_workers_bench_runs_end_to_end(tmp_path: Path, tiny_models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_tool(workers.STORESCU)
    rc = workers.main(["--models", str(tiny_models), "--workers", "1", "2", "--patients", "1", "--repeats", "1",
                       "--work", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "1 worker(s):" in out and "2 worker(s):" in out and "x 1 worker(s)" in out


@pytest.mark.slow
def test_latency_bench_runs_end_to_end(tmp_path: Path, tiny_models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_tool(latency.STORESCU)
    rc = latency.main(["--models", str(tiny_models), "--repeats", "1", "--stable-after-s", "1",
                       "--check-interval-s", "0.5", "--after-release-s", "0.5", "--work", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert rc == 0, out
    table = out.split("median of 1 runs:")[1]
    for stage in latency.STAGES:
        assert stage in table
    total = [line.split() for line in table.splitlines() if line.startswith("total")][0]
    assert all(float(x) > 0 for x in total[1:]), table
