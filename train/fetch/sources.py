"""The two kinds of PACS fetch talks to: DIMSE (C-FIND + C-MOVE or C-GET) and DICOMweb (QIDO-RS + WADO-RS).

Each one finds studies, and fetches one study: its series query, the
choice of the US and SR series, their retrieval into the sink, and the
verdict (:class:`StudyResult`, or :class:`~train.fetch.errors.FetchError`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydicom.uid import UID
from pynetdicom import evt

from echonode.delivery.dimse import Peer
from echonode.ops.logs import get_logger
from echonode.studies.store import is_valid_uid

from .dimse import (
    FALLBACK_ENCODINGS,
    STUDY_ROOT_FIND,
    STUDY_ROOT_MOVE,
    UNCOMPRESSED,
    associate,
    get_contexts,
    single_encoding_get_contexts,
    storage_roles,
)
from .errors import FetchError
from .landing import Archive, InFlight, Sink
from .pacing import RateLimiter
from .query import (
    Criteria,
    FoundSeries,
    FoundStudy,
    StudyKey,
    announced,
    by_date_range,
    date_value,
    find_series_dimse,
    find_studies_dimse,
    found_series_json,
    found_study_json,
    json_value,
    study_filters,
    wanted,
)
from .retrieve import (
    Associations,
    SeriesOutcome,
    discard_leftovers_once_ended,
    get_series,
    judge,
    move_series,
    store_handler,
    throttle_handler,
    track_spool,
)
from .web import retrieve_instance, web_error

log = get_logger(__name__)


@dataclass(frozen=True)
class StudyResult:
    """How one study's fetch ended (when it did not raise)."""

    skipped: str | None = None  # why there was nothing to fetch
    expected: int | None = None  # instances the series query announced
    sent: int = 0  # instances the PACS sent (C-MOVE/C-GET counts), or those listed now on disk (WADO-RS)
    present: int = 0  # instances of the study on disk (this try and earlier ones)
    flight: InFlight | None = None  # what landed in this try, whose fsyncs may still be running


class Source(Protocol):
    """A PACS fetch can query and retrieve from."""

    label: str

    def find_studies(self, criteria: Criteria, today: dt.date) -> list[FoundStudy]:
        ...

    def find_series(self, study_uid: str) -> list[FoundSeries]:
        ...

    def fetch(self, study_uid: str, attempt: int, found: FoundStudy | None = None) -> StudyResult:
        """Retrieve one study; ``found`` is what the study-level query said of it."""
        ...

    def abort(self) -> None:
        ...

    def close(self) -> None:
        """End the run: release what is still open (kept for the next study)."""
        ...


#: How long a retrieval association may wait unused and still carry the next
#: study: well within the idle timeouts PACS set (30 s and more), so that an
#: association the PACS is about to close is not picked up.
REUSE_IDLE_S = 5.0


@dataclass
class _Retrieval:
    """A retrieval association and what its C-STORE handler needs to know."""

    assoc: Any = None
    #: The study being retrieved over it (where an unreadable object is filed).
    study_uid: str | None = None
    #: When it was last put back for reuse.
    idle_since: float = 0.0
    #: C-STOREs on it that fetch answered with anything but Success (whatever the reason).
    not_accepted: int = 0


