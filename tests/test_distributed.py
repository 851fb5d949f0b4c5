"""Several training processes give the result of one: interleaved rank shares of the global batch,
batch norm over the global batch on CPU, and the torchrun stage commands."""

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import BatchSampler, RandomSampler

from pipeline.config import DistributedParams
from pipeline.dag import Stage, distribute
from pipeline.distributed import CpuSyncBatchNorm, RankShard, rank_shard, synchronise_batch_norm
from pipeline.errors import ConfigError


@pytest.mark.parametrize("size, drop_last", [(24, True), (27, True), (27, False), (5, False)])
def test_rank_shares_of_step_k_hold_the_one_process_batch_k(size, drop_last):
    def order():
        return RandomSampler(range(size), generator=torch.Generator().manual_seed(3))

    batch, world = 8, 2
    one = list(BatchSampler(order(), batch, drop_last))
    total = size // batch * batch if drop_last else size // world * world
    ranks = [
        list(BatchSampler(RankShard(order(), rank, world, total), batch // world, drop_last))
        for rank in range(world)
    ]
    assert len(ranks[0]) == len(ranks[1])  # DDP needs the same number of steps on every rank
    for step, shares in enumerate(zip(*ranks, strict=True)):
        merged = sorted(itertools.chain(*shares))
        assert merged == sorted(one[step][: len(merged)])
        assert len(one[step]) - len(merged) < world  # at most world - 1 clips left out, once


def test_a_batch_that_does_not_split_over_the_processes_is_a_config_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="batch size 8 does not split over 3 processes"):
        rank_shard(range(24), 24, 8, drop_last=True)


def _sync_bn_rank(rank: int, init: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.manual_seed(0)
    batch = torch.randn(6, 3, 2, 4, 4, dtype=torch.float64) * 3 + 1
    layer = synchronise_batch_norm(torch.nn.BatchNorm3d(3).double(), torch.device("cpu"))
    assert isinstance(layer, CpuSyncBatchNorm)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    share = batch[rank * 3 : rank * 3 + 3].clone().requires_grad_()
    out = layer(share)
    (out * torch.arange(out.numel()).view_as(out)).sum().backward()  # any non-uniform loss
    weight_grad = layer.weight.grad.clone()
    dist.all_reduce(weight_grad)  # as DDP does (it then divides by 2; the sum is compared here)
    results[rank] = {
        "out": out.detach(),
        "input_grad": share.grad,
        "weight_grad": weight_grad,
        "running_var": layer.running_var.clone(),
    }
    dist.destroy_process_group()


def test_cpu_sync_batch_norm_over_two_ranks_equals_batch_norm_over_their_whole_batch(tmp_path):
    """In float64, where the comparison tests the maths rather than the rounding."""
    results = mp.Manager().dict()
    mp.spawn(_sync_bn_rank, args=(f"file://{tmp_path / 'rendezvous'}", results), nprocs=2)
    torch.manual_seed(0)
    batch = (torch.randn(6, 3, 2, 4, 4, dtype=torch.float64) * 3 + 1).requires_grad_()
    layer = torch.nn.BatchNorm3d(3).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    out = layer(batch)
    shares = [torch.arange(out.numel() // 2).view_as(out[:3]) for _ in range(2)]
    (out * torch.cat(shares)).sum().backward()
    for rank in range(2):
        part = slice(rank * 3, rank * 3 + 3)
        torch.testing.assert_close(results[rank]["out"], out[part].detach())
        torch.testing.assert_close(results[rank]["input_grad"], batch.grad[part])
        torch.testing.assert_close(results[rank]["weight_grad"], layer.weight.grad)
        torch.testing.assert_close(results[rank]["running_var"], layer.running_var)


def test_without_a_process_group_the_synchronised_layer_is_plain_batch_norm():
    layer = torch.nn.BatchNorm2d(4)
    reference = torch.nn.BatchNorm2d(4)
    synchronise_batch_norm(layer, torch.device("cpu"))
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(layer(x), reference(x))
    torch.testing.assert_close(layer.running_mean, reference.running_mean)


def _training_stage(**fields) -> Stage:
    cmd = "python -m pipeline train --dataset synth --seed 0"
    return Stage(name="t", cmd=cmd, outs=("o",), gpu=1, mem_mb=1000, trains=True, **fields)


def test_training_stages_start_under_torchrun_and_ask_for_a_gpu_per_process():
    one = distribute(_training_stage(), DistributedParams())
    assert one.command() == "python -m pipeline train --dataset synth --seed 0 --threads 1"
    two = distribute(_training_stage(), DistributedParams(processes=2))
    assert two.command() == (
        "python -m torch.distributed.run --nproc-per-node 2 --standalone -m pipeline train "
        "--dataset synth --seed 0 --threads 2"
    )
    assert two.resources(use_gpu=True) == {"mem_mb": 2000, "runtime": 30, "gpu": 2}
    cache = Stage(name="f", cmd="python -m pipeline features", outs=("o",), gpu=1)
    assert distribute(cache, DistributedParams(processes=2)) == cache  # not a training run


def test_a_multi_node_stage_runs_torchrun_per_node_through_srun():
    stage = distribute(_training_stage(), DistributedParams(processes=4, nodes=2))
    assert stage.launched().startswith("srun python -m torch.distributed.run --nproc-per-node 4")
    assert "--rdzv-backend c10d" in stage.launched() and "$SLURM_JOB_NODELIST" in stage.launched()
    resources = stage.resources(use_gpu=False)
    assert resources["mpi"] == "srun" and (resources["nodes"], resources["tasks"]) == (2, 2)
    assert resources["slurm_extra"] == "--gpus-per-node=4 --ntasks-per-node=1"
    assert resources["gpu"] == 0  # the plugin's gpu with mpi tasks would ask per task instead
