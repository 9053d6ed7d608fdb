"""Tests for echonode.bundles (manifest, weights, registry): format, validation, prediction, hot reload."""

from __future__ import annotations

import inspect
import json
import os
import pickle
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from echonode.analyse.preprocess_config import SECTOR_MASK_RULE
from echonode.bundles.device import resolve_device
from echonode.bundles.manifest import (
    BUNDLE_JSON,
    WEIGHTS_FILE,
    BundleError,
    BundleMeta,
    folder_signature,
    model_set_key,
)
from echonode.bundles.nets import KINETICS_MEAN, KINETICS_STD, build_model
from echonode.bundles.registry import ModelRegistry, load_bundles
from echonode.bundles.weights import Bundle, load_bundle, save_bundle

WIDTH = 4
FRAMES = 4
SIZE = 16
TINY_PRE = {"size": SIZE, "clip_frames": FRAMES}


def _meta(task: str = "lvh", **kwargs) -> BundleMeta:
    kwargs.setdefault("name", f"{task}-test")
    kwargs.setdefault("preprocessing", TINY_PRE)
    return BundleMeta.create(task=task, width=WIDTH, **kwargs)


def _weights(meta: BundleMeta, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(meta.arch, meta.num_outputs, width=meta.width)
    with torch.no_grad():
        # A non-trivial head, so that outputs differ between clips.
        model.fc.weight.normal_(0.0, 1.0)
        model.fc.bias.normal_(0.0, 1.0)
    return model.state_dict()


def _make(path: Path, task: str = "lvh", seed: int = 0, **kwargs) -> tuple[BundleMeta, dict[str, torch.Tensor]]:
    meta = _meta(task, **kwargs)
    weights = _weights(meta, seed)
    save_bundle(path, meta, weights)
    return meta, weights


def _clips(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, FRAMES, SIZE, SIZE), dtype=np.float32)


# --------------------------------------------------------------------------
# Round trip and prediction
# --------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    meta, weights = _make(tmp_path / "lvh")
    assert sorted(os.listdir(tmp_path)) == ["lvh"]  # no staging folder left behind
    assert sorted(os.listdir(tmp_path / "lvh")) == [BUNDLE_JSON, WEIGHTS_FILE]
    bundle = load_bundle(tmp_path / "lvh")
    assert bundle.meta == meta
    assert not bundle.model.training
    assert bundle.device == torch.device("cpu")
    for key, value in weights.items():
        assert torch.equal(bundle.model.state_dict()[key], value), key
    data = json.loads((tmp_path / "lvh" / BUNDLE_JSON).read_text())
    assert list(data)[0] == "format_version"
    assert data["labels"] == ["absent", "present"]
    assert data["clinical_use"] is False
    # weights.pt is a plain state dict that weights_only loading accepts
    plain = torch.load(tmp_path / "lvh" / WEIGHTS_FILE, weights_only=True)
    assert isinstance(plain, dict) and set(plain) == set(weights)


def test_new_device_uid_per_run() -> None:
    a, b = _meta(), _meta()
    assert a.device_uid != b.device_uid
    assert a.device_uid.startswith("1.2.")


def test_binary_predict_is_sigmoid_of_logit(tmp_path: Path) -> None:
    _make(tmp_path / "b")
    bundle = load_bundle(tmp_path / "b", runtime="eager")  # compared with bundle.model below
    clips = _clips(5)
    probs = bundle.predict(clips, batch_size=2)
    assert probs.shape == (5,) and probs.dtype == np.float32
    with torch.no_grad():
        want = torch.sigmoid(bundle.model(torch.from_numpy(clips))[:, 0]).numpy()
    np.testing.assert_allclose(probs, want, atol=1e-6)
    # batching does not change results; tensors are accepted too
    np.testing.assert_allclose(bundle.predict(torch.from_numpy(clips), batch_size=8), probs, atol=1e-6)
    assert probs.std() > 0


