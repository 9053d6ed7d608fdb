"""Logging: JSON lines with UIDs as context, and never a patient identifier."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pydicom
import pytest
import structlog
from pynetdicom import AE, AllStoragePresentationContexts, evt

from echonode.daemon.node import Node
from echonode.ops.logs import configure_logging, get_logger
from echonode.studies.states import StudyState
from tests.conftest import make_config, wait_for, with_destination
from tests.factories import tiny_bundle, us_multiframe
from tests.peers import c_store


@pytest.fixture(autouse=True)
def _restore_logging():
    """These tests point logging at their own streams; later tests must not write to closed ones."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {n: logging.getLogger(n).level for n in ("pynetdicom", "pydicom", "apscheduler", "highdicom")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for n, lv in levels.items():
        logging.getLogger(n).setLevel(lv)
    structlog.reset_defaults()


SECRET_NAME = "ZZSECRET^HIDDENNAME"
SECRET_ID = "PHI-ID-424242"
SECRET_BIRTH = "19230405"


def test_json_lines_with_bound_context_and_stdlib_routing() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf)
    structlog.contextvars.bind_contextvars(study_uid="1.2.3")
    try:
        get_logger("t").info("hello", sop_uid="1.2.3.4", patient_name="DOE^JOHN")
        logging.getLogger("pynetdicom").warning("from the stdlib")
    finally:
        structlog.contextvars.clear_contextvars()
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert lines[0]["event"] == "hello" and lines[0]["study_uid"] == "1.2.3" and lines[0]["sop_uid"] == "1.2.3.4"
    assert "DOE" not in buf.getvalue()  # a PHI key is redacted even if a caller passes it
    assert lines[1]["event"] == "from the stdlib" and lines[1]["level"] == "warning"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_an_exception_is_logged_by_type_and_frames_never_its_message(fmt: str) -> None:
    """A library's error can quote a data element; ours and the stdlib's (pynetdicom's) alike."""
    buf = io.StringIO()
    configure_logging(fmt, "info", stream=buf)

    def parse_name() -> None:
        raise ValueError("invalid value for VR PN: 'DOE^JOHN'")

    try:
        parse_name()
    except ValueError:
        get_logger("t").exception("store.unexpected_error", sop_uid="1.2.3.4")
    try:
        raise KeyError("MRN-0042")
    except KeyError:
        logging.getLogger("pynetdicom.events").exception("Exception in handler")
    out = buf.getvalue()
    assert "DOE" not in out and "MRN-0042" not in out
    if fmt == "json":
        ours, theirs = (json.loads(x) for x in out.splitlines())
        assert ours["error"] == "ValueError" and ours["sop_uid"] == "1.2.3.4"
        assert ours["frames"][-1].startswith("test_logs.py:") and ours["frames"][-1].endswith(" in parse_name")
        assert theirs["error"] == "KeyError" and theirs["frames"]
    else:
        assert "error=ValueError" in out and "in parse_name" in out and "error=KeyError" in out


def test_console_format() -> None:
    buf = io.StringIO()
    configure_logging("console", "info", stream=buf)
    get_logger("t").info("hello", study_uid="1.2.3")
    assert "hello" in buf.getvalue() and "study_uid=1.2.3" in buf.getvalue()
    configure_logging("auto", "info", stream=io.StringIO())  # not a tty: JSON, no error


def test_no_patient_identifier_in_any_log_line(tmp_path: Path, sonosite_loop: Path) -> None:
    """A study with a known name and ID through the whole loop; every log line scanned."""
    received: list[pydicom.Dataset] = []
    pacs = AE(ae_title="PACS")
    for cx in AllStoragePresentationContexts:
        pacs.add_supported_context(cx.abstract_syntax)
    server = pacs.start_server(("127.0.0.1", 0), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, lambda e: (received.append(e.dataset), 0)[1])])
    log_path = tmp_path / "node.log"
    cfg = make_config(tmp_path, study={"stable_after_s": 0.5, "check_interval_s": 0.2},
                      logging={"format": "json", "level": "debug"})
    cfg = with_destination(cfg, "pacs", "PACS", int(server.server_address[1]))
    tiny_bundle(cfg.models_dir, "lvh")
    stream = log_path.open("a", buffering=1)
    configure_logging("json", "debug", stream=stream)
    node = Node(cfg, worker_log_path=str(log_path))
    node.start()
    try:
        real = pydicom.dcmread(sonosite_loop)
        real.PatientName, real.PatientID, real.PatientBirthDate = SECRET_NAME, SECRET_ID, SECRET_BIRTH
        bad = us_multiframe(study_uid=str(real.StudyInstanceUID), patient_name=SECRET_NAME, patient_id=SECRET_ID)
        bad.SeriesInstanceUID = "1.2.bad"  # a refused object is logged too
        statuses = c_store(node.scp.port, [real, bad])
        assert statuses[0] == 0 and statuses[1] >= 0xA000  # the stray series is refused
        study = str(real.StudyInstanceUID)
        wait_for(lambda: (node.worker.supervise(), node.journal.study_state(study) == StudyState.DELIVERED)[1],
                 timeout=180, what="delivery")
    finally:
        node.stop()
        server.shutdown()
        stream.close()
    assert received and str(received[0].PatientID) == SECRET_ID  # the SR itself carries the identity
    text = log_path.read_text()
    assert "study.reported" in text and "store.accepted" in text
    for secret in (SECRET_NAME, "ZZSECRET", "HIDDENNAME", SECRET_ID, SECRET_BIRTH):
        assert secret not in text, f"{secret!r} leaked into the log"
    for line in text.splitlines():
        json.loads(line)  # every line is JSON


def test_a_peers_text_is_escaped_and_bounded_in_log_lines() -> None:
    from echonode.ops.logs import PEER_TEXT_LIMIT, peer_text

    assert peer_text("1.2.840.10008.5.1.4.1.1.3.1") == "1.2.840.10008.5.1.4.1.1.3.1"
    assert peer_text("1.2.3\nfake_event=1") == "1.2.3\\nfake_event=1"
    long = peer_text("9" * 65536)
    assert long.startswith("9" * PEER_TEXT_LIMIT) and long.endswith("...(65536 characters)")
    assert len(long) < PEER_TEXT_LIMIT + 30
