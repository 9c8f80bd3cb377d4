"""The argument parser: every command, its options and its handler.

It imports the handler modules only; they import the stage modules inside each handler, which
keeps ``lightclip --help`` light (``tests/test_cli.py`` checks it)."""

from __future__ import annotations

import argparse

from lightclip.cli.data import cmd_synth, cmd_import_kaggle, cmd_import_manifest, cmd_import_webdataset, cmd_export_webdataset
from lightclip.cli.ops import cmd_pipeline, cmd_tracking_migrate, cmd_serve, cmd_services, cmd_plots
from lightclip.cli.registry import cmd_registry_list, cmd_registry_show, cmd_registry_promote, cmd_registry_audit, cmd_registry_rollback
from lightclip.cli.stages import cmd_validate, cmd_split, cmd_build_kg, cmd_pretrain, cmd_ensemble, cmd_export_onnx, cmd_teacher_embed, cmd_distill, cmd_evaluate, cmd_index, cmd_search, cmd_bench, cmd_register


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

    export_onnx = commands.add_parser("export-onnx", help="export a saved model's towers to ONNX, fp32 and int8 (ONNX Runtime: same vectors, less per-call overhead)")
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
    evaluate.add_argument("--students", metavar="DIR", help="also evaluate every model saved under DIR, each named after its folder (with --model: instead of evaluate.models)")
    evaluate.add_argument("--baseline", action="append", metavar="NAME=ARCH[@PRETRAINED]",
                          help="also evaluate this pretrained open_clip model zero-shot, e.g. clip=ViT-B-32@/data/clip-vit-b-32 (repeatable; instead of evaluate.baselines)")
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
    bench.add_argument("--in", dest="input", default="data/split", help="the evaluated catalogue, for each runtime's recall (default: data/split)")
    bench.add_argument("--plots", default="metrics/plots/bench/recall_vs_latency.csv",
                       help="recall-vs-latency plot data, every model and runtime (default: metrics/plots/bench/recall_vs_latency.csv)")
    bench.add_argument("--figure", default="reports/bench/recall_vs_latency.png", help="the same plot as a PNG, logged to MLflow")
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
    serve.add_argument("--runtime", choices=["auto", "torch", "onnx", "onnx-int8"],
                       help="what embeds the queries (default: serve.runtime, auto = ONNX Runtime when the version carries an export; "
                            "onnx-int8 = its int8 graphs)")
    serve.set_defaults(handler=cmd_serve)

    services = commands.add_parser("services", help="the team deployment: PostgreSQL, S3 (SeaweedFS), MLflow and Prefect servers, 2 workers (docs/team.md)")
    services.add_argument("services_command", choices=["up", "down", "status"], help="start (idempotent), stop (data kept) or list them")
    services.add_argument("--dir", help="state directory: data, logs, ports, team.env (default: .services in the project)")
    services.set_defaults(handler=cmd_services)
    return parser
