"""Read frames of ingested videos from HDF5 shards (format: README.md, "Shards").

A `ShardStore` is cheap to pickle: HDF5 handles cannot cross process boundaries, so they are opened
lazily, per process, on first read (DataLoader workers each open their own).

Raw shards hold "frames" as one (frames, H, W, 3) uint8 array, so a clip is a slice of it; JPEG
shards hold one variable-length file per frame. Raw frame chunks carry HDF5's fletcher32 checksum;
HDF5 refuses filters on variable-length data, so JPEG shards hold each file's CRC-32 in
"frame_crc32" (itself fletcher32-checked). A corrupt frame fails its read: a DataError naming the
shard and the video.
"""

import os
import warnings
import zlib
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow

from pipeline.errors import DataError

CODECS = ("jpeg", "raw")
FRAME_CRC32 = "frame_crc32"  # JPEG shards: the CRC-32 of each frame's file
MANIFEST = "manifest.parquet"
MANIFEST_COLUMNS = [
    "video_id", "path", "label", "label_name", "group", "num_frames", "fps", "height", "width",
    "shard", "offset",
]  # fmt: skip
VERIFY_BLOCK_BYTES = 8 << 20  # corrupt_rows reads about this much at once
VERIFY_JPEG_ROWS = 1024  # corrupt_jpeg_rows reads this many files at once
# Raw reads of sorted, non-consecutive frames: one slice from the first to the last frame, then
# an index, or one read per frame, whichever costs less. Measured (h5py 3.16, one frame per chunk,
# 40x40 to 240x320 frames, 2 busy cores): a single-frame read costs ~12 us more than the same
# frame inside a slice; each frame a slice reads costs ~3 us plus ~0.1 us per KiB (0.05 at 64 KiB
# frames, 0.5 at 225 KiB, where slices outgrow HDF5's chunk cache). A list index
# (`frames[[i, j, ...]]`) or a union of hyperslabs costs 50-500x either (as FACTS says).
READ_OVERHEAD_US = 12.0
SLICE_FRAME_US = 3.0
SLICE_US_PER_KIB = 0.1


def shard_path(shard_dir: Path, shard: int) -> Path:
    return Path(shard_dir) / f"shard-{shard:05d}.h5"


