"""TimeBalance's stages (spec ../shared/specs/timebalance.md; losses: pipeline.methods.timebalance).

`pretrain_ssl_teacher` trains the temporally-invariant (f_I, L_I) or -distinctive (f_D, L_D1 +
L_D2) teacher with pipeline.train.fit on MultiClipDataset items of every train-split video, labels
withheld, and writes into run_dir:
  model.pt      the backbone (fit's {"model": state_dict, "meta"}): fine-tuning starts from it
  head.pt       the projection head g ({"head": state_dict, "meta"}): the similarity score (Eq. 5)
                is computed on g's outputs
  metrics.json  fit's metrics plus the teacher kind, the SSL videos and the per-epoch history
`similarity_table` computes the temporal similarity score s per video (Eq. 5-6) from two SSL
teachers, once, before any fine-tuning (Alg. 1 l.16). `StudentClipDataset` feeds the student
(pipeline.finetune.train_run with `student`): labeled and unlabeled clips with their video's s.
Where the paper is silent (which clips, crops and augmentation give s), ours: each video's n
local clips at the centre of their windows, centre-cropped, unaugmented, so s is a fixed property
of the video and its teachers.
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.data.augment import VideoAugment
from pipeline.data.clips import ClipDataset, prepare_video, select_rows
from pipeline.data.multiclip import MultiClipDataset
from pipeline.data.shards import read_manifest
from pipeline.errors import DataError
from pipeline.io import atomic_path, write_json_atomic
from pipeline.methods.timebalance import (
    DistinctiveSSL,
    InvariantSSL,
    SSLTeacher,
    similarity_score,
    temporal_score,
)
from pipeline.models import build_video_model
from pipeline.train import (
    TIMING_FIELDS,
    TrainSpec,
    fit,
    full_batch_loader,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)

SSL_KINDS = ("invariant", "distinctive", "tclr")  # tclr: the student's initialisation


def build_ssl_teacher(kind: str, model: dict, ssl: Mapping) -> SSLTeacher:
    """The SSL method of teacher `kind` on a fresh backbone (model: build_video_model's keywords
    plus `name`; ssl: the timebalance.ssl params)."""
    if kind not in SSL_KINDS:
        raise ValueError(f"teacher kind must be one of {SSL_KINDS}, got {kind!r}")
    network = build_video_model(num_classes=0, **model)
    common = {
        "num_clips": ssl["num_clips"],
        "tau": ssl["tau"],
        "head_hidden": ssl["head_hidden"],
        "embed_dim": ssl["embed_dim"],
        "loss_form": ssl["loss_form"],
    }
    if kind == "invariant":
        return InvariantSSL(network, **common, global_weight=ssl["invariant_global_weight"])
    return DistinctiveSSL(
        network,
        **common,
        local_weight=ssl["local_weight"],
        global_weight=ssl["global_local_weight"],
        instance_weight=1.0 if kind == "tclr" else 0.0,
    )


def _global_augmentations(kind: str, ssl: Mapping) -> int:
    """How many augmentations of the global clip a step of `kind` uses (0: none is read)."""
    weight = ssl["invariant_global_weight" if kind == "invariant" else "global_local_weight"]
    return ssl["global_augmentations"] if weight > 0 else 0


def ssl_dataset(
    shard_dir: Path, rows: np.ndarray, ssl: Mapping, *, kind: str, seed: int, train: bool
) -> MultiClipDataset:
    """MultiClipDataset for an SSL teacher: training views (ssl's augmentations, global clip
    where the loss needs it), or the fixed single view the similarity score uses."""
    return MultiClipDataset(
        shard_dir,
        rows=rows,
        num_clips=ssl["num_clips"],
        clip_frames=ssl["clip_frames"],
        stride=ssl["stride"],
        global_frames=ssl["global_frames"],
        augmentations=ssl["augmentations"] if train else 1,
        global_augmentations=_global_augmentations(kind, ssl) if train else 0,
        crop_size=ssl["crop"],
        train=train,
        seed=seed,
        flip=ssl["flip"],
        augment=VideoAugment(**ssl["augment"]) if train and ssl["augment"]["ops"] else None,
        label_mask=np.zeros(len(read_manifest(shard_dir)), dtype=bool),  # no labels, ever
    )


def pretrain_ssl_teacher(
    *,
    kind: str,
    shard_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    split: int,
    model: dict,
    ssl: Mapping,
    train: dict,
    seed: int,
    threads: int,
    params: dict,
) -> dict:
    """Pre-train SSL teacher `kind` on the unlabeled train videos; returns metrics.json's dict.

    train: TrainSpec's fields plus batch_size, workers. params (the stage's identity) and the
    other arguments key the run: a rerun resumes, anything else starts afresh."""
    shard_dir, run_dir = Path(shard_dir), Path(run_dir)
    train = dict(train)
    batch_size = train.pop("batch_size")
    workers = train.pop("workers")
    spec = TrainSpec(**train, seed=seed, threads=threads)
    rows = select_rows(read_manifest(shard_dir), f"split{split}", "train")
    dataset = ssl_dataset(shard_dir, rows, ssl, kind=kind, seed=seed, train=True)
    loader = full_batch_loader(
        dataset,
        batch_size=batch_size,
        seed=seed,
        num_workers=workers,
        device=spec.device,
        source=shard_dir,
    )
    seed_everything(seed)  # before building: initial weights depend on the seed alone
    method = build_ssl_teacher(kind, model, ssl)
    run_params = {
        "params": params,
        "kind": kind,
        "split": split,
        "model": model,
        "ssl": dict(ssl),
        "batch_size": batch_size,
    }
    metrics = fit(method, loader, run_dir=run_dir, params=run_params, spec=spec)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes, as in fit
        return metrics
    meta = {"kind": kind, "run_key": metrics.get("run_key"), "embed_dim": ssl["embed_dim"]}
    save_checkpoint({"head": method.head.state_dict(), "meta": meta}, run_dir / "head.pt")
    history = json.loads((run_dir / "history.json").read_text())
    metrics |= {
        "teacher": kind,
        "ssl_videos": len(dataset),
        "steps_per_epoch": len(loader),
        "history": [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in history],
    }
    write_json_atomic(run_dir / "metrics.json", metrics)
    return metrics


def load_ssl_teacher(run_dir: str | os.PathLike, kind: str, model: dict, ssl: Mapping):
    """A trained SSL teacher (backbone and head g) from its run folder, in eval mode."""
    run_dir = Path(run_dir)
    method = build_ssl_teacher(kind, model, ssl)
    for part, file in ((method.model, "model.pt"), (method.head, "head.pt")):
        path = run_dir / file
        state = load_checkpoint(path)
        try:
            part.load_state_dict(state["model" if file == "model.pt" else "head"])
        except (KeyError, RuntimeError) as err:
            raise DataError(
                f"{path}: not the {kind} SSL teacher these params build ({err}); "
                "run its tb_ssl stage again"
            ) from None
    return method.eval()


@torch.no_grad()
def teacher_scores(
    method: SSLTeacher, dataset: MultiClipDataset, batch_size: int, threads: int
) -> np.ndarray:
    """Eq. 5-6 for one teacher: the mean off-diagonal cosine of each video's n clip projections."""
    torch.set_num_threads(threads)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    scores = []
    for batch in loader:
        z = method.embed(prepare_video(batch["video"]))  # (B, 1, n, D)
        scores.append(similarity_score(z[:, 0]))
    return torch.cat(scores).numpy()


def similarity_table(
    *,
    shard_dir: str | os.PathLike,
    teachers: Mapping[str, tuple[str, str | os.PathLike, Mapping]],
    split: int,
    model: dict,
    clamp: bool,
    threads: int,
    batch_size: int = 32,
) -> pd.DataFrame:
    """One row per video of the manifest: video_id, label, label_name, split, score_<name> for
    each of the two SSL teachers (name: (kind, run folder, its timebalance.ssl params)) and s =
    their mean (Eq. 6: the paper's pair is f_I and f_D), clamped to [0, 1] when `clamp` (the
    paper does not clamp: s lies in [-1, 1])."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    rows = np.arange(len(manifest))
    table = manifest[["video_id", "label", "label_name", f"split{split}"]].rename(
        columns={f"split{split}": "split"}
    )
    for name, (kind, run, ssl) in teachers.items():
        teacher = load_ssl_teacher(run, kind, model, ssl)
        dataset = ssl_dataset(shard_dir, rows, ssl, kind=kind, seed=0, train=False)
        table[f"score_{name}"] = teacher_scores(teacher, dataset, batch_size, threads)
    first, second = (torch.tensor(table[f"score_{name}"].to_numpy()) for name in teachers)
    table["s"] = temporal_score(first, second, clamp).numpy()
    return table.reset_index(drop=True)


def motion_only_report(table: pd.DataFrame, motion_only: list[str]) -> dict:
    """Whether the classes only motion tells apart get lower s than the others (what the
    reweighting relies on): per-class mean s, both groups' means, Welch's t-test on videos."""
    from scipy.stats import ttest_ind

    per_class = table.groupby("label_name")["s"].agg(["mean", "std", "count"])
    present = [name for name in motion_only if name in per_class.index]
    report = {"per_class": per_class.round(4).reset_index().to_dict("records")}
    if not present:
        report["motion_only"] = "not applicable: none of these classes is in the dataset"
        return report
    inside = table["label_name"].isin(present)
    moving, others = table.loc[inside, "s"], table.loc[~inside, "s"]
    p = float(ttest_ind(moving, others, equal_var=False).pvalue)
    lower = moving.mean() < others.mean()
    verdict = ("yes" if lower else "no") if p < 0.05 else "within noise"
    report["motion_only"] = {
        "classes": present,
        "mean_s": float(moving.mean()),
        "others_mean_s": float(others.mean()),
        "difference": float(moving.mean() - others.mean()),
        "welch_p": p,
        "lower": verdict,
    }
    return report


def write_parquet(table: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path, suffix=".parquet") as tmp:
        table.to_parquet(tmp, index=False)


class StudentClipDataset(ClipDataset):
    """The semi-supervised student's training clips (spec (e)): every item carries its video's s
    under "score"; unlabeled videos have label -1.

    An epoch is the labeled videos and as many unlabeled ones, drawn afresh each epoch (from
    (seed, epoch)) out of the unlabeled pool, shuffled together: a batch holds about as many of
    each. The authors zip a labeled and an unlabeled loader of 16 videos each and end the epoch
    with the labeled one, which gives the same counts per epoch.
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        *,
        labeled_rows: np.ndarray,
        unlabeled_rows: np.ndarray,
        scores: np.ndarray,
        **clip_options,
    ):
        rows = np.concatenate([labeled_rows, unlabeled_rows]).astype(np.int64)
        manifest_rows = len(read_manifest(shard_dir))
        if len(scores) != manifest_rows:
            raise DataError(f"{len(scores)} scores s for the {manifest_rows} videos of {shard_dir}")
        label_mask = np.zeros(manifest_rows, dtype=bool)
        label_mask[labeled_rows] = True
        super().__init__(shard_dir, rows=rows, train=True, label_mask=label_mask, **clip_options)
        self.num_labeled = len(labeled_rows)
        self.num_unlabeled = min(len(unlabeled_rows), self.num_labeled)
        self.scores = np.asarray(scores, dtype=np.float32)

    def __len__(self) -> int:
        return self.num_labeled + self.num_unlabeled

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, position = key if isinstance(key, tuple) else (self.epoch, key)
        if position >= self.num_labeled:  # the epoch's draw from the unlabeled pool
            pool = len(self.rows) - self.num_labeled
            draw = np.random.default_rng([self.seed, epoch, 1 << 20]).permutation(pool)
            position = self.num_labeled + int(draw[position - self.num_labeled])
        item = super().__getitem__((epoch, position))
        item["score"] = float(self.scores[item["index"]])
        return item


def read_scores(path: str | os.PathLike, shard_dir: str | os.PathLike) -> np.ndarray:
    """s per manifest row from the similarity stage's table, checked against the shards."""
    table = pd.read_parquet(path)
    manifest = read_manifest(shard_dir)
    if list(table["video_id"]) != list(manifest["video_id"]):
        raise DataError(f"{path}: its videos are not those of {shard_dir}: run tb_similarity again")
    return table["s"].to_numpy(np.float32)