class DimseSource:
    """A DICOM PACS: C-FIND, then C-MOVE (to fetch's SCP or to the node) or C-GET.

    Parameters
    ----------
    local_aet : str
        fetch's calling AE title.
    peer : Peer
        The PACS.
    mode : {"move", "get", "node"}
        ``node``: C-MOVE to ``move_aet`` (the node's SCP), nothing lands here.
    move_aet : str
        The move destination (C-MOVE modes).
    sink : Sink or None
        Where C-GET and fetch's SCP land instances (None in ``node`` mode).
    limiter : RateLimiter
    timeout_s : float
        Deadline of every network wait.
    max_pdu : int
    """

    def __init__(self, local_aet: str, peer: Peer, mode: str, move_aet: str, sink: Sink | None,
                 limiter: RateLimiter, timeout_s: float, max_pdu: int, reuse: bool = True) -> None:
        if mode not in ("move", "get", "node"):
            raise ValueError('Argument "mode" must be one of "move", "get", "node".')
        self.local_aet = local_aet
        self.peer = peer
        self.mode = mode
        self.move_aet = move_aet
        self.sink = sink
        self.limiter = limiter
        self.timeout_s = timeout_s
        self.max_pdu = max_pdu
        self.open = Associations()
        #: Keep a retrieval association open for the next study (an
        #: association costs some 50-100 ms of negotiation, 103 contexts for C-GET).
        self.reuse = reuse
        self._idle: list[_Retrieval] = []
        self._idle_lock = threading.Lock()
        #: Set once asking again in one encoding brought what the usual
        #: contexts did not: the PACS sends over the first context it
        #: accepted for a class (see :meth:`_get_in_other_encodings`).
        self.serves_first_context = False
        verb = {"move": f"C-MOVE to {move_aet}", "get": "C-GET", "node": f"C-MOVE to the node ({move_aet})"}[mode]
        self.label = f"{peer.ae_title}@{peer.host}:{peer.port} ({verb})"

    def _associate(self, *, for_retrieval: bool, retrieval: _Retrieval | None = None) -> Any:
        if for_retrieval and self.mode == "get":
            assert retrieval is not None
            return self._associate_get([(STUDY_ROOT_FIND, UNCOMPRESSED), *get_contexts()], retrieval)
        contexts = [(STUDY_ROOT_FIND, UNCOMPRESSED)]
        if for_retrieval:
            contexts.append((STUDY_ROOT_MOVE, UNCOMPRESSED))
        return associate(self.local_aet, self.peer, contexts, timeout_s=self.timeout_s, max_pdu=self.max_pdu)

    def _session(self, **kwargs: Any) -> Any:
        assoc = self._associate(**kwargs)
        self.open.add(assoc)
        return assoc

    def _close(self, assoc: Any) -> None:
        self.open.discard(assoc)
        if assoc.is_established:
            assoc.release()

    def _retrieval(self, study_uid: str | None) -> _Retrieval:
        """An association for retrieving ``study_uid``: one kept from the last study, or a new one."""
        now = time.monotonic()
        stale: list[_Retrieval] = []
        found: _Retrieval | None = None
        with self._idle_lock:
            while self._idle and found is None:
                kept = self._idle.pop()
                if kept.assoc.is_established and now - kept.idle_since < REUSE_IDLE_S:
                    found = kept
                else:
                    stale.append(kept)
        for kept in stale:  # closed by the PACS meanwhile, or idle too long to trust
            self._close(kept.assoc)
        if found is None:
            found = _Retrieval()
            found.assoc = self._session(for_retrieval=True, retrieval=found)
        found.study_uid = study_uid
        return found

    def _put_back(self, retrieval: _Retrieval) -> None:
        """Keep an association whose retrieval went well for the next study (or release it)."""
        if not self.reuse or not retrieval.assoc.is_established:
            self._close(retrieval.assoc)
            return
        retrieval.study_uid = None
        retrieval.idle_since = time.monotonic()
        with self._idle_lock:
            self._idle.append(retrieval)

    def close(self) -> None:
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for kept in idle:
            with contextlib.suppress(Exception):  # best effort on the way out
                self._close(kept.assoc)

    def find_studies(self, criteria: Criteria, today: dt.date) -> list[FoundStudy]:
        if self.reuse and (self.mode != "get" or self.sink is not None):
            # A retrieval association (it proposes the query model too),
            # kept for the first study: one negotiation fewer.
            retrieval = self._retrieval(None)
            try:
                found = find_studies_dimse(retrieval.assoc, criteria, today)
            except BaseException:
                self._close(retrieval.assoc)
                raise
            self._put_back(retrieval)
            return found
        assoc = self._session(for_retrieval=False)
        try:
            return find_studies_dimse(assoc, criteria, today)
        finally:
            self._close(assoc)

    def find_series(self, study_uid: str) -> list[FoundSeries]:
        assoc = self._session(for_retrieval=False)
        try:
            return find_series_dimse(assoc, study_uid)
        finally:
            self._close(assoc)

    def fetch(self, study_uid: str, attempt: int, found: FoundStudy | None = None) -> StudyResult:
        verb = "C-GET" if self.mode == "get" else "C-MOVE"
        retrieval = self._retrieval(study_uid)
        assoc = retrieval.assoc
        flight = None
        went_well = False
        try:
            expected: int | None
            if found is not None and found.echo_only:
                # The PACS said the study holds US and SR series only (the
                # usual echo study): no series query, one request for the study.
                targets: list[str | None] = [None]
                expected = found.n_instances
            else:
                every = find_series_dimse(assoc, study_uid)
                series = wanted(every)
                if not series:
                    went_well = True
                    return StudyResult(skipped="no US series")
                # One request for the study when it holds nothing but US and SR series.
                targets = [None] if len(series) == len(every) else [s.series_uid for s in series]
                expected = announced(series)
            if self.sink is not None:
                flight = self.sink.begin(study_uid, attempt)
            outcomes = []
            for target in targets:
                if self.mode == "get":
                    ours_before = retrieval.not_accepted
                    outcome = get_series(assoc, study_uid, target)
                    ours = retrieval.not_accepted - ours_before
                    if flight is not None and self._may_be_encoding_failures(outcome, ours, attempt):
                        outcome = self._get_in_other_encodings(study_uid, target, outcome, ours, flight)
                else:
                    outcome = move_series(assoc, self.move_aet, study_uid, target)
                outcomes.append(outcome)
                log.info("fetch.retrieved", study_uid=study_uid, series_uid=target, verb=verb,
                         status=f"0x{outcome.status:04X}", completed=outcome.completed, failed=outcome.failed,
                         warning=outcome.warning)
                if not outcome.ok and outcome.status != 0xB000:
                    break  # the PACS is refusing (busy, unknown destination): the other series would fare the same
            went_well = all(o.ok for o in outcomes)
        finally:
            # Anything but a clean retrieval: a fresh association for the next try.
            if went_well:
                self._put_back(retrieval)
            else:
                self._close(assoc)
            if self.sink is not None:
                flight = self.sink.end(study_uid) or flight
        sent = judge(outcomes, flight, verb)
        # A flight comes only from a sink.
        present = sent if flight is None else len(self.sink.journal.instances_of(study_uid))  # type: ignore[union-attr]
        return StudyResult(expected=expected, sent=sent, present=present, flight=flight)

    def _may_be_encoding_failures(self, outcome: SeriesOutcome, ours: int, attempt: int) -> bool:
        """Whether instances the PACS failed to send may have failed for their encoding (worth asking again).

        Only failures of the PACS's own (``ours``: what fetch itself answered
        with a failure), and only where the PACS is not busy: it sent others
        over the same request (0xB000). "Out of resources" (0xA7xx) is first
        waited out as a busy PACS (the runner's backoff); it is asked again
        at once only on a later try of the study, or from a PACS that has
        shown in this run that it serves the first context of a class: a
        study of JPEG cines alone then fails whole.
        """
        if outcome.failed <= ours:
            return False
        if outcome.status == 0xB000:
            return True
        return outcome.status & 0xFF00 == 0xA700 and (self.serves_first_context or attempt > 1)

    def _get_in_other_encodings(self, study_uid: str, target: str | None, first: SeriesOutcome, ours: int,
                                flight: InFlight) -> SeriesOutcome:
        """Ask again for what the PACS failed to send, one encoding at a time; the outcome of both.

        A PACS that sends each instance over the first context it accepted
        for the SOP class (dcmtk's ``dcmqrscp``) fails every instance stored
        in another encoding, and sends nothing over a context it cannot use.
        Each further C-GET proposes the image classes in one encoding only
        (:data:`~train.fetch.dimse.FALLBACK_ENCODINGS`, lossless first) and
        lands what that PACS holds in it, until every instance it counted
        has landed or been refused here (``ours``). A PACS that sends an
        instance already in the archive again converts what it sends: its
        failures were not for their encoding, and asking ends there (what
        is already in the archive stays as it first came). A busy PACS, or
        one that stops answering, ends it too; the first outcome then stands.
        """
        total = first.completed + first.failed + first.warning
        before = flight.landed_in(target)
        resent_before = flight.resent
        tried = 0
        flight.keep_landed = True
        try:
            for encoding in FALLBACK_ENCODINGS:
                if flight.landed_in(target) + ours >= total or flight.resent > resent_before:
                    break
                tried += 1
                retrieval = _Retrieval(study_uid=study_uid)
                try:
                    assoc = self._associate_get(single_encoding_get_contexts(encoding), retrieval)
                except FetchError as exc:
                    if exc.busy:
                        break
                    continue  # none of this encoding's contexts accepted
                self.open.add(assoc)
                try:
                    get_series(assoc, study_uid, target)
                except FetchError:
                    break  # no answer: the retry of the study will tell
                finally:
                    self._close(assoc)
        finally:
            flight.keep_landed = False
        got = flight.landed_in(target)
        converts = flight.resent > resent_before
        log.info("fetch.get_other_encodings", study_uid=study_uid, series_uid=target, failed_first=first.failed,
                 refused_here=ours, encodings_tried=tried, landed_now=got - before, missing=max(total - ours - got, 0),
                 pacs_converts=converts)
        if got > before and not converts:
            self.serves_first_context = True
        if got + ours >= total:
            # Instances refused here stay failures (judge() files them as fetch's own).
            return SeriesOutcome(first.series_uid, 0x0000 if not ours else first.status, got - first.warning,
                                 ours, first.warning)
        return SeriesOutcome(first.series_uid, first.status, max(got - first.warning, first.completed),
                             total - got, first.warning)

    def _associate_get(self, contexts: Sequence[tuple[str, Sequence[UID]]], retrieval: _Retrieval) -> Any:
        """A C-GET association: fetch is the storage SCP on it, landing into the sink."""
        assert self.sink is not None
        return associate(
            self.local_aet, self.peer, contexts,
            timeout_s=self.timeout_s, max_pdu=self.max_pdu, ext_neg=storage_roles(),
            handlers=[(evt.EVT_C_STORE, self._counting_store_handler(retrieval)),
                      (evt.EVT_CONN_OPEN, track_spool), (evt.EVT_CONN_CLOSE, discard_leftovers_once_ended),
                      *([(evt.EVT_DATA_RECV, throttle_handler(self.limiter))] if self.limiter.enabled else [])],
        )

    def _counting_store_handler(self, retrieval: _Retrieval) -> Any:
        """The sink's C-STORE handler, counting on ``retrieval`` what it answers with a failure."""
        assert self.sink is not None
        land = store_handler(self.sink, lambda: retrieval.study_uid)

        def on_store(event: Any) -> int:
            status = land(event)
            if status != 0x0000:
                retrieval.not_accepted += 1
            return status

        return on_store

    def abort(self) -> None:
        self.open.abort_all()


