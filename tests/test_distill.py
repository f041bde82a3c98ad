"""DistillLoss: every term against a hand computation on small tensors; binding and its errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxcook.errors import FxcookError, PreconditionError
from fxcook.training.losses import DistillLoss, _masked_softmax_logits


def _bound(pairs=(), qkv=(), heads=None, **kw):
    loss = DistillLoss(**kw)
    loss.hidden_pairs, loss.qkv_pairs, loss.heads, loss.bound = list(pairs), list(qkv), heads, True
    return loss


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(2, 5), st.integers(2, 7), st.floats(0.5, 4.0), st.integers(0, 10_000))
def test_kl_matches_hand_computation(b, s, v, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    ls, lt = torch.randn(b, s, v, generator=g), torch.randn(b, s, v, generator=g)
    mask = torch.ones(b, s)
    mask[0, s - 1] = 0
    total, terms = _bound(kl=1.0, temperature=temperature)(
        {"attention_mask": mask}, {"logits": ls}, {}, {"logits": lt}, {}
    )
    want, n = 0.0, 0
    for i in range(b):
        for j in range(s):
            if mask[i, j]:
                p = torch.softmax(lt[i, j] / temperature, -1)
                q = torch.softmax(ls[i, j] / temperature, -1)
                want += float((p * (p.log() - q.log())).sum()) * temperature**2
                n += 1
    assert float(total) == pytest.approx(want / n, rel=1e-4, abs=1e-6)
    assert terms["kl"] == pytest.approx(want / n, rel=1e-4, abs=1e-6)


def test_hidden_mse_cos_with_mask_and_denominator():
    hs = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])
    ht = torch.tensor([[[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    loss = _bound([("[post]a", "[post]b")], hidden_mse=2.0, hidden_cos=1.0)
    total, terms = loss({"attention_mask": mask}, None, {"[post]a": hs}, None, {"[post]b": ht})
    mse = ((0 + 1) / 2 + (0 + 1) / 2) / 2
    cos = ((1 - 1 / math.sqrt(2)) + 0) / 2
    assert terms["hidden_mse"] == pytest.approx(mse)
    assert terms["hidden_cos"] == pytest.approx(cos, rel=1e-6)
    assert float(total) == pytest.approx(2 * mse + cos, rel=1e-6)
    # a caller-given denominator (the trainer's global token count) replaces the local count
    _, terms = loss(
        {"attention_mask": mask}, None, {"[post]a": hs}, None, {"[post]b": ht}, denom={"tok": 4.0, "lm": 1, "ex": 1}
    )
    assert terms["hidden_mse"] == pytest.approx(mse * 2 / 4)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(2, 5), st.integers(0, 10_000))
def test_pooled_is_the_cosine_of_masked_means(b, s, d, seed):
    g = torch.Generator().manual_seed(seed)
    hs, ht = torch.randn(b, s, d, generator=g), torch.randn(b, s, d, generator=g)
    mask = (torch.rand(b, s, generator=g) < 0.7).long()
    mask[:, 0] = 1
    hs_noisy_pad = hs + (1 - mask)[..., None] * 100.0  # what sits at padded positions must not count
    total, terms = _bound(pooled=2.0)(
        {"attention_mask": mask}, {"last_hidden_state": hs_noisy_pad}, {}, {"last_hidden_state": ht}, {}
    )
    want = 0.0
    for i in range(b):
        keep = mask[i].bool()
        want += 1 - float(F.cosine_similarity(hs[i, keep].mean(0), ht[i, keep].mean(0), dim=0))
    assert terms["pooled"] == pytest.approx(want / b, rel=1e-4, abs=1e-6)
    assert float(total) == pytest.approx(2 * want / b, rel=1e-4, abs=1e-6)


def test_attention_and_relation_match_manual_maps():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 4, generator=g) for _ in range(3))
    qt, kt, vt = (torch.randn(1, 3, 4, generator=g) for _ in range(3))
    mask = torch.tensor([[1, 1, 0]])
    names_s, names_t = ("[post]s.q", "[post]s.k", "[post]s.v"), ("[post]t.q", "[post]t.k", "[post]t.v")
    loss = _bound(qkv=[(names_s, names_t)], heads=2, attention=1.0, relation=1.0)
    s_taps, t_taps = dict(zip(names_s, (q, k, v))), dict(zip(names_t, (qt, kt, vt)))
    _, terms = loss({"attention_mask": mask}, None, s_taps, None, t_taps)

    def manual(a_s, b_s, a_t, b_t):
        tot = 0.0
        for i in range(2):  # query tokens that are not padding
            per_head = []
            for h in range(2):
                sl = slice(2 * h, 2 * h + 2)
                ps = torch.softmax(a_s[0, i, sl] @ b_s[0, :2, sl].T / math.sqrt(2), -1)
                pt = torch.softmax(a_t[0, i, sl] @ b_t[0, :2, sl].T / math.sqrt(2), -1)
                per_head.append(float((pt * (pt.log() - ps.log())).sum()))
            tot += sum(per_head) / 2
        return tot / 2

    assert terms["attention"] == pytest.approx(manual(q, k, qt, kt), rel=1e-4)
    assert terms["relation"] == pytest.approx(manual(v, v, vt, vt), rel=1e-4)


def _gqa_reference(q, k, heads, mask, causal):
    """Attention probabilities by loops: query head h reads key head h // (heads / kv_heads), as HF's GQA."""
    bsz, seq, width = q.shape
    d = width // heads
    group = heads // (k.shape[-1] // d)
    out = torch.zeros(bsz, heads, seq, seq)
    for b in range(bsz):
        for h in range(heads):
            kh = h // group
            for i in range(seq):
                seen = [j for j in range(seq) if mask[b, j] and (not causal or j <= i)]
                logits = torch.stack([q[b, i, h * d : (h + 1) * d] @ k[b, j, kh * d : (kh + 1) * d] for j in seen])
                out[b, h, i, seen] = torch.softmax(logits / math.sqrt(d), -1)
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_gqa_keys_are_shared_by_consecutive_query_heads(causal):
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 5, 12, generator=g), torch.randn(2, 5, 6, generator=g)  # 6 query heads, 3 kv heads
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    got = _masked_softmax_logits(q, k, 6, mask, causal).exp()
    want = _gqa_reference(q, k, 6, mask, causal)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the attention loss of a GQA student against an MHA teacher uses the same maps
    qt, kt = torch.randn(2, 5, 12, generator=g), torch.randn(2, 5, 12, generator=g)
    names_s, names_t = ("[post]s.q", "[post]s.k", "[post]s.v"), ("[post]t.q", "[post]t.k", "[post]t.v")
    loss = _bound(qkv=[(names_s, names_t)], heads=6, attention=1.0, causal=causal)
    _, terms = loss(
        {"attention_mask": mask}, None, dict(zip(names_s, (q, k, k))), None, dict(zip(names_t, (qt, kt, kt)))
    )
    ps, pt = want, _gqa_reference(qt, kt, 6, mask, causal)
    kl = (pt * (pt.clamp_min(1e-30).log() - ps.clamp_min(1e-30).log())).sum(-1).mean(1)  # [B, S], per query
    assert terms["attention"] == pytest.approx(float((kl * mask).sum() / mask.sum()), rel=1e-4)


