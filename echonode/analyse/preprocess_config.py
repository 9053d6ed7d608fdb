"""The preprocessing settings: one definition for the node, bundles and training.

Kept apart from :mod:`echonode.analyse.preprocess` (which needs OpenCV) so
that the node process can read and check a bundle's settings without
loading image code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["FRAMINGS", "MASK_MIN_SIDE", "REQUIRED_KEYS", "SECTOR_MASK_RULE", "PreprocessConfig"]

SECTOR_MASK_RULE = 3
"""Version of :func:`echonode.analyse.preprocess.sector_mask`'s rule, recorded
in every clip cache and every bundle fine-tuned from one, so that frames masked
by two rules are never mixed or compared, and a node warns when it crops
otherwise than a bundle was trained: 1, the largest moving region only; 2,
every large moving tissue region; 3, rule 2 on frames decoded to at least
:data:`MASK_MIN_SIDE` pixels on the short side, whatever the model's size."""

MASK_MIN_SIDE = 112
"""Short side (pixels) under which frames are not decoded, whatever size the
models take. A JPEG decode reduced to 1/8 (60x80 of a 480x640 loop) averages
the speckle's motion away at the sector's dim edges: the mask of the real
SonoSite loop lost a third of its width there, and every model saw a zoomed
crop of it. It also makes what a model sees independent of the other models
installed beside it (the decode serves the largest of them)."""

#: How a frame becomes a square model input.
#: ``sector``: crop to the sector's bounding box, pad to a centred square
#: (aspect kept), resize. ``frame``: resize the whole masked frame to the
#: square (aspect not kept), as the EchoCLR authors' code does; a checkpoint
#: trained with their code expects this. ``physical``: a square window of
#: ``field_cm`` centimetres hung from the transducer face on the beam axis
#: (the calibration's origin; else the moving sector's top, centred on it), at
#: the pixel size the image's calibrated tissue region states, so that one input
#: pixel is the same size in every video; a video without a believable
#: calibration is not measured (for models that measure in cm: wall
#: thickness, valve opening).
FRAMINGS: tuple[str, ...] = ("sector", "frame", "physical")

#: Keys every bundle's ``preprocessing`` holds; later keys (``framing``,
#: ``target_fps``) take their defaults when a bundle predates them.
REQUIRED_KEYS: tuple[str, ...] = ("size", "clip_frames", "eval_clips", "max_frames", "min_fps")


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing settings shared by the node and training.

    Attributes
    ----------
    size : int
        Output side in pixels (112 in EchoCLR).
    clip_frames : int
        Frames per clip (16 for fine-tuning and inference).
    eval_clips : int
        Evenly spaced clips per video at evaluation (4).
    max_frames : int
        Native frames kept from the start of each video (100).
    min_fps : float
        Videos under this frame rate are refused (25; Doppler strips).
    target_fps : float or None
        Resample to this frame rate (nearest frame) before cutting clips.
        None (default) keeps native frames, as EchoCLR does.
    mask_frames : int
        Frames used by the temporal statistic of the sector mask.
    framing : str
        One of :data:`FRAMINGS`; ``sector`` by default (every bundle made
        before the setting existed was trained that way).
    """

    size: int = 112
    clip_frames: int = 16
    eval_clips: int = 4
    max_frames: int = 100
    min_fps: float = 25.0
    target_fps: float | None = None
    mask_frames: int = 32
    framing: str = "sector"
    field_cm: float = 16.0

    def __post_init__(self) -> None:
        for name in ("size", "clip_frames", "eval_clips", "max_frames", "mask_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'Argument "{name}" must be a positive integer, got {value!r}.')
        if isinstance(self.min_fps, bool) or not isinstance(self.min_fps, (int, float)) or self.min_fps < 0:
            raise ValueError(f'Argument "min_fps" must be a non-negative number, got {self.min_fps!r}.')
        if self.target_fps is not None and not self.target_fps > 0:
            raise ValueError(f'Argument "target_fps" must be positive, got {self.target_fps!r}.')
        if self.framing not in FRAMINGS:
            raise ValueError(f'Argument "framing" must be one of {", ".join(FRAMINGS)}, got {self.framing!r}.')
        if (isinstance(self.field_cm, bool) or not isinstance(self.field_cm, (int, float))
                or not 2.0 <= self.field_cm <= 40.0):
            raise ValueError(f'Argument "field_cm" must be a number of cm in [2, 40], got {self.field_cm!r}.')

    @classmethod
    def from_meta(cls, pre: Mapping[str, Any]) -> PreprocessConfig:
        """The settings a bundle's (or a clip cache's) ``preprocessing`` object records.

        Parameters
        ----------
        pre : mapping
            ``bundle.json``'s ``preprocessing``. Keys this class does not
            know (``normalisation``, which belongs to the model) are ignored;
            missing optional keys take their defaults.

        Returns
        -------
        PreprocessConfig

        Raises
        ------
        ValueError
            When a required key is missing or a value is out of range.
        """
        missing = [k for k in REQUIRED_KEYS if k not in pre]
        if missing:
            raise ValueError(f"preprocessing lacks {', '.join(missing)}")
        target = pre.get("target_fps")
        return cls(
            size=int(pre["size"]),
            clip_frames=int(pre["clip_frames"]),
            eval_clips=int(pre["eval_clips"]),
            max_frames=int(pre["max_frames"]),
            min_fps=float(pre["min_fps"]),
            target_fps=None if target is None else float(target),
            framing=str(pre.get("framing", "sector")),
            field_cm=float(pre.get("field_cm", 16.0)),
        )

    def to_meta(self) -> dict[str, Any]:
        """The ``preprocessing`` object a bundle or cache records (:meth:`from_meta` reads it back)."""
        meta: dict[str, Any] = {
            "size": self.size,
            "clip_frames": self.clip_frames,
            "eval_clips": self.eval_clips,
            "max_frames": self.max_frames,
            "min_fps": float(self.min_fps),
            "framing": self.framing,
        }
        if self.target_fps is not None:
            meta["target_fps"] = float(self.target_fps)
        if self.framing == "physical":
            meta["field_cm"] = float(self.field_cm)
        return meta
