"""Tests for echonode.bundles.nets: torchvision layout and an independent reference forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from echonode.bundles.nets import (
    ARCHITECTURES,
    KINETICS_MEAN,
    KINETICS_STD,
    build_model,
    feature_dim,
    normalise_for_model,
)

# --------------------------------------------------------------------------
# An independent functional reference: walks the state dict by key name and
# applies torch.nn.functional ops with the strides/paddings of torchvision's
# definitions. It shares no code with echonode.bundles.nets.
# --------------------------------------------------------------------------


def _bn(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    return F.batch_norm(
        x,
        sd[f"{prefix}.running_mean"],
        sd[f"{prefix}.running_var"],
        sd[f"{prefix}.weight"],
        sd[f"{prefix}.bias"],
        training=False,
        eps=1e-5,
    )


def _block_conv(x: torch.Tensor, sd: dict, prefix: str, arch: str, stride: int) -> torch.Tensor:
    if arch == "r3d_18":
        return F.conv3d(x, sd[f"{prefix}.weight"], stride=stride, padding=1)
    # (2+1)D: spatial 1x3x3 (spatial stride), BN, ReLU, temporal 3x1x1 (temporal stride)
    y = F.conv3d(x, sd[f"{prefix}.0.weight"], stride=(1, stride, stride), padding=(0, 1, 1))
    y = F.relu(_bn(y, sd, f"{prefix}.1"))
    return F.conv3d(y, sd[f"{prefix}.3.weight"], stride=(stride, 1, 1), padding=(1, 0, 0))


def reference_forward(sd: dict, arch: str, x: torch.Tensor) -> torch.Tensor:
    if arch == "r3d_18":
        x = F.conv3d(x, sd["stem.0.weight"], stride=(1, 2, 2), padding=(1, 3, 3))
        x = F.relu(_bn(x, sd, "stem.1"))
    else:
        x = F.conv3d(x, sd["stem.0.weight"], stride=(1, 2, 2), padding=(0, 3, 3))
        x = F.relu(_bn(x, sd, "stem.1"))
        x = F.conv3d(x, sd["stem.3.weight"], stride=1, padding=(1, 0, 0))
        x = F.relu(_bn(x, sd, "stem.4"))
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            stride = 2 if (layer > 1 and block == 0) else 1
            out = F.relu(_bn(_block_conv(x, sd, f"{p}.conv1.0", arch, stride), sd, f"{p}.conv1.1"))
            out = _bn(_block_conv(out, sd, f"{p}.conv2.0", arch, 1), sd, f"{p}.conv2.1")
            if f"{p}.downsample.0.weight" in sd:
                shortcut = _bn(F.conv3d(x, sd[f"{p}.downsample.0.weight"], stride=stride), sd, f"{p}.downsample.1")
            else:
                shortcut = x
            x = F.relu(out + shortcut)
    pooled = F.adaptive_avg_pool3d(x, 1).flatten(1)
    return F.linear(pooled, sd["fc.weight"], sd["fc.bias"])


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights *and* BN running statistics, so eval-mode BN is not an identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
            elif tensor.ndim == 1:  # BN affine and fc bias
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            else:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * (2.0 / fan_in) ** 0.5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_matches_functional_reference(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_outputs=3, width=8)
    _randomise(model)
    model.eval()
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        got = model(x)
        want = reference_forward(model.state_dict(), arch, x)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # features() is the encoder without fc
    with torch.no_grad():
        feats = model.features(x)
    assert feats.shape == (2, feature_dim(8)) == (2, 64)
    torch.testing.assert_close(F.linear(feats, model.fc.weight, model.fc.bias), want, atol=1e-5, rtol=1e-5)


def _expected_keys(arch: str) -> list[str]:
    """torchvision's key list for r3d_18 / r2plus1d_18 in registration order."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys: list[str] = []
    if arch == "r3d_18":
        keys += ["stem.0.weight"] + [f"stem.1.{s}" for s in bn]
    else:
        keys += ["stem.0.weight"] + [f"stem.1.{s}" for s in bn] + ["stem.3.weight"] + [f"stem.4.{s}" for s in bn]

    def conv(prefix: str) -> list[str]:
        if arch == "r3d_18":
            return [f"{prefix}.weight"]
        return [f"{prefix}.0.weight"] + [f"{prefix}.1.{s}" for s in bn] + [f"{prefix}.3.weight"]

    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            keys += conv(f"{p}.conv1.0") + [f"{p}.conv1.1.{s}" for s in bn]
            keys += conv(f"{p}.conv2.0") + [f"{p}.conv2.1.{s}" for s in bn]
            if layer > 1 and block == 0:
                keys += [f"{p}.downsample.0.weight"] + [f"{p}.downsample.1.{s}" for s in bn]
    return keys + ["fc.weight", "fc.bias"]


