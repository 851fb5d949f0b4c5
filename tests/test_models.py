import pytest
import torch
import torchvision
from torch import nn

from pipeline.bench.models import bench_models
from pipeline.models import (
    IMAGE_MODELS,
    TINY_IMAGE_SETTINGS,
    TINY_VIDEO_SETTINGS,
    VIDEO_MODELS,
    build_image_model,
    build_video_model,
    count_parameters,
)
from pipeline.models.inflate import inflate_resnet2d_into_r3d
from pipeline.models.video import ReplicateTimePadConv3d


def seeded_randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def randomise_batchnorm_statistics(model: nn.Module, seed: int = 0) -> None:
    """Give every BN non-trivial running statistics and affine parameters, so eval-mode
    comparisons exercise the copied BN values (fresh BN is the identity)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            size = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(size, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(size, generator=generator))


@pytest.mark.parametrize("name", VIDEO_MODELS)
def test_tiny_video_model_shapes_features_and_headless(name):
    torch.manual_seed(0)
    model = build_video_model(name, num_classes=12, **TINY_VIDEO_SETTINGS[name]).eval()
    clips = seeded_randn(2, 3, 8, 40, 40)
    with torch.no_grad():
        logits = model(clips)
        features = model.features(clips)
        feature_map = model.feature_map(clips)
    assert logits.shape == (2, 12)
    assert features.shape == (2, model.feature_dim)
    assert feature_map.shape[:2] == (2, model.feature_dim)
    assert torch.allclose(features, feature_map.mean(dim=(2, 3, 4)))
    assert torch.allclose(logits, model.fc(features))
    assert 50_000 < count_parameters(model) < 1_000_000

    torch.manual_seed(0)
    headless = build_video_model(name, num_classes=0, **TINY_VIDEO_SETTINGS[name]).eval()
    headless.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        assert torch.allclose(headless(clips), features, atol=1e-6)
    assert not any(key.startswith("fc.") for key in headless.state_dict())


def test_tiny_video_models_accept_32px_crops_and_16_frames():
    for name in ("r3d_18", "r2plus1d_18"):
        model = build_video_model(name, num_classes=12, **TINY_VIDEO_SETTINGS[name]).eval()
        with torch.no_grad():
            assert model(seeded_randn(1, 3, 16, 32, 32)).shape == (1, 12)


@pytest.mark.parametrize(
    ("name", "torchvision_builder"),
    [
        ("r3d_18", torchvision.models.video.r3d_18),
        ("r2plus1d_18", torchvision.models.video.r2plus1d_18),
    ],
)
def test_default_video_resnets_load_torchvision_state_dicts_strictly(name, torchvision_builder):
    reference = torchvision_builder(weights=None).eval()
    randomise_batchnorm_statistics(reference)
    ours = build_video_model(name, num_classes=400).eval()
    assert ours.feature_dim == 512
    ours.load_state_dict(reference.state_dict(), strict=True)
    clip = seeded_randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(clip), reference(clip), atol=1e-5)


@pytest.mark.parametrize(
    ("name", "torchvision_builder"),
    [("resnet18", torchvision.models.resnet18), ("resnet50", torchvision.models.resnet50)],
)
def test_default_image_resnets_and_tsn_load_torchvision_state_dicts_strictly(
    name, torchvision_builder
):
    reference = torchvision_builder(weights=None).eval()
    randomise_batchnorm_statistics(reference)
    image_model = build_image_model(name, num_classes=1000).eval()
    assert image_model.feature_dim == reference.fc.in_features
    image_model.load_state_dict(reference.state_dict(), strict=True)
    frames = seeded_randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(image_model(frames), reference(frames), atol=1e-5)

    # TSN = the same 2D network on every frame, logits of the averaged features
    tsn = build_video_model(f"tsn_{name}", num_classes=1000).eval()
    tsn.load_state_dict(reference.state_dict(), strict=True)
    assert tsn.feature_dim == reference.fc.in_features
    clip = frames.transpose(0, 1).unsqueeze(0)  # the two images as a 2-frame clip
    pooled_2d = nn.Sequential(*list(reference.children())[:-1])  # torchvision's ResNet without fc
    with torch.no_grad():
        per_frame_features = pooled_2d(frames).flatten(1)
        assert torch.allclose(
            tsn.features(clip), per_frame_features.mean(0, keepdim=True), atol=1e-5
        )
        assert torch.allclose(
            tsn(clip), reference.fc(per_frame_features.mean(0, keepdim=True)), atol=1e-5
        )


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_tiny_image_models_on_48px_images(name):
    model = build_image_model(name, num_classes=12, **TINY_IMAGE_SETTINGS[name]).eval()
    images = seeded_randn(2, 3, 48, 48)
    with torch.no_grad():
        assert model(images).shape == (2, 12)
        assert model.features(images).shape == (2, model.feature_dim)
        # stride-4 stem without max-pool: 48 -> 12 -> 12, 6, 3, 2
        assert model.feature_map(images).shape == (2, model.feature_dim, 2, 2)
    assert 50_000 < count_parameters(model) < 1_000_000
    headless = build_image_model(name, num_classes=0, **TINY_IMAGE_SETTINGS[name]).eval()
    with torch.no_grad():
        assert headless(images).shape == (2, headless.feature_dim)


def test_stem_options_set_the_output_resolution():
    clip = seeded_randn(1, 3, 8, 40, 40)
    for stem_stride, stem_pool, size in ((1, False, 5), (2, False, 3), (2, True, 2)):
        model = build_video_model(
            "r3d_18",
            num_classes=3,
            width=8,
            layers=(1, 1, 1, 1),
            stem_stride=stem_stride,
            stem_pool=stem_pool,
        ).eval()
        with torch.no_grad():
            # time: 8 -> 8, 4, 2, 1 (stages 2-4 stride 2 in time, as in torchvision)
            assert model.feature_map(clip).shape[2:] == (1, size, size)


@pytest.mark.parametrize("name", VIDEO_MODELS)
def test_channels_last_memory_format_gives_the_same_outputs(name):
    model = build_video_model(name, num_classes=12, **TINY_VIDEO_SETTINGS[name]).eval()
    randomise_batchnorm_statistics(model)
    clip = seeded_randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        expected = model(clip)
        model.to(memory_format=model.memory_format)
        assert torch.allclose(model(clip), expected, atol=1e-5)
        if model.memory_format == torch.channels_last_3d:
            assert torch.allclose(
                model(clip.contiguous(memory_format=torch.channels_last_3d)), expected, atol=1e-5
            )
    if name.startswith("tsn_"):
        assert model.memory_format == torch.channels_last  # 2D convs: channels_last_3d cannot apply
    else:
        assert model.memory_format == torch.channels_last_3d


def test_replicate_temporal_padding_keeps_parameter_names():
    zeros = build_video_model("r3d_18", num_classes=4, width=8, layers=(1, 1, 1, 1))
    replicate = build_video_model(
        "r3d_18", num_classes=4, width=8, layers=(1, 1, 1, 1), temporal_padding="replicate"
    )
    replicate.load_state_dict(zeros.state_dict(), strict=True)
    swapped = [m for m in replicate.modules() if isinstance(m, ReplicateTimePadConv3d)]
    assert len(swapped) == 1 + 4 * 2  # stem + two 3x3x3 convs per block; 1x1x1 downsamples unpadded
    clip = seeded_randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        expected = replicate.eval()(clip)
        assert expected.shape == (1, 4)
        replicate.to(memory_format=torch.channels_last_3d)
        channels_last_clip = clip.contiguous(memory_format=torch.channels_last_3d)
        assert torch.allclose(replicate(channels_last_clip), expected, atol=1e-5)


def inflation_pair(*, time_kernel: str, temporal_padding: str):
    """A tiny 2D ResNet with non-trivial BN and the R3D it is inflated into."""
    settings = {"width": 8, "layers": (1, 1, 1, 1), "stem_stride": 2, "stem_pool": True}
    torch.manual_seed(0)
    model_2d = build_image_model("resnet18", num_classes=6, **settings).eval()
    randomise_batchnorm_statistics(model_2d)
    model_3d = build_video_model(
        "r3d_18", num_classes=6, temporal_padding=temporal_padding, **settings
    )
    inflate_resnet2d_into_r3d(
        model_2d.state_dict(), model_3d, time_kernel=time_kernel, keep_fc=True
    )
    return model_2d, model_3d.eval()


@pytest.mark.parametrize(
    ("time_kernel", "temporal_padding"), [("average", "replicate"), ("center", "zeros")]
)
def test_inflated_r3d_matches_its_2d_resnet_on_a_boring_video(time_kernel, temporal_padding):
    model_2d, model_3d = inflation_pair(time_kernel=time_kernel, temporal_padding=temporal_padding)
    frame = seeded_randn(2, 3, 40, 40)
    boring_clip = frame.unsqueeze(2).expand(-1, -1, 8, -1, -1).contiguous()
    with torch.no_grad():
        assert torch.allclose(model_3d.features(boring_clip), model_2d.features(frame), atol=1e-4)
        assert torch.allclose(model_3d(boring_clip), model_2d(frame), atol=1e-4)


def test_average_inflation_with_zero_temporal_padding_differs_at_the_clip_ends():
    # why temporal_padding="replicate" exists: zero padding truncates the edge frames' kernel
    model_2d, model_3d = inflation_pair(time_kernel="average", temporal_padding="zeros")
    frame = seeded_randn(2, 3, 40, 40)
    boring_clip = frame.unsqueeze(2).expand(-1, -1, 8, -1, -1).contiguous()
    with torch.no_grad():
        assert not torch.allclose(
            model_3d.features(boring_clip), model_2d.features(frame), atol=1e-3
        )


def test_inflation_keeps_or_drops_the_classifier():
    model_2d = build_image_model("resnet18", num_classes=6, width=8, layers=(1, 1, 1, 1))
    model_3d = build_video_model("r3d_18", num_classes=6, width=8, layers=(1, 1, 1, 1))
    fc_before = model_3d.fc.weight.detach().clone()
    inflate_resnet2d_into_r3d(model_2d.state_dict(), model_3d)
    assert torch.equal(model_3d.fc.weight, fc_before)
    assert torch.equal(
        model_3d.stem[0].weight, model_2d.conv1.weight.unsqueeze(2).expand(-1, -1, 3, -1, -1) / 3
    )
    inflate_resnet2d_into_r3d(model_2d.state_dict(), model_3d, keep_fc=True)
    assert torch.equal(model_3d.fc.weight, model_2d.fc.weight)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (("resnet18", {"width": 16}), ("r3d_18", {"width": 8})),  # widths differ
        (("resnet50", {"width": 8}), ("r3d_18", {"width": 8})),  # bottleneck blocks
        (("resnet18", {"width": 8}), ("r2plus1d_18", {"width": 8})),  # (2+1)D convs
    ],
)
def test_inflation_refuses_architectures_that_do_not_fit(source, target):
    model_2d = build_image_model(source[0], num_classes=6, layers=(1, 1, 1, 1), **source[1])
    model_3d = build_video_model(target[0], num_classes=6, layers=(1, 1, 1, 1), **target[1])
    with pytest.raises(ValueError, match="cannot inflate"):
        inflate_resnet2d_into_r3d(model_2d.state_dict(), model_3d)


def test_factories_reject_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown video model"):
        build_video_model("r3d_34", num_classes=2)
    with pytest.raises(ValueError, match="unknown TSN backbone"):
        build_video_model("tsn_resnet34", num_classes=2)
    with pytest.raises(ValueError, match="unknown 2D ResNet"):
        build_image_model("vgg16", num_classes=2)
    with pytest.raises(ValueError, match="temporal_padding"):
        build_video_model("tsn_resnet18", num_classes=2, temporal_padding="replicate")
    with pytest.raises(ValueError, match="temporal_padding"):
        build_video_model("r3d_18", num_classes=2, temporal_padding="reflect")


def test_bench_models_reports_positive_throughput(capsys):
    rows = bench_models(
        names=["r3d_18", "tsn_resnet18"], frames=4, crop=32, batch_size=2, threads=[1], steps=1
    )
    assert len(rows) == 2 and all(row["train_clips_per_s_channels_last"] > 0 for row in rows)
    assert rows[0]["parameters"] == count_parameters(
        build_video_model("r3d_18", num_classes=12, **TINY_VIDEO_SETTINGS["r3d_18"])
    )
    assert rows[0]["train_clips_per_s"] > 0 and rows[0]["inference_clips_per_s"] > 0
    assert 0 < rows[0]["train_gflops_per_clip"] < 1
    assert "r3d_18" in capsys.readouterr().out


def test_c3d_at_full_size_gives_rspnets_feature_map():
    model = build_video_model("c3d", num_classes=101).eval()
    with torch.no_grad():
        assert model.feature_map(torch.zeros(1, 3, 16, 112, 112)).shape == (1, 512, 2, 7, 7)
    assert model.feature_dim == 512
    with pytest.raises(ValueError, match="c3d has fixed conv groups"):
        build_video_model("c3d", num_classes=2, layers=(1, 1, 1, 1))


@pytest.mark.parametrize("name", ["r3d_18", "r2plus1d_18", "c3d"])
def test_a_branched_network_shares_the_low_stages_and_concatenates_its_branches(name):
    torch.manual_seed(0)
    model = build_video_model(name, num_classes=12, branches=2, shared_stages=3,
                              **TINY_VIDEO_SETTINGS[name]).eval()  # fmt: skip
    single = build_video_model(name, num_classes=0, **TINY_VIDEO_SETTINGS[name])
    assert model.feature_dim == 2 * single.feature_dim == 2 * model.branch_dim
    clip = seeded_randn(2, 3, 8, 40, 40)
    with torch.no_grad():
        maps = model.branch_maps(clip)
        assert len(maps) == 2 and maps[0].shape == maps[1].shape
        assert maps[0].shape[1] == single.feature_dim
        # the branches start from independent draws: different outputs of one low-level map
        assert not torch.allclose(maps[0], maps[1])
        assert torch.allclose(model.features(clip), torch.cat(maps, 1).mean(dim=(2, 3, 4)))
        assert model(clip).shape == (2, 12)
    # one copy of the low-level stages, two of the high-level ones
    low = sum(p.numel() for p in model.low.parameters())
    high = sum(p.numel() for p in model.high[0].parameters())
    assert count_parameters(model) == low + 2 * high + 2 * single.feature_dim * 12 + 12
    with pytest.raises(ValueError, match="no stages to branch"):
        build_video_model("tsn_resnet18", num_classes=2, branches=2)
    with pytest.raises(ValueError, match="shared_stages"):
        build_video_model(name, num_classes=2, branches=2, shared_stages=5)
