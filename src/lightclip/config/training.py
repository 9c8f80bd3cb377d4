"""Models and training: architectures and weights, the training loop, the FashionKLIP teacher, image sources."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lightclip.config.base import Device, StrictModel


class ModelConfig(StrictModel):
    """Which model: an architecture (ours, ``lc-*``, or any open_clip built-in) and its weights.

    ``pretrained``: None = random init (the embedded default: no network); a downloaded open_clip
    directory (``open_clip_config.json`` + weights), a checkpoint file or a directory written by
    lightclip; or an open_clip tag or ``hf-hub:org/name`` (downloads: off by default). See docs/pretrained.md.
    The architecture is checked against open_clip when the model is built
    (``lightclip.models.ModelSpec``), so that loading params never imports torch.
    """

    arch: str = "lc-vit-t"
    pretrained: str | None = None
    #: How an image is fitted to the model's square input (``lightclip.imagecache.fit_image``):
    #: ``crop`` (shortest side, centre crop), ``pad`` (longest side, white borders), ``squash``.
    #: Recorded in model.json, so evaluation, the index and serving use the model's own.
    resize_mode: Literal["crop", "pad", "squash"] = "crop"


class TrainImagesConfig(StrictModel):
    """Where training reads the train split's images (``lightclip.trainstream``, docs/scaling.md "Training from shards")."""

    #: cache: decode the split once into the memory-mapped uint8 array (a global permutation per
    #: epoch); webdataset: stream ``shards`` (shard order drawn per epoch, a shuffle buffer; memory
    #: bounded by the buffer and one batch).
    source: Literal["cache", "webdataset"] = "cache"
    shards: str | None = Field(None, description="webdataset: shard spec (globs, {000000..000009}, '::' between specs)")
    shuffle_buffer: int = Field(1000, ge=1, description="webdataset: samples (encoded bytes) held for the shuffle")
    decode_threads: int | None = Field(None, ge=1, description="webdataset decoding threads; None = the CPUs this process may use")

    @model_validator(mode="after")
    def _shards_named(self) -> "TrainImagesConfig":
        if self.source == "webdataset" and not self.shards:
            raise ValueError("train.images.source is webdataset but train.images.shards is null: name the shards (e.g. data/shards/shard-*.tar)")
        return self


class BatchGroupsConfig(StrictModel):
    """Hard negatives from the batch itself (``lightclip.tasks.image_text.grouped_order``).

    With ``column`` set, each batch is made of runs of ``run`` training pairs that share that
    catalogue column's value (e.g. a brand or collection column): every pair then meets
    look-alikes of its own kind among its in-batch negatives. On the real catalogue, grouping by
    ``articleType`` cost 1-2 points (docs/results.md), so it is off by default.
    """

    column: str | None = Field(None, description="catalogue column whose equal values are batched together; null = uniform shuffle")
    run: int = Field(8, ge=2, description="consecutive pairs of one value within a batch (a group's last run may be shorter)")


