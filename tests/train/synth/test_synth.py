"""Tests for the synthetic echo archive (train/synth.py).

The archive tests use one patient and 3 frames per video so that the whole
module runs in a few seconds on 2 cores.  The label tests render single
frames and measure the anatomy back from the pixels in centimetres, the way
a sonographer would: an intensity profile across the walls (LVH) or across
the aortic root at mid-systole (AS), scaled by the DICOM geometry.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import subprocess
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.peers import DCIODVFY, require_tool
from train import synth
from train.metrics import auroc
from train.synth import acquisition, anatomy, dicom, look, render, shortcuts, views
from train.synth import truth as T

FRAMES = 3


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    summary = synth.generate_archive(out, 1, seed=7, frames=FRAMES)
    assert summary.videos >= 3
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------- archive ---


def test_deterministic_by_seed(archive: Path, tmp_path: Path) -> None:
    again = tmp_path / "b"
    synth.generate_archive(again, 1, seed=7, frames=FRAMES)
    files_a = sorted(p.relative_to(archive) for p in archive.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (archive / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = tmp_path / "c"
    synth.generate_archive(other, 1, seed=8, frames=FRAMES)
    assert _read_csv(other / "labels.csv")[0]["study_uid"] != _read_csv(archive / "labels.csv")[0]["study_uid"]


def test_an_archive_without_reports_has_the_same_videos_and_labels(archive: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    summary = synth.generate_archive(bare, 1, seed=7, frames=FRAMES, reports=False)
    assert summary.reports == 0 and _read_csv(bare / "reports.csv") == []
    with_reports = sorted(p.relative_to(archive) for p in archive.rglob("*.dcm"))
    without = sorted(p.relative_to(bare) for p in bare.rglob("*.dcm"))
    assert without == [rel for rel in with_reports if rel.name != "900.dcm"] and len(without) < len(with_reports)
    for rel in without:
        assert (bare / rel).read_bytes() == (archive / rel).read_bytes(), rel
    for name in ("labels.csv", "videos.csv"):
        assert (bare / name).read_bytes() == (archive / name).read_bytes(), name


def test_dciodvfy_clean(archive: Path) -> None:
    path = sorted((archive / "dicom").rglob("*.dcm"))[0]
    res = subprocess.run([require_tool(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    errors = [ln for ln in (res.stdout + res.stderr).splitlines() if "Error" in ln]
    assert not errors, errors


def test_dicom_attributes_and_pixels(archive: Path) -> None:
    row = _read_csv(archive / "videos.csv")[0]
    ds = pydicom.dcmread(archive / row["path"])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.3.1"
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    assert (ds.SamplesPerPixel, ds.PlanarConfiguration, ds.BitsAllocated) == (3, 0, 8)
    assert int(ds.NumberOfFrames) == FRAMES
    assert ds.FrameIncrementPointer == 0x00181063
    assert abs(float(ds.FrameTime) - 1000.0 / int(row["fps"])) < 0.01
    assert ds.PatientID.startswith("SYN") and str(ds.PatientName).startswith("SYNTH^P")
    region = ds.SequenceOfUltrasoundRegions[0]
    assert (region.PhysicalUnitsXDirection, region.PhysicalUnitsYDirection) == (3, 3)
    assert (region.RegionSpatialFormat, region.RegionDataType) == (1, 1)
    assert region.PhysicalDeltaX == region.PhysicalDeltaY
    # Depth 12-20 cm: the sector's height in pixels times the pixel size.
    depth = (region.RegionLocationMaxY1 - region.RegionLocationMinY0) * region.PhysicalDeltaY
    assert 11.5 < depth < 20.5
    assert region.ReferencePixelY0 == 0
    arr = ds.pixel_array
    assert arr.shape == (FRAMES, 480, 640, 3)
    apex_x = region.RegionLocationMinX0 + region.ReferencePixelX0
    mid = arr[0, region.RegionLocationMinY0 + 150, apex_x - 20:apex_x + 20]
    assert mid.mean() > 10  # tissue inside the sector
    # Coloured overlays (ECG/text) exercise the colour conversion.
    rgb = arr[0].astype(int)
    chroma = np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])
    assert (chroma > 100).sum() > 50


def test_csvs_consistent_with_files(archive: Path) -> None:
    labels = _read_csv(archive / "labels.csv")
    videos = _read_csv(archive / "videos.csv")
    assert list(labels[0]) == list(synth.LABEL_COLUMNS)
    assert list(videos[0]) == list(synth.VIDEO_COLUMNS)
    study_uids = {r["study_uid"] for r in labels}
    assert {r["study_uid"] for r in videos} == study_uids
    for r in labels:
        views = [v["view"] for v in videos if v["study_uid"] == r["study_uid"]]
        assert len(views) >= 3 and {"plax", "a4c", "psax"} <= set(views)
        assert int(r["lvh"]) == int(max(float(r["ivs_cm"]), float(r["lvpw_cm"])) >= 1.2)
        assert int(r["severe_as"]) == int(float(r["av_cusp_sep_cm"]) < 0.8)
    for v in videos:
        ds = pydicom.dcmread(archive / v["path"], stop_before_pixels=True)
        assert ds.StudyInstanceUID == v["study_uid"]
        assert ds.SeriesInstanceUID == v["series_uid"]
        assert ds.SOPInstanceUID == v["sop_uid"]
        assert ds.PatientID == v["patient_id"]
        assert int(ds.NumberOfFrames) == int(v["frames"])
        assert int(ds.CineRate) == int(v["fps"])
        code = ds.ViewCodeSequence[0].CodeValue
        assert code == synth.VIEW_CODES[v["view"]][0]
    assert len({v["sop_uid"] for v in videos}) == len(videos)


def test_run_synth_cli(tmp_path: Path) -> None:
    parser = synth.add_synth_arguments(argparse.ArgumentParser())
    ns = parser.parse_args(["--out", str(tmp_path / "x"), "--patients", "1", "--seed", "3",
                            "--frames", "2", "--rows", "240", "--cols", "320"])
    assert synth.run_synth(ns) == 0
    assert (tmp_path / "x" / "labels.csv").exists()
    bad = parser.parse_args(["--out", str(tmp_path / "y"), "--patients", "0"])
    assert synth.run_synth(bad) == 2


# ----------------------------------------------------------------- labels ---


def test_label_prevalence_and_correlation() -> None:
    draws = [synth.sample_truth(T.keyed_rng(123, T.PURPOSE_TRUTH, i, 0)) for i in range(2000)]
    lvh = np.array([t.lvh for t in draws])
    sas = np.array([t.severe_as for t in draws])
    assert 0.26 < lvh.mean() < 0.34
    assert 0.055 < sas.mean() < 0.105
    assert lvh[sas].mean() > lvh[~sas].mean() + 0.1  # AS raises the odds of LVH
    ivs = np.array([t.ivs_cm for t in draws])
    lvid = np.array([t.lvid_cm for t in draws])
    assert ivs.min() >= 0.6 and lvid.min() >= 3.8 and lvid.max() <= 6.0
    # Label-free anatomy (LV size) does not differ by label.
    assert abs(lvid[lvh].mean() - lvid[~lvh].mean()) < 0.15


def test_study_views_plax_counts_and_protocol() -> None:
    # EchoCLR's positive pairs need studies with distinct PLAX videos: one
    # PLAX in 30 %, two in 50 %, three in 20 % (documented in _study_views).
    rng = np.random.default_rng(5)
    draws = [acquisition.study_views(rng) for _ in range(20_000)]
    plax = np.array([v.count("plax") for v in draws])
    for k, share in ((1, 0.3), (2, 0.5), (3, 0.2)):
        assert abs((plax == k).mean() - share) < 0.015, (k, (plax == k).mean())
    extra_a4c = np.array([v.count("a4c") == 2 for v in draws])
    assert abs(extra_a4c.mean() - 0.2) < 0.015
    # Every study has the three views, PLAX first (the usual acquisition order).
    for v in draws[:500]:
        assert v[: v.count("plax")] == ["plax"] * v.count("plax")
        assert v.count("psax") == 1 and 1 <= v.count("a4c") <= 2


def test_small_archives_get_positives() -> None:
    for seed in range(5):
        truths = synth.sample_study_truths(seed, [1] * 8)
        flat = [t for row in truths for t in row]
        assert any(t.lvh for t in flat) and any(t.severe_as for t in flat)


def _plax_frame(truth: synth.StudyTruth, phase: float, noise: int, look: acquisition.Look | None = None,
                edge_cm: float = 0.08):
    """One PLAX frame at a given cardiac phase, through JPEG, plus geometry."""
    rng = np.random.default_rng(noise)
    an = anatomy.sample_anatomy(truth, rng, 1.4)
    study = acquisition.StudyPlan(vendor=synth.VENDORS[noise % 4], depth_cm=16.0, angle_deg=80.0,
                                  heart_rate_bpm=70.0, fps=40, gain_db=0.0, freq_mhz=2.5, window=0.8)
    plan = acquisition.plan_video(rng, "plax", 1, study, 1, noise)
    # A clean acoustic window, as a sonographer would pick to measure.
    plan = dataclasses.replace(plan, phase0=phase, quality=1.0, shadow_width_deg=0.0, reverb=0.1,
                               edge_cm=edge_cm, psf_scale=1.0, gain_db=0.0, gamma=1.6,
                               look=look or acquisition.Look())
    rgb, geo, _ = render.render_video(an, plan)
    decoded = np.asarray(Image.open(io.BytesIO(dicom.encode_jpeg(rgb[0], 80))).convert("L"), np.float32)
    pose = render.view_pose("plax", an, plan)
    return decoded, geo, pose, an


def _profile(img, geo, pose, u_values, v):
    """Mean intensity along v (cm) over several u, sampled bilinearly."""
    uu, vv = np.meshgrid(np.asarray(u_values, np.float32), v.astype(np.float32))
    col, row = render.local_to_pixel(geo, pose, uu, vv)
    vals = cv2.remap(img, col.astype(np.float32), row.astype(np.float32), cv2.INTER_LINEAR)
    return cv2.GaussianBlur(vals.mean(axis=1), (1, 0), sigmaX=1, sigmaY=2).ravel()


def _run(profile: np.ndarray, start: int, step: int, thr: float, hold: int = 4) -> int:
    """Index where the profile, walking from ``start``, first crosses ``thr`` and
    stays across for ``hold`` samples (a dark speckle inside a wall is not its edge)."""
    i = start
    above = profile[i] > thr
    while 0 < i < len(profile) - 1:
        ahead = profile[i:i + hold * step:step] if step > 0 else profile[max(i + hold * step + 1, 0):i + 1]
        if len(ahead) and np.all((ahead > thr) != above):
            break
        i += step
    return i


def _walls_cm(truth: synth.StudyTruth, noise: int, edge_cm: float = 0.08,
              look: acquisition.Look | None = None) -> tuple[float, float]:
    img, geo, pose, an = _plax_frame(truth, synth.END_DIASTOLE_PHASE, noise, look=look, edge_cm=edge_cm)
    dv = 0.02
    v = np.arange(-6.0, 5.0, dv)
    prof = _profile(img, geo, pose, np.linspace(-3.4, -1.7, 24), v)
    i0 = int(np.argmin(np.abs(v)))  # LV centre, in the cavity
    dark = np.median(prof[np.abs(v) < 0.8])
    # Log compression widens bright structures at low thresholds: cut close
    # to the wall's own level (a few dB under it), as calipers sit on edges.
    wall = np.median(prof[prof > dark + 0.5 * (np.percentile(prof, 90) - dark)])
    thr = dark + 0.55 * (wall - dark)
    sep_in = _run(prof, i0, -1, thr)
    sep_out = _run(prof, sep_in, -1, thr)
    pw_in = _run(prof, i0, 1, thr)
    pw_out = _run(prof, pw_in, 1, thr)
    # Measured in pixels along the line, converted with the DICOM pixel size.
    return (sep_in - sep_out) * dv, (pw_out - pw_in) * dv


def test_lvh_is_visible_as_wall_thickness() -> None:
    truths = []
    for i in range(40):
        t = synth.sample_truth(np.random.default_rng(1000 + i), force_lvh=(i % 2 == 0), force_as=False)
        truths.append(t)
        if len(truths) == 8:
            break
    measured, true, worst = [], [], []
    for k, t in enumerate(truths):
        ivs, lvpw = _walls_cm(t, noise=k)
        measured += [ivs, lvpw]
        true += [t.ivs_cm, t.lvpw_cm]
        worst.append(max(ivs, lvpw))
    measured, true, worst = np.array(measured), np.array(true), np.array(worst)
    lvh = np.array([t.lvh for t in truths])
    # The thicker wall, measured in the image, separates LVH from normal.
    assert worst[lvh].min() > worst[~lvh].max(), (worst, lvh)
    assert np.corrcoef(measured, true)[0, 1] > 0.9
    # Soft edges and the PSF widen walls by a caliper bias that is the same for all.
    bias = float(np.median(measured - true))
    assert abs(bias) < 0.2
    assert np.abs(measured - true - bias).mean() < 0.1


def _cusp_sep_cm(truth: synth.StudyTruth, noise: int, **frame: Any) -> float:
    img, geo, pose, an = _plax_frame(truth, synth.MID_SYSTOLE_PHASE, noise, **frame)
    ha, ta, hp, tp = views.av_leaflet_tips(an, synth.MID_SYSTOLE_PHASE)
    u_tip = 0.5 * (ta[0] + tp[0]) - truth.av_leaflet_cm / 2 - 0.05
    dv = 0.02
    vc = 0.5 * (ha[1] + hp[1])
    v = np.arange(ha[1] - 0.3, hp[1] + 0.3, dv)
    prof = _profile(img, geo, pose, np.linspace(u_tip - 0.06, u_tip, 4), v)
    i0 = int(np.argmin(np.abs(v - vc)))
    dark = np.median(prof[np.abs(v - vc) < 0.15])
    bright = prof.max()
    thr = dark + 0.4 * (bright - dark)
    if prof[i0] > thr:  # leaflets touching in the image: no visible orifice
        return 0.0
    return (_run(prof, i0, 1, thr) - _run(prof, i0, -1, thr)) * dv


@pytest.mark.parametrize("frame", [{}, {"edge_cm": 0.3, "look": acquisition.Look(log_edges=True)}],
                         ids=["standard", "soft-edges-in-decibels"])
def test_severe_as_is_visible_as_cusp_separation(frame: dict[str, Any]) -> None:
    """The cusps' opening is in the picture, with soft boundaries blended in
    decibels too (the leaflets' own brightness under that blur is held by
    test_leaflets_keep_their_brightness_when_boundaries_blend_in_decibels)."""
    cases = [synth.sample_truth(np.random.default_rng(2000 + i), force_as=(i % 2 == 0), force_lvh=False)
             for i in range(6)]
    measured = np.array([_cusp_sep_cm(t, noise=k, **frame) for k, t in enumerate(cases)])
    true = np.array([t.av_cusp_sep_cm for t in cases])
    sas = np.array([t.severe_as for t in cases])
    assert measured[sas].max() < measured[~sas].min(), (measured, true)
    assert np.corrcoef(measured, true)[0, 1] > 0.8


def _leaflet_contrast(truth: synth.StudyTruth, noise: int, **frame: Any) -> float:
    """Mean grey along both open aortic cusps minus the lumen between them."""
    img, geo, pose, an = _plax_frame(truth, synth.MID_SYSTOLE_PHASE, noise, **frame)
    ha, ta, hp, tp = views.av_leaflet_tips(an, synth.MID_SYSTOLE_PHASE)
    t = np.linspace(0.25, 0.85, 20)[:, None]
    cusps = [np.asarray(h) + t * (np.asarray(tip) - np.asarray(h)) for h, tip in ((ha, ta), (hp, tp))]
    lumen = 0.5 * (cusps[0] + cusps[1])

    def grey(pts: np.ndarray) -> float:
        col, row = render.local_to_pixel(geo, pose, pts[:, 0].astype(np.float32), pts[:, 1].astype(np.float32))
        return float(cv2.remap(img, col.astype(np.float32)[None], row.astype(np.float32)[None],
                               cv2.INTER_LINEAR).mean())

    return 0.5 * (grey(cusps[0]) + grey(cusps[1])) - grey(lumen)


def test_leaflets_keep_their_brightness_when_boundaries_blend_in_decibels() -> None:
    """A 0.1 cm cusp under a 0.3 cm blur in decibels would fade toward the
    blood around it; the leaflets are laid over the blurred field, so they
    stand out from the lumen as much as with boundaries blended in power."""
    cases = [synth.sample_truth(np.random.default_rng(2000 + i), force_as=False, force_lvh=False)
             for i in range(4)]
    power = np.array([_leaflet_contrast(t, k, edge_cm=0.3) for k, t in enumerate(cases)])
    decibels = np.array([_leaflet_contrast(t, k, edge_cm=0.3, look=acquisition.Look(log_edges=True))
                         for k, t in enumerate(cases)])
    assert power.min() > 40, power
    assert np.all(decibels > 0.85 * power), (decibels, power)


@pytest.mark.parametrize("view", sorted(views.VIEW_VALVES))
def test_leaflets_painted_after_the_view_are_the_leaflets_the_view_paints(view: str) -> None:
    """Renderer A draws each view without leaflets and paints them afterwards (so that a look can change
    them); with renderer A's own leaflets that is the picture the view draws with them, to the bit, which
    keeps the standard and varied looks' archives what they were."""
    # Each view's own frame: PLAX along the LV's long axis from the annulus, A4C across and down from the apex.
    (u0, u1), (v0, v1) = {"plax": ((-6.0, 4.0), (-4.0, 4.0)), "a4c": ((-6.0, 6.0), (-1.0, 14.0))}[view]
    u, v = np.meshgrid(np.linspace(u0, u1, 192, dtype=np.float32), np.linspace(v0, v1, 192, dtype=np.float32))
    bg = np.full(u.shape, 1e-3, np.float32)
    for k in range(3):
        truth = synth.sample_truth(np.random.default_rng(700 + k), force_as=k == 0, force_lvh=False)
        an = anatomy.sample_anatomy(truth, np.random.default_rng(k), 1.4)
        for phase in (0.0, synth.MID_SYSTOLE_PHASE):
            drawn = views.VIEW_FIELDS[view](u, v, bg.copy(), an, phase, 0.08, valves=True)
            painted = views.VIEW_FIELDS[view](u, v, bg.copy(), an, phase, 0.08, valves=False)
            assert not np.array_equal(drawn, painted)  # the leaflets are in the picture
            views.VIEW_VALVES[view](painted, u, v, an, phase, 0.08, views.STANDARD_LEAFLETS)
            assert np.array_equal(drawn, painted)


