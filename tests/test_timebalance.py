"""TimeBalance: the teachers' SSL losses, the similarity score and the student's loss.

Hand computations write the formulas out with plain math / torch ops, never the module's helpers.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.clips import prepare_video
from pipeline.methods.timebalance import (
    DistinctiveSSL,
    InvariantSSL,
    TimeBalanceStudent,
    cross_video_contrast,
    distillation_distance,
    global_local_contrast,
    projection_head,
    similarity_score,
    teacher_mixture,
    temporal_score,
    temporal_slices,
    within_video_contrast,
)
from pipeline.models import TINY_VIDEO_SETTINGS, build_video_model

TAU = 0.5
NUM_CLASSES = 4


def unit_vectors(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def dot(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v, strict=True))


def h(u: list[float], v: list[float], tau: float = TAU) -> float:
    """The paper's h for unit vectors: exp(cos / tau)."""
    return math.exp(dot(u, v) / tau)


# ---------------------------------------------------------------- head and L_I


def test_projection_head_is_the_papers_mlp_with_a_chosen_hidden_width():
    head = projection_head(32, 512, 128)
    first, bn1, relu, second, bn2 = head
    assert (first.in_features, first.out_features, first.bias is not None) == (32, 512, True)
    assert isinstance(bn1, nn.BatchNorm1d) and bn1.num_features == 512
    assert isinstance(relu, nn.ReLU)
    assert (second.in_features, second.out_features, second.bias) == (512, 128, None)
    assert isinstance(bn2, nn.BatchNorm1d) and bn2.num_features == 128
    assert projection_head(32, 128, 128)[0].out_features == 128  # the code's width


def test_invariant_loss_paper_form_is_eq1_by_hand():
    # B = 3 videos, K = 3 clips: anchor z_t1^i, positive z_t2^i, negatives z_t1^j, z_t2^j (j != i)
    z = unit_vectors(3, 3, 4)
    rows = z.tolist()
    expected = []
    for i in range(3):
        terms = []
        for t1 in range(3):
            for t2 in range(3):
                if t1 == t2:
                    continue
                anchor = rows[i][t1]
                negatives = sum(
                    h(anchor, rows[j][t1]) + h(anchor, rows[j][t2]) for j in range(3) if j != i
                )
                terms.append(-math.log(h(anchor, rows[i][t2]) / negatives))
        expected.append(sum(terms) / len(terms))
    loss = cross_video_contrast(z, TAU, positive_in_denominator=False)
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)


def simclr_nt_xent(x: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """The authors' NTXentLoss (SimCLR, dot similarity): 2B anchors, positive in the
    denominator, mean over anchors."""
    batch = len(x)
    representations = torch.cat([y, x])
    similarity = representations @ representations.T / tau
    loss = 0.0
    for anchor in range(2 * batch):
        partner = (anchor + batch) % (2 * batch)
        others = [k for k in range(2 * batch) if k != anchor]
        denominator = sum(math.exp(similarity[anchor, k].item()) for k in others)
        loss += -math.log(math.exp(similarity[anchor, partner].item()) / denominator)
    return loss / (2 * batch)


def test_invariant_loss_ntxent_form_is_the_codes_pairwise_nt_xent():
    z = unit_vectors(4, 3, 5, seed=1)
    pairs = [(c1, c2) for c1 in range(3) for c2 in range(3) if c1 != c2]
    expected = sum(simclr_nt_xent(z[:, c1], z[:, c2], TAU) for c1, c2 in pairs) / len(pairs)
    loss = cross_video_contrast(z, TAU, positive_in_denominator=True)
    assert loss.mean().item() == pytest.approx(expected, rel=1e-5)


def test_invariant_loss_needs_other_videos():
    with pytest.raises(ValueError, match="batch of >= 2"):
        cross_video_contrast(unit_vectors(1, 4, 3), TAU, positive_in_denominator=False)


# ---------------------------------------------------------------- L_D1 and L_D2


@pytest.mark.parametrize("positive_in_denominator", [False, True])
def test_local_local_loss_is_eq3_by_hand(positive_in_denominator):
    # z[:, a, t]: augmentation a of clip t; every clip is an anchor (Eq. 3, symmetrised)
    z = unit_vectors(2, 2, 3, 4, seed=2)
    rows = z.tolist()
    expected = []
    for i in range(2):
        terms = []
        for a in range(2):
            for t in range(3):
                anchor, positive = rows[i][a][t], rows[i][1 - a][t]
                denominator = sum(
                    h(anchor, rows[i][0][t2]) + h(anchor, rows[i][1][t2])
                    for t2 in range(3)
                    if t2 != t
                )
                if positive_in_denominator:
                    denominator += h(anchor, positive)
                terms.append(-math.log(h(anchor, positive) / denominator))
        expected.append(sum(terms) / len(terms))
    loss = within_video_contrast(z, TAU, positive_in_denominator)
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)