class TrainConfig(StrictModel):
    """How to train (shared by every trainer)."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)  # open_clip's ViT defaults
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(50, ge=0, description="linear warm-up steps before the cosine decay")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of lr")
    grad_clip_norm: float = Field(1.0, ge=0, description="max global grad norm; 0 = no clipping")
    seed: int = 0
    early_stop_patience: int = Field(5, ge=0, description="epochs without a better val/mean_recall; 0 = off")
    amp: Literal["none", "bf16", "fp16"] = Field("none", description="autocast: bf16 on CPU or CUDA; fp16 (with a grad scaler) on CUDA only")
    device: Device = Field("auto", description="auto = CUDA when present, else CPU; see docs/devices.md")
    num_threads: int | None = Field(None, ge=1, description="torch threads; None = the CPUs this process may use (affinity, cgroup quota; LIGHTCLIP_THREADS overrides)")
    log_every_n_steps: int = Field(10, ge=1)
    nproc: int = Field(1, ge=1, description="ranks on this machine: >1 = data parallel through torchrun (batch_size stays the global batch); see docs/distributed.md")
    images: TrainImagesConfig = TrainImagesConfig()
    batch_groups: BatchGroupsConfig = BatchGroupsConfig()

    @model_validator(mode="after")
    def _groups_need_the_cache(self) -> "TrainConfig":
        if self.batch_groups.column is not None and self.images.source != "cache":
            raise ValueError("train.batch_groups.column needs train.images.source: cache (a shard stream's order is the shards', not the groups')")
        return self


class ConceptLossConfig(StrictModel):
    """FashionKLIP concept alignment (the weight itself is ``concept_weight``; 0 = off)."""

    prompt: str = "a photo of {}"
    max_slots: int = Field(5, ge=1, description="concept slots per pair (the reference: 5)")
    top_k: int = Field(5, ge=1, description="prototypes kept per slot, by similarity to the pair's image")
    prototype_weight: float = Field(1.0, ge=0)
    image_weight: float = Field(1.0, ge=0)
    adaptive: bool = Field(False, description="the reference's (1-a)*clip + a*concept, a = weight*clip/concept")
    refresh_every_epochs: int = Field(1, ge=0, description="re-pick prototypes with the current teacher every N epochs; 0 = never")


class FinetuneConfig(StrictModel):
    """How a teacher that starts from pretrained weights is fine-tuned (see ``lightclip.finetune``).

    A tower's parameter trains at ``lr x lr_scale x layer_decay ** (blocks + 1 - depth)``
    (depth 0 = its embeddings, 1..blocks = its blocks, blocks + 1 = final norm and projection);
    ``logit_scale`` at ``lr``. ``freeze``: towers kept exactly as loaded (out of the optimizer);
    ``freeze_layers``: the embeddings and first N blocks of every other tower. The defaults train
    everything at ``lr``, as from scratch.
    """

    lr_scale: float = Field(1.0, gt=0.0, le=1.0, description="lr multiplier of the image and text towers (not logit_scale)")
    layer_decay: float = Field(1.0, gt=0.0, le=1.0, description="layer-wise lr decay per block below the top; 1 = off")
    freeze: list[Literal["image", "text"]] = Field(default_factory=list, description="towers not trained at all")
    freeze_layers: int = Field(0, ge=0, description="embeddings + first N blocks of each tower not frozen whole; 0 = none")

    @field_validator("freeze")
    @classmethod
    def _unique_towers(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate towers in {value}")
        if len(value) == 2:
            raise ValueError("both towers frozen leaves only logit_scale to train; freeze one at most")
        return value


class PretrainConfig(StrictModel):
    """The ``pretrain`` stage: the FashionKLIP teacher (CLIP + concept-level alignment)."""

    model: ModelConfig = ModelConfig(arch="lc-vit-t")
    train: TrainConfig = TrainConfig(epochs=12)
    #: Weight of the concept term; 0 = plain CLIP training (the ablation's baseline).
    concept_weight: float = Field(0.2, ge=0.0)
    concept: ConceptLossConfig = ConceptLossConfig()
    hflip: bool = True
    #: Members of the teacher: 1 = one model; n > 1 trains n models (seeds seed, seed+1, ...)
    #: and ships their ensemble (mean cosine similarity), the teacher that beats a lone student
    #: from scratch (see lightclip.models.ensemble).
    ensemble_members: int = Field(2, ge=1, le=8)
    #: Lower / layer-wise learning rates and frozen towers for a pretrained ``model.pretrained``.
    finetune: FinetuneConfig = FinetuneConfig()


class ImageSourceConfig(StrictModel):
    """Where ``teacher_embed``, ``evaluate`` and ``index`` read a split's images (``lightclip.imagestream``, docs/scaling.md)."""

    #: cache: decode once into the memory-mapped uint8 array (reused by later stages); stream:
    #: decode the image files batch by batch (memory bounded by a batch); webdataset: stream ``shards``.
    source: Literal["cache", "stream", "webdataset"] = "cache"
    shards: str | None = Field(None, description="webdataset: shard spec (globs, {000000..000009}, '::' between specs)")
    decode_threads: int | None = Field(None, ge=1, description="stream/webdataset decoding threads; None = the CPUs this process may use")


class TeacherEmbedConfig(StrictModel):
    """The ``teacher_embed`` stage: the frozen teacher's embeddings of catalogue splits, computed once."""

    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["train"])
    batch_size: int = Field(256, ge=1)
    #: Also store the embeddings of the horizontally flipped images (``distill.hflip`` with the cache).
    hflip: bool = True
    num_threads: int | None = Field(None, ge=1, description="torch threads; None = the CPUs this process may use (affinity, cgroup quota; LIGHTCLIP_THREADS overrides)")
    device: Device = Field("auto", description="where the teacher runs; see docs/devices.md")
    images: ImageSourceConfig = ImageSourceConfig()

    @field_validator("splits")
    @classmethod
    def _unique_splits(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one split")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate splits in {value}")
        return value
