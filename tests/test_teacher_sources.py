"""Loading the official teacher checkpoints: torchvision, Places365 and SCHP files in their
published key layouts (written here from random weights; nothing is downloaded)."""

import dataclasses
import hashlib

import pytest
import torch
import torchvision
from torch import nn

from pipeline.errors import DataError
from pipeline.io import file_sha256
from pipeline.teachers.base import FrozenTeacher
from pipeline.teachers.schp import SCHP_LABEL_SETS, BatchNormLeakyReLU, build_schp
from pipeline.teachers.sources import (
    import_places365,
    import_schp,
    import_teacher,
    import_torchvision,
    read_places365_categories,
    schp_preprocess,
)

# Recorded from the original network: GoGoDuck912/Self-Correction-Human-Parsing,
# networks/AugmentCE2P.py (commit c80942f), resnet101(num_classes=20).state_dict() with
# modules/bn.py's InPlaceABNSync (weight, bias, running_mean, running_var; no
# num_batches_tracked). C = number of classes.
OFFICIAL_SCHP_KEY_COUNT = 603
OFFICIAL_SCHP_NAMES_SHA256 = "97750dc5288438fc6786b3f2da3f1a93d4cee10e07af51334b03b4a334eefe8f"
OFFICIAL_SCHP_NAMES_SHAPES_SHA256_C20 = (
    "0e12ba48f73ea4bc2a67e6589bc9cd31c01c39c3d7b0ce0ffe85173317beb3c8"
)
OFFICIAL_SCHP_BACKBONE_KEY_COUNTS = {
    "conv1": 1, "bn1": 4, "conv2": 1, "bn2": 4, "conv3": 1, "bn3": 4,
    "layer1": 50, "layer2": 65, "layer3": 350, "layer4": 50,
}  # fmt: skip
C = 20
OFFICIAL_SCHP_HEAD_KEYS = {
    "context_encoding.stages.0.1.weight": (512, 2048, 1, 1),
    "context_encoding.stages.0.2.weight": (512,),
    "context_encoding.stages.0.2.bias": (512,),
    "context_encoding.stages.0.2.running_mean": (512,),
    "context_encoding.stages.0.2.running_var": (512,),
    "context_encoding.stages.1.1.weight": (512, 2048, 1, 1),
    "context_encoding.stages.1.2.weight": (512,),
    "context_encoding.stages.1.2.bias": (512,),
    "context_encoding.stages.1.2.running_mean": (512,),
    "context_encoding.stages.1.2.running_var": (512,),
    "context_encoding.stages.2.1.weight": (512, 2048, 1, 1),
    "context_encoding.stages.2.2.weight": (512,),
    "context_encoding.stages.2.2.bias": (512,),
    "context_encoding.stages.2.2.running_mean": (512,),
    "context_encoding.stages.2.2.running_var": (512,),
    "context_encoding.stages.3.1.weight": (512, 2048, 1, 1),
    "context_encoding.stages.3.2.weight": (512,),
    "context_encoding.stages.3.2.bias": (512,),
    "context_encoding.stages.3.2.running_mean": (512,),
    "context_encoding.stages.3.2.running_var": (512,),
    "context_encoding.bottleneck.0.weight": (512, 4096, 3, 3),
    "context_encoding.bottleneck.1.weight": (512,),
    "context_encoding.bottleneck.1.bias": (512,),
    "context_encoding.bottleneck.1.running_mean": (512,),
    "context_encoding.bottleneck.1.running_var": (512,),
    "edge.conv1.0.weight": (256, 256, 1, 1),
    "edge.conv1.1.weight": (256,),
    "edge.conv1.1.bias": (256,),
    "edge.conv1.1.running_mean": (256,),
    "edge.conv1.1.running_var": (256,),
    "edge.conv2.0.weight": (256, 512, 1, 1),
    "edge.conv2.1.weight": (256,),
    "edge.conv2.1.bias": (256,),
    "edge.conv2.1.running_mean": (256,),
    "edge.conv2.1.running_var": (256,),
    "edge.conv3.0.weight": (256, 1024, 1, 1),
    "edge.conv3.1.weight": (256,),
    "edge.conv3.1.bias": (256,),
    "edge.conv3.1.running_mean": (256,),
    "edge.conv3.1.running_var": (256,),
    "edge.conv4.weight": (2, 256, 3, 3),
    "edge.conv4.bias": (2,),
    "edge.conv5.weight": (2, 6, 1, 1),
    "edge.conv5.bias": (2,),
    "decoder.conv1.0.weight": (256, 512, 1, 1),
    "decoder.conv1.1.weight": (256,),
    "decoder.conv1.1.bias": (256,),
    "decoder.conv1.1.running_mean": (256,),
    "decoder.conv1.1.running_var": (256,),
    "decoder.conv2.0.weight": (48, 256, 1, 1),
    "decoder.conv2.1.weight": (48,),
    "decoder.conv2.1.bias": (48,),
    "decoder.conv2.1.running_mean": (48,),
    "decoder.conv2.1.running_var": (48,),
    "decoder.conv3.0.weight": (256, 304, 1, 1),
    "decoder.conv3.1.weight": (256,),
    "decoder.conv3.1.bias": (256,),
    "decoder.conv3.1.running_mean": (256,),
    "decoder.conv3.1.running_var": (256,),
    "decoder.conv3.2.weight": (256, 256, 1, 1),
    "decoder.conv3.3.weight": (256,),
    "decoder.conv3.3.bias": (256,),
    "decoder.conv3.3.running_mean": (256,),
    "decoder.conv3.3.running_var": (256,),
    "decoder.conv4.weight": (C, 256, 1, 1),
    "decoder.conv4.bias": (C,),
    "fushion.0.weight": (256, 1024, 1, 1),
    "fushion.1.weight": (256,),
    "fushion.1.bias": (256,),
    "fushion.1.running_mean": (256,),
    "fushion.1.running_var": (256,),
    "fushion.3.weight": (C, 256, 1, 1),
    "fushion.3.bias": (C,),
}


