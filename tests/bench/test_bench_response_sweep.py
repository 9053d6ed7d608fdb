"""bench/response_sweep.py: one acquisition, every renderer, a random-weight bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench import response_sweep
from tests.factories import tiny_bundle


def test_the_sweep_scores_every_size_on_every_renderer(tmp_path: Path, capsys) -> None:
    bundle = tiny_bundle(tmp_path / "models", "lvh", size=16, clip_frames=4)
    result = response_sweep.sweep(bundle, "lvh", acquisitions=1, diseased_valve=False)
    assert set(result) == set(response_sweep.RENDERERS)
    for probs in result.values():
        assert probs.shape == (1, len(response_sweep.SIZES_CM["lvh"]))
        assert np.all((probs >= 0) & (probs <= 1))
    # The renderers draw other pixels, so a model's answers differ between them.
    a, b, c = result.values()
    assert not np.allclose(a, b) and not np.allclose(a, c) and not np.allclose(b, c)
    assert response_sweep.main(["--bundle", str(bundle), "--task", "severe_as", "--acquisitions", "1",
                                "--valve", "diseased"]) == 0
    out = capsys.readouterr().out
    assert "cusp separation 0.3 cm" in out and "diseased valve" in out
    assert "| B (raster), mean |" in out and "| C (scatter), mean |" in out


def test_a_bundle_that_frames_in_cm_is_swept_with_the_calibration_the_archive_states(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path / "models", "lvh", size=16, clip_frames=4,
                         preprocessing={"framing": "physical", "field_cm": 16.0})
    result = response_sweep.sweep(bundle, "lvh", acquisitions=1, diseased_valve=False)
    assert all(np.all((p >= 0) & (p <= 1)) for p in result.values())
