"""The CLI end to end, in-process: each stage is an MLflow run with lineage tags; errors are clear."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lightclip.cli import build_parser, main
from lightclip.tracking import default_tracking_uri


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, projects) -> Path:
    """A project dir with the repository's params.yaml at 60 synthetic items; the CLI runs from inside it."""
    params = projects.repo_params()
    params["synth"]["n_items"] = 60
    return projects.enter(projects.create(tmp_path / "proj", params), monkeypatch)


def _runs(project: Path) -> pd.DataFrame:
    import mlflow

    mlflow.set_tracking_uri(default_tracking_uri(project))
    return mlflow.search_runs(experiment_names=["lightclip"])


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]):
    commands = [["data", "synth"], ["data", "import-kaggle"], ["data", "import-manifest"], ["data", "import-webdataset"],
                ["data", "export-webdataset"], ["validate"], ["split"], ["build-kg"], ["pretrain"], ["ensemble"], ["teacher-embed"],
                ["distill"], ["evaluate"], ["index"], ["search"], ["bench"], ["register"], ["registry", "promote"], ["pipeline"]]
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([*command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: lightclip" in capsys.readouterr().out


def test_data_stages_chain_and_are_tracked(project: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["-q", "data", "synth", "--out", "data/raw"]) == 0
    assert main(["-q", "validate"]) == 0
    assert main(["-q", "split"]) == 0
    out = capsys.readouterr().out
    assert "60 items" in out and "validation passed: 60 rows in, 60 out, 0 quarantined" in out

    counts = json.loads((project / "metrics" / "split.json").read_text())
    assert counts["train"] + counts["val"] + counts["test"] == 60
    split = pd.read_parquet(project / "data" / "split" / "catalogue.parquet")
    assert set(split["split"]) == {"train", "val", "test"}
    assert (project / "reports" / "validation.md").is_file()

    # --by overrides split.by for one run (pipelines/real splits one catalogue two ways)
    assert main(["-q", "split", "--by", "id_order", "--out", "data/split_new", "--metrics", "metrics/split_new.json"]) == 0
    assert json.loads((project / "metrics" / "split_new.json").read_text())["by"] == "id_order"
    assert json.loads((project / "metrics" / "split.json").read_text())["by"] == "random"
    capsys.readouterr()
    assert main(["-q", "split", "--by", "newest", "--out", "data/split_bad"]) == 1
    assert "--by 'newest'" in capsys.readouterr().err and not (project / "data" / "split_bad").exists()

    runs = _runs(project)
    assert sorted(runs["tags.lightclip.stage"]) == ["split", "split", "synth", "validate"]
    assert set(runs["status"]) == {"FINISHED"}
    for column in ("tags.lightclip.git_commit", "tags.lightclip.git_dirty", "tags.lightclip.data_hash"):
        assert runs[column].notna().all()
    validate = runs[runs["tags.lightclip.stage"] == "validate"].iloc[0]
    assert validate["params.validate.on_error"] == "quarantine"
    assert validate["metrics.rows_in"] == 60


def test_validate_fail_and_quarantine_from_cli(project: Path, tiny_catalogue, capsys: pytest.CaptureFixture[str]):
    catalogue = tiny_catalogue(8, root=project / "broken")
    (project / "broken" / "images" / "2.png").unlink()  # a missing image
    items = catalogue.items.copy()
    items.loc[3, "title"] = ""  # an empty title
    items.loc[5, "id"] = items.loc[4, "id"]  # a duplicate id
    catalogue.with_items(items).save()
    (project / "broken" / "images" / "6.png").write_bytes(b"not an image")  # undecodable

    assert main(["-q", "validate", "--in", "broken", "--out", "clean", "--on-error", "fail"]) == 1
    err = capsys.readouterr().err
    for check in ("image_exists", "title_not_empty", "id_unique", "image_decodes"):
        assert check in err
    assert not (project / "clean" / "catalogue.parquet").exists()

    # the default quarantine refuses to drop 5 of 8 rows (validate.max_quarantine_fraction)
    assert main(["-q", "validate", "--in", "broken", "--out", "clean"]) == 1
    assert "5 of 8 rows (62.5%) would be quarantined" in capsys.readouterr().err
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["validate"]["max_quarantine_fraction"] = 1.0
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["-q", "validate", "--in", "broken", "--out", "clean", "--on-error", "quarantine"]) == 0
    out = capsys.readouterr().out
    assert "8 rows in, 3 out, 5 quarantined" in out and "8 rows in: 3 ok, 0 kept with warnings, 5 quarantined (" in out
    quarantine = pd.read_csv(project / "clean" / "quarantine.csv")
    assert len(quarantine) == 5 and quarantine["reasons"].str.len().gt(0).all()
    runs = _runs(project)
    assert set(runs["status"]) == {"FINISHED", "FAILED"}


def test_config_error_is_clear(project: Path, capsys: pytest.CaptureFixture[str]):
    (project / "params.yaml").write_text("validate:\n  on_eror: fail\n")
    assert main(["-q", "validate"]) == 1
    assert "unknown key 'validate.on_eror'" in capsys.readouterr().err


def test_webdataset_export_import_roundtrip_from_cli(project: Path, tiny_catalogue, capsys: pytest.CaptureFixture[str]):
    tiny_catalogue(5, root=project / "cat")
    assert main(["-q", "data", "export-webdataset", "cat", "--out", "shards", "--shard-size", "2"]) == 0
    assert main(["-q", "data", "import-webdataset", "shards/shard-{000000..000002}.tar", "--out", "back"]) == 0
    out = capsys.readouterr().out
    assert "wrote 3 shard(s)" in out and "wrote 5 items, skipped 0" in out
    back = pd.read_parquet(project / "back" / "catalogue.parquet")
    assert sorted(back["id"]) == [str(1000 + i) for i in range(5)]
    shutil.rmtree(project / "back")


def test_ensemble_command_combines_saved_models(project: Path, capsys: pytest.CaptureFixture[str]):
    import torch

    from lightclip.models.zoo import ModelSpec, create_model, encode_text, load_model, save_model, tokenizer

    for seed in (0, 1):
        model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=seed)
        save_model(model, "lc-test-tiny", project / f"m{seed}")
    assert main(["ensemble", "--member", "m0", "--member", "m1", "--out", "ens"]) == 0
    ensemble = load_model(project / "ens")
    assert type(ensemble).__name__ == "EnsembleCLIP"
    # it embeds as its members do, in order: their unit embeddings side by side, over sqrt(2)
    tokens = tokenizer("lc-test-tiny")(["red floral dress", "navy blue shirt"])
    with torch.no_grad():
        members = [encode_text(load_model(project / f"m{seed}"), tokens, normalize=True) for seed in (0, 1)]
        torch.testing.assert_close(encode_text(ensemble, tokens, normalize=True), torch.cat(members, dim=-1) / 2**0.5)
    assert main(["ensemble", "--member", "m0", "--out", "ens2"]) == 1
    assert "at least 2 --member" in capsys.readouterr().err
    assert main(["ensemble", "--member", "m0", "--member", "nowhere", "--out", "ens2"]) == 1
    assert "--member nowhere: not a saved lightclip model" in capsys.readouterr().err
    assert not (project / "ens2").exists()


