"""Deterministic, leakage-free train/val/test split."""

from __future__ import annotations

import json
import shutil

import pytest

from lightclip.config import SplitConfig
from lightclip.data.catalogue import Catalogue, CatalogueError
from lightclip.data.split import SplitInputs, SplitOutputs, assign_splits, group_items, run_split, split_counts
from lightclip.stage import StageContext


def splits_of(cat: Catalogue) -> dict[str, str]:
    return dict(zip(cat.items["id"], cat.items["split"]))


@pytest.fixture
def grouped(tiny_catalogue):
    """40 items with three title groups and two image groups (one joined by a title, too)."""
    cat = tiny_catalogue(40)
    items = cat.items.copy()
    for row in (0, 1, 2):
        items.loc[row, "title"] = "Brand Black Tshirt"
    items.loc[10, "title"] = "  Red   DRESS "
    items.loc[11, "title"] = "red dress"
    items.loc[20, "title"] = "Blue Jeans"
    items.loc[6, "title"] = "blue  jeans"  # joins the image group {5, 6} below: {5, 6, 20}
    for src, dst in ((5, 6), (30, 31), (30, 32)):
        shutil.copyfile(cat.root / "images" / f"{src}.png", cat.root / "images" / f"{dst}.png")
    groups = [{0, 1, 2}, {10, 11}, {5, 6, 20}, {30, 31, 32}]
    return cat.with_items(items).save(), groups


def test_grouping_by_title_and_image_is_transitive(grouped):
    cat, groups = grouped
    from lightclip.data.catalogue import file_sha256

    labels = group_items(cat.items["id"].tolist(), cat.items["title"].tolist(), [file_sha256(p) for p in cat.image_paths()])
    for group in groups:
        assert len({labels[r] for r in group}) == 1
    assert len(set(labels)) == 40 - sum(len(g) - 1 for g in groups)


def test_same_seed_same_assignment(grouped):
    cat, _ = grouped
    config = SplitConfig(seed=7, val=0.2, test=0.2)
    first = assign_splits(cat, config)
    again = assign_splits(cat, config)
    assert splits_of(first) == splits_of(again)
    assert set(first.items["split"]) == {"train", "val", "test"}


def test_different_seed_different_assignment(grouped):
    cat, _ = grouped
    a = assign_splits(cat, SplitConfig(seed=0, val=0.2, test=0.2))
    b = assign_splits(cat, SplitConfig(seed=1, val=0.2, test=0.2))
    assert splits_of(a) != splits_of(b)


def test_groups_never_straddle_splits(grouped):
    cat, groups = grouped
    ids = cat.items["id"].tolist()
    outside_train = 0
    for seed in range(12):
        split = splits_of(assign_splits(cat, SplitConfig(seed=seed, val=0.25, test=0.25)))
        for group in groups:
            assert len({split[ids[r]] for r in group}) == 1, (seed, group)
            outside_train += split[ids[next(iter(group))]] != "train"
    assert outside_train > 0  # the check above is not vacuous


def test_fraction_sizes_close_to_targets(grouped):
    cat, groups = grouped
    largest = max(len(g) for g in groups)
    for seed in range(5):
        counts = split_counts(assign_splits(cat, SplitConfig(seed=seed, val=0.1, test=0.2)))
        assert abs(counts["test"] - 8) < largest and abs(counts["val"] - 4) < largest
        assert sum(counts.values()) == 40


def test_singletons_hit_targets_exactly(tiny_catalogue):
    cat = tiny_catalogue(20)
    counts = split_counts(assign_splits(cat, SplitConfig(seed=3, val=0.1, test=0.25)))
    assert counts == {"train": 13, "val": 2, "test": 5}
    counts = split_counts(assign_splits(cat, SplitConfig(seed=3, val=3, test=4)))  # item counts
    assert counts == {"train": 13, "val": 3, "test": 4}


def test_given_hashes_match_computed_ones_and_existing_splits_are_overwritten(grouped):
    cat, _ = grouped
    from lightclip.data.catalogue import file_sha256

    items = cat.items.copy()
    items["split"] = "test"
    stale = cat.with_items(items)
    config = SplitConfig(seed=2, val=0.1, test=0.1)
    given = assign_splits(stale, config, image_hashes=[file_sha256(p) for p in cat.image_paths()])
    assert splits_of(given) == splits_of(assign_splits(cat, config))
    assert split_counts(given)["train"] > 0


@pytest.mark.parametrize("val,test", [(0.5, 0.5), (6, 4), (0.6, 4)])
def test_no_training_items_left_is_an_error(tiny_catalogue, val, test):
    cat = tiny_catalogue(10)
    with pytest.raises(CatalogueError, match="leaves no training items"):
        assign_splits(cat, SplitConfig(val=val, test=test))


