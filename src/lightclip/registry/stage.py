"""The ``register`` stage.

Every model of ``evaluate.models`` is logged and registered (:mod:`lightclip.registry.packaging`):
the teacher as a version of ``register.teacher_model_name``, every other model as a version of
``register.model_name``. A model whose weights (sha256) are already registered reuses that
version. Every student is then gated for ``@staging`` (:mod:`lightclip.registry.gate`), and the
best passing one is promoted through :meth:`ModelRegistry.promote`, the same path as
``lightclip registry promote``; the checks and the move happen under one hold of the registry
lock, so they all see the same ``@staging`` holder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from mlflow.entities.model_registry import ModelVersion

from lightclip.config import Params, PromoteConfig
from lightclip.data.catalogue import file_sha256
from lightclip.evaluation import EvaluationError, RatioInterval, check_model_dirs, item_recall_scores, paired_ratio_interval, read_ranks
from lightclip.io import read_json, write_json
from lightclip.models.zoo import WEIGHTS_FILE, read_model_info
from lightclip.registry.aliases import NOT_STAGED_SUFFIX, TAG_WEIGHTS, AliasMove, ModelRegistry, RegistryError, actor, now_utc
from lightclip.registry.gate import TAG_RUNTIME, GateResult, gate_tag, latency_conditions
from lightclip.registry.packaging import (
    active_run_id,
    TAG_REGISTERED_AT,
    TAG_REGISTERED_BY,
    log_pyfunc,
    measure_encode_latency,
    model_card,
    params_hash,
    test_set_fingerprint,
    version_tags,
)
from lightclip.runtimes import runtime_dir
from lightclip.serving import Embedder
from lightclip.stage import StageContext
from lightclip.tracking import TAG_PREFIX, data_version, lineage_tags

STUDENT_MODEL_DESCRIPTION = (
    "lightclip students: small text-image embedders distilled from the lightclip teacher. Every version has a model card "
    "(its description), lineage and metric tags, and the promotion gate's verdict and reasons (tags `lightclip.gate.<alias>`). "
    "Aliases: `@staging` is set by the register stage when the gate passes, `@production` by "
    "`lightclip registry promote --to production`; `lightclip registry rollback --alias ...` undoes a move. Every move is "
    "recorded in the version tags `lightclip.alias.<alias>.*` and in the audit log, the registered model `lightclip-registry-audit` (`lightclip registry audit`)."
)
TEACHER_MODEL_DESCRIPTION = "lightclip teachers (FashionKLIP, knowledge-enhanced CLIP): the models the students are distilled from and gated against."


@dataclass(frozen=True)
class RegisterInputs:
    """What the stage reads besides the model directories of ``evaluate.models``."""

    eval_metrics: Path  # the evaluate stage's metrics/eval.json
    catalogue: Path  # the evaluated catalogue (data/split), for the test-set fingerprint
    ranks: Path | None = None  # the evaluate stage's per-query ranks (the gate's interval); absent: no interval


@dataclass(frozen=True)
class RegisterOutputs:
    report: Path  # metrics/register.json: versions, gate verdicts and reasons, alias holders


@dataclass
class Registered:
    """One model of ``evaluate.models`` after registration."""

    name: str
    role: str
    registered_model: str
    version: str
    reused: bool
    mean_recall: float
    speed: dict[str, float]
    model_dir: str
    weights_sha256: str
    teacher_version: str | None = None
    fraction: RatioInterval | None = None  # mean recall / the teacher's, with its interval
    gate: GateResult | None = None
    staged: bool = False
    card: str = ""

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"registered_model": self.registered_model, "version": self.version, "reused": self.reused,
                               "role": self.role, "model_dir": self.model_dir, "mean_recall": self.mean_recall,
                               "encode_ms_p50": self.speed.get("encode_ms_p50")}
        if self.teacher_version:
            out["teacher_version"] = self.teacher_version
        if self.fraction is not None:
            out.update(teacher_fraction=self.fraction.ratio, teacher_fraction_low=self.fraction.low, teacher_fraction_high=self.fraction.high,
                       teacher_fraction_interval=self.fraction.describe())
        if self.gate is not None:
            out.update(gate=self.gate.verdict, reasons=self.gate.reasons, staged=self.staged)
        return out


def read_eval(eval_path: Path, models: Mapping[str, str], split: str) -> dict[str, dict[str, Any]]:
    """Each model's entry of ``metrics/eval.json``; a missing file, model or metric is an error."""
    if not eval_path.is_file():
        raise RegistryError(f"{eval_path}: not found; run the evaluate stage first (`lightclip evaluate`)")
    try:
        data = read_json(eval_path)
    except ValueError as exc:  # json.JSONDecodeError
        raise RegistryError(f"{eval_path}: not valid JSON: {exc}") from None
    out = {}
    for name, directory in models.items():
        entry = data.get(name)
        if not isinstance(entry, dict):
            raise RegistryError(f"{eval_path}: no metrics for model {name!r} (it has: {', '.join(sorted(data)) or 'none'}); "
                                f"re-run `lightclip evaluate` with {name} in evaluate.models")
        key = f"{split}/mean_recall"
        if not isinstance(entry.get(key), (int, float)):
            raise RegistryError(f"{eval_path}: model {name!r} has no {key!r} (evaluate.split is {split!r}); re-run `lightclip evaluate`")
        recorded = entry.get("model_dir")
        if recorded is not None and Path(str(recorded)) != Path(str(directory)):
            raise RegistryError(f"{eval_path}: {name!r} was evaluated from {recorded} but evaluate.models says {directory}; re-run `lightclip evaluate`")
        out[name] = entry
    return out


