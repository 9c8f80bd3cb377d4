"""What every model of the zoo offers, single or ensemble: its error type, its preprocessing
record and the fast text encode.

It sits below :mod:`lightclip.models.zoo` (building, saving and loading models, ensembles
included) and :mod:`lightclip.models.ensemble` (a model made of zoo models): both import it, and
the zoo imports the ensemble, never the reverse.
"""

from __future__ import annotations

from typing import Any

import open_clip
import torch
from torch import nn

from lightclip.errors import LightclipError


class ModelError(LightclipError, ValueError):
    """A model that cannot be built, loaded or saved; the message says which and why."""


def square_side(size: Any) -> int:
    """The side of a square image size given as an int or an ``(h, w)`` pair."""
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ModelError(f"non-square image size {tuple(size)} is not supported")
        return int(size[0])
    return int(size)


def preprocess_config(model: nn.Module) -> dict[str, Any]:
    """The model's preprocessing (size, mean, std, interpolation, resize_mode) as plain data."""
    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    for key in ("mean", "std"):
        if key in cfg:
            cfg[key] = [float(v) for v in cfg[key]]
    if "size" in cfg:
        cfg["size"] = square_side(cfg["size"])
    return cfg


def _can_trim_text(model: nn.Module) -> bool:
    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "text_pool_type", None) == "argmax"
        and getattr(model, "attn_mask", None) is not None
        and not getattr(model.transformer, "grad_checkpointing", False)
    )


def encode_text(model: nn.Module, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``model.encode_text`` on the shortest prefix that holds every end-of-text token.

    open_clip's CLIP text tower is causal and pools at the end-of-text token (argmax of the
    ids), so the padding after it cannot change the output: cutting the batch to its longest
    sequence gives the same embeddings (up to float rounding) at a fraction of the cost for
    short titles. Other towers fall back to ``model.encode_text``.
    """
    if not _can_trim_text(model) or tokens.shape[1] <= 1:
        return model.encode_text(tokens, normalize=normalize)
    length = int(tokens.argmax(dim=-1).max().item()) + 1
    if length >= tokens.shape[1]:
        return model.encode_text(tokens, normalize=normalize)
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x