def read_manifest(shard_dir: str | os.PathLike) -> pd.DataFrame:
    """`<shard_dir>/manifest.parquet`, checked to be readable and to have the ingest's columns."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"no {MANIFEST} in {shard_dir}: run the ingest stage")
    try:
        manifest = pd.read_parquet(path)
    except (OSError, pyarrow.ArrowException) as err:
        raise DataError(f"{path}: unreadable ({err}); run the ingest stage again") from err
    missing = [column for column in MANIFEST_COLUMNS if column not in manifest.columns]
    if missing:
        raise DataError(f"{path}: no column {', '.join(missing)}; run the ingest stage again")
    return manifest


def corrupt_rows(dataset: h5py.Dataset) -> list[int]:
    """Rows (first axis) of a checksummed `dataset` whose chunk fails its checksum (or cannot be
    read). Reads everything, in blocks; a failing block is read again row by row."""
    row_bytes = dataset.dtype.itemsize * int(np.prod(dataset.shape[1:]))
    block = max(1, VERIFY_BLOCK_BYTES // max(1, row_bytes))
    bad = []
    for start in range(0, len(dataset), block):
        rows = range(start, min(start + block, len(dataset)))
        if not _readable(dataset, slice(rows.start, rows.stop)):
            bad.extend(row for row in rows if not _readable(dataset, row))
    return bad


def corrupt_jpeg_rows(frames: h5py.Dataset, crc32: h5py.Dataset) -> list[int]:
    """Rows of a JPEG shard's `frames` whose file fails its CRC-32 (or cannot be read). Where the
    CRC-32 table itself is damaged, its damaged rows: the shard needs rewriting either way."""
    bad = corrupt_rows(crc32)
    if bad:
        return bad
    stored = crc32[:]
    for start in range(0, len(frames), VERIFY_JPEG_ROWS):
        rows = np.arange(start, min(start + VERIFY_JPEG_ROWS, len(frames)))
        try:
            encoded = frames[rows[0] : rows[-1] + 1]
        except OSError:  # a damaged heap: no telling which of the block's files
            bad.extend(rows.tolist())
            continue
        bad.extend(rows[jpeg_crc32(encoded) != stored[rows]].tolist())
    return bad


def jpeg_crc32(encoded) -> np.ndarray:
    return np.array([zlib.crc32(file) for file in encoded], np.uint32)


def _readable(dataset: h5py.Dataset, selection) -> bool:
    try:
        dataset[selection]
    except OSError:  # h5py: "Can't synchronously read data (filter returned failure ...)"
        return False
    return True


class ShardStore:
    """Random access to the frames of the videos listed in `<shard_dir>/manifest.parquet`."""

    def __init__(self, shard_dir: str | os.PathLike):
        self.shard_dir = Path(shard_dir)
        self.manifest = read_manifest(self.shard_dir)
        # Plain arrays: per-item lookups in __getitem__ paths stay out of pandas.
        self._shard = self.manifest["shard"].to_numpy(np.int64)
        self._offset = self.manifest["offset"].to_numpy(np.int64)
        self._num_frames = self.manifest["num_frames"].to_numpy(np.int64)
        self._height = self.manifest["height"].to_numpy(np.int64)
        self._width = self.manifest["width"].to_numpy(np.int64)
        self._open: dict[int, tuple[h5py.Dataset, str, h5py.Dataset | None]] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def labels(self) -> np.ndarray:
        return self.manifest["label"].to_numpy(np.int64)

    @property
    def class_names(self) -> list[str]:
        """Class names indexed by label (labels with no accepted video get "")."""
        pairs = self.manifest.drop_duplicates("label").set_index("label")["label_name"]
        names = [""] * (int(pairs.index.max()) + 1 if len(pairs) else 0)
        for label, name in pairs.items():
            names[int(label)] = str(name)
        return names

    def num_frames(self, row: int) -> int:
        return int(self._num_frames[row])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = {}  # h5py handles don't pickle; each process opens its own
        return state

    def _shard_of(self, row: int) -> tuple[h5py.Dataset, str, h5py.Dataset | None]:
        """The open "frames" dataset, codec and JPEG CRC-32s (None: raw, or an older ingest) of
        `row`'s shard.

        All are kept: looking up "frames" or an attr costs ~0.1-0.2 ms, as much as a frame read.
        """
        if self._pid != os.getpid():  # forked after opening: the inherited handles are not ours
            self._open = {}
            self._pid = os.getpid()
        shard = int(self._shard[row])
        if shard not in self._open:
            path = shard_path(self.shard_dir, shard)
            try:
                file = h5py.File(path, "r")
            except OSError as err:
                raise DataError(f"{path}: cannot open shard ({err})") from err
            codec = file.attrs.get("codec")
            if codec not in CODECS or "frames" not in file:
                file.close()
                raise DataError(f"{path}: no 'frames' or codec attr {codec!r} not in {CODECS}")
            problem = self._layout_problem(shard, file["frames"], str(codec))
            if problem:
                file.close()
                raise DataError(f"{path}: {problem}")
            self._open[shard] = (file["frames"], str(codec), file.get(FRAME_CRC32))
        return self._open[shard]

    def _layout_problem(self, shard: int, frames: h5py.Dataset, codec: str) -> str | None:
        """Why `frames` cannot hold the manifest's videos of `shard` in `codec`, or None."""
        if codec == "jpeg":
            return None if frames.ndim == 1 else f"JPEG frames stored as {frames.shape}, not 1-D"
        if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
            return (
                f"raw frames stored as {frames.dtype} {frames.shape}, not (frames, H, W, 3) "
                "uint8: written by an older ingest? Rerun ingest"
            )
        in_shard = self._shard == shard
        other_size = in_shard & (
            (self._height != frames.shape[1]) | (self._width != frames.shape[2])
        )
        if other_size.any():
            row = int(np.flatnonzero(other_size)[0])
            return (
                f"raw frames are {frames.shape[1]}x{frames.shape[2]}, but the manifest says "
                f"{self._height[row]}x{self._width[row]} for {self.manifest['path'].iloc[row]}"
            )
        return None

    def codec(self, row: int) -> str:
        return self._shard_of(row)[1]

    def read_clip(self, row: int, frame_indices: np.ndarray) -> np.ndarray:
        """Frames `frame_indices` of video `row` as uint8 (T, H, W, 3) RGB.

        Each distinct frame is read and decoded once, so clamped or overlapping indices cost
        nothing extra. The result may be a non-contiguous view.
        """
        indices = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
        n = self.num_frames(row)
        if not indices.size:
            raise ValueError(f"no frame indices given for manifest row {row}")
        if indices.min() < 0 or indices.max() >= n:
            raise IndexError(f"frame indices outside [0, {n}) for manifest row {row}")
        if (indices[1:] > indices[:-1]).all():  # sorted and distinct, as samplers give them
            unique, inverse = indices, None
        else:
            unique, inverse = np.unique(indices, return_inverse=True)
        frames, codec, crc32 = self._shard_of(row)
        shard_rows = self._offset[row] + unique
        try:
            if codec == "raw":
                frame_kib = self._height[row] * self._width[row] * 3 / 1024
                clip = _read_raw(frames, shard_rows, frame_kib)
            else:
                clip = _read_jpeg(frames, shard_rows, crc32)
        except (OSError, RuntimeError) as err:  # a failed checksum; a JPEG that does not decode
            raise DataError(
                f"{shard_path(self.shard_dir, int(self._shard[row]))}: frames {unique[0]}-"
                f"{unique[-1]} of {self.manifest['path'].iloc[row]} (manifest row {row}) are "
                f"corrupt ({err}); run the ingest stage again"
            ) from err
        return clip if inverse is None else clip[inverse]

    def close(self) -> None:
        for frames, *_ in self._open.values():
            frames.file.close()
        self._open = {}


