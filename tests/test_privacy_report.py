"""The compliance report, opened in a real browser (Debian's Chromium, headless)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from ledger_factory import write_client, write_server

from common.run_files import CLIENT_LEDGER
from privacy import report

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def run_dir(tmp_path):
    keys = tmp_path / "keys"
    ledgers = [write_client(tmp_path / "clients", keys, n) for n in ("north", "south")]
    write_server(tmp_path, keys, ledgers)
    return tmp_path


def open_in_chromium(path):
    """Load the page; return (console errors and failed or outside requests, page texts, sizes)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("FEDSHOP_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (make test installs Debian's package)")
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
        page.on(
            "request",
            lambda r: None if r.url.startswith("file://") else problems.append(f"fetch {r.url}"),
        )
        page.goto(path.as_uri(), wait_until="load")
        summary = page.text_content(".summary")
        headings = page.locator("h2").all_text_contents()
        sizes = [page.locator("figure svg").nth(i).bounding_box() for i in range(3)]
        count = page.locator("figure svg").count()
        browser.close()
    return problems, summary, headings, sizes, count


def test_report_loads_without_errors_and_shows_the_plots(run_dir):
    result = report.write(run_dir, keys=run_dir / "keys")
    assert result["verified"]
    problems, summary, headings, sizes, count = open_in_chromium(run_dir / "privacy_report.html")
    assert problems == []
    assert "all 3 ledgers verified against pinned keys" in summary
    assert "user-level" in summary
    assert count == 3  # overview plus one per client
    assert all(box and box["width"] > 300 and box["height"] > 150 for box in sizes)
    assert any(h.startswith("north") and "verified" in h for h in headings)
    data = json.loads((run_dir / "privacy_report.json").read_text())
    north = next(c for c in data["clients"] if c["client"] == "north")
    assert north["declined_rounds"] == [3]
    assert north["remaining_epsilon"] == pytest.approx(3.0 - north["spent_epsilon"])
    assert [r["status"] for r in north["rounds"]] == ["trained", "trained", "declined"]


def test_report_of_a_tampered_ledger_says_so(run_dir):
    ledger = run_dir / "clients" / "north" / CLIENT_LEDGER
    ledger.write_text(ledger.read_text().replace('"steps": 20', '"steps": 2', 1))
    result = report.write(run_dir, keys=run_dir / "keys")
    assert not result["verified"]
    html = (run_dir / "privacy_report.html").read_text()
    assert "verification FAILED" in html and "entry altered" in html
