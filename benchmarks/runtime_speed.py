"""PyTorch (eager, fp32) against ONNX Runtime for saved models: batch-1 latency, throughput, recall.

    flock /tmp/lightclip-cpu.lock .venv/bin/python benchmarks/runtime_speed.py \
        --model teacher=models/teacher --model xt=models/students/xt --model xxt=models/students/xxt \
        [--catalogue data/split --split test] [--rounds 5] [--out metrics/runtime_speed.json]

Each model is exported first when it has no ONNX export (``lightclip export-onnx``). Both runtimes
go through the same embedding path (:mod:`lightclip.evaluation.embedding`: uint8 images
normalised per batch, token ids), so only the runtime differs. Timings are interleaved: every
round times every (model, runtime) once, so a busy machine hurts all alike; the figure is the
median over rounds of the per-round median.

* batch-1 latency: one image + one title per call, one thread (as the promotion gate measures);
* throughput: batches of ``--batch`` images and titles, ``--threads`` threads;
* recall: test mean recall of each runtime on ``--catalogue``/``--split``, computed by the evaluate
  stage's ``evaluate_model(runtime=...)``; ONNX must stay within 0.5 point of PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lightclip.config import EvaluateConfig
from lightclip.data.catalogue import Catalogue
from lightclip.evaluation import embed_images, embed_texts, evaluate_model
from lightclip.imagecache import build_image_cache
from lightclip.models.onnx_runtime import export_onnx, has_onnx, load_runtime_model
from lightclip.models.zoo import load_tokenizer, preprocess_config

RUNTIMES = ("torch", "onnx")


def timed(call: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--catalogue", default="data/split")
    parser.add_argument("--split", default="test")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50, help="batch-1 calls per round")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=5, help="throughput batches per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    models = dict(item.split("=", 1) for item in args.model)

    catalogue = Catalogue.load(args.catalogue)
    titles = [str(t) for t in catalogue.split(args.split)["title"]]
    loaded: dict[tuple[str, str], torch.nn.Module] = {}  # on --threads (throughput)
    single: dict[tuple[str, str], torch.nn.Module] = {}  # on one thread (batch 1): ONNX Runtime fixes threads per session
    inputs: dict[str, dict[str, torch.Tensor]] = {}
    recall: dict[str, dict[str, float]] = {}
    config = EvaluateConfig(models=models, split=args.split)
    for name, directory in models.items():
        if not has_onnx(directory):
            export_onnx(directory)
        for runtime in RUNTIMES:
            loaded[name, runtime] = load_runtime_model(directory, runtime, threads=args.threads)
            single[name, runtime] = load_runtime_model(directory, runtime, threads=1) if runtime == "onnx" else loaded[name, runtime]
        size = int(preprocess_config(loaded[name, "torch"])["size"])
        cache = build_image_cache(catalogue, args.split, size, Path(".cache") / "images", progress=False)
        tokens = load_tokenizer(directory)(titles[: args.batch])
        images = torch.as_tensor(cache.batch(np.arange(args.batch)))
        inputs[name] = {"images": images, "tokens": tokens}
        torch.set_num_threads(args.threads)
        recall[name] = {  # the evaluate stage's own path, on each runtime
            runtime: float(evaluate_model(name, directory, catalogue, config, cache_dir=Path(".cache") / "images", runtime=runtime)
                           .metrics[f"{args.split}/mean_recall"])
            for runtime in RUNTIMES
        }

    latency: dict[tuple[str, str], list[float]] = {key: [] for key in loaded}
    throughput: dict[tuple[str, str], list[float]] = {key: [] for key in loaded}
    for _ in range(args.rounds):
        for (name, runtime), model in loaded.items():
            images, tokens = inputs[name]["images"], inputs[name]["tokens"]
            torch.set_num_threads(1)
            one = single[name, runtime]
            call = lambda: (embed_images(one, images[:1], 1), embed_texts(one, tokens[:1], 1))  # noqa: E731
            call()
            latency[name, runtime].append(1000 * timed(call, args.calls))
            torch.set_num_threads(args.threads)
            batch = lambda: (embed_images(model, images, args.batch), embed_texts(model, tokens, args.batch))  # noqa: E731
            batch()
            throughput[name, runtime].append(args.batch / timed(batch, args.batches))

    rows = []
    for name in models:
        row: dict[str, Any] = {"model": name}
        for runtime in RUNTIMES:
            row[f"{runtime}/encode_ms_p50"] = float(np.median(latency[name, runtime]))
            row[f"{runtime}/pairs_per_s"] = float(np.median(throughput[name, runtime]))
            row[f"{runtime}/mean_recall"] = recall[name][runtime]
        row["latency_ratio"] = row["torch/encode_ms_p50"] / row["onnx/encode_ms_p50"]
        row["throughput_ratio"] = row["onnx/pairs_per_s"] / row["torch/pairs_per_s"]
        row["recall_change"] = row["onnx/mean_recall"] - row["torch/mean_recall"]
        rows.append(row)
    head = "| model | torch ms (batch 1) | onnx ms | × faster | torch pairs/s (batch %d) | onnx pairs/s | × | mean recall torch | onnx |" % args.batch
    print(head + "\n|" + "---|" * 9)
    for r in rows:
        print(f"| {r['model']} | {r['torch/encode_ms_p50']:.2f} | {r['onnx/encode_ms_p50']:.2f} | {r['latency_ratio']:.2f} | "
              f"{r['torch/pairs_per_s']:.0f} | {r['onnx/pairs_per_s']:.0f} | {r['throughput_ratio']:.2f} | "
              f"{r['torch/mean_recall']:.2f} | {r['onnx/mean_recall']:.2f} |")
    if args.out:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                   platform.processor())
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
        report = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]), "commit": commit,
                  "machine": f"{cpu}, {os.cpu_count()} CPUs", "threads": args.threads, "rounds": args.rounds, "rows": rows}
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
