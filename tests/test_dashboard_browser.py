"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright) against a real server.

Screenshots land in the test's tmp dir (``screenshots/``). Where no browser is installed the test skips with the
reason, except under ``SKILLGRAFT_REQUIRE_BROWSER=1`` (set by ``.ci/run``), where it fails.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.grafting.base import BaseModel
from app.grafting.patch import save_patch
from tests.utils.processes import Processes
from tests.utils.tiny import make_patch

CHROMIUM = Path(os.environ.get("SKILLGRAFT_CHROMIUM", "/usr/bin/chromium"))
REQUIRE_BROWSER = os.environ.get("SKILLGRAFT_REQUIRE_BROWSER") == "1"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _browser_or_skip() -> None:
    problem = None
    if not CHROMIUM.is_file():
        problem = f"{CHROMIUM} not found: apt-get install -y chromium"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "playwright is not installed: pip install -e '.[dev]'"
    if problem:
        if REQUIRE_BROWSER:
            pytest.fail(f"browser test required (SKILLGRAFT_REQUIRE_BROWSER=1) but {problem}")
        pytest.skip(problem)


@pytest.fixture
def server(tmp_path: Path, tiny_base_dir: Path, tiny_base: BaseModel) -> Iterator[str]:
    store = tmp_path / "store"
    save_patch(make_patch(tiny_base, task="films", fraction=0.05, seed=1), store / "tasks/films/patch.safetensors")
    save_patch(make_patch(tiny_base, task="reviews", fraction=0.05, seed=3), store / "tasks/reviews/patch.safetensors")
    procs = Processes(
        {
            "SKILLGRAFT_STORE_DIR": str(store),
            "SKILLGRAFT_BASE_MODEL": str(tiny_base_dir),
            "SKILLGRAFT_MAX_BATCH_WAIT_MS": "1",
        },
        tmp_path,
    )
    try:
        yield procs.server()
    finally:
        procs.stop_all()


def stitch(server: str, name: str) -> dict:
    response = httpx.post(server + "/v1/stitch", json={"name": name, "tasks": ["films", "reviews"]}, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()


def follow(server: str, url: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(server + url, timeout=10).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            assert job["state"] == "succeeded", job
            return job
        time.sleep(0.2)
    raise AssertionError(f"job not finished after {timeout}s")


@pytest.mark.slow
def test_dashboard_lists_classifies_and_follows_a_job(server: str, tmp_path: Path) -> None:
    _browser_or_skip()
    from playwright.sync_api import expect, sync_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir()
    first = stitch(server, "both")
    follow(server, first["url"])  # its members are tasks by the time the page loads
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(server + "/")
            expect(page.locator('#tasks-table tr[data-task="films"]')).to_be_visible(timeout=20_000)
            page.screenshot(path=str(shots / "1-tasks.png"), full_page=True)

            expect(page.locator(f'#jobs-table tr[data-job="{first["id"]}"] .job-state')).to_have_text("succeeded")
            # a job submitted while the page is open appears by polling; its bar fills as it finishes
            job = stitch(server, "again")
            row = page.locator(f'#jobs-table tr[data-job="{job["id"]}"]')
            expect(row.locator(".job-state")).to_have_text("succeeded", timeout=60_000)
            expect(row.locator(".bar")).to_have_attribute("data-progress", "1.000")
            page.screenshot(path=str(shots / "2-job.png"), full_page=True)

            page.locator("#classify-text").fill("a gripping, beautiful film\ndull and far too long")
            page.locator("#classify-run").click()
            expect(page.locator("#classify-result tr.prediction")).to_have_count(2, timeout=20_000)
            assert page.locator("#classify-result tr.prediction td").nth(1).inner_text().split()[0] in (
                "negative",
                "positive",
            )
            page.screenshot(path=str(shots / "3-classify.png"), full_page=True)

            page.locator("#overlap-run").click()
            expect(page.locator("#overlap-plot svg rect")).to_have_count(
                4 * 4, timeout=20_000
            )  # films, reviews, both.films, both.reviews

            page.goto(server + "/#task=films")
            expect(page.locator("#task-plots figure svg").first).to_be_visible(timeout=20_000)
            page.screenshot(path=str(shots / "4-task.png"), full_page=True)
        finally:
            browser.close()
    assert len(list(shots.glob("*.png"))) == 4
    # keep a copy where a developer finds it after the run (git-ignored)
    keep = os.environ.get("SKILLGRAFT_SCREENSHOTS")
    if keep:
        shutil.copytree(shots, keep, dirs_exist_ok=True)
