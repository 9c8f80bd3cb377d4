"""Devices and precision: the resolver, AMP choices, batch moves, and the CUDA code paths run on the CPU.

This machine may have no GPU: the CUDA branches are reached by patching
:func:`lightclip.devices.cuda_available`, by the ``meta`` device (tensors with a device but no
data: a move can be checked without a GPU), and by running the fp16 loss-scaler path with a CPU
:class:`torch.amp.GradScaler`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import lightclip.devices as devices
import lightclip.evaluation.embedding as embedding
from lightclip.config import FULL_GRAPH_EDGES, ConceptLossConfig, ConfigError, EdgeLossConfig, Params, PretrainConfig, TrainConfig, parse_params
from lightclip.models import ModelSpec, create_model, tokenizer
from lightclip.models.zoo import save_model
from lightclip.pretrain import PretrainInputs, PretrainOutputs, run_pretrain
from lightclip.stage import StageContext
from lightclip.tasks import ConceptInputs, DistillTask, FashionKLIPTask, ImageTextTask
from lightclip.tasks.fashionklip import ConceptBatch, FashionKLIPBatch
from lightclip.io import torch_threads
from lightclip.teacher_cache import embed_with_teacher
from lightclip.training import make_optimizer, make_scheduler, move_task, train, train_step

SPEC = ModelSpec(arch="lc-test-tiny")
FAST = dict(batch_size=8, lr=1e-3, weight_decay=0.1, warmup_steps=2, grad_clip_norm=1.0, early_stop_patience=0, num_threads=1, log_every_n_steps=1)
META = torch.device("meta")


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def _weights_sha(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


# -- the resolver -------------------------------------------------------------------------------


def test_auto_is_the_cpu_without_cuda_and_cuda_with_it(no_cuda, monkeypatch):
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # a torchrun rank's own GPU
    assert devices.resolve_device("auto") == torch.device("cuda", 1)
    assert devices.resolve_device("cuda") == torch.device("cuda", 1)
    assert devices.resolve_device("cpu") == torch.device("cpu")  # asked for: the CPU even with a GPU


def test_a_missing_device_is_an_error_naming_the_field(no_cuda):
    with pytest.raises(ConfigError, match=r"train\.device: cuda, but torch sees no CUDA device"):
        devices.resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"evaluate\.device: mps, but .*MPS backend is not available"):
        devices.resolve_device("mps", field="evaluate.device")
    with pytest.raises(ConfigError, match=r"index\.device: 'gpu' is not a device; allowed: auto, cpu, cuda, mps"):
        devices.resolve_device("gpu", field="index.device")


def test_fp16_needs_cuda_and_bf16_runs_anywhere_but_mps():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")
    with pytest.raises(ConfigError, match=r"train\.amp: fp16 needs a CUDA device, but the device is cpu"):
        devices.check_precision("fp16", cpu)
    assert devices.check_precision("fp16", cuda) == "fp16"
    assert devices.check_precision("bf16", cpu) == devices.check_precision("bf16", cuda) == "bf16"
    assert devices.check_precision("none", mps) == "none"
    with pytest.raises(ConfigError, match=r"distill\.train\.amp: bf16 is not supported on mps"):
        devices.check_precision("bf16", mps, field="distill.train.amp")


def test_training_device_names_the_section(no_cuda):
    with pytest.raises(ConfigError, match=r"pretrain\.train\.device: cuda"):
        devices.training_device("cuda", "none", section="pretrain.train")
    with pytest.raises(ConfigError, match=r"distill\.train\.amp: fp16 needs a CUDA device"):
        devices.training_device("auto", "fp16", section="distill.train")


def test_the_knobs_are_typed_config_fields():
    assert TrainConfig().device == "auto" and TrainConfig(amp="fp16").amp == "fp16"
    with pytest.raises(ConfigError, match="device"):
        parse_params({"pretrain": {"train": {"device": "gpu"}}})
    params = Params()
    assert {params.teacher_embed.device, params.evaluate.device, params.index.device, params.distill.train.device} == {"auto"}


def test_a_stage_fails_on_a_missing_gpu_before_any_work(no_cuda, tmp_path):
    config = PretrainConfig().model_copy(update={"train": TrainConfig(device="cuda")})
    missing = tmp_path / "no-catalogue-here"  # never read: the device check comes first
    with pytest.raises(ConfigError, match=r"pretrain\.train\.device: cuda"):
        run_pretrain(config, PretrainInputs(catalogue=missing, kg=None), PretrainOutputs(model=tmp_path / "m", metrics=tmp_path / "m.json"), StageContext(project_dir=tmp_path))


# -- autocast and the loss scaler -------------------------------------------------------------------


def test_autocast_follows_amp_and_device():
    cpu_bf16 = devices.autocast("bf16", torch.device("cpu"))
    assert isinstance(cpu_bf16, torch.autocast) and cpu_bf16.device == "cpu" and cpu_bf16.fast_dtype == torch.bfloat16
    with _cuda_warning():
        cuda_fp16 = devices.autocast("fp16", torch.device("cuda", 0))
    assert isinstance(cuda_fp16, torch.autocast) and cuda_fp16.device == "cuda" and cuda_fp16.fast_dtype == torch.float16
    assert not isinstance(devices.autocast("none", torch.device("cuda", 0)), torch.autocast)


def _cuda_warning():
    """torch warns when CUDA objects are made without CUDA (and disables them): expected here."""
    return pytest.warns(UserWarning) if not torch.cuda.is_available() else nullcontext()


def test_only_fp16_on_cuda_gets_a_grad_scaler():
    assert devices.grad_scaler("none", torch.device("cuda", 0)) is None
    assert devices.grad_scaler("bf16", torch.device("cuda", 0)) is None
    assert devices.grad_scaler("fp16", torch.device("cpu")) is None
    with _cuda_warning():
        scaler = devices.grad_scaler("fp16", torch.device("cuda", 0))
    assert isinstance(scaler, torch.amp.GradScaler)


def test_the_scaled_step_is_the_plain_step(tiny_pairs, one_torch_thread):
    """fp16's code path (scale, unscale, clip, scaler.step) with a CPU scaler: a power-of-two scale is exact."""
    config = TrainConfig(**FAST)
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        task = ImageTextTask(create_model(SPEC, seed=0)[0], tokenizer(SPEC), *tiny_pairs)
        optimizer = make_optimizer(task.named_parameters(), config)
        params = [p for _, p in task.named_parameters()]
        for batch in task.train_batches(0, np.random.default_rng(0), 8):
            train_step(task, batch, optimizer, None, params, grad_clip_norm=1.0, device=torch.device("cpu"), scaler=scaler)
        results.append(task.model.state_dict())
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_an_overflowing_scaled_step_is_skipped_not_a_divergence(tiny_pairs, one_torch_thread):
    task = ImageTextTask(create_model(SPEC, seed=0)[0], tokenizer(SPEC), *tiny_pairs)
    config = TrainConfig(**FAST)
    optimizer = make_optimizer(task.named_parameters(), config)
    params = [p for _, p in task.named_parameters()]
    before = _weights_sha(task.model)
    scaler = torch.amp.GradScaler("cpu", init_scale=3e38)  # the scaled gradients overflow to inf
    batch = next(iter(task.train_batches(0, np.random.default_rng(0), 8)))
    train_step(task, batch, optimizer, None, params, grad_clip_norm=1.0, scaler=scaler)
    assert scaler.get_scale() < 3e38  # lowered, as fp16 training does after an overflow
    # skipped (no TrainingDiverged for the inf gradient norm): only the logit scale's clamp ran, a no-op here
    assert _weights_sha(task.model) == before


