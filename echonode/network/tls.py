"""TLS for DICOM associations, both roles (PS3.15 B.1, the TLS secure transport profile)."""

from __future__ import annotations

import ssl

from echonode.config import TLSConfig

__all__ = ["client_ssl_context", "server_ssl_context"]


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """The SCP's TLS context, or None when TLS is off."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file:
        ctx.load_verify_locations(tls.ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx


def client_ssl_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """A TLS context for an outgoing association (delivery, echo), or None."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # DICOM peers are addressed by IP and AE title far more often than by a
    # name in their certificate; trust is the CA's (PS3.15 B.1 leaves this open).
    ctx.check_hostname = False
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx
