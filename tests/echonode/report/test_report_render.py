"""The SR as a person sees it: rendered by dcmtk's dsr2html, as PACS viewers render SR, in a real browser.

Headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by
Selenium opens the page; the test reads the visible text and the layout, and
keeps a screenshot in its tmp dir (``sr.png``, ``not_assessed.png``).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from echonode.report.build import build_report
from echonode.report.findings import NotAssessed
from echonode.report.summary import finding_line, not_assessed_line
from tests.peers import DSR2HTML, require_tool
from tests.report_support import (
    PLA_WARNING,
    example_sources,
    make_findings,
    study_header,
)

pytestmark = pytest.mark.filterwarnings(PLA_WARNING)

# A number with more than 3 decimals that is not part of a dotted UID.
LONG_DECIMAL = re.compile(r"(?<![\d.])\d+\.\d{4,}(?![\d.])")


@pytest.fixture(scope="module")
def header() -> Dataset:
    return study_header()


def _render(ds: Dataset, folder: Path, name: str) -> Path:
    dicom = folder / f"{name}.dcm"
    html = folder / f"{name}.html"
    ds.save_as(dicom, enforce_file_format=True)
    proc = subprocess.run([require_tool(DSR2HTML), str(dicom), str(html)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return html


def _look(browser: Any, html: Path, screenshot: Path) -> tuple[list[str], Any]:
    """The page's visible lines, and the browser to ask about the layout."""
    browser.get(html.as_uri())
    lines = [line.strip() for line in browser.find_element("tag name", "body").text.splitlines() if line.strip()]
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return lines, browser


def _on_first_screen(browser: Any, text: str) -> bool:
    """Whether the element showing ``text`` lies wholly inside the window before any scrolling."""
    return bool(browser.execute_script(
        """
        const text = arguments[0];
        const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
        while (walker.nextNode()) {
            if (walker.currentNode.textContent.trim() === text) {
                const box = walker.currentNode.parentElement.getBoundingClientRect();
                return box.top >= 0 && box.bottom <= window.innerHeight && box.width > 0;
            }
        }
        return false;
        """,
        text,
    ))


def _after_title(lines: list[str]) -> list[str]:
    """The lines under the document title (dsr2html's header table comes before it)."""
    assert "Imaging Measurement Report" in lines, lines[:20]
    head = lines[: lines.index("Imaging Measurement Report")]
    # Nothing of the findings is hidden in the header: it is dcmtk's, about the document.
    assert head[0].startswith("Patient:") and any("NOT FOR DIAGNOSTIC USE" in line for line in head)
    assert not any("hypertrophy" in line.lower() or "stenosis" in line.lower() for line in head)
    return lines[lines.index("Imaging Measurement Report") + 1:]


def test_a_reader_sees_the_verdicts_first(browser: Any, header: Dataset, tmp_path: Path) -> None:
    """The verdict, rounded, in plain words, right under the title, on the first screen."""
    findings = make_findings(example_sources(header))
    sr = build_report(header, findings)  # the default class: Comprehensive 3D SR
    lines, page = _look(browser, _render(sr, tmp_path, "sr"), tmp_path / "sr.png")
    first = _after_title(lines)
    expected = [finding_line(f) for f in findings]
    assert first[:5] == ["Qualitative Evaluations", "Finding:", expected[0], "Finding:", expected[1]]
    assert expected[0] == (
        "Left ventricular hypertrophy: detected by the AI model (probability 0.87, threshold 0.50,"
        " 3 videos: 2 parasternal long-axis, 1 apical four-chamber). Not for diagnostic use.")
    assert expected[1].startswith("Severe aortic stenosis: not detected by the AI model (probability 0.13,")
    for line in expected:
        assert _on_first_screen(page, line), line
    # Below: every item named, numbers as they mean, views as words.
    text = "\n".join(lines)
    assert LONG_DECIMAL.findall(text) == []
    assert "Probability:\n0.873 1" in text
    assert "3 {videos}" in text and "3.0 {videos}" not in text
    assert "Acquisition Context: Image View = Parasternal long axis (399139001, SCT)" in text
    # The detail (observer, UIDs) comes after what a reader needs.
    assert text.index(expected[1]) < text.index("Observation Context")


def test_a_study_not_assessed_says_so_first(browser: Any, header: Dataset, tmp_path: Path) -> None:
    tasks = [
        NotAssessed("lvh", "no_required_view", 0.5, "echoclr-lvh", "1.2.0", generate_uid(), {}, ("plax",)),
        NotAssessed("severe_as", "no_required_view", 0.4, "echoclr-severe-as", "0.9.1", generate_uid(), {},
                    ("plax",)),
    ]
    sr = build_report(header, [], not_assessed=tasks, no_usable_video_reason="no video of view plax")
    lines, page = _look(browser, _render(sr, tmp_path, "not_assessed"), tmp_path / "not_assessed.png")
    first = _after_title(lines)
    expected = [not_assessed_line(t) for t in tasks]
    assert first[:5] == ["Qualitative Evaluations", "Finding:", expected[0], "Finding:", expected[1]]
    assert expected[0] == ("Left ventricular hypertrophy: not assessed by the AI model (no parasternal long-axis"
                           " video in the study). Not for diagnostic use.")
    for line in expected:
        assert _on_first_screen(page, line), line
    text = "\n".join(lines)
    assert "Left ventricular hypertrophy:\nUndetermined (373068000, SCT)" in text
    assert "Absent" not in text