def test_view_predict_is_softmax(tmp_path: Path) -> None:
    _make(tmp_path / "v", task="view", labels=["plax", "a4c", "psax"])
    bundle = load_bundle(tmp_path / "v")
    probs = bundle.predict(_clips(3))
    assert probs.shape == (3, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert bundle.labels == ["plax", "a4c", "psax"]
    assert bundle.predict(_clips(0)).shape == (0, 3)


def test_kinetics_normalisation_applied_in_predict(tmp_path: Path) -> None:
    _make(tmp_path / "k", preprocessing={**TINY_PRE, "normalisation": "kinetics"})
    bundle = load_bundle(tmp_path / "k", runtime="eager")  # compared with bundle.model below
    clips = _clips(2)
    x = torch.from_numpy(clips)
    mean = torch.tensor(KINETICS_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(KINETICS_STD).view(1, 3, 1, 1, 1)
    with torch.no_grad():
        want = torch.sigmoid(bundle.model((x - mean) / std)[:, 0]).numpy()
    np.testing.assert_allclose(bundle.predict(clips), want, atol=1e-6)


def test_predict_rejects_wrong_shapes(tmp_path: Path) -> None:
    _make(tmp_path / "b")
    bundle = load_bundle(tmp_path / "b")
    assert bundle.predict(_clips(0)).shape == (0,)
    with pytest.raises(ValueError, match='"clips"'):
        bundle.predict(np.zeros((2, 3, FRAMES + 1, SIZE, SIZE), np.float32))
    with pytest.raises(ValueError, match='"clips"'):
        bundle.predict(np.zeros((3, FRAMES, SIZE, SIZE), np.float32))
    with pytest.raises(ValueError, match='"batch_size"'):
        bundle.predict(_clips(1), batch_size=0)


def test_save_refuses_existing_unless_overwrite(tmp_path: Path) -> None:
    meta, weights = _make(tmp_path / "b")
    with pytest.raises(FileExistsError):
        save_bundle(tmp_path / "b", meta, weights)
    newer = _meta()
    save_bundle(tmp_path / "b", newer, _weights(newer, seed=5), overwrite=True)
    assert load_bundle(tmp_path / "b").meta.device_uid == newer.device_uid
    assert sorted(os.listdir(tmp_path)) == ["b"]


def test_save_checks_state_dict(tmp_path: Path) -> None:
    meta = _meta()
    wrong = build_model("r3d_18", 1, width=WIDTH * 2).state_dict()
    with pytest.raises(BundleError, match="do not fit"):
        save_bundle(tmp_path / "b", meta, wrong)
    assert not (tmp_path / "b").exists()
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _edit_json(folder: Path, edit) -> None:
    path = folder / BUNDLE_JSON
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("threshold"), "missing key.*threshold"),
        (lambda d: d.update(colour="red"), "unknown key.*colour"),
        (lambda d: d.update(task="hcm"), "unknown task 'hcm'"),
        (lambda d: d.update(labels=["no", "yes"]), "labels of binary task lvh"),
        (lambda d: d["architecture"].update(num_outputs=2), "num_outputs 1"),
        (lambda d: d["architecture"].update(name="resnet50"), "unknown architecture"),
        (lambda d: d.update(device_uid="not-a-uid"), "not a valid DICOM UID"),
        (lambda d: d.update(threshold=1.5), "threshold"),
        (lambda d: d["preprocessing"].update(normalisation="zscore"), "normalisation"),
        (lambda d: d["preprocessing"].pop("eval_clips"), "preprocessing lacks eval_clips"),
        (lambda d: d["preprocessing"].update(sector_mask="latest"), "preprocessing.sector_mask"),
        (lambda d: d["preprocessing"].update(sector_mask=0), "preprocessing.sector_mask"),
        (lambda d: d["preprocessing"].update(framing="physical", field_cm=0.5), "preprocessing.field_cm"),
        (lambda d: d["preprocessing"].update(framing="physical", field_cm="16"), "preprocessing.field_cm"),
        (lambda d: d.update(frame_size=SIZE * 2), "differs from frame_size"),
        (lambda d: d.update(random_weights="yes"), "random_weights"),
        (lambda d: d.update(format_version=99), "newer"),
    ],
)
def test_bad_metadata_is_refused(tmp_path: Path, edit, message: str) -> None:
    _make(tmp_path / "b")
    _edit_json(tmp_path / "b", edit)
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(tmp_path / "b")
    assert str(tmp_path / "b") in str(info.value)


@pytest.mark.parametrize(("rule", "warned"), [(None, False), (SECTOR_MASK_RULE, False), (SECTOR_MASK_RULE - 1, True)])
def test_a_bundle_of_another_sector_mask_rule_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, rule: int | None, warned: bool,
) -> None:
    pre = TINY_PRE if rule is None else {**TINY_PRE, "sector_mask": rule}
    _make(tmp_path / "b", preprocessing=pre)
    with caplog.at_level("WARNING"):
        bundle = load_bundle(tmp_path / "b", runtime="eager")
    assert bundle.meta.preprocessing.get("sector_mask") == rule
    lines = [r.getMessage() for r in caplog.records if "bundle.sector_mask_differs" in r.getMessage()]
    assert len(lines) == int(warned)
    if warned:
        # "key=value" from stdlib, "'key': value" once a test has configured structlog.
        assert re.search(rf"trained_rule\W+{rule}\b", lines[0]) and re.search(rf"node_rule\W+{SECTOR_MASK_RULE}\b", lines[0])
        assert str(tmp_path / "b") in lines[0]


