"""Training-time augmentation of video clips (METHOD.md).

Each view of a pair is augmented independently; within one clip every frame
gets the same transform (a per-frame transform would make the frame-reordering
task trivially solvable from augmentation artefacts and would not be an echo
acquisition variation either):

1. zero-pad 8 px on every side, then crop back to the original size at a
   random offset (a shift of up to 8 px with zero fill); 8 px is for the
   paper's 112 px frames, and other frame sizes shift by the same fraction
   of the frame (:func:`pad_for_size`: 2 px at 32 px);
2. horizontal flip with p = 0.5;
3. rotation by an integer angle in [-10, 10] degrees with p = 0.5, about the
   centre, zero fill, bilinear interpolation.

Fine-tuning can add a change of *look* (``--appearance``; off by default,
the paper has none): the same heart imaged by another cart, preset or
operator. One draw per clip, applied to the grey levels (0-255) inside the
sector, after the geometry (:class:`AppearanceConfig`):

4. a grey map: ``255 * (x / 255) ** gamma``, ``gamma = exp(U(-g, g))``;
5. gain and contrast: ``x * exp(U(-c, c)) + U(-o, o)``, clipped to 0-255;
6. with p = 0.5 a Gaussian blur of the frames (sigma up to ``max_blur``
   px), another lateral resolution;
7. with p = 0.5 a multiplicative speckle field of another grain: noise
   drawn per frame at a coarser grid, smoothed up to the frame size.

The sector's outside stays 0 (a lift of the background would be a cue no
cart gives). These are for models that must hold up on another rendering
or another vendor's look; they change nothing a measurement depends on.

Everything is torch on ``(C, T, H, W)`` (one clip) or ``(B, C, T, H, W)``
(a batch, every clip with its own draw). Randomness comes from an explicit
:class:`torch.Generator`, so a dataset can key the draw on (seed, epoch,
index) and a resumed run sees the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "AppearanceConfig",
    "AugmentConfig",
    "AugmentParams",
    "apply_appearance",
    "apply_params",
    "augment_batch",
    "augment_clip",
    "flip_clip",
    "pad_for_size",
    "rotate_clip",
    "sample_params",
    "shift_clip",
]


PAPER_SIZE = 112
"""Frame side (px) the paper's augmentation settings are for."""
PAPER_PAD = 8
"""The paper's maximum shift (px) at :data:`PAPER_SIZE`."""


def pad_for_size(size: int) -> int:
    """The paper's maximum shift scaled to frames of ``size`` pixels (8 px at 112 px, at least 1).

    An 8 px shift is 7 % of a 112 px frame but a quarter of a 32 px one: at
    small sizes it would move the heart out of the frame it is learnt from.
    """
    if size < 1:
        raise ValueError(f'Argument "size" must be a positive integer; got {size}.')
    return max(1, round(PAPER_PAD * size / PAPER_SIZE))


