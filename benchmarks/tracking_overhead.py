"""What logging to the team's MLflow server (PostgreSQL + S3 artifacts) costs each stage, against
the embedded SQLite store: the same stage commands, timed end to end, in interleaved rounds.

Each round runs the whole small pipeline (synth -> validate -> split -> build-kg -> pretrain ->
teacher-embed -> distill -> evaluate -> index -> register, one student) twice, once per tracking
store, in fresh project directories, the store order alternating between rounds so that drift in
the machine's load falls on both alike. Every round registers under its own model names and
experiment, so each round really logs and registers its models (none is "reused"). The figure per
stage is the median wall time over rounds; overhead = server median / SQLite median - 1.

    flock /tmp/lightclip-cpu.lock .venv/bin/python benchmarks/tracking_overhead.py --rounds 3 \\
        --out metrics/tracking_overhead.json

The server: ``--tracking-uri URI`` (one already running), else the team services
(:class:`lightclip.services.TeamServices`) started in a temp dir for the run and stopped after it.
The Prefect server and workers are stopped for the run (their polling would be charged to
tracking). On one machine the tracking services share its cores with the stages: the figure
includes that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import yaml

REPO = Path(__file__).resolve().parents[1]
STUDENT = "xt"
STAGES: tuple[tuple[str, list[str]], ...] = (
    ("synth", ["data", "synth", "--out", "data/raw"]),
    ("validate", ["validate"]),
    ("split", ["split"]),
    ("build_kg", ["build-kg"]),
    ("pretrain", ["pretrain"]),
    ("teacher_embed", ["teacher-embed"]),
    ("distill", ["distill", "--student", STUDENT, "--out", f"models/students/{STUDENT}", "--metrics", f"metrics/distill/{STUDENT}.json"]),
    ("evaluate", ["evaluate"]),
    ("index", ["index"]),
    ("register", ["register", "--ranks", "metrics/eval_ranks.json"]),
)
GOAL_PCT = 5.0
#: Team services the benchmark stops after starting them: it measures tracking, not orchestration.
UNTIMED_SERVICES = ("worker-1", "worker-2", "prefect")


def small_params(round_index: int, backend: str) -> dict[str, Any]:
    """The repository's params at benchmark size (about a minute per pipeline on 2 cores); the
    experiment and model names are the round's own."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["synth"].update(n_items=240, image_size=32)
    params["split"].update(val=24, test=40)
    params["build_kg"]["min_count"] = 2
    for section in ("pretrain", "distill"):
        params[section]["train"].update(epochs=2, batch_size=32, num_threads=1)
    params["pretrain"]["model"]["arch"] = "lc-test-tiny"
    params["pretrain"]["ensemble_members"] = 1
    params["distill"]["students"] = {STUDENT: {"arch": "lc-test-tiny", "pretrained": None}}
    params["distill_ablation"]["students"] = [STUDENT]
    params["evaluate"]["models"] = {"teacher": "models/teacher", STUDENT: f"models/students/{STUDENT}"}
    params["evaluate"]["num_threads"] = 1
    params["teacher_embed"]["num_threads"] = 1
    params["register"].update(latency_runs=10, latency_warmup=2, model_name=f"overhead-student-r{round_index}",
                              teacher_model_name=f"overhead-teacher-r{round_index}")
    params["tracking"]["experiment"] = f"overhead-{backend}-r{round_index}"
    return params


def run_pipeline(project: Path, params: dict[str, Any], env: dict[str, str]) -> dict[str, float]:
    """Run every stage as its own ``lightclip`` process in ``project``; seconds per stage."""
    project.mkdir(parents=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / "dvc.yaml").write_text("stages: {}\n")
    seconds = {}
    for name, args in STAGES:
        command = [sys.executable, "-m", "lightclip.cli", "-q", *args]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
        seconds[name] = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"{project}: {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return seconds


