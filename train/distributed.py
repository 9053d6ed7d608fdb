"""Where this process sits in a ``torchrun`` job: its rank, the world size, its device.

Shared by pretraining and archive-scale prediction. Without torchrun
(``WORLD_SIZE`` unset) a command is one process of a world of one, and
nothing is initialised.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from echonode.bundles.device import resolve_device
from echonode.bundles.device_spec import parse_device

__all__ = ["setup_distributed"]


def setup_distributed(device_arg: str, *, timeout_s: float | None = None) -> tuple[torch.device, int, int, int]:
    """Initialise torch.distributed under torchrun (gloo on the CPU, nccl on GPUs).

    Parameters
    ----------
    device_arg : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. Under torchrun with CUDA
        each process takes the GPU of its local rank.
    timeout_s : float, optional
        How long a collective waits for the slowest rank (torch's default
        when None).

    Returns
    -------
    tuple of (torch.device, int, int, int)
        Device, rank, world size, local rank.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    spec = parse_device(device_arg)
    use_cuda = spec.kind == "cuda" or (spec.kind == "auto" and torch.cuda.is_available())
    if world > 1 and not dist.is_initialized():
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    if use_cuda:
        # Under torchrun each process takes the GPU of its local rank.
        device = resolve_device(f"cuda:{local if world > 1 else spec.index or 0}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return device, rank, world, local
