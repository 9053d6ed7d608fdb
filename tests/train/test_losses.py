"""Tests for train.losses: NT-Xent against a hand-written reference, reordering."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp

from train.losses import (
    NUM_PERMUTATIONS,
    PERMUTATIONS,
    NTXentLoss,
    inverse_permutation,
    nt_xent_loss,
    permute_clip,
    reorder_loss,
)


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """NT-Xent with explicit loops over anchors and a hand-made log-sum-exp."""
    vectors = [list(map(float, row)) for row in torch.cat([z1, z2]).tolist()]
    n = z1.shape[0]

    def cosine(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        na = math.sqrt(sum(x * x for x in a))
        nb = math.sqrt(sum(y * y for y in b))
        return dot / (na * nb)

    total = 0.0
    for i in range(2 * n):
        positive = i + n if i < n else i - n
        terms = [cosine(vectors[i], vectors[k]) / temperature for k in range(2 * n) if k != i]
        top = max(terms)
        log_denominator = top + math.log(sum(math.exp(t - top) for t in terms))
        total += log_denominator - cosine(vectors[i], vectors[positive]) / temperature
    return total / (2 * n)


@pytest.mark.parametrize("n,d,t", [(1, 3, 0.5), (5, 8, 0.05), (7, 4, 1.0)])
def test_nt_xent_matches_reference(n: int, d: int, t: float) -> None:
    g = torch.Generator().manual_seed(n * 100 + d)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = torch.randn(n, d, generator=g, dtype=torch.float64)
    got = nt_xent_loss(z1, z2, temperature=t).item()
    assert got == pytest.approx(reference_nt_xent(z1, z2, t), rel=1e-5, abs=1e-5)


def test_nt_xent_symmetric_and_order_invariant() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    loss = nt_xent_loss(z1, z2)
    assert nt_xent_loss(z2, z1).item() == pytest.approx(loss.item(), rel=1e-5)
    perm = torch.randperm(6, generator=g)
    assert nt_xent_loss(z1[perm], z2[perm]).item() == pytest.approx(loss.item(), rel=1e-5)
    # Mismatching the pairs must change (increase) the loss for aligned pairs.
    aligned = nt_xent_loss(z1, z1 + 0.01 * z2)
    assert nt_xent_loss(z1, (z1 + 0.01 * z2)[perm]).item() > aligned.item()


def test_nt_xent_module_and_scale_invariance() -> None:
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    module = NTXentLoss(temperature=0.1)
    assert module(z1, z2).item() == pytest.approx(nt_xent_loss(z1, z2, 0.1).item(), rel=1e-6)
    # Cosine similarity: scaling the embeddings changes nothing.
    assert module(3 * z1, 0.5 * z2).item() == pytest.approx(module(z1, z2).item(), rel=1e-5)


def test_nt_xent_default_temperature_is_paper_value() -> None:
    assert NTXentLoss().temperature == 0.05


@pytest.mark.parametrize(
    "a,b",
    [((4, 3), (5, 3)), ((4,), (4,)), ((4, 3, 1), (4, 3, 1)), ((0, 3), (0, 3))],
)
def test_nt_xent_shape_errors(a: tuple[int, ...], b: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        nt_xent_loss(torch.zeros(a), torch.zeros(b))


def test_nt_xent_bad_temperature() -> None:
    with pytest.raises(ValueError):
        nt_xent_loss(torch.randn(2, 2), torch.randn(2, 2), temperature=0.0)
    with pytest.raises(ValueError):
        NTXentLoss(temperature=-1.0)


def _distributed_worker(rank: int, world: int, init_file: str, z1: torch.Tensor, z2: torch.Tensor, out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n = z1.shape[0] // world
        a = z1[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        b = z2[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        loss = nt_xent_loss(a, b, 0.1)
        loss.backward()
        torch.save({"loss": loss.detach(), "ga": a.grad, "gb": b.grad}, f"{out}.{rank}")
        # Tearing gloo down while the peer is still in the backward's
        # collective aborts the process ("terminate called without an active
        # exception"): meet first.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_nt_xent_distributed_matches_global_batch(tmp_path) -> None:
    """Two gloo ranks with gathered negatives = one process with the whole batch."""
    world, n = 2, 3
    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(world * n, 4, generator=g)
    z2 = torch.randn(world * n, 4, generator=g)
    out = str(tmp_path / "result")
    mp.spawn(_distributed_worker, args=(world, str(tmp_path / "init"), z1, z2, out), nprocs=world, join=True)

    a = z1.clone().requires_grad_(True)
    b = z2.clone().requires_grad_(True)
    full = nt_xent_loss(a, b, 0.1)
    full.backward()
    results = [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]
    # The global objective is the mean of the rank losses ...
    mean_loss = sum(r["loss"] for r in results) / world
    assert mean_loss.item() == pytest.approx(full.item(), rel=1e-5)
    # ... and each rank's gradient is world x the global one for its rows
    # (all_gather's backward sums over ranks; DDP then divides by world).
    for r, res in enumerate(results):
        rows = slice(r * n, (r + 1) * n)
        torch.testing.assert_close(res["ga"], world * a.grad[rows], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res["gb"], world * b.grad[rows], rtol=1e-4, atol=1e-6)
    # Without the gather the local loss would see fewer negatives and differ.
    local = nt_xent_loss(z1[:n], z2[:n], 0.1)
    assert abs(local.item() - results[0]["loss"].item()) > 1e-3


def test_permutations_are_24_distinct_identity_first() -> None:
    assert NUM_PERMUTATIONS == 24
    assert len(set(PERMUTATIONS)) == 24
    assert PERMUTATIONS[0] == (0, 1, 2, 3)
    assert all(sorted(p) == [0, 1, 2, 3] for p in PERMUTATIONS)


def test_permute_clip_moves_frames_and_inverts() -> None:
    clip = torch.arange(4).float().view(1, 4, 1, 1).expand(3, 4, 2, 2).clone()  # (C, T, H, W)
    seen = set()
    for k in range(NUM_PERMUTATIONS):
        out = permute_clip(clip, k)
        assert out.shape == clip.shape
        assert tuple(out[0, :, 0, 0].long().tolist()) == PERMUTATIONS[k]
        seen.add(tuple(out[0, :, 0, 0].tolist()))
        restored = permute_clip(out, inverse_permutation(k))
        assert torch.equal(restored, clip)
    assert len(seen) == 24
    assert torch.equal(permute_clip(clip, 0), clip)


def test_permute_clip_batched_and_errors() -> None:
    batch = torch.randn(2, 3, 4, 5, 5)
    out = permute_clip(batch, 23)
    assert torch.equal(out[:, :, 0], batch[:, :, 3])
    with pytest.raises(ValueError):
        permute_clip(torch.randn(3, 5, 4, 4), 1)
    with pytest.raises(ValueError):
        permute_clip(batch, 24)


def test_reorder_loss() -> None:
    logits = torch.full((2, 24), -10.0)
    logits[0, 5] = 10.0
    logits[1, 0] = 10.0
    assert reorder_loss(logits, torch.tensor([5, 0])).item() < 1e-6
    assert reorder_loss(logits, torch.tensor([4, 0])).item() > 1.0
    with pytest.raises(ValueError):
        reorder_loss(torch.zeros(2, 10), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        reorder_loss(logits, torch.tensor([0]))
