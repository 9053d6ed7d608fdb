"""bench/label_efficiency.py: variants of the protocol never overwrite the documented one's runs or results."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parent.parent / "bench" / "label_efficiency.py"
_spec = importlib.util.spec_from_file_location("label_efficiency", _PATH)
assert _spec is not None and _spec.loader is not None
le = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(le)


def test_default_protocol_keeps_its_names() -> None:
    ns = le.parse_args(["--out", "/tmp/x"])
    assert ns.pretrain_seed == 0 and ns.finetune_head_init == "random"
    assert le.results_suffix(ns) == ""
    assert [le.pretrain_name(ns, m) for m in ("echoclr", "mi-simclr", "random")] == ["echoclr", "mi-simclr", "random"]


def test_variants_get_their_own_runs_cells_and_results() -> None:
    ns = le.parse_args(["--out", "/tmp/x", "--pretrain-seed", "1"])
    assert le.pretrain_name(ns, "echoclr") == "echoclr-s1"
    # Random init does not depend on the pretraining seed: its cells are shared.
    assert le.pretrain_name(ns, "random") == "random"
    assert le.results_suffix(ns) == "_pretrain_s1"
    both = le.parse_args(["--out", "/tmp/x", "--pretrain-seed", "2", "--finetune-head-init", "probe"])
    assert le.results_suffix(both) == "_head_probe_pretrain_s2"


def test_eval_device_resolves_auto() -> None:
    import torch

    assert le.eval_device("cpu") == "cpu"
    assert le.eval_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