def test_local_local_ntxent_form_is_the_codes_per_video_nt_xent():
    z = unit_vectors(3, 2, 4, 5, seed=3)
    expected = [simclr_nt_xent(z[i, 0], z[i, 1], TAU) for i in range(3)]
    assert within_video_contrast(z, TAU, True).tolist() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("positive_in_denominator", [False, True])
def test_local_local_negatives_come_only_from_the_same_video(positive_in_denominator):
    z = unit_vectors(3, 2, 4, 5, seed=4)
    changed = z.clone()
    changed[1:] = unit_vectors(2, 2, 4, 5, seed=5)
    before = within_video_contrast(z, TAU, positive_in_denominator)
    after = within_video_contrast(changed, TAU, positive_in_denominator)
    assert after[0].item() == pytest.approx(before[0].item(), rel=1e-6)
    assert not torch.allclose(after[1:], before[1:])
    # L_I, by contrast, takes its negatives from the other videos
    flat, flat_changed = z.flatten(1, 2), changed.flatten(1, 2)
    assert (
        cross_video_contrast(flat, TAU, False)[0]
        != cross_video_contrast(flat_changed, TAU, False)[0]
    )


def test_global_local_loss_on_aligned_one_hot_embeddings():
    # l_t = d_t = e_t: S = I / tau, every row and column has its target on the diagonal
    n = 3
    eye = torch.eye(n).expand(2, n, n)
    per_row = -math.log(math.exp(1 / TAU) / (math.exp(1 / TAU) + (n - 1)))
    assert global_local_contrast(eye, eye, TAU).tolist() == pytest.approx([per_row] * 2)
    # misaligned (d_u = e_{u+1}): the targets score 0 while one wrong entry scores 1 / tau
    shifted = eye.roll(1, dims=1)
    misaligned = -math.log(1 / (math.exp(1 / TAU) + (n - 1)))
    assert global_local_contrast(eye, shifted, TAU).tolist() == pytest.approx([misaligned] * 2)


def test_global_local_loss_by_hand_in_both_directions():
    slices, local = unit_vectors(2, 3, 4, seed=6), unit_vectors(2, 3, 4, seed=7)
    expected = []
    for i in range(2):
        s = [[dot(l_t, d_u) / TAU for d_u in local[i].tolist()] for l_t in slices[i].tolist()]
        rows = [-s[t][t] + math.log(sum(math.exp(v) for v in s[t])) for t in range(3)]
        columns = [-s[u][u] + math.log(sum(math.exp(s[t][u]) for t in range(3))) for u in range(3)]
        expected.append((sum(rows) + sum(columns)) / 6)
    assert global_local_contrast(slices, local, TAU).tolist() == pytest.approx(expected, rel=1e-5)