def test_the_parser_imports_no_heavy_library():
    """`lightclip --help` and argument errors answer at once: stage modules load in their handler."""
    code = (
        "import sys, lightclip.cli; lightclip.cli.build_parser(); "
        "print(sorted(m for m in ('torch', 'open_clip', 'mlflow', 'faiss', 'great_expectations', 'prefect', 'dvc') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_evaluate_students_names_every_saved_model_under_the_folder(tmp_path: Path):
    from lightclip.cli.common import CliError
    from lightclip.cli.stages import _evaluated_models

    students = tmp_path / "students"
    for name in ("xxt", "xt"):
        (students / name).mkdir(parents=True)
        (students / name / "model.json").write_text("{}")
    (students / "notes").mkdir()  # not a saved model: left out
    assert _evaluated_models(["teacher=models/teacher"], str(students)) == {
        "teacher": "models/teacher", "xt": str(students / "xt"), "xxt": str(students / "xxt")}
    assert list(_evaluated_models(None, str(students))) == ["xt", "xxt"]
    assert _evaluated_models(None, None) is None
    with pytest.raises(CliError, match="'xt' is also given with --model"):
        _evaluated_models(["xt=elsewhere"], str(students))
    with pytest.raises(CliError, match="no saved model"):
        _evaluated_models(None, str(tmp_path / "empty"))