def teacher_fractions(ranks_path: Path, entries: Mapping[str, Mapping[str, Any]], teacher: str, split: str,
                      config: PromoteConfig) -> dict[str, RatioInterval]:
    """Each student's mean recall / the teacher's with its paired bootstrap interval over the test items.

    The ranks must be those eval.json was computed from (same split, same mean recalls): a file
    left from another evaluation is an error, not a silently wrong interval.
    """
    try:
        data = read_ranks(ranks_path)
    except EvaluationError as exc:
        raise RegistryError(str(exc)) from None
    if data.get("split") != split:
        raise RegistryError(f"{ranks_path}: ranks on split {data.get('split')!r}, but evaluate.split is {split!r}; re-run `lightclip evaluate`")
    scores = {}
    for name, entry in entries.items():
        ranks = data["models"].get(name)
        if ranks is None:
            raise RegistryError(f"{ranks_path}: no ranks for model {name!r}; re-run `lightclip evaluate`")
        scores[name] = item_recall_scores(ranks["i2t"], ranks["t2i"], data["ks"])
        recorded = float(entry[f"{split}/mean_recall"])
        if abs(float(scores[name].mean()) - recorded) > 1e-6:
            raise RegistryError(f"{ranks_path}: model {name!r}'s ranks give mean recall {scores[name].mean():.4f}, eval.json says "
                                f"{recorded:.4f}: they come from different evaluations; re-run `lightclip evaluate`")
    if scores[teacher].mean() <= 0.0:  # no ratio to a teacher that finds nothing; the gate says so on the point ratio
        return {}
    return {name: paired_ratio_interval(scores[name], scores[teacher], level=config.fraction_interval_level,
                                        resamples=config.fraction_interval_resamples, seed=0)
            for name in entries if name != teacher}


