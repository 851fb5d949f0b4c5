"""Human-facing summaries of artifacts: the data report of a dataset's shards."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.data.shards import read_manifest
from pipeline.inspect import describe  # noqa: E402
from pipeline.io import atomic_path  # noqa: E402


def write_data_report(shard_dir: Path, txt_path: Path, png_path: Path) -> None:
    """The `inspect` summary as text, and a figure of class balance per split and video lengths."""
    manifest = read_manifest(shard_dir)
    split = next(c for c in ("split1", "split2", "split3") if c in manifest.columns)
    counts = manifest.groupby(["label_name", split]).size().unstack(fill_value=0)
    fig, (bars, lengths) = plt.subplots(1, 2, figsize=(12, 4), width_ratios=(3, 1))
    counts.plot.bar(ax=bars, stacked=True)
    bars.set_title(f"videos per class ({split})")
    bars.set_xlabel("")
    lengths.hist(manifest["num_frames"], bins=20)
    lengths.set_title("frames per video")
    fig.tight_layout()
    with atomic_path(png_path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    with atomic_path(txt_path) as tmp:
        tmp.write_text(describe(shard_dir) + "\n")
