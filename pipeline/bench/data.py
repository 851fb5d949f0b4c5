"""`python -m pipeline bench data`: the shards against decoding the source videos, side by side.

(a) random clips: ShardStore.read_clip vs decord random access on the source videos (a fresh
    VideoReader per clip, as a loader without shards does), the same clips on both sides;
(b) ingest: pipeline.data.ingest with 1 and 2 workers vs plain decord decode + resize of the same
    videos in one process, writing nothing.
Both sides produce the same arrays (decord resizes to the stored frame size), and (a) checks that
they agree pixel for pixel within a tolerance before any speed is reported. At frame widths where
decord returns corrupt frames (dmlc/decord#93: 2-16, 24, 48, 72 px) the source side decodes with
PyAV instead, as ingest does, and the table says so.
"""

import json
import tempfile
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import decord
import numpy as np
import pandas as pd

from pipeline.data.ingest import SUMMARY, decord_output_is_rgb, ingest, pyav_frames
from pipeline.data.samplers import DenseSampler
from pipeline.data.shards import ShardStore
from pipeline.errors import DataError

decord.logging.set_level(decord.logging.QUIET)

GOAL_READ_SPEEDUP = 20.0  # shards vs decord random access
GOAL_INGEST_RATIO = 0.7  # one ingest worker vs plain decode + resize
AGREEMENT_LEVELS = 8.0  # mean |shard - decord| above this means the shards hold other frames
# The shard side of 200 clips takes ~40 ms, so one pass is at the mercy of other processes' time
# slices (2 shared cores: 11-46x measured for the same shards); the median of 5 passes is not.
SHARD_PASSES = 5


def _reader(path: Path, height: int, width: int) -> decord.VideoReader:
    # One decoding thread, as each ingest worker and each DataLoader worker uses.
    return decord.VideoReader(str(path), num_threads=1, height=height, width=width)


def pyav_sizes(raw_dir: Path, manifest: pd.DataFrame) -> set[tuple[int, int]]:
    """The stored frame sizes that decord decodes corrupt, so that ingest decoded with PyAV.

    Decided once per size, before timing: a loader would know it too.
    """
    sizes = set()
    for (height, width), videos in manifest.groupby(["height", "width"]):
        reader = _reader(raw_dir / videos["path"].iloc[0], int(height), int(width))
        if not decord_output_is_rgb(reader[0]):
            sizes.add((int(height), int(width)))
    return sizes


def _decode(path: Path, height: int, width: int, indices: np.ndarray, pyav: bool) -> np.ndarray:
    """Frames `indices` of the video at `path`, resized to (height, width) as ingest does."""
    if pyav:  # no random access: decode from the start up to the last frame wanted
        count = int(indices.max()) + 1
        return np.stack(list(pyav_frames(str(path), height, width, count)))[indices]
    reader = _reader(path, height, width)
    frames = reader.get_batch(indices.tolist()).asnumpy()
    reader.seek(0)  # FACTS: decord's memory grows with accurate seeks unless reset
    return frames


def bench_clip_reads(
    raw_dir: Path,
    store: ShardStore,
    clips: list[tuple[int, np.ndarray]],
    pyav: Collection[tuple[int, int]] = (),
) -> dict:
    """Clips/s reading `clips` ((row, frame indices) pairs) from the shards (median of
    SHARD_PASSES passes, each with a fresh store) and from the sources (with PyAV for videos of a
    size in `pyav`, decord for the rest)."""
    manifest = store.manifest
    passes = []
    for _ in range(SHARD_PASSES):
        fresh = ShardStore(store.shard_dir)
        # Costs a loader worker pays once, not per clip, stay out of the timing: HDF5's start-up
        # and opening each shard (~11 ms for 4 shards, measured: a third of 200 clips' reads).
        for rows in manifest.groupby("shard").indices.values():
            fresh.read_clip(int(rows[0]), np.array([0]))
        started = time.perf_counter()
        from_shards = [fresh.read_clip(row, indices) for row, indices in clips]
        passes.append(time.perf_counter() - started)
        fresh.close()
    shard_seconds = float(np.median(passes))

    started = time.perf_counter()
    from_videos = []
    for row, indices in clips:
        video = manifest.iloc[row]
        size = (int(video["height"]), int(video["width"]))
        from_videos.append(_decode(raw_dir / video["path"], *size, indices, size in pyav))
    decord_seconds = time.perf_counter() - started

    difference = float(
        np.mean(
            [
                np.abs(a.astype(np.int16) - b).mean()
                for a, b in zip(from_shards, from_videos, strict=True)
            ]
        )
    )
    if difference > AGREEMENT_LEVELS:
        raise DataError(
            f"{store.shard_dir}: shard frames differ from decoding {raw_dir} by {difference:.1f} "
            "levels on average: the shards were not made from these videos, or offsets are wrong"
        )
    return {
        "clips": len(clips),
        "shard_clips_per_s": len(clips) / shard_seconds,
        "decord_clips_per_s": len(clips) / decord_seconds,
        "read_speedup": decord_seconds / shard_seconds,
        "mean_abs_pixel_difference": difference,
    }


