"""Video networks: 3D ResNet-18 and R(2+1)D-18 in plain torch.

The modules are laid out so that their ``state_dict`` keys and shapes are
exactly those of ``torchvision.models.video.r3d_18`` and ``r2plus1d_18``
(``stem.0``, ``stem.1``, ``layerN.M.conv1.0``, ``layerN.M.conv1.1``,
``layerN.M.conv2.0``, ``layerN.M.conv2.1``, ``layerN.0.downsample.0/1``,
``fc``). A user's torchvision-format checkpoint (Kinetics-400 weights, an
EchoCLR encoder trained with the original code) therefore loads with
``strict=True``. torchvision itself is not used: on the CPU build of torch this
project pins, its C extension does not import.

The base width is configurable so that tests and the ``tiny`` preset can run a
narrow network on a laptop CPU; width 64 is the published network. Stage widths
are ``width * (1, 2, 4, 8)``, so the pooled feature has ``8 * width`` channels.
"""

from __future__ import annotations

import torch
from torch import nn

from echonode.bundles.manifest import ARCHITECTURES, NORMALISATIONS

__all__ = [
    "ARCHITECTURES",
    "KINETICS_MEAN",
    "KINETICS_STD",
    "NORMALISATIONS",
    "VideoClassifier",
    "VideoResNet",
    "build_model",
    "feature_dim",
    "normalise_for_model",
]


#: Per-channel statistics of Kinetics-400, applied on top of the per-clip
#: min-max scaling for networks initialised from Kinetics weights (METHOD.md).
KINETICS_MEAN: tuple[float, float, float] = (0.43216, 0.394666, 0.37645)
KINETICS_STD: tuple[float, float, float] = (0.22803, 0.22145, 0.216989)


# torchvision hard-codes 45 intermediate channels in the R(2+1)D stem for its
# 64-wide network; narrower networks scale it in proportion.
_R2PLUS1D_STEM_MID = 45
_BLOCKS_PER_STAGE = (2, 2, 2, 2)


def feature_dim(width: int) -> int:
    """Return the pooled feature size of a network of base ``width``.

    Parameters
    ----------
    width : int
        Base width (channels of the stem and of ``layer1``).

    Returns
    -------
    int
        ``8 * width``: 512 for the published network.
    """
    return 8 * int(width)


def _midplanes(inplanes: int, planes: int) -> int:
    """Channels between the spatial and temporal convolution of a (2+1)D block.

    The formula keeps the parameter count of the factorised convolution equal
    to that of the full 3x3x3 convolution it replaces (Tran et al. 2018); it is
    computed once per block from the block's *input* and output widths and
    used for both of its convolutions, as torchvision does.
    """
    return (inplanes * planes * 3 * 3 * 3) // (inplanes * 3 * 3 + 3 * planes)


class Conv2Plus1D(nn.Sequential):
    """Factorised 3D convolution: 1x3x3 spatial, BN, ReLU, 3x1x1 temporal.

    Parameters
    ----------
    in_planes, out_planes : int
        Input and output channels.
    midplanes : int
        Channels between the two convolutions.
    stride : int
        Stride in time and space (split between the two convolutions).
    """

    def __init__(self, in_planes: int, out_planes: int, midplanes: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv3d(
                in_planes,
                midplanes,
                kernel_size=(1, 3, 3),
                stride=(1, stride, stride),
                padding=(0, 1, 1),
                bias=False,
            ),
            nn.BatchNorm3d(midplanes),
            nn.ReLU(inplace=True),
            nn.Conv3d(
                midplanes,
                out_planes,
                kernel_size=(3, 1, 1),
                stride=(stride, 1, 1),
                padding=(1, 0, 0),
                bias=False,
            ),
        )


def _conv(arch: str, in_planes: int, out_planes: int, midplanes: int, stride: int = 1) -> nn.Module:
    """The 3x3x3-equivalent convolution of a residual block for ``arch``."""
    if arch == "r3d_18":
        return nn.Conv3d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
    return Conv2Plus1D(in_planes, out_planes, midplanes, stride)


