"""Still-image datasets for training teachers: readers for the official layouts, and Datasets.

Readers return an `ImageSet` (class names, train items, held-out items) and raise DataError naming
the file on malformed input:
  read_image_folders  ImageNet layout <root>/{train,val}/<wnid or class>/<image>
  read_places365      <root>/{train,val}/<category>/<image> + categories_places365.txt
  read_stanford40     JPEGImages/<action>_<NNN>.jpg, ImageSplits/{train,test}.txt, actions.txt
  read_bu101          <Class>_<idx>.jpg flat or in class folders; a seeded held-out carve per class
  read_lip            {train,val}_images/<id>.jpg, {train,val}_segmentations/<id>.png,
                      {train,val}_id.txt (items are (image, label map) pairs)

Datasets give the trainer's item dict with the key "video" holding one image (C, H, W), so the one
trainer and evaluator take them, plus "image": True so the evaluator knows a view is (C, H, W).
Every random draw of an item comes from a Generator seeded by (seed, epoch, position), as in
pipeline.data.clips; items are indexed by position or by (epoch, position).
"""

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.render import PART_NAMES
from pipeline.errors import DataError
from pipeline.teachers import TEACHER_NAMES
from pipeline.teachers.base import Preprocess

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# Label-map value for pixels that no class covers (LIP/Pascal convention): left out of loss/mIoU.
IGNORE_LABEL = 255


@dataclass(frozen=True)
class ImageSet:
    """Class names (label i is classes[i]) and items: (image path, label) for classification,
    (image path, label-map path) for parsing; `test` is the held-out split."""

    classes: tuple[str, ...]
    train: list[tuple[Path, int | Path]]
    test: list[tuple[Path, int | Path]]


# ---------------------------------------------------------------- readers


def _read_lines(path: Path) -> list[str]:
    """Non-blank stripped lines; CRLF and LF alike."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from err
    return [line.strip() for line in text.splitlines() if line.strip()]


def _visible(folder: Path) -> list[Path]:
    """Entries of `folder`, sorted, without hidden files (.DS_Store and the like)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _check_image_name(path: Path) -> None:
    if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(f"{path}: not an image file (expected one of {IMAGE_SUFFIXES})")


def _folder_images(folder: Path, label: int) -> list[tuple[Path, int]]:
    items = []
    for path in _visible(folder):
        _check_image_name(path)
        items.append((path, label))
    if not items:
        raise DataError(f"{folder}: class folder holds no images")
    return items


def read_image_folders(
    root: str | os.PathLike, *, train_split: str = "train", test_split: str = "val"
) -> ImageSet:
    """ImageNet layout: classes are the sorted folder names of the train split; the held-out
    split may only use those classes."""
    root = Path(root)
    classes = []
    for entry in _visible(root / train_split):
        if not entry.is_dir():
            raise DataError(f"{entry}: a file outside any class folder")
        classes.append(entry.name)
    if not classes:
        raise DataError(f"{root / train_split}: no class folders")
    splits = {}
    for split in (train_split, test_split):
        items = []
        for entry in _visible(root / split):
            if not entry.is_dir():
                raise DataError(f"{entry}: a file outside any class folder")
            if entry.name not in classes:
                raise DataError(f"{entry}: class folder missing from {root / train_split}")
            items += _folder_images(entry, classes.index(entry.name))
        splits[split] = items
    return ImageSet(tuple(classes), splits[train_split], splits[test_split])


