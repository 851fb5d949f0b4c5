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
"""

import json
from collections.abc import Iterator, Mapping
from contextlib import closing
from pathlib import Path

import numpy as np
import torch

from pipeline.bench import WARMUP_STEPS, epochs_of_batches, sgd_clips_per_second
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


def format_table(result: dict, shard_dir: Path) -> str:
    verdict = "met" if result["goal_met"] else "NOT met"
    lines = [
        f"bench features: DTG-Net, {result['model']} student on {shard_dir}, teachers "
        f"{', '.join(result['teachers'])}; clips {result['clip']} (guidance {result['guidance']}), "
        f"batch {result['batch_size']}, threads {result['threads']}, workers {result['workers']}",
        f"  forward + backward + SGD step, {result['steps']} timed steps after {WARMUP_STEPS} "
        f"warm-up ({result['train_videos']} train videos = {result['batches_per_epoch']} "
        "batches per epoch)",
    ]
    rows = [
        ("guidance from the feature cache", result["cache_runs_clips_per_s"][0]),
        ("guidance frames decoded + teachers online", result["online_clips_per_s"]),
        ("guidance from the feature cache", result["cache_runs_clips_per_s"][1]),
    ]
    width = max(len(what) for what, _ in rows)
    for what, rate in rows:
        lines.append(f"  {what:<{width}}  {rate:>8,.1f} clips/s")
    lines.append(
        f"  cache speed-up {result['speedup']:.1f}x (mean of the cache runs): goal "
        f">= {GOAL_SPEEDUP:g}x {verdict}"
    )
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
