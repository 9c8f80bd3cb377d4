"""The ``split`` stage: a deterministic, leakage-free train/val/test assignment.

Items that are near-certainly the same product are grouped and a group always lands in one
split: identical titles (compared folded: :func:`lightclip.data.titles.fold_title`), identical
image bytes (sha256) and identical ids are joined with union-find, transitively. Groups are
visited in a seeded order that is stable across platforms and Python versions (sorted by
``sha256(f"{seed}:{smallest id}")``); test is filled first, then val, the rest is train.
A group joins a split only while it brings that split's count closer to its target, so
actual sizes may deviate slightly from the targets (groups are atomic) and are reported.

``split.by`` other than ``random`` measures new products rather than the past: groups are
visited newest first (a group is as new as its newest member), so the test set holds the
largest ids (``id_order``: numerically when every id is an integer, else as text) or the latest
values of a column (``year``; text compares as text, so ISO dates order correctly), val the
next ones. Ties keep the seeded order, and items without a value come last (train); their
count is reported.

Any ``split`` values already in the catalogue are overwritten.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from lightclip.config import SplitConfig, SplitSize
from lightclip.data.catalogue import SPLITS, Catalogue, CatalogueError, file_sha256, normalise_items
from lightclip.data.titles import fold_title
from lightclip.io import write_json
from lightclip.stage import StageContext


def _is_null(value: Any) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def normalise_title(title: Any) -> str | None:
    """The title's :func:`~lightclip.data.titles.fold_title`; ``None`` for a missing (None, NaN,
    NA) or blank title, which joins no group."""
    if _is_null(title):
        return None
    return fold_title(str(title)) or None


def target_size(size: SplitSize, n_items: int) -> int:
    """Items requested by a size: a float in [0, 1) is a fraction of ``n_items``, an int a count."""
    if isinstance(size, bool):
        raise CatalogueError(f"split size must be a fraction or a count, got {size!r}")
    if isinstance(size, float):
        return int(round(size * n_items))
    return int(size)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def group_items(ids: Sequence[Any], titles: Sequence[Any], image_hashes: Sequence[str | None]) -> list[int]:
    """Per item, a group label (the group's first row): same id, title or image -> same group."""
    n = len(ids)
    if not (len(titles) == len(image_hashes) == n):
        raise CatalogueError(f"group_items: {n} ids, {len(titles)} titles and {len(image_hashes)} image hashes")
    uf = _UnionFind(n)
    first: dict[tuple[str, str], int] = {}
    for i in range(n):
        keys = [("title", normalise_title(titles[i])), ("image", image_hashes[i]), ("id", ids[i])]
        for kind, value in keys:
            if _is_null(value):
                continue
            key = (kind, str(value))
            if key in first:
                uf.union(first[key], i)
            else:
                first[key] = i
    return [uf.find(i) for i in range(n)]


def _image_hashes(catalogue: Catalogue) -> list[str]:
    hashes = []
    for item_id, image in zip(catalogue.items["id"], catalogue.items["image"]):
        path = catalogue.image_path(image) if isinstance(image, str) else None
        if path is None or not path.is_file():
            raise CatalogueError(f"item {item_id}: image {image!r} not found (run the validate stage first)")
        hashes.append(file_sha256(path))
    return hashes


def _number(value: Any) -> float | None:
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def order_values(items: pd.DataFrame, by: str) -> list[Any]:
    """Per row, the value ``split.by`` orders by (larger = newer); ``None`` when it has none.

    ``id_order`` compares ids as integers when every id is one (``"99" < "100"``), else as text;
    a column compares as numbers when every non-null value is one, else as text.
    """
    if by != "id_order" and by not in items.columns:
        raise CatalogueError(f"split.by: the catalogue has no column {by!r}")
    values = [None if _is_null(v) else v for v in (items["id"] if by == "id_order" else items[by])]
    present = [v for v in values if v is not None]
    if by == "id_order":  # ints, not floats: long ids stay exact
        if all(str(v).strip().lstrip("-").isdigit() for v in present):
            return [None if v is None else int(str(v).strip()) for v in values]
    elif all(_number(v) is not None for v in present):
        return [None if v is None else _number(v) for v in values]
    return [None if v is None else str(v) for v in values]


def assign_splits(catalogue: Catalogue, config: SplitConfig, *, image_hashes: Sequence[str | None] | None = None) -> Catalogue:
    """Return ``catalogue`` with a fresh ``split`` column (existing values are overwritten).

    ``image_hashes`` (sha256 of each item's image bytes, in item order; ``None`` = do not group
    by image) are computed with :func:`file_sha256` when not given. Raises
    :class:`CatalogueError` when val + test would leave no training items.
    """
    items = normalise_items(catalogue.items)
    n = len(items)
    n_test, n_val = target_size(config.test, n), target_size(config.val, n)
    if n == 0 or n_test + n_val >= n:
        raise CatalogueError(
            f"split: val={config.val!r} ({n_val} items) + test={config.test!r} ({n_test} items) "
            f"leaves no training items out of {n}; lower val/test"
        )
    hashes = list(image_hashes) if image_hashes is not None else _image_hashes(catalogue)
    if len(hashes) != n:
        raise CatalogueError(f"split: {len(hashes)} image hashes for {n} items")
    ids = items["id"].tolist()
    labels = group_items(ids, items["title"].tolist(), hashes)

    members: dict[int, list[int]] = {}
    for row, label in enumerate(labels):
        members.setdefault(label, []).append(row)

    def order_key(rows: list[int]) -> tuple[str, str]:
        smallest = min(str(ids[r]) for r in rows)
        return hashlib.sha256(f"{config.seed}:{smallest}".encode("utf-8")).hexdigest(), smallest

    groups = sorted(members.values(), key=order_key)
    if config.by != "random":  # newest group first; ties (and the unordered, last) keep the seeded order
        order = order_values(items, config.by)

        def newest(rows: list[int]) -> tuple[bool, Any]:
            present = [order[r] for r in rows if order[r] is not None]
            return (True, max(present)) if present else (False, 0)

        groups = sorted(groups, key=newest, reverse=True)
    assignment = ["train"] * n
    remaining = groups
    for split, target in (("test", n_test), ("val", n_val)):
        count, left = 0, []
        for rows in remaining:
            # take a group only while it brings the count closer to the target
            if count < target and abs(count + len(rows) - target) < abs(count - target):
                count += len(rows)
                for r in rows:
                    assignment[r] = split
            else:
                left.append(rows)
        remaining = left
    if "train" not in assignment:
        raise CatalogueError(f"split: no training items left out of {n} (groups are atomic); lower val/test")
    items["split"] = assignment
    return catalogue.with_items(items)


def split_counts(catalogue: Catalogue) -> dict[str, int]:
    """Items per split (train/val/test), 0 for an empty split."""
    counts = catalogue.items["split"].value_counts()
    return {name: int(counts.get(name, 0)) for name in SPLITS}


@dataclass(frozen=True)
class SplitInputs:
    catalogue: Path  # the validated catalogue (data/validated)


@dataclass(frozen=True)
class SplitOutputs:
    catalogue: Path  # the split catalogue (data/split)
    metrics: Path  # metrics/split.json


def run_split(config: SplitConfig, inputs: SplitInputs, outputs: SplitOutputs, context: StageContext) -> dict[str, Any]:
    """The ``split`` stage: load the catalogue, assign splits, save it, write the counts JSON."""
    in_dir, out_dir, metrics_path = Path(inputs.catalogue), Path(outputs.catalogue), Path(outputs.metrics)
    if in_dir.resolve() == out_dir.resolve():
        raise CatalogueError(f"{out_dir}: the split catalogue must go to a different folder than its input")
    catalogue = Catalogue.load(in_dir)
    hashes = _image_hashes(catalogue)
    split = assign_splits(catalogue, config, image_hashes=hashes).save(out_dir)
    n = len(split)
    labels = group_items(split.items["id"].tolist(), split.items["title"].tolist(), hashes)
    sizes: dict[int, int] = {}
    for label in labels:
        sizes[label] = sizes.get(label, 0) + 1
    counts = split_counts(split)
    metrics = {
        "items": n,
        **counts,
        "fractions": {name: round(counts[name] / n, 6) for name in SPLITS},
        "targets": {"val": target_size(config.val, n), "test": target_size(config.test, n)},
        "groups": len(sizes),
        "grouped_items": sum(s for s in sizes.values() if s > 1),
        "largest_group": max(sizes.values()),
        "by": config.by,
    }
    if config.by != "random":  # what "new" means here: each split's range and median of the order value
        order = order_values(normalise_items(split.items), config.by)
        splits = split.items["split"].tolist()
        values = {name: sorted(o for o, s in zip(order, splits) if s == name and o is not None) for name in SPLITS}
        # groups are atomic and as new as their newest member: their older members widen the ranges
        metrics["order_range"] = {name: [vs[0], vs[-1]] if vs else None for name, vs in values.items()}
        metrics["order_median"] = {name: vs[len(vs) // 2] if vs else None for name, vs in values.items()}
        metrics["unordered_items"] = sum(o is None for o in order)
    write_json(metrics_path, metrics, sort_keys=False)
    return metrics
