"""benchmarks/screenshot_mlflow_ui.py: screenshots land wherever ``--out`` says, inside the repository or not.

The script crashed after writing its first PNG when ``--out`` lay outside the repository (it
printed the path relative to the repository). Checked with the script's own browser driver on a
real headless Chromium, writing into a temp dir outside the repository.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from conftest import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]


def screenshot_script():
    return load_script("benchmarks/screenshot_mlflow_ui.py", "screenshot_mlflow_ui")


def test_paths_are_shown_relative_to_the_repository_only_when_inside_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    script = screenshot_script()
    assert not tmp_path.resolve().is_relative_to(REPO_ROOT)
    assert script.display_path(tmp_path / "shots" / "a.png") == str(tmp_path.resolve() / "shots" / "a.png")
    assert script.display_path(REPO_ROOT / "docs" / "a.png") == "docs/a.png"
    monkeypatch.chdir(REPO_ROOT)
    assert script.display_path(Path("docs") / "a.png") == "docs/a.png"  # a relative --out inside the repository


def test_a_screenshot_into_a_directory_outside_the_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    binary = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if binary is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("chromium is not installed and cannot be installed here (`make install` installs it with apt-get, which needs root on Debian)")
        pytest.fail("chromium is not installed: run `make install` (it runs `apt-get install -y chromium` as root)")
    script = screenshot_script()
    page_file = tmp_path / "page.html"
    page_file.write_text("<html><body><h1>lightclip screenshot check</h1></body></html>")
    out = tmp_path / "outside" / "shots"
    out.mkdir(parents=True)
    browser, page = script.start_chromium(binary, str(tmp_path / "profile"))
    try:
        page.open(page_file.as_uri(), "lightclip screenshot check", timeout=30)
        page.screenshot(out / "page.png", 640, 360)
    finally:
        script.stop(browser)
    assert browser.poll() is not None
    with Image.open(out / "page.png") as image:
        assert image.size == (640, 360)
    assert f"wrote {out.resolve() / 'page.png'} (640x360)" in capsys.readouterr().out
