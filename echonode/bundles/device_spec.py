"""What a device setting says (``auto``, ``cpu``, ``cuda``, ``cuda:N``), read without torch.

The node's configuration is checked in the node process, which never loads
torch; :func:`echonode.bundles.device.resolve_device` turns the same
reading into a torch device where the networks run.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DeviceSpec", "parse_device"]


@dataclass(frozen=True)
class DeviceSpec:
    """A parsed device setting.

    Attributes
    ----------
    kind : str
        ``auto``, ``cpu`` or ``cuda``.
    index : int or None
        The GPU index of ``cuda:N``; None for ``cuda`` (the first GPU) and
        the other kinds.
    """

    kind: str
    index: int | None = None


def parse_device(spec: str) -> DeviceSpec:
    """Read a device setting.

    Parameters
    ----------
    spec : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (case and surrounding
        spaces ignored).

    Returns
    -------
    DeviceSpec

    Raises
    ------
    ValueError
        For anything else, with a message that names the setting.
    """
    if not isinstance(spec, str):
        raise ValueError(f'Argument "spec" must be a string, not {type(spec).__name__}.')
    text = spec.strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return DeviceSpec(text)
    if text.startswith("cuda:"):
        suffix = text.split(":", 1)[1]
        if suffix.isdigit():
            return DeviceSpec("cuda", int(suffix))
        raise ValueError(f"device {spec!r}: expected cuda:N with N a GPU index")
    raise ValueError(f"device {spec!r}: expected auto, cpu, cuda or cuda:N")
