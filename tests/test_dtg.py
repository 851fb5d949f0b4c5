"""DTG-Net: the loss, queues, teacher weightings, guided items, pre-training and its figures."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pipeline.bench.features import bench_features
from pipeline.data.clips import ClipDataset, prepare_video
from pipeline.data.guided import GuidedClipDataset
from pipeline.data.samplers import SegmentSampler
from pipeline.data.shards import ShardStore
from pipeline.figures import extract_features, online_weights_figure, tsne_figure
from pipeline.finetune import load_init
from pipeline.methods.dtg import (
    DTG,
    info_nce,
    info_nce_logits,
    offline_weights,
    online1_weights,
    online2_weights,
    positive_rank,
)
from pipeline.models import TINY_VIDEO_SETTINGS, build_video_model, resnet_2d
from pipeline.pretrain import pretrain_dtg
from pipeline.teachers.base import FrozenTeacher, Preprocess
from pipeline.teachers.features import FeatureCache, build_feature_cache
from pipeline.train import TrainSpec, fit, make_loader, seed_everything
from tests.test_clips import fixture_frames, write_test_shards

NUM_VIDEOS, NUM_FRAMES, SEGMENTS = 12, 16, 4


def tiny_student(num_classes: int = 0):
    return build_video_model("r3d_18", num_classes=num_classes, **TINY_VIDEO_SETTINGS["r3d_18"])


class FakeCache:
    """FeatureCache's interface over one random (num_frames, D) array per manifest row."""

    def __init__(self, frames_per_row: list[int], feature_dim: int, seed: int):
        rng = np.random.default_rng(seed)
        self.table = [
            rng.standard_normal((n, feature_dim)).astype(np.float32) for n in frames_per_row
        ]
        self.feature_dim = feature_dim

    def read(self, row: int, frame_indices) -> dict:
        return {"embedding": self.table[row][np.asarray(frame_indices)]}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    videos = [fixture_frames(v, NUM_FRAMES, 24, 32) for v in range(NUM_VIDEOS)]
    out = tmp_path_factory.mktemp("shards")
    return write_test_shards(out, videos, [v % 3 for v in range(NUM_VIDEOS)], codec="raw")


def fake_caches(shard_dir, dims=(("bu", 6), ("places", 5))) -> dict[str, FakeCache]:
    frames = ShardStore(shard_dir).manifest["num_frames"].tolist()
    return {name: FakeCache(frames, dim, seed) for seed, (name, dim) in enumerate(dims)}


# ---------------------------------------------------------------- loss, queue, weights


def test_info_nce_equals_a_hand_computation():
    anchor = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    positive = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])
    tau = 0.5
    logits = info_nce_logits(anchor, positive, queue, tau)
    for i, (a, g) in enumerate(zip(anchor.tolist(), positive.tolist(), strict=True)):
        sims = [a[0] * g[0] + a[1] * g[1]] + [a[0] * q[0] + a[1] * q[1] for q in queue.tolist()]
        expected = -math.log(math.exp(sims[0] / tau) / sum(math.exp(s / tau) for s in sims))
        assert logits[i].tolist() == pytest.approx([s / tau for s in sims])
        assert info_nce(logits)[i].item() == pytest.approx(expected, rel=1e-6)
    # Anchor 0 is beaten by queue entry 2 (1.0 > 0.8), anchor 1 by none (0.8 is the top).
    assert positive_rank(logits).tolist() == [1, 0]


