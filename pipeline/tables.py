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
        return "Teaching Yourself" + (" (tau^2)" if run.tau_squared else "")
    return "Baseline + Data Aug" if run.augment else "Baseline"


def _summarise(frame: pd.DataFrame, keys: list[str], metrics: Sequence[str]) -> pd.DataFrame:
    grouped = frame.groupby(keys, sort=False)
    out = grouped.size().rename("seeds").to_frame()
    for metric in metrics:
        out[f"{metric}_mean"] = grouped[metric].mean().round(2)
        out[f"{metric}_std"] = grouped[metric].std(ddof=1).round(2)  # empty for one seed
    return out.reset_index()


def selfkd_table3(runs: Sequence[RunSpec], dirs: dict[str, Path]) -> pd.DataFrame:
    """Teaching Yourself's table 3; each row's video@1 compared, paired by seed, with the Baseline
    and with Baseline + Data Aug (what Teaching Yourself adds beyond its augmentation)."""
    frame = pd.DataFrame(
        [{"method": _row_name(r), "seed": r.seed, **read_test_metrics(dirs[r.name])} for r in runs]
    )
    table = _summarise(frame, ["method"], ["clip@1", "video@1"])
    for reference in ("Baseline", "Baseline + Data Aug"):
        table = compare_paired(table, frame, reference, [("video@1", "video@1_")], label="method")
    paper = [SELFKD_PAPER.get(m, (None, None)) for m in table["method"]]  # the paper: no tau^2
    table["paper_clip@1"] = [p[0] for p in paper]
    table["paper_video@1"] = [p[1] for p in paper]
    return table


def selfkd_table8(runs: Sequence[RunSpec], dirs: dict[str, Path]) -> pd.DataFrame:
    frame = pd.DataFrame(
        [{"tau": r.tau, "lambda": r.lam, **read_test_metrics(dirs[r.name])} for r in runs]
    )
    return _summarise(frame, ["tau", "lambda"], ["video@1"])


def _figure_table3(table: pd.DataFrame, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 4.5))
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
    ax.set_xticks(x, table["method"], rotation=15, ha="right")
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


# ---------------------------------------------------------------- DTG-Net and the teachers

# DTG-Net's tables on UCF101 split 1 (acc@1, acc@5): for reference only, never compared as equals.
DTG_PAPER_TABLE3 = {
    "ImageNet": (59.98, 82.47),
    "Places": (49.96, 72.54),
    "BU": (62.01, 84.19),
    "Stanford": (61.83, 83.48),
    "ImageNet+Places": (54.77, 77.74),
    "BU+Stanford": (62.65, 83.61),
    "All": (60.45, 82.84),
    "All offline": (63.28, 84.38),
    "All online1": (61.59, 82.47),
    "All online2": (59.48, 82.18),
}
DTG_PAPER_TABLE2 = {  # keyed by (teacher input, student, student input, overlap)
    ("img", "tsn", "img", True): (57.73, 80.07),
    ("img", "r3d", "seq", True): (58.02, 79.62),
    ("seq", "tsn", "seq", True): (58.76, 80.84),
    ("seq", "tsn", "seq", False): (57.65, 79.73),
}


def _json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read {what} ({err!r}); rerun its stage") from None


def finetune_metrics(run_dir: Path) -> dict:
    """A fine-tuning run's test acc@1, acc@5 and mAP (video level, percent), and the linear probe
    top-1 of its initial network's frozen features (probe@1)."""
    path = run_dir / "metrics.json"
    metrics = _json(path, "the run's metrics")
    try:
        test = metrics["test"]
        return {
            "acc@1": 100 * test["video_top1"],
            "acc@5": 100 * test["video_top5"],
            "mAP": 100 * test["video_map"],
            "probe@1": metrics["init_probe"]["top1"],
        }
    except KeyError as err:
        raise DataError(f"{path}: no test metric {err}; rerun its finetune stage") from None


def paired_verdict(diffs: Sequence[float], level: float = 0.95) -> str:
    """'yes' / 'no' when per-seed paired differences (row minus reference, same seed: same
    labeled subset and head initialisation) are significantly above / below zero under a
    two-sided paired t-test at `level`; else 'within noise' ('one seed' when there is no spread to
    estimate). With 3 seeds the bar is 4.30 standard errors, not 2."""
    from scipy import stats

    diffs = np.asarray(diffs, dtype=float)
    if len(diffs) < 2:
        return "one seed"
    mean, error = diffs.mean(), diffs.std(ddof=1) / np.sqrt(len(diffs))
    bar = stats.t.ppf(0.5 + level / 2, df=len(diffs) - 1) * error
    if mean > bar:
        return "yes"
    if mean < -bar:
        return "no"
    return "within noise"


