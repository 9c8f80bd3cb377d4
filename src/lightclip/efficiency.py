"""How much of the machine's matmul speed encoding uses: achieved GFLOP/s over a measured peak.

A throughput figure (images/s) says how fast a model is, not whether it is fast *for its
size*: a student with a fifth of the teacher's FLOPs that is only twice as fast leaves most of
the CPU idle. This module puts both on one scale:

* :func:`encode_flops` counts (``torch.utils.flop_counter.FlopCounterMode``, not a formula) the
  FLOPs of one image-tower and one text-tower forward at a batch, on the model's real input
  shapes: images at its preprocessing size, token ids at its text context length.
* :func:`matmul_peak_gflops` times a square matmul on the same threads, in the same process:
  what this machine does at best with a GEMM in that dtype.
* :func:`model_efficiency` times the same forwards the FLOPs were counted on (fp32, and under
  bf16 autocast where the CPU has native bf16) and divides: achieved / peak.

bf16 is measured only where the CPU has bf16 instructions (``avx512_bf16`` or ``amx_bf16`` in
``/proc/cpuinfo``): elsewhere oneDNN emulates it and its "peak" would measure the emulation.
int8's peak is ``torch._int_mm`` (checked exact first); its achieved figure times the model's int8
ONNX graphs (``onnx-int8``, :mod:`lightclip.models.onnx_runtime`) where the bench is given them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from lightclip.devices import INT8_FLAGS, autocast, cpu_flags
from lightclip.errors import LightclipError
from lightclip.models.common import unfused_attention
from lightclip.models.zoo import encode_text, load_model, preprocess_config

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
PEAK_SIZES = (1024, 2048)  # square matmul sides; the peak is the best of them
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


class EfficiencyError(LightclipError):
    """A model whose encode inputs cannot be built (no image size or text context length)."""


# ----------------------------------------------------------------------------------------------
# What the CPU has
# ----------------------------------------------------------------------------------------------


def bf16_support() -> tuple[bool, str]:
    """Whether the CPU computes bf16 natively, and why (detected, never assumed)."""
    flags = cpu_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    if flags is None:
        return False, f"CPU flags unreadable (no /proc/cpuinfo); torch CPU capability {capability}"
    found = [f for f in BF16_FLAGS if f in flags]
    if found:
        return True, f"CPU flags {', '.join(found)}; torch CPU capability {capability}"
    return False, f"the CPU has none of {', '.join(BF16_FLAGS)} (torch CPU capability {capability}): bf16 would be emulated"


def int8_support() -> tuple[bool, str]:
    """Whether ``torch._int_mm`` runs an int8 x int8 -> int32 GEMM on CPU here, checked exact."""
    flags = cpu_flags() or frozenset()
    found = [f for f in INT8_FLAGS if f in flags]
    a = torch.randint(-128, 128, (32, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    b = torch.randint(-128, 128, (64, 32), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    try:
        got = torch._int_mm(a, b)
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        return False, f"torch._int_mm does not run on CPU in torch {torch.__version__}: {exc}"
    if got.dtype != torch.int32 or not torch.equal(got.long(), a.long() @ b.long()):
        return False, "torch._int_mm on CPU is not an exact int8 GEMM here"
    return True, f"torch._int_mm (int8 x int8 -> int32); CPU flags {', '.join(found) or 'none of ' + ', '.join(INT8_FLAGS)}"


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

K = TypeVar("K", bound=Hashable)


def time_calls(fn: Callable[[], Any], *, warmup: int, runs: int) -> np.ndarray:
    """Seconds per call of ``fn`` over ``runs`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        t0 = time.perf_counter()
        fn()
        samples[i] = time.perf_counter() - t0
    return samples


def interleaved_timings(
    calls: Mapping[K, Mapping[str, Callable[[], Any]]], *, rounds: int, runs: Mapping[str, int], warmup: Mapping[str, int],
) -> dict[K, dict[str, list[float]]]:
    """Seconds per call of every ``calls[key][kind]``, timed in ``rounds`` interleaved rounds.

    ``runs[kind]`` calls of each kind are split over the rounds; each round times every key in
    turn, starting one further along, so a change of machine state during the measurement (another
    tenant, clock speed) hits every key alike and the ratios between keys stay honest. Each call
    is first made ``warmup[kind]`` times untimed.
    """
    keys = list(calls)
    for key in keys:
        for kind, fn in calls[key].items():
            time_calls(fn, warmup=warmup[kind], runs=0)
    per_round = {kind: max(1, math.ceil(n / rounds)) for kind, n in runs.items()}
    samples: dict[K, dict[str, list[float]]] = {key: {kind: [] for kind in calls[key]} for key in keys}
    for round_ in range(rounds):
        for key in keys[round_ % len(keys) :] + keys[: round_ % len(keys)]:
            for kind, fn in calls[key].items():
                samples[key][kind].extend(time_calls(fn, warmup=0, runs=per_round[kind]).tolist())
    return samples


def best_seconds(fn: Callable[[], Any], *, runs: int, warmup: int = 1) -> float:
    """The fastest of ``runs`` timed calls after ``warmup`` untimed ones: on a shared machine the
    best run is the one least disturbed, so peak and achieved are compared like for like."""
    return float(time_calls(fn, warmup=warmup, runs=max(1, runs)).min())


def matmul_peak_gflops(dtype: torch.dtype, *, sizes: Sequence[int] = PEAK_SIZES, runs: int = 3, seed: int = 0) -> dict[str, Any]:
    """The best GFLOP/s (GOP/s for int8) of an ``n x n`` by ``n x n`` matmul over ``sizes``, on the
    current torch threads. ``{"gflops", "n", "threads"}``; int8 goes through ``torch._int_mm``."""
    gen = torch.Generator().manual_seed(seed)
    best_gflops, best_n = 0.0, 0
    for n in sizes:
        if dtype == torch.int8:
            a = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=gen)
            b = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=gen)
            fn: Callable[[], Any] = lambda a=a, b=b: torch._int_mm(a, b)
        else:
            a = torch.randn(n, n, generator=gen).to(dtype)
            b = torch.randn(n, n, generator=gen).to(dtype)
            fn = lambda a=a, b=b: torch.mm(a, b)
        with torch.inference_mode():
            gflops = 2.0 * n**3 / best_seconds(fn, runs=runs) / 1e9
        if gflops > best_gflops:
            best_gflops, best_n = gflops, n
    return {"gflops": best_gflops, "n": best_n, "threads": torch.get_num_threads()}


def peak_table(*, sizes: Sequence[int] = PEAK_SIZES, runs: int = 3) -> dict[str, dict[str, Any]]:
    """The matmul peak per dtype: fp32 always; bf16 and int8 where :func:`bf16_support` /
    :func:`int8_support` find them, else ``{"available": False, "reason": ...}``."""
    table: dict[str, dict[str, Any]] = {"fp32": {"available": True, **matmul_peak_gflops(torch.float32, sizes=sizes, runs=runs)}}
    for name, (ok, reason) in (("bf16", bf16_support()), ("int8", int8_support())):
        table[name] = {"available": ok, "reason": reason}
        if ok:
            table[name].update(matmul_peak_gflops(DTYPE_NAMES[name], sizes=sizes, runs=runs))
    return table


# ----------------------------------------------------------------------------------------------
# The model's forwards
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodeBatch:
    """One batch of the model's real input shapes: images and token ids."""

    images: torch.Tensor  # batch x 3 x size x size
    tokens: torch.Tensor  # batch x context_length, end-of-text last


def _text_setting(model: nn.Module, name: str) -> int:
    for module in (model, *getattr(model, "members", ())):  # an ensemble's members share the tokenizer
        value = getattr(module, name, None)
        if value:
            return int(value)
    raise EfficiencyError(f"{type(model).__name__} has no text {name}; efficiency needs an open_clip CLIP text tower (or an ensemble of them)")


def encode_batch(model: nn.Module, batch_size: int, *, seed: int = 0) -> EncodeBatch:
    """Random images at the model's preprocessing size and token ids filling its whole text
    context (start token, random ids, end-of-text last, as ``SimpleTokenizer`` lays them out).

    The full context is the text tower's nominal shape; catalogue titles are shorter and
    ``encode_text`` cuts a batch to its longest title, so serving a title costs at most this.
    """
    gen = torch.Generator().manual_seed(seed)
    size = int(preprocess_config(model)["size"])
    context, vocab = _text_setting(model, "context_length"), _text_setting(model, "vocab_size")
    tokens = torch.randint(1, vocab - 2, (batch_size, context), generator=gen)
    tokens[:, 0], tokens[:, -1] = vocab - 2, vocab - 1  # start-of-text, end-of-text (the argmax pooled at)
    return EncodeBatch(images=torch.randn(batch_size, 3, size, size, generator=gen), tokens=tokens)


def encode_calls(model: nn.Module, batch: EncodeBatch) -> dict[str, Callable[[], torch.Tensor]]:
    """The forwards served: ``encode_image`` and ``lightclip.models.encode_text``, normalised."""
    return {
        "image": lambda: model.encode_image(batch.images, normalize=True),
        "text": lambda: encode_text(model, batch.tokens, normalize=True),
    }


# torch's FLOP counter knows the CUDA attention kernels but not the CPU one that
# ``scaled_dot_product_attention`` runs without a mask: the same q k^T and attention x v arithmetic.
def _cpu_attention_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int], *args: Any, **kwargs: Any) -> int:
    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as ``FlopCounterMode`` counts them (matmuls, convolutions, attention)."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with torch.inference_mode(), unfused_attention(), counter:
        fn()
    return int(counter.get_total_flops())


def encode_flops(model: nn.Module, batch_size: int, *, batch: EncodeBatch | None = None) -> dict[str, int]:
    """Counted FLOPs of one image-tower and one text-tower forward of ``batch_size`` items
    (``{"image": ..., "text": ...}``, whole batch), on :func:`encode_batch` inputs."""
    batch = batch if batch is not None else encode_batch(model, batch_size)
    return {kind: count_flops(fn) for kind, fn in encode_calls(model, batch).items()}


def model_efficiency(model: nn.Module, batch_size: int, peaks: Mapping[str, Mapping[str, Any]], *, runs: int = 3, seed: int = 0,
                     int8_model: nn.Module | None = None) -> dict[str, float]:
    """FLOPs per item, achieved GFLOP/s and achieved / peak of both towers, fp32 and (where
    ``peaks`` has it) bf16 autocast; flat keys such as ``image_gflops_fp32``, ``image_peak_ratio_bf16``.

    ``int8_model``: the same weights' int8 graphs on ONNX Runtime (``onnx-int8``), timed on the
    same inputs against the int8 peak; its achieved figure counts the fp32 forward's operations
    (the graphs also keep some in float: attention products, norms, activations)."""
    model = model.eval()
    batch = encode_batch(model, batch_size, seed=seed)
    flops = encode_flops(model, batch_size, batch=batch)
    calls = encode_calls(model, batch)
    out: dict[str, float] = {
        "batch_size": batch_size,
        "image_size": int(batch.images.shape[-1]),
        "context_length": int(batch.tokens.shape[1]),
        "image_mflops_per_item": flops["image"] / batch_size / 1e6,
        "text_mflops_per_item": flops["text"] / batch_size / 1e6,
    }
    for dtype in ("fp32", "bf16"):
        peak = peaks.get(dtype, {})
        if not peak.get("available"):
            continue
        for kind, fn in calls.items():
            with torch.inference_mode(), autocast("bf16" if dtype == "bf16" else "none", "cpu"):
                seconds = best_seconds(fn, runs=runs)
            achieved = flops[kind] / seconds / 1e9
            out[f"{kind}_per_s_{dtype}"] = batch_size / seconds
            out[f"{kind}_gflops_{dtype}"] = achieved
            out[f"{kind}_peak_ratio_{dtype}"] = achieved / float(peak["gflops"])
    if int8_model is not None and peaks.get("int8", {}).get("available"):
        for kind, fn in encode_calls(int8_model, batch).items():
            with torch.inference_mode():
                seconds = best_seconds(fn, runs=runs)
            achieved = flops[kind] / seconds / 1e9
            out[f"{kind}_per_s_int8"] = batch_size / seconds
            out[f"{kind}_gflops_int8"] = achieved
            out[f"{kind}_peak_ratio_int8"] = achieved / float(peaks["int8"]["gflops"])
    return out


def describe(name: str, row: Mapping[str, float]) -> str:
    """One log line: FLOPs per item and the fraction of peak per tower and dtype."""
    parts = [f"{name}: {row['image_mflops_per_item']:.1f} / {row['text_mflops_per_item']:.1f} MFLOP per image / title"]
    for dtype in ("fp32", "bf16", "int8"):
        if f"image_gflops_{dtype}" in row:
            parts.append(
                f"{dtype} image {row[f'image_gflops_{dtype}']:.1f} GFLOP/s ({row[f'image_peak_ratio_{dtype}']:.0%} of peak), "
                f"text {row[f'text_gflops_{dtype}']:.1f} GFLOP/s ({row[f'text_peak_ratio_{dtype}']:.0%})"
            )
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# The bench's section
# ----------------------------------------------------------------------------------------------


def efficiency_report(
    model_dirs: Mapping[str, Path], *, batch_size: int, runs: int, seed: int = 0, log: Callable[[str], None] = print,
    int8_dirs: Mapping[str, Path] | None = None,
) -> dict[str, Any]:
    """The ``efficiency`` section of ``metrics/speed.json``: the peaks once, then every model, all
    on the current torch threads (the bench's ``bench.num_threads``); ``int8_dirs``: the models'
    ONNX exports, whose int8 graphs are timed against the int8 peak (ONNX Runtime on as many threads)."""
    peaks = peak_table(runs=runs)
    threads = torch.get_num_threads()
    log(
        f"efficiency at batch {batch_size} ({threads} threads): matmul peak "
        + ", ".join(f"{d} {p['gflops']:.1f}" if p.get("available") else f"{d} unavailable ({p['reason']})" for d, p in peaks.items())
        + " GFLOP/s"
    )
    models: dict[str, dict[str, float]] = {}
    for name, directory in model_dirs.items():
        int8_model = None
        if int8_dirs and name in int8_dirs and peaks.get("int8", {}).get("available"):
            from lightclip.models.onnx_runtime import load_runtime_model  # onnx and onnxruntime load only when int8 is timed

            int8_model = load_runtime_model(int8_dirs[name], "onnx-int8", threads=threads)
        models[name] = model_efficiency(load_model(directory), batch_size, peaks, runs=runs, seed=seed, int8_model=int8_model)
        log("  " + describe(name, models[name]))
    return {"batch_size": batch_size, "runs": runs, "threads": threads, "peak": peaks, "models": models}


def efficiency_metrics(section: Mapping[str, Any]) -> dict[str, float]:
    """The section's numbers as flat MLflow metric names (``efficiency/<model>/<key>``, ``efficiency/peak/<dtype>_gflops``)."""
    out: dict[str, float] = {}
    for dtype, peak in section.get("peak", {}).items():
        if peak.get("available"):
            out[f"efficiency/peak/{dtype}_gflops"] = float(peak["gflops"])
    for name, row in section.get("models", {}).items():
        out.update({f"efficiency/{name}/{k}": float(v) for k, v in row.items()})
    return out
