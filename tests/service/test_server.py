"""`lightclip serve` as a real process: registry reference (production unset: staging, with a
warning), every endpoint answering over loopback, /metrics scraped, stopped by its PID. And
benchmarks/loadtest.py at tiny size against two tiny models."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from lightclip.cli import main as cli_main
from lightclip.processes import stop_process_group

from conftest import load_script

from .conftest import STUDENT, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_loadtest():
    return load_script("benchmarks/loadtest.py", "lightclip_loadtest")


def write_params(root: Path, assets: Path, **serve) -> None:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["serve"].update(catalogue=str(assets / "catalogue"), index="models/index", threads=1, k_default=4, **serve)
    params["index"].update(batch_size=16, threads=1)
    params["evaluate"]["models"] = {"teacher": str(assets / "models" / "a"), "xt": str(assets / "models" / "b")}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_lightclip_serve_answers_every_endpoint_and_stops_on_sigterm(serve_project, svc_assets):
    project = serve_project
    project.set_alias("staging", "2")  # production unset: the default reference falls back to staging
    write_params(project.root, svc_assets, poll_seconds=0.5)
    script = load_loadtest()
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": project.uri}
    log_path = project.root / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(Path(sys.executable).with_name("lightclip")), "--project", str(project.root), "serve", "--port", str(port)],
                                   cwd=project.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        ready = script.wait_ready(url, process, 120, log_path)
        assert ready["model"]["version"] == "2" and ready["model"]["alias"] == "staging"
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/healthz").json() == {"status": "ok"}
            found = http.get("/search", params={"q": "blue shoes"}).json()
            assert found["count"] == 4 and found["model"]["label"] == f"{STUDENT} v2 (@staging)"
            item = found["results"][0]["id"]
            assert http.get(f"/similar/{item}").json()["count"] == 4
            image = http.get(f"/images/{item}")
            assert image.status_code == 200 and image.headers["content-type"].startswith("image/")
            assert http.post("/search/image", files={"image": ("i.png", image.content, "image/png")}).json()["results"][0]["id"] == item
            assert http.get("/facets").json()["filters"]["gender"]
            assert http.get("/").status_code == 200 and http.get("/docs").status_code == 200
            assert http.get("/search", params={"q": "x", "k": 0}).json()["error"]["field"] == "k"
            metrics = http.get("/metrics").text
        assert 'lightclip_requests_total{endpoint="/search",method="GET",status="200"} 1.0' in metrics
        assert 'lightclip_request_seconds_bucket{endpoint="/similar/{item_id}",le="+Inf"} 1.0' in metrics
        assert f'version="2",weights_sha256="' in metrics and "lightclip_index_items 24.0" in metrics
        project.set_alias("production", "1")  # promoted: the poller prefers production now
        script_deadline = time.monotonic() + 60
        while httpx.get(f"{url}/readyz").json()["model"]["version"] != "1":
            assert time.monotonic() < script_deadline, "no swap to @production within 60 s"
            time.sleep(0.2)
    finally:
        stop_process_group(process, grace_s=15.0)
    assert process.returncode is not None
    log = log_path.read_text(errors="replace")
    assert "@production is not set; serving @staging (v2)" in log and "hot swap: now serving" in log
    assert "Traceback" not in log


def test_a_missing_alias_stops_serve_with_one_line(serve_project, svc_assets, monkeypatch, capsys):
    project = serve_project
    write_params(project.root, svc_assets)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", project.uri)
    assert cli_main(["--project", str(project.root), "serve", "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert "lightclip serve: error: lightclip-student: alias @production is not set and neither is @staging" in err


def test_the_load_test_writes_qps_and_percentiles_per_model_and_concurrency(serve_project, svc_assets):
    project = serve_project
    write_params(project.root, svc_assets)
    script = load_loadtest()
    assert script.main(["--project", str(project.root), "--requests", "6", "--concurrency", "1", "3", "--warmup", "2", "--queries", "5",
                        "--gallery", "30", "--ready-timeout", "120"]) == 0
    report = json.loads((project.root / "metrics" / "serve.json").read_text())
    assert list(report["models"]) == ["teacher", "xt"] and report["requests_per_level"] == 6
    assert report["catalogue_items"] == 30  # the rendered gallery, not the project's own 24-item catalogue
    for entry in report["models"].values():
        assert entry["served"]["index_items"] == 30
        assert [r["concurrency"] for r in entry["runs"]] == [1, 3]
        for run in [*entry["runs"], entry["ceiling"]]:
            assert run["errors"] == 0 and run["requests"] == 6 and run["qps"] > 0
            assert 0 < run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
        assert entry["ceiling"]["concurrency"] == 3
        for run in entry["runs"]:  # from the server's /metrics, the level's own searches only (not its warm-up)
            work = run["model_work"]
            assert work["queries"] == 6 and 1 <= work["mean_batch"] <= run["concurrency"] and work["ms_per_query"] > 0
    summary = report["summary"]
    assert summary["teacher"] == "teacher" and summary["errors"] == 0
    student = summary["students"]["xt"]
    assert student["ceiling_vs_teacher"] == round(report["models"]["xt"]["ceiling"]["qps"] / summary["teacher_qps"], 2)
    assert "| teacher | 3 | 6 |" in report["table"] and "| xt: /healthz (ceiling) | 3 | 6 |" in report["table"]


def test_the_load_test_client_counts_refusals_and_broken_connections_as_errors():
    """A 4xx/5xx, a search without results and a connection the server drops are errors, never successes."""
    script = load_loadtest()
    calls = {"n": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            calls["n"] += 1
            n = calls["n"]
            if n % 4 == 0:  # dropped mid-request
                writer.close()
                return
            status, body = (200, b'{"results": [1]}') if n % 4 == 1 else (200, b'{"results": []}') if n % 4 == 2 else (503, b"{}")
            writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))
            await writer.drain()
        writer.close()

    async def scenario() -> dict:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await script.run_load(f"http://127.0.0.1:{port}", ["q"], 8, 1)

    run = asyncio.run(scenario())
    assert run["requests"] == 8 and run["errors"] == 6
    assert run["error_kinds"] == {"no results": 2, "http 503": 2, "IncompleteReadError": 2}


def test_the_model_leaves_the_event_loop_a_core(monkeypatch):
    from lightclip.config import ServeConfig
    from lightclip.service import server

    for usable, expected in ((1, 1), (2, 1), (16, 15)):
        monkeypatch.setattr(server, "default_threads", lambda usable=usable: usable)
        assert server.model_threads(ServeConfig()) == expected
    assert server.model_threads(ServeConfig(threads=3)) == 3  # a setting wins


def test_the_loaded_heap_is_out_of_the_collectors_sight():
    """A full collection after start-up walks only what requests create, not the ~0.5 M objects
    of the libraries and the model (a 100-300 ms pause every request in flight would wait out)."""
    import gc

    from lightclip.service.server import freeze_heap

    tracked = len(gc.get_objects())
    try:
        freeze_heap()
        assert gc.get_freeze_count() >= tracked // 2 and len(gc.get_objects()) < tracked // 10
    finally:
        gc.unfreeze()
