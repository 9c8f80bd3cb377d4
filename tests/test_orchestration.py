"""lightclip.orchestration: stage order, params overrides, the up-to-date rule, the report.

No Prefect here (the flow itself: tests/test_retrain_flow.py); DVC runs on the fake pipeline of
tests/conftest.py (``fake_project``), whose stages are one-line Python scripts, so each check
takes a second or two.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import sigint_as_default
import yaml

from lightclip import orchestration as orch
from lightclip.config import ConfigError, OrchestrationConfig, parse_params

REPO_ROOT = Path(__file__).resolve().parents[1]


# -- stage order -------------------------------------------------------------------------------


def test_groups_follow_dependencies_with_foreach_entries_in_one_task_and_register_last():
    addresses = ["register", "validate", "distill@xt", "distill@xxt", "pretrain", "evaluate", "index"]
    edges = [
        ("pretrain", "validate"),
        ("distill@xt", "pretrain"),
        ("distill@xxt", "pretrain"),
        ("evaluate", "distill@xt"),
        ("evaluate", "distill@xxt"),
        ("index", "pretrain"),
    ]
    groups = orch.order_groups(addresses, edges)
    assert [g.name for g in groups] == ["validate", "pretrain", "distill", "evaluate", "index", "register"]
    assert groups[2].targets == ("distill@xt", "distill@xxt")


def test_a_stage_that_depends_on_register_is_an_error():
    with pytest.raises(orch.OrchestrationError, match="last step"):
        orch.order_groups(["register", "publish"], [("publish", "register")])


def test_stage_groups_read_the_projects_dvc_yaml(fake_project: Path):
    groups = orch.stage_groups(fake_project)
    assert [(g.name, g.targets) for g in groups] == [("prep", ("prep",)), ("train", ("train@a", "train@b")), ("register", ("register",))]


def test_stage_groups_of_this_repository_start_with_validate_and_cover_every_stage():
    groups = orch.stage_groups(REPO_ROOT)
    names = [g.name for g in groups]
    top_level = list(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"])
    assert names[0] == "validate" and names[-1] == "register" and sorted(names) == sorted(top_level)


# -- params overrides --------------------------------------------------------------------------


def test_override_changes_only_the_value_and_keeps_comments(tmp_path: Path):
    params = tmp_path / "params.yaml"
    original = (REPO_ROOT / "params.yaml").read_text()
    params.write_text(original)
    changes = orch.apply_params_overrides(tmp_path, orch.normalise_overrides(["pretrain.train.lr=0.001", "index.split=test"]))
    assert changes == {"pretrain.train.lr": (0.0005, 0.001), "index.split": (None, "test")}
    new = params.read_text()
    diff = [(a, b) for a, b in zip(original.splitlines(), new.splitlines()) if a != b]
    assert len(diff) == 2 and len(original.splitlines()) == len(new.splitlines())
    assert "# null = every item" in diff[1][1] and diff[1][1].split("#")[0].strip() == "split: test"
    loaded = yaml.safe_load(new)
    assert loaded["pretrain"]["train"]["lr"] == 0.001 and loaded["index"]["split"] == "test"


def test_override_of_a_multiline_value_goes_through_dvc(tmp_path: Path):
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    orch.apply_params_overrides(tmp_path, orch.normalise_overrides({"validate.allowed_values.baseColour": "[Red, Blue]"}))
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["validate"]["allowed_values"]["baseColour"] == ["Red", "Blue"]


@pytest.mark.parametrize(
    ("override", "message"),
    [("nope.key=1", "no such key"), ("split.val=-3", "split.val"), ("pretrain.train.amp=fp8", "amp")],
)
def test_a_bad_override_fails_and_leaves_params_unchanged(tmp_path: Path, override: str, message: str):
    params = tmp_path / "params.yaml"
    params.write_text((REPO_ROOT / "params.yaml").read_text())
    before = params.read_bytes()
    with pytest.raises(orch.OrchestrationError, match=message):
        orch.apply_params_overrides(tmp_path, orch.normalise_overrides([override]))
    assert params.read_bytes() == before


def test_override_values_are_read_as_yaml_like_dvc_exp_run_set_param():
    assert orch.normalise_overrides(["a.b=0.001", "c=true", "d=null", "e=[1, 2]", "f=lc-vit-t", "g='1.0'"]) == {
        "a.b": 0.001,
        "c": True,
        "d": None,
        "e": [1, 2],
        "f": "lc-vit-t",
        "g": "1.0",
    }
    with pytest.raises(orch.OrchestrationError, match="key=value"):
        orch.normalise_overrides(["no-equals-sign"])


# -- the up-to-date rule -----------------------------------------------------------------------


def test_status_is_up_to_date_only_when_every_stage_matches_dvc_lock(fake_project: Path):
    env = orch.stage_env()
    assert not orch.pipeline_status(fake_project, env).up_to_date  # never ran
    for group in orch.stage_groups(fake_project):
        outcome = orch.run_stage_group(fake_project, group, env=env, log=lambda line: None)
        assert outcome.ran == list(group.targets)
    status = orch.pipeline_status(fake_project, env)
    assert status.up_to_date, status.changes
    again = orch.run_stage_group(fake_project, orch.StageGroup("train", ("train@a", "train@b")), env=env, log=lambda line: None)
    assert again.ran == [] and again.skipped == ["train@a", "train@b"]

    (fake_project / "sweep").mkdir()  # another pipeline of the repository is not the flow's
    (fake_project / "sweep" / "dvc.yaml").write_text("stages:\n  other:\n    cmd: python -c pass\n    outs: [o.txt]\n")
    assert orch.pipeline_status(fake_project, env).up_to_date

    orch.apply_params_overrides(fake_project, {"split.seed": 1})
    status = orch.pipeline_status(fake_project, env)
    assert not status.up_to_date and "split.seed" in status.summary() and "prep" in status.changes


def test_a_failing_stage_raises_with_the_tail_of_its_output(fake_project: Path):
    (fake_project / "FAIL_prep").touch()
    with pytest.raises(orch.StageFailed, match="injected failure") as info:
        orch.run_stage_group(fake_project, orch.StageGroup("prep", ("prep",)), env=orch.stage_env(), log=lambda line: None)
    assert info.value.group == "prep" and info.value.returncode != 0


#: A process that runs a command through run_logged and turns SIGTERM into an exception, as
#: Prefect's flow-run process does (TerminationSignal); the command starts a grandchild.
INTERRUPTIBLE = """\
import signal, sys
from pathlib import Path
from lightclip.orchestration import run_logged

