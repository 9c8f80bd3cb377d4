"""The ``lightclip`` command line: one subcommand per stage, each a thin wrapper over the library.

A stage handler only turns arguments into the stage's config, inputs and outputs, runs the
stage function (the contract of :mod:`lightclip.stage`) inside its MLflow run, logs what the
function returned and prints one summary line. ``main(argv)`` takes an argument list so tests
drive the real CLI in-process.

Stage modules are imported inside their handler: together they pull in torch, open_clip,
MLflow, FAISS and Great Expectations (about 5.4 s on a 2-core machine, against well under a
second for the CLI itself), which ``lightclip --help`` and the light commands should not pay
for; ``tests/test_cli.py`` checks that the parser imports none of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NoReturn, Sequence

from lightclip.config import Params, TrackingConfig, load_params
from lightclip.env import configure_environment
from lightclip.errors import LightclipError
from lightclip.io import log_to_stderr, read_json, usable_cpus
from lightclip.processes import stop_process_group
from lightclip.stage import StageContext
from lightclip.tracking import StageInterrupted, pipeline_run, project_root, stage_run

#: Seconds `lightclip pipeline` gives `dvc repro` and its stage to stop after passing a signal on, then SIGKILL.
PIPELINE_STOP_GRACE_S = 30.0


class CliError(LightclipError):
    """An error in the command line itself; printed without a traceback."""


def _project(args: argparse.Namespace) -> Path:
    """Where the MLflow store and ``.cache`` live: ``--project``, else found from the working
    directory (:func:`lightclip.tracking.project_root`), never from where the params file is."""
    if args.project is None:
        return project_root(Path.cwd())
    if not Path(args.project).is_dir():
        raise CliError(f"--project {args.project}: not a directory")
    return Path(args.project).resolve()


def _params_path(args: argparse.Namespace) -> Path:
    """``--params``, else the project's ``params.yaml``."""
    return Path(args.params) if args.params else _project(args) / "params.yaml"


def _params(args: argparse.Namespace) -> Params:
    return load_params(_params_path(args))


def _tracking(args: argparse.Namespace) -> TrackingConfig:
    """The ``tracking`` section; its defaults when no params file was given and the project has
    none, so that commands reading no other params (the importers) run without one."""
    if args.params is None and not _params_path(args).is_file():
        return TrackingConfig()
    return _params(args).tracking


def _context(args: argparse.Namespace) -> StageContext:
    return StageContext(project_dir=_project(args), progress=not args.quiet, resume=getattr(args, "resume", False))


def _main_rank() -> bool:
    """False in the ranks 1.. that ``torchrun`` started (read from its ``RANK``, without importing torch)."""
    return os.environ.get("RANK", "0") == "0"


def _launch_ranks(args: argparse.Namespace, nproc: int) -> int:
    """``train.nproc > 1`` outside ``torchrun``: run this very command in ``nproc`` ranks through it."""
    from lightclip.distributed import launch_local

    status = launch_local(nproc, args.argv)
    if status:
        raise CliError(f"{args.command} in {nproc} ranks: torchrun exited with status {status} (the failing rank's error is above)")
    return 0


def _stage(
    args: argparse.Namespace,
    stage: str,
    run_params: Mapping[str, Any],
    call: Callable[[StageContext], Any],
    *,
    metrics: Callable[[Any], Mapping[str, Any]] = lambda result: result,
    metrics_file: Path | None = None,
    artifacts: Iterable[tuple[Path | str, str | None]] = (),
    tags: Callable[[Any], Mapping[str, Any]] | None = None,
    run_name: str | None = None,
) -> Any:
    """Run one stage function in its MLflow run; log its metrics, tags and output artifacts.

    Artifacts that exist are logged even when the stage fails (a failed validation's report),
    and so are the numbers of ``metrics_file`` when the stage failed after writing it.
    """
    if not _main_rank():  # under torchrun, rank 0 alone opens the run, logs and writes
        return call(_context(args))
    tracking = _tracking(args)
    context = _context(args)
    try:
        with stage_run(stage, run_params, project_dir=context.project_dir, experiment=tracking.experiment, run_name=run_name,
                       settings=tracking) as run:
            context = replace(context, log_metrics=lambda values, step: run.log_metrics(values, step=step))
            try:
                result = call(context)
            except LightclipError:
                if metrics_file is not None and Path(metrics_file).is_file():
                    run.log_metrics(read_json(metrics_file))
                raise
            else:
                run.log_metrics(metrics(result))
                if tags is not None:
                    run.set_tags(tags(result))
            finally:
                for path, artifact_path in artifacts:
                    run.log_artifact(Path(path), artifact_path=artifact_path)
    except StageInterrupted as exc:
        _stopped(args, exc)
    return result


def _stopped(args: argparse.Namespace, exc: StageInterrupted) -> NoReturn:
    """One line and the shell's exit status for a signal (130 for SIGINT, 143 for SIGTERM)."""
    print(f"lightclip {args.command}: stopped by {exc.signal_name}; its MLflow run was ended KILLED", file=sys.stderr, flush=True)
    raise SystemExit(exc.exit_code)


def _named_models(specs: Sequence[str] | None) -> dict[str, str] | None:
    """``NAME=DIR`` pairs (``--model``) as a mapping; None when none were given."""
    if not specs:
        return None
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise CliError(f"--model {spec!r}: expected NAME=DIR, e.g. teacher=models/teacher")
        models[name] = path
    return models


def _with(config: Any, **updates: Any) -> Any:
    """``config`` with the given fields replaced, validated again (command-line overrides)."""
    updates = {k: v for k, v in updates.items() if v is not None}
    return type(config).model_validate({**config.model_dump(), **updates}) if updates else config


# -- data --------------------------------------------------------------------------------------


