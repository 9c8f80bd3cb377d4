"""FashionKLIP ablation: teacher pre-training with and without the concept term, several seeds.

Each (concept_weight, seed) is an MLflow child run under one parent run, with the same metric
names, so the MLflow UI's compare view shows the table; the script also prints it as Markdown
and writes it as JSON.

    python benchmarks/ablation_concepts.py --catalogue data/split --kg data/kg \
        --weights 0 0.2 --seeds 0 1 2 --epochs 20 --name synthetic --out metrics/ablation_concepts_synthetic.json

Run one benchmark at a time: this machine has 2 cores and parallel runs halve each other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from lightclip.config import load_params
from lightclip.env import configure_environment
from lightclip.pretrain import PretrainInputs, PretrainOutputs, run_pretrain, summarise
from lightclip.stage import StageContext
from lightclip.tracking import pipeline_run, project_root, stage_run

REPORTED = ("test/mean_recall", "test/i2t_R@1", "test/t2i_R@1", "val/best_mean_recall", "train_seconds", "train_pairs_per_s", "steps")


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--catalogue", default="data/split")
    parser.add_argument("--kg", default="data/kg")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="override pretrain.train.epochs")
    parser.add_argument("--arch", help="override pretrain.model.arch")
    parser.add_argument("--name", default="synthetic", help="catalogue label for runs and the table")
    parser.add_argument("--out", default="metrics/ablation_concepts.json")
    parser.add_argument("--resume", action="store_true", help="continue interrupted runs from their checkpoints")
    args = parser.parse_args(argv)

    project = project_root()
    configure_environment(project)
    params = load_params(args.params)
    results: list[dict] = []
    with pipeline_run(f"ablation-concepts-{args.name}", {"catalogue": args.catalogue, "weights": args.weights, "seeds": args.seeds}, project_dir=project, experiment=params.tracking.experiment) as parent:
        for weight in args.weights:
            for seed in args.seeds:
                train = params.pretrain.train.model_copy(update={"seed": seed, **({"epochs": args.epochs} if args.epochs else {})})
                update = {"concept_weight": weight, "train": train}
                if args.arch:
                    update["model"] = params.pretrain.model.model_copy(update={"arch": args.arch})
                config = params.pretrain.model_copy(update=update)
                name = f"{args.name}-cw{weight:g}-seed{seed}"
                with stage_run("pretrain", {"pretrain": config.model_dump(mode="json"), "catalogue": args.name}, project_dir=project, experiment=params.tracking.experiment, run_name=name) as run:
                    run.set_tags({"lightclip.ablation": "concepts", "lightclip.catalogue": args.name, "lightclip.concept_weight": weight})
                    out = project / ".cache" / "ablation" / name
                    context = StageContext(project, progress=sys.stderr.isatty(), resume=args.resume, log_metrics=lambda values, step: run.log_metrics(values, step=step))
                    metrics = run_pretrain(config, PretrainInputs(catalogue=Path(args.catalogue), kg=Path(args.kg)), PretrainOutputs(model=out, metrics=out.with_suffix(".json")), context)
                    run.log_metrics(metrics)
                print(f"{name}: {summarise(metrics)}", flush=True)
                results.append({"catalogue": args.name, "concept_weight": weight, "seed": seed, **{k: metrics[k] for k in REPORTED if k in metrics}})
        parent.set_tags({"lightclip.ablation": "concepts"})

    lines = [f"| catalogue | concept weight | seeds | test mean recall | test i2t R@1 | test t2i R@1 | s/run |", "|---|---|---|---|---|---|---|"]
    for weight in args.weights:
        rows = [r for r in results if r["concept_weight"] == weight]
        col = lambda key: [r[key] for r in rows]  # noqa: E731
        lines.append(f"| {args.name} | {weight:g} | {len(rows)} | {mean_std(col('test/mean_recall'))} | {mean_std(col('test/i2t_R@1'))} | {mean_std(col('test/t2i_R@1'))} | {statistics.mean(col('train_seconds')):.0f} |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": results, "table": table}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
