"""fxcook.save / fxcook.load: a loaded artifact computes what the saved model computed, for every pass,
rebuilt without calibration data; saving replaces a directory atomically or not at all."""

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcook
from fxcook.artifact import ArtifactError
from fxcook.passes import Moefy, Quantize, Relufy, Sparsify, Tap
from fxcook.passes.sparsify import update_masks
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.tracing import main_output


def calib(family):
    return [tiny_inputs(family, seed=s) for s in range(3)]


def _scheduled(family):
    """Unstructured magnitude on a schedule, advanced past two recomputes on changed weights."""
    return [
        Sparsify(pattern="unstructured", method="magnitude", sparsity=0.6, schedule={"start": 0, "end": 8, "every": 2}),
        Tap(taps=["[post]*.*.0"]),
    ]


# (family, passes): every pass and option whose state a rebuild must take from the file
CASES = {
    "lsq-static-embeddings": (
        "bert",
        lambda f: [Quantize(acts="int8/tensor", learnable_scales=True, embeddings=True, calibration=calib(f))],
    ),
    "percentile-sensitive": (
        "gpt2",
        lambda f: [Quantize(acts="int8/tensor", observer="percentile", sensitive_inputs=2, calibration=calib(f))],
    ),
    "2d-dynamic-smoothquant": (
        "llama",
        lambda f: [
            Sparsify(method="m4n2_2d"),
            Quantize(acts="int8/tensor/dynamic", smoothquant=0.5, calibration=calib(f)),
        ],
    ),
    "wanda-sequential-int4": (
        "bert",
        lambda f: [
            Sparsify(method="wanda", pattern="unstructured", sparsity=0.6, sequential=True, calibration=calib(f)),
            Quantize(weights="int4/group16", acts=None),
        ],
    ),
    "schedule-tap": ("gpt2", _scheduled),
    "24-int8-moefy-mlp": (
        "llama",
        lambda f: [Relufy(), Sparsify(), Quantize(), Moefy(experts=4, top_k=2, calibration=calib(f))],
    ),
    # group-wise scales run along the FFN width, so they see the experts' neuron order (`perm`)
    "int4-moefy-coactivation-oracle": (
        "bert",
        lambda f: [
            Relufy(),
            Quantize(weights="int4/group16", acts=None),
            Moefy(experts=4, top_k=1, method="coactivation", router="oracle", calibration=calib(f)),
            Tap(taps=["[post]encoder.layer.*"]),
        ],
    ),
    "experts-static": ("mixtral", lambda f: [Quantize(acts="int8/tensor", calibration=calib(f))]),
}
_BUILT = {}


def saved_and_loaded(case, tmp_path_factory):
    """(family, the compiled model, the model loaded from its artifact); built once per case."""
    if case not in _BUILT:
        family, passes = CASES[case]
        model = fxcook.compile(tiny_model(family, seed=3), passes(family), example_inputs=tiny_inputs(family))
        if case == "schedule-tap":
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
            assert update_masks(model, 4)
        out = fxcook.save(model, tmp_path_factory.mktemp(case) / "artifact")
        _BUILT[case] = family, model, fxcook.load(out)
    return _BUILT[case]


@pytest.mark.parametrize("case", sorted(CASES))
@settings(max_examples=3, deadline=None)
@given(batch=st.integers(1, 3), seq=st.integers(2, 10), pad=st.integers(0, 1), seed=st.integers(0, 2**16))
def test_load_of_save_computes_the_same(case, tmp_path_factory, batch, seq, pad, seed):
    family, model, loaded = saved_and_loaded(case, tmp_path_factory)
    x = tiny_inputs(family, batch=batch, seq=seq, seed=seed, pad=pad * (seq - 1))
    with torch.no_grad():
        want, got = main_output(model(**x)), main_output(loaded(**x))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert [r.spec for r in loaded.history] == [r.spec for r in model.history]


def test_restore_takes_data_derived_state_from_the_file(tmp_path_factory):
    """Masks, static scales, divisors, expert layouts and routers are the saved ones, not placeholders."""
    for case in (
        "lsq-static-embeddings",
        "2d-dynamic-smoothquant",
        "24-int8-moefy-mlp",
        "schedule-tap",
        "int4-moefy-coactivation-oracle",
    ):
        _, model, loaded = saved_and_loaded(case, tmp_path_factory)
        saved = model.state_dict()
        data = [
            k
            for k in saved
            if k.rpartition(".")[2] in ("weight_mask", "scale", "smooth", "labels", "perm") or ".router." in k
        ]
        assert data, case
        for key in data:
            assert torch.equal(loaded.state_dict()[key], saved[key]), (case, key)


