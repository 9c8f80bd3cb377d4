"""One tiny pretrain from WebDataset shards, as a rank under ``torchrun`` (tests/test_trainstream.py).

``python trainstream_worker.py WORKSPACE OUT``: trains the concept teacher for 2 epochs with
``train.images.source: webdataset`` and writes ``OUT/rank<r>.json`` (the rows of every batch this
rank streamed, per epoch, and which shards it read) and, from rank 0, the stage's metrics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch.distributed as dist

from lightclip.config import ModelConfig, PretrainConfig, TrainConfig, TrainImagesConfig
from lightclip.distributed import world
from lightclip.pretrain import PretrainInputs, PretrainOutputs, run_pretrain
from lightclip.stage import StageContext
from lightclip.trainstream import ShardTrainStream, StreamBatch

BATCH_SIZE = 12  # 6 a rank


def record_epochs(log: list[dict[str, Any]]) -> None:
    """Wrap :meth:`ShardTrainStream.epoch` so every batch's rows (and the rank's shards) land in ``log``."""
    original = ShardTrainStream.epoch

    def epoch(self: ShardTrainStream, rng: np.random.Generator, batch_size: int, *, hflip: bool = True) -> Iterator[StreamBatch]:
        entry: dict[str, Any] = {"batches": []}
        log.append(entry)
        for batch in original(self, rng, batch_size, hflip=hflip):
            entry["batches"].append(batch.rows.tolist())
            entry["shards"] = [p.name for p in self._reader.shards]
            yield batch

    ShardTrainStream.epoch = epoch  # type: ignore[method-assign]


def main(argv: list[str]) -> int:
    workspace, out = Path(argv[0]), Path(argv[1])
    current = world()
    log: list[dict[str, Any]] = []
    record_epochs(log)
    images = TrainImagesConfig(source="webdataset", shards=str(workspace / "shards" / "shard-*.tar"), shuffle_buffer=8, decode_threads=1)
    config = PretrainConfig(
        model=ModelConfig(arch="lc-test-tiny"),
        train=TrainConfig(epochs=2, batch_size=BATCH_SIZE, lr=1e-3, warmup_steps=0, early_stop_patience=0, num_threads=1, images=images),
        concept_weight=0.5,
        ensemble_members=1,
    )
    outputs = PretrainOutputs(model=out / "model", metrics=out / "model.json")
    context = StageContext(project_dir=out, progress=False)
    run_pretrain(config, PretrainInputs(catalogue=workspace / "split", kg=workspace / "kg"), outputs, context)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{current.rank}.json").write_text(json.dumps(log))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
