"""Strict, atomic loading: a checkpoint that does not fit is an error naming the keys, and the model
is bit-identical after a refused load; a damaged artifact is an error naming the file."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fxcook
from fxcook.checkpoint import CheckpointError, load_quantized, save_quantized
from fxcook.manifest import ManifestError
from fxcook.passes import Quantize, Sparsify
from fxcook.testing import tiny_inputs, tiny_model


def compiled(passes=(), seed=0, layers=2, family="bert"):
    over = {"n_layer": layers} if family == "gpt2" else {"num_hidden_layers": layers}
    return fxcook.compile(tiny_model(family, seed=seed, **over), list(passes), example_inputs=tiny_inputs(family))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.fixture(scope="module")
def two_layer(tmp_path_factory):
    return save_quantized(compiled([Quantize()]), tmp_path_factory.mktemp("ckpt") / "two.safetensors")


def test_fewer_layers_is_an_error_listing_the_missing_keys(two_layer):
    three = compiled([Quantize()], seed=1, layers=3)
    before = snapshot(three)
    with pytest.raises(CheckpointError, match=r"16 missing key\(s\): encoder\.layer\.2\.") as err:
        load_quantized(three, two_layer)
    assert "encoder.layer.2.output.LayerNorm.weight" in str(err.value)
    assert_untouched(three, before)


def test_a_failing_load_changes_no_tensor(two_layer, tmp_path):
    tensors = load_file(str(two_layer))
    tensors["pooler.dense.bias"] = torch.zeros(5)  # sorts after almost every other key
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    model = compiled([Quantize()], seed=2)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"pooler\.dense\.bias is \(5,\), the model has \(32,\)"):
        load_quantized(model, tmp_path / "bad.safetensors")
    assert_untouched(model, before)


def test_a_checkpoint_of_another_recipe_is_refused(two_layer, tmp_path):
    plain = compiled(seed=3)
    before = snapshot(plain)
    with pytest.raises(CheckpointError, match="quantized in the checkpoint but not in the model"):
        load_quantized(plain, two_layer)
    assert_untouched(plain, before)
    sparse = save_quantized(compiled([Sparsify(), Quantize()]), tmp_path / "sparse.safetensors")
    quantized = compiled([Quantize()], seed=4)
    before = snapshot(quantized)
    with pytest.raises(
        CheckpointError, match=r"unexpected key encoder\.layer\.0\.attention\.output\.dense\.weight_mask"
    ):
        load_quantized(quantized, sparse)
    assert_untouched(quantized, before)
    tensors = load_file(str(two_layer))
    tensors["pooler.dense.bias"] = tensors["pooler.dense.bias"].long()
    save_file(tensors, str(tmp_path / "dtype.safetensors"))
    with pytest.raises(CheckpointError, match=r"pooler\.dense\.bias is I64, the model has torch\.float32"):
        load_quantized(quantized, tmp_path / "dtype.safetensors")


def test_tied_weights_are_stored_once_and_load_exactly(tmp_path):
    a, b = compiled([Quantize()], family="gpt2"), compiled([Quantize()], seed=5, family="gpt2")
    path = save_quantized(a, tmp_path / "gpt2.safetensors")
    assert "lm_head.weight" not in load_file(str(path))
    load_quantized(b, path)
    assert b.lm_head.weight is b.transformer.wte.weight
    x = tiny_inputs("gpt2", seed=7)
    with torch.no_grad():
        assert torch.equal(b(**x).logits, a(**x).logits)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return fxcook.save(compiled([Quantize()]), tmp_path_factory.mktemp("art") / "model")


def copy_of(artifact, tmp_path):
    import shutil

    return shutil.copytree(artifact, tmp_path / "copy")


def test_flipped_bytes_in_an_artifact_name_the_file(artifact, tmp_path):
    art = copy_of(artifact, tmp_path)
    data = bytearray((art / "model.safetensors").read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # past the header: the tensors would still parse
    for i in torch.randperm(len(data) - start, generator=torch.Generator().manual_seed(0))[:100].tolist():
        data[start + i] ^= 0xFF
    (art / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"file model\.safetensors is corrupt"):
        fxcook.load(art)


def test_an_artifact_rebuilt_differently_fails_its_fingerprint(artifact, tmp_path):
    """A description edited consistently (its sha256 updated) still cannot pass for the saved model."""
    from fxcook import manifest

    art = copy_of(artifact, tmp_path)
    desc = json.loads((art / "fxcook.json").read_text())
    desc["passes"][0]["config"]["weights"] = "int4/channel"
    (art / "fxcook.json").write_text(json.dumps(desc))
    fingerprint = manifest.read(art)["fingerprint"]
    manifest.write(art, fingerprint=fingerprint)
    with pytest.raises(ManifestError, match="does not match the artifact's fingerprint"):
        fxcook.load(art)
