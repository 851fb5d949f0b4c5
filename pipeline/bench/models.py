"""Parameter counts and CPU throughput of the video backbones at their tiny settings.

Run: python -m pipeline.bench.models [--frames 16 --crop 40 --batch-size 32 --threads 1 2]
Timings are the median over timed steps (after one warm-up step), which shrugs off the occasional
stall when other processes share the cores. Training = forward + cross-entropy + backward + SGD
step; inference = eval-mode forward under torch.inference_mode. Training is timed with contiguous
weights and clips and with channels-last ones (what `train.channels_last` does, on CPU too), side
by side.
"""

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models import TINY_VIDEO_SETTINGS, VIDEO_MODELS, build_video_model, count_parameters


def median_step_seconds(step: Callable[[], object], *, steps: int) -> float:
    step()  # warm-up: allocator and oneDNN primitive caches
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_clips_per_second(
    model: nn.Module, clips: torch.Tensor, labels: torch.Tensor, *, steps: int
) -> float:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(clips), labels).backward()
        optimizer.step()

    return len(clips) / median_step_seconds(step, steps=steps)


def train_gflops_per_clip(model: nn.Module, clips: torch.Tensor) -> float:
    """Convolution/matmul FLOPs of one forward + backward per clip: a load-independent cost."""
    model.train()
    few = clips[:2]  # BatchNorm in train mode needs more than one clip
    with FlopCounterMode(display=False) as counter:
        model(few).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(few) / 1e9


def channels_last(model: nn.Module, clips: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """The model and clips as pipeline.train.fit lays them out with channels_last: the model in
    its own memory format, the clips channels-last 3D only for a 3D model (a TSN folds time into
    the batch itself)."""
    model = model.to(memory_format=model.memory_format)
    if model.memory_format == torch.channels_last_3d:
        clips = clips.contiguous(memory_format=torch.channels_last_3d)
    return model, clips


def inference_clips_per_second(model: nn.Module, clips: torch.Tensor, *, steps: int) -> float:
    model.eval()
    with torch.inference_mode():
        return len(clips) / median_step_seconds(lambda: model(clips), steps=steps)


def bench_models(
    *,
    names: Sequence[str] = VIDEO_MODELS,
    num_classes: int = 12,
    frames: int = 16,
    crop: int = 40,
    batch_size: int = 32,
    threads: Sequence[int] = (1, 2),
    steps: int = 5,
    seed: int = 0,
) -> list[dict]:
    """Time each named video model at its TINY_VIDEO_SETTINGS; print a table and return its rows."""
    generator = torch.Generator().manual_seed(seed)
    clips = torch.randn(batch_size, 3, frames, crop, crop, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    threads_before = torch.get_num_threads()
    rows = []
    try:
        for name in names:
            settings = TINY_VIDEO_SETTINGS[name]
            torch.manual_seed(seed)
            model = build_video_model(name, num_classes=num_classes, **settings)
            gflops = train_gflops_per_clip(model, clips)
            for num_threads in threads:
                torch.set_num_threads(num_threads)
                row = {
                    "model": name,
                    "settings": settings,
                    "parameters": count_parameters(model),
                    "clip": f"{frames}x{crop}x{crop}",
                    "batch_size": batch_size,
                    "threads": num_threads,
                    "train_gflops_per_clip": gflops,
                    "train_clips_per_s": train_clips_per_second(model, clips, labels, steps=steps),
                    "inference_clips_per_s": inference_clips_per_second(model, clips, steps=steps),
                }
                last_model, last_clips = channels_last(copy.deepcopy(model), clips)
                row["train_clips_per_s_channels_last"] = train_clips_per_second(
                    last_model, last_clips, labels, steps=steps
                )
                rows.append(row)
                print(
                    f"{name:14s} params {row['parameters']:>9,d}  clip {row['clip']}  "
                    f"threads {num_threads}  train {row['train_gflops_per_clip']:.3f} GFLOP/clip  "
                    f"{row['train_clips_per_s']:7.1f} clips/s, channels-last "
                    f"{row['train_clips_per_s_channels_last']:7.1f} "
                    f"({row['train_clips_per_s_channels_last'] / row['train_clips_per_s']:.2f}x)  "
                    f"inference {row['inference_clips_per_s']:7.1f} clips/s",
                    flush=True,
                )
    finally:
        torch.set_num_threads(threads_before)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(VIDEO_MODELS), choices=VIDEO_MODELS)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--crop", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    bench_models(
        names=args.models,
        frames=args.frames,
        crop=args.crop,
        batch_size=args.batch_size,
        threads=args.threads,
        steps=args.steps,
    )


if __name__ == "__main__":
    main()
