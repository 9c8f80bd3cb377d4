"""Hot swap: the alias moves, the service loads the new version and its index in the background,
swaps atomically, and no request fails or mixes versions meanwhile."""

from __future__ import annotations

import threading
import time

import httpx
from fastapi.testclient import TestClient

from lightclip.models.zoo import weights_sha256
from lightclip.registry.aliases import TAG_WEIGHTS
from lightclip.service import create_app

from .conftest import STUDENT


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_zero_failed_requests_across_a_hot_swap_under_concurrent_load(serve_project, serve_app, svc_assets):
    project = serve_project
    project.set_alias("production", "1")
    state = project.state(poll_seconds=0.2)
    server = serve_app(state)  # the app first: its metrics hear of every model installed
    state.load_initial()
    state.start_polling()
    sha = {"1": weights_sha256(svc_assets / "models" / "a"), "2": weights_sha256(svc_assets / "models" / "b")}
    item = state.current.index.ids[0]
    stop = threading.Event()
    seen: list[list[tuple[int, str | None, str | None]]] = [[] for _ in range(8)]
    finished: list[tuple[float, str | None]] = []  # (when, version) of every answer

    def client(slot: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    r = http.get(f"/similar/{item}") if i % 3 == 0 else http.get("/search", params={"q": f"blue shoes {slot} {i}", "k": 5})
                    body = r.json()
                    seen[slot].append((r.status_code, r.headers.get("x-model-version"), body.get("model", {}).get("weights_sha256")))
                    finished.append((time.monotonic(), r.headers.get("x-model-version")))
                except Exception as exc:  # a refused connection or a broken response is a failed request too
                    seen[slot].append((0, None, repr(exc)))

    threads = [threading.Thread(target=client, args=(slot,)) for slot in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: sum(len(s) for s in seen) >= 40, what="40 requests on v1")
        moved = time.monotonic()
        project.set_alias("production", "2")  # what `lightclip registry promote` / `rollback` does to the alias
        wait_for(lambda: httpx.get(f"{server.url}/readyz").json()["model"]["version"] == "2", what="the swap to v2")
        after = sum(len(s) for s in seen)
        wait_for(lambda: sum(len(s) for s in seen) >= after + 40, what="40 requests on v2")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        state.stop()
    responses = [r for s in seen for r in s]
    failed = [r for r in responses if r[0] != 200]
    assert not failed, f"{len(failed)} of {len(responses)} requests failed across the swap, e.g. {failed[:3]}"
    assert all(sha[version] == weights for _, version, weights in responses)  # each answer from one version, model and index alike
    for slot in seen:  # once a client got v2 it never got v1 again
        versions = [v for _, v, _ in slot]
        assert versions == sorted(versions), versions
    assert {v for _, v, _ in responses} == {"1", "2"}
    served_while_loading = [v for when, v in finished if when > moved and v == "1"]
    assert served_while_loading, "no request was answered by v1 while v2 loaded in the background"
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["last_swap"] == {"to": "2", "from": "1", "ok": True, "error": None}
    metrics = httpx.get(f"{server.url}/metrics").text
    assert f'lightclip_model_info{{label="{STUDENT} v2 (@production)",version="2",weights_sha256="{sha["2"]}"}} 1.0' in metrics
    assert 'version="1"' not in metrics and "lightclip_model_swaps_total 1.0" in metrics


def test_requests_holding_the_old_version_finish_on_it_after_the_swap(serve_project):
    project = serve_project
    project.set_alias("production", "1")
    state = project.state()
    old = state.load_initial()
    project.set_alias("production", "2")
    assert state.check_alias() is True and state.current.version == "2"
    vector = old.embed_texts(["red dress"])  # a request that took v1 before the swap goes on with v1's model and index
    outcome = old.search(vector, 5)
    assert old.agree() and len(outcome.hits) == 5 and old.version == "1"
    assert state.check_alias() is False  # nothing moved: no reload


def test_a_version_that_fails_to_load_is_not_served_and_not_retried(serve_project, svc_assets, caplog):
    project = serve_project
    project.set_alias("production", "1")
    state = project.state()
    state.load_initial()
    project.registry().client.set_model_version_tag(STUDENT, "2", TAG_WEIGHTS, "f" * 64)  # its weights will not match
    project.set_alias("production", "2")
    assert state.check_alias() is False and state.current.version == "1"
    assert state.swaps[-1].ok is False and "refusing to serve" in state.swaps[-1].error
    attempts = len(state.swaps)
    assert state.check_alias() is False and len(state.swaps) == attempts  # the same broken version: not retried
    with TestClient(create_app(state)) as client:
        body = client.get("/readyz").json()
    assert body["ready"] is True and body["model"]["version"] == "1" and body["last_swap"]["ok"] is False
