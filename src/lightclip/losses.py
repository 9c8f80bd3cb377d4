"""All losses of the project, sharing :func:`get_logits` / :func:`get_ground_truth` as open_clip does.

* :func:`clip_loss`: the symmetric InfoNCE of CLIP, numerically ``open_clip.ClipLoss()``
  (single process: no feature gathering).
* :func:`concept_alignment_loss`: FashionKLIP's concept-level alignment (Wang et al., ACL 2023,
  reference code ``alibaba/EasyNLP examples/fashionklip/training/train_all_concept.py``).

FashionKLIP, what we took from the reference implementation
----------------------------------------------------------------
* Every pair carries up to ``K`` concept slots (the reference: ``con_len = 5``; fewer concepts
  are padded with id ``-1``; parents in the concept hierarchy fill free slots). A concept's
  text is the prompt ``"a photo of {concept}"``.
* Each concept has visual *prototypes*: embeddings of a few images of the concept (the
  reference: 10 per concept), computed *without gradient* with the current model and
  refreshed once per epoch.
* For each slot the prototypes are ranked by cosine similarity to the pair's own image and
  the ``top_k`` (5) most similar are kept. Each kept prototype is aligned with the concept's
  prompt embedding by a symmetric cross-entropy (prototype -> concept texts and concept
  text -> prototypes, temperature = the CLIP logit scale), weighted by the (detached)
  image-prototype similarity. In the reference, the nested normalisation (per rank: weighted
  CE mean; across ranks: share of the summed similarity) equals one weighted mean over all
  (slot, rank) pairs, which is what :func:`concept_alignment_loss` computes.
* The reference combines the terms as ``(1 - a) * clip + a * concept`` with the detached
  ``a = clip / (5 * concept)``; :func:`combine_with_concept` offers that as ``adaptive=True``
  (``a = weight * clip / concept``, the reference is ``weight = 0.2``), clamped to [0, 1].

What we changed or simplified (and why)
---------------------------------------
* A batch-level concept table: each distinct concept prompt is encoded once per batch (the
  reference encodes every slot, duplicates and empty padding prompts included) and padding
  slots are ignored entirely (the reference lets empty prompts act as negatives).
* The same concept in two slots of a batch is not a negative of itself: those logits are
  masked (the reference treats them as negatives, a false-negative bias).
* Similarity weights are clamped at 0 (the reference can weight a CE term negatively).
* "and with the pair's image": besides the prototype term, the pair's image is aligned with
  its concepts' prompts directly (image -> concepts, concept -> images, multi-positive by
  masking the other positives). This is the only concept term that sends gradient into the
  image tower (prototypes are detached as in the reference). Weighted by ``image_weight``.
* Prototype images and their embeddings are supplied by the caller. In the reference they are
  found by text->image search with the current model plus MMR diversification; our trainer
  takes them from the concept graph's item links and reads their embeddings from a memory bank
  of recent (detached) image embeddings, which costs nothing extra per step (see
  :class:`lightclip.tasks.fashionklip.FashionKLIPTask`).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightclip.config import EdgeLossConfig, concrete_edges
from lightclip.edges import NODES, PROJECTED_EDGES, needs_teacher

CONCEPT_TERMS: tuple[str, ...] = ("concept", "concept_prototype", "concept_image")


def get_logits(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(logits_per_image, logits_per_text)``: scaled cosine similarities (inputs normalised)."""
    logits_per_image = logit_scale * image_emb @ text_emb.T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
    return logits_per_image, logits_per_image.T


def get_ground_truth(num_logits: int, device: torch.device | str = "cpu") -> Tensor:
    """Pair ``i`` matches column ``i``."""
    return torch.arange(num_logits, device=device, dtype=torch.long)


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, *, return_terms: bool = False) -> Tensor | dict[str, Tensor]:
    """Symmetric InfoNCE over the batch (= ``open_clip.ClipLoss()(img, txt, scale)``)."""
    logits_per_image, logits_per_text = get_logits(image_emb, text_emb, logit_scale)
    labels = get_ground_truth(logits_per_image.shape[0], logits_per_image.device)
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    return {"contrastive_loss": loss} if return_terms else loss


def _masked_ce(logits: Tensor, target: Tensor, mask_out: Tensor | None) -> Tensor:
    """Per-row cross-entropy; ``mask_out`` logits (other positives) are removed from the softmax."""
    if mask_out is not None:
        logits = logits.masked_fill(mask_out, float("-inf"))
    return F.cross_entropy(logits, target, reduction="none")


def _weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    total = weights.sum()
    return (values * weights).sum() / total.clamp_min(1e-12)