def read_places365(
    root: str | os.PathLike,
    *,
    categories: str = "categories_places365.txt",
    train_split: str = "train",
    test_split: str = "val",
) -> ImageSet:
    """Places365 layout: categories file lines "/a/airfield 0" give each label; images lie in
    <split>/<name> or <split>/<letter>/<name> (name may have a sub-category: "field/wild")."""
    root = Path(root)
    path = root / categories
    by_label: dict[int, str] = {}
    for number, line in enumerate(_read_lines(path), 1):
        fields = line.split()
        parts = fields[0].split("/", 2) if fields else []
        if len(fields) != 2 or not fields[1].isdigit() or len(parts) != 3 or parts[0]:
            raise DataError(f"{path}:{number}: expected '/<letter>/<category> <label>': {line!r}")
        label = int(fields[1])
        if label in by_label:
            raise DataError(f"{path}:{number}: label {label} given twice")
        by_label[label] = fields[0]
    if sorted(by_label) != list(range(len(by_label))):
        raise DataError(f"{path}: labels must be 0..{len(by_label) - 1}, each once")
    category_paths = [by_label[label] for label in range(len(by_label))]
    classes = tuple(p.split("/", 2)[2] for p in category_paths)
    splits = {}
    for split in (train_split, test_split):
        items = []
        for label, (name, category) in enumerate(zip(classes, category_paths, strict=True)):
            candidates = [root / split / name, root / split / category.lstrip("/")]
            folder = next((c for c in candidates if c.is_dir()), None)
            if folder is None:
                raise DataError(f"{candidates[0]} (or {candidates[1]}): category folder missing")
            items += _folder_images(folder, label)
        splits[split] = items
    return ImageSet(classes, splits[train_split], splits[test_split])


def _numbered_class(path: Path) -> str:
    """ "<class>_<digits>.jpg" -> "<class>"; DataError for any other name."""
    name, sep, number = path.stem.rpartition("_")
    if not sep or not name or not number.isdigit():
        raise DataError(f"{path}: expected a file name '<class>_<number>{path.suffix}'")
    return name


def read_stanford40(root: str | os.PathLike) -> ImageSet:
    """Stanford40: classes in actions.txt order (header line, then "name<TAB>count"); the label
    of "applauding_001.jpg" is "applauding". Each action's train + test images must add up to
    the count in actions.txt."""
    root = Path(root)
    splits_dir = root / "ImageSplits"
    actions_path = splits_dir / "actions.txt"
    counts: dict[str, int] = {}
    for number, line in enumerate(_read_lines(actions_path)[1:], 2):
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            raise DataError(f"{actions_path}:{number}: expected '<action>\\t<count>': {line!r}")
        counts[fields[0]] = int(fields[1])
    if not counts:
        raise DataError(f"{actions_path}: no actions listed")
    classes = tuple(counts)
    seen: dict[str, int] = dict.fromkeys(classes, 0)
    listed: set[str] = set()
    splits = {}
    for split in ("train", "test"):
        list_path = splits_dir / f"{split}.txt"
        items = []
        for number, name in enumerate(_read_lines(list_path), 1):
            image = root / "JPEGImages" / name
            action = _numbered_class(Path(name))
            if action not in counts:
                raise DataError(
                    f"{list_path}:{number}: {name}: action {action!r} not in actions.txt"
                )
            if name in listed:
                raise DataError(f"{list_path}:{number}: {name} is listed twice")
            if not image.is_file():
                raise DataError(f"{list_path}:{number}: {image} does not exist")
            listed.add(name)
            seen[action] += 1
            items.append((image, classes.index(action)))
        splits[split] = items
    wrong = {a: (seen[a], counts[a]) for a in classes if seen[a] != counts[a]}
    if wrong:
        action, (found, expected) = next(iter(wrong.items()))
        raise DataError(
            f"{actions_path}: {action} has {expected} images, but train.txt + test.txt list "
            f"{found} ({len(wrong)} actions disagree)"
        )
    return ImageSet(classes, splits["train"], splits["test"])


