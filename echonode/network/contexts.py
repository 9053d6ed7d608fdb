"""An association server's presentation contexts, shared by its associations instead of copied.

pynetdicom gives each incoming connection a deep copy of its server's
supported presentation contexts, though negotiation only reads them. For a
storage SCP that accepts every storage class in every transfer syntax (170
classes x 45 syntaxes) that copy costs about 50 ms of CPU per connection,
under the interpreter lock, while the other associations wait to be served.
"""

from __future__ import annotations

from typing import Any

from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

__all__ = ["SharedContexts", "share_contexts"]


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
