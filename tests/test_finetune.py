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
