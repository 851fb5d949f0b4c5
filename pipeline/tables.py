"""Assemble the papers' tables (CSV) and their figures (PNG) from the runs' metrics files.

Every number comes from a run's metrics.json; a missing or malformed file is an error, never a
silently skipped row. Accuracies are reported in percent, as mean and (sample) std over seeds.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.dag import RunSpec
from pipeline.errors import DataError
from pipeline.io import atomic_path

# Teaching Yourself, Table 3 (R3D-18, UCF101 from scratch), clip@1 / video@1: for reference only.
SELFKD_PAPER = {
    "Baseline": (44.2, 46.5),
    "Baseline + Data Aug": (54.5, 57.8),
    "Teaching Yourself": (64.3, 68.4),
}


def read_test_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    try:
        test = json.loads(path.read_text())["test"]
        return {"clip@1": 100 * test["clip_top1"], "video@1": 100 * test["video_top1"]}
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path}: no test metrics ({err!r}); rerun its train stage") from None


def _row_name(run: RunSpec) -> str:
    if run.method == "selfkd":
        return "Teaching Yourself"
    return "Baseline + Data Aug" if run.augment else "Baseline"


def _summarise(frame: pd.DataFrame, keys: list[str], metrics: Sequence[str]) -> pd.DataFrame:
    grouped = frame.groupby(keys, sort=False)
    out = grouped.size().rename("seeds").to_frame()
    for metric in metrics:
        out[f"{metric}_mean"] = grouped[metric].mean().round(2)
        out[f"{metric}_std"] = grouped[metric].std(ddof=1).fillna(0.0).round(2)
    return out.reset_index()


def selfkd_table3(runs: Sequence[RunSpec], dirs: dict[str, Path]) -> pd.DataFrame:
    frame = pd.DataFrame(
        [{"method": _row_name(r), **read_test_metrics(dirs[r.name])} for r in runs]
    )
    table = _summarise(frame, ["method"], ["clip@1", "video@1"])
    baseline = table.loc[table["method"] == "Baseline", "video@1_mean"].iloc[0]
    table["video@1_vs_baseline"] = (table["video@1_mean"] - baseline).round(2)
    table["paper_clip@1"] = [SELFKD_PAPER[m][0] for m in table["method"]]
    table["paper_video@1"] = [SELFKD_PAPER[m][1] for m in table["method"]]
    return table


def selfkd_table8(runs: Sequence[RunSpec], dirs: dict[str, Path]) -> pd.DataFrame:
    frame = pd.DataFrame(
        [{"tau": r.tau, "lambda": r.lam, **read_test_metrics(dirs[r.name])} for r in runs]
    )
    return _summarise(frame, ["tau", "lambda"], ["video@1"])


def _figure_table3(table: pd.DataFrame, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    x = np.arange(len(table))
    for offset, metric in ((-0.2, "clip@1"), (0.2, "video@1")):
        ax.bar(
            x + offset,
            table[f"{metric}_mean"],
            0.4,
            yerr=table[f"{metric}_std"],
            capsize=4,
            label=metric,
        )
    ax.set_xticks(x, table["method"])
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"Teaching Yourself, table 3 (mean ± std over {table['seeds'].max()} seeds)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _figure_table8(table: pd.DataFrame, path: Path) -> None:
    from matplotlib.figure import Figure

    grid = table.pivot(index="tau", columns="lambda", values="video@1_mean")
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    image = ax.imshow(grid.to_numpy(), cmap="viridis")
    for (i, j), value in np.ndenumerate(grid.to_numpy()):
        ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="white")
    ax.set_xticks(range(len(grid.columns)), [f"{v:g}" for v in grid.columns])
    ax.set_yticks(range(len(grid.index)), [f"{v:g}" for v in grid.index])
    ax.set_xlabel("lambda")
    ax.set_ylabel("tau")
    ax.set_title("Teaching Yourself, table 8: video@1 (%)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)


SELFKD_TABLES = {
    "selfkd_table3": (selfkd_table3, _figure_table3),
    "selfkd_table8": (selfkd_table8, _figure_table8),
}


def write_selfkd_table(
    name: str, runs: Sequence[RunSpec], dirs: dict[str, Path], csv_path: Path, png_path: Path
) -> pd.DataFrame:
    build, draw = SELFKD_TABLES[name]
    table = build(runs, dirs)
    draw(table, png_path)
    with atomic_path(csv_path, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)
    print(table.to_string(index=False))
    return table
