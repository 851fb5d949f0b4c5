"""`describe(path)`: a human summary of a pipeline artifact (`python -m pipeline inspect PATH`).

Each artifact kind is a (kind, recognises, describe) entry in `DESCRIBERS`; `describe` uses the
first entry that recognises the path. A later stage adds its artifact kind (a run dir, a feature
cache) by appending an entry, without touching the others.

Shard folders and feature caches are verified: every frame and cached output is read, so one that
fails its checksum is reported (measured: 0.75 s for the default world's 442 MB of raw shards when
they are in the page cache; reading them from disk takes what the disk takes).
"""

import collections
import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import h5py
import pandas as pd

from pipeline.data.shards import (
    FRAME_CRC32,
    MANIFEST,
    corrupt_jpeg_rows,
    corrupt_rows,
    read_manifest,
    shard_path,
)
from pipeline.errors import DataError

WIDTH = 100
LABEL_WIDTH = 14
EXAMPLES = 5  # rejected inputs listed by name
NO_BREAK = "\u00a0"


class Describer(NamedTuple):
    kind: str  # what the artifact is, for the error listing the kinds known
    recognises: Callable[[Path], bool]
    describe: Callable[[Path], str]


def describe(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    for describer in DESCRIBERS:
        if describer.recognises(path):
            return describer.describe(path)
    kinds = "; ".join(d.kind for d in DESCRIBERS)
    raise DataError(f"{path}: not an artifact this pipeline knows how to describe (known: {kinds})")


def _field(label: str, text: str | list[str], lead: str = "") -> str:
    """`label` padded to a column, then `lead` and `text` wrapped under themselves; a list of items
    wraps only between items."""
    if isinstance(text, list):  # textwrap breaks at spaces only, not at no-break spaces
        text = lead + ", ".join(item.replace(" ", NO_BREAK) for item in text)
    indent = " " * (2 + LABEL_WIDTH)
    wrapped = textwrap.fill(
        text, WIDTH, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
    )
    return f"  {label:<{LABEL_WIDTH}}" + wrapped[len(indent) :].replace(NO_BREAK, " ")


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def _counts(counter: dict) -> list[str]:
    return [f"{key} {count:,}" for key, count in counter.items()]


def _is_shard_folder(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def _is_incomplete_shard_folder(path: Path) -> bool:
    return path.is_dir() and any(path.glob("shard-*.h5"))


def describe_shards(shard_dir: Path) -> str:
    manifest = read_manifest(shard_dir)
    shards, problems = _shard_attrs(shard_dir, manifest)
    codecs = sorted({str(attrs.get("codec")) for attrs in shards.values()})
    datasets = sorted({str(attrs.get("dataset")) for attrs in shards.values()})
    frames = manifest["num_frames"]
    disk = sum(f.stat().st_size for f in shard_dir.iterdir() if f.is_file())
    lines = [f"shard folder {shard_dir} (dataset {', '.join(datasets) or '?'})"]
    lines.append(
        _field(
            "videos",
            f"{len(manifest):,} in {len(shards)} shards, {int(frames.sum()):,} frames "
            f"({_frame_range(frames)} per video), {_size(disk)} on disk",
        )
    )
    lines.append(_field("codec", ", ".join(codecs) or "?"))
    sizes = manifest.groupby(["height", "width"]).size().sort_values(ascending=False, kind="stable")
    lines.append(_field("frame size", _counts({f"{h}x{w}": n for (h, w), n in sizes.items()})))
    by_class = manifest.groupby(["label", "label_name"]).size()
    lines.append(
        _field(
            "classes",
            _counts({name: n for (_, name), n in by_class.items()}),
            lead=f"{len(by_class)}: ",
        )
    )
    for column in sorted(c for c in manifest.columns if c.startswith("split")):
        values = manifest[column].replace("", "unused").value_counts()
        lines.append(_field(column, _counts(values.to_dict())))
    labeled = [c for c in manifest.columns if c.startswith("labeled_")]
    subsets = {}
    for column in sorted(labeled, key=lambda c: int(c.removeprefix("labeled_"))):
        chosen = manifest[manifest[column]]
        subsets[f"{column.removeprefix('labeled_')}%"] = (
            f"{len(chosen):,} ({chosen['label'].nunique()} classes)"
        )
    if subsets:
        lines.append(_field("labeled", [f"{k}: {v}" for k, v in subsets.items()]))
    summary = shard_dir / "ingest.json"
    if summary.is_file():
        params = json.loads(summary.read_text()).get("params", {})
        lines.append(_field("ingest params", [f"{k}={v}" for k, v in params.items()]))
    lines.extend(_rejections(shard_dir / "rejected.csv"))
    lines.extend(_field("PROBLEM", problem) for problem in problems)
    return "\n".join(lines)


def _frame_range(frames: pd.Series) -> str:
    if frames.empty:
        return "no frames"
    return f"{frames.min()}-{frames.max()}, median {frames.median():g}"


def _shard_attrs(shard_dir: Path, manifest: pd.DataFrame) -> tuple[dict[int, dict], list[str]]:
    """Each shard file's attrs, and any disagreement between the manifest and the shard files."""
    shards, problems = {}, []
    ends = (manifest["offset"] + manifest["num_frames"]).groupby(manifest["shard"]).max()
    numbers = sorted(int(p.stem.removeprefix("shard-")) for p in shard_dir.glob("shard-*.h5"))
    for number in sorted(set(numbers) | set(ends.index)):
        path = shard_path(shard_dir, number)
        try:
            with h5py.File(path, "r") as file:
                shards[number] = dict(file.attrs)
                frames = file.get("frames")
                videos = manifest[manifest["shard"] == number]
                stored, layout, corrupt = 0, None, []
                if frames is not None:
                    stored = len(frames)  # the first axis in either layout
                    layout = _layout_problem(frames, file.attrs.get("codec"), videos)
                    corrupt = _corrupt_frames(file, frames)
        except (OSError, KeyError) as err:
            problems.append(f"{path.name} unreadable ({err}); the manifest points into it")
            continue
        if number in ends.index and ends[number] > stored:
            problems.append(f"{path.name} holds {stored} frames, the manifest needs {ends[number]}")
        if layout:
            problems.append(f"{path.name} {layout}")
        if corrupt:
            problems.append(
                f"{path.name} has {len(corrupt)} corrupt frames (checksum mismatch): "
                f"{_frames_of_videos(corrupt, videos)}; rerun ingest"
            )
    return shards, problems


def _corrupt_frames(file: h5py.File, frames: h5py.Dataset) -> list[int]:
    """Rows of `frames` that fail their checksum (shards of an older ingest have none)."""
    if FRAME_CRC32 in file:
        return corrupt_jpeg_rows(frames, file[FRAME_CRC32])
    return corrupt_rows(frames) if frames.fletcher32 else []


def _frames_of_videos(rows: list[int], videos: pd.DataFrame) -> str:
    """Shard rows as '<video> frames a, b' for the first few videos that hold them."""
    held = []
    for video in videos.sort_values("offset").itertuples():
        frames = [row - video.offset for row in rows if 0 <= row - video.offset < video.num_frames]
        if frames:
            held.append(f"{video.path} frames {', '.join(map(str, frames))}")
    if len(held) > EXAMPLES:
        held = [*held[:EXAMPLES], f"... {len(held) - EXAMPLES} more videos"]
    return "; ".join(held) or f"rows {', '.join(map(str, rows))} (no video holds them)"


def _layout_problem(frames: h5py.Dataset, codec: str, videos: pd.DataFrame) -> str | None:
    """How `frames` breaks the shard format for `codec` and the shard's `videos`, or None.

    Raw frames are one (frames, H, W, 3) uint8 array, JPEG frames one file per element.
    """
    if codec == "jpeg" and frames.ndim != 1:
        return f"holds JPEG frames as {frames.dtype} {frames.shape}, not one file per element"
    if codec != "raw":
        return None
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != "uint8":
        return (
            f"holds raw frames as {frames.dtype} {frames.shape}, not (frames, H, W, 3) uint8 "
            "(written by an older ingest?)"
        )
    other = videos[(videos["height"] != frames.shape[1]) | (videos["width"] != frames.shape[2])]
    if other.empty:
        return None
    return (
        f"holds {frames.shape[1]}x{frames.shape[2]} frames, the manifest says other sizes for "
        f"{len(other)} videos, e.g. {other['height'].iloc[0]}x{other['width'].iloc[0]} for "
        f"{other['path'].iloc[0]}"
    )


def _rejections(rejected_csv: Path) -> list[str]:
    if not rejected_csv.is_file():
        return [_field("rejected", "no rejected.csv")]
    rejected = pd.read_csv(rejected_csv, keep_default_na=False)
    if rejected.empty:
        return [_field("rejected", "0")]
    # A reason reads "kind: detail"; count by kind, list the first few in full.
    kinds = collections.Counter(reason.split(":")[0] for reason in rejected["reason"])
    lines = [_field("rejected", _counts(dict(kinds.most_common())), lead=f"{len(rejected):,}: ")]
    for path, reason in rejected.head(EXAMPLES).itertuples(index=False):
        lines.append(_field("", f"{path}: {reason}"))
    if len(rejected) > EXAMPLES:
        lines.append(_field("", f"... {len(rejected) - EXAMPLES} more in {rejected_csv.name}"))
    return lines


def describe_incomplete_shards(shard_dir: Path) -> str:
    count = len(list(shard_dir.glob("shard-*.h5")))
    header = (
        f"shard folder {shard_dir} is INCOMPLETE: {count} shard files but no manifest.parquet "
        "(ingest was interrupted, or failed in strict mode)"
    )
    return "\n".join([header, *_rejections(shard_dir / "rejected.csv")])


def _is_run_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "metrics.json").is_file() or (path / "checkpoints").is_dir())


