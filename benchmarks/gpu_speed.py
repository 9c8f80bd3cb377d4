"""Training and encoding speed per device and precision: CPU vs CUDA, fp32 vs bf16.

    python benchmarks/gpu_speed.py                      # on a CUDA machine: writes metrics/gpu_speed.json
    python benchmarks/gpu_speed.py --smoke --out X.json  # tiny, CPU only: checks the script itself

Rows, each for every device (``cpu``, and ``cuda`` when torch sees one) and precision (``none``
= fp32, ``bf16`` autocast):

* ``train_teacher``: pairs/s of the teacher's training step (:class:`FashionKLIPTask`, CLIP +
  the concept term, the pipeline's teacher arch), through :func:`lightclip.training.train_step`
  with the batch copy and the grad scaler the loop uses (:mod:`lightclip.devices`);
* ``train_student``: pairs/s of the student's step (:class:`DistillTask` under the pipeline's
  distillation edges, teacher embeddings from a cache as the pipeline does);
* ``encode_image`` / ``encode_text``: items/s of the embedding path
  (:mod:`lightclip.evaluation.embedding`) at batch 1 and batch 256, for the teacher and the student.

Inputs are synthetic (random pixels, catalogue-like titles): speed does not depend on content.
Each timed region ends with a CUDA synchronisation. Without CUDA the GPU rows are skipped with
a message saying so and no file is written unless ``--out`` is given; ``--smoke`` shrinks every
size (tiny arch, a few steps) so that the whole script runs on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _synthetic, beside this script

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lightclip import devices  # noqa: E402
from lightclip.config import DistillConfig, Params, TrainConfig  # noqa: E402
from lightclip.evaluation.embedding import embed_images, embed_texts  # noqa: E402
from lightclip.io import write_json  # noqa: E402
from lightclip.models import ModelSpec, create_model, preprocess_config, tokenizer  # noqa: E402
from lightclip.tasks import ConceptInputs, DistillTask, FashionKLIPTask, PairSet  # noqa: E402
from lightclip.teacher_cache import TeacherEmbeddings  # noqa: E402
from lightclip.training import make_optimizer, make_scheduler, move_task, train_step  # noqa: E402
from _synthetic import synthetic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "metrics" / "gpu_speed.json"
PRECISIONS = ("none", "bf16")
ENCODE_BATCHES = (1, 256)


def embed_width(model: torch.nn.Module) -> int:
    """A model's embedding width (its config's, else its text projection's)."""
    dim = int(getattr(model, "lightclip_config", {}).get("embed_dim", 0) or 0)
    return dim or int(model.text_projection.shape[-1])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(task: Any, device: torch.device, amp: str, batch: int, warmup: int, steps: int) -> float:
    """Pairs/s of ``steps`` training steps after ``warmup`` untimed ones (the loop's own step)."""
    move_task(task, device)
    config = TrainConfig(batch_size=batch, amp=amp, warmup_steps=0, grad_clip_norm=1.0)
    named = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(named, config)
    scheduler = make_scheduler(optimizer, config, warmup + steps)
    scaler = devices.grad_scaler(amp, device)
    params = [p for _, p in named]
    batches = iter(())
    epoch = 0

    def next_batch() -> Any:
        nonlocal batches, epoch
        for b in batches:
            return b
        epoch += 1
        batches = iter(task.train_batches(epoch, np.random.default_rng(epoch), batch))
        return next(batches)

    def run(n: int) -> None:
        for _ in range(n):
            train_step(task, next_batch(), optimizer, scheduler, params, grad_clip_norm=1.0, amp=amp, device=device, scaler=scaler)

    run(warmup)
    synchronize(device)
    start = time.perf_counter()
    run(steps)
    synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def time_encode(encode: Callable[[], torch.Tensor], n_items: int, device: torch.device, amp: str, repeats: int) -> float:
    """Items/s of the embedding path (one warm-up call, then the best of ``repeats``)."""
    with devices.autocast(amp, device):
        encode()
        best = float("inf")
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            encode()
            synchronize(device)
            best = min(best, time.perf_counter() - start)
    return n_items / best


def teacher_task(arch: str, pairs: PairSet, links: list[list[str]]) -> FashionKLIPTask:
    spec = ModelSpec(arch=arch)
    model, _ = create_model(spec, seed=0)
    concepts = ConceptInputs.build(pairs.images.ids, links, max_slots=5, prototypes_per_concept=10)
    return FashionKLIPTask(model, tokenizer(spec), pairs, None, concepts=concepts, concept_weight=Params().pretrain.concept_weight)


