"""Time and peak memory of the data path per stage as the catalogue grows: 3k / 30k / 100k items.

    flock /tmp/lightclip-cpu.lock .venv/bin/python benchmarks/scaling.py \
        [--sizes 3000,30000,100000] [--sources cache,stream] [--workdir DIR] [--out metrics/scaling.json]

For each size N, in a fresh project directory ``<workdir>/n<N>`` (a copy of ``params.yaml`` with
the settings below), every stage runs as its own ``lightclip`` subprocess and is timed; its peak
resident memory is the child's ``ru_maxrss`` from ``os.wait4`` (that process and the ones it
waited for), so one stage's peak is never hidden by another's:

1. ``data synth`` renders N products (``synth.n_items = N``, 64 px PNGs, seed 0);
2. ``data export-webdataset`` writes them as WebDataset shards (1000 samples each);
3. ``data import-webdataset`` imports the shards into ``data/raw`` (the "import" of the issue);
4. ``validate`` and 5. ``split`` as in ``dvc.yaml``;
6. ``teacher-embed`` (train split, with the flipped images) and 7. ``index`` (every item, flat
   FAISS, 100 title queries) with each image source of ``--sources``: ``cache`` decodes the
   split into the memory-mapped uint8 array first (:mod:`lightclip.imagecache`), ``stream``
   decodes batch by batch (:mod:`lightclip.imagestream`), ``webdataset`` streams the shards of
   step 2. The image cache is emptied before every ``cache`` run so that it is built, not reused.

The model is a random-init ``lc-vit-xxt`` (64 px, 64-d), one member, saved once per size with
:func:`lightclip.models.zoo.save_model`: training is not what this measures, and embedding
cost per item does not depend on the weights. Results (seconds and MiB per stage, per size,
and the machine) go to ``--out`` after every stage, so an interrupted run keeps what it
measured. Run it alone on the machine, under the CPU lock.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
LIGHTCLIP = [sys.executable, "-m", "lightclip"]
TEACHER_ARCH = "lc-vit-xxt"
SOURCES = ("cache", "stream", "webdataset")
SHARD_SIZE = 1000
#: What ``--fork`` imports before the first stage (the CLI imports its stage modules lazily).
FORK_PRELOAD = ("lightclip.cli", "lightclip.data.synth", "lightclip.data.webdataset", "lightclip.validation", "lightclip.data.split",
                "lightclip.teacher_cache", "lightclip.index", "lightclip.tracking", "mlflow")


def parse_sizes(text: str) -> list[int]:
    sizes = [int(s) for s in text.split(",") if s.strip()]
    if not sizes or min(sizes) < 10:
        raise SystemExit(f"--sizes {text!r}: give comma-separated item counts of at least 10")
    return sizes


def parse_sources(text: str) -> list[str]:
    sources = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown or not sources:
        raise SystemExit(f"--sources {text!r}: unknown {unknown}; choose from {list(SOURCES)}")
    return sources


def project_params(n_items: int, source: str, shards: str) -> dict[str, Any]:
    """The repository's params with this benchmark's settings (see the module docstring)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["synth"]["n_items"] = n_items
    params["teacher_embed"].update({"splits": ["train"], "hflip": True, "device": "cpu"})
    params["index"].update({"model": "models/teacher", "split": None, "kind": "flat", "eval_queries": 100, "device": "cpu"})
    for stage in ("teacher_embed", "index"):
        params[stage]["images"] = {"source": source, "shards": shards if source == "webdataset" else None, "decode_threads": None}
    return params


def write_params(project: Path, n_items: int, source: str) -> Path:
    path = project / f"params-{source}.yaml"
    shards = str(project / "data" / "shards" / "shard-*.tar")
    path.write_text(yaml.safe_dump(project_params(n_items, source, shards), sort_keys=False), encoding="utf-8")
    return path


def save_teacher(project: Path, *, in_process: bool = False) -> None:
    """The random-init teacher (the same weights at every size: seed 0).

    In a subprocess unless ``in_process``: this process must stay small, since Linux hands a
    parent's peak RSS down to the children it forks (``ru_maxrss`` survives ``exec``).
    """
    code = (
        "import sys; from lightclip.models.zoo import ModelSpec, create_model, save_model\n"
        f"spec = ModelSpec(arch={TEACHER_ARCH!r}); model, _ = create_model(spec, seed=0)\n"
        "save_model(model, spec, sys.argv[1])\n"
    )
    target = str(project / "models" / "teacher")
    if in_process:  # forked too: torch must not start its thread pools in the process that forks the stages
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                from lightclip.models.zoo import ModelSpec, create_model, save_model

                spec = ModelSpec(arch=TEACHER_ARCH)
                save_model(create_model(spec, seed=0)[0], spec, target)
                code = 0
            except BaseException:  # noqa: BLE001 -- the child must never return into the caller
                traceback.print_exc()
            finally:
                os._exit(code)
        if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]):
            raise SystemExit(f"saving the teacher to {target} failed")
    else:
        subprocess.run([sys.executable, "-c", code, target], check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})


