"""Per tower: batch-1 latency (1 and 2 threads) and batch-64 throughput, eager PyTorch against ONNX Runtime.

    flock /tmp/lightclip-cpu.lock .venv/bin/python benchmarks/tower_speed.py teacher=DIR xt=DIR xxt=DIR

The first model is the reference: the last lines print reference / model for every other model
and runtime (> 1: the model is faster). Inputs are random images at each model's size and two
catalogue-like titles; timings are interleaved (every round times every model and runtime once)
and the figure is the median over rounds of the per-round median. Models without an ONNX export
are exported first (into their directory), so pass copies of DVC-tracked models.
"""
import json
import sys

import numpy as np
import torch

from lightclip.evaluation import embed_images, embed_texts
from lightclip.models.onnx_runtime import export_onnx, has_onnx, load_runtime_model
from lightclip.models.zoo import load_tokenizer, preprocess_config
from runtime_speed import timed as median_seconds  # benchmarks/ is on the path when a script runs


def timed(call, repeats: int) -> float:
    """One warm-up call, then ``runtime_speed``'s median of ``repeats`` timed calls."""
    call()
    return median_seconds(call, repeats)


def main(argv: list[str]) -> int:
    models = dict(a.split('=', 1) for a in argv)
    rounds, calls, batch = 5, 60, 64
    loaded, single, inputs = {}, {}, {}
    titles = ["Nike Men Black Running Shoes", "Puma Women Blue Printed T-shirt"] * 32
    for name, d in models.items():
        if not has_onnx(d):
            export_onnx(d)
        for rt in ("torch", "onnx"):
            loaded[name, rt] = load_runtime_model(d, rt, threads=2)
            single[name, rt] = load_runtime_model(d, rt, threads=1) if rt == "onnx" else loaded[name, rt]
        size = int(preprocess_config(loaded[name, "torch"])["size"])
        inputs[name] = (torch.randint(0, 255, (batch, 3, size, size), dtype=torch.uint8), load_tokenizer(d)(titles))

    res = {k: {"img1_1t": [], "txt1_1t": [], "img1_2t": [], "txt1_2t": [], "img64": [], "txt64": []} for k in loaded}
    for _ in range(rounds):
        for key, m in loaded.items():
            im, tk = inputs[key[0]]
            one = single[key]
            torch.set_num_threads(1)
            res[key]["img1_1t"].append(1000 * timed(lambda: embed_images(one, im[:1], 1), calls))
            res[key]["txt1_1t"].append(1000 * timed(lambda: embed_texts(one, tk[:1], 1), calls))
            torch.set_num_threads(2)
            res[key]["img1_2t"].append(1000 * timed(lambda: embed_images(m, im[:1], 1), calls))
            res[key]["txt1_2t"].append(1000 * timed(lambda: embed_texts(m, tk[:1], 1), calls))
            res[key]["img64"].append(batch / timed(lambda: embed_images(m, im, batch), 5))
            res[key]["txt64"].append(batch / timed(lambda: embed_texts(m, tk, batch), 5))
    out = {f"{k[0]}/{k[1]}": {m: round(float(np.median(v)), 4) for m, v in r.items()} for k, r in res.items()}
    print(json.dumps(out, indent=1))
    t = list(models)[0]
    for rt in ("torch", "onnx"):
        for n in list(models)[1:]:
            a, b = out[f"{t}/{rt}"], out[f"{n}/{rt}"]
            print(rt, n, "lat img1t x%.2f txt1t x%.2f img2t x%.2f txt2t x%.2f | thr img x%.2f txt x%.2f" % (
                a["img1_1t"]/b["img1_1t"], a["txt1_1t"]/b["txt1_1t"], a["img1_2t"]/b["img1_2t"], a["txt1_2t"]/b["txt1_2t"], b["img64"]/a["img64"], b["txt64"]/a["txt64"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
