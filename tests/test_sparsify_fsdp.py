"""Sparsify under FSDP2 (2 gloo ranks on CPU): scheduled 2:4 recompute on sharded weights, masks kept."""

import torch

from fxcook.testing import on_two_ranks


def _worker(rank: int, tmp: str) -> dict:
    import fxcook
    from fxcook.nn import CookedLinear
    from fxcook.passes.sparsify import Sparsify, update_masks
    from fxcook.passes.sparsify.masks import is_24
    from fxcook.testing import tiny_inputs, tiny_model
    from fxcook.training.distributed import shard

    torch.manual_seed(0)
    model = fxcook.compile(
        tiny_model("llama"),
        [Sparsify(method="m4n2_1d", schedule={"start": 0, "end": 2, "every": 1})],
        example_inputs=tiny_inputs("llama"),
    )
    model.train()
    shard(model, model.sites.blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    changed = []
    for step in range(1, 5):
        model(**tiny_inputs("llama", seed=step + rank)).logits.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        changed.append(len(update_masks(model, step)))
    checks = []
    for m in model.modules():
        if isinstance(m, CookedLinear) and m.weight_mask is not None:
            full = m.weight.full_tensor().detach()
            checks.append([type(m.weight).__name__, is_24(full), bool((full[m.weight_mask == 0] == 0).all())])
    masks = sum(k.endswith(".weight_mask") for k in model.state_dict())
    return {"changed": changed, "checks": checks, "masks": masks}


def test_scheduled_24_masks_under_fsdp2(tmp_path):
    for r in on_two_ranks(_worker, tmp_path):
        changed, checks = r["changed"], r["checks"]
        assert changed[:2] == [len(checks)] * 2 and changed[2:] == [0, 0]  # recomputed at steps 1, 2; then final
        assert checks and all(c == ["DTensor", True, True] for c in checks)  # sharded, 2:4, pruned raw weights 0
        assert r["masks"] == len(checks)
