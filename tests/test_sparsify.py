"""Sparsify on captured models: 2:4 exactness, identity, gradients, optimizer steps, save/load, schedules."""

import io

import pytest
import torch
from captured import captured as cooked
from captured import masked_linears as masked
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

import fxcook
from fxcook.errors import PassError
from fxcook.nn import CookedLinear
from fxcook.passes.sparsify import Sparsify, activation_norms, update_masks
from fxcook.passes.sparsify.masks import is_24
from fxcook.testing import tiny_inputs, tiny_model
from fxcook.tracing import main_output

FAMILIES = ("bert", "gpt2", "llama")


def out(model, family, seed=1):
    return main_output(model(**tiny_inputs(family, seed=seed)))


@settings(max_examples=12, deadline=None)
@given(
    st.sampled_from(FAMILIES),
    st.sampled_from(["m4n2_1d", "m4n2_2d", "magnitude", "wanda"]),
    st.floats(0.0, 0.6),
    st.integers(0, 2**31 - 1),
)
def test_exactly_two_of_four_kept_unless_already_zero(family, method, zero_frac, seed):
    model = cooked(family)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # pre-existing zeros: the mask may then keep fewer nonzeros, never more
        for m in model.modules():
            if isinstance(m, CookedLinear):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= zero_frac)
    before = {p: m.weight.detach().clone() for p, m in model.named_modules() if isinstance(m, CookedLinear)}
    calib = [tiny_inputs(family, seed=s) for s in range(2)] if method == "wanda" else None
    fxcook.apply(model, [Sparsify(method=method, calibration=calib)])
    layers = masked(model)
    assert len(layers) == len(model.sites.find("linear")) - sum(
        model.sites.block_of(s.path) is None for s in model.sites.find("linear")
    )
    for path, m in layers.items():
        groups = m.weight_mask.reshape(-1, 4)
        assert (groups.sum(1) == 2).all(), path
        nnz_before = (before[path].reshape(-1, 4) != 0).sum(1)
        nnz_after = (m.weight.detach().reshape(-1, 4) != 0).sum(1)
        assert is_24(m.weight) and is_24(m.effective_weight())
        if method == "m4n2_2d":  # transposable: 2 per row and per column of each 4x4 block
            assert is_24(m.weight_mask, dim=0) and (nnz_after <= nnz_before.clamp(max=2)).all(), path
        else:  # top-2 of a group of 4 keeps two nonzeros wherever two existed
            assert torch.equal(nnz_after, nnz_before.clamp(max=2)), path
    assert "2:4 mask" in model.report()


@pytest.mark.parametrize("family", FAMILIES)
def test_all_ones_mask_is_the_identity(family):
    model = cooked(family)
    ref = out(model, family)
    for m in model.modules():
        if isinstance(m, CookedLinear):
            m.set_mask(torch.ones_like(m.weight))
    assert torch.equal(out(model, family), ref)
    # unstructured at sparsity 0 is an all-ones mask too
    model = cooked(family)
    fxcook.apply(model, [Sparsify(pattern="unstructured", method="magnitude", sparsity=0.0)])
    assert all(m.density == 1.0 for m in masked(model).values())
    assert torch.equal(out(model, family), ref)


@settings(max_examples=6, deadline=None)
@given(st.sampled_from(FAMILIES), st.sampled_from(["adamw", "sgd"]), st.integers(0, 1000))
def test_masked_gradients_are_zero_and_steps_keep_zeros(family, opt_name, seed):
    model = cooked(family)
    fxcook.apply(model, [Sparsify(method="m4n2_1d")])
    layers = masked(model)
    masks = {p: m.weight_mask.clone() for p, m in layers.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (
        torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        if opt_name == "adamw"
        else torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.1)
    )
    model.train()
    for step in range(3):
        opt.zero_grad()
        out(model, family, seed=seed + step).pow(2).mean().backward()
        for path, m in layers.items():
            assert m.weight.grad is not None and (m.weight.grad[masks[path] == 0] == 0).all(), path
        opt.step()
    for path, m in layers.items():
        assert (m.weight.detach()[masks[path] == 0] == 0).all(), path
        assert torch.equal(m.weight_mask, masks[path])
        assert is_24(m.weight)


