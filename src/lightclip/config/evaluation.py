"""Evaluation, the catalogue index and the speed benchmark."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from lightclip.config.base import ATTRIBUTE_COLUMNS, Device, StrictModel, _check_ks, _check_model_names
from lightclip.config.training import ImageSourceConfig, ModelConfig


class EvaluateConfig(StrictModel):
    """The ``evaluate`` stage: retrieval metrics of each model on one split (see ``lightclip.evaluation``)."""

    #: name -> saved model directory; every one is evaluated, a missing one is an error.
    models: dict[str, str] = Field(
        default_factory=lambda: {"teacher": "models/teacher", "xt": "models/students/xt", "xxt": "models/students/xxt", "fast": "models/students/fast"}
    )
    split: Literal["train", "val", "test"] = "test"
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], description="R@k and t2i P@k")
    curve_ks: list[int] = Field(default_factory=lambda: [1, 2, 3, 5, 10, 20, 50], description="the recall@k plot's points")
    #: Which other items' titles count as positives besides the item's own: identical titles,
    #: byte-identical decoded images.
    positives: list[Literal["title", "image"]] = Field(default_factory=lambda: ["title", "image"])
    #: Attribute groups for text->image precision@k (skipped when the catalogue lacks them).
    attributes: list[list[str]] = Field(default_factory=lambda: [["articleType"], ["articleType", "baseColour"]])
    batch_size: int = Field(256, ge=1)
    num_threads: int | None = Field(None, ge=1)
    device: Device = Field("auto", description="where the models embed the split; see docs/devices.md")
    images: ImageSourceConfig = ImageSourceConfig()
    #: name -> a pretrained model ({arch, pretrained} as pretrain.model), evaluated zero-shot beside
    #: ``models`` (a baseline row; never registered). See docs/pretrained.md.
    baselines: dict[str, ModelConfig] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("name at least one model directory, e.g. {teacher: models/teacher}")
        return _check_model_names(value)

    @field_validator("baselines")
    @classmethod
    def _baseline_names(cls, value: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        _check_model_names(value)
        return value

    @field_validator("ks", "curve_ks")
    @classmethod
    def _ks(cls, value: list[int]) -> list[int]:
        return _check_ks(value)

    @field_validator("attributes")
    @classmethod
    def _attributes(cls, value: list[list[str]]) -> list[list[str]]:
        for group in value:
            unknown = sorted(set(group) - set(ATTRIBUTE_COLUMNS))
            if not group or unknown:
                raise ValueError(f"attribute group {group}: unknown column(s) {unknown}; allowed: {list(ATTRIBUTE_COLUMNS)}")
        return value


class IvfConfig(StrictModel):
    nlist: int | None = Field(None, ge=1, description="inverted lists; null = about 4 sqrt(N), >= 39 points per list")
    nprobe: int = Field(32, ge=1, description="lists visited per query")
    train_points_per_list: int = Field(64, ge=1, description="k-means training sample = this x nlist (at most N)")


class HnswConfig(StrictModel):
    m: int = Field(32, ge=2, le=256, description="graph degree")
    ef_construction: int = Field(80, ge=1)
    ef_search: int = Field(64, ge=1)


class IndexConfig(StrictModel):
    """The ``index`` stage: a FAISS index over the catalogue's image embeddings (see ``lightclip.index``)."""

    model: str = "models/teacher"
    split: Literal["train", "val", "test"] | None = None  # null = every item
    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    ivf: IvfConfig = IvfConfig()
    hnsw: HnswConfig = HnswConfig()
    batch_size: int = Field(256, ge=1)
    eval_queries: int = Field(500, ge=0, description="titles used as queries for recall@10 vs flat and query latency")
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    device: Device = Field("auto", description="where the model embeds the catalogue; see docs/devices.md")
    images: ImageSourceConfig = ImageSourceConfig()


class BenchConfig(StrictModel):
    """``lightclip bench``: encode latency/throughput, index scaling, size and memory per model."""

    models: dict[str, str] | None = None  # null = evaluate.models
    teacher: str = "teacher"  # the model the others are compared with (ratios)
    warmup: int = Field(10, ge=1)
    runs: int = Field(100, ge=100, description="timed batch-1 calls per measurement")
    batch_size: int = Field(64, ge=1, description="throughput batch")
    throughput_batches: int = Field(10, ge=1)
    rounds: int = Field(5, ge=1, description="interleaved rounds over the models for latency and throughput")
    gallery_size: int = Field(10000, ge=10, description="gallery of the evaluate-overhead check")
    eval_rounds: int = Field(3, ge=1, description="embed-then-score rounds of the evaluate-overhead check (medians compared)")
    index_sizes: list[int] = Field(default_factory=lambda: [10000, 100000, 1000000])
    index_kinds: list[Literal["flat", "ivf", "hnsw"]] = Field(default_factory=lambda: ["flat", "ivf", "hnsw"])
    index_queries: int = Field(200, ge=1)
    hnsw_max_build_seconds: float = Field(600.0, gt=0, description="skip an HNSW size whose estimated build exceeds this")
    num_threads: int | None = Field(None, ge=1)
    seed: int = 0
    efficiency_batch_size: int = Field(256, ge=0, description="batch of the achieved-vs-peak GFLOP/s check (docs/efficiency.md); 0 = skip it")
    efficiency_runs: int = Field(3, ge=1, description="timed calls per forward and per peak matmul; the best counts")
    runtimes: list[Literal["torch", "onnx", "onnx-int8"]] = Field(default_factory=lambda: ["torch", "onnx", "onnx-int8"],
                                                     description="runtimes of the recall-vs-latency plot (each evaluated on it); [] = skip")

    @field_validator("models")
    @classmethod
    def _names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return _check_model_names(value)

    @field_validator("index_sizes")
    @classmethod
    def _sizes(cls, value: list[int]) -> list[int]:
        return _check_ks(value)

    @field_validator("runtimes")
    @classmethod
    def _runtimes(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"a runtime is listed twice: {value}")
        return value
