"""The administrator's status page (``/status``) on a running node, in a real browser.

A node runs in the test process with its [metrics] endpoint and the page on;
its studies arrive over DICOM (pynetdicom, on loopback) carrying a patient
name, ID and accession number, and are moved through the journal as the
worker and delivery would move them: queued, reported with an SR pending,
delivered, failed with a reason, a dead letter, skipped. Headless Chromium
(Debian's ``chromium`` and ``chromium-driver``, driven by Selenium) loads the
page and the test reads what it shows; the screenshot is kept in the test's
tmp dir (``status.png``). Authentication, the default (off) and the bounds
of its queries are tested over plain HTTP.
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from echonode.bundles.installed import MODELS_STATE
from echonode.config import ConfigError, parse_config
from echonode.daemon.node import Node
from echonode.ops.statuspage import PATH, AgreementRow, collect, render
from echonode.studies.journal import Journal
from echonode.studies.records import InstanceRecord, ReportRecord
from tests.conftest import REPO, free_port, make_config
from tests.factories import us_multiframe
from tests.peers import c_store

#: What the stored objects carry and the page must never show.
PATIENT_NAME = "DOE^JANE"
PATIENT_ID = "PID-778899"
ACCESSION = "ACC-4242"
#: A failure reason and a peer's error with markup in them: the page must show them as text.
FAILED_REASON = 'could not process the study: <img src=x onerror="alert(1)"> & more'
DEAD_ERROR = "association rejected: peer said <script>alert('dead')</script> & gave up"
PENDING_ERROR = "cannot connect to PACS@10.0.0.9:104: <b>connection refused</b>"


# -- a node with studies in every state --------------------------------------------------------


def _page_config(tmp_path: Path, **page: Any) -> Any:
    return make_config(
        tmp_path,
        node={"min_free_disk_mb": 1},
        # Nothing moves by itself: the test drives the studies through the journal.
        study={"stable_after_s": 3600.0},
        delivery={"check_interval_s": 3600.0, "retry_initial_s": 3600.0, "retry_max_s": 3600.0},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}],
        metrics={"enabled": True, "port": free_port()},
        status_page={"enabled": True, **page},
    )


@pytest.fixture
def page_node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Node]:
    """A running node (no worker) with the page on; ``indirect`` params set ``[status_page]`` keys."""
    node = Node(_page_config(tmp_path, **dict(getattr(request, "param", {}))), start_worker=False)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def _object(study_uid: str, seed: int) -> Dataset:
    ds = us_multiframe(study_uid=study_uid, frames=2, rows=16, cols=16, seed=seed,
                       patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
    ds.AccessionNumber = ACCESSION
    return ds


def _claim(journal: Journal, study_uid: str) -> Any:
    journal.mark_stable(0.0)
    journal.queue_stable()
    claim = journal.claim_next(0)
    assert claim is not None and claim.study_uid == study_uid
    return claim


def _report(journal: Journal, study_uid: str, tmp_path: Path) -> int:
    """Record an SR for the study with one outbox row to ``pacs``; that row's id."""
    claim = _claim(journal, study_uid)
    sr_uid = generate_uid()
    journal.finish_reported(claim, "set1", [], ReportRecord(sr_uid, study_uid, "set1", generate_uid(),
                                                            "1.2.840.10008.5.1.4.1.1.88.34",
                                                            str(tmp_path / f"{sr_uid}.dcm")), ["pacs"])
    (row,) = [o for o in journal.status()["outbox"] if o["sr_sop_uid"] == sr_uid]
    return int(row["id"])


def _install_models(cfg: Any) -> None:
    """Two bundles in the models folder; the worker's state says it loaded one and refused the other."""
    for name, task, version in (("lvh-demo", "lvh", "3"), ("broken-bundle", "severe_as", "1")):
        folder = cfg.models_dir / name
        folder.mkdir(parents=True)
        (folder / "bundle.json").write_text(json.dumps({"name": name, "task": task, "version": version,
                                                        "random_weights": name == "lvh-demo"}))
    (cfg.storage_dir / MODELS_STATE).write_text(json.dumps({
        "loaded": ["lvh-demo"], "model_set": "set1",
        "errors": {str(cfg.models_dir / "broken-bundle"): "weights.pt does not load: <not a state dict>"},
        "runtime": {"lvh-demo": "eager"}, "updated": time.time(),
    }))


