"""train/promote.py: promote and roll back check a bundle without running its network."""

from __future__ import annotations

from pathlib import Path

import torch

from echonode.bundles.weights import load_bundle
from tests.factories import tiny_bundle
from train.promote import promote, rollback


def test_promote_and_rollback_check_bundles_without_the_runtime_optimisation(tmp_path: Path) -> None:
    # runtime="auto" (load_bundle's default, the node's) self-checks an
    # optimised forward against the eager one: a forward of the network at
    # every load. Loading only to check a bundle needs none.
    first = tiny_bundle(tmp_path / "src1", "lvh", name="lvh", version="1")
    second = tiny_bundle(tmp_path / "src2", "lvh", name="lvh", version="2", seed=1)
    models = tmp_path / "models"
    forwards: list[str] = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: forwards.append(type(module).__name__)
    )
    try:
        promote(first, models)
        slot = promote(second, models)
        assert load_bundle(slot, "cpu", runtime="eager").meta.version == "2"
        rollback(models, "lvh")
    finally:
        hook.remove()
    assert forwards == []
    # What the node loads (runtime auto) is the bundle rolled back to.
    assert load_bundle(models / "lvh", "cpu").meta.version == "1"
