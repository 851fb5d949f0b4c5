"""Plain supervised training with cross-entropy: the reference every other method is compared to."""

import torch.nn.functional as F
from torch import nn

from pipeline.methods import Method, StepOutput


class Supervised(Method):
    """Cross-entropy on the labeled clips of a batch (label -1 marks unlabeled ones: ignored)."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def training_step(self, batch: dict) -> StepOutput:
        logits = self.model(batch["video"])
        loss = F.cross_entropy(
            logits, batch["label"], ignore_index=-1, label_smoothing=self.label_smoothing
        )
        return StepOutput(loss=loss, logits=logits)
