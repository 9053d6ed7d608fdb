"""``echonode-train fetch``: the arguments, and the wiring of a run from them."""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from echonode.config import Config, ConfigError, load_config
from echonode.delivery.dimse import Peer
from echonode.ops.logs import configure_logging

from .errors import UsageError
from .journal import FetchJournal
from .landing import Archive, Sink
from .pacing import Clock, RateLimiter, SystemClock, Window
from .query import Criteria, parse_date, read_studies_csv
from .retrieve import StoreServer, resolve_peers
from .runner import EXIT_USAGE, Fetcher, Options, archive_lock, dry_run, temp_files_in
from .sources import DimseSource, Source, WebSource
from .web import DEFAULT_AUTH_ENV, make_client, make_session, read_auth

_PEER = re.compile(r"^[^@]{1,16}@(\[[0-9a-fA-F:]+\]|[^:]+):\d{1,5}$")


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``echonode-train fetch``."""
    parser.add_argument("--out", required=True, type=Path, help="the archive folder (created; a re-run continues it)")
    src = parser.add_argument_group("source (one of)")
    one = src.add_mutually_exclusive_group(required=True)
    one.add_argument("--from", dest="source", metavar="PACS",
                     help="DIMSE: AET@HOST:PORT, or a destination name from the node's config")
    one.add_argument("--dicomweb", metavar="URL", help="DICOMweb service root (QIDO-RS + WADO-RS)")
    src.add_argument("--config", default=None,
                     help="the node's config, for a destination name and --into-node "
                          "(default: $ECHONODE_CONFIG, then /etc/echonode/echonode.toml)")
    dimse = parser.add_argument_group("DIMSE")
    dimse.add_argument("--aet", default="ECHOFETCH", help="fetch's own (calling) AE title (default ECHOFETCH)")
    dimse.add_argument("--get", action="store_true", help="C-GET instead of C-MOVE (no PACS-side setting needed)")
    dimse.add_argument("--move-aet", default=None,
                       help="C-MOVE destination AE title, known to the PACS (default: --aet)")
    dimse.add_argument("--port", type=int, default=None, help="port of fetch's storage SCP for C-MOVE")
    dimse.add_argument("--listen", default="0.0.0.0", help="address of fetch's storage SCP (default 0.0.0.0)")
    dimse.add_argument("--move-from", default=None, metavar="HOST[,HOST...]",
                       help="hosts or addresses the C-MOVE's stores may come from (default: the PACS's host in"
                       " --from; 'any' lets every address in): fetch's storage SCP closes any other connection"
                       " before reading it")
    dimse.add_argument("--into-node", action="store_true",
                       help="C-MOVE straight to the node's own SCP (its AE title from --config): the node stores, "
                            "journals and processes the studies; nothing lands in --out")
    dimse.add_argument("--max-pdu", type=int, default=131072, help="maximum PDU size (default 131072)")
    web = parser.add_argument_group("DICOMweb")
    web.add_argument("--auth-file", default=None,
                     help="file holding 'basic USER:PASSWORD', 'bearer TOKEN' or 'USER:PASSWORD'")
    web.add_argument("--auth-env", default=None,
                     help=f"environment variable holding the same (default ${DEFAULT_AUTH_ENV}, when set)")
    what = parser.add_argument_group("what to fetch (default: every US study)")
    what.add_argument("--since", default=None, help="first StudyDate, YYYY-MM-DD")
    what.add_argument("--until", default=None, help="last StudyDate, YYYY-MM-DD (default: today, with --since)")
    what.add_argument("--studies", default=None, type=Path,
                      help="CSV with StudyInstanceUID, AccessionNumber and/or PatientID columns (a labels.csv works)")
    pace = parser.add_argument_group("pacing")
    pace.add_argument("--window", default=None, help="only start studies between these local times, e.g. 19:00-07:00")
    pace.add_argument("--max-mb-s", type=float, default=None, help="bandwidth cap in MB/s (10^6 bytes)")
    pace.add_argument("--max-studies-in-flight", type=int, default=1, help="studies retrieved at once (default 1)")
    pace.add_argument("--attempts", type=int, default=3, help="tries per study in one run (default 3)")
    pace.add_argument("--retry-after", type=float, default=30.0,
                      help="first pause after a busy PACS, seconds; doubles up to --retry-max (default 30)")
    pace.add_argument("--retry-max", type=float, default=900.0, help="longest pause, seconds (default 900)")
    pace.add_argument("--timeout", type=float, default=60.0,
                      help="deadline of every network wait, seconds (default 60)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what the query finds (studies, series, instances, size estimate); fetch nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="level of ARCHIVE/.fetch/fetch.log (default info)")


def _check_ae(value: str, name: str) -> str:
    if not value or len(value) > 16 or "\\" in value or not value.isprintable() or not value.strip():
        raise UsageError(f"{name} {value!r}: an AE title is 1-16 printable characters, no backslash")
    return value


def _criteria(ns: argparse.Namespace) -> Criteria:
    if ns.studies is not None and (ns.since or ns.until):
        raise UsageError("give --studies or --since/--until, not both")
    since = parse_date(ns.since, "--since") if ns.since else None
    until = parse_date(ns.until, "--until") if ns.until else None
    if since and until and until < since:
        raise UsageError("--until is before --since")
    keys = read_studies_csv(ns.studies) if ns.studies is not None else ()
    return Criteria(since, until, keys)


def _config(ns: argparse.Namespace) -> Config:
    try:
        return load_config(ns.config)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _peer(ns: argparse.Namespace) -> Peer:
    text = ns.source
    cfg = Config() if _PEER.match(text) else _config(ns)
    try:
        return Peer.parse(text, cfg)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _options(ns: argparse.Namespace) -> Options:
    try:
        window = Window.parse(ns.window) if ns.window else None
    except ValueError as exc:
        raise UsageError(f"--window: {exc}") from None
    if ns.max_studies_in_flight < 1:
        raise UsageError("--max-studies-in-flight must be 1 or more")
    if ns.attempts < 1:
        raise UsageError("--attempts must be 1 or more")
    if ns.max_mb_s is not None and ns.max_mb_s <= 0:
        raise UsageError("--max-mb-s must be more than 0")
    if ns.timeout <= 0 or ns.retry_after < 0 or ns.retry_max < ns.retry_after:
        raise UsageError("--timeout must be more than 0, and 0 <= --retry-after <= --retry-max")
    return Options(criteria=_criteria(ns), max_in_flight=ns.max_studies_in_flight, window=window,
                   attempts=ns.attempts, retry_initial_s=ns.retry_after, retry_max_s=ns.retry_max,
                   dry_run=ns.dry_run, progress=not ns.no_progress and sys.stderr.isatty())


def _mode(ns: argparse.Namespace) -> str:
    if ns.move_from and (ns.dicomweb or ns.get or ns.into_node):
        # Only fetch's own C-MOVE listener takes stores; elsewhere the option would be silently ignored.
        raise UsageError("--move-from is for fetch's storage SCP (C-MOVE into a folder); not with --dicomweb,"
                         " --get or --into-node")
    if ns.dicomweb:
        if ns.get or ns.into_node or ns.port is not None or ns.move_aet:
            raise UsageError("--get, --move-aet, --port and --into-node are DIMSE options; not with --dicomweb")
        return "web"
    if ns.auth_file or ns.auth_env:
        raise UsageError("--auth-file and --auth-env are for --dicomweb")
    if ns.into_node:
        if ns.get:
            raise UsageError("--into-node moves the studies to the node by C-MOVE; it cannot be used with --get "
                             "(fetch into a folder, then send it to the node: see docs/training.md)")
        return "node"
    if ns.get:
        if ns.port is not None or ns.move_aet:
            raise UsageError("--port and --move-aet are for C-MOVE; not with --get")
        return "get"
    if ns.port is None and not ns.dry_run:
        raise UsageError("C-MOVE needs --port (fetch's storage SCP, known to the PACS with --move-aet), "
                         "or use --get")
    if ns.port is not None and not 0 <= ns.port <= 65535:
        raise UsageError(f"--port {ns.port}: not a port")
    return "move"


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops a run like Ctrl-C (the journal is consistent either way; this also closes associations)."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (an in-process test)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _log_to(path: Path, level: str) -> None:

    configure_logging("json", level, stream=open(path, "a", encoding="utf-8"))  # noqa: SIM115 - lives with the process
    # pynetdicom logs query identifiers (patient IDs from --studies) at debug:
    # never below WARNING, whatever the level.
    for name in ("pynetdicom", "dicomweb_client", "urllib3", "requests"):
        logging.getLogger(name).setLevel(logging.WARNING)


def execute(ns: argparse.Namespace, clock: Clock | None = None, out: IO[str] | None = None,
            configure_logs: bool = False) -> int:
    """Run ``fetch`` from parsed arguments; returns the exit code.

    Raises
    ------
    UsageError
        For a bad argument or input file.
    """
    clock = clock or SystemClock()
    out = out or sys.stdout
    mode = _mode(ns)
    options = _options(ns)
    limiter = RateLimiter(ns.max_mb_s * 1e6 if ns.max_mb_s else None, clock)
    aet = _check_ae(ns.aet, "--aet")

    if ns.dry_run:
        journal_path = Path(ns.out) / ".fetch" / "journal.sqlite"
        journal = FetchJournal(journal_path) if journal_path.exists() else None
        source = _source(ns, mode, aet, None, None, limiter)
        try:
            return dry_run(source, options, journal, clock, out)
        finally:
            source.close()

    archive = Archive(ns.out)
    with archive_lock(archive):
        if configure_logs:
            _log_to(archive.log_path, ns.log_level)
        archive.clear_tmp()
        journal = FetchJournal(archive.journal_path)
        sink = Sink(archive, journal, clock) if mode != "node" else None
        source = _source(ns, mode, aet, archive, sink, limiter)
        server = None
        try:
            with temp_files_in(archive.tmp):
                if mode == "move":

                    assert sink is not None
                    server = StoreServer(_check_ae(ns.move_aet or aet, "--move-aet"), ns.listen, ns.port, sink,
                                         limiter, ns.timeout, ns.max_pdu, _move_senders(ns)).start()
                fetcher = Fetcher(source, archive, journal, sink, options, limiter, clock, out)
                return fetcher.run().exit_code
        finally:
            with contextlib.suppress(Exception):  # best effort: the PACS ends what is left at its own timeout
                source.close()
            if server is not None:
                server.stop()
                for address, count in sorted(server.refused.items()):
                    # The PACS's stores may leave from another address than the one fetch
                    # connects to (a cluster, NAT, a container): say so where the user looks.
                    print(f"warning: fetch's storage SCP refused {count} connection(s) from {address}, not in"
                          f" --move-from; if that is the PACS sending, add it: --move-from {address}", file=out)
            if sink is not None:
                sink.close()
            journal.close()
            archive.clear_tmp()  # transfers cut short; a kill -9 leaves them to the next run


def _move_senders(ns: argparse.Namespace) -> frozenset[str] | None:
    """The addresses fetch's storage SCP takes a C-MOVE's stores from; None for any."""
    text = (ns.move_from or "").strip()
    if text.lower() == "any":
        return None
    hosts = [h.strip() for h in text.split(",") if h.strip()] or [_peer(ns).host]
    return resolve_peers(hosts)


def _source(ns: argparse.Namespace, mode: str, aet: str, archive: Archive | None, sink: Sink | None,
            limiter: RateLimiter) -> Source:
    if mode == "web":
        session = make_session(read_auth(ns.auth_file, ns.auth_env))
        client = make_client(ns.dicomweb, session, ns.timeout)
        if archive is None or sink is None:  # dry run: queries only
            archive = sink = None
        # A dry run only queries: WebSource never reaches its sink or archive.
        return WebSource(client, session, ns.dicomweb, sink, archive, limiter, ns.timeout)  # type: ignore[arg-type]
    peer = _peer(ns)
    if mode == "node":
        move_aet = _check_ae(ns.move_aet or _config(ns).node.ae_title, "--move-aet")
    else:
        move_aet = ns.move_aet or aet
    return DimseSource(aet, peer, mode, move_aet, sink, limiter, ns.timeout, ns.max_pdu)


def run_fetch(ns: argparse.Namespace) -> int:
    """Run ``echonode-train fetch`` from parsed arguments; returns an exit status."""
    try:
        with _sigterm_interrupts():
            return execute(ns, configure_logs=True)
    except UsageError as exc:
        print(f"echonode-train fetch: {exc}", file=sys.stderr)
        return EXIT_USAGE


def main(argv: list[str], clock: Clock | None = None, out: IO[str] | None = None) -> int:
    """``fetch`` in-process (tests): parse ``argv`` (without the word ``fetch``) and run."""
    parser = argparse.ArgumentParser(prog="echonode-train fetch")
    add_fetch_arguments(parser)
    ns = parser.parse_args(argv)
    try:
        return execute(ns, clock, out)
    except UsageError as exc:
        print(f"echonode-train fetch: {exc}", file=out or sys.stderr)
        return EXIT_USAGE