def test_the_leaflets_look_moves_only_the_leaflets_the_way_it_says() -> None:
    """Leaflet gain brightens both cusps against the lumen; the calcium scale
    brightens a calcified cusp and leaves an uncalcified one as it is; the
    bloom widens the drawn leaflet by what it says."""
    clean = dataclasses.replace(synth.sample_truth(np.random.default_rng(2100), force_as=False, force_lvh=False),
                                av_calcification=0.0)
    calcified = dataclasses.replace(clean, av_calcification=1.0)
    dim, bright = (_leaflet_contrast(clean, 1, look=acquisition.Look(leaflet_db=d)) for d in (-4.0, 8.0))
    assert bright > dim + 20, (dim, bright)
    for truth, moves in ((clean, False), (calcified, True)):
        low, high = (_leaflet_contrast(truth, 1, look=acquisition.Look(calcium_scale=c)) for c in (0.5, 2.2))
        assert (high > low + 15) if moves else abs(high - low) < 1e-6, (truth.av_calcification, low, high)
    v = np.linspace(-0.5, 0.5, 2001, dtype=np.float32)[None, :]
    u = np.zeros_like(v)
    widths = {}
    for bloom in (0.0, 0.1):
        refl = np.zeros_like(v)
        views._leaflet(refl, u, v, (-1.0, 0.0), (1.0, 0.0), 0.2, 1.0, 0.01,
                       views.LeafletLook(gain=2.0, bloom_cm=bloom))
        assert refl.max() == pytest.approx(2.0)
        widths[bloom] = float((refl[0] >= 1.0).sum() * (v[0, 1] - v[0, 0]))
    assert widths[0.0] == pytest.approx(0.2, abs=0.002) and widths[0.1] == pytest.approx(0.3, abs=0.002), widths


