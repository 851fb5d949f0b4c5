"""`python -m pipeline bench features`: DTG-Net training with cached guidance vs online teachers.

Both sides run the real DTG method (pipeline.methods.dtg) on the same student, the same items
(GuidedClipDataset with one seed: same anchors, same guidance frames), the same loader and
thread count: forward + backward + SGD step, as pipeline.train.fit does on CPU. They differ only
in where the guidance comes from:
(a) cache:  each teacher's embeddings of the guidance frames read from its feature cache;
(b) online: the guidance frames decoded from the shards in the dataset (as the anchor's) and the
    frozen teachers run on them inside the training step, on the student's device: what training
    without the cache has to do.
Side (a) runs before and after (b) and its mean is compared (other processes on shared cores
shift all rates). Before timing, the first batch's guidance of both sides is compared: the cache
must give what the teachers compute (float16 storage: about 1e-3 relative).

Goal: the cache makes a training epoch at least GOAL_SPEEDUP times faster. The table also gives
each cache's size per 1,000 frames (cache.json "bytes" / "frames").

`--real-size` (bench_features_real_size) makes the same comparison where the teachers cost what
real ones do, with nothing on disk: R3D-18 at torchvision's size, ResNet-50 teachers (random
weights) at 224 px, synthetic batches in memory (no shard or cache reads on either side), on the
CPU and, where CUDA is, on the GPU.
"""

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from pathlib import Path

import numpy as np
import torch

from pipeline.bench import WARMUP_STEPS, epochs_of_batches, gpu, sgd_clips_per_second
from pipeline.dag import ALL_TEACHERS
from pipeline.data.clips import select_rows
from pipeline.data.guided import GuidedClipDataset
from pipeline.data.shards import read_manifest
from pipeline.errors import DataError
from pipeline.methods.dtg import DTG
from pipeline.models import build_video_model
from pipeline.teachers import load_teacher
from pipeline.teachers.base import FrozenTeacher
from pipeline.teachers.features import FeatureCache
from pipeline.train import make_loader, seed_everything

GOAL_SPEEDUP = 3.0


class DecodedGuidanceDataset(GuidedClipDataset):
    """GuidedClipDataset whose "guidance" is the guidance frames themselves, decoded from the
    shards: uint8 (T', H, W, 3), for teachers to embed online. The caches only give sizes."""

    def guidance(self, row: int, frames: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.store.read_clip(row, frames)))


def embed_online(
    frames: torch.Tensor, teachers: Mapping[str, FrozenTeacher], device: torch.device
) -> dict[str, torch.Tensor]:
    """(B, T', H, W, 3) uint8 guidance frames -> each teacher's mean embedding (B, D_k)."""
    batch, count = frames.shape[:2]
    flat = frames.to(device).flatten(0, 1)
    return {
        name: teacher(flat)["embedding"].view(batch, count, -1).mean(dim=1)
        for name, teacher in teachers.items()
    }


def dtg_clips_per_second(
    batches: Iterator[dict],
    *,
    teachers: Mapping[str, FrozenTeacher] | None,
    feature_dims: Mapping[str, int],
    model: dict,
    dtg: dict,
    steps: int,
    seed: int,
) -> float:
    """Clips/s of `steps` DTG SGD steps on the next batches after WARMUP_STEPS untimed ones; the
    time includes waiting for each batch and, with `teachers`, embedding its guidance frames."""
    seed_everything(seed)
    method = DTG(build_video_model(num_classes=0, **model), teachers=feature_dims, **dtg)
    device = torch.device("cpu")

    def embed(batch: dict) -> dict:
        return {**batch, "guidance": embed_online(batch["guidance"], teachers, device)}

    return sgd_clips_per_second(method, batches, steps, embed if teachers is not None else None)


