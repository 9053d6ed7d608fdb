"""Credentials files: the one reader of the secrets the node presents and accepts.

A secret is never written in the TOML config (which is readable by the
service group and ends up in backups and tickets): the config names a file,
and the file holds

* for ``basic``: ``user:password`` lines (the password may contain ``:``;
  blank lines and lines starting with ``#`` are ignored); a file the node
  presents to a peer (a STOW-RS destination) holds exactly one;
* for ``bearer``: the token, on its first non-blank line.

The file must not be readable by every user. It is read at each use, so a
secret rotated by another program takes effect without a reload, and a
file that becomes unreadable fails closed.
"""

from __future__ import annotations

import base64
import os
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MAX_FILE_BYTES", "Credentials", "CredentialsError", "authorization_header", "load_credentials"]

#: A credentials file larger than this is refused: it is a few lines.
MAX_FILE_BYTES = 64 * 1024


class CredentialsError(ValueError):
    """The credentials file is missing, unreadable or malformed; the message says which."""


@dataclass(frozen=True)
class Credentials:
    """What a request must present.

    Attributes
    ----------
    mode : str
        ``basic`` or ``bearer``.
    users : tuple of (str, str)
        ``basic``: the (user, password) pairs accepted.
    token : str
        ``bearer``: the token accepted.
    """

    mode: str
    users: tuple[tuple[str, str], ...] = ()
    token: str = ""


def load_credentials(mode: str, path: str | Path, *, single: bool = False) -> Credentials:
    """Read and check a credentials file.

    Parameters
    ----------
    mode : str
        ``basic`` or ``bearer``.
    path : str or Path
        The file.
    single : bool
        One credential only (what the node presents to a peer): a ``basic``
        file with several users is refused.

    Returns
    -------
    Credentials

    Raises
    ------
    CredentialsError
        When the file cannot be read, is readable by every user, is too
        large, is not UTF-8, or holds no usable credential. The message never
        quotes a secret.
    """
    if mode not in ("basic", "bearer"):
        raise CredentialsError(f'Argument "mode" must be "basic" or "bearer"; got {mode!r}.')
    file = Path(path)
    try:
        with file.open("rb") as fh:
            file_mode = os.fstat(fh.fileno()).st_mode
            raw = fh.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise CredentialsError(f"no such file: {file}") from None
    except OSError as exc:
        raise CredentialsError(f"cannot read {file}: {exc.strerror or type(exc).__name__}") from None
    if file_mode & stat.S_IROTH:
        raise CredentialsError(f"{file} is readable by every user (mode {stat.S_IMODE(file_mode):o}): chmod o-r it")
    if len(raw) > MAX_FILE_BYTES:
        raise CredentialsError(f"{file} is over {MAX_FILE_BYTES} bytes: not a credentials file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialsError(f"{file} is not UTF-8 text") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise CredentialsError(f"{file} holds no {'user:password line' if mode == 'basic' else 'token'}")
    if mode == "bearer":
        token = lines[0][1]
        if any(c.isspace() for c in token):
            raise CredentialsError(f"{file}: the token (line {lines[0][0]}) must not contain spaces")
        return Credentials("bearer", token=token)
    users = []
    for n, line in lines:
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise CredentialsError(f"{file}: line {n} is not user:password (both non-empty)")
        users.append((user, password))
    if single and len(users) > 1:
        raise CredentialsError(f"{file} must hold one user:password line, found {len(users)}")
    return Credentials("basic", users=tuple(users))


def authorization_header(credentials: Credentials) -> str:
    """The ``Authorization`` header value that presents ``credentials`` to a peer.

    Parameters
    ----------
    credentials : Credentials
        From :func:`load_credentials`; for ``basic``, its first user.

    Returns
    -------
    str
        ``Basic <base64>`` or ``Bearer <token>``.
    """
    if credentials.mode == "bearer":
        return f"Bearer {credentials.token}"
    user, password = credentials.users[0]
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
