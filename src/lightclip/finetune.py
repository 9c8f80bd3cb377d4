"""Fine-tuning a pretrained CLIP: per-parameter learning rates and frozen towers or layers.

A pretrained tower forgets what it knew when every layer moves at the learning rate of a model
trained from scratch; the usual remedies are a lower rate for the pretrained towers, a rate that
decays from the top block down to the embeddings (layer-wise decay, as BEiT and the CLIP
fine-tuning papers use), and frozen towers or bottom layers. ``pretrain.finetune``
(:class:`~lightclip.config.FinetuneConfig`) sets them; this module maps them onto parameters by
name, for any open_clip model (ViT, ModifiedResNet, timm and Hugging Face towers):

* tower: ``image`` (``visual.*``), ``head`` (``logit_scale``, ``logit_bias``), else ``text``;
* depth within the tower: 0 = embeddings / stem (``conv1``, ``class_embedding``,
  ``positional_embedding``, ``token_embedding``, ``ln_pre``, ``patch_embed``, ``embeddings`` ...),
  1..L = the tower's blocks in order (the first numbered path component: ``resblocks.3``,
  ``layer2.1``, ``encoder.layer.5``), L + 1 = what follows the blocks (final norm, projection,
  attention pool).

A parameter of a tower trains at ``lr x lr_scale x layer_decay ** (L + 1 - depth)``; the head at
``lr``. The defaults (scale 1, decay 1, nothing frozen) give every parameter ``lr``: training is
then exactly what it was before these knobs existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn

from lightclip.config import FinetuneConfig
from lightclip.errors import LightclipError

TOWERS: tuple[str, ...] = ("image", "text")
HEAD_PARAMETERS: frozenset[str] = frozenset({"logit_scale", "logit_bias"})
#: Path components that wrap a tower's real modules (timm's ``trunk``, the transformers).
_WRAPPERS: frozenset[str] = frozenset({"trunk", "transformer", "model", "encoder"})
#: A tower's input side: below its first block.
_EMBEDDINGS: frozenset[str] = frozenset({
    "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "stem", "class_embedding", "positional_embedding", "token_embedding",
    "ln_pre", "patch_embed", "pos_embed", "cls_token", "embeddings", "patch_dropout",
})


class FinetuneError(LightclipError, ValueError):
    """``pretrain.finetune`` asks for something the model does not have (more layers than its blocks)."""


@dataclass(frozen=True)
class Place:
    """Where a parameter sits: its tower, its depth there and the tower's block count."""

    tower: str  # image | text | head
    depth: int  # 0 = embeddings, 1..blocks = blocks, blocks + 1 = above them
    blocks: int


def _tower(name: str) -> tuple[str, list[str]]:
    parts = name.split(".")
    if name in HEAD_PARAMETERS:
        return "head", parts
    if parts[0] == "visual":
        return "image", parts[1:]
    return "text", parts[1:] if parts[0] == "text" else parts


def parameter_places(names: Iterable[str]) -> dict[str, Place]:
    """The :class:`Place` of every parameter name (in the model's ``named_parameters`` order)."""
    blocks: dict[str, dict[str, int]] = {tower: {} for tower in TOWERS}
    raw: dict[str, tuple[str, str | None, bool]] = {}
    for name in names:
        tower, parts = _tower(name)
        block = next((".".join(parts[: i + 1]) for i, part in enumerate(parts) if part.isdigit()), None)
        if tower != "head" and block is not None:
            blocks[tower].setdefault(block, len(blocks[tower]) + 1)
        first = next((part for part in parts if part not in _WRAPPERS), "")
        raw[name] = (tower, block, first in _EMBEDDINGS)
    places = {}
    for name, (tower, block, embedding) in raw.items():
        if tower == "head":
            places[name] = Place("head", 0, 0)
            continue
        count = len(blocks[tower])
        depth = blocks[tower][block] if block is not None else (0 if embedding else count + 1)
        places[name] = Place(tower, depth, count)
    return places


def freeze(model: nn.Module, config: FinetuneConfig) -> list[str]:
    """Stop gradients of ``config.freeze`` towers and of the bottom ``freeze_layers`` of the others.

    Returns the frozen parameter names. Frozen parameters get ``requires_grad = False``, so the
    training loop leaves them out of the optimizer and they keep their pretrained values exactly.
    """
    places = parameter_places(name for name, _ in model.named_parameters())
    if config.freeze_layers:
        for tower in TOWERS:
            counts = {p.blocks for p in places.values() if p.tower == tower}
            if tower not in config.freeze and counts and config.freeze_layers > max(counts):
                raise FinetuneError(f"pretrain.finetune.freeze_layers = {config.freeze_layers}, but the {tower} tower has {max(counts)} block(s)")
    frozen = []
    for name, param in model.named_parameters():
        place = places[name]
        whole = place.tower in config.freeze
        bottom = config.freeze_layers > 0 and place.tower in TOWERS and place.depth <= config.freeze_layers
        if whole or bottom:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def lr_scales(model: nn.Module, config: FinetuneConfig) -> dict[str, float] | None:
    """Each parameter's learning-rate multiplier (see the module docstring); ``None`` when all are 1."""
    if config.lr_scale == 1.0 and config.layer_decay == 1.0:
        return None
    places = parameter_places(name for name, _ in model.named_parameters())
    scales = {}
    for name, place in places.items():
        if place.tower == "head":
            scales[name] = 1.0
        else:
            scales[name] = config.lr_scale * config.layer_decay ** (place.blocks + 1 - place.depth)
    return scales
