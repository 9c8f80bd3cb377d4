"""What every model of the zoo offers, single or ensemble: its error type, its preprocessing
record, the fast text encode, and the one safetensors writer every save site uses.

It sits below :mod:`lightclip.models.zoo` (building, saving and loading models, ensembles
included) and :mod:`lightclip.models.ensemble` (a model made of zoo models): both import it, and
the zoo imports the ensemble, never the reverse.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import open_clip
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from lightclip.errors import LightclipError


class ModelError(LightclipError, ValueError):
    """A model that cannot be built, loaded or saved; the message says which and why."""


@contextmanager
def unfused_attention() -> Iterator[None]:
    """``nn.MultiheadAttention`` without its fused inference kernel, restored on exit.

    The fused kernel is one opaque op: it has no ONNX form and the FLOP counter cannot see into
    it. The plain path does the same arithmetic, so export and counting run it; serving and
    timing keep the fused one."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def canonical_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """``tensors`` + ``metadata`` as safetensors bytes that depend on nothing but their content.

    safetensors writes its ``__metadata__`` map in the order of a Rust ``HashMap`` (a new order
    per map, per process), so the same tensors saved twice differ in bytes: DVC then sees a new
    output and the registry a new version. Here safetensors serialises (its data layout is
    already deterministic: by dtype, then by name) and the JSON header is re-encoded with sorted
    keys and no spaces, padded with spaces to a multiple of 8 as the format requires (header =
    8-byte little-endian length + JSON). Data offsets are relative to the end of the header, so
    they are unchanged.
    """
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    raw = save_safetensors(state, metadata=dict(metadata) if metadata else None)
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return b"".join((len(text).to_bytes(8, "little"), text, memoryview(raw)[8 + length :]))


def sha256_hex(data: bytes) -> str:
    """The sha256 of ``data`` as 64 hex digits (what ``model.json`` records of its weights)."""
    return hashlib.sha256(data).hexdigest()


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
    return encode_text_prefix(model, tokens[:, :length], normalize=normalize)


def can_trim_text(model: nn.Module) -> bool:
    """Whether :func:`encode_text_prefix` applies: an open_clip CLIP text tower, causal, argmax-pooled."""
    return _can_trim_text(model)


def encode_text_prefix(model: nn.Module, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """The text tower on token ids already cut after their end-of-text token (any length up to the context).

    The length is read from the tensor's shape, never from its values, so the ONNX export traces
    it as a dynamic axis.
    """
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x
