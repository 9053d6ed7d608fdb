"""The administrator's read-only status page, ``GET /status`` on the node's [metrics] endpoint.

Off by default (``[status_page] enabled``), on the metrics endpoint's
address (loopback by default), optionally behind basic or bearer
authentication whose secret is read from a file (:mod:`echonode.ops.httpauth`).

One HTML document rendered on the server: no JavaScript (the Content
Security Policy forbids any), no external asset (hospital networks are
offline; the one style sheet is inline and allowed by its hash), bars are
``<meter>`` elements. It shows

* the node's health (the ``/health`` verdict and its reasons);
* studies by state, and for each state the most recent ones with their
  reason;
* the outbox: what each destination is still owed, the dead letters and
  the pending SRs with their last error;
* the installed models and what the worker really loaded (its models state
  file), with the runtime or the reason it refused one;
* per hour over the last ``hours``: instances received, studies delivered
  and the time from a study's last instance to its SR being delivered;
* the storage file system against the disk guard (``node.min_free_disk_mb``);
* the agreement of the models with the sonographers' measurements, when
  the journal holds any (:func:`agreement_rows`).

It names studies by their UIDs only; the Accession Number is shown only
with ``show_accession`` (read from the study's first stored object, that
attribute alone). No patient name or ID is read. Everything printed is
escaped: a reason or a destination's last error may quote whatever a peer
sent. Every list is bounded (``rows``) and read through an index
(``Journal.page_*``), so the page costs the same on a journal of 100,000
studies as on one of ten.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import ipaddress
import math
import shutil
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from echonode import __version__
from echonode.bundles.installed import models_summary, worker_models_state
from echonode.credentials import CredentialsError, load_credentials
from echonode.ops.health import health
from echonode.ops.httpauth import authorised, challenge
from echonode.ops.logs import get_logger
from echonode.studies.records import Delivered, OutboxLine, StudyLine
from echonode.studies.states import OutboxState, StudyState

log = get_logger(__name__)

#: Where the page is served.
PATH = "/status"
#: Seconds between the page's own reloads (a meta refresh: no script).
REFRESH_S = 60
#: A last error or reason longer than this is cut (with its length said).
MAX_TEXT = 600
#: Studies at most read for the latency figures of the window.
MAX_DELIVERIES = 20000
#: The order states are listed in: what needs a look first.
STATE_ORDER = (
    StudyState.FAILED, StudyState.REPORTED, StudyState.UNDELIVERED, StudyState.RUNNING, StudyState.QUEUED,
    StudyState.STABLE, StudyState.RECEIVING, StudyState.SKIPPED, StudyState.DELIVERED,
)

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1b1f24;background:#fff}
h1{font-size:1.5em;margin:0 0 .2em}h2{font-size:1.2em;margin:1.6em 0 .4em;border-bottom:1px solid #ccd}
h3{font-size:1em;margin:1em 0 .3em}
table{border-collapse:collapse;margin:.3em 0}th,td{border:1px solid #d0d4da;padding:.2em .5em;text-align:left;
vertical-align:top}th{background:#f2f4f7}td.n{text-align:right;font-variant-numeric:tabular-nums}
.uid{font-family:ui-monospace,monospace;font-size:.92em;word-break:break-all}
.err{font-family:ui-monospace,monospace;font-size:.9em;white-space:pre-wrap;word-break:break-word;max-width:60em}
.ok{color:#136c2e;font-weight:600}.bad{color:#b3261e;font-weight:600}.muted{color:#5f6b7a}
.note{color:#5f6b7a;font-size:.92em}
.banner{padding:.5em .8em;border-radius:4px;margin:.6em 0}.banner.ok{background:#e6f4ea}.banner.bad{background:#fce8e6}
meter{width:14em}
"""
_CSS_HASH = base64.b64encode(hashlib.sha256(_CSS.encode("utf-8")).digest()).decode("ascii")
#: Nothing may run, load or be framed; the inline style sheet is allowed by its hash.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; base-uri 'none'; form-action 'none';"
    " frame-ancestors 'none'"
)
_PAGE_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
)


