"""DTG-Net: Differentiated Teachers Guided self-supervised learning (papers/dtg-net.txt).

The student f_anchor (a video backbone) sees the anchor sequence of a video; frozen image
teachers saw the guidance sequence of the same video (their per-frame embeddings come from the
feature cache, pipeline.data.guided). Per teacher k, with L2-normalised anchor a_k and guidance
g_k and a MoCo-style queue Q_k of K guidance features of other videos (Eq. 2):

    L_k = -log exp(a_k . g_k / tau) / (exp(a_k . g_k / tau) + sum_{q in Q_k} exp(a_k . q / tau))
    L   = sum_k w_k L_k,   sum_k w_k = 1,   averaged over the batch

Choices where the paper is silent (FACTS.md "DTG-Net"), all exposed as arguments:
- Projection: the student's pooled feature (feature_dim) goes through one head per teacher into
  that teacher's embedding space (its D_k), so a_k . g_k compares like with like. The head is
  MoCo v2's: Linear(feature_dim, proj_hidden), ReLU, Linear(proj_hidden, D_k); proj_hidden=0 gives
  a single Linear (params.yaml's choice: on the synthetic world it reached a lower loss and a
  better student than the MLP in the same steps, README "DTG-Net: levers"). The heads are part
  of the method, not of the student: model.pt (what fine-tuning starts from) holds the backbone
  only.
- Queue: K = queue_size per teacher (default 512, as the quick prototype in FACTS.md), filled at
  construction with seeded, L2-normalised Gaussian vectors (MoCo does the same): until real
  guidance replaces them (after K / batch steps) they are easy negatives, and the first losses
  are of the order of log(K + 1). Each step enqueues the batch's guidance
  (after the loss, all ranks' guidance under DDP, as MoCo's concat_all_gather), overwriting the
  oldest entries (a ring buffer with a pointer). The paper requires K < N so that the queue never
  holds the anchor's own video; with shuffled epochs it still does (measured: 12.8% of anchors
  at each epoch start with K 512 of N 1,080; supervised DTG on 181 labeled videos holds about
  2.5 copies of each). So the queue also keeps each entry's video (the batch's "index") and an
  anchor's own video is masked out of its negatives: with the mask, any K is correct.
- tau: params.yaml uses 0.07 (MoCo's, RSPNet's), chosen among 0.05-0.5 on validation; the
  default argument here is the prototype's 0.1.
- Weightings (the paper names them; the formulas for the online ones are ours):
  "equal"   w_k = 1/N.
  "offline" fixed weights = softmax of the single-teacher runs' top-1 accuracies in percent
            (`offline_weights`; reproduces the paper's (0.067, 3.0e-6, 0.51, 0.43)).
  "online1" per sample i: w_{k,i} = softmax_k(s_{k,i} / online1_temperature), s_{k,i} = a_k . g_k
            the positive pair's cosine similarity (in [-1, 1]).
  "online2" per sample i: r_{k,i} = the number of queue entries whose similarity to a_k is higher
            than the positive's (0 = the positive ranks first of the K + 1 pairs);
            w_{k,i} = softmax_k(-(r_{k,i} / (K + 1)) / online2_temperature).
  Online weights are detached (they weigh the losses; no gradient flows through them), and a
  teacher whose positive pair is more similar (online1) or ranks higher (online2) gets more weight.
  Both temperatures default to 0.1, the contrastive tau. Measured on the synthetic world (4 tiny
  teachers, 6 epochs): online1 at 1.0 leaves the weights near-uniform (0.21-0.31), at 0.1 they
  separate as in the paper's Figure 3 (0.15-0.40) without collapsing onto one teacher.
- Supervised DTG (Eq. 3): loss = alpha * L + beta * CE(student logits, labels) with alpha 0.1,
  beta 1.0; the logits come from the student's own classifier (`model.fc`) on the same pooled
  feature; label -1 (unlabeled) is left out of CE.

Figure 3 (the online weights over iterations): the method keeps `weight_trace`, a registered
(trace_steps, N) buffer whose row s is step s's batch-mean weights, and `trace_len`. Being
buffers, they are in the checkpoint, so a resumed run continues the same trace; steps past
trace_steps are not recorded (pipeline.pretrain sizes it to epochs x batches per epoch). Under
DDP each rank records its own batch; rank 0's trace is the one saved.
"""

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.methods import Method, StepOutput

WEIGHTINGS = ("equal", "offline", "online1", "online2")


def offline_weights(accuracies: Sequence[float]) -> np.ndarray:
    """Softmax over teachers of their single-teacher runs' top-1 accuracies in percent."""
    values = np.asarray(accuracies, dtype=np.float64)
    exp = np.exp(values - values.max())
    return exp / exp.sum()