def register_one(
    registry: ModelRegistry,
    *,
    registered_name: str,
    name: str,
    role: str,
    model_dir: Path,
    eval_entry: Mapping[str, Any],
    split: str,
    speed: Mapping[str, float],
    lineage: Mapping[str, str],
    teacher: Mapping[str, Any] | None,
    run_id: str | None,
    model_description: str,
    existing: ModelVersion | None,
    onnx_from: Path | None = None,
) -> Registered:
    """Log and register ``model_dir`` (or reuse ``existing``, the version with the same weights); tag it, describe it.

    ``onnx_from``: a directory with the same weights and their ONNX export, shipped in a new version.
    """
    weights = model_dir / WEIGHTS_FILE
    sha = file_sha256(weights)
    info = read_model_info(model_dir)
    embedder = Embedder(model_dir, runtime="torch")  # the embedding width and input size, whatever the architecture
    embed_dim, image_size = embedder.embed_dim, int(embedder.preprocess["size"])
    lineage = {**lineage, "weights_sha256": sha}
    metrics = {k: v for k, v in eval_entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    mean_recall = float(metrics[f"{split}/mean_recall"])
    recorded_dir = str(eval_entry.get("model_dir", model_dir))
    tags = version_tags(name=name, role=role, arch=info.get("arch"), model_dir=recorded_dir, metrics=metrics, split=split, speed=speed,
                        lineage=lineage, teacher=teacher, run_id=run_id, registered_at=now_utc(), registered_by=actor())
    card = model_card(name=name, role=role, info=info, metrics=metrics, split=split, speed=speed, lineage=lineage, teacher=teacher,
                      file_mb=weights.stat().st_size / 2**20, embed_dim=embed_dim)
    registry.ensure_model(registered_name, model_description)
    if existing is not None:
        version, reused = str(existing.version), True
        keep_first = (TAG_REGISTERED_AT, TAG_REGISTERED_BY)  # when and by whom it was first registered
        registry.set_version_tags(registered_name, version, {k: v for k, v in tags.items() if k not in keep_first}, current=existing.tags)
        registry.client.update_model_version(registered_name, version, description=card)
    else:
        logged = log_pyfunc(model_dir, artifact_name=name, embed_dim=embed_dim, image_size=image_size, onnx_from=onnx_from)
        created = registry.client.create_model_version(registered_name, source=logged.model_uri, run_id=run_id, tags=tags,
                                                       description=card, model_id=logged.model_id)
        version, reused = first_of_same_weights(registry, registered_name, sha, str(created.version)), False
    return Registered(name=name, role=role, registered_model=registered_name, version=version, reused=reused, mean_recall=mean_recall,
                      speed=dict(speed), model_dir=recorded_dir, weights_sha256=sha,
                      teacher_version=str(teacher["ref"]) if teacher else None,
                      fraction=teacher.get("fraction_interval") if teacher else None, card=card)


def version_runtime(existing: ModelVersion | None, wanted: str) -> str:
    """The runtime a version is served and timed on: ``wanted`` for a new one; what ``existing``,
    the version already registered with the same weights, carries (its artifact is not rewritten)."""
    return wanted if existing is None else str((existing.tags or {}).get(TAG_RUNTIME, "torch"))


def first_of_same_weights(registry: ModelRegistry, registered_name: str, sha: str, created: str) -> str:
    """The version that holds these weights, once: the lowest of those tagged with ``sha``.

    MLflow's HTTP client retries a request whose connection broke, a POST included; when the
    tracking server died after creating the version but before replying, the retry creates a
    second one. The extra versions, made by this very call, are deleted.
    """
    same = sorted((v for v in registry.versions(registered_name) if v.tags.get(TAG_WEIGHTS) == sha), key=lambda v: int(v.version))
    if len(same) <= 1:
        return created
    for extra in same[1:]:
        registry.client.delete_model_version(registered_name, str(extra.version))
    return str(same[0].version)


def best_passing(students: Sequence[Registered]) -> Registered | None:
    """The student ``@staging`` should get: passed the gate, highest test mean recall, then fastest."""
    passing = [s for s in students if s.gate is not None and s.gate.passed]
    return max(passing, key=lambda s: (s.mean_recall, -s.speed.get("encode_ms_p50", 0.0))) if passing else None


def gate_and_stage(registry: ModelRegistry, name: str, students: Sequence[Registered], config: PromoteConfig, *,
                   auto: bool) -> tuple[str | None, str | None, list[AliasMove]]:
    """Gate every student for ``@staging`` and promote the best passing one (when ``auto``).

    The checks and the move happen under one hold of the registry lock, so they all see the same
    ``@staging`` holder; the move goes through :meth:`ModelRegistry.promote`, which re-checks
    the gate like ``lightclip registry promote`` does. Each student's ``gate``/``staged`` is set;
    its card's status section is regenerated from its tags at each tag change. Returns the
    ``@staging`` holder before and after, the moves.
    """
    moves: list[AliasMove] = []
    with registry.locked():
        before = registry.aliases(name).get("staging")
        at = now_utc()
        for student in students:
            student.gate = registry.check(name, student.version, to="staging", config=config, at=at)  # tags it, rewrites its card
        best = best_passing(students)
        if best is not None and auto and best.version != before:
            reason = f"register stage: gate passed ({best.name}, test mean recall {best.mean_recall:.2f})"
            move, _, _ = registry.promote(name, to="staging", config=config, version=best.version, reason=reason, action="register")
            if move is not None:
                moves.append(move)
            best.staged = move is not None
        elif best is not None and best.version == before:
            best.staged = True
        for student in students:
            if student is not best and student.gate is not None and student.gate.passed:
                note = {f"{gate_tag('staging')}.{NOT_STAGED_SUFFIX}": f"v{best.version if best else '?'} scored higher"}
                registry.tag_version(name, student.version, note)
        if best is not None and not auto:
            registry.tag_version(name, best.version, {f"{gate_tag('staging')}.{NOT_STAGED_SUFFIX}": "promote.auto is false"})
            best.staged = False
        after = registry.aliases(name).get("staging")
    return before, after, moves


def run_register(
    params: Params,
    inputs: RegisterInputs,
    outputs: RegisterOutputs,
    context: StageContext,
    *,
    run_id: str | None = None,
    auto_promote: bool | None = None,
    registry: ModelRegistry | None = None,
) -> dict[str, Any]:
    """The ``register`` stage: register the teacher and every student, gate them, stage the best.

    Takes the whole ``params`` (not one section): the versions are tagged with its hash, and the
    stage reads ``register``, ``promote`` and ``evaluate.models``/``evaluate.split``. ``run_id``
    is the MLflow run the models are logged in (default: the active run); ``auto_promote``
    overrides ``promote.auto`` (``--no-promote``) without changing the params hash.

    Writes ``outputs.report`` and returns it: versions, gate verdicts and reasons, alias holders
    before and after, the moves (:func:`run_metrics`, :func:`run_tags` and :func:`format_report`
    turn it into the run's metrics, its tags and the summary).
    """
    cfg, promote = params.register_, params.promote
    models = dict(params.evaluate.models)
    split = params.evaluate.split
    log = print if context.progress else (lambda _: None)
    if cfg.teacher not in models:
        raise RegistryError(f"register.teacher {cfg.teacher!r} is not a model of evaluate.models ({', '.join(models)}); "
                            "the gate compares every student with it")
    project_dir = Path(context.project_dir)
    model_dirs = _resolve_model_dirs(models, project_dir)
    entries = read_eval(Path(inputs.eval_metrics), models, split)
    ranks_path = None if inputs.ranks is None else context.resolve(inputs.ranks)
    if ranks_path is not None and ranks_path.is_file():
        fractions = teacher_fractions(ranks_path, entries, cfg.teacher, split, promote)
    else:
        fractions = {}
        log(f"  no per-query ranks ({inputs.ranks}): the gate decides on the test-set ratio alone")
    test_set, n_test = test_set_fingerprint(Path(inputs.catalogue), split)
    git = lineage_tags(project_dir, "register")
    lineage = {
        "git_commit": git[f"{TAG_PREFIX}git_commit"],
        "git_dirty": git[f"{TAG_PREFIX}git_dirty"],
        "data_hash": data_version(project_dir),
        "params_hash": params_hash(params),
        "test_set": test_set,
    }
    registry = registry or ModelRegistry(project_dir)
    run_id = run_id or active_run_id()
    auto = promote.auto if auto_promote is None else auto_promote

    speeds, onnx_dirs, existing = {}, {}, {}
    for name, directory in model_dirs.items():
        registered_name = cfg.teacher_model_name if name == cfg.teacher else cfg.model_name
        existing[name] = registry.find_by_weights(registered_name, file_sha256(directory / WEIGHTS_FILE))
        runtime = version_runtime(existing[name], cfg.runtime)
        if runtime != cfg.runtime:
            log(f"  {name}: already registered with these weights on {runtime}: it keeps that runtime (register.runtime applies to new versions)")
        timed = directory
        if runtime == "onnx":  # exported once per weights, in the bench's cache: the model dir is a DVC output
            timed = onnx_dirs[name] = runtime_dir(directory, "onnx", context.cache_dir / "runtimes")
        speeds[name] = measure_encode_latency(timed, runs=cfg.latency_runs, warmup=cfg.latency_warmup, threads=cfg.latency_threads,
                                              rounds=cfg.latency_rounds, max_rounds=cfg.latency_max_rounds, runtime=runtime)
        log(f"  {name}: encode p50 {speeds[name]['encode_ms_p50']:.2f} ms (image + title, batch 1; {latency_conditions(speeds[name])})")

    teacher = register_one(registry, registered_name=cfg.teacher_model_name, name=cfg.teacher, role="teacher", model_dir=model_dirs[cfg.teacher],
                           eval_entry=entries[cfg.teacher], split=split, speed=speeds[cfg.teacher], lineage=lineage, teacher=None,
                           run_id=run_id, model_description=TEACHER_MODEL_DESCRIPTION, existing=existing[cfg.teacher],
                           onnx_from=onnx_dirs.get(cfg.teacher))
    log(f"  {cfg.teacher}: {teacher.registered_model} v{teacher.version}{' (same weights: reused)' if teacher.reused else ''}")
    teacher_ref = f"{teacher.registered_model}/{teacher.version}"

    students: list[Registered] = []
    for name in models:
        if name == cfg.teacher:
            continue
        teacher_info = {"ref": teacher_ref, "mean_recall": teacher.mean_recall, "fraction_interval": fractions.get(name)}
        distilled_from = (read_model_info(model_dirs[name]).get("extra") or {}).get("teacher_sha256")
        if distilled_from and distilled_from != teacher.weights_sha256:
            found = registry.find_by_weights(teacher.registered_model, distilled_from)
            teacher_info["ref"] = f"{found.name}/{found.version}" if found is not None else f"unregistered (weights sha256 {distilled_from[:16]})"
        student = register_one(registry, registered_name=cfg.model_name, name=name, role="student", model_dir=model_dirs[name],
                               eval_entry=entries[name], split=split, speed=speeds[name], lineage=lineage, teacher=teacher_info,
                               run_id=run_id, model_description=STUDENT_MODEL_DESCRIPTION, existing=existing[name],
                               onnx_from=onnx_dirs.get(name))
        students.append(student)
        log(f"  {name}: {student.registered_model} v{student.version}{' (same weights: reused)' if student.reused else ''}")

    staging_before = staging_after = None
    moves: list[AliasMove] = []
    if students:
        staging_before, staging_after, moves = gate_and_stage(registry, cfg.model_name, students, promote, auto=auto)
    aliases = registry.aliases(cfg.model_name) if registry.exists(cfg.model_name) else {}
    report = {
        "model_name": cfg.model_name,
        "split": split,
        "test_set": test_set,
        "test_items": n_test,
        "data_hash": lineage["data_hash"],
        "params_hash": lineage["params_hash"],
        "git_commit": lineage["git_commit"],
        "teacher": teacher.summary(),
        "students": {s.name: s.summary() for s in students},
        "promote": {"auto": auto, **promote.model_dump(mode="json", exclude={"auto"})},
        "staging_before": staging_before,
        "staging_after": staging_after,
        "aliases": aliases,
        "moves": [m.record() for m in moves],
    }
    write_json(outputs.report, report, indent=2, sort_keys=True)
    return report


def _resolve_model_dirs(models: Mapping[str, str], project_dir: Path) -> dict[str, Path]:
    try:
        return check_model_dirs(models, project_dir)
    except EvaluationError as exc:
        raise RegistryError(str(exc)) from None


# ----------------------------------------------------------------------------------------------
# What the CLI logs and prints for the stage
# ----------------------------------------------------------------------------------------------


def _by_name(report: Mapping[str, Any], teacher: str) -> dict[str, Mapping[str, Any]]:
    return {teacher: report["teacher"], **report["students"]}


def run_metrics(report: Mapping[str, Any], *, teacher: str) -> dict[str, float]:
    """The register run's MLflow metrics: each model's version and encode p50, each student's gate.

    ``teacher`` is ``register.teacher``, the teacher's name in ``evaluate.models`` (the report
    keys the teacher by role, the students by name).
    """
    models = _by_name(report, teacher)
    metrics = {f"{name}/version": float(entry["version"]) for name, entry in models.items()}
    metrics.update({f"{name}/encode_ms_p50": entry["encode_ms_p50"] for name, entry in models.items()})
    metrics.update({f"{name}/gate_pass": float(entry["gate"] == "pass") for name, entry in report["students"].items()})
    return metrics


def run_tags(report: Mapping[str, Any], *, teacher: str) -> dict[str, str]:
    """The register run's MLflow tags: where each model was registered, who holds ``@staging``."""
    tags = {f"{TAG_PREFIX}registered.{name}": f"{entry['registered_model']}/{entry['version']}"
            for name, entry in _by_name(report, teacher).items()}
    after = report["staging_after"]
    tags[f"{TAG_PREFIX}staging"] = f"{report['model_name']}/{after}" if after else "none"
    return tags


def format_report(report: Mapping[str, Any], report_path: Path | str) -> str:
    """The register stage's summary: each version, each student's gate and reasons, the @staging move."""
    teacher = report["teacher"]
    lines = [f"teacher: {teacher['registered_model']} v{teacher['version']}{' (reused)' if teacher['reused'] else ''}"]
    for name, student in report["students"].items():
        staged = " -> @staging" if student["staged"] else ""
        lines.append(f"{name}: {student['registered_model']} v{student['version']}{' (reused)' if student['reused'] else ''}, "
                     f"gate {student['gate']}{staged}")
        lines += [f"    {reason}" for reason in student["reasons"]]
    before, after = report["staging_before"], report["staging_after"]
    lines.append(f"@staging: {'v' + before if before else 'none'} -> {'v' + after if after else 'none'}; report: {report_path}")
    return "\n".join(lines)
