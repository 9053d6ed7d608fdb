"""A fast, tolerant read of a DICOM data set into nested dicts of raw values.

An echo SR is a tree of a few thousand small sequence items. pydicom builds a
:class:`~pydicom.dataset.Dataset` per item and converts every element through
its hooks on first access; walking a GE cart's report that way costs tens of
milliseconds. The measurement reader needs tags, lengths and a handful of
short values, so this reads the encoding once into ``{tag: bytes | [item, ...]}``
(an :data:`Item`) and decodes only what is asked for. On the same pass it
checks what pydicom does not: a file cut short (a value longer than what is
left, an undefined-length sequence or item whose delimiter never comes) is
refused with :class:`Truncated` instead of read as a smaller data set.

Explicit and implicit VR little endian, explicit VR big endian (retired) and
deflated explicit VR little endian are read. Values are never validated.
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Sequence

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR

__all__ = ["Item", "Malformed", "NotPart10", "Truncated", "decode_text", "first_float", "parse_dataset", "parse_part10"]

#: One data set or sequence item: tag -> raw value bytes, or the items of a sequence.
Item = dict[int, "bytes | list[Item]"]

_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
_LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"})


class Malformed(ValueError):
    """The encoding cannot be followed (a sequence holds something other than items)."""


class Truncated(Malformed):
    """The file ends before what its encoding declares."""


class NotPart10(Malformed):
    """No ``DICM`` prefix: not a DICOM Part 10 file."""


@functools.lru_cache(maxsize=4096)
def _is_sequence_tag(tag: int) -> bool:
    """Whether an implicit-VR element is a sequence (the dictionary says; private tags do not)."""
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


#: Sequences nested deeper than this are refused (:class:`Malformed`): an echo SR's content tree is
#: a dozen levels deep, and reading is recursive, so a file nested thousands deep must not reach
#: the interpreter's recursion limit.
MAX_SEQUENCE_DEPTH = 128


class _Reader:
    """One pass over one encoded data set."""

    def __init__(self, data: bytes, implicit: bool, little: bool, depth: int = 0) -> None:
        self.data = data
        self.implicit = implicit
        self.little = little
        self.depth = depth
        self.u16 = struct.Struct("<H" if little else ">H").unpack_from
        self.u32 = struct.Struct("<I" if little else ">I").unpack_from
        self.tag_len = struct.Struct("<HHI" if little else ">HHI").unpack_from
        self.explicit_short = struct.Struct("<HH2sH" if little else ">HH2sH").unpack_from

    def dataset(self, pos: int, end: int, delimited: bool) -> tuple[Item, int]:
        """Elements from ``pos`` to ``end``, or to an Item Delimitation Item when ``delimited``."""
        data = self.data
        out: Item = {}
        implicit = self.implicit
        while pos < end:
            if pos + 8 > end:
                raise Truncated("the file ends inside an element header")
            if implicit:
                group, element, length = self.tag_len(data, pos)
                vr = b""
                pos += 8
            else:
                group, element, vr, length = self.explicit_short(data, pos)
                if group == 0xFFFE or not (vr.isalpha() and vr.isupper()):
                    # An item tag, or a writer that switched to implicit VR
                    # inside a sequence (pydicom reads those too).
                    (length,) = self.u32(data, pos + 4)
                    vr = b"" if group != 0xFFFE else vr
                    pos += 8
                elif vr in _LONG_LENGTH_VRS:
                    if pos + 12 > end:
                        raise Truncated("the file ends inside an element header")
                    (length,) = self.u32(data, pos + 8)
                    pos += 12
                else:
                    pos += 8
            tag = group << 16 | element
            if tag == _ITEM_END:
                if delimited:
                    return out, pos
                continue  # a stray delimiter at the top level (some carts write one): harmless
            if length == _UNDEFINED:
                if tag == _PIXEL_DATA:
                    pos = self.skip_items(pos, end)
                    continue
                if implicit or vr == b"SQ":
                    items, pos = self.sequence(pos, end)
                else:
                    # An undefined-length UN is a sequence in implicit VR
                    # little endian (PS3.5 6.2.2); so is what follows a
                    # switch to implicit VR.
                    items, pos = _Reader(data, True, vr == b"UN" or self.little, self.depth).sequence(pos, end)
                out[tag] = items
                continue
            if pos + length > end:
                raise Truncated(f"the file ends inside element ({group:04X},{element:04X})")
            if vr == b"SQ":
                out[tag] = self.defined_sequence(pos, pos + length)
            elif not vr and _is_sequence_tag(tag):
                reader = self if implicit else _Reader(data, True, self.little, self.depth)
                out[tag] = reader.defined_sequence(pos, pos + length)
            else:
                out[tag] = data[pos : pos + length]
            pos += length
        if delimited:
            raise Truncated("the file ends inside a sequence item")
        return out, pos

    def enter(self) -> None:
        """One sequence deeper; refused past :data:`MAX_SEQUENCE_DEPTH`."""
        if self.depth >= MAX_SEQUENCE_DEPTH:
            raise Malformed(f"sequences are nested more than {MAX_SEQUENCE_DEPTH} deep")
        self.depth += 1

    def sequence(self, pos: int, end: int) -> tuple[list[Item], int]:
        """Items of an undefined-length sequence, up to its Sequence Delimitation Item."""
        self.enter()
        try:
            return self._sequence(pos, end)
        finally:
            self.depth -= 1

    def _sequence(self, pos: int, end: int) -> tuple[list[Item], int]:
        items: list[Item] = []
        while True:
            if pos + 8 > end:
                raise Truncated("the file ends inside a sequence")
            group, element, length = self.tag_len(self.data, pos)
            tag = group << 16 | element
            pos += 8
            if tag == _SEQUENCE_END:
                return items, pos
            if tag != _ITEM:
                raise Malformed(f"a sequence holds ({group:04X},{element:04X}) where an item should be")
            if length == _UNDEFINED:
                item, pos = self.dataset(pos, end, True)
            else:
                if pos + length > end:
                    raise Truncated("the file ends inside a sequence item")
                item, _ = self.dataset(pos, pos + length, False)
                pos += length
            items.append(item)

    def defined_sequence(self, pos: int, end: int) -> list[Item]:
        """Items of a sequence of defined length ``end - pos``."""
        self.enter()
        try:
            return self._defined_sequence(pos, end)
        finally:
            self.depth -= 1

    def _defined_sequence(self, pos: int, end: int) -> list[Item]:
        items: list[Item] = []
        while pos < end:
            if pos + 8 > end:
                raise Truncated("a sequence ends inside an item header")
            group, element, length = self.tag_len(self.data, pos)
            tag = group << 16 | element
            pos += 8
            if tag == _SEQUENCE_END:
                break
            if tag != _ITEM:
                raise Malformed(f"a sequence holds ({group:04X},{element:04X}) where an item should be")
            if length == _UNDEFINED:
                item, pos = self.dataset(pos, end, True)
            else:
                if pos + length > end:
                    raise Truncated("a sequence item is longer than its sequence")
                item, _ = self.dataset(pos, pos + length, False)
                pos += length
            items.append(item)
        return items

    def skip_items(self, pos: int, end: int) -> int:
        """Past the fragments of encapsulated pixel data."""
        while True:
            if pos + 8 > end:
                raise Truncated("the file ends inside the pixel data")
            group, element, length = self.tag_len(self.data, pos)
            pos += 8
            if (group << 16 | element) == _SEQUENCE_END:
                return pos
            if pos + length > end:
                raise Truncated("the file ends inside the pixel data")
            pos += length


def parse_part10(data: bytes, *, max_inflated: int) -> tuple[Item, str]:
    """The data set of a Part 10 file, and its transfer syntax.

    Parameters
    ----------
    data : bytes
        The whole file.
    max_inflated : int
        A deflated data set may inflate to this many bytes at most.

    Returns
    -------
    tuple
        ``(dataset, transfer_syntax_uid)``.

    Raises
    ------
    NotPart10
        Without the ``DICM`` prefix.
    Truncated, Malformed
        When the encoding stops short or cannot be followed.
    """
    if data[128:132] == b"DICM":
        pos = 132
    elif data[:4] == b"DICM":
        pos = 4
    else:
        raise NotPart10("no DICM prefix")
    meta_reader = _Reader(data, False, True)
    # The file meta (group 0002) is always explicit VR little endian.
    end = pos
    while end + 8 <= len(data) and data[end : end + 2] == b"\x02\x00":
        end = _element_end(meta_reader, end, len(data))
    meta, _ = meta_reader.dataset(pos, end, False)
    raw_ts = meta.get(0x00020010, b"")
    tsyntax = raw_ts.decode("ascii", "replace").strip("\0 ") if isinstance(raw_ts, bytes) else ""
    body = data[end:]
    if tsyntax in _DEFLATED:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            body = inflater.decompress(body, max_inflated + 1)
        except zlib.error as exc:
            raise Malformed("the deflated data set does not inflate") from exc
        if len(body) > max_inflated:
            raise Malformed(f"the deflated data set inflates to more than {max_inflated >> 20} MiB")
        if not inflater.eof:
            raise Truncated("the deflated data set is cut short")
    dataset = parse_dataset(body, implicit=tsyntax == _IMPLICIT_LE, little=tsyntax != _EXPLICIT_BE)
    return dataset, tsyntax


def _element_end(reader: _Reader, pos: int, end: int) -> int:
    """The offset after one explicit VR little endian element (file meta)."""
    data = reader.data
    _group, _element, vr, length = reader.explicit_short(data, pos)
    if vr in _LONG_LENGTH_VRS:
        if pos + 12 > end:
            raise Truncated("the file ends inside the file meta")
        (length,) = reader.u32(data, pos + 8)
        pos += 12
    else:
        pos += 8
    if length == _UNDEFINED or pos + length > end:
        raise Truncated("the file ends inside the file meta")
    return pos + length


def parse_dataset(data: bytes, *, implicit: bool, little: bool) -> Item:
    """A bare encoded data set (no preamble, no file meta) as an :data:`Item`."""
    dataset, _ = _Reader(data, implicit, little).dataset(0, len(data), False)
    return dataset


def decode_text(raw: bytes | list[Item] | None, encodings: Sequence[str] = ("iso8859",)) -> str:
    """A string value, stripped of padding (first value of a multi-valued one).

    ASCII is decoded directly; anything else through pydicom's character set
    handling with ``encodings`` (from :func:`python_encodings`).
    """
    if not isinstance(raw, bytes) or not raw:
        return ""
    if raw.isascii():
        text = raw.decode("ascii")
    else:
        try:
            text = decode_bytes(raw, list(encodings), {0x5C})
        except (UnicodeError, LookupError):  # pydicom raises these when its validation mode is RAISE
            text = raw.decode("latin-1")
    return text.split("\\", 1)[0].strip(" \0")


def python_encodings(raw: bytes | list[Item] | None) -> list[str]:
    """Python encodings for a Specific Character Set value (pydicom's mapping)."""
    terms = decode_text(raw).strip() if isinstance(raw, bytes) else ""
    if not terms or not isinstance(raw, bytes):
        return ["iso8859"]
    values = [t.strip() for t in raw.decode("ascii", "replace").split("\\")]
    try:
        return convert_encodings(values)
    except LookupError:  # an unknown term, with pydicom's validation mode at RAISE
        return ["iso8859"]


def first_float(raw: bytes | list[Item] | None, *, little: bool = True) -> float | None:
    """The first value of an FD element, or None."""
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    (value,) = struct.unpack_from("<d" if little else ">d", raw)
    return float(value)
