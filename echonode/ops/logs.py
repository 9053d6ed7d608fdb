"""Logging: structlog everywhere, stdlib loggers (pynetdicom, pydicom) routed through it.

JSON lines off a terminal (journald, files), a console renderer on one. No
timestamps under journald, which adds its own. Context (association,
calling AE, study and SOP instance UIDs) is bound with
``structlog.contextvars``; pynetdicom carries it into association threads
when ``_config.PASS_CONTEXTVARS`` is set (done in ``scp.py``).

Patient names, IDs and birth dates are never logged: code logs UIDs. As a
second line of defence, :func:`redact_phi` drops any event key that names a
patient attribute, and :func:`scrub_exception` logs an exception's type and
frames without its message.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import structlog
from structlog.typing import EventDict

#: Event keys that must never reach a log line, whatever a caller passes.
PHI_KEYS = frozenset(
    {
        "patient_name",
        "patientname",
        "patient_id",
        "patientid",
        "patient_birth_date",
        "patientbirthdate",
        "birth_date",
        "other_patient_ids",
        "patient_address",
    }
)


def redact_phi(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """A structlog processor that removes patient-identifying keys."""
    for key in list(event_dict):
        if key.lower() in PHI_KEYS:
            event_dict[key] = "[redacted]"
    return event_dict


def scrub_exception(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """A structlog processor that logs an exception's type and stack, never its message.

    The message of a library's exception can quote a data element (pydicom's
    "invalid value for VR PN: 'DOE^JOHN'"); where it happened is what a
    maintainer needs. ``error`` gets the type (unless the caller set it) and
    ``frames`` the frames as ``file:line in function``, innermost last.
    """
    exc_info = event_dict.pop("exc_info", None)
    if not exc_info:
        return event_dict
    if exc_info is True:
        exc_info = sys.exc_info()
    exc = exc_info[1] if isinstance(exc_info, tuple) else exc_info
    if not isinstance(exc, BaseException):
        return event_dict
    event_dict.setdefault("error", type(exc).__name__)
    event_dict["frames"] = exception_frames(exc)
    return event_dict


def exception_frames(exc: BaseException, limit: int = 12) -> list[str]:
    """Where an exception happened, without its message: ``file:line in function``, innermost last.

    Parameters
    ----------
    exc : BaseException
        A raised exception (with its traceback).
    limit : int
        The innermost frames kept.

    Returns
    -------
    list of str
        Empty when the exception carries no traceback.
    """
    return [f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in traceback.extract_tb(exc.__traceback__)[-limit:]]


def _shared_processors(timestamps: bool) -> list[Any]:
    procs: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        redact_phi,
    ]
    if timestamps:
        procs.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    return procs


def silence_data_warnings() -> None:
    """Drop pydicom's and highdicom's warnings about received values.

    They quote element values ("The string 'DOE^J' is unlikely to represent
    a person name"), which would put patient names on stderr, hence in the
    journal. What matters in them is logged by our own code with UIDs.
    """
    for module in (r"pydicom(\..*)?", r"highdicom(\..*)?", r"pynetdicom(\..*)?"):
        warnings.filterwarnings("ignore", module=module)


def configure_logging(fmt: str = "auto", level: str = "info", stream: Any = None) -> None:
    """Configure structlog and route stdlib logging through it.

    Parameters
    ----------
    fmt : {"auto", "json", "console"}
        ``auto`` is JSON unless the stream is a terminal.
    level : str
        ``debug``, ``info``, ``warning`` or ``error``.
    stream : file-like, optional
        Where lines go (default ``sys.stderr``).
    """
    stream = stream or sys.stderr
    silence_data_warnings()
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    # journald stamps every line itself.
    timestamps = "JOURNAL_STREAM" not in os.environ
    shared = _shared_processors(timestamps)
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)

    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            scrub_exception,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at debug and a summary per association at
    # info; keep it one step quieter than ours unless debugging.
    net_level = logging.DEBUG if level.lower() == "debug" else logging.WARNING
    for name in ("pynetdicom", "apscheduler", "highdicom"):
        logging.getLogger(name).setLevel(net_level)
    # pydicom's warnings quote element values ("Invalid value for VR DA:
    # '19600101'"): never below ERROR, whatever the level.
    logging.getLogger("pydicom").setLevel(logging.ERROR)


#: The most characters of a peer's own text (a UID it sent) a log line carries.
PEER_TEXT_LIMIT = 80


def peer_text(value: object, limit: int = PEER_TEXT_LIMIT) -> str:
    """Text a peer chose, safe for a log line: control characters escaped, at most ``limit`` characters kept.

    A UID in a request is the peer's word until it is checked: it may hold a
    newline, a path, or 64 KB.
    """
    text = repr(str(value))[1:-1]
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """Return a structlog logger named ``name``."""
    return structlog.stdlib.get_logger(name)


class EventLog:
    """Structured events where the process configured logging (the worker), stdlib elsewhere.

    structlog's default, before :func:`configure_logging`, prints to stdout,
    where ``echonode infer`` writes its JSON; command-line tools that load
    bundles without configuring logging get stdlib records instead (warnings
    on stderr, info dropped).

    Parameters
    ----------
    name : str
        The logger's name (a module's ``__name__``).
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def _emit(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if structlog.is_configured():
            get_logger(self.name).log(level, event, **fields)
        else:
            details = " ".join(f"{key}={value}" for key, value in fields.items())
            logging.getLogger(self.name).log(level, "%s %s", event, details)

    def info(self, event: str, **fields: Any) -> None:
        """Log ``event`` with ``fields`` at INFO."""
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Log ``event`` with ``fields`` at WARNING."""
        self._emit(logging.WARNING, event, fields)