def bench_ingest(
    raw_dir: Path,
    store: ShardStore,
    ingest_params: dict,
    workers: Sequence[int],
    pyav: Collection[tuple[int, int]] = (),
) -> dict:
    """Frames/s of plain decode + resize of the shards' videos (PyAV for sizes in `pyav`, as in
    ingest), and of ingest per worker count."""
    manifest = store.manifest
    started = time.perf_counter()
    for video in manifest.itertuples():
        size = (video.height, video.width)
        _decode(raw_dir / video.path, *size, np.arange(video.num_frames), size in pyav)
    decode_seconds = time.perf_counter() - started
    frames = int(manifest["num_frames"].sum())
    runs = {}
    result = {
        "videos": len(manifest),
        "frames": frames,
        "decode_frames_per_s": frames / decode_seconds,
        "ingest_by_workers": runs,
    }
    for count in workers:
        with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
            started = time.perf_counter()
            summary = ingest(
                raw_dir, Path(tmp) / store.shard_dir.name, workers=count, **ingest_params
            )
            seconds = time.perf_counter() - started
        if summary["frames"] != frames:
            raise DataError(
                f"ingest of {raw_dir} gave {summary['frames']} frames, the shards {frames}"
            )
        runs[count] = {"frames_per_s": frames / seconds, "ratio": decode_seconds / seconds}
    return result


def ingest_params_of(shard_dir: Path) -> dict:
    """The ingest keyword arguments (all but workers) that made `shard_dir`, from its summary."""
    summary_path = shard_dir / SUMMARY
    if not summary_path.is_file():
        raise DataError(
            f"{summary_path}: missing; the ingest bench needs the shards' ingest params"
        )
    summary = json.loads(summary_path.read_text())
    params = dict(summary["params"])
    params.pop("workers")
    params["percents"] = tuple(params["percents"])
    return {"fmt": summary["format"], **params}


def bench_data(
    raw_dir: Path,
    shard_dir: Path,
    *,
    clips: int = 200,
    clip_len: int = 16,
    stride: int = 1,
    seed: int = 0,
    ingest_workers: Sequence[int] = (1, 2),
) -> dict:
    """Run (a) and (b) (skip (b) with `ingest_workers=()`), print a table, return the figures.

    (b) re-ingests the whole raw folder per worker count with the shards' own params: fine for
    the embedded world, hours for full UCF101.
    """
    raw_dir, shard_dir = Path(raw_dir), Path(shard_dir)
    store = ShardStore(shard_dir)
    if len(store) == 0:
        raise DataError(f"{shard_dir}: the manifest lists no videos")
    rng = np.random.default_rng(seed)
    sampler = DenseSampler(clip_len, stride, train=True)
    rows = rng.integers(0, len(store), clips)
    chosen = [(int(row), sampler(store.num_frames(row), rng)) for row in rows]
    pyav = pyav_sizes(raw_dir, store.manifest)
    all_sizes = set(store.manifest[["height", "width"]].itertuples(index=False, name=None))
    result = {
        "clip_len": clip_len,
        "stride": stride,
        "source_decoder": "decord" if not pyav else "PyAV" if pyav == all_sizes else "decord+PyAV",
        "pyav_sizes": sorted(pyav),
        **bench_clip_reads(raw_dir, store, chosen, pyav),
    }
    if ingest_workers:
        params = ingest_params_of(shard_dir)
        result.update(bench_ingest(raw_dir, store, params, ingest_workers, pyav))
    print(format_table(result, raw_dir, shard_dir))
    return result


def format_table(result: dict, raw_dir: Path, shard_dir: Path) -> str:
    """The figures as an aligned table: what, rate, ratio to the baseline, goal."""
    decoder, pyav = result["source_decoder"], result["pyav_sizes"]
    rows = [
        (f"random clips: {decoder} on source videos", result["decord_clips_per_s"], "clips", 1.0,
         ""),
        ("random clips: shards (ShardStore.read_clip)", result["shard_clips_per_s"], "clips",
         result["read_speedup"], f">= {GOAL_READ_SPEEDUP:g}x"),
    ]  # fmt: skip
    runs = result.get("ingest_by_workers", {})
    if runs:
        rows.append((f"ingest: {decoder} decode + resize, no writing",
                     result["decode_frames_per_s"], "frames", 1.0, ""))  # fmt: skip
    for count, run in runs.items():
        goal = f">= {GOAL_INGEST_RATIO:g}x" if count == 1 else "faster than 1 worker"
        rows.append((f"ingest: pipeline ingest, workers={count}", run["frames_per_s"], "frames",
                     run["ratio"], goal))  # fmt: skip
    lines = [
        f"bench data: {shard_dir} vs {raw_dir}",
        f"  {result['clips']} random clips of {result['clip_len']} frames (stride "
        f"{result['stride']}); shard and source pixels differ by "
        f"{result['mean_abs_pixel_difference']:.2f} levels on average",
    ]
    if pyav:
        sizes = ", ".join(f"{h}x{w}" for h, w in pyav)
        lines.append(f"  decord decodes {sizes} frames corrupt (dmlc/decord#93): the source side")
        lines.append("  decodes those videos with PyAV, from the first frame, as ingest does")
    if runs:
        lines.append(f"  ingest of {result['videos']} videos, {result['frames']:,} frames")
    width = max(len(row[0]) for row in rows)
    for what, rate, unit, ratio, goal in rows:
        lines.append(f"  {what:<{width}}  {rate:>10,.1f} {unit}/s  {ratio:>7.2f}x  {goal}".rstrip())
    return "\n".join(lines)
