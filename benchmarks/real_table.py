"""In-distribution against new products, side by side: the last stage of ``pipelines/real/dvc.yaml``.

Each side is one whole pipeline's metrics folder (``split.json``, ``eval.json``, and the
``pretrain.json`` / ``distill/<student>.json`` training costs): the random split's (the past: its
test products are drawn from the same period as its training products) and the id-ordered
split's (new products: the newest ids). Both test sets have the same size, so the galleries
match; the table says so, and refuses two galleries of different sizes.

    python benchmarks/real_table.py --in-distribution metrics/random --new-products metrics/id_order \
        --out metrics/real_recipe.json --report reports/real_recipe.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

METRICS = ("mean_recall", "i2t_R@1", "t2i_R@1", "i2t_R@10", "t2i_R@10")


def read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SystemExit(f"{path}: missing (run the pipeline that writes it first)")
    return json.loads(path.read_text(encoding="utf-8"))


def side(folder: Path) -> dict[str, Any]:
    """One pipeline's test metrics per model, its split and its models' training seconds."""
    split = read(folder / "split.json")
    evaluation = read(folder / "eval.json")
    seconds: dict[str, float] = {}
    if (folder / "pretrain.json").is_file():
        seconds["teacher"] = float(read(folder / "pretrain.json")["train_seconds"])
    for path in sorted((folder / "distill").glob("*.json")):
        seconds[path.stem] = float(read(path)["train_seconds"])
    models: dict[str, dict[str, float]] = {}
    for name, metrics in evaluation.items():
        prefix = next(key.split("/")[0] for key in metrics if key.endswith("/mean_recall"))
        models[name] = {m: float(metrics[f"{prefix}/{m}"]) for m in METRICS}
        models[name]["gallery"] = int(metrics[f"{prefix}/n_items"])
        if name in seconds:
            models[name]["train_seconds"] = seconds[name]
    return {"by": split.get("by", "random"), "split": {k: split[k] for k in ("train", "val", "test")},
            "order_median": split.get("order_median"), "models": models}


def compare(in_distribution: dict[str, Any], new_products: dict[str, Any]) -> dict[str, Any]:
    """Per model: both sides' metrics and new / in-distribution mean recall (the issue's 85% goal)."""
    rows = {}
    for name, seen in in_distribution["models"].items():
        new = new_products["models"].get(name)
        if new is None:
            continue
        if seen["gallery"] != new["gallery"]:
            raise SystemExit(f"{name}: galleries differ ({seen['gallery']} in-distribution, {new['gallery']} new products); "
                             "make split.test a count")
        rows[name] = {"in_distribution": seen, "new_products": new,
                      "new_over_in_distribution": new["mean_recall"] / seen["mean_recall"] if seen["mean_recall"] else None}
    return {"in_distribution": {k: v for k, v in in_distribution.items() if k != "models"},
            "new_products": {k: v for k, v in new_products.items() if k != "models"}, "models": rows}


def markdown(table: dict[str, Any]) -> str:
    seen, new = table["in_distribution"], table["new_products"]
    gallery = next(iter(table["models"].values()))["in_distribution"]["gallery"] if table["models"] else 0
    lines = [
        f"Test gallery: {gallery} products on both sides. In-distribution: split by {seen['by']} "
        f"({seen['split']['train']} train / {seen['split']['val']} val / {seen['split']['test']} test); new products: "
        f"split by {new['by']} ({new['split']['train']} / {new['split']['val']} / {new['split']['test']}).",
        "",
        "| model | in-distribution mean recall | new-product mean recall | new / in-distribution | "
        "in-dist. i2t / t2i R@1 | new i2t / t2i R@1 |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in table["models"].items():
        a, b = row["in_distribution"], row["new_products"]
        ratio = row["new_over_in_distribution"]
        lines.append(f"| {name} | {a['mean_recall']:.1f} | {b['mean_recall']:.1f} | "
                     f"{'-' if ratio is None else f'{100 * ratio:.0f}%'} | "
                     f"{a['i2t_R@1']:.1f} / {a['t2i_R@1']:.1f} | {b['i2t_R@1']:.1f} / {b['t2i_R@1']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-distribution", type=Path, required=True, help="metrics folder of the random split's pipeline")
    parser.add_argument("--new-products", type=Path, required=True, help="metrics folder of the id-ordered split's pipeline")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--report", type=Path)
    args = parser.parse_args(argv)
    table = compare(side(args.in_distribution), side(args.new_products))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    text = markdown(table)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text("# In-distribution against new products\n\n" + text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
