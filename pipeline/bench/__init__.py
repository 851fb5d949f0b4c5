"""`python -m pipeline bench ...`: speed figures, each side by side with its alternative.

Shared by the training benchmarks: the loader's batches epoch after epoch, and the clips/s of a
method's SGD steps on them.
"""

import itertools
import time
from collections.abc import Callable, Iterator

import torch

from pipeline.data.clips import prepare_video
from pipeline.train import start_epoch

WARMUP_STEPS = 2  # allocator and oneDNN caches; the loader's first worker start


def epochs_of_batches(loader, seed: int) -> Iterator[dict]:
    """The loader's batches epoch after epoch, each epoch seeded as fit seeds it."""
    for epoch in itertools.count():
        start_epoch(loader, seed, epoch)
        yield from loader


def sgd_clips_per_second(
    method: torch.nn.Module,
    batches: Iterator[dict],
    steps: int,
    prepare: Callable[[dict], dict] | None = None,
) -> float:
    """Clips/s of `steps` SGD steps of `method` (forward, loss, backward, update, as fit does on
    CPU) on the next batches, after WARMUP_STEPS untimed ones. The time includes waiting for each
    batch, the trainer's per-batch preparation (uint8 -> normalised float) and `prepare`."""
    method.train()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)

    def step(batch: dict) -> int:
        batch = {**batch, "video": prepare_video(batch["video"])}
        if prepare is not None:
            batch = prepare(batch)
        loss = method(batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return len(batch["video"])

    for _ in range(WARMUP_STEPS):
        step(next(batches))
    clips = 0
    started = time.perf_counter()
    for _ in range(steps):
        clips += step(next(batches))
    return clips / (time.perf_counter() - started)