def test_the_varied_valves_look_adds_the_leaflets_to_the_varied_look() -> None:
    """The same stream draws the same tissue look; the leaflets' look comes on
    top, in its documented ranges; the varied look keeps renderer A's leaflets."""
    base = acquisition.plan_video(np.random.default_rng(0), "plax", 1, acquisition.plan_study(
        np.random.default_rng(1)), 8, 3)
    for k in range(200):
        plain = look.vary_plan(base, np.random.default_rng(k))
        valves = look.vary_plan(base, np.random.default_rng(k), leaflets=True)
        assert dataclasses.replace(valves, look=dataclasses.replace(
            valves.look, leaflet_db=0.0, calcium_scale=1.0, leaflet_bloom_cm=0.0)) == plain
        assert (plain.look.leaflet_db, plain.look.calcium_scale, plain.look.leaflet_bloom_cm) == (0.0, 1.0, 0.0)
        lk = valves.look
        assert -4.0 <= lk.leaflet_db <= 8.0 and 0.5 <= lk.calcium_scale <= 2.2 and 0 <= lk.leaflet_bloom_cm <= 0.1


def test_the_varied_leaflets_look_is_the_varied_valves_look_with_faint_and_faded_leaflets() -> None:
    """Every draw but the leaflets' echo strength and the fade is the varied-valves look's; the
    echo strength spans -12 to +8 dB from the same draw; about half the videos fade their leaflets."""
    base = acquisition.plan_video(np.random.default_rng(0), "plax", 1, acquisition.plan_study(
        np.random.default_rng(1)), 8, 3)
    faded = 0
    for k in range(400):
        valves = look.vary_plan(base, np.random.default_rng(k), leaflets=True)
        leaflets = look.vary_plan(base, np.random.default_rng(k), leaflets=True, fade=True)
        assert dataclasses.replace(leaflets, look=dataclasses.replace(
            leaflets.look, leaflet_db=valves.look.leaflet_db, leaflets_in_blur=False)) == valves
        assert not valves.look.leaflets_in_blur
        # The same uniform draw, stretched from [-4, 8] to [-12, 8] dB.
        assert (leaflets.look.leaflet_db - 8.0) / 20.0 == pytest.approx((valves.look.leaflet_db - 8.0) / 12.0)
        faded += leaflets.look.leaflets_in_blur
    assert 160 <= faded <= 240, faded
    assert "varied-leaflets" in look.LOOKS and "varied-leaflets" in look.VARIED_LOOKS


