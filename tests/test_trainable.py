"""`fxcook.train(trainable=...)`: only the named parameters train and hold optimizer state, also
under FSDP2 (2 gloo ranks equal one process on LoRA adapters within 1e-5)."""

import pytest
import torch

from fxcook.errors import FxcookError
from fxcook.testing import on_two_ranks

STEPS, BATCH = 3, 8


def _setup():
    from fxcook.passes import Lora
    from fxcook.pipeline import compile
    from fxcook.testing import tiny_inputs, tiny_model

    cooked = compile(
        tiny_model("llama"), [Lora(rank=4, select={"include": ["q_proj", "v_proj"]})], tiny_inputs("llama")
    )
    g = torch.Generator().manual_seed(0)
    data = {
        "input_ids": torch.randint(1, 128, (32, 10), generator=g),
        "attention_mask": torch.ones(32, 10, dtype=torch.long),
    }
    data["attention_mask"][::3, 7:] = 0
    return cooked, data


def _train(cooked, data, **kw):
    from fxcook.training.loop import train
    from fxcook.training.losses import DistillLoss

    return train(cooked, None, data, DistillLoss(lm=1.0), steps=STEPS, batch_size=BATCH, lr=1e-2, progress=False, **kw)


def _full(p):
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def test_lora_and_norm_train_the_rest_stays_and_has_no_optimizer_state():
    cooked, data = _setup()
    before = {n: p.detach().clone() for n, p in cooked.named_parameters()}
    result = _train(cooked, data, trainable="lora+norm")
    trained = {n for n, p in cooked.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "norm" in n for n in trained)
    assert any("lora_" in n for n in trained) and any("norm" in n for n in trained)
    for n, p in cooked.named_parameters():
        assert torch.equal(p, before[n]) == (n not in trained), n
    sizes = [p.numel() for n, p in cooked.named_parameters() if n in trained]
    assert result.trainable_params == sum(sizes) < result.total_params
    assert result.optim_bytes == sum(8 * n + 4 for n in sizes)  # AdamW: two float moments + a step per parameter
    assert result.peak_memory_bytes >= 0 and "RSS" in result.memory_measure


def test_globs_and_all():
    cooked, data = _setup()
    result = _train(cooked, data, trainable=["model.layers.1.*", "lm_head.weight"])
    assert {n for n, p in cooked.named_parameters() if p.requires_grad} == {
        n for n, _ in cooked.named_parameters() if n.startswith("model.layers.1.") or n == "lm_head.weight"
    }
    assert _train(cooked, data, trainable="all").trainable_params == result.total_params


@pytest.mark.parametrize(
    ("spec", "culprit"), [(["model.layer.*"], "trainable item 'model.layer.*'"), ("lora+nrom", "trainable role 'nrom'")]
)
def test_items_matching_nothing_are_errors(spec, culprit):
    cooked, data = _setup()
    with pytest.raises(FxcookError, match=rf"{culprit} matches no parameter"):
        _train(cooked, data, trainable=spec)


def _worker(rank: int, tmp: str) -> dict:
    cooked, data = _setup()
    result = _train(cooked, data, trainable="lora")
    adapters = {n: _full(p).tolist() for n, p in cooked.named_parameters() if "lora_" in n}
    frozen_sharded = all(hasattr(p, "to_local") for n, p in cooked.named_parameters() if not p.requires_grad)
    return {"losses": result.losses, "adapters": adapters, "sharded": frozen_sharded}


def test_fsdp2_adapter_training_equals_one_process(tmp_path):
    ranks = on_two_ranks(_worker, tmp_path)
    cooked, data = _setup()
    single = _train(cooked, data, trainable="lora", fsdp=False)
    assert all(r["sharded"] for r in ranks)
    assert ranks[0]["losses"] == pytest.approx(single.losses, rel=1e-5)
    assert all(bool(p.abs().sum() > 0) for n, p in cooked.named_parameters() if n.endswith("lora_B"))  # they trained
    for n, p in cooked.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(torch.tensor(ranks[0]["adapters"][n]), p.detach(), atol=1e-5, rtol=1e-5)
