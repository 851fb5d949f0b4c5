"""The `teacher` stage: one teacher's model.pt and metrics.json, whatever its source.

synthetic  trained from scratch on its still-image set (the embedded default)
finetune   trained on a real image set (BU101, Stanford40) from the imagenet teacher's weights
torchvision / places365 / schp
           an official checkpoint imported into this project's networks and checkpoint format;
           its own accuracy is not measured here (the official image sets are not part of the
           pipeline): metrics.json records the source and the official training-set size
"""

from pathlib import Path

from pipeline.io import write_json_atomic
from pipeline.teachers import TEACHER_KINDS, default_preprocess, save_teacher

# Training images of the official checkpoints (DTG-Net Table 3's DataSize; LIP for SCHP).
OFFICIAL_TRAIN_SIZES = {"torchvision": 1_281_167, "places365": 1_803_460, "schp": 30_462}


def synthetic_arch(name: str, synthetic: dict) -> dict:
    """The small network of a synthetic teacher (params.yaml teachers.synthetic)."""
    if TEACHER_KINDS[name] == "parsing":
        return {"type": "tiny_parsing", "width": synthetic["parser_width"]}
    return {
        "type": "resnet_2d",
        "name": "resnet18",
        "width": synthetic["width"],
        "layers": list(synthetic["layers"]),
        "stem_stride": synthetic["stem_stride"],
        "stem_pool": False,
    }


def import_official(name: str, cfg: dict, out_dir: Path) -> dict:
    from pipeline.teachers.sources import import_teacher

    imported = import_teacher(
        cfg["source"],
        path=cfg["checkpoint"] or None,
        arch=cfg["arch"],
        label_set=cfg["label_set"],
        categories=cfg["categories"] or None,
    )
    save_teacher(
        out_dir / "model.pt",
        name=name,
        kind=imported.kind,
        arch=imported.arch,
        preprocess=imported.preprocess,
        classes=imported.classes,
        state_dict=imported.network.state_dict(),
        source=imported.source,
    )
    metrics = {
        "teacher": name,
        "source": imported.source,
        "kind": imported.kind,
        "train_size": OFFICIAL_TRAIN_SIZES[cfg["source"]],
        "eval_size": 0,
        "num_classes": len(imported.classes),
        "input_size": imported.preprocess.size,
        "note": "official checkpoint: accuracy not measured by this pipeline",
    }
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


def make_teacher(
    name: str,
    cfg: dict,
    *,
    synthetic: dict,
    images: Path,
    out_dir: Path,
    init: Path,
    threads: int,
    seed: int = 0,
    identity: dict | None = None,
) -> dict:
    """Build teacher `name` per its params (teachers.<name>) into out_dir; returns its metrics.
    images: its image set's folder; init: the imagenet teacher's model.pt (source finetune);
    identity: what else keys a trained teacher's run (the stage's code and inputs)."""
    if cfg["source"] in OFFICIAL_TRAIN_SIZES:
        return import_official(name, cfg, out_dir)
    from pipeline.teachers.train_teacher import train_teacher

    finetune = cfg["source"] == "finetune"
    train = {
        "epochs": cfg["epochs"],
        "val_every": cfg["epochs"],  # the held-out score once, at the end: it selects nothing
        "lr": synthetic["lr"],
        "batch_size": cfg["batch_size"],
        "optimizer": "sgd",
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "cosine",
    }
    return train_teacher(
        name=name,
        images=images,
        run_dir=out_dir,
        arch=None if finetune else synthetic_arch(name, synthetic),
        preprocess=default_preprocess(name, size=cfg["input_size"]),
        train=train,
        seed=seed,
        threads=threads,
        params={"crop_fraction": 1.0} if TEACHER_KINDS[name] == "parsing" else {},
        init=init if finetune else None,
        identity=identity,
    )
