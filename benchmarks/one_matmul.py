"""Both retrieval directions from one matrix product vs ``retrieval_ranks`` once per direction.

The evaluate stage ranks with :func:`lightclip.evaluation.one_matmul.ranks_both_ways`; it stays
only while it saves at least a quarter of the wall time of
:func:`lightclip.evaluation.ranking.ranks_per_direction` (``retrieval_ranks`` twice) at 10k
and at 100k items. One run times one method on one input and prints one JSON line (seconds,
peak RSS, and a hash of the i2t ranks, t2i ranks and t2i top-10, which must be the same for
both methods).

Inputs, the same for both methods (seeded): clustered unit vectors (1,024 centres, each image
near its centre, each title ``--noise`` away from its image: 1 is a strong model, 3 a weak
one), 10% of the titles copies of another item's title (identical text vectors, positives by
title group, as the stage's ``title`` rule); the t2i top-10 for attribute precision.

Each run in its own process under the CPU lock, methods alternated (odd repeats one_matmul
first, even ones twice first), medians over the repeats::

    for n in 10000 100000; do for dim in 128 384; do for r in 1 2 3; do
      for m in one_matmul twice; do   # swap the order on even repeats
        flock /tmp/lightclip-cpu.lock .venv/bin/python benchmarks/one_matmul.py --n $n --dim $dim --noise 3 --method $m
      done; done; done; done

Memory: both tile the similarity matrix (``chunk`` rows x all keys at a time, a few hundred MB
at 100k), never the whole N x N matrix (40 GB at 100k).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import resource
import time

import numpy as np
import torch

from lightclip.env import configure_environment
from lightclip.evaluation import Positives, ranks_per_direction
from lightclip.evaluation.one_matmul import ranks_both_ways


def inputs(n: int, dim: int, noise: float) -> tuple[torch.Tensor, torch.Tensor, Positives]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1024, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    images = centres[rng.integers(0, 1024, n)] + rng.standard_normal((n, dim), dtype=np.float32) * np.float32(0.6 / math.sqrt(dim))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts = images + rng.standard_normal((n, dim), dtype=np.float32) * np.float32(noise / math.sqrt(dim))
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    groups = np.arange(n)
    copies = rng.choice(n, n // 10, replace=False)
    sources = rng.integers(0, n, copies.size)
    texts[copies] = texts[sources]  # same title, same text vector
    groups[copies] = groups[sources]
    groups = np.unique(groups, return_inverse=True)[1]
    positives = Positives.identity(n).union(Positives.from_groups(groups))
    return torch.from_numpy(images), torch.from_numpy(texts), positives


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, required=True, help="items (images = texts)")
    parser.add_argument("--dim", type=int, required=True, help="embedding width")
    parser.add_argument("--noise", type=float, default=3.0, help="title-to-image distance (1: strong model, 3: weak)")
    parser.add_argument("--method", choices=["one_matmul", "twice"], required=True)
    args = parser.parse_args()
    configure_environment()
    images, texts, positives = inputs(args.n, args.dim, args.noise)
    rank = ranks_both_ways if args.method == "one_matmul" else ranks_per_direction
    t0 = time.perf_counter()
    with torch.no_grad():
        i2t, t2i, top = rank(images, texts, positives, topk=10)
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256(i2t.numpy().tobytes() + t2i.numpy().tobytes() + top.numpy().tobytes()).hexdigest()[:16]
    print(json.dumps({
        "method": args.method, "n": args.n, "dim": args.dim, "noise": args.noise, "seconds": round(seconds, 3), "hash": digest,
        "threads": torch.get_num_threads(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "i2t_R@1": round(float((i2t < 1).double().mean()) * 100, 2), "t2i_R@1": round(float((t2i < 1).double().mean()) * 100, 2),
    }))


if __name__ == "__main__":
    main()
