"""The register stage: register the teacher and the students, gate them, give @staging to the best
through the public promotion path; its report, run metrics and tags; bad inputs; the
``lightclip registry list/show`` views."""

from __future__ import annotations

import json

import pytest

from lightclip.cli import build_parser, main
from lightclip.config import ConfigError, parse_params
from lightclip.registry.aliases import ModelRegistry, RegistryError, format_version, format_versions
from lightclip.registry.stage import format_report, run_metrics, run_tags

STUDENT, TEACHER = "lightclip-student", "lightclip-teacher"  # register.model_name, register.teacher_model_name
DATA_MD5 = "0123456789abcdef0123456789abcdef.dir"  # the data.dvc of the test projects


class RecordingRegistry(ModelRegistry):
    """The registry, noting every call of the public promotion path."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.promotions: list[dict] = []

    def promote(self, name, **kwargs):
        self.promotions.append({"name": name, **kwargs})
        return super().promote(name, **kwargs)


def test_register_stages_a_passing_student_with_card_and_tags(staged):
    project = staged
    report = json.loads((project.root / "first_register.json").read_text())
    assert report["teacher"]["version"] == "1" and report["students"]["a"]["version"] == "1"
    assert report["students"]["a"]["gate"] == "pass" and report["students"]["a"]["staged"]
    assert report["staging_before"] is None and report["staging_after"] == "1" and report["aliases"] == {"staging": "1"}
    assert "teacher_fraction: pass" in " ".join(report["students"]["a"]["reasons"])
    assert [(m["action"], m["alias"], m["from"], m["to"], m["gate"]) for m in report["moves"]] == [("register", "staging", None, "1", "pass")]
    assert report["moves"][0]["reason"] == "register stage: gate passed (a, test mean recall 57.00)"
    assert report["data_hash"] == DATA_MD5 and report["test_items"] == 8 and report["promote"]["auto"] is True
    # The report is the stage's own output, in the one JSON format of lightclip.io.
    assert (project.root / "first_register.json").read_text() == json.dumps(report, indent=2, sort_keys=True) + "\n"

    reg = project.registry()
    v = reg.version(STUDENT, "@staging")
    tags = v.tags
    assert tags["lightclip.data_hash"] == DATA_MD5
    assert tags["lightclip.teacher_version"] == f"{TEACHER}/1" and float(tags["lightclip.teacher_mean_recall"]) == 60.0
    assert tags["lightclip.git_commit"] == report["git_commit"] and tags["lightclip.params_hash"] == report["params_hash"]
    assert len(tags["lightclip.params_hash"]) == 16 and tags["lightclip.test_set"] == report["test_set"] and len(report["test_set"]) == 16
    assert tags["lightclip.role"] == "student" and tags["lightclip.candidate"] == "a" and tags["lightclip.model_dir"] == "models/students/a"
    assert float(tags["lightclip.eval.test/mean_recall"]) == pytest.approx(57.0) and float(tags["lightclip.mean_recall"]) == 57.0
    assert float(tags["lightclip.eval.test/i2t_R_at_1"]) == pytest.approx(28.5)
    assert float(tags["lightclip.speed.encode_ms_p50"]) == pytest.approx(report["students"]["a"]["encode_ms_p50"], rel=1e-5)
    assert float(tags["lightclip.speed.runs"]) == 5 and float(tags["lightclip.speed.threads"]) == 1
    assert tags["lightclip.gate.staging"] == "pass" and tags["lightclip.gate.staging.latency"].startswith("pass: encode p50")
    assert tags["lightclip.alias.staging.moved_by"] == "tester@ci" and tags["lightclip.alias.staging.action"] == "register"
    assert tags["lightclip.registered_by"] == "tester@ci" and tags["lightclip.register_run_id"] == v.run_id
    card = v.description
    for part in ("## Lineage", DATA_MD5, "## Metrics", "| mean recall", "## Speed", "## Limits", "## Promotion gate (@staging): pass"):
        assert part in card
    assert f"- teacher: `{TEACHER}/1` (test mean recall 60.00; this student reaches 95.0% of it)" in card
    teacher = reg.version(TEACHER, "1")
    assert teacher.tags["lightclip.role"] == "teacher" and not teacher.aliases
    assert teacher.tags["lightclip.arch"].startswith("ensemble(")

    # Again with the same weights: the versions are reused, nothing moves.
    audit_lines = len(reg.audit())
    again = project.register(["teacher", "a"])
    assert again["students"]["a"]["reused"] and again["teacher"]["reused"] and again["students"]["a"]["version"] == "1"
    assert again["moves"] == [] and again["staging_before"] == again["staging_after"] == "1" and again["students"]["a"]["staged"]
    assert len(reg.versions(STUDENT)) == 1 and len(reg.audit()) == audit_lines == 1
    assert reg.version(STUDENT, "1").tags["lightclip.registered_at"] == tags["lightclip.registered_at"]  # first registration kept


def test_failing_candidates_leave_staging_with_reasons_in_tags(staged):
    project, reg = staged, staged.registry()
    report = project.register(["teacher", "b"])  # far below the teacher
    b = report["students"]["b"]
    assert b["gate"] == "fail" and not b["staged"] and b["version"] != "1"
    assert report["staging_before"] == report["staging_after"] == "1" and report["moves"] == []
    version = reg.version(STUDENT, b["version"])
    assert version.tags["lightclip.gate.staging"] == "fail"
    assert version.tags["lightclip.gate.staging.teacher_fraction"].startswith("fail: test mean recall 40.00 < 0.9 x teacher's 60.00")
    assert "teacher_fraction" in version.tags["lightclip.gate.staging.reasons"]
    assert "Promotion gate (@staging): fail" in version.description

    report = project.register(["teacher", "c"], auto_promote=False)  # passes, but no alias moves (--no-promote)
    c = report["students"]["c"]
    assert c["gate"] == "pass" and not c["staged"] and report["staging_after"] == "1" and report["promote"]["auto"] is False
    assert reg.version(STUDENT, c["version"]).tags["lightclip.gate.staging.not_staged"] == "promote.auto is false"

    report = project.register(["teacher", "c"], max_encode_ms=1e-6)  # the same weights, now "too slow"
    assert report["students"]["c"]["reused"] and report["students"]["c"]["gate"] == "fail" and report["staging_after"] == "1"
    assert reg.version(STUDENT, c["version"]).tags["lightclip.gate.staging.latency"].startswith("fail: encode p50")
    assert reg.aliases(STUDENT) == {"staging": "1"}
    assert [(r["action"], r["to"]) for r in reg.audit()] == [("register", "1")]


def test_the_best_passing_student_gets_staging_through_the_public_promotion_path(project):
    registry = RecordingRegistry(project.root)
    project.write_params(["teacher", "a", "c", "b"])
    project.write_eval(["teacher", "a", "c", "b"])
    report = project.run_stage(registry=registry)
    assert report == json.loads(project.report_path.read_text())
    versions = {name: s["version"] for name, s in report["students"].items()}
    assert versions == {"a": "1", "c": "2", "b": "3"}
    assert {n: (s["gate"], s["staged"]) for n, s in report["students"].items()} == {"a": ("pass", True), "c": ("pass", False),
                                                                                   "b": ("fail", False)}
    # a and c both pass; a has the higher test mean recall (57.0 vs 56.8) and is the one promoted.
    assert [(p["name"], p["to"], p["version"], p["action"], p["reason"]) for p in registry.promotions] == [
        (STUDENT, "staging", "1", "register", "register stage: gate passed (a, test mean recall 57.00)")]
    assert registry.aliases(STUDENT) == {"staging": "1"}
    assert registry.version(STUDENT, "2").tags["lightclip.gate.staging.not_staged"] == "v1 scored higher"
    assert "lightclip.gate.staging.not_staged" not in registry.version(STUDENT, "3").tags
    # The run's metrics: every version and latency, every student's gate.
    metrics = run_metrics(report, teacher="teacher")
    assert set(metrics) == {f"{n}/{k}" for n in ("teacher", "a", "c", "b") for k in ("version", "encode_ms_p50")} | {
        f"{n}/gate_pass" for n in ("a", "c", "b")}
    assert [metrics[f"{n}/version"] for n in ("teacher", "a", "c", "b")] == [1.0, 1.0, 2.0, 3.0]
    assert [metrics[f"{n}/gate_pass"] for n in ("a", "c", "b")] == [1.0, 1.0, 0.0]
    assert metrics["c/encode_ms_p50"] == report["students"]["c"]["encode_ms_p50"]


def test_run_tags_summary_and_registry_views(staged, capsys: pytest.CaptureFixture[str]):
    report = json.loads((staged.root / "first_register.json").read_text())
    assert run_tags(report, teacher="teacher") == {"lightclip.registered.teacher": f"{TEACHER}/1",
                                                   "lightclip.registered.a": f"{STUDENT}/1", "lightclip.staging": f"{STUDENT}/1"}
    summary = format_report(report, "metrics/register.json").splitlines()
    assert summary[0] == f"teacher: {TEACHER} v1" and summary[1] == f"a: {STUDENT} v1, gate pass -> @staging"
    assert summary[2:5] == [f"    {r}" for r in report["students"]["a"]["reasons"]]
    assert summary[-1] == "@staging: none -> v1; report: metrics/register.json"

    reg = staged.registry()
    table = format_versions(reg, STUDENT).splitlines()
    assert table[0].startswith(f"{STUDENT}  (aliases: ") and "@staging=v1" in table[0]
    row = next(line for line in table[2:] if line.split()[0] == "1")
    assert row.split()[1:3] == ["@staging", "pass"] and " 57.00 " in row and " a " in row
    shown = format_version(reg, STUDENT, "@staging")
    assert shown.startswith(f"{STUDENT} v1  aliases: @staging") and "lightclip.alias.staging.moved_by = tester@ci" in shown
    assert "## Metrics" in shown and "## Promotion gate (@staging)" in shown
    assert main(["registry", "list"]) == 0
    listing = capsys.readouterr().out
    assert format_versions(reg, STUDENT) in listing and format_versions(reg, TEACHER) in listing
    assert main(["registry", "show", "@staging"]) == 0
    assert capsys.readouterr().out.strip() == shown.strip()


def test_the_register_command_runs_the_stage_in_its_mlflow_run(project, capsys: pytest.CaptureFixture[str]):
    project.write_params(["teacher", "a"])
    project.write_eval(["teacher", "a"])
    assert main(["-q", "register", "--no-promote"]) == 0
    report = json.loads(project.report_path.read_text())
    assert capsys.readouterr().out == format_report(report, "metrics/register.json") + "\n"
    assert report["promote"]["auto"] is False and report["staging_after"] is None and not report["students"]["a"]["staged"]

    reg = project.registry()
    run = reg.client.get_run(reg.version(STUDENT, "1").run_id)  # the models were logged in the stage's own run
    assert run.data.tags["lightclip.stage"] == "register" and run.data.tags["lightclip.staging"] == "none"
    assert run.data.tags["lightclip.registered.a"] == f"{STUDENT}/1" and run.data.tags["lightclip.registered.teacher"] == f"{TEACHER}/1"
    assert run.data.metrics == run_metrics(report, teacher="teacher")
    assert reg.version(STUDENT, "1").tags["lightclip.register_run_id"] == run.info.run_id


def test_bad_inputs_are_clear_errors(project):
    def fails() -> str:
        with pytest.raises(RegistryError) as info:
            project.run_stage()
        return str(info.value)

    project.write_params(["teacher", "a"])
    assert "metrics/eval.json: not found; run the evaluate stage first" in fails()

    project.write_eval(["teacher"])
    assert "metrics/eval.json: no metrics for model 'a' (it has: teacher)" in fails()

    project.write_params(["teacher", "a", "ghost"])
    assert "ghost: models/students/ghost does not exist" in fails()

    project.write_params(["a"])
    project.write_eval(["a"])
    assert "register.teacher 'teacher' is not a model of evaluate.models (a)" in fails()

    project.write_params(["teacher", "a"])
    project.write_eval(["teacher", "a"])
    payload = json.loads((project.root / "metrics" / "eval.json").read_text())
    payload["a"]["model_dir"] = "models/students/old"
    (project.root / "metrics" / "eval.json").write_text(json.dumps(payload))
    assert "'a' was evaluated from models/students/old but evaluate.models says models/students/a" in fails()

    payload["a"] = {"model_dir": "models/students/a", "val/mean_recall": 50.0}
    (project.root / "metrics" / "eval.json").write_text(json.dumps(payload))
    assert "model 'a' has no 'test/mean_recall' (evaluate.split is 'test')" in fails()
    (project.root / "metrics" / "eval.json").write_text("{not json")
    assert "metrics/eval.json: not valid JSON" in fails()
    assert not project.report_path.exists() and not project.registry().exists(STUDENT)  # nothing registered, no report


def test_registry_commands_have_help_and_params_are_checked(capsys: pytest.CaptureFixture[str]):
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


# The teacher finds every item first; student a misses some (8 test items, ranks 0-based).
TEACHER_RANKS = ([0] * 8, [0] * 8)
STUDENT_RANKS = ([0, 0, 0, 0, 0, 2, 7, 30], [0, 0, 0, 0, 1, 0, 3, 30])


def test_register_records_the_teacher_fraction_interval_from_the_ranks(project):
    recalls = project.write_ranks({"teacher": TEACHER_RANKS, "a": STUDENT_RANKS})
    project.write_params(["teacher", "a"])
    project.write_eval(["teacher", "a"], recalls)
    report = project.run_stage()
    a = report["students"]["a"]
    assert a["teacher_fraction"] == pytest.approx(recalls["a"] / recalls["teacher"])
    assert a["teacher_fraction_low"] < a["teacher_fraction"] < a["teacher_fraction_high"] <= 1.0
    assert a["teacher_fraction_interval"].startswith("95% interval ") and "paired bootstrap over 8 test items, 2000 resamples" in a["teacher_fraction_interval"]
    # 81.25% of the teacher, but 8 items cannot tell that from 90%: the default decision passes it
    assert a["gate"] == "pass" and "decision interval: the interval reaches 90%: the test set cannot tell it from 90%" in " ".join(a["reasons"])
    version = project.registry().version(STUDENT, a["version"])
    assert float(version.tags["lightclip.teacher_fraction_low"]) == pytest.approx(a["teacher_fraction_low"], abs=1e-6)
    assert float(version.tags["lightclip.teacher_fraction_high"]) == pytest.approx(a["teacher_fraction_high"], abs=1e-6)
    assert "paired bootstrap over 8 test items" in version.description  # the card shows the interval
    project.write_params(["teacher", "a"], teacher_fraction_decision="strict")
    assert project.run_stage()["students"]["a"]["gate"] == "fail"


def test_ranks_from_another_evaluation_are_refused(project):
    recalls = project.write_ranks({"teacher": TEACHER_RANKS, "a": STUDENT_RANKS})
    project.write_params(["teacher", "a"])
    project.write_eval(["teacher", "a"], {**recalls, "a": recalls["a"] + 1.0})
    with pytest.raises(RegistryError, match=r"eval_ranks.json: model 'a'.s ranks give mean recall .* they come from different evaluations"):
        project.run_stage()
    project.write_ranks({"teacher": TEACHER_RANKS, "a": STUDENT_RANKS}, split="val")
    with pytest.raises(RegistryError, match=r"eval_ranks.json: ranks on split 'val', but evaluate.split is 'test'"):
        project.run_stage()
    project.write_ranks({"teacher": TEACHER_RANKS})
    with pytest.raises(RegistryError, match=r"eval_ranks.json: no ranks for model 'a'"):
        project.run_stage()


def test_versions_a_retried_create_made_twice_are_one_again(project):
    """A POST retried after the server died before replying creates a second version of the same
    weights: register keeps the first and deletes the others."""
    from lightclip.registry.aliases import TAG_WEIGHTS
    from lightclip.registry.stage import first_of_same_weights

    registry = project.registry()
    registry.ensure_model("dup-test", "test")
    made = [str(registry.client.create_model_version("dup-test", source=f"file://{registry.project_dir}/none", tags={TAG_WEIGHTS: sha}).version)
            for sha in ("aaa", "bbb", "aaa")]
    assert made == ["1", "2", "3"]
    assert first_of_same_weights(registry, "dup-test", "aaa", "3") == "1"
    assert sorted(str(v.version) for v in registry.versions("dup-test")) == ["1", "2"]  # the other weights untouched
    assert first_of_same_weights(registry, "dup-test", "bbb", "2") == "2"
