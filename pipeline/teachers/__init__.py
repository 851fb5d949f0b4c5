"""Frozen image teachers: names, default preprocessing, and the project's teacher checkpoint.

`save_teacher` and `load_teacher` are the only code that writes and reads the checkpoint dict
(README.md, "Teachers and the feature cache"):
  {"format": "pipeline-teacher/1", "name", "kind": "classifier" | "parsing",
   "arch": {"type": "resnet_2d" | "tiny_parsing" | "schp", ...builder kwargs},
   "preprocess": Preprocess.as_dict(), "classes": [str], "state_dict",
   "source": {"kind": "synthetic" | "torchvision" | "places365" | "schp" | "finetuned",
              "path": str, "sha256": str}}
The builder gets num_classes = len(classes); arch may repeat it, but then it must agree.
"""

import os
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import DataError
from pipeline.models import resnet_2d
from pipeline.teachers.base import IMAGENET_MEAN, IMAGENET_STD, KINDS, FrozenTeacher, Preprocess

TEACHER_FORMAT = "pipeline-teacher/1"
TEACHER_NAMES = ("imagenet", "places", "bu101", "stanford40", "schp")
TEACHER_KINDS = {
    "imagenet": "classifier",
    "places": "classifier",
    "bu101": "classifier",
    "stanford40": "classifier",
    "schp": "parsing",
}
ARCH_TYPES = ("resnet_2d", "tiny_parsing", "schp")
SOURCE_KINDS = ("synthetic", "torchvision", "places365", "schp", "finetuned")
CHECKPOINT_KEYS = (
    "format",
    "name",
    "kind",
    "arch",
    "preprocess",
    "classes",
    "state_dict",
    "source",
)

# Each teacher's colour order and statistics follow its codebase: torchvision and Places365 (and
# the BU101/Stanford40 teachers fine-tuned from ImageNet) RGB with ImageNet statistics; SCHP BGR
# with the statistics reversed. The synthetic teachers keep the same conventions, so the
# preprocessing that travels with a checkpoint is exercised on the synthetic world too.
SCHP_MEAN = (0.406, 0.456, 0.485)
SCHP_STD = (0.225, 0.224, 0.229)
OFFICIAL_INPUT_SIZE = {"imagenet": 224, "places": 224, "bu101": 224, "stanford40": 224, "schp": 473}


def default_preprocess(name: str, size: int | None = None) -> Preprocess:
    """Teacher `name`'s colour order and mean/std; size defaults to the official input size."""
    if name not in TEACHER_NAMES:
        raise ValueError(f"unknown teacher {name!r}; choose from {TEACHER_NAMES}")
    size = OFFICIAL_INPUT_SIZE[name] if size is None else size
    if name == "schp":
        return Preprocess(color="bgr", mean=SCHP_MEAN, std=SCHP_STD, size=size)
    return Preprocess(color="rgb", mean=IMAGENET_MEAN, std=IMAGENET_STD, size=size)


