"""Self-supervised DTG-Net pre-training of a video student on a dataset's unlabeled train videos.

`pretrain_dtg` trains pipeline.methods.dtg.DTG with pipeline.train.fit (checkpoints and resume
under run_dir/checkpoints) on GuidedClipDataset items of every train-split video of the split,
labels withheld, and writes into run_dir:
  model.pt             the student backbone (fit's {"model": state_dict, "meta"}), built without a
                       classifier, so pipeline.finetune.load_init starts a fine-tune from it with
                       the fine-tune's own fresh head
  metrics.json         fit's metrics plus the teachers, weighting, final mean weight per teacher,
                       the SSL videos and the per-epoch history (timings left out: reproducible)
  history.json         fit's per-epoch records (train_loss, train_ct, train_loss_<t>, train_w_<t>,
                       train_sim_<t>, timings)
  online_weights.csv   online weightings only: step, epoch, w_<teacher>... per training step
and, for online weightings, the Figure 3 plot at `figure`.
"""

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.clips import select_rows
from pipeline.data.guided import GuidedClipDataset
from pipeline.data.shards import read_manifest
from pipeline.errors import DataError
from pipeline.figures import online_weights_figure
from pipeline.io import atomic_path, write_json_atomic
from pipeline.methods.dtg import DTG, offline_weights
from pipeline.models import build_video_model
from pipeline.teachers.features import cache_keys, open_caches
from pipeline.train import TIMING_FIELDS, TrainSpec, fit, full_batch_loader, seed_everything

ONLINE = ("online1", "online2")


def teacher_weights(
    weighting: str, teachers: Sequence[str], offline_accuracies: Mapping[str, float] | None
) -> dict[str, float] | None:
    """The fixed weights of "offline" (softmax of the accuracies in percent), else None."""
    if weighting != "offline":
        return None
    missing = [name for name in teachers if name not in (offline_accuracies or {})]
    if missing:
        raise ValueError(f"weighting 'offline' needs single-teacher accuracies for {missing}")
    weights = offline_weights([offline_accuracies[name] for name in teachers])
    return {name: float(w) for name, w in zip(teachers, weights, strict=True)}


def write_weight_trace(
    path: Path, trace: np.ndarray, teachers: Sequence[str], steps_per_epoch: int
):
    """Per-step mean weights as CSV: step, epoch, w_<teacher>..."""
    table = pd.DataFrame(trace, columns=[f"w_{name}" for name in teachers])
    table.insert(0, "epoch", np.arange(len(trace)) // steps_per_epoch)
    table.insert(0, "step", np.arange(len(trace)))
    with atomic_path(path, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)


def pretrain_dtg(
    *,
    shard_dir: str | os.PathLike,
    caches: Mapping[str, str | os.PathLike],
    run_dir: str | os.PathLike,
    split: int,
    teachers: Sequence[str],
    weighting: str,
    offline_accuracies: Mapping[str, float] | None,
    model: dict,
    clips: dict,
    dtg: dict,
    train: dict,
    seed: int,
    threads: int,
    params: dict,
    figure: str | os.PathLike | None = None,
) -> dict:
    """Pre-train a student with DTG-Net; returns the metrics written to run_dir/metrics.json.

    caches: teacher name -> feature cache folder of these shards. teachers: the teachers used, in
    the order weights are reported. offline_accuracies: teacher -> top-1 (percent) of its
    single-teacher run, for weighting "offline". model: build_video_model's keywords plus `name`.
    clips: segments (T), crop, guidance ("img" | "seq"), overlap, flip (the anchor's). dtg: DTG's
    keywords tau, queue_size, proj_hidden, online1_temperature, online2_temperature. train:
    TrainSpec's fields plus batch_size, workers. params (the stage's declared params), the other
    arguments and the cache keys key the run, so a rerun resumes and other params or rebuilt
    caches start afresh.
    figure: where the Figure 3 plot of online weightings goes (None: no plot).
    """
    shard_dir, run_dir = Path(shard_dir), Path(run_dir)
    teachers = list(teachers)
    train = dict(train)
    batch_size = train.pop("batch_size")
    workers = train.pop("workers")
    spec = TrainSpec(**train, seed=seed, threads=threads)
    fixed = teacher_weights(weighting, teachers, offline_accuracies)

    manifest = read_manifest(shard_dir)
    rows = select_rows(manifest, f"split{split}", "train")
    dataset = GuidedClipDataset(
        shard_dir,
        rows=rows,
        caches=open_caches(caches, shard_dir, teachers),
        segments=clips["segments"],
        crop_size=clips["crop"],
        guidance=clips["guidance"],
        overlap=clips["overlap"],
        seed=seed,
        label_mask=np.zeros(len(manifest), dtype=bool),  # self-supervised: no labels at all
        flip=clips["flip"],
    )
    loader = full_batch_loader(
        dataset,
        batch_size=batch_size,
        seed=seed,
        num_workers=workers,
        device=spec.device,
        source=shard_dir,
    )

    seed_everything(seed)  # before building: initial weights and heads depend on the seed alone
    network = build_video_model(num_classes=0, **model)
    method = DTG(
        network,
        teachers=dataset.feature_dims,
        weighting=weighting,
        fixed_weights=fixed,
        queue_seed=seed,
        trace_steps=spec.epochs * len(loader) if weighting in ONLINE else 0,
        **dtg,
    )
    # Everything this function's result depends on keys the run, whatever `params` holds.
    run_params = {
        "params": params,
        "split": split,
        "teachers": teachers,
        "weighting": weighting,
        "fixed_weights": fixed,
        "model": model,
        "clips": clips,
        "dtg": dtg,
        "batch_size": batch_size,
        "cache_keys": cache_keys(caches, teachers),
    }
    metrics = fit(method, loader, run_dir=run_dir, params=run_params, spec=spec)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes, as in fit
        return metrics

    history = json.loads((run_dir / "history.json").read_text())
    last = history[-1]
    metrics |= {
        "teachers": teachers,
        "weighting": weighting,
        "weights": {name: last[f"train_w_{name}"] for name in teachers},
        "offline_weights": fixed,
        "pretrain_videos": len(dataset),
        "steps_per_epoch": len(loader),
        "history": [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in history],
    }
    if weighting in ONLINE:
        csv = run_dir / "online_weights.csv"
        write_weight_trace(csv, method.trace(), teachers, len(loader))
        if figure is not None:
            online_weights_figure(
                csv, teachers, figure, title=f"DTG-Net {weighting} weights over training"
            )
    write_json_atomic(run_dir / "metrics.json", metrics)
    return metrics


def single_teacher_accuracies(run_dirs: Mapping[str, Path], source: str) -> dict[str, float]:
    """Each teacher's top-1 (percent) from its fine-tuned single-teacher run: the final
    validation clip top-1 ("val": model selection never sees the test split) or the test video
    top-1 ("test": what the paper's offline weights used)."""
    accuracies = {}
    for teacher, run_dir in run_dirs.items():
        path = Path(run_dir) / "metrics.json"
        try:
            metrics = json.loads(path.read_text())
            value = (
                metrics["val"]["clip_top1"] if source == "val" else metrics["test"]["video_top1"]
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(
                f"{path}: no {source} top-1 for the offline weights ({err!r})"
            ) from None
        accuracies[teacher] = 100.0 * float(value)
    return accuracies