class WebSource:
    """A DICOMweb server: QIDO-RS searches, WADO-RS retrieval of each instance not yet on disk.

    Parameters
    ----------
    client : dicomweb_client.DICOMwebClient
        For QIDO-RS (built on ``session``).
    session : requests.Session
        For WADO-RS.
    base_url : str
        The service root (``--dicomweb``).
    sink : Sink
    archive : Archive
    limiter : RateLimiter
    timeout_s : float
    """

    def __init__(self, client: Any, session: Any, base_url: str, sink: Sink, archive: Archive,
                 limiter: RateLimiter, timeout_s: float) -> None:
        self.client = client
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.sink = sink
        self.archive = archive
        self.limiter = limiter
        self.timeout_s = timeout_s
        self.label = f"{self.base_url} (QIDO-RS + WADO-RS)"

    def _search(self, what: str, call: Any, *args: Any, **kwargs: Any) -> list[dict]:
        import requests  # the train extra (dicomweb-client brings it); absent on a node-only install

        try:
            return list(call(*args, **kwargs))
        except (requests.RequestException, ValueError) as exc:
            raise web_error(exc, what) from None

    def find_studies(self, criteria: Criteria, today: dt.date) -> list[FoundStudy]:
        fields = ["StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]
        since, until = criteria.date_range(today)

        def ask(lo: dt.date | None, hi: dt.date | None, key: StudyKey | None) -> list[FoundStudy]:
            what = f"QIDO-RS studies (row {key.row})" if key else "QIDO-RS studies"
            out = []
            for item in self._search(what, self.client.search_for_studies, fields=fields,
                                     search_filters=study_filters(date_value(lo, hi), key)):
                study = found_study_json(item, not (key and key.study_uid))
                if study is not None:
                    out.append(study)
            return out

        found: dict[str, FoundStudy] = {}
        if criteria.keys:
            for key in criteria.keys:
                for study in ask(since, until, key):
                    found.setdefault(study.study_uid, study)
        else:
            for study in by_date_range(since, until, lambda lo, hi: ask(lo, hi, None)):
                found.setdefault(study.study_uid, study)
        return list(found.values())

    def find_series(self, study_uid: str) -> list[FoundSeries]:
        items = self._search(f"QIDO-RS series of {study_uid}", self.client.search_for_series, study_uid,
                             fields=["Modality", "NumberOfSeriesRelatedInstances"])
        out: dict[str, FoundSeries] = {}
        for item in items:
            s = found_series_json(item)
            if s is not None:
                out.setdefault(s.series_uid, s)
        return list(out.values())

    def fetch(self, study_uid: str, attempt: int, found: FoundStudy | None = None) -> StudyResult:
        series = wanted(self.find_series(study_uid))
        if not series:
            return StudyResult(skipped="no US series")
        have = self.sink.journal.instances_of(study_uid)
        flight = self.sink.begin(study_uid, attempt)
        listed = 0
        present = 0
        try:
            for s in series:
                items = self._search(f"QIDO-RS instances of {s.series_uid}", self.client.search_for_instances,
                                     study_uid, s.series_uid, fields=["SOPClassUID"])
                for item in items:
                    sop_uid = str(json_value(item, "00080018") or "").strip("\x00 ")
                    if not is_valid_uid(sop_uid):
                        continue
                    listed += 1
                    if sop_uid in have and self._on_disk(study_uid, s.series_uid, sop_uid):
                        present += 1
                        continue
                    parts = retrieve_instance(self.session, self.base_url, study_uid, s.series_uid, sop_uid,
                                              self.archive.tmp, self.timeout_s, on_chunk=self.limiter.take)
                    for part in parts:
                        if self.sink.accept(part, sop_uid, study_uid) == 0:
                            present += 1
        finally:
            self.sink.end(study_uid)
        if flight.refused:
            raise FetchError(f"{flight.refused} instance(s) refused here ({flight.reasons[0]})", transient=False)
        if present < listed:
            raise FetchError(f"{listed} instance(s) listed but {present} retrieved", transient=True)
        return StudyResult(expected=listed, sent=present,
                           present=len(self.sink.journal.instances_of(study_uid)), flight=flight)

    def _on_disk(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        return (self.archive.root / study_uid / series_uid / f"{sop_uid}.dcm").is_file()

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # best effort on the way out
            self.session.close()

    def close(self) -> None:
        """Close the HTTP session's kept-alive connections."""
        with contextlib.suppress(Exception):  # best effort on the way out
            self.session.close()
