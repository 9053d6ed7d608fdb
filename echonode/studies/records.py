"""The journal's records: what its methods take and give, and its refusals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "Claim",
    "Delivered",
    "Delivery",
    "DiscardedDelivery",
    "InstanceRecord",
    "OutboxItem",
    "OutboxLine",
    "ReportRecord",
    "SopInOtherStudy",
    "StaleClaim",
    "StatusSnapshot",
    "StudyActivity",
    "StudyLine",
    "StudySummary",
    "TaskResult",
    "TaskSummary",
]


@dataclass(frozen=True)
class InstanceRecord:
    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    size: int
    received: float
    calling_ae: str | None = None


@dataclass(frozen=True)
class Claim:
    """A study taken by the worker; ``generation`` guards against stale writes."""

    study_uid: str
    generation: int
    attempts: int


@dataclass(frozen=True)
class TaskResult:
    """One task's study-level result, as the worker records it."""

    task: str
    bundle_name: str
    bundle_version: str
    device_uid: str
    probability: float
    positive: bool
    threshold: float
    n_videos: int
    detail: dict[str, Any]


@dataclass(frozen=True)
class ReportRecord:
    sr_sop_uid: str
    study_uid: str
    model_set: str
    series_uid: str
    sop_class_uid: str
    path: str
    supersedes: str | None = None


@dataclass(frozen=True)
class StudyActivity:
    """A study as retention sees it (:meth:`Journal.purge_candidates`)."""

    study_uid: str
    state: str
    #: Last activity: ``max(last_received, updated)``.
    active: float
    instances: int
    bytes: int


@dataclass(frozen=True)
class OutboxItem:
    id: int
    sr_sop_uid: str
    study_uid: str
    destination: str
    state: str
    attempts: int
    next_attempt: float
    last_error: str | None
    path: str


@dataclass(frozen=True)
class DiscardedDelivery:
    """One dead letter given up by :meth:`Journal.discard_dead`."""

    study_uid: str
    sr_sop_uid: str
    destination: str
    #: Why it went dead: the delivery's last error.
    last_error: str | None


@dataclass(frozen=True)
class TaskSummary:
    """One task's result of a listed study (:meth:`Journal.snapshot`)."""

    task: str
    probability: float
    positive: bool
    threshold: float
    #: The bundle's name and version.
    model: str
    version: str
    n_videos: int


@dataclass(frozen=True)
class StudySummary:
    """A listed study (:meth:`Journal.snapshot`): its row, size and the results of its latest SR."""

    study_uid: str
    state: str
    instances: int
    bytes: int
    reason: str | None
    attempts: int
    first_received: float
    last_received: float
    updated: float
    results: list[TaskSummary]


@dataclass(frozen=True)
class Delivery:
    """A listed outbox row (:meth:`Journal.snapshot`)."""

    id: int
    study_uid: str
    sr_sop_uid: str
    destination: str
    state: str
    attempts: int
    next_attempt: float
    last_error: str | None
    sent_at: float | None
    discarded_at: float | None
    #: The SR class and SOP Instance UID the destination took (a class it
    #: refused leads to another: Comprehensive 3D SR falls back to
    #: Comprehensive SR); None until sent.
    sent_sop_class_uid: str | None = None
    sent_sop_uid: str | None = None


@dataclass(frozen=True)
class StatusSnapshot:
    """What ``echonode status`` reports (:meth:`Journal.snapshot`); its fields are the keys of ``--json``."""

    studies: list[StudySummary]
    outbox: list[Delivery]
    #: Every study state, 0 included.
    study_counts: dict[str, int]
    studies_total: int
    #: Every outbox state, 0 included.
    outbox_counts: dict[str, int]
    #: The listing's bound; None: everything listed.
    limit: int | None


@dataclass(frozen=True)
class StudyLine:
    """One study as the status page lists it (:meth:`Journal.page_studies`)."""

    study_uid: str
    state: str
    reason: str | None
    attempts: int
    instances: int
    first_received: float
    last_received: float
    #: Last activity: ``max(last_received, updated)``.
    active: float


@dataclass(frozen=True)
class OutboxLine:
    """One outbox row as the status page lists it (:meth:`Journal.page_outbox`)."""

    id: int
    study_uid: str
    sr_sop_uid: str
    destination: str
    state: str
    attempts: int
    next_attempt: float
    last_error: str | None
    created: float


@dataclass(frozen=True)
class Delivered:
    """A study's SR delivered (:meth:`Journal.page_deliveries`)."""

    study_uid: str
    last_received: float
    #: When the last destination acknowledged it.
    delivered_at: float


class SopInOtherStudy(ValueError):
    """The SOP Instance UID is already recorded under another study."""


class StaleClaim(RuntimeError):
    """The study changed (new instance, reprocess) while the worker held it."""