# -- moving batches and tasks ----------------------------------------------------------------------


def _concept_batch() -> FashionKLIPBatch:
    concepts = ConceptBatch(tokens=torch.zeros(2, 5, dtype=torch.long), slot_ids=torch.zeros(4, 3, dtype=torch.long),
                            slot_weights=torch.ones(4, 3), prototype_items=torch.zeros(2, 2, dtype=torch.long))
    return FashionKLIPBatch(indices=torch.arange(4), images=torch.zeros(4, 3, 8, 8), tokens=torch.zeros(4, 5, dtype=torch.long),
                            concepts=concepts, global_indices=None)


def test_on_the_cpu_a_batch_is_not_touched():
    batch = _concept_batch()
    assert devices.to_device(batch, torch.device("cpu")) is batch


def test_a_batch_moves_whole_to_another_device():
    batch = _concept_batch()
    moved = devices.to_device(batch, META)
    assert type(moved) is FashionKLIPBatch and moved.global_indices is None
    tensors = [moved.indices, moved.images, moved.tokens, *(getattr(moved.concepts, f.name) for f in dataclasses.fields(ConceptBatch))]
    assert all(t.device == META for t in tensors)
    assert batch.images.device.type == "cpu"  # the CPU batch is left as it was
    nested = devices.to_device({"a": [torch.ones(2), (torch.ones(1), "x")]}, META)
    assert nested["a"][0].device == META and nested["a"][1][0].device == META and nested["a"][1][1] == "x"