def stop(signum, frame):
    raise SystemExit(128 + signum)

signal.signal(signal.SIGTERM, stop)
script = "sh -c 'echo $$ > grandchild.pid; echo started; exec sleep 300'; echo not reached"
run_logged(["sh", "-c", script], Path.cwd(), {"PATH": "/usr/bin:/bin"}, lambda line: print(line, flush=True))
"""


def alive(pid: int) -> bool:
    """A live process (a zombie, ended but not yet collected, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_logged_stops_the_command_and_everything_it_started(tmp_path: Path, signum: int):
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTIBLE], cwd=tmp_path, stdout=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=sigint_as_default)
    try:
        assert proc.stdout.readline().strip() == "started"
        grandchild = int((tmp_path / "grandchild.pid").read_text())
        assert alive(grandchild)
        proc.send_signal(signum)
        started = time.monotonic()
        returncode = proc.wait(timeout=orch.STOP_GRACE_S + 10)
        assert returncode == (128 + signum if signum == signal.SIGTERM else -signal.SIGINT)  # an uncaught KeyboardInterrupt ends Python by SIGINT
        assert time.monotonic() - started < orch.STOP_GRACE_S  # the command took the signal: no wait for SIGKILL
        deadline = time.monotonic() + 5
        while alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(grandchild), "the command's child outlived the interrupted run"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_save_experiment_records_the_flows_pipeline_when_another_pipeline_has_no_outputs(fake_project: Path, projects):
    """pipelines/ablation's outputs are absent unless its sweep ran: saving must not need them."""
    (fake_project / "sweep").mkdir()
    (fake_project / "sweep" / "dvc.yaml").write_text("stages:\n  other:\n    cmd: python -c pass\n    outs: [models/other]\n")
    projects.commit(fake_project, "a sweep the flow does not run")
    projects.run(orch.dvc_command("repro", "dvc.yaml"), fake_project)
    (fake_project / "notes.txt").write_text("not the pipeline's")
    assert orch.experiment_targets(fake_project) == ["dvc.yaml"]
    assert orch.experiment_files(fake_project) == ["dvc.lock", "metrics/register.json"]

    orch.save_experiment(fake_project, "exp-one", orch.stage_env())
    assert "exp-one" in projects.run(orch.dvc_command("exp", "list", "--name-only"), fake_project)
    refs = projects.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], fake_project).split()
    ref = next(r for r in refs if r.endswith("/exp-one"))
    files = projects.run(["git", "ls-tree", "-r", "--name-only", ref], fake_project).split()
    assert {"dvc.lock", "metrics/register.json", "sweep/dvc.yaml"} <= set(files) and "notes.txt" not in files
    assert projects.run(["git", "show", f"{ref}:metrics/register.json"], fake_project) == (fake_project / "metrics" / "register.json").read_text()
    assert not (fake_project / "models" / "other").exists()


