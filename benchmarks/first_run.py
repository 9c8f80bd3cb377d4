"""The default pipeline as a new user runs it, under several seeds, thread counts and CPU kernels.

    flock /tmp/lightclip-cpu.lock .venv/bin/python benchmarks/first_run.py \
        [--condition NAME:seed=S,threads=T[,cap=avx2]] ... [--set KEY=VALUE] ... [--out FILE]

Each condition is a fresh clone of the working tree (``git stash create``: committed files plus
uncommitted changes to tracked files) in ``--workdir``, with ``.venv`` linked to this checkout's
(``make -o`` keeps make from reinstalling it; ``PYTHONPATH`` puts the clone's ``src`` first) and
``data/raw`` hard-linked when ``data.dvc`` matches (else ``make data`` regenerates it). Then
``make pipeline`` runs, timed, with ``LIGHTCLIP_THREADS=T`` and, with ``cap=...``,
``ATEN_CPU_CAPABILITY`` (``avx2`` takes torch's AVX2 kernels on an AVX-512 CPU). A seed is
``pretrain.train.seed`` and ``distill.train.seed``; the catalogue and its split stay fixed, so the
test set's own sampling error is the gate's bootstrap interval, not part of this spread.

Per condition it records the pipeline's wall time, each model's test mean recall, the gate's
teacher fraction and its interval per student, which student ``@staging`` names (read back with
``lightclip registry list``), and prints a markdown table. Run one condition at a time, alone on
the machine (the script runs them serially; keep it under the CPU lock).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONDITIONS = (
    "seed0-2t:seed=0,threads=2",
    "seed1-2t:seed=1,threads=2",
    "seed2-2t:seed=2,threads=2",
    "seed0-1t:seed=0,threads=1",
    "seed0-avx2:seed=0,threads=2,cap=avx2",
)


def parse_condition(text: str) -> dict[str, Any]:
    name, _, spec = text.partition(":")
    condition: dict[str, Any] = {"name": name, "seed": 0, "threads": 2, "cap": None}
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if key not in ("seed", "threads", "cap"):
            raise SystemExit(f"--condition {text!r}: unknown key {key!r} (seed, threads, cap)")
        condition[key] = value if key == "cap" else int(value)
    return condition


def set_key(params: dict[str, Any], assignment: str) -> None:
    key, _, value = assignment.partition("=")
    *path, last = key.split(".")
    node = params
    for part in path:
        node = node[part]
    if last not in node:
        raise SystemExit(f"--set {assignment!r}: params.yaml has no key {key!r}")
    node[last] = yaml.safe_load(value)


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_project(project: Path, revision: str, condition: dict[str, Any], assignments: list[str]) -> None:
    if project.exists():
        shutil.rmtree(project)
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(REPO), str(project)], check=True)
    git("fetch", "-q", str(REPO), revision, cwd=project)
    git("checkout", "-q", "--detach", revision, cwd=project)
    (project / ".venv").symlink_to(REPO / ".venv")
    if (REPO / "data" / "raw").is_dir() and (REPO / "data.dvc").read_bytes() == (project / "data.dvc").read_bytes():
        subprocess.run(["cp", "-al", str(REPO / "data" / "raw"), str(project / "data" / "raw")], check=True)
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    for assignment in [*assignments, f"pretrain.train.seed={condition['seed']}", f"distill.train.seed={condition['seed']}"]:
        set_key(params, assignment)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


def run_condition(project: Path, condition: dict[str, Any]) -> dict[str, Any]:
    # the clone's own code first (the linked venv's editable install points at this checkout)
    env = dict(os.environ, LIGHTCLIP_THREADS=str(condition["threads"]), PYTHONPATH=str(project / "src"))
    env.pop("MLFLOW_TRACKING_URI", None)
    if condition["cap"]:
        env["ATEN_CPU_CAPABILITY"] = condition["cap"]
    log = project / "first_run.log"
    with log.open("w") as out:
        # -o: the linked venv is up to date (make would reinstall it from the clone, re-pointing this checkout's venv)
        keep_venv = ["-o", str(project / ".venv" / "bin" / "lightclip")]
        subprocess.run(["make", "-s", *keep_venv, "data"], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
        start = time.monotonic()
        result = subprocess.run(["make", *keep_venv, "pipeline"], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
        seconds = time.monotonic() - start
    if result.returncode != 0:
        raise SystemExit(f"{condition['name']}: make pipeline failed (exit {result.returncode}); see {log}")
    registry = subprocess.run([str(REPO / ".venv/bin/lightclip"), "registry", "list"], cwd=project, env=env,
                              capture_output=True, text=True, check=True).stdout
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    register = json.loads((project / "metrics/register.json").read_text())
    pretrain = json.loads((project / "metrics/pretrain.json").read_text())
    row: dict[str, Any] = {**condition, "pipeline_seconds": round(seconds, 1),
                           "teacher_train_seconds": round(pretrain["train_seconds"], 1),
                           "mean_recall": {name: round(m["test/mean_recall"], 2) for name, m in evaluation.items()},
                           "gate": {}, "staged": None, "registry_list": registry}
    teacher = evaluation[next(iter(evaluation))]["test/mean_recall"] if evaluation else None
    for student, entry in register.get("students", {}).items():
        gate = {"verdict": entry.get("gate"), "mean_recall": entry.get("mean_recall")}
        gate.update({k: entry[k] for k in ("teacher_fraction", "teacher_fraction_low", "teacher_fraction_high") if k in entry})
        if "teacher_fraction" not in gate and teacher:
            gate["teacher_fraction"] = entry["mean_recall"] / teacher
        row["gate"][student] = gate
    staged = [name for name, entry in register.get("students", {}).items() if entry.get("staged")]
    row["staged"] = f"{staged[0]} (v{register['staging_after']})" if staged else None
    return row


def table(rows: list[dict[str, Any]]) -> str:
    models = list(rows[0]["mean_recall"])
    students = sorted({s for row in rows for s in row["gate"]})
    head = ["condition", "seed", "threads", "kernels", "pipeline"] + [f"{m} mean recall" for m in models] \
        + [f"{s} / teacher [interval]" for s in students] + ["@staging"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["name"], str(row["seed"]), str(row["threads"]), row["cap"] or "default",
                 f"{row['pipeline_seconds'] / 60:.1f} min"]
        cells += [f"{row['mean_recall'][m]:.2f}" for m in models]
        for s in students:
            gate = row["gate"].get(s, {})
            low, high = gate.get("teacher_fraction_low"), gate.get("teacher_fraction_high")
            interval = f" [{100 * low:.1f}, {100 * high:.1f}]" if low is not None else ""
            cells.append(f"{100 * gate.get('teacher_fraction', float('nan')):.1f}%{interval}")
        cells.append(str(row["staged"]) if row["staged"] else "none")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--condition", action="append", default=[], metavar="NAME:seed=S,threads=T[,cap=C]")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params.yaml key for every condition")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lightclip-first-run"))
    parser.add_argument("--out", type=Path, default=None, help="JSON with every row (and the command, commit, machine)")
    args = parser.parse_args(argv)

    revision = git("stash", "create") or git("rev-parse", "HEAD")
    conditions = [parse_condition(text) for text in (args.condition or DEFAULT_CONDITIONS)]
    rows = []
    for condition in conditions:
        project = args.workdir / condition["name"]
        make_project(project, revision, condition, args.set)
        rows.append(run_condition(project, condition))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "registry_list"}), flush=True)
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        report = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]), "commit": git("rev-parse", "--short", "HEAD"),
                  "tree_dirty": revision != git("rev-parse", "HEAD"), "machine": f"{cpu}, {os.cpu_count()} CPUs", "rows": rows}
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