@dataclass(frozen=True)
class Response:
    """An answer for the HTTP handler to send."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class AgreementRow:
    """One model's agreement with the sonographers' measurements (the ``echonode agreement`` figures).

    Attributes
    ----------
    model : str
        Bundle name and version.
    task : str
    studies : int
        Studies with both a result and a reference label.
    auroc : float or None
    auroc_ci : (float, float) or None
        95 % confidence interval.
    sensitivity, specificity : float or None
    """

    model: str
    task: str
    studies: int
    auroc: float | None = None
    auroc_ci: tuple[float, float] | None = None
    sensitivity: float | None = None
    specificity: float | None = None


@dataclass(frozen=True)
class HourLine:
    """One hour of the throughput table."""

    start: float
    received: int
    delivered: int
    #: Seconds from a study's last instance to its SR delivered, per study delivered that hour.
    latencies: tuple[float, ...] = ()


@dataclass
class PageData:
    """Everything the page shows, read at one moment (:func:`collect`); :func:`render` only formats."""

    now: float
    ae_title: str
    scp_port: int
    health_code: int
    health: dict[str, Any]
    study_counts: dict[str, int]
    studies: dict[str, list[StudyLine]]
    accessions: dict[str, str] | None
    outbox_counts: dict[str, int]
    owed: dict[str, dict[str, int]]
    dead: list[OutboxLine]
    pending: list[OutboxLine]
    models: list[dict[str, Any]]
    worker_models: dict[str, Any] | None
    hours: list[HourLine]
    disk: dict[str, Any]
    agreement: list[AgreementRow] = field(default_factory=list)
    rows: int = 50


# -- the agreement section -------------------------------------------------------------------------


def agreement_rows(node: Any) -> list[AgreementRow]:
    """The agreement figures the page shows; empty until the journal holds reference measurements.

    Read from the summary the node's agreement job keeps (one journal row,
    :meth:`~echonode.studies.references.ReferenceRows.agreement_summary`):
    one :class:`AgreementRow` per model and task.

    Parameters
    ----------
    node : echonode.daemon.node.Node

    Returns
    -------
    list of AgreementRow
    """
    summary = node.journal.agreement_summary()
    rows = []
    for r in (summary or {}).get("models", []):
        ci = r.get("auroc_ci")
        rows.append(AgreementRow(
            model=f"{r['model']} {r['version']}", task=str(r["task"]), studies=int(r["studies"]),
            auroc=r.get("auroc"), auroc_ci=(float(ci[0]), float(ci[1])) if ci else None,
            sensitivity=r.get("sensitivity"), specificity=r.get("specificity"),
        ))  # fmt: skip
    return rows


# -- reading --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _accession_of(path: str) -> str:
    """A stored object's Accession Number and nothing else ("" when absent or unreadable)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["AccessionNumber"])
        value = ds.get("AccessionNumber")
        return "" if value is None else str(value)
    except Exception:  # noqa: BLE001 - a page must not fail on one file; the study is still listed by UID
        return ""


def _accessions(journal: Any, uids: Iterable[str]) -> dict[str, str]:
    out = {}
    for uid in uids:
        path = journal.page_first_instance_path(uid)
        out[uid] = _accession_of(path) if path else ""
    return out


