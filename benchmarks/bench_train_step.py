"""Our training step vs a bare open_clip step, the concept term's cost, and bf16 autocast.

    python benchmarks/bench_train_step.py [--arch lc-vit-t] [--batch 128] [--threads 2] [--steps 4] [--rounds 3]

* ours: :class:`lightclip.tasks.ImageTextTask` (plain CLIP) through the loop's
  :func:`lightclip.training.train_step` (AdamW from :func:`make_optimizer`, cosine schedule),
  *including* batch assembly from the uint8 image cache (gather, flip, normalise).
* bare: ``model(images, tokens)``, ``open_clip.ClipLoss``, backward, ``torch.optim.AdamW``
  (defaults) on pre-made float batches, i.e. no data cost at all.

Both start from the same weights; rounds alternate so that a busy shared machine hurts both
alike. Prints pairs/s of each, the ratio (ours / bare, must be >= 0.9), the concept term's cost
and bf16 autocast vs fp32 for our step. Keep it under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _synthetic, beside this script

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402

from lightclip.imagecache import normalise  # noqa: E402
from lightclip.models import ModelSpec, create_model, preprocess_config, tokenizer  # noqa: E402
from lightclip.config import TrainConfig  # noqa: E402
from lightclip.tasks import ConceptInputs, FashionKLIPTask, ImageTextTask, PairSet  # noqa: E402
from lightclip.training import make_optimizer, make_scheduler, train_step  # noqa: E402
from _synthetic import synthetic  # noqa: E402


def time_ours(task, optimizer, scheduler, params, epoch, batch, steps, amp="none", grad_clip_norm=0.0) -> float:
    rng = np.random.default_rng(epoch)
    pairs, start = 0, time.perf_counter()
    for i, b in enumerate(task.train_batches(epoch, rng, batch)):
        if i == steps:
            break
        train_step(task, b, optimizer, scheduler, params, amp=amp, grad_clip_norm=grad_clip_norm)
        pairs += len(b)
    return pairs / (time.perf_counter() - start)


def time_bare(model, optimizer, loss_fn, images, tokens, steps) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        image_features, text_features, logit_scale = model(images, tokens)
        loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        optimizer.step()
    return steps * images.shape[0] / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="lc-vit-t")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="our step's gradient clipping (params.yaml default: 1.0; 0 = off)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = ModelSpec(arch=args.arch)
    n = args.batch * max(args.steps, 2)
    cache, titles, links = synthetic(n, spec.image_size)
    tok = tokenizer(spec)
    config = TrainConfig(epochs=1, batch_size=args.batch, lr=5e-4, weight_decay=0.1, warmup_steps=0, grad_clip_norm=0.0, num_threads=args.threads)
    print(f"{args.arch} at {spec.image_size}px, batch {args.batch}, {args.threads} threads, torch {torch.__version__}, open_clip {open_clip.__version__}")

    ours_model, _ = create_model(spec, seed=0)
    bare_model, _ = create_model(spec, seed=0)
    task = ImageTextTask(ours_model, tok, PairSet(cache, tuple(titles)), None)
    params = [p for _, p in task.named_parameters()]
    optimizer = make_optimizer(task.named_parameters(), config)
    scheduler = make_scheduler(optimizer, config, 10_000)
    pre = preprocess_config(bare_model)
    bare_images = normalise(cache.batch(np.arange(args.batch)), pre["mean"], pre["std"])
    bare_tokens = tok(titles[: args.batch])
    bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=5e-4, weight_decay=0.1)
    loss_fn = open_clip.ClipLoss()

    time_ours(task, optimizer, scheduler, params, 0, args.batch, 2)  # warm-up (first calls are slow)
    time_bare(bare_model, bare_opt, loss_fn, bare_images, bare_tokens, 2)
    ours, bare = [], []
    for r in range(args.rounds):
        ours.append(time_ours(task, optimizer, scheduler, params, r + 1, args.batch, args.steps, grad_clip_norm=args.grad_clip))
        bare.append(time_bare(bare_model, bare_opt, loss_fn, bare_images, bare_tokens, args.steps))
    o, b = float(np.median(ours)), float(np.median(bare))
    print(f"ours (concept off, grad clip {args.grad_clip:g}): {o:7.1f} pairs/s   rounds {[round(x) for x in ours]}")
    print(f"bare open_clip    : {b:7.1f} pairs/s   rounds {[round(x) for x in bare]}")
    print(f"ratio ours/bare   : {o / b:.2f}  ({'OK' if o / b >= 0.9 else 'TOO SLOW'}: must be >= 0.9)")

    # the concept term: same model and batches, concepts on, bank filled (steady state)
    concepts = ConceptInputs.build(cache.ids, links, max_slots=5, prototypes_per_concept=10)
    ctask = FashionKLIPTask(ours_model, tok, PairSet(cache, tuple(titles)), None, concepts=concepts, concept_weight=0.5)
    with torch.no_grad():
        ctask.bank.copy_(torch.nn.functional.normalize(torch.randn_like(ctask.bank), dim=-1))
        ctask.bank_valid.fill_(True)
    time_ours(ctask, optimizer, scheduler, params, 0, args.batch, 2)
    rates = [time_ours(ctask, optimizer, scheduler, params, r + 1, args.batch, args.steps) for r in range(2)]
    c = float(np.median(rates))
    per_batch = np.mean([len(np.unique(concepts.item_concepts[np.arange(i, i + args.batch)][concepts.item_concepts[np.arange(i, i + args.batch)] >= 0])) for i in range(0, n - args.batch + 1, args.batch)])
    print(
        f"concept term on   : {c:7.1f} pairs/s   ({len(concepts.concepts)} concepts, ~{per_batch:.0f} prompts per batch): "
        f"+{(o / c - 1) * 100:.0f}% time per step"
    )

    if not args.skip_bf16:
        time_ours(task, optimizer, scheduler, params, 0, args.batch, 2, amp="bf16")
        fp32, bf16 = [], []
        for r in range(2):
            fp32.append(time_ours(task, optimizer, scheduler, params, r + 1, args.batch, args.steps))
            bf16.append(time_ours(task, optimizer, scheduler, params, r + 1, args.batch, args.steps, amp="bf16"))
        f, h = float(np.median(fp32)), float(np.median(bf16))
        print(f"ours fp32 vs bf16 : {f:7.1f} vs {h:7.1f} pairs/s  (bf16 autocast x{h / f:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