def _populate(node: Node, tmp_path: Path) -> dict[str, str]:
    """A study in each state the page lists; their UIDs by name."""
    j, port = node.journal, node.scp.port
    uids = {k: generate_uid() for k in ("delivered", "pending", "dead", "failed", "skipped", "queued")}
    # Delivered 10 minutes after its last instance: recorded as received then.
    ten_min_ago = time.time() - 600
    assert c_store(port, [_object(uids["delivered"], 1)]) == [0]
    con = sqlite3.connect(node.cfg.journal_path)
    with con:
        con.execute("UPDATE instances SET received = ? WHERE study_uid = ?", (ten_min_ago, uids["delivered"]))
        con.execute("UPDATE studies SET first_received = ?, last_received = ? WHERE study_uid = ?",
                    (ten_min_ago, ten_min_ago, uids["delivered"]))
    con.close()
    j.mark_sent(_report(j, uids["delivered"], tmp_path))

    assert c_store(port, [_object(uids["pending"], 2), _object(uids["pending"], 3)]) == [0, 0]
    j.mark_retry(_report(j, uids["pending"], tmp_path), time.time() + 300, PENDING_ERROR)

    assert c_store(port, [_object(uids["dead"], 4)]) == [0]
    j.mark_dead(_report(j, uids["dead"], tmp_path), DEAD_ERROR)

    assert c_store(port, [_object(uids["failed"], 5)]) == [0]
    j.finish_failed(_claim(j, uids["failed"]), FAILED_REASON, max_attempts=1)

    assert c_store(port, [_object(uids["skipped"], 6)]) == [0]
    j.finish_skipped(_claim(j, uids["skipped"]), "no usable video (single frame, not a cine loop)")

    assert c_store(port, [_object(uids["queued"], 7)]) == [0]
    j.mark_stable(0.0)
    j.queue_stable()
    _install_models(node.cfg)
    return uids


