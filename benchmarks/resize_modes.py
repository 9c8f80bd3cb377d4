"""Which resize mode trains and transfers best on real product photos: crop, pad or squash.

The shared Kaggle catalogue's photos were shot 3:4 and stretched to 224x224 squares. This
benchmark undoes the stretch (each image back to 168x224, its shot geometry), so that the three
modes differ at all (on squares they are the same resize), and then:

- trains one model per mode on the portrait catalogue (the same recipe each time: plain FashionKLIP
  pre-training of the student architecture, one member, the real recipe's params otherwise), and one
  on the square catalogue (any mode: squares are resized alike);
- evaluates every model on the portrait test set and on the square test set (the geometry it was
  not trained on: a shop whose photos change shape), each with its own mode, as serving would.

The split is the real recipe's id-ordered one (the test set is new products). Needs the real
recipe's validated split and graph: run ``dvc repro build_kg@id_order`` in pipelines/real first.

    python benchmarks/resize_modes.py --out metrics/resize_modes_real.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "src") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "src"))

from lightclip.data.catalogue import Catalogue  # noqa: E402

MODES = ("crop", "pad", "squash")
PORTRAIT = (168, 224)  # 3:4, the photos' shot geometry at the stored height


def portrait_catalogue(square: Catalogue, out: Path) -> Catalogue:
    """The catalogue with every image un-stretched to 3:4 (same items, ids and split)."""
    if (out / "catalogue.parquet").is_file():
        return Catalogue.load(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    items = square.items.copy()
    names = []
    for item_id, image in zip(items["id"], items["image"]):
        name = f"images/{item_id}.png"
        with Image.open(square.image_path(image)) as source:
            source.convert("RGB").resize(PORTRAIT, Image.Resampling.BICUBIC).save(out / name)
        names.append(name)
    items["image"] = names
    return Catalogue(root=out, items=items).save()


def lightclip(params: Path, work: Path, *args: str) -> None:
    command = [str(Path(sys.executable).parent / "lightclip"), "--params", str(params), "--project", str(work), "-q", *args]
    subprocess.run(command, check=True)


def mean_recall(metrics_file: Path) -> dict[str, float]:
    metrics = json.loads(metrics_file.read_text())
    return {name: float(values["test/mean_recall"]) for name, values in metrics.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=REPO_ROOT / "pipelines" / "real", help="the real recipe's folder")
    parser.add_argument("--work", type=Path, default=REPO_ROOT / ".cache" / "resize_modes")
    parser.add_argument("--arch", default="lc-vit-xt")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "metrics" / "resize_modes_real.json")
    args = parser.parse_args(argv)

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    square = Catalogue.load(args.recipe / "data" / "id_order" / "split")
    kg = args.recipe / "data" / "id_order" / "kg"
    started = time.perf_counter()
    portrait = portrait_catalogue(square, work / "portrait")
    print(f"portrait catalogue: {len(portrait)} images at {PORTRAIT[0]}x{PORTRAIT[1]} in {time.perf_counter() - started:.0f} s", flush=True)

    base = yaml.safe_load((args.recipe / "params.yaml").read_text())
    runs = [(f"portrait-{mode}", portrait, mode) for mode in args.modes] + [("square", square, "crop")]
    seconds: dict[str, float] = {}
    for name, catalogue, mode in runs:
        params = json.loads(json.dumps(base))
        params["pretrain"]["model"].update(arch=args.arch, resize_mode=mode)
        params["pretrain"]["ensemble_members"] = 1
        params["pretrain"]["train"]["epochs"] = args.epochs
        params["tracking"]["experiment"] = "resize-modes"
        params_file = work / f"params_{name}.yaml"
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        model = work / "models" / name
        if not (model / "model.json").is_file():
            print(f"training {name} ({args.arch}, resize_mode {mode}, {args.epochs} epochs)", flush=True)
            lightclip(params_file, work, "pretrain", "--in", str(catalogue.root), "--kg", str(kg), "--out", str(model),
                      "--metrics", str(work / "metrics" / f"{name}.json"), "--resume", "--run-name", f"resize-{name}")
        seconds[name] = float(json.loads((work / "metrics" / f"{name}.json").read_text())["train_seconds"])

    evaluations: dict[str, dict[str, float]] = {}
    for geometry, catalogue in (("portrait", portrait), ("square", square)):
        models = [arg for name, _, _ in runs for arg in ("--model", f"{name}={work / 'models' / name}")]
        out = work / "eval" / geometry
        lightclip(work / f"params_{runs[0][0]}.yaml", work, "evaluate", "--in", str(catalogue.root), *models,
                  "--metrics", str(out / "eval.json"), "--figures", str(out / "figures"), "--plots", str(out / "plots"),
                  "--ranks", str(out / "ranks.json"))
        evaluations[geometry] = mean_recall(out / "eval.json")

    table = {
        "setup": {"arch": args.arch, "epochs": args.epochs, "portrait_size": list(PORTRAIT), "split": "id_order",
                  "test_items": int((square.items["split"] == "test").sum()), "threads": os.environ.get("LIGHTCLIP_THREADS", "auto")},
        "models": {name: {"trained_on": "portrait" if name.startswith("portrait") else "square", "resize_mode": mode,
                          "train_seconds": seconds[name],
                          "test_mean_recall_portrait": evaluations["portrait"][name],
                          "test_mean_recall_square": evaluations["square"][name]}
                   for name, _, mode in runs},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    print("| model | trained on | resize mode | portrait test | square test | train s |")
    print("|---|---|---|---|---|---|")
    for name, row in table["models"].items():
        print(f"| {name} | {row['trained_on']} | {row['resize_mode']} | {row['test_mean_recall_portrait']:.1f} | "
              f"{row['test_mean_recall_square']:.1f} | {row['train_seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
