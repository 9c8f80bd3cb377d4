"""Screenshots of the MLflow UI over the project's store, taken by a real headless Chromium.

Starts ``mlflow server`` on a free 127.0.0.1 port over ``mlflow/mlflow.db`` and Debian's
Chromium (``apt-get install -y chromium``) in headless mode, drives it over the DevTools
protocol (``websockets``, already in the venv through uvicorn) and writes, under ``docs/``:

* ``mlflow_runs.png``: the experiment's runs (parent pipeline runs with their stage runs);
* ``mlflow_compare.png``: the compare view of a set of runs (default: the concept ablation's);
* ``mlflow_registered_model.png``: the registered student model, its versions and aliases;
* ``mlflow_model_version.png``: one version: aliases, source run, model card (description).

The UI's assistant side panel is closed first (it remembers that in the browser profile), so
the pages get the whole width. Needs a registered model (run ``lightclip register`` first).

    .venv/bin/python benchmarks/screenshot_mlflow_ui.py [--model lightclip-student] [--version 1] [--compare FILTER]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--window-size=1400,900"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.loads(response.read() or b"null") if "json" in response.headers.get("Content-Type", "") else None
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f}s")


def api(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


class Page:
    """One Chromium tab driven over the DevTools protocol."""

    def __init__(self, ws_url: str) -> None:
        self.ws = connect(ws_url, max_size=64 * 2**20)
        self.next_id = 0

    def send(self, method: str, **params: Any) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def js(self, expression: str) -> Any:
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True).get("result", {}).get("value")

    def open(self, url: str, wait_for: str, timeout: float = 45.0) -> None:
        """Navigate and wait until the page shows ``wait_for`` and the network is quiet."""
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.js(f"document.body && document.body.innerText.includes({json.dumps(wait_for)})"):
                time.sleep(2.5)  # charts and tables finish rendering
                return
            time.sleep(0.3)
        raise TimeoutError(f"{url}: {wait_for!r} did not appear in {timeout:.0f}s")

    def click(self, component_id: str) -> bool:
        """Click the element with this ``data-component-id`` (MLflow's UI names its controls so)."""
        return bool(self.js(f"""(() => {{
            const b = document.querySelector('[data-component-id="{component_id}"]');
            if (b) {{ b.click(); return true; }} return false; }})()"""))

    def close_popups(self) -> None:
        """The assistant side panel and first-visit hints would cover the page."""
        for component in ("mlflow.assistant.chat_panel.close", "mlflow.detect_issues.guidance.got_it"):
            if self.click(component):
                time.sleep(0.8)

    def diff_only(self) -> None:
        """Turn on every "Show diff only" switch of the compare view (rows that differ between runs)."""
        self.js("""(() => {
            for (const label of [...document.querySelectorAll('body *')].filter(e => e.children.length === 0 && e.innerText === 'Show diff only')) {
                const sw = label.closest('label, div')?.querySelector('button[role="switch"], [role="switch"], input[type="checkbox"]')
                    || label.parentElement?.parentElement?.querySelector('button[role="switch"], [role="switch"], input[type="checkbox"]');
                if (sw && sw.getAttribute('aria-checked') !== 'true' && !sw.checked) sw.click();
            } })()""")
        time.sleep(1.0)

    def scroll_to_text(self, text: str) -> None:
        """Scroll the page's scrolling container so that the first element showing ``text`` is at the top."""
        self.js(f"""(() => {{
            const all = [...document.querySelectorAll('body *')].filter(e => e.innerText && e.innerText.trim() === {json.dumps(text)});
            const el = all[all.length - 1];  // the deepest element showing exactly that text
            if (el) el.scrollIntoView({{block: 'start'}}); }})()""")
        time.sleep(1.0)

    def screenshot(self, path: Path, width: int, height: int) -> None:
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        time.sleep(1.0)
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"wrote {display_path(path)} ({width}x{height})")


def display_path(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it, else absolute (``--out`` may be anywhere)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(resolved)


def start_chromium(binary: str, profile: str, width: int = 1400, height: int = 900) -> tuple[subprocess.Popen, Page]:
    """Headless Chromium on a free DevTools port and its first tab, sized ``width`` x ``height``."""
    debug_port = free_port()
    browser = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={debug_port}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{debug_port}/json/version", browser)
        target = next(t for t in wait_http(f"http://127.0.0.1:{debug_port}/json/list", browser) if t["type"] == "page")
        page = Page(target["webSocketDebuggerUrl"])
        page.send("Page.enable")
        page.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
    except BaseException:
        stop(browser)
        raise
    return browser, page


def stop(process: subprocess.Popen | None) -> None:
    """Terminate a process we started; kill it if it outlives 15 s."""
    if process is None:
        return
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lightclip-student")
    parser.add_argument("--version", default="1")
    parser.add_argument("--compare", default="tags.`lightclip.ablation` = 'concepts' and attributes.run_name LIKE 'synthetic-cw%'",
                        help="MLflow search filter of the runs to compare (default: the synthetic concept-ablation runs)")
    parser.add_argument("--experiment", default="lightclip")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="directory for the PNGs, anywhere (default: docs/ of the repository)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args(argv)
    args.out = args.out.expanduser().resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    env = {**os.environ, "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(ROOT / ".venv" / "bin" / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{ROOT / 'mlflow' / 'mlflow.db'}",
                               "--default-artifact-root", (ROOT / "mlflow" / "artifacts").as_uri()],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    profile = tempfile.mkdtemp(prefix="lightclip-chromium-")
    browser = None
    try:
        wait_http(f"{base}/health", server)
        experiment = api(base, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=" + urllib.parse.quote(args.experiment))["experiment"]
        found = api(base, "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [experiment["experiment_id"]], "max_results": 8, "order_by": ["attributes.run_name ASC"],
            "filter": f"{args.compare} and attributes.status = 'FINISHED'"})  # no parentheses in MLflow filters
        runs = [r["info"]["run_id"] for r in found.get("runs", [])]

        browser, page = start_chromium(args.chromium, profile)

        model_url = f"{base}/#/models/{urllib.parse.quote(args.model)}"
        page.open(model_url, args.model)
        page.close_popups()
        exp_id = experiment["experiment_id"]
        compare_url = (f"{base}/#/compare-runs?runs={urllib.parse.quote(json.dumps(runs))}"
                       f"&experiments={urllib.parse.quote(json.dumps([exp_id]))}")
        shots = [  # file, url, text to wait for, text to scroll to, width, height
            ("mlflow_runs.png", f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning", "Run Name", None, 1400, 900),
            ("mlflow_compare.png", compare_url, "Parameters", "Parameters", 1400, 1000),
            ("mlflow_registered_model.png", model_url, "Versions", None, 1400, 800),
            ("mlflow_model_version.png", f"{model_url}/versions/{args.version}", "Promotion gate", None, 1400, 1250),
        ]
        for name, url, wait_for, scroll_to, width, height in shots:
            page.open(url, wait_for)
            page.close_popups()
            if scroll_to:
                page.diff_only()
                page.scroll_to_text(scroll_to)
            page.screenshot(args.out / name, width, height)
    finally:
        stop(browser)
        stop(server)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
