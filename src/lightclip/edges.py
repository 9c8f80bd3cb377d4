"""CocaCLIP/ConaCLIP's knowledge interaction graph: its edges, their legal losses, their meaning.

The graph has four nodes: the student's image and text towers (``S_I``, ``S_T``) and the frozen
teacher's (``T_I``, ``T_T``). Every edge that touches the student can be supervised:

==================  ===========  ==========================================================
edge                nodes        what it transfers
==================  ===========  ==========================================================
``intra_ts_image``  S_I - T_I    the teacher's embedding of the same image
``intra_ts_text``   S_T - T_T    the teacher's embedding of the same title
``inter_ts_image``  S_I - T_T    the teacher's embedding of the pair's title
``inter_ts_text``   S_T - T_I    the teacher's embedding of the pair's image
``intra_ss_image``  S_I - S_I    the teacher's image-image relations within the batch
``intra_ss_text``   S_T - S_T    the teacher's text-text relations within the batch
``inter_ss``        S_I - S_T    nothing from the teacher: the student's own CLIP loss
==================  ===========  ==========================================================

``intra_ts``, ``inter_ts`` and ``intra_ss`` name both modalities at once. Each edge takes one
or more losses: ``infonce`` (contrastive), ``fd`` (feature distance) or ``sd`` (similarity
distance, KL); the formulas are in :func:`lightclip.losses.distillation_losses`. This module is
torch-free so that params load without torch; :mod:`lightclip.config` validates with it and the
losses trust what it validated.
"""

from __future__ import annotations

from typing import Iterable

#: The concrete edges (student node first).
EDGES: tuple[str, ...] = (
    "intra_ts_image",
    "intra_ts_text",
    "inter_ts_image",
    "inter_ts_text",
    "intra_ss_image",
    "intra_ss_text",
    "inter_ss",
)
#: Shorthands for both modalities of an interaction type.
EDGE_GROUPS: dict[str, tuple[str, ...]] = {
    "intra_ts": ("intra_ts_image", "intra_ts_text"),
    "inter_ts": ("inter_ts_image", "inter_ts_text"),
    "intra_ss": ("intra_ss_image", "intra_ss_text"),
}
LOSSES: tuple[str, ...] = ("infonce", "fd", "sd")
#: The losses each edge supports; :data:`_WHY_NOT` says why the others are errors.
VALID_LOSSES: dict[str, tuple[str, ...]] = {
    "intra_ts_image": LOSSES,
    "intra_ts_text": LOSSES,
    "inter_ts_image": LOSSES,
    "inter_ts_text": LOSSES,
    "intra_ss_image": ("fd", "sd"),
    "intra_ss_text": ("fd", "sd"),
    "inter_ss": ("infonce",),
}
_WHY_NOT: dict[tuple[str, str], str] = {
    ("intra_ss", "infonce"): "IntraSS compares a student tower with itself over the batch, so there is no positive pair to contrast",
    ("inter_ss", "fd"): "InterSS is the student's own image-text edge and has no teacher target; its only loss is the CLIP contrastive loss",
    ("inter_ss", "sd"): "InterSS is the student's own image-text edge and has no teacher target; its only loss is the CLIP contrastive loss",
}
#: Per concrete edge: (the student's modality, the partner node).
NODES: dict[str, tuple[str, str]] = {
    "intra_ts_image": ("image", "teacher_image"),
    "intra_ts_text": ("text", "teacher_text"),
    "inter_ts_image": ("image", "teacher_text"),
    "inter_ts_text": ("text", "teacher_image"),
    "intra_ss_image": ("image", "teacher_image"),
    "intra_ss_text": ("text", "teacher_text"),
    "inter_ss": ("image", "text"),
}
#: Edges whose terms need the teacher's embeddings.
TEACHER_EDGES: tuple[str, ...] = tuple(e for e in EDGES if e != "inter_ss")
#: Edges that compare student and teacher embeddings directly (equal widths or a projection);
#: IntraSS compares B x B relation matrices, which do not depend on the width.
PROJECTED_EDGES: tuple[str, ...] = ("intra_ts_image", "intra_ts_text", "inter_ts_image", "inter_ts_text")


def expand_edge(edge: str) -> tuple[str, ...]:
    """The concrete edges of an edge name or group; an unknown name lists the valid ones."""
    if edge in EDGE_GROUPS:
        return EDGE_GROUPS[edge]
    if edge in EDGES:
        return (edge,)
    raise ValueError(f"unknown distillation edge {edge!r}; valid edges: {', '.join(EDGES)} (groups: {', '.join(EDGE_GROUPS)})")


def check_edge_loss(edge: str, loss: str) -> None:
    """Raise ``ValueError`` unless ``loss`` is a known loss that every edge of ``edge`` supports."""
    if loss not in LOSSES:
        raise ValueError(f"unknown distillation loss {loss!r}; valid losses: {', '.join(LOSSES)}")
    for name in expand_edge(edge):
        valid = VALID_LOSSES[name]
        if loss not in valid:
            family = name if name == "inter_ss" else name.rsplit("_", 1)[0]
            reason = _WHY_NOT.get((family, loss), "not supported")
            raise ValueError(f"edge {edge!r} cannot use loss {loss!r}: {reason}; valid losses for {name}: {', '.join(valid)}")


def needs_teacher(concrete: Iterable[str]) -> bool:
    """Whether any of these concrete edges needs the teacher's embeddings."""
    return any(edge in TEACHER_EDGES for edge in concrete)


def projected_modalities(concrete: Iterable[str]) -> tuple[str, ...]:
    """The student modalities that these concrete edges compare with the teacher directly."""
    used = {NODES[edge][0] for edge in concrete if edge in PROJECTED_EDGES}
    return tuple(m for m in ("image", "text") if m in used)
