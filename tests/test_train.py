"""The trainer: resume, fresh starts, determinism, safe loading, schedules, clipping, AMP, DDP.

Also the torchrun entry point of the DDP test: `python -m torch.distributed.run ... -m
tests.test_train OUT` runs `_ddp_main` in each process.
"""

import json
import logging
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from pipeline.errors import DataError
from pipeline.methods import Method, StepOutput
from pipeline.methods.supervised import Supervised
from pipeline.train import (
    TrainSpec,
    fit,
    load_checkpoint,
    lr_factor,
    make_loader,
    run_key,
    seed_everything,
)

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 3
PARAMS = {"method": "supervised", "model": "tiny"}


class TinyNet(nn.Module):
    """Conv3d + pooling + dropout + linear over (B, 3, T, H, W) clips."""

    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        pooled = F.adaptive_avg_pool3d(torch.relu(self.conv(x)), 1).flatten(1)
        return self.fc(self.drop(pooled))


class SimulatedKill(Exception):
    pass


class Clips(Dataset):
    """In-memory clips whose mean encodes the label. Training items get augmentation drawn from
    python's, numpy's and torch's global RNGs, so a resume that forgot one of them would differ.
    `kill_after` raises after that many items: a simulated kill mid-epoch."""

    def __init__(self, n: int = 24, augment: bool = True, seed: int = 0, kill_after=None):
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % CLASSES
        self.videos = torch.randn(n, 3, 4, 6, 6, generator=gen) + self.labels.view(-1, 1, 1, 1, 1)
        self.augment = augment
        self.kill_after = kill_after
        self.served = 0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        self.served += 1
        if self.kill_after is not None and self.served > self.kill_after:
            raise SimulatedKill(f"killed after {self.kill_after} items")
        video = self.videos[i]
        if self.augment:
            if random.random() < 0.5:
                video = video.flip(-1)
            video = video + float(np.random.uniform(0, 0.2)) * torch.randn_like(video)
        return {"video": video, "label": int(self.labels[i]), "index": i, "frames": torch.arange(4)}


def _method(seed: int) -> Supervised:
    seed_everything(seed)
    return Supervised(TinyNet(), label_smoothing=0.1)


def _run(
    run_dir: Path,
    spec: TrainSpec,
    *,
    params=PARAMS,
    train_set=None,
    workers=0,
    val=True,
    method=None,
):
    train_set = train_set or Clips()
    loader = make_loader(
        train_set, batch_size=8, shuffle=True, seed=spec.seed, num_workers=workers, device="cpu"
    )
    val_loader = None
    if val:
        val_loader = make_loader(
            Clips(12, augment=False, seed=1),
            batch_size=6,
            shuffle=False,
            seed=0,
            device="cpu",
            distributed=False,
        )
    return fit(
        method or _method(spec.seed),
        loader,
        val_loader=val_loader,
        run_dir=run_dir,
        params=params,
        spec=spec,
    )


def _weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "model.pt")["model"]


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


SPEC = TrainSpec(
    epochs=4,
    lr=0.05,
    schedule="plateau",
    plateau_patience=0,
    warmup_epochs=1,
    weight_decay=1e-4,
    seed=3,
    device="cpu",
)


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, caplog):
    full = tmp_path / "full"
    _run(full, SPEC)

    killed = tmp_path / "killed"
    with pytest.raises(SimulatedKill):
        _run(killed, SPEC, train_set=Clips(kill_after=24 * 2 + 10))  # inside epoch 2
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["epoch"] == 1
    assert len(json.loads((killed / "history.json").read_text())) == 2
    assert not (killed / "metrics.json").exists() and not (killed / "model.pt").exists()

    # The rerun's method starts from other weights and RNG states: all of it must come back.
    seed_everything(12345)
    with caplog.at_level(logging.INFO, logger="pipeline.train"):
        _run(killed, SPEC)
    assert "resuming after epoch 1" in caplog.text
    assert (killed / "metrics.json").read_bytes() == (full / "metrics.json").read_bytes()
    _assert_same_weights(_weights(killed), _weights(full))
    history = json.loads((killed / "history.json").read_text())
    assert [r["epoch"] for r in history] == [0, 1, 2, 3]
    dvclive_loss = (killed / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").read_text()
    assert len(dvclive_loss.strip().splitlines()) == 1 + 4  # header + one row per epoch

    # A finished run keeps no checkpoints: run again (a forced rerun, outputs deleted by a tool),
    # it trains afresh, never "resuming" into its old outputs, and gets the same result.
    assert not (killed / "checkpoints").exists()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.train"):
        again = _run(killed, SPEC)
    assert "resuming" not in caplog.text
    assert again == json.loads((full / "metrics.json").read_text())


def test_other_params_start_fresh_and_clear_checkpoints(tmp_path, caplog):
    run_dir = tmp_path / "run"
    spec_a = TrainSpec(epochs=2, lr=0.05, seed=0, device="cpu")
    with pytest.raises(SimulatedKill):  # leaves checkpoints of spec_a after epoch 0
        _run(run_dir, spec_a, train_set=Clips(kill_after=24 + 10), val=False)
    old_key = json.loads((run_dir / "checkpoints" / "key.json").read_text())["key"]

    spec_b = TrainSpec(epochs=3, lr=0.02, seed=0, device="cpu")
    params_b = {**PARAMS, "note": "other"}
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        metrics = _run(run_dir, spec_b, params=params_b, val=False)
    assert "starting fresh" in caplog.text
    assert metrics["run_key"] == run_key(params_b, spec_b) != old_key
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["lr"] for r in history] == [0.02] * 3  # no epoch of the old run survived

    clean = tmp_path / "clean"
    _run(clean, spec_b, params=params_b, val=False)
    assert (run_dir / "metrics.json").read_bytes() == (clean / "metrics.json").read_bytes()
    _assert_same_weights(_weights(run_dir), _weights(clean))


