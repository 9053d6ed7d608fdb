"""The rule for a missing external tool: a failure in CI, a skip with a reason locally."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.peers import PACKAGES, STORESCU, require_tool


def test_a_missing_tool_fails_in_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"missing in CI: \.ci/run must install"):
        require_tool(str(tmp_path / "no-such-tool"))


def test_a_missing_tool_skips_locally_saying_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    missing = "/nonexistent/storescu"
    monkeypatch.setitem(PACKAGES, missing, "dcmtk")
    with pytest.raises(pytest.skip.Exception, match=r"/nonexistent/storescu not installed \(install dcmtk\)"):
        require_tool(missing)


def test_a_present_tool_is_returned_by_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    tool = tmp_path / "tool"
    tool.write_text("")
    assert require_tool(str(tool)) == str(tool)
    assert PACKAGES[STORESCU] == "dcmtk"
