"""benchmarks/gpu_speed.py in its CPU-only ``--smoke`` mode: every CPU row measured, the GPU rows skipped and said so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lightclip.devices as devices
from conftest import load_script


def gpu_speed_script():
    return load_script("benchmarks/gpu_speed.py", "gpu_speed")


def test_smoke_measures_the_cpu_rows_and_skips_the_gpu_ones(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], one_torch_thread):
    script = gpu_speed_script()
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    written_before = script.DEFAULT_OUT.stat().st_mtime_ns if script.DEFAULT_OUT.exists() else None
    assert script.main(["--smoke"]) == 0
    captured = capsys.readouterr()
    assert "no CUDA device: the GPU rows (cuda x fp32/bf16) are skipped" in captured.err
    result = json.loads(captured.out)  # without CUDA and without --out: printed, metrics/gpu_speed.json untouched
    assert (script.DEFAULT_OUT.stat().st_mtime_ns if script.DEFAULT_OUT.exists() else None) == written_before
    assert result["command"] == "python benchmarks/gpu_speed.py --smoke" and result["smoke"] is True
    assert len(result["skipped"]) == 1 and "gpu" not in result["machine"]
    rows = result["rows"]
    assert {r["device"] for r in rows} == {"cpu"}
    kinds = {(r["what"], r["precision"], r["batch"]) for r in rows}
    for precision in ("none", "bf16"):
        assert {("train_teacher", precision, 8), ("train_student", precision, 8)} <= kinds
        for what in ("encode_image", "encode_text"):
            assert {(what, precision, 1), (what, precision, 256)} <= kinds
    assert all(r.get("pairs_per_s", r.get("items_per_s", 0)) > 0 for r in rows)


def test_out_writes_the_json_and_devices_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_torch_thread):
    script = gpu_speed_script()
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    out = tmp_path / "speed.json"
    assert script.main(["--smoke", "--devices", "cuda", "--out", str(out)]) == 0  # nothing to measure here: only the skip
    result = json.loads(out.read_text())
    assert result["rows"] == [] and "no CUDA device" in result["skipped"][0]
    with pytest.raises(SystemExit, match="--devices: unknown"):
        script.main(["--smoke", "--devices", "tpu"])
