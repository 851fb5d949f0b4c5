import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_cli(
    *args, cwd: Path, check: bool = False, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run `python -m pipeline ...` in `cwd` as Snakemake and DVC would."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
    )


@pytest.fixture
def project_params() -> dict:
    """The committed params.yaml as a dict, for tests to modify."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def copy_project(dest: Path) -> Path:
    """A copy of the project's tracked sources (no data, results or venv) in `dest`."""
    for name in ("pipeline", "Snakefile", "params.yaml", "profiles", "envs", "report"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest
