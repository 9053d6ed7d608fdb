"""Per-study locks that hold across the node's processes.

Accepting an instance (move the file in, record it) and purging a study
(forget its rows, delete its files) must never interleave for one study, or
retention could delete a file that was just acknowledged. With several
receiver processes (``[node] receivers``) beside the node's own SCP and
retention, a thread lock is not enough: each stripe is a thread lock (for the
threads of one process) in front of an ``flock`` on a file of its own under
``STORAGE_DIR/locks/`` (for the processes). The kernel drops an ``flock``
when its process dies, so a receiver killed while holding one blocks nobody.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

__all__ = ["StudyLocks"]


class StudyLocks:
    """Striped per-study locks: studies share a stripe by the hash of their UID.

    Parameters
    ----------
    folder : path-like
        Where the stripe files live (created, mode 0700).
    stripes : int, optional
        Number of stripes: receives of different studies almost never wait
        on each other.
    """

    def __init__(self, folder: str | os.PathLike[str], stripes: int = 64) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._threads = [threading.Lock() for _ in range(stripes)]
        self._fds: dict[int, int] = {}
        self._fds_lock = threading.Lock()

    def stripe(self, study_uid: str) -> int:
        """The stripe of ``study_uid``."""
        return zlib.crc32(study_uid.encode()) % len(self._threads)

    def _fd(self, stripe: int) -> int:
        with self._fds_lock:
            fd = self._fds.get(stripe)
            if fd is None:
                fd = self._fds[stripe] = os.open(self.folder / f"{stripe:02d}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            return fd

    @contextlib.contextmanager
    def hold(self, study_uid: str) -> Iterator[None]:
        """Hold ``study_uid``'s lock against every thread and process of the node."""
        stripe = self.stripe(study_uid)
        with self._threads[stripe]:
            fd = self._fd(stripe)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the stripe files (the locks are released with them)."""
        with self._fds_lock:
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()