# -- a workspace per flow run ----------------------------------------------------------------------


def test_a_workspace_is_a_worktree_of_head_that_shares_the_cache_and_the_experiments(fake_project: Path, projects, tmp_path: Path):
    origin = fake_project
    projects.run(orch.dvc_command("remote", "add", "-d", "store", "../remote"), origin)  # stored relative to .dvc/, as .dvc-remote is
    projects.run(orch.dvc_command("remote", "modify", "--local", "store", "verify", "true"), origin)  # a local-only setting
    projects.commit(origin, "a remote")
    (origin / "params.yaml").write_text((origin / "params.yaml").read_text().replace("seed: 0", "seed: 5"))  # not committed
    lines: list[str] = []
    env = orch.stage_env()

    place = orch.create_workspace(origin, "run/1", env, lines.append)
    assert place.path == origin / orch.WORKSPACES_DIR / "run-1" and place.origin == origin
    assert place.commit == projects.run(["git", "rev-parse", "HEAD"], origin).strip()
    assert "seed: 0" in (place.path / "params.yaml").read_text()  # HEAD, not the uncommitted edit
    assert any("uncommitted changes" in line and "params.yaml" in line for line in lines), lines
    local = (place.path / ".dvc" / "config.local").read_text()
    assert str(origin / ".dvc" / "cache") in local and str((origin / "../remote").resolve()) in local and "verify = true" in local

    for group in orch.stage_groups(place.path):
        orch.run_stage_group(place.path, group, env=env, log=lambda line: None)
    produced = yaml.safe_load((place.path / "dvc.lock").read_text())["stages"]["prep"]["outs"][0]["md5"]
    assert (origin / ".dvc" / "cache" / "files" / "md5" / produced[:2] / produced[2:]).is_file()  # the shared cache
    orch.save_experiment(place.path, "exp-in-a-worktree", env)
    assert "exp-in-a-worktree" in projects.run(orch.dvc_command("exp", "list", "--name-only"), origin)
    assert not (origin / "dvc.lock").exists() and not (origin / "out").exists()  # the project's tree: untouched

    (place.path / "leftover").write_text("of a crashed attempt")
    again = orch.create_workspace(origin, "run/1", env, lines.append)  # the same flow run, once more
    assert again.path == place.path and not (place.path / "leftover").exists()
    orch.remove_workspace(origin, again.path)
    assert not again.path.exists()
    assert projects.run(["git", "worktree", "list", "--porcelain"], origin).count("worktree ") == 1


def test_a_workspace_needs_a_commit(tmp_path: Path, projects):
    project = projects.create(tmp_path / "p", "split:\n  seed: 0\n", git=True)
    with pytest.raises(orch.OrchestrationError, match="git repository with a commit"):
        orch.create_workspace(project, "x", orch.stage_env(), lambda line: None)


