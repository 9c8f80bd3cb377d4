"""A standard open_clip architecture as the teacher, end to end and offline: random RN50 weights
saved in the layout of a user's download (``open_clip_config.json`` + ``open_clip_model.safetensors``),
loaded through ``pretrain.model.pretrained`` like a real download, fine-tuned with the fine-tuning
knobs, embedded by ``teacher_embed``, distilled into ``lc-vit-xt``, then evaluated beside the
same download as a zero-shot baseline.

RN50 rather than ViT-B-32: a third fewer parameters (102M: less to write, read and step with
AdamW on a small CPU) at the same 224 px input and the same text tower.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightclip.config import DistillConfig, EvaluateConfig, FinetuneConfig, ModelConfig, PretrainConfig, TeacherEmbedConfig, TrainConfig
from lightclip.distill import DistillInputs, DistillOutputs, run_distill
from lightclip.evaluation import EvaluateInputs, EvaluateOutputs, run_evaluate
from lightclip.models import ModelSpec, arch_config, create_model, load_model, read_model_info
from lightclip.models.zoo import OPEN_CLIP_CONFIG_FILE
from lightclip.pretrain import PretrainInputs, PretrainOutputs, run_pretrain
from lightclip.stage import StageContext
from lightclip.teacher_cache import TeacherEmbedInputs, TeacherEmbedOutputs, run_teacher_embed

pytestmark = pytest.mark.slow

ARCH = "RN50"
#: Not open_clip's defaults (OpenAI's): the teacher's model.json must record the checkpoint's own.
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.26, 0.27]
#: The parameters the fine-tune freezes (the stem and first block) and one it trains (the top).
FROZEN, TRAINED = "visual.conv1.weight", "visual.layer4.2.conv3.weight"


@pytest.fixture(scope="module")
def download(tmp_path_factory) -> Path:
    """Random RN50 weights where ``huggingface-cli download`` would put an open_clip repo's files."""
    directory = tmp_path_factory.mktemp("hub") / "CLIP-RN50-test"
    directory.mkdir()
    model, _ = create_model(ModelSpec(arch=ARCH), seed=0)
    (directory / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps({"model_cfg": arch_config(ARCH), "preprocess_cfg": {"mean": MEAN, "std": STD}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "open_clip_model.safetensors"))
    return directory


@pytest.fixture
def catalogue(tiny_catalogue, tmp_path) -> Path:
    """12 items: 8 train, 2 val, 2 test."""
    built = tiny_catalogue(n=12)
    items = built.items.copy()
    items["split"] = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
    built.with_items(items).save(tmp_path / "split")
    return tmp_path / "split"


def fast_train(**updates) -> TrainConfig:
    return TrainConfig(**{"epochs": 1, "batch_size": 4, "lr": 1e-4, "warmup_steps": 1, "early_stop_patience": 0, "num_threads": 2, **updates})


def test_pretrained_rn50_teacher_fine_tuned_and_distilled_into_xt(download: Path, catalogue: Path, tmp_path: Path):
    started = time.perf_counter()
    context = StageContext(project_dir=tmp_path, progress=False)
    loaded, _ = create_model(ModelSpec(arch=ARCH, pretrained=str(download)))
    before = {name: loaded.state_dict()[name].clone() for name in (FROZEN, TRAINED)}
    del loaded

    config = PretrainConfig(
        model=ModelConfig(arch=ARCH, pretrained=str(download)),
        train=fast_train(),
        concept_weight=0.0,
        ensemble_members=1,
        finetune=FinetuneConfig(lr_scale=0.5, layer_decay=0.8, freeze_layers=1),
    )
    metrics = run_pretrain(config, PretrainInputs(catalogue=catalogue, kg=None), PretrainOutputs(model=tmp_path / "teacher", metrics=tmp_path / "teacher.json"), context)
    assert metrics["steps"] == 2 and metrics["params/frozen"] > 0

    info = read_model_info(tmp_path / "teacher")
    assert info["arch"] == ARCH and info["open_clip_config"] == arch_config(ARCH)
    assert info["image"]["size"] == 224 and info["image"]["mean"] == MEAN and info["image"]["std"] == STD  # the checkpoint's preprocessing
    teacher = load_model(tmp_path / "teacher").state_dict()
    assert torch.equal(teacher[FROZEN], before[FROZEN])  # frozen by freeze_layers: bit-identical
    assert not torch.equal(teacher[TRAINED], before[TRAINED])  # fine-tuned
    del teacher

    run_teacher_embed(
        TeacherEmbedConfig(splits=["train"], batch_size=8, hflip=True, num_threads=2),
        TeacherEmbedInputs(catalogue=catalogue, teacher=tmp_path / "teacher"),
        TeacherEmbedOutputs(embeddings=tmp_path / "teacher_emb", metrics=tmp_path / "teacher_embed.json"),
        context,
    )
    job = DistillConfig(students={"xt": ModelConfig(arch="lc-vit-xt")}, train=fast_train(lr=1e-3)).job("xt")
    student = run_distill(
        job,
        DistillInputs(catalogue=catalogue, teacher=tmp_path / "teacher", teacher_embeddings=tmp_path / "teacher_emb"),
        DistillOutputs(model=tmp_path / "students" / "xt", metrics=tmp_path / "xt.json"),
        context,
    )
    assert student["steps"] == 2
    student_info = read_model_info(tmp_path / "students" / "xt")
    assert student_info["arch"] == "lc-vit-xt" and student_info["image"]["size"] == 64  # the student keeps its own preprocessing
    assert student_info["extra"]["teacher_sha256"] and student_info["image"]["mean"] != MEAN

    evaluated = run_evaluate(
        EvaluateConfig(models={"xt": str(tmp_path / "students" / "xt")}, baselines={"zero_shot": ModelConfig(arch=ARCH, pretrained=str(download))},
                       ks=[1], curve_ks=[1, 2], attributes=[]),
        EvaluateInputs(catalogue=catalogue),
        EvaluateOutputs(metrics=tmp_path / "eval.json", plots=tmp_path / "plots"),
        context,
    )
    assert {"xt/test/mean_recall", "zero_shot/test/mean_recall"} <= set(evaluated)
    rows = json.loads((tmp_path / "eval.json").read_text())
    assert rows["zero_shot"]["model_dir"] == f"{ARCH}@{download}" and rows["zero_shot"]["test/n_items"] == 2
    print(f"\npretrained {ARCH} teacher: load, fine-tune, teacher_embed, distill into xt, evaluate in {time.perf_counter() - started:.1f}s")
