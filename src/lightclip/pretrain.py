"""The ``pretrain`` stage: the FashionKLIP teacher.

CLIP image-text contrastive training plus, when ``concept_weight > 0``, the concept-level
alignment against the knowledge graph built by ``build_kg`` (concept links per item and
prototype images, refreshed with the teacher during training). ``concept_weight: 0`` is the
plain-CLIP baseline of the ablation, with everything else identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from lightclip.config import KGConfig, PretrainConfig
from lightclip.data.catalogue import Catalogue, file_sha256
from lightclip.kg.concepts import KGError

HISTORY_FILE = "train_history.json"
PROTOTYPES_FILE = "prototypes.json"


def checkpoint_key(config: PretrainConfig, catalogue: Catalogue, kg_dir: Path | None) -> str:
    """Identify a training run by its config and inputs: ``--resume`` only continues the same run."""
    # ensemble_members is left out: each member is a single-model run (see member_configs).
    digest = hashlib.sha256(json.dumps(config.model_dump(mode="json", exclude={"ensemble_members"}), sort_keys=True).encode())
    digest.update(file_sha256(catalogue.table_path).encode())
    if kg_dir is not None and (Path(kg_dir) / "item_concepts.json").is_file():
        digest.update(file_sha256(Path(kg_dir) / "item_concepts.json").encode())
    return digest.hexdigest()[:16]


def load_concept_inputs(kg_dir: Path, train_ids: list[str], config: PretrainConfig) -> Any:
    """Concept links and prototypes of the training items from a ``build_kg`` output."""
    from lightclip.kg.graph import load_graph
    from lightclip.training import ConceptInputs

    kg_dir = Path(kg_dir)
    load_graph(kg_dir / "graph.json")  # a missing or empty graph is a clear KGError
    links_path, prototypes_path = kg_dir / "item_concepts.json", kg_dir / PROTOTYPES_FILE
    for path in (links_path, prototypes_path):
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
    prototypes = json.loads(prototypes_path.read_text(encoding="utf-8"))
    return ConceptInputs.build(
        train_ids,
        links,
        max_slots=config.concept.max_slots,
        prototypes_per_concept=config.concept.prototypes_per_concept,
        seed=config.train.seed,
        prototypes=prototypes,
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


def _train_member(
    catalogue: Catalogue,
    kg_dir: Path | None,
    config: PretrainConfig,
    kg_config: KGConfig,
    *,
    cache_dir: Path,
    checkpoint_root: Path,
    resume: bool,
    log_metrics: Callable[[dict[str, float], int], None] | None,
    progress: bool,
) -> tuple[Any, Any, dict[str, Any], Any, list[str]]:
    """Train one teacher model; returns (model, spec, metrics, task, train ids), best checkpoint loaded."""
    from pydantic import ValidationError

    from lightclip.models.zoo import ModelError, ModelSpec, count_parameters, create_model, tokenizer
    from lightclip.training import BEST, ClipPretrainTask, PairSet, load_task_checkpoint, train

    try:
        spec = ModelSpec(**config.model.model_dump())
    except ValidationError as exc:
        raise ModelError(f"pretrain.model: {exc.errors()[0]['msg']}") from None
    train_items = catalogue.split("train")
    if len(train_items) == 0:
        raise ValueError(f"{catalogue.table_path}: no items in split 'train'")
    train_ids = [str(i) for i in train_items["id"]]
    concepts = load_concept_inputs(Path(kg_dir), train_ids, config) if config.concept_weight > 0 else None
    model, _ = create_model(spec, seed=config.train.seed)
    tok = tokenizer(spec)
    train_pairs = PairSet.from_catalogue(catalogue, "train", spec.image_size, cache_dir, progress=progress)
    val_pairs = PairSet.from_catalogue(catalogue, "val", spec.image_size, cache_dir, progress=progress) if len(catalogue.split("val")) else None

    task = ClipPretrainTask(
        model,
        tok,
        train_pairs,
        val_pairs,
        concepts=concepts,
        concept_weight=config.concept_weight,
        concept_config=config.concept,
        prototype_mmr_lambda=kg_config.mmr_lambda,
        prototype_pool=kg_config.prototype_pool,
        hflip=config.hflip,
    )
    checkpoint_dir = Path(checkpoint_root) / checkpoint_key(config, catalogue, kg_dir)
    result = train(task, config.train, checkpoint_dir=checkpoint_dir, resume=resume, log_metrics=log_metrics, progress=progress)
    refreshes = task.prototype_refreshes  # of the whole run (the best checkpoint may be earlier)
    if (checkpoint_dir / BEST).is_file():
        load_task_checkpoint(task, checkpoint_dir / BEST)

    metrics: dict[str, Any] = result.summary() | {"prototype_refreshes": refreshes}
    metrics.update({f"params/{k}": v for k, v in count_parameters(model).items()})
    metrics.update(task.test_metrics(catalogue, tok, spec.image_size, cache_dir, progress=progress))
    metrics["_history"] = result.history
    return model, spec, metrics, task, train_ids


def _ensemble_metrics(members: list[dict[str, Any]], model: Any, catalogue: Catalogue, spec: Any, cache_dir: Path, progress: bool) -> dict[str, Any]:
    """The ensemble's own val/test numbers, the members' beside them, and the summed training cost."""
    from lightclip.models.zoo import count_parameters, tokenizer
    from lightclip.training import split_metrics

    tok = tokenizer(spec)
    seconds = sum(m["train_seconds"] for m in members)
    pairs = sum(m["train_seconds"] * m["train_pairs_per_s"] for m in members)
    metrics: dict[str, Any] = {
        "steps": sum(m["steps"] for m in members),
        "epochs_completed": sum(m["epochs_completed"] for m in members),
        "train_seconds": seconds,
        "train_pairs_per_s": pairs / seconds if seconds > 0 else 0.0,
        "ensemble_members": len(members),
    }
    val = split_metrics(model, tok, catalogue, "val", spec.image_size, cache_dir, progress=progress)
    metrics["val/best_mean_recall"] = val.get("val/mean_recall", float("nan"))
    metrics.update({f"params/{k}": v for k, v in count_parameters(model).items()})
    metrics.update(split_metrics(model, tok, catalogue, "test", spec.image_size, cache_dir, progress=progress))
    for i, member in enumerate(members):
        for key in ("test/mean_recall", "test/i2t_R@1", "test/t2i_R@1", "val/best_mean_recall", "train_seconds", "steps"):
            if key in member:
                metrics[f"member{i}/{key}"] = member[key]
    return metrics


def run_pretrain(
    catalogue: Catalogue,
    kg_dir: Path | None,
    config: PretrainConfig,
    kg_config: KGConfig,
    out_dir: Path,
    *,
    cache_dir: Path,
    checkpoint_root: Path,
    resume: bool = False,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the teacher; write it (safetensors + config), its prototypes and history to ``out_dir``.

    Returns the metrics: best val mean recall, test recall@k of the best checkpoint, steps,
    pairs/s and parameter counts. Checkpoints go to ``checkpoint_root/<key>`` so ``resume``
    continues exactly the run with the same config and inputs. With ``ensemble_members > 1``
    the members are trained one after the other (each resumable) and the ensemble is saved;
    its metrics are the ensemble's, with ``member<i>/...`` beside them.
    """
    from lightclip.models.ensemble import EnsembleCLIP
    from lightclip.models.zoo import save_model

    if config.concept_weight > 0 and kg_dir is None:
        raise KGError("pretrain: concept_weight > 0 needs the knowledge graph (--kg)")
    configs = member_configs(config)
    trained = []
    for i, member_config in enumerate(configs):
        member_log = log_metrics
        if log_metrics is not None and len(configs) > 1:
            member_log = lambda values, step, i=i: log_metrics({f"member{i}/{k}": v for k, v in values.items()}, step)  # noqa: E731
        trained.append(
            _train_member(
                catalogue, kg_dir, member_config, kg_config,
                cache_dir=cache_dir, checkpoint_root=checkpoint_root, resume=resume, log_metrics=member_log, progress=progress,
            )
        )
    histories = [t[2].pop("_history") for t in trained]
    model, spec, metrics, task, train_ids = trained[0]
    if len(trained) > 1:
        model = EnsembleCLIP([t[0] for t in trained])
        metrics = _ensemble_metrics([t[2] for t in trained], model, catalogue, spec, cache_dir, progress)
        arch: Any = "ensemble"
        history: Any = {f"member{i}": h for i, h in enumerate(histories)}
    else:
        arch, history = spec, histories[0]

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, arch, tmp, extra={"stage": "pretrain", "concept_weight": config.concept_weight, "ensemble_members": len(trained)})
    (tmp / HISTORY_FILE).write_text(json.dumps(history, indent=1) + "\n", encoding="utf-8")
    if task.concepts is not None:
        (tmp / PROTOTYPES_FILE).write_text(json.dumps(task.prototype_ids(train_ids), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return metrics


def summarise(metrics: Mapping[str, Any]) -> str:
    recall = metrics.get("test/mean_recall")
    parts = [f"{metrics['steps']} steps in {metrics['train_seconds']:.0f}s ({metrics['train_pairs_per_s']:.0f} pairs/s)"]
    parts.append(f"best val mean recall {metrics['val/best_mean_recall']:.2f}")
    if recall is not None:
        parts.append(f"test mean recall {recall:.2f} (i2t R@1 {metrics['test/i2t_R@1']:.2f}, t2i R@1 {metrics['test/t2i_R@1']:.2f})")
    return "; ".join(parts)
