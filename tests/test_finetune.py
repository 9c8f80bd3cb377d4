"""Fine-tuning knobs: where each parameter sits, the learning rate its optimizer group gets,
frozen towers and layers left out of the optimizer and unchanged by training, defaults that
change nothing (not even the checkpoint key)."""

from __future__ import annotations

import pytest
import torch

from lightclip.config import FinetuneConfig, PretrainConfig, TrainConfig
from lightclip.finetune import FinetuneError, Place, freeze, lr_scales, parameter_places
from lightclip.models import ModelSpec, arch_config, build_from_config, create_model, tokenizer
from lightclip.tasks import ImageTextTask
from lightclip.training import checkpoint_key, make_optimizer, make_scheduler, train

LR = 1e-3


def tiny_model(seed: int = 0):
    model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=seed)
    return model


def test_places_of_a_vit_and_a_modified_resnet():
    vit = parameter_places(n for n, _ in tiny_model().named_parameters())
    assert vit["visual.conv1.weight"] == Place("image", 0, 1) and vit["visual.class_embedding"] == Place("image", 0, 1)
    assert vit["visual.transformer.resblocks.0.attn.in_proj_weight"] == Place("image", 1, 1)
    assert vit["visual.proj"] == Place("image", 2, 1) and vit["visual.ln_post.weight"] == Place("image", 2, 1)
    assert vit["token_embedding.weight"] == Place("text", 0, 1) and vit["positional_embedding"] == Place("text", 0, 1)
    assert vit["text_projection"] == Place("text", 2, 1) and vit["logit_scale"] == Place("head", 0, 0)
    names = [n for n, _ in build_from_config(arch_config("RN50")).named_parameters()]
    rn = parameter_places(names)
    assert rn["visual.bn3.weight"] == Place("image", 0, 16)  # the stem
    assert rn["visual.layer1.0.conv1.weight"] == Place("image", 1, 16) and rn["visual.layer2.0.downsample.0.weight"] == Place("image", 4, 16)
    assert rn["visual.layer4.2.bn3.bias"] == Place("image", 16, 16)
    assert rn["visual.attnpool.positional_embedding"] == Place("image", 17, 16)  # the pool above the blocks, not an input embedding
    assert rn["transformer.resblocks.11.mlp.c_fc.weight"] == Place("text", 12, 12)


def test_param_groups_get_the_scaled_layer_decayed_lrs():
    model = tiny_model()
    config = FinetuneConfig(lr_scale=0.5, layer_decay=0.8)
    scales = lr_scales(model, config)
    optimizer = make_optimizer(model.named_parameters(), TrainConfig(lr=LR, weight_decay=0.1), scales)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert len(lr_of) == len(params)  # every parameter once
    expected = {
        "logit_scale": LR,
        "visual.proj": LR * 0.5,  # the top of the image tower: lr_scale only
        "visual.transformer.resblocks.0.mlp.c_fc.weight": LR * 0.5 * 0.8,
        "visual.conv1.weight": LR * 0.5 * 0.8**2,
        "token_embedding.weight": LR * 0.5 * 0.8**2,
        "transformer.resblocks.0.attn.in_proj_weight": LR * 0.5 * 0.8,
        "ln_final.weight": LR * 0.5,
    }
    for name, lr in expected.items():
        assert lr_of[id(params[name])] == pytest.approx(lr), name
    assert decay_of[id(params["visual.conv1.weight"])] == 0.1 and decay_of[id(params["ln_final.weight"])] == 0.0  # decay rules kept
    # the schedule scales every group alike: warm-up step 1 of 4 is a quarter of each group's own lr
    scheduler = make_scheduler(optimizer, TrainConfig(lr=LR, warmup_steps=4), total_steps=10)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([g["initial_lr"] / 4 for g in optimizer.param_groups])
    del scheduler


def test_defaults_change_nothing():
    model = tiny_model()
    assert lr_scales(model, FinetuneConfig()) is None and freeze(model, FinetuneConfig()) == []
    assert all(p.requires_grad for p in model.parameters())
    groups = make_optimizer(model.named_parameters(), TrainConfig(lr=LR), None).param_groups
    assert [g["weight_decay"] for g in groups] == [0.0, TrainConfig().weight_decay] and {g["lr"] for g in groups} == {LR}
    # runs checkpointed before the knob existed keep their key (and resume)
    before = PretrainConfig().model_dump(mode="json", exclude={"ensemble_members", "finetune"})
    assert checkpoint_key(PretrainConfig().model_dump(mode="json", exclude={"ensemble_members"}), "x") == checkpoint_key(before, "x")
    tuned = PretrainConfig(finetune=FinetuneConfig(layer_decay=0.9)).model_dump(mode="json", exclude={"ensemble_members"})
    assert checkpoint_key(tuned, "x") != checkpoint_key(before, "x")


def test_frozen_tower_and_layers_stay_out_of_the_optimizer_and_unchanged(tiny_pairs, tmp_path, one_torch_thread):
    train_pairs, val_pairs = tiny_pairs
    model = tiny_model(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = freeze(model, FinetuneConfig(freeze=["image"], freeze_layers=1))
    assert {n for n in frozen if n.startswith("visual.")} == {n for n, _ in model.named_parameters() if n.startswith("visual.")}
    assert {"token_embedding.weight", "positional_embedding", "transformer.resblocks.0.attn.in_proj_weight"} <= set(frozen)
    assert "ln_final.weight" not in frozen and "text_projection" not in frozen and "logit_scale" not in frozen

    task = ImageTextTask(model, tokenizer(ModelSpec(arch="lc-test-tiny")), train_pairs, val_pairs, hflip=False)
    optimizer = make_optimizer(task.named_parameters(), TrainConfig(lr=LR))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for n, p in model.named_parameters() if n in frozen)

    config = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup_steps=0, early_stop_patience=0, num_threads=1)
    result = train(task, config, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert result.steps == 4
    after = model.state_dict()
    for name in frozen:
        assert torch.equal(after[name], before[name]), f"{name} moved although frozen"
    assert not torch.equal(after["text_projection"], before["text_projection"])  # the rest trained


def test_freezing_more_layers_than_a_tower_has_is_an_error():
    with pytest.raises(FinetuneError, match="freeze_layers = 2, but the image tower has 1 block"):
        freeze(tiny_model(), FinetuneConfig(freeze_layers=2))
    with pytest.raises(ValueError, match="freeze one at most"):
        FinetuneConfig(freeze=["image", "text"])
