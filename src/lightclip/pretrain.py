"""The ``pretrain`` stage: the FashionKLIP teacher.

CLIP image-text contrastive training plus, when ``concept_weight > 0``, the concept-level
alignment against the knowledge graph built by ``build_kg`` (concept links per item, prototype
images and the rule that chose them, re-applied with the teacher during training).
``concept_weight: 0`` is the plain-CLIP baseline of the ablation, with everything else identical.
With ``ensemble_members: n`` the stage trains n single models (seeds ``seed``, ``seed + 1``, ...)
and ships their ensemble (:mod:`lightclip.models.ensemble`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pydantic import ValidationError
from torch import nn

from lightclip import devices, distributed, finetune
from lightclip.config import PretrainConfig
from lightclip.data.catalogue import Catalogue, file_sha256
from lightclip.data.geometry import MODEL_KEY as GEOMETRY_KEY
from lightclip.data.geometry import catalogue_geometry
from lightclip.io import write_json
from lightclip.kg.build import ITEM_CONCEPTS_FILE, PROTOTYPES_FILE, SELECTION_FILE
from lightclip.kg.concepts import KGError
from lightclip.kg.graph import load_graph
from lightclip.models.ensemble import EnsembleCLIP
from lightclip.models.zoo import ModelError, ModelSpec, count_parameters, create_model, pretrained_identity, tokenizer
from lightclip.stage import StageContext
from lightclip.tasks import ConceptInputs, FashionKLIPTask, ImageTextTask, PairSet, split_metrics
from lightclip.tasks.fashionklip import PrototypeSelection
from lightclip.training import checkpoint_key, fit, history_json, save_trained

HISTORY_FILE = "train_history.json"
STAGE = "pretrain"


@dataclass(frozen=True)
class PretrainInputs:
    catalogue: Path  # a split catalogue (data/split)
    kg: Path | None  # the build_kg output (data/kg); needed when concept_weight > 0


@dataclass(frozen=True)
class PretrainOutputs:
    model: Path  # models/teacher
    metrics: Path  # metrics/pretrain.json


@dataclass(frozen=True)
class ConceptSource:
    """What pre-training reads from the knowledge graph: links, prototypes and how they were chosen."""

    links: dict[str, list[str]]
    prototypes: dict[str, list[str]]
    selection: PrototypeSelection
    identity: str  # hash of the links: part of the checkpoint key

    @classmethod
    def load(cls, kg_dir: Path, train_ids: list[str]) -> "ConceptSource":
        kg_dir = Path(kg_dir)
        load_graph(kg_dir / "graph.json")  # a missing or empty graph is a clear KGError
        links_path = kg_dir / ITEM_CONCEPTS_FILE
        for path in (links_path, kg_dir / PROTOTYPES_FILE, kg_dir / SELECTION_FILE):
            if not path.is_file():
                raise KGError(f"{path}: missing (rebuild the knowledge graph: dvc repro build_kg)")
        links = json.loads(links_path.read_text(encoding="utf-8"))
        missing = [i for i in train_ids if i not in links]
        if missing:
            raise KGError(
                f"{links_path}: the knowledge graph does not match the catalogue: {len(missing)} training item(s) have no concept "
                f"entry, e.g. {missing[:5]} (the graph is stale: rebuild it with dvc repro build_kg)"
            )
        if not any(links[i] for i in train_ids):
            raise KGError(f"{links_path}: no training item is linked to any concept")
        selection = json.loads((kg_dir / SELECTION_FILE).read_text(encoding="utf-8"))
        return cls(
            links=links,
            prototypes=json.loads((kg_dir / PROTOTYPES_FILE).read_text(encoding="utf-8")),
            selection=PrototypeSelection(**selection),
            identity=file_sha256(links_path),
        )

    def inputs(self, train_ids: list[str], config: PretrainConfig, seed: int) -> ConceptInputs:
        return ConceptInputs.build(
            train_ids,
            self.links,
            max_slots=config.concept.max_slots,
            prototypes_per_concept=self.selection.prototypes_per_concept,
            seed=seed,
            prototypes=self.prototypes,
        )


def member_configs(config: PretrainConfig) -> list[PretrainConfig]:
    """One single-model config per ensemble member (seeds ``seed``, ``seed + 1``, ...).

    Member 0 of an ensemble is the same run as the single-model teacher with the same params
    (same checkpoint key), so going from 1 to n members retrains nothing that exists.
    """
    return [
        config.model_copy(update={"ensemble_members": 1, "train": config.train.model_copy(update={"seed": config.train.seed + i})})
        for i in range(config.ensemble_members)
    ]


@dataclass
class TrainedMember:
    task: ImageTextTask
    metrics: dict[str, Any]
    history: list[dict[str, float]]


def _train_member(
    catalogue: Catalogue, concepts: ConceptSource | None, config: PretrainConfig, spec: ModelSpec, context: StageContext, member: int | None
) -> TrainedMember:
    """Train one teacher model to its best checkpoint; its metrics include ``test/*``."""
    train_ids = [str(i) for i in catalogue.split("train")["id"]]
    model, _ = create_model(spec, seed=config.train.seed)
    frozen = finetune.freeze(model, config.finetune)  # before the optimizer is built: frozen weights stay out of it
    tok = tokenizer(spec)
    cache = context.image_cache_dir
    mode = spec.resize_mode
    world = distributed.world()
    with distributed.main_first(world):  # under torchrun: rank 0 decodes the images, the others reuse its cache
        train_pairs = PairSet.from_catalogue(catalogue, "train", spec.image_size, cache, progress=context.progress, resize_mode=mode, images=config.train.images,
                                           batch_groups=config.train.batch_groups)
        val_pairs = PairSet.from_catalogue(catalogue, "val", spec.image_size, cache, progress=context.progress, resize_mode=mode) if len(catalogue.split("val")) else None
    if concepts is None:
        task: ImageTextTask = ImageTextTask(model, tok, train_pairs, val_pairs, hflip=config.hflip)
    else:
        task = FashionKLIPTask(
            model, tok, train_pairs, val_pairs,
            concepts=concepts.inputs(train_ids, config, config.train.seed),
            concept_weight=config.concept_weight,
            concept_config=config.concept,
            selection=concepts.selection,
            hflip=config.hflip,
        )
    trajectory = config.model_dump(mode="json", exclude={"ensemble_members"})
    identities = [file_sha256(catalogue.table_path)] + ([concepts.identity] if concepts is not None else [])
    weights = pretrained_identity(spec.pretrained)
    identities += [weights] if weights is not None else []  # a replaced download is another run
    log = context.log_metrics
    if log is not None and member is not None:
        log = lambda values, step: context.log_metrics({f"member{member}/{k}": v for k, v in values.items()}, step)  # noqa: E731
    result, metrics = fit(task, config.train, stage=STAGE, key=checkpoint_key(trajectory, *identities), context=context, log_metrics=log,
                          lr_scales=finetune.lr_scales(model, config.finetune))
    if frozen:
        frozen_names = set(frozen)
        metrics["params/frozen"] = sum(p.numel() for n, p in model.named_parameters() if n in frozen_names)
    if world.is_main:
        metrics.update(task.test_metrics(catalogue, cache, progress=context.progress))
    return TrainedMember(task=task, metrics=metrics, history=result.history)


def _ensemble_metrics(members: list[dict[str, Any]], model: nn.Module, catalogue: Catalogue, spec: ModelSpec, context: StageContext) -> dict[str, Any]:
    """The ensemble's own val/test numbers, the members' beside them, and the summed training cost."""
    tok = tokenizer(spec)
    cache = context.image_cache_dir
    seconds = sum(m["train_seconds"] for m in members)
    pairs = sum(m["train_seconds"] * m["train_pairs_per_s"] for m in members)
    metrics: dict[str, Any] = {
        "steps": sum(m["steps"] for m in members),
        "epochs_completed": sum(m["epochs_completed"] for m in members),
        "train_seconds": seconds,
        "train_pairs_per_s": pairs / seconds if seconds > 0 else 0.0,
        "ensemble_members": len(members),
    }
    val = split_metrics(model, tok, catalogue, "val", spec.image_size, cache, progress=context.progress)
    metrics["val/best_mean_recall"] = val.get("val/mean_recall", float("nan"))
    metrics.update({f"params/{k}": v for k, v in count_parameters(model).items()})
    metrics.update(split_metrics(model, tok, catalogue, "test", spec.image_size, cache, progress=context.progress))
    for i, member in enumerate(members):
        for key in ("test/mean_recall", "test/i2t_R@1", "test/t2i_R@1", "val/best_mean_recall", "train_seconds", "steps"):
            if key in member:
                metrics[f"member{i}/{key}"] = member[key]
    return metrics


def run_pretrain(config: PretrainConfig, inputs: PretrainInputs, outputs: PretrainOutputs, context: StageContext) -> dict[str, Any]:
    """Train the teacher; write it (safetensors + config, prototypes, history) and its metrics.

    Returns the metrics: best val mean recall, test recall@k of the best checkpoint, steps,
    pairs/s and parameter counts (for an ensemble: the ensemble's, with ``member<i>/...``
    beside them). Checkpoints go to ``<cache>/checkpoints/pretrain/<key>``, so ``resume``
    continues exactly the run with the same config and inputs.
    """
    distributed.world()  # under torchrun: join first, so that each rank resolves to its own GPU
    devices.training_device(config.train.device, config.train.amp, section="pretrain.train")  # fail before any work
    catalogue = Catalogue.load(inputs.catalogue)
    try:
        spec = ModelSpec(**config.model.model_dump())
    except ValidationError as exc:
        raise ModelError(f"pretrain.model: {exc.errors()[0]['msg']}") from None
    train_ids = [str(i) for i in catalogue.split("train")["id"]]
    if not train_ids:
        raise ValueError(f"{catalogue.table_path}: no items in split 'train'")
    concepts = None
    if config.concept_weight > 0:
        if inputs.kg is None:
            raise KGError("pretrain: concept_weight > 0 needs the knowledge graph (--kg)")
        concepts = ConceptSource.load(inputs.kg, train_ids)

    configs = member_configs(config)
    members = [_train_member(catalogue, concepts, c, spec, context, i if len(configs) > 1 else None) for i, c in enumerate(configs)]
    first = members[0]
    if not distributed.world().is_main:  # under torchrun rank 0 alone writes the outputs
        return first.metrics
    if len(members) > 1:
        model: nn.Module = EnsembleCLIP([m.task.model for m in members])
        metrics = _ensemble_metrics([m.metrics for m in members], model, catalogue, spec, context)
        arch: Any = "ensemble"
        history: Any = {f"member{i}": m.history for i, m in enumerate(members)}
    else:
        model, metrics, arch, history = first.task.model, first.metrics, spec, first.history

    files = {HISTORY_FILE: history_json(history)}
    if isinstance(first.task, FashionKLIPTask):
        prototypes = first.task.prototype_ids(train_ids)
        files[PROTOTYPES_FILE] = (json.dumps(prototypes, indent=1, sort_keys=True) + "\n").encode("utf-8")
    extra = {"stage": STAGE, "concept_weight": config.concept_weight, "ensemble_members": len(members),
             GEOMETRY_KEY: catalogue_geometry(catalogue, "train")}  # what evaluate/index compare a catalogue's shapes with
    save_trained(outputs.model, model, arch, extra=extra, files=files)
    write_json(outputs.metrics, metrics)
    return metrics


def summarise(metrics: Mapping[str, Any]) -> str:
    """One line for the CLI (the same shape for teachers and students)."""
    recall = metrics.get("test/mean_recall")
    parts = [f"{metrics['steps']} steps in {metrics['train_seconds']:.0f}s ({metrics['train_pairs_per_s']:.0f} pairs/s)"]
    parts.append(f"best val mean recall {metrics['val/best_mean_recall']:.2f}")
    if recall is not None:
        parts.append(f"test mean recall {recall:.2f} (i2t R@1 {metrics['test/i2t_R@1']:.2f}, t2i R@1 {metrics['test/t2i_R@1']:.2f})")
    return "; ".join(parts)