def test_queue_enqueue_wraps_around_and_starts_seeded():
    first = DTG(tiny_student(), teachers={"bu": 3}, queue_size=5, queue_seed=7)
    again = DTG(tiny_student(), teachers={"bu": 3}, queue_size=5, queue_seed=7)
    assert torch.equal(first.queue("bu"), again.queue("bu"))
    assert torch.allclose(first.queue("bu").norm(dim=1), torch.ones(5))
    assert not torch.equal(
        first.queue("bu"),
        DTG(tiny_student(), teachers={"bu": 3}, queue_size=5, queue_seed=8).queue("bu"),
    )
    initial = first.queue("bu").clone()
    batch1, batch2 = torch.full((3, 3), 1.0), torch.full((3, 3), 2.0)
    first.enqueue({"bu": batch1}, torch.tensor([10, 11, 12]))
    assert first.queue_ptr.item() == 3
    assert first.queue_videos.tolist() == [10, 11, 12, -1, -1]
    assert torch.equal(first.queue("bu")[:3], batch1) and torch.equal(
        first.queue("bu")[3:], initial[3:]
    )
    first.enqueue({"bu": batch2}, torch.tensor([20, 21, 22]))  # slots 3, 4, then 0
    assert first.queue_ptr.item() == 1
    assert first.queue_videos.tolist() == [22, 11, 12, 20, 21]
    assert torch.equal(first.queue("bu")[[3, 4, 0]], batch2)
    assert torch.equal(first.queue("bu")[1:3], batch1[1:])


def test_the_anchors_own_video_in_the_queue_is_not_a_negative():
    anchor = F.normalize(torch.tensor([[1.0, 0.2], [0.3, 1.0]]), dim=1)
    positive = F.normalize(torch.tensor([[0.9, 0.1], [0.1, 0.9]]), dim=1)
    queue = F.normalize(torch.tensor([[0.9, 0.12], [-1.0, 0.5], [0.2, 1.0]]), dim=1)
    same = torch.tensor([[True, False, False], [False, False, False]])  # entry 0: anchor 0's video
    masked = info_nce(info_nce_logits(anchor, positive, queue, 0.1, same))
    assert masked[0].item() == pytest.approx(info_nce(info_nce_logits(
        anchor[:1], positive[:1], queue[1:], 0.1)).item(), rel=1e-6)  # fmt: skip
    assert masked[1].item() == pytest.approx(
        info_nce(info_nce_logits(anchor[1:], positive[1:], queue, 0.1)).item(), rel=1e-6
    )
    # In a step: the queue holds the batch's own videos' guidance from an earlier step; they are
    # dropped from the denominators (a lower loss) exactly when their video ids match.
    batch = guided_batch(batch_size=4, dims=(("bu", 6),))
    losses = []
    for videos in (batch["index"], batch["index"] + 100):
        torch.manual_seed(0)
        method = DTG(tiny_student(), teachers={"bu": 6}, queue_size=8)
        method.enqueue({"bu": F.normalize(batch["guidance"]["bu"], dim=1)}, videos)
        losses.append(method(batch).logs["loss_bu"].item())
    assert losses[0] < losses[1]


def test_offline_weights_reproduce_the_papers_vector():
    weights = offline_weights([59.98, 49.96, 62.01, 61.83])
    assert weights == pytest.approx([0.0668, 3.0e-6, 0.5085, 0.4247], abs=5e-5)
    assert weights[1] == pytest.approx(3.0e-6, rel=0.05)
    assert weights.sum() == pytest.approx(1.0)


def test_online_weights_sum_to_one_and_favour_the_closer_teacher():
    similarity = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    w1 = online1_weights(similarity, temperature=0.5)
    assert torch.allclose(w1.sum(dim=1), torch.ones(2))
    assert w1[0].argsort().tolist() == [1, 2, 0] and w1[1].argsort().tolist() == [2, 0, 1]
    ranks = torch.tensor([[0, 40, 7], [3, 3, 0]])
    w2 = online2_weights(ranks, num_pairs=65, temperature=0.1)
    assert torch.allclose(w2.sum(dim=1), torch.ones(2))
    assert w2[0].argsort().tolist() == [1, 2, 0]  # the better (lower) rank weighs more
    assert w2[1, 0] == pytest.approx(w2[1, 1].item()) and w2[1, 2] > w2[1, 0]


