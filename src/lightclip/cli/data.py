"""``lightclip data``: render the synthetic catalogue, import and export catalogues."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from lightclip.cli.common import _params, _stage
from lightclip.stage import StageContext


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