def _percent(value) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "-"


def describe_run(run_dir: Path) -> str:
    """A training run: its test and validation metrics, and its checkpoint's metadata."""
    from pipeline.train import load_checkpoint  # torch: only runs need it

    lines = [f"run folder {run_dir}"]
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        test = metrics.get("test", {})
        for level in ("clip", "video"):
            if f"{level}_top1" in test:
                scores = [f"{k} {_percent(test.get(f'{level}_{k}'))}" for k in ("top1", "top5")]
                scores += [f"mean class {_percent(test.get(f'{level}_mean_class_acc'))}"]
                scores += [f"mAP {_percent(test.get(f'{level}_map'))}"]
                lines.append(_field(f"test {level}", scores))
        if "splits" in metrics:
            lines.append(_field("videos", _counts(metrics["splits"])))
        run = [f"{k}={metrics[k]}" for k in ("epochs", "seed", "batch_size", "device", "threads")]
        lines.append(_field("run", [r for r in run if not r.endswith("=None")]))
        if metrics.get("best"):
            best = metrics["best"]
            lines.append(
                _field("best", f"{best['metric']} {best['value']:.4f} at epoch {best['epoch']}")
            )
    else:
        lines.append(_field("metrics", "none yet (training unfinished)"))
    checkpoint = run_dir / "checkpoints" / "last.pt"
    if checkpoint.is_file():
        ckpt = load_checkpoint(checkpoint)
        lines.append(
            _field(
                "checkpoint",
                f"last.pt after epoch {ckpt['epoch']}, key {ckpt['key'][:12]}, "
                f"{_size(checkpoint.stat().st_size)}",
            )
        )
        lines.append(_field("params", json.dumps(ckpt["params"], sort_keys=True)))
    return "\n".join(lines)


