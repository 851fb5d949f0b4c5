"""Official teacher checkpoints -> this project's teacher parts (network, arch, preprocessing, ...).

Three public sources, each read from a file that is already on disk (nothing is downloaded):
- torchvision ImageNet ResNet-18/50 (`resnet18-f37072fd.pth`, ...), from an explicit path or the
  torch hub cache (TORCH_HOME/hub/checkpoints);
- CSAILVision Places365 ResNet-18/50 (`resnet18_places365.pth.tar`), with its categories file;
- SCHP human parsers (`exp-schp-201908261155-{lip,atr,pascal-person-part}.pth`).
Each importer returns an `ImportedTeacher` whose fields are what `save_teacher` stores; the
`source` entry records the official file's sha256, so a feature cache knows which weights it came
from whatever the file is called.
"""

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights

from pipeline.errors import DataError
from pipeline.io import file_sha256
from pipeline.models import resnet_2d
from pipeline.teachers.base import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from pipeline.teachers.schp import SCHP_LABEL_SETS, build_schp

# torchvision's ImageNet weights per architecture, in the order the cache is searched
TORCHVISION_WEIGHTS = {
    "resnet18": (ResNet18_Weights.IMAGENET1K_V1,),
    "resnet50": (ResNet50_Weights.IMAGENET1K_V1, ResNet50_Weights.IMAGENET1K_V2),
}
PLACES365_CLASSES = 365
SCHP_MEAN_BGR = (0.406, 0.456, 0.485)  # ImageNet statistics in SCHP's BGR channel order
SCHP_STD_BGR = (0.225, 0.224, 0.229)
SOURCE_KINDS = ("torchvision", "places365", "schp")


@dataclass(frozen=True)
class ImportedTeacher:
    """An official checkpoint loaded into this project's network, with what describes it."""

    kind: str  # "classifier" | "parsing"
    arch: dict  # builder kwargs, {"type": "resnet_2d"|"schp", ...}
    network: nn.Module
    preprocess: Preprocess
    classes: tuple[str, ...]
    source: dict  # {"kind", "path", "sha256" of the official file}


def import_teacher(
    source: str,
    *,
    path: str | os.PathLike | None = None,
    arch: str = "resnet18",
    label_set: str = "lip",
    categories: str | os.PathLike | None = None,
) -> ImportedTeacher:
    """Load an official checkpoint of `source` ("torchvision", "places365" or "schp").

    `arch` ("resnet18" | "resnet50") is for the classifiers; `label_set` ("lip" | "atr" |
    "pascal") for SCHP; `categories` is Places365's categories file. `path` is required except
    for torchvision, whose file is otherwise looked up in the torch hub cache.
    """
    if source not in SOURCE_KINDS:
        raise ValueError(f"unknown teacher source {source!r}; choose from {SOURCE_KINDS}")
    if source == "torchvision":
        return import_torchvision(arch=arch, path=path)
    if path is None:
        raise DataError(f"teacher source {source!r} needs the path of its official checkpoint")
    if source == "places365":
        return import_places365(path=path, arch=arch, categories=categories)
    return import_schp(path=path, label_set=label_set)


def torchvision_weight_paths(arch: str) -> list[Path]:
    """Where torchvision would cache `arch`'s ImageNet weights (TORCH_HOME/hub/checkpoints)."""
    if arch not in TORCHVISION_WEIGHTS:
        raise ValueError(
            f"no torchvision ImageNet weights for {arch!r}; use {list(TORCHVISION_WEIGHTS)}"
        )
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return [cache / weights.url.rsplit("/", 1)[-1] for weights in TORCHVISION_WEIGHTS[arch]]


def import_torchvision(*, arch: str, path: str | os.PathLike | None = None) -> ImportedTeacher:
    """torchvision's ImageNet ResNet from `path`, or from the hub cache when `path` is None.

    Nothing is downloaded: a missing file is a DataError naming where to put it.
    """
    candidates = [Path(path)] if path is not None else torchvision_weight_paths(arch)
    found = [p for p in candidates if p.is_file()]
    if not found:
        names = " or ".join(str(p) for p in candidates)
        raise DataError(
            f"torchvision {arch} ImageNet weights not found: put the file at {names} "
            f"(this pipeline does not download)"
        )
    weights_file = found[0]
    state_dict = read_checkpoint(weights_file)
    network = resnet_2d(arch, num_classes=1000)
    load_strict(network, state_dict, weights_file)
    classes = TORCHVISION_WEIGHTS[arch][0].meta["categories"]
    return ImportedTeacher(
        kind="classifier",
        arch={"type": "resnet_2d", "name": arch, "num_classes": 1000},
        network=network.eval(),
        preprocess=Preprocess(color="rgb", mean=IMAGENET_MEAN, std=IMAGENET_STD, size=224),
        classes=tuple(classes),
        source=source_record("torchvision", weights_file),
    )