def concept_alignment_loss(
    image_emb: Tensor,
    concept_text_emb: Tensor | None,
    concept_ids: Tensor,
    logit_scale: Tensor | float,
    *,
    prototype_emb: Tensor | None = None,
    prototype_mask: Tensor | None = None,
    prototype_item_ids: Tensor | None = None,
    item_ids: Tensor | None = None,
    slot_weights: Tensor | None = None,
    top_k: int = 5,
    prototype_weight: float = 1.0,
    image_weight: float = 1.0,
    return_terms: bool = False,
) -> Tensor | dict[str, Tensor]:
    """FashionKLIP concept-level alignment over a batch (see the module docstring).

    Shapes: ``B`` pairs, ``K`` slots, ``C`` concepts in the batch table, ``P`` prototypes per
    concept, ``D`` embedding size; all embeddings L2-normalised.

    * ``image_emb`` ``B x D``: the pairs' image embeddings.
    * ``concept_text_emb`` ``C x D``: prompt embeddings of the batch concept table.
    * ``concept_ids`` ``B x K`` long: ids into the table, ``-1`` = padding (ignored).
    * ``prototype_emb`` ``C x P x D`` (normally detached) and ``prototype_mask`` ``C x P``
      (True = a real prototype); without prototypes the prototype term is 0.
    * ``prototype_item_ids`` ``C x P`` / ``item_ids`` ``B``: when given, a pair never uses its
      own image as a prototype of its concepts.
    * ``slot_weights`` ``B x K`` (>= 0): per-slot weights (default 1).

    Returns ``(prototype_weight * L_proto + image_weight * L_image) / (prototype_weight +
    image_weight)``; with ``return_terms`` a dict with that value as ``concept`` and the
    ``concept_prototype`` and ``concept_image`` terms. Both weights 0 return zeros at once,
    without touching any input (the concept term's own weight is applied by
    :func:`combine_with_concept`).
    """
    if prototype_weight == 0 and image_weight == 0:
        zero = torch.zeros((), device=image_emb.device)
        return {name: zero for name in CONCEPT_TERMS} if return_terms else zero
    if concept_text_emb is None:
        raise ValueError("concept_alignment_loss: concept_text_emb is required")
    B, K = concept_ids.shape
    C = concept_text_emb.shape[0]
    device = image_emb.device
    ids = concept_ids.to(device=device, dtype=torch.long)
    sw = torch.ones((B, K), device=device) if slot_weights is None else slot_weights.to(device=device, dtype=torch.float32)
    valid = (ids >= 0) & (sw > 0)
    if int(ids.max().item() if ids.numel() else -1) >= C:
        raise ValueError(f"concept_alignment_loss: concept id {int(ids.max())} outside the table of {C} concepts")
    zero = image_emb.sum() * 0.0 + concept_text_emb.sum() * 0.0  # keeps the graph (and dtype) for empty batches
    if not bool(valid.any()):
        return {"concept": zero, "concept_prototype": zero, "concept_image": zero} if return_terms else zero

    slot_b, slot_k = valid.nonzero(as_tuple=True)  # M valid slots
    slot_c = ids[slot_b, slot_k]
    slot_w = sw[slot_b, slot_k]
    texts = concept_text_emb[slot_c]  # M x D
    # has[b, c]: pair b carries concept c (for masking other positives)
    has = torch.zeros((B, C), dtype=torch.bool, device=device)
    has[slot_b, slot_c] = True

    # -- the pair's image <-> its concepts' prompts ----------------------------------------
    if image_weight > 0:
        i2c = logit_scale * image_emb[slot_b] @ concept_text_emb.T  # M x C
        other_concepts = has[slot_b].clone()
        other_concepts[torch.arange(len(slot_c), device=device), slot_c] = False
        c2i = logit_scale * texts @ image_emb.T  # M x B
        other_images = has[:, slot_c].T.clone()  # M x B: images that also carry the concept
        other_images[torch.arange(len(slot_b), device=device), slot_b] = False
        per_slot = (_masked_ce(i2c, slot_c, other_concepts) + _masked_ce(c2i, slot_b, other_images)) / 2
        image_term = _weighted_mean(per_slot, slot_w)
    else:
        image_term = zero

    # -- selected visual prototypes <-> the concept's prompt (the reference's concept loss) --
    proto_term = zero
    if prototype_weight > 0 and prototype_emb is not None:
        P = prototype_emb.shape[1]
        protos = prototype_emb[slot_c].detach()  # M x P x D
        usable = torch.ones((len(slot_c), P), dtype=torch.bool, device=device) if prototype_mask is None else prototype_mask.to(device)[slot_c].clone()
        if prototype_item_ids is not None and item_ids is not None:
            usable &= prototype_item_ids.to(device)[slot_c] != item_ids.to(device)[slot_b][:, None]
        with torch.no_grad():
            sims = torch.einsum("mpd,md->mp", protos.float(), image_emb[slot_b].detach().float())
            sims = sims.masked_fill(~usable, float("-inf"))
            top = min(top_k, P)
            values, index = sims.topk(top, dim=1)  # M x T
            chosen = torch.isfinite(values)
            weights = values.clamp_min(0).nan_to_num(0.0, posinf=0.0, neginf=0.0) * slot_w[:, None]
            weights = weights * chosen
        if bool((weights > 0).any()):
            selected = torch.gather(protos, 1, index[..., None].expand(-1, -1, protos.shape[-1]))  # M x T x D
            M, T = index.shape
            # prototype -> concept prompts of the table (target: the slot's concept)
            p2c = logit_scale * selected.reshape(M * T, -1) @ concept_text_emb.T  # MT x C
            ce_p2c = _masked_ce(p2c, slot_c.repeat_interleave(T), None).view(M, T)
            # concept prompt -> the prototypes chosen at the same rank over the batch's slots
            c2p = logit_scale * torch.einsum("md,ntd->tmn", texts, selected)  # T x M x M
            eye = torch.eye(M, dtype=torch.bool, device=device)
            same = (slot_c[:, None] == slot_c[None, :]) & ~eye  # the same concept elsewhere: not a negative
            unusable = ~chosen.T[:, None, :] & ~eye[None]  # rank t of slot n has no prototype
            mask = same[None] | unusable  # T x M x M
            target = torch.arange(M, device=device).repeat(T)
            ce_c2p = _masked_ce(c2p.reshape(T * M, M), target, mask.reshape(T * M, M)).view(T, M).T
            # rows whose own rank-t prototype is missing have weight 0 (their CE is finite)
            proto_term = _weighted_mean((ce_p2c + ce_c2p) / 2, weights)

    total_w = prototype_weight + image_weight
    concept = (prototype_weight * proto_term + image_weight * image_term) / total_w
    if return_terms:
        return {"concept": concept, "concept_prototype": proto_term, "concept_image": image_term}
    return concept


