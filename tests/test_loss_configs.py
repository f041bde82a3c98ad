"""The paper's training baselines as DistillLoss configs: origin layer map, embedding term, normalisation, lambda."""

from __future__ import annotations

import copy

import pytest
import torch

import fxcook
from fxcook.errors import FxcookError
from fxcook.passes import DropLayers
from fxcook.taps import run_with_taps
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.training.baselines import BASELINES, baseline, baseline_config
from fxcook.training.losses import DistillLoss


@pytest.fixture(scope="module")
def pair():
    """A 4-layer BERT teacher and its student with blocks 1 and 2 dropped, embeddings perturbed."""
    teacher = tiny_model("bert", num_hidden_layers=4, seed=2)
    x = tiny_inputs("bert", pad=2)
    student = fxcook.apply(fxcook.capture(copy.deepcopy(teacher), x), [DropLayers(placement=[1, 2])])
    with torch.no_grad():
        student.get_submodule("embeddings.word_embeddings").weight.add_(0.05)
    hand = copy.deepcopy(teacher)  # the same student as an HF model: its hidden_states are block outputs
    del hand.encoder.layer[2], hand.encoder.layer[1]
    hand.config.num_hidden_layers = 2
    hand.load_state_dict({k.replace("layer.3.", "layer.1."): v for k, v in student.state_dict().items()})
    return teacher, student, hand, x


def _bound(loss: DistillLoss) -> DistillLoss:
    loss.bound = True  # logit terms need no taps
    return loss


def _per_token_mse(a, b, mask):
    return ((a - b).pow(2).mean(-1) * mask).sum() / mask.sum()


def test_origin_pairs_each_block_with_the_layer_it_came_from(pair):
    teacher, student, hand, x = pair
    loss = DistillLoss(hidden_mse=1.0, embedding=1.0, layer_map="origin").bind(student, teacher, x)
    assert loss.hidden_pairs == [("[post]encoder.layer.0", "[post]encoder.layer.0"), ("[post]encoder.layer.3",) * 2]
    assert loss.embedding_pair == ("[pre]encoder.layer.0", "[pre]encoder.layer.0")
    with torch.no_grad():
        s_out, s_taps = run_with_taps(student, **x, specs=loss.student_taps())
        t_out, t_taps = run_with_taps(teacher, **x, specs=loss.teacher_taps())
        _, terms = loss(x, s_out, s_taps, t_out, t_taps)
        hs = hand(**x, output_hidden_states=True).hidden_states
        ht = teacher(**x, output_hidden_states=True).hidden_states
    mask = x["attention_mask"].float()
    want_hidden = (_per_token_mse(hs[1], ht[1], mask) + _per_token_mse(hs[2], ht[4], mask)) / 2
    assert terms["hidden_mse"] == pytest.approx(float(want_hidden), rel=1e-5)
    assert terms["embedding"] == pytest.approx(float(_per_token_mse(hs[0], ht[0], mask)), rel=1e-5)
    assert terms["embedding"] > 0


def test_normalize_scales_terms_to_lm_and_keeps_their_gradients():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    t_logits = torch.randn(2, 5, 11)
    batch = {"input_ids": torch.randint(0, 11, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    lam = 0.3
    plain = _bound(DistillLoss(kl=1.0, lm=1.0))
    norm = _bound(baseline("kd", lam=lam))
    (_, terms) = plain(batch, {"logits": logits}, {}, {"logits": t_logits}, {})
    total, same = norm(batch, {"logits": logits}, {}, {"logits": t_logits}, {})
    assert same == terms  # the reported terms are the raw values
    assert float(total) == pytest.approx((1 + lam) * terms["lm"], rel=1e-6)
    (g_norm,) = torch.autograd.grad(total, logits)
    kl_only, lm_only = (
        _bound(DistillLoss(kl=1.0)),
        _bound(DistillLoss(lm=1.0)),
    )
    (g_kl,) = torch.autograd.grad(kl_only(batch, {"logits": logits}, {}, {"logits": t_logits}, {})[0], logits)
    (g_lm,) = torch.autograd.grad(lm_only(batch, {"logits": logits}, {})[0], logits)
    torch.testing.assert_close(g_norm, g_lm + lam * terms["lm"] / terms["kl"] * g_kl, rtol=1e-5, atol=1e-7)


def test_minilm_baseline_transfers_relations_of_the_last_block_only(pair):
    teacher, student, _, x = pair
    loss = baseline("minilm", lam=0.5).bind(student, teacher, x)
    assert [s for s, _ in loss.qkv_pairs] == [
        tuple(f"[post]encoder.layer.3.attention.self.{n}" for n in ("query", "key", "value"))
    ]
    assert [t for _, t in loss.qkv_pairs] == [
        tuple(f"[post]encoder.layer.3.attention.self.{n}" for n in ("query", "key", "value"))
    ]
    assert not loss.hidden_pairs and loss.config.kl == 0.5 and loss.config.normalize


def test_baseline_configs():
    assert baseline_config("continued") == {"lm": 1.0} and not baseline("continued").needs_teacher
    assert baseline_config("homotopic", lam=0.1, causal=True) == {**BASELINES["homotopic"], "kl": 0.1, "causal": True}
    with pytest.raises(FxcookError, match="unknown training baseline 'kdd'; baselines are continued, kd, minilm"):
        baseline("kdd")
    with pytest.raises(FxcookError, match="normalize=True scales every term to the LM term's size; set lm > 0"):
        DistillLoss(kl=1.0, normalize=True)


def test_origin_needs_the_teacher_the_student_came_from(pair):
    _, student, _, x = pair
    other = tiny_model("bert", num_hidden_layers=2)
    with pytest.raises(FxcookError, match="layer_map='origin': the teacher has no module encoder.layer.3"):
        DistillLoss(hidden_mse=1.0, layer_map="origin").bind(student, other, x)
