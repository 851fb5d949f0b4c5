"""Train one teacher on its still-image set with the project's one trainer, and save it.

train_teacher(...) reads the teacher's images (pipeline.teachers.images), trains with
pipeline.train.fit (checkpoints and resume under run_dir/checkpoints/), evaluates on the held-out
split (top-1, or mIoU for the parser) and writes run_dir/model.pt (pipeline.teachers.save_teacher)
and run_dir/metrics.json. From scratch, or fine-tuned from another teacher's model.pt (`init`):
in the real-data setting BU101 and Stanford40 teachers start from the ImageNet one.
"""

import logging
import os
from pathlib import Path

import torch

from pipeline.errors import DataError
from pipeline.io import file_sha256, write_json_atomic
from pipeline.methods.supervised import Supervised
from pipeline.teachers import (
    TEACHER_KINDS,
    TEACHER_NAMES,
    build_network,
    read_teacher_checkpoint,
    save_teacher,
)
from pipeline.teachers.base import Preprocess
from pipeline.teachers.images import (
    ImageClassificationDataset,
    ParsingDataset,
    read_teacher_images,
)
from pipeline.teachers.parsing import PartSegmentation, segmentation_metrics
from pipeline.train import TrainSpec, canonical_json, fit, make_loader, seed_everything

log = logging.getLogger(__name__)

# Teacher-specific knobs (the `params` argument) and their defaults. crop_fraction: side of the
# square crop (random when training, centred when testing) as a fraction of the shorter image
# side; test_fraction / split_seed: BU101's held-out carve (it has no official split).
DEFAULT_PARAMS = {
    "crop_fraction": 0.875,
    "flip": True,
    "label_smoothing": 0.0,
    "test_fraction": 0.2,
    "split_seed": 0,
}


def train_teacher(
    *,
    name: str,
    images: str | os.PathLike,
    run_dir: str | os.PathLike,
    arch: dict | None,
    preprocess: Preprocess,
    train: dict,
    seed: int,
    threads: int,
    params: dict,
    init: str | os.PathLike | None = None,
    identity: dict | None = None,
) -> dict:
    """Train teacher `name` on its image set in folder `images`; returns metrics. identity:
    anything else that keys the run (pipeline.cli.run_identity: code and inputs).

    arch: builder kwargs with "type" (pipeline.teachers.build_network; num_classes comes from
    the data); None takes init's arch. train: TrainSpec fields (not seed/threads) plus
    batch_size and workers. params: keys of DEFAULT_PARAMS. init: a teacher model.pt to
    fine-tune from: every weight but the class head (whose shape differs) is copied.
    """
    if name not in TEACHER_NAMES:
        raise ValueError(f"unknown teacher {name!r}; choose from {TEACHER_NAMES}")
    unknown = sorted(set(params) - set(DEFAULT_PARAMS))
    if unknown:
        raise ValueError(f"unknown teacher params {unknown}; known: {sorted(DEFAULT_PARAMS)}")
    options = {**DEFAULT_PARAMS, **params}
    kind = TEACHER_KINDS[name]
    run_dir = Path(run_dir)
    train = dict(train)
    batch_size = int(train.pop("batch_size"))
    workers = int(train.pop("workers", 0))
    spec = TrainSpec(**train, seed=seed, threads=threads)

    folder = Path(images)
    images = read_teacher_images(
        name,
        folder,
        test_fraction=options["test_fraction"],
        split_seed=options["split_seed"],
    )
    init_checkpoint = read_teacher_checkpoint(init) if init is not None else None
    arch = _resolve_arch(arch, init_checkpoint, init)
    if init_checkpoint is not None and canonical_json(init_checkpoint["preprocess"]) != (
        canonical_json(preprocess.as_dict())
    ):
        log.warning(
            "fine-tuning %s from %s with other preprocessing: %s, not its %s",
            name,
            init,
            preprocess.as_dict(),
            init_checkpoint["preprocess"],
        )
    data = {"preprocess": preprocess, "crop_fraction": options["crop_fraction"]}
    if kind == "parsing":
        data["num_classes"] = len(images.classes)
        dataset_class = ParsingDataset
    else:
        dataset_class = ImageClassificationDataset
    train_set = dataset_class(images.train, train=True, seed=seed, flip=options["flip"], **data)
    test_set = dataset_class(images.test, train=False, **data)
    loader_args = {"batch_size": batch_size, "seed": seed, "num_workers": workers}
    train_loader = make_loader(train_set, shuffle=True, **loader_args)
    test_loader = make_loader(test_set, shuffle=False, distributed=False, **loader_args)

    seed_everything(seed)  # before building: reproducible initial weights
    network = build_network(arch, len(images.classes))
    if init_checkpoint is not None:
        _copy_backbone(network, init_checkpoint, init)
    if kind == "parsing":
        method = PartSegmentation(network)
    else:
        method = Supervised(network, label_smoothing=options["label_smoothing"])
    source = (
        {"kind": "finetuned", "path": str(init), "sha256": file_sha256(init)}
        if init is not None
        else {
            "kind": "synthetic",
            "path": str(folder),
            "sha256": "",
        }
    )
    run_params = {  # what the run key covers: everything that changes the result
        "teacher": name,
        "arch": arch,
        "preprocess": preprocess.as_dict(),
        "batch_size": batch_size,
        "options": options,
        "init_sha256": source["sha256"],
        "classes": list(images.classes),
        "train_size": len(images.train),
        "eval_size": len(images.test),
        "identity": identity,
    }
    fitted = fit(
        method,
        train_loader,
        val_loader=test_loader if kind == "classifier" else None,
        run_dir=run_dir,
        params=run_params,
        spec=spec,
    )
    metrics = {
        "teacher": name,
        "source": source,
        "kind": kind,
        "train_size": len(images.train),
        "eval_size": len(images.test),
        "num_classes": len(images.classes),
        "feature_dim": int(network.feature_dim),
        "num_parameters": sum(p.numel() for p in network.parameters()),
        "input_size": preprocess.size,
        "run_key": fitted["run_key"],
        "epochs": spec.epochs,
        "seed": seed,
        "last_epoch": fitted["last_epoch"],
    }
    if kind == "classifier":
        val = fitted["val"]
        metrics |= {
            "top1": 100 * val["clip_top1"],
            "top5": 100 * val["clip_top5"],
            "mean_class_acc": 100 * val["clip_mean_class_acc"],
            "per_class_acc": val["clip_per_class_acc"],
        }
    else:
        device = next(network.parameters()).device
        seg = segmentation_metrics(
            network, test_loader, num_classes=len(images.classes), device=device
        )
        metrics |= {
            "miou": 100 * seg["miou"],
            "pixel_acc": 100 * seg["pixel_acc"],
            "per_class_iou": seg["per_class_iou"],
        }
    if int(os.environ.get("RANK", "0")) == 0:
        # Replaces fit's own model.pt / metrics.json with the teacher checkpoint and metrics.
        save_teacher(
            run_dir / "model.pt",
            name=name,
            kind=kind,
            arch=arch,
            preprocess=preprocess,
            classes=images.classes,
            state_dict=network.state_dict(),
            source=source,
        )
        write_json_atomic(run_dir / "metrics.json", metrics)
    log.info("teacher %s: %s", name, {k: metrics[k] for k in ("top1", "miou") if k in metrics})
    return metrics


def _resolve_arch(arch: dict | None, init_checkpoint: dict | None, init) -> dict:
    """The arch to build: as given, or init's; with both they must agree (but for num_classes)."""
    if init_checkpoint is None:
        if arch is None:
            raise ValueError("arch is required when training from scratch (init is None)")
        return dict(arch)
    init_arch = {k: v for k, v in init_checkpoint["arch"].items() if k != "num_classes"}
    requested = {k: v for k, v in (arch or {}).items() if k != "num_classes"}
    if arch is not None and canonical_json(requested) != canonical_json(init_arch):
        raise DataError(f"{init}: its arch {init_arch} differs from the requested {arch}")
    return init_arch


def _copy_backbone(network: torch.nn.Module, init_checkpoint: dict, init) -> None:
    """Copy init's weights into `network`, leaving out only tensors whose shape differs (the class
    head for another label set); any other mismatch is a DataError naming the file."""
    own = network.state_dict()
    theirs = init_checkpoint["state_dict"]
    if set(own) != set(theirs):
        raise DataError(f"{init}: its weights do not match the network's parameter names")
    kept = {k: v for k, v in theirs.items() if v.shape == own[k].shape}
    skipped = sorted(set(own) - set(kept))
    network.load_state_dict({**own, **kept})
    log.info("initialised from %s; fresh: %s", init, skipped or "nothing")
