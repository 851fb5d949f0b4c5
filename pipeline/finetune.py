"""One supervised training run on a dataset's shards: data, model, method, fit, test.

The `train` stage calls `train_run`; every supervised method (the baseline, Teaching Yourself, and
later the fine-tuning of pretrained students) goes through it, so they share splits, clips,
evaluation and outputs. Model selection never sees the test split: validation is carved from the
train split by group (pipeline.data.splits.carve_validation).
"""

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.dag import RunSpec
from pipeline.data.augment import VideoAugment
from pipeline.data.clips import ClipDataset
from pipeline.data.guided import GuidedClipDataset
from pipeline.data.samplers import DenseSampler, UniformClipsSampler
from pipeline.data.shards import read_manifest
from pipeline.data.splits import carve_validation
from pipeline.errors import DataError
from pipeline.evaluate import calibrate_batchnorm, confusion_figure, evaluate, linear_probe
from pipeline.figures import extract_features
from pipeline.io import file_sha256, write_json_atomic
from pipeline.methods.dtg import DTG
from pipeline.methods.selfkd import TeachingYourself
from pipeline.methods.supervised import Supervised
from pipeline.methods.timebalance import TimeBalanceStudent
from pipeline.models import build_video_model
from pipeline.models.inflate import inflate_resnet2d_into_r3d
from pipeline.models.video import VideoResNet
from pipeline.teachers.features import cache_keys, open_caches
from pipeline.timebalance import StudentClipDataset, read_scores
from pipeline.train import TrainSpec, fit, load_checkpoint, make_loader, seed_everything

METHODS = ("supervised", "selfkd")


@dataclass(frozen=True)
class ClipSpec:
    frames: int  # frames per clip
    stride: int  # temporal stride between them
    crop: int  # square crop side, pixels
    test_clips: int  # K uniformly spaced clips per test video
    three_crop: bool  # x 3 spatial crops per clip at test time


def _build_method(run: RunSpec, model: torch.nn.Module, selfkd: dict):
    if run.method == "supervised":
        return Supervised(model)
    if run.method == "selfkd":
        return TeachingYourself(
            model,
            tau=run.tau,
            lam=run.lam,
            teacher_init=selfkd.teacher_init,
            tau_squared=run.tau_squared,
            teacher_seed=run.seed,
        )
    raise ValueError(f"unknown method {run.method!r}; choose from {METHODS}")


def load_teacher_init(network: torch.nn.Module, path: Path) -> None:
    """Start `network` from a 2D teacher's weights (pipeline.teachers' model.pt): inflated into a
    3D ResNet (I3D-style, "average" kernels), or loaded as they are into a TSN's 2D ResNet. The
    classifier stays freshly initialised; any other mismatch is a DataError."""
    from pipeline.teachers import read_teacher_checkpoint

    state = read_teacher_checkpoint(path)["state_dict"]
    if not isinstance(network, VideoResNet):
        load_backbone(network, state, path)
        return
    try:
        inflate_resnet2d_into_r3d(
            {k: v for k, v in state.items() if not k.startswith("fc.")}, network
        )
    except ValueError as err:
        raise DataError(f"{path}: teacher weights do not fit the student: {err}") from None


def load_init(network: torch.nn.Module, path: Path) -> None:
    """Start `network` from a model.pt; a classifier of another shape stays freshly initialised."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        teacher = isinstance(checkpoint, dict) and "format" in checkpoint
        kind = "a teacher checkpoint: use --init-teacher" if teacher else "no weights"
        raise DataError(f"{path}: not a run's model.pt ({kind})")
    load_backbone(network, checkpoint["model"], path)


def load_backbone(network: torch.nn.Module, state: dict, path: Path) -> None:
    """Load every weight of `state` but a classifier (fc.*) of another shape; DataError naming
    `path` for anything else that does not fit."""
    own = network.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if any(not k.startswith("fc.") for k in mismatched):
        raise DataError(f"{path}: weights do not fit the network: {mismatched[:5]}")
    result = network.load_state_dict(
        {k: v for k, v in state.items() if k not in mismatched}, strict=False
    )
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise DataError(
            f"{path}: weights do not fit the network: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def split_rows(
    manifest: pd.DataFrame,
    split_col: str,
    val_fraction: float,
    seed: int,
    labeled_percent: int | None = None,
) -> dict:
    """Row numbers of train (minus validation), validation and test videos. labeled_percent:
    train only on the ingest's class-stratified `labeled_<percent>` subset (None or 100: all)."""
    val = carve_validation(manifest, split_col, val_fraction, seed).to_numpy()
    train = (manifest[split_col] == "train").to_numpy()
    test = (manifest[split_col] == "test").to_numpy()
    if labeled_percent not in (None, 100):
        column = f"labeled_{labeled_percent}"
        if column not in manifest.columns:
            raise DataError(f"the shards have no {column} subset: add {labeled_percent} to "
                            "ingest.percents and rerun ingest")  # fmt: skip
        train = train & manifest[column].to_numpy(bool)
    return {
        "train": np.flatnonzero(train & ~val),
        "val": np.flatnonzero(val),
        "test": np.flatnonzero(test),
    }


