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
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time
from pynetdicom.transport import ThreadedAssociationServer

__all__ = ["SharedContexts", "malformed_context", "share_contexts", "store_on_wrong_context"]


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


def store_on_wrong_context(affected_sop_class: str, context_sop_class: str) -> bool:
    """Whether a C-STORE naming ``affected_sop_class`` came on a context (of ``context_sop_class``) it may not use.

    PS3.7 9.1.1.1: a C-STORE is sent on a presentation context of its own
    SOP class; one on the Verification context, or naming another class
    than its context's, is not a storage (answered 0x0122).
    """
    return affected_sop_class != context_sop_class or context_sop_class == Verification
