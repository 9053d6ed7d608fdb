"""Where a training artefact came from: the code that made it."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["code_revision"]


def code_revision() -> str | None:
    """The git commit of this checkout, when there is one (recorded in bundles and runs).

    Returns
    -------
    str or None
        The full commit hash; None outside a git checkout or without git.
    """
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
            timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    revision = result.stdout.strip()
    return revision if result.returncode == 0 and revision else None
