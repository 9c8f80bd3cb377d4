"""A screenshot of the storefront page of a running `lightclip serve`, by a real headless Chromium.

Debian's Chromium (``apt-get install -y chromium``) driven by Playwright (a test extra): opens
the page, types the query, waits for the grid and its images, writes a PNG (default
``docs/storefront.png``, for the README).

    lightclip serve &                                  # the default pipeline's output, @production or @staging
    .venv/bin/python benchmarks/screenshot_storefront.py --query "red floral dress"
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8765", help="the running service (default: serve.port on loopback)")
    parser.add_argument("--query", default="red floral dress", help="what to type into the search box")
    parser.add_argument("--out", default="docs/storefront.png", help="the PNG to write (default: docs/storefront.png)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args(argv)
    binary = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(binary).exists():
        print("chromium is not installed: apt-get install -y chromium", file=sys.stderr)
        return 1
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=binary, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(args.url.rstrip("/") + "/")
            page.fill("#q", args.query)
            page.click("#search-button")
            page.wait_for_selector("body[data-state=results]", timeout=60_000)
            page.wait_for_function("Array.from(document.querySelectorAll('#results img')).every(i => i.complete)", timeout=60_000)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out)
        finally:
            browser.close()
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
