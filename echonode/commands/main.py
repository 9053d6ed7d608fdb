"""The ``echonode`` command line.

Errors a user can cause (bad config, unknown destination, bad path) end with
a one-line message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections import Counter
from typing import Any

from echonode import __version__
from echonode.config import (
    Config,
    ConfigError,
    Destination,
    load_config,
    resolve_config_path,
)
from echonode.studies.rebuild import JournalLost

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
#: The journal is lost while storage holds studies: a person must act
#: (``echonode recover-journal``); systemd does not restart on it
#: (``RestartPreventExitStatus=3`` in systemd/echonode.service).
EXIT_JOURNAL_LOST = 3

#: Studies `echonode status` lists by default: enough to follow today's work,
#: few enough to answer at once on a node that holds 100k studies.
DEFAULT_STATUS_LIMIT = 50


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"echonode: {message}", file=sys.stderr)
    return code


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _journal_named(args: argparse.Namespace) -> str:
    """``": PATH"`` of the journal a command's config names, for an error message; "" when unknown."""
    try:
        return f": {_load(args).journal_path}"
    except (AttributeError, ConfigError, OSError):
        return ""


def _non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (anything else: a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text}")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    from echonode.daemon.node import Node
    from echonode.ops.logs import configure_logging

    cfg = _load(args)
    configure_logging(cfg.logging.format, cfg.logging.level)
    return Node(cfg, str(resolve_config_path(args.config))).run_forever()


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(f"{cfg.source}: OK ({len(cfg.destinations)} destination(s), AE title {cfg.node.ae_title})")
    if not cfg.destinations:
        print("warning: no [[destinations]]: results are kept in the journal and no SR is sent", file=sys.stderr)
    return EXIT_OK


def _models_summary(cfg: Config) -> list[dict[str, Any]]:
    from echonode.bundles.installed import models_summary

    return models_summary(cfg)


def _print_outbox(status: dict[str, Any]) -> None:
    """The outbox part of ``echonode status``: what is owed, then what was given up.

    Parameters
    ----------
    status : dict
        :meth:`Journal.status`'s answer.
    """
    from echonode.studies.states import OWED_STATES, OutboxState

    pending = [o for o in status["outbox"] if o["state"] in OWED_STATES]
    discarded = [o for o in status["outbox"] if o["state"] == OutboxState.DISCARDED]
    owed = sum(n for state, n in status["outbox_counts"].items() if state in OWED_STATES)
    print(f"outbox: {owed} not sent ({sum(status['outbox_counts'].values())} in all)"
          + (f", the {len(pending)} due first listed (--limit 0 for all):" if len(pending) < owed else ""))
    for o in pending:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(o["next_attempt"]))
        extra = (f"next try {when}" if o["state"] == "pending"
                 else "dead letter: `echonode retry` to send again, `echonode discard` to give up")
        print(f"  {o['study_uid']} -> {o['destination']}: {o['state']}, {o['attempts']} attempt(s); {extra}")
        if o["last_error"]:
            print(f"      last error: {o['last_error']}")
    n_discarded = status["outbox_counts"].get(OutboxState.DISCARDED, 0)
    if n_discarded:
        # The listed studies' rows only (all with --limit 0): a record, not work to do.
        print(f"  {n_discarded} discarded (given up with `echonode discard`; never sent)"
              + (f", {len(discarded)} listed:" if len(discarded) < n_discarded else ":"))
    for o in discarded:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(o["discarded_at"])) if o["discarded_at"] else "?"
        print(f"  {o['study_uid']} -> {o['destination']}: discarded {when}")
        if o["last_error"]:
            print(f"      last error: {o['last_error']}")


def _print_agreement(summary: dict[str, Any] | None) -> None:
    """The agreement part of ``echonode status``: one line per model and task (``echonode agreement`` has more)."""
    if not summary:
        return
    refs = summary.get("references", {})
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(summary["computed"]))
    print(f"agreement with the sonographers ({refs.get('with_reference', 0)} studies with a reference, as of {when};"
          " `echonode agreement` for intervals and carts):")
    for r in summary.get("models", []):
        auroc = "-" if r["auroc"] is None else f"{r['auroc']:.3f}"
        sens = "-" if r["sensitivity"] is None else f"{r['sensitivity']:.3f}"
        spec = "-" if r["specificity"] is None else f"{r['specificity']:.3f}"
        print(f"  {r['model']} {r['version']} {r['task']}: {r['studies']} studies, {r['positives']} positive,"
              f" AUROC {auroc}, sensitivity {sens}, specificity {spec}")


