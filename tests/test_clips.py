import io
import pickle
from pathlib import Path

import decord
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.data.clips import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipDataset,
    prepare_video,
    select_rows,
    three_crop,
    to_tensor,
)
from pipeline.data.ingest import ingest
from pipeline.data.samplers import (
    DenseSampler,
    MultiClipSampler,
    PairSampler,
    SegmentSampler,
    UniformClipsSampler,
)
from pipeline.data.shards import ShardStore, _read_raw
from pipeline.data.synth import write_mp4
from pipeline.errors import DataError

PERCENTS = (1, 5, 10, 20, 50)
JPEG_QUALITY = 95


def fixture_frames(video: int, num_frames: int, height: int, width: int) -> np.ndarray:
    """Red encodes the frame, green the video, blue a left-to-right ramp (orientation).

    Smooth content, so that JPEG round trips stay within a few levels."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    frames[..., 0] = (np.arange(num_frames) * 7 % 256)[:, None, None]
    frames[..., 1] = video * 20 % 256
    frames[..., 2] = np.linspace(0, 255, width).astype(np.uint8)
    return frames


def write_test_shards(
    out_dir: Path,
    videos: list[np.ndarray],
    labels: list[int],
    *,
    codec: str = "raw",
    num_shards: int = 2,
    class_names: tuple[str, ...] = ("Walk", "Run", "Jump"),
    rejected: tuple[tuple[str, str], ...] = (),
) -> Path:
    """Shards in exactly the format README.md, "Shards", describes, written without ingest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, per_shard = [], [[] for _ in range(num_shards)]
    for v, (frames, label) in enumerate(zip(videos, labels, strict=True)):
        shard = v % num_shards
        offset = sum(len(f) for f in per_shard[shard])
        per_shard[shard].append(frames)
        name = class_names[label]
        rows.append(
            {
                "video_id": f"v_{name}_g{v:02d}_c01",
                "path": f"videos/{name}/v_{name}_g{v:02d}_c01.mp4",
                "label": label,
                "label_name": name,
                "group": f"g{v:02d}",
                "num_frames": len(frames),
                "fps": 25.0,
                "height": frames.shape[1],
                "width": frames.shape[2],
                "shard": shard,
                "offset": offset,
                "split1": "train" if v % 3 else "test",
                **{f"labeled_{p}": bool(v % 3) and v % 2 == (p > 5) for p in PERCENTS},
            }
        )
    for shard, shard_videos in enumerate(per_shard):
        with h5py.File(out_dir / f"shard-{shard:05d}.h5", "w") as file:
            if codec == "raw":  # one (frames, H, W, 3) array: raw needs a single frame size
                if len({frames.shape[1:] for frames in shard_videos}) > 1:
                    raise ValueError("raw shards hold a single frame size")
                rgb = np.concatenate(shard_videos)
                file.create_dataset("frames", data=rgb, chunks=(1, *rgb.shape[1:]))
                count = len(rgb)
            else:
                encoded = [encode_jpeg(frame) for frames in shard_videos for frame in frames]
                data = file.create_dataset(
                    "frames", (len(encoded),), dtype=h5py.vlen_dtype(np.uint8), chunks=(1,)
                )
                for k, element in enumerate(encoded):
                    data[k] = element
                count = len(encoded)
            file.attrs.update(codec=codec, dataset="fixture", num_frames=count, key="k0")
    manifest = pd.DataFrame(rows).astype(
        {"label": "int64", "num_frames": "int64", "height": "int64", "width": "int64"}
    )
    manifest.to_parquet(out_dir / "manifest.parquet", index=False)
    pd.DataFrame(list(rejected), columns=["path", "reason"]).to_csv(
        out_dir / "rejected.csv", index=False
    )
    return out_dir