def _get(port: int, path: str = PATH, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as rsp:
            return rsp.status, dict(rsp.headers), rsp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# -- in the browser ------------------------------------------------------------------------------


@pytest.mark.parametrize("page_node", [{"show_accession": False}], indirect=True)
def test_the_page_shows_the_node_in_a_browser(page_node: Node, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    uids = _populate(page_node, tmp_path)
    browser.get(f"http://127.0.0.1:{page_node.cfg.metrics.port}{PATH}")

    def section(element_id: str) -> str:
        return str(browser.find_element(By.ID, element_id).text)

    assert "Healthy" in section("health")
    studies = section("studies")
    assert "7 studies in the journal" not in studies and "6 studies in the journal" in studies
    for state in ("delivered", "failed", "skipped", "queued"):
        assert uids[state] in section(f"state-{state}"), state
    reported = section("state-reported")
    assert uids["pending"] in reported and uids["dead"] in reported
    assert uids["pending"] not in section("state-delivered")
    # Reasons and errors read as the text they are; nothing in them became markup.
    assert FAILED_REASON in section("state-failed")
    assert "no usable video (single frame, not a cine loop)" in section("state-skipped")
    dead = section("dead")
    assert "Dead letters: 1" in dead and uids["dead"] in dead and DEAD_ERROR in dead and "pacs" in dead
    pending = section("pending")
    assert "Pending: 1" in pending and uids["pending"] in pending and PENDING_ERROR in pending
    assert browser.find_elements(By.TAG_NAME, "script") == []
    assert browser.find_elements(By.TAG_NAME, "img") == []
    assert browser.find_elements(By.TAG_NAME, "b") == []
    # Two instances for the pending study, one for the others.
    row = browser.find_element(By.XPATH, f"//section[@id='state-reported']//tr[td[1]='{uids['pending']}']")
    assert [td.text for td in row.find_elements(By.TAG_NAME, "td")][1:3] == ["2", "1"]

    models = section("models")
    assert "lvh-demo" in models and "random weights" in models and "eager" in models
    assert re.search(r"broken-bundle\s+severe_as\s+1\s+not loaded", models), models
    assert "weights.pt does not load: <not a state dict>" in models

    throughput = section("throughput-summary")
    assert "7 instance(s) received, 1 stud(ies) delivered" in throughput, throughput
    assert re.search(r"median 10\.\d min", throughput), throughput
    disk = section("disk")
    assert "disk guard at 1.0 MiB free" in disk and "receiving" in disk
    assert "No reference measurements yet." in section("agreement")

    # No patient name or ID anywhere; the accession number is off by default.
    source = browser.page_source
    for secret in (PATIENT_NAME, "DOE", "JANE", PATIENT_ID, ACCESSION):
        assert secret not in source, secret
    # Offline: nothing was fetched but the page, and its inline style sheet applied under the CSP.
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    th = browser.find_element(By.TAG_NAME, "th")
    assert th.value_of_css_property("background-color") == "rgba(242, 244, 247, 1)"

    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(int(height) + 150, 6000))
    shot = tmp_path / "status.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    browser.set_window_size(1280, 800)


@pytest.mark.parametrize("page_node", [{"show_accession": True}], indirect=True)
def test_the_accession_number_is_shown_only_when_asked_and_never_the_patient(page_node: Node,
                                                                              tmp_path: Path) -> None:
    uids = _populate(page_node, tmp_path)
    code, _, body = _get(page_node.cfg.metrics.port)
    page = body.decode()
    assert code == 200
    assert page.count(ACCESSION) >= len(uids)  # one per listed study
    for secret in (PATIENT_NAME, "DOE", "JANE", PATIENT_ID):
        assert secret not in page, secret


def test_everything_a_peer_or_a_reason_says_is_escaped(tmp_path: Path) -> None:
    """The renderer's own check, on data no journal would let through: names, errors, agreement rows."""
    cfg = _page_config(tmp_path)
    node = Node(cfg, start_worker=False)
    try:
        j = node.journal
        uid = generate_uid()
        j.record_instance(InstanceRecord(generate_uid(), uid, generate_uid(), "1.2.3", "1.2.840.10008.1.2.1",
                                         "/nonexistent.dcm", 10, time.time()))
        j.finish_failed(_claim(j, uid), "</td></tr></table><h1>owned</h1>", max_attempts=1)
        data = collect(node)
        data.agreement = [AgreementRow("<i>model</i> 1", "lvh", 12, 0.81234, (0.7, 0.9), 0.75, None)]
        page = render(data)
        assert "<h1>owned</h1>" not in page and "&lt;h1&gt;owned&lt;/h1&gt;" in page
        assert "<i>model</i>" not in page and "&lt;i&gt;model&lt;/i&gt; 1" in page
        assert "0.812" in page and "0.700-0.900" in page
        assert "No reference measurements yet" not in page
    finally:
        node.journal.close()


# -- authentication and the default ---------------------------------------------------------------


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def secrets(tmp_path: Path) -> dict[str, Path]:
    basic = tmp_path / "basic.auth"
    basic.write_text("# who may read the page\nadmin:s3cret:with:colons\nops:other\n")
    bearer = tmp_path / "bearer.auth"
    bearer.write_text("tok-0123456789abcdef\n")
    for secret in (basic, bearer):
        secret.chmod(0o640)
    return {"basic": basic, "bearer": bearer}


def test_basic_auth_refuses_with_401_and_admits_the_right_user(tmp_path: Path, secrets: dict[str, Path]) -> None:
    node = Node(_page_config(tmp_path, auth="basic", auth_file=str(secrets["basic"])), start_worker=False)
    node.start()
    try:
        port = node.cfg.metrics.port
        code, headers, body = _get(port)
        assert code == 401 and headers["WWW-Authenticate"] == 'Basic realm="echonode status", charset="UTF-8"'
        assert b"Study" not in body
        with capture_logs() as logs:
            assert _get(port, headers=_basic("admin", "wrong"))[0] == 401
            assert _get(port, headers=_basic("nobody", "s3cret:with:colons"))[0] == 401
            assert _get(port, headers={"Authorization": "Bearer s3cret:with:colons"})[0] == 401
            assert _get(port, headers={"Authorization": "Basic !!not base64!!"})[0] == 401
        refused = [e for e in logs if e["event"] == "status_page.refused"]
        assert len(refused) == 4 and all(e["client"] == "127.0.0.1" for e in refused)
        assert "s3cret" not in repr(logs)
        code, headers, body = _get(port, headers=_basic("admin", "s3cret:with:colons"))
        assert code == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        assert "script-src" not in headers["Content-Security-Policy"]
        assert headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert b"<h2>Studies</h2>" in body
        assert _get(port, headers=_basic("ops", "other"))[0] == 200
        # The probe and the scrape stay as they were: no credentials asked.
        assert _get(port, "/health")[0] == 200 and _get(port, "/metrics")[0] == 200
        # A credentials file that goes away closes the page, it never opens it.
        secrets["basic"].unlink()
        assert _get(port, headers=_basic("admin", "s3cret:with:colons"))[0] == 503
    finally:
        node.stop()


def test_bearer_token_from_a_file(tmp_path: Path, secrets: dict[str, Path]) -> None:
    node = Node(_page_config(tmp_path, auth="bearer", auth_file=str(secrets["bearer"])), start_worker=False)
    node.start()
    try:
        port = node.cfg.metrics.port
        code, headers, _ = _get(port)
        assert code == 401 and headers["WWW-Authenticate"] == 'Bearer realm="echonode status"'
        assert _get(port, headers={"Authorization": "Bearer tok-wrong"})[0] == 401
        assert _get(port, headers=_basic("tok-0123456789abcdef", ""))[0] == 401
        assert _get(port, headers={"Authorization": "Bearer tok-0123456789abcdef"})[0] == 200
        # A rotated token applies at the next request.
        secrets["bearer"].write_text("tok-rotated\n")
        assert _get(port, headers={"Authorization": "Bearer tok-0123456789abcdef"})[0] == 401
        assert _get(port, headers={"Authorization": "Bearer tok-rotated"})[0] == 200
    finally:
        node.stop()


def test_off_by_default(tmp_path: Path) -> None:
    assert parse_config({}).status_page.enabled is False
    assert parse_config({}).status_page.show_accession is False
    from echonode.config import load_config

    example = load_config(REPO / "etc" / "echonode.toml")
    assert example.status_page.enabled is False and example.status_page.auth == "none"
    # The metrics endpoint on, the page not asked for: it is not there.
    cfg = make_config(tmp_path, metrics={"enabled": True, "port": free_port()})
    node = Node(cfg, start_worker=False)
    node.start()
    try:
        assert _get(cfg.metrics.port)[0] == 404
        assert _get(cfg.metrics.port, "/health")[0] == 200
    finally:
        node.stop()


@pytest.mark.parametrize(
    ("page", "metrics", "key"),
    [
        ({"enabled": True}, {"enabled": False}, "status_page.enabled"),
        ({"auth": "digest"}, {}, "status_page.auth"),
        ({"enabled": True, "auth": "basic"}, {"enabled": True}, "status_page.auth_file"),
        ({"auth_file": "/etc/passwd"}, {}, "status_page.auth_file"),
        ({"enabled": True, "auth": "bearer", "auth_file": "/nonexistent/token"}, {"enabled": True},
         "status_page.auth_file"),
        ({"hours": 0}, {}, "status_page.hours"),
        ({"rows": 5000}, {}, "status_page.rows"),
        ({"password": "inline"}, {}, "status_page.password"),
    ],
)
def test_config_errors_name_the_key(page: dict, metrics: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"status_page": page, "metrics": metrics})
    assert str(err.value).startswith(f"{key}:"), err.value


