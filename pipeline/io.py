"""Atomic file outputs: a killed or failed stage never leaves a file or folder that looks complete.

A stage whose output is a folder builds it in `partial_folder(folder)`, a hidden sibling, and puts
it in place with `replace_folder` when it is complete. Snakemake deletes an unfinished job's
declared outputs before it reruns the job (DVC too, for outputs that are not `persist`), so
finished parts kept inside the output would be lost; beside it, they survive for the rerun.
"""

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py

from pipeline.errors import DataError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    The temp file lives in the same folder so that `os.replace` is atomic. `suffix` keeps an
    extension that writers inspect (e.g. ".parquet"). A full disk raises DataError naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix + ".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.is_file():  # mkstemp makes 0600 files; outputs get the usual permissions
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        raise DataError(
            f"{path}: cannot write it, the disk is full ({os.strerror(err.errno)}); "
            "free some space and run the stage again"
        ) from err
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _WriteErrorLatch(io.RawIOBase):
    """The file under an HDF5 file being written (h5py's fileobj driver) that keeps the first
    write error instead of handing it to HDF5, and reports the write as done.

    HDF5 does not recover from a failed write: the next flush or close fails too, and the process
    segfaults at exit (h5py 3.16 with HDF5 2.0, measured on a full tmpfs). The file is discarded
    once a write failed, so what HDF5 writes after that may go nowhere.
    """

    def __init__(self, file: io.FileIO):
        super().__init__()
        self._file = file
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer) -> int:
        return self._file.readinto(buffer)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._guarded(self._write_all, view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._file.tell() if size is None else size
        self._guarded(self._file.truncate, size)
        return size

    def _write_all(self, view: memoryview) -> None:
        while view:  # the driver ignores short writes, so none may be left
            view = view[self._file.write(view) :]

    def _guarded(self, operation: Callable, *args) -> None:
        if self.error is None:
            try:
                operation(*args)
            except OSError as err:
                self.error = err


@contextlib.contextmanager
def atomic_hdf5(path: str | os.PathLike) -> Iterator[tuple[h5py.File, Callable[[], None]]]:
    """An HDF5 file written at a temp path and moved into place if the block succeeds.

    Yields the open file and `check`, which raises the first failed write's OSError: call it after
    each large write so that a full disk stops the block early (atomic_path turns it into a
    DataError naming `path`, and removes the temp file).
    """
    with atomic_path(path, suffix=".h5") as tmp, open(tmp, "w+b", buffering=0) as raw:
        latch = _WriteErrorLatch(raw)

        def check() -> None:
            if latch.error is not None:
                raise latch.error

        with h5py.File(latch, "w") as file:
            yield file, check
        check()  # the close's own writes


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes: what identifies a checkpoint, whatever its name."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_leftovers(folder: Path, prefix: str, count: int) -> None:
    """Clear what an earlier run of a stage writing `<prefix>NNNNN.h5` files into `folder` left:
    atomic_path temp files of a killed run, and numbered files beyond `count` (an earlier
    setting had more)."""
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    for numbered in folder.glob(f"{prefix}*.h5"):
        number = numbered.stem.removeprefix(prefix)
        if not number.isdigit() or int(number) >= count:
            numbered.unlink()


def partial_folder(folder: str | os.PathLike) -> Path:
    """Where a stage builds its output folder `folder` (module docstring)."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.partial"


def reuse_file(done: Path, work: Path) -> None:
    """Hard-link `done`, a finished file of a complete earlier output, at `work` in a partial
    folder: linked, not moved, so the earlier output stays whole until the new one replaces it."""
    work.unlink(missing_ok=True)
    os.link(done, work)


def replace_folder(folder: str | os.PathLike, complete: Path) -> None:
    """Put the complete folder `complete` in place of `folder`. The old one is moved aside first,
    so `folder` never holds a mix of both (a kill between the two renames leaves no `folder`)."""
    folder = Path(folder)
    old = folder.parent / f".{folder.name}.old"
    shutil.rmtree(old, ignore_errors=True)  # a killed earlier replace's
    if folder.exists():
        os.replace(folder, old)
    os.replace(complete, folder)
    shutil.rmtree(old, ignore_errors=True)
