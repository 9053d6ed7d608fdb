"""Who may associate with the node, and the A-ASSOCIATE-RJ reasons it answers with.

The address is checked when a connection is accepted (before a byte is
read); the AE titles when the A-ASSOCIATE-RQ arrives.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from echonode.config import NodeConfig
from echonode.network.contexts import malformed_context

__all__ = [
    "request_refusal",
    "DICOM_APPLICATION_CONTEXT",
    "REJECT_APPLICATION_CONTEXT",
    "REJECT_CALLED_AE",
    "REJECT_CALLING_AE",
    "REJECT_LOCAL_LIMIT",
    "REJECT_LOW_DISK",
    "REJECT_NO_REASON",
    "AccessPolicy",
    "dicom_ae_title",
    "printable_ae",
]

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service-user, calling AE not recognized
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service-user, called AE not recognized
REJECT_NO_REASON = (0x01, 0x01, 0x01)  # permanent, service-user, no reason given
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)  # permanent, service-user, application context not supported
#: The DICOM Application Context Name (PS3.7 A.2.1), the only one there is.
DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# Transient, so that the sender keeps its images and retries; the same triple
# pynetdicom sends when max_associations is reached, which senders already
# treat as "try again later".
REJECT_LOW_DISK = (0x02, 0x03, 0x02)  # transient, service-provider (presentation), local limit exceeded
REJECT_LOCAL_LIMIT = REJECT_LOW_DISK  # the same triple, for max_associations


def dicom_ae_title(field: bytes) -> str | None:
    """The AE title an A-ASSOCIATE-RQ field holds, or None when no AE title may hold it.

    Leading and trailing spaces are DICOM padding (PS3.8 9.3.2); nothing else
    is. An AE title is printable ASCII without a backslash (PS3.5 6.2, AE),
    so a tab, a newline, any other control character or a non-ASCII byte
    makes the field invalid, wherever it stands. pynetdicom's own decoding
    strips them like spaces (``str.strip()``): ``"CART1\\t"`` would pass an
    allow-list of ``["CART1"]``.
    """
    value = field.strip(b" ")
    if not value or any(b < 0x20 or b > 0x7E or b == 0x5C for b in value):
        return None
    return value.decode("ascii")


def printable_ae(field: bytes) -> str:
    """``field`` safe for a log line: padding removed, anything else escaped (``CART1\\t``)."""
    return repr(field.strip(b" "))[2:-1]


@dataclass
class AccessPolicy:
    """Who may associate: calling AE titles and source networks (empty = anyone)."""

    calling_aets: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_config(cls, node: NodeConfig) -> AccessPolicy:
        return cls(
            # Only spaces are padding; config.py refuses any other whitespace in an AE title.
            calling_aets=frozenset(a.strip(" ") for a in node.allowed_calling_aets),
            networks=tuple(ipaddress.ip_network(n, strict=False) for n in node.allowed_networks),
        )

    def address_allowed(self, address: str) -> bool:
        """Whether a peer at ``address`` may connect at all."""
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        # An IPv4 peer on a dual-stack socket shows as ::ffff:a.b.c.d.
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    def calling_ae_allowed(self, calling_ae: str) -> bool:
        """Whether ``calling_ae`` (padding already removed) may associate."""
        return not self.calling_aets or calling_ae in self.calling_aets


def request_refusal(rq: Any) -> tuple[str, tuple[int, int, int]] | None:
    """Why an A-ASSOCIATE-RQ cannot be negotiated at all, and the A-ASSOCIATE-RJ to answer; None if it can.

    Checked before pynetdicom negotiates the request: it would negotiate any
    application context, and raise on a malformed presentation context,
    leaving the peer unanswered with its thread and socket held.

    Parameters
    ----------
    rq : pynetdicom.pdu_primitives.A_ASSOCIATE
        The request as received.

    Returns
    -------
    tuple or None
        ``(reason for the log, (result, source, diagnostic))``.
    """
    if str(rq.application_context_name or "") != DICOM_APPLICATION_CONTEXT:
        return "not the DICOM application context", REJECT_APPLICATION_CONTEXT
    malformed = malformed_context(rq.presentation_context_definition_list)
    if malformed is not None:
        return f"malformed presentation context: {malformed}", REJECT_NO_REASON
    return None