def _read_raw(frames: h5py.Dataset, rows: np.ndarray, frame_kib: float) -> np.ndarray:
    """Sorted, distinct `rows` of a fixed-shape (frames, H, W, 3) dataset."""
    first, span = int(rows[0]), int(rows[-1] - rows[0]) + 1
    if span == len(rows):  # consecutive: one hyperslab read
        return frames[first : first + span]
    slice_waste = (span - len(rows)) * (SLICE_FRAME_US + SLICE_US_PER_KIB * frame_kib)
    if slice_waste <= len(rows) * READ_OVERHEAD_US:
        return frames[first : first + span][rows - first]
    return np.stack([frames[int(r)] for r in rows])


def _read_jpeg(frames: h5py.Dataset, rows: np.ndarray, crc32: h5py.Dataset | None) -> np.ndarray:
    """Sorted, distinct `rows` of a 1-D dataset of JPEG files, decoded to (T, H, W, 3); OSError
    if a file fails its CRC-32 (`crc32`: the shard's FRAME_CRC32, None where it has none)."""
    first, span = int(rows[0]), int(rows[-1] - rows[0]) + 1
    # Consecutive: a slice is cheapest. Else, measured here (h5py 3.16, vlen, chunks=(1,)): one
    # sorted list index reads 16 frames 4-5x faster than 16 single-frame reads (unlike FACTS'
    # "50x slower", which holds for fixed-shape datasets, see _read_raw).
    encoded = frames[first : first + span] if span == len(rows) else frames[rows.tolist()]
    if crc32 is not None:
        failed = rows[jpeg_crc32(encoded) != crc32[first : first + span][rows - first]]
        if failed.size:
            raise OSError(f"JPEG files of shard rows {failed.tolist()} fail their CRC-32")
    # Imported here: ingest imports this module for the manifest's format, without torch's ~1-3 s.
    import torch
    from torchvision.io import decode_jpeg

    # Measured: torchvision's decode_jpeg on a list is ~2-4x faster than PIL at 32-128 px.
    # torchvision 0.29 deprecates its image codecs (for torchcodec): silence that here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        decoded = decode_jpeg([torch.from_numpy(b) for b in encoded])
    return torch.stack(decoded).numpy().transpose(0, 2, 3, 1)