def compare_paired(
    table: pd.DataFrame,
    frame: pd.DataFrame,
    reference: str,
    metrics: Sequence[tuple[str, str]],
    label: str = "row",
) -> pd.DataFrame:
    """Add, per (metric, column prefix), each row's paired comparison with the `reference` row:
    `<prefix>vs_<ref>` (mean per-seed difference), `<prefix>vs_<ref>_se` (its standard error) and
    `<prefix>beats_<ref>` (paired_verdict). `frame` holds the per-seed values (columns `label`,
    "seed", the metrics); only seeds both rows ran are paired. Rows without the metric (reference
    rows such as a teacher's probe) get empty cells."""
    ref = frame[frame[label] == reference].set_index("seed")
    for metric, prefix in metrics:
        if metric not in frame:
            continue
        means, errors, verdicts = [], [], []
        for name in table[label]:
            own = frame[frame[label] == name].set_index("seed")[metric].dropna()
            diffs = (own - ref[metric]).dropna()
            if name == reference or diffs.empty:
                means.append(np.nan), errors.append(np.nan), verdicts.append("")
                continue
            means.append(round(diffs.mean(), 2))
            errors.append(round(diffs.std(ddof=1) / np.sqrt(len(diffs)), 2) if len(diffs) > 1
                          else np.nan)  # fmt: skip
            verdicts.append(paired_verdict(diffs.to_numpy()))
        table[f"{prefix}vs_{reference}"] = means
        table[f"{prefix}vs_{reference}_se"] = errors
        table[f"{prefix}beats_{reference}"] = verdicts
    return table


def teacher_table(teachers: Sequence[str], teacher_dirs: dict, caches: dict) -> pd.DataFrame:
    """results/tables/teachers.csv: source, training-set size, own accuracy, features, sha256."""
    rows = []
    for name in teachers:
        metrics = _json(teacher_dirs[name] / "metrics.json", "the teacher's metrics")
        cache = _json(caches[name] / "cache.json", "the feature cache summary")
        score = metrics.get("top1", metrics.get("miou"))
        rows.append(
            {
                "teacher": name,
                "source": metrics["source"]["kind"],
                "source_path": metrics["source"]["path"],
                "kind": metrics["kind"],
                "DataSize": metrics["train_size"],
                "metric": "top1" if "top1" in metrics else "mIoU",
                "score": None if score is None else round(float(score), 2),
                "feature_dim": cache["feature_dim"],
                "cache_bytes_per_1000_frames": round(1000 * cache["bytes"] / cache["frames"]),
                "checkpoint_sha256": cache["checkpoint_sha256"],
            }
        )
    return pd.DataFrame(rows)


def _teacher_sizes(teacher_dirs: dict) -> dict[str, int]:
    return {
        name: int(_json(path / "metrics.json", "the teacher's metrics")["train_size"])
        for name, path in teacher_dirs.items()
    }


TEACHER_LABELS = {
    "imagenet": "ImageNet",
    "places": "Places",
    "bu101": "BU",
    "stanford40": "Stanford",
}


def teacher_probe(path: Path) -> float:
    """A teacher's linear-probe test top-1 (percent) from its probe run's metrics.json."""
    metrics = _json(path / "metrics.json", "the teacher probe")
    try:
        return float(metrics["test"]["top1"])
    except (KeyError, TypeError) as err:
        raise DataError(f"{path / 'metrics.json'}: no test top1 ({err!r})") from None


def _guiding_teachers(run) -> tuple[str, ...]:
    """The teachers whose knowledge a fine-tuning run's student started from or trained with."""
    if run.pretrained is not None:
        return run.pretrained.teachers
    return (run.init_teacher,) if run.init_teacher else tuple(run.guided_by)


