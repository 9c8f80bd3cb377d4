"""The CocaCLIP edge vocabulary: groups, legal losses, which edges need the teacher or a projection."""

from __future__ import annotations

import sys

import pytest

from lightclip.edges import EDGE_GROUPS, EDGES, LOSSES, NODES, PROJECTED_EDGES, TEACHER_EDGES, VALID_LOSSES, check_edge_loss, expand_edge, needs_teacher, projected_modalities


def test_groups_expand_to_both_modalities_and_unknown_names_list_the_valid_ones():
    assert expand_edge("intra_ts") == ("intra_ts_image", "intra_ts_text")
    assert expand_edge("inter_ss") == ("inter_ss",)
    assert {e for group in EDGE_GROUPS.values() for e in group} | {"inter_ss"} == set(EDGES)
    with pytest.raises(ValueError, match=r"unknown distillation edge 'nope'; valid edges: intra_ts_image.*groups: intra_ts"):
        expand_edge("nope")


def test_legal_losses_and_why_the_others_are_not():
    for edge in EDGES:
        for loss in LOSSES:
            if loss in VALID_LOSSES[edge]:
                check_edge_loss(edge, loss)
            else:
                with pytest.raises(ValueError, match=rf"edge '{edge}' cannot use loss '{loss}'"):
                    check_edge_loss(edge, loss)
    with pytest.raises(ValueError, match="no positive pair"):
        check_edge_loss("intra_ss", "infonce")
    with pytest.raises(ValueError, match="no teacher target"):
        check_edge_loss("inter_ss", "sd")
    with pytest.raises(ValueError, match="unknown distillation loss 'kl'"):
        check_edge_loss("intra_ts", "kl")


def test_teacher_and_projection_needs_follow_the_nodes():
    assert set(NODES) == set(EDGES)
    assert not needs_teacher(["inter_ss"]) and needs_teacher(["inter_ss", "intra_ss_text"])
    assert all(NODES[e][1].startswith("teacher_") for e in TEACHER_EDGES)
    assert projected_modalities(["intra_ss_image", "inter_ss"]) == ()  # relations and the student's own edge
    assert projected_modalities(["inter_ts_text", "intra_ts_image"]) == ("image", "text")
    assert set(PROJECTED_EDGES) < set(TEACHER_EDGES)


def test_the_vocabulary_loads_without_torch():
    import subprocess

    code = "import sys, lightclip.edges, lightclip.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
