"""Where torch work runs and at which precision: the one reader of the ``device`` and ``amp`` knobs.

``device`` (``auto | cpu | cuda | mps``) is a field of the sections whose stages run a model:
``train`` (pretrain, distill), ``teacher_embed``, ``evaluate`` and ``index``, the way
``num_threads`` is; each of those stages runs in its own process and may run on another machine
(an index rebuilt on a CPU server, a teacher embedded on a GPU box), so one global value would
not do. Every stage turns its value into a :class:`torch.device` here, with
:func:`resolve_device`, and nowhere else.

CPU results do not change: on CPU nothing is pinned, nothing is copied (:func:`to_device`
returns its input), no grad scaler exists and ``bf16`` keeps its CPU autocast, so a CPU run
executes exactly the operations it did before devices existed. On CUDA, batches are pinned
and copied with ``non_blocking=True`` (the copy overlaps the previous step's kernels), ``bf16``
and ``fp16`` autocast on CUDA, and ``fp16`` scales the loss with
:class:`torch.amp.GradScaler` (fp16 gradients underflow otherwise; bf16 has fp32's range).
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import torch

from lightclip.config import ConfigError

T = TypeVar("T")

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("none", "bf16", "fp16")


#: int8 dot-product instructions (VNNI): int8 GEMMs without the u8 x s8 saturation of AVX2/AVX-512 alone
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags() -> frozenset[str] | None:
    """The CPU's instruction-set flags from ``/proc/cpuinfo``; ``None`` where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def cuda_available() -> bool:
    """Whether a CUDA device can be used (a seam: tests patch it to exercise the CUDA branches)."""
    return torch.cuda.is_available()


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str, *, field: str = "train.device") -> torch.device:
    """The :class:`torch.device` of a ``device`` knob; a :class:`ConfigError` naming ``field`` when absent.

    ``auto``: CUDA when present, else CPU (never MPS: its kernels are not bit-compatible with the
    CPU's and several open_clip ops fall back to the CPU, so it is only used when asked for).
    Under ``torchrun`` with CUDA each rank gets its own GPU (``cuda:<local rank>``, the one
    :mod:`lightclip.distributed` selected).
    """
    if name not in DEVICES:
        raise ConfigError(f"{field}: {name!r} is not a device; allowed: {', '.join(DEVICES)}")
    if name == "cpu" or (name == "auto" and not cuda_available()):
        return torch.device("cpu")
    if name in ("auto", "cuda"):
        if not cuda_available():
            raise ConfigError(f"{field}: cuda, but torch sees no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); set {field}: auto or cpu")
        return torch.device("cuda", torch.cuda.current_device())
    if not mps_available():
        raise ConfigError(f"{field}: mps, but torch's MPS backend is not available on this machine; set {field}: auto or cpu")
    return torch.device("mps")


def check_precision(amp: str, device: torch.device, *, field: str = "train.amp") -> str:
    """``amp`` if ``device`` supports it; a :class:`ConfigError` naming ``field`` otherwise.

    ``fp16`` needs CUDA (CPU autocast in fp16 is slow and has no loss scaling here); ``bf16``
    runs on CPU and CUDA; MPS trains in fp32 only.
    """
    if amp not in PRECISIONS:
        raise ConfigError(f"{field}: {amp!r} is not a precision; allowed: {', '.join(PRECISIONS)}")
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(f"{field}: fp16 needs a CUDA device, but the device is {device.type}; use bf16 or none")
    if amp != "none" and device.type == "mps":
        raise ConfigError(f"{field}: {amp} is not supported on mps; use none")
    return amp


def training_device(device: str, amp: str, *, section: str = "train") -> torch.device:
    """The device a ``<section>`` trains on, after checking that it supports ``amp``.

    Stages call it before any heavy work (a missing GPU fails in a second, naming the field);
    the training loop calls it again to place the task.
    """
    resolved = resolve_device(device, field=f"{section}.device")
    check_precision(amp, resolved, field=f"{section}.amp")
    return resolved


def autocast(amp: str, device: torch.device | str = "cpu") -> AbstractContextManager[Any]:
    """The autocast region of a forward pass: ``bf16``/``fp16`` on ``device``'s type, else nothing."""
    device_type = torch.device(device).type
    if amp == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if amp == "fp16":
        return torch.autocast(device_type, dtype=torch.float16)
    return nullcontext()


def grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 on CUDA; ``None`` otherwise (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" and device.type == "cuda" else None


def to_device(value: T, device: torch.device) -> T:
    """``value`` (a tensor, dataclass, dict, list or tuple of them) on ``device``.

    On CPU it is returned as it is (the same objects: CPU runs are untouched). On CUDA each CPU
    tensor is pinned and copied with ``non_blocking=True``; the copy is ordered on the current
    stream before any kernel that reads it, so no synchronisation is needed.
    """
    if device.type == "cpu":
        return value
    return _move(value, device)


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        cuda = device.type == "cuda"
        if cuda and value.device.type == "cpu":
            value = value.pin_memory()
        return value.to(device, non_blocking=cuda)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _move(getattr(value, f.name), device) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, device) for v in value)
    return value


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (CPU for one without any)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def describe(device: torch.device) -> dict[str, Any]:
    """What a run logs about its device (name, memory), so a metric says where it was measured."""
    info: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"device_name": props.name, "device_memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    return info
