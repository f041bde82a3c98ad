"""A cooked model is called like the original: every call form gives the original's output."""

import inspect
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

import fxcook
from fxcook.errors import FxcookError
from fxcook.testing import tiny_inputs, tiny_model

FAMILIES = ("bert", "gpt2", "t5", "llama")
SETTINGS = settings(
    max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


def assert_same(out, ref):
    """Same output structure (ModelOutput or tuple) and every tensor equal to float tolerance."""
    assert type(out) is type(ref)
    lo, so = pytree.tree_flatten(out)
    lr, sr = pytree.tree_flatten(ref)
    assert so == sr
    for a, b in zip(lo, lr):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()


def positional(model, inputs):
    """`inputs` as positional arguments of the original forward (None in the gaps)."""
    names = list(inspect.signature(model.forward).parameters)
    last = max(names.index(k) for k in inputs)
    return tuple(inputs.get(n) for n in names[: last + 1])


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model = tiny_model(request.param, use_cache=False)  # cooked models run without a KV cache
    return request.param, model, fxcook.capture(model, tiny_inputs(request.param))


def both(model, cooked, *args, **kwargs):
    with torch.no_grad():
        return cooked(*args, **kwargs), model(*args, **kwargs)


@SETTINGS
@given(batch=st.integers(1, 3), seq=st.integers(2, 10), seed=st.integers(0, 99))
def test_every_call_form_matches_the_original(family, batch, seed, seq):
    fam, model, cooked = family
    x = tiny_inputs(fam, batch=batch, seq=seq, seed=seed, pad=seq // 2)
    assert_same(*both(model, cooked, **x))
    assert_same(*both(model, cooked, *positional(model, x)))
    assert_same(*both(model, cooked, **x, return_dict=False))
    omitted = {k: v for k, v in x.items() if k != "attention_mask"}
    assert_same(*both(model, cooked, **omitted))
    assert_same(*both(model, cooked, **omitted, attention_mask=None))


def test_return_dict_false_is_the_originals_tuple(family):
    fam, model, cooked = family
    out, ref = both(model, cooked, **tiny_inputs(fam), return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(ref)


@pytest.mark.parametrize("with_types", [True, False])
def test_bert_token_type_ids_given_or_omitted_whatever_the_example_had(with_types):
    model = tiny_model("bert")
    x = tiny_inputs("bert", seq=9, pad=3)
    types = torch.randint(0, 2, x["input_ids"].shape, generator=torch.Generator().manual_seed(1))
    cooked = fxcook.capture(model, {**x, "token_type_ids": types} if with_types else x)
    assert "token_type_ids" in cooked.interface.inputs  # captured even when the example lacked it
    y = tiny_inputs("bert", batch=3, seq=5, seed=2)
    y_types = torch.randint(0, 2, y["input_ids"].shape, generator=torch.Generator().manual_seed(3))
    assert_same(*both(model, cooked, **y))
    assert_same(*both(model, cooked, **y, token_type_ids=y_types))
    assert_same(*both(model, cooked, y["input_ids"], None, y_types))


def test_llama_tokenizer_extra_output_through_kwargs_is_dropped_with_a_warning():
    model = tiny_model("llama")
    x = tiny_inputs("llama")
    x["token_type_ids"] = torch.zeros_like(x["input_ids"])
    with pytest.warns(UserWarning, match="token_type_ids"):
        cooked = fxcook.capture(model, x)
    assert_same(*both(model, cooked, **x))
    assert_same(*both(model, cooked, input_ids=x["input_ids"], attention_mask=x["attention_mask"]))


def test_extra_kwargs_input_is_ignored_when_it_has_no_effect():
    model = tiny_model("llama")
    cooked = fxcook.capture(model, tiny_inputs("llama"))
    x = tiny_inputs("llama", seed=4)
    assert_same(*both(model, cooked, **x, token_type_ids=torch.ones_like(x["input_ids"])))


def test_calls_that_cannot_be_served_name_the_input(capsys):
    # GPT-2 embeds token_type_ids with its word embedding: no constant stands for "not given"
    model = tiny_model("gpt2", use_cache=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        cooked = fxcook.capture(model, tiny_inputs("gpt2"))
    x = tiny_inputs("gpt2")
    with pytest.raises(FxcookError, match=r"input token_type_ids=<tensor \(2, 8\)> was not in the example inputs"):
        cooked(**x, token_type_ids=torch.zeros_like(x["input_ids"]))
    with pytest.raises(FxcookError, match="captured with input 'input_ids', and this call omits it"):
        cooked(attention_mask=x["attention_mask"])
    with pytest.raises(FxcookError, match="GPT2LMHeadModel called with arguments its forward"):
        cooked(*[x["input_ids"]] * 20)
    with pytest.raises(FxcookError, match="option output_attentions=True changes what the model computes"):
        cooked(**x, output_attentions=True)
    assert capsys.readouterr().out == ""  # no tree dump from torch


def test_positional_example_is_bound_by_name():
    model = tiny_model("bert")
    x = tiny_inputs("bert")
    cooked = fxcook.capture(model, (x["input_ids"], x["attention_mask"]))
    assert_same(*both(model, cooked, **x))
    assert_same(*both(model, cooked, x["input_ids"], x["attention_mask"]))
