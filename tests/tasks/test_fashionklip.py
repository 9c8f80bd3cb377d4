"""The FashionKLIP task: concept inputs, the concept term, the memory bank and prototype refresh."""

from __future__ import annotations

import numpy as np
import pytest

import lightclip.tasks.fashionklip as fashionklip
import lightclip.tasks.image_text as image_text
from lightclip.config import ConceptLossConfig, TrainConfig
from lightclip.models import ModelSpec, create_model, tokenizer
from lightclip.tasks import ConceptInputs, FashionKLIPTask, ImageTextTask
from lightclip.tasks.fashionklip import PrototypeSelection
from lightclip.training import make_optimizer, train_step

SPEC = ModelSpec(arch="lc-test-tiny")


def links_for(n: int) -> list[list[str]]:
    return [["tshirt", "red tshirt"] if i % 2 else ["dress"] for i in range(n)]


def test_concept_inputs_table_slots_and_given_prototypes(tiny_pairs):
    ids = tiny_pairs[0].images.ids
    concepts = ConceptInputs.build(ids, links_for(len(ids)), max_slots=3, prototypes_per_concept=4)
    assert concepts.concepts == ("dress", "red tshirt", "tshirt")
    assert concepts.item_concepts.shape == (32, 3) and (concepts.item_concepts[0] == [0, -1, -1]).all()
    assert (concepts.prototypes >= 0).all()  # every concept has at least 4 items here
    given = ConceptInputs.build(ids, dict(zip(ids, links_for(len(ids)))), max_slots=3, prototypes_per_concept=4, prototypes={"dress": ["nope", ids[4], ids[2]]})
    assert list(given.prototypes[0]) == [4, 2, -1, -1]  # the given ones, training items only, in order
    assert (given.prototypes[1:] == concepts.prototypes[1:]).all() and (given.item_concepts == concepts.item_concepts).all()


def count_text_encodes(monkeypatch) -> dict[str, int]:
    calls = {"n": 0}
    real = image_text.encode_text

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(image_text, "encode_text", counting)
    monkeypatch.setattr(fashionklip, "encode_text", counting)
    return calls


def test_plain_clip_encodes_titles_only_and_concepts_need_a_weight(tiny_pairs, monkeypatch):
    calls = count_text_encodes(monkeypatch)
    model, _ = create_model(SPEC, seed=0)
    plain = ImageTextTask(model, tokenizer(SPEC), *tiny_pairs)
    batch = next(iter(plain.train_batches(0, np.random.default_rng(0), 8)))
    out = plain.loss(batch)
    assert calls["n"] == 1 and set(out) == {"loss", "clip", "logit_scale"}
    concepts = ConceptInputs.build(tiny_pairs[0].images.ids, links_for(32), max_slots=3, prototypes_per_concept=4)
    with pytest.raises(ValueError, match="concept_weight must be > 0"):
        FashionKLIPTask(model, tokenizer(SPEC), *tiny_pairs, concepts=concepts, concept_weight=0.0)


def test_concept_term_trains_and_the_bank_fills(tiny_pairs, monkeypatch):
    calls = count_text_encodes(monkeypatch)
    model, _ = create_model(SPEC, seed=0)
    concepts = ConceptInputs.build(tiny_pairs[0].images.ids, links_for(32), max_slots=3, prototypes_per_concept=4)
    task = FashionKLIPTask(model, tokenizer(SPEC), *tiny_pairs, concepts=concepts, concept_weight=0.5, concept_config=ConceptLossConfig(top_k=2))
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-3, warmup_steps=0, grad_clip_norm=0.0, num_threads=1)
    optimizer = make_optimizer(task.named_parameters(), config)
    params = [p for _, p in task.named_parameters()]
    seen = []
    for epoch in range(2):
        for batch in task.train_batches(epoch, np.random.default_rng(epoch), 8):
            assert batch.concepts is not None and batch.concepts.slot_ids.shape == (8, 3)
            calls["n"] = 0
            seen.append(train_step(task, batch, optimizer, None, params))
            assert calls["n"] == 2  # titles + the batch's concept prompts
    assert {"concept", "concept_prototype", "concept_image"} <= set(seen[0])
    assert all(np.isfinite(list(s.values())).all() for s in seen)
    assert seen[0]["concept_prototype"] == 0.0  # nothing in the bank yet
    assert seen[-1]["concept_prototype"] > 0.0  # prototypes seen in epoch 1 are used in epoch 2
    assert bool(task.bank_valid.all())


def test_refresh_repicks_prototypes_among_the_concepts_items_and_state_round_trips(tiny_pairs):
    model, _ = create_model(SPEC, seed=0)
    ids = tiny_pairs[0].images.ids
    links = links_for(len(ids))
    concepts = ConceptInputs.build(ids, links, max_slots=3, prototypes_per_concept=3)
    task = FashionKLIPTask(model, tokenizer(SPEC), *tiny_pairs, concepts=concepts, concept_weight=0.5,
                           selection=PrototypeSelection(prototypes_per_concept=3, mmr_lambda=0.5, prototype_pool=8))
    task.refresh_prototypes()
    assert task.prototype_refreshes == 0  # no image embedded yet: nothing to pick from
    for batch in task.train_batches(0, np.random.default_rng(0), 8):
        task.loss(batch)
    task.on_epoch_end(0)
    assert task.prototype_refreshes == 1
    members = {c: {r for r, item in enumerate(links) if c in item} for c in concepts.concepts}
    for c, name in enumerate(concepts.concepts):
        picked = [int(r) for r in task.concepts.prototypes[c] if r >= 0]
        assert len(picked) == 3 and set(picked) <= members[name], (name, picked)
    state = task.state_dict()
    other = FashionKLIPTask(create_model(SPEC, seed=1)[0], tokenizer(SPEC), *tiny_pairs,
                            concepts=ConceptInputs.build(ids, links, max_slots=3, prototypes_per_concept=3), concept_weight=0.5)
    other.load_state_dict(state)
    assert (other.concepts.prototypes == task.concepts.prototypes).all() and other.prototype_refreshes == 1
    assert bool((other.bank == task.bank).all()) and bool((other.bank_valid == task.bank_valid).all())
    assert task.prototype_ids(ids) == {name: [ids[r] for r in task.concepts.prototypes[c] if r >= 0] for c, name in enumerate(concepts.concepts)}
