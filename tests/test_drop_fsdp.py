"""DropLayers(every=K) under FSDP2 (2 gloo ranks on CPU): the gated blocks are removed when the run
ends on every rank, and losses and the trained model's logits equal one process's."""

import pytest
import torch

from fxcook.testing import on_two_ranks, tiny_inputs

DROPPED = ["model.layers.1", "model.layers.2"]


def _run(fsdp: bool):
    """Train a 4-block Llama dropping 2 blocks (one every 2 steps); (losses, blocks, record, logits)."""
    import fxcook
    from fxcook.passes import DropLayers
    from fxcook.testing import tiny_model
    from fxcook.training.losses import DistillLoss

    cooked = fxcook.apply(
        fxcook.capture(tiny_model("llama", num_hidden_layers=4), tiny_inputs("llama")), [DropLayers(count=2, every=2)]
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (16, 8), generator=g)
    result = fxcook.train(
        cooked, data={"input_ids": ids, "attention_mask": torch.ones_like(ids)}, loss=DistillLoss(lm=1.0),
        steps=5, batch_size=4, lr=1e-3, progress=False, fsdp=fsdp,
    )  # fmt: skip
    with torch.no_grad():
        logits = cooked(**tiny_inputs("llama", seed=4)).logits
    logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
    return result.losses, list(cooked.sites.blocks), cooked.pass_entries[-1]["record"], logits.tolist()


def _worker(rank: int, tmp: str) -> dict:
    losses, blocks, record, logits = _run(fsdp=True)
    return {"losses": losses, "blocks": blocks, "record": record, "logits": logits}


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory):
    return on_two_ranks(_worker, tmp_path_factory.mktemp("drop_fsdp"))


def test_settle_removes_the_gated_blocks_on_every_rank(two_rank):
    for r in two_rank:
        assert r["blocks"] == ["model.layers.0", "model.layers.3"]
        assert r["record"] == {"dropped": DROPPED, "settled": True}


def test_two_ranks_drop_and_train_like_one_process(two_rank):
    torch.set_num_threads(1)
    losses, blocks, _, logits = _run(fsdp=False)
    assert blocks == two_rank[0]["blocks"]
    for r in two_rank:
        assert r["losses"] == pytest.approx(losses, rel=1e-5)
        torch.testing.assert_close(torch.tensor(r["logits"]), torch.tensor(logits), rtol=1e-4, atol=1e-5)