def train_clip_dataset(
    shard_dir: Path,
    rows: np.ndarray,
    *,
    frames: int,
    stride: int,
    crop: int,
    seed: int,
    augment: VideoAugment | None = None,
) -> ClipDataset:
    """A run's training clips: random crop and flip, or random crop and `augment`, which has its
    own flip op (flipping twice would undo it half the time)."""
    return ClipDataset(
        shard_dir,
        rows=rows,
        sampler=DenseSampler(frames, stride, train=True),
        crop_size=crop,
        train=True,
        seed=seed,
        flip=augment is None,
        augment=augment,
    )


def test_clip_dataset(shard_dir: Path, rows: np.ndarray, clips: ClipSpec) -> ClipDataset:
    """Video-level testing: K uniformly spaced clips per video (x 3 crops with three_crop)."""
    return ClipDataset(
        shard_dir,
        rows=rows,
        sampler=UniformClipsSampler(clips.test_clips, clips.frames, clips.stride),
        crop_size=clips.crop,
        train=False,
        three_crop=clips.three_crop,
    )


def test_features(
    shard_dir: Path, model_path: Path, *, model: dict, clips: ClipSpec, split: int, threads: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A trained run's pooled test-split features (views averaged), labels and class names."""
    torch.set_num_threads(threads)
    manifest = read_manifest(shard_dir)
    rows = np.flatnonzero((manifest[f"split{split}"] == "test").to_numpy())
    network = build_video_model(num_classes=int(manifest["label"].max()) + 1, **model)
    load_init(network, model_path)
    loader = make_loader(
        test_clip_dataset(shard_dir, rows, clips),
        batch_size=32,
        shuffle=False,
        seed=0,
        distributed=False,
    )
    features, labels = extract_features(network, loader)
    names = list(manifest.drop_duplicates("label").sort_values("label")["label_name"])
    return features, labels, names


def train_run(
    shard_dir: Path,
    run_dir: Path,
    *,
    run: RunSpec,
    split: int,
    clips: ClipSpec,
    model: dict,
    train: dict,
    augment: dict | None,
    selfkd=None,  # the `selfkd` params section, for selfkd runs
    threads: int,
    params: dict,
    init: Path | None = None,
    init_teacher: Path | None = None,
    labeled_percent: int | None = None,
    guided: dict | None = None,
    student: dict | None = None,
) -> dict:
    """Train one run and test it; writes run_dir/{model.pt, metrics.json, confusion.png}.

    `model` holds build_video_model's keywords plus `name`; `train` holds TrainSpec's fields plus
    batch_size, val_fraction, workers. `params` (the stage's declared params and the run) keys the
    run directory, so a rerun with the same params resumes and other params start afresh. `init`:
    a model.pt (from this pipeline) whose weights start the network; its classifier is replaced
    when the class count differs. init_teacher: a teacher's model.pt whose 2D weights start the
    network (load_teacher_init). labeled_percent: train on that labeled subset of the train split.
    guided: supervised DTG (alpha L_CT + beta L_CE, pipeline.methods.dtg) with keys caches
    (teacher -> feature cache folder), segments, guidance, overlap, flip, alpha, beta, tau,
    queue_size, proj_hidden; its training clips are GuidedClipDataset's sparse sequences.
    student: TimeBalance's semi-supervised student (pipeline.methods.timebalance) with keys
    teachers (kind -> fine-tuned teacher model.pt), scores (the similarity stage's parquet) and
    TimeBalanceStudent's keywords variant ("teachers"), reweight, distance, class_reduction,
    omega_labeled, omega_unlabeled; it trains on the labeled subset and the other train videos.
    """
    train = dict(train)
    batch_size = train.pop("batch_size")
    val_fraction = train.pop("val_fraction")
    workers = train.pop("workers")
    spec = TrainSpec(**train, seed=run.seed, threads=threads)
    torch.set_num_threads(threads)
    split_col = f"split{split}"
    manifest = read_manifest(shard_dir)
    # One validation carve for every run and seed, so runs differ only in what they declare.
    rows = split_rows(manifest, split_col, val_fraction, seed=0, labeled_percent=labeled_percent)
    num_classes = int(manifest["label"].max()) + 1

    if student is not None:
        everything = split_rows(manifest, split_col, val_fraction, seed=0)["train"]
        train_set = StudentClipDataset(
            shard_dir,
            labeled_rows=rows["train"],
            unlabeled_rows=np.setdiff1d(everything, rows["train"]),
            scores=read_scores(student["scores"], shard_dir),
            sampler=DenseSampler(clips.frames, clips.stride, train=True),
            crop_size=clips.crop,
            seed=run.seed,
            flip=True,
        )
        inputs = {"scores": student["scores"], **student["teachers"]}
        params = {**params, "inputs_sha256": {k: file_sha256(p) for k, p in inputs.items()}}
    elif guided is None:
        train_set = train_clip_dataset(
            shard_dir,
            rows["train"],
            frames=clips.frames,
            stride=clips.stride,
            crop=clips.crop,
            seed=run.seed,
            augment=VideoAugment(**augment) if run.augment else None,
        )
    else:
        teachers = sorted(guided["caches"])
        train_set = GuidedClipDataset(
            shard_dir,
            rows=rows["train"],
            caches=open_caches(guided["caches"], shard_dir, teachers),
            segments=guided["segments"],
            crop_size=clips.crop,
            guidance=guided["guidance"],
            overlap=guided["overlap"],
            seed=run.seed,
            flip=guided["flip"],
        )
        params = {**params, "cache_keys": cache_keys(guided["caches"], teachers)}
    val_set = ClipDataset(
        shard_dir,
        rows=rows["val"],
        sampler=DenseSampler(clips.frames, clips.stride, train=False),
        crop_size=clips.crop,
        train=False,
    )
    test_set = test_clip_dataset(shard_dir, rows["test"], clips)
    loader_args = {"batch_size": batch_size, "seed": run.seed, "num_workers": workers}
    train_loader = make_loader(train_set, shuffle=True, drop_last=True, **loader_args)
    val_loader = make_loader(val_set, shuffle=False, distributed=False, **loader_args)
    test_loader = make_loader(test_set, shuffle=False, distributed=False, **loader_args)

    seed_everything(run.seed)  # before building, so initial weights depend on the seed alone
    network = build_video_model(num_classes=num_classes, **model)
    if init is not None:
        load_init(network, init)
        params = {**params, "init_sha256": file_sha256(init)}
    if init_teacher is not None:
        load_teacher_init(network, init_teacher)
        params = {**params, "init_sha256": file_sha256(init_teacher)}
    if student is not None:
        teachers = {}
        for kind, path in student["teachers"].items():
            teachers[f"{kind}_teacher"] = build_video_model(num_classes=num_classes, **model)
            load_init(teachers[f"{kind}_teacher"], path)
        options = ("reweight", "distance", "class_reduction", "omega_labeled", "omega_unlabeled")
        method = TimeBalanceStudent(
            network,
            **teachers,
            teachers=student["variant"],
            **{k: student[k] for k in options},
        )
    elif guided is None:
        method = _build_method(run, network, selfkd)
    else:
        method = DTG(
            network,
            teachers=train_set.feature_dims,
            supervised=True,
            queue_seed=run.seed,
            **{k: guided[k] for k in ("alpha", "beta", "tau", "queue_size", "proj_hidden")},
        )
    probe = initial_probe(network, shard_dir, rows, clips, loader_args, seed=run.seed)
    history = fit(
        method,
        train_loader,
        val_loader=val_loader,
        run_dir=run_dir,
        params={**params, "run": asdict(run)},
        spec=spec,
    )
    device = next(network.parameters()).device
    test = evaluate(network, test_loader, num_classes=num_classes, device=device, multi_view=True)
    names = list(manifest.drop_duplicates("label").sort_values("label")["label_name"])
    confusion_figure(
        test.pop("video_confusion"), names, run_dir / "confusion.png", title=run_dir.name
    )
    test.pop("clip_confusion")
    metrics = {**history, "test": test, "init_probe": probe, "class_names": names}
    metrics["splits"] = _sizes(rows)
    write_json_atomic(run_dir / "metrics.json", metrics)
    return metrics


def initial_probe(
    network, shard_dir: Path, rows: dict, clips: ClipSpec, loader_args: dict, seed: int
):
    """The initial network's frozen features under a linear probe (fit on the run's training
    videos, scored on its test videos): what pretraining put into them. On a copy whose
    BatchNorm statistics are calibrated on the probe's training clips first, so that a random
    initialisation is not handicapped by its placeholder statistics (calibrate_batchnorm)."""
    probe_clips = ClipSpec(**{**asdict(clips), "three_crop": False})

    def loader(part: str):
        dataset = test_clip_dataset(shard_dir, rows[part], probe_clips)
        return make_loader(dataset, shuffle=False, distributed=False, **loader_args)

    frozen = copy.deepcopy(network)
    calibrate_batchnorm(frozen, loader("train"))
    return linear_probe(*(extract_features(frozen, loader(part)) for part in ("train", "test")),
                        seed=seed)  # fmt: skip


def _sizes(rows: dict) -> dict:
    return {name: len(indices) for name, indices in rows.items()}
