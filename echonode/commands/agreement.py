"""``echonode agreement``: how often each model agrees with the sonographers' measurement SRs.

Reads the journal the node keeps (the reference labels its agreement job
recorded beside the models' results, :mod:`echonode.agreement`) and prints
per model and task, optionally per cart, the studies with a reference, the
positives, the AUROC with a stratified bootstrap 95 % interval, and at the
bundle's threshold sensitivity, specificity and the confusion counts.
``--json`` prints ``{"agreement": [{"model", "task", "group", "studies",
"positives", "auroc", "auroc_ci", "sensitivity", "specificity",
"confusion": {"tp", "fp", "tn", "fn"}, ...}, ...], ...}``.

Runs beside a running node (read-only); no patient identifier is printed.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime
from typing import Any

from echonode.agreement.figures import GROUPINGS, AgreementFigures, agreement_figures
from echonode.agreement.record import rules_id
from echonode.config import load_config
from echonode.measurements.rules import load_rules
from echonode.studies.journal import Journal
from echonode.studies.rebuild import check_journal

__all__ = ["add_agreement_arguments", "parse_since", "register", "run_agreement"]

#: Below this many positives or negatives, the printout warns that the figures are unstable.
FEW = 10


def parse_since(text: str) -> float:
    """argparse type: ``YYYY-MM-DD`` or an ISO 8601 date and time (local time unless it says), as epoch seconds."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD or YYYY-MM-DDTHH:MM): {text!r}") from None
    try:
        return when.timestamp()
    except (ValueError, OverflowError, OSError):  # a date the clock cannot place (year 1 in local time)
        raise argparse.ArgumentTypeError(f"a date out of range: {text!r}") from None


def _resamples(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text}")
    return value


def add_agreement_arguments(parser: argparse.ArgumentParser) -> None:
    """The sub-command's options."""
    parser.add_argument("--since", type=parse_since, metavar="DATE", default=None,
                        help="only studies the node first received on or after DATE (YYYY-MM-DD)")
    parser.add_argument("--by", choices=GROUPINGS, default=None,
                        help="one row per cart: model (Manufacturer + Manufacturer's Model Name), manufacturer"
                        " or station (Station Name), from the images' headers")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--resamples", type=_resamples, default=10_000, metavar="N",
                        help="bootstrap resamples for the AUROC interval (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's seed (default 0)")


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _print_table(rows: list[AgreementFigures], doc: dict[str, Any]) -> None:
    refs = doc["references"]
    print(f"agreement with the sonographers' measurement SRs (labels: {doc['rules'] or 'the rules in force'})")
    print(f"studies with a reference: {refs['with_reference']} ({refs['studies']} whose SRs were read,"
          f" {refs['studies'] - refs['with_reference']} without a usable measurement SR; {refs['due']} to be read)")
    if doc["since"]:
        print(f"studies first received since {doc['since']}")
    if not rows:
        print("no study has both a model result and a reference yet")
        return
    head = ["model", "version", "task", "group", "studies", "pos", "AUROC [95 % CI]", "sens", "spec",
            "TP", "FP", "TN", "FN", "undecided"]
    lines = []
    for r in rows:
        auroc = (f"{r.auroc:.3f} [{r.auroc_ci[0]:.3f}, {r.auroc_ci[1]:.3f}]" if r.auroc is not None and r.auroc_ci
                 else "-")
        c = r.confusion
        lines.append([r.model, r.version, r.task, r.group or "all", str(r.studies), str(r.positives), auroc,
                      _number(r.sensitivity), _number(r.specificity), str(c["tp"]), str(c["fp"]), str(c["tn"]),
                      str(c["fn"]), str(r.undecided)])
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    for line in [head, *lines]:
        print("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())
    for r in rows:
        where = f"{r.model} {r.version} {r.task}" + (f" ({r.group})" if r.group else "")
        if r.auroc is None:
            print(f"note: {where}: no AUROC: {r.auroc_reason}")
        elif min(r.positives, r.negatives) < FEW:
            print(f"note: {where}: few studies ({r.positives} positive, {r.negatives} negative): the interval is"
                  " wide and the figures move with every new study")
    print(f"AUROC intervals: stratified bootstrap, {doc['resamples']} resamples, seed {doc['seed']}."
          " Sensitivity and specificity at each bundle's threshold (the verdict its SR reported).")


def run_agreement(args: argparse.Namespace) -> int:
    """``echonode agreement``; returns the exit status."""
    cfg = load_config(args.config)
    check_journal(cfg)
    pairs: list[Any] = []
    references = {"studies": 0, "with_reference": 0, "due": 0}
    if cfg.journal_path.exists():
        journal = Journal(cfg.journal_path)
        pairs = journal.agreement_pairs(args.since)
        references = journal.reference_counts(args.since)
    rows = agreement_figures(pairs, by=args.by, n_resamples=args.resamples, seed=args.seed)
    doc = {
        "agreement": [r.as_dict() for r in rows],
        "by": args.by,
        "since": (time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(args.since)) if args.since is not None
                  else None),
        "resamples": args.resamples,
        "seed": args.seed,
        "level": 0.95,
        "references": references,
        "rules": rules_id(load_rules(cfg.agreement.rules or None)),
    }
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        _print_table(rows, doc)
    return 0


def register(sub: Any) -> None:
    """Add ``agreement`` to the sub-command parsers ``sub``."""
    s = sub.add_parser(
        "agreement",
        help="how often each model agrees with the sonographers' measurement SRs: AUROC with 95 %% CI,"
        " sensitivity, specificity, confusion counts",
    )
    add_agreement_arguments(s)
    s.set_defaults(func=run_agreement)
