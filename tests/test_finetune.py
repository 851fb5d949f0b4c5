"""Starting a supervised run from a pipeline checkpoint (`train --init model.pt`)."""

import pytest
import torch

from pipeline.errors import DataError
from pipeline.finetune import load_init
from pipeline.models import TINY_VIDEO_SETTINGS, build_video_model


def tiny(num_classes: int, width: int = 8):
    settings = {**TINY_VIDEO_SETTINGS["r3d_18"], "width": width}
    return build_video_model("r3d_18", num_classes=num_classes, **settings)


def test_init_copies_the_backbone_and_keeps_a_fresh_head_of_another_size(tmp_path):
    torch.manual_seed(0)
    source = tiny(num_classes=5)
    torch.save({"model": source.state_dict(), "meta": {}}, tmp_path / "model.pt")
    torch.manual_seed(1)
    target = tiny(num_classes=12)
    head_before = target.fc.weight.clone()
    load_init(target, tmp_path / "model.pt")
    for name, value in source.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(target.state_dict()[name], value), name
    assert torch.equal(target.fc.weight, head_before)


def test_init_refuses_weights_of_another_backbone(tmp_path):
    torch.save({"model": tiny(5, width=16).state_dict(), "meta": {}}, tmp_path / "model.pt")
    with pytest.raises(DataError, match="do not fit the network"):
        load_init(tiny(5), tmp_path / "model.pt")


def test_labeled_subset_restricts_only_the_training_rows():
    import pandas as pd

    from pipeline.finetune import split_rows

    manifest = pd.DataFrame(
        {
            "label": [0, 0, 0, 0, 1, 1, 1, 1, 0, 1],
            "group": ["g01", "g02", "g03", "g04", "g01", "g02", "g03", "g04", "g05", "g05"],
            "split1": ["train"] * 8 + ["test"] * 2,
            "labeled_50": [True, False, True, False, False, True, False, True, False, False],
        }
    )
    full = split_rows(manifest, "split1", 0.25, seed=0)
    half = split_rows(manifest, "split1", 0.25, seed=0, labeled_percent=50)
    assert set(half["train"]) == set(full["train"]) & {0, 2, 5, 7}
    assert list(half["val"]) == list(full["val"]) and list(half["test"]) == [8, 9]
    assert list(split_rows(manifest, "split1", 0.25, 0, labeled_percent=100)["train"]) == list(
        full["train"]
    )
    with pytest.raises(DataError, match="labeled_20"):
        split_rows(manifest, "split1", 0.25, seed=0, labeled_percent=20)


@pytest.mark.parametrize("student", ["r3d_18", "tsn_resnet18"])
def test_teacher_init_inflates_or_copies_the_2d_weights(tmp_path, student):
    from pipeline.finetune import load_teacher_init
    from pipeline.models import resnet_2d
    from pipeline.teachers import default_preprocess, save_teacher

    arch = {"type": "resnet_2d", "name": "resnet18", "width": 8, "layers": [1, 1, 1, 1],
            "stem_stride": 2, "stem_pool": False}  # fmt: skip
    teacher = resnet_2d(num_classes=5, **{k: v for k, v in arch.items() if k != "type"})
    path = tmp_path / "model.pt"
    save_teacher(path, name="bu101", kind="classifier", arch=arch,
                 preprocess=default_preprocess("bu101", 32), classes=list("abcde"),
                 state_dict=teacher.state_dict(),
                 source={"kind": "synthetic", "path": "x", "sha256": ""})  # fmt: skip
    network = build_video_model(student, num_classes=12, width=8, layers=(1, 1, 1, 1),
                                stem_stride=4, stem_pool=False)  # fmt: skip
    load_teacher_init(network, path)
    state = network.state_dict()
    if student == "r3d_18":  # average inflation: summed over time, the 2D kernel again
        torch.testing.assert_close(state["stem.0.weight"].sum(dim=2), teacher.conv1.weight)
    else:
        torch.testing.assert_close(state["conv1.weight"], teacher.conv1.weight)
    assert state["fc.weight"].shape == (12, 64)  # a fresh head for the video classes
    wider = build_video_model(student, num_classes=12, width=16, layers=(1, 1, 1, 1))
    with pytest.raises(DataError, match="do not fit"):
        load_teacher_init(wider, path)
