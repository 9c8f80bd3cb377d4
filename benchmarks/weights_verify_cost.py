"""What verifying the weights' sha256 adds to loading a saved model (the lc-vit-t teacher ensemble).

Saves an ensemble of two randomly initialised ``lc-vit-t`` members (what ``pretrain`` writes as
the teacher) and one ``lc-vit-xt`` student in a temporary directory, then times, interleaved
round by round so that machine load hits every variant alike:

* ``load_model``: the real path (read the bytes once, sha256 them, check ``model.json``, build the
  model, deserialise the same bytes into it);
* ``load unverified``: the same build + ``load_weights`` from safetensors' ``load_file`` (mmap),
  i.e. loading as it was without the check;
* ``sha256 only``: hashing the weights' bytes (already in the page cache), the check's own cost;
* ``weights_sha256``: the verified hash the index and the teacher cache take (chunked read + hash).

    flock /tmp/lightclip-cpu.lock .venv/bin/python benchmarks/weights_verify_cost.py --rounds 7

Prints the file size and the median / min milliseconds of each, as Markdown.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from lightclip.env import configure_environment
from lightclip.models.ensemble import EnsembleCLIP
from lightclip.models.zoo import (
    WEIGHTS_FILE,
    ModelSpec,
    build_from_config,
    create_model,
    load_model,
    load_weights,
    read_model_info,
    save_model,
    weights_sha256,
)


def load_unverified(directory: Path) -> torch.nn.Module:
    """``load_model`` without the check: build from model.json, weights from ``load_file``."""
    info = read_model_info(directory)
    preprocess = {k: v for k, v in info["image"].items() if v is not None}
    if "ensemble" in info:
        model: torch.nn.Module = EnsembleCLIP([build_from_config(m["open_clip_config"], preprocess) for m in info["ensemble"]["members"]])
    else:
        model = build_from_config(info["open_clip_config"], preprocess)
    load_weights(model, load_file(str(directory / WEIGHTS_FILE), device="cpu"))
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (model building); 1 by default on a shared machine")
    args = parser.parse_args(argv)
    configure_environment()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="lightclip-verify-") as tmp:
        spec = ModelSpec(arch="lc-vit-t")
        members = [create_model(spec, seed=seed)[0] for seed in (0, 1)]
        directory = save_model(EnsembleCLIP(members), "ensemble", Path(tmp) / "teacher")
        student = save_model(create_model(ModelSpec(arch="lc-vit-xt"), seed=0)[0], "lc-vit-xt", Path(tmp) / "student")
        weights = directory / WEIGHTS_FILE
        data = weights.read_bytes()
        variants: dict[str, Callable[[], object]] = {
            "teacher: load_model (verified)": lambda: load_model(directory),
            "teacher: load unverified": lambda: load_unverified(directory),
            "teacher: sha256 only (bytes in memory)": lambda: hashlib.sha256(data).hexdigest(),
            "teacher: weights_sha256 (read + hash + check)": lambda: weights_sha256(directory),
            "student: load_model (verified)": lambda: load_model(student),
            "student: load unverified": lambda: load_unverified(student),
        }
        for run in variants.values():  # warm-up: page cache, allocator, lazy imports
            run()
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, run in variants.items():
                started = time.perf_counter()
                run()
                samples[name].append((time.perf_counter() - started) * 1000)
        print(f"teacher {read_model_info(directory)['arch']}: {weights.stat().st_size / 2**20:.1f} MiB of weights; "
              f"student lc-vit-xt: {(student / WEIGHTS_FILE).stat().st_size / 2**20:.1f} MiB; "
              f"{args.rounds} interleaved rounds, {args.threads} torch thread(s)\n")
        print("| what | median ms | min ms |")
        print("|---|---:|---:|")
        for name, values in samples.items():
            print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