def combine_with_concept(clip: Tensor, concept: Tensor, *, weight: float, adaptive: bool = False) -> Tensor:
    """Total loss from the CLIP term and an (unweighted) concept term.

    ``adaptive=False``: ``clip + weight * concept``. ``adaptive=True`` (the reference):
    ``(1 - a) * clip + a * concept`` with the detached ``a = weight * clip / concept`` clamped to
    [0, 1], so the concept term contributes about ``weight`` times the CLIP term.
    """
    if weight == 0:
        return clip
    if not adaptive:
        return clip + weight * concept
    with torch.no_grad():
        a = (weight * clip / concept.clamp_min(1e-8)).clamp(0.0, 1.0) if float(concept.detach()) > 0 else torch.zeros_like(clip)
    return (1 - a) * clip + a * concept


# ==============================================================================================
# CocaCLIP / ConaCLIP: distillation over the fully-connected knowledge interaction graph
# ==============================================================================================
#
# Wang et al., "ConaCLIP: Exploring Distillation of Fully-Connected Knowledge Interaction Graph
# for Lightweight Text-Image Retrieval" (ACL 2023 Industry, arXiv 2305.17652).
#
# The edges and their legal losses are defined in lightclip.edges; the formula of every
# (edge, loss) is in the docstring of :func:`distillation_losses`.


def _kl_rows(teacher_logits: Tensor, student_logits: Tensor, exclude: Tensor | None = None) -> Tensor:
    """Mean over rows of KL(softmax(teacher row) || softmax(student row)); ``exclude`` entries left out."""
    if exclude is not None:
        teacher_logits = teacher_logits.masked_fill(exclude, float("-inf"))
        student_logits = student_logits.masked_fill(exclude, float("-inf"))
    log_p = F.log_softmax(teacher_logits, dim=-1)
    log_q = F.log_softmax(student_logits, dim=-1)
    diff = log_p - log_q
    if exclude is not None:
        diff = diff.masked_fill(exclude, 0.0)  # -inf - -inf: no NaN in the value nor the gradient
    return (log_p.exp() * diff).sum(dim=-1).mean()


