"""In-distribution against new products, side by side: the last stage of ``pipelines/real/dvc.yaml``.

Each side is one whole pipeline's metrics folder (``split.json``, ``eval.json``, and the
``pretrain.json`` / ``distill/<student>.json`` training costs): the random split's (the past: its
test products are drawn from the same period as its training products) and the id-ordered
split's (new products: the newest ids). Both test sets have the same size, so the galleries
match; the table says so, and refuses two galleries of different sizes.

New products are not only new: their mix of article types differs from the past's. Given the
split catalogues, each model's in-distribution score is also standardised to the new products'
article-type mix (its per-type mean recall from ``eval_ranks.json``, weighted by the new test set's
type shares), which separates "harder kinds of product" from "products the model has not seen".

    python benchmarks/real_table.py --in-distribution metrics/random --new-products metrics/id_order \
        --splits data/random/split data/id_order/split --out metrics/real_recipe.json --report reports/real_recipe.md
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

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


def per_item_recall(ranks: dict[str, list[int]], ks: Sequence[int]) -> list[float]:
    """Each test item's share of the 2 x len(ks) hits (its image query and its title query): their
    mean over the items is the mean recall, in percent."""
    n = len(ranks["i2t"])
    return [100.0 * sum(int(ranks[d][i] < k) for d in ("i2t", "t2i") for k in ks) / (2 * len(ks)) for i in range(n)]


def by_type(folder: Path, split_dir: Path, column: str = "articleType") -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per model, the mean recall of each article type's test items; and the test set's type shares."""
    ranks = read(folder / "eval_ranks.json")
    test = pd.read_parquet(split_dir / "catalogue.parquet")
    types = test.loc[test["split"] == ranks.get("split", "test"), column].fillna("(none)").tolist()
    shares = pd.Series(types).value_counts(normalize=True).to_dict()
    scores: dict[str, dict[str, float]] = {}
    for model, model_ranks in ranks["models"].items():
        items = per_item_recall(model_ranks, ranks["ks"])
        if len(items) != len(types):
            raise SystemExit(f"{folder / 'eval_ranks.json'}: {len(items)} ranks for {len(types)} test items of {split_dir}")
        sums: dict[str, list[float]] = defaultdict(list)
        for kind, score in zip(types, items):
            sums[kind].append(score)
        scores[model] = {kind: sum(v) / len(v) for kind, v in sums.items()}
    return scores, shares


def standardise(scores: dict[str, float], shares: dict[str, float]) -> tuple[float, float]:
    """``scores`` (per type) weighted by ``shares`` over the types both have; and the share covered."""
    common = [kind for kind in shares if kind in scores]
    covered = sum(shares[kind] for kind in common)
    return sum(scores[kind] * shares[kind] for kind in common) / covered, covered


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


def add_type_mix(table: dict[str, Any], seen_metrics: Path, new_metrics: Path, seen_split: Path, new_split: Path) -> None:
    """Per model: the in-distribution mean recall at the new products' article-type mix, and each
    side's per-type scores for the new test set's largest types."""
    seen_scores, seen_shares = by_type(seen_metrics, seen_split)
    new_scores, new_shares = by_type(new_metrics, new_split)
    largest = sorted(new_shares, key=new_shares.get, reverse=True)[:8]
    for name, row in table["models"].items():
        value, covered = standardise(seen_scores[name], new_shares)
        row["in_distribution_at_new_type_mix"] = value
        row["type_mix_coverage"] = covered
        row["by_type"] = {kind: {"in_distribution": seen_scores[name].get(kind), "new_products": new_scores[name].get(kind),
                                 "share_in_distribution": seen_shares.get(kind, 0.0), "share_new_products": new_shares[kind]}
                          for kind in largest}


def markdown(table: dict[str, Any]) -> str:
    seen, new = table["in_distribution"], table["new_products"]
    gallery = next(iter(table["models"].values()))["in_distribution"]["gallery"] if table["models"] else 0
    lines = [
        f"Test gallery: {gallery} products on both sides. In-distribution: split by {seen['by']} "
        f"({seen['split']['train']} train / {seen['split']['val']} val / {seen['split']['test']} test); new products: "
        f"split by {new['by']} ({new['split']['train']} / {new['split']['val']} / {new['split']['test']}).",
        "",
        "| model | in-distribution mean recall | new-product mean recall | new / in-distribution | "
        "in-dist. at the new type mix | in-dist. i2t / t2i R@1 | new i2t / t2i R@1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in table["models"].items():
        a, b = row["in_distribution"], row["new_products"]
        ratio = row["new_over_in_distribution"]
        mix, coverage = row.get("in_distribution_at_new_type_mix"), row.get("type_mix_coverage", 0.0)
        lines.append(f"| {name} | {a['mean_recall']:.1f} | {b['mean_recall']:.1f} | "
                     f"{'-' if ratio is None else f'{100 * ratio:.0f}%'} | "
                     f"{'-' if mix is None else f'{mix:.1f} (types of {100 * coverage:.0f}% of new items)'} | "
                     f"{a['i2t_R@1']:.1f} / {a['t2i_R@1']:.1f} | {b['i2t_R@1']:.1f} / {b['t2i_R@1']:.1f} |")
    first = next(iter(table["models"].values()), {})
    if "by_type" in first:
        names = list(table["models"])
        lines += ["", "Mean recall by article type (the new test set's largest types; share of each test set):", "",
                  "| article type | share in-dist. / new | " + " | ".join(f"{n} in-dist. / new" for n in names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for kind, cell in first["by_type"].items():
            scores = [table["models"][n]["by_type"][kind] for n in names]
            fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
            lines.append(f"| {kind} | {100 * cell['share_in_distribution']:.1f}% / {100 * cell['share_new_products']:.1f}% | "
                         + " | ".join(f"{fmt(s['in_distribution'])} / {fmt(s['new_products'])}" for s in scores) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-distribution", type=Path, required=True, help="metrics folder of the random split's pipeline")
    parser.add_argument("--new-products", type=Path, required=True, help="metrics folder of the id-ordered split's pipeline")
    parser.add_argument("--splits", type=Path, nargs=2, metavar=("IN_DISTRIBUTION", "NEW_PRODUCTS"),
                        help="the two split catalogues: standardise the in-distribution score to the new products' article-type mix")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--report", type=Path)
    args = parser.parse_args(argv)
    table = compare(side(args.in_distribution), side(args.new_products))
    if args.splits:
        add_type_mix(table, args.in_distribution, args.new_products, *args.splits)
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
