"""A CLIP whose text tower is pooled token embeddings: a title in a handful of operators.

At batch 1 a small transformer's cost is its operator count, not its arithmetic: one text layer
of width 64 is dozens of calls of a few microseconds each, which caps how much faster than a
teacher any transformer title tower can be (docs/results.md, "How small must a tower be").
Product titles are mostly bags of attributes (brand, colour, type, gender), so a fastText-style
tower loses little: the mean of the title's token embeddings (start and end tokens included,
padding excluded), a layer norm, an optional hidden layer with GELU, and a linear projection to
the embedding width. The image tower is open_clip's, built from ``vision_cfg`` as usual.

An architecture selects it with ``"text_tower": "pooled"`` beside ``embed_dim``, ``vision_cfg``
and ``text_cfg`` (``context_length``, ``vocab_size``, ``width``, ``mlp_width``: 0 = none). It
uses open_clip's CLIP tokenizer, so every caller tokenises titles as for any other model.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from open_clip.model import _build_vision_tower
from torch import nn

from lightclip.models.common import ModelError

#: the config key (top level of an architecture's JSON) that selects this model
TEXT_TOWER_KEY = "text_tower"
POOLED = "pooled"
_TEXT_KEYS = frozenset({"context_length", "vocab_size", "width", "mlp_width"})


def is_pooled_text(config: Mapping[str, Any]) -> bool:
    """Whether an architecture's config asks for :class:`PooledTextCLIP`."""
    kind = config.get(TEXT_TOWER_KEY)
    if kind not in (None, POOLED):
        raise ModelError(f"unknown {TEXT_TOWER_KEY} {kind!r} in the model config: expected {POOLED!r} or no key (open_clip's transformer)")
    return kind == POOLED


class PooledTextCLIP(nn.Module):
    """open_clip's image tower with a pooled-embedding text tower; what lightclip calls of ``open_clip.CLIP``
    (``encode_image``, ``encode_text``, ``logit_scale``, ``visual``)."""

    def __init__(
        self,
        embed_dim: int,
        vision_cfg: Mapping[str, Any],
        text_cfg: Mapping[str, Any],
        quick_gelu: bool = False,
        init_logit_scale: float = math.log(1 / 0.07),
        cast_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        unknown = sorted(set(text_cfg) - _TEXT_KEYS)
        if unknown:
            raise ModelError(f"pooled text tower: unknown text_cfg key(s) {unknown}; it takes {sorted(_TEXT_KEYS)}")
        self.visual = _build_vision_tower(embed_dim, dict(vision_cfg), quick_gelu, cast_dtype)
        self.context_length = int(text_cfg.get("context_length", 77))
        self.vocab_size = int(text_cfg.get("vocab_size", 49408))
        width = int(text_cfg.get("width", 64))
        mlp_width = int(text_cfg.get("mlp_width", 0))
        self.token_embedding = nn.Embedding(self.vocab_size, width)
        self.ln_final = nn.LayerNorm(width)
        self.text_mlp: nn.Module = nn.Sequential(nn.Linear(width, mlp_width), nn.GELU()) if mlp_width else nn.Identity()
        self.text_projection = nn.Linear(mlp_width or width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.ones([]) * init_logit_scale)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text_projection.weight, std=(mlp_width or width) ** -0.5)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """The mean of the embeddings of each title's tokens up to its end-of-text token.

        The end-of-text token has the largest id (as open_clip pools), so its position is the
        row's argmax; everything after it is padding. Works on any length, so cut titles too.
        """
        positions = torch.arange(text.shape[1], device=text.device)
        mask = (positions.unsqueeze(0) <= text.argmax(dim=-1, keepdim=True)).to(self.token_embedding.weight.dtype)
        summed = torch.einsum("bl,blw->bw", mask, self.token_embedding(text))
        pooled = summed / mask.sum(dim=1, keepdim=True)
        features = self.text_projection(self.text_mlp(self.ln_final(pooled)))
        return F.normalize(features, dim=-1) if normalize else features