def build_network(arch: dict, num_classes: int) -> nn.Module:
    """The teacher network an arch dict describes, with fresh weights. ValueError for an unknown
    type or builder kwargs that the builder does not take."""
    kwargs = {k: v for k, v in arch.items() if k != "type"}
    if kwargs.pop("num_classes", num_classes) != num_classes:
        raise ValueError(f"arch says num_classes={arch['num_classes']}, classes say {num_classes}")
    kind = arch.get("type")
    try:
        if kind == "resnet_2d":
            return resnet_2d(num_classes=num_classes, **kwargs)
        if kind == "tiny_parsing":
            # Imported here: the parser's module pulls in the trainer's evaluation code.
            from pipeline.teachers.parsing import tiny_parsing

            return tiny_parsing(num_classes=num_classes, **kwargs)
        if kind == "schp":
            # Imported here: the real SCHP port lives in its own module (helper "sources").
            from pipeline.teachers.schp import build_schp

            return build_schp(num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise ValueError(f"arch {arch}: {err}") from err
    raise ValueError(f"unknown teacher arch type {kind!r}; choose from {ARCH_TYPES}")


def save_teacher(
    path: str | os.PathLike,
    *,
    name: str,
    kind: str,
    arch: dict,
    preprocess: Preprocess,
    classes: list[str] | tuple[str, ...],
    state_dict: dict[str, torch.Tensor],
    source: dict,
) -> None:
    """Write the teacher checkpoint dict atomically (weights on CPU, plain types only)."""
    if kind not in KINDS:
        raise ValueError(f"teacher kind must be one of {KINDS}, got {kind!r}")
    if arch.get("type") not in ARCH_TYPES:
        raise ValueError(f"arch type must be one of {ARCH_TYPES}, got {arch.get('type')!r}")
    if source.get("kind") not in SOURCE_KINDS or set(source) != {"kind", "path", "sha256"}:
        raise ValueError(f"source needs kind (one of {SOURCE_KINDS}), path, sha256; got {source}")
    checkpoint = {
        "format": TEACHER_FORMAT,
        "name": str(name),
        "kind": kind,
        "arch": _plain(arch),
        "preprocess": _plain(preprocess.as_dict()),
        "classes": [str(c) for c in classes],
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        "source": {k: str(v) for k, v in source.items()},
    }
    from pipeline.train import save_checkpoint

    save_checkpoint(checkpoint, path)


def _plain(value):
    """Tuples -> lists, recursively: the checkpoint holds plain JSON-like types."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def read_teacher_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint dict of a teacher model.pt, checked; DataError naming the file otherwise."""
    from pipeline.train import load_checkpoint  # weights_only loading with clear errors

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: teacher checkpoint not found")
    checkpoint = load_checkpoint(path)
    found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
    if found != TEACHER_FORMAT:
        raise DataError(
            f"{path}: not a teacher checkpoint (format {found!r}, expected {TEACHER_FORMAT!r}); "
            "write it with pipeline.teachers.save_teacher"
        )
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise DataError(f"{path}: teacher checkpoint lacks {missing}")
    if checkpoint["kind"] not in KINDS:
        raise DataError(f"{path}: unknown teacher kind {checkpoint['kind']!r}; expected {KINDS}")
    if checkpoint["arch"].get("type") not in ARCH_TYPES:
        raise DataError(
            f"{path}: unknown teacher arch type {checkpoint['arch'].get('type')!r}; "
            f"expected one of {ARCH_TYPES}"
        )
    return checkpoint


def network_from_checkpoint(checkpoint: dict, path: str | os.PathLike) -> nn.Module:
    """Build the checkpoint's network and load its weights (strict); DataError naming `path`."""
    try:
        network = build_network(checkpoint["arch"], len(checkpoint["classes"]))
        network.load_state_dict(checkpoint["state_dict"])
    except (ValueError, RuntimeError) as err:
        raise DataError(f"{path}: weights do not fit arch {checkpoint['arch']}: {err}") from err
    return network


def load_teacher(path: str | os.PathLike, parts_size: int = 8) -> FrozenTeacher:
    """The frozen teacher a model.pt holds, on CPU, in eval mode."""
    checkpoint = read_teacher_checkpoint(path)
    network = network_from_checkpoint(checkpoint, path)
    try:
        preprocess = Preprocess(**checkpoint["preprocess"])
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: bad preprocess {checkpoint['preprocess']}: {err}") from err
    return FrozenTeacher(
        checkpoint["name"],
        network,
        preprocess,
        kind=checkpoint["kind"],
        feature_dim=_feature_dim(network, preprocess, checkpoint["kind"]),
        classes=tuple(checkpoint["classes"]),
        parts_size=parts_size,
    )


def _feature_dim(network: nn.Module, preprocess: Preprocess, kind: str) -> int:
    """The network's `feature_dim` attribute, or the width of one probe forward's embedding."""
    if hasattr(network, "feature_dim"):
        return int(network.feature_dim)
    probe = torch.zeros(1, 3, preprocess.size, preprocess.size)
    with torch.no_grad():
        network.eval()
        embedding = (
            network.features(probe)
            if kind == "classifier"
            else network.features_and_parts(probe)[0]
        )
    return int(embedding.shape[1])
