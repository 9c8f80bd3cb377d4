"""Shared by the registry tests: tiny models and a tiny catalogue made once per session, and a
:class:`Project` per test (its own directory and SQLite store, a copy of a migrated template:
creating MLflow's schema costs seconds). ``metrics/eval.json`` is written by hand, so the gate
sees the numbers a test chooses.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from lightclip.config import SplitConfig, SynthConfig, load_params
from lightclip.data.catalogue import Catalogue
from lightclip.data.split import assign_splits
from lightclip.data.synth import generate_catalogue
from lightclip.env import TELEMETRY_OFF
from lightclip.evaluation import item_recall_scores
from lightclip.evaluation.stage import RANKS_FORMAT
from lightclip.io import read_json
from lightclip.models.zoo import ModelSpec, create_model, make_ensemble, save_model
from lightclip.registry import TAG_ENCODE_MS, TAG_MEAN_RECALL, TAG_TEACHER_RECALL, TAG_TEST_SET, ModelRegistry
from lightclip.registry.stage import RegisterInputs, RegisterOutputs, run_register
from lightclip.stage import StageContext
from lightclip.tracking import PARENT_RUN_ENV, stage_run

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_MD5 = "0123456789abcdef0123456789abcdef.dir"
STUDENT, TEACHER = "lightclip-student", "lightclip-teacher"
#: Test mean recall per model (the teacher's is 60): a passes, b is far below the teacher,
#: c passes and is within max_regression (1 point) of a.
RECALLS = {"teacher": 60.0, "a": 57.0, "b": 40.0, "c": 56.8}
PROMOTER = Path(__file__).with_name("promoter.py")


def model_dir(name: str) -> str:
    return "models/teacher" if name == "teacher" else f"models/students/{name}"


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A split tiny catalogue, an ensemble teacher and three students (random lc-test-tiny weights), a migrated store."""
    root = tmp_path_factory.mktemp("registry")
    raw = generate_catalogue(root / "data" / "raw", SynthConfig(seed=5, n_items=32, image_size=32), progress=False)
    assign_splits(raw, SplitConfig(seed=0, val=4, test=8)).save(root / "data" / "split")
    spec = ModelSpec(arch="lc-test-tiny")
    for seed, name in enumerate(["members/0", "members/1", "students/a", "students/b", "students/c"]):
        model, _ = create_model(spec, seed=seed)
        save_model(model, spec, root / "models" / name, extra={"stage": "test", "seed": seed})
    # The teacher is an ensemble (as pretrain.ensemble_members makes it): one more model layout to serve.
    teacher = make_ensemble([root / "models" / "members" / "0", root / "models" / "members" / "1"])
    save_model(teacher, "ensemble", root / "models" / "teacher", extra={"stage": "ensemble"})
    MlflowClient(tracking_uri=f"sqlite:///{root / 'template.db'}").search_experiments()  # runs the migrations once
    return root


