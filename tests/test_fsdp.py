"""FSDP2 over a cooked tiny Llama on 2 gloo ranks: per-block sharding, exact losses, resume.

One 2-process run (torch.multiprocessing, gloo on CPU) checks: the block sites really are sharded
per block, the losses of distillation through a learned projection (student width 32, teacher 48)
equal one process's on the same global batches, each rank holds about half the parameter bytes,
and a 2-rank run resumed from its step-2 checkpoint continues with the same losses.
"""

import os

import pytest
import torch

from fxcook.testing import on_two_ranks

STEPS, BATCH = 4, 8


def _setup():
    from fxcook.pipeline import compile
    from fxcook.testing import tiny_inputs, tiny_model
    from fxcook.training.losses import DistillLoss

    teacher = tiny_model("llama", seed=1, hidden_size=48)
    student = compile(tiny_model("llama", seed=0), [], tiny_inputs("llama"))
    g = torch.Generator().manual_seed(0)
    data = {
        "input_ids": torch.randint(1, 128, (48, 10), generator=g),
        "attention_mask": torch.ones(48, 10, dtype=torch.long),
    }
    data["attention_mask"][::3, 6:] = 0  # uneven padding across ranks
    loss = DistillLoss(kl=1.0, hidden_mse=1.0, hidden_cos=0.5, temperature=2.0)
    return student, teacher, data, loss


def _kw(out, **extra):
    return dict(steps=STEPS, batch_size=BATCH, lr=1e-2, out=out, save_every=2, keep=5, progress=False, **extra)


def _worker(rank: int, tmp: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from fxcook.training.distributed import local_param_bytes
    from fxcook.training.loop import train

    student, teacher, data, loss = _setup()
    result = train(student, teacher, data, loss, **_kw(f"{tmp}/run2"))
    blocks = [s.path for s in student.sites.find("block")]
    sharded = all(isinstance(student.get_submodule(b), FSDPModule) for b in blocks) and isinstance(student, FSDPModule)
    has_proj = len(list(loss.proj.parameters())) > 0
    mine = local_param_bytes(student)
    # resume a fresh 2-rank run from the first run's step-2 checkpoint
    import shutil

    if rank == 0:
        os.makedirs(f"{tmp}/resume/checkpoints")
        shutil.copytree(f"{tmp}/run2/checkpoints/step_0000002", f"{tmp}/resume/checkpoints/step_0000002")
        with open(f"{tmp}/resume/checkpoints/latest", "w") as f:
            f.write("step_0000002")
    dist.barrier()
    student2, teacher2, data2, loss2 = _setup()
    resumed = train(student2, teacher2, data2, loss2, **_kw(f"{tmp}/resume"))
    return {
        "losses": result.losses,
        "sharded": sharded,
        "proj": has_proj,
        "bytes": mine,
        "resumed": resumed.losses,
        "resumed_from": resumed.resumed_from,
    }


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory):
    return on_two_ranks(_worker, tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    from fxcook.training.distributed import local_param_bytes
    from fxcook.training.loop import train

    student, teacher, data, loss = _setup()
    result = train(student, teacher, data, loss, **_kw(str(tmp_path_factory.mktemp("single")), fsdp=False))
    return result.losses, local_param_bytes(student)


def test_blocks_sharded_and_projection_trained(two_rank):
    assert all(r["sharded"] for r in two_rank)
    assert all(r["proj"] for r in two_rank)


def test_two_ranks_match_one_process(two_rank, one_process):
    single, _ = one_process
    assert two_rank[0]["losses"] == two_rank[1]["losses"]
    assert len(single) == STEPS
    for a, b in zip(two_rank[0]["losses"], single):
        assert a == pytest.approx(b, rel=1e-5)
    assert single[-1] < single[0]


def test_per_rank_parameter_bytes_about_half(two_rank, one_process):
    _, total = one_process
    for r in two_rank:
        assert 0.4 * total <= r["bytes"] <= 0.6 * total


def test_two_rank_resume_continues_identically(two_rank):
    r = two_rank[0]
    assert r["resumed_from"] == 2
    assert r["resumed"] == pytest.approx(r["losses"][2:], rel=1e-6)


def _exit_worker(rank: int, tmp: str) -> None:
    import torch.distributed as dist

    from fxcook.training.distributed import exit_distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    dist.barrier()
    exit_distributed(3 + rank)
    raise AssertionError("exit_distributed returned inside a process group")


def test_exit_distributed_leaves_with_the_code_and_returns_it_without_a_group(tmp_path):
    import torch.multiprocessing as mp

    from fxcook.training.distributed import exit_distributed

    assert exit_distributed(5) == 5
    with pytest.raises(mp.ProcessExitedException) as caught:
        mp.spawn(_exit_worker, args=(str(tmp_path),), nprocs=2)
    assert caught.value.exit_code == 3 + caught.value.error_index
