"""The fetch run: query, record, then retrieve study by study within the window, the cap and the backoff.

Exit codes (also in docs/training.md):

==== ==========================================================================
0    every study the query found is on disk (``complete``) or had nothing to fetch
1    some studies are not complete (failed or not reached); a re-run continues
2    a usage error: bad argument, unreadable file, another fetch on this archive
3    the PACS could not be used at all: the query failed, the association was
     rejected permanently, the move destination is unknown (0xA801), the
     credentials were refused; nothing more can come until a setting changes
130  interrupted (Ctrl-C, SIGTERM); a re-run continues
==== ==========================================================================
"""

from __future__ import annotations

import contextlib
import fcntl
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import IO, Any

from echonode.ops.logs import get_logger

from .errors import FetchError, UsageError
from .journal import DONE_STATES, FetchJournal, FetchState
from .landing import Archive, Sink
from .pacing import Backoff, Clock, RateLimiter, SystemClock, Window, local
from .query import Criteria, FoundStudy, wanted
from .sources import Source, StudyResult

log = get_logger(__name__)

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_USAGE = 2
EXIT_SOURCE = 3
EXIT_INTERRUPTED = 130

MB = 1e6
#: Dry-run size guesses per instance before this archive has any (bytes).
GUESS_BYTES = {"US": 5e6, "SR": 5e4}


@dataclass
class Options:
    """How a run behaves (the command line, minus the source)."""

    criteria: Criteria = field(default_factory=Criteria)
    max_in_flight: int = 1
    window: Window | None = None
    attempts: int = 3
    retry_initial_s: float = 30.0
    retry_max_s: float = 900.0
    dry_run: bool = False
    progress: bool = True


@dataclass
class Summary:
    """What a run did; ``exit_code`` is what the command returns."""

    found: int = 0
    already_complete: int = 0
    complete: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    not_reached: int = 0
    instances: int = 0
    bytes: int = 0
    seconds: float = 0.0
    fatal: str | None = None
    exit_code: int = EXIT_OK