def dtg_table(
    name: str,
    rows: Sequence[tuple[str, object]],
    run_dirs: dict,
    teacher_dirs: dict,
    probe_dirs: dict | None = None,
) -> pd.DataFrame:
    """One of DTG-Net's tables from its (row label, FinetuneRun) pairs (pipeline.dag.dtg_tables).

    Rows are compared with the table's reference row by paired per-seed differences
    (compare_paired). probe_dirs (teacher -> its probe run): reference rows "Teacher probe:
    <teacher>" (the teacher's own cached features under the same linear probe, labeled subset and
    test split) and a `transfer` column: a row's probe@1 over the best probe of the teachers that
    guided it, i.e. how much of their knowledge reached the student before fine-tuning."""
    sizes = _teacher_sizes(teacher_dirs) if name == "table3" else {}
    records = []
    for label, run in rows:
        record = {"row": label, "seed": run.seed, **finetune_metrics(run_dirs[run.name])}
        pre = run.pretrained
        if name == "table3":
            teachers = pre.teachers if pre else ()
            record |= {
                "teachers": "+".join(teachers) or "none",
                "weighting": pre.weighting if pre else "",
                "DataSize": sum(sizes[t] for t in teachers),
            }
            if pre:
                weights = _json(run_dirs[pre.name] / "metrics.json", "the pretraining metrics")
                record |= {f"w_{t}": weights["weights"][t] for t in teachers}
        if name == "table2":
            record |= {
                "teacher_input": pre.guidance,
                "student": pre.student,
                "student_input": pre.anchor,
                "overlap": pre.overlap,
            }
        records.append(record)
    frame = pd.DataFrame(records)
    measured = ("seed", "acc@1", "acc@5", "mAP", "probe@1")
    keys = [c for c in frame.columns if c not in measured and not c.startswith("w_")]
    metrics = ["acc@1", "acc@5"] + (["mAP"] if name in ("table4", "table1") else [])
    if name != "table4":  # both of table 4's rows start from random weights
        metrics.append("probe@1")
    table = _summarise(frame, keys, metrics)
    if name == "table3":
        weights = frame.groupby("row", sort=False)[[c for c in frame if c.startswith("w_")]].mean()
        table["weights"] = [
            ", ".join(f"{c[2:]} {v:.3g}" for c, v in weights.loc[r].items() if not np.isnan(v))
            for r in table["row"]
        ]
    reference = DTG_TITLES[name][1] or table["row"].iloc[-1]
    table = compare_paired(table, frame, reference, [("acc@1", ""), ("probe@1", "probe_")])
    if name == "table3":  # the weightings against averaging: does choosing teachers pay?
        table = compare_paired(table, frame, "All", [("acc@1", "")])
    if name == "table3":
        paper = [DTG_PAPER_TABLE3.get(r, (None, None)) for r in table["row"]]
    elif name == "table2":
        columns = ["teacher_input", "student", "student_input", "overlap"]
        paper = [
            DTG_PAPER_TABLE2.get(tuple(r), (None, None))
            for r in table[columns].itertuples(index=False)
        ]
    else:
        paper = [(None, None)] * len(table)
    if any(p[0] is not None for p in paper):
        table["paper_acc@1"] = [p[0] for p in paper]
        table["paper_acc@5"] = [p[1] for p in paper]
    if probe_dirs:
        table = _with_teacher_probes(table, dict(rows), probe_dirs)
    return table


def _with_teacher_probes(table: pd.DataFrame, runs: dict, probe_dirs: dict) -> pd.DataFrame:
    """Add the `transfer` column and one reference row per probed teacher."""
    probes = {t: teacher_probe(Path(path)) for t, path in probe_dirs.items()}
    if "probe@1_mean" in table:
        transfer = []
        for label, probe in zip(table["row"], table["probe@1_mean"], strict=True):
            guides = [probes[t] for t in _guiding_teachers(runs[label]) if t in probes]
            transfer.append(round(probe / max(guides), 3) if guides else np.nan)
        table["transfer"] = transfer
    rows = pd.DataFrame(
        [
            {"row": f"Teacher probe: {TEACHER_LABELS.get(t, t)}", "seeds": 1,
             "probe@1_mean": round(value, 2)}
            for t, value in probes.items()
        ]
    )  # fmt: skip
    return pd.concat([table, rows], ignore_index=True)


def _bar_figure(table: pd.DataFrame, title: str, path: Path, reference: str | None) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6, 0.8 * len(table) + 2), 4.5))
    ax = fig.add_subplot()
    x = np.arange(len(table))
    bars = [("acc@1", "fine-tuned acc@1", "tab:blue")]
    if "probe@1_mean" in table:
        bars.append(("probe@1", "linear probe of the initial features", "tab:gray"))
    width = 0.8 / len(bars)
    for i, (metric, label, color) in enumerate(bars):
        offset = (i - (len(bars) - 1) / 2) * width
        ax.bar(x + offset, table[f"{metric}_mean"], width, yerr=table[f"{metric}_std"],
               capsize=3, color=color, label=label)  # fmt: skip
    if reference is not None:
        value = table.loc[table["row"] == reference, "acc@1_mean"].iloc[0]
        ax.axhline(value, color="tab:red", linestyle="--", label=f"{reference}: {value:.1f}%")
    ax.legend(loc="lower right", fontsize="small")
    ax.set_xticks(x, table["row"], rotation=30, ha="right")
    ax.set_ylabel("test top-1 (%), video level")
    ax.set_title(f"{title} (mean ± std over {table['seeds'].max()} seeds)")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)