@dataclass(frozen=True)
class AppearanceConfig:
    """Ranges of the change of look (steps 4-7 of the module's list).

    Attributes
    ----------
    max_log_gamma : float
        ``gamma = exp(U(-max_log_gamma, max_log_gamma))`` (0.4: 0.67-1.49).
    max_log_contrast : float
        Grey levels scaled by ``exp(U(-max_log_contrast, max_log_contrast))``.
    max_offset : float
        Grey levels shifted by ``U(-max_offset, max_offset)`` (of 255).
    p_blur, max_blur : float
        Probability of a blur, and its largest sigma in pixels of the frame.
    p_speckle, max_speckle : float
        Probability of a speckle field, and its largest relative amplitude.
    """

    max_log_gamma: float = 0.4
    max_log_contrast: float = 0.3
    max_offset: float = 20.0
    p_blur: float = 0.5
    max_blur: float = 1.0
    p_speckle: float = 0.5
    max_speckle: float = 0.3

    def __post_init__(self) -> None:
        for name in ("p_blur", "p_speckle"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f'Argument "{name}" must be in [0, 1]; got {getattr(self, name)}.')
        for name in ("max_log_gamma", "max_log_contrast", "max_offset", "max_blur", "max_speckle"):
            if getattr(self, name) < 0:
                raise ValueError(f'Argument "{name}" must be >= 0; got {getattr(self, name)}.')


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings; the defaults are the paper's.

    Attributes
    ----------
    pad : int
        Zero padding before the random crop; the maximum shift in pixels.
    p_flip : float
        Probability of a horizontal flip.
    p_rotate : float
        Probability of a rotation.
    max_degrees : int
        Rotation angles are integers in ``[-max_degrees, max_degrees]``.
    appearance : AppearanceConfig or None
        The change of look after the geometry; None (the paper): none.
    """

    pad: int = PAPER_PAD
    p_flip: float = 0.5
    p_rotate: float = 0.5
    max_degrees: int = 10
    appearance: AppearanceConfig | None = None

    @classmethod
    def for_size(cls, size: int, appearance: bool = False) -> AugmentConfig:
        """The paper's settings with the shift scaled to ``size`` px frames (:func:`pad_for_size`).

        ``appearance`` adds the change of look with :class:`AppearanceConfig`'s defaults.
        """
        return cls(pad=pad_for_size(size), appearance=AppearanceConfig() if appearance else None)

    def __post_init__(self) -> None:
        if self.pad < 0:
            raise ValueError(f'Argument "pad" must be >= 0; got {self.pad}.')
        for name in ("p_flip", "p_rotate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f'Argument "{name}" must be in [0, 1]; got {value}.')
        if self.max_degrees < 0:
            raise ValueError(f'Argument "max_degrees" must be >= 0; got {self.max_degrees}.')


@dataclass(frozen=True)
class AugmentParams:
    """One draw of the augmentation for one clip.

    Attributes
    ----------
    dy, dx : int
        Shift of the content in pixels (down, right), in ``[-pad, pad]``.
    flip : bool
        Horizontal flip.
    degrees : int
        Rotation angle, counter-clockwise as displayed; 0 for none.
    """

    dy: int = 0
    dx: int = 0
    flip: bool = False
    degrees: int = 0


def _check_clip(clip: torch.Tensor, name: str = "clip") -> None:
    if clip.ndim != 4:
        raise ValueError(f'Argument "{name}" must be (C, T, H, W); got shape {tuple(clip.shape)}.')


def sample_params(cfg: AugmentConfig = AugmentConfig(), generator: torch.Generator | None = None) -> AugmentParams:
    """Draw one clip's augmentation parameters.

    Parameters
    ----------
    cfg : AugmentConfig
        Settings.
    generator : torch.Generator, optional
        Source of randomness; torch's global one when omitted.

    Returns
    -------
    AugmentParams
    """
    u = torch.rand(2, generator=generator)
    # Crop offset in the padded frame is uniform over 0..2*pad inclusive,
    # i.e. a shift uniform over -pad..pad (torchvision's RandomCrop(padding)).
    offset = torch.randint(0, 2 * cfg.pad + 1, (2,), generator=generator)
    angle = int(torch.randint(-cfg.max_degrees, cfg.max_degrees + 1, (1,), generator=generator))
    rotate = bool(u[1] < cfg.p_rotate)
    return AugmentParams(
        dy=int(offset[0]) - cfg.pad,
        dx=int(offset[1]) - cfg.pad,
        flip=bool(u[0] < cfg.p_flip),
        degrees=angle if rotate else 0,
    )


def shift_clip(clip: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate the content of every frame by ``(dy, dx)`` pixels, zero fill.

    Equivalent to zero-padding by ``max(|dy|, |dx|)`` and cropping back.

    Parameters
    ----------
    clip : torch.Tensor
        ``(..., H, W)``.
    dy, dx : int
        Shift down and right (negative: up and left).

    Returns
    -------
    torch.Tensor
        A new tensor of the same shape.
    """
    h, w = clip.shape[-2:]
    out = torch.zeros_like(clip)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    src_y = slice(max(0, -dy), h - max(0, dy))
    dst_y = slice(max(0, dy), h - max(0, -dy))
    src_x = slice(max(0, -dx), w - max(0, dx))
    dst_x = slice(max(0, dx), w - max(0, -dx))
    out[..., dst_y, dst_x] = clip[..., src_y, src_x]
    return out