def _run_import(args: argparse.Namespace, stage: str, run_params: dict, importer: Callable[[], tuple]) -> int:
    """Run an importer inside its MLflow run and print its report."""
    report_path = Path(args.out) / "import_report.json"

    def call(_: StageContext) -> tuple:
        return importer()

    catalogue, report = _stage(
        args, stage, run_params, call,
        metrics=lambda r: {"rows_read": r[1].rows_read, "items_written": r[1].items_written, "rows_skipped": len(r[1].skipped)},
        artifacts=[(report_path, None)],
    )
    print(report.summary())
    print(f"catalogue written to {catalogue.root} ({len(catalogue)} items); report: {report_path}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from lightclip.data.synth import SYNTH_VERSION, generate_catalogue

    config = _params(args).synth
    catalogue = _stage(
        args, "synth", {"synth": config.model_dump(mode="json"), "synth_version": SYNTH_VERSION},
        lambda context: generate_catalogue(Path(args.out), config, progress=context.progress),
        metrics=lambda c: {"items_written": len(c)},
    )
    print(f"synthetic catalogue (v{SYNTH_VERSION}, seed {config.seed}): {len(catalogue)} items in {catalogue.root}")
    return 0


def cmd_import_kaggle(args: argparse.Namespace) -> int:
    from lightclip.data.kaggle import import_kaggle

    return _run_import(
        args, "import_kaggle", {"source": str(args.source), "out": str(args.out)},
        lambda: import_kaggle(Path(args.source), Path(args.out), overwrite=args.overwrite, allow_outside_root=args.allow_outside_root,
                              progress=not args.quiet),
    )


def cmd_import_manifest(args: argparse.Namespace) -> int:
    from lightclip.data.manifest import import_manifest

    image_root = Path(args.image_root) if args.image_root else None
    return _run_import(
        args, "import_manifest", {"source": str(args.manifest), "out": str(args.out), "image_root": str(image_root)},
        lambda: import_manifest(Path(args.manifest), Path(args.out), image_root=image_root, overwrite=args.overwrite,
                                allow_outside_root=args.allow_outside_root, progress=not args.quiet),
    )


def cmd_import_webdataset(args: argparse.Namespace) -> int:
    from lightclip.data.webdataset import expand_shards, import_webdataset

    shards = [p for spec in args.shards for p in expand_shards(spec)]
    return _run_import(
        args, "import_webdataset", {"source": " ".join(args.shards), "out": str(args.out)},
        lambda: import_webdataset(shards, Path(args.out), overwrite=args.overwrite, progress=not args.quiet),
    )


def cmd_export_webdataset(args: argparse.Namespace) -> int:
    from lightclip.data.catalogue import Catalogue
    from lightclip.data.webdataset import export_webdataset

    shards = export_webdataset(Catalogue.load(args.catalogue), Path(args.out), split=args.split, shard_size=args.shard_size)
    print(f"wrote {len(shards)} shard(s) to {args.out}")
    for shard in shards:
        print(f"  {shard}")
    return 0


# -- pipeline stages ---------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    from lightclip.data.geometry import describe as describe_geometry
    from lightclip.validation import ValidateInputs, ValidateOutputs, run_validation

    config = _with(_params(args).validate_, on_error=args.on_error)
    outputs = ValidateOutputs(catalogue=Path(args.out), report=Path(args.report), metrics=Path(args.metrics))
    summary = _stage(
        args, "validate", {"validate": config.model_dump(mode="json"), "in": str(args.input)},
        lambda context: run_validation(config, ValidateInputs(catalogue=Path(args.input)), outputs, context),
        metrics=lambda s: s.metrics(),
        metrics_file=outputs.metrics,
        artifacts=[(outputs.report, None), (outputs.quarantine, None)],
    )
    print(f"validation passed: {summary.rows_in} rows in, {summary.rows_out} out, {summary.rows_quarantined} quarantined; report: {args.report}")
    print(f"  {summary.counts_line()}")
    if summary.result is not None and summary.result.geometry.get("images"):
        print(f"  image geometry: {describe_geometry(summary.result.geometry)}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from lightclip.data.split import SplitInputs, SplitOutputs, run_split

    config = _params(args).split
    if args.by is not None:  # one params file, several split orders (pipelines/real sweeps them)
        try:
            config = config.model_validate({**config.model_dump(), "by": args.by})
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise CliError(f"--by {args.by!r}: {exc.errors()[0]['msg'] if hasattr(exc, 'errors') else exc}") from None
    counts = _stage(
        args, "split", {"split": config.model_dump(mode="json"), "in": str(args.input)},
        lambda context: run_split(config, SplitInputs(catalogue=Path(args.input)), SplitOutputs(catalogue=Path(args.out), metrics=Path(args.metrics)), context),
    )
    print("split: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


def cmd_build_kg(args: argparse.Namespace) -> int:
    from lightclip.kg.build import BuildKGInputs, BuildKGOutputs, run_build_kg

    config = _params(args).build_kg
    outputs = BuildKGOutputs(kg=Path(args.out), metrics=Path(args.metrics), figure=Path(args.figure))
    stats = _stage(
        args, "build_kg", {"build_kg": config.model_dump(mode="json"), "in": str(args.input)},
        lambda context: run_build_kg(config, BuildKGInputs(catalogue=Path(args.input)), outputs, context),
        metrics=lambda s: {f"kg/{k}": v for k, v in s.items()},
        artifacts=[(outputs.metrics, None), (outputs.figure, None), (outputs.kg, "kg")],
    )
    levels = ", ".join(f"L{k}={v}" for k, v in stats["concepts_per_level"].items())
    print(f"concept graph: {stats['n_concepts']} concepts ({levels}), depth {stats['max_depth']}, items covered {stats['item_coverage']:.1%}")
    if "article_types_rooted" in stats:
        print(f"quality vs articleType: article types rooted {stats['article_types_rooted']:.1%}, items descending from their type {stats['items_descend_from_type']:.1%}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from lightclip.pretrain import PretrainInputs, PretrainOutputs, run_pretrain, summarise

    config = _params(args).pretrain
    if config.train.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_ranks(args, config.train.nproc)
    inputs = PretrainInputs(catalogue=Path(args.input), kg=Path(args.kg))
    outputs = PretrainOutputs(model=Path(args.out), metrics=Path(args.metrics))
    metrics = _stage(
        args, "pretrain", {"pretrain": config.model_dump(mode="json"), "in": str(args.input), "kg": str(args.kg)},
        lambda context: run_pretrain(config, inputs, outputs, context),
        tags=lambda _: {"lightclip.model": config.model.arch, "lightclip.concept_weight": config.concept_weight},
        artifacts=[(outputs.metrics, None), (outputs.model, "teacher")],
        run_name=args.run_name,
    )
    if _main_rank():
        print(f"teacher ({config.model.arch}, concept weight {config.concept_weight}): {summarise(metrics)}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    """Combine saved models into one ensemble model dir (e.g. teachers trained with other seeds)."""
    from lightclip.models.zoo import count_parameters, make_ensemble, save_model

    if len(args.member) < 2:
        raise CliError(f"an ensemble needs at least 2 --member model dirs, got {len(args.member)}")
    for member in args.member:
        if not (Path(member) / "model.json").is_file():
            raise CliError(f"--member {member}: not a saved lightclip model (no model.json)")
    model = make_ensemble([Path(m) for m in args.member])
    save_model(model, "ensemble", Path(args.out), extra={"stage": "ensemble", "members": [str(m) for m in args.member]})
    print(f"ensemble of {len(args.member)} models -> {args.out} ({count_parameters(model)['total']:,} parameters)")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    """Both towers of a saved model as ONNX graphs beside its weights (checked against PyTorch)."""
    from lightclip.models.onnx_runtime import RUNTIME_DIR, export_onnx

    info = export_onnx(Path(args.model), opset=args.opset)
    worst = ", ".join(f"{tower} {value:.6f}" for tower, value in sorted(info["probe_worst_cosine"].items()))
    print(f"{args.model}: image and text towers -> {Path(args.model) / RUNTIME_DIR} (opset {info['opset']}, "
          f"onnxruntime {info['onnxruntime']}); worst cosine to PyTorch on the probe batch: {worst}")
    return 0


def cmd_teacher_embed(args: argparse.Namespace) -> int:
    from lightclip.teacher_cache import TeacherEmbedInputs, TeacherEmbedOutputs, run_teacher_embed

    config = _params(args).teacher_embed
    inputs = TeacherEmbedInputs(catalogue=Path(args.input), teacher=Path(args.teacher))
    outputs = TeacherEmbedOutputs(embeddings=Path(args.out), metrics=Path(args.metrics))
    metrics = _stage(
        args, "teacher_embed", {"teacher_embed": config.model_dump(mode="json"), "in": str(args.input), "teacher": str(args.teacher)},
        lambda context: run_teacher_embed(config, inputs, outputs, context),
        artifacts=[(outputs.metrics, None)],
    )
    print(f"teacher embeddings cached in {args.out}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from lightclip.distill import DistillInputs, DistillOutputs, run_distill
    from lightclip.pretrain import summarise

    job = _params(args).distill_job(args.student, variant=args.variant, seed=args.seed)
    if job.train.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_ranks(args, job.train.nproc)
    inputs = DistillInputs(catalogue=Path(args.input), teacher=Path(args.teacher), teacher_embeddings=Path(args.teacher_embeddings))
    outputs = DistillOutputs(model=Path(args.out), metrics=Path(args.metrics))
    edges = ",".join(f"{e.edge}/{e.loss}" for e in job.edges)
    metrics = _stage(
        args, "distill",
        {"distill": job.model_dump(mode="json", exclude={"student_name", "variant"}), "in": str(args.input), "teacher": str(args.teacher),
         "student_name": job.student_name, **({"variant": job.variant} if job.variant else {})},
        lambda context: run_distill(job, inputs, outputs, context),
        tags=lambda _: {"lightclip.model": job.student.arch, "lightclip.student": job.student_name, "lightclip.distill_edges": edges,
                        "lightclip.variant": job.variant or "pipeline"},
        artifacts=[(outputs.metrics, None), (outputs.model, "student")],
        run_name=args.run_name or job.run_name,
    )
    if _main_rank():
        print(f"student ({job.student.arch}, edges {edges}): {summarise(metrics)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lightclip.evaluation import WHOLE, EvaluateInputs, EvaluateOutputs, run_evaluate, summarise

    config = _with(_params(args).evaluate, models=_named_models(args.model))
    whole = args.catalogue is not None
    if not whole and args.sample is not None:
        raise CliError("--sample needs --catalogue DIR (a split is evaluated whole)")
    # a whole catalogue's outputs go beside each other under reports/eval_catalogue/<name>, never over the stage's
    base = Path("reports") / "eval_catalogue" / Path(args.catalogue).resolve().name if whole else None
    defaults = {"metrics": "metrics/eval.json", "plots": "metrics/plots/eval", "figures": "reports/eval", "ranks": "metrics/eval_ranks.json"}
    whole_defaults = {"metrics": "metrics.json", "plots": "plots", "figures": "figures", "ranks": "ranks.json"}
    paths = {k: Path(getattr(args, k) or (base / whole_defaults[k] if base else defaults[k])) for k in defaults}
    outputs = EvaluateOutputs(metrics=paths["metrics"], plots=paths["plots"], figures=paths["figures"], ranks=paths["ranks"])
    source = Path(args.catalogue if whole else args.input)
    inputs = EvaluateInputs(catalogue=source, whole=whole, sample=args.sample, seed=args.seed)
    label = WHOLE if whole else config.split
    run_params = {"evaluate": config.model_dump(mode="json"), "in": str(source)}
    if whole:
        run_params["sample"] = {"n": args.sample, "seed": args.seed}
    metrics = _stage(
        args, "evaluate", run_params,
        lambda context: run_evaluate(config, inputs, outputs, context),
        tags=lambda _: {"lightclip.models": ",".join(config.models), "lightclip.split": label},
        artifacts=[(outputs.metrics, None), (outputs.ranks, None), (outputs.plots, "plots"), (outputs.figures, "figures")],
    )
    gallery = int(next(v for k, v in metrics.items() if k.endswith(f"/{label}/n_items")))
    what = f"whole catalogue {source}" if whole else f"split {config.split!r} of {source}"
    sampled = f" (a sample, seed {args.seed})" if whole and args.sample is not None and gallery == args.sample else ""
    print(f"{what}: gallery of {gallery} items{sampled}")
    print(summarise(metrics, label, list(config.models)))
    print(f"metrics: {paths['metrics']}; ranks: {paths['ranks']}; plot data: {paths['plots']}; figures: {paths['figures']}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from lightclip.index import IndexInputs, IndexOutputs, run_index

    config = _with(_params(args).index, model=args.model, kind=args.kind)
    outputs = IndexOutputs(index=Path(args.out), metrics=Path(args.metrics))
    metrics = _stage(
        args, "index", {"index": config.model_dump(mode="json"), "in": str(args.input)},
        lambda context: run_index(config, IndexInputs(catalogue=Path(args.input)), outputs, context),
        tags=lambda _: {"lightclip.index_kind": config.kind, "lightclip.model_dir": config.model},
        artifacts=[(outputs.metrics, None)],
    )
    recall = metrics.get("index/recall@10_vs_flat")
    print(
        f"{config.kind} index of {metrics['index/count']} items x {metrics['index/dim']} dims ({config.model}) in {args.out}: "
        f"build {metrics['index/build_seconds']:.3f}s, query p50 {metrics.get('index/query_ms_p50', float('nan')):.3f} ms"
        + (f", recall@10 vs flat {recall:.3f}" if recall is not None else "")
    )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from lightclip.index import Searcher, format_result

    if (args.query is None) == (args.image is None):
        raise CliError("give either a text query or --image PATH")
    if args.k < 1:
        raise CliError("--k must be at least 1")
    searcher = Searcher(Path(args.index), Path(args.model) if args.model else None, project_dir=_project(args))
    result = searcher.text(args.query, args.k) if args.query is not None else searcher.image(Path(args.image), args.k)
    if result.truncated:
        print(
            f"lightclip search: warning: the query is {result.tokens} tokens but the model reads {result.context_length} "
            f"(start and end included): only its first {result.context_length - 2} tokens were used",
            file=sys.stderr,
        )
    if args.json:
        hits = [{"rank": h.rank, "id": h.id, "title": h.title, "score": h.score, **h.attributes} for h in result.hits]
        print(json.dumps({"query": result.query, "truncated": result.truncated, "hits": hits}, indent=2, ensure_ascii=False))
    else:
        print(format_result(result, searcher))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lightclip.bench import BenchInputs, BenchOutputs, flat_metrics, run_bench

    params = _params(args)
    config = _with(params.bench, index_sizes=args.index_sizes, models=_named_models(args.model), num_threads=args.threads)
    inputs = BenchInputs(evaluate=params.evaluate, index=params.index, index_scaling=not args.no_index_scaling)
    _stage(
        args, "bench", {"bench": config.model_dump(mode="json"), "index": params.index.model_dump(mode="json")},
        lambda context: run_bench(config, inputs, BenchOutputs(report=Path(args.out)), context),
        metrics=flat_metrics,
        tags=lambda report: {f"lightclip.machine.{k}": v for k, v in report["machine"].items()},
        artifacts=[(Path(args.out), None)],
    )
    print(f"speed report: {args.out}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    """The register stage: log and register every model, gate the students, stage the best."""
    from lightclip.registry import RegisterInputs, RegisterOutputs, format_report, run_metrics, run_register, run_tags

    params = _params(args)
    teacher = params.register_.teacher
    inputs = RegisterInputs(eval_metrics=Path(args.eval), catalogue=Path(args.input), ranks=Path(args.ranks))
    outputs = RegisterOutputs(report=Path(args.out))
    report = _stage(
        args, "register",
        {"register": params.section("register"), "promote": params.section("promote"), "models": params.evaluate.models,
         "eval": str(args.eval), "ranks": str(args.ranks), "in": str(args.input)},
        lambda context: run_register(params, inputs, outputs, context, auto_promote=False if args.no_promote else None),
        metrics=lambda r: run_metrics(r, teacher=teacher),
        tags=lambda r: run_tags(r, teacher=teacher),
        artifacts=[(outputs.report, None)],
    )
    print(format_report(report, outputs.report))
    return 0


# -- the registry ------------------------------------------------------------------------------


def _registry(args: argparse.Namespace) -> tuple[Params, Any, str]:
    from lightclip.registry import ModelRegistry

    params = _params(args)
    return params, ModelRegistry(_project(args)), args.name or params.register_.model_name


def cmd_registry_list(args: argparse.Namespace) -> int:
    from lightclip.registry import format_versions

    params, registry, _ = _registry(args)
    for name in [args.name] if args.name else [params.register_.model_name, params.register_.teacher_model_name]:
        if args.name is None and not registry.exists(name):
            print(f"{name}: not registered yet (run `lightclip register`)\n")
            continue
        print(format_versions(registry, name) + "\n")
    return 0


def cmd_registry_show(args: argparse.Namespace) -> int:
    from lightclip.registry import format_version

    _, registry, name = _registry(args)
    print(format_version(registry, name, args.ref))
    return 0


def cmd_registry_promote(args: argparse.Namespace) -> int:
    params, registry, name = _registry(args)
    move, result, candidate = registry.promote(name, to=args.to, config=params.promote, version=args.version, source=args.source, reason=args.reason or "")
    print(f"{name} v{candidate.version}: gate for @{args.to}: {result.verdict}")
    for reason in result.reasons:
        print(f"    {reason}")
    if not result.passed:
        raise CliError(f"{name} v{candidate.version} fails the gate for @{args.to} (nothing moved): " + "; ".join(result.failures))
    if move is None:
        print(f"v{candidate.version} is already at @{args.to}; nothing moved")
        return 0
    print(f"@{args.to}: {'v' + move.from_version if move.from_version else 'none'} -> v{move.to_version} by {move.actor} at {move.at}; audit log: {registry.audit_location}")
    return 0


def cmd_registry_audit(args: argparse.Namespace) -> int:
    from lightclip.registry import format_audit

    _, registry, _ = _registry(args)
    print(format_audit(registry, args.name, args.last))
    return 0


def cmd_registry_rollback(args: argparse.Namespace) -> int:
    _, registry, name = _registry(args)
    move = registry.rollback(name, args.alias.lstrip("@"), reason=args.reason or "")
    print(f"{name} @{move.alias}: v{move.from_version} -> v{move.to_version} (rollback by {move.actor} at {move.at}); audit log: {registry.audit_location}")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """Open the parent MLflow run and run ``dvc repro`` inside it (stages nest under it).

    ``dvc repro`` runs in its own process group: SIGINT or SIGTERM to this process is passed on to
    it and its stage once (they end their runs KILLED), then the parent run ends KILLED.
    """
    params = _params(args)
    command = ["dvc", "repro", *args.targets] + (["--force"] if args.force else [])
    try:
        with pipeline_run(args.name, {"command": " ".join(command)}, project_dir=_project(args), experiment=params.tracking.experiment,
                          settings=params.tracking) as run:
            print(f"pipeline run {run.run_id}: {' '.join(command)}", flush=True)
            process = subprocess.Popen(command, cwd=_project(args), start_new_session=True)
            try:
                returncode = process.wait()
            except StageInterrupted as exc:
                stop_process_group(process, exc.signum, grace_s=PIPELINE_STOP_GRACE_S)
                raise
            run.set_tags({"lightclip.exit_code": returncode})
            if returncode != 0:
                raise CliError(f"'{' '.join(command)}' failed with exit code {returncode}")
    except StageInterrupted as exc:
        _stopped(args, exc)
    return 0


def cmd_tracking_migrate(args: argparse.Namespace) -> int:
    """Copy the project's tracking store (default: its SQLite ``mlflow/mlflow.db``) to ``--to``, then
    compare both object by object (docs/tracking_server.md)."""
    from lightclip.tracking import apply_http_limits, default_tracking_uri, sqlite_path
    from lightclip.tracking_migration import MigrationError, migrate, verify

    source = args.source or default_tracking_uri(_project(args))
    path = sqlite_path(source)
    if path is not None and not path.is_file():
        raise CliError(f"--from {source}: no such store ({path})")
    apply_http_limits(_tracking(args))
    report = migrate(source, args.to, log=(lambda _: None) if args.quiet else print)
    print(report.summary())
    problems = verify(source, args.to, report)
    if problems:
        raise MigrationError(f"{len(problems)} difference(s) between {source} and {args.to} after the copy: " + "; ".join(problems[:5]))
    print(f"verified: every copied run, metric history, artifact listing, model version and alias matches {source}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lightclip.service import run_serve

    params = _params(args)
    config = _with(params.serve, model=args.model, host=args.host, port=args.port, catalogue=args.catalogue, index=args.index)
    run_serve(config, params.index, _project(args))
    return 0


def cmd_services(args: argparse.Namespace) -> int:
    """Start, stop or list the team deployment (docs/team.md); `up` also writes the project's DVC remote `team`."""
    from lightclip.services import TEAM_REMOTE, TeamServices, configure_dvc_remote

    project = _project(args)
    state_dir = Path(args.dir) if args.dir else project / ".services"
    team = TeamServices(state_dir)
    if args.services_command == "up":
        started = time.monotonic()
        team.up()
        print(f"team services up in {time.monotonic() - started:.1f} s (state: {state_dir})")
        if (project / ".dvc").is_dir():
            print(f"DVC remote {TEAM_REMOTE!r} written to {configure_dvc_remote(project, team.env())}")
        print(f"clients: source {team.env_file}")
    elif args.services_command == "down":
        team.down()
        print(f"team services stopped; their data stays in {state_dir}")
    for status in team.status():
        state = f"running  pid {status.pid}" if status.running else "stopped"
        print(f"  {status.name:<12} {status.url or '-':<48} {state}")
    return 0


def cmd_plots(args: argparse.Namespace) -> int:
    """The DVC plots of dvc.yaml as one self-contained HTML page (inline SVG: no CDN, works offline)."""
    from lightclip.plots import render

    report = render(_project(args), args.rev or (), dvc_file=args.dvc_file, out=args.out)
    print(report.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightclip", description="Small, fast text-image retrieval models from a product catalogue.")
    parser.add_argument("--params", help="the run configuration (default: params.yaml in the project directory)")
    parser.add_argument(
        "--project", metavar="DIR",
        help="the project directory: its mlflow/ store and .cache/ (default: the nearest directory up from the working "
             "directory holding params.yaml and dvc.yaml, else the working directory)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="create, import and export catalogues")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    synth = data_commands.add_parser("synth", help="render the embedded synthetic catalogue (params: synth)")
    synth.add_argument("--out", default="data/raw", help="catalogue directory to write (default: data/raw)")
    synth.set_defaults(handler=cmd_synth)

    kaggle = data_commands.add_parser("import-kaggle", help="import the Kaggle Fashion Product Images layout (styles.csv + images/)")
    kaggle.add_argument("source", help="directory holding styles.csv and images/")
    kaggle.add_argument("--out", required=True, help="catalogue directory to write")
    kaggle.add_argument("--overwrite", action="store_true", help="replace an existing catalogue at --out")
    kaggle.add_argument("--allow-outside-root", action="store_true", help="read and copy images that resolve outside the source directory (absolute paths, '..', symlinks); refused by default")
    kaggle.set_defaults(handler=cmd_import_kaggle)

    manifest = data_commands.add_parser("import-manifest", help="import a CSV or JSONL manifest (image, title[, id, attributes, split])")
    manifest.add_argument("manifest", help="manifest file (.csv or .jsonl)")
    manifest.add_argument("--out", required=True, help="catalogue directory to write")
    manifest.add_argument("--image-root", help="directory image paths are relative to (default: the manifest's)")
    manifest.add_argument("--overwrite", action="store_true", help="replace an existing catalogue at --out")
    manifest.add_argument("--allow-outside-root", action="store_true", help="read and copy images that resolve outside the image root (--image-root, default the manifest's directory): absolute paths, '..', symlinks; refused by default")
    manifest.set_defaults(handler=cmd_import_manifest)

    wds_in = data_commands.add_parser("import-webdataset", help="import WebDataset tar shards (<key>.jpg + <key>.txt/.json)")
    wds_in.add_argument("shards", nargs="+", help="tar files, globs or brace ranges (shard-{000000..000009}.tar)")
    wds_in.add_argument("--out", required=True, help="catalogue directory to write")
    wds_in.add_argument("--overwrite", action="store_true", help="replace an existing catalogue at --out")
    wds_in.set_defaults(handler=cmd_import_webdataset)

    wds_out = data_commands.add_parser("export-webdataset", help="export a catalogue as WebDataset shards for open_clip_train")
    wds_out.add_argument("catalogue", help="catalogue directory")
    wds_out.add_argument("--out", required=True, help="directory for the shards")
    wds_out.add_argument("--split", choices=["train", "val", "test"], help="export one split only")
    wds_out.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    wds_out.set_defaults(handler=cmd_export_webdataset)

    validate = commands.add_parser("validate", help="run the Great Expectations suite on a catalogue (params: validate)")
    validate.add_argument("--in", dest="input", default="data/raw", help="catalogue to validate (default: data/raw)")
    validate.add_argument("--out", default="data/validated", help="where the clean catalogue goes (default: data/validated)")
    validate.add_argument("--report", default="reports/validation.md", help="Markdown report (default: reports/validation.md)")
    validate.add_argument("--metrics", default="metrics/validate.json", help="counts as JSON (default: metrics/validate.json)")
    validate.add_argument("--on-error", choices=["fail", "quarantine"], help="override validate.on_error for this run")
    validate.set_defaults(handler=cmd_validate)

    split = commands.add_parser("split", help="deterministic train/val/test split without leakage (params: split)")
    split.add_argument("--in", dest="input", default="data/validated", help="catalogue to split (default: data/validated)")
    split.add_argument("--out", default="data/split", help="where the split catalogue goes (default: data/split)")
    split.add_argument("--metrics", default="metrics/split.json", help="split sizes as JSON (default: metrics/split.json)")
    split.add_argument("--by", help="order the split by this instead of split.by: random | id_order | an attribute column")
    split.set_defaults(handler=cmd_split)

    kg = commands.add_parser("build-kg", help="mine the FashionKLIP concept graph from the training titles (params: build_kg)")
    kg.add_argument("--in", dest="input", default="data/split", help="split catalogue (default: data/split)")
    kg.add_argument("--out", default="data/kg", help="graph, item concepts and prototypes (default: data/kg)")
    kg.add_argument("--metrics", default="metrics/kg.json", help="graph stats and quality (default: metrics/kg.json)")
    kg.add_argument("--figure", default="reports/kg_sample.png", help="picture of a graph sample (default: reports/kg_sample.png)")
    kg.set_defaults(handler=cmd_build_kg)

    pretrain = commands.add_parser("pretrain", help="train the FashionKLIP teacher: CLIP + concept alignment (params: pretrain)")
    pretrain.add_argument("--in", dest="input", default="data/split", help="split catalogue (default: data/split)")
    pretrain.add_argument("--kg", default="data/kg", help="build_kg output (default: data/kg)")
    pretrain.add_argument("--out", default="models/teacher", help="teacher weights + config (default: models/teacher)")
    pretrain.add_argument("--metrics", default="metrics/pretrain.json", help="metrics JSON (default: metrics/pretrain.json)")
    pretrain.add_argument("--resume", action="store_true", help="continue the interrupted run with the same config and inputs")
    pretrain.add_argument("--run-name", default="pretrain", help="MLflow run name (default: pretrain)")
    pretrain.set_defaults(handler=cmd_pretrain)

    ensemble = commands.add_parser("ensemble", help="combine saved models into one ensemble model (mean cosine similarity)")
    ensemble.add_argument("--member", action="append", required=True, metavar="DIR", help="a saved model dir (repeat, at least 2)")
    ensemble.add_argument("--out", required=True, help="output model dir")
    ensemble.set_defaults(handler=cmd_ensemble)

    export_onnx = commands.add_parser("export-onnx", help="export a saved model's towers to ONNX (ONNX Runtime: same vectors, less per-call overhead)")
    export_onnx.add_argument("--model", required=True, metavar="DIR", help="a saved model dir; the graphs go to DIR/onnx/")
    export_onnx.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    export_onnx.set_defaults(handler=cmd_export_onnx)

    temb = commands.add_parser("teacher-embed", help="embed train (and more) splits once with the frozen teacher (params: teacher_embed)")
    temb.add_argument("--in", dest="input", default="data/split", help="split catalogue (default: data/split)")
    temb.add_argument("--teacher", default="models/teacher", help="teacher model dir (default: models/teacher)")
    temb.add_argument("--out", default="data/teacher_emb", help="embedding cache dir (default: data/teacher_emb)")
    temb.add_argument("--metrics", default="metrics/teacher_embed.json", help="metrics JSON (default: metrics/teacher_embed.json)")
    temb.set_defaults(handler=cmd_teacher_embed)

    distill = commands.add_parser("distill", help="distil the teacher into a student over the knowledge interaction graph (params: distill)")
    distill.add_argument("--in", dest="input", default="data/split", help="split catalogue (default: data/split)")
    distill.add_argument("--teacher", default="models/teacher", help="teacher model dir (default: models/teacher)")
    distill.add_argument("--teacher-embeddings", default="data/teacher_emb", help="teacher_embed output (default: data/teacher_emb)")
    distill.add_argument("--student", help="a name of distill.students (default: the first); with --variant, of distill_ablation.students")
    distill.add_argument("--variant", help="train a student of distill_ablation.students (--student, default the first) with this distill_ablation.variants edge set")
    distill.add_argument("--seed", type=int, help="override the training seed")
    distill.add_argument("--out", required=True, help="student weights + config (e.g. models/students/xt)")
    distill.add_argument("--metrics", required=True, help="metrics JSON (e.g. metrics/distill/xt.json)")
    distill.add_argument("--resume", action="store_true", help="continue the interrupted run with the same config and inputs")
    distill.add_argument("--run-name", help="MLflow run name (default: distill-<student> or distill-<student>-<variant>-seed<n>)")
    distill.set_defaults(handler=cmd_distill)

    evaluate = commands.add_parser("evaluate", help="retrieval metrics of each model on the test split (params: evaluate)")
    evaluate.add_argument("--in", dest="input", default="data/split", help="split catalogue (default: data/split)")
    evaluate.add_argument("--catalogue", metavar="DIR",
                          help="evaluate every item of this catalogue (a new batch, a holdout), not a split; "
                               "outputs default to reports/eval_catalogue/<DIR name>/")
    evaluate.add_argument("--sample", type=int, metavar="N", help="with --catalogue: only N items, drawn with --seed")
    evaluate.add_argument("--seed", type=int, default=0, help="the --sample draw's seed (default: 0)")
    evaluate.add_argument("--metrics", help="metrics per model, JSON (default: metrics/eval.json)")
    evaluate.add_argument("--plots", help="DVC plot data directory (default: metrics/plots/eval)")
    evaluate.add_argument("--figures", help="PNG figures directory (default: reports/eval)")
    evaluate.add_argument("--ranks", help="each query's rank per model, JSON: the gate's bootstrap interval (default: metrics/eval_ranks.json)")
    evaluate.add_argument("--model", action="append", metavar="NAME=DIR", help="evaluate this model instead of evaluate.models (repeatable)")
    evaluate.set_defaults(handler=cmd_evaluate)

    index = commands.add_parser("index", help="build the FAISS index of the catalogue's image embeddings (params: index)")
    index.add_argument("--in", dest="input", default="data/split", help="catalogue to index (default: data/split)")
    index.add_argument("--out", default="models/index", help="index directory (default: models/index)")
    index.add_argument("--metrics", default="metrics/index.json", help="index facts, JSON (default: metrics/index.json)")
    index.add_argument("--model", help="model directory (default: index.model)")
    index.add_argument("--kind", choices=["flat", "ivf", "hnsw"], help="override index.kind")
    index.set_defaults(handler=cmd_index)

    search = commands.add_parser("search", help="search the catalogue index by text or by image")
    search.add_argument("query", nargs="?", help="the text to search for, e.g. \"red floral midi dress\"")
    search.add_argument("--image", help="search by this image file instead of a text")
    search.add_argument("--k", type=int, default=10, help="results to return (default 10)")
    search.add_argument("--index", default="models/index", help="index directory (default: models/index)")
    search.add_argument("--model", help="model directory (default: the one the index was built with)")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    search.set_defaults(handler=cmd_search)

    bench = commands.add_parser("bench", help="speed, size and memory of each model and of the index kinds -> metrics/speed.json (params: bench)")
    bench.add_argument("--out", default="metrics/speed.json", help="report JSON (default: metrics/speed.json)")
    bench.add_argument("--model", action="append", metavar="NAME=DIR", help="benchmark this model instead of bench.models (repeatable)")
    bench.add_argument("--index-sizes", type=int, nargs="+", metavar="N", help="override bench.index_sizes, e.g. 10000 100000")
    bench.add_argument("--no-index-scaling", action="store_true", help="skip the index kinds x sizes table")
    bench.add_argument("--threads", type=int, help="override bench.num_threads (torch and FAISS threads)")
    bench.set_defaults(handler=cmd_bench)

    register = commands.add_parser("register", help="log and register every model in MLflow, gate the students, stage the best (params: register, promote)")
    register.add_argument("--eval", default="metrics/eval.json", help="the evaluate stage's metrics (default: metrics/eval.json)")
    register.add_argument("--ranks", default="metrics/eval_ranks.json",
                          help="the evaluate stage's per-query ranks, for the gate's interval (default: metrics/eval_ranks.json; absent: no interval)")
    register.add_argument("--in", dest="input", default="data/split", help="the evaluated catalogue, for the test-set fingerprint (default: data/split)")
    register.add_argument("--out", default="metrics/register.json", help="versions, gate verdicts, aliases as JSON (default: metrics/register.json)")
    register.add_argument("--no-promote", action="store_true", help="gate but move no alias (overrides promote.auto)")
    register.set_defaults(handler=cmd_register)

    registry = commands.add_parser("registry", help="list, show, promote and roll back registered models (aliases @staging, @production)")
    registry_commands = registry.add_subparsers(dest="registry_command", required=True, metavar="REGISTRY_COMMAND")
    reg_list = registry_commands.add_parser("list", help="versions with aliases, gate verdict, mean recall and latency")
    reg_list.add_argument("--name", help="registered model (default: register.model_name and register.teacher_model_name)")
    reg_list.set_defaults(handler=cmd_registry_list)
    reg_show = registry_commands.add_parser("show", help="one version: aliases, tags and model card")
    reg_show.add_argument("ref", help="a version number or an alias (@staging, @production)")
    reg_show.add_argument("--name", help="registered model (default: register.model_name)")
    reg_show.set_defaults(handler=cmd_registry_show)
    reg_promote = registry_commands.add_parser("promote", help="move an alias to a version that passes the gate (params: promote)")
    reg_promote.add_argument("--to", required=True, choices=["staging", "production"], help="the alias to move")
    reg_promote.add_argument("--version", help="the version to promote (default: the holder of --from)")
    reg_promote.add_argument("--from", dest="source", default="staging", help="promote the version at this alias (default: staging)")
    reg_promote.add_argument("--reason", help="why (recorded in the tags and the audit log)")
    reg_promote.add_argument("--name", help="registered model (default: register.model_name)")
    reg_promote.set_defaults(handler=cmd_registry_promote)
    reg_rollback = registry_commands.add_parser("rollback", help="move an alias back to its previous holder")
    reg_rollback.add_argument("--alias", required=True, help="the alias to roll back, e.g. production")
    reg_rollback.add_argument("--reason", help="why (recorded in the tags and the audit log)")
    reg_rollback.add_argument("--name", help="registered model (default: register.model_name)")
    reg_rollback.set_defaults(handler=cmd_registry_rollback)
    reg_audit = registry_commands.add_parser("audit", help="the audit log of alias moves, oldest first (kept in the registry, shared by every client)")
    reg_audit.add_argument("--name", help="only the moves of this registered model (default: every model)")
    reg_audit.add_argument("--last", type=int, help="only the last N moves")
    reg_audit.set_defaults(handler=cmd_registry_audit)

    pipeline = commands.add_parser("pipeline", help="run `dvc repro` inside one parent MLflow run")
    pipeline.add_argument("targets", nargs="*", help="dvc stages to reproduce (default: all)")
    pipeline.add_argument("--name", default="dvc-repro", help="name of the parent run")
    pipeline.add_argument("--force", action="store_true", help="pass --force to dvc repro")
    pipeline.set_defaults(handler=cmd_pipeline)

    tracking = commands.add_parser("tracking", help="the tracking store: move it to a server")
    tracking_commands = tracking.add_subparsers(dest="tracking_command", required=True, metavar="TRACKING_COMMAND")
    migrate = tracking_commands.add_parser("migrate", help="copy every experiment, run, artifact, model version and alias to another store, then verify")
    migrate.add_argument("--to", required=True, metavar="URI", help="the target tracking URI, e.g. the team's http://127.0.0.1:PORT")
    migrate.add_argument("--from", dest="source", metavar="URI", help="the store to copy (default: the project's mlflow/mlflow.db)")
    migrate.set_defaults(handler=cmd_tracking_migrate)

    plots = commands.add_parser("plots", help="draw the DVC plots of dvc.yaml as one offline HTML page (inline SVG; --rev compares, as dvc plots diff)")
    plots.add_argument("--rev", action="append", metavar="REV", help="also draw the data at this git revision (repeatable)")
    plots.add_argument("--dvc-file", default="dvc.yaml", help="the pipeline file whose top-level plots to draw (default: dvc.yaml)")
    plots.add_argument("--out", help="HTML page to write (default: reports/plots.html in the project)")
    plots.set_defaults(handler=cmd_plots)

    serve = commands.add_parser("serve", help="the HTTP retrieval service and storefront page over a registered model (params: serve)")
    serve.add_argument("--model", help="NAME@ALIAS, NAME/VERSION or a model directory (default: serve.model, @production else @staging)")
    serve.add_argument("--host", help="bind address (default: serve.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: serve.port)")
    serve.add_argument("--catalogue", help="the catalogue to serve (default: serve.catalogue)")
    serve.add_argument("--index", help="an index to reuse when it records the served weights (default: serve.index)")
    serve.set_defaults(handler=cmd_serve)

    services = commands.add_parser("services", help="the team deployment: PostgreSQL, S3 (SeaweedFS), MLflow and Prefect servers, 2 workers (docs/team.md)")
    services.add_argument("services_command", choices=["up", "down", "status"], help="start (idempotent), stop (data kept) or list them")
    services.add_argument("--dir", help="state directory: data, logs, ports, team.env (default: .services in the project)")
    services.set_defaults(handler=cmd_services)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what train.nproc re-runs under torchrun
    log_to_stderr()  # lightclip's own log lines (the thread choice, warnings) on stderr
    try:
        configure_environment(_project(args))
        # OpenMP libraries (torch, FAISS) start with the CPUs this process may use, not the host's cores
        os.environ.setdefault("OMP_NUM_THREADS", str(usable_cpus().threads))
        return args.handler(args)
    except (LightclipError, FileNotFoundError) as exc:
        print(f"lightclip {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
