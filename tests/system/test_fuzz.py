"""Fuzzing the receive and preprocessing paths with hypothesis.

Receive: a valid Part 10 file, mutated (bytes overwritten, cut short, bytes
inserted), goes through :meth:`StudyStore.accept` exactly as the SCP hands it
a received temp file: it is stored or refused with :class:`BadObject`
(a DIMSE failure status), nothing else, and no stray file is left.

Preprocessing: the same mutations, and header values drawn at random over
a well-formed pixel payload, go through ``decode_video`` and
``preprocess_video``: frames come out or :class:`UnusableObject` with a
reason, nothing else. A hypothesis deadline of 20 s per input catches a
hang without being a timing assertion.

The default suite tries a few hundred inputs; ``-m slow`` tries thousands. What
they tried, by outcome, is printed in pytest's summary (tests/conftest.py).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from echonode.analyse.decode import (
    DecodeOptions,
    UnusableObject,
    decode_dataset,
    decode_video,
)
from echonode.analyse.preprocess import PreprocessConfig, preprocess_video
from echonode.studies.journal import Journal
from echonode.studies.store import BadObject, StudyStore
from tests.corpus import FUZZ_OUTCOMES as TRIED
from tests.corpus import dataset_offset, jpeg_dataset, part10
from tests.factories import us_multiframe

CFG = PreprocessConfig(size=32, clip_frames=8)
DEADLINE_MS = 20_000

_NATIVE = part10(us_multiframe(frames=8, rows=32, cols=32, seed=7))
_JPEG = part10(jpeg_dataset(np.random.default_rng(8).integers(0, 256, (8, 32, 32), dtype=np.uint8)))
BASES = {"native": _NATIVE, "jpeg": _JPEG}


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    """A base file with its data set overwritten, cut and/or grown at random places."""
    name = draw(st.sampled_from(sorted(BASES)))
    data = bytearray(BASES[name])
    start = dataset_offset(bytes(data))
    # Bias towards the header: that is where a flipped byte changes meaning.
    header_end = min(len(data), start + 600)
    for _ in range(draw(st.integers(0, 8))):
        hi = header_end if draw(st.booleans()) else len(data)
        pos = draw(st.integers(start, hi - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        pos = draw(st.integers(start, len(data)))
        data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    if draw(st.integers(0, 3)) == 0:
        data = data[: draw(st.integers(start, len(data)))]
    return name, bytes(data)


def _accept_one(tmp: Path, data: bytes) -> str:
    journal = Journal(tmp / "journal.sqlite")
    store = StudyStore(tmp, journal)
    temp = store.incoming / "t-fuzz"
    temp.write_bytes(data)
    try:
        header, outcome = store.accept(temp, "FUZZ")
    except BadObject as exc:
        assert 0xA900 <= exc.status <= 0xCFFF, hex(exc.status)
        temp.unlink()  # the SCP's temp file: pynetdicom deletes it after the handler
        return f"refused 0x{exc.status:04X}"
    finally:
        journal.close()
    assert not temp.exists()
    stored = store.instance_path(header)
    assert stored.read_bytes() == data
    return f"stored ({outcome})"


def _check_receive(tmp_path_factory: pytest.TempPathFactory, case: tuple[str, bytes]) -> None:
    tmp = tmp_path_factory.mktemp("rx")
    outcome = _accept_one(tmp, case[1])
    TRIED["receive " + outcome.split(" (")[0]] += 1
    leftovers = [p for p in tmp.rglob("*") if p.is_file() and (p.suffix == ".part" or p.parent.name == "incoming")]
    assert leftovers == []


def _check_decode(case: tuple[str, bytes]) -> None:
    try:
        video = decode_video(io.BytesIO(case[1]), target_side=CFG.size, max_frames=CFG.max_frames, threads=1)
        frames = preprocess_video(video, CFG)
    except UnusableObject as exc:
        assert exc.reason
        TRIED["decode unusable"] += 1
        return
    assert frames.dtype == np.uint8 and frames.shape[1:] == (CFG.size, CFG.size)
    TRIED["decode usable"] += 1


_header_values = st.fixed_dictionaries({
    "Rows": st.one_of(st.integers(0, 70000), st.sampled_from([16, 32, 64])),
    "Columns": st.one_of(st.integers(0, 70000), st.sampled_from([16, 32, 64])),
    "NumberOfFrames": st.one_of(st.integers(-10, 2**31 - 1), st.integers(0, 40)),
    "BitsAllocated": st.sampled_from([0, 1, 8, 12, 16, 32]),
    "BitsStored": st.sampled_from([0, 1, 8, 12, 16, 32]),
    "SamplesPerPixel": st.integers(0, 4),
    "PhotometricInterpretation": st.sampled_from(
        ["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR", "", "XYZ"]),
    "PixelRepresentation": st.integers(0, 1),
    "FrameTime": st.one_of(st.floats(-1e6, 1e6), st.just(float("nan")), st.just(33.3)),
    "TransferSyntax": st.sampled_from(["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50",
                                       "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90", "1.2.3.4"]),
    "payload": st.sampled_from(["native", "jpeg", "short", "empty"]),
})


def _check_header(values: dict) -> None:
    ds = us_multiframe(frames=8, rows=32, cols=32, seed=9)
    pixels = {"native": ds.PixelData, "jpeg": jpeg_dataset(
        np.zeros((8, 32, 32), np.uint8) + 60).PixelData, "short": ds.PixelData[:100], "empty": b""}[values["payload"]]
    for key, value in values.items():
        if key == "TransferSyntax":
            ds.file_meta.TransferSyntaxUID = value
        elif key != "payload":
            setattr(ds, key, value)
    ds.PixelData = pixels
    try:
        video = decode_dataset(ds, DecodeOptions(target_side=CFG.size, max_frames=CFG.max_frames, threads=1))
        frames = preprocess_video(video, CFG)
    except UnusableObject as exc:
        assert exc.reason
        TRIED["header unusable"] += 1
        return
    assert frames.dtype == np.uint8 and frames.shape[1:] == (CFG.size, CFG.size)
    TRIED["header usable"] += 1


_FAST = settings(max_examples=120, deadline=DEADLINE_MS, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])
_LONG = settings(max_examples=3000, deadline=DEADLINE_MS,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])


@settings(_FAST, max_examples=60)  # each accepted object costs three fsyncs
@given(case=mutated())
def test_fuzz_receive(tmp_path_factory: pytest.TempPathFactory, case: tuple[str, bytes]) -> None:
    _check_receive(tmp_path_factory, case)


@_FAST
@given(case=mutated())
def test_fuzz_decode_and_preprocess(case: tuple[str, bytes]) -> None:
    _check_decode(case)


@_FAST
@given(values=_header_values)
def test_fuzz_header_values(values: dict) -> None:
    _check_header(values)


@pytest.mark.slow
@_LONG
@given(case=mutated())
def test_fuzz_receive_long(tmp_path_factory: pytest.TempPathFactory, case: tuple[str, bytes]) -> None:
    _check_receive(tmp_path_factory, case)


@pytest.mark.slow
@_LONG
@given(case=mutated())
def test_fuzz_decode_and_preprocess_long(case: tuple[str, bytes]) -> None:
    _check_decode(case)


@pytest.mark.slow
@_LONG
@given(values=_header_values)
def test_fuzz_header_values_long(values: dict) -> None:
    _check_header(values)