def test_run_key_follows_params_and_result_fields_only():
    spec = TrainSpec(epochs=2, lr=0.1)
    assert run_key(PARAMS, spec) == run_key(dict(reversed(PARAMS.items())), spec)
    assert run_key(PARAMS, spec) == run_key(PARAMS, TrainSpec(epochs=2, lr=0.1, threads=2))
    assert run_key(PARAMS, spec) != run_key(PARAMS, TrainSpec(epochs=2, lr=0.1, seed=1))
    assert run_key(PARAMS, spec) != run_key({**PARAMS, "model": "other"}, spec)


def test_same_seed_gives_identical_metrics_file(tmp_path):
    spec = TrainSpec(epochs=2, lr=0.05, seed=7, device="cpu", grad_clip=1.0)
    _run(tmp_path / "a", spec, workers=2)
    _run(tmp_path / "b", spec, workers=2)
    a = (tmp_path / "a" / "metrics.json").read_bytes()
    assert a == (tmp_path / "b" / "metrics.json").read_bytes()
    metrics = json.loads(a)
    assert (metrics["batch_size"], metrics["world_size"], metrics["seed"]) == (8, 1, 7)
    assert (metrics["device"], metrics["threads"]) == ("cpu", 1)
    assert 0 <= metrics["val"]["clip_top1"] <= 1 and len(metrics["val"]["clip_per_class_ap"]) == 3
    _run(tmp_path / "c", TrainSpec(epochs=2, lr=0.05, seed=8, device="cpu", grad_clip=1.0))
    assert (tmp_path / "c" / "metrics.json").read_bytes() != a


