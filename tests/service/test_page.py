"""The storefront page in a real headless Chromium (Debian's, driven by Playwright): type a
query, wait for the grid, upload an image, click "more like this"."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def chromium_binary() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if not found:
        pytest.skip("chromium is not installed (`make install` installs it with apt-get, as root on Debian)")
    return found


def test_search_upload_and_more_like_this_in_a_real_browser(local_state, serve_app, svc_assets, served_a, tmp_path):
    binary = chromium_binary()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra: pip install -e '.[test]'")
    server = serve_app(local_state)
    upload = svc_assets / "catalogue" / served_a.rows.items["image"].iloc[5]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=binary, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(server.url + "/")
            page.wait_for_function("document.querySelector('#filter-baseColour').options.length > 1", timeout=15_000)
            page.fill("#q", served_a.index.titles[3])
            page.click("#search-button")
            page.wait_for_selector("body[data-state=results]", timeout=15_000)
            cards = page.locator("#results .card")
            assert cards.count() == 5  # k_default of the test service
            assert page.locator("#results .card").first.get_attribute("data-id") in served_a.index.ids
            page.wait_for_function("Array.from(document.querySelectorAll('#results img')).every(i => i.complete && i.naturalWidth > 0)",
                                   timeout=15_000)
            scores = page.locator("#results .card .score").all_inner_texts()
            assert len(scores) == 5 and all(s.startswith("score ") for s in scores)
            status = page.inner_text("#status")
            assert "5 results for" in status and "ms" in status and served_a.label in status
            assert page.inner_text("#model-version") == served_a.label
            page.screenshot(path=str(tmp_path / "search.png"))

            page.evaluate("document.body.dataset.state = 'waiting'")
            page.set_input_files("#upload", str(upload))
            page.wait_for_selector("body[data-state=results]", timeout=15_000)
            assert f"image {upload.name}" in page.inner_text("#status")
            assert cards.first.get_attribute("data-id") == served_a.index.ids[5]  # its own image first

            first_title = page.locator("#results .card .title").first.inner_text()
            page.evaluate("document.body.dataset.state = 'waiting'")
            page.locator("#results .card button.more").first.click()
            page.wait_for_selector("body[data-state=results]", timeout=15_000)
            assert f'more like "{first_title}"' in page.inner_text("#status")
            assert served_a.index.ids[5] not in [cards.nth(i).get_attribute("data-id") for i in range(cards.count())]

            page.fill("#q", "")
            page.click("#search-button")
            assert page.inner_text("#error").startswith("q:")
            assert not errors, errors
            assert requested and all(url.startswith(server.url + "/") for url in requested), "the page must load nothing from elsewhere"
        finally:
            browser.close()
