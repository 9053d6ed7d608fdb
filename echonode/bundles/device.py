"""Where networks run: one reading of a device setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""

from __future__ import annotations

import torch

from echonode.bundles.device_spec import parse_device

__all__ = ["resolve_device", "split_threads", "worker_device"]


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """Turn a ``[models] device`` setting into a torch device.

    Parameters
    ----------
    spec : str or torch.device
        ``"auto"`` (the first GPU when CUDA is available, else the CPU),
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        For an unknown setting, or a GPU that is not there.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    parsed = parse_device(spec)
    if parsed.kind == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if parsed.kind == "cpu":
        return torch.device("cpu")
    index = parsed.index or 0
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r}: CUDA is not available on this machine (use 'auto' or 'cpu')")
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} GPU(s) present")
    return torch.device("cuda", index)


def worker_device(spec: str, index: int, count: int) -> str:
    """The device setting of worker ``index`` of ``count`` (``[models] workers``).

    Parameters
    ----------
    spec : str
        ``[models] device``.
    index : int
        The worker, from 0.
    count : int
        Workers in the node.

    Returns
    -------
    str
        ``cuda:I`` for ``auto`` or ``cuda`` when GPUs are present, I being
        ``index`` wrapped round the GPUs (two workers on one GPU when
        there are more workers than GPUs); ``spec`` unchanged otherwise
        (``cpu``, a named ``cuda:N`` that every worker shares, ``auto``
        without CUDA).
    """
    parsed = parse_device(spec)
    shared = parsed.kind == "cpu" or parsed.index is not None
    if count > 1 and not shared and torch.cuda.is_available() and torch.cuda.device_count():
        return f"cuda:{index % torch.cuda.device_count()}"
    return spec


def split_threads(threads: int, count: int, cpus: int | None) -> int:
    """CPU threads for one of ``count`` workers; 0 lets torch decide.

    Parameters
    ----------
    threads : int
        ``[models] threads``: the node's total, 0 for "the CPUs".
    count : int
        Workers in the node.
    cpus : int or None
        CPUs this process may run on (``len(os.sched_getaffinity(0))``).

    Returns
    -------
    int
        ``threads`` for one worker; otherwise an equal share of the total,
        at least 1, so that N workers never run N times the cores.
    """
    if count <= 1:
        return threads
    total = threads or cpus or 1
    return max(1, total // count)
