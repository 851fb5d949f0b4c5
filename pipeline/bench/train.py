"""`python -m pipeline bench train`: training fed by the shard loader vs batches already in memory.

Both sides run the same supervised step (forward + cross-entropy + backward + SGD step of a freshly
seeded model, as pipeline.train.fit does on CPU) with the same thread count:
(a) batches from the shard loader: a ClipDataset over the run's train rows (train split minus
    validation, as pipeline.finetune.train_run), with its training sampler, random crop and flip,
    through pipeline.train.make_loader, once per DataLoader worker count;
(b) batches of the same dataset collected beforehand and cycled, so no loading is timed.
The loader's cost is (b - a) / b of the throughput, b being the mean of the in-memory runs just
before and after that loader run (other processes on shared cores shift all rates). As in fit, the
loader side runs epoch after epoch (make_loader keeps ClipDataset's workers alive across epochs;
the table says how many batches an epoch has).
"""

import itertools
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import torch

from pipeline.bench import WARMUP_STEPS, epochs_of_batches, sgd_clips_per_second
from pipeline.data.shards import read_manifest
from pipeline.errors import DataError
from pipeline.finetune import split_rows, train_clip_dataset
from pipeline.methods.supervised import Supervised
from pipeline.models import build_video_model
from pipeline.train import full_batch_loader, seed_everything

GOAL_MAX_LOADER_COST = 10.0  # percent of the in-memory throughput
IN_MEMORY_BATCHES = 4  # distinct batches cycled on side (b)


def training_clips_per_second(
    batches: Iterator[dict], *, model: dict, num_classes: int, steps: int, seed: int
) -> float:
    """Clips/s of `steps` supervised SGD steps on the next batches, after WARMUP_STEPS untimed
    ones; the time includes waiting for each batch."""
    seed_everything(seed)
    method = Supervised(build_video_model(num_classes=num_classes, **model))
    return sgd_clips_per_second(method, batches, steps)


def bench_train(
    shard_dir: Path,
    *,
    frames: int,
    stride: int,
    crop: int,
    model: dict,
    batch_size: int,
    steps: int,
    threads: int,
    workers: tuple[int, ...] = (0, 1),
    split: int = 1,
    val_fraction: float = 0.15,
    seed: int = 0,
) -> dict:
    """Time (a) the shard loader per worker count in `workers`, each between two runs of (b)
    batches in memory, on CPU; print a table and return the figures. `model` holds
    build_video_model's keywords plus `name`; `split` and `val_fraction` pick the train rows as a
    training run does (the dataset's split and train.val_fraction)."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    rows = split_rows(manifest, f"split{split}", val_fraction, seed=0)["train"]
    # The training set of a supervised run without augmentation, as train_run builds it.
    dataset = train_clip_dataset(
        shard_dir, rows, frames=frames, stride=stride, crop=crop, seed=seed
    )
    batches_per_epoch = len(dataset) // batch_size  # drop_last, as train_run's loader
    if batches_per_epoch == 0:
        raise DataError(
            f"{shard_dir}: split{split} has {len(dataset)} train videos after validation, fewer "
            f"than one batch of {batch_size}"
        )
    num_classes = int(dataset.store.labels.max()) + 1
    timing = {"model": model, "num_classes": num_classes, "steps": steps, "seed": seed}

    def loader(num_workers: int):
        return full_batch_loader(
            dataset, batch_size=batch_size, seed=seed, num_workers=num_workers, device="cpu",
            source=shard_dir,
        )  # fmt: skip

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with closing(epochs_of_batches(loader(0), seed)) as source:
            in_memory = list(itertools.islice(source, IN_MEMORY_BATCHES))

        def in_memory_rate() -> float:
            return training_clips_per_second(itertools.cycle(in_memory), **timing)

        # In-memory runs bracket every loader run, and each loader run is compared with the mean
        # of the two around it: other processes on shared cores shift all rates over a run.
        in_memory_rates = [in_memory_rate()]
        runs = {}
        for count in workers:
            # closing() ends the epoch's worker processes when timing stops mid-epoch.
            with closing(epochs_of_batches(loader(count), seed)) as source:
                rate = training_clips_per_second(source, **timing)
            in_memory_rates.append(in_memory_rate())
            reference = (in_memory_rates[-2] + in_memory_rates[-1]) / 2
            cost = 100.0 * (reference - rate) / reference
            runs[count] = {
                "clips_per_s": rate,
                "in_memory_clips_per_s": reference,
                "loader_cost_percent": cost,
                "goal_met": cost <= GOAL_MAX_LOADER_COST,
            }
    finally:
        torch.set_num_threads(threads_before)
    result = {
        "model": model["name"],
        "clip": f"{frames}x{crop}x{crop}",
        "stride": stride,
        "batch_size": batch_size,
        "threads": threads,
        "steps": steps,
        "train_videos": len(dataset),
        "batches_per_epoch": batches_per_epoch,
        "in_memory_runs_clips_per_s": in_memory_rates,
        "loader_by_workers": runs,
        "goal_max_loader_cost_percent": GOAL_MAX_LOADER_COST,
    }
    print(format_table(result, shard_dir))
    return result


def format_table(result: dict, shard_dir: Path) -> str:
    """The runs in the order they ran: clips/s, and for the loader its cost and the goal."""
    in_memory = result["in_memory_runs_clips_per_s"]
    rows = [("batches in memory, cycled", in_memory[0], "")]
    for (count, run), after in zip(result["loader_by_workers"].items(), in_memory[1:], strict=True):
        verdict = "met" if run["goal_met"] else "NOT met"
        rows.append(
            (
                f"shard loader, workers={count}",
                run["clips_per_s"],
                f"loader cost {run['loader_cost_percent']:5.1f}% of "
                f"{run['in_memory_clips_per_s']:,.1f} (runs around it): goal {verdict}",
            )
        )
        rows.append(("batches in memory, cycled", after, ""))
    lines = [
        f"bench train: {result['model']} on {shard_dir}, clips {result['clip']} (stride "
        f"{result['stride']}), batch {result['batch_size']}, threads {result['threads']}",
        f"  forward + backward + SGD step, {result['steps']} timed steps after {WARMUP_STEPS} "
        f"warm-up; {result['train_videos']} train videos = {result['batches_per_epoch']} "
        "batches per epoch (loader workers persist across epochs)",
        f"  goal: the loader costs at most {GOAL_MAX_LOADER_COST:g}% of the in-memory throughput",
    ]
    width = max(len(row[0]) for row in rows)
    for what, rate, note in rows:
        lines.append(f"  {what:<{width}}  {rate:>8,.1f} clips/s  {note}".rstrip())
    spread = 100.0 * (max(in_memory) - min(in_memory)) / max(in_memory)
    if spread > GOAL_MAX_LOADER_COST:
        lines.append(
            f"  the in-memory runs differ by {spread:.0f}%: other processes share the cores, so "
            "the costs above are that uncertain; rerun on idle cores"
        )
    return "\n".join(lines)