def test_a_malformed_credentials_file_is_refused_without_quoting_it(tmp_path: Path) -> None:
    bad = tmp_path / "basic.auth"
    bad.write_text("admin-without-a-password-separator-s3cret\n")
    bad.chmod(0o600)
    with pytest.raises(ConfigError) as err:
        parse_config({"metrics": {"enabled": True},
                      "status_page": {"enabled": True, "auth": "basic", "auth_file": str(bad)}})
    assert str(err.value).startswith("status_page.auth_file:") and "line 1" in str(err.value)
    assert "s3cret" not in str(err.value)


def test_a_credentials_file_every_user_can_read_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "basic.auth"
    shared.write_text("admin:s3cret\n")
    shared.chmod(0o644)
    with pytest.raises(ConfigError) as err:
        parse_config({"metrics": {"enabled": True},
                      "status_page": {"enabled": True, "auth": "basic", "auth_file": str(shared)}})
    assert str(err.value).startswith("status_page.auth_file:") and "chmod o-r" in str(err.value)


# -- bounded -----------------------------------------------------------------------------------------


def _bulk_journal(journal: Journal, n: int, now: float) -> None:
    """``n`` delivered studies (one instance and one sent SR each) and one failed, straight into SQLite."""
    con = sqlite3.connect(journal.path)
    with con:
        con.executemany(
            "INSERT INTO studies (study_uid, state, first_received, last_received, updated) VALUES (?, ?, ?, ?, ?)",
            [(f"1.2.9.{i}", "delivered", now - 9000 + i * 0.1, now - 9000 + i * 0.1, now - 8000 + i * 0.1)
             for i in range(n)] + [("1.2.9.failed", "failed", now - 99999, now - 99999, now - 99999)],
        )
        con.executemany(
            "INSERT INTO instances (sop_uid, study_uid, series_uid, sop_class_uid, transfer_syntax, path, size,"
            " received) VALUES (?, ?, '1.2', '1.2', '1.2', '/x', 1, ?)",
            [(f"1.2.9.{i}.1", f"1.2.9.{i}", now - 9000 + i * 0.1) for i in range(n)],
        )
        con.executemany(
            "INSERT INTO reports (sr_sop_uid, study_uid, model_set, series_uid, sop_class_uid, path, created)"
            " VALUES (?, ?, 's', '1.2', '1.2', '/y', ?)",
            [(f"1.2.9.{i}.9", f"1.2.9.{i}", now - 8500) for i in range(n)],
        )
        con.executemany(
            "INSERT INTO outbox (sr_sop_uid, study_uid, destination, state, next_attempt, created, sent_at)"
            " VALUES (?, ?, 'pacs', 'sent', ?, ?, ?)",
            [(f"1.2.9.{i}.9", f"1.2.9.{i}", now - 8500, now - 8500, now - 8000 + i * 0.1) for i in range(n)],
        )
    con.close()


