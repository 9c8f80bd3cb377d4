"""Batches of look-alikes (``train.batch_groups``): the order, the pair set, the config."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from lightclip.config import BatchGroupsConfig, TrainConfig
from lightclip.data.catalogue import CatalogueError
from lightclip.models import ModelSpec, create_model, tokenizer
from lightclip.tasks import ImageTextTask, PairSet
from lightclip.tasks.image_text import grouped_order
from lightclip.training import checkpoint_key

SPEC = ModelSpec(arch="lc-test-tiny")


def train_only(catalogue, blank_types: tuple[int, ...] = ()):
    """The catalogue with every item in train (and no article type on the rows ``blank_types``)."""
    items = catalogue.items.copy()
    items["split"] = "train"
    items.loc[list(blank_types), "articleType"] = None
    return catalogue.with_items(items).save()


def runs_of(order: np.ndarray, kinds: np.ndarray) -> list[np.ndarray]:
    """``order`` cut where the kind changes."""
    cuts = np.flatnonzero(kinds[order][1:] != kinds[order][:-1]) + 1
    return np.split(order, cuts)


def test_grouped_order_is_a_permutation_of_runs_of_one_kind():
    kinds = np.array([0] * 21 + [1] * 5 + [2] * 40 + [3] * 1)
    order = grouped_order(kinds, 8, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(len(kinds)))  # every row once: nothing dropped or repeated
    runs = runs_of(order, kinds)
    # each kind is cut into ceil(count / 8) runs, in random order (two runs of one kind may touch)
    assert len(set(kinds.tolist())) < len(runs) <= sum(-(-count // 8) for count in np.bincount(kinds))
    assert sum(kinds[run[0]] == 2 for run in runs) >= 2  # the 40 of kind 2 are spread, not one block
    # a batch of 32 holds several runs of one kind: hard negatives, not one kind only
    first = kinds[order[:32]]
    assert len(set(first.tolist())) >= 2 and np.bincount(first).max() >= 5


def test_grouped_order_is_a_pure_function_of_the_generator_and_differs_per_epoch():
    kinds = np.repeat(np.arange(6), 10)
    assert np.array_equal(grouped_order(kinds, 4, np.random.default_rng(3)), grouped_order(kinds, 4, np.random.default_rng(3)))
    rng = np.random.default_rng(3)
    assert not np.array_equal(grouped_order(kinds, 4, rng), grouped_order(kinds, 4, rng))


def test_pair_set_reads_the_column_and_the_task_batches_by_it(tiny_catalogue, tmp_path):
    catalogue = train_only(tiny_catalogue(n=32))  # 4 article types, 8 items each
    groups = BatchGroupsConfig(column="articleType", run=4)
    pairs = PairSet.from_catalogue(catalogue, "train", 32, tmp_path / "cache", progress=False, batch_groups=groups)
    assert pairs.batch_run == 4
    types = catalogue.split("train")["articleType"].tolist()
    assert len(set(pairs.batch_kinds.tolist())) == len(set(types))
    assert all((pairs.batch_kinds == pairs.batch_kinds[i]).tolist() == [t == types[i] for t in types] for i in range(len(types)))

    model, _ = create_model(SPEC, seed=0)
    task = ImageTextTask(model, tokenizer(SPEC), pairs, None)
    batches = [rows for rows, _ in task.epoch_rows(np.random.default_rng(0), 8)]
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(pairs)))
    for rows in batches:  # 8 rows = two runs of 4 look-alikes
        assert len(rows) == 8 and np.bincount(pairs.batch_kinds[rows]).max() >= 4

    plain = PairSet.from_catalogue(catalogue, "train", 32, tmp_path / "cache", progress=False)
    assert plain.batch_kinds is None


def test_an_unknown_column_is_named_with_the_catalogue_and_its_columns(tiny_catalogue, tmp_path):
    catalogue = train_only(tiny_catalogue(n=8))
    with pytest.raises(CatalogueError, match=r"catalogue.*'brandName' is not a column.*articleType"):
        PairSet.from_catalogue(catalogue, "train", 32, tmp_path / "cache", progress=False, batch_groups=BatchGroupsConfig(column="brandName"))


def test_empty_values_form_a_kind_of_their_own(tiny_catalogue, tmp_path):
    catalogue = train_only(tiny_catalogue(n=8), blank_types=(0, 5))
    pairs = PairSet.from_catalogue(catalogue, "train", 32, tmp_path / "cache", progress=False,
                                   batch_groups=BatchGroupsConfig(column="articleType"))
    kinds = pairs.batch_kinds
    assert kinds[0] == kinds[5] and (kinds == kinds[0]).sum() == 2  # kept, not dropped


def test_groups_need_the_image_cache_and_leave_old_checkpoint_keys_alone():
    with pytest.raises(ValidationError, match="batch_groups.column needs train.images.source: cache"):
        TrainConfig(batch_groups={"column": "articleType"}, images={"source": "webdataset", "shards": "s-{000..001}.tar"})
    plain = TrainConfig().model_dump(mode="json")
    without = {k: v for k, v in plain.items() if k != "batch_groups"}
    assert checkpoint_key({"train": plain}) == checkpoint_key({"train": without})  # runs from before the knob resume
    grouped = TrainConfig(batch_groups={"column": "articleType"}).model_dump(mode="json")
    assert checkpoint_key({"train": grouped}) != checkpoint_key({"train": plain})