def info_nce_logits(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    queue: torch.Tensor,
    tau: float,
    same_video: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, 1 + K) logits [a . g+, a . q_1, ..., a . q_K] / tau; column 0 is the positive pair.

    same_video: (B, K) bool, True where queue entry k came from the anchor's own video: such an
    entry is the positive again, not a negative, and is left out (logit -inf)."""
    positive_logit = (anchor * positive).sum(dim=1, keepdim=True)
    negatives = anchor @ queue.T
    if same_video is not None:
        negatives = negatives.masked_fill(same_video, float("-inf"))
    return torch.cat([positive_logit, negatives], dim=1) / tau


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample InfoNCE loss (B,) of logits whose column 0 is the positive pair."""
    target = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, reduction="none")


def online1_weights(positive_similarity: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, N) positive-pair similarities per teacher -> (B, N) weights, rows summing to 1."""
    return torch.softmax(positive_similarity / temperature, dim=1)


def positive_rank(logits: torch.Tensor) -> torch.Tensor:
    """(B, 1 + K) InfoNCE logits -> (B,) number of negatives scoring above the positive."""
    return (logits[:, 1:] > logits[:, :1]).sum(dim=1)


def online2_weights(ranks: torch.Tensor, num_pairs: int, temperature: float) -> torch.Tensor:
    """(B, N) positive ranks per teacher among `num_pairs` (K + 1) pairs -> (B, N) weights."""
    return torch.softmax(-(ranks.float() / num_pairs) / temperature, dim=1)


def gather_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' `tensor` concatenated along dim 0 (MoCo's concat_all_gather); no gradient.

    Every rank must pass the same shape: train with drop_last so batches are equal everywhere."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def projection_head(in_dim: int, out_dim: int, hidden: int) -> nn.Module:
    """MoCo v2's head (Linear, ReLU, Linear), or one Linear when hidden == 0."""
    if hidden == 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
    )


