"""An ensemble of CLIP models that behaves like one model: the teacher the embedded default earns.

From scratch on a catalogue of a few thousand pairs, a bigger ViT is not a better teacher, but
two small ones trained from different seeds are (``../shared/BASELINES.md``: +6 points over
either member). An ensemble embeds an image or a title as the concatenation of its members'
L2-normalised embeddings divided by ``sqrt(n)``: the result has unit norm and the dot product of
two such vectors is the *mean* of the members' cosine similarities. So every consumer (retrieval
metrics, FAISS inner-product index, the distillation losses, the teacher-embedding cache) uses
the ensemble exactly like a single model of width ``sum(member widths)``; distillation reaches
it through its learned projection when the student is narrower (MobileCLIP distils an ensemble
of teachers the same way).

Members must share the image preprocessing (size, mean, std) and the tokenizer, so one cached
uint8 image and one token tensor feed them all. The ensemble is saved like any model
(``model.safetensors`` with ``members.<i>.`` keys + ``model.json`` listing each member's
open_clip config), so loading it needs no extra files.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightclip.models.common import ModelError, encode_text, preprocess_config


class EnsembleCLIP(nn.Module):
    """Frozen members whose normalised embeddings are concatenated (mean cosine similarity)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ModelError(f"an ensemble needs at least 2 members, got {len(members)}")
        pre = [preprocess_config(m) for m in members]
        keys = ("size", "mean", "std", "resize_mode")
        for i, cfg in enumerate(pre[1:], start=1):
            differ = [k for k in keys if cfg.get(k) != pre[0].get(k)]
            if differ:
                raise ModelError(
                    f"ensemble member {i} preprocesses images differently from member 0 ({', '.join(differ)}: "
                    f"{[cfg.get(k) for k in differ]} vs {[pre[0].get(k) for k in differ]}); members must share size, mean, std and resize mode"
                )
        self.members = nn.ModuleList(members)
        scales = torch.stack([m.logit_scale.detach().reshape(()) for m in members])
        # The members' mean learned temperature: what distillation uses as the teacher's scale
        # (a buffer: saved with the weights, not a parameter of the ensemble).
        self.register_buffer("logit_scale", scales.mean())
        self.preprocess_cfg = dict(pre[0])
        self.requires_grad_(False)

    def _combine(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([F.normalize(p.float(), dim=-1) for p in parts], dim=-1) / math.sqrt(len(parts))

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Unit-norm concatenation of the members' image embeddings (``normalize`` is implied)."""
        return self._combine([m.encode_image(image) for m in self.members])

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Unit-norm concatenation of the members' text embeddings (``normalize`` is implied)."""
        return self._combine([encode_text(m, text) for m in self.members])


def ensemble_arch_name(archs: Sequence[str]) -> str:
    """A readable architecture name such as ``ensemble(lc-vit-t x2)``."""
    if len(set(archs)) == 1:
        return f"ensemble({archs[0]} x{len(archs)})"
    return f"ensemble({'+'.join(archs)})"