def _is_teacher_folder(path: Path) -> bool:
    metrics = path / "metrics.json"
    return path.is_dir() and metrics.is_file() and "teacher" in json.loads(metrics.read_text())


def describe_teacher(teacher_dir: Path) -> str:
    """A frozen teacher: its source, score, training-set size and checkpoint."""
    from pipeline.io import file_sha256
    from pipeline.teachers import read_teacher_checkpoint

    metrics = json.loads((teacher_dir / "metrics.json").read_text())
    lines = [f"teacher {metrics['teacher']} ({metrics['kind']}) in {teacher_dir}"]
    source = metrics["source"]
    lines.append(_field("source", f"{source['kind']} {source['path']}".strip()))
    scores = [
        f"{k} {metrics[k]:.1f}%" for k in ("top1", "top5", "miou", "pixel_acc") if k in metrics
    ]
    lines.append(_field("held-out", scores or "not measured (official checkpoint)"))
    lines.append(
        _field("images", f"{metrics['train_size']:,} train, {metrics['eval_size']:,} held out")
    )
    model = teacher_dir / "model.pt"
    if model.is_file():
        ckpt = read_teacher_checkpoint(model)
        prep = ckpt["preprocess"]
        lines.append(_field("network", json.dumps(ckpt["arch"], sort_keys=True)))
        lines.append(_field("preprocess", [f"{k}={prep[k]}" for k in sorted(prep)]))
        lines.append(_field("classes", [str(len(ckpt["classes"]))] + ckpt["classes"][:EXAMPLES]))
        lines.append(
            _field("checkpoint", f"sha256 {file_sha256(model)}, {_size(model.stat().st_size)}")
        )
    return "\n".join(lines)


