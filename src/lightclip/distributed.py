"""Data-parallel training over processes and machines: ``torch.distributed``, DDP and ``torchrun``.

Nothing here is home-made: ranks are started by ``torchrun`` (the torch elastic agent, or
:func:`launch_local`, which runs it), they meet through its rendezvous and talk through
``torch.distributed`` (gloo on CPU, NCCL on CUDA); gradients are averaged by
``DistributedDataParallel`` and features are gathered with gradients by open_clip's
``gather_features(gather_with_grad=True)`` (``torch.distributed.nn.all_gather``).

The one idea: every rank computes the loss of the *whole* global batch. Each rank encodes its
own slice of the batch (the expensive part), gathers every rank's features with gradients and
then evaluates exactly the single-process loss on the gathered batch: the CLIP term, the
concept term and every distillation edge see the same batch as one process with the global
batch size would. The backward of ``all_gather`` sums the (identical) gradients of the
world's copies of the loss into each rank's slice, ``DistributedDataParallel`` averages the
parameters' gradients over the ranks, and the two factors cancel: each optimizer step is the
single-process step, within float rounding (see docs/distributed.md).

With one process (no ``torchrun``, ``WORLD_SIZE`` unset) every function here is the identity and
no ``torch.distributed`` call is made: single-process results are unchanged.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from open_clip.loss import gather_features
from torch import nn

from lightclip.errors import LightclipError
from lightclip.io import default_threads

log = logging.getLogger(__name__)

#: How long a rank waits for the others at a collective (a rank still decoding images included).
TIMEOUT = timedelta(minutes=60)


class DistributedError(LightclipError, RuntimeError):
    """A distributed run that cannot work as configured (batch not divisible, a world mismatch...)."""


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``size`` ranks, ``local_rank`` of ``local_size`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, outputs, metrics and MLflow runs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a rank started by ``torchrun`` with more than one rank in the world."""
    env = os.environ if environ is None else environ
    return int(env.get("WORLD_SIZE", "1") or "1") > 1


def backend() -> str:
    """gloo for CPU tensors and, where CUDA is present, NCCL for CUDA ones (one group, chosen per tensor).

    Not plain ``nccl`` on a CUDA machine: a model trained on the CPU there still needs gloo.
    """
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def _leave_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as exc:  # a peer already gone: nothing left to tear down cleanly
            log.debug("leaving the process group: %s", exc)


def world() -> World:
    """This process's :class:`World`; joins the process group on the first call under ``torchrun``.

    Without ``torchrun`` (``WORLD_SIZE`` unset or 1) it is ``World()`` and nothing is initialised.
    """
    if not dist.is_available():
        return World()
    if not dist.is_initialized():
        if not launched_by_torchrun():
            return World()
        chosen = backend()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if "nccl" in chosen and local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)  # one GPU per rank, as NCCL expects
        dist.init_process_group(backend=chosen, timeout=TIMEOUT)
        atexit.register(_leave_process_group)  # gloo's threads alive at interpreter exit abort the process
        log.info("rank %d of %d joined the process group (%s)", dist.get_rank(), dist.get_world_size(), chosen)
    return World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )


def threads_per_rank(configured: int | None, current: World) -> int | None:
    """Torch threads of one rank: ``configured`` if set, else the usable CPUs shared by the ranks of this machine.

    ``None`` (one process, nothing configured) keeps :func:`lightclip.io.torch_threads`' own default.
    """
    if configured is not None or current.local_size <= 1:
        return configured
    return max(1, default_threads() // current.local_size)


# ----------------------------------------------------------------------------------------------
# The sampler: global batches drawn as one process draws them, one slice per rank
# ----------------------------------------------------------------------------------------------


def local_size(global_batch: int, current: World) -> int:
    """Rows of a global batch that one rank encodes; the batch must split evenly over the ranks."""
    if global_batch % current.size:
        raise DistributedError(
            f"a batch of {global_batch} pairs does not split over {current.size} ranks: train.batch_size is the global batch "
            f"(and a batch is never larger than the training pairs); make it a multiple of the world size"
        )
    return global_batch // current.size


def shard(rows: np.ndarray, current: World) -> np.ndarray:
    """Rank ``r``'s contiguous slice of a global batch (rank order = the gathered order).

    Like ``torch.utils.data.DistributedSampler`` the order is a pure function of the seed and the
    epoch; unlike it, the split happens per *batch* and contiguously, so the ranks' slices,
    gathered in rank order, are the single-process batch row for row.
    """
    if not current.distributed:
        return rows
    size = local_size(len(rows), current)
    return rows[current.rank * size : (current.rank + 1) * size]


# ----------------------------------------------------------------------------------------------
# Gathering features across ranks
# ----------------------------------------------------------------------------------------------


def gather_pair(image: torch.Tensor, text: torch.Tensor, current: World) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch's image and text features, with gradients (open_clip's ``gather_features``)."""
    if not current.distributed:
        return image, text
    return gather_features(image, text, local_loss=False, gather_with_grad=True, rank=current.rank, world_size=current.size)


def gather_with_grad(tensor: torch.Tensor, current: World) -> torch.Tensor:
    """Every rank's equally-shaped ``tensor`` concatenated in rank order, gradients flowing back to each rank."""
    if not current.distributed:
        return tensor
    return torch.cat(dist_fn.all_gather(tensor), dim=0)


