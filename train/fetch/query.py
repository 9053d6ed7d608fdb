"""What to fetch: the criteria (date range or a list of studies) and the C-FIND / QIDO-RS queries.

Queries ask for UIDs, dates and counts only: no patient name is asked
for, and a patient ID from ``--studies`` is sent to the PACS as a matching
key but never kept, logged or printed (rows are named by their number).
"""

from __future__ import annotations

import csv
import datetime as dt
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.association import Association

from echonode.ops.logs import get_logger
from echonode.studies.store import is_valid_uid

from .dimse import STUDY_ROOT_FIND, no_answer, status_of
from .errors import FetchError, UsageError

log = get_logger(__name__)

#: Series modalities fetched: the echo images and the measurement reports.
WANTED_MODALITIES = ("US", "SR")


@dataclass(frozen=True)
class StudyKey:
    """One row of ``--studies``: the keys given on it are matched together."""

    row: int
    study_uid: str = ""
    accession: str = ""
    patient_id: str = ""


@dataclass(frozen=True)
class Criteria:
    """What the study-level query asks for.

    ``keys`` empty: every US study in the date range (open ends allowed;
    no dates at all: every US study the PACS holds).
    """

    since: dt.date | None = None
    until: dt.date | None = None
    keys: tuple[StudyKey, ...] = ()

    def date_range(self, today: dt.date) -> tuple[dt.date | None, dt.date | None]:
        """The StudyDate range asked for: an open end stays None, except that
        ``--since`` alone runs to today."""
        until = self.until if self.until is not None or self.since is None else today
        return self.since, until


#: A date range whose answer holds at least this many studies is asked again
#: in halves, down to single days: a PACS that caps its answers (many do,
#: at 500 to a few thousand) would otherwise truncate a long range silently.
SPLIT_AT = 500


def date_value(since: dt.date | None, until: dt.date | None) -> str:
    """The StudyDate matching value of a range (an empty string: any date)."""
    if since is None and until is None:
        return ""
    if since == until:
        return f"{since:%Y%m%d}"
    return f"{since:%Y%m%d}-" if until is None else (f"{since:%Y%m%d}-{until:%Y%m%d}" if since else f"-{until:%Y%m%d}")


def split_range(since: dt.date, until: dt.date) -> tuple[tuple[dt.date, dt.date], tuple[dt.date, dt.date]]:
    """Two halves of a range of at least two days."""
    mid = since + (until - since) // 2
    return (since, mid), (mid + dt.timedelta(days=1), until)


@dataclass(frozen=True)
class FoundStudy:
    """A study the study-level query returned."""

    study_uid: str
    study_date: str = ""
    n_series: int | None = None
    n_instances: int | None = None
    #: ModalitiesInStudy as the PACS answered it (empty: not said)
    modalities: tuple[str, ...] = ()

    @property
    def echo_only(self) -> bool:
        """The PACS says the study holds US series and nothing but US and SR."""
        return "US" in self.modalities and set(self.modalities) <= set(WANTED_MODALITIES)


@dataclass(frozen=True)
class FoundSeries:
    """A series of a study."""

    series_uid: str
    modality: str
    n_instances: int | None = None


def parse_date(text: str, name: str) -> dt.date:
    """``YYYY-MM-DD`` or ``YYYYMMDD``.

    Raises
    ------
    UsageError
    """
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(text.strip(), fmt).date()
        except ValueError:
            continue
    raise UsageError(f"{name} {text!r}: expected a date YYYY-MM-DD")


_COLUMNS = {
    "studyinstanceuid": "study_uid",
    "studyuid": "study_uid",
    "accessionnumber": "accession",
    "accession": "accession",
    "patientid": "patient_id",
}
#: Characters that make a C-FIND key a wildcard or a list instead of one value.
_NOT_LITERAL = re.compile(r"[*?\\]")