def test_varied_walls_is_the_varied_valves_look_with_edges_moved() -> None:
    """The one draw varied-walls adds is the edge bias, last, over its whole range and both signs."""
    base = acquisition.plan_video(np.random.default_rng(0), "plax", 1, acquisition.plan_study(
        np.random.default_rng(1)), 8, 3)
    biases = []
    for k in range(300):
        valves = look.vary_named(base, np.random.default_rng(k), "varied-valves")
        walls = look.vary_named(base, np.random.default_rng(k), "varied-walls")
        assert valves.look.edge_bias_cm == 0.0
        assert dataclasses.replace(walls, look=dataclasses.replace(walls.look, edge_bias_cm=0.0)) == valves
        biases.append(walls.look.edge_bias_cm)
    lo, hi = look.EDGE_BIAS_CM
    assert lo <= min(biases) < lo + 0.02 and hi - 0.02 < max(biases) <= hi
    # The older looks' draws are those vary_plan made for them before vary_named existed.
    for name, kw in (("varied", {}), ("varied-valves", {"leaflets": True}),
                     ("varied-leaflets", {"leaflets": True, "fade": True})):
        assert look.vary_named(base, np.random.default_rng(7), name) == look.vary_plan(
            base, np.random.default_rng(7), **kw), name
    with pytest.raises(ValueError, match="not a varied look"):
        look.vary_named(base, np.random.default_rng(0), "standard")


