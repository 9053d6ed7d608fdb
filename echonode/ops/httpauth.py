"""Basic and bearer authentication for the node's HTTP pages, with secrets read from a file.

A secret is never written in the TOML config (which is readable by the
service group and ends up in backups and tickets): the config names a file,
and the file holds

* for ``basic``: one ``user:password`` per line (the password may contain
  ``:``; blank lines and lines starting with ``#`` are ignored);
* for ``bearer``: the token, on its first non-blank line.

The file is read at every request, so a rotated secret takes effect at once
and a file that becomes unreadable refuses every request (never opens the
page). Comparisons are constant-time (:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass
from pathlib import Path

#: ``status_page.auth`` values.
AUTH_MODES = ("none", "basic", "bearer")
#: A credentials file larger than this is refused: it is a few lines.
MAX_FILE_BYTES = 64 * 1024
#: The realm a browser shows in its login prompt.
REALM = "echonode status"


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


def load_credentials(mode: str, path: str | Path) -> Credentials:
    """Read and check a credentials file.

    Parameters
    ----------
    mode : str
        ``basic`` or ``bearer``.
    path : str or Path
        The file.

    Returns
    -------
    Credentials

    Raises
    ------
    CredentialsError
        When the file cannot be read, is too large, is not UTF-8, or holds
        no usable credential. The message never quotes a secret.
    """
    if mode not in ("basic", "bearer"):
        raise CredentialsError(f'Argument "mode" must be "basic" or "bearer"; got {mode!r}.')
    file = Path(path)
    try:
        with file.open("rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise CredentialsError(f"cannot read {file}: {exc.strerror or type(exc).__name__}") from None
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
    return Credentials("basic", users=tuple(users))


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def authorised(credentials: Credentials, header: str | None) -> bool:
    """Whether an ``Authorization`` header value presents the credentials.

    Parameters
    ----------
    credentials : Credentials
    header : str or None
        The request's ``Authorization`` header, None when absent.

    Returns
    -------
    bool
    """
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if credentials.mode == "bearer":
        return scheme.lower() == "bearer" and bool(value) and _same(value, credentials.token)
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return False
    user, sep, password = decoded.partition(":")
    if not sep:
        return False
    # Every pair is compared, so the time taken does not tell which user exists.
    matched = False
    for known_user, known_password in credentials.users:
        matched |= _same(user, known_user) & _same(password, known_password)
    return matched


def challenge(mode: str) -> str:
    """The ``WWW-Authenticate`` header value of a 401 for ``mode``."""
    if mode == "basic":
        return f'Basic realm="{REALM}", charset="UTF-8"'
    return f'Bearer realm="{REALM}"'