def read_studies_csv(path: str | Path) -> tuple[StudyKey, ...]:
    """The rows of a ``--studies`` CSV.

    The header names one or more of StudyInstanceUID (``study_uid``),
    AccessionNumber (``accession_number``), PatientID (``patient_id``), in
    any case, with or without underscores; other columns are ignored (a
    ``labels.csv`` works as it is). Empty rows are skipped.

    Raises
    ------
    UsageError
        For a missing file, no usable column, a malformed UID or a value that
        would match more than itself (``*``, ``?``, ``\\``); the message names
        the row, never the value.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"--studies {p}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--studies {p}: cannot read it ({type(exc).__name__})") from None
    reader = csv.DictReader(text.splitlines())
    fields = {name: _COLUMNS.get(name.strip().lower().replace("_", "").replace(" ", "")) for name in reader.fieldnames or []}
    if not any(fields.values()):
        raise UsageError(f"--studies {p}: the header names none of StudyInstanceUID, AccessionNumber, PatientID")
    keys = []
    for row_no, row in enumerate(reader, start=2):
        values: dict[str, str] = {}
        for name, key in fields.items():
            value = (row.get(name) or "").strip()
            if key and value:
                if _NOT_LITERAL.search(value):
                    raise UsageError(f"--studies {p} row {row_no}: a value holds a wildcard or a backslash")
                values[key] = value
        if not values:
            continue
        if "study_uid" in values and not is_valid_uid(values["study_uid"]):
            raise UsageError(f"--studies {p} row {row_no}: the StudyInstanceUID is not a valid UID")
        keys.append(StudyKey(row=row_no, **values))
    if not keys:
        raise UsageError(f"--studies {p}: no rows")
    return tuple(keys)


# -- DIMSE ---------------------------------------------------------------------------------


def _c_find(assoc: Association, query: Dataset, what: str) -> Iterator[Dataset]:
    """The identifiers a C-FIND returns; :class:`FetchError` unless it ends in success."""
    t0 = time.monotonic()
    for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
        code = status_of(status)
        if code is None:
            raise no_answer(assoc, what, time.monotonic() - t0)
        t0 = time.monotonic()
        if code in (0xFF00, 0xFF01):
            if identifier is not None:
                yield identifier
            continue
        if code == 0x0000:
            return
        if code & 0xFF00 == 0xA700:
            raise FetchError(f"{what}: 0x{code:04X} PACS out of resources", busy=True)
        if code == 0xFE00:
            raise FetchError(f"{what}: 0xFE00 cancelled by the PACS", transient=True)
        raise FetchError(f"{what}: 0x{code:04X} query refused", fatal=code & 0xFF00 == 0xA900)
    raise FetchError(f"{what}: no final answer from the PACS", busy=True)


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _uid(value: Any) -> str:
    return str(value or "").strip("\x00 ")


def study_query(date: str, key: StudyKey | None) -> Dataset:
    """The STUDY-level C-FIND identifier."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = key.study_uid if key else ""
    ds.StudyDate = date
    ds.AccessionNumber = key.accession if key and key.accession else ""
    if key and key.patient_id:
        ds.PatientID = key.patient_id
    # A study named by its UID is taken whatever its modalities; otherwise US only.
    ds.ModalitiesInStudy = "" if key and key.study_uid else "US"
    ds.NumberOfStudyRelatedSeries = ""
    ds.NumberOfStudyRelatedInstances = ""
    return ds


def _found_study(ident: Dataset, want_us: bool) -> FoundStudy | None:
    uid = _uid(ident.get("StudyInstanceUID"))
    if not is_valid_uid(uid):
        log.warning("fetch.query_bad_uid", level="study")
        return None
    modalities = ident.get("ModalitiesInStudy")
    values = ([modalities] if isinstance(modalities, str) else list(modalities)) if modalities else []
    values = [str(v).strip().upper() for v in values if str(v).strip()]
    if want_us and values and "US" not in values:
        return None  # a PACS that ignores the ModalitiesInStudy key
    return FoundStudy(uid, str(ident.get("StudyDate", "") or ""), _int(ident.get("NumberOfStudyRelatedSeries")),
                      _int(ident.get("NumberOfStudyRelatedInstances")), tuple(values))


def find_studies_dimse(assoc: Association, criteria: Criteria, today: dt.date,
                       split_at: int = SPLIT_AT) -> list[FoundStudy]:
    """Every study matching ``criteria``, each once, in the order found."""
    found: dict[str, FoundStudy] = {}
    since, until = criteria.date_range(today)

    def ask(lo: dt.date | None, hi: dt.date | None, key: StudyKey | None) -> list[FoundStudy]:
        what = f"C-FIND for row {key.row}" if key else "C-FIND STUDY"
        studies = []
        for ident in _c_find(assoc, study_query(date_value(lo, hi), key), what):
            study = _found_study(ident, not (key and key.study_uid))
            if study is not None:
                studies.append(study)
        return studies

    if criteria.keys:
        unmatched = []
        for key in criteria.keys:
            studies = ask(since, until, key)
            if not studies:
                unmatched.append(key.row)
            for study in studies:
                found.setdefault(study.study_uid, study)
        if unmatched:
            log.info("fetch.rows_unmatched", rows=unmatched[:50], count=len(unmatched))
        return list(found.values())
    for study in by_date_range(since, until, lambda lo, hi: ask(lo, hi, None), split_at):
        found.setdefault(study.study_uid, study)
    return list(found.values())