def test_edge_bias_moves_both_edges_of_a_wall() -> None:
    """An eroded wall measures thinner and a dilated one thicker, by about twice the bias, fractions included."""
    truths = [synth.sample_truth(np.random.default_rng(1000 + i), force_lvh=i % 2 == 0, force_as=False)
              for i in range(4)]

    def excess(bias: float) -> float:
        edges = acquisition.Look(log_edges=True, edge_bias_cm=bias)
        walls = [_walls_cm(t, noise=k, edge_cm=0.2, look=edges) for k, t in enumerate(truths)]
        return float(np.median([m - w for t, ws in zip(truths, walls, strict=True)
                                for m, w in zip(ws, (t.ivs_cm, t.lvpw_cm), strict=True)]))

    unmoved = excess(0.0)
    shift = {b: excess(b) - unmoved for b in (-0.12, -0.05, 0.08)}
    assert shift[-0.12] < shift[-0.05] < 0.0 < shift[0.08], shift
    for b, d in shift.items():
        assert abs(d - 2 * b) < 0.08, shift


def _severe_valve_at_mid_systole(edge_cm: float) -> tuple[anatomy.Anatomy, acquisition.VideoPlan]:
    """A heart with severe AS and one PLAX acquisition of it at mid-systole, its edges ``edge_cm`` soft."""
    truth = T.sample_truth(np.random.default_rng(3), force_lvh=False, force_as=True)
    an = anatomy.sample_anatomy(truth, np.random.default_rng(4), 2.0)
    plan = acquisition.plan_video(np.random.default_rng(5), "plax", 1, acquisition.plan_study(
        np.random.default_rng(6)), 1, 7)
    return an, dataclasses.replace(plan, phase0=anatomy.MID_SYSTOLE_PHASE, edge_cm=edge_cm)