def _scale_for(entry: EdgeLossConfig, logit_scale: Tensor | float) -> Tensor | float:
    if entry.temperature is not None:
        return 1.0 / entry.temperature
    if entry.loss == "sd" and isinstance(logit_scale, Tensor):
        return logit_scale.detach()
    return logit_scale


def graph_term(
    edge: str,
    loss: str,
    student: Tensor,
    partner: Tensor,
    *,
    teacher_self: Tensor | None = None,
    scale: Tensor | float = 1.0,
) -> Tensor:
    """One (concrete edge, loss) term, already validated by :mod:`lightclip.edges`; see
    :func:`distillation_losses`.

    ``student``: the student node's embeddings (projected for TS edges); ``partner``: the other
    node's (teacher for TS/SS edges, the student's other tower for ``inter_ss``);
    ``teacher_self``: the teacher's embedding of the student node's modality (``sd`` on TS edges).
    """
    if edge == "inter_ss" or loss == "infonce":
        return clip_loss(student, partner, scale)  # type: ignore[return-value]
    if edge.startswith("intra_ss"):
        n = student.shape[0]
        eye = torch.eye(n, dtype=torch.bool, device=student.device)
        if n < 2:
            return student.sum() * 0.0
        student_rel = student @ student.T
        teacher_rel = partner @ partner.T
        if loss == "fd":
            return (student_rel - teacher_rel).pow(2)[~eye].mean()
        return _kl_rows(scale * teacher_rel, scale * student_rel, exclude=eye)
    # teacher-student edges
    if loss == "fd":
        return (student - partner).pow(2).sum(dim=-1).mean()
    if teacher_self is None:
        raise ValueError(f"{edge}/sd needs the teacher's own embeddings of the student node's modality")
    rows = _kl_rows(scale * teacher_self @ partner.T, scale * student @ partner.T)
    cols = _kl_rows(scale * partner @ teacher_self.T, scale * partner @ student.T)
    return (rows + cols) / 2


