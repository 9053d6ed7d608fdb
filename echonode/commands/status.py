"""``echonode status``: studies, outbox, agreement and models, for a person or (``--json``) a script."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from echonode.bundles.installed import models_summary
from echonode.commands.common import EXIT_OK, load, non_negative_int
from echonode.studies.journal import Journal
from echonode.studies.rebuild import check_journal
from echonode.studies.records import StatusSnapshot
from echonode.studies.states import OWED_STATES, OutboxState, StudyState

__all__ = ["DEFAULT_STATUS_LIMIT", "cmd_status", "register", "status_document"]

#: Studies `echonode status` lists by default: enough to follow today's work,
#: few enough to answer at once on a node that holds 100k studies.
DEFAULT_STATUS_LIMIT = 50


def _print_outbox(status: dict[str, Any]) -> None:
    """The outbox part of ``echonode status``: what is owed, then what was given up.

    Parameters
    ----------
    status : dict
        :meth:`Journal.status`'s answer.
    """
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


def status_document(snapshot: Any, models: list[dict[str, Any]], agreement: dict[str, Any] | None = None
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
    """Print the studies, the outbox, the agreement summary and the installed models."""
    cfg = load(args)
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
    status = status_document(snapshot, models_summary(cfg), agreement)
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


def register(sub: Any) -> None:
    """Add ``status`` to the sub-command parsers ``sub``."""
    s = sub.add_parser("status", help="studies, outbox and installed models")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument(
        "--limit",
        type=non_negative_int,
        default=DEFAULT_STATUS_LIMIT,
        metavar="N",
        help=f"list the N most recently active studies (default {DEFAULT_STATUS_LIMIT}; 0: all);"
        " counts always cover every study",
    )
    s.set_defaults(func=cmd_status)
