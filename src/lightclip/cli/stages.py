"""The pipeline stages, one handler each: validate, split, build-kg, pretrain, ensemble,
export-onnx, teacher-embed, distill, evaluate, index, search, bench, register."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lightclip.cli.common import CliError, _launch_ranks, _main_rank, _named_models, _params, _project, _stage, _with


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
    int8 = info["int8"]
    if int8["available"]:
        worst = ", ".join(f"{tower} {value:.6f}" for tower, value in sorted(int8["probe_worst_cosine"].items()))
        bits = "7-bit weights: this CPU has no VNNI" if int8["reduce_range"] else "8-bit weights"
        print(f"  int8 graphs (runtime onnx-int8; {bits}): worst cosine to PyTorch {worst}")
    else:
        print(f"  no int8 graphs: {int8['reason']}")
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


def _evaluated_models(specs: list[str] | None, students: str | None) -> dict[str, str] | None:
    """``--model NAME=DIR`` pairs plus, with ``--students DIR``, every model saved under DIR (named
    after its folder): a recipe evaluates whichever students it trained without listing them."""
    models = _named_models(specs) or {}
    if students is not None:
        found = sorted(path for path in Path(students).iterdir() if (path / "model.json").is_file()) if Path(students).is_dir() else []
        if not found:
            raise CliError(f"--students {students}: no saved model (a folder with model.json) in it")
        for path in found:
            if path.name in models:
                raise CliError(f"--students {students}: {path.name!r} is also given with --model")
            models[path.name] = str(path)
    return models or None


def _baselines(specs: list[str] | None) -> dict[str, dict[str, str | None]] | None:
    """``--baseline NAME=ARCH[@PRETRAINED]`` as ``evaluate.baselines`` entries; None when none were given."""
    if not specs:
        return None
    baselines: dict[str, dict[str, str | None]] = {}
    for spec in specs:
        name, sep, model = spec.partition("=")
        arch, _, pretrained = model.partition("@")
        if not sep or not name or not arch:
            raise CliError(f"--baseline {spec!r}: expected NAME=ARCH[@PRETRAINED], e.g. clip=ViT-B-32@/data/clip-vit-b-32")
        baselines[name] = {"arch": arch, "pretrained": pretrained or None}
    return baselines


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lightclip.evaluation import WHOLE, EvaluateInputs, EvaluateOutputs, run_evaluate, summarise

    config = _with(_params(args).evaluate, models=_evaluated_models(args.model, args.students), baselines=_baselines(args.baseline))
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
        tags=lambda _: {"lightclip.models": ",".join([*config.models, *config.baselines]), "lightclip.split": label},
        artifacts=[(outputs.metrics, None), (outputs.ranks, None), (outputs.plots, "plots"), (outputs.figures, "figures")],
    )
    gallery = int(next(v for k, v in metrics.items() if k.endswith(f"/{label}/n_items")))
    what = f"whole catalogue {source}" if whole else f"split {config.split!r} of {source}"
    sampled = f" (a sample, seed {args.seed})" if whole and args.sample is not None and gallery == args.sample else ""
    print(f"{what}: gallery of {gallery} items{sampled}")
    print(summarise(metrics, label, [*config.models, *config.baselines]))
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
    catalogue = Path(args.input) if config.runtimes and Path(args.input).exists() else None
    if config.runtimes and catalogue is None:
        print(f"bench: no catalogue at {args.input}: the runtimes' recall-vs-latency plot is skipped (give --in DIR)", file=sys.stderr)
    inputs = BenchInputs(evaluate=params.evaluate, index=params.index, index_scaling=not args.no_index_scaling, catalogue=catalogue)
    outputs = BenchOutputs(report=Path(args.out), plot_data=Path(args.plots), figure=Path(args.figure))
    _stage(
        args, "bench", {"bench": config.model_dump(mode="json"), "index": params.index.model_dump(mode="json"), "in": str(args.input)},
        lambda context: run_bench(config, inputs, outputs, context),
        metrics=flat_metrics,
        tags=lambda report: {f"lightclip.machine.{k}": v for k, v in report["machine"].items()},
        artifacts=[(Path(args.out), None)] + ([(outputs.plot_data, "plots"), (outputs.figure, "figures")] if catalogue is not None else []),
    )
    print(f"speed report: {args.out}" + (f"; recall vs latency, every model and runtime: {args.plots}, {args.figure}" if catalogue is not None else ""))
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