class BasicBlock(nn.Module):
    """Two-convolution residual block with torchvision's module names.

    Parameters
    ----------
    arch : str
        ``"r3d_18"`` or ``"r2plus1d_18"``; selects the convolution.
    inplanes, planes : int
        Input and output channels.
    stride : int
        Stride of the first convolution (and of the shortcut).
    """

    def __init__(self, arch: str, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        mid = _midplanes(inplanes, planes)
        self.conv1 = nn.Sequential(
            _conv(arch, inplanes, planes, mid, stride),
            nn.BatchNorm3d(planes),
            nn.ReLU(inplace=True),
        )
        self.conv2 = nn.Sequential(
            _conv(arch, planes, planes, mid),
            nn.BatchNorm3d(planes),
        )
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            # Both architectures subsample time and space in the shortcut.
            self.downsample = nn.Sequential(
                nn.Conv3d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm3d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        return self.relu(out + residual)


def _stem(arch: str, width: int) -> nn.Sequential:
    """The input stem: stride 2 in space only, as in torchvision."""
    if arch == "r3d_18":
        return nn.Sequential(
            nn.Conv3d(3, width, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )
    mid = max(1, (_R2PLUS1D_STEM_MID * width) // 64)
    return nn.Sequential(
        nn.Conv3d(3, mid, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
        nn.BatchNorm3d(mid),
        nn.ReLU(inplace=True),
        nn.Conv3d(mid, width, kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(inplace=True),
    )


class VideoClassifier(nn.Module):
    """A video ResNet-18 with a linear head named ``fc``.

    Parameters
    ----------
    arch : str
        ``"r3d_18"`` or ``"r2plus1d_18"``.
    num_outputs : int
        Outputs of the head (1 for a binary task, the number of classes for a
        multi-class one, 400 to load Kinetics-400 weights as they are).
    width : int, optional
        Base width; 64 is the published network.
    dropout : float, optional
        Dropout probability applied to the *logits* in training mode (the
        EchoCLR fine-tuning head is ``Linear`` followed by ``Dropout(0.25)``).

    Notes
    -----
    Input is ``(B, 3, T, H, W)`` float. The network is fully convolutional up
    to a global average pool, so any ``T >= 1`` and ``H, W >= 1`` work; the
    method uses 16 x 112 x 112 for fine-tuning and 4 x 112 x 112 for
    pretraining.
    """

    # The four stages, set by number in __init__.
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, arch: str, num_outputs: int, width: int = 64, dropout: float = 0.25) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f'Argument "arch" must be one of {", ".join(ARCHITECTURES)}; got {arch!r}.')
        if int(num_outputs) < 1:
            raise ValueError(f'Argument "num_outputs" must be at least 1; got {num_outputs!r}.')
        if int(width) < 1:
            raise ValueError(f'Argument "width" must be at least 1; got {width!r}.')
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f'Argument "dropout" must be in [0, 1); got {dropout!r}.')
        self.arch = arch
        self.width = int(width)
        self.num_outputs = int(num_outputs)
        self.feature_dim = feature_dim(width)

        self.stem = _stem(arch, self.width)
        inplanes = self.width
        for index, (multiplier, blocks) in enumerate(zip((1, 2, 4, 8), _BLOCKS_PER_STAGE, strict=True), start=1):
            planes = self.width * multiplier
            stride = 1 if index == 1 else 2
            layer = [BasicBlock(arch, inplanes, planes, stride)]
            layer += [BasicBlock(arch, planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layer))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Linear(self.feature_dim, self.num_outputs)
        # Dropout has no parameters, so it does not change the state dict.
        self.dropout = nn.Dropout(float(dropout))
        self._initialise()

    def _initialise(self) -> None:
        """torchvision's initialisation, so random-init baselines match it."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def reset_head(self, num_outputs: int | None = None) -> None:
        """Replace ``fc`` with a freshly initialised head.

        Parameters
        ----------
        num_outputs : int, optional
            New number of outputs; the current one when omitted.
        """
        if num_outputs is not None:
            self.num_outputs = int(num_outputs)
        stem_weight = next(self.stem.parameters())  # the first convolution's
        self.fc = nn.Linear(self.feature_dim, self.num_outputs).to(device=stem_weight.device, dtype=stem_weight.dtype)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encode clips into pooled features (the encoder without ``fc``).

        Parameters
        ----------
        x : torch.Tensor
            ``(B, 3, T, H, W)`` clips.

        Returns
        -------
        torch.Tensor
            ``(B, feature_dim)`` features; what the SSL heads consume.
        """
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return self.avgpool(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, num_outputs)``; dropout acts in training only."""
        return self.dropout(self.fc(self.features(x)))


#: The architecture document's name for the same network.
VideoResNet = VideoClassifier


def build_model(arch: str, num_outputs: int, width: int = 64, dropout: float = 0.25) -> VideoClassifier:
    """Build a video classifier with torchvision's state-dict layout.

    Parameters
    ----------
    arch : str
        ``"r3d_18"`` or ``"r2plus1d_18"``.
    num_outputs : int
        Number of logits (1 for binary tasks).
    width : int, optional
        Base width; 64 is the published network, 8 or 16 suit CPU tests.
    dropout : float, optional
        Dropout on the logits in training mode.

    Returns
    -------
    VideoClassifier
        A randomly initialised network in training mode.

    Raises
    ------
    ValueError
        If an argument is out of range; the message names it.
    """
    return VideoClassifier(arch, num_outputs, width=width, dropout=dropout)


def normalise_for_model(clips: torch.Tensor, normalisation: str) -> torch.Tensor:
    """Apply a model's input normalisation to clips already scaled to [0, 1].

    Parameters
    ----------
    clips : torch.Tensor
        ``(N, 3, T, H, W)`` clips after per-clip min-max scaling.
    normalisation : str
        ``"minmax"`` (nothing more to do) or ``"kinetics"`` (subtract the
        Kinetics-400 mean and divide by its standard deviation per channel).

    Returns
    -------
    torch.Tensor
        The clips, normalised (a new tensor for ``"kinetics"``).

    Raises
    ------
    ValueError
        For an unknown normalisation.
    """
    if normalisation == "minmax":
        return clips
    if normalisation == "kinetics":
        shape = (1, 3, 1, 1, 1)
        mean = torch.tensor(KINETICS_MEAN, dtype=clips.dtype, device=clips.device).view(shape)
        std = torch.tensor(KINETICS_STD, dtype=clips.dtype, device=clips.device).view(shape)
        return (clips - mean) / std
    raise ValueError(f'Argument "normalisation" must be one of {", ".join(NORMALISATIONS)}; got {normalisation!r}.')
