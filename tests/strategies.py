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
    over = {"num_layers": layers} if fam == "t5" else {"n_layer": layers} if fam == "gpt2" else {"num_hidden_layers": layers}
    model = tiny_model(fam, seed=seed, **over)
    batch, seq = draw(st.integers(2, 3)), draw(st.integers(4, 9))
    x = tiny_inputs(fam, batch=batch, seq=seq, seed=seed)
    b2, s2 = draw(st.integers(1, 4)), draw(st.integers(2, 12))
    x2 = tiny_inputs(fam, batch=b2, seq=s2, seed=seed + 1, pad=draw(st.integers(0, s2 - 1)))
    return fam, model, x, x2


def main_output(out):
    """The tensor a family's forward is judged by (logits or last hidden state)."""
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    return out[0] if isinstance(out, (tuple, list)) else out
