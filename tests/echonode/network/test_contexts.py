"""A server's presentation contexts are shared by its associations, not copied per connection."""

from __future__ import annotations

from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom.sop_class import UltrasoundMultiFrameImageStorage  # type: ignore[attr-defined]

from echonode.network.contexts import share_contexts
from echonode.receive.scp import ALL_TRANSFER_SYNTAXES
from tests.conftest import wait_for
from tests.peers import scu

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def test_associations_of_a_shared_server_use_its_context_objects() -> None:
    ae = AE(ae_title="SCP")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        share_contexts(server)
        peer = scu()
        peer.add_requested_context(UltrasoundMultiFrameImageStorage, JPEG_BASELINE)
        assoc = peer.associate("127.0.0.1", server.server_address[1], ae_title="SCP")
        try:
            assert assoc.is_established
            assert [cx.transfer_syntax[0] for cx in assoc.accepted_contexts] == [JPEG_BASELINE]
            wait_for(lambda: len(server.active_associations) == 1, timeout=5, what="the association")
            [theirs] = server.active_associations
            assert len(theirs.acceptor.supported_contexts) == len(server.contexts) == len(AllStoragePresentationContexts)
            assert all(a is b for a, b in zip(theirs.acceptor.supported_contexts, server.contexts, strict=True))
        finally:
            assoc.release()
    finally:
        server.shutdown()
