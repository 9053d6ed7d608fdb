"""Losses for EchoCLR pretraining: NT-Xent and frame reordering.

The losses are pure functions with thin :class:`torch.nn.Module` wrappers so
that they can be tested against an independent reference and reused outside a
training loop.

NT-Xent gathers the other ranks' embeddings when ``torch.distributed`` is
initialised, so that the negatives of a distributed run are the negatives of
the *global* batch (the paper: 392 pairs a step, 196 per GPU). The gather uses
``torch.distributed.nn.functional.all_gather``, whose backward sums the
gradients that every rank's loss sends to this rank's embeddings; DDP then
averages parameter gradients over ranks, so the update equals that of a
single process that sees the whole batch.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn.functional import all_gather

__all__ = [
    "NUM_PERMUTATIONS",
    "PERMUTATIONS",
    "NTXentLoss",
    "gather_with_grad",
    "inverse_permutation",
    "nt_xent_loss",
    "permute_clip",
    "reorder_loss",
]

#: Frames in a reordering clip (the paper's 4-frame pretraining clips).
REORDER_FRAMES = 4
#: The 24 orderings of 4 frames, in ``itertools.permutations`` order, so that
#: label 0 is the identity.
PERMUTATIONS: tuple[tuple[int, ...], ...] = tuple(itertools.permutations(range(REORDER_FRAMES)))
NUM_PERMUTATIONS = len(PERMUTATIONS)


def _distributed_world() -> tuple[int, int]:
    """Return ``(rank, world_size)``; ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` from every rank along dim 0, keeping the gradient.

    Parameters
    ----------
    x : torch.Tensor
        This rank's tensor; every rank must pass the same shape.

    Returns
    -------
    gathered : torch.Tensor
        ``x`` of all ranks, rank order; ``x`` itself when not distributed.
    offset : int
        Row of this rank's first element in ``gathered``.
    """
    rank, world = _distributed_world()
    if world == 1:
        return x, 0
    parts = all_gather(x)
    return torch.cat(parts, dim=0), rank * x.shape[0]


def nt_xent_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.05,
    *,
    gather: bool = True,
) -> torch.Tensor:
    """Normalised-temperature cross-entropy (SimCLR), symmetric in the views.

    Row ``i`` of ``z1`` and row ``i`` of ``z2`` are a positive pair. For each
    of the ``2N`` local anchors the other ``2M - 2`` embeddings of the (global)
    batch are negatives; ``M`` is the global batch, ``N`` the local one.
    The loss is the mean over the local anchors of both views.

    Parameters
    ----------
    z1, z2 : torch.Tensor
        ``(N, D)`` projections of the two views; not necessarily normalised.
    temperature : float
        Divides the cosine similarities; the paper uses 0.05.
    gather : bool
        Gather negatives from all ranks when ``torch.distributed`` is
        initialised (every rank must then pass the same ``N``).

    Returns
    -------
    torch.Tensor
        Scalar loss, float32.

    Raises
    ------
    ValueError
        If the inputs are not 2-D, differ in shape, are empty, or the
        temperature is not positive.
    """
    if z1.ndim != 2 or z2.ndim != 2:
        raise ValueError(f'Arguments "z1" and "z2" must be 2-D (N, D); got {tuple(z1.shape)} and {tuple(z2.shape)}.')
    if z1.shape != z2.shape:
        raise ValueError(f'Arguments "z1" and "z2" must have the same shape; got {tuple(z1.shape)} and {tuple(z2.shape)}.')
    if z1.shape[0] < 1:
        raise ValueError('Arguments "z1" and "z2" must hold at least one pair.')
    if not temperature > 0:
        raise ValueError(f'Argument "temperature" must be positive; got {temperature}.')

    # float32: under AMP the similarities / 0.05 would lose precision in fp16.
    q1 = F.normalize(z1.float(), dim=1)
    q2 = F.normalize(z2.float(), dim=1)
    n = q1.shape[0]
    if gather:
        k1, offset = gather_with_grad(q1)
        k2, _ = gather_with_grad(q2)
    else:
        k1, k2, offset = q1, q2, 0
    m = k1.shape[0]

    queries = torch.cat([q1, q2], dim=0)  # (2N, D)
    keys = torch.cat([k1, k2], dim=0)  # (2M, D)
    logits = queries @ keys.t() / temperature  # (2N, 2M)

    local = torch.arange(n, device=q1.device) + offset
    self_col = torch.cat([local, local + m])
    pos_col = torch.cat([local + m, local])
    rows = torch.arange(2 * n, device=q1.device)
    # An anchor is never its own negative.
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, self_col] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, pos_col)


class NTXentLoss(nn.Module):
    """:func:`nt_xent_loss` as a module.

    Parameters
    ----------
    temperature : float
        Similarity temperature (paper: 0.05).
    gather : bool
        Gather negatives across ranks when distributed.
    """

    def __init__(self, temperature: float = 0.05, gather: bool = True) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f'Argument "temperature" must be positive; got {temperature}.')
        self.temperature = float(temperature)
        self.gather = bool(gather)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent_loss(z1, z2, self.temperature, gather=self.gather)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather={self.gather}"


def permute_clip(clip: torch.Tensor, perm_idx: int, dim: int = -3) -> torch.Tensor:
    """Reorder the frames of a 4-frame clip by one of the 24 permutations.

    Output frame ``j`` is input frame ``PERMUTATIONS[perm_idx][j]``.

    Parameters
    ----------
    clip : torch.Tensor
        ``(C, T, H, W)`` or ``(B, C, T, H, W)``; time is ``dim`` (default -3).
    perm_idx : int
        Index into :data:`PERMUTATIONS`; 0 leaves the clip as it is.
    dim : int
        The time axis.

    Returns
    -------
    torch.Tensor
        The permuted clip (a new tensor).

    Raises
    ------
    ValueError
        If the time axis does not have 4 frames or ``perm_idx`` is out of range.
    """
    if not 0 <= int(perm_idx) < NUM_PERMUTATIONS:
        raise ValueError(f'Argument "perm_idx" must be in [0, {NUM_PERMUTATIONS}); got {perm_idx}.')
    if clip.shape[dim] != REORDER_FRAMES:
        raise ValueError(
            f'Argument "clip" must have {REORDER_FRAMES} frames along dim {dim}; got shape {tuple(clip.shape)}.'
        )
    order = torch.tensor(PERMUTATIONS[int(perm_idx)], device=clip.device)
    return clip.index_select(dim, order)


def inverse_permutation(perm_idx: int) -> int:
    """Index of the permutation that undoes ``PERMUTATIONS[perm_idx]``."""
    perm = PERMUTATIONS[int(perm_idx)]
    inverse = [0] * len(perm)
    for j, src in enumerate(perm):
        inverse[src] = j
    return PERMUTATIONS.index(tuple(inverse))


def reorder_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the frame-reordering head.

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, 24)`` head outputs.
    labels : torch.Tensor
        ``(N,)`` permutation indices.

    Raises
    ------
    ValueError
        On a shape mismatch.
    """
    if logits.ndim != 2 or logits.shape[1] != NUM_PERMUTATIONS:
        raise ValueError(f'Argument "logits" must be (N, {NUM_PERMUTATIONS}); got {tuple(logits.shape)}.')
    if labels.shape != logits.shape[:1]:
        raise ValueError(f'Argument "labels" must be ({logits.shape[0]},); got {tuple(labels.shape)}.')
    return F.cross_entropy(logits.float(), labels.long())