@pytest.mark.parametrize("page_node", [{"rows": 5}], indirect=True)
def test_every_list_is_bounded_and_read_through_an_index(page_node: Node) -> None:
    """Each of the page's queries seeks or ranges an index; the only whole-table passes are the counts
    by state, along a covering index, as ``status`` and the metrics count."""
    now = time.time()
    _bulk_journal(page_node.journal, 3000, now)
    con = page_node.journal._connect()
    statements: list[str] = []
    con.set_trace_callback(statements.append)
    try:
        data = collect(page_node, now)
    finally:
        con.set_trace_callback(None)
    assert data.study_counts["delivered"] == 3000 and len(data.studies["delivered"]) == 5
    assert [s.study_uid for s in data.studies["delivered"]] == [f"1.2.9.{i}" for i in range(2999, 2994, -1)]
    assert [s.study_uid for s in data.studies["failed"]] == ["1.2.9.failed"]
    assert sum(h.received for h in data.hours) == 3000 and sum(h.delivered for h in data.hours) == 3000
    assert all(1000 - 1 < x < 1000 + 1 for h in data.hours for x in h.latencies)
    page = render(data)
    assert "delivered: 3000 (the 5 most recently active)" in page

    plans = {}
    for sql in statements:
        if not sql.lstrip().upper().startswith("SELECT"):
            continue
        plans[sql] = [r[3] for r in con.execute("EXPLAIN QUERY PLAN " + sql)]
    assert len(plans) >= 6
    for sql, plan in plans.items():
        for step in plan:
            if step.startswith("SCAN"):
                # A count by state along its index: bounded by the number of states returned.
                assert "COVERING INDEX" in step and "GROUP BY state" in sql and "instances" not in step, (sql, plan)
            if "LIMIT" in sql:
                # Sorting would read every match to keep a few: the index gives the order.
                assert "TEMP B-TREE FOR" not in step, (sql, plan)


def test_an_old_journal_gains_the_page_indexes(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    Journal(path).close()
    con = sqlite3.connect(path)
    with con:
        con.execute("DROP INDEX studies_state_active")
        con.execute("DROP INDEX instances_received")
    con.close()
    Journal(path)
    con = sqlite3.connect(path)
    names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    con.close()
    assert {"studies_state_active", "instances_received"} <= names


def test_a_reload_turns_the_page_on_and_applies_new_credentials(tmp_path: Path, secrets: dict[str, Path]) -> None:
    from echonode.config import to_toml

    cfg = make_config(tmp_path, metrics={"enabled": True, "port": free_port()})
    path = tmp_path / "echonode.toml"
    path.write_text(to_toml(cfg))
    node = Node(cfg, str(path), start_worker=False)
    node.start()
    try:
        port = cfg.metrics.port
        assert _get(port)[0] == 404
        path.write_text(to_toml(parse_config({**tomllib.loads(path.read_text()),
                                              "status_page": {"enabled": True, "auth": "bearer",
                                                              "auth_file": str(secrets["bearer"])}})))
        node.reload()
        assert _get(port)[0] == 401
        assert _get(port, headers={"Authorization": "Bearer tok-0123456789abcdef"})[0] == 200
    finally:
        node.stop()


@pytest.mark.parametrize(("host", "auth", "warned"), [("0.0.0.0", "none", True), ("10.1.2.3", "none", True),
                                                     ("127.0.0.1", "none", False), ("::1", "none", False),
                                                     ("0.0.0.0", "bearer", False)])
def test_served_open_beyond_loopback_it_says_so(tmp_path: Path, secrets: dict[str, Path], host: str, auth: str,
                                                warned: bool) -> None:
    from echonode.ops.statuspage import announce

    page = {"enabled": True, "auth": auth, **({"auth_file": str(secrets["bearer"])} if auth != "none" else {})}
    cfg = parse_config({"metrics": {"enabled": True, "host": host}, "status_page": page})
    with capture_logs() as logs:
        announce(cfg, host, 9108)
    assert [e["event"] for e in logs] == ["status_page.enabled", *(["status_page.unauthenticated"] if warned else [])]
