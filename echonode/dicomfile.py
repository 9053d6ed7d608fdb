"""Checks on a DICOM file that must run before pydicom reads it whole.

Shared by the receive path (``store.py``) and the decoder (``decode.py``,
also used offline by ``echonode infer`` and ``echonode-train index``).
"""

from __future__ import annotations

import zlib
from pathlib import Path

from pydicom.filereader import _read_file_meta_info, read_preamble

#: The retired (pre-1996) Ultrasound Multi-frame and Ultrasound Image Storage
#: classes, which older carts and echo archives migrated through the PACS
#: still send: UID -> (keyword, the current class whose IOD has the same
#: modules and whose pixel data is read the same way).
RETIRED_US_STORAGE: dict[str, tuple[str, str]] = {
    "1.2.840.10008.5.1.4.1.1.3": ("UltrasoundMultiFrameImageStorageRetired", "1.2.840.10008.5.1.4.1.1.3.1"),
    "1.2.840.10008.5.1.4.1.1.6": ("UltrasoundImageStorageRetired", "1.2.840.10008.5.1.4.1.1.6.1"),
}


#: A deflated data set inflating past this is refused before pydicom reads
#: it, unless the caller sets its own limit (2 GiB, the decoder's cap on
#: decoded pixels).
DEFAULT_MAX_INFLATED_BYTES = 2 * 1024**3


class InflatesTooLarge(ValueError):
    """A deflated data set inflates past the limit; the message says which."""


def check_inflated_size(path: Path, limit: int) -> None:
    """Raise :class:`InflatesTooLarge` when a deflated data set inflates past ``limit`` bytes.

    pydicom inflates a deflated data set whole, in memory, before reading a
    single element: a 1.5 MB object can ask for gigabytes (a decompression
    bomb). This inflates in chunks and keeps nothing, so memory stays flat;
    a data set that is not deflated is left alone.
    """
    with open(path, "rb") as fp:
        read_preamble(fp, False)
        tsyntax = _read_file_meta_info(fp).get("TransferSyntaxUID")
        if tsyntax is None or not tsyntax.is_deflated:
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while not inflater.eof and (chunk := fp.read(1 << 16)):
            while chunk:
                total += len(inflater.decompress(chunk, 1 << 20))
                if total > limit:
                    raise InflatesTooLarge(f"the deflated data set inflates to more than {limit >> 20} MiB")
                chunk = inflater.unconsumed_tail
