"""Each tool knows what the other built.

Snakemake and DVC run the same stages (pipeline/dag.py) but keep separate records: DVC has
dvc.lock (the hashes of each stage's deps, params and outs), Snakemake has .snakemake/metadata
(each output's params, code and input checksums) and the files' mtimes. Without a handover, a
`dvc repro` after `make run` plans every stage again, and a `snakemake` after `dvc repro` reruns
whatever DVC built with params Snakemake has not recorded (or restored with an older mtime).

- After a successful Snakemake run, the Snakefile's `onsuccess` calls `record_for_dvc` with the
  stages that run built (and any of its DAG dvc.lock lacks): `dvc commit --force` writes their
  hashes to dvc.lock.
- Before a Snakemake run, the Snakefile calls `accept_dvc_runs`: the stages whose dvc.lock entries
  changed since Snakemake last saw the file were run (or restored from the cache) by DVC; those
  whose outputs DVC still finds current are touched by `snakemake --touch`, which records their
  params, code and input checksums as Snakemake's own, so they run again on the next change only.

Both are no-ops outside a DVC repository (no .dvc folder) or without the `dvc` command. The copy
of dvc.lock that Snakemake last saw is .snakemake/pipeline/dvc.lock.seen; when dvc.lock has not
changed since, `accept_dvc_runs` costs one file comparison.
"""

import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.io import atomic_path

DVC_LOCK = Path("dvc.lock")
SEEN_LOCK = Path(".snakemake/pipeline/dvc.lock.seen")


def _dvc() -> str | None:
    """The dvc executable, when this folder is a DVC repository: on PATH, else beside this Python
    (`.venv/bin/snakemake` run without activating the venv)."""
    if not Path(".dvc").is_dir():
        return None
    return shutil.which("dvc") or shutil.which("dvc", path=str(Path(sys.executable).parent))


def _remember_lock() -> None:
    """Snakemake has seen dvc.lock as it is now."""
    if not DVC_LOCK.exists():
        SEEN_LOCK.unlink(missing_ok=True)
        return
    SEEN_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(SEEN_LOCK) as tmp:
        shutil.copyfile(DVC_LOCK, tmp)


def _lock_entries(path: Path) -> dict:
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {}) if path.exists() else {}


def record_for_dvc(stages: list[str], built: set[str]) -> None:
    """Write into dvc.lock the stages of a Snakemake run's DAG (`stages`, in the order they ran)
    that it built, and those dvc.lock lacks (Snakemake found them current, DVC never saw them).
    In that order: DVC rewrites each output it commits (a new file, a new mtime), and an output
    left older than its input would make Snakemake run its stage again."""
    dvc = _dvc()
    if dvc is None:
        return
    known = _lock_entries(DVC_LOCK)
    record = [stage for stage in stages if stage in built or stage not in known]
    if record:
        print(f"Recording {len(record)} stage(s) for DVC: dvc commit --force", file=sys.stderr)
        done = subprocess.run([dvc, "commit", "--force", *record], capture_output=True, text=True)
        if done.returncode != 0:  # the outputs stand; DVC will just plan these stages again
            print(f"dvc commit failed, so `dvc repro` will run these stages again:\n"
                  f"{done.stderr[-2000:]}", file=sys.stderr)  # fmt: skip
            return
    _remember_lock()


def _lock_unchanged() -> bool:
    """dvc.lock is as Snakemake last saw it (or there is none to see)."""
    if not DVC_LOCK.exists():
        return True
    return SEEN_LOCK.exists() and filecmp.cmp(DVC_LOCK, SEEN_LOCK, shallow=False)


def stages_built_by_dvc(rules: set[str], dvc: str) -> list[str]:
    """Stages (among Snakemake's `rules`) whose dvc.lock entries changed since Snakemake last saw
    the file and whose outputs DVC still finds current."""
    seen = _lock_entries(SEEN_LOCK)
    changed = sorted(
        name
        for name, entry in _lock_entries(DVC_LOCK).items()
        if name in rules and seen.get(name) != entry
    )
    if not changed:
        return []
    status = subprocess.run([dvc, "status", "--json", *changed], capture_output=True, text=True)
    if status.returncode != 0:
        print(f"dvc status failed, DVC's runs not accepted:\n{status.stderr}", file=sys.stderr)
        return []
    stale = json.loads(status.stdout[status.stdout.find("{") :])
    return [name for name in changed if name not in stale]


def accept_dvc_runs(rules: set[str]) -> None:
    """Touch the stages DVC built through Snakemake itself, which records their params, code and
    input checksums (forced: a stage Snakemake finds current by mtime, but has no record of,
    gets one too)."""
    dvc = _dvc()
    if dvc is None or _lock_unchanged():
        return
    built = stages_built_by_dvc(rules, dvc)
    if built:
        print(f"Accepting {len(built)} stage(s) built by DVC: snakemake --touch", file=sys.stderr)
        touch = [sys.executable, "-m", "snakemake", "--touch", "--cores", "1", "--no-hooks"]
        touch += ["--quiet", "all", "--allowed-rules", *built, "--forcerun", *built, "--", *built]
        done = subprocess.run(touch, capture_output=True, text=True)
        if done.returncode != 0:  # e.g. another Snakemake holds the lock: try again next time
            print(f"snakemake --touch failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            return
    _remember_lock()