class DTG(Method):
    """DTG-Net over a student `model` (with `.features` and `.feature_dim`).

    teachers: teacher name -> its embedding size D_k, in the order weights are reported.
    weighting: one of WEIGHTINGS; "offline" needs `fixed_weights` (name -> weight, e.g. from
    `offline_weights`). supervised: add beta * CE on `model.fc`'s logits (the model needs a
    classifier) to alpha * the contrastive loss. trace_steps: rows of the per-step weight record
    (0: none). Batches hold "video" (B, C, T, H, W), "index" (B,) the videos' manifest rows and
    "guidance" {name: (B, D_k)} (and "label" when supervised), as
    pipeline.data.guided.GuidedClipDataset gives them.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        teachers: Mapping[str, int],
        weighting: str = "equal",
        fixed_weights: Mapping[str, float] | None = None,
        tau: float = 0.1,
        queue_size: int = 512,
        proj_hidden: int = 256,
        online1_temperature: float = 0.1,
        online2_temperature: float = 0.1,
        supervised: bool = False,
        alpha: float = 0.1,
        beta: float = 1.0,
        queue_seed: int = 0,
        trace_steps: int = 0,
    ):
        super().__init__()
        names = list(teachers)
        if not names:
            raise ValueError("DTG needs at least one teacher")
        bad = [name for name in names if not name.isidentifier()]
        if bad:
            raise ValueError(f"teacher names must be identifiers (they name buffers), got {bad}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if min(tau, online1_temperature, online2_temperature) <= 0:
            raise ValueError("tau and the online temperatures must be positive")
        if queue_size < 1 or proj_hidden < 0 or trace_steps < 0:
            raise ValueError("queue_size must be >= 1, proj_hidden and trace_steps >= 0")
        if weighting == "offline":
            if fixed_weights is None or set(fixed_weights) != set(names):
                raise ValueError(f"weighting 'offline' needs fixed_weights for exactly {names}")
            weights = [float(fixed_weights[name]) for name in names]
            if min(weights) < 0 or not np.isclose(sum(weights), 1.0):
                raise ValueError(f"fixed_weights must be >= 0 and sum to 1, got {fixed_weights}")
        else:
            weights = [1.0 / len(names)] * len(names)
        if supervised and not any(
            p.numel() for p in getattr(model, "fc", nn.Identity()).parameters()
        ):
            raise ValueError("supervised DTG needs a student with a classifier (num_classes > 0)")
        self.model = model
        self.teachers = names
        self.weighting = weighting
        self.tau = tau
        self.queue_size = queue_size
        self.online1_temperature = online1_temperature
        self.online2_temperature = online2_temperature
        self.supervised = supervised
        self.alpha = alpha
        self.beta = beta
        # A self-supervised step leaves the student's classifier (if any) without gradient.
        self.ddp_find_unused_parameters = not supervised and any(
            p.numel() for p in getattr(model, "fc", nn.Identity()).parameters()
        )
        self.heads = nn.ModuleDict(
            {
                name: projection_head(model.feature_dim, dim, proj_hidden)
                for name, dim in teachers.items()
            }
        )
        generator = torch.Generator().manual_seed(queue_seed)
        for name, dim in teachers.items():
            queue = F.normalize(torch.randn(queue_size, dim, generator=generator), dim=1)
            self.register_buffer(f"queue_{name}", queue)
        # The manifest row of each queue entry's video (-1: an initial random entry).
        self.register_buffer("queue_videos", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("fixed_weights", torch.tensor(weights, dtype=torch.float32))
        self.register_buffer("weight_trace", torch.zeros(trace_steps, len(names)))
        self.register_buffer("trace_len", torch.zeros((), dtype=torch.long))

    def queue(self, name: str) -> torch.Tensor:
        """Teacher `name`'s queue of K normalised guidance features, (K, D_k)."""
        return getattr(self, f"queue_{name}")

    @torch.no_grad()
    def enqueue(self, guidance: Mapping[str, torch.Tensor], videos: torch.Tensor) -> None:
        """Write a batch of normalised guidance and its videos' manifest rows (all ranks') over
        the oldest queue entries."""
        # Tensor arithmetic on the pointer: no host-device sync per step (the trainer avoids them).
        videos = gather_across_ranks(videos.to(self.queue_videos.device))[-self.queue_size :]
        slots = (self.queue_ptr + torch.arange(len(videos), device=videos.device)) % self.queue_size
        for name in self.teachers:
            keys = gather_across_ranks(guidance[name].detach())[-self.queue_size :]
            self.queue(name).index_copy_(0, slots, keys.to(self.queue(name).dtype))
        self.queue_videos.index_copy_(0, slots, videos)
        self.queue_ptr.add_(len(videos)).remainder_(self.queue_size)

    def teacher_weights(
        self, positive_similarity: torch.Tensor, ranks: torch.Tensor
    ) -> torch.Tensor:
        """(B, N) per-sample teacher weights (rows sum to 1) for this method's weighting."""
        if self.weighting == "online1":
            return online1_weights(positive_similarity, self.online1_temperature)
        if self.weighting == "online2":
            return online2_weights(ranks, self.queue_size + 1, self.online2_temperature)
        return self.fixed_weights.expand(len(positive_similarity), -1)

    def training_step(self, batch: dict) -> StepOutput:
        missing = [name for name in self.teachers if name not in batch.get("guidance", {})]
        if missing:
            raise KeyError(f"batch has no guidance for teachers {missing}")
        features = self.model.features(batch["video"])
        videos = batch["index"].to(features.device)
        same_video = videos[:, None] == self.queue_videos[None, :]
        losses, similarities, ranks, normalised = [], [], [], {}
        # The contrastive part in float32: under autocast, bf16 logits / tau lose the small
        # differences between similarities that the loss is about.
        with torch.autocast(features.device.type, enabled=False):
            for name in self.teachers:
                anchor = F.normalize(self.heads[name](features).float(), dim=1)
                guide = batch["guidance"][name].to(anchor.device, non_blocking=True).float()
                guide = F.normalize(guide, dim=1)
                # clone: enqueue below overwrites the queue that backward still needs
                logits = info_nce_logits(
                    anchor, guide, self.queue(name).clone(), self.tau, same_video
                )
                losses.append(info_nce(logits))
                similarities.append(logits[:, 0].detach() * self.tau)
                ranks.append(positive_rank(logits.detach()))
                normalised[name] = guide
            losses = torch.stack(losses, dim=1)  # (B, N)
            weights = self.teacher_weights(torch.stack(similarities, 1), torch.stack(ranks, 1))
            contrastive = (weights.detach() * losses).sum(dim=1).mean()
        self.enqueue(normalised, videos)
        mean_weights = weights.detach().mean(dim=0)
        self._record(mean_weights)
        logs = {"ct": contrastive.detach()}
        for k, name in enumerate(self.teachers):
            logs[f"loss_{name}"] = losses[:, k].detach().mean()
            logs[f"w_{name}"] = mean_weights[k]
            logs[f"sim_{name}"] = similarities[k].mean()
        if not self.supervised:
            return StepOutput(loss=contrastive, logs=logs)
        logits = self.model.fc(features)
        labels = batch["label"]
        labeled = (labels >= 0).sum().clamp(min=1)  # a batch without labels adds no CE
        ce = F.cross_entropy(logits.float(), labels, ignore_index=-1, reduction="sum") / labeled
        logs["ce"] = ce.detach()
        return StepOutput(loss=self.alpha * contrastive + self.beta * ce, logits=logits, logs=logs)

    @torch.no_grad()
    def _record(self, mean_weights: torch.Tensor) -> None:
        """Store this step's mean weights in the next trace row, while rows are left (no sync)."""
        capacity = len(self.weight_trace)
        if capacity == 0:
            return
        room = self.trace_len < capacity
        row = self.trace_len.clamp(max=capacity - 1).unsqueeze(0)
        kept = self.weight_trace.index_select(0, row)
        self.weight_trace.index_copy_(0, row, torch.where(room, mean_weights, kept))
        self.trace_len.add_(room.long())

    def trace(self) -> np.ndarray:
        """The recorded per-step mean weights, (steps, N) in `teachers` order."""
        return self.weight_trace[: int(self.trace_len)].cpu().numpy()