def randomise_batchnorm_statistics(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics, so that a load that skipped them would change the outputs."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(size, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(size, generator=generator))


def official_layout(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict as nn.DataParallel training saved it in 2017-2019: `module.` prefixed and,
    like InPlaceABN and PyTorch < 0.4, without num_batches_tracked."""
    return {
        f"module.{k}": v.clone()
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


def seeded_images(n: int = 1, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def places365_categories_text() -> str:
    names = [f"/{chr(97 + i % 26)}/place_{i}" for i in range(365)]
    names[0], names[151] = "/a/airfield", "/f/field/cultivated"
    return "".join(f"{name} {i}\n" for i, name in enumerate(names))


# ---------------------------------------------------------------- torchvision


def test_torchvision_weights_from_torch_home_match_torchvision(tmp_path, monkeypatch):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    randomise_batchnorm_statistics(reference)
    reference.eval()
    weights = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    weights.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    teacher = import_teacher("torchvision", arch="resnet18")

    x = seeded_images()
    with torch.no_grad():
        torch.testing.assert_close(teacher.network(x), reference(x))
    assert teacher.kind == "classifier"
    assert teacher.arch == {"type": "resnet_2d", "name": "resnet18", "num_classes": 1000}
    assert teacher.source == {
        "kind": "torchvision",
        "path": str(weights),
        "sha256": file_sha256(weights),
    }
    assert len(teacher.classes) == 1000 and teacher.classes[:2] == ("tench", "goldfish")
    assert (teacher.preprocess.color, teacher.preprocess.size) == ("rgb", 224)
    assert teacher.preprocess.mean == (0.485, 0.456, 0.406)


def test_missing_torchvision_weights_name_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    with pytest.raises(DataError) as error:
        import_torchvision(arch="resnet50")
    assert str(cache / "resnet50-0676ba61.pth") in str(error.value)
    assert str(cache / "resnet50-11ad3fa6.pth") in str(error.value)
    explicit = tmp_path / "elsewhere" / "resnet18.pth"
    with pytest.raises(DataError, match=str(explicit)):
        import_torchvision(arch="resnet18", path=explicit)


def test_unreadable_checkpoint_is_a_data_error(tmp_path):
    weights = tmp_path / "resnet18-f37072fd.pth"
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="not a readable PyTorch checkpoint"):
        import_torchvision(arch="resnet18", path=weights)


# ---------------------------------------------------------------- Places365


@pytest.fixture(scope="module")
def places_reference() -> nn.Module:
    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None, num_classes=365)
    randomise_batchnorm_statistics(model, seed=1)
    return model.eval()


def test_places365_checkpoint_with_module_prefix_loads(tmp_path, places_reference):
    checkpoint = tmp_path / "resnet18_places365.pth.tar"
    torch.save(
        {
            "epoch": 90,
            "arch": "resnet18",
            "state_dict": official_layout(places_reference),
            "best_prec1": torch.tensor(54.7),
        },
        checkpoint,
        _use_new_zipfile_serialization=False,  # the 2017 files predate the zip format
    )

    teacher = import_teacher("places365", path=checkpoint, arch="resnet18")

    x = seeded_images(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(teacher.network(x), places_reference(x))
    assert teacher.arch == {"type": "resnet_2d", "name": "resnet18", "num_classes": 365}
    assert teacher.source == {
        "kind": "places365",
        "path": str(checkpoint),
        "sha256": file_sha256(checkpoint),
    }
    assert (teacher.preprocess.color, teacher.preprocess.size) == ("rgb", 224)
    assert teacher.classes[:2] == ("0", "1") and len(teacher.classes) == 365  # no categories file

    (tmp_path / "categories_places365.txt").write_text(places365_categories_text())
    named = import_places365(path=checkpoint, arch="resnet18")  # the file beside is picked up
    assert named.classes[0] == "airfield" and named.classes[151] == "field/cultivated"


def test_places365_key_mismatch_names_keys(tmp_path, places_reference):
    state_dict = official_layout(places_reference)
    state_dict["module.classifier.weight"] = state_dict.pop("module.fc.weight")
    checkpoint = tmp_path / "resnet18_places365.pth.tar"
    torch.save({"state_dict": state_dict}, checkpoint)
    with pytest.raises(DataError) as error:
        import_places365(path=checkpoint, arch="resnet18")
    message = str(error.value)
    assert str(checkpoint) in message
    assert "fc.weight" in message and "classifier.weight" in message

    torch.save({"epoch": 1}, checkpoint)
    with pytest.raises(DataError, match="no 'state_dict'"):
        import_places365(path=checkpoint, arch="resnet18")


def test_places365_categories_parse(tmp_path):
    path = tmp_path / "categories_places365.txt"
    path.write_text(places365_categories_text().replace("\n", "\r\n"))
    names = read_places365_categories(path)
    assert len(names) == 365
    assert names[:2] == ("airfield", "place_1") and names[151] == "field/cultivated"


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda lines: lines[:10], "10 categories, expected 365"),
        (lambda lines: ["airfield 0", *lines[1:]], ":1: expected '/a/airfield 0'"),
        (lambda lines: [*lines[:5], "/b/bar five", *lines[6:]], ":6: expected"),
        (lambda lines: [lines[1], lines[0], *lines[2:]], ":1: index 1, expected 0"),
    ],
)
def test_malformed_places365_categories_are_data_errors(tmp_path, edit, problem):
    path = tmp_path / "categories_places365.txt"
    path.write_text("\n".join(edit(places365_categories_text().splitlines())) + "\n")
    with pytest.raises(DataError, match=problem):
        read_places365_categories(path)


# ---------------------------------------------------------------- SCHP


def test_schp_parameter_names_equal_the_official_network():
    network = build_schp(num_classes=C)
    state = {k: v for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}
    names = sorted(state)
    assert len(names) == OFFICIAL_SCHP_KEY_COUNT
    heads = {k: tuple(v.shape) for k, v in state.items() if k in OFFICIAL_SCHP_HEAD_KEYS}
    assert heads == OFFICIAL_SCHP_HEAD_KEYS
    backbone_counts = {prefix: 0 for prefix in OFFICIAL_SCHP_BACKBONE_KEY_COUNTS}
    for name in names:
        if name.split(".")[0] in backbone_counts:
            backbone_counts[name.split(".")[0]] += 1
    assert backbone_counts == OFFICIAL_SCHP_BACKBONE_KEY_COUNTS
    assert hashlib.sha256("\n".join(names).encode()).hexdigest() == OFFICIAL_SCHP_NAMES_SHA256
    names_shapes = "\n".join(f"{k} {tuple(state[k].shape)}" for k in names)
    assert (
        hashlib.sha256(names_shapes.encode()).hexdigest() == OFFICIAL_SCHP_NAMES_SHAPES_SHA256_C20
    )
    # output stride 16 with a dilated last stage, as the original
    assert network.layer4[0].conv2.stride == (1, 1) and network.layer4[0].conv2.dilation == (2, 2)
    assert network.layer3[0].conv2.stride == (2, 2)


def test_schp_activated_batchnorm_is_batchnorm_then_leaky_relu():
    bn = BatchNormLeakyReLU(3).eval()
    x = torch.tensor([-2.0, 0.0, 3.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    expected = torch.tensor([-0.02, 0.0, 3.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    torch.testing.assert_close(bn(x), expected, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def schp_checkpoint(tmp_path_factory):
    """An official-layout Pascal-Person-Part checkpoint (about 270 MB) and its source network."""
    torch.manual_seed(2)
    reference = build_schp(num_classes=7)
    randomise_batchnorm_statistics(reference, seed=2)
    reference.eval()
    path = tmp_path_factory.mktemp("schp") / "exp-schp-201908261155-pascal-person-part.pth"
    torch.save({"epoch": 149, "state_dict": official_layout(reference)}, path)
    yield path, reference
    path.unlink()


def test_schp_official_checkpoint_loads_strictly(schp_checkpoint):
    path, reference = schp_checkpoint
    teacher = import_teacher("schp", path=path, label_set="pascal")

    x = seeded_images(seed=2)
    with torch.no_grad():
        features, logits = teacher.network.features_and_parts(x)
        expected_features, expected_logits = reference.features_and_parts(x)
        torch.testing.assert_close(teacher.network(x), logits)
    assert logits.shape == (1, 7, 16, 16) and features.shape == (1, 256)
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(features, expected_features)
    assert logits.std() > 0  # not a constant map
    assert teacher.kind == "parsing"
    assert teacher.arch == {"type": "schp", "num_classes": 7}
    assert teacher.classes == SCHP_LABEL_SETS["pascal"][1]
    assert teacher.classes[3] == "Upper Arms"
    assert teacher.source == {"kind": "schp", "path": str(path), "sha256": file_sha256(path)}
    assert (teacher.preprocess.color, teacher.preprocess.size) == ("bgr", 512)

    # the parsing teacher end to end (at a small input size to keep the test fast)
    frozen = FrozenTeacher(
        "schp",
        teacher.network,
        dataclasses.replace(teacher.preprocess, size=64),
        kind="parsing",
        feature_dim=teacher.network.feature_dim,
        classes=teacher.classes,
    )
    frames = torch.randint(0, 256, (2, 40, 48, 3), dtype=torch.uint8)
    out = frozen(frames)
    assert out["embedding"].shape == (2, 256) and out["parts"].shape == (2, 7, 8, 8)
    torch.testing.assert_close(out["parts"].sum(dim=1), torch.ones(2, 8, 8))


def test_schp_label_set_must_match_the_checkpoint(schp_checkpoint):
    path, _ = schp_checkpoint
    with pytest.raises(DataError, match="predicts 7 classes, but label set 'lip' has 20"):
        import_schp(path=path, label_set="lip")


def test_schp_preprocess_is_bgr_with_reversed_imagenet_statistics():
    preprocess = schp_preprocess("lip")
    assert preprocess.size == 473 and schp_preprocess("atr").size == 512
    red = torch.zeros(1, 473, 473, 3, dtype=torch.uint8)
    red[..., 0] = 255
    x = preprocess(red)
    # channel 2 is red in BGR: (1 - 0.485) / 0.229; blue and green are (0 - mean) / std
    expected = torch.tensor([-0.406 / 0.225, -0.456 / 0.224, 0.515 / 0.229])
    torch.testing.assert_close(x[0, :, 200, 300], expected)
    assert x[0, 2].min() > 2 and x[0, :2].max() < 0


def test_import_teacher_arguments():
    with pytest.raises(ValueError, match="unknown teacher source"):
        import_teacher("imagenet21k", path="x.pth")
    with pytest.raises(DataError, match="needs the path"):
        import_teacher("schp", label_set="lip")
    with pytest.raises(ValueError, match="unknown SCHP label set"):
        import_schp(path="x.pth", label_set="pascal-person")