def _is_feature_cache(path: Path) -> bool:
    return path.is_dir() and (path / "cache.json").is_file()


def _is_incomplete_feature_cache(path: Path) -> bool:
    return path.is_dir() and any(path.glob("feat-*.h5"))


def describe_feature_cache(cache_dir: Path) -> str:
    """A teacher's feature cache: what it was built from, and its datasets' sizes."""
    from pipeline.teachers.features import read_summary  # torch: only feature caches need it

    summary = read_summary(cache_dir)
    frames = summary["frames"]
    disk = sum(f.stat().st_size for f in cache_dir.iterdir() if f.is_file())
    lines = [
        f"feature cache {cache_dir} (dataset {summary['dataset']}, teacher {summary['teacher']})"
    ]
    lines.append(_field("key", summary["key"]))
    teacher = f"{summary['kind']}, feature_dim {summary['feature_dim']}"
    if summary["num_parts"]:
        size = summary["parts_size"]
        teacher += f", {summary['num_parts']} parts at {size}x{size}"
    lines.append(_field("teacher", teacher))
    lines.append(_field("checkpoint", f"sha256 {summary['checkpoint_sha256']}"))
    lines.append(_field("preprocess", [f"{k}={v}" for k, v in summary["preprocess"].items()]))
    lines.append(
        _field("frames", f"{frames:,} in {len(summary['shards'])} shards, {_size(disk)} on disk")
    )
    datasets, problems = _feature_datasets(cache_dir, summary)
    for name, (shape, dtype, stored) in datasets.items():
        per_1000 = f", {_size(stored * 1000 / frames)} per 1,000 frames" if frames else ""
        lines.append(_field(name, f"{shape} {dtype}, {_size(stored)}{per_1000}"))
    if "build" in summary:
        lines.append(_field("build", [f"{k}={v}" for k, v in summary["build"].items()]))
    lines.extend(_field("PROBLEM", problem) for problem in problems)
    return "\n".join(lines)


def _feature_datasets(cache_dir: Path, summary: dict) -> tuple[dict[str, tuple], list[str]]:
    """{name: (shape over all shards, dtype, stored bytes)}, and the feat files that disagree with
    cache.json."""
    rows, shapes, dtypes, stored, problems = 0, {}, {}, collections.Counter(), []
    for entry in summary["shards"]:
        path = cache_dir / entry["file"]
        try:
            with h5py.File(path, "r") as file:
                if file.attrs.get("key") != summary["key"]:
                    problems.append(f"{path.name} is from another build (key differs)")
                rows += entry["rows"]
                for name, dataset in file.items():
                    shapes[name], dtypes[name] = dataset.shape[1:], dataset.dtype
                    stored[name] += dataset.id.get_storage_size()
                    corrupt = corrupt_rows(dataset) if dataset.fletcher32 else []
                    if corrupt:
                        problems.append(
                            f"{path.name} {name} has {len(corrupt)} corrupt rows (checksum "
                            f"mismatch) from row {corrupt[0]} to {corrupt[-1]}; rebuild the cache"
                        )
        except OSError as err:
            problems.append(f"{path.name} unreadable ({err})")
    datasets = {name: ((rows, *shapes[name]), dtypes[name], stored[name]) for name in shapes}
    return datasets, problems


def describe_incomplete_feature_cache(cache_dir: Path) -> str:
    count = len(list(cache_dir.glob("feat-*.h5")))
    return (
        f"feature cache {cache_dir} is INCOMPLETE: {count} feat files but no cache.json "
        "(the features stage was interrupted; rerunning it keeps the finished shards)"
    )


DESCRIBERS: list[Describer] = [
    Describer("a shard folder (manifest.parquet)", _is_shard_folder, describe_shards),
    Describer(
        "an unfinished shard folder (shard-*.h5)",
        _is_incomplete_shard_folder,
        describe_incomplete_shards,
    ),
    Describer("a teacher folder (model.pt, metrics.json)", _is_teacher_folder, describe_teacher),
    Describer("a run folder (metrics.json, checkpoints/)", _is_run_folder, describe_run),
    Describer("a feature cache (cache.json)", _is_feature_cache, describe_feature_cache),
    Describer(
        "an unfinished feature cache (feat-*.h5)",
        _is_incomplete_feature_cache,
        describe_incomplete_feature_cache,
    ),
]
