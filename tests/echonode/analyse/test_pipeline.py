"""The study pipeline: aggregation as in METHOD.md, the view filter, batching, skips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from echonode.analyse.decode import decode_video
from echonode.analyse.pipeline import (
    ObjectRecord,
    StudyRefused,
    analyse_study,
    check_identity,
    preprocess_config,
)
from echonode.analyse.preprocess import decode_options_for, make_eval_clips, preprocess_video
from echonode.bundles.registry import ModelRegistry
from echonode.bundles.weights import load_bundle
from tests.factories import tiny_bundle, us_multiframe, write
from tests.report_support import PLA_WARNING


def _registry(models: Path) -> ModelRegistry:
    reg = ModelRegistry(models, "cpu")
    reg.refresh()
    return reg


def _view_bundle(models: Path, favour: str, preprocessing: dict | None = None) -> None:
    """A view classifier that always answers ``favour`` (zero weights, biased head)."""
    path = tiny_bundle(models, "view", name="views", preprocessing=preprocessing)
    sd = torch.load(path / "weights.pt", weights_only=True)
    labels = load_bundle(path).labels
    sd["fc.weight"].zero_()
    sd["fc.bias"].zero_()
    sd["fc.bias"][labels.index(favour)] = 10.0
    torch.save(sd, path / "weights.pt")


@pytest.fixture
def study(tmp_path: Path, sonosite_loop: Path) -> tuple[str, list[Path]]:
    """The real loop plus two generated videos, all in the real loop's study."""
    uid = str(pydicom.dcmread(sonosite_loop, stop_before_pixels=True).StudyInstanceUID)
    src = pydicom.dcmread(sonosite_loop, stop_before_pixels=True)
    files = [sonosite_loop]
    for i in range(2):
        ds = us_multiframe(study_uid=uid, frames=24, rows=96, cols=128, seed=i,
                           patient_name=str(src.PatientName), patient_id=str(src.PatientID))
        ds.PatientBirthDate = src.get("PatientBirthDate", "")
        files.append(write(ds, tmp_path / f"gen{i}.dcm"))
    return uid, files


def test_aggregation_is_mean_of_clip_means(tmp_path: Path, study) -> None:
    uid, files = study
    models = tmp_path / "models"
    tiny_bundle(models, "lvh", seed=4)
    reg = _registry(models)
    result = analyse_study(uid, files, reg.current, batch_size=3)
    bundle = reg.current.by_task("lvh")
    cfg = preprocess_config(bundle)
    expected = []
    for f in files:
        video = decode_video(f, decode_options_for([cfg]))
        clips = make_eval_clips(preprocess_video(video, cfg), cfg)
        assert clips.shape[0] == 4
        expected.append(float(bundle.predict(clips).mean()))
    got = [v.probabilities["lvh"] for v in result.videos]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert result.tasks["lvh"].probability == pytest.approx(float(np.mean(expected)), abs=1e-6)
    assert result.tasks["lvh"].positive == (result.tasks["lvh"].probability >= bundle.threshold)
    assert "no view classifier" in result.view_filter
    assert result.skipped_reason is None


def test_view_filter_keeps_plax_only(tmp_path: Path, study) -> None:
    uid, files = study
    models = tmp_path / "models"
    tiny_bundle(models, "lvh")
    _view_bundle(models, "plax")
    result = analyse_study(uid, files, _registry(models).current)
    assert all(v.view == "plax" and v.used for v in result.videos)
    assert "view classifier views" in result.view_filter

    models2 = tmp_path / "models2"
    tiny_bundle(models2, "lvh")
    _view_bundle(models2, "a4c")
    result = analyse_study(uid, files, _registry(models2).current)
    assert not result.tasks
    assert result.skipped_reason == "no video of view plax"
    assert all(v.reason == "view a4c not in models.views" for v in result.videos)
    # The view list is configurable.
    result = analyse_study(uid, files, _registry(models2).current, views=("plax", "a4c"))
    assert set(result.tasks) == {"lvh"}


