"""Shared fixtures: telemetry off, tool homes in temp dirs, tiny catalogues and projects, the
shared data, and the helpers several test modules use (a training task killed between epochs,
the metrics of a saved model)."""

from __future__ import annotations

import importlib.util
import os
import signal
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping, Sequence

import pytest
import yaml

from lightclip.cli import main as cli_main
from lightclip.env import configure_environment
from lightclip.orchestration import dvc_command, stage_env
from lightclip.tracking import PARENT_RUN_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # Before any library import that reads these: nothing phones home, nothing writes into ~.
    tmp_home = Path(os.environ.get("LIGHTCLIP_TEST_HOME", "/tmp/lightclip-test-home"))
    os.environ.setdefault("PREFECT_HOME", str(tmp_home / "prefect"))
    os.environ.setdefault("MPLCONFIGDIR", str(tmp_home / "matplotlib"))
    os.environ.setdefault("DVC_SITE_CACHE_DIR", str(tmp_home / "dvc-site-cache"))
    configure_environment()


@pytest.fixture(autouse=True)
def no_tracking_uri_leaks() -> Iterator[None]:
    """What a test sets with ``mlflow.set_tracking_uri`` ends with it. That call is process-wide (a
    module global, and ``MLFLOW_TRACKING_URI`` too), so a later test's ``mlflow.search_runs`` read
    another test's store. Function scope: what a module fixture set is already in place here and kept."""
    before_env = os.environ.get("MLFLOW_TRACKING_URI")
    tracking_utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    before_global = getattr(tracking_utils, "_tracking_uri", None)
    yield
    tracking_utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if tracking_utils is not None:
        tracking_utils._tracking_uri = before_global  # MLflow's own holder of set_tracking_uri's value
    if before_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before_env


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``LIGHTCLIP_SHARED`` (default ``../shared`` beside the repo)."""
    return Path(os.environ.get("LIGHTCLIP_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def real_catalogue_dir(shared_dir: Path) -> Path:
    """The real Kaggle-layout catalogue; tests that need it skip cleanly when it is absent."""
    path = shared_dir / "datasets" / "fashion-product-images"
    if not (path / "styles.csv").is_file() or not (path / "images").is_dir():
        pytest.skip(f"shared real catalogue not found at {path} (set LIGHTCLIP_SHARED)")
    return path


def load_script(relative: str, name: str) -> ModuleType:
    """A script of the repository (``benchmarks/``, ``pipelines/``: not packages) as the module
    ``name``, loaded once per session."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / relative)
        assert spec is not None and spec.loader is not None, relative
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def make_image(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: int = 48, fmt: str = "PNG") -> Path:
    """Write a small solid image with a distinct mark so different colours hash differently."""
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), colour)
    ImageDraw.Draw(image).rectangle([size // 4, size // 4, size // 2, size // 2], fill=(255 - colour[0], 255 - colour[1], 255 - colour[2]))
    image.save(path, format=fmt)
    return path


@pytest.fixture
def tiny_catalogue(tmp_path: Path):
    """Factory: ``tiny_catalogue(n=12, **overrides)`` -> a saved, valid Catalogue of n items."""
    from lightclip.data.catalogue import new_catalogue

    colours = ["Red", "Blue", "Green", "Black", "White", "Yellow", "Pink", "Grey"]
    types = [("Tshirts", "Topwear", "Apparel"), ("Dresses", "Dress", "Apparel"), ("Casual Shoes", "Shoes", "Footwear"), ("Handbags", "Bags", "Accessories")]

    def build(n: int = 12, root: Path | None = None) -> "Catalogue":  # noqa: F821
        root = root or tmp_path / "catalogue"
        records = []
        for i in range(n):
            article, sub, master = types[i % len(types)]
            colour = colours[i % len(colours)]
            make_image(root / "images" / f"{i}.png", colour=((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
            records.append(
                {
                    "id": str(1000 + i),
                    "image": f"images/{i}.png",
                    "title": f"Brand{i % 3} Women {colour} {article} {i}",
                    "gender": "Women",
                    "masterCategory": master,
                    "subCategory": sub,
                    "articleType": article,
                    "baseColour": colour,
                    "season": "Summer",
                    "year": 2015,
                    "usage": "Casual",
                }
            )
        return new_catalogue(root, records)

    return build


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect against a temporary server and database for the whole session (started on first use).

    Prefect's own test harness: one subprocess server (about 8 s to start here), shared by every
    flow test, so that no test needs ``PREFECT_API_URL`` or writes into the user's Prefect home.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def shared_mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the CLI tests of this session (creating one costs seconds)."""
    path = tmp_path_factory.getbasetemp() / "lightclip-shared-mlflow"
    path.mkdir(exist_ok=True)
    return f"sqlite:///{path}/mlflow.db"


# -- projects ----------------------------------------------------------------------------------

#: The dvc.yaml of a project whose stages the tests call through the CLI, not through DVC.
NO_STAGES = "stages: {}\n"

#: What a copy of this repository needs for its real DVC pipeline to run: the pipeline, the
#: package its stages depend on, and the ignore rules that keep bytecode out of their hashes.
PIPELINE_FILES = ("dvc.yaml", ".dvcignore", "src/lightclip")

FAKE_DVC_YAML = """\
stages:
  prep:
    cmd: python stage.py prep
    deps: [stage.py]
    params: [split.seed]
    outs: [out/prep]
  train:
    foreach: [a, b]
    do:
      cmd: python stage.py train-${item}
      deps: [out/prep]
      outs: ["out/train-${item}"]
  register:
    cmd: python stage.py register
    deps: [out/train-a, out/train-b]
    metrics:
      - metrics/register.json:
          cache: false
"""

#: A fake stage: counts its attempts in attempts/<name>, fails while FAIL_<name> exists, writes its output.
FAKE_STAGE = """\
import json, pathlib, sys
name = sys.argv[1]
attempts = pathlib.Path("attempts")
attempts.mkdir(exist_ok=True)
with open(attempts / name, "a") as f:
    f.write("x\\n")
if pathlib.Path(f"FAIL_{name}").exists():
    sys.exit(f"{name}: injected failure")
if name == "register":
    metrics = pathlib.Path("metrics")
    metrics.mkdir(exist_ok=True)
    version = str(len((attempts / name).read_text().splitlines()))
    student = {"registered_model": "fake-student", "version": version, "role": "student", "gate": "pass", "reasons": ["fake gate"], "staged": True}
    report = {"model_name": "fake-student", "students": {"a": student}, "staging_before": None, "staging_after": version, "aliases": {"staging": version}}
    (metrics / "register.json").write_text(json.dumps(report))
else:
    import yaml

    out = pathlib.Path("out")
    out.mkdir(exist_ok=True)
    seed = yaml.safe_load(pathlib.Path("params.yaml").read_text())["split"]["seed"]
    (out / name).write_text(f"{name} {seed}")  # a new seed changes every output downstream
"""

FAKE_PARAMS = """\
split:
  seed: 0      # the fake prep stage depends on this
orchestration:
  cron: "0 3 * * *"   # daily: one run at most could come due while a test serves it (it would just run too)
  timezone: UTC
  retries: 2
  retry_delay_seconds: 0.2
  exponential_backoff: true
tracking:
  experiment: fake
"""


def run_checked(cmd: list[str], cwd: Path) -> str:
    """Run a command as the pipeline runs DVC (this venv first on PATH, telemetry off); its stdout."""
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=stage_env())
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def shrink(node: Any) -> None:
    """Every ``train`` section to one epoch of batch 8 on one thread, every model to the tiny
    architecture, every thread count to one (in place, at any depth)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "train" and isinstance(value, dict):
                value.update(epochs=1, batch_size=8, num_threads=1)
            elif key == "arch":
                node[key] = "lc-test-tiny"
            elif key in ("num_threads", "threads"):
                node[key] = 1
            else:
                shrink(value)
    elif isinstance(node, list):
        for item in node:
            shrink(item)


class Projects:
    """Throw-away lightclip projects: the one recipe for the directories tests run stages in.

    ``create`` writes params.yaml and dvc.yaml (an empty pipeline, or this repository's real one
    with the package it runs), optionally under git and DVC; ``tiny_params`` is the repository's
    params.yaml at test size; ``enter`` makes a project the working directory with its own (or a
    given) MLflow store.
    """

    run = staticmethod(run_checked)

    @staticmethod
    def repo_params() -> dict[str, Any]:
        """This repository's params.yaml as plain data (a fresh copy each call)."""
        return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())

    def tiny_params(self) -> dict[str, Any]:
        """The repository's params at test size: 48 items at 32 px, 8 val / 8 test items, tiny
        models, one epoch of batch 8 on one thread, one ensemble member, the first student only
        (in the pipeline and in the ablation, one seed), 8 index queries, 5 latency runs on PyTorch, one retry."""
        params = self.repo_params()
        params["synth"].update(n_items=48, image_size=32)
        params["split"].update(val=8, test=8)
        params["build_kg"]["min_count"] = 2
        shrink(params)
        params["pretrain"]["ensemble_members"] = 1
        students = params["distill"]["students"]
        keep = next(iter(students))
        params["distill"]["students"] = {keep: students[keep]}
        models = params["evaluate"]["models"]
        params["evaluate"]["models"] = {k: v for k, v in models.items() if not str(v).startswith("models/students/") or v == f"models/students/{keep}"}
        params["distill_ablation"].update(students=[keep], seeds=[0])
        params["index"]["eval_queries"] = 8
        params["register"].update(latency_runs=5, latency_warmup=0, runtime="torch")  # ONNX exports: tests/registry
        params["orchestration"].update(retries=1, retry_delay_seconds=0.5)
        return params

    def create(
        self,
        root: Path,
        params: Mapping[str, Any] | str,
        *,
        real_pipeline: bool = False,
        copy: Sequence[str] = (),
        files: Mapping[str, str] | None = None,
        git: bool = False,
        dvc: bool = False,
        dvc_remote: Path | None = None,
        commit: str | None = None,
    ) -> Path:
        """A project at ``root``: ``params`` (YAML text as given, or data), dvc.yaml (empty, or
        with ``real_pipeline`` this repository's pipeline and package), the repository paths in
        ``copy`` and the ``files`` given (name -> text); ``git``/``dvc`` initialise them
        (``dvc_remote``: its default remote), ``commit`` commits everything with that message."""
        root.mkdir(parents=True, exist_ok=True)
        text = params if isinstance(params, str) else yaml.safe_dump(dict(params), sort_keys=False)
        (root / "params.yaml").write_text(text)
        if not real_pipeline:
            (root / "dvc.yaml").write_text(NO_STAGES)
        for relative in (*PIPELINE_FILES, *copy) if real_pipeline else copy:
            source, target = REPO_ROOT / relative, root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(source, target)
        for name, content in (files or {}).items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(content)
        if git or dvc:
            self.run(["git", "init", "-q"], root)
            self.run(["git", "config", "user.email", "test@example.com"], root)
            self.run(["git", "config", "user.name", "lightclip test"], root)
        if dvc:
            self.run(dvc_command("init", "-q"), root)
            self.run(dvc_command("config", "core.analytics", "false"), root)
            if dvc_remote is not None:
                self.run(dvc_command("remote", "add", "-d", "local", str(dvc_remote)), root)
        if commit is not None:
            self.commit(root, commit)
        return root

    def track_synthetic_data(self, root: Path) -> str:
        """Render the project's synthetic catalogue (params ``synth``) into data/raw and track it
        with data.dvc, as ``make data`` does; returns data.dvc's text."""
        assert cli_main(["--project", str(root), "-q", "data", "synth", "--out", str(root / "data" / "raw")]) == 0
        (root / "data.dvc").write_text("outs:\n- path: data/raw\n")
        self.run(dvc_command("commit", "-f", "-q", "data.dvc"), root)
        return (root / "data.dvc").read_text()

    def commit(self, root: Path, message: str) -> None:
        self.run(["git", "add", "-A"], root)
        self.run(["git", "commit", "-q", "-m", message], root)

    def fake_pipeline(self, root: Path) -> Path:
        """A git + DVC project whose pipeline is prep -> train@a, train@b -> register, each stage a
        one-line script (see FAKE_STAGE): DVC and the flow around it, in seconds."""
        files = {"dvc.yaml": FAKE_DVC_YAML, "stage.py": FAKE_STAGE, ".gitignore": "attempts/\nFAIL_*\nmlflow/\n.prefect/\n"}
        return self.create(root, FAKE_PARAMS, files=files, dvc=True, commit="fake pipeline")

    @staticmethod
    def enter(root: Path, monkeypatch: pytest.MonkeyPatch, *, mlflow_uri: str | None = None) -> Path:
        """Work inside ``root``: runs log to ``mlflow_uri`` (default: the project's own store), under
        no parent run from outside."""
        monkeypatch.chdir(root)
        if mlflow_uri is None:
            monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        else:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
        return root


@pytest.fixture(scope="session")
def projects() -> Projects:
    """The project builder (see :class:`Projects`)."""
    return Projects()


@pytest.fixture
def fake_project(projects: Projects, tmp_path: Path) -> Path:
    """The fake pipeline (prep -> train@a, train@b -> register) under git and DVC, in tmp_path/fake."""
    return projects.fake_pipeline(tmp_path / "fake")


# -- training ----------------------------------------------------------------------------------


class KillAt:
    """Wraps a training task; raises ``KillAt.Killed`` when ``train_batches`` starts epoch
    ``epoch``, that is after the checkpoint of the epoch before (a kill between two epochs)."""

    class Killed(RuntimeError):
        pass

    def __init__(self, task: Any, epoch: int) -> None:
        self.task, self.epoch = task, epoch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def train_batches(self, epoch: int, rng: Any, batch_size: int) -> Iterator[Any]:
        if epoch == self.epoch:
            raise KillAt.Killed(f"killed before epoch {epoch}")
        return self.task.train_batches(epoch, rng, batch_size)


@pytest.fixture(scope="session")
def kill_at() -> type[KillAt]:
    """``kill_at(task, epoch)``: the task, killed when epoch ``epoch`` starts (``kill_at.Killed``)."""
    return KillAt


@pytest.fixture(scope="session")
def saved_model_metrics() -> Callable[..., dict[str, float]]:
    """Factory: ``saved_model_metrics(model_dir, catalogue, split, cache_dir)`` -> the trainers'
    ``<split>/*`` retrieval metrics of the model saved in ``model_dir``, reloaded from disk.

    A stage's reported metrics equal these only if the model it saved is the one it scored.
    """
    # Imported when a test asks: torch, open_clip and the trainer take 2-6 s to import, which
    # every test module would otherwise pay through this conftest.
    from lightclip.models.zoo import load_model, load_tokenizer, preprocess_config
    from lightclip.tasks import split_metrics

    def metrics(model_dir: Path, catalogue: Any, split: str, cache_dir: Path) -> dict[str, float]:
        model = load_model(model_dir)
        size = int(preprocess_config(model)["size"])
        return split_metrics(model, load_tokenizer(model_dir), catalogue, split, size, cache_dir, progress=False)

    return metrics


@pytest.fixture
def tiny_pairs(tiny_catalogue, tmp_path):
    """``(train, val)`` pair sets: 32 training and 8 validation pairs at the tiny model's 32 px."""
    from lightclip.tasks import PairSet  # after pytest_configure: open_clip reads the hub settings on import

    catalogue = tiny_catalogue(n=40)
    items = catalogue.items.copy()
    items["split"] = ["val" if i >= 32 else "train" for i in range(len(items))]
    catalogue = catalogue.with_items(items).save()
    return tuple(PairSet.from_catalogue(catalogue, split, 32, tmp_path / "cache", progress=False) for split in ("train", "val"))


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors on one torch thread: spinning pool threads cost seconds on a busy 2-core machine."""
    import torch  # after pytest_configure (see tiny_pairs)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the team deployment (issue #13) -------------------------------------------------------------


@pytest.fixture(scope="session")
def team_services() -> Iterator["TeamServices"]:  # noqa: F821
    """The team deployment (PostgreSQL, SeaweedFS S3, MLflow and Prefect servers, a pool of two
    workers), started once per session and stopped (``down()``) at its end; tests using it are
    marked ``team``. It skips only when PostgreSQL's server binaries are absent.

    Its state lives in a fresh directory under the system temp dir, not pytest's tmp_path: those
    are 0700 and the ``postgres`` system user PostgreSQL runs as (we run as root) must traverse
    the path. ``LIGHTCLIP_KEEP_TEAM_STATE=1`` keeps it (logs, data) after the session.
    """
    from lightclip.services import TeamServices, postgres_available

    if not postgres_available():
        pytest.skip("PostgreSQL server binaries not found (/usr/lib/postgresql/15/bin; apt-get install postgresql)")
    state_dir = Path(tempfile.mkdtemp(prefix="lightclip-team-"))
    team = TeamServices(state_dir)
    try:
        team.up()
        yield team
    finally:
        team.down()
        if os.environ.get("LIGHTCLIP_KEEP_TEAM_STATE") != "1":
            shutil.rmtree(state_dir, ignore_errors=True)


def sigint_as_default() -> None:
    """``preexec_fn`` for a child the test will interrupt: SIGINT back to its default action. A
    shell starts background jobs (``cmd &``, nohup) with SIGINT ignored, and a child inherits that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
