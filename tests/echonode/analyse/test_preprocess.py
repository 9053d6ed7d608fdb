"""Tests for echonode.analyse.preprocess: sector mask, crop/resize, clips."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from echonode.analyse.decode import DecodedVideo, UnusableObject, decode_video
from echonode.analyse.preprocess import (
    PreprocessConfig,
    decode_options_for,
    eval_clip_starts,
    make_eval_clips,
    normalise_clip,
    preprocess_file,
    preprocess_video,
    resample_fps,
    sector_mask,
    training_clip,
)
from echonode.analyse.preprocess_config import MASK_MIN_SIDE
from echonode.analyse.regions import PixelSpacing
from tests.conftest import real_testfile


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture(scope="module")
def sonosite_path() -> str:
    return str(real_testfile("color3d_jpeg_baseline.dcm"))


@pytest.fixture(scope="module")
def sonosite_full(sonosite_path: str) -> DecodedVideo:
    """First 32 frames of the real loop at full size (480x640)."""
    return decode_video(sonosite_path, max_frames=32)


# --------------------------------------------------------------------------
# Synthetic videos of known geometry


def _fan(h: int, w: int, apex: tuple[int, int], radius: float, half_angle_deg: float) -> np.ndarray:
    """Boolean circular sector opening downwards from ``apex`` (row, col)."""
    y, x = np.mgrid[0:h, 0:w]
    dy, dx = y - apex[0], x - apex[1]
    r = np.hypot(dy, dx)
    angle = np.degrees(np.arctan2(dx, dy))  # 0 straight down
    return (r <= radius) & (np.abs(angle) <= half_angle_deg) & (dy >= 0)


def _synthetic_video(
    t: int = 40, h: int = 240, w: int = 320, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """An echo-like loop with overlays that defeat a first-frame threshold.

    Returns the video and the true sector mask. The overlays: a bright
    static text block top left, a static depth scale whose ticks *touch* the
    sector's right edge, a static menu bar along the bottom, a static icon
    over the apex, a static label overlapping the left edge, and an ECG trace
    that moves, below the sector.
    """
    rng = np.random.default_rng(seed)
    fan = _fan(h, w, apex=(12, w // 2), radius=180, half_angle_deg=40)
    video = np.zeros((t, h, w), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    pool = ((yy - 100) / 30.0) ** 2 + ((xx - w // 2) / 22.0) ** 2 <= 1  # dark cavity
    ecg_x = np.arange(20, w - 20)
    for i in range(t):
        speckle = rng.gamma(2.0, 30.0, size=(h, w))
        speckle[pool] *= 0.15
        frame = np.where(fan, np.clip(speckle, 0, 255), 0).astype(np.uint8)
        # ECG: 1-2 px trace that scrolls with time, below the sector.
        ecg_y = (218 + 5 * np.sin((ecg_x + 6 * i) / 9.0)).astype(int)
        frame[ecg_y, ecg_x] = 200
        frame[ecg_y + 1, ecg_x] = 200
        video[i] = frame
    # Static overlays, identical in every frame.
    video[:, 4:30, 4:90] = np.where((np.arange(4, 90) // 3) % 2 == 0, 230, 40).astype(np.uint8)
    right_edge = np.where(fan[100])[0].max()
    for row in range(40, 190, 12):  # depth-scale ticks reaching into the sector edge
        edge = np.where(fan[row])[0]
        if edge.size:
            video[:, row : row + 2, edge.max() - 2 : right_edge + 30] = 255
    video[:, 228:240, :] = 180  # menu bar
    video[:, 2:22, w // 2 - 8 : w // 2 + 8] = 250  # icon over the apex
    left = np.where(fan[130])[0].min()
    video[:, 124:140, left - 40 : left + 6] = 220  # label overlapping the left edge
    return video, fan


def test_synthetic_mask_iou() -> None:
    video, truth = _synthetic_video()
    mask = sector_mask(video)
    assert _iou(mask, truth) > 0.9
    # None of the overlays survive.
    assert not mask[4:30, 4:90].any()
    assert not mask[228:, :].any()
    assert not mask[205:228, :].any()  # ECG band


def test_a_chamber_across_the_sector_does_not_crop_the_mask() -> None:
    """Black, still blood spanning the sector (a PLAX right ventricle) cuts the
    moving tissue into bands: the mask is still the whole sector, and the ECG
    band below it (moving, as large as a band) stays out."""
    video, truth = _synthetic_video()
    video = video.copy()
    chamber = truth.copy()
    chamber[:70] = chamber[100:] = False  # rows 70-99 of the fan: blood from edge to edge
    video[:, chamber] = 0
    upper = truth.copy()
    upper[70:] = False
    assert upper.sum() > 0.1 * (truth.sum() - upper.sum() - chamber.sum())  # a band worth keeping
    mask = sector_mask(video)
    assert _iou(mask, truth) > 0.9
    assert mask[20:70][truth[20:70]].mean() > 0.95 and mask[100:190][truth[100:190]].mean() > 0.95
    assert not mask[205:228, :].any()  # ECG band


def test_first_frame_recipe_fails_where_motion_succeeds() -> None:
    """METHOD's single-frame recipe swallows overlays touching the sector."""
    video, truth = _synthetic_video()
    single = sector_mask(video[0])
    temporal = sector_mask(video)
    assert _iou(temporal, truth) > 0.95 > _iou(single, truth)


