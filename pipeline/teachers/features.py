"""Frozen teachers' per-frame outputs, cached per dataset x teacher (README.md, "Teachers ...").

`build_feature_cache` runs a `FrozenTeacher` over every frame of a shard folder and writes one
`feat-0000K.h5` per shard, row r aligned with `shard-0000K.h5` frames[r], then `cache.json` last:
its presence means the folder is complete. The folder is built in a hidden sibling
(`pipeline.io.partial_folder`) and replaces the output only when complete. Every feat file carries
the cache key (checkpoint sha256, preprocessing, parts size, kind and the shards' keys), so a killed
build resumes shard by shard and a stale cache is rebuilt, never reused. Its datasets carry HDF5's
fletcher32 checksums, so a corrupt chunk fails its read. `FeatureCache` reads the outputs of a
video's frames by manifest row, as `ShardStore` reads its frames.
"""

import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline.data.shards import FRAME_CRC32, _read_jpeg, _read_raw, shard_path
from pipeline.data.shards import read_manifest as _read_manifest  # the name probe_teacher uses
from pipeline.errors import DataError
from pipeline.io import (
    atomic_hdf5,
    partial_folder,
    remove_leftovers,
    replace_folder,
    reuse_file,
    write_json_atomic,
)
from pipeline.teachers.base import FrozenTeacher

# Part of the cache key: bump it when the feat file layout changes. 2: fletcher32 checksums.
FORMAT_VERSION = 2
CACHE_JSON = "cache.json"
# What readers of cache.json use: checked when it is read.
SUMMARY_KEYS = ("key", "checkpoint_sha256", "feature_dim", "num_parts", "parts_size", "shards")
SHARD_ENTRY_KEYS = ("file", "shard_key", "rows")
OUTPUTS = ("embedding", "parts")
# Rows per HDF5 chunk: about this many bytes. Measured (h5py 3.16, D=64, 48,000 frames of 32-frame
# videos, FeatureCache.read of 8 frames, 2 busy cores): 64 KiB chunks ~18k reads/s, 16 and 256 KiB
# 13-20k, 4 KiB and contiguous 9-13k.
CHUNK_BYTES = 64 * 1024
REBUILD_HINT = "rebuild it with the features stage"


def feat_path(cache_dir: str | os.PathLike, shard: int) -> Path:
    return Path(cache_dir) / f"feat-{shard:05d}.h5"