def test_lm_loss_is_cross_entropy_on_shifted_tokens():
    g = torch.Generator().manual_seed(1)
    logits, ids = torch.randn(2, 5, 11, generator=g), torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    total, _ = _bound(lm=1.0)({"input_ids": ids, "attention_mask": mask}, {"logits": logits}, {})
    keep = mask[:, 1:].bool()
    want = F.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep])
    assert float(total) == pytest.approx(float(want), rel=1e-5)


def test_bind_maps_layers_and_trains_projection():
    from fxcook.pipeline import compile
    from fxcook.testing import tiny_inputs, tiny_model

    x = tiny_inputs("bert")
    student = compile(tiny_model("bert", num_hidden_layers=2), [], x)
    teacher = tiny_model("bert", seed=1, num_hidden_layers=4, hidden_size=48, intermediate_size=96)
    loss = DistillLoss(hidden_mse=1.0, attention=1.0).bind(student, teacher, x)
    assert loss.hidden_pairs == [
        ("[post]encoder.layer.0", "[post]encoder.layer.1"),
        ("[post]encoder.layer.1", "[post]encoder.layer.3"),
    ]
    assert len(loss.proj) == 2 and loss.heads == 4
    from fxcook.taps import run_with_taps

    s_out, s_taps = run_with_taps(student, **x, specs=loss.student_taps())
    t_out, t_taps = run_with_taps(teacher, **x, specs=loss.teacher_taps())
    total, _ = loss(x, s_out, s_taps, t_out, t_taps)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.proj.parameters())
    last = DistillLoss(hidden_cos=1.0, layer_map="last_k", last_k=1).bind(
        compile(tiny_model("bert"), [], x), tiny_model("bert", seed=2, num_hidden_layers=3), x
    )
    assert last.hidden_pairs == [("[post]encoder.layer.1", "[post]encoder.layer.2")]


def test_bad_inputs_give_clear_errors():
    from fxcook.pipeline import compile
    from fxcook.testing import tiny_inputs, tiny_model

    x = tiny_inputs("bert")
    with pytest.raises(FxcookError, match="every term weight is 0"):
        DistillLoss()
    with pytest.raises(FxcookError, match="bogus"):
        DistillLoss(kl=1.0, bogus=1)
    wide = tiny_model("bert", seed=1, hidden_size=48, intermediate_size=96)
    with pytest.raises(PreconditionError, match=r"width 32 .* has 48.*projection"):
        DistillLoss(hidden_mse=1.0, projection=False).bind(compile(tiny_model("bert"), [], x), wide, x)
    with pytest.raises(FxcookError, match="need a teacher"):
        DistillLoss(kl=1.0).bind(compile(tiny_model("bert"), [], x), None, x)
    with pytest.raises(PreconditionError, match=r"pooled: needs equal \[batch, seq, dim\]"):
        _bound(pooled=1.0)(x, {"logits": torch.zeros(2, 8)}, {}, {"logits": torch.zeros(2, 8)}, {})
    with pytest.raises(PreconditionError, match="no logits"):
        _bound(kl=1.0)(
            x, {"last_hidden_state": torch.zeros(2, 8, 4)}, {}, {"last_hidden_state": torch.zeros(2, 8, 4)}, {}
        )