def test_masks_survive_state_dict_save_and_load(tmp_path):
    src = cooked("bert")
    fxcook.apply(src, [Sparsify(method="m4n2_1d")])
    state = src.state_dict()
    assert sum(k.endswith(".weight_mask") for k in state) == len(masked(src))
    buf = io.BytesIO()
    torch.save(state, buf)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "m.safetensors")
    for loaded in (torch.load(io.BytesIO(buf.getvalue())), load_file(tmp_path / "m.safetensors")):
        dst = cooked("bert")
        fxcook.apply(dst, [Sparsify(method="m4n2_2d")])  # different masks before loading
        dst.load_state_dict(loaded)
        for path, m in masked(dst).items():
            assert torch.equal(m.weight_mask, masked(src)[path].weight_mask), path
        assert torch.equal(out(dst, "bert"), out(src, "bert"))


def _eager_norms(calib):
    """Input-feature L2 norms of every nn.Linear of the eager tiny BERT, from plain forward pre-hooks."""
    eager = tiny_model("bert")
    sums = {}

    def hook(name):
        def fn(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)

        return fn

    for name, m in eager.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for b in calib:
            eager(**b)
    return {name: s.sqrt() for name, s in sums.items()}


def test_wanda_norms_match_hooks_on_the_eager_model():
    calib = [tiny_inputs("bert", seed=s) for s in range(3)]
    eager = _eager_norms(calib)
    model = cooked("bert")
    paths = [s.path for s in model.sites.find("linear") if model.sites.block_of(s.path)]
    norms = activation_norms(model, paths, calib, max_batches=8)
    for p in paths:
        torch.testing.assert_close(norms[p], eager[p], rtol=1e-4, atol=1e-5)
    with pytest.raises(PassError, match="never reached"):
        activation_norms(model, paths, [], max_batches=8)


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_wanda_pass_prunes_by_weight_times_calibration_norm(pattern):
    """The pass's masks keep the largest |W_ij| * ||X_j|| (norms from eager hooks), not the largest |W_ij|."""
    calib = [tiny_inputs("bert", seed=s) for s in range(3)]
    norms = _eager_norms(calib)
    model = cooked("bert")
    fxcook.apply(model, [Sparsify(method="wanda", pattern=pattern, sparsity=0.5, calibration=calib)])
    unlike_magnitude = 0
    for path, m in masked(model).items():
        w = cooked("bert").get_submodule(path).weight.detach()
        score = w.abs() * norms[path]
        rows = score.reshape(-1, 4) if pattern == "2:4" else score
        keep = m.weight_mask.bool().reshape(rows.shape)
        assert (keep.sum(1) == rows.shape[1] // 2).all(), path
        kept_min = torch.where(keep, rows, torch.inf).min(1).values
        dropped_max = torch.where(~keep, rows, -torch.inf).max(1).values
        # float reassociation may reorder near-equal scores; a wrong criterion misses by far more
        assert (kept_min >= dropped_max * (1 - 1e-4)).all(), path
        by_magnitude = (w.abs().reshape(-1, 4) if pattern == "2:4" else w.abs()).topk(rows.shape[1] // 2, dim=1)
        magnitude = torch.zeros_like(keep).scatter_(1, by_magnitude.indices, True)
        unlike_magnitude += int((keep != magnitude).any(1).sum())
    assert unlike_magnitude > 0


def _zhu_gupta(step, start, end, initial, final):
    """Sparsity of the cubic ramp of Zhu & Gupta (2017): s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))**3."""
    t = min(max(step, start), end)
    return final + (initial - final) * (1 - (t - start) / (end - start)) ** 3


@pytest.mark.parametrize("start,end,initial,halfway", [(0, 10, 0.0, 0.7), (5, 25, 0.2, 0.725)])
def test_schedule_sparsity_is_the_cubic_ramp(start, end, initial, halfway):
    model = cooked("bert")
    p = Sparsify(
        pattern="unstructured",
        method="magnitude",
        sparsity=0.8,
        schedule={"start": start, "end": end, "every": 1, "initial": initial},
    )
    fxcook.apply(model, [p])
    for step in range(end + 5):
        assert p.state.sparsity_at(step) == pytest.approx(_zhu_gupta(step, start, end, initial, 0.8), abs=1e-12), step
    half = (start + end) // 2  # halfway, a cubic ramp has gone 7/8 of the way; a linear one 1/2
    assert p.state.sparsity_at(half) == pytest.approx(halfway)
    update_masks(model, half)
    for m in masked(model).values():
        assert abs(m.density - (1 - halfway)) <= 1.0 / m.weight.numel() + 1e-6


def test_unstructured_ramp_follows_the_cubic_schedule_then_freezes():
    model = cooked("bert")
    p = Sparsify(pattern="unstructured", method="magnitude", sparsity=0.8, schedule={"start": 0, "end": 10, "every": 2})
    fxcook.apply(model, [p])
    layers = masked(model)
    assert all(m.density == 1.0 for m in layers.values()) and not p.state.final
    densities = []
    for step in range(1, 13):
        changed = update_masks(model, step)
        if step % 2 == 0 and step <= 10:
            assert changed, step
            target = 1 - _zhu_gupta(step, 0, 10, 0.0, 0.8)
            for m in layers.values():
                assert abs(m.density - target) <= 1.0 / m.weight.numel() + 1e-6
            densities.append(next(iter(layers.values())).density)
        else:
            assert not changed, step
    assert densities == sorted(densities, reverse=True) and abs(densities[-1] - 0.2) < 0.01
    assert p.state.final
    for m in layers.values():  # final: pruned raw weights are zero
        assert (m.weight.detach()[m.weight_mask == 0] == 0).all()


def test_24_schedule_recomputes_from_current_weights_then_freezes():
    model = cooked("bert")
    p = Sparsify(method="m4n2_1d", schedule={"start": 0, "end": 4, "every": 2}, freeze=True)
    fxcook.apply(model, [p])
    path, m = next(iter(masked(model).items()))
    with torch.no_grad():  # revive a dormant weight: the next recompute must keep it
        idx = (m.weight_mask[0] == 0).nonzero()[0, 0]
        m.weight[0, idx] = 100.0
    assert not update_masks(model, 1)
    assert update_masks(model, 2) and m.weight_mask[0, idx] == 1
    assert update_masks(model, 4) and p.state.final
    assert not update_masks(model, 6)
    assert is_24(m.weight) and all(is_24(x.weight) for x in masked(model).values())


def test_config_and_precondition_errors_name_the_key():
    with pytest.raises(ValidationError, match="sparsity"):
        Sparsify(pattern="2:4", sparsity=0.7)
    with pytest.raises(ValidationError, match="method"):
        Sparsify(pattern="unstructured", method="m4n2_2d")
    with pytest.raises(ValidationError, match="bogus"):
        Sparsify(bogus=1)
    with pytest.raises(PassError, match="calibration"):
        fxcook.apply(cooked("bert"), [Sparsify(method="wanda")])
    with pytest.raises(PassError, match="nearest"):
        fxcook.apply(cooked("bert"), [Sparsify(select={"include": "no.such.layer"})])


def test_selection_and_repeated_sparsify_only_prune_further():
    model = cooked("bert")
    fxcook.apply(
        model,
        [Sparsify(pattern="unstructured", method="magnitude", sparsity=0.3, select={"include": "intermediate.dense"})],
    )
    first = {p: m.weight_mask.clone() for p, m in masked(model).items()}
    assert set(first) == {"encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"}
    fxcook.apply(model, [Sparsify(method="m4n2_1d", select={"include": "intermediate.dense"})])
    for path, m in masked(model).items():
        assert (m.weight_mask <= first[path]).all() and is_24(m.weight_mask)


def test_sequential_wanda_calibrates_each_block_on_pruned_predecessors():
    calib = [tiny_inputs("bert", seed=s) for s in range(2)]
    seq, one = cooked("bert"), cooked("bert")
    fxcook.apply(seq, [Sparsify(method="wanda", calibration=calib, sequential=True)])
    fxcook.apply(one, [Sparsify(method="wanda", calibration=calib)])
    ms, mo = masked(seq), masked(one)
    first = [p for p in ms if p.startswith("encoder.layer.0.")]
    assert first and all(torch.equal(ms[p].weight_mask, mo[p].weight_mask) for p in first)  # same inputs
    # block 1 is calibrated on what the pruned block 0 produces
    paths1 = [p for p in ms if p.startswith("encoder.layer.1.")]
    ref = cooked("bert")
    for p in first:
        ref.get_submodule(p).set_mask(ms[p].weight_mask)
    norms = activation_norms(ref, paths1, calib, max_batches=8)
    from fxcook.passes.sparsify.masks import wanda

    for p in paths1:
        assert torch.equal(ms[p].weight_mask.bool(), wanda(ref.get_submodule(p).weight, norms[p]))


def test_sequential_wanda_reads_a_generator_once():
    """A generator is consumed once, yet every block is calibrated on all of its batches."""
    calib = [tiny_inputs("bert", seed=s) for s in range(2)]
    gen, lst = cooked("bert"), cooked("bert")
    fxcook.apply(gen, [Sparsify(method="wanda", calibration=(b for b in calib), sequential=True)])
    fxcook.apply(lst, [Sparsify(method="wanda", calibration=calib, sequential=True)])
    mg, ml = masked(gen), masked(lst)
    assert mg.keys() == ml.keys() and all(torch.equal(mg[p].weight_mask, ml[p].weight_mask) for p in mg)
