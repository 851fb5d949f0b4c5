import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import DataError
from pipeline.evaluate import evaluate
from pipeline.io import file_sha256
from pipeline.models import resnet_2d
from pipeline.teachers import (
    TEACHER_FORMAT,
    default_preprocess,
    load_teacher,
    save_teacher,
)
from pipeline.teachers.base import FrozenTeacher, Preprocess
from pipeline.teachers.images import (
    ImageClassificationDataset,
    ParsingDataset,
    read_bu101,
    read_image_folders,
    read_lip,
    read_places365,
    read_stanford40,
)
from pipeline.teachers.parsing import iou_from_confusion, tiny_parsing
from pipeline.teachers.train_teacher import train_teacher

SIZE = 16  # side of the test images


def _image(path: Path, seed: int, size: int = SIZE) -> None:
    """A random-noise image (so crops and flips change pixels); JPEG or PNG by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _lines(path: Path, lines: list[str], newline: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + newline for line in lines).encode())


def _objects(root: Path, per_class: int = 4) -> None:
    for split in ("train", "val"):
        for k, name in enumerate(("ball", "cup")):
            for i in range(per_class):
                _image(root / split / name / f"{name}_{i}.JPEG", seed=100 * k + i)


def _stanford40(root: Path, per_class: int = 4) -> None:
    actions = ("applauding", "hands_on_hips")
    train, test = [], []
    for k, action in enumerate(actions):
        for i in range(1, per_class + 1):
            name = f"{action}_{i:03d}.jpg"
            _image(root / "JPEGImages" / name, seed=10 * k + i)
            (train if i % 2 else test).append(name)
    _lines(root / "ImageSplits" / "train.txt", train, "\r\n")
    _lines(root / "ImageSplits" / "test.txt", test, "\r\n")
    counts = [f"{a}\t{per_class}" for a in actions]
    _lines(root / "ImageSplits" / "actions.txt", ["action_name\tnumber_of_images", *counts], "\r\n")


def _parsing(root: Path, count: int = 3) -> None:
    """Label maps: left half label 1 (a red image half), right half 2 (green)."""
    for split, first in (("train", 0), ("val", count)):
        ids = [f"{i:07d}" for i in range(first, first + count)]
        for image_id in ids:
            labels = np.zeros((SIZE, SIZE), np.uint8)
            labels[:, : SIZE // 2], labels[:, SIZE // 2 :] = 1, 2
            image = np.zeros((SIZE, SIZE, 3), np.uint8)
            image[labels == 1] = (255, 0, 0)
            image[labels == 2] = (0, 255, 0)
            (root / f"{split}_images").mkdir(parents=True, exist_ok=True)
            (root / f"{split}_segmentations").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / f"{split}_images" / f"{image_id}.jpg", quality=100)
            Image.fromarray(labels).save(root / f"{split}_segmentations" / f"{image_id}.png")
        _lines(root / f"{split}_id.txt", ids, "\r\n")


# ---------------------------------------------------------------- readers


def test_image_folders_reader(tmp_path):
    _objects(tmp_path)
    images = read_image_folders(tmp_path)
    assert images.classes == ("ball", "cup")
    assert len(images.train) == len(images.test) == 8
    assert images.train[0] == (tmp_path / "train" / "ball" / "ball_0.JPEG", 0)
    assert {label for _, label in images.test} == {0, 1}
    (tmp_path / "val" / "kite").mkdir()
    _image(tmp_path / "val" / "kite" / "kite_0.JPEG", seed=0)
    with pytest.raises(DataError, match="kite: class folder missing"):
        read_image_folders(tmp_path)
    (tmp_path / "train" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt: a file outside any class folder"):
        read_image_folders(tmp_path)


def test_places365_reader_takes_labels_from_categories_file(tmp_path):
    for split in ("train", "val"):
        _image(tmp_path / split / "beach" / "00000001.jpg", seed=1)
        _image(tmp_path / split / "k" / "kitchen" / "00000001.jpg", seed=2)  # letter folders too
    # The file's label order, not the alphabet; CRLF line endings.
    _lines(tmp_path / "categories_places365.txt", ["/k/kitchen 0", "/b/beach 1"], "\r\n")
    images = read_places365(tmp_path)
    assert images.classes == ("kitchen", "beach")
    assert sorted((p.parent.name, label) for p, label in images.train) == [
        ("beach", 1),
        ("kitchen", 0),
    ]
    _lines(tmp_path / "categories_places365.txt", ["/k/kitchen 0", "beach 1"])
    with pytest.raises(DataError, match="categories_places365.txt:2"):
        read_places365(tmp_path)


def test_stanford40_reader(tmp_path):
    _stanford40(tmp_path)
    images = read_stanford40(tmp_path)
    assert images.classes == ("applauding", "hands_on_hips")
    assert len(images.train) == len(images.test) == 4
    assert (tmp_path / "JPEGImages" / "hands_on_hips_003.jpg", 1) in images.train
    # actions.txt disagreeing with the lists
    _lines(
        tmp_path / "ImageSplits" / "actions.txt", ["header", "applauding\t5", "hands_on_hips\t4"]
    )
    with pytest.raises(DataError, match="actions.txt: applauding has 5 images"):
        read_stanford40(tmp_path)
    _stanford40(tmp_path)
    (tmp_path / "JPEGImages" / "applauding_002.jpg").unlink()
    with pytest.raises(DataError, match=r"test.txt:1: .*applauding_002.jpg does not exist"):
        read_stanford40(tmp_path)


def test_bu101_reader_flat_and_folders_with_a_seeded_carve(tmp_path):
    for i in range(1, 11):
        _image(tmp_path / f"Clap_{i:04d}.jpg", seed=i)  # flat
        _image(tmp_path / "Wave" / f"Wave_{i}.jpg", seed=50 + i)  # a class folder
    images = read_bu101(tmp_path, test_fraction=0.2, seed=0)
    assert images.classes == ("Clap", "Wave")
    assert len(images.train) == 16 and len(images.test) == 4
    assert sorted(label for _, label in images.test) == [0, 0, 1, 1]
    assert read_bu101(tmp_path, test_fraction=0.2, seed=0) == images  # deterministic
    others = [read_bu101(tmp_path, test_fraction=0.2, seed=s).test for s in (1, 2, 3)]
    assert any(test != images.test for test in others)
    _image(tmp_path / "Clap-7.jpg", seed=0)
    with pytest.raises(DataError, match=r"Clap-7.jpg: expected a file name '<class>_<number>"):
        read_bu101(tmp_path)


def test_lip_reader(tmp_path):
    _parsing(tmp_path)
    images = read_lip(tmp_path)
    assert len(images.classes) == 7 and images.classes[0] == "Background"
    assert images.test[0] == (
        tmp_path / "val_images" / "0000003.jpg",
        tmp_path / "val_segmentations" / "0000003.png",
    )
    (tmp_path / "train_segmentations" / "0000001.png").unlink()
    with pytest.raises(DataError, match=r"train_id.txt:2: .*0000001.png does not exist"):
        read_lip(tmp_path)


# ---------------------------------------------------------------- datasets


def test_classification_dataset_views(tmp_path):
    _objects(tmp_path)
    items = read_image_folders(tmp_path).train
    preprocess = Preprocess(size=12)
    train = ImageClassificationDataset(items, preprocess, train=True, seed=3, crop_fraction=0.75)
    item = train[5]
    assert item["video"].shape == (3, 12, 12) and item["video"].dtype == torch.float32
    assert (item["label"], item["index"], item["image"]) == (1, 5, True)
    # Augmentation depends on (seed, epoch, position) only; another epoch draws another crop.
    assert torch.equal(train[(0, 5)]["video"], item["video"])
    assert not torch.equal(train[(1, 5)]["video"], item["video"])
    # Testing with the whole image at the input size is exactly the teacher's preprocessing.
    test = ImageClassificationDataset(items, Preprocess(size=SIZE), train=False, crop_fraction=1)
    frame = torch.from_numpy(np.asarray(Image.open(items[2][0]).convert("RGB")).copy())
    assert torch.allclose(test[2]["video"], Preprocess(size=SIZE)(frame[None])[0])


def test_corrupt_image_is_a_data_error_naming_it(tmp_path):
    _objects(tmp_path)
    items = read_image_folders(tmp_path).train
    items[0][0].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    dataset = ImageClassificationDataset(items, Preprocess(size=12), train=False)
    with pytest.raises(DataError, match="ball_0.JPEG: cannot decode image"):
        dataset[0]


def test_parsing_dataset_crops_and_flips_image_and_mask_alike(tmp_path):
    _parsing(tmp_path)
    items = read_lip(tmp_path).train
    # Identity statistics: the tensor is the resized crop in [0, 1], easy to compare with labels.
    preprocess = Preprocess(mean=(0, 0, 0), std=(1, 1, 1), size=10)
    dataset = ParsingDataset(
        items, preprocess, num_classes=7, train=True, seed=0, crop_fraction=0.75
    )
    flips = set()
    for epoch in range(6):
        item = dataset[(epoch, 1)]
        mask, red, green = item["mask"], item["video"][0], item["video"][1]
        assert mask.shape == (10, 10) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= {1, 2}
        # Away from the boundary (blurred by resizing), red pixels are label 1, green label 2.
        assert (mask[red > 0.8] == 1).all() and (mask[green > 0.8] == 2).all()
        flips.add(int(mask[0, 0]))
    assert flips == {1, 2}  # some epochs flipped
    Image.fromarray(np.full((SIZE, SIZE), 9, np.uint8)).save(items[0][1])
    with pytest.raises(DataError, match="0000000.png: label value 9 outside 0..6"):
        dataset[0]


# ---------------------------------------------------------------- checkpoints


def _tiny_resnet_arch() -> dict:
    return {"type": "resnet_2d", "name": "resnet18", "width": 4, "layers": [1, 1, 1, 1]}


def _frames(n: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, 20, 24, 3), dtype=torch.uint8, generator=torch.Generator())


def test_save_load_round_trip_classifier(tmp_path):
    torch.manual_seed(0)
    network = resnet_2d("resnet18", num_classes=3, width=4, layers=(1, 1, 1, 1))
    preprocess = Preprocess(size=16)
    source = {"kind": "synthetic", "path": "objects", "sha256": ""}
    save_teacher(
        tmp_path / "model.pt",
        name="imagenet",
        kind="classifier",
        arch=_tiny_resnet_arch(),
        preprocess=preprocess,
        classes=("a", "b", "c"),
        state_dict=network.state_dict(),
        source=source,
    )
    teacher = load_teacher(tmp_path / "model.pt")
    reference = FrozenTeacher("imagenet", network, preprocess, feature_dim=network.feature_dim)
    frames = _frames()
    out = teacher(frames)
    assert set(out) == {"embedding"} and out["embedding"].shape == (3, 32)
    assert torch.equal(out["embedding"], reference(frames)["embedding"])
    assert (teacher.name, teacher.classes, teacher.preprocess) == (
        "imagenet",
        ("a", "b", "c"),
        preprocess,
    )
    stored = torch.load(tmp_path / "model.pt", weights_only=True)
    assert stored["format"] == TEACHER_FORMAT and stored["source"] == source


def test_save_load_round_trip_parser(tmp_path):
    torch.manual_seed(0)
    network = tiny_parsing(num_classes=7, width=4)
    preprocess = default_preprocess("schp", size=16)
    assert preprocess.color == "bgr"
    save_teacher(
        tmp_path / "model.pt",
        name="schp",
        kind="parsing",
        arch={"type": "tiny_parsing", "width": 4},
        preprocess=preprocess,
        classes=[f"part{i}" for i in range(7)],
        state_dict=network.state_dict(),
        source={"kind": "synthetic", "path": "parsing", "sha256": ""},
    )
    teacher = load_teacher(tmp_path / "model.pt", parts_size=4)
    reference = FrozenTeacher(
        "schp", network, preprocess, kind="parsing", feature_dim=16, parts_size=4
    )
    frames = _frames()
    out, expected = teacher(frames), reference(frames)
    assert out["embedding"].shape == (3, 16) and out["parts"].shape == (3, 7, 4, 4)
    assert torch.allclose(out["parts"].sum(dim=1), torch.ones(3, 4, 4))
    assert torch.equal(out["embedding"], expected["embedding"])
    assert torch.equal(out["parts"], expected["parts"])


def test_load_refuses_other_formats(tmp_path):
    network = resnet_2d("resnet18", num_classes=3, width=4, layers=(1, 1, 1, 1))
    # What pipeline.train.fit writes as model.pt is not a teacher checkpoint.
    torch.save({"model": network.state_dict(), "meta": {}}, tmp_path / "fit.pt")
    with pytest.raises(DataError, match="fit.pt: not a teacher checkpoint"):
        load_teacher(tmp_path / "fit.pt")
    good = {
        "name": "imagenet",
        "kind": "classifier",
        "arch": _tiny_resnet_arch(),
        "preprocess": Preprocess(size=16),
        "classes": ["a", "b", "c"],
        "state_dict": network.state_dict(),
        "source": {"kind": "synthetic", "path": "", "sha256": ""},
    }
    save_teacher(tmp_path / "model.pt", **good)
    stored = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.save({**stored, "arch": {"type": "vit"}}, tmp_path / "vit.pt")
    with pytest.raises(DataError, match="vit.pt: unknown teacher arch type 'vit'"):
        load_teacher(tmp_path / "vit.pt")
    torch.save({**stored, "classes": ["a", "b"]}, tmp_path / "two.pt")
    with pytest.raises(DataError, match="two.pt: weights do not fit arch"):
        load_teacher(tmp_path / "two.pt")
    torch.save({**stored, "extra": Path("x")}, tmp_path / "pickled.pt")  # not weights_only-safe
    with pytest.raises(DataError, match="pickled.pt: refused to load"):
        load_teacher(tmp_path / "pickled.pt")
    with pytest.raises(DataError, match="missing.pt: teacher checkpoint not found"):
        load_teacher(tmp_path / "missing.pt")


# ---------------------------------------------------------------- evaluation


def test_evaluate_takes_single_and_multi_view_images():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    single = {"video": logits.reshape(3, 2, 1, 1), "label": labels}
    assert evaluate(torch.nn.Flatten(), [single])["clip_top1"] == pytest.approx(2 / 3)
    # (B, V, C, H, W): two views per image; the image marker tells them from (B, C, T, H, W).
    views = torch.stack([logits, torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 5.0]])], dim=1)
    multi = {"video": views.reshape(3, 2, 2, 1, 1), "label": labels, "image": torch.ones(3)}
    metrics = evaluate(torch.nn.Flatten(), [multi])
    assert metrics["num_clips"] == 6 and metrics["video_top1"] == 1.0


def test_iou_from_confusion_hand_case():
    # class 0: 3 right, 1 predicted as 1; class 1: 2 right; class 2 absent and never predicted.
    confusion = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    assert iou_from_confusion(confusion) == [pytest.approx(3 / 4), pytest.approx(2 / 3), None]


# ---------------------------------------------------------------- training


def _train(tmp_path: Path, name: str, arch, size: int, init=None, **params) -> dict:
    return train_teacher(
        name=name,
        images=tmp_path / "images" / {"imagenet": "objects", "schp": "parsing"}.get(name, name),
        run_dir=tmp_path / "runs" / name,
        arch=arch,
        preprocess=default_preprocess(name, size),
        train={"epochs": 1, "lr": 0.01, "batch_size": 4},
        seed=0,
        threads=1,
        params=params,
        init=init,
    )


def test_train_teacher_writes_a_loadable_teacher(tmp_path):
    _objects(tmp_path / "images" / "objects")
    metrics = _train(tmp_path, "imagenet", _tiny_resnet_arch(), size=12)
    run = tmp_path / "runs" / "imagenet"
    assert json.loads((run / "metrics.json").read_text()) == metrics
    assert (metrics["teacher"], metrics["kind"], metrics["train_size"]) == (
        "imagenet",
        "classifier",
        8,
    )
    assert metrics["eval_size"] == 8 and 0 <= metrics["top1"] <= 100
    assert metrics["source"]["kind"] == "synthetic" and metrics["feature_dim"] == 32
    assert not (run / "checkpoints").exists()  # a finished run keeps no checkpoints
    # A rerun trains again from scratch and writes the same results.
    assert _train(tmp_path, "imagenet", _tiny_resnet_arch(), size=12) == metrics
    teacher = load_teacher(run / "model.pt")
    assert teacher.classes == ("ball", "cup") and teacher(_frames())["embedding"].shape == (3, 32)
    from pipeline.inspect import describe

    summary = describe(run)
    assert summary.startswith("teacher imagenet (classifier)") and "8 train, 8 held out" in summary

    # Fine-tuning another teacher from it: the backbone is copied, the head is new (2 classes).
    _stanford40(tmp_path / "images" / "stanford40")
    wider = {**_tiny_resnet_arch(), "width": 8}
    with pytest.raises(DataError, match="model.pt: its arch .* differs from the requested"):
        _train(tmp_path, "stanford40", wider, size=12, init=run / "model.pt")
    same = {**_tiny_resnet_arch(), "layers": (1, 1, 1, 1)}  # tuples and lists alike
    tuned = _train(tmp_path, "stanford40", same, size=12, init=run / "model.pt")
    assert tuned["source"] == {
        "kind": "finetuned",
        "path": str(run / "model.pt"),
        "sha256": file_sha256(run / "model.pt"),
    }
    assert load_teacher(tmp_path / "runs" / "stanford40" / "model.pt").classes == (
        "applauding",
        "hands_on_hips",
    )


def test_train_parsing_teacher(tmp_path):
    _parsing(tmp_path / "images" / "parsing")
    metrics = _train(tmp_path, "schp", {"type": "tiny_parsing", "width": 4}, size=16)
    assert metrics["kind"] == "parsing" and 0 <= metrics["miou"] <= 100
    assert len(metrics["per_class_iou"]) == 7 and "top1" not in metrics
    teacher = load_teacher(tmp_path / "runs" / "schp" / "model.pt", parts_size=4)
    out = teacher(_frames(2))
    assert out["embedding"].shape == (2, 16) and out["parts"].shape == (2, 7, 4, 4)
