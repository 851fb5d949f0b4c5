"""The methods' figures: DTG-Net's online teacher weights over training (its Figure 3) and t-SNE
of the student's features with and without supervised DTG (its Figure 4); TimeBalance's
temporal similarity score per video (histogram) and per class; the human-parsing KD decoder's
part maps beside its teacher's.

Figures are drawn on matplotlib's Figure (Agg, no pyplot state) and written atomically.
"""

import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from pipeline.data.clips import prepare_video
from pipeline.io import atomic_path


def _figure(width: float, height: float):
    # Imported here: matplotlib costs a second at import, and training processes never plot.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _save(fig, out_png: str | os.PathLike) -> None:
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def online_weights_figure(
    weights: str | os.PathLike | np.ndarray,
    teacher_names: Sequence[str],
    out_png: str | os.PathLike,
    *,
    smooth: int | None = None,
    title: str = "",
) -> None:
    """Each teacher's mean loss weight per training step, one line per teacher (Figure 3).

    weights: a CSV with columns w_<teacher> (pipeline.pretrain's online_weights.csv) or a
    (steps, N) array in `teacher_names` order. smooth: moving-average window in steps (None:
    about 2% of the steps); the raw values are drawn faintly behind.
    """
    if isinstance(weights, np.ndarray):
        if weights.ndim != 2 or weights.shape[1] != len(teacher_names):
            raise ValueError(f"weights {weights.shape} do not match teachers {list(teacher_names)}")
        table = pd.DataFrame(weights, columns=[f"w_{name}" for name in teacher_names])
    else:
        table = pd.read_csv(weights)
    missing = [name for name in teacher_names if f"w_{name}" not in table.columns]
    if missing:
        raise ValueError(f"no weights for teachers {missing} (columns: {list(table.columns)})")
    if table.empty:
        raise ValueError("no training steps to plot")
    window = smooth or max(1, len(table) // 50)
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    steps = np.arange(len(table))
    for k, name in enumerate(teacher_names):
        color = f"C{k}"
        raw = table[f"w_{name}"]
        ax.plot(steps, raw, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(steps, raw.rolling(window, min_periods=1).mean(), color=color, label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss weight (batch mean)")
    ax.set_title(title or "Teacher weights over training")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out_png)


def tsne_figure(
    features_by_variant: Mapping[str, np.ndarray],
    labels: np.ndarray,
    class_names: Sequence[str],
    out_png: str | os.PathLike,
    *,
    seed: int = 0,
    perplexity: float = 30.0,
    title: str = "",
) -> None:
    """t-SNE of each variant's (N, D) features side by side, points coloured by label (Figure 4).

    Every variant holds features of the same N clips in the same order as `labels`.
    """
    # Imported here: only this figure needs scikit-learn (and matplotlib, see _figure).
    from matplotlib import colormaps
    from sklearn.manifold import TSNE

    labels = np.asarray(labels)
    for variant, features in features_by_variant.items():
        if len(features) != len(labels):
            raise ValueError(f"{variant}: {len(features)} feature rows for {len(labels)} labels")
    if len(labels) < 5:
        raise ValueError(f"t-SNE needs at least 5 points, got {len(labels)}")
    # scikit-learn requires perplexity < N
    perplexity = min(perplexity, (len(labels) - 1) / 3)
    present = np.unique(labels)
    colors = colormaps["tab10" if len(present) <= 10 else "tab20"]
    fig = _figure(5 * len(features_by_variant) + 2, 5)
    axes = fig.subplots(1, len(features_by_variant), squeeze=False)[0]
    for ax, (variant, features) in zip(axes, features_by_variant.items(), strict=True):
        embedded = TSNE(
            n_components=2, perplexity=perplexity, init="pca", random_state=seed
        ).fit_transform(np.asarray(features, dtype=np.float32))
        for k, label in enumerate(present):
            points = embedded[labels == label]
            name = class_names[int(label)]
            ax.scatter(points[:, 0], points[:, 1], s=8, color=colors(k % colors.N), label=name)
        ax.set_title(variant)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", fontsize=8, markerscale=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 2 / (5 * len(features_by_variant) + 2), 1))
    _save(fig, out_png)


def similarity_figures(
    table: pd.DataFrame, highlight: Sequence[str], histogram_png, classes_png, *, title: str
) -> None:
    """TimeBalance's s per video: a histogram of s and of each teacher's score (the table's
    score_<teacher> columns), and each class's videos (points) and mean (bar), sorted, the
    classes in `highlight` in another colour."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    teachers = [c for c in table.columns if c.startswith("score_")]
    bins = np.linspace(min(-0.05, table[["s", *teachers]].min().min()), 1.0, 41)
    for k, column in enumerate(teachers):
        label = f"{column.removeprefix('score_')} alone"
        ax.hist(table[column], bins=bins, label=label, histtype="step", color=f"C{k}")
    ax.hist(table["s"], bins=bins, label="s (Eq. 6)", alpha=0.5, color=f"C{len(teachers)}")
    ax.set_xlabel("mean cosine between a video's clips")
    ax.set_ylabel("videos")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, histogram_png)

    order = table.groupby("label_name")["s"].mean().sort_values()
    fig = _figure(max(6, 0.5 * len(order) + 2), 4.5)
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)  # horizontal jitter of the points only
    for k, (name, mean) in enumerate(order.items()):
        color = "C3" if name in highlight else "C0"
        values = table.loc[table["label_name"] == name, "s"].to_numpy()
        ax.bar(k, mean, color=color, alpha=0.35)
        ax.scatter(k + rng.uniform(-0.25, 0.25, len(values)), values, s=4, color=color)
    ax.set_xticks(range(len(order)), order.index, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("s per video (bar: class mean)")
    ax.set_title(f"{title}; red: classes only motion tells apart" if highlight else title)
    fig.tight_layout()
    _save(fig, classes_png)


def part_maps_figure(
    frames: np.ndarray,
    teacher: np.ndarray,
    predicted: np.ndarray,
    class_names: Sequence[str],
    out_png: str | os.PathLike,
    *,
    title: str,
) -> None:
    """One column per clip: its middle frame (H, W, 3 uint8); the teacher's and the decoder's
    most likely part per position ((N, C, s, s) probabilities), one colour per part; and both
    maps' probability of a person (1 - P(class 0, background) in every SCHP label set)."""
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    colours = colormaps["tab20"].resampled(len(class_names))
    count = len(frames)
    fig = _figure(1.6 * count + 1.8, 8.4)
    axes = fig.subplots(5, count, squeeze=False)
    for k in range(count):
        axes[0, k].imshow(frames[k])
        for row, maps in ((1, teacher), (2, predicted)):
            axes[row, k].imshow(maps[k].argmax(0), cmap=colours, vmin=-0.5,
                                vmax=len(class_names) - 0.5, interpolation="nearest")  # fmt: skip
        for row, maps in ((3, teacher), (4, predicted)):
            axes[row, k].imshow(1 - maps[k, 0], cmap="gray", vmin=0, vmax=1,
                                interpolation="nearest")  # fmt: skip
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    labels = ("middle frame", "teacher parts", "decoder parts", "teacher P(person)",
              "decoder P(person)")  # fmt: skip
    for row, label in enumerate(labels):
        axes[row, 0].set_ylabel(label, fontsize=8)
    handles = [Patch(color=colours(i), label=name) for i, name in enumerate(class_names)]
    fig.legend(handles=handles, loc="center right", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(right=1 - 1.6 / (1.6 * count + 1.8), top=0.94)
    _save(fig, out_png)


@torch.no_grad()
def extract_features(
    model: torch.nn.Module, loader, *, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features (`model.features`) and labels of every clip of `loader`.

    Multi-view items (B, V, C, T, H, W) give each video the mean of its views' features.
    Returns ((N, feature_dim) float32, (N,) int64); the model is left in eval mode.
    """
    model.eval().to(device)
    features, labels = [], []
    with torch.inference_mode():
        for batch in loader:
            video = prepare_video(batch["video"].to(device))
            if video.dim() == 6:
                batch_size, views = video.shape[:2]
                pooled = model.features(video.flatten(0, 1)).view(batch_size, views, -1).mean(1)
            else:
                pooled = model.features(video)
            features.append(pooled.float().cpu())
            labels.append(torch.as_tensor(batch["label"]))
    return torch.cat(features).numpy(), torch.cat(labels).numpy().astype(np.int64)
