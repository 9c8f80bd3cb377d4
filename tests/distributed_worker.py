"""One tiny pretrain or distill run, as one process or as a rank under ``torchrun`` (tests/test_distributed.py).

``python distributed_worker.py pretrain|distill WORKSPACE OUT [--kill-at-epoch E]``: trains the
stage's tiny config on the workspace the test built and writes, from rank 0 only, the stage's
outputs under ``OUT`` (``OUT/model``, ``OUT/model.json``) and every step's loss terms
(``OUT/steps.json``). ``--kill-at-epoch E`` stops every rank when epoch ``E`` starts, after the
checkpoint of the epoch before (a kill between two epochs). ``sharded OUT``: checks
:func:`lightclip.distributed.encode_sharded` (see :func:`sharded_encoding`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from lightclip.config import DistillConfig, KGConfig, ModelConfig, PretrainConfig, TrainConfig
from lightclip.distill import DistillInputs, DistillOutputs, run_distill
from lightclip.pretrain import PretrainInputs, PretrainOutputs, run_pretrain
from lightclip.stage import StageContext
from lightclip.tasks import DistillTask, FashionKLIPTask

#: Global batch 16 over 48 training pairs: 3 steps an epoch. No clipping and Adam's eps at 1e-2: the
#: update then depends on the gradient's scale, so gradients summed instead of averaged over the ranks
#: would show in the weights (clipping and a tiny eps make Adam blind to a factor), and a rounding
#: difference in a near-zero gradient is not blown up to a whole step (it is with eps 1e-6).
TRAIN = dict(
    epochs=2, batch_size=16, lr=2e-3, eps=1e-2, weight_decay=0.1, warmup_steps=0, grad_clip_norm=0.0,
    early_stop_patience=0, num_threads=1, log_every_n_steps=1,
)
KG = KGConfig(min_count=2)


def pretrain_config() -> PretrainConfig:
    """The teacher with the concept term (and a prototype refresh after every epoch)."""
    return PretrainConfig(model=ModelConfig(arch="lc-test-tiny"), train=TrainConfig(**TRAIN), concept_weight=0.5, ensemble_members=1)


def distill_config() -> DistillConfig:
    """A tiny student under the pipeline's full edge graph (every edge, projections to the 48-d teacher)."""
    return DistillConfig(students={"tiny": ModelConfig(arch="lc-test-tiny")}, train=TrainConfig(**TRAIN))


class KilledAtEpoch(RuntimeError):
    pass


def kill_at(task_class: Any, epoch: int) -> None:
    """Make ``task_class`` raise when epoch ``epoch`` starts (its checkpoint of the epoch before is written)."""
    original = task_class.train_batches

    def train_batches(self: Any, current: int, rng: Any, batch_size: int) -> Iterator[Any]:
        if current == epoch:
            raise KilledAtEpoch(f"killed before epoch {epoch}")
        return original(self, current, rng, batch_size)

    task_class.train_batches = train_batches


def run(stage: str, workspace: Path, out: Path, *, resume: bool = False) -> dict[str, Any]:
    """Train ``stage`` on ``workspace`` into ``out`` (project dir: ``out``); returns the stage's metrics."""
    steps: list[dict[str, Any]] = []
    context = StageContext(project_dir=out, progress=False, resume=resume, log_metrics=lambda values, step: steps.append({"step": step, **values}))
    model, metrics_path = out / "model", out / "model.json"
    if stage == "pretrain":
        inputs = PretrainInputs(catalogue=workspace / "split", kg=workspace / "kg")
        metrics = run_pretrain(pretrain_config(), inputs, PretrainOutputs(model=model, metrics=metrics_path), context)
    else:
        inputs = DistillInputs(catalogue=workspace / "split", teacher=workspace / "teacher", teacher_embeddings=workspace / "teacher_emb")
        metrics = run_distill(distill_config().job("tiny"), inputs, DistillOutputs(model=model, metrics=metrics_path), context)
    if steps:  # rank 0 (the others get no callback)
        (out / "steps.json").write_text(json.dumps(steps))
    return metrics


def sharded_encoding(out: Path) -> None:
    """``encode_sharded`` over 1, 2 and 5 rows (fewer rows than ranks included): the gathered rows
    and the world-averaged gradient equal one process encoding every row; rank 0 writes ``OUT/sharded.json``."""
    import torch
    import torch.distributed as dist

    from lightclip.distributed import encode_sharded, world

    current = world()
    results = []
    for rows in (1, 2, 5):
        torch.manual_seed(rows)
        inputs, layer = torch.randn(rows, 4), torch.nn.Linear(4, 3)
        gathered = encode_sharded(layer, inputs, current)
        (gathered.square() * torch.arange(1.0, rows + 1)[:, None]).sum().backward()  # rows weighed apart: order matters
        grad = layer.weight.grad.clone()
        dist.all_reduce(grad)
        grad /= current.size  # what DDP does
        layer.weight.grad = None
        expected = layer(inputs)
        (expected.square() * torch.arange(1.0, rows + 1)[:, None]).sum().backward()
        results.append({"rows": rows, "shape": list(gathered.shape), "values": float((gathered - expected).abs().max()),
                        "grad": float((grad - layer.weight.grad).abs().max())})
    if current.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sharded.json").write_text(json.dumps(results))
    dist.barrier()  # neither rank leaves while the other still talks to it
    dist.destroy_process_group()


def main(argv: list[str]) -> int:
    if argv[:1] == ["sharded"]:
        sharded_encoding(Path(argv[1]))
        return 0
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=["pretrain", "distill"])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--kill-at-epoch", type=int)
    args = parser.parse_args(argv)
    if args.kill_at_epoch is not None:
        kill_at(FashionKLIPTask if args.stage == "pretrain" else DistillTask, args.kill_at_epoch)
    try:
        run(args.stage, args.workspace, args.out)
    except KilledAtEpoch as exc:
        print(exc, file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