def read_bu101(root: str | os.PathLike, *, test_fraction: float = 0.2, seed: int = 0) -> ImageSet:
    """BU101: "<Class>_<idx>.jpg" directly in `root` (label from the name) or in class folders
    (label = folder name); both may be mixed. BU101 has no official split: per class, a seeded
    `test_fraction` of the images (at least one, and never all) is held out. A class's carve
    depends only on (seed, class name, its files), not on which other classes exist."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    root = Path(root)
    by_class: dict[str, list[Path]] = {}
    for entry in _visible(root):
        if entry.is_dir():
            for path in _visible(entry):
                _check_image_name(path)
                by_class.setdefault(entry.name, []).append(path)
        else:
            _check_image_name(entry)
            by_class.setdefault(_numbered_class(entry), []).append(entry)
    if not by_class:
        raise DataError(f"{root}: no images")
    classes = tuple(sorted(by_class))
    train, test = [], []
    for label, name in enumerate(classes):
        paths = sorted(by_class[name])
        if len(paths) < 2:
            raise DataError(f"{paths[0]}: class {name!r} has one image; a held-out carve needs 2")
        held = min(max(1, round(len(paths) * test_fraction)), len(paths) - 1)
        order = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(len(paths))
        held_out = set(order[:held].tolist())
        for i, path in enumerate(paths):
            (test if i in held_out else train).append((path, label))
    return ImageSet(classes, train, test)


def read_lip(
    root: str | os.PathLike,
    *,
    classes: tuple[str, ...] = PART_NAMES,
    train_split: str = "train",
    test_split: str = "val",
) -> ImageSet:
    """LIP-style parsing set: ids from <split>_id.txt; items (image, label map). `classes` are the
    label map's values in order (the synthetic world: the 7 Pascal-Person-Part labels)."""
    root = Path(root)
    splits = {}
    for split in (train_split, test_split):
        id_path = root / f"{split}_id.txt"
        items, seen = [], set()
        for number, image_id in enumerate(_read_lines(id_path), 1):
            if image_id in seen:
                raise DataError(f"{id_path}:{number}: id {image_id} listed twice")
            seen.add(image_id)
            image = root / f"{split}_images" / f"{image_id}.jpg"
            label_map = root / f"{split}_segmentations" / f"{image_id}.png"
            for path in (image, label_map):
                if not path.is_file():
                    raise DataError(f"{id_path}:{number}: {path} does not exist")
            items.append((image, label_map))
        if not items:
            raise DataError(f"{id_path}: no ids")
        splits[split] = items
    return ImageSet(tuple(classes), splits[train_split], splits[test_split])


def read_teacher_images(
    name: str, folder: str | os.PathLike, *, test_fraction: float = 0.2, split_seed: int = 0
) -> ImageSet:
    """The image set teacher `name` trains on, in `folder` in its dataset's layout (the synthetic
    world writes them to images/{objects,scenes,bu101,stanford40,parsing}); test_fraction and
    split_seed only matter for bu101."""
    if name not in TEACHER_NAMES:
        raise ValueError(f"unknown teacher {name!r}; choose from {TEACHER_NAMES}")
    folder = Path(folder)
    if name == "imagenet":
        return read_image_folders(folder)
    if name == "places":
        return read_places365(folder)
    if name == "bu101":
        return read_bu101(folder, test_fraction=test_fraction, seed=split_seed)
    if name == "stanford40":
        return read_stanford40(folder)
    return read_lip(folder)


# ---------------------------------------------------------------- datasets


def open_image(path: Path, mode: str = "RGB") -> Image.Image:
    """Decode with PIL: an RGB image, or with mode="L" a one-channel label map ("L" or "P")."""
    try:
        with Image.open(path) as image:
            image.load()
            if mode != "RGB":
                if image.mode not in ("L", "P"):
                    raise DataError(f"{path}: a label map must be one-channel, not {image.mode}")
                return image
            return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for corrupt/truncated files
        raise DataError(f"{path}: cannot decode image ({err})") from err


def crop_box(
    width: int, height: int, fraction: float, rng: np.random.Generator | None
) -> tuple[int, int, int, int]:
    """PIL box (left, top, right, bottom) of a square crop of side fraction x the shorter side: at
    a random place with `rng`, else centred."""
    side = max(1, round(min(height, width) * fraction))
    if rng is None:
        left, top = (width - side) // 2, (height - side) // 2
    else:
        left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    return left, top, left + side, top + side


