"""The register stage refuses a model whose weights are not the ones saved, before it registers,
tags or stages anything."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from lightclip.models import CorruptWeightsError, read_model_info

STUDENT = "lightclip-student"  # register.model_name


def test_register_refuses_flipped_weights_and_registers_nothing(project, assets: Path):
    """Student ``a`` with 4 inverted bytes in the middle of its weights (same size)."""
    (project.root / "models").unlink()  # the shared models are a symlink: corrupt a private copy
    shutil.copytree(assets / "models", project.root / "models")
    model_dir = project.root / "models" / "students" / "a"
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    weights.write_bytes(bytes(data))
    project.write_params(["teacher", "a"])
    project.write_eval(["teacher", "a"])
    with pytest.raises(CorruptWeightsError) as exc:
        project.run_stage()
    message = str(exc.value)
    recorded = read_model_info(model_dir)["weights_sha256"]
    actual = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert f"models/students/a/model.safetensors: weights sha256 {actual} " in message
    assert f"does not match {recorded} recorded in " in message and "models/students/a/model.json" in message
    assert not project.report_path.exists() and not project.registry().exists(STUDENT)
