"""Atomic file outputs: a killed stage never leaves a file that looks complete."""

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    The temp file lives in the same folder so that `os.replace` is atomic. `suffix` keeps an
    extension that writers inspect (e.g. ".parquet").
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
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