def gather_detached(tensor: torch.Tensor, current: World) -> torch.Tensor:
    """Every rank's equally-shaped ``tensor`` concatenated in rank order, without gradient (teacher targets, ids)."""
    if not current.distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(current.size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def encode_sharded(encode: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, current: World) -> torch.Tensor:
    """``encode(inputs)`` with the rows shared out over the ranks, gathered with gradients.

    For inputs that every rank holds whole (the batch's concept prompts): each rank encodes its
    share, the shares are padded to one size for the collective and trimmed after it. A rank
    whose share is empty encodes one row anyway and drops it, so that it takes part in the
    backward collective (a rank without a graph would never call it, and the others would wait).
    """
    if not current.distributed:
        return encode(inputs)
    total = inputs.shape[0]
    shares = [(total * r // current.size, total * (r + 1) // current.size) for r in range(current.size)]
    start, stop = shares[current.rank]
    width = max(b - a for a, b in shares)
    if stop > start:
        local = encode(inputs[start:stop])
    else:
        spare = encode(inputs[:1])
        local = spare[:0] + spare.sum() * 0.0  # no rows, but in the graph
    pad = local.new_zeros((width - local.shape[0], *local.shape[1:]))
    parts = dist_fn.all_gather(torch.cat([local, pad], dim=0) if pad.shape[0] else local)
    return torch.cat([part[: b - a] for part, (a, b) in zip(parts, shares)], dim=0)


# ----------------------------------------------------------------------------------------------
# Rank 0 decides, the others follow
# ----------------------------------------------------------------------------------------------


def broadcast_object(obj: Any, current: World) -> Any:
    """Rank 0's ``obj`` on every rank (a resumed checkpoint, validation metrics)."""
    if not current.distributed:
        return obj
    box = [obj if current.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_array_(array: np.ndarray, current: World) -> None:
    """Overwrite ``array`` in place with rank 0's values."""
    if not current.distributed:
        return
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    dist.broadcast(tensor, src=0)
    array[...] = tensor.numpy()


def barrier(current: World) -> None:
    if current.distributed:
        dist.barrier()


@contextmanager
def main_first(current: World) -> Iterator[None]:
    """Rank 0 runs the block first (it builds shared caches), the other ranks after it (they reuse them)."""
    if current.distributed and not current.is_main:
        dist.barrier()
    try:
        yield
    finally:
        if current.distributed and current.is_main:
            dist.barrier()


# ----------------------------------------------------------------------------------------------
# DistributedDataParallel around a training task
# ----------------------------------------------------------------------------------------------


class TaskModule(nn.Module):
    """A training task as an ``nn.Module`` for ``DistributedDataParallel``.

    It registers the task's trainable parameters (the same tensors, not copies: the task keeps
    training its own model) and its ``forward`` is the task's loss, so DDP's reducer sees the
    forward pass it needs to average the gradients in the backward.
    """

    def __init__(self, task: Any, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> None:
        super().__init__()
        self.task = task
        for name, param in named_parameters:
            self.register_parameter(name.replace(".", "__"), param)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        return self.task.loss(batch)


def data_parallel(task: Any, named_parameters: Sequence[tuple[str, nn.Parameter]], current: World) -> nn.Module:
    """``DistributedDataParallel`` over the task's parameters; its call is the task's loss.

    Rank 0's parameters are broadcast to the others at construction. ``find_unused_parameters``:
    an edge set may leave a parameter without gradient (the logit scale when every edge has a
    fixed temperature), which single-process AdamW skips and DDP then leaves untouched as well.
    """
    device = next((p.device for _, p in named_parameters), torch.device("cpu"))
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in getattr(task, "model", nn.Module()).modules()):
        log.warning("the model has batch norm layers: each rank normalises its own slice, so training is not the single-process one")
    return nn.parallel.DistributedDataParallel(
        TaskModule(task, named_parameters),
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
        find_unused_parameters=True,
    )


# ----------------------------------------------------------------------------------------------
# Launching ranks on this machine (train.nproc)
# ----------------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for a rendezvous on this machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def torchrun_command(nproc: int, argv: Sequence[str], *, port: int) -> list[str]:
    """``torchrun`` (as ``python -m torch.distributed.run``) running ``lightclip ARGV`` in ``nproc`` ranks here."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
        "-m", "lightclip", *argv,
    ]


def launch_local(nproc: int, argv: Sequence[str]) -> int:
    """Run ``lightclip ARGV`` in ``nproc`` ranks on this machine through ``torchrun``; its exit status.

    What ``train.nproc > 1`` does when ``lightclip`` was not started by ``torchrun`` itself. Each
    rank gets the usable CPUs divided by ``nproc`` as OpenMP threads. SIGINT/SIGTERM are passed to
    the agent, which stops its ranks.
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, default_threads() // nproc)))  # the CLI set this process's to all CPUs
    command = torchrun_command(nproc, argv, port=free_port())
    log.info("launching %d ranks: %s", nproc, " ".join(command))
    process = subprocess.Popen(command, env=env)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def forward(signum: int, _frame: Any) -> None:
        process.send_signal(signum)

    for sig in previous:
        signal.signal(sig, forward)
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
