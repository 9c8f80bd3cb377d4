"""FashionKLIP: CLIP training plus concept-level alignment against the concept knowledge graph.

Each training pair carries up to ``max_slots`` concepts of the graph (its own, most specific
first, then their parents); each concept's prompt is aligned with its prototype images and with
the pair's image (:func:`lightclip.losses.concept_alignment_loss`). Prototype embeddings come
from a memory bank of the latest (detached) image embedding of every training item, updated by
each step at no extra cost; prototypes not yet seen in this run are masked, so the prototype
term starts during the first epoch. Every ``refresh_every_epochs`` the prototypes are re-picked
with the current teacher the way the knowledge graph picked them (FAISS + MMR), as in the
reference. The bank and the prototypes are part of the task's state, which keeps resume exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lightclip import distributed
from lightclip.config import ConceptLossConfig
from lightclip.evaluation import embed_texts
from lightclip.kg.prototypes import select_prototypes
from lightclip.losses import combine_with_concept, concept_alignment_loss
from lightclip.models.zoo import encode_text
from lightclip.tasks.image_text import ClipBatch, ImageTextTask, PairSet, Tokenizer


@dataclass(frozen=True)
class PrototypeSelection:
    """How a concept's prototype images are chosen: the knowledge graph's rule, reused by refreshes."""

    prototypes_per_concept: int = 10
    mmr_lambda: float = 0.7
    prototype_pool: int = 64


@dataclass(frozen=True)
class ConceptInputs:
    """Concept links of the training items.

    ``concepts``: the concept table; ``item_concepts``: ``N x K`` ids into it per training item
    (-1 = padding, most specific first); ``slot_weights``: ``N x K``; ``prototypes``: ``C x P``
    training-item indices whose images are the concept's visual prototypes (-1 = padding).
    """

    concepts: tuple[str, ...]
    item_concepts: np.ndarray
    slot_weights: np.ndarray
    prototypes: np.ndarray

    @classmethod
    def build(
        cls,
        item_ids: Sequence[str],
        links: Mapping[str, Sequence[str]] | Sequence[Sequence[str]],
        *,
        max_slots: int = 5,
        prototypes_per_concept: int = 10,
        seed: int = 0,
        prototypes: Mapping[str, Sequence[str]] | None = None,
    ) -> "ConceptInputs":
        """From item -> concepts links (e.g. :func:`lightclip.kg.graph.item_concepts`).

        ``prototypes`` (concept -> item ids, best first, e.g. the knowledge graph's FAISS + MMR
        choice) fixes a concept's prototype images; ids that are not training items are
        skipped (prototype embeddings come from the training memory bank). Concepts without
        any are given a seeded sample of the training items linked to them.
        """
        lists = [list(links.get(str(i), ())) for i in item_ids] if isinstance(links, Mapping) else [list(x) for x in links]
        if len(lists) != len(item_ids):
            raise ValueError(f"{len(item_ids)} items but {len(lists)} concept lists")
        table = tuple(sorted({c for concepts in lists for c in concepts[:max_slots]}))
        index = {c: i for i, c in enumerate(table)}
        slots = np.full((len(lists), max_slots), -1, dtype=np.int64)
        members: list[list[int]] = [[] for _ in table]
        for row, concepts in enumerate(lists):
            for k, concept in enumerate(dict.fromkeys(concepts[:max_slots])):
                slots[row, k] = index[concept]
                members[index[concept]].append(row)
        row_of = {str(i): r for r, i in enumerate(item_ids)}
        chosen_rows = np.full((len(table), prototypes_per_concept), -1, dtype=np.int64)
        for c, rows in enumerate(members):
            given = [row_of[str(i)] for i in (prototypes or {}).get(table[c], ()) if str(i) in row_of]
            if given:
                chosen = list(dict.fromkeys(given))[:prototypes_per_concept]
            else:
                rng = np.random.default_rng([seed, c])  # per concept: independent of the others
                chosen = sorted(rng.choice(rows, size=min(len(rows), prototypes_per_concept), replace=False)) if rows else []
            chosen_rows[c, : len(chosen)] = chosen
        weights = (slots >= 0).astype(np.float32)
        return cls(concepts=table, item_concepts=slots, slot_weights=weights, prototypes=chosen_rows)


@dataclass
class ConceptBatch:
    tokens: torch.Tensor  # C_b x L prompt tokens of the batch concept table
    slot_ids: torch.Tensor  # B x K ids into the batch table, -1 = padding
    slot_weights: torch.Tensor  # B x K
    prototype_items: torch.Tensor  # C_b x P training-item indices, -1 = padding


@dataclass
class FashionKLIPBatch(ClipBatch):
    concepts: ConceptBatch | None = None  # of the global batch
    global_indices: torch.Tensor | None = None  # the global batch's rows (None: ``indices``, one process)


class FashionKLIPTask(ImageTextTask):
    """CLIP + FashionKLIP concept alignment; ``concept_weight`` scales the concept term (> 0)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        train: PairSet,
        val: PairSet | None,
        *,
        concepts: ConceptInputs,
        concept_weight: float,
        concept_config: ConceptLossConfig = ConceptLossConfig(),
        selection: PrototypeSelection = PrototypeSelection(),
        hflip: bool = True,
        eval_batch_size: int = 512,
    ) -> None:
        super().__init__(model, tokenizer, train, val, hflip=hflip, eval_batch_size=eval_batch_size)
        if concept_weight <= 0:
            raise ValueError("FashionKLIPTask: concept_weight must be > 0 (0 is plain CLIP: use ImageTextTask)")
        if concepts.item_concepts.shape[0] != len(train):
            raise ValueError(f"concept links for {concepts.item_concepts.shape[0]} items, but {len(train)} training pairs")
        self.concepts = concepts
        self.concept_weight = float(concept_weight)
        self.concept_config = concept_config
        self.selection = selection
        self.prototype_refreshes = 0
        prompts = [concept_config.prompt.format(c) for c in concepts.concepts]
        self.concept_tokens = tokenizer(prompts) if prompts else torch.zeros((0, self.train_tokens.shape[1]), dtype=torch.long)
        self.bank = torch.zeros((len(train), self.embed_dim()), dtype=torch.float32)
        self.bank_valid = torch.zeros(len(train), dtype=torch.bool)

    def to(self, device: torch.device) -> "FashionKLIPTask":
        """The model and the memory bank on ``device`` (the bank is read and written every step)."""
        super().to(device)
        self.bank = self.bank.to(device)
        self.bank_valid = self.bank_valid.to(device)
        return self

    def train_batches(self, epoch: int, rng: np.random.Generator, batch_size: int) -> Iterator[FashionKLIPBatch]:
        """This rank's images and titles; the concepts of the global batch (the loss is the global batch's)."""
        world = distributed.world()
        for rows, flips in self.epoch_rows(rng, batch_size):
            batch = self.clip_batch(distributed.shard(rows, world), distributed.shard(flips, world))
            yield FashionKLIPBatch(
                indices=batch.indices, images=batch.images, tokens=batch.tokens,
                concepts=self._concept_batch(rows), global_indices=torch.from_numpy(rows),
            )

    def _concept_batch(self, rows: np.ndarray) -> ConceptBatch:
        ids = self.concepts.item_concepts[rows]
        table, local = np.unique(ids, return_inverse=True)
        local = local.reshape(ids.shape)
        if table.size and table[0] == -1:  # padding sorts first
            table, local = table[1:], local - 1
        local[ids < 0] = -1
        return ConceptBatch(
            tokens=self.concept_tokens[torch.from_numpy(table)],
            slot_ids=torch.from_numpy(local),
            slot_weights=torch.from_numpy(self.concepts.slot_weights[rows]),
            prototype_items=torch.from_numpy(self.concepts.prototypes[table]),
        )

    def loss(self, batch: FashionKLIPBatch) -> dict[str, torch.Tensor]:  # type: ignore[override]
        image_emb, text_emb, scale = self.encode(batch)  # of the global batch
        indices = batch.indices if batch.global_indices is None else batch.global_indices
        out = self.clip_terms(image_emb, text_emb, scale)
        cb = batch.concepts
        if cb is not None and cb.tokens.shape[0]:
            cfg = self.concept_config
            items = cb.prototype_items.clamp_min(0)
            # each rank encodes its share of the batch's concept prompts, gathered with gradients
            concept_emb = distributed.encode_sharded(lambda tokens: encode_text(self.model, tokens, normalize=True), cb.tokens, distributed.world())
            terms = concept_alignment_loss(
                image_emb,
                concept_emb,
                cb.slot_ids,
                scale,
                prototype_emb=self.bank[items],  # C_b x P x D
                prototype_mask=(cb.prototype_items >= 0) & self.bank_valid[items],
                prototype_item_ids=cb.prototype_items,
                item_ids=indices,
                slot_weights=cb.slot_weights,
                top_k=cfg.top_k,
                prototype_weight=cfg.prototype_weight,
                image_weight=cfg.image_weight,
                return_terms=True,
            )
            out["loss"] = combine_with_concept(out["loss"], terms["concept"], weight=self.concept_weight, adaptive=cfg.adaptive)
            out.update({k: v.detach() for k, v in terms.items()})
        with torch.no_grad():  # every rank's bank gets the whole batch: the banks stay equal
            self.bank[indices] = image_emb.detach().float()
            self.bank_valid[indices] = True
        return out

    def on_epoch_end(self, epoch: int) -> None:
        every = self.concept_config.refresh_every_epochs
        if every and (epoch + 1) % every == 0:
            self.refresh_prototypes()

    def refresh_prototypes(self) -> None:
        """Re-pick each concept's prototypes with the current model, as FashionKLIP does.

        Query: the model's embedding of the concept prompt; pool: the latest embeddings of the
        training images that name the concept (the memory bank); FAISS top-``prototype_pool``,
        then MMR for diversity. Images not embedded yet in this run are not eligible.
        """
        valid = self.bank_valid.cpu().numpy()
        if not valid.any():
            return
        slots = self.concepts.item_concepts
        members: list[list[int]] = [[] for _ in self.concepts.concepts]
        for row, concept in zip(*np.nonzero(slots >= 0)):
            if valid[row]:
                members[slots[row, concept]].append(int(row))
        queries = embed_texts(self.model, self.concept_tokens, self.eval_batch_size)
        chosen = select_prototypes(
            queries.numpy(),
            self.bank.cpu().numpy(),
            k=self.concepts.prototypes.shape[1],
            mmr_lambda=self.selection.mmr_lambda,
            pool_size=self.selection.prototype_pool,
            candidates=[np.asarray(m, dtype=np.int64) for m in members],
        )
        for c, rows in enumerate(chosen):
            if rows:  # keep the old prototypes of a concept none of whose images was seen yet
                self.concepts.prototypes[c] = -1
                self.concepts.prototypes[c, : len(rows)] = rows
        # ranks on machines with other thread counts could round a near tie differently: rank 0's choice holds
        distributed.broadcast_array_(self.concepts.prototypes, distributed.world())
        self.prototype_refreshes += 1

    def run_metrics(self) -> dict[str, float]:
        """Read by :func:`lightclip.training.fit` at the end of the run, before the best checkpoint."""
        return {**super().run_metrics(), "prototype_refreshes": self.prototype_refreshes}

    def prototype_ids(self, item_ids: Sequence[str]) -> dict[str, list[str]]:
        """Concept -> current prototype item ids (for saving beside the teacher)."""
        return {c: [str(item_ids[r]) for r in self.concepts.prototypes[i] if r >= 0] for i, c in enumerate(self.concepts.concepts)}

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {
            "bank": self.bank.clone(),
            "bank_valid": self.bank_valid.clone(),
            "prototypes": torch.from_numpy(self.concepts.prototypes.copy()),
            "prototype_refreshes": self.prototype_refreshes,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if "bank" in state:
            self.bank.copy_(state["bank"])
            self.bank_valid.copy_(state["bank_valid"])
        if "prototypes" in state:
            self.concepts.prototypes[...] = state["prototypes"].numpy()
            self.prototype_refreshes = int(state.get("prototype_refreshes", 0))
