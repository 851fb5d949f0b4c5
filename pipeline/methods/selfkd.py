"""Teaching Yourself: self-knowledge distillation for action recognition (Vu et al. 2021).

The pseudo-teacher is a frozen copy of the student at its best validation accuracy so far; it is
refreshed whenever validation accuracy improves (Algorithm 1, lines 20-21). Every step:

    loss = CE(z_S, y) + lam * KL(softmax(z_T / tau) || softmax(z_S / tau))   [* tau^2 optional]

Both networks see the same (augmented) clip; the video-consistent augmentation lives in
pipeline.data.augment and is applied by the loader. The KL is summed over classes and averaged
over the batch (Keras' KLDivergence, as in the authors' code, which has no tau^2 factor).

Before the first improvement there is no best model: teacher_init="none" (the paper's reading)
trains with CE alone until the first validation; "random" (the authors' code) distils from an
independently initialised network from the start.
"""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods import Method, StepOutput

TEACHER_INITS = ("none", "random")


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float
) -> torch.Tensor:
    """KL(softmax(teacher / tau) || softmax(student / tau)), summed over classes, batch mean."""
    return F.kl_div(
        F.log_softmax(student_logits.float() / tau, dim=1),
        F.log_softmax(teacher_logits.float() / tau, dim=1),
        reduction="batchmean",
        log_target=True,
    )


def reinitialise(model: nn.Module, seed: int) -> None:
    """Give `model` fresh random weights from `seed` via each module's reset_parameters.

    Runs on CPU under a forked RNG so neither the global RNG nor the device matters. Raises if a
    module owns parameters it cannot reset (they would silently keep the student's values).
    """
    stuck = [
        name
        for name, module in model.named_modules()
        if not hasattr(module, "reset_parameters") and any(module.parameters(recurse=False))
    ]
    if stuck:
        raise ValueError(f"teacher_init='random' cannot re-initialise parameters of {stuck}")
    device = next(model.parameters()).device
    model.cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    model.to(device)


class TeachingYourself(Method):
    """Self-KD from the best past checkpoint; `monitor` names the validation metric to improve.

    `monitor` must be a key of pipeline.evaluate.evaluate's dict: "clip_top1" (always there) or
    "video_top1" (multi-view validation only). The teacher, whether it exists, its refresh count and
    the best metric are registered, so `state_dict()` carries them through checkpoint and resume.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tau: float = 5.0,
        lam: float = 0.2,
        teacher_init: str = "none",
        tau_squared: bool = False,
        monitor: str = "clip_top1",
        teacher_seed: int = 0,
    ):
        super().__init__()
        if teacher_init not in TEACHER_INITS:
            raise ValueError(f"teacher_init must be one of {TEACHER_INITS}, got {teacher_init!r}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.model = model
        self.tau = tau
        self.lam = lam
        self.tau_squared = tau_squared
        self.monitor = monitor
        self.teacher = copy.deepcopy(model)
        if teacher_init == "random":
            reinitialise(self.teacher, teacher_seed)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.register_buffer("has_teacher", torch.tensor(teacher_init == "random"))
        self.register_buffer("best_metric", torch.tensor(-math.inf, dtype=torch.float64))
        self.register_buffer("teacher_refreshes", torch.tensor(0, dtype=torch.int64))

    def train(self, mode: bool = True) -> "TeachingYourself":
        # The teacher always predicts in eval mode (BatchNorm running statistics, no dropout).
        super().train(mode)
        self.teacher.eval()
        return self

    def training_step(self, batch: dict) -> StepOutput:
        video = batch["video"]
        logits = self.model(video)
        ce = F.cross_entropy(logits, batch["label"], ignore_index=-1)
        if self.has_teacher:
            with torch.no_grad():
                teacher_logits = self.teacher(video)
            kl = distillation_kl(logits, teacher_logits, self.tau)
            if self.tau_squared:
                kl = kl * self.tau**2
        else:
            kl = logits.new_zeros((), dtype=torch.float32)
        loss = ce + self.lam * kl
        logs = {
            "ce": ce.detach(),
            "kl": kl.detach(),
            "has_teacher": self.has_teacher.float(),
            "teacher_refreshes": self.teacher_refreshes.float(),
        }
        return StepOutput(loss=loss, logits=logits, logs=logs)

    def on_validation(self, epoch: int, metrics: dict) -> None:
        """Copy the student into the teacher when `metrics[monitor]` beats the best so far."""
        if self.monitor not in metrics:
            raise KeyError(
                f"TeachingYourself monitors {self.monitor!r}, but the validation metrics hold "
                f"{sorted(metrics)}"
            )
        value = float(metrics[self.monitor])
        if value > self.best_metric.item():
            self.best_metric.fill_(value)
            self.teacher.load_state_dict(self.model.state_dict())
            self.has_teacher.fill_(True)
            self.teacher_refreshes += 1
