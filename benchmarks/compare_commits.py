"""Run a small pipeline with the code of two commits and compare what they produce.

A refactoring must not change results: this runs synth -> validate -> split -> build-kg ->
pretrain (a 2-member FashionKLIP ensemble) -> teacher-embed -> distill (the full graph) ->
evaluate with the working tree's code and with ``--base``'s (a git worktree), each in its own
project under ``--workdir``, and compares the saved tensors (not the file bytes: safetensors
headers may list metadata in another order) and every non-timing metric.

    python benchmarks/compare_commits.py --base 843e4a4 \
        --base-set pretrain.concept.prototypes_per_concept=10

``--base-set KEY=VALUE`` (repeatable) sets a params key for the base only, for knobs that were
renamed or moved between the two commits. Exit 0 when everything matches.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
STAGES = (
    ["data", "synth", "--out", "data/raw"],
    ["validate"],
    ["split"],
    ["build-kg"],
    ["pretrain"],
    ["teacher-embed"],
    ["distill", "--student", "xt", "--out", "models/students/xt", "--metrics", "metrics/distill/xt.json"],
    ["evaluate"],
)
OUTPUTS = ("models/teacher/model.safetensors", "models/students/xt/model.safetensors")
METRICS = ("metrics/eval.json", "metrics/pretrain.json", "metrics/distill/xt.json", "metrics/kg.json", "metrics/split.json")
TIMING = ("timing", "seconds", "per_s", "_ms", "ms_")


def small_params() -> dict[str, Any]:
    """The repository's params at a size that runs in about a minute on 2 cores."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["synth"].update(n_items=240, image_size=32)
    params["split"].update(val=24, test=40)
    params["build_kg"]["min_count"] = 2
    for section in ("pretrain", "distill"):
        params[section]["train"].update(epochs=2, batch_size=32, num_threads=1)
    params["pretrain"]["model"]["arch"] = "lc-test-tiny"
    params["pretrain"]["ensemble_members"] = 2
    params["distill"]["students"] = {"xt": {"arch": "lc-test-tiny", "pretrained": None}}
    params["distill_ablation"]["students"] = ["xt"]
    params["evaluate"]["models"] = {"teacher": "models/teacher", "xt": "models/students/xt"}
    params["evaluate"]["num_threads"] = 1
    params["teacher_embed"]["num_threads"] = 1
    return params


def set_key(params: dict[str, Any], assignment: str) -> None:
    key, _, value = assignment.partition("=")
    *path, last = key.split(".")
    node = params
    for part in path:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(value)


def run_pipeline(project: Path, source: Path, params: dict[str, Any]) -> None:
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PYTHONPATH=str(source / "src"), MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}")
    for stage in STAGES:
        command = [sys.executable, "-m", "lightclip.cli", "-q", "--params", str(project / "params.yaml"), *stage]
        result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{source}: {' '.join(stage)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix.rstrip("/"): node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(flat(value, f"{prefix}{key}/"))
    return out


def compare(base: Path, head: Path) -> list[str]:
    problems = []
    for name in OUTPUTS:
        a, b = load_file(str(base / name)), load_file(str(head / name))
        if set(a) != set(b) or not all(torch.equal(a[k], b[k]) for k in a):
            problems.append(f"{name}: tensors differ")
    for name in METRICS:
        a, b = flat(json.loads((base / name).read_text())), flat(json.loads((head / name).read_text()))
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not any(t in k for t in TIMING))
        if differ:
            problems.append(f"{name}: {', '.join(f'{k} {a.get(k)!r} -> {b.get(k)!r}' for k in differ[:8])}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare with")
    parser.add_argument("--base-set", action="append", default=[], metavar="KEY=VALUE", help="a params key for the base only")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lightclip-compare"))
    args = parser.parse_args(argv)

    worktree = args.workdir / "base-src"
    if not worktree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.base], check=True, capture_output=True)
    else:
        subprocess.run(["git", "-C", str(worktree), "checkout", "--detach", "-q", args.base], check=True)
    head_params = small_params()
    base_params = copy.deepcopy(head_params)
    for assignment in args.base_set:
        set_key(base_params, assignment)
    run_pipeline(args.workdir / "base", worktree, base_params)
    run_pipeline(args.workdir / "head", REPO, head_params)
    problems = compare(args.workdir / "base", args.workdir / "head")
    eval_metrics = flat(json.loads((args.workdir / "head" / "metrics/eval.json").read_text()))
    shown = ", ".join(f"{k} {v:.2f}" for k, v in eval_metrics.items() if k.endswith("mean_recall"))
    if problems:
        print("DIFFERENT:\n  " + "\n  ".join(problems))
        return 1
    print(f"identical: {', '.join(OUTPUTS)} (tensors) and {', '.join(METRICS)} (non-timing values); {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