def guided_batch(batch_size: int = 8, dims=(("bu", 6), ("places", 5)), seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "video": torch.randn(batch_size, 3, SEGMENTS, 32, 32, generator=generator),
        "label": torch.arange(batch_size) % 3,
        "index": torch.arange(batch_size),
        "guidance": {name: torch.randn(batch_size, d, generator=generator) for name, d in dims},
    }


def test_step_weights_losses_per_weighting_and_logs_them():
    batch = guided_batch()
    for weighting in ("equal", "offline", "online1", "online2"):
        torch.manual_seed(0)
        fixed = {"bu": 0.8, "places": 0.2} if weighting == "offline" else None
        method = DTG(
            tiny_student(),
            teachers={"bu": 6, "places": 5},
            weighting=weighting,
            fixed_weights=fixed,
            queue_size=16,
            trace_steps=3,
        )
        out = method(batch)
        logs = out.logs
        assert out.logits is None
        assert logs["w_bu"] + logs["w_places"] == pytest.approx(1.0, abs=1e-6)
        if weighting == "offline":
            assert logs["w_bu"] == pytest.approx(0.8)
        if weighting == "equal":
            expected = (logs["loss_bu"] + logs["loss_places"]) / 2
            assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
        # The first step's negatives are random unit vectors: a loss near log(K + 1).
        assert 1.0 < out.loss.item() < 2 * math.log(17)
        assert method.trace().shape == (1, 2)
        assert method.trace()[0] == pytest.approx([logs["w_bu"].item(), logs["w_places"].item()])