def _cusp_middles(an: anatomy.Anatomy, geo: Any, pose: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Image (col, row) of the middle of each aortic cusp at mid-systole."""
    cusp = views.av_leaflet_tips(an, anatomy.MID_SYSTOLE_PHASE)
    mid = [(0.5 * (h[0] + t[0]), 0.5 * (h[1] + t[1])) for h, t in (cusp[:2], cusp[2:])]
    return render.local_to_pixel(geo, pose, np.array([m[0] for m in mid]), np.array([m[1] for m in mid]))


@pytest.mark.parametrize("faded", [False, True])
def test_edge_bias_leaves_the_valve_leaflets_where_they_are(faded: bool) -> None:
    """The bias moves the walls and leaves the open cusps' grey alone, drawn over the blur or into it."""
    an, plan = _severe_valve_at_mid_systole(edge_cm=0.1)
    edges = acquisition.Look(log_edges=True, leaflets_in_blur=faded)
    plan = dataclasses.replace(plan, look=edges)
    eroded = dataclasses.replace(plan, look=dataclasses.replace(edges, edge_bias_cm=-0.1))
    still, geo, _ = render.render_video(an, plan, 240, 320, None)
    moved, _, _ = render.render_video(an, eroded, 240, 320, None)
    col, row = _cusp_middles(an, geo, render.view_pose("plax", an, plan))
    for c, r in zip(col, row, strict=True):
        r0, c0 = int(round(r)), int(round(c))
        a, b = still[0, r0 - 1:r0 + 2, c0 - 1:c0 + 2].mean(), moved[0, r0 - 1:r0 + 2, c0 - 1:c0 + 2].mean()
        assert abs(a - b) <= 0.15 * a + 4, (a, b)
    assert not np.array_equal(still[0], moved[0])


def test_faded_leaflets_fade_only_at_the_leaflets() -> None:
    """Drawn into the decibel blur, the open cusps are fainter and the walls where they are measured
    are the same; without log_edges the option changes nothing."""
    an, plan = _severe_valve_at_mid_systole(edge_cm=0.3)
    soft = dataclasses.replace(plan, look=dataclasses.replace(plan.look, log_edges=True))
    faded = dataclasses.replace(soft, look=dataclasses.replace(soft.look, leaflets_in_blur=True))
    over, _, _ = render.render_video(an, soft, 240, 320, None)
    into, geo, _ = render.render_video(an, faded, 240, 320, None)
    pose = render.view_pose("plax", an, soft)
    col, row = _cusp_middles(an, geo, pose)
    grey_over = [int(over[0, int(round(r)), int(round(c))].mean()) for c, r in zip(col, row, strict=True)]
    grey_into = [int(into[0, int(round(r)), int(round(c))].mean()) for c, r in zip(col, row, strict=True)]
    assert all(i < o for i, o in zip(grey_into, grey_over, strict=True)), (grey_into, grey_over)
    # The walls, measured apical to the valves, are untouched.
    rr, cc = np.mgrid[:240, :320]
    cx, cz, rot = pose
    x, z = (cc - geo.apex_col) * geo.delta_cm - cx, (rr - geo.apex_row) * geo.delta_cm - cz
    u = np.cos(rot) * x + np.sin(rot) * z
    walls = u < views.MEASURE_U_CM + 0.2
    assert walls.sum() > 1000 and np.array_equal(over[0][walls], into[0][walls])
    assert not np.array_equal(over[0], into[0])
    sharp = dataclasses.replace(plan, look=dataclasses.replace(plan.look, leaflets_in_blur=True))
    assert np.array_equal(render.render_video(an, plan, 240, 320, None)[0],
                          render.render_video(an, sharp, 240, 320, None)[0])


def test_a_varied_valves_archive_is_the_varied_archive_but_for_pixels(tmp_path: Path) -> None:
    kw = dict(seed=5, frames=2, rows=120, cols=160, reports=False, views=("plax",))
    a = synth.generate_archive(tmp_path / "a", 1, look="varied", **kw)
    b = synth.generate_archive(tmp_path / "b", 1, look="varied-valves", **kw)
    assert (a.look, b.look, a.videos) == ("varied", "varied-valves", b.videos)
    for name in ("labels.csv", "videos.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    row = _read_csv(tmp_path / "a" / "videos.csv")[0]
    da, db = pydicom.dcmread(tmp_path / "a" / row["path"]), pydicom.dcmread(tmp_path / "b" / row["path"])
    assert da.SOPInstanceUID == db.SOPInstanceUID and not np.array_equal(da.pixel_array, db.pixel_array)
    with pytest.raises(ValueError, match="renderer polar"):
        synth.generate_archive(tmp_path / "c", 1, renderer="raster", look="varied-valves")
    for name_, other in (("varied-leaflets", "d"), ("varied-walls", "e")):
        c = synth.generate_archive(tmp_path / other, 1, look=name_, **kw)
        assert (c.look, c.videos) == (name_, b.videos)
        for name in ("labels.csv", "videos.csv"):
            assert (tmp_path / other / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        dc = pydicom.dcmread(tmp_path / other / row["path"])
        assert dc.SOPInstanceUID == db.SOPInstanceUID and not np.array_equal(dc.pixel_array, db.pixel_array)


# ------------------------------------------------------------- shortcuts ---


@pytest.fixture(scope="module")
def plax_archive(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth-shortcuts") / "a"
    synth.generate_archive(out, 40, seed=21, frames=2, rows=120, cols=160, views=("plax",))
    return out


def test_no_non_anatomical_statistic_separates_a_label(plax_archive: Path) -> None:
    """Brightness, file size, frame count, frame rate, geometry, make, UID order:
    none predicts LVH or severe AS beyond this small archive's sampling error
    (bench/synth_shortcuts.py holds a large archive to 0.40-0.60)."""
    scores = shortcuts.score_shortcuts(plax_archive)
    names = {s.statistic for s in scores}
    assert {"brightness", "file_size", "frames", "depth", "study_uid_order", "accession_order"} <= names
    assert any(n.startswith("make:") for n in names)
    assert {s.task for s in scores} == {"lvh", "severe_as"}
    assert shortcuts.shortcuts_found(scores, z=2.0) == []


def test_shortcut_check_catches_a_planted_giveaway(plax_archive: Path) -> None:
    """The check can fail: a statistic that carries the label is reported."""
    labels, stats = shortcuts.study_statistics(plax_archive)
    planted = [shortcuts.ShortcutScore("planted", "lvh",
                                       auroc([labels[s]["lvh"] for s in labels],
                                             [labels[s]["lvh"] + 0.1 * i % 1 for i, s in enumerate(labels)]),
                                       sum(v["lvh"] for v in labels.values()),
                                       sum(1 - v["lvh"] for v in labels.values()))]
    assert [s.statistic for s in shortcuts.shortcuts_found(planted, z=2.0)] == ["planted"]


@pytest.mark.parametrize("other", ["raster", "scatter"])
def test_renderers_share_anatomy_and_headers(tmp_path: Path, other: str) -> None:
    """--renderer changes pixels only: same labels, same UIDs, same SR values."""
    a = synth.generate_archive(tmp_path / "a", 1, seed=5, frames=2, rows=120, cols=160)
    b = synth.generate_archive(tmp_path / "b", 1, seed=5, frames=2, rows=120, cols=160, renderer=other)
    assert (a.renderer, b.renderer) == ("polar", other)
    for name in ("labels.csv", "videos.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    sr = sorted((tmp_path / "a").rglob("*.dcm"))
    reports = [p for p in sr if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR"]
    assert reports
    for path in reports:
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()
    row = _read_csv(tmp_path / "a" / "videos.csv")[0]
    pa = pydicom.dcmread(tmp_path / "a" / row["path"]).pixel_array
    pb = pydicom.dcmread(tmp_path / "b" / row["path"]).pixel_array
    assert pa.shape == pb.shape and np.abs(pa.astype(int) - pb.astype(int)).mean() > 5
    with pytest.raises(ValueError, match="renderer"):
        synth.generate_archive(tmp_path / "c", 1, renderer="nope")
    with pytest.raises(ValueError, match="views"):
        synth.generate_archive(tmp_path / "c", 1, views=("plax", "a2c"))


# ------------------------------------------------------------------ looks ---


def test_a_varied_look_changes_pixels_only(tmp_path: Path) -> None:
    """--look varied: same patients, labels, UIDs and acquisitions; other pixels; still one archive per seed."""
    a = synth.generate_archive(tmp_path / "a", 1, seed=5, frames=2, rows=120, cols=160, reports=False)
    b = synth.generate_archive(tmp_path / "b", 1, seed=5, frames=2, rows=120, cols=160, reports=False,
                               look="varied")
    assert (a.look, b.look) == ("standard", "varied")
    for name in ("labels.csv", "videos.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    row = _read_csv(tmp_path / "a" / "videos.csv")[0]
    da, db = pydicom.dcmread(tmp_path / "a" / row["path"]), pydicom.dcmread(tmp_path / "b" / row["path"])
    assert (da.SOPInstanceUID, da.Rows, da.NumberOfFrames) == (db.SOPInstanceUID, db.Rows, db.NumberOfFrames)
    assert np.abs(da.pixel_array.astype(int) - db.pixel_array.astype(int)).mean() > 2
    again = synth.generate_archive(tmp_path / "c", 1, seed=5, frames=2, rows=120, cols=160, reports=False,
                                   look="varied")
    assert again.videos == b.videos
    assert (tmp_path / "c" / row["path"]).read_bytes() == (tmp_path / "b" / row["path"]).read_bytes()
    with pytest.raises(ValueError, match="renderer polar"):
        synth.generate_archive(tmp_path / "d", 1, renderer="raster", look="varied")
    with pytest.raises(ValueError, match="look"):
        synth.generate_archive(tmp_path / "d", 1, look="vivid")


def test_an_archive_of_several_renderers_draws_each_study_as_one_of_them(tmp_path: Path) -> None:
    """--renderer polar,raster: the same patients, labels and headers; every
    study's videos are byte for byte those of one single-renderer archive
    (varied looks on renderer polar's videos only), and both renderers occur."""
    kw = dict(seed=5, frames=2, rows=120, cols=160, reports=False, views=("plax",))
    mixed = synth.generate_archive(tmp_path / "m", 6, renderer="polar,raster", look="varied", **kw)
    single = {"polar": synth.generate_archive(tmp_path / "polar", 6, renderer="polar", look="varied", **kw),
              "raster": synth.generate_archive(tmp_path / "raster", 6, renderer="raster", **kw)}
    assert mixed.renderer == "polar,raster" and mixed.videos == single["polar"].videos
    for name in ("labels.csv", "videos.csv"):
        assert (tmp_path / "m" / name).read_bytes() == (tmp_path / "polar" / name).read_bytes(), name
    drawn_by: dict[str, set[str]] = {}
    for row in _read_csv(tmp_path / "m" / "videos.csv"):
        data = (tmp_path / "m" / row["path"]).read_bytes()
        same = [r for r in single if (tmp_path / r / row["path"]).read_bytes() == data]
        assert len(same) == 1, row["path"]
        drawn_by.setdefault(row["study_uid"], set()).add(same[0])
    assert all(len(r) == 1 for r in drawn_by.values())
    assert set().union(*drawn_by.values()) == {"polar", "raster"}
    for bad in ("polar,polar", "polar,", "polar,nope"):
        with pytest.raises(ValueError, match="renderer"):
            synth.generate_archive(tmp_path / "x", 1, renderer=bad)


def test_varied_looks_stay_in_their_documented_ranges() -> None:
    base = acquisition.plan_video(np.random.default_rng(0), "plax", 1, acquisition.plan_study(
        np.random.default_rng(1)), 8, 3)
    plans = [look.vary_plan(base, np.random.default_rng(k)) for k in range(400)]
    looks = [p.look for p in plans]
    assert all(-3.0 <= lk.surround_db <= 13.0 and 0.65 <= lk.contrast <= 1.15 for lk in looks)
    off = sum(lk.despeckle == 0.0 for lk in looks)
    assert 60 < off < 140 and all(lk.despeckle == 0.0 or 0.2 <= lk.despeckle <= 1.0 for lk in looks)
    assert all(lk.log_edges for lk in looks) and not acquisition.Look().log_edges
    assert all(35 <= p.dynamic_range_db <= 80 and 1.0 <= p.gamma <= 3.2 and 0.7 <= p.psf_scale <= 1.8
               and 0.04 <= p.edge_cm <= 0.35 and abs(p.gain_db - base.gain_db) <= 4 for p in plans)
    # Geometry, timing and view are the acquisition's, whatever the look.
    assert {(p.view, p.depth_cm, p.angle_deg, p.tilt_deg, p.fps, p.frames, p.phase0, p.noise_seed)
            for p in plans} == {(base.view, base.depth_cm, base.angle_deg, base.tilt_deg, base.fps, base.frames,
                                 base.phase0, base.noise_seed)}
    assert acquisition.VideoPlan.__dataclass_fields__["look"].default == acquisition.Look()


def _regions(truth: synth.StudyTruth, lk: acquisition.Look) -> dict[str, np.ndarray]:
    """Grey levels along the LV's short axis: cavity, walls, and the tissue past the pericardium."""
    img, geo, pose, an = _plax_frame(truth, synth.END_DIASTOLE_PHASE, noise=3, look=lk)
    h0 = truth.lvid_cm / 2
    v = np.arange(-6.0, 6.0, 0.02)
    prof = _profile(img, geo, pose, np.linspace(-3.4, -1.7, 24), v)
    return {
        "cavity": prof[np.abs(v) < h0 - 0.5],
        "posterior wall": prof[(v > h0 + 0.15) & (v < h0 + truth.lvpw_cm - 0.15)],
        "beyond": prof[(v > h0 + truth.lvpw_cm + an.pericardial_gap_cm + 0.8) & (v < h0 + truth.lvpw_cm + 3.5)],
    }


def test_each_look_setting_moves_the_image_the_way_it_says() -> None:
    """Contrast narrows wall against blood, despeckle smooths the wall, surround lightens the tissue outside."""
    t = synth.sample_truth(np.random.default_rng(5), force_lvh=True, force_as=False)
    flat, steep = (_regions(t, acquisition.Look(contrast=c)) for c in (0.65, 1.15))
    gap = {name: float(np.median(r["posterior wall"]) - np.median(r["cavity"])) for name, r in
           (("flat", flat), ("steep", steep))}
    assert 0 < gap["flat"] < gap["steep"], gap
    raw, smooth = (_regions(t, acquisition.Look(despeckle=d))["posterior wall"] for d in (0.0, 1.0))
    assert smooth.std() / smooth.mean() < 0.8 * raw.std() / raw.mean()
    dark, light = (_regions(t, acquisition.Look(surround_db=d))["beyond"] for d in (-3.0, 8.0))
    assert np.median(light) > np.median(dark) + 10


def test_boundaries_blended_in_decibels_keep_a_soft_walls_edges_in_place() -> None:
    """Soft edges blended in power make a wall look thicker; blended in dB they stay at the wall."""
    truths = [synth.sample_truth(np.random.default_rng(1000 + i), force_lvh=i % 2 == 0, force_as=False)
              for i in range(4)]
    excess = {}
    for log_edges in (False, True):
        walls = [_walls_cm(t, noise=k, edge_cm=0.3, look=acquisition.Look(log_edges=log_edges))
                 for k, t in enumerate(truths)]
        excess[log_edges] = float(np.median([m - w for t, ws in zip(truths, walls, strict=True)
                                             for m, w in zip(ws, (t.ivs_cm, t.lvpw_cm), strict=True)]))
    assert excess[False] > excess[True] + 0.08, excess
    assert abs(excess[True]) < 0.12, excess