def test_temporal_slices_average_equal_time_spans():
    feature_map = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float32).view(2, 3, 4, 2, 2)
    slices = temporal_slices(feature_map, 2)
    assert slices.shape == (2, 2, 3)
    expected = feature_map[:, :, 2:4].mean(dim=(2, 3, 4))  # slice 1: time steps 2 and 3
    assert torch.allclose(slices[:, 1], expected)
    with pytest.raises(ValueError, match="cannot share"):
        temporal_slices(feature_map, 3)


# ---------------------------------------------------------------- similarity score


def test_similarity_score_is_one_for_identical_and_zero_for_orthogonal_clips():
    same = unit_vectors(1, 1, 6).expand(2, 4, 6) * torch.tensor([1.0, 3.0])[:, None, None]
    assert similarity_score(same).tolist() == pytest.approx([1.0, 1.0])
    orthogonal = torch.eye(4).unsqueeze(0) * 2.5
    assert similarity_score(orthogonal).tolist() == pytest.approx([0.0], abs=1e-7)


def test_similarity_score_is_the_mean_off_diagonal_cosine_by_hand():
    z = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(8))
    expected = []
    for clips in z.tolist():
        cosines = [
            dot(u, v) / math.sqrt(dot(u, u) * dot(v, v))
            for a, u in enumerate(clips)
            for b, v in enumerate(clips)
            if a != b
        ]
        expected.append(sum(cosines) / len(cosines))
    assert similarity_score(z).tolist() == pytest.approx(expected, rel=1e-5)


def test_temporal_score_averages_the_teachers_and_clamps_on_request():
    orthogonal = torch.eye(2).unsqueeze(0)  # score 0
    opposite = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # score -1
    identical = torch.ones(1, 2, 2)  # score 1
    orthogonal, opposite, identical = map(similarity_score, (orthogonal, opposite, identical))
    assert temporal_score(identical, orthogonal).item() == pytest.approx(0.5)
    assert temporal_score(orthogonal, opposite).item() == pytest.approx(-0.5)
    assert temporal_score(orthogonal, opposite, clamp=True).item() == 0.0
    assert temporal_score(identical, identical, clamp=True).item() == pytest.approx(1.0)


# ---------------------------------------------------------------- p_T and D


def test_teacher_mixture_is_eq7():
    p_inv = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    p_dist = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    mixed = teacher_mixture(p_inv, p_dist, torch.tensor([0.25, 1.0]))
    by_hand = [0.25 * a + 0.75 * b for a, b in zip([0.7, 0.2, 0.1], [0.1, 0.6, 0.3], strict=True)]
    assert mixed[0].tolist() == pytest.approx(by_hand)
    assert mixed[1].tolist() == pytest.approx(p_inv[1].tolist())
    assert torch.allclose(teacher_mixture(p_inv, p_dist, 0.5), (p_inv + p_dist) / 2)


def hand_distance(p: list[float], logits: list[float], distance: str) -> list[float]:
    """Per-class D(p_T, p_S) terms, p_S = softmax(logits)."""
    total = sum(math.exp(v) for v in logits)
    q = [math.exp(v) / total for v in logits]
    if distance == "l2":
        return [(a - b) ** 2 for a, b in zip(p, q, strict=True)]
    if distance == "kl":
        return [a * math.log(a / b) if a > 0 else 0.0 for a, b in zip(p, q, strict=True)]
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    return [
        ((a * math.log(a / c) if a > 0 else 0.0) + b * math.log(b / c)) / 2
        for a, b, c in zip(p, q, m, strict=True)
    ]


@pytest.mark.parametrize("distance", ["l2", "kl", "js"])
def test_distillation_distances_by_hand(distance):
    p_teacher = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]])
    logits = torch.tensor([[1.0, -0.5, 0.0, 2.0], [0.3, 0.1, -1.0, 0.5]])
    terms = [
        hand_distance(p, s, distance)
        for p, s in zip(p_teacher.tolist(), logits.tolist(), strict=True)
    ]
    summed = distillation_distance(p_teacher, logits, distance, "sum")
    averaged = distillation_distance(p_teacher, logits, distance, "mean")
    assert summed.tolist() == pytest.approx([sum(t) for t in terms], rel=1e-5)
    assert averaged.tolist() == pytest.approx([sum(t) / 4 for t in terms], rel=1e-5)
    same = distillation_distance(F.softmax(logits, dim=1), logits, distance, "sum")
    assert same.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