class Payload:
    """Unpickling this runs code: it creates the file named by `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_with_code_payload_is_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"method": {"w": torch.zeros(2)}, "extra": Payload(marker)}, evil)
    with pytest.raises(DataError, match="evil.pt: refused to load"):
        load_checkpoint(evil)
    assert not marker.exists()

    # As a run's last.pt with the right key, fit refuses it the same way.
    spec = TrainSpec(epochs=2, lr=0.05, device="cpu")
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "key.json").write_text(json.dumps({"key": run_key(PARAMS, spec)}))
    torch.save(
        {"format": 1, "key": run_key(PARAMS, spec), "extra": Payload(marker)}, ckpt_dir / "last.pt"
    )
    with pytest.raises(DataError, match="last.pt: refused to load"):
        _run(tmp_path / "run", spec, val=False)
    assert not marker.exists()


def test_lr_factor_moves_every_step_with_warmup():
    def factors(epochs, steps=2, **kw):
        return [
            lr_factor(step, steps_per_epoch=steps, epochs=epochs, **kw)
            for step in range(epochs * steps)
        ]

    # step: warm-up over 2 epochs of 2 steps, then x0.1 at epochs 3 and 5
    assert factors(6, schedule="step", milestones=(3, 5), gamma=0.1, warmup_epochs=2) == (
        pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01])
    )
    # one warm-up epoch is not a no-op: it ramps over that epoch's steps
    cosine = factors(3, steps=4, schedule="cosine", warmup_epochs=1)
    assert cosine[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert cosine[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    assert factors(3, steps=1, schedule="constant", warmup_epochs=2) == [0.5, 1.0, 1.0]
    assert factors(2, steps=1, schedule="plateau", warmup_epochs=1) == [1.0, None]


def test_fit_applies_step_schedule_with_warmup(tmp_path):
    spec = TrainSpec(
        epochs=5,
        lr=0.01,
        optimizer="adam",
        schedule="step",
        milestones=(3,),
        gamma=0.5,
        warmup_epochs=2,
        device="cpu",
    )
    _run(tmp_path / "run", spec, train_set=Clips(8), val=False)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["lr"] for r in history] == pytest.approx([0.005, 0.01, 0.01, 0.005, 0.005])


class ConstantLoss(Method):
    """A loss that never improves, so "plateau" must cut the lr after `patience` epochs."""

    def __init__(self):
        super().__init__()
        self.model = nn.Linear(1, 1)

    def training_step(self, batch):
        return StepOutput(loss=(self.model.weight * 0).sum() + 1.0, logs={"const": 1.0})


def test_plateau_cuts_lr_after_patience_on_training_loss(tmp_path):
    spec = TrainSpec(
        epochs=7,
        lr=1.0,
        schedule="plateau",
        plateau_patience=1,
        plateau_factor=0.5,
        warmup_epochs=2,
        device="cpu",
    )
    loader = make_loader(Clips(4), batch_size=4, shuffle=False, seed=0, device="cpu")
    fit(ConstantLoss(), loader, run_dir=tmp_path / "run", params={}, spec=spec)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    # warm-up 0.5, 1; then best at epoch 2, no improvement at 3 and 4 -> halved from epoch 5.
    assert [r["lr"] for r in history] == [0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5]
    assert history[0]["train_const"] == 1.0 and "train_top1" not in history[0]


class HugeLoss(Method):
    def __init__(self):
        super().__init__()
        self.model = nn.Linear(3 * 4 * 6 * 6, 2)

    def training_step(self, batch):
        return StepOutput(loss=1000.0 * self.model(batch["video"].flatten(1)).square().mean())


def test_grad_clip_bounds_the_update(tmp_path):
    seed_everything(0)
    method = HugeLoss()
    before = [p.detach().clone() for p in method.parameters()]
    spec = TrainSpec(epochs=1, lr=1.0, momentum=0.0, grad_clip=0.5, device="cpu")
    loader = make_loader(Clips(8), batch_size=8, shuffle=False, seed=0, device="cpu")
    fit(method, loader, run_dir=tmp_path / "run", params={}, spec=spec)
    step = torch.cat(
        [(p.detach() - b).flatten() for p, b in zip(method.parameters(), before, strict=True)]
    )
    assert step.norm().item() == pytest.approx(0.5, rel=1e-4)  # lr * max_norm
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history[0]["train_grad_norm"] > 10  # the unclipped norm is logged


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cpu_trains_and_checkpoints_scaler(tmp_path, amp):
    spec = TrainSpec(epochs=2, lr=0.05, amp=amp, channels_last=True, device="cpu")
    with pytest.raises(SimulatedKill):  # killed in epoch 2: epoch 1's checkpoint stays
        _run(tmp_path / "run", spec, train_set=Clips(8, kill_after=12))
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (ckpt["scaler"] is not None) == (amp == "fp16")
    metrics = _run(tmp_path / "run", spec, train_set=Clips(8))
    assert math.isfinite(metrics["last_epoch"]["train_loss"])
    assert metrics["amp"] == amp and metrics["channels_last"] is True


def test_supervised_ignores_unlabeled_clips():
    seed_everything(0)
    method = Supervised(TinyNet()).eval()
    video = torch.randn(2, 3, 4, 6, 6)
    out = method({"video": video, "label": torch.tensor([-1, 2])})
    assert out.loss.item() == pytest.approx(
        F.cross_entropy(out.logits[1:], torch.tensor([2])).item()
    )


def test_distributed_env_requires_a_sharding_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    loader = torch.utils.data.DataLoader(Clips(4), batch_size=2)
    spec = TrainSpec(epochs=1, lr=0.1)
    with pytest.raises(ValueError, match="does not shard by rank"):
        fit(ConstantLoss(), loader, run_dir=tmp_path, params={}, spec=spec)
    sharded = make_loader(Clips(4), batch_size=2, shuffle=True, seed=0, device="cpu")
    with pytest.raises(ValueError, match="val loader shards by rank"):
        fit(ConstantLoss(), sharded, val_loader=sharded, run_dir=tmp_path, params={}, spec=spec)
    assert not any(tmp_path.iterdir())  # refused before writing anything


def _ddp_main(out: Path) -> None:
    """One torchrun process: train on this rank's share, then save its weights for the test."""
    spec = TrainSpec(epochs=2, lr=0.05, seed=5, device="cpu")
    method = _method(spec.seed)
    _run(out / "run", spec, train_set=Clips(16), method=method)
    torch.save(method.model.state_dict(), out / f"rank{os.environ['RANK']}.pt")


def test_ddp_two_processes_on_gloo(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*cmd, "-m", "tests.test_train", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert (metrics["batch_size"], metrics["global_batch_size"]) == (4, 8)  # 8 split over 2
    assert metrics["val"]["num_videos"] == 12  # every rank validates on the whole set
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    _assert_same_weights(rank0, rank1)  # gradients were averaged across ranks
    _assert_same_weights(rank0, _weights(tmp_path / "run"))
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history) == 2 and all(math.isfinite(r["train_loss"]) for r in history)


if __name__ == "__main__":
    _ddp_main(Path(sys.argv[1]))


def test_saved_checkpoints_are_byte_identical_for_identical_content(tmp_path):
    """Their sha256 keys downstream caches: a rewrite of the same weights must not change it."""
    from pipeline.io import file_sha256
    from pipeline.train import save_checkpoint

    state = {"model": {"w": torch.arange(6.0)}, "epoch": 3}
    save_checkpoint(state, tmp_path / "a.pt")
    save_checkpoint(state, tmp_path / "b.pt")
    assert file_sha256(tmp_path / "a.pt") == file_sha256(tmp_path / "b.pt")
