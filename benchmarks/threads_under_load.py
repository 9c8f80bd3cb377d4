"""One training step alone and beside 2 busy processes: torch on the host's cores vs on the CPUs
the process may use.

    flock /tmp/lightclip-cpu.lock .venv/bin/python benchmarks/threads_under_load.py [--arch lc-vit-t] [--batch 128] [--rounds 3]

The measured process is a worker running :func:`lightclip.training.train_step` of an
:class:`lightclip.tasks.ImageTextTask` (synthetic 64 px pairs) in one of these settings:

* ``affinity 1 CPU``: the worker may run on one CPU only (``os.sched_setaffinity``, as
  ``taskset -c 0`` or a scheduler's cpuset does), a CPU the busy processes share (they are pinned
  to it too: other jobs of the same cpuset);
* ``quota 1 CPU``: the worker is in a cgroup with a CPU quota of one CPU (as a container with
  ``--cpus 1``); only where this script may create a cgroup (root, cgroup v1 ``cpu`` or v2);
* ``whole machine``: no restriction (for reference: the default cannot know about other work here).

In each, torch runs ``os.cpu_count()`` threads (**before**: what a ``num_threads: null`` meant)
and :func:`lightclip.io.default_threads` threads (**after**: what it means now), and, in the
unrestricted setting, 1 thread (what ``LIGHTCLIP_THREADS=1`` gives). The load is either nothing
else or 2 pure-Python spin loops started by this script for each timing (unpinned, except in the
affinity setting), killed after it. Rounds interleave every (load, setting, threads) condition, each timing
``--steps`` steps after a warm one; the table shows medians over rounds. Run it under the CPU lock.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
WORDS = "Men Women Navy Blue Black White Red Check Striped Printed Slim Fit Casual Shirt Tshirt Jeans Dress Kurta Shoes Watch".split()


# ----------------------------------------------------------------------------------------------
# The worker: one process, one restriction; times steps on the thread count it is told
# ----------------------------------------------------------------------------------------------


def worker(arch: str, batch: int) -> int:
    """Read ``THREADS STEPS`` lines on stdin; answer each with the JSON list of step seconds."""
    import torch

    from lightclip.config import TrainConfig
    from lightclip.imagecache import ImageCache
    from lightclip.io import cpu_budget
    from lightclip.models import ModelSpec, create_model, tokenizer
    from lightclip.tasks import ImageTextTask, PairSet
    from lightclip.training import make_optimizer, make_scheduler, train_step

    spec = ModelSpec(arch=arch)
    rng = np.random.default_rng(0)
    n = batch * 8
    images = ImageCache.from_array(rng.integers(0, 256, size=(n, 3, spec.image_size, spec.image_size), dtype=np.uint8))
    titles = tuple(" ".join(rng.choice(WORDS, size=6)) + f" {i}" for i in range(n))
    model, _ = create_model(spec, seed=0)
    task = ImageTextTask(model, tokenizer(spec), PairSet(images, titles), None)
    config = TrainConfig(epochs=1, batch_size=batch, lr=5e-4, weight_decay=0.1, warmup_steps=0, grad_clip_norm=0.0)
    params = [p for _, p in task.named_parameters()]
    optimizer = make_optimizer(task.named_parameters(), config)
    scheduler = make_scheduler(optimizer, config, 100_000)
    budget = cpu_budget()
    print(json.dumps({"ready": True, "cpu_count": os.cpu_count(), "default_threads": budget.threads, "chosen": budget.describe()}), flush=True)
    epoch = 0
    for line in sys.stdin:
        threads, steps = (int(x) for x in line.split())
        torch.set_num_threads(threads)
        times = []
        epoch += 1
        batches = task.train_batches(epoch, np.random.default_rng(epoch), batch)
        for i, b in enumerate(batches):
            if i > steps:
                break
            t0 = time.perf_counter()
            train_step(task, b, optimizer, scheduler, params)
            if i > 0:  # the first step after a thread change is a warm-up
                times.append(time.perf_counter() - t0)
        print(json.dumps(times), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------


def make_cgroup(cpus: float) -> Path | None:
    """A fresh cgroup with a quota of ``cpus`` CPUs beside this process's own, or None if not allowed."""
    from lightclip import io

    proc = Path("/proc/self/cgroup").read_text()
    v2, v1 = io._cgroup_mounts(Path("/proc/self/mountinfo").read_text())
    for line in proc.splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        version = "v2" if hierarchy == "0" and not controllers else ("v1" if "cpu" in controllers.split(",") else None)
        for root, mount in (v2 if version == "v2" else v1 if version == "v1" else []):
            base = io._under_mount(path, root, mount)
            if base is None:
                continue
            group = base / f"lightclip-bench-{os.getpid()}"
            try:
                group.mkdir()
                if version == "v2":
                    (group / "cpu.max").write_text(f"{int(cpus * 100000)} 100000\n")
                else:
                    (group / "cpu.cfs_quota_us").write_text(f"{int(cpus * 100000)}\n")
                return group
            except OSError:
                if group.is_dir():
                    group.rmdir()
    return None