def distillation_losses(
    student_img: Tensor,
    student_txt: Tensor,
    teacher_img: Tensor | None,
    teacher_txt: Tensor | None,
    edges: Sequence[EdgeLossConfig],
    logit_scale: Tensor | float,
    projections: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
) -> dict[str, Tensor]:
    """The ConaCLIP graph loss of a batch: ``{"loss": weighted sum, "<edge>/<loss>": term, ...}``.

    Inputs: ``student_img``/``student_txt`` ``B x Ds``, ``teacher_img``/``teacher_txt`` ``B x Dt``
    (row i = pair i; all L2-normalised here, teacher tensors detached, so gradients reach only
    the student, the projections and the logit scale; the teacher may be ``None`` when only
    ``inter_ss`` is supervised). ``edges``: validated :class:`~lightclip.config.EdgeLossConfig` entries (params or
    ``DistillJob.edges``: known edges, legal losses, no edge/loss twice).
    ``logit_scale``: the student's learned CLIP scale (1/tau), used where an entry's
    ``temperature`` is ``None`` (detached for ``sd``); a temperature tau gives scale ``k = 1/tau``.
    ``projections``: ``{"image": f, "text": g}`` mapping the student's embeddings to the
    teacher's width, used by the teacher-student edges only (then re-normalised); without one the
    widths must be equal (else a ``ValueError`` asking for ``distill.projection: true``).

    Notation: ``s_I, s_T, t_I, t_T`` the normalised embeddings; ``P(s)`` the projected student;
    ``CE(L)``: cross-entropy of each row of logits ``L`` with the diagonal as target (pair i is
    the positive of pair i, the other B-1 pairs of the batch are negatives); ``KL(A || B)``: the
    mean over rows r of ``KL(softmax(A_r) || softmax(B_r))``, the teacher's distribution first.

    Edges (student node - partner node) and their losses:

    * IntraTS ``intra_ts_image`` (S_I - T_I), ``intra_ts_text`` (S_T - T_T); with (s, t) =
      (s_I, t_I) or (s_T, t_T):

      - ``infonce``: ``[CE(k P(s) t^T) + CE(k t P(s)^T)] / 2``: the student's embedding of
        pair i must pick the teacher's embedding of pair i among the batch, and vice versa.
      - ``fd``: ``mean_i |P(s)_i - t_i|^2`` (squared L2 distance of unit vectors = 2 - 2 cos).
      - ``sd``: ``[KL(k t t^T || k P(s) t^T) + KL(k t t^T || k t P(s)^T)] / 2``: the student,
        queried against the teacher's keys, ranks the batch as the teacher does.

    * InterTS ``inter_ts_image`` (S_I - T_T), ``inter_ts_text`` (S_T - T_I); with (s, t_a, t_b) =
      (s_I, t_I, t_T) or (s_T, t_T, t_I):

      - ``infonce``: ``[CE(k P(s) t_b^T) + CE(k t_b P(s)^T)] / 2``: the student's image
        against the teacher's titles (image -> text and text -> image), and for
        ``inter_ts_text`` the student's titles against the teacher's images.
      - ``fd``: ``mean_i |P(s)_i - t_b,i|^2``: the student's image embedding onto the teacher's
        embedding of the pair's title (0 when they coincide, whatever the teacher's image).
      - ``sd``: ``[KL(k t_a t_b^T || k P(s) t_b^T) + KL(k t_b t_a^T || k t_b P(s)^T)] / 2``:
        the student's cross-modal similarity rows (and columns) reproduce the teacher's own
        image-text (text-image) ones: CLIP-style soft-label distillation.

    * IntraSS ``intra_ss_image`` (S_I - S_I), ``intra_ss_text`` (S_T - S_T): relations among the
      B samples inside one student tower, supervised by the teacher's relations of the same
      modality; no projection (the B x B relation matrices do not depend on the width). With
      (s, t) = (s_I, t_I) or (s_T, t_T) and the diagonal (self-similarity, always 1) left out:

      - ``fd``: ``mean_{i != j} (s_i . s_j - t_i . t_j)^2`` (a relation distance).
      - ``sd``: ``KL(k t t^T || k s s^T)`` row-wise.
      - ``infonce``: an error (a tower against itself has no positive pair to contrast).

    * InterSS ``inter_ss`` (S_I - S_T): the student's own CLIP loss,
      ``infonce`` = ``[CE(k s_I s_T^T) + CE(k s_T s_I^T)] / 2`` = :func:`clip_loss`; ``fd`` and
      ``sd`` are errors (there is no teacher target on this edge).

    So with a perfectly aligned teacher (``t_I = t_T``) and a student equal to it, every ``fd``
    and ``sd`` term is 0. The groups ``intra_ts``, ``inter_ts``, ``intra_ss`` stand for both
    concrete edges, each a term weighted by the entry's weight. Terms are returned unweighted;
    ``loss = sum(weight x term)``.
    """
    concrete = concrete_edges(list(edges))
    with_teacher = needs_teacher(edge for edge, _ in concrete)
    if with_teacher and (teacher_img is None or teacher_txt is None):
        missing = sorted({f"{e}/{s.loss}" for e, s in concrete if needs_teacher([e])})
        raise ValueError(f"teacher embeddings are needed by {', '.join(missing)}")

    nodes: dict[str, Tensor] = {
        "image": F.normalize(student_img.float(), dim=-1),
        "text": F.normalize(student_txt.float(), dim=-1),
    }
    if with_teacher:
        assert teacher_img is not None and teacher_txt is not None
        nodes["teacher_image"] = F.normalize(teacher_img.detach().float(), dim=-1)
        nodes["teacher_text"] = F.normalize(teacher_txt.detach().float(), dim=-1)
    projected: dict[str, Tensor] = {}

    def project(modality: str, edge: str) -> Tensor:
        if modality not in projected:
            student = nodes[modality]
            teacher_width = nodes["teacher_" + modality].shape[-1]
            fn = (projections or {}).get(modality)
            if fn is None:
                if student.shape[-1] != teacher_width:
                    raise ValueError(
                        f"{edge}: the student's {modality} embeddings are {student.shape[-1]}-d but the teacher's are "
                        f"{teacher_width}-d; a learned projection is needed (distill.projection: true)"
                    )
                projected[modality] = student
            else:
                out = fn(student).float()
                if out.shape[-1] != teacher_width:
                    raise ValueError(f"{edge}: the {modality} projection gives {out.shape[-1]}-d embeddings, the teacher's are {teacher_width}-d")
                projected[modality] = F.normalize(out, dim=-1)
        return projected[modality]

    terms: dict[str, Tensor] = {}
    total: Tensor | None = None
    for edge, spec in concrete:
        modality, partner_name = NODES[edge]
        student = project(modality, edge) if edge in PROJECTED_EDGES else nodes[modality]
        teacher_self = nodes.get("teacher_" + modality) if spec.loss == "sd" and edge in PROJECTED_EDGES else None
        value = graph_term(edge, spec.loss, student, nodes[partner_name], teacher_self=teacher_self, scale=_scale_for(spec, logit_scale))
        terms[f"{edge}/{spec.loss}"] = value
        weighted = spec.weight * value
        total = weighted if total is None else total + weighted
    assert total is not None
    return {"loss": total, **terms}

