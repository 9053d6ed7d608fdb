"""Where networks run: one reading of a device setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""

from __future__ import annotations

import torch

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
    if not isinstance(spec, str):
        raise ValueError(f'Argument "spec" must be a string, not {type(spec).__name__}.')
    text = spec.strip().lower()
    if text == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index = 0
        if text != "cuda":
            suffix = text.split(":", 1)[1]
            if not suffix.isdigit():
                raise ValueError(f"device {spec!r}: expected cuda:N with N a GPU index")
            index = int(suffix)
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: CUDA is not available on this machine (use 'auto' or 'cpu')")
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} GPU(s) present")
        return torch.device("cuda", index)
    raise ValueError(f"device {spec!r}: expected auto, cpu, cuda or cuda:N")