@contextlib.contextmanager
def archive_lock(archive: Archive) -> Iterator[None]:
    """Hold ``.fetch/lock`` for the run: two fetches into one archive would share a journal and a tmp folder."""
    with open(archive.lock_path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UsageError(f"another fetch is writing {archive.root} (.fetch/lock is held)") from None
        yield


@contextlib.contextmanager
def temp_files_in(folder: Any) -> Iterator[None]:
    """Point ``tempfile`` (where pynetdicom streams each C-STORE) at the archive's tmp folder."""
    old = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = old


def _fmt_wait(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(1, minutes)} min"


class Fetcher:
    """One fetch run into an archive.

    Parameters
    ----------
    source : Source
    archive : Archive
    journal : FetchJournal
    sink : Sink or None
    options : Options
    limiter : RateLimiter
    clock : Clock
        Every wait and every time recorded goes through it.
    out : file-like
        Where the summary and the waits are printed (stdout).
    """

    def __init__(self, source: Source, archive: Archive, journal: FetchJournal, sink: Sink | None, options: Options,
                 limiter: RateLimiter, clock: Clock | None = None, out: IO[str] | None = None) -> None:
        self.source = source
        self.archive = archive
        self.journal = journal
        self.sink = sink
        self.opts = options
        self.limiter = limiter
        self.clock = clock or SystemClock()
        self.out = out or sys.stdout
        self.backoff = Backoff(options.retry_initial_s, options.retry_max_s, self.clock)
        self.summary = Summary()
        self._stop: str | None = None
        self._bar: Any = None
        self._announced: str | None = None
        self._found: dict[str, FoundStudy] = {}

    # -- messages ----------------------------------------------------------------------

    def say(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    # -- waiting -----------------------------------------------------------------------

    def _blocked_for(self) -> tuple[float, str] | None:
        """Seconds to wait before the PACS may be asked, and why; None: now."""
        now = local(self.clock)
        if self.opts.window is not None and not self.opts.window.contains(now):
            resume = self.opts.window.next_open(now)
            return (resume - now).total_seconds(), f"outside the window {self.opts.window}: resuming at {resume:%Y-%m-%d %H:%M}"
        pause = self.backoff.remaining()
        if pause > 0:
            return pause, f"the PACS is busy or not answering: pausing {pause:.0f} s"
        return None

    def wait_until_allowed(self) -> None:
        """Sleep (on the clock, in steps of at most a minute) until the window is open and no backoff holds."""
        while self._stop is None:
            blocked = self._blocked_for()
            if blocked is None:
                self._announced = None
                return
            seconds, why = blocked
            if why != self._announced:
                self._announced = why
                self.say(f"fetch: {why}" + (f" (in {_fmt_wait(seconds)})" if "window" in why else ""))
                log.info("fetch.waiting", reason="window" if "window" in why else "backoff", seconds=round(seconds))
            self.clock.sleep(min(seconds, 60.0) + 0.001)

    # -- the run -----------------------------------------------------------------------

    def query(self) -> list[FoundStudy]:
        """The study-level query, retried with backoff while the PACS is busy."""
        tries = 0
        while True:
            self.wait_until_allowed()
            tries += 1
            try:
                found = self.source.find_studies(self.opts.criteria, local(self.clock).date())
                self.backoff.succeeded()
                return found
            except FetchError as exc:
                log.warning("fetch.query_failed", reason=exc.reason, attempt=tries)
                if exc.fatal or not exc.transient or tries >= self.opts.attempts:
                    raise
                if exc.busy:
                    self.backoff.failed()

    def run(self) -> Summary:
        """Query, record, fetch; returns the summary (and prints it)."""
        started = self.clock.time()
        wall = time.monotonic()
        s = self.summary
        try:
            found = self.query()
        except FetchError as exc:
            s.fatal = exc.reason
            s.exit_code = EXIT_SOURCE
            self.say(f"fetch: the query failed: {exc.reason}")
            if "aborted" in exc.reason:
                self.say("fetch: (a PACS that does not know fetch's AE title often aborts at the first request)")
            return s
        s.found = len(found)
        self._found = {f.study_uid: f for f in found}
        self.journal.record_found([(f.study_uid, f.n_instances) for f in found], self.clock.time())
        states = self.journal.states()
        todo = [f.study_uid for f in found if states.get(f.study_uid) not in DONE_STATES]
        s.already_complete = len(found) - len(todo)
        log.info("fetch.query_done", studies=len(found), to_fetch=len(todo), already_complete=s.already_complete)
        self.say(f"fetch: {len(found)} studies found, {len(todo)} to fetch ({s.already_complete} already here)")
        if todo:
            self._fetch_all(todo)
        s.seconds = time.monotonic() - wall if isinstance(self.clock, SystemClock) else self.clock.time() - started
        if self.sink is not None:
            s.instances, s.bytes = self.sink.total_instances, self.sink.total_bytes
        if s.fatal:
            s.exit_code = EXIT_SOURCE
        elif s.failed or s.not_reached:
            s.exit_code = EXIT_INCOMPLETE
        self.print_summary()
        return s

    def _fetch_all(self, todo: list[str]) -> None:
        pending: deque[tuple[str, int]] = deque((uid, 0) for uid in todo)
        running: dict[Future, tuple[str, int]] = {}
        settling: dict[Future, str] = {}
        bar = None
        if self.opts.progress:
            from tqdm import tqdm  # the train extra; absent on a node-only install

            bar = tqdm(total=len(todo), unit="study", desc="fetch", dynamic_ncols=True, file=sys.stderr)
        self._bar = bar
        t0 = self.clock.time()
        pool = ThreadPoolExecutor(max_workers=self.opts.max_in_flight, thread_name_prefix="fetch")
        # Makes each retrieved study durable, then records it complete, while
        # the workers already retrieve the next ones.
        durable = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetch-durable")
        try:
            while pending or running or settling:
                while pending and len(running) < self.opts.max_in_flight and self._stop is None:
                    if running and self._blocked_for() is not None:
                        break  # let the studies in flight finish; then wait
                    if not running and not settling:
                        self.wait_until_allowed()
                    elif self._blocked_for() is not None:
                        break
                    if self._stop is not None:
                        break
                    uid, tries = pending.popleft()
                    running[pool.submit(self._fetch_one, uid)] = (uid, tries + 1)
                if not running and not settling:
                    if pending and self._stop is None:
                        continue
                    break
                done, _ = wait([*running, *settling], timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in done:
                    if fut in settling:
                        uid = settling.pop(fut)
                        self._settled(uid, fut)
                        if bar is not None:
                            bar.update(1)
                        continue
                    uid, tries = running.pop(fut)
                    retry = self._settle(uid, tries, fut)
                    if retry:
                        pending.append((uid, tries))
                    elif fut.exception() is None and not fut.result()[1].skipped:
                        attempt, result = fut.result()
                        settling[durable.submit(self._make_durable, uid, attempt, result)] = uid
                    elif bar is not None:
                        bar.update(1)
                if bar is not None and self.sink is not None:
                    elapsed = max(1e-6, self.clock.time() - t0)
                    mb = self.sink.total_bytes / MB
                    bar.set_postfix_str(f"{mb:.1f} MB, {mb / elapsed:.2f} MB/s", refresh=False)
                if self._stop is not None and not running and not settling:
                    break
        except BaseException:
            self._stop = self._stop or "interrupted"
            self.limiter.stop()
            self.source.abort()
            pool.shutdown(wait=True, cancel_futures=True)
            durable.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            if bar is not None:
                bar.close()
            self._bar = None
        pool.shutdown(wait=True)
        durable.shutdown(wait=True)
        self.summary.not_reached = len(pending)

    def _fetch_one(self, uid: str) -> tuple[int, StudyResult]:
        attempt = self.journal.start_attempt(uid, self.clock.time())
        log.info("fetch.study_started", study_uid=uid, attempt=attempt)
        try:
            result = self.source.fetch(uid, attempt, self._found.get(uid))
        except FetchError as exc:
            # Aborted by an interruption: say so rather than what the abort looked like.
            reason = "interrupted" if self._stop == "interrupted" else exc.reason
            self.journal.finish_attempt(attempt, uid, FetchState.FAILED, reason, self.clock.time())
            raise
        if result.skipped:
            self.journal.finish_attempt(attempt, uid, FetchState.SKIPPED, result.skipped, self.clock.time())
        return attempt, result

    def _make_durable(self, uid: str, attempt: int, result: StudyResult) -> StudyResult:
        """Wait for the study's files to be on disk, then record it complete (or failed, if they cannot be)."""
        if self.sink is not None and result.flight is not None:
            self.sink.sync(result.flight)
            if result.flight.sync_error:
                self.journal.finish_attempt(attempt, uid, FetchState.FAILED, result.flight.sync_error,
                                            self.clock.time())
                raise FetchError(result.flight.sync_error, transient=False)
        note = None
        if result.expected is not None and result.sent < result.expected:
            # The counts a query returns are optional and some PACS keep them
            # loosely: what the retrieval itself reported decides, the
            # difference is kept in the journal.
            note = f"the query announced {result.expected} instance(s), the PACS sent {result.sent}"
            log.warning("fetch.fewer_than_announced", study_uid=uid, announced=result.expected, sent=result.sent)
        self.journal.finish_attempt(attempt, uid, FetchState.COMPLETE, note, self.clock.time(),
                                    expected=result.expected, moved=None if self.sink else result.sent)
        return result

    def _settled(self, uid: str, fut: Future) -> None:
        """Count a retrieved study once it is durable."""
        exc = fut.exception()
        if exc is None:
            result = fut.result()
            self.summary.complete += 1
            log.info("fetch.study_complete", study_uid=uid, instances=result.present, sent=result.sent)
            return
        reason = exc.reason if isinstance(exc, FetchError) else f"internal error {type(exc).__name__}"
        log.error("fetch.study_not_durable", study_uid=uid, error=type(exc).__name__)
        self.summary.failed.append((uid, reason))

    def _settle(self, uid: str, tries: int, fut: Future) -> bool:
        """Record how a study's try ended; True when it should be tried again in this run."""
        s = self.summary
        exc = fut.exception()
        if exc is None:
            _attempt, result = fut.result()
            self.backoff.succeeded()
            if result.skipped:
                s.skipped += 1
                log.info("fetch.study_skipped", study_uid=uid, reason=result.skipped)
            return False
        if not isinstance(exc, FetchError):
            # A bug: recorded as a failure with its type, never its message.
            log.error("fetch.study_error", study_uid=uid, error=type(exc).__name__)
            reason = f"internal error {type(exc).__name__}"
            with contextlib.suppress(Exception):
                self.journal.record_refused(uid, None, reason, self.clock.time(), None)
            s.failed.append((uid, reason))
            return False
        log.warning("fetch.study_failed", study_uid=uid, reason=exc.reason, attempt=tries, busy=exc.busy,
                    fatal=exc.fatal)
        if exc.fatal:
            if self._stop is None:
                self._stop = exc.reason
                s.fatal = exc.reason
                self.say(f"fetch: stopping: {exc.reason}")
            s.failed.append((uid, exc.reason))
            return False
        if exc.busy:
            self.backoff.failed()
        if exc.transient and tries < self.opts.attempts and self._stop is None:
            return True
        s.failed.append((uid, exc.reason))
        return False

    def print_summary(self) -> None:
        s = self.summary
        rate = (s.bytes / MB) / s.seconds if s.seconds > 0 else 0.0
        lines = [
            (f"fetch: {s.found} studies found: {s.complete} fetched now, {s.already_complete} already here, "
             f"{s.skipped} with no US series, {len(s.failed)} failed, {s.not_reached} not reached"),
        ]
        if self.sink is not None:
            lines.append(f"fetch: {s.instances} instances, {s.bytes / MB:.1f} MB in {s.seconds:.1f} s ({rate:.2f} MB/s)")
        for uid, reason in s.failed[:20]:
            lines.append(f"  failed {uid}: {reason}")
        if len(s.failed) > 20:
            lines.append(f"  ... and {len(s.failed) - 20} more (see {self.journal.path})")
        if s.failed or s.not_reached:
            lines.append("fetch: run the same command again to continue")
        for line in lines:
            self.say(line)


def dry_run(source: Source, options: Options, journal: FetchJournal | None, clock: Clock, out: IO[str]) -> int:
    """Print what the query finds (studies, series, instances, estimated size); retrieve nothing."""
    try:
        found = source.find_studies(options.criteria, local(clock).date())
    except FetchError as exc:
        print(f"fetch: the query failed: {exc.reason}", file=out)
        return EXIT_SOURCE
    states = journal.states() if journal is not None else {}
    mean = journal.mean_instance_bytes() if journal is not None else None
    totals = {"studies": 0, "series": 0, "instances": 0, "unknown": 0, "done": 0, "no_us": 0}
    size = 0.0
    print(f"{'StudyInstanceUID':64}  {'date':8}  series  instances", file=out)
    for f in found:
        if states.get(f.study_uid) in DONE_STATES:
            totals["done"] += 1
            continue
        try:
            series = wanted(source.find_series(f.study_uid))
        except FetchError as exc:
            print(f"fetch: the series query of {f.study_uid} failed: {exc.reason}", file=out)
            return EXIT_SOURCE
        if not series:
            totals["no_us"] += 1
            continue
        n = 0
        for s in series:
            if s.n_instances is None:
                totals["unknown"] += 1
                continue
            n += s.n_instances
            size += s.n_instances * (mean if mean is not None else GUESS_BYTES.get(s.modality, GUESS_BYTES["US"]))
        totals["studies"] += 1
        totals["series"] += len(series)
        totals["instances"] += n
        print(f"{f.study_uid:64}  {f.study_date:8}  {len(series):6}  {n:9}", file=out)
    basis = (f"the mean of the {mean / MB:.1f} MB instances already fetched" if mean is not None
             else "assumed 5 MB per US instance, 0.05 MB per SR")
    print(f"fetch (dry run): {len(found)} studies found, {totals['done']} already here, {totals['no_us']} with no US "
          f"series; to fetch: {totals['studies']} studies, {totals['series']} series (US and SR), "
          f"{totals['instances']} instances, about {size / 1e9:.2f} GB ({basis})", file=out)
    if totals["unknown"]:
        print(f"fetch (dry run): {totals['unknown']} series did not say how many instances they hold", file=out)
    return EXIT_OK
