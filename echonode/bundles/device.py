"""Where networks run: one reading of a device setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""

from __future__ import annotations

import torch

from echonode.bundles.device_spec import parse_device

__all__ = ["resolve_device"]


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
