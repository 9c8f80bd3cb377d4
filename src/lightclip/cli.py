"""The ``lightclip`` command line: one subcommand per stage, each a thin wrapper over the library.

``main(argv)`` takes an argument list so tests drive the real CLI in-process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from lightclip.env import configure_environment


class CliError(Exception):
    """An error the user can fix; printed without a traceback."""


def _params(args: argparse.Namespace):
    from lightclip.config import load_params

    return load_params(args.params)


def _project(args: argparse.Namespace) -> Path:
    from lightclip.tracking import project_root

    return project_root(Path(args.params).resolve().parent)


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _run_import(args: argparse.Namespace, stage: str, run_params: dict, importer: Callable[[], tuple]) -> int:
    """Run an importer inside its MLflow run and print its report."""
    from lightclip.tracking import stage_run

    params = _params(args)
    with stage_run(stage, run_params, project_dir=_project(args), experiment=params.tracking.experiment) as run:
        catalogue, report = importer()
        run.log_metrics({"rows_read": report.rows_read, "items_written": report.items_written, "rows_skipped": len(report.skipped)})
        run.log_artifact(Path(args.out) / "import_report.json")
    print(report.summary())
    print(f"catalogue written to {catalogue.root} ({len(catalogue)} items); report: {Path(args.out) / 'import_report.json'}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from lightclip.data.synth import SYNTH_VERSION, generate_catalogue
    from lightclip.tracking import stage_run

    params = _params(args)
    config = params.synth
    with stage_run("synth", {"synth": params.section("synth"), "synth_version": SYNTH_VERSION}, project_dir=_project(args), experiment=params.tracking.experiment) as run:
        catalogue = generate_catalogue(Path(args.out), config, progress=not args.quiet)
        run.log_metrics({"items_written": len(catalogue)})
    print(f"synthetic catalogue (v{SYNTH_VERSION}, seed {config.seed}): {len(catalogue)} items in {catalogue.root}")
    return 0


def cmd_import_kaggle(args: argparse.Namespace) -> int:
    from lightclip.data.kaggle import import_kaggle

    return _run_import(
        args,
        "import_kaggle",
        {"source": str(args.source), "out": str(args.out)},
        lambda: import_kaggle(Path(args.source), Path(args.out), overwrite=args.overwrite, progress=not args.quiet),
    )


def cmd_import_manifest(args: argparse.Namespace) -> int:
    from lightclip.data.manifest import import_manifest

    image_root = Path(args.image_root) if args.image_root else None
    return _run_import(
        args,
        "import_manifest",
        {"source": str(args.manifest), "out": str(args.out), "image_root": str(image_root)},
        lambda: import_manifest(Path(args.manifest), Path(args.out), image_root=image_root, overwrite=args.overwrite, progress=not args.quiet),
    )


def cmd_import_webdataset(args: argparse.Namespace) -> int:
    from lightclip.data.webdataset import expand_shards, import_webdataset

    shards = [p for spec in args.shards for p in expand_shards(spec)]
    return _run_import(
        args,
        "import_webdataset",
        {"source": " ".join(args.shards), "out": str(args.out)},
        lambda: import_webdataset(shards, Path(args.out), overwrite=args.overwrite, progress=not args.quiet),
    )


def cmd_export_webdataset(args: argparse.Namespace) -> int:
    from lightclip.data.catalogue import Catalogue
    from lightclip.data.webdataset import export_webdataset

    catalogue = Catalogue.load(args.catalogue)
    shards = export_webdataset(catalogue, Path(args.out), split=args.split, shard_size=args.shard_size)
    print(f"wrote {len(shards)} shard(s) to {args.out}")
    for shard in shards:
        print(f"  {shard}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from lightclip.tracking import stage_run
    from lightclip.validation import run_validation

    params = _params(args)
    config = params.validate_
    if args.on_error:
        config = config.model_copy(update={"on_error": args.on_error})
    with stage_run("validate", {"validate": config.model_dump(mode="json"), "in": str(args.input)}, project_dir=_project(args), experiment=params.tracking.experiment) as run:
        try:
            summary = run_validation(Path(args.input), Path(args.out), Path(args.report), Path(args.metrics), config, progress=not args.quiet)
        finally:
            # The report and metrics are written in every outcome; log what exists.
            if Path(args.metrics).is_file():
                metrics = json.loads(Path(args.metrics).read_text(encoding="utf-8"))
                run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            run.log_artifact(Path(args.report))
            run.log_artifact(Path(args.out) / "quarantine.csv")
    print(f"validation passed: {summary.rows_in} rows in, {summary.rows_out} out, {summary.rows_quarantined} quarantined; report: {args.report}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from lightclip.data.split import run_split
    from lightclip.tracking import stage_run

    params = _params(args)
    with stage_run("split", {"split": params.section("split"), "in": str(args.input)}, project_dir=_project(args), experiment=params.tracking.experiment) as run:
        counts = run_split(Path(args.input), Path(args.out), Path(args.metrics), params.split)
        run.log_metrics({k: v for k, v in counts.items() if isinstance(v, (int, float))})
    print("split: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


def cmd_build_kg(args: argparse.Namespace) -> int:
    from lightclip.data.catalogue import Catalogue
    from lightclip.kg.build import build_knowledge_graph
    from lightclip.tracking import stage_run

    params = _params(args)
    catalogue = Catalogue.load(args.input)
    with stage_run("build_kg", {"build_kg": params.section("build_kg"), "in": str(args.input)}, project_dir=_project(args), experiment=params.tracking.experiment) as run:
        stats = build_knowledge_graph(catalogue, params.build_kg, Path(args.out), stats_path=Path(args.metrics), figure_path=Path(args.figure), progress=not args.quiet)
        run.log_metrics({f"kg/{k}": v for k, v in stats.items()})
        run.log_artifact(Path(args.metrics))
        run.log_artifact(Path(args.figure))
        run.log_artifact(Path(args.out), artifact_path="kg")
    levels = ", ".join(f"L{k}={v}" for k, v in stats["concepts_per_level"].items())
    print(f"concept graph: {stats['n_concepts']} concepts ({levels}), depth {stats['max_depth']}, items covered {stats['item_coverage']:.1%}")
    if "article_types_rooted" in stats:
        print(f"quality vs articleType: article types rooted {stats['article_types_rooted']:.1%}, items descending from their type {stats['items_descend_from_type']:.1%}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from lightclip.data.catalogue import Catalogue
    from lightclip.pretrain import run_pretrain, summarise
    from lightclip.tracking import stage_run

    params = _params(args)
    config = params.pretrain
    project = _project(args)
    catalogue = Catalogue.load(args.input)
    run_params = {"pretrain": params.section("pretrain"), "build_kg": params.section("build_kg"), "in": str(args.input), "kg": str(args.kg)}
    with stage_run("pretrain", run_params, project_dir=project, experiment=params.tracking.experiment, run_name=args.run_name) as run:
        metrics = run_pretrain(
            catalogue,
            Path(args.kg),
            config,
            params.build_kg,
            Path(args.out),
            cache_dir=project / ".cache" / "images",
            checkpoint_root=project / ".cache" / "checkpoints" / "pretrain",
            resume=args.resume,
            log_metrics=lambda values, step: run.log_metrics(values, step=step),
            progress=not args.quiet,
        )
        run.log_metrics(metrics)
        run.set_tags({"lightclip.model": config.model.arch, "lightclip.concept_weight": config.concept_weight})
        _write_json(Path(args.metrics), metrics)
        run.log_artifact(Path(args.metrics))
        run.log_artifact(Path(args.out), artifact_path="teacher")
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
    out = Path(args.out)
    save_model(model, "ensemble", out, extra={"stage": "ensemble", "members": [str(m) for m in args.member]})
    print(f"ensemble of {len(args.member)} models -> {out} ({count_parameters(model)['total']:,} parameters)")
    return 0


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


def cmd_teacher_embed(args: argparse.Namespace) -> int:
    from lightclip.data.catalogue import Catalogue
    from lightclip.teacher_cache import run_teacher_embed
    from lightclip.tracking import stage_run

    params = _params(args)
    project = _project(args)
    catalogue = Catalogue.load(args.input)
    run_params = {"teacher_embed": params.section("teacher_embed"), "in": str(args.input), "teacher": str(args.teacher)}
    with stage_run("teacher_embed", run_params, project_dir=project, experiment=params.tracking.experiment) as run:
        metrics = run_teacher_embed(catalogue, Path(args.teacher), Path(args.out), params.teacher_embed, cache_dir=project / ".cache" / "images", progress=not args.quiet)
        run.log_metrics(metrics)
        _write_json(Path(args.metrics), metrics)
        run.log_artifact(Path(args.metrics))
    print(f"teacher embeddings cached in {args.out}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from lightclip.data.catalogue import Catalogue
    from lightclip.distill import run_distill
    from lightclip.pretrain import summarise
    from lightclip.tracking import stage_run

    params = _params(args)
    if args.variant is not None:
        seed = args.seed if args.seed is not None else params.distill.train.seed
        student = args.student or params.distill_ablation.students[0]
        config = params.distill_ablation.config_for(params.distill, args.variant, seed, student)
    else:
        student = args.student or next(iter(params.distill.students))
        config = params.distill.for_student(student)
        if args.seed is not None:
            config = config.model_copy(update={"train": config.train.model_copy(update={"seed": args.seed})})
    project = _project(args)
    catalogue = Catalogue.load(args.input)
    run_params = {"distill": config.model_dump(mode="json"), "in": str(args.input), "teacher": str(args.teacher), "student_name": student}
    if args.variant is not None:
        run_params["variant"] = args.variant
    run_name = args.run_name or (f"distill-{student}-{args.variant}-seed{config.train.seed}" if args.variant else f"distill-{student}")
    with stage_run("distill", run_params, project_dir=project, experiment=params.tracking.experiment, run_name=run_name) as run:
        metrics = run_distill(
            catalogue,
            Path(args.teacher),
            Path(args.teacher_embeddings),
            config,
            Path(args.out),
            cache_dir=project / ".cache" / "images",
            checkpoint_root=project / ".cache" / "checkpoints" / "distill",
            resume=args.resume,
            log_metrics=lambda values, step: run.log_metrics(values, step=step),
            progress=not args.quiet,
        )
        run.log_metrics(metrics)
        edges = ",".join(f"{e.edge}/{e.loss}" for e in config.edges)
        run.set_tags({"lightclip.model": config.student.arch, "lightclip.student": student, "lightclip.distill_edges": edges, "lightclip.variant": args.variant or "pipeline"})
        _write_json(Path(args.metrics), metrics)
        run.log_artifact(Path(args.metrics))
        run.log_artifact(Path(args.out), artifact_path="student")
    print(f"student ({config.student.arch}, edges {edges}): {summarise(metrics)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lightclip.config import EvaluateConfig
    from lightclip.data.catalogue import Catalogue
    from lightclip.evaluation import run_evaluate, summarise
    from lightclip.tracking import stage_run

    params = _params(args)
    config = params.evaluate
    models = _named_models(args.model)
    if models is not None:
        config = EvaluateConfig.model_validate({**config.model_dump(), "models": models})
    project = _project(args)
    catalogue = Catalogue.load(args.input)
    run_params = {"evaluate": config.model_dump(mode="json"), "in": str(args.input)}
    with stage_run("evaluate", run_params, project_dir=project, experiment=params.tracking.experiment) as run:
        results, figures = run_evaluate(
            catalogue,
            config,
            project_dir=project,
            cache_dir=project / ".cache" / "images",
            metrics_path=Path(args.metrics),
            plots_dir=Path(args.plots),
            figures_dir=Path(args.figures),
            progress=not args.quiet,
        )
        for r in results:
            run.log_metrics({f"{r.name}/{k}": v for k, v in r.metrics.items()})
            run.log_metrics({f"{r.name}/timing/{k}": v for k, v in r.timings.items()})
        run.set_tags({"lightclip.models": ",".join(config.models), "lightclip.split": config.split})
        run.log_artifact(Path(args.metrics))
        run.log_artifact(Path(args.plots), artifact_path="plots")
        for figure in figures:
            run.log_artifact(figure, artifact_path="figures")
    for r in results:
        print(summarise(r, config.split))
    print(f"metrics: {args.metrics}; plot data: {args.plots}; figures: {args.figures}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from lightclip.config import IndexConfig
    from lightclip.data.catalogue import Catalogue
    from lightclip.index import build_catalogue_index
    from lightclip.tracking import stage_run

    params = _params(args)
    updates = {k: v for k, v in (("model", args.model), ("kind", args.kind)) if v is not None}
    config = IndexConfig.model_validate({**params.index.model_dump(), **updates}) if updates else params.index
    project = _project(args)
    catalogue = Catalogue.load(args.input)
    run_params = {"index": config.model_dump(mode="json"), "in": str(args.input)}
    with stage_run("index", run_params, project_dir=project, experiment=params.tracking.experiment) as run:
        model_dir = Path(config.model) if Path(config.model).is_absolute() else project / config.model
        index, metrics = build_catalogue_index(catalogue, model_dir, config, cache_dir=project / ".cache" / "images", progress=not args.quiet)
        index.meta["model"]["dir"] = config.model  # as given: relative to the project, so the index is portable
        out = index.save(Path(args.out))
        metrics["index/file_mb"] = sum(f.stat().st_size for f in out.iterdir()) / 2**20
        _write_json(Path(args.metrics), metrics)
        run.log_metrics(metrics)
        run.set_tags({"lightclip.index_kind": config.kind, "lightclip.model_dir": config.model})
        run.log_artifact(Path(args.metrics))
    recall = metrics.get("index/recall@10_vs_flat")
    print(
        f"{config.kind} index of {metrics['index/count']} items x {metrics['index/dim']} dims ({config.model}) in {out}: "
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
        payload = {
            "query": result.query,
            "truncated": result.truncated,
            "hits": [{"rank": h.rank, "id": h.id, "title": h.title, "score": h.score, **h.attributes} for h in result.hits],
        }
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        print(format_result(result, searcher))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lightclip.bench import flat_metrics, run_bench
    from lightclip.config import BenchConfig
    from lightclip.tracking import stage_run

    params = _params(args)
    updates: dict = {}
    if args.index_sizes is not None:
        updates["index_sizes"] = args.index_sizes
    models = _named_models(args.model)
    if models is not None:
        updates["models"] = models
    if args.threads is not None:
        updates["num_threads"] = args.threads
    config = BenchConfig.model_validate({**params.bench.model_dump(), **updates}) if updates else params.bench
    project = _project(args)
    run_params = {"bench": config.model_dump(mode="json"), "index": params.index.model_dump(mode="json")}
    with stage_run("bench", run_params, project_dir=project, experiment=params.tracking.experiment) as run:
        report = run_bench(config, params.evaluate, params.index, project_dir=project, index_scaling=not args.no_index_scaling)
        _write_json(Path(args.out), report)
        run.log_metrics(flat_metrics(report))
        run.set_tags({f"lightclip.machine.{k}": v for k, v in report["machine"].items()})
        run.log_artifact(Path(args.out))
    print(f"speed report: {args.out}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    """The register stage: log and register every model, gate the students, stage the best."""
    from lightclip.registry import run_register
    from lightclip.tracking import stage_run

    params = _params(args)
    project = _project(args)
    run_params = {"register": params.section("register"), "promote": params.section("promote"), "models": params.evaluate.models,
                  "eval": str(args.eval), "in": str(args.input)}
    with stage_run("register", run_params, project_dir=project, experiment=params.tracking.experiment) as run:
        report = run_register(params, project_dir=project, eval_path=Path(args.eval), catalogue_dir=Path(args.input), run=run,
                              auto_promote=False if args.no_promote else None, log=(lambda _: None) if args.quiet else print)
        _write_json(Path(args.out), report)
        run.log_artifact(Path(args.out))
    teacher = report["teacher"]
    print(f"teacher: {teacher['registered_model']} v{teacher['version']}{' (reused)' if teacher['reused'] else ''}")
    for name, student in report["students"].items():
        staged = " -> @staging" if student["staged"] else ""
        print(f"{name}: {student['registered_model']} v{student['version']}{' (reused)' if student['reused'] else ''}, gate {student['gate']}{staged}")
        for reason in student["reasons"]:
            print(f"    {reason}")
    before, after = report["staging_before"], report["staging_after"]
    print(f"@staging: {'v' + before if before else 'none'} -> {'v' + after if after else 'none'}; report: {args.out}")
    return 0


def _registry_and_name(args: argparse.Namespace):
    from lightclip.registry import ModelRegistry

    params = _params(args)
    return params, ModelRegistry(_project(args)), args.name or params.register_.model_name


def cmd_registry_list(args: argparse.Namespace) -> int:
    from lightclip.registry import format_versions

    params, registry, _ = _registry_and_name(args)
    names = [args.name] if args.name else [params.register_.model_name, params.register_.teacher_model_name]
    for name in names:
        if args.name is None and not registry.exists(name):
            print(f"{name}: not registered yet (run `lightclip register`)\n")
            continue
        print(format_versions(registry, name) + "\n")
    return 0


def cmd_registry_show(args: argparse.Namespace) -> int:
    from lightclip.registry import format_version

    _, registry, name = _registry_and_name(args)
    print(format_version(registry, name, args.ref))
    return 0


def cmd_registry_promote(args: argparse.Namespace) -> int:
    params, registry, name = _registry_and_name(args)
    move, result, candidate = registry.promote(name, to=args.to, config=params.promote, version=args.version, source=args.source, reason=args.reason or "")
    print(f"{name} v{candidate.version}: gate for @{args.to}: {result.verdict}")
    for reason in result.reasons:
        print(f"    {reason}")
    if not result.passed:
        raise CliError(f"{name} v{candidate.version} fails the gate for @{args.to} (nothing moved): " + "; ".join(result.failures))
    if move is None:
        print(f"v{candidate.version} is already at @{args.to}; nothing moved")
        return 0
    print(f"@{args.to}: {'v' + move.from_version if move.from_version else 'none'} -> v{move.to_version} by {move.actor} at {move.at}; audit log: {registry.audit_path}")
    return 0


def cmd_registry_rollback(args: argparse.Namespace) -> int:
    _, registry, name = _registry_and_name(args)
    move = registry.rollback(name, args.alias.lstrip("@"), reason=args.reason or "")
    print(f"{name} @{move.alias}: v{move.from_version} -> v{move.to_version} (rollback by {move.actor} at {move.at}); audit log: {registry.audit_path}")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """Open the parent MLflow run and run ``dvc repro`` inside it (stages nest under it)."""
    from lightclip.tracking import pipeline_run

    params = _params(args)
    project = _project(args)
    command = ["dvc", "repro", *args.targets]
    if args.force:
        command.append("--force")
    with pipeline_run(args.name, {"command": " ".join(command)}, project_dir=project, experiment=params.tracking.experiment) as run:
        print(f"pipeline run {run.run_id}: {' '.join(command)}", flush=True)
        result = subprocess.run(command, cwd=project)
        run.set_tags({"lightclip.exit_code": result.returncode})
        if result.returncode != 0:
            raise CliError(f"'{' '.join(command)}' failed with exit code {result.returncode}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightclip", description="Small, fast text-image retrieval models from a product catalogue.")
    parser.add_argument("--params", default="params.yaml", help="the run configuration (default: params.yaml)")
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
    kaggle.set_defaults(handler=cmd_import_kaggle)

    manifest = data_commands.add_parser("import-manifest", help="import a CSV or JSONL manifest (image, title[, id, attributes, split])")
    manifest.add_argument("manifest", help="manifest file (.csv or .jsonl)")
    manifest.add_argument("--out", required=True, help="catalogue directory to write")
    manifest.add_argument("--image-root", help="directory image paths are relative to (default: the manifest's)")
    manifest.add_argument("--overwrite", action="store_true", help="replace an existing catalogue at --out")
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
    evaluate.add_argument("--metrics", default="metrics/eval.json", help="metrics per model, JSON (default: metrics/eval.json)")
    evaluate.add_argument("--plots", default="metrics/plots/eval", help="DVC plot data directory (default: metrics/plots/eval)")
    evaluate.add_argument("--figures", default="reports/eval", help="PNG figures directory (default: reports/eval)")
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

    pipeline = commands.add_parser("pipeline", help="run `dvc repro` inside one parent MLflow run")
    pipeline.add_argument("targets", nargs="*", help="dvc stages to reproduce (default: all)")
    pipeline.add_argument("--name", default="dvc-repro", help="name of the parent run")
    pipeline.add_argument("--force", action="store_true", help="pass --force to dvc repro")
    pipeline.set_defaults(handler=cmd_pipeline)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from lightclip.tracking import project_root

    configure_environment(project_root())
    parser = build_parser()
    args = parser.parse_args(argv)
    from lightclip.config import ConfigError
    from lightclip.data.catalogue import CatalogueError

    from lightclip.kg.concepts import KGError

    known: tuple[type[BaseException], ...] = (CliError, ConfigError, CatalogueError, KGError, FileNotFoundError)
    if args.command in ("pretrain", "teacher-embed", "distill", "ensemble"):
        from lightclip.models.zoo import ModelError
        from lightclip.teacher_cache import StaleTeacherEmbeddings
        from lightclip.training import TrainingDiverged

        known += (ModelError, TrainingDiverged, StaleTeacherEmbeddings)
    try:
        from lightclip.validation import ValidationFailed

        known += (ValidationFailed,)
    except ImportError:
        pass
    if args.command in ("evaluate", "index", "search", "bench"):
        from lightclip.evaluation import EvaluationError
        from lightclip.imagecache import ImageCacheError
        from lightclip.index import CatalogueIndexError
        from lightclip.models.zoo import ModelError

        known += (EvaluationError, CatalogueIndexError, ModelError, ImageCacheError)
    if args.command in ("register", "registry"):
        from lightclip.evaluation import EvaluationError
        from lightclip.imagecache import ImageCacheError
        from lightclip.models.zoo import ModelError
        from lightclip.registry import RegistryError
        from lightclip.serving import ServingError

        known += (RegistryError, EvaluationError, ModelError, ImageCacheError, ServingError)
    try:
        return args.handler(args)
    except known as exc:
        print(f"lightclip {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
