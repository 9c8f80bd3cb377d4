"""The real-catalogue recipe (pipelines/real): its params stay the project's params but for the
lines it marks, and its one command runs end to end on a tiny catalogue in the Kaggle layout."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import REPO_ROOT, shrink
from lightclip.config import load_params

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import real_table  # noqa: E402

REAL = REPO_ROOT / "pipelines" / "real"
KAGGLE_HEADER = ["id", "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "year", "usage", "productDisplayName"]


def _differences(a: Any, b: Any, path: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return set().union(*(_differences(a.get(k), b.get(k), f"{path}.{k}" if path else k) for k in set(a) | set(b)))
    return set() if a == b else {path}


def test_real_params_are_the_projects_but_for_the_marked_lines():
    """A knob added to params.yaml must reach the recipe too: the files differ only where marked."""
    root = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    real = yaml.safe_load((REAL / "params.yaml").read_text())
    marked = sum(1 for line in (REAL / "params.yaml").read_text().splitlines() if "# real:" in line and not line.startswith("#"))
    models = {f"evaluate.models.{name}" for name in root["evaluate"]["models"]}  # the same names, each order's directories
    assert _differences(root, real) == {"split.val", "split.test", "tracking.experiment"} | models
    assert set(real["evaluate"]["models"]) == set(root["evaluate"]["models"])
    assert marked == 4  # val, test, the models block, the experiment
    load_params(REAL / "params.yaml")  # valid as it stands
    recipe = yaml.safe_load((REAL / "recipe.yaml").read_text())
    assert set(recipe["students"]) == set(real["distill"]["students"])
    assert isinstance(real["split"]["test"], int)  # equal galleries on both sides


def test_table_refuses_galleries_of_different_sizes(tmp_path: Path):
    def side(folder: Path, n_items: int, recall: float) -> Path:
        folder.mkdir()
        (folder / "split.json").write_text(json.dumps({"train": 10, "val": 2, "test": n_items, "by": folder.name}))
        metrics = {f"test/{m}": recall for m in real_table.METRICS} | {"test/n_items": n_items}
        (folder / "eval.json").write_text(json.dumps({"xt": metrics}))
        return folder

    seen, new = side(tmp_path / "random", 4, 50.0), side(tmp_path / "id_order", 4, 40.0)
    table = real_table.compare(real_table.side(seen), real_table.side(new))
    assert table["models"]["xt"]["new_over_in_distribution"] == pytest.approx(0.8)
    assert "| xt | 50.0 | 40.0 | 80% |" in real_table.markdown(table)
    other = side(tmp_path / "other", 5, 40.0)
    with pytest.raises(SystemExit, match="galleries differ"):
        real_table.compare(real_table.side(seen), real_table.side(other))


def test_type_mix_standardisation_reweights_per_type_recall(tmp_path: Path):
    """Per-type recall from each query's rank, reweighted to another test set's mix of types."""
    ranks = {"i2t": [0, 0, 20, 20], "t2i": [0, 20, 20, 20]}  # items: a (all hits), a (half), b, b (none)
    per_item = real_table.per_item_recall(ranks, [1, 5, 10])
    assert per_item == [100.0, 50.0, 0.0, 0.0]
    folder, split = tmp_path / "metrics", tmp_path / "split"
    folder.mkdir(), split.mkdir()
    (folder / "eval_ranks.json").write_text(json.dumps({"split": "test", "ks": [1, 5, 10], "models": {"xt": ranks}}))
    pd.DataFrame({"split": ["train", "test", "test", "test", "test"], "articleType": ["a", "a", "a", "b", "b"]}).to_parquet(split / "catalogue.parquet")
    scores, shares = real_table.by_type(folder, split)
    assert scores["xt"] == {"a": 75.0, "b": 0.0} and shares == {"a": 0.5, "b": 0.5}
    assert real_table.standardise(scores["xt"], shares) == (37.5, 1.0)  # its own mix: the plain mean
    assert real_table.standardise(scores["xt"], {"a": 0.2, "b": 0.6, "c": 0.2}) == (pytest.approx(18.75), pytest.approx(0.8))


def _kaggle_catalogue(synthetic: Path, out: Path) -> Path:
    """The synthetic catalogue written in the Kaggle layout (styles.csv + images/<id>.jpg)."""
    items = pd.read_parquet(synthetic / "catalogue.parquet")
    (out / "images").mkdir(parents=True)
    with open(out / "styles.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(KAGGLE_HEADER)
        for number, row in enumerate(items.itertuples(index=False), start=1000):
            writer.writerow([number, row.gender, row.masterCategory, row.subCategory, row.articleType, row.baseColour,
                             row.season, row.year, row.usage, row.title])
            Image.open(synthetic / row.image).convert("RGB").save(out / "images" / f"{number}.jpg", quality=95)
    return out


@pytest.mark.slow
def test_the_recipe_runs_end_to_end_on_a_tiny_kaggle_catalogue(tmp_path: Path, projects, monkeypatch: pytest.MonkeyPatch):
    params = projects.tiny_params()
    params["synth"]["n_items"] = 64
    root = projects.create(tmp_path / "proj", params, copy=("pipelines/real", "benchmarks/real_table.py", "src/lightclip", ".dvcignore"), dvc=True)
    for leftover in ("data", "models", "metrics", "reports", "mlflow", "dvc.lock", ".cache"):  # a local run's outputs
        target = root / "pipelines" / "real" / leftover
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    from lightclip.cli import main

    assert main(["--project", str(root), "-q", "data", "synth", "--out", str(tmp_path / "synthetic")]) == 0
    kaggle = _kaggle_catalogue(tmp_path / "synthetic", tmp_path / "kaggle")

    real = yaml.safe_load((REAL / "params.yaml").read_text())
    shrink(real)
    real["split"].update(val=8, test=12)
    real["build_kg"]["min_count"] = 2
    real["pretrain"]["ensemble_members"] = 1
    recipe_dir = root / "pipelines" / "real"
    (recipe_dir / "params.yaml").write_text(yaml.safe_dump(real, sort_keys=False))
    recipe = yaml.safe_load((recipe_dir / "recipe.yaml").read_text())
    # one student of the two: the recipe's students list is what the pipeline and the table follow
    (recipe_dir / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "catalogue": str(kaggle), "students": ["xt"]}))

    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    projects.enter(recipe_dir, monkeypatch)
    assert main(["-q", "pipeline", "--name", "real-recipe-test"]) == 0

    table = json.loads((recipe_dir / "metrics" / "real_recipe.json").read_text())
    assert set(table["models"]) == {"teacher", "xt"}
    assert table["in_distribution"]["by"] == "random" and table["new_products"]["by"] == "id_order"
    for row in table["models"].values():
        assert row["in_distribution"]["gallery"] == row["new_products"]["gallery"] == 12
    # new products are the newest ids: every id of the id_order test set is above the train median
    split = json.loads((recipe_dir / "metrics" / "id_order" / "split.json").read_text())
    assert split["order_median"]["test"] > split["order_median"]["train"]
    report = (recipe_dir / "reports" / "real_recipe.md").read_text()
    assert "new / in-distribution" in report and "Mean recall by article type" in report
    assert 0 < table["models"]["xt"]["type_mix_coverage"] <= 1
    assert "Running stage" not in projects.run(["dvc", "repro"], recipe_dir)  # reproduced, nothing stale