def bench_features(
    shard_dir: Path,
    *,
    teachers: Mapping[str, FrozenTeacher],
    caches: Mapping,
    cache_kib_per_1000_frames: Mapping[str, float],
    model: dict,
    segments: int,
    crop: int,
    guidance: str,
    overlap: bool,
    batch_size: int,
    threads: int,
    steps: int | None = None,
    workers: int = 0,
    split: int = 1,
    seed: int = 0,
    dtg: dict | None = None,
) -> dict:
    """Time DTG training with cached vs online guidance on CPU; print a table, return figures.

    teachers / caches: name -> FrozenTeacher / its feature cache of these shards. steps: timed
    steps per side (None: one epoch over the split's train videos, drop_last). `model`:
    build_video_model's keywords plus `name`; `dtg`: DTG's keywords (tau, queue_size, ...).
    """
    shard_dir = Path(shard_dir)
    if set(teachers) != set(caches):
        raise ValueError(f"teachers {sorted(teachers)} and caches {sorted(caches)} differ")
    manifest = read_manifest(shard_dir)
    rows = select_rows(manifest, f"split{split}", "train")
    clip_args = {
        "rows": rows,
        "caches": caches,
        "segments": segments,
        "crop_size": crop,
        "guidance": guidance,
        "overlap": overlap,
        "seed": seed,
    }
    cached = GuidedClipDataset(shard_dir, **clip_args)
    decoded = DecodedGuidanceDataset(shard_dir, **clip_args)
    batches_per_epoch = len(cached) // batch_size
    if batches_per_epoch == 0:
        raise DataError(f"{shard_dir}: {len(cached)} train videos, fewer than a batch")
    steps = steps or batches_per_epoch
    dtg = {"queue_size": min(512, len(cached) - 1), **(dtg or {})}
    timing = {
        "feature_dims": cached.feature_dims,
        "model": model,
        "dtg": dtg,
        "steps": steps,
        "seed": seed,
    }

    def loader(dataset):
        return make_loader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            seed=seed,
            num_workers=workers,
            drop_last=True,
            device="cpu",
        )

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        difference = guidance_difference(loader(cached), loader(decoded), teachers)

        def rate(dataset, online: dict | None) -> float:
            with closing(epochs_of_batches(loader(dataset), seed)) as source:
                return dtg_clips_per_second(source, teachers=online, **timing)

        cache_rates = [rate(cached, None)]
        online_rate = rate(decoded, teachers)
        cache_rates.append(rate(cached, None))
    finally:
        torch.set_num_threads(threads_before)
    cache_rate = sum(cache_rates) / len(cache_rates)
    speedup = cache_rate / online_rate
    result = {
        "model": model["name"],
        "teachers": list(teachers),
        "clip": f"{segments}x{crop}x{crop}",
        "guidance": guidance,
        "batch_size": batch_size,
        "threads": threads,
        "workers": workers,
        "steps": steps,
        "train_videos": len(cached),
        "batches_per_epoch": batches_per_epoch,
        "cache_runs_clips_per_s": cache_rates,
        "cache_clips_per_s": cache_rate,
        "online_clips_per_s": online_rate,
        "speedup": speedup,
        "goal_speedup": GOAL_SPEEDUP,
        "goal_met": speedup >= GOAL_SPEEDUP,
        "guidance_max_relative_difference": difference,
        "cache_kib_per_1000_frames": dict(cache_kib_per_1000_frames),
    }
    print(format_table(result, shard_dir))
    return result


def guidance_difference(cached_loader, decoded_loader, teachers) -> float:
    """Largest |cached - online| / max|online| over the first batch's guidance of all teachers
    (both loaders give the same items)."""
    cached_batch = next(iter(cached_loader))
    decoded_batch = next(iter(decoded_loader))
    if not torch.equal(cached_batch["index"], decoded_batch["index"]):
        raise RuntimeError("the cached and decoded loaders gave different videos")
    online = embed_online(decoded_batch["guidance"], teachers, torch.device("cpu"))
    worst = 0.0
    for name, values in online.items():
        scale = values.abs().max().clamp(min=1e-12)
        worst = max(worst, float((cached_batch["guidance"][name] - values).abs().max() / scale))
    return worst


def speed_lines(result: dict, online: str, indent: str) -> list[str]:
    """The cache runs around the `online` run in clips/s, then the speed-up against the goal."""
    rows = [
        ("guidance from the feature cache", result["cache_runs_clips_per_s"][0]),
        (online, result["online_clips_per_s"]),
        ("guidance from the feature cache", result["cache_runs_clips_per_s"][1]),
    ]
    width = max(len(what) for what, _ in rows)
    lines = [f"{indent}{what:<{width}}  {rate:>9,.2f} clips/s" for what, rate in rows]
    verdict = "met" if result["goal_met"] else "NOT met"
    lines.append(
        f"{indent}cache speed-up {result['speedup']:.1f}x (mean of the cache runs): goal "
        f">= {GOAL_SPEEDUP:g}x {verdict}"
    )
    return lines


def format_table(result: dict, shard_dir: Path) -> str:
    lines = [
        f"bench features: DTG-Net, {result['model']} student on {shard_dir}, teachers "
        f"{', '.join(result['teachers'])}; clips {result['clip']} (guidance {result['guidance']}), "
        f"batch {result['batch_size']}, threads {result['threads']}, workers {result['workers']}",
        f"  forward + backward + SGD step, {result['steps']} timed steps after {WARMUP_STEPS} "
        f"warm-up ({result['train_videos']} train videos = {result['batches_per_epoch']} "
        "batches per epoch)",
    ]
    lines += speed_lines(result, "guidance frames decoded + teachers online", "  ")
    lines.append(
        "  cached vs online guidance, first batch: max relative difference "
        f"{result['guidance_max_relative_difference']:.1e}"
    )
    for name, kib in result["cache_kib_per_1000_frames"].items():
        lines.append(f"  cache size {name}: {kib:,.1f} KiB per 1,000 frames")
    return "\n".join(lines)