def student_task(arch: str, pairs: PairSet, teacher_dim: int) -> DistillTask:
    spec = ModelSpec(arch=arch)
    model, _ = create_model(spec, seed=0)
    rng = np.random.default_rng(1)

    def unit(n: int) -> np.ndarray:
        x = rng.standard_normal((n, teacher_dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    n = len(pairs)
    cache = TeacherEmbeddings(ids=tuple(pairs.images.ids), image=unit(n), text=unit(n), image_hflip=unit(n), split="train",
                              catalogue_sha256="synthetic", teacher_sha256="synthetic", teacher_arch="synthetic",
                              image_size=pairs.images.image_size, teacher_logit_scale=100.0)
    distill: DistillConfig = Params().distill
    return DistillTask(model, tokenizer(spec), pairs, None, edges=distill.edges, teacher=cache, projection=True, seed=0)


def measure(args: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for role, arch in (("teacher", args.teacher_arch), ("student", args.student_arch)):
        size = int(preprocess_config(create_model(ModelSpec(arch=arch), seed=0)[0])["size"])
        images, titles, links = synthetic(args.items, size)
        pairs = PairSet(images=images, titles=tuple(titles))
        for amp in PRECISIONS:
            if role == "teacher":
                task: Any = teacher_task(arch, pairs, links)
            else:
                task = student_task(arch, pairs, embed_width(create_model(ModelSpec(arch=args.teacher_arch), seed=0)[0]))
            rate = time_steps(task, device, amp, args.batch, args.warmup, args.steps)
            rows.append({"what": f"train_{role}", "arch": arch, "device": device.type, "precision": amp, "batch": args.batch, "pairs_per_s": round(rate, 1)})
            log(f"  train_{role:7s} {arch:12s} {device.type:4s} {amp:4s} batch {args.batch}: {rate:9.1f} pairs/s")
            model = task.model
            tokens = tokenizer(ModelSpec(arch=arch))(titles)
            for batch in ENCODE_BATCHES:
                n = min(len(titles), batch * args.encode_batches) if batch > 1 else min(len(titles), args.batch1_calls)
                image_rate = time_encode(lambda: embed_images(model, images.batch(np.arange(n)), batch), n, device, amp, args.repeats)
                text_rate = time_encode(lambda: embed_texts(model, tokens[:n], batch), n, device, amp, args.repeats)
                for what, rate in (("encode_image", image_rate), ("encode_text", text_rate)):
                    rows.append({"what": what, "arch": arch, "device": device.type, "precision": amp, "batch": batch, "items_per_s": round(rate, 1)})
                log(f"  encode       {arch:12s} {device.type:4s} {amp:4s} batch {batch:3d}: images {image_rate:9.1f}/s, texts {text_rate:9.1f}/s")
            del task, model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    params = Params()
    first_student = next(iter(params.distill.students.values())).arch
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-arch", default=params.pretrain.model.arch)
    parser.add_argument("--student-arch", default=first_student)
    parser.add_argument("--batch", type=int, default=params.pretrain.train.batch_size, help="training batch (pairs per step)")
    parser.add_argument("--items", type=int, default=2048, help="synthetic pairs (the encode rows use up to batch x encode_batches)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--encode-batches", type=int, default=4, help="batches of 256 per encode timing")
    parser.add_argument("--batch1-calls", type=int, default=64, help="items encoded one by one per batch-1 timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated: cpu, cuda")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON results (default with CUDA: {DEFAULT_OUT.relative_to(REPO)})")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing useful")
    args = parser.parse_args(argv)
    if args.smoke:
        args.teacher_arch = args.student_arch = "lc-test-tiny"
        args.batch, args.items, args.warmup, args.steps = 8, 32, 1, 2
        args.encode_batches, args.batch1_calls, args.repeats = 1, 4, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/gpu_speed.py" + ("" if argv is None and len(sys.argv) == 1 else " " + shlex.join(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = [d.strip() for d in args.devices.split(",") if d.strip()]
    unknown = sorted(set(wanted) - {"cpu", "cuda"})
    if unknown:
        raise SystemExit(f"--devices: unknown {unknown}; allowed: cpu, cuda")
    skipped: list[str] = []
    chosen: list[torch.device] = []
    for name in wanted:
        if name == "cuda" and not devices.cuda_available():
            message = "no CUDA device: the GPU rows (cuda x fp32/bf16) are skipped; run this script on a CUDA machine for them"
            print(message, file=sys.stderr)
            skipped.append(message)
            continue
        chosen.append(devices.resolve_device(name, field="--devices"))
    rows: list[dict[str, Any]] = []
    for device in chosen:
        print(f"{device}:", file=sys.stderr)
        rows.extend(measure(args, device, lambda line: print(line, file=sys.stderr)))
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
               "torch_threads": torch.get_num_threads(), **({"gpu": devices.describe(chosen[-1])} if chosen and chosen[-1].type == "cuda" else {})}
    result = {"command": command, "smoke": args.smoke, "machine": machine, "rows": rows, "skipped": skipped}
    out = args.out or (DEFAULT_OUT if any(d.type == "cuda" for d in chosen) and not args.smoke else None)
    if out is not None:
        write_json(out, result)
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