def test_static_single_frame_falls_back_to_intensity() -> None:
    fan = _fan(200, 260, apex=(10, 130), radius=170, half_angle_deg=35)
    rng = np.random.default_rng(1)
    frame = np.where(fan, rng.integers(40, 255, size=fan.shape), 0).astype(np.uint8)
    frame[5:20, 5:40] = 255  # text block, separate from the sector
    assert _iou(sector_mask(frame), fan) > 0.9
    # A loop of identical frames has no motion: the same fallback applies.
    frozen = np.repeat(frame[None], 10, axis=0)
    assert _iou(sector_mask(frozen), fan) > 0.9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_mask_at_reduced_size(seed: int) -> None:
    """The mask works on DCT-reduced frames (what the fast path produces)."""
    video, truth = _synthetic_video(seed=seed)
    small = video[:, ::4, ::4]
    assert _iou(sector_mask(small), truth[::4, ::4]) > 0.85


def test_blank_video_has_no_sector() -> None:
    assert not sector_mask(np.zeros((10, 64, 64), np.uint8)).any()


# --------------------------------------------------------------------------
# The real SonoSite loop


def test_real_mask_excludes_overlays(sonosite_full: DecodedVideo) -> None:
    frames = sonosite_full.frames
    assert frames.shape[1:] == (480, 640)
    mask = sector_mask(frames)
    assert not mask[0:60, 0:90].any(), "burned-in text top left"
    assert not mask[0:70, 570:].any(), "burned-in text top right"
    assert not mask[:, 600:].any(), "depth scale and labels on the right"
    assert not mask[395:415, 570:595].any(), "depth label '19'"
    assert not mask[30:50, 372:390].any(), "green dot"
    assert not mask[450:, :].any(), "menu bar at the bottom"
    assert mask[200:260, 300:380].all(), "sector centre"
    assert mask[60, 340] and mask[380, 340], "sector apex and bottom"
    assert 0.25 < mask.mean() < 0.45


def test_real_mask_same_at_reduced_size(sonosite_path: str, sonosite_full: DecodedVideo) -> None:
    full = sector_mask(sonosite_full.frames)
    small = sector_mask(decode_video(sonosite_path, target_side=112, max_frames=32).frames)
    assert small.shape == (120, 160)
    assert _iou(small, full[2::4, 2::4]) > 0.9


