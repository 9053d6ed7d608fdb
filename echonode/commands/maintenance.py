"""The operator's repairs: ``reprocess``, ``retry``, ``discard`` and ``recover-journal``."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Any

from echonode.commands.common import EXIT_FAILURE, EXIT_OK, fail, load
from echonode.ops.logs import configure_logging, get_logger
from echonode.studies.journal import Journal
from echonode.studies.rebuild import RebuildRefused, check_journal, rebuild_journal

__all__ = ["cmd_discard", "cmd_recover_journal", "cmd_reprocess", "cmd_retry", "register"]


def cmd_reprocess(args: argparse.Namespace) -> int:
    """Queue a stored study for analysis again."""
    cfg = load(args)
    check_journal(cfg)
    if not cfg.journal_path.exists() or not Journal(cfg.journal_path).requeue(args.study_uid):
        return fail(f"no stored study {args.study_uid}", EXIT_FAILURE)
    print(f"queued {args.study_uid}")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    """Queue dead-lettered SR deliveries (all, or one study's) again."""
    cfg = load(args)
    check_journal(cfg)
    n = Journal(cfg.journal_path).retry_dead(args.study_uid) if cfg.journal_path.exists() else 0
    print(f"{n} dead-lettered SR deliver{'y' if n == 1 else 'ies'} queued again")
    return EXIT_OK


def cmd_discard(args: argparse.Namespace) -> int:
    """Give up for good on dead-lettered SRs: all, one study's, or one destination's."""
    cfg = load(args)
    check_journal(cfg)
    # The discards are an audit trail: logged like the node's own events.
    configure_logging(cfg.logging.format, cfg.logging.level)
    if cfg.journal_path.exists():
        discarded = Journal(cfg.journal_path).discard_dead(args.study_uid, args.destination)
    else:
        discarded = None if args.study_uid else []
    if discarded is None:
        return fail(f"no stored study {args.study_uid}", EXIT_FAILURE)
    log = get_logger(__name__)
    for d in discarded:
        log.info("delivery.discarded", study_uid=d.study_uid, sr_sop_uid=d.sr_sop_uid,
                 destination=d.destination, last_error=d.last_error)
    scope = (f" of study {args.study_uid}" if args.study_uid else "") + (
        f" for destination {args.destination}" if args.destination else "")
    if not discarded:
        print(f"nothing to discard: no dead-lettered SR{scope}")
        return EXIT_OK
    n = len(discarded)
    print(f"{n} dead-lettered SR deliver{'y' if n == 1 else 'ies'}{scope} discarded; they will never be sent")
    for name, count in sorted(Counter(d.destination for d in discarded).items()):
        print(f"  {name}: {count}")
    return EXIT_OK


def cmd_recover_journal(args: argparse.Namespace) -> int:
    """Rebuild a lost journal from storage and the SRs already written; print what it holds."""
    cfg = load(args)
    # The rebuild is logged like the node's own events (journal.rebuilt).
    configure_logging(cfg.logging.format, cfg.logging.level, stream=sys.stderr)
    try:
        done = rebuild_journal(cfg, dry_run=args.dry_run)
    except RebuildRefused as exc:
        return fail(str(exc), EXIT_FAILURE)
    dests = ", ".join(d.name for d in cfg.destinations) or "no destination configured"
    if done.dry_run:
        print(f"dry run: the journal {done.journal} {done.why}; nothing was written. A rebuild would record:")
    else:
        print(f"journal rebuilt: {done.journal} (it {done.why})")
        if done.moved_aside is not None:
            print(f"  the old file moved to {done.moved_aside}")
    studies = len({*done.delivered, *done.to_analyse, *done.held})
    print(f"  {done.instances} stored object(s) in {studies} study(ies), from studies/")
    print(f"  {len(done.delivered)} study(ies) delivered: {done.reports} SR(s) found in reports/, each recorded"
          f" as sent to every destination ({dests}); none is sent again")
    print(f"  {len(done.to_analyse)} study(ies) with no SR: analysed and reported as usual once the node runs")
    if done.held:
        print(f"  {len(done.held)} study(ies) held as failed: an SR in reports/ does not read, so whether the PACS"
              " has it is not known; check there, then `echonode reprocess STUDY_UID`:")
        for uid in done.held:
            print(f"    {uid}")
    if done.left_alone:
        print(f"  {len(done.left_alone)} file(s) left alone, not recorded:")
        for rel, why in done.left_alone:
            print(f"    {rel}: {why}")
    if not done.dry_run:
        print("Start the node again (`echonode serve`, `systemctl start echonode`).")
    return EXIT_OK


def register(sub: Any) -> None:
    """Add ``reprocess``, ``retry``, ``discard`` and ``recover-journal`` to the sub-command parsers ``sub``."""
    s = sub.add_parser("reprocess", help="queue a stored study again")
    s.add_argument("study_uid")
    s.set_defaults(func=cmd_reprocess)

    s = sub.add_parser("retry", help="send dead-lettered SRs again")
    s.add_argument("study_uid", nargs="?", default=None)
    s.set_defaults(func=cmd_retry)

    s = sub.add_parser(
        "discard",
        help="give up for good on dead-lettered SRs (a destination that will never take them)",
    )
    s.add_argument("study_uid", nargs="?", default=None)
    s.add_argument("--destination", metavar="NAME", default=None,
                   help="only SRs dead-lettered for this destination (it need not be configured any more)")
    s.set_defaults(func=cmd_discard)

    s = sub.add_parser(
        "recover-journal",
        help="rebuild a lost journal from storage and from the SRs already written, without sending any SR twice",
    )
    s.add_argument("--dry-run", action="store_true",
                   help="say what the rebuilt journal would hold; write nothing")
    s.set_defaults(func=cmd_recover_journal)
