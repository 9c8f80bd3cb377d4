"""How small must a student's towers be for the batch-1 goals? Latency of untrained tower variants.

    flock /tmp/lightclip-cpu.lock .venv/bin/python benchmarks/tower_variants.py [--teacher models/teacher] [--student models/students/xxt]

Batch-1 latency does not depend on the weights, so variants of the student's architecture are
timed at random init against the trained teacher and student: one image (at the student's size)
and one catalogue-like title per call, one thread, eager PyTorch, interleaved rounds
(:func:`lightclip.efficiency.interleaved_timings`). Each variant changes one field of the
student's open_clip config. Prints teacher / model per tower (> 1: faster than the teacher).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

from lightclip.efficiency import interleaved_timings
from lightclip.io import torch_threads
from lightclip.models.zoo import encode_text, load_model, load_tokenizer, preprocess_config

TITLE = ["Urban Loom Men Black Checked Laptop Bag"]
#: name -> (tower, the fields of its config that change)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "image 1 layer": ("vision_cfg", {"layers": 1}),
    "image patch 16": ("vision_cfg", {"patch_size": 16}),
    "text width 32": ("text_cfg", {"width": 32, "heads": 1}),
    "text context 16": ("text_cfg", {"context_length": 16}),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=Path("models/teacher"))
    parser.add_argument("--student", type=Path, default=Path("models/students/xxt"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=400, help="batch-1 calls of each tower per model, over all rounds")
    args = parser.parse_args(argv)

    config = json.loads((args.student / "model.json").read_text())["open_clip_config"]
    models = {"teacher": load_model(args.teacher).eval(), "student": load_model(args.student).eval()}
    tokens = {"teacher": load_tokenizer(args.teacher)(TITLE), "student": load_tokenizer(args.student)(TITLE)}
    for name, (tower, change) in VARIANTS.items():
        variant = copy.deepcopy(config)
        variant[tower].update(change)
        models[name] = open_clip.model.CLIP(**variant).eval()
        tokens[name] = tokens["student"][:, : variant["text_cfg"]["context_length"]]
    gen = torch.Generator().manual_seed(0)
    images = {which: torch.randn(1, 3, size, size, generator=gen)
              for which, size in ((w, int(preprocess_config(models[w])["size"])) for w in ("teacher", "student"))}
    calls = {
        name: {"image": (lambda m=model, x=images["teacher" if name == "teacher" else "student"]: m.encode_image(x, normalize=True)),
               "text": (lambda m=model, t=tokens[name]: encode_text(m, t, normalize=True))}
        for name, model in models.items()
    }
    with torch.no_grad(), torch_threads(1):
        samples = interleaved_timings(calls, rounds=args.rounds, runs={"image": args.calls, "text": args.calls}, warmup={"image": 10, "text": 10})
    ms = {name: {kind: 1000 * float(np.median(v)) for kind, v in kinds.items()} for name, kinds in samples.items()}
    print(f"| model | image ms | teacher / model | title ms | teacher / model |   (batch 1, one thread, {args.rounds} rounds)")
    print("|---|---|---|---|---|")
    for name, row in ms.items():
        print(f"| {name} | {row['image']:.3f} | ×{ms['teacher']['image'] / row['image']:.2f} | {row['text']:.3f} | ×{ms['teacher']['text'] / row['text']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