def test_preprocess_real_loop(sonosite_path: str) -> None:
    cfg = PreprocessConfig()
    video, frames = preprocess_file(sonosite_path, cfg)
    assert video.fast_path and video.fps == pytest.approx(30.0, abs=0.01)
    assert frames.shape == (100, 112, 112) and frames.dtype == np.uint8
    # The sector is wider than tall: the square is padded top and bottom.
    assert frames[:, :3, :].max() == 0 and frames[:, -3:, :].max() == 0
    assert frames[:, 50:60, 50:60].mean() > 5  # live image in the middle
    clips = make_eval_clips(frames, cfg)
    assert clips.shape == (4, 3, 16, 112, 112) and clips.dtype == np.float32
    assert np.isfinite(clips).all() and clips.min() == 0.0 and clips.max() == 1.0


# --------------------------------------------------------------------------
# preprocess_video on synthetic input


def _decoded(frames: np.ndarray, fps: float = 30.0) -> DecodedVideo:
    return DecodedVideo(
        frames=frames, fps=fps, study_uid="1.2", series_uid="1.2.3", sop_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.3.1", source_rows=frames.shape[1],
        source_cols=frames.shape[2], scale=1.0,
    )


def test_preprocess_video_masks_crops_and_keeps_aspect() -> None:
    video, truth = _synthetic_video(t=40)
    out = preprocess_video(_decoded(video), PreprocessConfig(size=64, max_frames=30))
    assert out.shape == (30, 64, 64) and out.dtype == np.uint8
    ys, xs = np.nonzero(truth)
    aspect = (ys.max() - ys.min() + 1) / (xs.max() - xs.min() + 1)  # < 1: wide sector
    rows_used = np.nonzero(out.max(axis=(0, 2)))[0]
    cols_used = np.nonzero(out.max(axis=(0, 1)))[0]
    assert cols_used.min() <= 1 and cols_used.max() >= 62  # full width
    height = rows_used.max() - rows_used.min() + 1
    assert abs(height - 64 * aspect) <= 3  # padded, not stretched
    assert out[:, :4, :4].max() == 0  # text block outside the mask is gone


def test_preprocess_video_blank_is_unusable() -> None:
    with pytest.raises(UnusableObject, match="no ultrasound sector"):
        preprocess_video(_decoded(np.zeros((20, 64, 64), np.uint8)))


def test_preprocess_video_resamples_when_asked() -> None:
    video, _ = _synthetic_video(t=40)
    out = preprocess_video(_decoded(video, fps=60.0), PreprocessConfig(size=32, target_fps=30.0))
    assert out.shape[0] == 20


def test_resample_fps() -> None:
    frames = np.arange(10)[:, None, None]
    assert resample_fps(frames, 60.0, 30.0)[:, 0, 0].tolist() == [0, 2, 4, 6, 8]
    assert resample_fps(frames, 30.0, 30.0) is frames
    up = resample_fps(frames, 25.0, 50.0)[:, 0, 0].tolist()
    assert len(up) == 19 and up[:6] == [0, 1, 1, 2, 2, 3] and up[-1] == 9


def test_config_validation() -> None:
    with pytest.raises(ValueError, match='"size"'):
        PreprocessConfig(size=0)
    with pytest.raises(ValueError, match='"target_fps"'):
        PreprocessConfig(target_fps=-1.0)


# --------------------------------------------------------------------------
# Clips


@pytest.mark.parametrize(
    ("n", "clip", "k", "starts"),
    [(100, 16, 4, [0, 28, 56, 84]), (16, 16, 4, [0, 0, 0, 0]), (10, 16, 4, [0, 0, 0, 0]),
     (46, 16, 4, [0, 10, 20, 30]), (50, 16, 1, [0])],
)
def test_eval_clip_starts(n: int, clip: int, k: int, starts: list[int]) -> None:
    assert eval_clip_starts(n, clip, k) == starts


def test_normalise_clip() -> None:
    clip = np.array([[10, 20], [30, 110]], dtype=np.uint8)
    out = normalise_clip(clip)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert out[0, 1] == pytest.approx(0.1)
    const = normalise_clip(np.full((4, 8, 8), 77, np.uint8))
    assert not np.isnan(const).any() and (const == 0).all()