def test_view_labels_must_fit(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="plax"):
        _meta("view", labels=["a4c", "psax"])
    _make(tmp_path / "v", task="view", labels=["plax", "a4c", "psax"])
    _edit_json(tmp_path / "v", lambda d: d.update(labels=["plax", "a4c"]))
    with pytest.raises(BundleError, match="2 labels but architecture.num_outputs is 3"):
        load_bundle(tmp_path / "v")


def test_invalid_json_and_missing_files(tmp_path: Path) -> None:
    _make(tmp_path / "b")
    (tmp_path / "b" / BUNDLE_JSON).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path / "b")
    _make(tmp_path / "c")
    (tmp_path / "c" / WEIGHTS_FILE).unlink()
    with pytest.raises(BundleError, match="weights.pt is missing"):
        load_bundle(tmp_path / "c")
    with pytest.raises(BundleError, match="not a folder"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "d").mkdir()
    with pytest.raises(BundleError, match="bundle.json is missing"):
        load_bundle(tmp_path / "d")


def test_wrong_weights_are_refused(tmp_path: Path) -> None:
    meta, weights = _make(tmp_path / "b")
    folder = tmp_path / "b"
    # wrong width
    torch.save(build_model("r3d_18", 1, width=WIDTH * 2).state_dict(), folder / WEIGHTS_FILE)
    with pytest.raises(BundleError, match=r"wrong shape.*stem\.0\.weight") as info:
        load_bundle(folder)
    assert str(folder) in str(info.value)
    # a missing key
    torch.save({k: v for k, v in weights.items() if k != "fc.bias"}, folder / WEIGHTS_FILE)
    with pytest.raises(BundleError, match=r"missing key.*fc\.bias"):
        load_bundle(folder)
    # an extra key
    torch.save({**weights, "projector.0.weight": torch.zeros(2, 2)}, folder / WEIGHTS_FILE)
    with pytest.raises(BundleError, match=r"unexpected key.*projector"):
        load_bundle(folder)
    # not a state dict at all
    torch.save([1, 2, 3], folder / WEIGHTS_FILE)
    with pytest.raises(BundleError, match="not a state dict"):
        load_bundle(folder)
    # truncated file
    (folder / WEIGHTS_FILE).write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(BundleError, match="cannot be read"):
        load_bundle(folder)


def test_missing_batchnorm_counters_are_tolerated(tmp_path: Path) -> None:
    """Weights saved without BatchNorm's ``num_batches_tracked`` load and predict as the full ones do."""
    meta, weights = _make(tmp_path / "b")
    clips = _clips(2)
    want = load_bundle(tmp_path / "b", runtime="eager").predict(clips)
    counters = [k for k in weights if "num_batches_tracked" in k]
    assert counters  # the model has BatchNorm layers: the case is real
    torch.save({k: v for k, v in weights.items() if k not in counters}, tmp_path / "b" / WEIGHTS_FILE)
    bundle = load_bundle(tmp_path / "b", runtime="eager")
    np.testing.assert_array_equal(bundle.predict(clips), want)


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_pickle_with_code_is_refused(tmp_path: Path, container: str) -> None:
    meta, weights = _make(tmp_path / "b")
    marker = tmp_path / "pwned"
    evil = {**weights, "fc.bias": _Payload(marker)}
    path = tmp_path / "b" / WEIGHTS_FILE
    if container == "torch-zip":
        torch.save(evil, path)
    else:
        payload = pickle.dumps(evil, protocol=2)
        # The payload is real: a plain unpickler runs it.
        pickle.loads(payload)
        assert marker.exists()
        marker.unlink()
        path.write_bytes(payload)
    with pytest.raises(BundleError, match="cannot be read as a plain state dict"):
        load_bundle(tmp_path / "b")
    assert not marker.exists()


