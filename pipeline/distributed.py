"""One training run on several processes (torchrun), with the result of one process.

A stage trains on `distributed.processes` processes per node (params.yaml; the stage command is
then `python -m torch.distributed.run ...`, see pipeline/dag.py). The params' batch size is the
global batch: each process takes an equal, interleaved share of the one-process order
(`RankShard`), so step k's batches across processes hold exactly the clips of the one-process
batch k; DDP averages the gradients of the per-process mean losses, which is the gradient of the
global mean; and batch norm normalises with the global batch's statistics (torch's SyncBatchNorm
on CUDA; `CpuSyncBatchNorm` on CPU, where torch's refuses CPU tensors). A run's metrics then do
not depend on the number of processes, up to float rounding (tests/test_e2e.py checks it).
"""

import itertools
import os

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import Sampler

from pipeline.errors import ConfigError


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


class RankShard(Sampler):
    """Rank `rank`'s share of `sampler`'s order: every `num_replicas`-th of its first `total`
    indices. With batches of batch_size / num_replicas, step k's batches across the ranks hold
    the indices of the one-process batch k; `total` (a multiple of num_replicas) gives every rank
    the same number of batches, which DDP needs."""

    def __init__(self, sampler: Sampler, rank: int, num_replicas: int, total: int):
        self.sampler = sampler  # start_epoch reaches its generator and set_epoch through this
        self.rank = rank
        self.num_replicas = num_replicas
        self.total = total

    def __iter__(self):
        return itertools.islice(self.sampler, self.rank, self.total, self.num_replicas)

    def __len__(self) -> int:
        return self.total // self.num_replicas


def rank_shard(sampler: Sampler, size: int, batch_size: int, drop_last: bool) -> tuple:
    """(sampler, per-rank batch size) for a loader of `size` items and a global `batch_size`
    under torchrun; unchanged on one process. Without drop_last the last global batch loses up to
    world - 1 items, so that every rank's last batch has the same size."""
    rank, world, _ = distributed_env()
    if world == 1:
        return sampler, batch_size
    if batch_size % world:
        raise ConfigError(
            f"batch size {batch_size} does not split over {world} processes (params "
            "distributed.processes x nodes): make it a multiple of them"
        )
    total = size // batch_size * batch_size if drop_last else size // world * world
    return RankShard(sampler, rank, world, total), batch_size // world


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose gradient is the all-reduced gradient (every rank's loss depends on
    every rank's input through the sum). torch.distributed.nn's equivalent is deprecated."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _SumOverRanks.apply(grad)


class CpuSyncBatchNorm(_BatchNorm):
    """Batch norm synchronised across ranks for CPU tensors (gloo), where torch's SyncBatchNorm
    refuses them (and DDP refuses any SyncBatchNorm on CPU). Per-channel sums and sums of
    squares are all-reduced with the differentiable all_reduce, so the output and the gradients
    are those of one process normalising the whole global batch; running statistics are updated
    as BatchNorm does."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        pass  # the BatchNorm1d/2d/3d it replaces was built for this input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels, dims = x.shape[1], [0, *range(2, x.dim())]
        values = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        count = values.new_full((1,), values.numel() // channels)
        stats = _SumOverRanks.apply(
            torch.cat([values.sum(dims), (values * values).sum(dims), count])
        )
        n = stats[-1]
        mean = stats[:channels] / n
        var = stats[channels : 2 * channels] / n - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum
                if momentum is None:  # a cumulative average, as BatchNorm's
                    momentum = 1.0 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * n / (n - 1), momentum)  # unbiased, as BatchNorm
        shape = (1, channels) + (1,) * (x.dim() - 2)
        out = (values - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def synchronise_batch_norm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module` with every batch norm normalising over all ranks' batches."""
    if device.type != "cpu":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for layer in module.modules():
        if isinstance(layer, _BatchNorm):
            layer.__class__ = CpuSyncBatchNorm  # the same state; only forward differs
    return module
