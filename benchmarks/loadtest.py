"""Load test of `lightclip serve` on loopback: QPS and latency percentiles per model and concurrency.

For each model (default: evaluate.models, i.e. teacher, xt, xxt) this starts `lightclip serve
--model DIR` on a free 127.0.0.1 port over a gallery of ``--gallery`` products (default 10,000,
rendered once by the embedded default's generator with its seed: the default catalogue's items
and more; ``--gallery 0`` serves serve.catalogue), waits for /readyz (the index of the model's
own weights is built or taken from the cache first), warms up, then sends a fixed number of `GET
/search` requests (catalogue titles as queries, k=10) at each concurrency (default 1, 8, 32) and
stops the server by its PID. Last, `GET /healthz` at the top concurrency: the same server, client
and connections doing no work, the ceiling no model's /search can pass. Written to
metrics/serve.json: per model and concurrency QPS, p50/p95/p99 latency (client side, ms), errors;
the ceiling; and a summary against the issue's goals (a student at concurrency 32: p95 <= 50 ms
and >= 5x the teacher's QPS; 0 errors), with the highest ratio the ceiling allows.

The client is a keep-alive HTTP/1.1 client on asyncio streams, one connection per concurrent
worker, opened before the clock starts. It shares the 2 cores with the server, so it has to be
cheap: httpx's pooled client cost more CPU per request than the server's /healthz and, at
concurrency 32, starved some connections for hundreds of milliseconds (a p95 four times the
median that was the client's, not the service's). Run it alone (under the CPU lock):

    flock /tmp/lightclip-cpu.lock .venv/bin/python benchmarks/loadtest.py --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlencode, urlsplit

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from lightclip.config import SynthConfig, load_params
from lightclip.data.catalogue import CATALOGUE_FILE, Catalogue
from lightclip.data.synth import SYNTH_VERSION, generate_catalogue
from lightclip.io import usable_cpus, write_json
from lightclip.processes import stop_process_group

FORMAT = "lightclip-loadtest/2"
GOAL_P95_MS = 50.0
GOAL_QPS_RATIO = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(project: Path, model: str, port: int, log_path: Path, extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """`lightclip serve` for ``model`` in its own process group (stopped by :func:`lightclip.processes.stop_process_group`)."""
    command = [str(Path(sys.executable).with_name("lightclip")), "--project", str(project), "serve", "--model", model, "--port", str(port), *extra]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, cwd=project, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float, log_path: Path) -> dict[str, Any]:
    """The /readyz body once the server is ready; an error with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            response = httpx.get(f"{url}/readyz", timeout=2)
            if response.status_code == 200:
                return response.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready after {timeout:.0f}s:\n{log_path.read_text(errors='replace')[-3000:]}")