def _status_document(snapshot: Any, models: list[dict[str, Any]], agreement: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    """``echonode status --json``: the journal's :class:`~echonode.studies.records.StatusSnapshot` and the models.

    Its keys (CONTRACT.md): ``studies``, ``outbox``, ``study_counts``,
    ``studies_total``, ``outbox_counts``, ``limit``, ``models``, and
    ``agreement``: the summary the node's agreement job keeps (``computed``,
    ``references``, ``models``: one row per model and task as
    ``echonode agreement --json`` prints them), None before its first pass.
    """
    # Field by field rather than dataclasses.asdict, which deep-copies every
    # value: twice the time of the journal's part for `--limit 0` on 100k studies.
    return {
        "studies": [{**vars(s), "results": [dict(vars(r)) for r in s.results]} for s in snapshot.studies],
        "outbox": [dict(vars(d)) for d in snapshot.outbox],
        "study_counts": dict(snapshot.study_counts),
        "studies_total": snapshot.studies_total,
        "outbox_counts": dict(snapshot.outbox_counts),
        "limit": snapshot.limit,
        "models": models,
        "agreement": agreement,
    }


def cmd_status(args: argparse.Namespace) -> int:
    from echonode.studies.journal import Journal
    from echonode.studies.rebuild import check_journal
    from echonode.studies.records import StatusSnapshot
    from echonode.studies.states import OutboxState, StudyState

    cfg = _load(args)
    check_journal(cfg)
    db = cfg.journal_path
    # 0: everything, as before --limit existed (slow on a node with many studies).
    limit = args.limit or None
    agreement = None
    if db.exists():
        journal = Journal(db)
        snapshot = journal.snapshot(limit=limit)
        agreement = journal.agreement_summary()
    else:
        snapshot = StatusSnapshot(studies=[], outbox=[], study_counts={str(s): 0 for s in StudyState},
                                  studies_total=0, outbox_counts={str(s): 0 for s in OutboxState}, limit=limit)
    status = _status_document(snapshot, _models_summary(cfg), agreement)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return EXIT_OK
    by_state = ", ".join(f"{n} {state}" for state, n in status["study_counts"].items() if n)
    print(f"studies: {status['studies_total']}" + (f" ({by_state})" if by_state else ""))
    if len(status["studies"]) < status["studies_total"]:
        print(f"  the {len(status['studies'])} most recently active (--limit 0 for all):")
    for s in status["studies"]:
        line = f"  {s['study_uid']}  {s['state']:<10} {s['instances']:>4} instance(s)"
        if s.get("reason"):
            line += f"  ({s['reason']})"
        print(line)
        for r in s.get("results", []):
            verdict = "present" if r["positive"] else "absent"
            print(f"      {r['task']:<10} p={r['probability']:.3f} {verdict}  [{r['model']} {r['version']}]")
    _print_outbox(status)
    _print_agreement(status["agreement"])
    print(f"models: {len(status['models'])}")
    for m in status["models"]:
        if "error" in m:
            print(f"  {m['name']}: {m['error']}")
        else:
            mark = "  (RANDOM WEIGHTS - smoke test only)" if m["random_weights"] else ""
            print(f"  {m['name']}: task {m['task']}, version {m['version']}{mark}")
    return EXIT_OK


def cmd_echo(args: argparse.Namespace) -> int:
    from echonode.delivery.dimse import Peer, echo
    from echonode.delivery.outcome import DeliveryError

    cfg = _load(args)
    stow_dest = next((d for d in cfg.destinations if d.name == args.dest and d.kind == "stow"), None)
    if stow_dest is not None:
        return _check_stow(stow_dest, args.timeout)
    try:
        peer = Peer.parse(args.dest, cfg)
    except ValueError as exc:
        return _fail(str(exc))
    t0 = time.monotonic()
    try:
        status = echo(cfg.node.ae_title, peer, timeout_s=args.timeout)
    except DeliveryError as exc:
        return _fail(f"C-ECHO to {peer.ae_title}@{peer.host}:{peer.port} failed: {exc}", EXIT_FAILURE)
    ms = (time.monotonic() - t0) * 1000
    if status != 0:
        return _fail(f"C-ECHO to {peer.ae_title}@{peer.host}:{peer.port}: status 0x{status:04X}", EXIT_FAILURE)
    print(f"C-ECHO {peer.ae_title}@{peer.host}:{peer.port}: success ({ms:.0f} ms)")
    return EXIT_OK


def _check_stow(dest: Destination, timeout_s: float) -> int:
    """``echonode echo`` for a STOW-RS destination: a QIDO-RS query with its auth, under the same deadline."""
    from echonode.delivery.outcome import DeliveryError
    from echonode.delivery.stow import check

    t0 = time.monotonic()
    try:
        line = check(dest, timeout_s=timeout_s)
    except DeliveryError as exc:
        return _fail(f"QIDO-RS to {dest.url} failed: {exc}", EXIT_FAILURE)
    ms = (time.monotonic() - t0) * 1000
    print(f"QIDO-RS {dest.url}/studies: success ({line}, {ms:.0f} ms)")
    return EXIT_OK


def cmd_reprocess(args: argparse.Namespace) -> int:
    from echonode.studies.journal import Journal
    from echonode.studies.rebuild import check_journal

    cfg = _load(args)
    check_journal(cfg)
    if not cfg.journal_path.exists() or not Journal(cfg.journal_path).requeue(args.study_uid):
        return _fail(f"no stored study {args.study_uid}", EXIT_FAILURE)
    print(f"queued {args.study_uid}")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    from echonode.studies.journal import Journal
    from echonode.studies.rebuild import check_journal

    cfg = _load(args)
    check_journal(cfg)
    n = Journal(cfg.journal_path).retry_dead(args.study_uid) if cfg.journal_path.exists() else 0
    print(f"{n} dead-lettered SR deliver{'y' if n == 1 else 'ies'} queued again")
    return EXIT_OK


def cmd_discard(args: argparse.Namespace) -> int:
    """Give up for good on dead-lettered SRs: all, one study's, or one destination's."""
    from echonode.ops.logs import configure_logging, get_logger
    from echonode.studies.journal import Journal
    from echonode.studies.rebuild import check_journal

    cfg = _load(args)
    check_journal(cfg)
    # The discards are an audit trail: logged like the node's own events.
    configure_logging(cfg.logging.format, cfg.logging.level)
    if cfg.journal_path.exists():
        discarded = Journal(cfg.journal_path).discard_dead(args.study_uid, args.destination)
    else:
        discarded = None if args.study_uid else []
    if discarded is None:
        return _fail(f"no stored study {args.study_uid}", EXIT_FAILURE)
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
    from echonode.ops.logs import configure_logging
    from echonode.studies.rebuild import RebuildRefused, rebuild_journal

    cfg = _load(args)
    # The rebuild is logged like the node's own events (journal.rebuilt).
    configure_logging(cfg.logging.format, cfg.logging.level, stream=sys.stderr)
    try:
        done = rebuild_journal(cfg, dry_run=args.dry_run)
    except RebuildRefused as exc:
        return _fail(str(exc), EXIT_FAILURE)
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


def cmd_agreement(args: argparse.Namespace) -> int:
    from echonode.commands.agreement import run_agreement

    return run_agreement(args)


def cmd_infer(args: argparse.Namespace) -> int:
    from echonode.commands.infer import run_infer

    return run_infer(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from echonode.commands.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="echonode",
        description="A DICOM node for echocardiography AI.",
    )
    p.add_argument("--version", action="version", version=f"echonode {__version__}")
    p.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="config file (default: $ECHONODE_CONFIG, then /etc/echonode/echonode.toml)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the node in the foreground")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("check-config", help="validate the config file")
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("status", help="studies, outbox and installed models")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument(
        "--limit",
        type=_non_negative_int,
        default=DEFAULT_STATUS_LIMIT,
        metavar="N",
        help=f"list the N most recently active studies (default {DEFAULT_STATUS_LIMIT}; 0: all);"
        " counts always cover every study",
    )
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("echo", help="C-ECHO a destination (name or AET@HOST:PORT); a STOW-RS one gets a QIDO-RS query")
    s.add_argument("dest")
    s.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    s.set_defaults(func=cmd_echo)

    s = sub.add_parser("infer", help="run the pipeline offline on DICOM files or folders")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--models", required=True, metavar="DIR", help="folder of model bundles")
    s.add_argument("--json", action="store_true", help="one JSON document on stdout")
    s.add_argument("--sr-out", metavar="DIR", help="write the SR each study would get")
    s.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: the config's)")
    s.set_defaults(func=cmd_infer)

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
        "agreement",
        help="how often each model agrees with the sonographers' measurement SRs: AUROC with 95 % CI,"
        " sensitivity, specificity, confusion counts",
    )
    from echonode.commands.agreement import add_agreement_arguments

    add_agreement_arguments(s)
    s.set_defaults(func=cmd_agreement)

    s = sub.add_parser(
        "recover-journal",
        help="rebuild a lost journal from storage and from the SRs already written, without sending any SR twice",
    )
    s.add_argument("--dry-run", action="store_true",
                   help="say what the rebuilt journal would hold; write nothing")
    s.set_defaults(func=cmd_recover_journal)

    s = sub.add_parser(
        "demo",
        help="the whole loop on embedded defaults: receive an echo study, classify it, send back the SR, show it",
    )
    s.add_argument("--workdir", default=None, help="where the demo keeps its node, models and PACS (default: a temp dir)")
    s.add_argument("--models", default=None, help="use these bundles instead of the demo model")
    s.set_defaults(func=cmd_demo)
    # --config after the sub-command too (CONTRACT.md); SUPPRESS keeps one given before it.
    for command in sub.choices.values():
        command.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                             help="config file (as before the command)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``echonode`` and ``python -m echonode``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}")
    except JournalLost as exc:
        return _fail(str(exc), EXIT_JOURNAL_LOST)
    except sqlite3.Error as exc:
        return _fail(f"journal error: {exc}{_journal_named(args)}", EXIT_FAILURE)
    except OSError as exc:
        # A busy port, an unwritable storage_dir: say what and where, no traceback.
        where = f": {exc.filename}" if exc.filename else ""
        return _fail(f"{exc.strerror or exc}{where}", EXIT_FAILURE)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