def flip_clip(clip: torch.Tensor) -> torch.Tensor:
    """Mirror every frame left-right."""
    return clip.flip(-1)


def _rotation_theta(degrees: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``(B, 2, 3)`` affine matrices for :func:`torch.nn.functional.affine_grid`.

    The matrix maps output to input coordinates; the aspect terms keep the
    rotation rigid in pixel units on non-square frames.
    """
    rad = degrees.to(torch.float64) * math.pi / 180.0
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(rad)
    # A counter-clockwise rotation as displayed (row 0 at the top): the output
    # pixel at (x, y) comes from (cos x - sin y, sin x + cos y).
    row0 = torch.stack([cos, -sin * h / w, zero], dim=-1)
    row1 = torch.stack([sin * w / h, cos, zero], dim=-1)
    return torch.stack([row0, row1], dim=-2)


def rotate_clip(clip: torch.Tensor, degrees: float | torch.Tensor) -> torch.Tensor:
    """Rotate every frame about the centre, zero fill, bilinear.

    Parameters
    ----------
    clip : torch.Tensor
        ``(C, T, H, W)`` or ``(B, C, T, H, W)``, floating point.
    degrees : float or torch.Tensor
        Counter-clockwise angle; a ``(B,)`` tensor rotates each clip of a
        batch by its own angle.

    Returns
    -------
    torch.Tensor
        A new tensor of the same shape and dtype.
    """
    if not clip.is_floating_point():
        raise ValueError('Argument "clip" must be floating point to be rotated.')
    single = clip.ndim == 4
    batch = clip.unsqueeze(0) if single else clip
    if batch.ndim != 5:
        raise ValueError(f'Argument "clip" must be (C, T, H, W) or (B, C, T, H, W); got {tuple(clip.shape)}.')
    b, c, t, h, w = batch.shape
    angles = torch.as_tensor(degrees, dtype=torch.float64).reshape(-1)
    if angles.numel() == 1:
        angles = angles.expand(b)
    if angles.numel() != b:
        raise ValueError(f'Argument "degrees" must have one angle or one per clip ({b}); got {angles.numel()}.')
    theta = _rotation_theta(angles, h, w).to(device=batch.device, dtype=batch.dtype)
    # Frames folded into channels: one 2-D grid, so all frames move together.
    flat = batch.reshape(b, c * t, h, w)
    grid = F.affine_grid(theta, [b, c * t, h, w], align_corners=False)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out.reshape(b, c, t, h, w)
    return out[0] if single else out


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur(frames: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, H, W)`` frames, edges replicated."""
    k = _gaussian_kernel(sigma).to(frames)
    r = (k.numel() - 1) // 2
    x = frames.unsqueeze(1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return x.squeeze(1)


def apply_appearance(clip: torch.Tensor, cfg: AppearanceConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Change the look of a ``(C, T, H, W)`` clip of grey levels (0-255) with one fresh draw.

    Parameters
    ----------
    clip : torch.Tensor
        Floating point, 0-255; not modified. Pixels at 0 in every frame
        (outside the sector, or filled by a shift or rotation) stay 0.
    cfg : AppearanceConfig
        The ranges.
    generator : torch.Generator, optional
        Source of randomness.

    Returns
    -------
    torch.Tensor
        Same shape and dtype, 0-255.
    """
    _check_clip(clip)
    if not clip.is_floating_point():
        raise ValueError('Argument "clip" must be floating point.')
    u = torch.rand(7, generator=generator, dtype=torch.float64).tolist()
    # Inside the sector: any pixel lit in some frame (a dark blood pool is
    # inside; the corners outside the fan are 0 in every frame).
    inside = (clip > 0).any(dim=1, keepdim=True)
    gamma = math.exp((2 * u[0] - 1) * cfg.max_log_gamma)
    contrast = math.exp((2 * u[1] - 1) * cfg.max_log_contrast)
    offset = (2 * u[2] - 1) * cfg.max_offset
    x = 255.0 * (clip.clamp(0, 255) / 255.0) ** gamma
    c, t, h, w = x.shape
    if u[3] < cfg.p_blur and cfg.max_blur > 0:
        sigma = max(0.3, u[4] * cfg.max_blur)
        x = _blur(x.reshape(c * t, h, w), sigma).reshape(c, t, h, w)
    if u[5] < cfg.p_speckle and cfg.max_speckle > 0:
        # Grain of 2-4 px: noise on a grid that much coarser, upsampled.
        grain = 2 + int(u[6] * 3)
        coarse = torch.randn(c * t, 1, max(1, h // grain), max(1, w // grain), generator=generator)
        field = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False).reshape(c, t, h, w)
        amplitude = float(torch.rand(1, generator=generator)) * cfg.max_speckle
        x = x * (1.0 + amplitude * field.to(x)).clamp_min(0.0)
    x = (x * contrast + offset).clamp(0.0, 255.0)
    return torch.where(inside, x, torch.zeros_like(x))


def apply_params(clip: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Apply one draw to a ``(C, T, H, W)`` clip: shift, flip, then rotate."""
    _check_clip(clip)
    out = shift_clip(clip, params.dy, params.dx)
    if params.flip:
        out = flip_clip(out)
    if params.degrees:
        out = rotate_clip(out, float(params.degrees))
    return out


def augment_clip(
    clip: torch.Tensor,
    cfg: AugmentConfig = AugmentConfig(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Augment one ``(C, T, H, W)`` float clip with a fresh draw.

    Parameters
    ----------
    clip : torch.Tensor
        The clip; it is not modified.
    cfg : AugmentConfig
        Settings.
    generator : torch.Generator, optional
        Source of randomness.

    Returns
    -------
    torch.Tensor

    Raises
    ------
    ValueError
        If ``clip`` is not 4-D.
    """
    _check_clip(clip)
    out = apply_params(clip, sample_params(cfg, generator))
    return out if cfg.appearance is None else apply_appearance(out, cfg.appearance, generator)


def augment_batch(
    clips: torch.Tensor,
    cfg: AugmentConfig = AugmentConfig(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Augment each clip of a ``(B, C, T, H, W)`` batch with its own draw.

    Shifts and flips are exact index operations; the rotation of all rotated
    clips is one batched ``grid_sample`` (useful on the GPU).

    Parameters
    ----------
    clips : torch.Tensor
        Float batch; not modified.
    cfg : AugmentConfig
        Settings.
    generator : torch.Generator, optional
        Source of randomness (on the CPU).

    Returns
    -------
    torch.Tensor
    """
    if clips.ndim != 5:
        raise ValueError(f'Argument "clips" must be (B, C, T, H, W); got shape {tuple(clips.shape)}.')
    params = [sample_params(cfg, generator) for _ in range(clips.shape[0])]
    out = torch.stack(
        [
            flip_clip(shift_clip(c, p.dy, p.dx)) if p.flip else shift_clip(c, p.dy, p.dx)
            for c, p in zip(clips, params, strict=True)
        ]
    )
    rotated = [i for i, p in enumerate(params) if p.degrees]
    if rotated:
        index = torch.tensor(rotated, device=clips.device)
        angles = torch.tensor([float(params[i].degrees) for i in rotated])
        out[index] = rotate_clip(out[index], angles)
    if cfg.appearance is not None:
        out = torch.stack([apply_appearance(c, cfg.appearance, generator) for c in out])
    return out
