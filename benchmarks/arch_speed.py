"""Speed of architectures and their variants against the trained teacher, before training any.

    flock /tmp/lightclip-cpu.lock .venv/bin/python benchmarks/arch_speed.py \
        --variant "fast=lc-fast" --variant "fast, 1 image layer, patch 8=lc-fast:vision_cfg.layers=1,vision_cfg.patch_size=8"

Speed does not depend on the weights, so each variant (an architecture of the zoo, optionally
with fields of its config changed: ``NAME=ARCH[:tower.key=value,...]``) is built at random init
and timed beside the saved teacher and student (issue 16's measures): batch-1 image and title on
one thread (``--batch1-threads``), and batch-64 images and titles on the usable CPUs, in interleaved rounds
(:func:`lightclip.efficiency.interleaved_timings`). Prints teacher / model (> 1: faster).
What a variant's recall is needs a distillation run: docs/results.md lists both.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightclip.efficiency import interleaved_timings
from lightclip.io import default_threads, torch_threads
from lightclip.models.zoo import arch_config, build_from_config, encode_text, load_model, load_tokenizer, preprocess_config, tokenizer

TITLE = ["Urban Loom Men Black Checked Laptop Bag"]
BATCH = 64


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
    parser.add_argument("--calls", type=int, default=1000, help="batch-1 calls of each tower per model, over all rounds")
    parser.add_argument("--batches", type=int, default=100, help="batch-64 calls of each tower per model, over all rounds")
    parser.add_argument("--batch1-threads", type=int, default=1, help="torch threads for the batch-1 calls (the bench uses the usable CPUs)")
    args = parser.parse_args(argv)

    models = {"teacher": load_model(args.teacher).eval(), args.student.name: load_model(args.student).eval()}
    titles = {"teacher": load_tokenizer(args.teacher)(TITLE), args.student.name: load_tokenizer(args.student)(TITLE)}
    for text in args.variant:
        name, arch, config = parse_variant(text)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            models[name] = build_from_config(config).eval()
        titles[name] = tokenizer(arch)(TITLE)[:, : int(config["text_cfg"].get("context_length", 77))]
    gen = torch.Generator().manual_seed(0)
    images = {}
    for name, model in models.items():
        size = int(preprocess_config(model)["size"])
        images.setdefault(size, torch.randn(BATCH, 3, size, size, generator=gen))
    calls = {}
    for name, model in models.items():
        image = images[int(preprocess_config(model)["size"])]
        calls[name] = {
            "image": (lambda m=model, x=image[:1]: m.encode_image(x, normalize=True)),
            "title": (lambda m=model, t=titles[name]: encode_text(m, t, normalize=True)),
            "images": (lambda m=model, x=image: m.encode_image(x, normalize=True)),
            "titles": (lambda m=model, t=titles[name].repeat(BATCH, 1): encode_text(m, t, normalize=True)),
        }
    one = {name: {k: c[k] for k in ("image", "title")} for name, c in calls.items()}
    many = {name: {k: c[k] for k in ("images", "titles")} for name, c in calls.items()}
    threads = default_threads()
    with torch.no_grad():
        with torch_threads(args.batch1_threads):
            latency = interleaved_timings(one, rounds=args.rounds, runs={"image": args.calls, "title": args.calls}, warmup={"image": 10, "title": 10})
        with torch_threads(threads):
            batched = interleaved_timings(many, rounds=args.rounds, runs={"images": args.batches, "titles": args.batches}, warmup={"images": 3, "titles": 3})
    ms = {name: {k: 1000 * float(np.median(v)) for k, v in {**latency[name], **batched[name]}.items()} for name in models}
    teacher = ms["teacher"]
    print(f"teacher / model; batch 1 on {args.batch1_threads} thread(s), batch {BATCH} on {threads}; {args.rounds} interleaved rounds")
    print(f"| model | image ms, batch 1 | × | title ms, batch 1 | × | images/s, batch {BATCH} | × | titles/s, batch {BATCH} | × |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in ms.items():
        cells = []
        for kind in ("image", "title"):
            cells += [f"{row[kind]:.3f}", f"×{teacher[kind] / row[kind]:.2f}"]
        for kind in ("images", "titles"):
            cells += [f"{BATCH * 1000 / row[kind]:,.0f}", f"×{teacher[kind] / row[kind]:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
