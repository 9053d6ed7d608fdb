"""``echonode infer PATH... --models DIR``: the node's pipeline, offline, one result per study.

Files and folders are scanned for DICOM objects (headers only), grouped by
Study Instance UID, and each study goes through :func:`analyse_study` with
the same models, view filter and aggregation as the running node. With
``--sr-out`` the SR each study would get is written there.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from echonode.config import Config, ConfigError, load_config, parse_config
from echonode.dicomfile import check_inflated_size
from echonode.studies.store import MAX_INFLATED_BYTES, is_valid_uid


def find_studies(paths: list[Path]) -> tuple[dict[str, list[Path]], list[tuple[Path, str]]]:
    """Group the DICOM files under ``paths`` by Study Instance UID.

    Returns the groups and the files that were skipped, with why.
    """
    groups: dict[str, list[Path]] = defaultdict(list)
    skipped: list[tuple[Path, str]] = []
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            skipped.append((p, "no such file or folder"))
    for f in files:
        try:
            check_inflated_size(f, MAX_INFLATED_BYTES)
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError):
            skipped.append((f, "not a DICOM file"))
            continue
        uid = str(ds.get("StudyInstanceUID", "") or "")
        if not uid:
            skipped.append((f, "no StudyInstanceUID"))
            continue
        groups[uid].append(f)
    return dict(groups), skipped


def _config(args: argparse.Namespace) -> Config:
    if args.config:
        return load_config(args.config)
    return parse_config({}, source="<defaults>")


def run_infer(args: argparse.Namespace) -> int:
    """The ``infer`` command; exit 0 when every study got a result."""
    from echonode.analyse.pipeline import StudyRefused, analyse_study
    from echonode.analyse.worker import _findings, _not_assessed, write_report
    from echonode.bundles.registry import ModelRegistry

    try:
        cfg = _config(args)
    except ConfigError as exc:
        print(f"echonode: configuration error: {exc}", file=sys.stderr)
        return 2
    models_dir = Path(args.models)
    if not models_dir.is_dir():
        print(f"echonode: models folder not found: {models_dir}", file=sys.stderr)
        return 2
    try:
        registry = ModelRegistry(models_dir, args.device or cfg.models.device, runtime=cfg.models.runtime)
    except ValueError as exc:
        print(f"echonode: {exc}", file=sys.stderr)
        return 2
    registry.refresh()
    for _path, err in registry.errors:
        print(f"echonode: model not used: {err}", file=sys.stderr)
    if not any(b.task != "view" for b in registry.bundles):
        print(f"echonode: no usable task model in {models_dir}", file=sys.stderr)
        return 2
    groups, skipped = find_studies([Path(p) for p in args.paths])
    if not groups:
        print("echonode: no DICOM study found in the given paths", file=sys.stderr)
        return 2
    results: list[dict[str, Any]] = []
    status = 0
    for study_uid, files in sorted(groups.items()):
        try:
            analysis = analyse_study(study_uid, files, registry.current, views=cfg.models.views,
                                     batch_size=cfg.models.batch_size, max_videos=cfg.models.max_videos)
        except StudyRefused as exc:
            results.append({"study_uid": study_uid, "error": str(exc)})
            status = 1
            continue
        summary = analysis.summary()
        if args.sr_out and (cfg.sr.report_skipped or not analysis.skipped_reason) and is_valid_uid(study_uid):
            from echonode.report.build import build_report
            from echonode.report.header import HeaderRefused, read_study_header

            not_assessed = analysis.skipped_reason
            try:
                header = read_study_header(Path(analysis.header_path) if analysis.header_path else files[0])
                ds = build_report(header, [] if not_assessed else _findings(analysis), sop_class=cfg.sr.sop_class,
                                  series_number=cfg.sr.series_number, no_usable_video_reason=not_assessed,
                                  not_assessed=_not_assessed(analysis, registry.current, cfg.models.views)
                                  if not_assessed else ())
            except HeaderRefused as exc:
                results.append({"study_uid": study_uid, "error": f"no SR can be built: {exc}"})
                status = 1
                continue
            out = Path(args.sr_out) / f"{study_uid}.sr.dcm"
            write_report(ds, out)
            summary["sr"] = str(out)
        if analysis.skipped_reason:
            status = 1
        results.append(summary)
    doc = {"studies": results, "skipped_files": [{"path": str(p), "reason": r} for p, r in skipped],
           "models": [b.describe() for b in registry.bundles]}
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True, default=str))
        return status
    for r in results:
        print(f"study {r['study_uid']}")
        if "error" in r:
            print(f"  refused: {r['error']}")
            continue
        if r["skipped_reason"]:
            print(f"  no result: {r['skipped_reason']}")
        for task, t in sorted(r["tasks"].items()):
            verdict = "present" if t["positive"] else "absent"
            mark = " (RANDOM WEIGHTS)" if t["random_weights"] else ""
            print(f"  {task:<10} p={t['probability']:.3f} {verdict:<8} [{t['model']} {t['version']}]{mark}, "
                  f"{t['n_videos']} video(s)")
        print(f"  {r['view_filter']}")
        for v in r["videos"]:
            state = "used" if v["used"] else f"not used: {v['reason']}"
            print(f"    {v['sop_uid']}  {v.get('view') or '-':<6} {state}")
        if r.get("sr"):
            print(f"  SR written to {r['sr']}")
    for p, reason in skipped:
        print(f"skipped {p}: {reason}")
    return status
