"""The ``distill`` stage: CocaCLIP/ConaCLIP distillation of the teacher into a small student.

One run trains one student of ``distill.students`` (a :class:`~lightclip.config.DistillJob`:
the pipeline's ``distill@<name>`` stages, or an ablation variant and seed) with the shared loop
on the training pairs, under the graph loss of the job's edges (:mod:`lightclip.tasks.cocaclip`).
The frozen teacher's embeddings come from the ``teacher_embed`` cache, checked against the
catalogue and the teacher's weights, or from the teacher itself with ``teacher_online: true``.
Validation selects the best epoch by the student's own val mean recall. Learned projections (when
the widths differ) are saved beside the student as ``projections.safetensors``; they are not part
of the released retrieval model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from torch import nn

from lightclip import devices, distributed
from lightclip.config import ConfigError, DistillJob
from lightclip.data.catalogue import Catalogue, file_sha256
from lightclip.data.geometry import MODEL_KEY as GEOMETRY_KEY
from lightclip.data.geometry import catalogue_geometry
from lightclip.imagecache import build_image_cache, resize_mode_of
from lightclip.io import write_json
from lightclip.models.common import canonical_safetensors
from lightclip.models.zoo import ModelError, ModelSpec, create_model, load_model, load_tokenizer, preprocess_config, pretrained_identity, read_model_info, tokenizer
from lightclip.stage import StageContext
from lightclip.tasks import DistillTask, PairSet
from lightclip.tasks.cocaclip import check_widths, hflip_cache_error
from lightclip.teacher_cache import TeacherEmbeddings, load_teacher_embeddings, teacher_weights_sha256
from lightclip.training import checkpoint_key, fit, history_json, save_trained

HISTORY_FILE = "train_history.json"
PROJECTIONS_FILE = "projections.safetensors"
STAGE = "distill"


@dataclass(frozen=True)
class DistillInputs:
    catalogue: Path  # a split catalogue (data/split)
    teacher: Path | None  # the teacher model dir; needed for teacher_online and to check the cache
    teacher_embeddings: Path | None  # the teacher_embed output (a directory or one .safetensors file)


@dataclass(frozen=True)
class DistillOutputs:
    model: Path  # models/students/<name>
    metrics: Path  # metrics/distill/<name>.json


def projections_bytes(projections: nn.ModuleDict, *, teacher_dim: int) -> bytes:
    """The learned projections as canonical safetensors bytes (same tensors, same bytes)."""
    return canonical_safetensors(projections.state_dict(), {"format": "lightclip-projections/1", "teacher_embed_dim": str(teacher_dim)})


def run_distill(job: DistillJob, inputs: DistillInputs, outputs: DistillOutputs, context: StageContext) -> dict[str, Any]:
    """Distil the teacher into ``job``'s student; write the student, its projections, history and metrics.

    Returns the trainer's metrics (best val mean recall, ``test/*`` of the best checkpoint,
    steps, seconds, pairs/s, the student's ``params/*``) plus ``params/projections``.
    Checkpoints go to ``<cache>/checkpoints/distill/<key>``; ``resume`` continues the same run.
    """
    distributed.world()  # under torchrun: join first, so that each rank resolves to its own GPU
    devices.training_device(job.train.device, job.train.amp, section="distill.train")  # fail before any work
    catalogue = Catalogue.load(inputs.catalogue)
    try:
        spec = ModelSpec(**job.student.model_dump())
    except ValidationError as exc:
        raise ModelError(f"distill.students.{job.student_name}: {exc.errors()[0]['msg']}") from None
    if len(catalogue.split("train")) == 0:
        raise ValueError(f"{catalogue.table_path}: no items in split 'train'")

    world = distributed.world()
    teacher: TeacherEmbeddings | None = None
    teacher_model = teacher_tok = teacher_images = None
    teacher_identity: str | None = None
    teacher_dim = 0
    if job.needs_teacher:
        if job.teacher_online:
            if inputs.teacher is None:
                raise ConfigError("distill.teacher_online: true needs the teacher model (--teacher)")
            teacher_identity = teacher_weights_sha256(inputs.teacher)
            teacher_dim = int(read_model_info(inputs.teacher)["embed_dim"])
        else:
            if inputs.teacher_embeddings is None:
                raise ConfigError("distill: the teacher edges need the teacher embeddings (teacher_embed output) or distill.teacher_online: true")
            teacher = load_teacher_embeddings(inputs.teacher_embeddings, catalogue, "train", teacher_dir=inputs.teacher)
            teacher_identity, teacher_dim = teacher.teacher_sha256, teacher.embed_dim
            if job.hflip and teacher.image_hflip is None:
                raise hflip_cache_error()
        check_widths(job.edges, spec.embed_dim, teacher_dim, job.projection)  # before any image is decoded
        if job.teacher_online:
            assert inputs.teacher is not None
            teacher_model = load_model(inputs.teacher)
            teacher_tok = load_tokenizer(inputs.teacher)
            teacher_pre = preprocess_config(teacher_model)
            teacher_size, teacher_mode = int(teacher_pre["size"]), resize_mode_of(teacher_pre)
            if teacher_size != spec.image_size or teacher_mode != spec.resize_mode:  # the teacher sees images its own way
                with distributed.main_first(world):
                    teacher_images = build_image_cache(
                        catalogue, "train", teacher_size, context.image_cache_dir, progress=context.progress, resize_mode=teacher_mode
                    )

    model, _ = create_model(spec, seed=job.train.seed)
    cache = context.image_cache_dir
    mode = spec.resize_mode
    with distributed.main_first(world):  # under torchrun: rank 0 decodes the images, the others reuse its cache
        train_pairs = PairSet.from_catalogue(catalogue, "train", spec.image_size, cache, progress=context.progress, resize_mode=mode, images=job.train.images,
                                           batch_groups=job.train.batch_groups)
        val_pairs = PairSet.from_catalogue(catalogue, "val", spec.image_size, cache, progress=context.progress, resize_mode=mode) if len(catalogue.split("val")) else None
    task = DistillTask(
        model, tokenizer(spec), train_pairs, val_pairs,
        edges=job.edges,
        teacher=teacher,
        teacher_model=teacher_model,
        teacher_tokenizer=teacher_tok,
        teacher_images=teacher_images,
        projection=job.projection,
        hflip=job.hflip,
        seed=job.train.seed,
    )
    weights = pretrained_identity(spec.pretrained)  # a replaced download is another run
    key = checkpoint_key(job.trajectory(), file_sha256(catalogue.table_path), teacher_identity or "no-teacher", *([weights] if weights else []))
    result, metrics = fit(task, job.train, stage=STAGE, key=key, context=context)
    metrics["params/projections"] = sum(p.numel() for p in task.projections.parameters())
    if not world.is_main:  # under torchrun rank 0 alone writes the outputs
        return metrics
    metrics.update(task.test_metrics(catalogue, cache, progress=context.progress))

    files = {HISTORY_FILE: history_json(result.history)}
    if len(task.projections):
        files[PROJECTIONS_FILE] = projections_bytes(task.projections, teacher_dim=teacher_dim)
    extra = {
        "stage": STAGE,
        "edges": [e.model_dump(mode="json") for e in job.edges],
        "teacher_sha256": teacher_identity,
        "teacher_online": job.teacher_online,
        "projection_modalities": list(task.projections.keys()),
        GEOMETRY_KEY: catalogue_geometry(catalogue, "train"),  # what evaluate/index compare a catalogue's shapes with
    }
    save_trained(outputs.model, model, spec, extra=extra, files=files)
    write_json(outputs.metrics, metrics)
    return metrics