def cache_key(
    *, checkpoint_sha256: str, preprocess: dict, parts_size: int, kind: str, shard_keys: list[str]
) -> str:
    """sha256 of the canonical JSON of everything the cached outputs depend on."""
    identity = {
        "version": FORMAT_VERSION,
        "checkpoint_sha256": checkpoint_sha256,
        "preprocess": preprocess,
        "parts_size": parts_size,
        "kind": kind,
        "shard_keys": shard_keys,
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def shard_keys(shard_dir: Path) -> tuple[list[str], list[int], list[str]]:
    """(key, rows, codec) of each shard-0000K.h5 in `shard_dir`, shards numbered 0..n-1."""
    numbers = sorted(int(p.stem.removeprefix("shard-")) for p in shard_dir.glob("shard-*.h5"))
    if not numbers or numbers != list(range(len(numbers))):
        raise DataError(f"{shard_dir}: shard files are not shard-00000.h5 .. numbered without gaps")
    keys, rows, codecs = [], [], []
    for number in numbers:
        path = shard_path(shard_dir, number)
        try:
            with h5py.File(path, "r") as file:
                keys.append(str(file.attrs["key"]))
                codecs.append(str(file.attrs["codec"]))
                rows.append(len(file["frames"]))
        except (OSError, KeyError) as err:
            raise DataError(f"{path}: cannot read its key, codec and frames ({err})") from err
    return keys, rows, codecs


def read_summary(cache_dir: str | os.PathLike) -> dict:
    """`<cache_dir>/cache.json`, checked to be JSON holding the keys readers use."""
    path = Path(cache_dir) / CACHE_JSON
    if not path.is_file():
        raise DataError(f"{path}: missing (cache unfinished?); {REBUILD_HINT}")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise DataError(f"{path}: unreadable ({err}); {REBUILD_HINT}") from err
    problem = _summary_problem(summary)
    if problem:
        raise DataError(f"{path}: {problem}; {REBUILD_HINT}")
    return summary


def _summary_problem(summary) -> str | None:
    if not isinstance(summary, dict):
        return "not a JSON object"
    missing = [key for key in SUMMARY_KEYS if key not in summary]
    if missing:
        return f"no {', '.join(missing)}"
    entries = summary["shards"]
    if not isinstance(entries, list) or not all(
        isinstance(entry, dict) and set(SHARD_ENTRY_KEYS) <= entry.keys() for entry in entries
    ):
        return f"'shards' is not a list of {{{', '.join(SHARD_ENTRY_KEYS)}}}"
    return None


def _frame_size_runs(manifest: pd.DataFrame, shard: int, rows: int, path: Path) -> list[range]:
    """The shard's rows as consecutive runs of one frame size (JPEG shards may mix sizes).

    Also checks that the manifest's videos tile the shard's rows exactly: the cache is read back
    through the manifest's offsets, so a row no video owns would be a misalignment.
    """
    videos = manifest[manifest["shard"] == shard].sort_values("offset")
    runs, start, expected, size = [], 0, 0, None
    for video in videos.itertuples():
        if video.offset != expected:
            raise DataError(
                f"{path}: the manifest's videos do not tile its frames ({video.path} starts at row "
                f"{video.offset}, expected {expected}); rerun ingest"
            )
        if size is not None and (video.height, video.width) != size:
            runs.append(range(start, expected))
            start = expected
        size = (video.height, video.width)
        expected += video.num_frames
    if expected != rows:
        raise DataError(
            f"{path}: holds {rows} frames, the manifest's videos {expected}; rerun ingest"
        )
    if expected > start:
        runs.append(range(start, expected))
    return runs


def _batches(runs: list[range], batch_size: int) -> Iterator[range]:
    for run in runs:
        for start in range(run.start, run.stop, batch_size):
            yield range(start, min(start + batch_size, run.stop))


def _read_rows(frames: h5py.Dataset, codec: str, rows: range) -> np.ndarray:
    """Consecutive shard rows as uint8 (N, H, W, 3): one slice read (and JPEG decode)."""
    indices = np.arange(rows.start, rows.stop)
    try:
        if codec == "raw":
            return _read_raw(frames, indices, frame_kib=0.0)
        return _read_jpeg(frames, indices, frames.parent.get(FRAME_CRC32))
    except (OSError, RuntimeError) as err:  # a failed checksum; a JPEG that does not decode
        raise DataError(
            f"{frames.file.filename}: frames {rows.start}-{rows.stop - 1} are corrupt ({err}); "
            "run the ingest stage again"
        ) from err


def _output_shapes(teacher: FrozenTeacher, device: torch.device) -> dict[str, tuple[int, ...]]:
    """Per-frame shape of each teacher output, from one dummy frame (empty shards need them)."""
    probe = teacher(torch.zeros((1, 8, 8, 3), dtype=torch.uint8, device=device))
    shapes = {name: tuple(out.shape[1:]) for name, out in probe.items()}
    if shapes["embedding"] != (teacher.feature_dim,):
        raise ValueError(
            f"teacher {teacher.name!r} gives {shapes['embedding']} embeddings, but declares "
            f"feature_dim {teacher.feature_dim}"
        )
    return shapes


def _feat_is_current(path: Path, key: str, rows: int) -> bool:
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as file:
            return file.attrs.get("key") == key and file.attrs.get("rows") == rows
    except OSError:  # a file a crashed tool left half-written, or not HDF5
        return False


def _chunk_rows(frame_shape: tuple[int, ...], rows: int) -> int:
    row_bytes = 2 * int(np.prod(frame_shape))  # float16
    return max(1, min(rows, CHUNK_BYTES // row_bytes))


def _write_feat_file(
    path: Path,
    *,
    teacher: FrozenTeacher,
    shapes: dict[str, tuple[int, ...]],
    frames: h5py.Dataset,
    codec: str,
    runs: list[range],
    rows: int,
    attrs: dict,
    batch_size: int,
    device: torch.device,
    bar: tqdm,
) -> None:
    """One feat file, appearing only when complete. A batch's outputs are fetched from the device
    after the next batch is read and launched, so reading overlaps the device's compute."""
    with atomic_hdf5(path) as (file, check_written):
        datasets = {
            name: file.create_dataset(
                name,
                shape=(rows, *shape),
                dtype=np.float16,
                chunks=(_chunk_rows(shape, rows), *shape) if rows else None,
                fletcher32=bool(rows),  # checksums need chunks
            )
            for name, shape in shapes.items()
        }
        pending = None
        for batch in _batches(runs, batch_size):
            uint8 = torch.from_numpy(np.ascontiguousarray(_read_rows(frames, codec, batch)))
            if device.type == "cuda":
                uint8 = uint8.pin_memory()
            outputs = teacher(uint8.to(device, non_blocking=True))
            if pending is not None:
                _store(datasets, *pending, bar)
                check_written()  # a full disk stops the file at once
            # float16 on the device: half the bytes to copy back, and the stored precision
            pending = batch, {name: out.half() for name, out in outputs.items()}
        if pending is not None:
            _store(datasets, *pending, bar)
        file.attrs.update(attrs)


def _store(datasets: dict, rows: range, outputs: dict[str, torch.Tensor], bar: tqdm) -> None:
    for name, out in outputs.items():
        datasets[name][rows.start : rows.stop] = out.cpu().numpy()
    bar.update(len(rows))


def _summary_is_current(cache_dir: Path, key: str, feat_files: list[Path]) -> dict | None:
    """cache.json's content if it and every feat file carry `key`, else None."""
    try:
        summary = read_summary(cache_dir)
    except DataError:  # missing or damaged: rebuilt
        return None
    if summary["key"] != key or len(summary["shards"]) != len(feat_files):
        return None
    for path, entry in zip(feat_files, summary["shards"], strict=True):
        if not _feat_is_current(path, key, entry["rows"]):
            return None
    return summary


def _reuse_output_files(out_dir: Path, feat_files: list[Path], key: str, rows: list[int]) -> None:
    """Take the feat files of a complete earlier build that carry `key` into the partial folder."""
    for feat, shard_rows in zip(feat_files, rows, strict=True):
        done = out_dir / feat.name
        if not _feat_is_current(feat, key, shard_rows) and _feat_is_current(done, key, shard_rows):
            reuse_file(done, feat)


def build_feature_cache(
    *,
    shard_dir: str | os.PathLike,
    teacher: FrozenTeacher,
    checkpoint_sha256: str,
    out_dir: str | os.PathLike,
    dataset: str,
    batch_size: int = 256,
    device: str = "cpu",
    threads: int = 1,
) -> dict:
    """Cache `teacher`'s outputs for every frame of the shards in `shard_dir`; return cache.json.

    `checkpoint_sha256` identifies the teacher's weights (sha256 of its model.pt). Feat files that
    already carry this cache's key are kept; when everything is current nothing is rewritten.
    `device`: "cpu", "cuda" or "auto" (CUDA when present); `teacher` is moved there (in place).
    """
    if batch_size < 1 or threads < 1:
        raise ValueError("batch_size and threads must be >= 1")
    if not checkpoint_sha256:
        raise ValueError("checkpoint_sha256 must identify the teacher's checkpoint")
    started = time.perf_counter()
    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    manifest = _read_manifest(shard_dir)
    keys, rows, codecs = shard_keys(shard_dir)
    key = cache_key(
        checkpoint_sha256=checkpoint_sha256,
        preprocess=teacher.preprocess.as_dict(),
        parts_size=teacher.parts_size,
        kind=teacher.kind,
        shard_keys=keys,
    )
    current = _summary_is_current(
        out_dir, key, [feat_path(out_dir, shard) for shard in range(len(keys))]
    )
    if current is not None:
        return current

    work_dir = partial_folder(out_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(work_dir, "feat-", len(keys))
    feat_files = [feat_path(work_dir, shard) for shard in range(len(keys))]
    _reuse_output_files(out_dir, feat_files, key, rows)
    runs = [
        _frame_size_runs(manifest, shard, rows[shard], shard_path(shard_dir, shard))
        for shard in range(len(keys))
    ]
    pending = [s for s in range(len(keys)) if not _feat_is_current(feat_files[s], key, rows[s])]

    # Imported here: the trainer's modules import this one (FeatureCache), not the reverse.
    from pipeline.train import resolve_device

    torch.set_num_threads(threads)
    device = resolve_device(device)
    teacher = teacher.to(device)
    if device.type == "cuda" and hasattr(teacher.network, "memory_format"):
        teacher = teacher.to(memory_format=teacher.network.memory_format)
    with torch.inference_mode():
        shapes = _output_shapes(teacher, device)
        total = sum(rows[s] for s in pending)
        desc = f"features {dataset}/{teacher.name}"
        with tqdm(total=total, desc=desc, unit="frame", disable=None) as bar:
            for shard in pending:
                with h5py.File(shard_path(shard_dir, shard), "r") as file:
                    _write_feat_file(
                        feat_files[shard],
                        teacher=teacher,
                        shapes=shapes,
                        frames=file["frames"],
                        codec=codecs[shard],
                        runs=runs[shard],
                        rows=rows[shard],
                        attrs={"key": key, "shard_key": keys[shard], "rows": rows[shard]},
                        batch_size=batch_size,
                        device=device,
                        bar=bar,
                    )
    seconds = time.perf_counter() - started
    summary = {
        "format": FORMAT_VERSION,
        "key": key,
        "teacher": teacher.name,
        "kind": teacher.kind,
        "dataset": dataset,
        "checkpoint_sha256": checkpoint_sha256,
        "preprocess": teacher.preprocess.as_dict(),
        "parts_size": teacher.parts_size,
        "feature_dim": teacher.feature_dim,
        "num_parts": shapes["parts"][0] if "parts" in shapes else 0,
        "shards": [
            {"file": feat.name, "shard_key": shard_key, "rows": shard_rows}
            for feat, shard_key, shard_rows in zip(feat_files, keys, rows, strict=True)
        ],
        "frames": sum(rows),
        "bytes": sum(feat.stat().st_size for feat in feat_files),
        "build": {
            "shards_written": len(pending),
            "shards_kept": len(keys) - len(pending),
            "seconds": round(seconds, 3),
            "frames_per_second": round(sum(rows[s] for s in pending) / seconds, 1),
            "device": str(device),
            "threads": threads,
            "batch_size": batch_size,
        },
    }
    write_json_atomic(work_dir / CACHE_JSON, summary)  # last: marks the cache complete
    replace_folder(out_dir, work_dir)
    return read_summary(out_dir)  # as a rerun returns it (lists, not tuples)


class FeatureCache:
    """Cached teacher outputs of the videos in `<shard_dir>/manifest.parquet`, by manifest row.

    Raises DataError when the cache is unfinished or was built from other shards (or, when
    `checkpoint_sha256` is given, from another checkpoint). Cheap to pickle: HDF5 files are opened
    lazily, per process.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        shard_dir: str | os.PathLike,
        *,
        checkpoint_sha256: str | None = None,
    ):
        self.cache_dir, self.shard_dir = Path(cache_dir), Path(shard_dir)
        self.summary = read_summary(self.cache_dir)
        self._check_current(checkpoint_sha256)
        self._check_files()
        manifest = _read_manifest(self.shard_dir)
        self._shard = manifest["shard"].to_numpy(np.int64)
        self._offset = manifest["offset"].to_numpy(np.int64)
        self._num_frames = manifest["num_frames"].to_numpy(np.int64)
        self.feature_dim = int(self.summary["feature_dim"])
        self.outputs = ("embedding", "parts") if self.summary["num_parts"] else ("embedding",)
        self._open: dict[int, tuple[h5py.File, dict[str, h5py.Dataset]]] = {}
        self._pid = os.getpid()

    def _check_current(self, checkpoint_sha256: str | None) -> None:
        where = f"feature cache {self.cache_dir}"
        cached = [entry["shard_key"] for entry in self.summary["shards"]]
        current, _, _ = shard_keys(self.shard_dir)
        if len(cached) != len(current):
            raise DataError(
                f"{where} was built from {len(cached)} shards, {self.shard_dir} holds "
                f"{len(current)}; {REBUILD_HINT}"
            )
        changed = [
            shard_path(self.shard_dir, shard).name
            for shard, (old, new) in enumerate(zip(cached, current, strict=True))
            if old != new
        ]
        if changed:
            raise DataError(
                f"{where} is stale: {', '.join(changed)} in {self.shard_dir} changed since it "
                f"was built (shard key differs); {REBUILD_HINT}"
            )
        if checkpoint_sha256 is not None and checkpoint_sha256 != self.summary["checkpoint_sha256"]:
            raise DataError(
                f"{where} is stale: built from checkpoint sha256 "
                f"{self.summary['checkpoint_sha256'][:12]}, the teacher's is now "
                f"{checkpoint_sha256[:12]}; {REBUILD_HINT}"
            )

    def _check_files(self) -> None:
        """The feat files hold what cache.json says (an edited summary would crash a reader)."""
        where = self.cache_dir / CACHE_JSON
        dim, parts, size = (self.summary[k] for k in ("feature_dim", "num_parts", "parts_size"))
        for shard, entry in enumerate(self.summary["shards"]):
            path = feat_path(self.cache_dir, shard)
            described = {"embedding": (entry["rows"], dim)}
            if parts:
                described["parts"] = (entry["rows"], parts, size, size)
            try:
                with h5py.File(path, "r") as file:
                    key = file.attrs.get("key")
                    held = {name: file[name].shape for name in file}
            except OSError as err:
                raise DataError(f"{path}: cannot open ({err}); {REBUILD_HINT}") from err
            if key != self.summary["key"]:
                raise DataError(f"{path}: not from the build {where} describes; {REBUILD_HINT}")
            if held != described:
                raise DataError(
                    f"{where}: feature_dim {dim}, num_parts {parts} and rows {entry['rows']} "
                    f"describe {described}, but {path.name} holds {held}; {REBUILD_HINT}"
                )

    def __len__(self) -> int:
        return len(self._shard)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = {}  # h5py handles don't pickle; each process opens its own
        return state

    def _datasets(self, shard: int) -> dict[str, h5py.Dataset]:
        if self._pid != os.getpid():  # forked after opening: the inherited handles are not ours
            self._open = {}
            self._pid = os.getpid()
        if shard not in self._open:
            path = feat_path(self.cache_dir, shard)
            try:
                file = h5py.File(path, "r")
            except OSError as err:
                raise DataError(f"{path}: cannot open ({err}); {REBUILD_HINT}") from err
            if file.attrs.get("key") != self.summary["key"]:
                file.close()
                raise DataError(f"{path}: not from the build cache.json describes; {REBUILD_HINT}")
            # Looking a dataset up costs as much as a small read: keep the handles.
            self._open[shard] = (file, {name: file[name] for name in self.outputs})
        return self._open[shard][1]

    def read(self, row: int, frame_indices) -> dict[str, np.ndarray]:
        """Outputs for frames `frame_indices` (any shape, e.g. (T,) or (V, T)) of manifest row
        `row`: {"embedding": (*shape, D), "parts": (*shape, P, s, s)} float32."""
        if not 0 <= row < len(self):
            raise IndexError(f"manifest row {row} outside [0, {len(self)})")
        indices = np.asarray(frame_indices, dtype=np.int64)
        n = int(self._num_frames[row])
        if not indices.size:
            raise ValueError(f"no frame indices given for manifest row {row}")
        if indices.min() < 0 or indices.max() >= n:
            raise IndexError(f"frame indices outside [0, {n}) for manifest row {row}")
        # One contiguous slice over the indices' span, then a numpy index: h5py's list indexing is
        # ~50x slower (FACTS), and a video's span is small (frames x D float16).
        first, last = int(indices.min()), int(indices.max())
        start = int(self._offset[row]) + first
        shard = int(self._shard[row])
        datasets = self._datasets(shard)
        local = indices - first
        try:
            return {
                name: dataset[start : start + last - first + 1][local].astype(np.float32)
                for name, dataset in datasets.items()
            }
        except OSError as err:  # a chunk failed its checksum
            raise DataError(
                f"{feat_path(self.cache_dir, shard)}: the outputs of frames {first}-{last} of "
                f"manifest row {row} are corrupt ({err}); {REBUILD_HINT}"
            ) from err

    def close(self) -> None:
        for file, _ in self._open.values():
            file.close()
        self._open = {}


def open_caches(
    caches: Mapping[str, str | os.PathLike], shard_dir: Path, teachers: Sequence[str]
) -> dict[str, FeatureCache]:
    """The feature cache of each teacher, in `teachers` order."""
    missing = [name for name in teachers if name not in caches]
    if missing:
        raise ValueError(f"no feature cache given for teachers {missing}")
    return {name: FeatureCache(caches[name], shard_dir) for name in teachers}


def cache_keys(caches: Mapping[str, str | os.PathLike], teachers: Sequence[str]) -> dict:
    """Each teacher's cache key (cache.json "key"): part of the run key, so a rebuilt cache
    (another checkpoint, preprocessing or shards) starts the run afresh instead of resuming."""
    return {name: read_summary(caches[name])["key"] for name in teachers}


def video_embeddings(cache: FeatureCache, rows: Sequence[int], num_frames: Sequence[int]):
    """(len(rows), D) float32: each video's teacher embedding averaged over all its frames."""
    return np.stack(
        [
            np.asarray(cache.read(int(row), np.arange(int(n)))["embedding"], np.float32).mean(0)
            for row, n in zip(rows, num_frames, strict=True)
        ]
    )


def probe_teacher(
    cache_dir: Path, shard_dir: Path, *, split: int, val_fraction: float, labeled_percent: int
) -> dict:
    """The linear probe of a teacher's cached video-level features, fitted on the same labeled
    training videos a fine-tuned student gets (pipeline.finetune.split_rows) and scored on the
    validation carve and the test split, in percent: the reference for what a student guided by
    this teacher could hold."""
    from pipeline.evaluate import linear_probe
    from pipeline.finetune import split_rows

    cache = FeatureCache(cache_dir, shard_dir)
    manifest = _read_manifest(shard_dir)
    rows = split_rows(manifest, f"split{split}", val_fraction, 0, labeled_percent)
    labels = manifest["label"].to_numpy()
    data = {
        part: (video_embeddings(cache, idx, manifest["num_frames"].iloc[idx]), labels[idx])
        for part, idx in rows.items()
    }
    return {
        part: linear_probe(data["train"], data[part]) | {"videos": len(data[part][1])}
        for part in ("val", "test")
    } | {"feature_dim": int(cache.feature_dim), "frames": "all, averaged per video"}
