"""Decode a raw video dataset into HDF5 frame shards (format: README.md, "Shards").

Worker processes decode (decord, resized to the short side while decoding) and encode frames; the
parent alone writes HDF5, one shard at a time, each to a temp name that is `os.replace`d into place.
Raw shards hold one fixed-shape frame array, so a raw dataset must have a single stored frame size:
that is checked from the container headers before any shard is written.
The lists are read and checked before anything is written. The folder is built in a hidden sibling
(`pipeline.io.partial_folder`) and replaces the output only when complete, `manifest.parquet`
written last, so a failed ingest leaves the previous complete output, or none. A shard whose `key`
attr matches its params and input files (path, size, mtime) is kept on a rerun, so a killed ingest
resumes where it stopped, even after Snakemake deleted the unfinished output. Bad videos are
quarantined in `rejected.csv` with a reason.
"""

import collections
import ctypes
import dataclasses
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import signal
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import av
import decord
import h5py
import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from pipeline.data.shards import FRAME_CRC32, MANIFEST, MANIFEST_COLUMNS, jpeg_crc32
from pipeline.data.splits import Rejection, labeled_subsets, read_hmdb51, read_ucf101
from pipeline.errors import DataError
from pipeline.io import (
    atomic_hdf5,
    atomic_path,
    partial_folder,
    remove_leftovers,
    replace_folder,
    reuse_file,
    write_json_atomic,
)

READERS = {"ucf101": read_ucf101, "hmdb51": read_hmdb51}
CODECS = ("jpeg", "raw")
# Part of every shard key: bump it when the shard layout changes. 2: raw frames are one fixed-shape
# (frames, H, W, 3) uint8 dataset instead of per-frame vlen bytes. 3: checksums (raw frames:
# HDF5's per-chunk fletcher32; JPEG frames: a CRC-32 per file in FRAME_CRC32).
SHARD_VERSION = 3
CRC32_CHUNK = 4096  # rows per chunk of FRAME_CRC32 (16 KiB)
REJECTED = "rejected.csv"
SUMMARY = "ingest.json"
DECODE_CHUNK = 32  # frames per get_batch call: bounds a worker's memory on long videos
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# decord prefixes errors with "[hh:mm:ss] /source/file.cc:123: "; reasons must not vary by run.
DECORD_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (ERROR |Error: )?")

decord.logging.set_level(decord.logging.QUIET)  # reasons go to rejected.csv, not ffmpeg noise


@dataclass
class DecodedVideo:
    frames: np.ndarray | list[np.ndarray]  # raw: RGB uint8 (T, H, W, 3); jpeg: one file per frame
    fps: float
    height: int
    width: int


@dataclass(frozen=True)
class ShardPlan:
    index: int
    path: Path
    videos: tuple[str, ...]  # paths relative to the raw root, in write order
    key: str