class _ImageDataset(torch.utils.data.Dataset):
    epoch_keys = True  # takes (epoch, position) keys: see pipeline.train.make_loader

    def __init__(
        self,
        items: list[tuple[Path, int | Path]],
        preprocess: Preprocess,
        *,
        train: bool,
        seed: int = 0,
        crop_fraction: float = 0.875,
        flip: bool = True,
    ):
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        self.items = list(items)
        self.preprocess = preprocess
        self.train = train
        self.seed = seed
        self.crop_fraction = crop_fraction
        self.flip = flip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def _key(self, key: int | tuple[int, int]) -> tuple[int, int]:
        """(epoch, position) from a position (epoch set by set_epoch) or an (epoch, position)."""
        return key if isinstance(key, tuple) else (self.epoch, key)

    def _crop(self, epoch: int, position: int, image: Image.Image) -> tuple[tuple, bool]:
        """This item's crop box and whether to flip it."""
        rng = np.random.default_rng([self.seed, epoch, position]) if self.train else None
        box = crop_box(*image.size, self.crop_fraction, rng)
        return box, rng is not None and self.flip and bool(rng.random() < 0.5)

    def _tensor(self, image: Image.Image, box: tuple, flipped: bool) -> torch.Tensor:
        """Crop and resize to the teacher's input size in one antialiased bilinear PIL resize
        (what Preprocess does with torch, at a fraction of the per-image cost), flip, then the
        teacher's own colour order and mean/std (Preprocess), as FrozenTeacher sees frames."""
        size = self.preprocess.size
        view = np.array(image.resize((size, size), Image.Resampling.BILINEAR, box=box))
        view = np.ascontiguousarray(view[:, ::-1] if flipped else view)
        return self.preprocess(torch.from_numpy(view)[None])[0]


class ImageClassificationDataset(_ImageDataset):
    """(image path, label) items as {"video": (C, size, size) float, "label", "index", "image"}.

    Training takes a square crop of crop_fraction x the shorter side at a random place and flips
    it with p = 0.5 (with `flip`); testing takes the centred crop. The crop is then resized and
    normalised the teacher's own way (`preprocess`), so training sees what the frozen teacher will.
    """

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, position = self._key(key)
        path, label = self.items[position]
        image = open_image(path)
        box, flipped = self._crop(epoch, position, image)
        return {
            "video": self._tensor(image, box, flipped),
            "label": int(label),
            "index": position,
            "image": True,
        }


class ParsingDataset(_ImageDataset):
    """(image path, label-map path) items as {"video": (C, size, size) float, "mask": (size,
    size) int64, "index", "image"}: the same crop and flip on both; the label map is resized with
    nearest neighbour. Flipping keeps labels as they are: right only for label sets without
    left/right parts (Pascal-Person-Part); set flip=False for LIP's 20 labels.
    `num_classes`: label values must be below it (or IGNORE_LABEL)."""

    def __init__(self, items, preprocess: Preprocess, *, num_classes: int, **kwargs):
        super().__init__(items, preprocess, **kwargs)
        self.num_classes = num_classes

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, position = self._key(key)
        image_path, label_path = self.items[position]
        image = open_image(image_path)
        labels = open_image(label_path, mode="L")
        if labels.size != image.size:
            raise DataError(f"{label_path}: label map is {labels.size}, its image {image.size}")
        values = np.asarray(labels)
        bad = (values >= self.num_classes) & (values != IGNORE_LABEL)
        if bad.any():
            value, top = int(values[bad].max()), self.num_classes - 1
            raise DataError(f"{label_path}: label value {value} outside 0..{top}")
        box, flipped = self._crop(epoch, position, image)
        size = self.preprocess.size
        mask = np.array(labels.resize((size, size), Image.Resampling.NEAREST, box=box))
        mask = np.ascontiguousarray(mask[:, ::-1] if flipped else mask)
        return {
            "video": self._tensor(image, box, flipped),
            "mask": torch.from_numpy(mask).long(),
            "index": position,
            "image": True,
        }