def test_tasks_move_their_model_bank_and_teacher(tiny_pairs):
    links = [["tshirt", "red tshirt"] if i % 2 else ["dress"] for i in range(32)]
    concepts = ConceptInputs.build(tiny_pairs[0].images.ids, links, max_slots=3, prototypes_per_concept=4)
    klip = FashionKLIPTask(create_model(SPEC, seed=0)[0], tokenizer(SPEC), *tiny_pairs, concepts=concepts, concept_weight=0.5,
                           concept_config=ConceptLossConfig(top_k=2))
    move_task(klip, META)
    assert devices.model_device(klip.model) == META and klip.bank.device == META and klip.bank_valid.device == META

    teacher = create_model(SPEC, seed=7)[0]
    distill = DistillTask(create_model(SPEC, seed=1)[0], tokenizer(SPEC), *tiny_pairs,
                          edges=[EdgeLossConfig(edge=e, loss=l) for e, l in FULL_GRAPH_EDGES], teacher_model=teacher, teacher_tokenizer=tokenizer(SPEC))
    move_task(distill, META)
    assert devices.model_device(distill.model) == META and devices.model_device(teacher) == META
    assert distill._teacher_text is not None and distill._teacher_text.device == META
    assert all(p.device == META for p in distill.projections.parameters())


def test_a_task_without_to_cannot_leave_the_cpu():
    class Plain:
        pass

    move_task(Plain(), torch.device("cpu"))  # the CPU needs nothing
    with pytest.raises(Exception, match=r"Plain has no to\(device\).*train\.device: cpu"):
        move_task(Plain(), META)


# -- CPU results do not change -------------------------------------------------------------------


def test_cpu_training_is_the_same_with_any_cpu_spelling(tiny_pairs, tmp_path, no_cuda):
    """device cpu, auto (no GPU) and the loop's old call (train_step without a device) give the same weights, bit for bit."""
    shas = []
    for device in ("cpu", "auto"):
        task = ImageTextTask(create_model(SPEC, seed=0)[0], tokenizer(SPEC), *tiny_pairs)
        train(task, TrainConfig(epochs=2, device=device, **FAST), checkpoint_dir=tmp_path / device, progress=False)
        shas.append(_weights_sha(task.model))
    # the same two epochs by hand, through train_step's old signature (no device, no scaler)
    config = TrainConfig(epochs=2, **FAST)
    task = ImageTextTask(create_model(SPEC, seed=0)[0], tokenizer(SPEC), *tiny_pairs)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    named = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(named, config)
    scheduler = make_scheduler(optimizer, config, task.batches_per_epoch(8) * 2)
    with torch_threads(1):
        for epoch in range(2):
            for batch in task.train_batches(epoch, np.random.default_rng([0, epoch]), 8):
                train_step(task, batch, optimizer, scheduler, [p for _, p in named], grad_clip_norm=1.0)
            with torch.no_grad():
                task.evaluate()
    shas.append(_weights_sha(task.model))
    assert shas[0] == shas[1] == shas[2]


# -- the embedding path -----------------------------------------------------------------------------


def test_the_embedding_path_feeds_the_model_on_its_device(tiny_pairs, monkeypatch):
    """Inputs go to the model's device (uint8 images normalised there), outputs come back to the CPU."""
    model = create_model(SPEC, seed=0)[0]
    seen: list[tuple[str, torch.device, torch.dtype]] = []

    def encode_image(images, normalize=False):
        seen.append(("image", images.device, images.dtype))
        return torch.ones(images.shape[0], 4)

    def encode_text(model, tokens, normalize=False):
        seen.append(("text", tokens.device, tokens.dtype))
        return torch.ones(tokens.shape[0], 4)

    monkeypatch.setattr(model, "encode_image", encode_image)
    monkeypatch.setattr(embedding, "encode_text", encode_text)
    monkeypatch.setattr(embedding, "model_device", lambda m: META)
    images, texts = embedding.embed_pairs(model, tiny_pairs[1].images, tokenizer(SPEC)(list(tiny_pairs[1].titles)), batch_size=4)
    assert seen == [("image", META, torch.float32)] * 2 + [("text", META, torch.long)] * 2
    assert images.device.type == texts.device.type == "cpu" and images.shape == texts.shape == (8, 4)


def test_the_model_device_is_its_parameters():
    assert devices.model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert devices.model_device(torch.nn.Linear(2, 2, device=META)) == META
    assert devices.model_device(torch.nn.Identity()) == torch.device("cpu")


def test_embed_with_teacher_names_its_field(tmp_path, tiny_catalogue, no_cuda):
    save_model(create_model(SPEC, seed=0)[0], SPEC, tmp_path / "teacher")
    with pytest.raises(ConfigError, match=r"teacher_embed\.device: cuda"):
        embed_with_teacher(tmp_path / "teacher", tiny_catalogue(n=4), "train", tmp_path / "cache", device="cuda")
