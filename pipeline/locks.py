"""One process per output folder: Snakemake and DVC (or two shells) running the same stage at once
would resume from each other's checkpoints and overwrite each other's files.

`hold(output)` takes an exclusive, non-blocking `fcntl` lock on `.<name>.lock` beside the
stage's output folder (beside it: inside, DVC would hash the lock as part of a folder output)
for the life of the stage; the operating system releases it when the process ends, however it
ends, so a killed stage never leaves a stale lock. The file records who holds it, for the
message the second process stops with.
"""

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from pipeline.errors import DataError


def lock_path(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.parent / f".{output.name}.lock"


@contextlib.contextmanager
def hold(output: str | os.PathLike):
    """Run the body as the only holder of `output` (a stage's output folder); DataError at once
    if another process holds it. Under torchrun the run's rank 0 holds it for all its ranks."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    folder = Path(output)
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            raise DataError(f"{folder} is in use by {_describe(file.read())}; wait for it to "
                            "finish or stop it, then run again") from None  # fmt: skip
        file.seek(0)
        file.truncate()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.ctime(),
                  "command": " ".join(sys.argv)}  # fmt: skip
        file.write(json.dumps(holder))
        file.flush()
        try:
            yield
        finally:
            file.truncate(0)  # released with the file; an empty record means free


def _describe(record: str) -> str:
    try:
        holder = json.loads(record)
        return (f"process {holder['pid']} on {holder['host']} since {holder['since']} "
                f"({holder['command']})")  # fmt: skip
    except (ValueError, KeyError, TypeError):
        return "another process"
