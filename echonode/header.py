"""Bounded reads of a stored object: no element past a size limit is read, except the pixel data.

pydicom reads every element of a header in full, private ones included.
Carts write large private elements (raw data, vendor blobs of tens to
hundreds of MiB) into every object of a study: read whole and kept, they
cost the worker the sum of them all. The pipeline (the worker's and
``echonode infer``'s), the SR's study header, the decoder and
``echonode-train index`` read through here (the receive path reads four
UIDs with ``specific_tags``, which skips the rest by seeking as well):

* :func:`read_header` (the header without the pixel data) leaves every
  element longer than :data:`MAX_ELEMENT_BYTES` unread and drops it from
  the data set, listing it in :attr:`BoundedHeader.skipped`, so nothing
  can read it later by accident (iterating a data set reads deferred
  elements);
* :func:`read_for_decode` (the decoder's read) stops after the pixel data
  and defers every element longer than the limit: the pixel data and any
  other element the decoder asks for are read from the file when it does,
  the rest never are.

What pydicom cannot bound: an element nested in a sequence of undefined
length is read whole with its sequence (pydicom defers top-level elements
only). That costs one object's sequence for the time of one read, never
the study's sum, since nothing here keeps a data set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset, FileDataset
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag

from echonode.dicomfile import DEFAULT_MAX_INFLATED_BYTES, check_inflated_size

__all__ = [
    "MAX_ELEMENT_BYTES",
    "BoundedHeader",
    "deferred_past_end",
    "read_for_decode",
    "read_header",
]

#: Elements longer than this (bytes), other than the pixel data, are not
#: read. Every attribute the node uses is far below it (the longest are
#: palette LUT Data, 128 KiB, and Frame Time Vector, under 2 MiB only past
#: 100,000 frames, which the decoder refuses); the decoder still reads a
#: longer public element it asks for (a large Per-frame Functional Groups
#: Sequence), on demand.
MAX_ELEMENT_BYTES = 1 << 20

#: The pixel data elements: (7FE0,0008) Float, (7FE0,0009) Double Float, (7FE0,0010).
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})


@dataclass(frozen=True)
class BoundedHeader:
    """A header read with :func:`read_header`.

    Attributes
    ----------
    dataset : pydicom.dataset.FileDataset
        The header, without pixel data and without the elements of
        ``skipped``; nothing in it is read from the file later.
    skipped : mapping of int to int
        Tag -> declared length (bytes) of each top-level element left
        unread because it is longer than the limit.
    """

    dataset: FileDataset
    skipped: Mapping[int, int]

    def skipped_keywords(self) -> list[str]:
        """Keywords (or ``(gggg,eeee)`` for private tags) of the skipped elements."""
        return [pydicom.datadict.keyword_for_tag(t) or str(BaseTag(t)) for t in sorted(self.skipped)]


def _deferred(ds: Dataset) -> dict[int, int]:
    """Tag -> declared length of each top-level element pydicom deferred."""
    out: dict[int, int] = {}
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, pydicom.dataelem.RawDataElement) and raw.value is None and raw.length != 0:
            out[int(tag)] = int(raw.length)
    return out


def read_header(
    path: str | os.PathLike[str],
    *,
    max_element_bytes: int = MAX_ELEMENT_BYTES,
    max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
) -> BoundedHeader:
    """Read the header of a Part 10 file, leaving large elements unread.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    max_element_bytes : int
        Top-level elements longer than this are neither read nor kept.
    max_inflated_bytes : int
        A deflated data set that inflates past this is refused before
        pydicom inflates it (whole, in memory).

    Returns
    -------
    BoundedHeader

    Raises
    ------
    dicomfile.InflatesTooLarge
        A deflated data set past ``max_inflated_bytes``.
    pydicom.errors.InvalidDicomError, OSError, ValueError, ...
        As :func:`pydicom.dcmread` for a file it cannot read.
    """
    check_inflated_size(Path(path), max_inflated_bytes)
    ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size=max_element_bytes)
    skipped = _deferred(ds)
    for tag in skipped:
        del ds[tag]
    return BoundedHeader(ds, skipped)


def _past_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    # Nothing the decoder uses follows the pixel data; private groups after
    # it (GE's raw data in 7FE1) and trailing padding are left unread.
    return int(tag) > 0x7FE00010


def read_for_decode(
    fp: BinaryIO, *, max_element_bytes: int = MAX_ELEMENT_BYTES
) -> tuple[FileDataset, int, int]:
    """Read an object for decoding: up to its pixel data, large elements deferred.

    Every element longer than ``max_element_bytes`` (the pixel data too) is
    left in the file and read when the data set is asked for it; the
    decoder asks for its pixel data and a few attributes, never for a
    private element. A path-based ``fp`` is read again by its name when a
    deferred element is asked for; a buffer (``io.BytesIO``) must stay open
    until decoding is done.

    Parameters
    ----------
    fp : binary file
        The object, positioned at its start.
    max_element_bytes : int
        Longer elements are deferred.

    Returns
    -------
    tuple of (FileDataset, int, int)
        The data set, where reading stopped and where the file ends. A
        complete read stops at the end of the file or after the pixel
        data; stopping short of both is how a file cut short shows (pydicom
        warns, rewinds and drops the element it could not finish).

    Raises
    ------
    pydicom.errors.InvalidDicomError, OSError, ValueError, ...
        As :func:`pydicom.dcmread` for a file it cannot read.
    """
    ds = read_partial(fp, stop_when=_past_pixel_data, defer_size=max_element_bytes)
    stopped_at = fp.tell()
    size = fp.seek(0, os.SEEK_END)
    return ds, stopped_at, size


def deferred_past_end(ds: Dataset, size: int) -> int | None:
    """The tag of a deferred top-level element that runs past byte ``size``, or None.

    pydicom skips a deferred element by seeking, which succeeds past the
    end of a file: a file cut short inside a large element (the pixel data)
    is found here, not by the read.
    """
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if (
            isinstance(raw, pydicom.dataelem.RawDataElement)
            and raw.value is None
            and raw.length not in (0, 0xFFFFFFFF)
            and raw.value_tell + raw.length > size
        ):
            return int(tag)
    return None
