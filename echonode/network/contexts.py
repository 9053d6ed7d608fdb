"""Presentation contexts: a server's, shared by its associations instead of copied; a peer's, checked.

pynetdicom gives each incoming connection a deep copy of its server's
supported presentation contexts, though negotiation only reads them. For a
storage SCP that accepts every storage class in every transfer syntax (170
classes x 45 syntaxes) that copy costs about 50 ms of CPU per connection,
under the interpreter lock, while the other associations wait to be served.

A peer's proposed list is checked before pynetdicom negotiates it
(:func:`malformed_context`): pynetdicom raises on a context without a
transfer syntax and leaves the peer unanswered, its thread and socket held.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

__all__ = ["SharedContexts", "malformed_context", "share_contexts"]


class SharedContexts(list[PresentationContext]):
    """A server's contexts; a "deep copy" of them is a new list of the same context objects."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return list(self)


def share_contexts(server: ThreadedAssociationServer) -> None:
    """Let every association of ``server`` use the server's own presentation contexts.

    Parameters
    ----------
    server : ThreadedAssociationServer
        Made (``AE.make_server``), before its first connection.
    """
    server.contexts = SharedContexts(server.contexts)


def malformed_context(contexts: Sequence[PresentationContext]) -> str | None:
    """What is wrong with a proposed presentation context list (PS3.8 9.3.2.2), or None.

    Each item needs a context ID distinct from the others', one abstract
    syntax and at least one transfer syntax; the list needs at least one
    item. An even or out-of-range ID never gets this far: the PDU guard
    aborts the request (pynetdicom cannot make a context of it).
    """
    if not contexts:
        return "no presentation context proposed"
    seen: set[int | None] = set()
    for cx in contexts:
        cid = cx.context_id
        if cid in seen:
            return f"context ID {cid} is proposed twice"
        seen.add(cid)
        if not cx.abstract_syntax:
            return f"context {cid} names no abstract syntax"
        if not cx.transfer_syntax:
            return f"context {cid} proposes no transfer syntax"
    return None
