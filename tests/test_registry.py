"""The model registry: register + gate + @staging, promote/rollback with an audit trail, the lock,
the fresh-process load through ``models:/lightclip-student@staging``, bad inputs.

Tiny models (``lc-test-tiny``) and a tiny catalogue are made once per module; every test gets its
own project directory and SQLite store (a copy of a migrated template: creating MLflow's schema
costs seconds). ``metrics/eval.json`` is written by hand, so the gate sees the numbers we choose.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_MD5 = "0123456789abcdef0123456789abcdef.dir"
STUDENT, TEACHER = "lightclip-student", "lightclip-teacher"
#: Test mean recall per model (the teacher's is 60): a passes, b is far below the teacher,
#: c passes and is within max_regression (1 point) of a.
RECALLS = {"teacher": 60.0, "a": 57.0, "b": 40.0, "c": 56.8}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A split tiny catalogue, an ensemble teacher and three students (random lc-test-tiny weights), a migrated store."""
    from mlflow.tracking import MlflowClient

    from lightclip.config import SplitConfig, SynthConfig
    from lightclip.data.split import assign_splits
    from lightclip.data.synth import generate_catalogue
    from lightclip.models.zoo import ModelSpec, create_model, make_ensemble, save_model

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


def write_params(project: Path, models: list[str], **promote) -> Path:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["evaluate"]["models"] = {name: "models/teacher" if name == "teacher" else f"models/students/{name}" for name in models}
    params["register"]["latency_runs"] = 5
    params["register"]["latency_warmup"] = 1
    params["promote"].update(promote)
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def write_eval(project: Path, models: list[str], recalls: dict[str, float] | None = None) -> Path:
    recalls = {**RECALLS, **(recalls or {})}
    payload = {}
    for name in models:
        r = recalls[name]
        payload[name] = {"model_dir": "models/teacher" if name == "teacher" else f"models/students/{name}", "test/mean_recall": r,
                         "test/i2t_R@1": r / 2, "test/i2t_R@5": r, "test/i2t_R@10": r + 10, "test/t2i_R@1": r / 2, "test/t2i_R@5": r,
                         "test/t2i_R@10": r + 10, "test/n_items": 8, "timing/encode_ms_per_item": 0.5}
    path = project / "metrics" / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path


def new_project(root: Path, assets: Path) -> Path:
    """A project dir using the shared models and catalogue, with its own store."""
    (root / "mlflow").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "models").symlink_to(assets / "models")
    (root / "data" / "split").symlink_to(assets / "data" / "split")
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "data.dvc").write_text(f"outs:\n- md5: {DATA_MD5}\n  path: data/raw\n")
    shutil.copy(assets / "template.db", root / "mlflow" / "mlflow.db")
    write_params(root, ["teacher", "a"])
    return root


