"""Tests for train.augment: shift, flip, rotation, and their random draws."""

from __future__ import annotations

import pytest
import torch

from train.augment import (
    AugmentConfig,
    AugmentParams,
    apply_params,
    augment_batch,
    augment_clip,
    pad_for_size,
    rotate_clip,
    sample_params,
    shift_clip,
)


def _clip(c: int = 3, t: int = 4, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(c, t, h, w, generator=torch.Generator().manual_seed(seed))


def test_shift_matches_pad_then_crop() -> None:
    clip = _clip()
    pad = 8
    padded = torch.nn.functional.pad(clip, (pad, pad, pad, pad))
    for dy, dx in [(0, 0), (3, -5), (-8, 8), (8, -8), (-2, 0)]:
        # Content moved down by dy = crop starting dy rows above the original.
        oy, ox = pad - dy, pad - dx
        expected = padded[..., oy : oy + 16, ox : ox + 16]
        assert torch.equal(shift_clip(clip, dy, dx), expected), (dy, dx)


def test_shift_moves_a_pixel() -> None:
    clip = torch.zeros(1, 2, 10, 10)
    clip[:, :, 4, 4] = 1.0
    out = shift_clip(clip, 2, -3)
    assert out[0, 0, 6, 1] == 1.0 and out[0, 1, 6, 1] == 1.0
    assert out.sum() == 2.0


def test_rotate_90_equals_rot90_and_zero_is_identity() -> None:
    clip = _clip(h=8, w=8)
    torch.testing.assert_close(rotate_clip(clip, 90.0), torch.rot90(clip, 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate_clip(clip, 0.0), clip, atol=1e-6, rtol=0)
    batch = torch.stack([clip, clip])
    out = rotate_clip(batch, torch.tensor([0.0, -90.0]))
    torch.testing.assert_close(out[1], torch.rot90(clip, -1, dims=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0], clip, atol=1e-6, rtol=0)


def test_rotation_preserves_centre_and_zero_fills_corners() -> None:
    clip = torch.ones(1, 1, 33, 33)
    out = rotate_clip(clip, 10.0)
    assert out[0, 0, 16, 16] == pytest.approx(1.0)
    # A rotated square uncovers the corners.
    assert out[0, 0, 0, 0] == 0.0


def test_same_transform_for_all_frames() -> None:
    frame = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    clip = frame.expand(3, 4, 16, 16).contiguous()
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        out = augment_clip(clip, generator=g)
        for t in range(1, 4):
            assert torch.equal(out[:, t], out[:, 0])


def test_sample_params_ranges_and_probabilities() -> None:
    g = torch.Generator().manual_seed(0)
    draws = [sample_params(AugmentConfig(), g) for _ in range(4000)]
    shifts = {d.dy for d in draws} | {d.dx for d in draws}
    assert shifts == set(range(-8, 9))
    angles = {d.degrees for d in draws if d.degrees}
    assert angles <= set(range(-10, 11)) - {0}
    assert {-10, 10} <= angles
    flip_rate = sum(d.flip for d in draws) / len(draws)
    # p_rotate = 0.5, but an angle of 0 (1 in 21) counts as no rotation.
    rotate_rate = sum(d.degrees != 0 for d in draws) / len(draws)
    assert 0.46 < flip_rate < 0.54
    assert 0.5 * 20 / 21 - 0.04 < rotate_rate < 0.5 * 20 / 21 + 0.04


def test_disabled_augmentation_is_identity() -> None:
    cfg = AugmentConfig(pad=0, p_flip=0.0, p_rotate=0.0)
    clip = _clip()
    assert torch.equal(augment_clip(clip, cfg, torch.Generator().manual_seed(0)), clip)


def test_apply_params_order_and_flip() -> None:
    clip = _clip()
    out = apply_params(clip, AugmentParams(dy=1, dx=2, flip=True, degrees=0))
    assert torch.equal(out, shift_clip(clip, 1, 2).flip(-1))


def test_views_are_independent_and_input_untouched() -> None:
    clip = _clip()
    before = clip.clone()
    g = torch.Generator().manual_seed(3)
    a, b = augment_clip(clip, generator=g), augment_clip(clip, generator=g)
    assert not torch.equal(a, b)
    assert torch.equal(clip, before)
    # Same seed, same draw: what makes augmentation reproducible on resume.
    c = augment_clip(clip, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, c)


def test_augment_batch_per_clip_draws() -> None:
    clip = _clip()
    batch = torch.stack([clip] * 6)
    out = augment_batch(batch, generator=torch.Generator().manual_seed(2))
    assert out.shape == batch.shape
    assert len({tuple(o.flatten()[:50].tolist()) for o in out}) > 1
    # The batch path gives what the single-clip path gives for the same draws.
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    single = torch.stack([augment_clip(c, generator=g1) for c in batch])
    torch.testing.assert_close(augment_batch(batch, generator=g2), single, atol=1e-5, rtol=0)


def test_shape_and_config_errors() -> None:
    with pytest.raises(ValueError):
        augment_clip(torch.rand(4, 16, 16))
    with pytest.raises(ValueError):
        augment_batch(torch.rand(3, 4, 16, 16))
    with pytest.raises(ValueError):
        AugmentConfig(p_flip=1.5)
    with pytest.raises(ValueError):
        rotate_clip(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), 5)


def test_the_shift_scales_with_the_frame_size() -> None:
    """8 px is the paper's shift at 112 px; a 32 px frame shifts by the same fraction, not by a quarter of it."""
    assert [pad_for_size(s) for s in (112, 64, 48, 32, 16, 4)] == [8, 5, 3, 2, 1, 1]
    cfg = AugmentConfig.for_size(32)
    assert cfg.pad == 2 and (cfg.p_flip, cfg.p_rotate, cfg.max_degrees) == (0.5, 0.5, 10)
    g = torch.Generator().manual_seed(0)
    draws = [sample_params(cfg, g) for _ in range(500)]
    assert max(max(abs(p.dy), abs(p.dx)) for p in draws) == 2
    with pytest.raises(ValueError, match="size"):
        pad_for_size(0)
