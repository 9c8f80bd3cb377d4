"""In-distribution against new products at the same gallery size *and* the same article-type mix.

The real recipe's new products (the newest ids) are not only unseen: whole collections arrived
together, so some article types are three to four times denser in their gallery than in the
past's (handbags 12% against 4%), and a dense type is full of look-alikes. ``real_table.py``
reweights per-type scores, which corrects the mix of queries but not the density of each gallery.
This draws, for each model pair (the random split's model, the id-ordered split's model), galleries
of the same size with the same article-type counts from each side's test set, so that both
sides search among equally many look-alikes of each type, and compares the mean recall.

The size is the largest that the in-distribution test set can fill at the new products' mix
(types absent from it are left out of both sides and reported). Each draw is repeated with
``--draws`` seeds; the spread over draws is reported with the means.

    cd pipelines/real && python ../../benchmarks/matched_galleries.py --in-distribution random \
        --new-products id_order --draws 5 --out metrics/matched_galleries.json
    # each side: data/<order>/split, models/<order>/teacher, models/<order>/students/*
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lightclip.config import EvaluateConfig
from lightclip.data.catalogue import Catalogue
from lightclip.evaluation import evaluate_model

TYPE = "articleType"


def matched_counts(shares: pd.Series, available: pd.Series, size: int) -> tuple[pd.Series, list[str]]:
    """Items per type for a gallery of ``size`` at ``shares`` (counts by largest remainder).

    A type the in-distribution test set cannot fill at that size (too few of it, or none) is
    left out of both galleries and returned apart; the other shares are renormalised.
    """
    left_out: list[str] = []
    while True:
        kept = shares.drop(left_out)
        kept = kept / kept.sum()
        short = [t for t, share in kept.items() if available.get(t, 0) < share * size]
        if not short:
            break
        left_out += short
    exact = kept * size  # <= available for every type, so no count can pass it (a remainder < 1 only rounds up)
    counts = np.floor(exact).astype(int)
    for t in (exact - counts).sort_values(ascending=False).index[: size - int(counts.sum())]:
        counts[t] += 1
    return counts[counts > 0], sorted(left_out)


def draw(items: pd.DataFrame, counts: pd.Series, rng: np.random.Generator) -> pd.DataFrame:
    """``counts[t]`` random items of each type ``t`` (catalogue order kept)."""
    rows = np.concatenate([rng.choice(np.flatnonzero(items[TYPE].to_numpy() == t), size=n, replace=False) for t, n in counts.items()])
    return items.iloc[np.sort(rows)].reset_index(drop=True)


def collection_neighbours(items: pd.DataFrame) -> float:
    """Mean number of other gallery items of the same brand (a title's first word) and type: how
    many look-alikes of its own collection each product is searched among."""
    key = items["title"].astype(str).str.split().str[0] + "|" + items[TYPE].astype(str)
    return float((key.map(key.value_counts()) - 1).mean())


def side_models(order: str) -> dict[str, Path]:
    models = {"teacher": Path("models") / order / "teacher"}
    models.update({d.name: d for d in sorted((Path("models") / order / "students").glob("*")) if (d / "model.json").is_file()})
    return models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-distribution", default="random", help="the order whose test set is the past")
    parser.add_argument("--new-products", default="id_order", help="the order whose test set is the new products")
    parser.add_argument("--size", type=int, default=250, help="gallery size (a quarter of the recipe's 1,000: the past's test set fills most types)")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()

    past = Catalogue.load(Path("data") / args.in_distribution / "split")
    new = Catalogue.load(Path("data") / args.new_products / "split")
    past_test, new_test = past.split("test"), new.split("test")
    shares = new_test[TYPE].value_counts(normalize=True)
    counts, missing = matched_counts(shares, past_test[TYPE].value_counts(), args.size)
    size = int(counts.sum())
    left_out = float(shares.reindex(missing).sum()) if missing else 0.0
    print(f"galleries of {size} items at the new products' mix ({len(counts)} types); left out: {len(missing)} types the past's "
          f"test set cannot fill at that size ({', '.join(missing)}: {100 * left_out:.1f}% of the new products)")
    config = EvaluateConfig(split="test")
    cache = Path(".cache") / "images"
    models = {"past": side_models(args.in_distribution), "new": side_models(args.new_products)}
    names = [name for name in models["past"] if name in models["new"]]
    print(f"same-brand same-type neighbours per product, whole test sets: past {collection_neighbours(past_test):.1f}, "
          f"new {collection_neighbours(new_test):.1f}")
    kinds = ("past", "new", "past_any", "new_any")  # matched type counts; and plain random draws of the same size
    scores: dict[str, dict[str, list[float]]] = {name: {kind: [] for kind in kinds} for name in names}
    neighbours: dict[str, list[float]] = {kind: [] for kind in kinds}
    for seed in range(args.draws):
        rng = np.random.default_rng(seed)
        galleries = {"past": draw(past_test, counts, rng), "new": draw(new_test, counts, rng),
                     "past_any": past_test.iloc[np.sort(rng.choice(len(past_test), size, replace=False))].reset_index(drop=True),
                     "new_any": new_test.iloc[np.sort(rng.choice(len(new_test), size, replace=False))].reset_index(drop=True)}
        for kind in kinds:
            neighbours[kind].append(collection_neighbours(galleries[kind]))
        for name in names:
            for kind in kinds:
                side = "past" if kind.startswith("past") else "new"
                catalogue = Catalogue(root=(past if side == "past" else new).root, items=galleries[kind])
                result = evaluate_model(name, models[side][name], catalogue, config, cache_dir=cache)
                scores[name][kind].append(float(result.metrics["test/mean_recall"]))
        print(f"draw {seed}: " + ", ".join(f"{n} {scores[n]['past'][-1]:.1f} / {scores[n]['new'][-1]:.1f}" for n in names), flush=True)

    def mean_sd(values: list[float]) -> tuple[float, float]:
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    rows = []
    for name in names:
        row: dict[str, Any] = {"model": name}
        for kind in kinds:
            row[kind], row[f"{kind}_sd"] = mean_sd(scores[name][kind])
        row["ratio"], row["ratio_any"] = row["new"] / row["past"], row["new_any"] / row["past_any"]
        row["draws"] = scores[name]
        rows.append(row)
    print(f"\nmean recall ± sd over {args.draws} draws, galleries of {size}; same-brand same-type neighbours per product: "
          + ", ".join(f"{kind} {np.mean(neighbours[kind]):.1f}" for kind in kinds))
    print("| model | in-dist., same type counts | new, same type counts | new / in-dist. | in-dist., random draw | new, random draw | new / in-dist. |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['past']:.1f} ± {r['past_sd']:.1f} | {r['new']:.1f} ± {r['new_sd']:.1f} | {100 * r['ratio']:.0f}% | "
              f"{r['past_any']:.1f} ± {r['past_any_sd']:.1f} | {r['new_any']:.1f} ± {r['new_any_sd']:.1f} | {100 * r['ratio_any']:.0f}% |")
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
        report: dict[str, Any] = {
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]), "commit": commit,
            "gallery": size, "types": {str(t): int(c) for t, c in counts.items()}, "left_out_types": missing,
            "left_out_share_of_new": left_out, "draws": args.draws,
            "neighbours": {kind: float(np.mean(v)) for kind, v in neighbours.items()},
            "neighbours_whole_test": {"past": collection_neighbours(past_test), "new": collection_neighbours(new_test)}, "seconds": time.perf_counter() - started, "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
