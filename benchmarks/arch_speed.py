"""Speed of architectures and their variants against the trained teacher, before training any.

    flock /tmp/lightclip-cpu.lock .venv/bin/python benchmarks/arch_speed.py \
        --variant "fast=lc-fast" --variant "fast, 1 image layer=lc-fast:vision_cfg.layers=1"

Speed does not depend on the weights, so each variant (an architecture of the zoo, optionally
with fields of its config changed: ``NAME=ARCH[:tower.key=value,...]``) is saved at random init
and timed beside the saved teacher and student by ``lightclip bench``'s own
:func:`lightclip.bench.encode_speed` (issue 16's measures, interleaved rounds): batch-1 image and
title on the process's threads and on one thread, and throughput at batch ``--batch-size``.
Prints teacher / model (> 1: faster). What a variant's recall is needs a distillation run:
docs/results.md lists both.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from lightclip.bench import encode_speed, model_ratios
from lightclip.config import BenchConfig
from lightclip.models.zoo import arch_config, build_from_config, save_model

#: printed columns: ratio key of :data:`lightclip.bench.RATIO_KEYS` -> header
COLUMNS = {
    "image_latency_one_thread_x": "image, batch 1, one thread",
    "text_latency_one_thread_x": "title, batch 1, one thread",
    "image_latency_x": "image, batch 1",
    "text_latency_x": "title, batch 1",
    "image_throughput_x": "images/s",
    "text_throughput_x": "titles/s",
}


def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """``NAME=ARCH[:tower.key=value,...]`` -> (name, arch, config); values are JSON (numbers) or strings."""
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise SystemExit(f"--variant {text!r}: expected NAME=ARCH[:tower.key=value,...]")
    arch, _, changes = spec.partition(":")
    config = copy.deepcopy(arch_config(arch))
    for change in filter(None, changes.split(",")):
        path, sep, raw = change.partition("=")
        tower, _, key = path.partition(".")
        if not sep or not key or tower not in config or not isinstance(config[tower], dict):
            raise SystemExit(f"--variant {text!r}: {change!r} is not tower.key=value with a tower of {arch} ({', '.join(k for k, v in config.items() if isinstance(v, dict))})")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        config[tower][key] = value
    return name, arch, config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=Path("models/teacher"))
    parser.add_argument("--student", type=Path, default=Path("models/students/xxt"), help="a trained student timed beside the variants")
    parser.add_argument("--variant", action="append", default=[], help="NAME=ARCH[:tower.key=value,...] (repeat)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=1000, help="batch-1 calls of each tower per model, over all rounds (at least 100)")
    parser.add_argument("--batches", type=int, default=100, help="throughput batches of each tower per model, over all rounds")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    config = BenchConfig(rounds=args.rounds, runs=args.runs, throughput_batches=args.batches, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory(prefix="arch_speed-") as scratch:
        model_dirs = {"teacher": args.teacher, args.student.name: args.student}
        for text in args.variant:
            name, arch, variant = parse_variant(text)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model_dirs[name] = save_model(build_from_config(variant), arch, Path(scratch) / f"variant-{len(model_dirs)}")
        speed = encode_speed(model_dirs, config, log=lambda line: None)
    ratios = model_ratios(speed, "teacher")
    print(f"teacher / model; {args.rounds} interleaved rounds; batch {args.batch_size} for throughput")
    print("| model | " + " | ".join(COLUMNS.values()) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for name in speed:
        row = ratios.get(name, {key: 1.0 for key in COLUMNS})
        print(f"| {name} | " + " | ".join(f"×{row[key]:.2f}" for key in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