@contextmanager
def team_server() -> Iterator[dict[str, str]]:
    """The team services, up for the benchmark in a fresh state dir under the system temp dir (as
    the test fixture does: PostgreSQL runs as ``postgres`` and must traverse its path), stopped and
    removed after; yields the variables clients read."""
    from lightclip.services import TeamServices

    state_dir = Path(tempfile.mkdtemp(prefix="lightclip-overhead-team-"))
    team = TeamServices(state_dir)
    started = time.perf_counter()
    team.up()
    print(f"team services up in {time.perf_counter() - started:.1f} s", flush=True)
    for name in UNTIMED_SERVICES:  # idle pollers on the same 2 cores would be charged to tracking
        team.stop_service(name)
    try:
        yield team.env()
    finally:
        team.down()
        shutil.rmtree(state_dir, ignore_errors=True)


def summarise(times: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    for name, _ in [*STAGES, ("total", [])]:
        if name == "total":
            local = [sum(r.values()) for r in times["sqlite"]]
            remote = [sum(r.values()) for r in times["server"]]
        else:
            local = [r[name] for r in times["sqlite"]]
            remote = [r[name] for r in times["server"]]
        a, b = statistics.median(local), statistics.median(remote)
        stages[name] = {"sqlite_s": [round(x, 3) for x in local], "server_s": [round(x, 3) for x in remote],
                        "sqlite_median_s": round(a, 3), "server_median_s": round(b, 3), "overhead_s": round(b - a, 3),
                        "overhead_pct": round(100 * (b / a - 1), 1)}
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--tracking-uri", help="an MLflow server already running (default: start the team services for the run)")
    parser.add_argument("--workdir", type=Path, help="where the projects go (default: a temp dir, removed after)")
    parser.add_argument("--out", type=Path, default=REPO / "metrics" / "tracking_overhead.json")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lightclip-overhead-"))
    base_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LIGHTCLIP_PARENT_RUN_ID")}
    base_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base_env.get("PATH", "")])
    server_context = nullcontext({"MLFLOW_TRACKING_URI": args.tracking_uri}) if args.tracking_uri else team_server()
    times: dict[str, list[dict[str, float]]] = {"sqlite": [], "server": []}
    started = time.perf_counter()
    try:
        with server_context as server_env:
            uri = server_env["MLFLOW_TRACKING_URI"]
            for round_index in range(args.rounds):
                order = ("sqlite", "server") if round_index % 2 == 0 else ("server", "sqlite")
                for backend in order:
                    env = dict(base_env, **(server_env if backend == "server" else {}))
                    project = workdir / f"r{round_index}-{backend}"
                    times[backend].append(run_pipeline(project, small_params(round_index, backend), env))
                    print(f"round {round_index + 1}/{args.rounds} {backend}: {sum(times[backend][-1].values()):.1f} s", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    stages = summarise(times)
    report = {
        "what": "wall time per stage process (lightclip -q <stage>), SQLite store vs the MLflow server; median over rounds",
        "command": " ".join(["python", "benchmarks/tracking_overhead.py", *(argv if argv is not None else sys.argv[1:])]),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "server": "MLflow server on PostgreSQL, artifacts proxied to S3 (SeaweedFS), same machine" if not args.tracking_uri else uri,
        "pipeline": "synth 240 items at 32 px, lc-test-tiny teacher (1 member) and student, 2 epochs each, batch 32, 1 thread",
        "goal_pct": GOAL_PCT,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "stages": stages,
        "over_goal": [name for name, s in stages.items() if s["overhead_pct"] > GOAL_PCT],
        "wall_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    width = max(len(n) for n in stages)
    for name, s in stages.items():
        print(f"{name:<{width}}  sqlite {s['sqlite_median_s']:7.2f} s  server {s['server_median_s']:7.2f} s  "
              f"{s['overhead_s']:+6.2f} s  {s['overhead_pct']:+6.1f} %")
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