def enter(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the CLI inside ``root``, against its store, as a known actor."""
    from lightclip.tracking import PARENT_RUN_ENV

    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    monkeypatch.setenv("LIGHTCLIP_ACTOR", "tester@ci")
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    return root


@pytest.fixture
def project(assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return enter(new_project(tmp_path / "proj", assets), monkeypatch)


@pytest.fixture(scope="module")
def staged_dir(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project where the teacher and student ``a`` were registered once and ``a`` got @staging
    (read by several tests; its first report is kept as ``first_register.json``)."""
    root = new_project(tmp_path_factory.mktemp("staged") / "proj", assets)
    with pytest.MonkeyPatch.context() as monkeypatch:
        enter(root, monkeypatch)
        register(root, ["teacher", "a"])
    shutil.copy(root / "metrics" / "register.json", root / "first_register.json")
    return root


@pytest.fixture
def staged(staged_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return enter(staged_dir, monkeypatch)


def register(project: Path, models: list[str], recalls: dict[str, float] | None = None, *extra: str, **promote) -> dict:
    from lightclip.cli import main

    write_params(project, models, **promote)
    write_eval(project, models, recalls)
    assert main(["-q", "register", *extra]) == 0
    return json.loads((project / "metrics" / "register.json").read_text())


def registry(project: Path):
    from lightclip.registry import ModelRegistry

    return ModelRegistry(project)


# -- the register stage and the gate ----------------------------------------------------------


def test_register_stages_a_passing_student_with_card_and_tags(staged: Path):
    project = staged
    report = json.loads((project / "first_register.json").read_text())
    assert report["teacher"]["version"] == "1" and report["students"]["a"]["version"] == "1"
    assert report["students"]["a"]["gate"] == "pass" and report["students"]["a"]["staged"]
    assert report["staging_before"] is None and report["staging_after"] == "1" and report["aliases"] == {"staging": "1"}
    assert "teacher_fraction: pass" in " ".join(report["students"]["a"]["reasons"])

    reg = registry(project)
    v = reg.version(STUDENT, "@staging")
    tags = v.tags
    assert tags["lightclip.data_hash"] == DATA_MD5
    assert tags["lightclip.teacher_version"] == f"{TEACHER}/1"
    assert tags["lightclip.git_commit"] and len(tags["lightclip.params_hash"]) == 16 and len(tags["lightclip.test_set"]) == 16
    assert float(tags["lightclip.eval.test/mean_recall"]) == pytest.approx(57.0)
    assert "lightclip.eval.test/i2t_R_at_1" in tags
    assert float(tags["lightclip.speed.encode_ms_p50"]) > 0
    assert tags["lightclip.gate.staging"] == "pass" and tags["lightclip.gate.staging.latency"].startswith("pass: encode p50")
    assert tags["lightclip.alias.staging.moved_by"] == "tester@ci" and tags["lightclip.alias.staging.action"] == "register"
    card = v.description
    for part in ("## Lineage", DATA_MD5, "## Metrics", "| mean recall", "## Speed", "## Limits", "## Promotion gate (@staging): pass"):
        assert part in card
    teacher = reg.version(TEACHER, "1")
    assert teacher.tags["lightclip.role"] == "teacher" and not teacher.aliases
    assert teacher.tags["lightclip.arch"].startswith("ensemble(")

    # The logged model: models from code, no pickle, the package shipped, pinned requirements, a signature.
    local = Path(_download(v.source))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    assert (local / "serving.py").is_file() and (local / "code" / "lightclip" / "registry.py").is_file()
    assert not list(local.rglob("*.pkl")) and not list(local.rglob("__pycache__"))
    assert (local / "artifacts" / "model" / "model.safetensors").is_file()
    requirements = (local / "requirements.txt").read_text()
    assert "torch==" in requirements and "open_clip_torch==" in requirements
    assert [c["name"] for c in json.loads(mlmodel["signature"]["inputs"])] == ["text", "image"]
    assert (local / "input_example.json").is_file()

    # Again with the same weights: the versions are reused, nothing moves.
    audit_lines = len(reg.audit())
    again = register(project, ["teacher", "a"])
    assert again["students"]["a"]["reused"] and again["teacher"]["reused"] and again["students"]["a"]["version"] == "1"
    assert len(reg.versions(STUDENT)) == 1 and len(reg.audit()) == audit_lines == 1


def _download(source: str) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(source, tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def test_failing_candidates_leave_staging_with_reasons_in_tags(staged: Path):
    project, reg = staged, registry(staged)
    report = register(project, ["teacher", "b"])  # far below the teacher
    b = report["students"]["b"]
    assert b["gate"] == "fail" and not b["staged"] and b["version"] != "1"
    assert report["staging_before"] == report["staging_after"] == "1"
    version = reg.version(STUDENT, b["version"])
    assert version.tags["lightclip.gate.staging"] == "fail"
    assert version.tags["lightclip.gate.staging.teacher_fraction"].startswith("fail: test mean recall 40.00 < 0.9 x teacher's 60.00")
    assert "teacher_fraction" in version.tags["lightclip.gate.staging.reasons"]
    assert "Promotion gate (@staging): fail" in version.description

    report = register(project, ["teacher", "c"], None, "--no-promote")  # passes, but no alias moves
    c = report["students"]["c"]
    assert c["gate"] == "pass" and not c["staged"] and report["staging_after"] == "1"
    assert reg.version(STUDENT, c["version"]).tags["lightclip.gate.staging.not_staged"] == "promote.auto is false"

    report = register(project, ["teacher", "c"], None, max_encode_ms=1e-6)  # the same weights, now "too slow"
    assert report["students"]["c"]["reused"] and report["students"]["c"]["gate"] == "fail" and report["staging_after"] == "1"
    assert reg.version(STUDENT, c["version"]).tags["lightclip.gate.staging.latency"].startswith("fail: encode p50")
    assert reg.aliases(STUDENT) == {"staging": "1"}
    assert [(r["action"], r["to"]) for r in reg.audit()] == [("register", "1")]


def test_gate_rules():
    from lightclip.config import PromoteConfig
    from lightclip.registry import Evidence, gate

    config = PromoteConfig(min_teacher_fraction=0.9, max_encode_ms=10, max_regression=1.0)
    good = Evidence(version="2", mean_recall=57.0, teacher_mean_recall=60.0, encode_ms=3.0, test_set="t1")
    assert gate(good, None, config).passed
    assert gate(good, Evidence("1", 57.5, 60.0, 3.0, "t1"), config).passed  # within the margin
    worse = gate(good, Evidence("1", 58.5, 60.0, 3.0, "t1"), config)
    assert not worse.passed and worse.failures == ["regression: test mean recall 57.00 < @staging v1's 58.50 - 1 = 57.50"]
    other_set = gate(good, Evidence("1", 90.0, 60.0, 3.0, "t0"), config)
    assert other_set.passed and "regression: skipped: not comparable" in " ".join(other_set.reasons)
    strict = config.model_copy(update={"require_same_test_set": True})
    assert not gate(good, Evidence("1", 90.0, 60.0, 3.0, "t0"), strict).passed
    slow = gate(Evidence("2", 57.0, 60.0, 11.0, "t1"), None, config)
    assert [c.name for c in slow.checks if c.passed is False] == ["latency"]
    unknown = gate(Evidence("2", None, None, None, None), None, config)
    assert {c.name for c in unknown.checks if c.passed is False} == {"teacher_fraction", "latency"}
    assert gate(good, Evidence("2", 57.0, 60.0, 3.0, "t1"), config).passed  # it is the holder itself


# -- promote, rollback, audit ------------------------------------------------------------------


def fake_version(reg, recall: float, test_set: str = "t") -> str:
    """A version without a real model (the gate and the aliases only read its tags)."""
    from lightclip.registry import TAG_ENCODE_MS, TAG_MEAN_RECALL, TAG_TEACHER_RECALL, TAG_TEST_SET

    reg.ensure_model(STUDENT, "test")
    tags = {TAG_MEAN_RECALL: recall, TAG_TEACHER_RECALL: 60.0, TAG_ENCODE_MS: 1.0, TAG_TEST_SET: test_set}
    return str(reg.client.create_model_version(STUDENT, source=f"file://{reg.project_dir}/none", tags=tags).version)


def test_promote_to_production_and_rollback_with_audit_trail(project: Path, capsys: pytest.CaptureFixture[str]):
    from lightclip.cli import main

    register(project, ["teacher", "a"])  # v1 @staging
    assert main(["registry", "promote", "--to", "production", "--reason", "first release"]) == 0
    assert "@production: none -> v1" in capsys.readouterr().out
    reg = registry(project)
    test_set = reg.version(STUDENT, "1").tags["lightclip.test_set"]
    assert fake_version(reg, 56.8, test_set) == "2"  # within 1 point of v1
    assert main(["registry", "promote", "--to", "staging", "--version", "2"]) == 0
    assert reg.aliases(STUDENT) == {"staging": "2", "production": "1"}
    assert main(["registry", "promote", "--to", "production"]) == 0  # v2 to production
    assert main(["registry", "rollback", "--alias", "production", "--reason", "complaints"]) == 0
    assert main(["registry", "rollback", "--alias", "staging"]) == 0
    assert reg.aliases(STUDENT) == {"staging": "1", "production": "1"}
    capsys.readouterr()

    # A candidate that fails the gate is refused and nothing moves.
    assert fake_version(reg, 40.0, test_set) == "3"  # far below the teacher
    assert main(["registry", "promote", "--to", "production", "--version", "3"]) == 1
    err = capsys.readouterr().err
    assert "fails the gate for @production (nothing moved): teacher_fraction" in err
    assert reg.version(STUDENT, "3").tags["lightclip.gate.production"] == "fail"
    assert reg.aliases(STUDENT) == {"staging": "1", "production": "1"}

    records = reg.audit()
    assert [(r["action"], r["alias"], r["from"], r["to"]) for r in records] == [
        ("register", "staging", None, "1"),
        ("promote", "production", None, "1"),
        ("promote", "staging", "1", "2"),
        ("promote", "production", "1", "2"),
        ("rollback", "production", "2", "1"),
        ("rollback", "staging", "2", "1"),
    ]
    assert all(r["actor"] == "tester@ci" and r["at"] and r["reason"] for r in records)
    assert records[1]["reason"] == "first release" and records[4]["reason"] == "complaints"
    v1, v2 = reg.version(STUDENT, "1").tags, reg.version(STUDENT, "2").tags
    assert v1["lightclip.alias.production.action"] == "rollback" and v1["lightclip.alias.production.reason"] == "complaints"
    assert v2["lightclip.alias.production.replaced_by"].startswith("v1 (rollback by tester@ci")
    assert reg.model(STUDENT).tags["lightclip.alias.production.history"] == "1"

    # Nothing left to roll back to; unknown aliases and versions are named.
    assert main(["registry", "rollback", "--alias", "production"]) == 1
    assert "no previous holder recorded" in capsys.readouterr().err
    assert main(["registry", "rollback", "--alias", "canary"]) == 1
    assert "alias @canary is not set" in capsys.readouterr().err
    assert main(["registry", "show", "@canary"]) == 1
    assert "alias @canary is not set (aliases: @production (v1), @staging (v1))" in capsys.readouterr().err
    assert main(["registry", "show", "9"]) == 1
    assert "no version 9 (versions: 1, 2, 3)" in capsys.readouterr().err

    assert main(["registry", "list"]) == 0
    listing = capsys.readouterr().out
    assert "@production @staging" in listing and "fail" in listing and TEACHER in listing
    assert main(["registry", "show", "@production"]) == 0
    shown = capsys.readouterr().out
    assert "lightclip.alias.production.moved_by = tester@ci" in shown and "## Metrics" in shown

    # An alias moved outside lightclip (the UI) is still a holder that rollback can return to.
    reg.client.set_registered_model_alias(STUDENT, "production", "2")
    assert main(["registry", "promote", "--to", "production", "--version", "1"]) == 0
    assert main(["registry", "rollback", "--alias", "production"]) == 0
    assert reg.aliases(STUDENT)["production"] == "2" and reg.history(STUDENT, "production") == ["1", "2"]


def _promote_worker(uri: str, project: str, version: str, rounds: int, barrier) -> None:
    """One process promoting ``version`` to production ``rounds`` times, with a slow alias write."""
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["LIGHTCLIP_ACTOR"] = f"worker-v{version}"
    from lightclip.config import PromoteConfig
    from lightclip.registry import ModelRegistry

    reg = ModelRegistry(project)
    write_alias = reg.client.set_registered_model_alias

    def slow_alias(*args, **kwargs):  # widen the read-then-write window a lost update needs
        time.sleep(0.05)
        return write_alias(*args, **kwargs)

    reg.client.set_registered_model_alias = slow_alias
    barrier.wait()
    for i in range(rounds):
        reg.promote(STUDENT, to="production", version=version, config=PromoteConfig(), reason=f"round {i}")
        time.sleep(0.01)


def test_concurrent_promotions_keep_aliases_consistent_with_the_audit_log(project: Path):
    reg = registry(project)
    assert [fake_version(reg, 57.0), fake_version(reg, 56.8)] == ["1", "2"]  # each passes the gate against the other
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    workers = [ctx.Process(target=_promote_worker, args=(uri, str(project), v, 3, barrier)) for v in ("1", "2")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0

    moves = [r for r in reg.audit() if r["alias"] == "production"]
    assert len(moves) >= 2 and {r["actor"] for r in moves} == {"worker-v1", "worker-v2"}
    assert moves[0]["from"] is None
    for before, after in zip(moves, moves[1:]):
        assert after["from"] == before["to"], f"lost update: {before} then {after}"
    assert reg.aliases(STUDENT)["production"] == moves[-1]["to"]
    assert reg.history(STUDENT, "production") == [m["to"] for m in moves]


def test_the_lock_times_out_with_a_clear_error(tmp_path: Path):
    from lightclip.registry import RegistryError, file_lock

    with file_lock(tmp_path / "registry.lock"):
        with pytest.raises(RegistryError, match=r"registry lock is still held after 0s \(by pid \d+"):
            with file_lock(tmp_path / "registry.lock", timeout=0.2):
                pass


# -- serving: the pyfunc contract, in this process and in a fresh one --------------------------


def _requests(assets: Path):
    """Four test titles and their four images (base64 PNG files), in one mixed DataFrame."""
    import pandas as pd

    from lightclip.data.catalogue import Catalogue

    catalogue = Catalogue.load(assets / "data" / "split")
    items = catalogue.split("test").head(4)
    images = [base64.b64encode(catalogue.image_path(p).read_bytes()).decode() for p in items["image"]]
    titles = list(items["title"])
    return pd.DataFrame({"text": titles + [None] * 4, "image": [None] * 4 + images})


def test_fresh_process_loads_staging_and_returns_the_same_embeddings(staged: Path, assets: Path, tmp_path: Path):
    import numpy as np

    from lightclip.serving import Embedder

    frame = _requests(assets)
    frame.to_json(tmp_path / "request.json", orient="split")
    script = (
        "import json, sys, numpy as np, pandas as pd, mlflow\n"
        "model = mlflow.pyfunc.load_model('models:/lightclip-student@staging')\n"
        "frame = pd.read_json(sys.argv[1], orient='split')\n"
        "frame = frame.astype(object).where(frame.notna(), None)\n"
        "np.save(sys.argv[2], model.predict(frame))\n"
        "import lightclip\n"
        "print(json.dumps({'lightclip': lightclip.__file__}))\n"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "request.json"), str(tmp_path / "out.npy")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = np.load(tmp_path / "out.npy")
    expected = Embedder(assets / "models" / "students" / "a").embed_frame(frame)
    assert fresh.shape == (8, 32) and fresh.dtype == np.float32
    np.testing.assert_allclose(fresh, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(fresh, axis=1), 1.0, atol=1e-5)
    # The fresh process ran the package shipped inside the model, not this checkout.
    shipped = json.loads(result.stdout.strip().splitlines()[-1])["lightclip"]
    assert str(REPO_ROOT) not in shipped and f"code{os.sep}lightclip" in shipped


def test_serving_contract_and_bad_rows(assets: Path):
    import numpy as np
    import pandas as pd

    from lightclip.serving import Embedder, ServingError

    embedder = Embedder(assets / "models" / "students" / "a")
    frame = _requests(assets)
    mixed = embedder.embed_frame(frame)
    as_bytes = frame.assign(image=[None] * 4 + [base64.b64decode(b) for b in frame["image"][4:]])
    np.testing.assert_allclose(embedder.embed_frame(as_bytes), mixed, atol=1e-6)
    np.testing.assert_allclose(mixed[:4], embedder.embed_texts(list(frame["text"][:4])), atol=1e-6)
    np.testing.assert_allclose(embedder.embed_frame(pd.DataFrame({"image": frame["image"][4:].tolist()})), mixed[4:], atol=1e-6)
    assert embedder.embed_frame(pd.DataFrame({"text": []})).shape == (0, 32)
    bad = [
        (pd.DataFrame({"text": ["a"], "image": [frame["image"][4]]}), "row 0: has both"),
        (pd.DataFrame({"text": [None]}), "row 0: has neither"),
        (pd.DataFrame({"title": ["a"]}), "unknown column(s) ['title']"),
        (pd.DataFrame({"image": ["not base64!"]}), "row 0: column 'image' is a string but not base64"),
        (pd.DataFrame({"image": [base64.b64encode(b"not an image").decode()]}), "row 0: column 'image': cannot decode image"),
    ]
    for request, message in bad:
        with pytest.raises(ServingError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
            embedder.embed_frame(request)


# -- bad inputs ----------------------------------------------------------------------------------


def test_bad_inputs_are_clear_errors(project: Path, capsys: pytest.CaptureFixture[str]):
    from lightclip.cli import main

    def fails(*args: str) -> str:
        assert main(list(args)) == 1
        return capsys.readouterr().err

    write_params(project, ["teacher", "a"])
    assert "no registered model 'lightclip-student'" in fails("registry", "promote", "--to", "production")
    assert "metrics/eval.json: not found; run the evaluate stage first" in fails("register")

    write_eval(project, ["teacher"])
    assert "metrics/eval.json: no metrics for model 'a' (it has: teacher)" in fails("register")

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["models"]["ghost"] = "models/students/ghost"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert "ghost: models/students/ghost does not exist" in fails("register")

    write_params(project, ["a"])
    write_eval(project, ["a"])
    assert "register.teacher 'teacher' is not a model of evaluate.models (a)" in fails("register")

    write_params(project, ["teacher", "a"])
    write_eval(project, ["teacher", "a"])
    payload = json.loads((project / "metrics" / "eval.json").read_text())
    payload["a"]["model_dir"] = "models/students/old"
    (project / "metrics" / "eval.json").write_text(json.dumps(payload))
    assert "'a' was evaluated from models/students/old but evaluate.models says models/students/a" in fails("register")

    fake_version(registry(project), 57.0)  # registered, but nothing at @staging
    assert "nothing to promote: lightclip-student has no version at @staging" in fails("registry", "promote", "--to", "production")
    assert "no registered model 'nope'" in fails("registry", "list", "--name", "nope")


def test_registry_commands_have_help_and_params_are_checked(capsys: pytest.CaptureFixture[str]):
    from lightclip.cli import build_parser
    from lightclip.config import ConfigError, parse_params

    for command in (["register"], ["registry", "list"], ["registry", "show"], ["registry", "promote"], ["registry", "rollback"]):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([*command, "--help"])
        assert exit_info.value.code == 0 and "usage: lightclip" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="students and the teacher need their own names"):
        parse_params({"register": {"model_name": "same", "teacher_model_name": "same"}})
    with pytest.raises(ConfigError, match="'promote.max_regression'"):
        parse_params({"promote": {"max_regression": -1}})
    with pytest.raises(ConfigError, match="unknown key 'promote.min_recall'"):
        parse_params({"promote": {"min_recall": 0.5}})
