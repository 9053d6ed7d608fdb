"""bench/reorder_probe.py: the frame-order cue is found where frames carry their order, not where they don't."""

from __future__ import annotations

import torch

from bench import reorder_probe
from train.losses import NUM_PERMUTATIONS, permute_clip


def _clips(n: int, seed: int, moving: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Permuted 4-frame clips: a textured square drifting one pixel a frame, or frames of independent noise."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for _ in range(n):
        if moving:
            # A smooth texture: the farther it moves, the more a frame differs from the first.
            texture = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 24, 32, generator=g), 9, 1, 4)[0]
            speed = 1 + int(torch.randint(0, 3, (1,), generator=g))  # the heart rate differs between clips
            frames = [texture.roll(t * speed, dims=-1)[:, 4:20, 8:24] for t in range(4)]
        else:
            frames = [torch.rand(1, 16, 16, generator=g) for _ in range(4)]
        clip = torch.stack(frames, dim=1)  # (C, T, S, S)
        p = int(torch.randint(0, NUM_PERMUTATIONS, (1,), generator=g))
        xs.append(permute_clip(clip, p))
        ys.append(p)
    return torch.stack(xs), torch.tensor(ys)


def test_difference_features_are_scale_free() -> None:
    x, _ = _clips(4, 0, moving=True)
    f = reorder_probe.difference_features(x)
    assert f.shape == (4, 6 + 36)
    # Scale-free: doubling the contrast of every frame leaves the features as they are.
    assert torch.allclose(reorder_probe.difference_features(2 * x), f, atol=1e-5)


def test_cue_finds_the_order_of_moving_frames_and_not_of_noise() -> None:
    moving = reorder_probe.cue_accuracy(_clips(1500, 1, True), _clips(400, 2, True))
    noise = reorder_probe.cue_accuracy(_clips(1500, 3, False), _clips(400, 4, False))
    # A drifting texture gives its order away (up to reversal, 1 in 2, at worst); noise gives chance (1/24).
    assert moving > 0.3, moving
    assert noise < 0.1, noise
