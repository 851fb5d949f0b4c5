"""Oracle and noise-teacher checks of each distillation method (tests/oracle.py says why).

Each method is trained on the grating world guided by an oracle teacher (its output carries the
label), by a noise teacher, and, for DTG-Net, by deliberately broken versions of its loss; a
linear probe of the student's features separates them. The thresholds are set so that every
broken version fails the oracle's bar (oracle.py has the measured margins). One defect the bar
cannot catch: the anchor's own guidance also among its negatives still transfers the label
(measured 71.7% against 51.7% for the correct loss, same seed); test_dtg.py's masking test
covers it instead.
"""

import types

import pytest
import torch.nn.functional as F

from pipeline.data.guided import GuidedClipDataset
from pipeline.methods import dtg
from pipeline.models import build_video_model
from pipeline.train import TrainSpec, fit, make_loader, seed_everything
from tests import oracle

EPOCHS = 60


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return oracle.make_oracle_shards(tmp_path_factory.mktemp("oracle") / "shards")


def student():
    return build_video_model("r3d_18", num_classes=0, width=8, layers=[1, 1, 1, 1],
                             stem_stride=2, stem_pool=False)  # fmt: skip


def random_probe(shards, seed: int = 0) -> float:
    seed_everything(seed)
    return oracle.student_probe(student(), shards)


def dtg_probe(shards, cache, run_dir, seed: int = 0) -> float:
    """DTG-Net pretraining of a tiny student guided by `cache`, then its linear probe."""
    train, _ = oracle.split_rows(shards)
    dataset = GuidedClipDataset(shards, rows=train, caches={"t": cache}, segments=4,
                                crop_size=oracle.SIZE, seed=seed, flip=False)  # fmt: skip
    loader = make_loader(dataset, batch_size=16, shuffle=True, seed=seed, drop_last=True)
    seed_everything(seed)
    network = student()
    method = dtg.DTG(network, teachers={"t": cache.feature_dim}, queue_size=32, proj_hidden=0,
                     tau=0.5, queue_seed=seed)  # fmt: skip
    spec = TrainSpec(epochs=EPOCHS, lr=0.1, weight_decay=5e-4, schedule="cosine",
                     warmup_epochs=1, seed=seed, device="cpu", channels_last=True)  # fmt: skip
    fit(method, loader, run_dir=run_dir, params={}, spec=spec)
    return oracle.student_probe(network, shards)


def swapped_positives(real):
    """Each anchor's positive is the next video's guidance."""
    return lambda anchor, positive, queue, tau, same=None: real(
        anchor, positive.roll(1, dims=0), queue, tau, same
    )


BROKEN = {
    "swapped positives": lambda mp: mp.setattr(
        dtg, "info_nce_logits", swapped_positives(dtg.info_nce_logits)
    ),
    "no normalisation": lambda mp: mp.setattr(
        dtg, "F", types.SimpleNamespace(normalize=lambda x, dim: x, cross_entropy=F.cross_entropy)
    ),
}


@pytest.fixture(scope="module")
def dtg_baseline(shards):
    return random_probe(shards)


def test_dtg_oracle_teacher_lifts_the_probe_far_above_random_init(shards, dtg_baseline, tmp_path):
    probe = dtg_probe(shards, oracle.oracle_cache(shards), tmp_path)
    assert probe >= dtg_baseline + oracle.ORACLE_LIFT, (probe, dtg_baseline)


def test_dtg_noise_teacher_gives_no_lift(shards, dtg_baseline, tmp_path):
    probe = dtg_probe(shards, oracle.noise_cache(shards), tmp_path)
    assert probe < dtg_baseline + oracle.NOISE_BAND, (probe, dtg_baseline)


@pytest.mark.parametrize("defect", list(BROKEN))
def test_a_broken_dtg_loss_fails_the_oracle_bar(
    shards, dtg_baseline, tmp_path, monkeypatch, defect
):
    BROKEN[defect](monkeypatch)
    probe = dtg_probe(shards, oracle.oracle_cache(shards), tmp_path)
    assert probe < dtg_baseline + oracle.ORACLE_LIFT, (defect, probe, dtg_baseline)
