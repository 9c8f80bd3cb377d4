"""benchmarks/arch_speed.py: a variant is an architecture with named config fields changed, or a clear refusal."""

from __future__ import annotations

import pytest

from conftest import load_script
from lightclip.models.zoo import ModelSpec, arch_config, create_model, save_model


@pytest.fixture(scope="module")
def arch_speed():
    return load_script("benchmarks/arch_speed.py", "arch_speed")


def test_a_variant_changes_only_the_fields_it_names(arch_speed):
    name, arch, config = arch_speed.parse_variant("one layer=lc-fast:vision_cfg.layers=1,vision_cfg.patch_size=8")
    base = arch_config("lc-fast")
    assert (name, arch) == ("one layer", "lc-fast")
    assert config["vision_cfg"] == {**base["vision_cfg"], "layers": 1, "patch_size": 8}
    assert config["text_cfg"] == base["text_cfg"] and config["text_tower"] == "pooled"
    assert arch_speed.parse_variant("plain=lc-vit-xxt")[2] == arch_config("lc-vit-xxt")


@pytest.mark.parametrize("spec", ["no-equals-sign", "x=lc-fast:layers=1", "x=lc-fast:nope.layers=1"])
def test_a_malformed_variant_is_refused_with_the_expected_form(arch_speed, spec):
    with pytest.raises(SystemExit, match=r"tower\.key=value"):
        arch_speed.parse_variant(spec)


def test_variants_are_timed_by_the_bench_beside_the_teacher(arch_speed, tmp_path, capsys: pytest.CaptureFixture[str]):
    for name, seed in (("teacher", 0), ("student", 1)):
        save_model(create_model(ModelSpec(arch="lc-test-tiny"), seed=seed)[0], "lc-test-tiny", tmp_path / name)
    argv = ["--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"), "--rounds", "1", "--runs", "100",
            "--batches", "1", "--batch-size", "4", "--variant", "pooled, 1 layer=lc-test-tiny-pooled:vision_cfg.layers=1"]
    assert arch_speed.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| teacher", "| student", "| pooled, 1 layer"]
    assert rows[0].count("×1.00") == 6  # the teacher against itself
    assert all(float(cell.strip(" |×")) > 0 for row in rows for cell in row.split(" | ")[1:])