DTG_TITLES = {
    "table3": ("DTG-Net table 3: teachers and weightings", "Scratch"),
    "table2": ("DTG-Net table 2: inputs (ImageNet teacher)", None),
    "table4": ("DTG-Net table 4: supervised DTG", "Supervised"),
    "table1": ("DTG-Net table 1: initialisations", "Random init"),
}


def write_table(table: pd.DataFrame, csv_path: Path) -> pd.DataFrame:
    with atomic_path(csv_path, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.to_string(index=False))
    return table


def write_dtg_table(
    name: str,
    rows,
    run_dirs: dict,
    teacher_dirs: dict,
    probe_dirs: dict,
    csv_path: Path,
    png_path: Path,
) -> pd.DataFrame:
    table = dtg_table(name, rows, run_dirs, teacher_dirs, probe_dirs)
    title, reference = DTG_TITLES[name]
    _bar_figure(table, title, png_path, reference)
    return write_table(table, csv_path)


# TimeBalance's tables: the paper's acc@1 by labeled percent (UCF101; spec (f)) and, per table,
# the rows every other row is compared with seed by seed.
TB_PAPER = {
    "tb_table1": {  # R3D-18, 8 frames (its own Table 1 has no supervised-only row)
        "TimeBalance": {1: 29.1, 5: 47.9, 10: 69.8, 20: 79.1, 50: 83.3},
    },
    "tb_table2": {  # R3D-50, as are Tables 3-6
        "f_S": {5: 48.66, 20: 79.70}, "f_I": {5: 43.79, 20: 74.55},
        "f_D": {5: 44.08, 20: 75.13}, "S+I": {5: 47.95, 20: 79.28},
        "S+D": {5: 48.81, 20: 79.76}, "S+I+D averaged": {5: 52.14, 20: 82.02},
        "S+I+D reweighted": {5: 53.48, 20: 83.26},
    },
    "tb_table3": {
        "f_S": {5: 25.60, 20: 46.20}, "S+I": {5: 43.94, 20: 74.85},
        "S+D": {5: 44.30, 20: 75.22}, "S+I+D averaged": {5: 49.57, 20: 80.06},
        "S+I+D reweighted": {5: 53.10, 20: 83.00},
    },
    "tb_table4": {
        "Inv1+Inv2": {5: 48.33, 20: 78.76}, "Dist1+Dist2": {5: 49.15, 20: 80.49},
        "Inv1+Dist1": {5: 52.14, 20: 82.02}, "Inv1+Dist2": {5: 51.78, 20: 81.43},
    },
    "tb_table5": {
        "f_I n=4": {5: 43.79, 20: 74.55}, "f_I n=2": {5: 42.78, 20: 73.86},
        "f_D n=4": {5: 44.08, 20: 75.13}, "f_D n=2": {5: 39.55, 20: 71.21},
    },
    "tb_table6": {
        "L2": {5: 53.48, 20: 83.15, 50: 85.02}, "KL": {5: 52.62, 20: 82.76, 50: 84.50},
        "JS": {5: 50.91, 20: 82.10, 50: 83.94},
    },
}  # fmt: skip
TB_REFERENCES = {
    "tb_table1": ("Supervised (f_S)",),
    "tb_table2": ("f_S", "f_I", "f_D", "S+I+D averaged"),
    "tb_table3": ("f_S", "S+I+D averaged"),
    "tb_table4": ("Inv1+Dist1",),
    "tb_table5": ("f_I n=4", "f_D n=4"),
    "tb_table6": ("L2",),
}
TB_TITLES = {
    "tb_table1": "TimeBalance table 1: the student vs supervised training",
    "tb_table2": "TimeBalance table 2: teacher contributions",
    "tb_table3": "TimeBalance table 3: random-init student",
    "tb_table4": "TimeBalance table 4: teacher pairs",
    "tb_table5": "TimeBalance table 5: n local clips in SSL",
    "tb_table6": "TimeBalance table 6: the student's distance",
}