class Worker:
    def __init__(self, name: str, args: argparse.Namespace, *, cpus: set[int] | None = None, cgroup: Path | None = None):
        self.name, self.cpus = name, cpus
        env = {k: v for k, v in os.environ.items() if k not in ("LIGHTCLIP_THREADS", "OMP_NUM_THREADS")}

        def restrict() -> None:
            if cpus is not None:
                os.sched_setaffinity(0, cpus)
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text(f"{os.getpid()}\n")

        self.process = subprocess.Popen([sys.executable, __file__, "--worker", "--arch", args.arch, "--batch", str(args.batch)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, preexec_fn=restrict)
        self.info = json.loads(self.process.stdout.readline())

    def time_steps(self, threads: int, steps: int) -> float:
        self.process.stdin.write(f"{threads} {steps}\n")
        self.process.stdin.flush()
        return float(np.median(json.loads(self.process.stdout.readline())))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def start_spinners(n: int, seconds: float, cpus: set[int] | None) -> list[subprocess.Popen]:
    def pin() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)], preexec_fn=pin) for _ in range(n)]


def stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="lc-vit-t")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per condition and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=2, help="busy background processes")
    parser.add_argument("--no-quota", action="store_true", help="skip the cgroup quota setting")
    parser.add_argument("--out", type=Path, help="write the medians as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.arch, args.batch)

    host = os.cpu_count() or 1
    one_cpu = min(os.sched_getaffinity(0))
    workers: list[Worker] = []
    cgroup = None if args.no_quota else make_cgroup(1.0)
    spinners: list[subprocess.Popen] = []
    try:
        workers.append(Worker(f"affinity 1 CPU (CPU {one_cpu})", args, cpus={one_cpu}))
        if cgroup is not None:
            workers.append(Worker(f"quota 1 CPU ({cgroup.name})", args, cgroup=cgroup))
        else:
            print("quota setting skipped: no cgroup could be created here (needs root and a cgroup cpu controller)")
        workers.append(Worker("whole machine", args))
        print(f"{args.arch}, batch {args.batch}, {args.steps} timed steps x {args.rounds} rounds per condition; host cores {host}; "
              f"busy = {args.busy} spinning processes")
        for w in workers:
            print(f"  {w.name}: lightclip chose {w.info['chosen']}")
        conditions = []
        for w in workers:
            counts = sorted({host, w.info["default_threads"], 1}, reverse=True)
            conditions += [(w, t) for t in counts]
        samples: dict[tuple[str, str, int], list[float]] = {}
        for r in range(args.rounds):
            for load in (("alone", "busy") if r % 2 == 0 else ("busy", "alone")):
                order = conditions if r % 2 == 0 else conditions[::-1]
                for w, threads in order:
                    if load == "busy":
                        spinners = start_spinners(args.busy, seconds=600, cpus=w.cpus)
                        time.sleep(0.3)
                    samples.setdefault((w.name, load, threads), []).append(w.time_steps(threads, args.steps))
                    stop(spinners)
                    spinners = []
            print(f"  round {r + 1}/{args.rounds} done", flush=True)
    finally:
        stop(spinners)
        for w in workers:
            try:
                w.close()
            except Exception:  # noqa: BLE001 - the worker may be gone already; kill it
                stop([w.process])
        if cgroup is not None:
            cgroup.rmdir()

    print()
    print(f"| setting | torch threads | alone s/step | with {args.busy} busy s/step (rounds' range) | busy / alone |")
    print("|---|---|---|---|---|")
    rows = []
    for w in workers:
        for threads in sorted({t for (name, _, t) in samples if name == w.name}, reverse=True):
            labels = []
            if threads == host:
                labels.append("before: os.cpu_count()")
            if threads == w.info["default_threads"]:
                labels.append("after: default_threads()")
            if not labels:
                labels.append("LIGHTCLIP_THREADS=1")
            alone = float(np.median(samples[(w.name, "alone", threads)]))
            busy = float(np.median(samples[(w.name, "busy", threads)]))
            rows.append({"setting": w.name, "threads": threads, "label": ", ".join(labels), "alone_s": alone, "busy_s": busy,
                         "alone_rounds": samples[(w.name, "alone", threads)], "busy_rounds": samples[(w.name, "busy", threads)]})
            spread = samples[(w.name, "busy", threads)]
            print(f"| {w.name} | {threads} ({', '.join(labels)}) | {alone:.2f} | {busy:.2f} ({min(spread):.2f}-{max(spread):.2f}) | x{busy / alone:.1f} |")
    if args.out:
        args.out.write_text(json.dumps({"arch": args.arch, "batch": args.batch, "steps": args.steps, "rounds": args.rounds, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
