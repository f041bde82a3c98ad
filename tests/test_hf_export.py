"""HF export of layer-dropped models: a plain transformers directory that loads back and computes the same."""

from __future__ import annotations

import copy

import pytest
import torch

import fxcook
from fxcook.cli import main
from fxcook.errors import FxcookError
from fxcook.passes import DropLayers, Quantize
from fxcook.runtime.hf import save_pretrained
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.tracing import main_output

DEPTH = {"bert": "num_hidden_layers", "gpt2": "n_layer", "llama": "num_hidden_layers"}


def _dropped(family: str, n: int = 4, **kwargs):
    model, x = tiny_model(family, seed=5, **{DEPTH[family]: n}), tiny_inputs(family)
    return model, fxcook.apply(fxcook.capture(model, x), [DropLayers(**(kwargs or {"count": 2}))])


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_save_pretrained_loads_back_with_from_pretrained(tmp_path, family):
    model, cooked = _dropped(family)
    out = save_pretrained(cooked, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"] or (
        sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    )
    back = type(model).from_pretrained(out).eval()
    assert getattr(back.config, DEPTH[family]) == 2
    x = tiny_inputs(family, batch=3, seq=7, seed=11, pad=2)
    with torch.no_grad():
        want = main_output(cooked(**x))
        got = main_output(back(**x, **({} if family == "bert" else {"use_cache": False})))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the kept blocks 0 and 3 are HF blocks 0 and 1
    stack = {"bert": "encoder.layer", "gpt2": "transformer.h", "llama": "model.layers"}[family]
    block3 = {k.removeprefix(f"{stack}.3."): v for k, v in cooked.state_dict().items() if k.startswith(f"{stack}.3.")}
    block1 = {k.removeprefix(f"{stack}.1."): v for k, v in back.state_dict().items() if k.startswith(f"{stack}.1.")}
    assert block3.keys() == block1.keys()
    if family == "llama":
        assert [layer.self_attn.layer_idx for layer in back.model.layers] == [0, 1]  # renumbered by HF itself


def test_unexpressible_state_is_refused_and_nothing_is_left(tmp_path):
    model, x = tiny_model("bert", num_hidden_layers=3), tiny_inputs("bert")
    cooked = fxcook.apply(fxcook.capture(model, x), [DropLayers(count=1), Quantize()])
    with pytest.raises(FxcookError, match="ship the fxcook artifact"):
        save_pretrained(cooked, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_output_mismatch_is_refused_and_the_partial_directory_deleted(tmp_path):
    _, cooked = _dropped("llama")
    cooked.hf_edits.append({"config": {"rms_norm_eps": 0.5}, "rename": {}})  # an edit that changes the maths
    with pytest.raises(FxcookError, match=r"does not reproduce the cooked model's output .* it was deleted"):
        save_pretrained(cooked, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_is_refused(tmp_path):
    _, cooked = _dropped("bert")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(FxcookError, match="exists and is not an empty directory"):
        save_pretrained(cooked, tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"


def test_cli_export_to_hf(tmp_path):
    model, cooked = _dropped("gpt2")
    art = fxcook.save(copy.deepcopy(cooked), tmp_path / "art")
    assert main(["export", str(art), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    back = type(model).from_pretrained(tmp_path / "hf").eval()
    x = tiny_inputs("gpt2", seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back(**x, use_cache=False).logits, cooked(**x).logits, rtol=1e-5, atol=1e-6)