@dataclass(frozen=True)
class Project:
    """A project directory using the shared models and catalogue, with its own store."""

    root: Path

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow' / 'mlflow.db'}"

    @property
    def report_path(self) -> Path:
        return self.root / "metrics" / "register.json"

    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.root)

    def write_params(self, models: list[str], runtime: str = "torch", **promote) -> Path:
        params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
        params["evaluate"]["models"] = {name: model_dir(name) for name in models}
        params["register"]["latency_runs"] = 5
        params["register"]["latency_warmup"] = 1
        params["register"]["runtime"] = runtime  # onnx exports every model: only the tests of it ask
        params["promote"].update(promote)
        path = self.root / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path

    def write_eval(self, models: list[str], recalls: dict[str, float] | None = None) -> Path:
        recalls = {**RECALLS, **(recalls or {})}
        payload = {}
        for name in models:
            r = recalls[name]
            payload[name] = {"model_dir": model_dir(name), "test/mean_recall": r, "test/i2t_R@1": r / 2, "test/i2t_R@5": r,
                             "test/i2t_R@10": r + 10, "test/t2i_R@1": r / 2, "test/t2i_R@5": r, "test/t2i_R@10": r + 10,
                             "test/n_items": 8, "timing/encode_ms_per_item": 0.5}
        path = self.root / "metrics" / "eval.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
        return path

    def write_ranks(self, ranks: dict[str, tuple[list[int], list[int]]], split: str = "test") -> dict[str, float]:
        """Per-query ranks (i2t, t2i) per model as the evaluate stage writes them; returns the mean recalls they give."""
        payload = {"format": RANKS_FORMAT, "split": split, "ks": [1, 5, 10],
                   "models": {name: {"i2t": list(i2t), "t2i": list(t2i)} for name, (i2t, t2i) in ranks.items()}}
        (self.root / "metrics").mkdir(parents=True, exist_ok=True)
        (self.root / "metrics" / "eval_ranks.json").write_text(json.dumps(payload))
        return {name: float(item_recall_scores(i2t, t2i, (1, 5, 10)).mean()) for name, (i2t, t2i) in ranks.items()}

    def run_stage(self, *, auto_promote: bool | None = None, registry: ModelRegistry | None = None) -> dict:
        """The register stage as the CLI runs it: inside its MLflow run, on the project's params; returns its report."""
        params = load_params(self.root / "params.yaml")
        inputs = RegisterInputs(eval_metrics=self.root / "metrics" / "eval.json", catalogue=self.root / "data" / "split",
                                ranks=self.root / "metrics" / "eval_ranks.json")
        outputs = RegisterOutputs(report=self.report_path)
        with stage_run("register", {}, project_dir=self.root, experiment=params.tracking.experiment):
            return run_register(params, inputs, outputs, StageContext(self.root, progress=False), auto_promote=auto_promote, registry=registry)

    def register(self, models: list[str], recalls: dict[str, float] | None = None, *, auto_promote: bool | None = None, **promote) -> dict:
        """Write params and eval for ``models``, run the stage; returns the report it wrote (metrics/register.json)."""
        self.write_params(models, **promote)
        self.write_eval(models, recalls)
        returned = self.run_stage(auto_promote=auto_promote)
        written = read_json(self.report_path)
        assert returned == written
        return written

    def fake_version(self, recall: float, test_set: str = "t") -> str:
        """A version without a real model (the gate and the aliases only read its tags)."""
        reg = self.registry()
        reg.ensure_model(STUDENT, "test")
        tags = {TAG_MEAN_RECALL: recall, TAG_TEACHER_RECALL: 60.0, TAG_ENCODE_MS: 1.0, TAG_TEST_SET: test_set}
        return str(reg.client.create_model_version(STUDENT, source=f"file://{reg.project_dir}/none", tags=tags).version)


def new_project(root: Path, assets: Path) -> Project:
    (root / "mlflow").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "models").symlink_to(assets / "models")
    (root / "data" / "split").symlink_to(assets / "data" / "split")
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "data.dvc").write_text(f"outs:\n- md5: {DATA_MD5}\n  path: data/raw\n")
    shutil.copy(assets / "template.db", root / "mlflow" / "mlflow.db")
    project = Project(root)
    project.write_params(["teacher", "a"])
    return project


