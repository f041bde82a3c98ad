"""int8 embedding tables: per-row weight-only quantization, tied heads, ONNX Gather on int8."""

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcook
from fxcook.nn import CookedEmbedding, CookedLinear
from fxcook.passes import Quantize
from fxcook.passes.quantize.embeddings import cook_embeddings
from fxcook.runtime import onnx as fxonnx
from fxcook.testing import tiny_inputs, tiny_model


def embeddings(cooked):
    return {p: m for p, m in cooked.named_modules() if isinstance(m, CookedEmbedding)}


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 1000), family=st.sampled_from(["bert", "gpt2", "llama"]))
def test_cooking_embeddings_is_exact(seed, family):
    model, x = tiny_model(family, seed=seed), tiny_inputs(family, seed=seed, pad=2)
    cooked = fxcook.compile(model, [], example_inputs=x)
    ref = cooked(**x)[0]
    found = cook_embeddings(cooked)
    assert found and all(isinstance(m, CookedEmbedding) for m in found.values())
    torch.testing.assert_close(cooked(**x)[0], ref, rtol=0, atol=0)


def test_embeddings_are_off_by_default_and_per_row_int8_when_asked():
    model, x = tiny_model("bert", seed=1), tiny_inputs("bert", seed=1)
    assert not embeddings(fxcook.compile(model, [Quantize()], example_inputs=x))
    cooked = fxcook.compile(model, [Quantize(embeddings=True)], example_inputs=x)
    found = embeddings(cooked)
    assert {p.rsplit(".", 1)[-1] for p in found} == {"word_embeddings", "position_embeddings", "token_type_embeddings"}
    for emb in found.values():
        codes, scale = emb.weight_quant.quantize(emb.weight)
        assert codes.dtype == torch.int8 and codes.abs().max() <= 127 and scale.shape == (emb.weight.shape[0],)
        err = (emb.weight_quant(emb.weight) - emb.weight).abs()
        assert (err <= scale[:, None] / 2 + 1e-7).all()  # per element: half a step of its row


def test_tied_output_head_stays_tied_and_trains():
    model, x = tiny_model("gpt2", seed=2), tiny_inputs("gpt2", seed=2)
    cooked = fxcook.compile(model, [Quantize(embeddings=True, scope="all")], example_inputs=x)
    wte = cooked.get_submodule("transformer.wte")
    head = cooked.get_submodule("lm_head")
    assert isinstance(wte, CookedEmbedding) and isinstance(head, CookedLinear)
    assert wte.weight is head.weight
    cooked.train()
    cooked(**x).logits.square().mean().backward()
    assert wte.weight.grad is not None and torch.isfinite(wte.weight.grad).all() and wte.weight.grad.abs().sum() > 0


def test_onnx_gathers_int8_rows_and_matches_torch(tmp_path):
    model, x = tiny_model("bert", seed=3), tiny_inputs("bert", seed=3)
    cooked = fxcook.compile(model, [Quantize(embeddings=True)], example_inputs=x)
    path = fxonnx.export(cooked, tmp_path / "e.onnx", example_inputs=x)
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    gathers = [n for n in m.graph.node if n.op_type == "Gather" and n.input[0] in inits]
    int8_tables = [n for n in gathers if inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert len(int8_tables) == 3, [(n.input[0], inits[n.input[0]].data_type) for n in gathers]
    assert not any(
        inits[n.input[0]].data_type == onnx.TensorProto.FLOAT and list(inits[n.input[0]].dims) == [128, 32]
        for n in gathers
    )  # no fp32 vocabulary table left
    x2 = tiny_inputs("bert", batch=3, seq=5, seed=9, pad=2)
    with torch.no_grad():
        ref = cooked(**x2).last_hidden_state.numpy()
    got = fxonnx.OrtModel(path, threads=1)(**x2).numpy()
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()  # reassociation only (measured 3e-7); float: 5e-3


def test_embeddings_need_quantized_weights():
    with pytest.raises(Exception, match="embeddings"):
        Quantize(embeddings=True, weights="int4/group32", acts=None)


def test_checkpoint_stores_int8_tables_and_round_trips(tmp_path):
    from safetensors import safe_open

    from fxcook.checkpoint import load_quantized, save_quantized

    model, x = tiny_model("bert", seed=4), tiny_inputs("bert", seed=4)
    cooked = fxcook.compile(model, [Quantize(embeddings=True)], example_inputs=x)
    path = save_quantized(cooked, tmp_path / "q.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("embeddings.word_embeddings.qweight").dtype == torch.int8
        assert "embeddings.word_embeddings.weight" not in f.keys()
    fresh = fxcook.compile(tiny_model("bert", seed=5), [Quantize(embeddings=True)], example_inputs=x)
    load_quantized(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x).last_hidden_state, cooked(**x).last_hidden_state)