def test_supervised_loss_is_alpha_contrastive_plus_beta_cross_entropy():
    batch = guided_batch()
    batch["label"][:3] = -1  # unlabeled clips are left out of CE
    torch.manual_seed(0)
    method = DTG(
        tiny_student(num_classes=3),
        teachers={"bu": 6, "places": 5},
        supervised=True,
        alpha=0.1,
        beta=1.0,
        queue_size=16,
    )
    out = method(batch)
    labeled = batch["label"] >= 0
    ce = F.cross_entropy(out.logits[labeled], batch["label"][labeled])
    assert out.logs["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(0.1 * out.logs["ct"].item() + ce.item(), rel=1e-5)
    assert out.logits.shape == (8, 3)
    with pytest.raises(ValueError, match="classifier"):
        DTG(tiny_student(num_classes=0), teachers={"bu": 6}, supervised=True)


def test_training_steps_reduce_the_loss_on_a_fixed_batch():
    batch = guided_batch(batch_size=16)
    torch.manual_seed(0)
    # A queue as big as the batch: after the first step it holds exactly this batch's guidance,
    # so the task is to tell the 16 videos apart, which a few steps learn.
    method = DTG(tiny_student(), teachers={"bu": 6, "places": 5}, queue_size=16)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = method(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[1], losses


def test_weight_trace_survives_a_state_dict_round_trip():
    batch = guided_batch()
    method = DTG(
        tiny_student(),
        teachers={"bu": 6, "places": 5},
        weighting="online1",
        trace_steps=2,
        queue_size=16,
    )
    for _ in range(3):  # one step more than the trace holds
        method(batch)
    assert method.trace_len.item() == 2
    restored = DTG(
        tiny_student(),
        teachers={"bu": 6, "places": 5},
        weighting="online1",
        trace_steps=2,
        queue_size=16,
    )
    restored.load_state_dict(method.state_dict())
    assert np.array_equal(restored.trace(), method.trace())
    assert torch.equal(restored.queue("bu"), method.queue("bu"))
    assert restored.queue_ptr.item() == (3 * 8) % 16


# ---------------------------------------------------------------- guided items


@pytest.mark.parametrize("guidance", ["seq", "img"])
def test_guided_items_carry_the_cached_guidance_of_the_guidance_frames(shard_dir, guidance):
    caches = fake_caches(shard_dir)
    dataset = GuidedClipDataset(
        shard_dir,
        rows=np.arange(NUM_VIDEOS),
        caches=caches,
        segments=SEGMENTS,
        crop_size=16,
        guidance=guidance,
        seed=3,
    )
    assert dataset.feature_dims == {"bu": 6, "places": 5}
    for position in range(NUM_VIDEOS):
        item = dataset[position]
        row, frames = item["index"], item["guidance_frames"].numpy()
        assert item["video"].shape == (3, SEGMENTS, 16, 16)
        assert frames.shape == ((SEGMENTS,) if guidance == "seq" else (1,))
        for name, cache in caches.items():
            expected = cache.table[row][frames].mean(axis=0)
            assert item["guidance"][name].dtype == torch.float32
            assert np.allclose(item["guidance"][name].numpy(), expected)
        again = dataset[position]
        assert torch.equal(again["video"], item["video"]) and torch.equal(
            again["guidance_frames"], item["guidance_frames"]
        )
    # img: the frame is one of the guidance sequence's, and not always the same one of it
    if guidance == "img":
        dataset.set_epoch(1)
        picks = {int(dataset[p]["guidance_frames"][0]) for p in range(NUM_VIDEOS)}
        assert len(picks) > 2


def test_guided_items_without_overlap_keep_the_sequences_apart(shard_dir):
    dataset = GuidedClipDataset(
        shard_dir,
        rows=np.arange(NUM_VIDEOS),
        caches=fake_caches(shard_dir),
        segments=SEGMENTS,
        crop_size=16,
        overlap=False,
    )
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for position in range(NUM_VIDEOS):
            item = dataset[position]
            anchor, guidance = item["frames"].numpy(), item["guidance_frames"].numpy()
            assert anchor.max() < NUM_FRAMES // 2 <= guidance.min()


def test_guided_anchor_is_decoded_from_the_anchor_frames(shard_dir):
    """The anchor video is the anchor frames' content (fixture frames encode the frame index in
    red); with a real feature cache the guidance equals the teacher on the guidance frames."""
    teacher = tiny_teacher("bu", seed=0)
    out = shard_dir.parent / "cache-bu"
    build_feature_cache(
        shard_dir=shard_dir,
        teacher=teacher,
        checkpoint_sha256="x" * 64,
        out_dir=out,
        dataset="fixture",
    )
    cache = FeatureCache(out, shard_dir)
    dataset = GuidedClipDataset(
        shard_dir,
        rows=np.arange(NUM_VIDEOS),
        caches={"bu": cache},
        segments=SEGMENTS,
        crop_size=24,
        seed=1,
    )
    store = ShardStore(shard_dir)
    for position in range(NUM_VIDEOS):
        item = dataset[position]
        video = prepare_video(item["video"][None])[0]  # as the trainer prepares a batch
        red = video[0, :, 0, 0] * 0.229 + 0.485  # un-normalise channel 0
        assert torch.allclose(red * 255, (item["frames"] * 7 % 256).float(), atol=0.01)
        frames = store.read_clip(item["index"], item["guidance_frames"].numpy())
        online = teacher(torch.from_numpy(np.ascontiguousarray(frames)))["embedding"].mean(0)
        assert torch.allclose(item["guidance"]["bu"], online, rtol=2e-3, atol=2e-3), item["index"]


# ---------------------------------------------------------------- pre-training, figures, bench


def tiny_teacher(name: str, seed: int) -> FrozenTeacher:
    torch.manual_seed(seed)
    network = resnet_2d(
        "resnet18", num_classes=0, width=4, layers=(1, 1, 1, 1), stem_stride=4, stem_pool=False
    )
    return FrozenTeacher(name, network, Preprocess(size=16), feature_dim=network.feature_dim)


@pytest.fixture(scope="module")
def real_caches(shard_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("features")
    dirs = {}
    for seed, name in enumerate(("bu", "places")):
        dirs[name] = out / name
        build_feature_cache(
            shard_dir=shard_dir,
            teacher=tiny_teacher(name, seed),
            checkpoint_sha256=f"{seed}" * 64,
            out_dir=dirs[name],
            dataset="fixture",
        )
    return dirs


def pretrain(shard_dir, caches, run_dir, weighting: str, figure=None, **kwargs):
    return pretrain_dtg(
        shard_dir=shard_dir,
        caches=caches,
        run_dir=run_dir,
        split=1,
        teachers=["bu", "places"],
        weighting=weighting,
        offline_accuracies=kwargs.pop("offline_accuracies", None),
        model={"name": "r3d_18", **TINY_VIDEO_SETTINGS["r3d_18"]},
        clips={"segments": SEGMENTS, "crop": 16, "guidance": "seq", "overlap": True, "flip": False},
        dtg={
            "tau": 0.1,
            "queue_size": 6,
            "proj_hidden": 16,
            "online1_temperature": 1.0,
            "online2_temperature": 0.1,
        },
        train={
            "epochs": 2,
            "lr": 0.05,
            "weight_decay": 5e-4,
            "batch_size": 4,
            "workers": 0,
            "device": "cpu",
        },
        seed=0,
        threads=1,
        params={"test": weighting},
        figure=figure,
    )


def test_pretrain_writes_a_backbone_that_fine_tuning_loads(shard_dir, real_caches, tmp_path):
    run_dir = tmp_path / "run"
    metrics = pretrain(shard_dir, real_caches, run_dir, "online1", figure=tmp_path / "fig3.png")
    train_videos = (pd.read_parquet(shard_dir / "manifest.parquet")["split1"] == "train").sum()
    assert metrics["pretrain_videos"] == train_videos == 8
    assert len(metrics["history"]) == 2 and metrics["steps_per_epoch"] == 2
    assert sum(metrics["weights"].values()) == pytest.approx(1.0, abs=1e-6)
    assert "train_w_bu" in metrics["history"][-1] and "train_loss_places" in metrics["history"][-1]
    assert json.loads((run_dir / "metrics.json").read_text())["weights"] == metrics["weights"]
    trace = pd.read_csv(run_dir / "online_weights.csv")
    assert list(trace.columns) == ["step", "epoch", "w_bu", "w_places"]
    assert len(trace) == 4 and trace["epoch"].tolist() == [0, 0, 1, 1]
    assert np.allclose(trace[["w_bu", "w_places"]].sum(axis=1), 1.0, atol=1e-6)
    assert (tmp_path / "fig3.png").stat().st_size > 1000
    # The student backbone alone, which a fine-tune with a 3-class head starts from.
    state = torch.load(run_dir / "model.pt", weights_only=True)["model"]
    assert not any(k.startswith(("heads.", "queue", "fc.")) for k in state)
    target = tiny_student(num_classes=3)
    load_init(target, run_dir / "model.pt")
    assert torch.equal(target.state_dict()["stem.0.weight"], state["stem.0.weight"])


def test_pretrain_offline_weights_and_a_rerun_resumes(shard_dir, real_caches, tmp_path):
    accuracies = {"bu": 62.0, "places": 50.0}
    first = pretrain(
        shard_dir, real_caches, tmp_path / "run", "offline", offline_accuracies=accuracies
    )
    expected = offline_weights([62.0, 50.0])
    assert [first["weights"]["bu"], first["weights"]["places"]] == pytest.approx(expected)
    assert not (tmp_path / "run" / "online_weights.csv").exists()
    again = pretrain(
        shard_dir, real_caches, tmp_path / "run", "offline", offline_accuracies=accuracies
    )
    assert again["history"] == first["history"]  # resumed from the last checkpoint: same run
    with pytest.raises(ValueError, match="single-teacher accuracies"):
        pretrain(shard_dir, real_caches, tmp_path / "other", "offline")


def test_figures_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    weights = rng.dirichlet([1, 2, 3], size=60)
    online_weights_figure(weights, ["a", "b", "c"], tmp_path / "w.png")
    labels = np.repeat(np.arange(3), 10)
    features = {
        "with DTG": rng.standard_normal((30, 8)) + labels[:, None] * 3,
        "without": rng.standard_normal((30, 8)),
    }
    tsne_figure(features, labels, ["x", "y", "z"], tmp_path / "tsne.png")
    assert (tmp_path / "w.png").stat().st_size > 1000 and (
        tmp_path / "tsne.png"
    ).stat().st_size > 1000
    with pytest.raises(ValueError, match="teachers"):
        online_weights_figure(weights, ["a", "b", "c", "d"], tmp_path / "bad.png")


def test_extract_features_averages_views():
    model = tiny_student(num_classes=3)
    videos = torch.randn(4, 2, 3, SEGMENTS, 32, 32)
    loader = [{"video": videos, "label": torch.tensor([0, 1, 2, 0])}]
    features, labels = extract_features(model, loader)
    with torch.no_grad():
        expected = (model.features(videos[:, 0]) + model.features(videos[:, 1])) / 2
    assert features.shape == (4, model.feature_dim) and labels.tolist() == [0, 1, 2, 0]
    assert np.allclose(features, expected.numpy(), atol=1e-5)


def test_bench_features_times_both_sides_on_the_same_guidance(shard_dir, real_caches, capsys):
    teachers = {name: tiny_teacher(name, seed) for seed, name in enumerate(("bu", "places"))}
    caches = {name: FeatureCache(path, shard_dir) for name, path in real_caches.items()}
    result = bench_features(
        shard_dir,
        teachers=teachers,
        caches=caches,
        cache_kib_per_1000_frames={"bu": 62.5, "places": 62.5},
        model={"name": "r3d_18", **TINY_VIDEO_SETTINGS["r3d_18"]},
        segments=SEGMENTS,
        crop=16,
        guidance="seq",
        overlap=True,
        batch_size=4,
        threads=1,
        steps=2,
    )
    assert result["guidance_max_relative_difference"] < 5e-3
    assert result["cache_clips_per_s"] > 0 and result["online_clips_per_s"] > 0
    assert "cache speed-up" in capsys.readouterr().out


def test_supervised_dtg_trains_with_fit_on_labeled_guided_clips(shard_dir, tmp_path):
    """How a fine-tune runs supervised DTG: GuidedClipDataset over labeled rows, fit with a
    validation loader of plain clips."""
    store = ShardStore(shard_dir)
    labeled = np.zeros(len(store), dtype=bool)
    labeled[::2] = True
    train_set = GuidedClipDataset(
        shard_dir,
        rows=np.arange(NUM_VIDEOS),
        caches=fake_caches(shard_dir),
        segments=SEGMENTS,
        crop_size=16,
        label_mask=labeled,
    )
    val_set = ClipDataset(
        shard_dir,
        rows=np.arange(NUM_VIDEOS),
        sampler=SegmentSampler(SEGMENTS, train=False),
        crop_size=16,
        train=False,
    )
    seed_everything(0)
    method = DTG(
        tiny_student(num_classes=3), teachers=train_set.feature_dims, supervised=True, queue_size=8
    )
    metrics = fit(
        method,
        make_loader(train_set, batch_size=4, shuffle=True, seed=0, drop_last=True, device="cpu"),
        val_loader=make_loader(val_set, batch_size=4, shuffle=False, seed=0, device="cpu"),
        run_dir=tmp_path,
        params={"test": "supervised dtg"},
        spec=TrainSpec(epochs=1, lr=0.05, device="cpu"),
    )
    last = metrics["last_epoch"]
    assert 0 <= last["train_top1"] <= 1 and "val_clip_top1" in last
    assert last["train_loss"] == pytest.approx(0.1 * last["train_ct"] + last["train_ce"], rel=1e-4)