def test_minilm_round_trip(minilm, minilm_cooked, tmp_path):
    _, tok = minilm
    x = dict(tok(["a short sentence", "another one, a little longer"], padding=True, return_tensors="pt"))
    cooked = fxcook.apply(copy.deepcopy(minilm_cooked), [Sparsify(), Quantize(acts="int8/tensor", calibration=[x])])
    loaded = fxcook.load(fxcook.save(cooked, tmp_path / "minilm"))
    y = dict(tok(["a different batch of words"], return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**y).last_hidden_state, cooked(**y).last_hidden_state, rtol=0, atol=1e-6)
    files = {p.name for p in (tmp_path / "minilm").iterdir()}
    assert {
        "model.safetensors",
        "inputs.safetensors",
        "config.json",
        "fxcook.json",
        "report.txt",
        "manifest.json",
    } <= files
    desc = json.loads((tmp_path / "minilm" / "fxcook.json").read_text())
    assert [e["pass"] for e in desc["passes"]] == ["sparsify", "quantize"]
    assert desc["passes"][1]["config"]["acts"] == "int8/tensor" and "calibration" not in desc["passes"][1]["config"]


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_a_model_outside_transformers_loads_with_model_given(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    cooked = fxcook.compile(Toy(), [Quantize(select={"scope": "all"})], example_inputs=(x,))
    out = fxcook.save(cooked, tmp_path / "toy")
    with pytest.raises(ArtifactError, match=r"not a transformers model: pass its base architecture.*model="):
        fxcook.load(out)
    fresh = Toy()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    loaded = fxcook.load(out, model=fresh)
    assert torch.equal(loaded(x), cooked(x))
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())  # the model given is not mutated
    with pytest.raises(ArtifactError, match="the model given is"):
        fxcook.load(out, model=torch.nn.Sequential(torch.nn.Linear(8, 8)))


def test_save_replaces_an_artifact_whole_and_refuses_other_directories(tmp_path, monkeypatch):
    x = tiny_inputs("bert")
    cooked = fxcook.compile(tiny_model("bert"), [Quantize()], example_inputs=x)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("passes:\n  - quantize: {}\n")
    out = fxcook.save(cooked, tmp_path / "out", recipe=recipe)
    assert (out / "recipe.yaml").is_file()
    fxcook.save(cooked, out)  # replaced whole: the recipe of the earlier artifact is gone
    assert not (out / "recipe.yaml").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(type(cooked), "report", lambda self, per_layer=False: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fxcook.save(cooked, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # a failed save leaves the old artifact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]  # and nothing aside
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ArtifactError, match="not a fxcook artifact"):
        fxcook.save(cooked, model_dir)
    assert (model_dir / "model.safetensors").read_bytes() == b"weights"


def test_a_loaded_model_saves_again_and_compress_output_loads(tmp_path):
    x = tiny_inputs("gpt2")
    cooked = fxcook.compile(tiny_model("gpt2"), [Sparsify(), Quantize()], example_inputs=x)
    once = fxcook.load(fxcook.save(cooked, tmp_path / "a"))
    extra = {"notes.txt": lambda path: path.write_text("written inside the artifact")}
    twice = fxcook.load(fxcook.save(once, tmp_path / "b", extras=extra))  # the manifest lists the extra file
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["files"].keys() >= {"notes.txt"}
    with torch.no_grad():
        torch.testing.assert_close(twice(**x).logits, cooked(**x).logits, rtol=0, atol=1e-6)


def test_what_load_could_not_rebuild_is_not_saved(tmp_path):
    from fxcook.errors import RecipeError
    from fxcook.passbase import Pass, PassResult

    class Halve(Pass):
        name = "halve"

        def call(self, cooked):
            cooked.up.weight.data.mul_(0.5)
            return PassResult()

    class Registered(Halve):
        def call(self, cooked):
            return self.finish(cooked, [])

    x = torch.randn(2, 8)
    with pytest.raises(ArtifactError, match="pass 'halve' has no recipe entry"):
        fxcook.save(fxcook.compile(Toy(), [Halve()], example_inputs=(x,)), tmp_path / "a")
    with pytest.raises(RecipeError, match="unknown pass 'halve'"):
        fxcook.save(fxcook.compile(Toy(), [Registered()], example_inputs=(x,)), tmp_path / "b")
    assert not any(tmp_path.iterdir())
