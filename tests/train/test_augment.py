"""Tests for train.augment: shift, flip, rotation, the change of look, and their random draws."""

from __future__ import annotations

import pytest
import torch

from train.augment import (
    AppearanceConfig,
    AugmentConfig,
    AugmentParams,
    apply_appearance,
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


def _sector_clip(frames: int = 4, size: int = 32) -> torch.Tensor:
    """Grey levels 1-255 inside a disc (the sector), 0 outside in every frame."""
    g = torch.Generator().manual_seed(3)
    clip = torch.rand(1, frames, size, size, generator=g) * 254 + 1
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    outside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 > (size / 2.5) ** 2
    clip[..., outside] = 0
    return clip


def test_appearance_keeps_the_outside_dark_and_the_range() -> None:
    clip = _sector_clip()
    outside = (clip == 0).all(dim=1, keepdim=True).expand_as(clip)
    cfg = AppearanceConfig(max_offset=60.0, p_blur=1.0, p_speckle=1.0)
    for seed in range(20):
        out = apply_appearance(clip, cfg, torch.Generator().manual_seed(seed))
        assert out.shape == clip.shape and out.dtype == clip.dtype
        assert float(out[outside].abs().max()) == 0.0
        assert float(out.min()) >= 0.0 and float(out.max()) <= 255.0
    assert float(clip[outside].abs().max()) == 0.0  # input untouched


def test_appearance_without_blur_or_speckle_is_one_monotone_grey_map_per_clip() -> None:
    # The grey map never reorders grey levels, and every frame gets the same
    # one: wall brightness order, and so wall edges, survive.
    clip = _sector_clip(frames=3)
    clip[:, 2] = clip[:, 0]
    cfg = AppearanceConfig(p_blur=0.0, p_speckle=0.0, max_offset=10.0)
    changed = 0
    for seed in range(10):
        out = apply_appearance(clip, cfg, torch.Generator().manual_seed(seed))
        inside = clip > 0
        x, y = clip[inside], out[inside]
        order = torch.argsort(x)
        assert bool((y[order].diff() >= -1e-3).all())
        assert torch.equal(out[:, 2], out[:, 0])  # one map for all frames
        changed += float((out - clip).abs().max()) > 1.0
    assert changed >= 8


def test_appearance_draws_are_seeded_and_differ_between_draws() -> None:
    clip = _sector_clip()
    cfg = AppearanceConfig()
    a = apply_appearance(clip, cfg, torch.Generator().manual_seed(5))
    b = apply_appearance(clip, cfg, torch.Generator().manual_seed(5))
    c = apply_appearance(clip, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_appearance_is_off_unless_asked_and_reaches_augment_clip() -> None:
    assert AugmentConfig.for_size(32).appearance is None
    cfg = AugmentConfig.for_size(32, appearance=True)
    assert cfg.appearance == AppearanceConfig()
    clip = _sector_clip()
    plain = augment_clip(clip, AugmentConfig.for_size(32), torch.Generator().manual_seed(1))
    looked = augment_clip(clip, cfg, torch.Generator().manual_seed(1))
    assert plain.shape == looked.shape and not torch.equal(plain, looked)
    batch = augment_batch(torch.stack([clip, clip]), cfg, torch.Generator().manual_seed(1))
    assert batch.shape == (2, *clip.shape)


def test_appearance_config_errors() -> None:
    with pytest.raises(ValueError, match="p_blur"):
        AppearanceConfig(p_blur=1.5)
    with pytest.raises(ValueError, match="max_offset"):
        AppearanceConfig(max_offset=-1.0)
    with pytest.raises(ValueError, match="floating point"):
        apply_appearance(torch.zeros(1, 2, 8, 8, dtype=torch.uint8), AppearanceConfig())