def test_make_eval_clips_pads_short_videos() -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(20, 200, size=(10, 8, 8), dtype=np.uint8)
    clips = make_eval_clips(frames, PreprocessConfig(size=8, clip_frames=16, eval_clips=4))
    assert clips.shape == (4, 3, 16, 8, 8)
    assert (clips[:, :, 10:] == 0).all()  # zero padding after the real frames
    assert clips[:, :, :10].min() == 0.0 and clips[:, :, :10].max() == 1.0
    assert np.array_equal(clips[:, 0], clips[:, 2])  # grey repeated to 3 channels


def test_make_eval_clips_each_clip_normalised_alone() -> None:
    frames = np.zeros((64, 4, 4), np.uint8)
    frames[:16] = np.arange(16, dtype=np.uint8)[:, None, None]  # dim first clip
    frames[16:] = np.linspace(100, 250, 48).astype(np.uint8)[:, None, None]
    clips = make_eval_clips(frames, PreprocessConfig(size=4, clip_frames=16, eval_clips=4))
    for c in clips:
        assert c.min() == 0.0 and c.max() == pytest.approx(1.0)


def test_make_eval_clips_constant_video() -> None:
    clips = make_eval_clips(np.full((20, 4, 4), 9, np.uint8), PreprocessConfig(size=4))
    assert np.isfinite(clips).all() and (clips == 0).all()


def test_training_clip() -> None:
    frames = np.arange(30, dtype=np.uint8)[:, None, None] * np.ones((1, 4, 4), np.uint8)
    rng = np.random.default_rng(3)
    starts = {int(training_clip(frames, 4, rng)[0, 0, 0]) for _ in range(200)}
    assert starts == set(range(27))  # every start 0..26 reachable, none beyond
    clip = training_clip(frames, 4, np.random.default_rng(0))
    assert clip.shape == (4, 4, 4) and clip.dtype == np.uint8
    assert np.array_equal(clip[:, 0, 0], np.arange(clip[0, 0, 0], clip[0, 0, 0] + 4))
    short = training_clip(frames[:3], 4, rng)
    assert np.array_equal(short[:3], frames[:3]) and (short[3] == 0).all()


def test_frame_framing_resizes_the_whole_masked_frame_and_sector_keeps_aspect() -> None:
    # A wide sector in a tall frame: sector framing pads it into a centred
    # band; frame framing stretches the whole (masked) frame to the square.
    frames = np.zeros((6, 200, 100), dtype=np.uint8)
    rng = np.random.default_rng(0)
    frames[:, 80:120, 10:90] = rng.integers(40, 255, size=(6, 40, 80), dtype=np.uint8)
    video = _decoded(frames)
    sector = preprocess_video(video, PreprocessConfig(size=32))
    whole = preprocess_video(video, PreprocessConfig(size=32, framing="frame"))
    assert sector.shape == whole.shape == (6, 32, 32)
    rows_sector = np.nonzero(sector.max(axis=(0, 2)))[0]
    rows_whole = np.nonzero(whole.max(axis=(0, 2)))[0]
    # sector: 80 px wide -> 32, 40 px tall -> 16 rows, centred
    assert rows_sector.min() == 8 and rows_sector.max() == 23
    # frame: rows 80..120 of 200 -> about rows 12.8..19.2 of 32
    assert 12 <= rows_whole.min() <= 13 and 18 <= rows_whole.max() <= 19


def test_preprocess_config_round_trips_through_bundle_metadata() -> None:
    cfg = PreprocessConfig(size=64, clip_frames=8, eval_clips=2, max_frames=50, min_fps=20.0, framing="frame")
    assert PreprocessConfig.from_meta(cfg.to_meta()) == cfg
    old_bundle = {"size": 112, "clip_frames": 16, "eval_clips": 4, "max_frames": 100, "min_fps": 25.0,
                  "normalisation": "minmax"}
    assert PreprocessConfig.from_meta(old_bundle).framing == "sector"
    with pytest.raises(ValueError, match="lacks eval_clips"):
        PreprocessConfig.from_meta({"size": 112, "clip_frames": 16, "max_frames": 100, "min_fps": 25.0})
    with pytest.raises(ValueError, match="framing"):
        PreprocessConfig(framing="stretch")


