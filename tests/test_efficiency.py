"""Counted FLOPs, the matmul peak and the bench's ``efficiency`` section, on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightclip import efficiency
from lightclip.efficiency import (
    count_flops, encode_batch, encode_calls, encode_flops, interleaved_timings, matmul_peak_gflops, model_efficiency, peak_table,
)

TINY_SIZES = (64,)  # peak matmul side in tests: the arithmetic, not the machine, is under test


@pytest.fixture(scope="module")
def tiny_model() -> nn.Module:
    from lightclip.models.zoo import ModelSpec, create_model

    model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=0)
    return model.eval()


def test_linear_stack_counts_two_m_n_k_exactly():
    m, k, n, p = 5, 7, 11, 3
    stack = nn.Sequential(nn.Linear(k, n, bias=False), nn.ReLU(), nn.Linear(n, p))  # mm, then addmm
    x = torch.randn(m, k)
    assert count_flops(lambda: stack(x)) == 2 * m * k * n + 2 * m * n * p


def _block_flops(tokens: int, width: int) -> int:
    """One pre-norm transformer block: qkv and out projections, 4x MLP, q k^T and attention x v."""
    return tokens * 2 * (3 + 1 + 8) * width * width + 2 * 2 * tokens * tokens * width


def test_counts_include_attention_and_match_the_transformer_arithmetic(tiny_model: nn.Module):
    # lc-test-tiny: 32 px, patch 8 -> 16 patches + class token; 32 text tokens; width 32, one block each; 32-d output
    image = 2 * 16 * (3 * 8 * 8) * 32 + _block_flops(17, 32) + 2 * 32 * 32  # patch conv, block, projection
    text = _block_flops(32, 32) + 2 * 32 * 32  # block, projection of the end-of-text token
    assert encode_flops(tiny_model, 3) == {"image": 3 * image, "text": 3 * text}
    # the fused attention op of the inference fast path hides its FLOPs from a plain counter
    batch = encode_batch(tiny_model, 3)
    plain = FlopCounterMode(display=False)
    with torch.inference_mode(), plain:
        encode_calls(tiny_model, batch)["image"]()
    assert plain.get_total_flops() < 3 * image
    assert torch.backends.mha.get_fastpath_enabled()  # counting restored it


def test_counts_scale_linearly_with_batch(tiny_model: nn.Module):
    one, four = encode_flops(tiny_model, 1), encode_flops(tiny_model, 4)
    assert four["image"] == 4 * one["image"] > 0
    assert four["text"] == 4 * one["text"] > 0


def test_encode_batch_has_the_model_input_shapes(tiny_model: nn.Module):
    batch = encode_batch(tiny_model, 2)
    assert batch.images.shape == (2, 3, 32, 32)
    assert batch.tokens.shape == (2, 32)
    assert (batch.tokens.argmax(dim=-1) == 31).all()  # end-of-text last: the whole context is encoded


def test_peak_is_positive_and_bf16_follows_the_cpu_flags(monkeypatch: pytest.MonkeyPatch):
    assert matmul_peak_gflops(torch.float32, sizes=TINY_SIZES, runs=1)["gflops"] > 0
    monkeypatch.setattr(efficiency, "cpu_flags", lambda: frozenset({"sse2", "avx2"}))
    table = peak_table(sizes=TINY_SIZES, runs=1)
    assert table["fp32"]["available"] and table["fp32"]["gflops"] > 0
    assert table["bf16"]["available"] is False and "avx512_bf16" in table["bf16"]["reason"] and "gflops" not in table["bf16"]
    monkeypatch.setattr(efficiency, "cpu_flags", lambda: None)
    assert peak_table(sizes=TINY_SIZES, runs=1)["bf16"]["available"] is False
    monkeypatch.setattr(efficiency, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    table = peak_table(sizes=TINY_SIZES, runs=1)
    assert table["bf16"]["available"] and table["bf16"]["gflops"] > 0


def test_int8_peak_only_where_int_mm_runs(monkeypatch: pytest.MonkeyPatch):
    ok, reason = efficiency.int8_support()
    assert reason
    if ok:
        assert matmul_peak_gflops(torch.int8, sizes=TINY_SIZES, runs=1)["gflops"] > 0

    def broken(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no CPU kernel")

    monkeypatch.setattr(torch, "_int_mm", broken)
    ok, reason = efficiency.int8_support()
    assert not ok and "no CPU kernel" in reason


def test_model_efficiency_measures_only_available_dtypes(tiny_model: nn.Module):
    peaks = {"fp32": {"available": True, "gflops": 10.0}, "bf16": {"available": False, "reason": "test"}}
    row = model_efficiency(tiny_model, 4, peaks, runs=1)
    assert row["batch_size"] == 4 and row["image_size"] == 32 and row["context_length"] == 32
    assert row["image_mflops_per_item"] == encode_flops(tiny_model, 1)["image"] / 1e6
    assert row["image_gflops_fp32"] > 0 and row["image_peak_ratio_fp32"] == pytest.approx(row["image_gflops_fp32"] / 10.0)
    assert row["text_peak_ratio_fp32"] > 0
    assert not any(key.endswith("_bf16") for key in row)


def test_int8_graphs_are_timed_against_the_int8_peak(tiny_model: nn.Module, tmp_path: Path):
    from lightclip.models.onnx_runtime import export_onnx, load_runtime_model
    from lightclip.models.zoo import save_model

    save_model(tiny_model, "lc-test-tiny", tmp_path / "student")
    export_onnx(tmp_path / "student")
    int8_model = load_runtime_model(tmp_path / "student", "onnx-int8", threads=1)
    peaks = {"fp32": {"available": True, "gflops": 10.0}, "int8": {"available": True, "gflops": 40.0}}
    row = model_efficiency(tiny_model, 4, peaks, runs=1, int8_model=int8_model)
    for kind in ("image", "text"):  # the fp32 forward's counted operations over the int8 graphs' time
        assert row[f"{kind}_gflops_int8"] == pytest.approx(row[f"{kind}_mflops_per_item"] * row[f"{kind}_per_s_int8"] / 1e3)
        assert row[f"{kind}_peak_ratio_int8"] == pytest.approx(row[f"{kind}_gflops_int8"] / 40.0)
    assert "int8" in efficiency.describe("student", row)
    unavailable = model_efficiency(tiny_model, 4, {**peaks, "int8": {"available": False, "reason": "test"}}, runs=1, int8_model=int8_model)
    assert not any(key.endswith("_int8") for key in unavailable)


def test_bench_report_has_the_efficiency_section(tmp_path: Path):
    from lightclip.bench import bench_report, flat_metrics
    from lightclip.config import BenchConfig, EvaluateConfig, IndexConfig
    from lightclip.models.zoo import ModelSpec, create_model, save_model

    model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=0)
    save_model(model, "lc-test-tiny", tmp_path / "models" / "student")
    models = {"student": "models/student"}
    config = BenchConfig(
        models=models, warmup=1, runs=100, rounds=1, batch_size=4, throughput_batches=1, gallery_size=20, eval_rounds=1,
        num_threads=1, efficiency_batch_size=8, efficiency_runs=1,
    )
    report = bench_report(config, EvaluateConfig(models=models, batch_size=8), IndexConfig(kind="flat"), project_dir=tmp_path, index_scaling=False, log=lambda _: None)
    section = report["efficiency"]
    assert section["batch_size"] == 8 and section["threads"] == 1
    assert section["peak"]["fp32"]["gflops"] > 0 and section["peak"]["fp32"]["threads"] == 1
    row = section["models"]["student"]
    assert row["image_mflops_per_item"] > 0 and row["text_mflops_per_item"] > 0 and row["image_peak_ratio_fp32"] > 0
    metrics = flat_metrics(report)
    assert metrics["efficiency/student/image_peak_ratio_fp32"] == row["image_peak_ratio_fp32"]
    assert metrics["efficiency/peak/fp32_gflops"] == section["peak"]["fp32"]["gflops"]


def test_interleaved_timings_rotate_the_start_and_split_the_runs_over_the_rounds():
    order: list[tuple[str, str]] = []

    def call(key: str, kind: str):
        return lambda: order.append((key, kind))

    calls = {key: {kind: call(key, kind) for kind in ("one", "batch")} for key in ("a", "b", "c")}
    samples = interleaved_timings(calls, rounds=3, runs={"one": 7, "batch": 3}, warmup={"one": 2, "batch": 1})
    assert order[:9] == [("a", "one"), ("a", "one"), ("a", "batch"), ("b", "one"), ("b", "one"), ("b", "batch"),
                         ("c", "one"), ("c", "one"), ("c", "batch")]  # the untimed warm-up
    timed = order[9:]
    starts = [timed[i * 3 * (3 + 1)][0] for i in range(3)]  # each round: 3 keys x (3 "one" + 1 "batch")
    assert starts == ["a", "b", "c"]  # each round starts one key further along
    assert {key: {kind: len(v) for kind, v in kinds.items()} for key, kinds in samples.items()} == {
        key: {"one": 9, "batch": 3} for key in "abc"  # ceil(7 / 3) = 3 per round
    }
    assert all(s >= 0 for kinds in samples.values() for v in kinds.values() for s in v)
