"""bench/valve_appearance.py: how each renderer draws the open aortic valve."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from bench import valve_appearance


def _two_cusps(pos: np.ndarray, sep: float, cusp: float, gap: float) -> np.ndarray:
    leaf = valve_appearance.LEAFLET_CM
    inside = ((pos > -sep / 2 - leaf) & (pos < -sep / 2)) | ((pos > sep / 2) & (pos < sep / 2 + leaf))
    return np.where(inside, cusp, gap).astype(np.float32)


def test_the_opening_is_read_at_half_grey_between_the_gap_and_each_cusp() -> None:
    pos = np.arange(-1.5, 1.5, 0.005)
    for sep in (0.5, 1.1, 1.8):
        sharp = _two_cusps(pos, sep, 180.0, 10.0)
        reading = valve_appearance.read_profile(sharp, pos, (-sep / 2, sep / 2))
        assert reading["opening"] == pytest.approx(sep, abs=0.02)
        assert reading["gap"] == 10.0
        # A symmetric blur narrower than the cusps leaves the half-grey edges where they were.
        blurred = cv2.GaussianBlur(sharp[None, :], (0, 0), sigmaX=6, sigmaY=0.1)[0]
        assert valve_appearance.read_profile(blurred, pos, (-sep / 2, sep / 2))["opening"] == pytest.approx(
            sep, abs=0.03)
    # Cusps hardly brighter than the blood between them leave no opening to read.
    faint = _two_cusps(pos, 0.8, 10.0 + valve_appearance.READABLE_GREY - 1, 10.0)
    assert np.isnan(valve_appearance.read_profile(faint, pos, (-0.4, 0.4))["opening"])


def test_every_renderer_draws_an_opening_that_follows_the_separation(tmp_path, capsys) -> None:
    """On label-free acquisitions, A's and C's apparent openings track the drawn separation; every
    renderer draws its cusps brighter than the blood between them; the crops are written."""
    result = valve_appearance.measure(2, "standard", pictures=tmp_path, picture_count=1)
    seps = np.asarray(valve_appearance.SEPARATIONS_CM)
    for name in ("A", "C"):
        opening = np.nanmean(result[name]["opening"], 0)
        assert np.all(np.abs(opening - seps) < 0.35), (name, opening)
        assert opening[-1] > opening[0] + 0.8, (name, opening)
    for name, readings in result.items():
        assert np.all(readings["contrast"] > 0), name
        assert np.all(np.isfinite(readings["relative"])) and np.all(readings["relative"] > 0), name
    for name in ("A", "B", "C"):
        crop = cv2.imread(str(tmp_path / f"valves-{name}.png"), cv2.IMREAD_GRAYSCALE)
        assert crop is not None and crop.shape[1] > 4 * crop.shape[0] and crop.max() > 40, name
    assert valve_appearance.main(["--acquisitions", "1", "--renderers", "A,B"]) == 0
    out = capsys.readouterr().out
    assert "| B | cusp / septum" in out and "CPU flags of note" in out and "| C |" not in out


def test_the_faded_look_draws_fainter_leaflets_than_the_varied_valves_look() -> None:
    """The one change of ``varied-leaflets`` is at the leaflets: fainter, never brighter, on the same hearts."""
    valves = valve_appearance.measure(4, "varied-valves", ("A",))["A"]
    faded = valve_appearance.measure(4, "varied-leaflets", ("A",))["A"]
    assert np.median(faded["relative"]) < np.median(valves["relative"])
    assert np.all(faded["cusp"] <= valves["cusp"] + 1.0)


def test_renderers_are_a_subset_of_a_b_c() -> None:
    with pytest.raises(SystemExit):
        valve_appearance.main(["--renderers", "A,D"])