def _hours(journal: Any, now: float, hours: int) -> list[HourLine]:
    """``hours`` hourly lines ending with the current hour, oldest first."""
    first = (int(now) // 3600 - (hours - 1)) * 3600
    received = journal.page_received_per_hour(first)
    delivered: dict[int, list[float]] = {}
    for d in journal.page_deliveries(first, MAX_DELIVERIES):
        _add_delivery(delivered, d, first)
    return [HourLine(float(h), received.get(h, 0), len(delivered.get(h, [])), tuple(delivered.get(h, [])))
            for h in range(first, first + hours * 3600, 3600)]


def _add_delivery(by_hour: dict[int, list[float]], d: Delivered, first: int) -> None:
    if d.delivered_at < first:
        return
    hour = int(d.delivered_at) // 3600 * 3600
    # An instance received after the SR went out (a late image) says nothing of the latency.
    latency = d.delivered_at - d.last_received
    if latency >= 0:
        by_hour.setdefault(hour, []).append(latency)


def _disk(node: Any) -> dict[str, Any]:
    root = node.store.root
    watermark = int(node.cfg.node.min_free_disk_mb) * 1024 * 1024
    try:
        usage = shutil.disk_usage(root)
    except OSError as exc:
        return {"root": str(root), "error": exc.strerror or type(exc).__name__, "watermark": watermark}
    return {"root": str(root), "total": usage.total, "free": usage.free, "watermark": watermark}


def collect(node: Any, now: float | None = None) -> PageData:
    """Read everything the page shows from the running node.

    Parameters
    ----------
    node : echonode.daemon.node.Node
    now : float, optional
        Epoch seconds; default the current time.

    Returns
    -------
    PageData
    """
    now = time.time() if now is None else now
    cfg = node.cfg
    settings = cfg.status_page
    journal = node.journal
    try:
        code, doc = health(node)
    except Exception as exc:  # the rest of the page is still worth showing
        log.exception("status_page.health_failed")
        code, doc = 503, {"status": "unavailable", "reasons": [f"health check failed: {type(exc).__name__}"]}
    counts = {str(s): 0 for s in StudyState}
    counts.update(journal.counts())
    studies = {str(state): journal.page_studies(state, settings.rows) for state in _listed_states(counts)}
    accessions = None
    if settings.show_accession:
        accessions = _accessions(journal, {s.study_uid for lines in studies.values() for s in lines})
    outbox_counts, owed = journal.page_outbox_counts()
    worker = worker_models_state(cfg)
    return PageData(
        now=now,
        ae_title=cfg.node.ae_title,
        scp_port=int(getattr(node.scp, "port", cfg.node.port)),
        health_code=code,
        health=doc,
        study_counts=counts,
        studies=studies,
        accessions=accessions,
        outbox_counts=outbox_counts,
        owed=owed,
        dead=journal.page_outbox(OutboxState.DEAD, settings.rows),
        pending=journal.page_outbox(OutboxState.PENDING, settings.rows),
        models=models_summary(cfg, worker),
        worker_models=worker,
        hours=_hours(journal, now, settings.hours),
        disk=_disk(node),
        agreement=agreement_rows(node),
        rows=settings.rows,
    )


def _listed_states(counts: dict[str, int]) -> list[str]:
    """States with studies, in :data:`STATE_ORDER`, then any state a later release wrote."""
    known = [str(s) for s in STATE_ORDER if counts.get(str(s))]
    return known + sorted(s for s, n in counts.items() if n and s not in {str(x) for x in StudyState})


# -- formatting -----------------------------------------------------------------------------------


def _e(value: Any) -> str:
    """Anything as escaped HTML text."""
    return html.escape("" if value is None else str(value), quote=True)


def _text(value: str | None) -> str:
    """A reason or an error: escaped, cut at :data:`MAX_TEXT` characters."""
    if not value:
        return ""
    if len(value) > MAX_TEXT:
        value = f"{value[:MAX_TEXT]}… ({len(value)} characters)"
    return _e(value)


def _when(t: float | None, now: float) -> str:
    if t is None or not math.isfinite(t):
        return ""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    return f"{stamp} <span class=\"muted\">({_e(_ago(now - t))})</span>"


def _ago(seconds: float) -> str:
    if seconds < 0:
        return "in " + _duration(-seconds)
    return _duration(seconds) + " ago"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """A table; ``head`` is plain text (escaped here), cells are HTML already escaped by the caller."""
    out = [f"<table{f' class={chr(34)}{cls}{chr(34)}' if cls else ''}><thead><tr>"]
    out += [f"<th>{_e(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>" + "".join(row) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _td(html_text: str, cls: str = "") -> str:
    return f"<td class=\"{cls}\">{html_text}</td>" if cls else f"<td>{html_text}</td>"


def _uid(uid: str) -> str:
    return _td(_e(uid), "uid")


# -- sections -------------------------------------------------------------------------------------


def _health_section(d: PageData) -> str:
    ok = d.health_code == 200
    reasons = d.health.get("reasons") or []
    verdict = "ok" if ok else "bad"
    parts = [f"<div class=\"banner {verdict}\" id=\"health\">",
             f"<span class=\"{verdict}\">{'Healthy' if ok else 'Unavailable'}</span>"]
    if reasons:
        parts.append("<ul>" + "".join(f"<li>{_text(r)}</li>" for r in reasons) + "</ul>")
    worker = d.health.get("worker")
    facts = [f"SCP {'listening' if d.health.get('scp') else 'not listening'} on port {d.scp_port}"]
    workers = d.health.get("workers") or []
    if worker is None:
        facts.append("no inference worker in this process")
    elif len(workers) > 1:
        for w in workers:
            fact = f"worker {int(w['index'])} {_e(w['phase'])}"
            if w.get("study_uid"):
                fact += f" on study <span class=\"uid\">{_e(w['study_uid'])}</span>"
            facts.append(fact)
    else:
        phase = d.health.get("worker_phase", "?")
        facts.append(f"worker {_e(phase)}")
        if d.health.get("worker_study_uid"):
            facts.append(f"on study <span class=\"uid\">{_e(d.health['worker_study_uid'])}</span>")
    parts.append("<div class=\"note\">" + "; ".join(facts) + "</div></div>")
    return "".join(parts)


def _studies_section(d: PageData) -> str:
    total = sum(d.study_counts.values())
    out = ["<section id=\"studies\"><h2>Studies</h2>",
           f"<p>{total} stud{'y' if total == 1 else 'ies'} in the journal.</p>"]
    out.append(_table(
        [str(s) for s in d.study_counts],
        [[_td(str(n), "n") for n in d.study_counts.values()]],
        "counts",
    ))
    with_accession = d.accessions is not None
    for state, lines in d.studies.items():
        n = d.study_counts.get(state, 0)
        shown = f" (the {len(lines)} most recently active)" if n > len(lines) else ""
        out.append(f"<section id=\"state-{_e(state)}\"><h3>{_e(state)}: {n}{shown}</h3>")
        head = ["Study Instance UID", *(["Accession"] if with_accession else []), "Instances", "Attempts",
                "Last activity", "Reason"]
        rows = []
        for s in lines:
            cells = [_uid(s.study_uid)]
            if with_accession:
                cells.append(_td(_e((d.accessions or {}).get(s.study_uid, ""))))
            cells += [_td(str(s.instances), "n"), _td(str(s.attempts), "n"), _td(_when(s.active, d.now)),
                      _td(_text(s.reason), "err")]
            rows.append(cells)
        out.append(_table(head, rows) + "</section>")
    out.append("</section>")
    return "".join(out)


def _outbox_section(d: PageData) -> str:
    out = ["<section id=\"outbox\"><h2>Outbox (SRs to deliver)</h2>"]
    out.append(_table(list(d.outbox_counts), [[_td(str(n), "n") for n in d.outbox_counts.values()]], "counts"))
    if d.owed:
        out.append("<h3>Owed, by destination</h3>")
        out.append(_table(
            ["Destination", "Pending", "Dead letters"],
            [[_td(_e(dest)), _td(str(s.get(OutboxState.PENDING, 0)), "n"), _td(str(s.get(OutboxState.DEAD, 0)), "n")]
             for dest, s in d.owed.items()],
        ))
    n_dead = d.outbox_counts.get(OutboxState.DEAD, 0)
    out.append(f"<section id=\"dead\"><h3>Dead letters: {n_dead}"
               + (f" (the {len(d.dead)} most recent)" if n_dead > len(d.dead) else "") + "</h3>")
    if d.dead:
        out.append("<p class=\"note\">Fix the cause, then <code>echonode retry</code>; give up on a destination"
                   " that will never take them with <code>echonode discard</code>.</p>")
        out.append(_table(
            ["Study Instance UID", "SR SOP Instance UID", "Destination", "Attempts", "Last try", "Last error"],
            [[_uid(o.study_uid), _uid(o.sr_sop_uid), _td(_e(o.destination)), _td(str(o.attempts), "n"),
              _td(_when(o.next_attempt, d.now)), _td(_text(o.last_error), "err")] for o in d.dead],
        ))
    else:
        out.append("<p class=\"ok\">No dead letters.</p>")
    out.append("</section>")
    n_pending = d.outbox_counts.get(OutboxState.PENDING, 0)
    out.append(f"<section id=\"pending\"><h3>Pending: {n_pending}"
               + (f" (the {len(d.pending)} due first)" if n_pending > len(d.pending) else "") + "</h3>")
    if d.pending:
        out.append(_table(
            ["Study Instance UID", "SR SOP Instance UID", "Destination", "Attempts", "Next try", "Last error"],
            [[_uid(o.study_uid), _uid(o.sr_sop_uid), _td(_e(o.destination)), _td(str(o.attempts), "n"),
              _td(_when(o.next_attempt, d.now)), _td(_text(o.last_error), "err")] for o in d.pending],
        ))
    out.append("</section></section>")
    return "".join(out)


def _models_section(d: PageData) -> str:
    out = ["<section id=\"models\"><h2>Models</h2>"]
    w = d.worker_models
    if w is None:
        out.append("<p class=\"note\">The worker has not reported what it loaded (not started yet, or no models"
                   " folder).</p>")
    else:
        out.append(f"<p>The worker loaded {len(w.get('loaded', []))} bundle(s)"
                   f" {_when(w.get('updated'), d.now)}; model set"
                   f" <span class=\"uid\">{_e(w.get('model_set') or '(none)')}</span>.</p>")
    if not d.models:
        out.append("<p class=\"bad\">No model bundle is installed: studies wait in <code>stable</code>.</p>")
    else:
        rows = []
        for m in d.models:
            loaded = m.get("loaded")
            mark = ("<span class=\"ok\">loaded</span>" if loaded else "<span class=\"bad\">not loaded</span>"
                    if loaded is False else "<span class=\"muted\">unknown</span>")
            name = _e(m.get("name"))
            if m.get("random_weights"):
                name += " <span class=\"bad\">(random weights: smoke test only)</span>"
            rows.append([_td(name), _td(_e(m.get("task") or "")), _td(_e(m.get("version") or "")), _td(mark),
                         _td(_e(m.get("runtime") or "")), _td(_text(m.get("error")), "err")])
        out.append(_table(["Bundle", "Task", "Version", "Worker", "Runtime", "Error"], rows))
    installed = {Path(str(m.get("path", ""))).name for m in d.models}
    stray = [(p, e) for p, e in sorted((w or {}).get("errors", {}).items()) if Path(p).name not in installed]
    if stray:
        out.append("<h3>Refused by the worker</h3>")
        out.append(_table(["Path", "Error"], [[_td(_e(p), "uid"), _td(_text(e), "err")] for p, e in stray]))
    out.append("</section>")
    return "".join(out)


def _throughput_section(d: PageData) -> str:
    hours = len(d.hours)
    out = [f"<section id=\"throughput\"><h2>Throughput and latency, last {hours} hours</h2>"]
    latencies = [x for h in d.hours for x in h.latencies]
    received = sum(h.received for h in d.hours)
    summary = f"{received} instance(s) received, {sum(h.delivered for h in d.hours)} stud(ies) delivered"
    if latencies:
        summary += (f"; last instance to SR delivered: median {_e(_duration(statistics.median(latencies)))},"
                    f" longest {_e(_duration(max(latencies)))}")
    out.append(f"<p id=\"throughput-summary\">{summary}.</p>")
    top = max((h.received for h in d.hours), default=0) or 1
    rows = []
    for h in reversed(d.hours):  # the current hour first
        label = time.strftime("%Y-%m-%d %H:%M", time.localtime(h.start))
        median = _duration(statistics.median(h.latencies)) if h.latencies else ""
        longest = _duration(max(h.latencies)) if h.latencies else ""
        rows.append([_td(_e(label)), _td(str(h.received), "n"),
                     _td(f"<meter min=\"0\" max=\"{top}\" value=\"{h.received}\"></meter>"),
                     _td(str(h.delivered), "n"), _td(_e(median), "n"), _td(_e(longest), "n")])
    out.append(_table(["Hour from", "Instances received", "", "Studies delivered", "Median latency",
                       "Longest latency"], rows))
    out.append("<p class=\"note\">Latency: from a study's last instance received to its SR acknowledged by"
               " every destination.</p></section>")
    return "".join(out)


def _disk_section(d: PageData) -> str:
    disk = d.disk
    out = ["<section id=\"disk\"><h2>Disk</h2>"]
    out.append(f"<p>Storage: <span class=\"uid\">{_e(disk['root'])}</span></p>")
    watermark = disk["watermark"]
    guard = (f"disk guard at {_e(_bytes(watermark))} free (<code>node.min_free_disk_mb</code>)" if watermark
             else "disk guard off (<code>node.min_free_disk_mb = 0</code>)")
    if "error" in disk:
        out.append(f"<p class=\"bad\">Cannot read the file system: {_text(disk['error'])}; {guard}.</p>")
    else:
        total, free = disk["total"], disk["free"]
        below = bool(watermark) and free < watermark
        state = ("<span class=\"bad\">under the guard: new associations are refused and C-STOREs answered"
                 " 0xA700</span>" if below else "<span class=\"ok\">receiving</span>")
        out.append(f"<p id=\"disk-free\">{_e(_bytes(free))} free of {_e(_bytes(total))}"
                   f" <meter min=\"0\" max=\"{total}\" low=\"{watermark}\" optimum=\"{total}\""
                   f" value=\"{free}\"></meter> {state}</p>")
        out.append(f"<p>{guard}; headroom {_e(_bytes(free - watermark))}.</p>")
    out.append("</section>")
    return "".join(out)


def _agreement_section(d: PageData) -> str:
    out = ["<section id=\"agreement\"><h2>Agreement with the sonographers</h2>"]
    if not d.agreement:
        out.append("<p class=\"muted\">No reference measurements yet.</p></section>")
        return "".join(out)

    def number(x: float | None) -> str:
        return "" if x is None else f"{x:.3f}"

    rows = [[_td(_e(a.model)), _td(_e(a.task)), _td(str(a.studies), "n"), _td(number(a.auroc), "n"),
             _td("" if a.auroc_ci is None else f"{a.auroc_ci[0]:.3f}-{a.auroc_ci[1]:.3f}", "n"),
             _td(number(a.sensitivity), "n"), _td(number(a.specificity), "n")] for a in d.agreement]
    out.append(_table(["Model", "Task", "Studies", "AUROC", "95 % CI", "Sensitivity", "Specificity"], rows))
    out.append("</section>")
    return "".join(out)


def render(d: PageData) -> str:
    """The page as an HTML document.

    Parameters
    ----------
    d : PageData

    Returns
    -------
    str
    """
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(d.now))
    return "".join([
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        f"<meta http-equiv=\"refresh\" content=\"{REFRESH_S}\">",
        "<meta name=\"referrer\" content=\"no-referrer\">",
        f"<title>echonode {_e(d.ae_title)}: status</title><style>{_CSS}</style></head><body>",
        f"<h1>echonode {_e(d.ae_title)}</h1>",
        (f"<p class=\"note\">Version {_e(__version__)}; read-only status at {_e(stamp)}, reloaded every"
         f" {REFRESH_S} s. Studies are named by their UIDs only. Not for diagnostic use.</p>"),
        _health_section(d),
        _studies_section(d),
        _outbox_section(d),
        _models_section(d),
        _throughput_section(d),
        _disk_section(d),
        _agreement_section(d),
        "</body></html>",
    ])


# -- serving --------------------------------------------------------------------------------------


def respond(node: Any, path: str, authorization: str | None, client: str) -> Response | None:
    """The answer to ``GET path``, or None when it is not the page's (or the page is off): the caller's 404.

    Parameters
    ----------
    node : echonode.daemon.node.Node
        Its ``cfg.status_page`` is read at every request, so a reload that
        changes the settings or the credentials applies at once.
    path : str
        The request's path, without the query.
    authorization : str or None
        The ``Authorization`` header.
    client : str
        The client's address, for the log.

    Returns
    -------
    Response or None
    """
    settings = node.cfg.status_page
    if path != PATH or not settings.enabled:
        return None
    if settings.auth != "none":
        try:
            credentials = load_credentials(settings.auth, settings.auth_file)
        except CredentialsError as exc:
            # Closed, not open: a page meant to be protected is never served without its check.
            log.error("status_page.credentials_unreadable", error=str(exc))
            return Response(503, b"the status page's credentials file does not read: see the node's log\n")
        if not authorised(credentials, authorization):
            if authorization:
                log.warning("status_page.refused", client=client, auth=settings.auth)
            return Response(401, b"authentication required\n",
                            headers=(("WWW-Authenticate", challenge(settings.auth)),))
    try:
        body = render(collect(node)).encode("utf-8")
    except Exception:  # one failed page must not kill the server thread
        log.exception("status_page.failed")
        return Response(500, b"the status page failed: see the node's log\n")
    return Response(200, body, "text/html; charset=utf-8", _PAGE_HEADERS)


def announce(cfg: Any, host: str, port: int) -> None:
    """Log where the page is served, and warn when it is open beyond loopback with no authentication."""
    settings = cfg.status_page
    if not settings.enabled:
        return
    log.info("status_page.enabled", url=f"http://{host}:{port}{PATH}", auth=settings.auth)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and settings.auth == "none":
        log.warning("status_page.unauthenticated", host=host,
                    effect="anyone who reaches the port sees study UIDs and errors; set status_page.auth")