def test_unusable_objects_are_skipped_with_reasons(tmp_path: Path, study) -> None:
    from tests.conftest import real_testfile

    uid, files = study
    models = tmp_path / "models"
    tiny_bundle(models, "lvh")
    single = pydicom.dcmread(real_testfile("OBXXXX1A.dcm"))
    single.StudyInstanceUID = uid
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    single.PatientName, single.PatientID = src.PatientName, src.PatientID
    single.PatientBirthDate = src.get("PatientBirthDate", "")
    extra = write(single, tmp_path / "single.dcm")
    result = analyse_study(uid, [*files, extra], _registry(models).current, max_videos=3)
    reasons = {Path(v.path).name: v.reason for v in result.videos if not v.used}
    assert "beyond models.max_videos=3" in reasons["single.dcm"]
    result = analyse_study(uid, [extra], _registry(models).current)
    assert result.skipped_reason.startswith("no usable video")

    # An SR in the study (ours, come back from the PACS): no image, never decoded,
    # never one of the max_videos.
    sr = src.copy()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    sr.SOPInstanceUID = pydicom.uid.generate_uid()
    sr.Modality = "SR"
    for keyword in ("Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated",
                    "PhotometricInterpretation"):
        if keyword in sr:
            delattr(sr, keyword)
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
    report = write(sr, tmp_path / "sr.dcm")
    result = analyse_study(uid, [report, *files], _registry(models).current, max_videos=3)
    outcomes = {Path(v.path).name: v for v in result.videos}
    assert outcomes["sr.dcm"].reason == "no pixel data" and not outcomes["sr.dcm"].used
    assert all(outcomes[f.name].used for f in files)


def test_a_cart_sr_that_differs_in_identity_does_not_hold_back_the_images(tmp_path: Path, study) -> None:
    """A measurement SR with an empty birth date and another spelling of the name is not analysed and not
    compared: the study is analysed and the SR copies an image's header. Images that disagree still refuse it."""
    from tests.echo_sr import echo_sr

    uid, files = study
    models = tmp_path / "models"
    tiny_bundle(models, "lvh")
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    cart = echo_sr("ge", {"ivsd": 1.3}, study_uid=uid)
    cart.PatientID, cart.PatientName, cart.PatientBirthDate = src.PatientID, "OTHER^SPELLING", ""
    sr = write(cart, tmp_path / "a-cart-sr.dcm")
    result = analyse_study(uid, [sr, *files], _registry(models).current)
    assert set(result.tasks) == {"lvh"} and result.header_path in {str(f) for f in files}
    other = pydicom.dcmread(files[0])
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    other.PatientID = "SOMEONE-ELSE"
    with pytest.raises(StudyRefused, match="PatientID"):
        analyse_study(uid, [sr, *files, write(other, tmp_path / "other.dcm")], _registry(models).current)


def test_identity_check() -> None:
    a, b = pydicom.Dataset(), pydicom.Dataset()
    for ds in (a, b):
        ds.PatientID, ds.PatientName, ds.StudyInstanceUID = "1", "A^B", "1.2"
    check_identity([ObjectRecord.from_header(Path("a"), a), ObjectRecord.from_header(Path("b"), b)])
    b.PatientName = "A^C"
    with pytest.raises(StudyRefused, match="PatientName"):
        check_identity([ObjectRecord.from_header(Path("a"), a), ObjectRecord.from_header(Path("b"), b)])


def test_an_unexpected_decode_error_skips_the_object_and_logs_no_message(
    tmp_path: Path, study, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug or a library's error in one object: that object is skipped, the study goes on,
    and the log names the error's type and frames, never its message."""
    import io
    import json

    import echonode.analyse.pipeline
    from echonode.ops.logs import configure_logging

    uid, files = study
    models = tmp_path / "models"
    tiny_bundle(models, "lvh")
    real = echonode.analyse.pipeline.decode_video

    def decode(path, *args, **kw):
        if Path(path) == files[1]:
            raise ValueError("invalid value for VR PN: 'DOE^JOHN'")
        return real(path, *args, **kw)

    monkeypatch.setattr(echonode.analyse.pipeline, "decode_video", decode)
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf)
    result = analyse_study(uid, files, _registry(models).current)
    outcomes = {Path(v.path): v for v in result.videos}
    assert outcomes[files[1]].reason == "cannot read: ValueError" and not outcomes[files[1]].used
    assert outcomes[files[0]].used and outcomes[files[2]].used
    assert "DOE" not in buf.getvalue()
    (line,) = [e for e in map(json.loads, buf.getvalue().splitlines()) if e["event"] == "pipeline.decode_error"]
    assert line["error"] == "ValueError" and line["frames"][-1].endswith(" in decode")