def test_r3d_18_kinetics_layout() -> None:
    model = build_model("r3d_18", num_outputs=400)
    sd = model.state_dict()
    assert list(sd) == _expected_keys("r3d_18")
    assert len(sd) == 122
    assert sd["stem.0.weight"].shape == (64, 3, 3, 7, 7)
    assert sd["layer1.0.conv1.0.weight"].shape == (64, 64, 3, 3, 3)
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1, 1)
    assert sd["layer3.1.conv1.1.running_var"].shape == (256,)
    assert sd["layer4.1.conv2.0.weight"].shape == (512, 512, 3, 3, 3)
    assert sd["fc.weight"].shape == (400, 512)
    assert sd["fc.bias"].shape == (400,)
    assert sum(p.numel() for p in model.parameters()) == 33_371_472


def test_r2plus1d_18_kinetics_layout() -> None:
    model = build_model("r2plus1d_18", num_outputs=400)
    sd = model.state_dict()
    assert list(sd) == _expected_keys("r2plus1d_18")
    assert sd["stem.0.weight"].shape == (45, 3, 1, 7, 7)
    assert sd["stem.3.weight"].shape == (64, 45, 3, 1, 1)
    # midplanes = (in * out * 27) // (in * 9 + 3 * out), once per block from its input width
    assert sd["layer1.0.conv1.0.0.weight"].shape == (144, 64, 1, 3, 3)
    assert sd["layer2.0.conv1.0.0.weight"].shape == (230, 64, 1, 3, 3)
    assert sd["layer2.0.conv1.0.3.weight"].shape == (128, 230, 3, 1, 1)
    assert sd["layer2.0.conv2.0.0.weight"].shape == (230, 128, 1, 3, 3)
    assert sd["layer2.1.conv1.0.0.weight"].shape == (288, 128, 1, 3, 3)
    assert sd["layer4.1.conv2.0.3.weight"].shape == (512, 1152, 3, 1, 1)
    assert sd["fc.weight"].shape == (400, 512)
    assert sum(p.numel() for p in model.parameters()) == 31_505_325


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_torchvision_format_state_dict_loads_strict(arch: str) -> None:
    source = build_model(arch, num_outputs=400, width=8)
    _randomise(source, seed=3)
    # A plain dict (what torch.load of a torchvision checkpoint gives) loads strictly.
    plain = {k: v.clone() for k, v in source.state_dict().items()}
    target = build_model(arch, num_outputs=400, width=8)
    target.load_state_dict(plain, strict=True)
    for key, value in plain.items():
        assert torch.equal(target.state_dict()[key], value)


def test_width_scales_stages() -> None:
    sd = build_model("r3d_18", 1, width=16).state_dict()
    assert sd["stem.0.weight"].shape[0] == 16
    assert sd["layer2.0.conv1.0.weight"].shape[0] == 32
    assert sd["layer3.0.conv1.0.weight"].shape[0] == 64
    assert sd["layer4.0.conv1.0.weight"].shape[0] == 128
    assert sd["fc.weight"].shape == (1, 128)
    sd2 = build_model("r2plus1d_18", 1, width=16).state_dict()
    assert sd2["stem.3.weight"].shape == (16, 11, 3, 1, 1)  # 45 * 16 // 64


def test_dropout_acts_on_the_logit_in_training_only() -> None:
    torch.manual_seed(1)
    model = build_model("r3d_18", num_outputs=64, width=4, dropout=0.5)
    x = torch.randn(2, 3, 4, 16, 16)
    model.train()
    with torch.no_grad():
        logits = model(x)
        plain = model.fc(model.features(x))  # batch-stat BN gives the same features
    dropped = logits == 0
    assert dropped.any() and (~dropped).any()
    torch.testing.assert_close(logits[~dropped], plain[~dropped] / 0.5)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.fc(model.features(x)))
        torch.testing.assert_close(model(x), model(x))


def test_reset_head() -> None:
    model = build_model("r3d_18", num_outputs=400, width=4)
    model.reset_head(2)
    assert model.fc.weight.shape == (2, 32)
    assert model.num_outputs == 2
    assert model.eval()(torch.randn(1, 3, 2, 8, 8)).shape == (1, 2)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"arch": "resnet50", "num_outputs": 1}, '"arch"'),
        ({"arch": "r3d_18", "num_outputs": 0}, '"num_outputs"'),
        ({"arch": "r3d_18", "num_outputs": 1, "width": 0}, '"width"'),
        ({"arch": "r3d_18", "num_outputs": 1, "dropout": 1.0}, '"dropout"'),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        build_model(**kwargs)


def test_normalise_for_model() -> None:
    clips = torch.rand(2, 3, 4, 8, 8)
    assert normalise_for_model(clips, "minmax") is clips
    out = normalise_for_model(clips, "kinetics")
    for c in range(3):
        torch.testing.assert_close(out[:, c], (clips[:, c] - KINETICS_MEAN[c]) / KINETICS_STD[c])
    with pytest.raises(ValueError, match="normalisation"):
        normalise_for_model(clips, "zscore")