def encode_jpeg(frame: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return np.frombuffer(buffer.getvalue(), np.uint8)


# (frames, height, width) per video: landscape, portrait and wider frames.
MIXED_SIZES = [(40, 24, 32), (25, 24, 32), (60, 32, 24), (9, 24, 32), (33, 24, 40), (50, 24, 32)]


def fixture_videos(mixed_sizes: bool = True) -> tuple[list[np.ndarray], list[int]]:
    """Six videos and labels; all 24x32 unless `mixed_sizes` (JPEG shards only)."""
    sizes = MIXED_SIZES if mixed_sizes else [(n, 24, 32) for n, _, _ in MIXED_SIZES]
    videos = [fixture_frames(v, *size) for v, size in enumerate(sizes)]
    return videos, [v % 3 for v in range(len(sizes))]


@pytest.fixture(scope="module", params=["raw", "jpeg"])
def shards(request, tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    videos, labels = fixture_videos(mixed_sizes=request.param == "jpeg")
    out = tmp_path_factory.mktemp(f"shards-{request.param}")
    return write_test_shards(out, videos, labels, codec=request.param), videos


def test_read_clip_round_trip(shards):
    shard_dir, videos = shards
    store = ShardStore(shard_dir)
    max_error, mean_error = (0, 0) if store.codec(0) == "raw" else (8, 1.5)  # JPEG is lossy
    assert len(store) == len(videos)
    for row, video in enumerate(videos):
        assert store.num_frames(row) == len(video)
        # Scattered and repeated, consecutive, near (a raw read slices then indexes these).
        for indices in ([len(video) - 1, 0, 3, 3, 1], [2, 3, 4, 5, 6], [0, 2, 4, 6, 8]):
            clip = store.read_clip(row, np.array(indices))
            assert clip.dtype == np.uint8 and clip.shape == (5, *video.shape[1:])
            error = np.abs(clip.astype(int) - video[indices].astype(int))
            assert error.max() <= max_error and error.mean() <= mean_error


def test_store_labels_and_class_names(shards):
    store = ShardStore(shards[0])
    assert store.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert store.class_names == ["Walk", "Run", "Jump"]


def test_read_clip_rejects_out_of_range(shards):
    store = ShardStore(shards[0])
    with pytest.raises(IndexError, match="row 3"):
        store.read_clip(3, np.array([0, 9]))


def test_store_pickles_without_handles(shards):
    store = ShardStore(shards[0])
    store.read_clip(0, np.arange(4))  # opens a handle
    copy = pickle.loads(pickle.dumps(store))
    assert np.array_equal(copy.read_clip(0, np.arange(4)), store.read_clip(0, np.arange(4)))


def test_store_reports_missing_and_bad_shards(tmp_path):
    with pytest.raises(DataError, match="manifest.parquet"):
        ShardStore(tmp_path)
    videos, labels = fixture_videos(mixed_sizes=False)
    write_test_shards(tmp_path, videos, labels)
    with h5py.File(tmp_path / "shard-00001.h5", "a") as file:
        file.attrs["codec"] = "png"
    store = ShardStore(tmp_path)
    with pytest.raises(DataError, match="shard-00001.h5: .*png"):
        store.read_clip(1, np.arange(2))


def test_store_reports_raw_shards_of_the_old_layout_or_other_size(tmp_path):
    videos, labels = fixture_videos(mixed_sizes=False)
    write_test_shards(tmp_path, videos, labels)
    with h5py.File(tmp_path / "shard-00001.h5", "a") as file:  # as ingest wrote it before
        count = len(file["frames"])
        del file["frames"]
        old = file.create_dataset("frames", (count,), dtype=h5py.vlen_dtype(np.uint8))
        for k, frame in enumerate(np.concatenate(videos[1::2])):
            old[k] = frame.reshape(-1)
    with h5py.File(tmp_path / "shard-00000.h5", "a") as file:
        del file["frames"]
        file.create_dataset("frames", data=np.concatenate(videos[::2])[:, :, :30])
    store = ShardStore(tmp_path)
    with pytest.raises(DataError, match=r"shard-00001.h5: raw frames .* older ingest"):
        store.read_clip(1, np.arange(2))
    with pytest.raises(DataError, match=r"24x30, but the manifest says 24x32 for videos/Walk"):
        store.read_clip(0, np.arange(2))


class RecordedReads:
    """An array that records the keys it is read with, like an h5py dataset would be read."""

    def __init__(self, array: np.ndarray):
        self.array, self.keys = array, []

    def __getitem__(self, key):
        self.keys.append(key)
        return self.array[key]


@pytest.mark.parametrize(
    ("rows", "keys"),
    [
        ([3, 4, 5, 6], [slice(3, 7)]),  # consecutive: one slice
        ([3, 5, 7, 9], [slice(3, 10)]),  # near: one slice, then an index in memory
        ([0, 20, 39], [0, 20, 39]),  # far apart: a slice would read 37 frames for nothing
    ],
)
def test_raw_reads_slice_near_frames_and_read_far_ones_singly(rows, keys):
    frames = RecordedReads(fixture_frames(0, 40, 24, 32))
    clip = _read_raw(frames, np.array(rows), frame_kib=24 * 32 * 3 / 1024)
    np.testing.assert_array_equal(clip, frames.array[rows])
    assert frames.keys == keys


def test_select_rows(shards):
    manifest = ShardStore(shards[0]).manifest
    assert select_rows(manifest, "split1", "test").tolist() == [0, 3]
    assert select_rows(manifest, "split1", "train").tolist() == [1, 2, 4, 5]
    assert select_rows(manifest, "split1", "train", labeled_percent=10).tolist() == [1, 5]
    with pytest.raises(ValueError, match="labeled_7"):
        select_rows(manifest, "split1", "train", labeled_percent=7)


def dataset(shard_dir, sampler, **kwargs) -> ClipDataset:
    defaults = dict(rows=np.arange(6), crop_size=16, train=True, seed=3)
    return ClipDataset(shard_dir, sampler=sampler, **{**defaults, **kwargs})


@pytest.mark.parametrize(
    ("sampler", "three", "video_shape", "frames_shape"),
    [
        (SegmentSampler(8, train=True), False, (3, 8, 16, 16), (8,)),
        (DenseSampler(4, 2, train=False), False, (3, 4, 16, 16), (4,)),
        (DenseSampler(4, 2, train=False), True, (3, 3, 4, 16, 16), (3, 4)),
        (PairSampler(SegmentSampler(4, True), overlap=False), False, (2, 3, 4, 16, 16), (2, 4)),
        (MultiClipSampler(4, 4, 1, train=True), False, (4, 3, 4, 16, 16), (4, 4)),
        (UniformClipsSampler(2, 4, 1), True, (6, 3, 4, 16, 16), (6, 4)),
    ],
)
def test_item_shapes(shards, sampler, three, video_shape, frames_shape):
    data = dataset(shards[0], sampler, train=not three, three_crop=three)
    for position in (0, 2):  # landscape and portrait frames
        item = data[position]
        assert item["video"].shape == video_shape and item["video"].dtype == torch.uint8
        assert item["frames"].shape == frames_shape and item["frames"].dtype == torch.int64
        assert item["label"] == position % 3 and item["index"] == position
        assert int(item["frames"].max()) < len(shards[1][position])


def test_three_crop_views_repeat_frames_and_cover_long_side(shards):
    data = dataset(shards[0], UniformClipsSampler(2, 4, 1), train=False, three_crop=True)
    item = data[4]  # 24x40 frames: crops at left, centre, right
    assert torch.equal(item["frames"][0], item["frames"][2])
    assert not torch.equal(item["frames"][2], item["frames"][3])
    crops = three_crop(np.arange(24 * 40).reshape(1, 24, 40, 1), 16)
    assert [c[0, 0, 0, 0] % 40 for c in crops] == [0, 12, 24]
    assert [c[0, 0, 0, 0] // 40 for c in crops] == [4, 4, 4]


def test_normalisation_and_labels(shards):
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.5, 1.0)
    data = dataset(
        shards[0], DenseSampler(4, 1, False), train=False, mean=mean, std=std,
        label_mask=np.array([True, False, True, False, True, False]),
    )  # fmt: skip
    item = data[1]
    centre = ShardStore(shards[0]).read_clip(1, item["frames"].numpy())[:, 4:20, 8:24]  # 24x32
    pixels = torch.from_numpy(centre).permute(3, 0, 1, 2) / 255
    for channel in range(3):
        expected = (pixels[channel] - mean[channel]) / std[channel]
        torch.testing.assert_close(item["video"][channel], expected)
    assert [data[i]["label"] for i in range(6)] == [0, -1, 2, -1, 1, -1]


def test_uint8_items_become_the_normalised_float_clip(shards):
    plain = dataset(shards[0], DenseSampler(4, 1, False), train=False)
    explicit = dataset(
        shards[0], DenseSampler(4, 1, False), train=False, mean=(0.485, 0.456, 0.4060001)
    )  # other statistics: the item is normalised by the dataset itself
    assert plain[1]["video"].dtype == torch.uint8 and explicit[1]["video"].dtype == torch.float32
    batch = torch.stack([plain[1]["video"], plain[2]["video"]])
    prepared = prepare_video(batch)
    assert prepared.dtype == torch.float32
    centre = ShardStore(shards[0]).read_clip(1, plain[1]["frames"].numpy())[:, 4:20, 8:24]
    expected = to_tensor(centre, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(prepared[0], expected, atol=1e-5, rtol=1e-5)
    assert prepare_video(prepared) is prepared  # float batches pass through


def test_epoch_keys_equal_set_epoch(shards):
    data = dataset(shards[0], SegmentSampler(4, train=True))
    keyed = data[(3, 2)]
    data.set_epoch(3)
    assert torch.equal(keyed["video"], data[2]["video"])
    assert torch.equal(keyed["frames"], data[2]["frames"])


def test_items_depend_only_on_seed_epoch_position(shards):
    sampler = PairSampler(SegmentSampler(4, train=True), overlap=True)
    data = dataset(shards[0], sampler)
    first = data[5]
    again = dataset(shards[0], sampler)[5]
    assert torch.equal(first["video"], again["video"])
    assert torch.equal(first["frames"], again["frames"])
    data.set_epoch(1)
    assert not torch.equal(first["frames"], data[5]["frames"])
    other_seed = dataset(shards[0], sampler, seed=4)[5]
    assert not torch.equal(first["frames"], other_seed["frames"])


def test_dataloader_workers_give_same_batches(shards):
    data = dataset(shards[0], MultiClipSampler(2, 4, 1, train=True))
    data.set_epoch(2)
    data.store.read_clip(0, np.arange(2))  # an open handle must not break pickling

    def batches(workers: int) -> list[dict]:
        loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=workers)
        return list(loader)

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 2
    assert serial[0]["video"].shape == (4, 2, 3, 4, 16, 16)
    for a, b in zip(serial, parallel, strict=True):
        for key in ("video", "label", "index", "frames"):
            assert torch.equal(a[key], b[key])


def test_dataset_rejects_bad_arguments(shards):
    with pytest.raises(DataError, match="crop 30 exceeds the frames' smallest side .* dtg.crop"):
        dataset(shards[0], SegmentSampler(4, True), crop_size=30)
    with pytest.raises(ValueError, match="three_crop"):
        dataset(shards[0], SegmentSampler(4, True), three_crop=True)
    with pytest.raises(ValueError, match="label_mask"):
        dataset(shards[0], SegmentSampler(4, True), label_mask=np.ones(3, bool))


@pytest.mark.parametrize("codec", ["raw", "jpeg"])
def test_reads_what_ingest_wrote(tmp_path, codec):
    """The reader against the real ingest: frames equal decord's decode of the source videos."""
    raw = tmp_path / "raw"
    lists = raw / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 Walk\r\n2 Run\r\n")
    names = ["Walk/v_Walk_g01_c01.mp4", "Run/v_Run_g01_c01.mp4", "Run/v_Run_g02_c01.mp4"]
    (lists / "trainlist01.txt").write_text(
        "".join(f"{n} {1 + n.startswith('Run')}\r\n" for n in names[1:])
    )
    (lists / "testlist01.txt").write_text(f"{names[0]}\r\n")
    rng = np.random.default_rng(0)
    for number, name in enumerate(names):
        (raw / "videos" / name).parent.mkdir(parents=True, exist_ok=True)
        frames = np.repeat(rng.integers(0, 255, (20 + number, 8, 10, 3), np.uint8), 8, axis=1)
        write_mp4(raw / "videos" / name, np.repeat(frames, 8, axis=2), fps=25, crf=18)
    shard_dir = tmp_path / "shards"
    ingest(
        raw, shard_dir, fmt="ucf101", split=1, short_side=32, num_shards=2, codec=codec,
        jpeg_quality=JPEG_QUALITY, min_frames=16, workers=1, strict=True, seed=0, percents=(50,),
    )  # fmt: skip
    store = ShardStore(shard_dir)
    assert sorted(store.manifest["path"]) == sorted(f"videos/{n}" for n in names)
    for row, video in store.manifest.iterrows():
        reader = decord.VideoReader(
            str(raw / video["path"]),
            num_threads=1,
            height=int(video["height"]),
            width=int(video["width"]),
        )
        expected = reader.get_batch(list(range(len(reader)))).asnumpy()
        if codec == "jpeg":  # what ingest stored: the frames through a JPEG round trip
            expected = np.stack(
                [np.asarray(Image.open(io.BytesIO(encode_jpeg(f)))) for f in expected]
            )
        clip = store.read_clip(row, np.arange(store.num_frames(row)))
        assert clip.shape == expected.shape == (len(reader), 32, 40, 3)
        assert np.abs(clip.astype(int) - expected).mean() <= (0 if codec == "raw" else 0.5)


def test_persistent_workers_see_each_epoch_like_the_main_process(shards):
    from pipeline.train import make_loader, start_epoch

    data = dataset(shards[0], SegmentSampler(4, train=True))

    def two_epochs(workers: int) -> list[torch.Tensor]:
        loader = make_loader(data, batch_size=3, shuffle=True, seed=5, num_workers=workers)
        assert loader.persistent_workers == (workers > 0)
        batches = []
        for epoch in range(2):
            start_epoch(loader, 5, epoch)
            batches += [torch.cat([b["video"].flatten(), b["frames"].flatten()]) for b in loader]
        return batches

    serial, parallel = two_epochs(0), two_epochs(1)
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))
    assert not torch.equal(serial[0], serial[2])  # epoch 1 differs from epoch 0