def by_date_range(since: dt.date | None, until: dt.date | None,
                  ask: Callable[[dt.date | None, dt.date | None], list[FoundStudy]],
                  split_at: int = SPLIT_AT) -> Iterator[FoundStudy]:
    """The studies of a range, asked again in halves while an answer is as long as a cap would make it."""
    studies = ask(since, until)
    if len(studies) < split_at or since is None or until is None or since >= until:
        if len(studies) >= split_at:
            log.warning("fetch.query_maybe_capped", answers=len(studies),
                        hint="an open or single-day range cannot be split: give --since and --until")
        yield from studies
        return
    log.info("fetch.query_split", answers=len(studies))
    for lo, hi in split_range(since, until):
        yield from by_date_range(lo, hi, ask, split_at)


def find_series_dimse(assoc: Association, study_uid: str) -> list[FoundSeries]:
    """Every series of a study (all modalities: the caller picks)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = ""
    ds.Modality = ""
    ds.NumberOfSeriesRelatedInstances = ""
    out: dict[str, FoundSeries] = {}
    for ident in _c_find(assoc, ds, f"C-FIND SERIES of {study_uid}"):
        uid = _uid(ident.get("SeriesInstanceUID"))
        if not is_valid_uid(uid):
            log.warning("fetch.query_bad_uid", level="series", study_uid=study_uid)
            continue
        out.setdefault(uid, FoundSeries(uid, str(ident.get("Modality", "") or "").upper(),
                                        _int(ident.get("NumberOfSeriesRelatedInstances"))))
    return list(out.values())


def wanted(series: Sequence[FoundSeries]) -> list[FoundSeries]:
    """The US and SR series, or none when the study has no US series."""
    if not any(s.modality == "US" for s in series):
        return []
    return [s for s in series if s.modality in WANTED_MODALITIES]


def announced(series: Iterable[FoundSeries]) -> int | None:
    """Instances the PACS said the series hold (None if it did not say for one of them)."""
    total = 0
    for s in series:
        if s.n_instances is None:
            return None
        total += s.n_instances
    return total


# -- QIDO-RS -----------------------------------------------------------------------------


def json_value(item: dict, tag: str) -> Any:
    """The first value of ``tag`` in a DICOM JSON object, or None."""
    element = item.get(tag) or {}
    values = element.get("Value") or []
    return values[0] if values else None


def study_filters(date: str, key: StudyKey | None) -> dict[str, str]:
    """QIDO-RS search parameters of one study query."""
    filters: dict[str, str] = {}
    if date:
        filters["StudyDate"] = date
    if key and key.study_uid:
        filters["StudyInstanceUID"] = key.study_uid
    else:
        filters["ModalitiesInStudy"] = "US"
    if key and key.accession:
        filters["AccessionNumber"] = key.accession
    if key and key.patient_id:
        filters["PatientID"] = key.patient_id
    return filters


def found_study_json(item: dict, want_us: bool) -> FoundStudy | None:
    uid = _uid(json_value(item, "0020000D"))
    if not is_valid_uid(uid):
        log.warning("fetch.query_bad_uid", level="study")
        return None
    modalities = [str(m).strip().upper() for m in (item.get("00080061") or {}).get("Value") or [] if m]
    if want_us and modalities and "US" not in modalities:
        return None
    return FoundStudy(uid, str(json_value(item, "00080020") or ""), _int(json_value(item, "00201206")),
                      _int(json_value(item, "00201208")), tuple(modalities))


def found_series_json(item: dict) -> FoundSeries | None:
    uid = _uid(json_value(item, "0020000E"))
    if not is_valid_uid(uid):
        return None
    return FoundSeries(uid, str(json_value(item, "00080060") or "").upper(), _int(json_value(item, "00201209")))
