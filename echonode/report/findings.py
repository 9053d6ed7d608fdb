"""What the report builder is given: a finding per task and the videos it used.

A task the models assessed is a :class:`TaskFinding`; a task they could not
assess (no usable video, no video of the view they need) is a
:class:`NotAssessed`, so that the report says so instead of staying silent.
The inputs are checked at the door (:func:`check_finding`,
:func:`check_not_assessed`), with a message that names the argument, so
that a wrong value never reaches highdicom.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from echonode.report.codes import NOT_ASSESSED_REASONS, TASKS

__all__ = ["NotAssessed", "SourceInstance", "TaskFinding", "check_finding", "check_not_assessed"]


@dataclass(frozen=True)
class SourceInstance:
    """One video (instance) a finding was computed from.

    Attributes
    ----------
    sop_class_uid : str
        SOP Class UID of the instance.
    sop_instance_uid : str
        SOP Instance UID of the instance.
    series_instance_uid : str
        Series Instance UID of the instance (same study as the report).
    view : str or None
        Echocardiographic view label (e.g. ``"plax"``), when known: the
        report codes it (CID 12226) as the video's acquisition context.
    """

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    view: str | None = None


@dataclass(frozen=True)
class TaskFinding:
    """A study-level result of one binary task, ready to be reported.

    Attributes
    ----------
    task : str
        Task name, a key of :data:`TASKS` (``"lvh"`` or ``"severe_as"``).
    probability : float
        Study-level probability of the finding, in [0, 1].
    threshold : float
        Decision threshold, in [0, 1]: the finding is reported Present when
        ``probability >= threshold``.
    model_name, model_version, device_uid : str
        From the model bundle; ``device_uid`` changes with every training run.
    parameters : dict of str to str
        Algorithm parameters (e.g. ``{"clip_frames": "16"}``), written as
        ``key=value`` TID 4019 Algorithm Parameters.
    sources : tuple of SourceInstance
        Every video the finding used.
    n_videos : int
        Number of videos used.
    video_probabilities : dict of str to float
        Optional per-video probabilities, keyed by SOP Instance UID (each key
        must be one of ``sources``).
    """

    task: str
    probability: float
    threshold: float
    model_name: str
    model_version: str
    device_uid: str
    parameters: Mapping[str, str]
    sources: tuple[SourceInstance, ...]
    n_videos: int
    video_probabilities: Mapping[str, float] = field(default_factory=dict)



@dataclass(frozen=True)
class NotAssessed:
    """A task the models could not assess in a study, and why.

    Attributes
    ----------
    task : str
        Task name, a key of :data:`~echonode.report.codes.TASKS`.
    reason : str
        A key of :data:`~echonode.report.codes.NOT_ASSESSED_REASONS`:
        ``"no_usable_video"`` (no object of the study decoded as a usable
        cine loop), ``"no_required_view"`` (usable videos, none of a view
        the models take) or ``"no_measurable_video"`` (videos of the view,
        none this model could measure: a model framing in cm, videos
        without a calibration).
    threshold : float
        The model's decision threshold, in [0, 1].
    model_name, model_version, device_uid : str
        From the model bundle that would have assessed it.
    parameters : dict of str to str
        Algorithm parameters, as for :class:`TaskFinding`.
    required_views : tuple of str
        The view labels the models take (``models.views``), for
        ``"no_required_view"``.
    """

    task: str
    reason: str
    threshold: float
    model_name: str
    model_version: str
    device_uid: str
    parameters: Mapping[str, str] = field(default_factory=dict)
    required_views: tuple[str, ...] = ()


def _check_unit_interval(value: Any, name: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or not 0.0 <= value <= 1.0
    ):
        raise ValueError(f'Argument "{name}" must be a number in [0, 1], got {value!r}.')


def check_finding(finding: Any, i: int) -> None:
    """Refuse a finding the report cannot carry.

    Parameters
    ----------
    finding : TaskFinding
        The ``i``-th finding given to the builder.
    i : int
        Its position, to name it in the message.

    Raises
    ------
    ValueError
        When ``finding`` or one of its fields is invalid; the message names
        it as ``findings[i].field``.
    """
    name = f"findings[{i}]"
    if not isinstance(finding, TaskFinding):
        raise ValueError(f'Argument "{name}" must be a TaskFinding.')
    if finding.task not in TASKS:
        raise ValueError(
            f'Argument "{name}.task" must be one of {sorted(TASKS)}, '
            f"got {finding.task!r}."
        )
    _check_unit_interval(finding.probability, f"{name}.probability")
    _check_unit_interval(finding.threshold, f"{name}.threshold")
    for attr in ("model_name", "model_version", "device_uid"):
        if not isinstance(getattr(finding, attr), str) or not getattr(finding, attr):
            raise ValueError(f'Argument "{name}.{attr}" must be a non-empty string.')
    if len(finding.sources) == 0:
        raise ValueError(f'Argument "{name}.sources" must not be empty.')
    for j, src in enumerate(finding.sources):
        if not isinstance(src, SourceInstance):
            raise ValueError(f'Argument "{name}.sources[{j}]" must be a SourceInstance.')
    if (
        isinstance(finding.n_videos, bool)
        or not isinstance(finding.n_videos, int)
        or finding.n_videos < 1
    ):
        raise ValueError(f'Argument "{name}.n_videos" must be a positive integer.')
    source_uids = {s.sop_instance_uid for s in finding.sources}
    for uid, p in finding.video_probabilities.items():
        if uid not in source_uids:
            raise ValueError(
                f'Argument "{name}.video_probabilities" names {uid!r}, '
                "which is not one of its sources."
            )
        _check_unit_interval(p, f"{name}.video_probabilities[{uid!r}]")


def check_not_assessed(item: Any, i: int) -> None:
    """Refuse a not-assessed task the report cannot carry.

    Parameters
    ----------
    item : NotAssessed
        The ``i``-th not-assessed task given to the builder.
    i : int
        Its position, to name it in the message.

    Raises
    ------
    ValueError
        When ``item`` or one of its fields is invalid; the message names it
        as ``not_assessed[i].field``.
    """
    name = f"not_assessed[{i}]"
    if not isinstance(item, NotAssessed):
        raise ValueError(f'Argument "{name}" must be a NotAssessed.')
    if item.task not in TASKS:
        raise ValueError(f'Argument "{name}.task" must be one of {sorted(TASKS)}, got {item.task!r}.')
    if item.reason not in NOT_ASSESSED_REASONS:
        raise ValueError(
            f'Argument "{name}.reason" must be one of {sorted(NOT_ASSESSED_REASONS)}, got {item.reason!r}.'
        )
    _check_unit_interval(item.threshold, f"{name}.threshold")
    for attr in ("model_name", "model_version", "device_uid"):
        if not isinstance(getattr(item, attr), str) or not getattr(item, attr):
            raise ValueError(f'Argument "{name}.{attr}" must be a non-empty string.')
    if isinstance(item.required_views, str) or not all(
        isinstance(v, str) and v for v in item.required_views
    ):
        raise ValueError(f'Argument "{name}.required_views" must be a tuple of view labels.')
