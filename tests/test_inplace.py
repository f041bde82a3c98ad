"""`inplace`: with it the cooked model shares the original's parameters; without it the original never changes."""

import pytest
import torch

import fxcook
from fxcook.passes.sparsify import Sparsify
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.tracing import main_output

FAMILIES = ("bert", "llama")


def _storages(module: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}


@pytest.mark.parametrize("entry", ["capture", "compile"])
@pytest.mark.parametrize("family", FAMILIES)
def test_inplace_shares_every_parameter_with_the_original(family, entry):
    model, x = tiny_model(family), tiny_inputs(family)
    cooked = (
        fxcook.capture(model, x, inplace=True) if entry == "capture" else fxcook.compile(model, [], x, inplace=True)
    )
    params = dict(model.named_parameters())
    shared = dict(cooked.named_parameters())
    assert shared.keys() == params.keys()
    for name, p in shared.items():
        assert p.data_ptr() == params[name].data_ptr(), name
    with torch.no_grad():  # a write through the cooked model is seen by the original
        next(iter(shared.values())).add_(1.0)
    assert torch.equal(next(iter(shared.values())), next(iter(params.values())))


@pytest.mark.parametrize("family", FAMILIES)
def test_inplace_compile_passes_rewrite_the_original(family):
    model, x = tiny_model(family), tiny_inputs(family)
    cooked = fxcook.compile(model, [Sparsify(method="m4n2_1d")], x, inplace=True)
    path = cooked.sites.find("linear")[0].path
    original = model.get_submodule(path).weight
    assert original.data_ptr() == cooked.get_submodule(path).weight.data_ptr()
    assert int((original == 0).sum()) >= original.numel() // 2  # Sparsify's zeroing reached the original


@pytest.mark.parametrize("family", FAMILIES)
def test_default_copies_and_the_original_stays_bit_identical(family):
    model, x = tiny_model(family), tiny_inputs(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = main_output(model(**x)).detach()
    cooked = fxcook.compile(model, [Sparsify(method="m4n2_1d")], x)
    assert not _storages(cooked) & _storages(model)
    cooked.train()
    opt = torch.optim.SGD(cooked.parameters(), lr=0.1)
    main_output(cooked(**x)).square().mean().backward()
    opt.step()
    with torch.no_grad():
        for p in cooked.parameters():
            p.add_(1.0)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(main_output(model(**x)), ref)
