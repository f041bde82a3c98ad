"""Slice is exact: the sliced model computes what the gated model computes, over random tiny configs of
BERT, GPT-2, T5 and Llama (grouped-query attention included), random gate values (zeros, whole removed
sublayers, fractional values folded into the weights); and its parameters and graph really shrink."""

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcook
from fxcook.passes.prune import Gate, Prune, Slice
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.tracing import main_output

ALL = ("heads", "ffn", "mha", "ffn_layer")


@st.composite
def configs(draw):
    """(family, config overrides): head counts, head dims, widths and layer counts at random."""
    fam = draw(st.sampled_from(["bert", "gpt2", "t5", "llama"]))
    heads, dim = draw(st.sampled_from([2, 4, 6])), draw(st.sampled_from([4, 8]))
    layers, inter = draw(st.integers(1, 2)), draw(st.sampled_from([16, 48]))
    if fam == "bert":
        over = dict(
            num_attention_heads=heads, hidden_size=heads * dim, intermediate_size=inter, num_hidden_layers=layers
        )
    elif fam == "gpt2":
        over = dict(n_head=heads, n_embd=heads * dim, n_inner=inter, n_layer=layers)
    elif fam == "t5":
        over = dict(
            num_heads=heads, d_kv=dim, d_model=heads * dim, d_ff=inter, num_layers=layers, num_decoder_layers=layers
        )
    else:
        kv = draw(st.sampled_from([k for k in (2, 3, heads) if heads % k == 0]))
        over = dict(num_attention_heads=heads, num_key_value_heads=kv, hidden_size=heads * dim, head_dim=dim)
        over.update(intermediate_size=inter, num_hidden_layers=layers)
    return fam, over


def gated(fam, over, seed):
    model = tiny_model(fam, seed=seed, **over)
    with torch.no_grad():  # HF inits biases to zero, which would hide a bias the gates must scale
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    x = tiny_inputs(fam, seed=seed)
    return fxcook.compile(model, [Prune(target=0.3, granularity=ALL, calibration=[x])], example_inputs=x)


def randomise_gates(cooked, draw):
    """Gate values at random: zeros (a removed layer now and then) and fractions in (0, 2]."""
    for _, gate in sorted(cooked.named_modules()):
        if isinstance(gate, Gate):
            values = torch.tensor(draw(st.lists(st.floats(0.05, 2.0), min_size=gate.count, max_size=gate.count)))
            off = torch.tensor(draw(st.lists(st.booleans(), min_size=gate.count, max_size=gate.count)))
            gate.mask = torch.where(off, torch.zeros_like(values), values)


@settings(max_examples=8, deadline=None)
@given(configs(), st.integers(0, 2**16), st.data())
def test_sliced_model_computes_what_the_gated_model_computes(config, seed, data):
    fam, over = config
    cooked = gated(fam, over, seed)
    randomise_gates(cooked, data.draw)
    x = tiny_inputs(fam, batch=data.draw(st.integers(1, 3)), seq=data.draw(st.integers(2, 9)), seed=seed + 1, pad=1)
    sliced = fxcook.apply(copy.deepcopy(cooked), [Slice()])
    with torch.no_grad():
        want, got = main_output(cooked(**x)), main_output(sliced(**x))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in sliced.parameters()) <= sum(p.numel() for p in cooked.parameters())
    assert not any(isinstance(m, Gate) for m in sliced.modules())
