"""The independent reference the evaluation tests compare with: float64, Python sorting, a dense positive mask."""

from __future__ import annotations

import numpy as np
import pytest


def _brute_force_metrics(image_emb: np.ndarray, text_emb: np.ndarray, mask: np.ndarray, ks, labels=None, precision_ks=()):
    """Rank = 1-based position of the first positive in the list sorted by (-cosine, index)."""
    img = image_emb.astype(np.float64)
    txt = text_emb.astype(np.float64)
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    sims = np.einsum("id,jd->ij", img, txt)
    out = {}
    for name, s, m in (("i2t", sims, mask), ("t2i", sims.T, mask.T)):
        ranks, tops = [], []
        for q in range(s.shape[0]):
            order = sorted(range(s.shape[1]), key=lambda j: (-s[q, j], j))
            ranks.append(next(pos for pos, j in enumerate(order) if m[q, j]) + 1)
            tops.append(order)
        ranks = np.array(ranks)
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * np.mean(ranks <= k)
        out[f"{name}_median_rank"] = float(np.median(ranks))
        out[f"{name}_mean_rank"] = float(np.mean(ranks))
        if name == "t2i" and labels:
            for attr, lab in labels.items():
                for k in precision_ks:
                    values = [np.mean([lab[j] == lab[q] for j in tops[q][:k]]) for q in range(len(lab)) if lab[q] is not None]
                    out[f"t2i_P@{k}_{attr}"] = 100.0 * np.mean(values)
    out["mean_recall"] = np.mean([out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks])
    return out, sims


@pytest.fixture
def brute_force_metrics():
    """``(metrics, float64 similarities)`` of ``(image_emb, text_emb, mask, ks, labels=None, precision_ks=())``."""
    return _brute_force_metrics