def enter(project: Project, monkeypatch: pytest.MonkeyPatch) -> Project:
    """Work inside the project, against its store, as a known actor."""
    monkeypatch.chdir(project.root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", project.uri)
    monkeypatch.setenv("LIGHTCLIP_ACTOR", "tester@ci")
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    return project


@pytest.fixture
def project(assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    return enter(new_project(tmp_path / "proj", assets), monkeypatch)


@pytest.fixture(scope="session")
def staged_project(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A project where the teacher and student ``a`` were registered once and ``a`` got @staging
    (read by several tests; its first report is kept as ``first_register.json``)."""
    project = new_project(tmp_path_factory.mktemp("staged") / "proj", assets)
    with pytest.MonkeyPatch.context() as monkeypatch:
        enter(project, monkeypatch)
        project.register(["teacher", "a"])
    shutil.copy(project.report_path, project.root / "first_register.json")
    return project


@pytest.fixture
def staged(staged_project: Project, monkeypatch: pytest.MonkeyPatch) -> Project:
    return enter(staged_project, monkeypatch)


@pytest.fixture(scope="session")
def mixed_request(assets: Path) -> pd.DataFrame:
    """Four test titles and their four images (base64 PNG files), in one mixed DataFrame."""
    catalogue = Catalogue.load(assets / "data" / "split")
    items = catalogue.split("test").head(4)
    images = [base64.b64encode(catalogue.image_path(p).read_bytes()).decode() for p in items["image"]]
    return pd.DataFrame({"text": list(items["title"]) + [None] * 4, "image": [None] * 4 + images})


# -- two machines promoting at once ------------------------------------------------------------


def machine_env(uri: str, actor: str) -> dict[str, str]:
    """All a second machine knows: the tracking URI (no database or S3 credentials, no project)."""
    keep = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "TMPDIR") if key in os.environ}
    return {**keep, **TELEMETRY_OFF, "MLFLOW_TRACKING_URI": uri, "LIGHTCLIP_ACTOR": actor}


def fake_versions(registry: ModelRegistry, name: str, recalls: list[float], test_set: str = "t") -> list[str]:
    """Versions that carry only the tags the gate reads, with a source any store accepts."""
    registry.ensure_model(name, "test")
    tags = {TAG_TEACHER_RECALL: 60.0, TAG_ENCODE_MS: 1.0, TAG_TEST_SET: test_set}
    return [str(registry.client.create_model_version(name, source=f"lightclip:/test/{name}", tags={**tags, TAG_MEAN_RECALL: r},
                                                     await_creation_for=0).version) for r in recalls]


def race_promotions(uri: str, name: str, versions: list[str], workdir: Path, rounds: int = 3) -> list[dict]:
    """Each of ``versions`` promoted to ``@production`` ``rounds`` times by its own process (a
    "machine", :mod:`promoter`), all starting together; returns the audit log's moves of ``name``."""
    workdir.mkdir(parents=True, exist_ok=True)
    machines = [subprocess.Popen([sys.executable, str(PROMOTER), name, v, str(rounds), str(workdir)], cwd=workdir,
                                 env=machine_env(uri, f"machine-v{v}"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for v in versions]
    try:
        deadline = time.monotonic() + 120
        while not all((workdir / f"ready-{v}").exists() for v in versions):
            failed = [m for m in machines if m.poll() is not None]
            assert not failed, f"a machine exited before starting: {failed[0].communicate()[0]}"
            assert time.monotonic() < deadline, "the machines did not start within 120 s"
            time.sleep(0.05)
        (workdir / "go").touch()
        for machine in machines:
            output, _ = machine.communicate(timeout=240)
            assert machine.returncode == 0, output
    finally:
        for machine in machines:
            if machine.poll() is None:
                machine.kill()
                machine.wait()
    return [r for r in ModelRegistry(workdir, tracking_uri=uri).audit(name) if r["alias"] == "production"]


def assert_moves_chain(registry: ModelRegistry, name: str, moves: list[dict], versions: list[str]) -> None:
    """No lost update: each move starts where the previous ended, the alias is where the log
    ends, the history is the log's targets, and every machine moved it at least once."""
    assert len(moves) >= 2 and {r["actor"] for r in moves} == {f"machine-v{v}" for v in versions}
    assert moves[0]["from"] is None
    for before, after in zip(moves, moves[1:]):
        assert after["from"] == before["to"], f"lost update: {before} then {after}"
        assert after["seq"] > before["seq"]
    assert registry.aliases(name)["production"] == moves[-1]["to"]
    assert registry.history(name, "production") == [m["to"] for m in moves]
