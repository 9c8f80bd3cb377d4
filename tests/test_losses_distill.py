"""ConaCLIP graph losses: zero at the target, growing with a perturbation, gradients to the student only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightclip.config import ConfigError, DistillConfig, EdgeLossConfig as EdgeLoss, parse_params
from lightclip.edges import EDGES, LOSSES, VALID_LOSSES
from lightclip.losses import clip_loss, distillation_losses

B, D = 16, 32
VALID = [(edge, loss) for edge in EDGES for loss in VALID_LOSSES[edge]]
INVALID = [(edge, loss) for edge in EDGES for loss in LOSSES if loss not in VALID_LOSSES[edge]]
TEMPERATURE = 0.1


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _aligned_teacher(seed=0):
    """A perfectly aligned teacher: its image and text embedding of a pair coincide."""
    t = _unit(B, D, seed=seed)
    return t, t.clone()


def _perturbed(x, alpha, seed=10):
    return F.normalize(x + alpha * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _term(edge, loss, s_img, s_txt, t_img, t_txt, temperature=TEMPERATURE, projections=None):
    temperature = None if loss == "fd" else temperature
    out = distillation_losses(s_img, s_txt, t_img, t_txt, [EdgeLoss(edge=edge, loss=loss, temperature=temperature)], 1 / TEMPERATURE, projections)
    assert set(out) == {"loss", f"{edge}/{loss}"}
    assert float(out["loss"]) == float(out[f"{edge}/{loss}"])
    return float(out[f"{edge}/{loss}"])


@pytest.mark.parametrize("edge,loss", [c for c in VALID if c[1] in ("fd", "sd")])
def test_fd_and_sd_are_zero_at_the_teacher_and_grow_with_a_perturbation(edge, loss):
    t_img, t_txt = _aligned_teacher()
    assert _term(edge, loss, t_img, t_txt, t_img, t_txt) == pytest.approx(0.0, abs=1e-6)
    values = [_term(edge, loss, _perturbed(t_img, a), _perturbed(t_txt, a, seed=11), t_img, t_txt) for a in (0.05, 0.2, 0.5, 1.0)]
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert values[0] > 0


@pytest.mark.parametrize("edge,loss", [c for c in VALID if c[1] == "infonce"])
def test_infonce_falls_as_the_student_moves_toward_the_teacher(edge, loss):
    t_img, t_txt = _aligned_teacher()
    values = [_term(edge, loss, _perturbed(t_img, a), _perturbed(t_txt, a, seed=11), t_img, t_txt) for a in (3.0, 1.0, 0.3, 0.0)]
    assert all(b < a for a, b in zip(values, values[1:])), values


def test_inter_ts_fd_targets_the_other_modality_of_the_teacher():
    t_img, t_txt = _unit(B, D, seed=1), _unit(B, D, seed=2)  # an unaligned teacher
    s_img, s_txt = t_txt.clone(), t_img.clone()  # student image = teacher text and vice versa
    assert _term("inter_ts_image", "fd", s_img, s_txt, t_img, t_txt) == pytest.approx(0.0, abs=1e-6)
    assert _term("inter_ts_text", "fd", s_img, s_txt, t_img, t_txt) == pytest.approx(0.0, abs=1e-6)
    assert _term("intra_ts_image", "fd", s_img, s_txt, t_img, t_txt) > 0.5
    # sd on the inter edge: the student image's rows over the teacher's texts = the teacher image's rows
    assert _term("inter_ts_image", "sd", t_img, t_txt, t_img, t_txt) == pytest.approx(0.0, abs=1e-6)


def test_definitions_on_a_hand_case():
    t_img, t_txt = _unit(B, D, seed=1), _unit(B, D, seed=2)
    s_img, s_txt = _unit(B, D, seed=3), _unit(B, D, seed=4)
    k = 1 / TEMPERATURE
    # InterSS infonce is the CLIP loss of the student, and InterTS infonce the CLIP loss of (S_I, T_T)
    torch.testing.assert_close(torch.tensor(_term("inter_ss", "infonce", s_img, s_txt, t_img, t_txt)), clip_loss(s_img, s_txt, k))
    torch.testing.assert_close(torch.tensor(_term("inter_ts_image", "infonce", s_img, s_txt, t_img, t_txt)), clip_loss(s_img, t_txt, k))
    # fd: mean squared distance of unit vectors
    assert _term("intra_ts_text", "fd", s_img, s_txt, t_img, t_txt) == pytest.approx(float((2 - 2 * (s_txt * t_txt).sum(-1)).mean()), rel=1e-5)
    # IntraSS sd: KL(softmax(k T T^T) || softmax(k S S^T)) row-wise, self-similarity left out
    eye = torch.eye(B, dtype=torch.bool)
    p = F.softmax((k * t_img @ t_img.T).masked_fill(eye, -torch.inf), dim=-1)
    q = F.softmax((k * s_img @ s_img.T).masked_fill(eye, -torch.inf), dim=-1)
    expected = (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).masked_fill(eye, 0).sum(-1).mean()
    assert _term("intra_ss_image", "sd", s_img, s_txt, t_img, t_txt) == pytest.approx(float(expected), rel=1e-4)


def test_groups_weights_and_the_total():
    t_img, t_txt = _unit(B, D, seed=1), _unit(B, D, seed=2)
    s_img, s_txt = _unit(B, D, seed=3), _unit(B, D, seed=4)
    edges = [EdgeLoss(edge="intra_ts", loss="fd", weight=2.0), EdgeLoss(edge="inter_ss", loss="infonce", weight=0.5),
             EdgeLoss(edge="intra_ss_text", loss="sd", weight=3.0, temperature=0.2)]
    out = distillation_losses(s_img, s_txt, t_img, t_txt, edges, torch.tensor(10.0))
    assert set(out) == {"loss", "intra_ts_image/fd", "intra_ts_text/fd", "inter_ss/infonce", "intra_ss_text/sd"}
    total = 2 * (out["intra_ts_image/fd"] + out["intra_ts_text/fd"]) + 0.5 * out["inter_ss/infonce"] + 3 * out["intra_ss_text/sd"]
    torch.testing.assert_close(out["loss"], total)
    # the default full graph covers every interaction type
    terms = distillation_losses(s_img, s_txt, t_img, t_txt, DistillConfig().edges, torch.tensor(10.0))
    assert {k.split("/")[0].rsplit("_", 1)[0] for k in terms if k != "loss"} >= {"intra_ts", "inter_ts", "intra_ss", "inter"}


def test_gradients_reach_only_the_student_and_projections():
    t_img = _unit(B, 48, seed=1).requires_grad_(True)
    t_txt = _unit(B, 48, seed=2).requires_grad_(True)
    teacher_param = torch.nn.Parameter(torch.ones(()))
    s_img = _unit(B, D, seed=3).requires_grad_(True)
    s_txt = _unit(B, D, seed=4).requires_grad_(True)
    scale = torch.tensor(10.0, requires_grad=True)
    proj = torch.nn.ModuleDict({"image": torch.nn.Linear(D, 48, bias=False), "text": torch.nn.Linear(D, 48, bias=False)})
    groups = {"intra_ts": ("infonce", "fd", "sd"), "inter_ts": ("infonce", "fd", "sd"), "intra_ss": ("fd", "sd"), "inter_ss": ("infonce",)}
    edges = [EdgeLoss(edge=edge, loss=loss) for edge, losses in groups.items() for loss in losses]
    out = distillation_losses(s_img, s_txt, t_img * teacher_param, t_txt * teacher_param, edges, scale, dict(proj.items()))
    assert set(out) == {"loss"} | {f"{e}/{loss}" for e, loss in VALID}  # every valid (edge, loss)
    out["loss"].backward()
    assert t_img.grad is None and t_txt.grad is None and teacher_param.grad is None
    assert s_img.grad.abs().sum() > 0 and s_txt.grad.abs().sum() > 0 and scale.grad is not None and scale.grad != 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    assert all(torch.isfinite(v) for v in out.values())


def test_sd_does_not_train_the_logit_scale():
    t_img, t_txt = _unit(B, D, seed=1), _unit(B, D, seed=2)
    s_img, s_txt = _unit(B, D, seed=3).requires_grad_(True), _unit(B, D, seed=4).requires_grad_(True)
    scale = torch.tensor(10.0, requires_grad=True)
    out = distillation_losses(s_img, s_txt, t_img, t_txt, [EdgeLoss(edge="intra_ss", loss="sd"), EdgeLoss(edge="intra_ts", loss="sd")], scale)
    out["loss"].backward()
    assert scale.grad is None and s_img.grad is not None and s_img.grad.abs().sum() > 0 and s_txt.grad.abs().sum() > 0


def test_widths_differ_without_projection_is_an_error():
    t_img, t_txt = _unit(B, 48, seed=1), _unit(B, 48, seed=2)
    s_img, s_txt = _unit(B, D, seed=3), _unit(B, D, seed=4)
    with pytest.raises(ValueError, match="projection"):
        distillation_losses(s_img, s_txt, t_img, t_txt, [EdgeLoss(edge="intra_ts_image", loss="fd")], 10.0)
    # relation edges and the student's own edge need no projection
    out = distillation_losses(s_img, s_txt, t_img, t_txt, [EdgeLoss(edge="intra_ss", loss="fd"), EdgeLoss(edge="inter_ss", loss="infonce")], 10.0)
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="teacher embeddings are needed"):
        distillation_losses(s_img, s_txt, None, None, [EdgeLoss(edge="intra_ss", loss="fd")], 10.0)
    assert torch.isfinite(distillation_losses(s_img, s_txt, None, None, [EdgeLoss(edge="inter_ss", loss="infonce")], 10.0)["loss"])


def test_unknown_and_invalid_edges_and_losses_are_errors_listing_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown distillation edge 'intra_tx'.*intra_ts_image.*inter_ss"):
        EdgeLoss(edge="intra_tx", loss="fd")
    with pytest.raises(ValueError, match=r"unknown distillation loss 'mse'.*infonce, fd, sd"):
        EdgeLoss(edge="intra_ts", loss="mse")
    for edge, loss in INVALID + [("intra_ss", "infonce")]:
        with pytest.raises(ValueError, match=rf"cannot use loss '{loss}'.*valid losses"):
            EdgeLoss(edge=edge, loss=loss)
    with pytest.raises(ConfigError, match=r"distill.edges.0.weight.*must be a number"):
        parse_params({"distill": {"edges": [{"edge": "inter_ss", "loss": "infonce", "weight": "high"}]}})
    with pytest.raises(ConfigError, match=r"distill.edges.0.weight"):
        parse_params({"distill": {"edges": [{"edge": "inter_ss", "loss": "infonce", "weight": True}]}})
    with pytest.raises(ConfigError, match=r"no temperature"):
        parse_params({"distill": {"edges": [{"edge": "intra_ts", "loss": "fd", "temperature": 0.1}]}})
    with pytest.raises(ConfigError, match=r"listed twice"):
        parse_params({"distill": {"edges": [{"edge": "intra_ts", "loss": "fd"}, {"edge": "intra_ts_text", "loss": "fd"}]}})
    with pytest.raises(ConfigError, match=r"at least one edge"):
        parse_params({"distill": {"edges": []}})
    assert EdgeLoss(edge="inter_ss", loss="infonce", weight=2).weight == 2.0