def cache_kib_per_1000_frames(cache_dir: Path) -> float:
    """cache.json's bytes per 1,000 frames, in KiB."""
    path = Path(cache_dir) / "cache.json"
    try:
        summary = json.loads(path.read_text())
        return summary["bytes"] / max(summary["frames"], 1) * 1000 / 1024
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise DataError(f"{path}: cannot read the cache's bytes and frames ({err})") from err


def run(
    shard_dir: str | Path,
    *,
    teacher_paths: Mapping[str, str | Path],
    cache_dirs: Mapping[str, str | Path],
    **bench_args,
) -> dict:
    """bench_features with the project's teachers (model.pt files, pipeline.teachers.load_teacher)
    and their feature caches; `bench_args` are bench_features' keywords after `caches`."""
    if set(teacher_paths) != set(cache_dirs):
        raise ValueError(f"teachers {sorted(teacher_paths)} and caches {sorted(cache_dirs)} differ")
    names = list(teacher_paths)
    return bench_features(
        Path(shard_dir),
        teachers={name: load_teacher(teacher_paths[name]) for name in names},
        caches={name: FeatureCache(cache_dirs[name], shard_dir) for name in names},
        cache_kib_per_1000_frames={
            name: cache_kib_per_1000_frames(cache_dirs[name]) for name in names
        },
        **bench_args,
    )


def real_size_rates(budget: gpu.Budget, teachers: tuple[str, ...]) -> dict:
    """Clips/s of DTG training at real size on budget.device with cached guidance (before and
    after) and with `teachers` (ResNet-50s) run online on each clip's guidance frames."""
    frozen = {name: gpu.resnet50_teacher(name).to(budget.device) for name in teachers}

    def embed(frames: torch.Tensor) -> dict[str, torch.Tensor]:
        return embed_online(frames, frozen, budget.device)

    cache_rates = [gpu.dtg_clips_per_second(budget, teachers)]
    online_rate = gpu.dtg_clips_per_second(budget, teachers, embed)
    cache_rates.append(gpu.dtg_clips_per_second(budget, teachers))
    cache_rate = sum(cache_rates) / len(cache_rates)
    speedup = cache_rate / online_rate
    return {
        "batch_size": budget.clips,
        "steps": budget.steps,
        "warmup": budget.warmup,
        "cache_runs_clips_per_s": cache_rates,
        "cache_clips_per_s": cache_rate,
        "online_clips_per_s": online_rate,
        "speedup": speedup,
        "goal_met": speedup >= GOAL_SPEEDUP,
    }


def bench_features_real_size(
    *, steps: int, cpu_steps: int, threads: int, teachers: Sequence[str] = ALL_TEACHERS
) -> dict:
    """`bench features --real-size`: the same comparison at real size, with nothing on disk.

    The student is R3D-18 at torchvision's size on 16 x 112 x 112 clips, each teacher a ResNet-50
    with random weights at 224 px on the clip's 16 guidance frames (guidance "seq", 128 x 170 as
    UCF101's frames at ingest.short_side 128); clips, frames and cached embeddings are synthetic
    batches in memory (pipeline.bench.gpu.dtg_clips_per_second). Runs on the CPU (`cpu_steps`
    timed steps) and, where CUDA is, on the GPU (`steps`). Prints a table, returns the figures per
    device ("cuda": gpu.NO_CUDA without one).
    """
    teachers = tuple(teachers)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = {
            device: gpu.NO_CUDA if budget is None else real_size_rates(budget, teachers)
            for device, budget in gpu.budgets(steps, cpu_steps).items()
        }
    finally:
        torch.set_num_threads(threads_before)
    print(format_real_size(result, teachers, threads))
    return result


def format_real_size(result: dict, teachers: tuple[str, ...], threads: int) -> str:
    frames, crop, (height, width) = gpu.FRAMES, gpu.CROP, gpu.FRAME_SIZE
    lines = [
        f"bench features --real-size: DTG-Net, R3D-18 student (width 64, layers 2-2-2-2) on "
        f"{frames}x{crop}x{crop} clips; teachers {', '.join(teachers)}, each a "
        f"ResNet-50 (random weights) at 224 px on the {frames} guidance frames ({height}x{width}) "
        "of each clip",
        "  synthetic batches in memory: neither side reads shards or caches (training online "
        f"would also decode {frames} guidance frames a clip); forward + backward + SGD step, fp32",
    ]
    for device, name in gpu.DEVICE_NAMES.items():
        figures = result[device]
        if isinstance(figures, str):
            lines.append(f"  {name}: {figures}")
            continue
        where = f"{threads} threads" if device == "cpu" else torch.cuda.get_device_name()
        lines.append(
            f"  {name} ({where}): batch {figures['batch_size']}, {figures['steps']} timed steps "
            f"after {figures['warmup']} warm-up"
        )
        lines += speed_lines(figures, "guidance frames + teachers online", "    ")
    return "\n".join(lines)