def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with short side `short_side`, aspect kept, the long side rounded to even."""
    if height <= width:
        return short_side, max(2, 2 * round(width * short_side / height / 2))
    return max(2, 2 * round(height * short_side / width / 2)), short_side


def decode_video(
    path: str, *, short_side: int, codec: str, jpeg_quality: int, min_frames: int
) -> DecodedVideo | Rejection:
    """Decode and encode every frame of one video, or say why it is rejected. Never raises."""
    try:
        if Path(path).stat().st_size == 0:
            return Rejection(path, "empty file")
        reader = decord.VideoReader(path, num_threads=1)
        num_frames = len(reader)
        if num_frames < min_frames:
            return Rejection(path, f"too short: {num_frames} frames < min_frames {min_frames}")
        # Frame 0 gives (H, W), right even when the channel count is not (below). next(), not
        # reader[0]: on tiny videos a seek to frame 0 costs ~2 ms, half a whole decode.
        first = reader.next()
        fps = float(reader.get_avg_fps())
        target = resized_shape(*first.shape[:2], short_side)
        if target != first.shape[:2]:
            del reader
            reader = decord.VideoReader(path, num_threads=1, width=target[1], height=target[0])
            first = reader.next()
        if decord_output_is_rgb(first):
            rgb = _decord_frames(reader, first.asnumpy(), num_frames)
        else:
            del reader
            rgb = pyav_frames(path, *target)
        frames = list(rgb) if codec == "raw" else [_jpeg(frame, jpeg_quality) for frame in rgb]
        if len(frames) < min_frames:
            return Rejection(path, f"too short: {len(frames)} frames < min_frames {min_frames}")
        if codec == "raw":  # one array: written to the shard as one block
            frames = np.stack(frames)
        return DecodedVideo(frames, fps, target[0], target[1])
    except Exception as err:  # any decoder failure quarantines the video, never the run
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        # Reasons must not depend on where the raw folder lives: keep only the file name.
        message = DECORD_PREFIX.sub("", message).replace(path, Path(path).name)
        return Rejection(path, f"cannot decode: {message}")


def _decord_frames(
    reader: decord.VideoReader, first: np.ndarray, num_frames: int
) -> Iterator[np.ndarray]:
    """`first` (frame 0, already read), then frames 1.. read on from there in chunks."""
    yield first
    for start in range(1, num_frames, DECODE_CHUNK):
        yield from reader.get_batch(
            list(range(start, min(start + DECODE_CHUNK, num_frames)))
        ).asnumpy()
    reader.seek(0)  # decord keeps seek buffers per reader; memory stays flat across videos


def decord_output_is_rgb(frame: decord.nd.NDArray) -> bool:
    """False for decord's bad output widths, where ingest and the bench decode with PyAV instead.

    decord bug (dmlc/decord#93): some output widths (2-16, 24, 48, 72 seen here) come back with
    4-6 "channels" and get_batch fails. PyAV decodes those (identical frames at the native size,
    measured; resizing differs from decord's by ~1 grey level).
    """
    return frame.shape[2] == 3


def pyav_frames(
    path: str, height: int, width: int, count: int | None = None
) -> Iterator[np.ndarray]:
    """The first `count` frames (all when None) of `path`, decoded and resized by PyAV."""
    with av.open(path) as container:
        for frame in itertools.islice(container.decode(video=0), count):
            yield frame.to_ndarray(
                format="rgb24", width=width, height=height, interpolation="BILINEAR"
            )


def probe_frame_size(path: str, *, short_side: int, min_frames: int) -> tuple[int, int] | None:
    """The stored (height, width) of `path` read from its container header (~0.7 ms where a
    decode takes ~4 ms), or None where the header says ingest will reject it. Never raises."""
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            if 0 < stream.frames < min_frames:  # 0: the container does not say
                return None
            height, width = stream.codec_context.height, stream.codec_context.width
    except Exception:  # unreadable: decode_video rejects it with the reason
        return None
    return resized_shape(height, width, short_side) if height > 0 and width > 0 else None


def _jpeg(frame: np.ndarray, jpeg_quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=jpeg_quality)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def ingest(
    raw_dir: Path,
    out_dir: Path,
    *,
    fmt: str,
    split: int,
    short_side: int,
    num_shards: int,
    codec: str,
    jpeg_quality: int,
    min_frames: int,
    workers: int,
    strict: bool,
    seed: int,
    percents: Sequence[int] = (1, 5, 10, 20, 50),
) -> dict:
    """Ingest the dataset at `raw_dir` (layout `fmt`) into `out_dir`; return the summary.

    Output does not depend on `workers`. With `strict`, any rejected input raises DataError after
    all videos were tried (rejected.csv is written in the partial folder; `out_dir` is left as it
    was).
    """
    if fmt not in READERS:
        raise ValueError(f"fmt must be one of {sorted(READERS)}, got {fmt!r}")
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    if short_side < 2 or short_side % 2:
        raise ValueError(f"short_side must be a positive even number, got {short_side}")
    if num_shards < 1 or workers < 1 or min_frames < 1:
        raise ValueError("num_shards, workers and min_frames must be >= 1")
    started = time.perf_counter()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    videos, rejections = _listed_videos(raw_dir, fmt, split)  # before anything is written
    split_col = f"split{split}"

    decode_params = {
        "short_side": short_side,
        "codec": codec,
        "jpeg_quality": jpeg_quality,
        "min_frames": min_frames,
    }
    # jpeg_quality does not change raw shards, so it stays out of their key.
    key_params = {k: v for k, v in decode_params.items() if codec == "jpeg" or k != "jpeg_quality"}
    work_dir = partial_folder(out_dir)
    plans = _plan_shards(
        raw_dir, work_dir, out_dir.name, list(videos["path"]), num_shards, key_params
    )
    work_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(work_dir, "shard-", num_shards)
    _reuse_output_shards(plans, out_dir)
    pending = [plan for plan in plans if not _shard_is_current(plan)]
    if len(pending) < len(plans):
        print(f"ingest: keeping {len(plans) - len(pending)} finished shards of {len(plans)}")
    frame_size = None
    if codec == "raw":  # before writing: a mixed dataset must fail with no new shard on disk
        kept = [plan for plan in plans if plan not in pending]
        frame_size = _single_frame_size(raw_dir, kept, pending, short_side, min_frames)
    _write_shards(pending, raw_dir, out_dir.name, decode_params, frame_size, workers)

    accepted, decode_rejections = _read_shard_indexes(plans)
    rejections = sorted(rejections + decode_rejections)
    with atomic_path(work_dir / REJECTED, suffix=".csv") as tmp:
        pd.DataFrame([(r.path, r.reason) for r in rejections], columns=["path", "reason"]).to_csv(
            tmp, index=False
        )
    if strict and rejections:
        raise DataError(_strict_summary(rejections, work_dir / REJECTED))

    manifest = _manifest(videos, accepted, split_col, percents, seed)
    by_reason = dict(
        sorted(collections.Counter(_reason_kind(r.reason) for r in rejections).items())
    )
    summary = {
        "dataset": out_dir.name,
        "format": fmt,
        "split": split,
        "videos": len(manifest),
        "frames": int(manifest["num_frames"].sum()),
        "rejected": len(rejections),
        "rejected_by_reason": by_reason,
        "shards_written": len(pending),
        "shards_kept": len(plans) - len(pending),
        "bytes": sum(plan.path.stat().st_size for plan in plans),
        "seconds": round(time.perf_counter() - started, 3),
        "codec": codec,
        "params": {
            **decode_params,
            "num_shards": num_shards,
            "split": split,
            "seed": seed,
            "percents": list(percents),
            "strict": strict,
            "workers": workers,
        },
    }
    write_json_atomic(work_dir / SUMMARY, summary)
    with atomic_path(work_dir / MANIFEST, suffix=".parquet") as tmp:  # last: marks completion
        manifest.to_parquet(tmp, index=False)
    replace_folder(out_dir, work_dir)
    print(f"ingest: rejected {len(rejections)} inputs {by_reason}; see {out_dir / REJECTED}")
    return summary


def _listed_videos(raw_dir: Path, fmt: str, split: int) -> tuple[pd.DataFrame, list[Rejection]]:
    """The videos on disk that the lists name, sorted by path, and the inputs rejected so far;
    DataError when the folder or the split is missing or no video is left to ingest."""
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir}: raw dataset folder not found")
    videos, rejections = READERS[fmt](raw_dir)
    if f"split{split}" not in videos.columns:
        raise DataError(f"{raw_dir}: split {split} has no list files (found {_split_cols(videos)})")
    if videos.empty:
        example = f" (e.g. {rejections[0].path}: {rejections[0].reason})" if rejections else ""
        raise DataError(f"{raw_dir}: no video to ingest: no listed video is on disk{example}")
    return videos.sort_values("path", ignore_index=True), rejections


def _plan_shards(
    raw_dir: Path,
    work_dir: Path,
    dataset: str,
    paths: list[str],
    num_shards: int,
    key_params: dict,
) -> list[ShardPlan]:
    """Round-robin over sorted paths: shard s holds videos s, s+S, s+2S, ... (classes spread)."""
    plans = []
    for index in range(num_shards):
        shard_videos = tuple(paths[index::num_shards])
        files = []
        for path in shard_videos:
            stat = (raw_dir / path).stat()
            files.append([path, stat.st_size, stat.st_mtime_ns])
        identity = {
            "version": SHARD_VERSION,
            "dataset": dataset,
            **key_params,
            "files": files,
        }
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        plans.append(ShardPlan(index, work_dir / f"shard-{index:05d}.h5", shard_videos, key))
    return plans


def _reuse_output_shards(plans: list[ShardPlan], out_dir: Path) -> None:
    """Take the shards of a complete earlier output that are still current (a rerun with other
    params or inputs redoes only the shards they change) into the partial folder."""
    for plan in plans:
        done = dataclasses.replace(plan, path=out_dir / plan.path.name)
        if not _shard_is_current(plan) and _shard_is_current(done):
            reuse_file(done.path, plan.path)


def _shard_is_current(plan: ShardPlan) -> bool:
    if not plan.path.is_file():
        return False
    try:
        with h5py.File(plan.path, "r") as file:
            return file.attrs.get("key") == plan.key and "index" in file
    except OSError:  # unreadable: written by a crashed tool, or not HDF5 at all
        return False


def _single_frame_size(
    raw_dir: Path,
    kept: list[ShardPlan],
    pending: list[ShardPlan],
    short_side: int,
    min_frames: int,
) -> tuple[int, int] | None:
    """The one stored frame size of a raw dataset (None when no video has one); DataError if the
    videos resize to several. Kept shards list their videos' sizes; the rest are probed here, in
    one process: a worker pool costs more than it saves on the synthetic world's tiny videos
    (measured, 60 videos: 30 ms in one process, 50-70 ms with 2 workers)."""
    sizes = {}
    kept_videos, _ = _read_shard_indexes(kept)
    for video in kept_videos.itertuples():
        sizes[video.path] = (int(video.height), int(video.width))
    for path in (path for plan in pending for path in plan.videos):
        size = probe_frame_size(str(raw_dir / path), short_side=short_side, min_frames=min_frames)
        if size:
            sizes[path] = size
    videos_by_size = collections.defaultdict(list)
    for path in sorted(sizes):
        videos_by_size[sizes[path]].append(path)
    if len(videos_by_size) > 1:
        common = sorted(videos_by_size.items(), key=lambda item: -len(item[1]))
        counts = ", ".join(f"{h}x{w}: {len(videos)}" for (h, w), videos in common)
        (size_a, (video_a, *_)), (size_b, (video_b, *_)) = common[:2]
        raise DataError(
            f"{raw_dir}: codec raw stores a single frame size per dataset, but the videos resize "
            f"(short_side {short_side}) to {len(common)} sizes ({counts} videos), e.g. {video_a} "
            f"to {size_a[0]}x{size_a[1]} and {video_b} to {size_b[0]}x{size_b[1]}; "
            "use `codec: jpeg` for datasets with mixed frame sizes"
        )
    return next(iter(videos_by_size), None)


def _write_shards(
    plans: list[ShardPlan],
    raw_dir: Path,
    dataset: str,
    decode_params: dict,
    frame_size: tuple[int, int] | None,
    workers: int,
) -> None:
    tasks = [str(raw_dir / path) for plan in plans for path in plan.videos]
    results = _decode_in_order(tasks, decode_params, workers)
    with tqdm(total=len(tasks), desc=f"ingest {dataset}", unit="video", disable=None) as bar:
        for plan in plans:
            _write_shard(plan, results, dataset, decode_params["codec"], frame_size, bar)


def _create_frames(file: h5py.File, codec: str, frame_size: tuple[int, int] | None) -> h5py.Dataset:
    """The shard's empty, growable "frames" dataset, one frame per chunk (README.md, "Shards");
    JPEG shards also get FRAME_CRC32, as HDF5 refuses checksum filters on variable-length data."""
    if codec == "jpeg":
        file.create_dataset(
            FRAME_CRC32,
            shape=(0,),
            maxshape=(None,),
            chunks=(CRC32_CHUNK,),
            dtype=np.uint32,
            fletcher32=True,
        )
        return file.create_dataset(
            "frames", shape=(0,), maxshape=(None,), chunks=(1,), dtype=h5py.vlen_dtype(np.uint8)
        )
    if frame_size is None:  # no video has a size, so none is accepted: an empty array will do
        return file.create_dataset("frames", shape=(0, 0, 0, 3), dtype=np.uint8)
    shape = (*frame_size, 3)
    return file.create_dataset(
        "frames",
        shape=(0, *shape),
        maxshape=(None, *shape),
        chunks=(1, *shape),
        dtype=np.uint8,
        fletcher32=True,  # a corrupt chunk fails its read
    )


def _write_shard(
    plan: ShardPlan,
    results: Iterator[DecodedVideo | Rejection],
    dataset: str,
    codec: str,
    frame_size: tuple[int, int] | None,
    bar: tqdm,
) -> None:
    """Write one shard from the next len(plan.videos) results; the file appears only when done."""
    index = {"videos": [], "rejected": []}  # stored in the shard so a kept shard needs no decode
    with atomic_hdf5(plan.path) as (file, check_written):
        frames = _create_frames(file, codec, frame_size)
        for path in plan.videos:
            result = next(results)
            bar.update(1)
            check_written()  # a full disk stops the shard at once
            if isinstance(result, Rejection):
                index["rejected"].append({"path": path, "reason": result.reason})
                continue
            offset = frames.shape[0]
            if codec == "raw":
                _append_raw(frames, result.frames, path, frame_size)
            else:
                _append_jpeg(frames, result.frames)
            index["videos"].append(
                {
                    "path": path,
                    "num_frames": len(result.frames),
                    "fps": result.fps,
                    "height": result.height,
                    "width": result.width,
                    "shard": plan.index,
                    "offset": offset,
                }
            )
        file.create_dataset("index", data=json.dumps(index))
        file.attrs.update(
            {"codec": codec, "dataset": dataset, "num_frames": frames.shape[0], "key": plan.key}
        )


def _append_raw(
    frames: h5py.Dataset, rgb: np.ndarray, path: str, frame_size: tuple[int, int] | None
) -> None:
    if rgb.shape[1:3] != frame_size:  # the header probe and the decoder disagree
        probed = "no size" if frame_size is None else f"{frame_size[0]}x{frame_size[1]}"
        raise DataError(
            f"{path}: decoded at {rgb.shape[1]}x{rgb.shape[2]}, but probing the dataset's "
            f"headers gave {probed}; use `codec: jpeg` for this dataset"
        )
    offset = frames.shape[0]
    frames.resize(offset + len(rgb), axis=0)
    frames[offset:] = rgb


def _append_jpeg(frames: h5py.Dataset, files: list[np.ndarray]) -> None:
    offset = frames.shape[0]
    encoded = np.empty(len(files), dtype=object)
    for k, file in enumerate(files):  # element-wise: equal lengths must not make numpy build a
        encoded[k] = file  # 2-D array
    frames.resize((offset + len(encoded),))
    # write_direct, not frames[a:b] = encoded: h5py turns equal-length frames into a 2-D array
    # and fails; write_direct is also ~2.5x faster than writing frame by frame.
    frames.write_direct(encoded, dest_sel=np.s_[offset : offset + len(encoded)])
    crc32 = frames.parent[FRAME_CRC32]
    crc32.resize((offset + len(encoded),))
    crc32[offset:] = jpeg_crc32(encoded)


def _decode_in_order(
    paths: list[str], decode_params: dict, workers: int
) -> Iterator[DecodedVideo | Rejection]:
    """decode_video over `paths`, results in input order, at most 2 per worker in flight."""
    if workers == 1:
        for path in paths:
            yield decode_video(path, **decode_params)
        return
    # ProcessPoolExecutor, not multiprocessing.Pool: a worker killed by the OS (OOM, a decoder
    # segfault) raises BrokenProcessPool here, where Pool would wait forever. Forked, so that the
    # workers are this process's children (Python 3.14 starts them from a forkserver by default).
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_die_with_parent,
        initargs=(os.getpid(),),
    ) as pool:
        queued = iter(paths)
        in_flight = collections.deque(
            (path, pool.submit(decode_video, path, **decode_params))
            for path in itertools.islice(queued, 2 * workers)
        )
        while in_flight:
            path, future = in_flight.popleft()
            try:
                result = future.result()
            except BrokenProcessPool as err:
                raise DataError(f"{path}: a decoder process died while decoding it") from err
            next_path = next(queued, None)
            if next_path is not None:
                in_flight.append((next_path, pool.submit(decode_video, next_path, **decode_params)))
            yield result


def _die_with_parent(parent_pid: int) -> None:
    """Decoder worker initializer: the kernel kills the worker when the ingest process dies,
    however it dies (a SIGKILL gives the pool no chance to stop its workers). Linux only."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _read_shard_indexes(plans: Iterable[ShardPlan]) -> tuple[pd.DataFrame, list[Rejection]]:
    videos, rejections = [], []
    for plan in plans:
        with h5py.File(plan.path, "r") as file:
            index = json.loads(file["index"][()])
        videos.extend(index["videos"])
        rejections.extend(Rejection(r["path"], r["reason"]) for r in index["rejected"])
    columns = ["path", "num_frames", "fps", "height", "width", "shard", "offset"]
    return pd.DataFrame(videos, columns=columns), rejections


def _manifest(
    videos: pd.DataFrame, accepted: pd.DataFrame, split_col: str, percents, seed: int
) -> pd.DataFrame:
    manifest = videos.merge(accepted, on="path", how="inner", validate="one_to_one")
    manifest = manifest.sort_values("path", ignore_index=True)
    manifest = labeled_subsets(manifest, split_col, percents=percents, seed=seed)
    int_columns = ["label", "num_frames", "height", "width", "shard", "offset"]
    manifest = manifest.astype({**dict.fromkeys(int_columns, "int64"), "fps": "float64"})
    labeled = [f"labeled_{p}" for p in percents]
    return manifest[MANIFEST_COLUMNS + _split_cols(videos) + labeled]


def _split_cols(videos: pd.DataFrame) -> list[str]:
    return [col for col in videos.columns if re.fullmatch(r"split\d", col)]


def _reason_kind(reason: str) -> str:
    """The reason without its detail: 'cannot decode: moov atom not found' -> 'cannot decode'."""
    return reason.split(":")[0]


def _strict_summary(rejections: list[Rejection], rejected_csv: Path) -> str:
    lines = [f"strict ingest: {len(rejections)} inputs rejected (all listed in {rejected_csv}):"]
    by_kind: dict[str, list[str]] = collections.defaultdict(list)
    for rejection in rejections:
        by_kind[_reason_kind(rejection.reason)].append(rejection.path)
    for kind, paths in sorted(by_kind.items()):
        shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
        lines.append(f"  {len(paths)} x {kind}: {shown}")
    return "\n".join(lines)