def run_stage(name: str, argv: list[str], cwd: Path, log: Path, *, fork: bool = False) -> dict[str, Any]:
    """Run one stage; its wall seconds and peak RSS (MiB, from ``wait4``). A failure stops the benchmark.

    ``fork``: in a forked child of this process instead of a fresh interpreter (no import time;
    the peak then includes what this process had resident at the fork): for quick checks only,
    from a process that has run no torch op (a forked OpenMP pool can hang or crash the child).
    """
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        if fork:
            pid = os.fork()
            if pid == 0:  # the child: the stage's CLI in this (already imported) interpreter
                code = 1
                try:
                    os.chdir(cwd)
                    os.dup2(out.fileno(), 1)
                    os.dup2(out.fileno(), 2)
                    from lightclip.cli import main as lightclip_main

                    code = lightclip_main(argv[len(LIGHTCLIP):])
                except BaseException:  # noqa: BLE001 -- the child must never return into the caller
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
        else:
            pid = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).pid
        _, status, usage = os.wait4(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if code:
        raise SystemExit(f"{name} failed with status {code}; see {log}")
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def stages(project: Path, sources: list[str]) -> list[tuple[str, list[str]]]:
    base = LIGHTCLIP + ["-q", "--project", str(project)]
    p = ["--params", str(project / "params-cache.yaml")]
    plan = [
        ("synth", base + p + ["data", "synth", "--out", "data/synth"]),
        ("export_webdataset", base + ["data", "export-webdataset", "data/synth", "--out", "data/shards", "--shard-size", str(SHARD_SIZE)]),
        ("import_webdataset", base + ["data", "import-webdataset", "data/shards/shard-*.tar", "--out", "data/raw"]),
        ("validate", base + p + ["validate", "--in", "data/raw", "--out", "data/validated"]),
        ("split", base + p + ["split", "--in", "data/validated", "--out", "data/split"]),
    ]
    for source in sources:
        ps = ["--params", str(project / f"params-{source}.yaml")]
        plan.append((f"teacher_embed[{source}]", base + ps + ["teacher-embed", "--in", "data/split", "--out", f"data/teacher_emb-{source}",
                                                              "--metrics", f"metrics/teacher_embed-{source}.json"]))
        plan.append((f"index[{source}]", base + ps + ["index", "--in", "data/split", "--out", f"models/index-{source}", "--metrics", f"metrics/index-{source}.json"]))
    return plan


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(sizes: list[int], sources: list[str], workdir: Path, out: Path, *, keep: bool = False, fork: bool = False) -> dict[str, Any]:
    """Run every stage at every size; the results (also written to ``out`` after every stage)."""
    result: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "commit": commit(), "machine": machine(),
                              "teacher": TEACHER_ARCH, "image_size": 64, "shard_size": SHARD_SIZE, "fork": fork, "sizes": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    for n in sizes:
        project = workdir / f"n{n}"
        shutil.rmtree(project, ignore_errors=True)
        project.mkdir(parents=True)
        for source in {"cache", *sources}:
            write_params(project, n, source)
        save_teacher(project, in_process=fork)
        rows: dict[str, Any] = {}
        result["sizes"][str(n)] = rows
        for name, argv in stages(project, sources):
            if name.startswith("teacher_embed[cache]"):
                shutil.rmtree(project / ".cache" / "images", ignore_errors=True)
            print(f"[N={n}] {name} ...", end=" ", flush=True)
            rows[name] = run_stage(name, argv, project, project / "stages.log", fork=fork)
            print(f"{rows[name]['seconds']:.1f} s, {rows[name]['peak_rss_mib']:.0f} MiB", flush=True)
            out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        if not keep:
            shutil.rmtree(project, ignore_errors=True)
    return result


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per stage, seconds and peak RSS per size."""
    sizes = list(result["sizes"])
    names = list(dict.fromkeys(name for rows in result["sizes"].values() for name in rows))
    lines = ["| stage | " + " | ".join(f"N={n}: s / MiB" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for name in names:
        cells = [f"{r[name]['seconds']:.1f} / {r[name]['peak_rss_mib']:.0f}" if name in r else "-" for r in (result["sizes"][n] for n in sizes)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("3000,30000,100000"), help="item counts (default 3000,30000,100000)")
    parser.add_argument("--sources", type=parse_sources, default=["cache", "stream"], help=f"image sources of teacher-embed and index, from {list(SOURCES)} (default cache,stream)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lightclip-scaling"), help="where the projects are made (default /tmp/lightclip-scaling)")
    parser.add_argument("--out", type=Path, default=REPO / "metrics" / "scaling.json", help="results JSON (default metrics/scaling.json)")
    parser.add_argument("--keep", action="store_true", help="keep each size's project directory")
    parser.add_argument("--fork", action="store_true", help="fork each stage from this process (quick checks: peaks include this process's imports)")
    args = parser.parse_args(argv)
    if args.fork:  # imported once here, inherited by every forked stage
        for module in FORK_PRELOAD:
            importlib.import_module(module)
    result = run(args.sizes, args.sources, args.workdir, args.out, keep=args.keep, fork=args.fork)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