class Connection:
    """One keep-alive HTTP/1.1 connection: a GET and its whole answer, nothing else (the client must stay cheap)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> "Connection":
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        return cls(reader, writer, parts.netloc)

    async def get(self, target: str) -> tuple[int, bytes, bool]:
        """(status, body, whether the server keeps the connection open) of ``GET target``."""
        self.writer.write(f"GET {target} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        headers = {name.strip().lower(): value.strip() for name, value in headers.items()}
        if "content-length" not in headers:
            raise ValueError(f"answer without Content-Length (status {status})")
        body = await self.reader.readexactly(int(headers["content-length"]))
        return status, body, headers.get("connection", "").lower() != "close"

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


def failure(path: str, status: int, body: bytes) -> str | None:
    """What is wrong with an answer (None: a success, i.e. 200 and, for a search, at least one result)."""
    if status != 200:
        return f"http {status}"
    return "no results" if path == "/search" and not json.loads(body)["results"] else None


async def run_load(url: str, queries: Sequence[str], requests: int, concurrency: int, k: int = 10, path: str = "/search") -> dict[str, Any]:
    """``requests`` GET ``path`` calls (``/search``: each with a query of ``queries`` and ``k``) from
    ``concurrency`` workers, each on its own keep-alive connection; QPS, latency percentiles (ms), errors."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(requests))
    connections = await asyncio.gather(*(Connection.open(url) for _ in range(concurrency)))

    async def worker(connection: Connection) -> None:
        for i in counter:
            target = f"{path}?{urlencode({'q': queries[i % len(queries)], 'k': k})}" if path == "/search" else path
            started = time.perf_counter()
            key = None
            try:
                status, body, keep = await connection.get(target)
                key = failure(path, status, body)
                if not keep:
                    await connection.close()
                    connection = await Connection.open(url)
            except (OSError, asyncio.IncompleteReadError, ValueError, KeyError) as exc:
                key = type(exc).__name__
                await connection.close()
                connection = await Connection.open(url)
            latencies.append(time.perf_counter() - started)
            if key is not None:
                errors[key] = errors.get(key, 0) + 1
        await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    seconds = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {"concurrency": concurrency, "requests": requests, "errors": sum(errors.values()), "error_kinds": errors,
            "seconds": round(seconds, 3), "qps": round(requests / seconds, 2), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p95_ms": round(float(np.percentile(ms, 95)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def model_work(metrics_text: str, since: dict[str, float] | None = None) -> dict[str, float]:
    """From the service's /metrics: text queries and batches served, the model's seconds on them
    (encoder pass and index search, per batch), its time per query and the mean batch size; with
    ``since`` (an earlier reading), only what was served after it."""
    values = {sample.name: sample.value for family in text_string_to_metric_families(metrics_text) for sample in family.samples}
    queries = values.get("lightclip_text_batch_size_sum", 0.0) - (since or {}).get("queries", 0)
    batches = values.get("lightclip_text_batch_size_count", 0.0) - (since or {}).get("batches", 0)
    seconds = values.get("lightclip_text_batch_seconds_sum", 0.0) - (since or {}).get("seconds", 0.0)
    return {"queries": int(queries), "batches": int(batches), "seconds": round(seconds, 6),
            "ms_per_query": round(1000 * seconds / queries, 4) if queries else float("nan"),
            "mean_batch": round(queries / batches, 2) if batches else float("nan")}


def gallery_catalogue(project: Path, config: SynthConfig, items: int) -> Path:
    """A catalogue of ``items`` products rendered by the default's generator with ``config``'s seed
    and image size (its first products are the default catalogue's), made once under .cache/loadtest."""
    out = project / ".cache" / "loadtest" / f"gallery-v{SYNTH_VERSION}-seed{config.seed}-{config.image_size}px-{items}"
    if not (out / CATALOGUE_FILE).is_file():
        generate_catalogue(out, config.model_copy(update={"n_items": items}))
    return out


def measure_model(project: Path, name: str, model: str, queries: Sequence[str], *, requests: int, concurrencies: Sequence[int], warmup: int,
                  ready_timeout: float, extra: Sequence[str]) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = project / ".cache" / "loadtest" / f"{name}.log"
    started = time.perf_counter()
    process = start_server(project, model, port, log_path, extra)
    try:
        ready = wait_ready(url, process, ready_timeout, log_path)
        startup = time.perf_counter() - started
        runs = []
        for concurrency in concurrencies:
            if warmup:  # untimed, at this level's concurrency: new batch sizes and connections are not what is measured
                asyncio.run(run_load(url, queries, warmup, min(concurrency, warmup)))
            before = model_work(httpx.get(f"{url}/metrics", timeout=10).text)
            run = asyncio.run(run_load(url, queries, requests, concurrency))
            run["model_work"] = work = model_work(httpx.get(f"{url}/metrics", timeout=10).text, since=before)
            print(f"{name:>8}  c={concurrency:<3} {run['qps']:9.1f} qps  p50 {run['p50_ms']:8.2f}  p95 {run['p95_ms']:8.2f}  "
                  f"p99 {run['p99_ms']:8.2f} ms  errors {run['errors']}  model work {work['ms_per_query']:.3f} ms/query, "
                  f"batches of {work['mean_batch']:.1f}", flush=True)
            runs.append(run)
        ceiling = asyncio.run(run_load(url, queries, requests, max(concurrencies), path="/healthz"))
        print(f"{name:>8}  c={ceiling['concurrency']:<3} {ceiling['qps']:9.1f} qps on /healthz (the ceiling)  p95 {ceiling['p95_ms']:8.2f} ms  "
              f"errors {ceiling['errors']}", flush=True)
    finally:
        stop_process_group(process, grace_s=15.0)
    return {"model": model, "served": ready["model"], "startup_seconds": round(startup, 2), "runs": runs, "ceiling": ceiling}


def free_model_ratio(qps: float, model_ms_per_query: float, teacher_qps: float) -> float:
    """The QPS ratio to the teacher of this service if its model's work per query cost nothing
    (the request's time at this load less the model's share of it): what a faster student could still gain."""
    rest_ms = 1000 / qps - model_ms_per_query
    return round((1000 / teacher_qps) / rest_ms, 2) if rest_ms > 0 and teacher_qps else float("nan")


def summarise(report: dict[str, dict[str, Any]], teacher: str) -> dict[str, Any]:
    """The issue's goals at the highest concurrency measured, per student."""
    if teacher not in report:
        return {"teacher": None}
    top = max(r["concurrency"] for r in report[teacher]["runs"])
    teacher_qps = next(r["qps"] for r in report[teacher]["runs"] if r["concurrency"] == top)
    students = {}
    for name, entry in report.items():
        if name == teacher:
            continue
        run = next(r for r in entry["runs"] if r["concurrency"] == top)
        ratio = run["qps"] / teacher_qps if teacher_qps else float("nan")
        bound = entry["ceiling"]["qps"] / teacher_qps if teacher_qps else float("nan")
        students[name] = {"concurrency": top, "p95_ms": run["p95_ms"], "qps_vs_teacher": round(ratio, 2),
                          "p95_goal_met": run["p95_ms"] <= GOAL_P95_MS, "qps_goal_met": ratio >= GOAL_QPS_RATIO,
                          # /search does all /healthz does and more: no model can answer it faster than this
                          "ceiling_qps": entry["ceiling"]["qps"], "ceiling_vs_teacher": round(bound, 2),
                          # an estimate: this service's time per request less its model's share, i.e. a student whose model cost nothing
                          "free_model_vs_teacher": free_model_ratio(run["qps"], run["model_work"]["ms_per_query"], teacher_qps)}
    errors = sum(r["errors"] for entry in report.values() for r in [*entry["runs"], entry["ceiling"]])
    return {"teacher": teacher, "teacher_qps": teacher_qps, "students": students, "errors": errors,
            "goals": {"p95_ms": GOAL_P95_MS, "qps_vs_teacher": GOAL_QPS_RATIO, "errors": 0}}


def table(report: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | concurrency | requests | QPS | p50 ms | p95 ms | p99 ms | errors |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, entry in report.items():
        for label, r in [*((name, r) for r in entry["runs"]), (f"{name}: /healthz (ceiling)", entry["ceiling"])]:
            lines.append(f"| {label} | {r['concurrency']} | {r['requests']} | {r['qps']:.1f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['errors']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=".", help="the lightclip project (params.yaml, models, catalogue); default: .")
    parser.add_argument("--model", action="append", metavar="NAME=DIR", help="a model to serve (repeatable; default: evaluate.models)")
    parser.add_argument("--teacher", default="teacher", help="the model students are compared with (default: teacher)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per concurrency level (default 2000)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels (default: 1 8 32)")
    parser.add_argument("--warmup", type=int, default=100, help="untimed requests before each concurrency level (default 100)")
    parser.add_argument("--queries", type=int, default=500, help="distinct catalogue titles used as queries (default 500)")
    parser.add_argument("--gallery", type=int, default=10000,
                        help="products served: a catalogue of this many rendered by the default's generator (default 10000); 0 = serve.catalogue")
    parser.add_argument("--catalogue", help="a catalogue to serve instead (overrides --gallery)")
    parser.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds to wait for each server (index build included)")
    parser.add_argument("--out", default="metrics/serve.json", help="report (default: metrics/serve.json, relative to --project)")
    args = parser.parse_args(argv)

    project = Path(args.project).resolve()
    params = load_params(project / "params.yaml")
    models = dict(m.split("=", 1) for m in args.model) if args.model else dict(params.evaluate.models or {})
    if args.catalogue:
        catalogue_dir = Path(args.catalogue)
    elif args.gallery > 0:
        catalogue_dir = gallery_catalogue(project, params.synth, args.gallery)
    else:
        catalogue_dir = Path(params.serve.catalogue)
    catalogue = Catalogue.load(catalogue_dir if catalogue_dir.is_absolute() else project / catalogue_dir)
    titles = [str(t) for t in catalogue.items["title"]]
    queries = [titles[i] for i in np.linspace(0, len(titles) - 1, min(args.queries, len(titles))).round().astype(int)]
    extra = ["--catalogue", str(catalogue.root)] if args.catalogue or args.gallery > 0 else []

    report = {name: measure_model(project, name, model, queries, requests=args.requests, concurrencies=args.concurrency,
                                  warmup=args.warmup, ready_timeout=args.ready_timeout, extra=extra)
              for name, model in models.items()}
    payload = {"format": FORMAT, "endpoint": "GET /search (k=10, catalogue titles)", "requests_per_level": args.requests,
               "concurrency": args.concurrency, "catalogue": str(catalogue.root), "catalogue_items": len(catalogue),
               "client": "keep-alive HTTP/1.1 on asyncio streams, one connection per worker, in this process", "cpus": usable_cpus().describe(),
               "models": report, "summary": summarise(report, args.teacher), "table": table(report)}
    out = Path(args.out) if Path(args.out).is_absolute() else project / args.out
    write_json(out, payload)
    print(table(report))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
