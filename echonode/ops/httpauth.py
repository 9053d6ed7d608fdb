"""Basic and bearer authentication for the node's HTTP pages.

The secrets come from a credentials file (:mod:`echonode.credentials`),
read at every request, so a rotated secret takes effect at once and a file
that becomes unreadable refuses every request (never opens the page).
Comparisons are constant-time (:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import base64
import binascii
import hmac

from echonode.credentials import Credentials

#: ``status_page.auth`` values.
AUTH_MODES = ("none", "basic", "bearer")
#: The realm a browser shows in its login prompt.
REALM = "echonode status"


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
