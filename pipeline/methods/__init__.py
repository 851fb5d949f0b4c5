"""Training methods: one module holds one whole algorithm (as MoCo's builder.py does).

A method is an nn.Module that owns the student network (`model`) and everything else the algorithm
needs (frozen teacher copies, queues as buffers), so `method.state_dict()` checkpoints all of it.
The trainer (pipeline.train.fit) calls `method(batch)`, which runs `training_step`; going through
`forward` is what lets DistributedDataParallel, which wraps the whole method, sync gradients.
"""

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn


class StepOutput(NamedTuple):
    """What one training step returns.

    loss: the scalar to minimise. logits: (B, num_classes) class scores for the batch's labels, or
    None where the step has none (self-supervised losses); the trainer reports train accuracy from
    them over labels >= 0. logs: extra per-step scalars (floats or 0-d tensors; tensors avoid a
    device sync per step), averaged per epoch as "train_<name>". A NamedTuple (not a dataclass) so
    DDP's output traversal sees the tensors inside; the default `logs` is never mutated.
    """

    loss: torch.Tensor
    logits: torch.Tensor | None = None
    logs: Mapping[str, float | torch.Tensor] = {}


class Method(nn.Module):
    """Base class: subclasses set `self.model` and implement `training_step`."""

    model: nn.Module
    # DDP must search for parameters that a step leaves without gradient (an ablation that turns
    # a head's loss off); it costs a graph traversal per step, so methods opt in.
    ddp_find_unused_parameters: bool = False

    def forward(self, batch: dict) -> StepOutput:
        return self.training_step(batch)

    def training_step(self, batch: dict) -> StepOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement training_step")

    def on_validation(self, epoch: int, metrics: dict) -> None:
        """Called after each validation with pipeline.evaluate.evaluate's dict; default no-op."""
