import math

import pytest
import torch
from torch import nn

from pipeline.methods import Method, StepOutput
from pipeline.methods.selfkd import TeachingYourself, distillation_kl

NUM_CLASSES = 5


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(3, 4, kernel_size=3, padding=1),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4, NUM_CLASSES),
    )


def make_batch(seed: int = 0, size: int = 4) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "video": torch.randn((size, 3, 2, 8, 8), generator=generator),
        "label": torch.randint(0, NUM_CLASSES, (size,), generator=generator),
    }


def sgd_steps(method: TeachingYourself, steps: int = 3) -> None:
    # The optimizer sees every parameter of the method, teacher included, on purpose.
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    method.train()
    for step in range(steps):
        optimizer.zero_grad()
        method(make_batch(step)).loss.backward()
        optimizer.step()


def test_kl_matches_hand_computation():
    student = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    tau = 2.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        s_den = sum(math.exp(v / tau) for v in s_row)
        t_den = sum(math.exp(v / tau) for v in t_row)
        for s, t in zip(s_row, t_row, strict=True):
            p_t, p_s = math.exp(t / tau) / t_den, math.exp(s / tau) / s_den
            expected += p_t * math.log(p_t / p_s)
    expected /= len(student)
    assert distillation_kl(student, teacher, tau).item() == pytest.approx(expected, rel=1e-5)
    assert distillation_kl(teacher, teacher, tau).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("tau_squared", [False, True])
def test_loss_is_ce_plus_weighted_kl(tau_squared):
    method = TeachingYourself(
        tiny_model(), tau=4.0, lam=0.3, teacher_init="random", tau_squared=tau_squared
    )
    method.train()
    batch = make_batch()
    out = method(batch)
    assert isinstance(method, Method) and isinstance(out, StepOutput)
    with torch.no_grad():
        teacher_logits = method.teacher(batch["video"])
    kl = distillation_kl(out.logits, teacher_logits, 4.0) * (16.0 if tau_squared else 1.0)
    ce = nn.functional.cross_entropy(out.logits, batch["label"])
    assert out.logs["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert out.logs["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(ce.item() + 0.3 * kl.item(), rel=1e-5)
    assert out.logs["kl"].item() > 0


def test_no_kl_before_a_teacher_with_none():
    method = TeachingYourself(tiny_model(), teacher_init="none")
    method.train()
    batch = make_batch()
    out = method(batch)
    assert out.logs["kl"].item() == 0.0
    assert out.logs["has_teacher"].item() == 0.0
    assert out.loss.item() == pytest.approx(out.logs["ce"].item())


def test_random_teacher_differs_from_student_and_is_seeded():
    model = tiny_model()
    method = TeachingYourself(model, teacher_init="random", teacher_seed=7)
    again = TeachingYourself(tiny_model(), teacher_init="random", teacher_seed=7)
    student_weight = model[0].weight
    assert method.has_teacher.item()
    assert not torch.equal(method.teacher[0].weight, student_weight)
    assert torch.equal(method.teacher[0].weight, again.teacher[0].weight)


def test_random_init_refuses_parameters_it_cannot_reset():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))
            self.head = nn.Linear(3, NUM_CLASSES)

        def forward(self, video):
            return self.head(video.mean(dim=(2, 3, 4))) * self.scale

    with pytest.raises(ValueError, match="re-initialise"):
        TeachingYourself(Scaled(), teacher_init="random")


def test_teacher_is_frozen_and_in_eval_mode():
    method = TeachingYourself(tiny_model(), teacher_init="random")
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    sgd_steps(method)
    assert not method.teacher.training and method.model.training
    assert all(not p.requires_grad and p.grad is None for p in method.teacher.parameters())
    for key, value in method.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key  # incl. BatchNorm running stats


def test_teacher_refreshed_only_when_validation_improves():
    method = TeachingYourself(tiny_model(), teacher_init="none", monitor="clip_top1")
    history = [(0.2, True), (0.1, False), (0.2, False), (0.35, True), (0.3, False)]
    refreshes = 0
    for epoch, (top1, improves) in enumerate(history):
        sgd_steps(method, steps=1)
        teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
        method.on_validation(epoch, {"clip_top1": top1, "clip_top5": 1.0})
        refreshes += improves
        assert method.teacher_refreshes.item() == refreshes
        assert method.best_metric.item() == pytest.approx(max(t for t, _ in history[: epoch + 1]))
        expected = method.model.state_dict() if improves else teacher_before
        for key, value in method.teacher.state_dict().items():
            assert torch.equal(value, expected[key]), (epoch, key)
        assert method.has_teacher.item()
    out = method(make_batch())
    assert out.logs["teacher_refreshes"].item() == 2.0
    assert out.logs["has_teacher"].item() == 1.0
    assert out.logs["kl"].item() > 0


def test_missing_monitor_key_is_reported():
    method = TeachingYourself(tiny_model(), monitor="video_top1")
    with pytest.raises(KeyError, match="video_top1"):
        method.on_validation(0, {"clip_top1": 0.5})


def test_state_dict_round_trip_keeps_teacher_and_flags(tmp_path):
    method = TeachingYourself(tiny_model(), teacher_init="none")
    sgd_steps(method, steps=2)
    method.on_validation(0, {"clip_top1": 0.4})
    sgd_steps(method, steps=2)  # student moves on; the teacher stays at the best checkpoint
    path = tmp_path / "method.pt"
    torch.save(method.state_dict(), path)

    resumed = TeachingYourself(tiny_model(seed=1), teacher_init="none")
    assert not resumed.has_teacher.item()
    resumed.load_state_dict(torch.load(path, weights_only=True))
    assert resumed.has_teacher.item()
    assert resumed.teacher_refreshes.item() == 1
    assert resumed.best_metric.item() == pytest.approx(0.4)
    for key, value in method.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert not torch.equal(resumed.teacher[0].weight, resumed.model[0].weight)
    # The restored best is remembered: an equal score does not refresh the teacher.
    resumed.on_validation(1, {"clip_top1": 0.4})
    assert resumed.teacher_refreshes.item() == 1
    resumed.eval()
    method.eval()
    batch = make_batch(9)
    assert torch.equal(resumed(batch).loss, method(batch).loss)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="teacher_init"):
        TeachingYourself(tiny_model(), teacher_init="student")
    with pytest.raises(ValueError, match="tau"):
        TeachingYourself(tiny_model(), tau=0.0)