# --------------------------------------------------------------------------
# Physical framing: one input pixel is the same size in cm in every video


def _calibrated_fan(depth_cm: float, cm_per_px: float, band_cm: tuple[float, float], seed: int = 0,
                    still_near_cm: float = 0.0, with_origin: bool = False) -> DecodedVideo:
    """A moving fan ``depth_cm`` deep with a bright band between two depths, at ``cm_per_px``.

    ``still_near_cm``: the first centimetres are black (a blunted apex, a
    still near field); ``with_origin``: the calibration says where the apex is.
    """
    radius = int(round(depth_cm / cm_per_px))
    h, w = radius + 20, 2 * radius + 20
    apex = (4, w // 2)
    fan = _fan(h, w, apex=apex, radius=radius, half_angle_deg=40)
    rng = np.random.default_rng(seed)
    rows_cm = (np.arange(h) - apex[0]) * cm_per_px
    band = (rows_cm >= band_cm[0]) & (rows_cm < band_cm[1])
    frames = np.zeros((12, h, w), dtype=np.uint8)
    for i in range(12):
        tissue = rng.integers(20, 90, size=(h, w))
        tissue[band, :] = 250
        tissue[rows_cm < still_near_cm, :] = 0
        frames[i] = np.where(fan, tissue, 0)
    origin = (float(apex[0]), float(apex[1])) if with_origin else None
    return dataclasses.replace(_decoded(frames), spacing=PixelSpacing(cm_per_px, cm_per_px, (0, 0, w - 1, h - 1), origin))


def _band_rows(out: np.ndarray) -> np.ndarray:
    centre = out[:, :, out.shape[2] // 2 - 2 : out.shape[2] // 2 + 2].mean(axis=(0, 2))
    return np.nonzero(centre > 170)[0]


def test_physical_framing_keeps_a_wall_the_same_size_whatever_the_depth() -> None:
    # A 1.2 cm band at 7-8.2 cm, imaged at 12 cm and at 20 cm depth with
    # different pixel sizes. Sector framing scales each sector to the input,
    # so the band's size in input pixels follows the depth; physical framing
    # (16 cm at 64 px: 0.25 cm a pixel) gives it 4.8 pixels, 28 rows down, in both.
    cfg = PreprocessConfig(size=64, framing="physical", field_cm=16.0)
    shallow = _calibrated_fan(12.0, 0.05, (7.0, 8.2))
    deep = _calibrated_fan(20.0, 0.09, (7.0, 8.2))
    physical = [_band_rows(preprocess_video(v, cfg)) for v in (shallow, deep)]
    sector = [_band_rows(preprocess_video(v, PreprocessConfig(size=64))) for v in (shallow, deep)]
    for rows in physical:
        assert 4 <= rows.size <= 6
        assert abs(int(rows.min()) - 28) <= 1
    assert abs(physical[0].size - physical[1].size) <= 1
    assert sector[0].size - sector[1].size >= 2  # the nuisance physical framing removes


def test_physical_framing_pads_what_lies_beyond_the_image() -> None:
    # An 8 cm sector in a 16 cm window: the lower half of the input is empty.
    video = _calibrated_fan(8.0, 0.05, (3.0, 4.0))
    out = preprocess_video(video, PreprocessConfig(size=32, framing="physical", field_cm=16.0))
    assert out.shape == (12, 32, 32)
    assert out[:, 18:, :].max() == 0 and out[:, :14, :].max() > 0


def test_physical_framing_refuses_a_video_without_calibration() -> None:
    video, _ = _synthetic_video(t=12)
    with pytest.raises(UnusableObject, match="calibrated"):
        preprocess_video(_decoded(video), PreprocessConfig(size=32, framing="physical"))


def test_physical_framing_refuses_a_pixel_size_that_cannot_be_this_images() -> None:
    video = _calibrated_fan(12.0, 0.05, (7.0, 8.2))
    tiny_pixels = dataclasses.replace(video, spacing=PixelSpacing(0.001, 0.001, (0, 0, 10, 10)))
    with pytest.raises(UnusableObject, match="implausible calibration"):
        preprocess_video(tiny_pixels, PreprocessConfig(size=32, framing="physical", field_cm=16.0))


def test_physical_framing_of_the_real_loop_at_full_and_reduced_size() -> None:
    # The decoder's JPEG reduction changes the pixel size; the window in cm does not.
    path = real_testfile("color3d_jpeg_baseline.dcm")
    cfg = PreprocessConfig(size=48, framing="physical", field_cm=16.0, max_frames=16)
    video, reduced = preprocess_file(path, cfg)
    # The decoder stops reducing before a pixel outgrows the input's (16/48 cm).
    assert video.scale == 0.25 and video.spacing is not None and video.spacing.row_cm <= 16 / 48
    full = preprocess_video(decode_video(path, max_frames=16), cfg)
    assert reduced.shape == full.shape == (16, 48, 48)
    assert np.abs(reduced.astype(int) - full.astype(int)).mean() < 12


def test_physical_settings_round_trip_and_are_recorded_only_for_that_framing() -> None:
    cfg = PreprocessConfig(size=48, framing="physical", field_cm=14.0)
    assert cfg.to_meta()["field_cm"] == 14.0
    assert PreprocessConfig.from_meta(cfg.to_meta()) == cfg
    assert "field_cm" not in PreprocessConfig(size=48).to_meta()
    for bad in (1.0, 41.0, True, "16"):
        with pytest.raises(ValueError, match="field_cm"):
            PreprocessConfig(framing="physical", field_cm=bad)  # type: ignore[arg-type]


def test_physical_framing_hangs_from_the_calibrated_apex_not_the_first_moving_row() -> None:
    # The first 1.5 cm are black: without an origin the window starts where
    # the moving sector starts and the band moves up 6 rows (1.5 / 0.25 cm);
    # with the calibration's origin it stays 28 rows down.
    cfg = PreprocessConfig(size=64, framing="physical", field_cm=16.0)
    blunt = _calibrated_fan(14.0, 0.06, (7.0, 8.2), still_near_cm=1.5)
    located = _calibrated_fan(14.0, 0.06, (7.0, 8.2), still_near_cm=1.5, with_origin=True)
    assert abs(int(_band_rows(preprocess_video(located, cfg)).min()) - 28) <= 1
    assert abs(int(_band_rows(preprocess_video(blunt, cfg)).min()) - 22) <= 1


def test_small_models_get_frames_large_enough_for_the_mask_and_the_same_frames_whatever_else_runs(
    sonosite_path: str, sonosite_full: DecodedVideo
) -> None:
    # A 32 px model alone once had the real loop decoded at 1/8 (60x80), where
    # the speckle's motion at the sector's dim edges averages away: its mask
    # lost a third of the width and the model saw a zoomed crop. Installed
    # beside a model that needed more pixels, it saw another picture.
    small = PreprocessConfig(size=32, clip_frames=8)
    assert decode_options_for([small]).target_side == MASK_MIN_SIDE
    video, alone = preprocess_file(sonosite_path, small)
    assert min(video.frames.shape[1:]) >= MASK_MIN_SIDE
    assert _iou(sector_mask(video.frames), sector_mask(sonosite_full.frames)[2::4, 2::4]) > 0.9
    beside = PreprocessConfig(size=48, framing="physical", field_cm=16.0)
    both = decode_video(sonosite_path, decode_options_for([small, beside]))
    np.testing.assert_array_equal(preprocess_video(both, small), alone)