def test_a_model_that_measures_in_cm_skips_videos_without_calibration_and_others_still_run(
    tmp_path: Path, study
) -> None:
    # The real loop states its pixel size; the generated videos state none.
    # The LVH model frames in cm and sees only the real loop; the severe-AS
    # model frames the sector and sees all three; the view model (sector) too.
    uid, files = study
    models = tmp_path / "models"
    tiny_bundle(models, "lvh", preprocessing={"framing": "physical", "field_cm": 16.0})
    tiny_bundle(models, "severe_as")
    _view_bundle(models, "plax")
    result = analyse_study(uid, files, _registry(models).current)
    assert result.skipped_reason is None
    assert list(result.tasks["lvh"].video_probabilities) == [result.videos[0].sop_uid]
    assert len(result.tasks["severe_as"].video_probabilities) == 3
    assert result.videos[0].reason is None and result.videos[0].view == "plax"
    for generated in result.videos[1:]:
        assert generated.used and generated.view == "plax"
        assert generated.reason.startswith("not measured by lvh: no calibrated 2D tissue region")
        assert "lvh" not in generated.probabilities and "severe_as" in generated.probabilities


@pytest.mark.filterwarnings(PLA_WARNING)
def test_a_task_whose_model_measured_no_video_is_not_assessed_beside_the_others_finding(
    tmp_path: Path, study
) -> None:
    # Only uncalibrated videos: the severe-AS model (sector) measures them,
    # the LVH model (cm) cannot. The SR reports severe AS and says LVH was
    # not assessed, instead of leaving it out (silence reads as "absent").
    from echonode.analyse.worker import study_report
    from echonode.report.read import summarise_report
    from tests.conftest import make_config

    uid, files = study
    cfg = make_config(tmp_path)
    tiny_bundle(cfg.models_dir, "lvh", preprocessing={"framing": "physical", "field_cm": 16.0})
    tiny_bundle(cfg.models_dir, "severe_as")
    _view_bundle(cfg.models_dir, "plax")
    models = _registry(cfg.models_dir).current
    result = analyse_study(uid, files[1:], models)
    assert result.skipped_reason is None and list(result.tasks) == ["severe_as"]
    summary = summarise_report(study_report(result, cfg, models, fallback_header=files[1]))
    assert [(f["task"], f["assessed"], f["not_assessed_reason"]) for f in summary["findings"]] == [
        ("severe_as", True, None), ("lvh", False, "no_measurable_video")]
    assert summary["summary_lines"][1] == (
        "Left ventricular hypertrophy: not assessed by the AI model (no video in the study that this model "
        "could measure). Not for diagnostic use.")
    assert sorted(summary["evidence"]) == sorted(v.sop_uid for v in result.videos)


def test_a_study_no_model_could_measure_is_skipped_as_without_a_usable_video(tmp_path: Path, study) -> None:
    from echonode.analyse.worker import not_assessed_of

    uid, files = study
    models = tmp_path / "models"
    tiny_bundle(models, "lvh", preprocessing={"framing": "physical", "field_cm": 16.0})
    registry = _registry(models)
    result = analyse_study(uid, files[1:], registry.current)
    assert result.skipped_reason.startswith("no usable video (no calibrated 2D tissue region")
    assert [n.reason for n in not_assessed_of(result, registry.current, ("plax",))] == ["no_usable_video"]

    # With a sector-framed view model as well the videos decode and are
    # classified, but the LVH model still has nothing it can measure.
    _view_bundle(models, "plax")
    registry = _registry(models)
    result = analyse_study(uid, files[1:], registry.current)
    assert result.skipped_reason.startswith("no video the task models could measure (not measured by lvh")
    assert [n.reason for n in not_assessed_of(result, registry.current, ("plax",))] == ["no_measurable_video"]


def test_a_view_model_that_frames_in_cm_leaves_uncalibrated_videos_unclassified(tmp_path: Path, study) -> None:
    # Only the real loop states its pixel size: the others are not classified,
    # so no task model sees them, and they say why.
    uid, files = study
    models = tmp_path / "models"
    tiny_bundle(models, "lvh")
    _view_bundle(models, "plax", preprocessing={"framing": "physical", "field_cm": 16.0})
    result = analyse_study(uid, files, _registry(models).current)
    assert result.videos[0].used and result.videos[0].view == "plax"
    for generated in result.videos[1:]:
        assert generated.usable and not generated.used and generated.view is None
        assert generated.reason.startswith("view not classified: no calibrated 2D tissue region")
    assert list(result.tasks["lvh"].video_probabilities) == [result.videos[0].sop_uid]