def import_places365(
    *, path: str | os.PathLike, arch: str, categories: str | os.PathLike | None = None
) -> ImportedTeacher:
    """CSAILVision's Places365 ResNet (`<arch>_places365.pth.tar`).

    Class names come from `categories` (`categories_places365.txt`), else from that file beside
    the checkpoint when it is there, else they are the indices "0".."364".
    """
    path = Path(path)
    state_dict = strip_prefix(checkpoint_state_dict(path), "module.")
    network = resnet_2d(arch, num_classes=PLACES365_CLASSES)
    load_strict(network, state_dict, path)
    if categories is None and (path.parent / "categories_places365.txt").is_file():
        categories = path.parent / "categories_places365.txt"
    if categories is None:
        classes = tuple(str(i) for i in range(PLACES365_CLASSES))
    else:
        classes = read_places365_categories(categories)
    return ImportedTeacher(
        kind="classifier",
        arch={"type": "resnet_2d", "name": arch, "num_classes": PLACES365_CLASSES},
        network=network.eval(),
        preprocess=Preprocess(color="rgb", mean=IMAGENET_MEAN, std=IMAGENET_STD, size=224),
        classes=classes,
        source=source_record("places365", path),
    )


def read_places365_categories(path: str | os.PathLike) -> tuple[str, ...]:
    """`categories_places365.txt` (lines "/a/airfield 0", indices 0..364 in order) -> names.

    A name keeps its sub-category: "/f/field/cultivated 151" -> "field/cultivated".
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: Places365 categories file not found")
    names = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if (
            len(fields) != 2
            or not fields[1].isdigit()
            or len(fields[0]) < 4
            or fields[0][0] != "/"
            or fields[0][2] != "/"
        ):
            raise DataError(f"{path}:{number}: expected '/a/airfield 0', got {line!r}")
        if int(fields[1]) != len(names):
            raise DataError(f"{path}:{number}: index {fields[1]}, expected {len(names)}")
        names.append(fields[0][3:])
    if len(names) != PLACES365_CLASSES:
        raise DataError(f"{path}: {len(names)} categories, expected {PLACES365_CLASSES}")
    return tuple(names)


def import_schp(*, path: str | os.PathLike, label_set: str) -> ImportedTeacher:
    """An official SCHP checkpoint (`torch.load(p)['state_dict']`, keys prefixed `module.`).

    Preprocessing resizes the whole frame to the label set's input size (473 LIP, 512 ATR and
    Pascal-Person-Part) in BGR with SCHP's statistics. SCHP's own inference warps an aspect-kept
    person box to that size; that is meant for full-resolution person photos, while video frames
    are small and need one parsing per frame, so the frame is resized as a whole.
    """
    preprocess = schp_preprocess(label_set)
    classes = SCHP_LABEL_SETS[label_set][1]
    path = Path(path)
    state_dict = strip_prefix(checkpoint_state_dict(path), "module.")
    fused = state_dict.get("fushion.3.bias")
    if fused is not None and fused.shape[0] != len(classes):
        raise DataError(
            f"{path}: SCHP checkpoint predicts {fused.shape[0]} classes, but label set "
            f"{label_set!r} has {len(classes)}"
        )
    network = build_schp(num_classes=len(classes))
    load_strict(network, state_dict, path)
    return ImportedTeacher(
        kind="parsing",
        arch={"type": "schp", "num_classes": len(classes)},
        network=network.eval(),
        preprocess=preprocess,
        classes=classes,
        source=source_record("schp", path),
    )


def schp_preprocess(label_set: str) -> Preprocess:
    """SCHP's input: BGR, ImageNet statistics in BGR order, the label set's input size."""
    if label_set not in SCHP_LABEL_SETS:
        raise ValueError(
            f"unknown SCHP label set {label_set!r}; choose from {list(SCHP_LABEL_SETS)}"
        )
    size = SCHP_LABEL_SETS[label_set][0]
    return Preprocess(color="bgr", mean=SCHP_MEAN_BGR, std=SCHP_STD_BGR, size=size)


def read_checkpoint(path: Path) -> dict:
    """torch.load(weights_only=True), with unreadable files reported as DataError."""
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: not a readable PyTorch checkpoint ({error})") from error
    if not isinstance(checkpoint, dict):
        raise DataError(f"{path}: expected a dict, found {type(checkpoint).__name__}")
    return checkpoint


def checkpoint_state_dict(path: Path) -> dict:
    """The `state_dict` entry of a training checkpoint (Places365's and SCHP's layout)."""
    checkpoint = read_checkpoint(path)
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, dict):
        raise DataError(f"{path}: no 'state_dict' dict (keys: {sorted(map(str, checkpoint))[:8]})")
    return state_dict


def strip_prefix(state_dict: dict, prefix: str) -> dict:
    """Drop nn.DataParallel's `module.` from the keys that have it (a fresh dict)."""
    return {k.removeprefix(prefix): v for k, v in state_dict.items()}


def load_strict(network: nn.Module, state_dict: dict, path: Path) -> None:
    """load_state_dict(strict=True); key or shape mismatches become a DataError naming a few."""
    expected = {k for k in network.state_dict() if not k.endswith("num_batches_tracked")}
    missing = sorted(expected - state_dict.keys())
    unexpected = sorted(
        k for k in state_dict.keys() - expected if not k.endswith("num_batches_tracked")
    )
    if missing or unexpected:
        raise DataError(
            f"{path}: weights do not fit {type(network).__name__}: {len(missing)} missing keys "
            f"(e.g. {missing[:5]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:5]})"
        )
    try:
        # a fresh dict has no version metadata, so BatchNorm fills in num_batches_tracked
        # for checkpoints saved without it (InPlaceABN, old PyTorch)
        network.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as error:  # shape mismatches
        raise DataError(f"{path}: weights do not fit {type(network).__name__}: {error}") from error


def source_record(kind: str, path: Path) -> dict:
    return {"kind": kind, "path": str(path), "sha256": file_sha256(path)}