# --------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="expected auto"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="cuda:N"):
        resolve_device("cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:1")
    else:
        assert resolve_device("cuda") == torch.device("cuda", 0)
        with pytest.raises(ValueError, match="GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_predict_matches_cpu(tmp_path: Path) -> None:
    _make(tmp_path / "b")
    _make(tmp_path / "v", task="view", seed=1)
    for name in ("b", "v"):
        cpu = load_bundle(tmp_path / name, "cpu", runtime="eager").predict(_clips(6))
        gpu_bundle = load_bundle(tmp_path / name, "cuda")
        assert next(gpu_bundle.model.parameters()).is_cuda
        gpu = gpu_bundle.predict(_clips(6), batch_size=4)
        assert gpu.dtype == np.float32
        np.testing.assert_allclose(gpu, cpu, atol=2e-2)  # autocast to 16-bit
        # No autocast anywhere: amp off and no runtime (``cuda`` mode autocasts too).
        exact = load_bundle(tmp_path / name, "cuda", amp=False, runtime="eager").predict(_clips(6))
        np.testing.assert_allclose(exact, cpu, atol=1e-4)


# --------------------------------------------------------------------------
# The models folder
# --------------------------------------------------------------------------


def test_load_bundles_collects_errors(tmp_path: Path) -> None:
    _make(tmp_path / "a-lvh", task="lvh")
    _make(tmp_path / "b-as", task="severe_as")
    _make(tmp_path / "c-broken", task="view")
    (tmp_path / "c-broken" / WEIGHTS_FILE).write_bytes(b"junk")
    (tmp_path / ".staging").mkdir()  # hidden: an install in progress
    (tmp_path / "README").write_text("not a bundle")
    bundles, errors = load_bundles(tmp_path)
    assert [b.task for b in bundles] == ["lvh", "severe_as"]
    assert [(p.name, "c-broken" in msg) for p, msg in errors] == [("c-broken", True)]
    absent = tmp_path / "absent"
    assert load_bundles(absent) == ([], [(absent, f"models folder {absent} does not exist")])


def test_one_bundle_per_task_newest_wins(tmp_path: Path) -> None:
    old, _ = _make(tmp_path / "lvh-v1", version="1")
    new_meta = _meta(version="2")
    new_meta.created = "2999-01-01T00:00:00+00:00"
    save_bundle(tmp_path / "lvh-v2", new_meta, _weights(new_meta))
    bundles, errors = load_bundles(tmp_path)
    assert [b.version for b in bundles] == ["2"]
    assert errors[0][0].name == "lvh-v1" and "served by the newer bundle lvh-v2" in errors[0][1]
    bundles, errors = load_bundles(tmp_path, one_per_task=False)
    assert len(bundles) == 2 and not errors


def test_model_set_key_is_stable() -> None:
    a, b, c = _meta("lvh"), _meta("severe_as"), _meta("view")
    assert model_set_key([a, b, c]) == model_set_key([c, a, b])
    assert model_set_key([a, b]) != model_set_key([a, b, c])
    b2 = BundleMeta.from_dict({**b.to_dict(), "device_uid": "1.2.3.4"})
    assert model_set_key([a, b]) != model_set_key([a, b2])
    assert len(model_set_key([])) == 32


def test_registry_hot_reload(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    registry = ModelRegistry(models, device="cpu")
    assert registry.bundles == () and registry.current.signature is None
    assert registry.refresh() is True  # first load, empty
    assert registry.refresh() is False
    empty_key = registry.key

    _make(models / "lvh")
    assert registry.refresh() is True
    first = registry.current
    assert first.tasks == ("lvh",) and first.key != empty_key
    assert registry.refresh() is False

    # Adding a bundle reloads, but the unchanged one is reused, not reloaded.
    _make(models / "as", task="severe_as")
    assert registry.refresh() is True
    assert set(registry.current.tasks) == {"lvh", "severe_as"}
    assert registry.current.by_task("lvh") is first.by_task("lvh")
    assert registry.current.by_task("view") is None

    # Replacing weights in place (new mtime) reloads that bundle.
    weights_path = models / "as" / WEIGHTS_FILE
    torch.save(_weights(_meta("severe_as"), seed=9), weights_path)
    st = weights_path.stat()
    os.utime(weights_path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    before = registry.current.by_task("severe_as")
    assert registry.refresh() is True
    assert registry.current.by_task("severe_as") is not before

    # A broken bundle is reported; the good one keeps serving.
    (models / "as" / WEIGHTS_FILE).write_bytes(b"junk")
    assert registry.refresh() is True
    assert registry.current.tasks == ("lvh",)
    assert [p.name for p, _ in registry.errors] == ["as"]

    # Removal.
    import shutil

    shutil.rmtree(models / "as")
    assert registry.refresh() is True
    assert registry.errors == () and registry.current.tasks == ("lvh",)
    assert registry.key == first.key  # same model set, same key
    assert registry.refresh(force=True) is True


def test_registry_is_thread_safe(tmp_path: Path) -> None:
    models = tmp_path / "models"
    _make(models / "lvh")
    _make(models / "as", task="severe_as")
    registry = ModelRegistry(models, device="cpu")
    failures: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                snap = registry.current
                assert len(snap.bundles) in (0, 2)
                assert snap.key == model_set_key(snap.bundles)
                time.sleep(0.001)  # spinning readers would starve the loaders of the GIL
        except BaseException as exc:  # noqa: BLE001 # pragma: no cover - handed to the test's thread
            failures.append(exc)

    def refresher() -> None:
        try:
            for _ in range(3):
                registry.refresh(force=True)
        except BaseException as exc:  # noqa: BLE001 # pragma: no cover - handed to the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    threads += [threading.Thread(target=refresher) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads[2:]:
        t.join()
    stop.set()
    for t in threads[:2]:
        t.join()
    assert not failures
    assert set(registry.current.tasks) == {"lvh", "severe_as"}
    assert registry.current.signature == folder_signature(models)


def test_bundle_describe(tmp_path: Path) -> None:
    meta, _ = _make(tmp_path / "b")
    info = load_bundle(tmp_path / "b").describe()
    assert info["device_uid"] == meta.device_uid and info["task"] == "lvh"
    json.dumps(info)
    assert isinstance(load_bundle(tmp_path / "b"), Bundle)


# --------------------------------------------------------------------------
# Inference runtime
# --------------------------------------------------------------------------


def test_library_runtime_default_is_the_configs() -> None:
    """Code that loads bundles without naming a runtime predicts as the node does."""
    from echonode.config import ModelsConfig

    for loader in (load_bundle, load_bundles, ModelRegistry):
        assert inspect.signature(loader).parameters["runtime"].default == ModelsConfig().runtime, loader


def test_load_bundle_runtime_and_describe(tmp_path: Path) -> None:
    from echonode.bundles.runtime import TOLERANCES, cpu_has_native_bf16

    _make(tmp_path / "b")
    clips = _clips(3)
    eager = load_bundle(tmp_path / "b", runtime="eager")
    assert eager.runner is None and eager.describe()["runtime"] == {"mode": "eager"}
    reference = eager.predict(clips)

    jit = load_bundle(tmp_path / "b", runtime="jit")
    info = jit.describe()["runtime"]
    assert (info["mode"], info["requested"], info["fallbacks"]) == ("jit", "jit", [])
    np.testing.assert_allclose(jit.predict(clips), reference, atol=TOLERANCES["jit"])

    # The default: what [models] runtime = "auto" gives the node on this CPU,
    # chosen by measurement among the candidates (tests/conftest.py narrows them).
    auto = load_bundle(tmp_path / "b")
    info = auto.describe()["runtime"]
    assert info["requested"] == "auto" and info["selection"]["chosen"] == info["mode"]
    table = {row["mode"]: row for row in info["selection"]["table"]}
    assert set(table) == {"eager", "jit", *(["bf16"] if cpu_has_native_bf16() else [])}
    assert table[info["mode"]]["result"].startswith("chosen")
    np.testing.assert_allclose(auto.predict(clips), reference, atol=0.03)
    json.dumps(auto.describe())

    with pytest.raises(ValueError, match='"runtime"'):
        load_bundle(tmp_path / "b", runtime="fast")


def test_registry_loads_bundles_with_its_runtime(tmp_path: Path) -> None:
    _make(tmp_path / "models" / "lvh")
    for registry, requested in (
        (ModelRegistry(tmp_path / "models", "cpu"), "auto"),
        (ModelRegistry(tmp_path / "models", "cpu", runtime="jit"), "jit"),
    ):
        registry.refresh()
        (bundle,) = registry.bundles
        assert bundle.describe()["runtime"]["requested"] == requested


@pytest.mark.parametrize(
    ("text", "kind", "index"),
    [("auto", "auto", None), (" CPU ", "cpu", None), ("cuda", "cuda", None), ("cuda:3", "cuda", 3)],
)
def test_device_settings_parse_without_torch(text: str, kind: str, index: int | None) -> None:
    from echonode.bundles.device_spec import parse_device

    assert parse_device(text) == (parse_device(text).__class__(kind, index))


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:x", "cuda:-1", "mps"])
def test_bad_device_settings_name_the_setting(text: str) -> None:
    from echonode.bundles.device_spec import parse_device

    with pytest.raises(ValueError, match=f"device {text!r}"):
        parse_device(text)