def test_workspace_env_runs_the_workspaces_code_and_logs_into_the_projects_store(tmp_path: Path):
    origin, path = tmp_path / "origin", tmp_path / "ws"
    (path / "src" / "lightclip").mkdir(parents=True)
    place = orch.Workspace(origin=origin, path=path, commit="abc")
    env = orch.workspace_env(place, {"PATH": "/bin", "PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(path / "src"), "/elsewhere"]
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{origin.resolve()}/mlflow/mlflow.db"
    assert orch.workspace_env(place, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"


def test_a_crashed_run_may_start_again_crash_retries_times():
    assert orch.crash_retry_budget_left(1, 0)
    assert not orch.crash_retry_budget_left(2, 0)
    assert orch.crash_retry_budget_left(2, 1) and not orch.crash_retry_budget_left(3, 1)
    with pytest.raises(ConfigError, match="heartbeat_timeout_seconds"):
        parse_params({"orchestration": {"heartbeat_timeout_seconds": 30}})  # heartbeats come every 30 s

def test_stage_env_puts_this_venv_first_and_telemetry_off(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", "/usr/bin")
    env = orch.stage_env({"LIGHTCLIP_PARENT_RUN_ID": "abc"})
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert env["DO_NOT_TRACK"] == "true" and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["LIGHTCLIP_PARENT_RUN_ID"] == "abc"


# -- data ----------------------------------------------------------------------------------------


def test_a_given_catalogue_becomes_the_tracked_data(fake_project: Path, tiny_catalogue):
    env = orch.stage_env()
    source = tiny_catalogue(n=6, root=fake_project.parent / "incoming").root
    first = orch.prepare_data(fake_project, source, env, lambda line: None)
    assert (fake_project / "data" / "raw" / "catalogue.parquet").is_file()
    assert first == yaml.safe_load((fake_project / "data.dvc").read_text())["outs"][0]["md5"]
    assert orch.prepare_data(fake_project, None, env, lambda line: None) == first  # tracked, unchanged

    (fake_project / "data" / "raw" / "stray.txt").write_text("not tracked")
    with pytest.raises(orch.OrchestrationError, match="differs from data.dvc"):
        orch.prepare_data(fake_project, None, env, lambda line: None)


def test_a_directory_that_is_not_a_catalogue_is_refused(fake_project: Path, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(orch.OrchestrationError, match="not a catalogue"):
        orch.prepare_data(fake_project, tmp_path / "empty", orch.stage_env(), lambda line: None)


# -- the report ----------------------------------------------------------------------------------


def test_report_shows_metrics_gate_mlflow_run_and_model_version(tmp_path: Path):
    (tmp_path / "metrics").mkdir()
    eval_metrics = {"teacher": {"test/mean_recall": 78.94, "test/i2t_R@1": 47.7, "timing/embed_s": 3.0}, "xt": {"test/mean_recall": 77.9}}
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(eval_metrics))
    register = {  # as lightclip.registry.run_register writes it
        "model_name": "lightclip-student",
        "teacher": {"registered_model": "lightclip-teacher", "version": "2", "role": "teacher", "reused": True},
        "students": {
            "xt": {"registered_model": "lightclip-student", "version": "3", "role": "student", "gate": "pass", "reasons": [], "staged": True},
            "xxt": {"registered_model": "lightclip-student", "version": "4", "role": "student", "gate": "fail", "reasons": ["latency 12 ms > 10 ms"], "staged": False},
        },
        "staging_before": "1",
        "staging_after": "3",
        "aliases": {"staging": "3", "production": "1"},
    }
    (tmp_path / "metrics" / "register.json").write_text(json.dumps(register))
    report = orch.RetrainReport(
        status="retrained",
        message="Retrained.",
        project=str(tmp_path),
        stages=["validate", "register"],
        stages_run=["register"],
        overrides={"pretrain.train.lr": 0.001},
        mlflow_run_id="abc123",
        mlflow_experiment="lightclip",
        metrics=orch.report_metrics(tmp_path),
        register=orch.read_register(tmp_path),
    )
    assert report.model_version == "lightclip-student v3 (xt), v4 (xxt)"
    assert report.gate_verdict == "xt: pass; xxt: fail (latency 12 ms > 10 ms); @staging: v1 -> v3"
    text = report.markdown()
    assert "| metric | teacher | xt |" in text and "| test/mean_recall | 78.94 | 77.9 |" in text
    assert "timing/" not in text and "`abc123`" in text and "`pretrain.train.lr=0.001`" in text
    assert "| xxt | `lightclip-student` v4 | fail | latency 12 ms > 10 ms |  |" in text
    assert "@production = v1, @staging = v3" in text and "**register**" in text


def test_report_of_a_failed_run_names_the_stage():
    report = orch.RetrainReport(status="failed", message="Failed: boom", project="/p", failed_stage="evaluate")
    assert report.markdown().startswith("# Retraining: FAILED at stage `evaluate`")


# -- config ----------------------------------------------------------------------------------------


def test_orchestration_params_are_validated_and_give_the_retry_delays():
    config = OrchestrationConfig(retries=3, retry_delay_seconds=10)
    assert config.retry_delays() == [10, 20, 40]
    assert OrchestrationConfig(retries=2, retry_delay_seconds=5, exponential_backoff=False).retry_delays() == [5, 5]
    with pytest.raises(ConfigError, match="orchestration.cron"):
        parse_params({"orchestration": {"cron": "every day"}})
    with pytest.raises(ConfigError, match="orchestration.timezone"):
        parse_params({"orchestration": {"timezone": "Mars/Olympus"}})
    with pytest.raises(ConfigError, match="unknown key 'orchestration.retry'"):
        parse_params({"orchestration": {"retry": 1}})


def test_local_server_url_and_health_probe(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PREFECT_PORT", "4311")
    assert orch.local_api_url() == "http://127.0.0.1:4311/api"
    assert not orch.server_is_up("http://127.0.0.1:9/api", timeout=0.5)
    monkeypatch.setenv("PREFECT_API_URL", "http://example.invalid/api")
    assert orch.resolve_api_url() == "http://example.invalid/api"