# ---------------------------------------------------------------- the student


class TinyClassifier(nn.Module):
    """A stand-in for a fine-tuned video classifier: pooled pixels -> Linear `fc` -> logits."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(3, NUM_CLASSES)
        self.dropout = nn.Dropout(0.5)  # shows whether it runs in train mode

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(video.mean(dim=(2, 3, 4))))


def student_batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "video": torch.randn((6, 3, 2, 4, 4), generator=generator),
        "label": torch.tensor([2, -1, 0, -1, -1, 3]),
        "score": torch.tensor([0.9, 0.1, 0.5, 0.3, 1.0, 0.0]),
    }


def make_student(**kwargs) -> TimeBalanceStudent:
    kwargs.setdefault("invariant_teacher", TinyClassifier(1))
    kwargs.setdefault("distinctive_teacher", TinyClassifier(2))
    return TimeBalanceStudent(TinyClassifier(0), **kwargs)


@pytest.mark.parametrize("distance", ["l2", "kl", "js"])
def test_student_loss_by_hand(distance):
    method = make_student(distance=distance, omega_labeled=3.0, omega_unlabeled=7.0)
    method.train()
    method.model.eval()  # no dropout in the student either: the hand computation reruns it
    batch = student_batch()
    out = method(batch)
    with torch.no_grad():
        logits = method.model(batch["video"])
        p_inv = F.softmax(method.invariant_teacher(batch["video"]), dim=1)
        p_dist = F.softmax(method.distinctive_teacher(batch["video"]), dim=1)
    expected_ce, expected_l, expected_u = [], [], []
    for i, label in enumerate(batch["label"].tolist()):
        s = batch["score"][i].item()
        p_t = [
            s * a + (1 - s) * b for a, b in zip(p_inv[i].tolist(), p_dist[i].tolist(), strict=True)
        ]
        d = sum(hand_distance(p_t, logits[i].tolist(), distance)) / NUM_CLASSES
        if label >= 0:
            row = logits[i].tolist()
            expected_ce.append(-row[label] + math.log(sum(math.exp(v) for v in row)))
            expected_l.append(d)
        else:
            expected_u.append(d)
    ce = sum(expected_ce) / len(expected_ce)
    labeled = sum(expected_l) / len(expected_l)
    unlabeled = sum(expected_u) / len(expected_u)
    assert out.loss.item() == pytest.approx(ce + 3.0 * labeled + 7.0 * unlabeled, rel=1e-5)
    assert out.logs["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out.logits.shape == (6, NUM_CLASSES)


def test_student_cross_entropy_ignores_unlabeled_clips():
    method = make_student(teachers="none", reweight=False).eval()
    batch = student_batch()
    with torch.no_grad():
        loss = method.training_step(batch).loss
        logits = method.model(batch["video"])
    keep = batch["label"] >= 0
    assert loss.item() == pytest.approx(
        F.cross_entropy(logits[keep], batch["label"][keep]).item(), rel=1e-6
    )
    unlabeled = ~keep
    batch["video"][unlabeled] = torch.randn_like(batch["video"][unlabeled])
    with torch.no_grad():
        assert method.training_step(batch).loss.item() == pytest.approx(loss.item(), rel=1e-6)


def test_student_variants_mix_the_teachers_as_tables_2_and_3():
    batch = student_batch()

    def loss(score=None, **kwargs) -> float:
        method = make_student(**kwargs).eval()
        step_batch = dict(batch, score=batch["score"] if score is None else score)
        with torch.no_grad():
            return method.training_step(step_batch).loss.item()

    ones, zeros = torch.ones(6), torch.zeros(6)
    invariant = loss(teachers="invariant", reweight=False)
    distinctive = loss(teachers="distinctive", reweight=False)
    assert loss(score=ones) == pytest.approx(invariant, rel=1e-6)
    assert loss(score=zeros) == pytest.approx(distinctive, rel=1e-6)
    assert loss(reweight=False) == pytest.approx(loss(score=torch.full((6,), 0.5)), rel=1e-6)
    assert loss() != pytest.approx(loss(reweight=False))
    assert loss(teachers="none", reweight=False) < min(invariant, distinctive)


def test_student_teachers_are_frozen_and_outside_the_optimiser_and_model_pt():
    method = make_student()
    teachers = [method.invariant_teacher, method.distinctive_teacher]
    teacher_params = {id(p) for teacher in teachers for p in teacher.parameters()}
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert teacher_params.isdisjoint(id(p) for p in trainable)
    assert teacher_params.isdisjoint(id(p) for p in method.model.parameters())
    assert {id(p) for p in method.model.parameters()} == {id(p) for p in trainable}
    before = [teacher.state_dict() for teacher in teachers]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    method.train()
    assert method.model.training and not any(teacher.training for teacher in teachers)
    for step in range(3):
        optimizer.zero_grad()
        out = method(student_batch(step))
        out.loss.backward()
        assert all(p.grad is None for teacher in teachers for p in teacher.parameters())
        optimizer.step()
    for teacher, state in zip(teachers, before, strict=True):
        for name, value in teacher.state_dict().items():
            assert torch.equal(value, state[name])


def test_student_options_are_checked():
    with pytest.raises(ValueError, match="reweight"):
        make_student(teachers="invariant")
    with pytest.raises(ValueError, match="needs distinctive_teacher"):
        make_student(distinctive_teacher=None)
    with pytest.raises(ValueError, match="distance"):
        make_student(distance="cosine")
    with pytest.raises(ValueError, match="classifier"):
        TimeBalanceStudent(nn.Identity(), teachers="none", reweight=False)
    unused = make_student(teachers="invariant", reweight=False)
    assert unused.distinctive_teacher is None  # not kept, not checkpointed
    assert not any(key.startswith("distinctive") for key in unused.state_dict())
    batch = student_batch()
    del batch["score"]
    with pytest.raises(KeyError, match="score"):
        make_student().training_step(batch)


# ---------------------------------------------------------------- the SSL teachers


def tiny_backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_video_model("r3d_18", num_classes=0, **TINY_VIDEO_SETTINGS["r3d_18"])


def ssl_batch(num_clips: int, global_frames: int = 16, seed: int = 0) -> dict:
    # tiny R3D-18 divides time by 8: a 16-frame global clip gives 2 slices
    generator = torch.Generator().manual_seed(seed)
    return {
        "video": torch.randn((4, 2, num_clips, 3, 8, 32, 32), generator=generator),
        "global": torch.randn((4, 2, 3, global_frames, 32, 32), generator=generator),
    }


def adam_losses(method, batch: dict, steps: int) -> list[float]:
    optimizer = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    method.train()
    losses = []
    for _ in range(steps):
        loss = method(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "method",
    [
        lambda: InvariantSSL(tiny_backbone(), num_clips=2, head_hidden=32),
        lambda: InvariantSSL(
            tiny_backbone(), num_clips=2, head_hidden=32, loss_form="ntxent", global_weight=1.0
        ),
        lambda: DistinctiveSSL(tiny_backbone(), num_clips=2, head_hidden=32),
        lambda: DistinctiveSSL(
            tiny_backbone(), num_clips=2, head_hidden=32, loss_form="ntxent", global_weight=0.0
        ),
    ],
    ids=["invariant", "invariant-ntxent-global", "distinctive", "distinctive-local-only"],
)
def test_a_few_steps_on_a_fixed_batch_reduce_each_ssl_loss(method):
    losses = adam_losses(method(), ssl_batch(num_clips=2), steps=8)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_ssl_logs_name_their_terms():
    batch = ssl_batch(num_clips=2)
    invariant = InvariantSSL(tiny_backbone(), num_clips=2, global_weight=0.5)(batch)
    assert set(invariant.logs) == {"instance_local", "instance_global", "clip_similarity"}
    assert invariant.logits is None
    loss = invariant.logs["instance_local"] + 0.5 * invariant.logs["instance_global"]
    assert invariant.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    distinctive = DistinctiveSSL(tiny_backbone(), num_clips=2, global_weight=2.0)(batch)
    loss = distinctive.logs["local_local"] + 2.0 * distinctive.logs["global_local"]
    assert distinctive.loss.item() == pytest.approx(loss.item(), rel=1e-6)


def test_distinctive_slices_are_the_head_on_the_global_clips_unpooled_time_steps():
    method = DistinctiveSSL(tiny_backbone(), num_clips=2, head_hidden=32).eval()
    clip = ssl_batch(num_clips=2)["global"]
    with torch.no_grad():
        slices = method.slice_embeddings(clip)
        feature_map = method.model.feature_map(clip.flatten(0, 1))  # (8, F, 2, 1, 1)
        for t in range(2):
            by_hand = F.normalize(method.head(feature_map[:, :, t].mean(dim=(2, 3))), dim=1)
            assert torch.allclose(slices[:, :, t].flatten(0, 1), by_hand, atol=1e-6)
    assert slices.shape == (4, 2, 2, 128)


def test_embed_normalises_and_keeps_the_leading_dimensions():
    method = InvariantSSL(tiny_backbone(), num_clips=2, head_hidden=32).eval()
    with torch.no_grad():
        z = method.embed(ssl_batch(num_clips=2)["video"])
    assert z.shape == (4, 2, 2, 128)
    assert torch.allclose(z.norm(dim=-1), torch.ones(4, 2, 2), atol=1e-5)


def test_ssl_takes_uint8_pixels_as_the_trainer_does():
    method = InvariantSSL(tiny_backbone(), num_clips=2, head_hidden=32).eval()
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 1, 2, 3, 8, 32, 32), dtype=torch.uint8, generator=generator)
    with torch.no_grad():
        raw = method({"video": pixels}).loss
        prepared = method({"video": prepare_video(pixels)}).loss
    assert raw.item() == pytest.approx(prepared.item(), rel=1e-6)


def test_ssl_batches_are_checked():
    batch = ssl_batch(num_clips=2)
    with pytest.raises(ValueError, match="n=4"):
        InvariantSSL(tiny_backbone())(batch)
    with pytest.raises(KeyError, match="global"):
        InvariantSSL(tiny_backbone(), num_clips=2, global_weight=1.0)({"video": batch["video"]})
    with pytest.raises(ValueError, match="two augmentations"):
        DistinctiveSSL(tiny_backbone(), num_clips=2, global_weight=0.0)(
            {"video": batch["video"][:, :1]}
        )
    with pytest.raises(ValueError, match="cannot share"):  # 16 frames -> 2 time steps, n = 4
        DistinctiveSSL(tiny_backbone(), num_clips=4)(ssl_batch(num_clips=4))
    with pytest.raises(ValueError, match="loss_form"):
        InvariantSSL(tiny_backbone(), loss_form="eq1")
    with pytest.raises(ValueError, match="not both 0"):
        DistinctiveSSL(tiny_backbone(), local_weight=0.0, global_weight=0.0)


def test_a_classifier_on_the_ssl_backbone_asks_ddp_for_unused_parameters():
    torch.manual_seed(0)
    classifier = build_video_model("r3d_18", num_classes=5, **TINY_VIDEO_SETTINGS["r3d_18"])
    assert InvariantSSL(classifier).ddp_find_unused_parameters
    assert not DistinctiveSSL(tiny_backbone()).ddp_find_unused_parameters
