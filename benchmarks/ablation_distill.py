"""CocaCLIP distillation ablation on any catalogue: one student's edge-set variants x seeds, one MLflow parent.

The embedded default runs the same sweep as a DVC matrix (``pipelines/ablation/dvc.yaml``);
this script is for catalogues outside the DVC project (the shared real catalogue), where the
teacher and its ``teacher_embed`` cache were made with the CLI. Each (variant, seed) of
``--student`` is an MLflow child run with the same metric names as the pipeline's distill runs;
per-run metrics go to ``--runs-dir/<student>/<variant>-seed<n>.json`` and the table
(``ablation_table.py``, every student found under ``--runs-dir``) to ``--out``.

    lightclip teacher-embed --params P --in SPLIT --teacher TEACHER --out EMB --metrics /tmp/te.json
    python benchmarks/ablation_distill.py --params P --catalogue SPLIT --teacher TEACHER \
        --teacher-embeddings EMB --seeds 0 --name real --student xxt --out metrics/ablation_distill_real.json

Run one benchmark at a time: this machine has 2 cores and parallel runs halve each other.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ablation_table import distill_table, read_runs, write_table

from lightclip.config import load_params
from lightclip.data.catalogue import Catalogue
from lightclip.distill import DistillInputs, DistillOutputs, run_distill
from lightclip.env import configure_environment
from lightclip.models.zoo import load_model, load_tokenizer, preprocess_config
from lightclip.pretrain import summarise
from lightclip.stage import StageContext
from lightclip.tasks import split_metrics
from lightclip.tracking import pipeline_run, project_root, stage_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="distill / distill_ablation sections come from here")
    parser.add_argument("--catalogue", required=True, help="split catalogue dir")
    parser.add_argument("--teacher", required=True, help="teacher model dir")
    parser.add_argument("--teacher-embeddings", required=True, help="teacher_embed output dir for this teacher and catalogue")
    parser.add_argument("--student", help="a name of distill_ablation.students (default: the first)")
    parser.add_argument("--variants", nargs="+", help="default: every distill_ablation.variants")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: distill_ablation.seeds")
    parser.add_argument("--epochs", type=int, help="override distill.train.epochs")
    parser.add_argument("--name", default="real", help="catalogue label for runs and the table")
    parser.add_argument("--runs-dir", help="per-run metrics (default: metrics/ablation/<name>)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    project = project_root()
    configure_environment(project)
    params = load_params(args.params)
    ablation = params.distill_ablation
    variants = args.variants or list(ablation.variants)
    seeds = args.seeds if args.seeds is not None else ablation.seeds
    catalogue = Catalogue.load(args.catalogue)
    student = args.student or ablation.students[0]
    runs_dir = Path(args.runs_dir or project / "metrics" / "ablation" / args.name) / student
    runs_dir.mkdir(parents=True, exist_ok=True)
    with pipeline_run(f"ablation-distill-{args.name}", {"catalogue": args.catalogue, "teacher": args.teacher, "student": student, "variants": variants, "seeds": seeds}, project_dir=project, experiment=params.tracking.experiment) as parent:
        parent.set_tags({"lightclip.ablation": "distill", "lightclip.catalogue": args.name})
        for variant in variants:
            for seed in seeds:
                job = params.distill_job(student, variant=variant, seed=seed)
                if args.epochs:
                    job = job.model_copy(update={"train": job.train.model_copy(update={"epochs": args.epochs})})
                name = f"{variant}-seed{seed}"
                run_params = {"distill": job.trajectory(), "student_name": student, "variant": variant, "catalogue": args.name}
                with stage_run("distill", run_params, project_dir=project, experiment=params.tracking.experiment, run_name=f"{args.name}-{student}-{name}") as run:
                    run.set_tags({"lightclip.ablation": "distill", "lightclip.student": student, "lightclip.variant": variant, "lightclip.catalogue": args.name})
                    inputs = DistillInputs(catalogue=Path(args.catalogue), teacher=Path(args.teacher), teacher_embeddings=Path(args.teacher_embeddings))
                    out = project / ".cache" / "ablation-distill" / args.name / f"{student}-{name}"
                    context = StageContext(project, progress=sys.stderr.isatty(), resume=True, log_metrics=lambda values, step: run.log_metrics(values, step=step))
                    metrics = run_distill(job, inputs, DistillOutputs(model=out, metrics=runs_dir / f"{name}.json"), context)
                    run.log_metrics(metrics)
                print(f"{args.name} {name}: {summarise(metrics)}", flush=True)
    model = load_model(args.teacher)
    size = int(preprocess_config(model)["size"])
    teacher = split_metrics(model, load_tokenizer(args.teacher), catalogue, "test", size, project / ".cache" / "images", progress=False)
    # the table covers every student whose runs are in the runs directory, not only this call's
    write_table(distill_table(read_runs(runs_dir.parent), args.name, teacher), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
