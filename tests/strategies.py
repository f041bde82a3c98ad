"""Hypothesis strategies: random tiny configs of every supported family and random inputs."""

from hypothesis import strategies as st

from fxcook.testing import FAMILIES, tiny_inputs, tiny_model

families = st.sampled_from(FAMILIES)


@st.composite
def model_and_inputs(draw, family=None):
    """(family, model, capture inputs, different-shape inputs with padding)."""
    fam = draw(families) if family is None else family
    layers = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**16))
    over = (
        {"num_layers": layers}
        if fam == "t5"
        else {"n_layer": layers}
        if fam == "gpt2"
        else {"num_hidden_layers": layers}
    )
    model = tiny_model(fam, seed=seed, **over)
    batch, seq = draw(st.integers(2, 3)), draw(st.integers(4, 9))
    x = tiny_inputs(fam, batch=batch, seq=seq, seed=seed)
    b2, s2 = draw(st.integers(1, 4)), draw(st.integers(2, 12))
    x2 = tiny_inputs(fam, batch=b2, seq=s2, seed=seed + 1, pad=draw(st.integers(0, s2 - 1)))
    return fam, model, x, x2


# ONNX Runtime's integer kernels compute what torch's fake quantization computes, up to float reassociation.
# Measured on the tiny models (75 seeds x 3 activation schemes), relative to the output's absmax: <= 3e-7,
# except where reassociation flips one int8 rounding (about 1 case in 20): then <= 3e-5 at the max and
# <= 1e-6 on average. The unquantized model is >= 1.3e-4 (max) and >= 4.8e-5 (mean) away from the int8 one.
# (A deep model can amplify one flip into quantization-sized noise: MiniLM's 6 layers do; see its test.)
ORT_MAX_ERROR, ORT_MEAN_ERROR = 1e-4, 5e-6


def assert_ort_matches_int8(got, ref, unquantized):
    """`got` (ORT) equals `ref` (torch int8) to reassociation error, while `unquantized` (float) does not."""
    import numpy as np

    got, ref, unquantized = (np.asarray(a, dtype=np.float64) for a in (got, ref, unquantized))
    assert got.shape == ref.shape
    scale = max(float(np.abs(ref).max()), 1.0)
    err = np.abs(got - ref) / scale
    assert err.max() < ORT_MAX_ERROR and err.mean() < ORT_MEAN_ERROR, (err.max(), err.mean())
    off = np.abs(got - unquantized).mean() / scale
    assert off > ORT_MEAN_ERROR, (
        f"the float model is as close to ORT ({off:.3g}) as the int8 one: the bound is too loose"
    )