def tb_table(name: str, rows: Sequence[tuple[str, object]], run_dirs: dict) -> pd.DataFrame:
    """A TimeBalance table from its (row label, TBRun) pairs (pipeline.dag.tb_tables): per
    labeled budget, acc@1, acc@5 and probe@1 over the seeds, each row compared seed by seed with
    the table's reference rows (TB_REFERENCES: the supervised baseline f_S on the same
    initialisation, each fine-tuned teacher alone, S+I+D averaged: does reweighting by s pay?),
    the paper's acc@1 beside."""
    records = [
        {"budget": run.percent, "row": label, "seed": run.seed,
         **finetune_metrics(run_dirs[run.name])}
        for label, run in rows
    ]  # fmt: skip
    table = _compare_per_group(pd.DataFrame(records), "budget", TB_REFERENCES[name])
    table["paper_acc@1"] = [
        TB_PAPER[name].get(r, {}).get(b) for r, b in zip(table["row"], table["budget"], strict=True)
    ]
    return table


def _compare_per_group(frame: pd.DataFrame, group: str, references: Sequence[str]) -> pd.DataFrame:
    """Per value of `group` (a budget, a backbone): acc@1, acc@5 and probe@1 over the seeds,
    each row's acc@1 compared seed by seed with each reference row of the same group."""
    parts = []
    for _, rows in frame.groupby(group, sort=False):
        table = _summarise(rows, [group, "row"], ["acc@1", "acc@5", "probe@1"])
        for reference in references:
            table = compare_paired(table, rows, reference, [("acc@1", "")])
        parts.append(table)
    return pd.concat(parts, ignore_index=True)


def write_tb_table(name: str, rows, run_dirs: dict, csv_path: Path, png_path: Path) -> pd.DataFrame:
    table = tb_table(name, rows, run_dirs)
    labelled = table.assign(
        row=[f"{r} ({b}%)" for r, b in zip(table["row"], table["budget"], strict=True)]
    )
    _bar_figure(labelled, TB_TITLES[name], png_path, reference=None)
    return write_table(table, csv_path)


# The human-parsing KD paper's UCF101 (acc@1, acc@5) per backbone (spec section 4; "w/o KD" and
# "RSP only" are its RSPNet* rows, re-fine-tuned for 100 epochs; it has no scratch row).
HPKD_PAPER = {
    "c3d": {"RSP only (no KD)": (77.6, 93.7), "w/o KD": (77.6, 93.7), "TI": (79.3, 92.1),
            "Full": (80.4, 95.7)},
    "r2plus1d": {"RSP only (no KD)": (79.4, 94.3), "w/o KD": (79.4, 94.3), "TI": (80.1, 94.3),
                 "Full": (81.6, 95.3)},
}  # fmt: skip
HPKD_REFERENCES = {
    "hpkd_table1": ("Scratch", "RSP only (no KD)"),
    "hpkd_table2": ("w/o KD", "TI"),
}
HPKD_TITLES = {
    "hpkd_table1": "Human-parsing KD table 1",
    "hpkd_table2": "Human-parsing KD table 2",
}


def hpkd_table(name: str, rows: Sequence[tuple[str, object]], run_dirs: dict) -> pd.DataFrame:
    """A human-parsing KD table from its (row label, HPKDRun) pairs (pipeline.dag.hpkd_tables):
    per backbone, acc@1, acc@5 and probe@1 over the seeds, each row compared seed by seed with
    the reference rows (HPKD_REFERENCES), the paper's UCF101 numbers beside."""
    records = [
        {"backbone": run.backbone, "row": label, "seed": run.seed,
         **finetune_metrics(run_dirs[run.name])}
        for label, run in rows
    ]  # fmt: skip
    table = _compare_per_group(pd.DataFrame(records), "backbone", HPKD_REFERENCES[name])
    paper = [
        HPKD_PAPER[b].get(r, (None, None))
        for r, b in zip(table["row"], table["backbone"], strict=True)
    ]
    table["paper_acc@1"], table["paper_acc@5"] = [p[0] for p in paper], [p[1] for p in paper]
    return table


def write_hpkd_table(name: str, rows, run_dirs: dict, csv_path: Path, png_path: Path):
    table = hpkd_table(name, rows, run_dirs)
    labelled = table.assign(
        row=[f"{r} ({b})" for r, b in zip(table["row"], table["backbone"], strict=True)]
    )
    _bar_figure(labelled, HPKD_TITLES[name], png_path, reference=None)
    return write_table(table, csv_path)