def test_run_split_writes_catalogue_and_counts(grouped, tmp_path):
    cat, _ = grouped
    outputs = SplitOutputs(catalogue=tmp_path / "split", metrics=tmp_path / "split.json")
    metrics = run_split(SplitConfig(seed=0, val=0.1, test=0.1), SplitInputs(catalogue=cat.root), outputs, StageContext(project_dir=tmp_path, progress=False))
    out = Catalogue.load(tmp_path / "split")
    assert all(p.is_file() for p in out.image_paths())
    assert split_counts(out) == {k: metrics[k] for k in ("train", "val", "test")}
    assert metrics["train"] + metrics["val"] + metrics["test"] == metrics["items"] == 40
    assert json.loads((tmp_path / "split.json").read_text()) == metrics
    assert metrics["groups"] == 40 - 7 and metrics["largest_group"] == 3


# -- split by order: new products in test ---------------------------------------------------------

#: ``grouped``'s test ids at seed 7, val 0.2, test 0.2, from the split code before ``split.by`` existed.
RANDOM_SEED7_TEST = ["1003", "1004", "1010", "1011", "1013", "1022", "1023", "1035"]


def test_random_stays_the_default_and_unchanged(grouped):
    cat, _ = grouped
    assert SplitConfig().by == "random"
    # the assignment of seed 7 before split.by existed (a regression pin: random must stay bit-identical)
    split = splits_of(assign_splits(cat, SplitConfig(seed=7, val=0.2, test=0.2)))
    assert [i for i, s in sorted(split.items()) if s == "test"] == RANDOM_SEED7_TEST


def test_id_order_puts_the_largest_ids_in_test_then_val(tiny_catalogue):
    cat = tiny_catalogue(20)
    items = cat.items.copy()
    items["id"] = [str(v) for v in (5, 7, 9, 11, 13, 95, 97, 99, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 1000)]
    cat = cat.with_items(items)
    split = splits_of(assign_splits(cat, SplitConfig(seed=3, val=0.1, test=0.2, by="id_order")))
    test = sorted((int(i) for i, s in split.items() if s == "test"))
    val = sorted((int(i) for i, s in split.items() if s == "val"))
    assert test == [108, 109, 110, 1000]  # numerically largest: "1000" > "99" although not as text
    assert val == [106, 107]
    assert all(int(i) < 106 for i, s in split.items() if s == "train")


def test_id_order_keeps_groups_whole_and_dates_a_group_by_its_newest_member(tiny_catalogue):
    cat = tiny_catalogue(10)
    items = cat.items.copy()
    items.loc[0, "title"] = items.loc[9, "title"]  # the oldest id is the same product as the newest
    split = splits_of(assign_splits(cat.with_items(items), SplitConfig(val=0, test=3, by="id_order")))
    assert {i for i, s in split.items() if s == "test"} == {"1000", "1009", "1008"}


def test_a_column_puts_its_latest_values_in_test_and_unordered_items_in_train(tiny_catalogue, tmp_path):
    cat = tiny_catalogue(12)
    items = cat.items.copy()
    items["year"] = [2011, 2012, 2019, 2013, 2018, 2014, 2015, 2016, 2017, None, 2010, 2020]
    cat = cat.with_items(items).save()
    config = SplitConfig(val=2, test=3, by="year")
    split = splits_of(assign_splits(cat, config))
    assert {i for i, s in split.items() if s == "test"} == {"1011", "1002", "1004"}  # 2020, 2019, 2018
    assert {i for i, s in split.items() if s == "val"} == {"1008", "1007"}  # 2017, 2016
    assert split["1009"] == "train"  # no year: never "new"
    outputs = SplitOutputs(catalogue=tmp_path / "split", metrics=tmp_path / "split.json")
    metrics = run_split(config, SplitInputs(catalogue=cat.root), outputs, StageContext(project_dir=tmp_path, progress=False))
    assert metrics["by"] == "year" and metrics["unordered_items"] == 1
    assert metrics["order_range"] == {"train": [2010.0, 2015.0], "val": [2016.0, 2017.0], "test": [2018.0, 2020.0]}
    assert metrics["order_median"] == {"train": 2013.0, "val": 2017.0, "test": 2019.0}


def test_ties_in_the_order_column_are_broken_by_the_seed(tiny_catalogue):
    cat = tiny_catalogue(12)
    items = cat.items.copy()
    items["year"] = [2015] * 8 + [2016] * 4
    cat = cat.with_items(items)
    picks = set()
    for seed in range(6):
        split = splits_of(assign_splits(cat, SplitConfig(seed=seed, val=0, test=6, by="year")))
        test = {i for i, s in split.items() if s == "test"}
        assert {"1008", "1009", "1010", "1011"} <= test and len(test) == 6  # every 2016 item, then two of 2015
        picks.add(frozenset(test))
    assert len(picks) > 1


def test_an_unknown_split_order_is_a_config_error():
    with pytest.raises(ValueError, match="unknown split order 'date'"):
        SplitConfig(by="date")
