"""Human-parsing prior KD with motion and appearance contrast (spec
../shared/specs/human-parsing-kd.md; paper: Wang et al. 2022, arXiv 2204.12729).

A shared low-level encoder f_l feeds two task-dependent high-level encoders (a
pipeline.models.video.BranchedVideoNet): h_h, whose map a decoder g_h turns into the SCHP
teacher's part-probability map of the clip's middle frame (Eq. 3-4), and h_c, whose pooled map
two heads project for RSPNet's tasks (Eq. 5-6): relative speed perception (motion) and
MoCo-style instance discrimination (appearance). The representation is [z_h || z_c].

Variants (the paper's Table 2): "full" (two branches), "ti" (one shared high-level encoder for
every task: a plain backbone with the decoder and the heads on its map), "rsp" (w/o KD: a plain
backbone with the contrastive tasks only, i.e. RSPNet).

Choices where the paper is silent (spec section 5), each a parameter:
- the split: f_l = the first `shared_stages` stages of the backbone (default 3: stem, layer1,
  layer2; h = copies of layer3 + layer4), each branch drawn independently;
- g_h: the time-averaged map of h_h, a 3x3 conv + BN + ReLU, a sub-pixel convolution to the C
  part channels at the target side (PartDecoder); the target is the cached teacher softmax resampled
  under the student's crop and flip (pipeline.data.speed), not a hard argmax;
- the MoCo key encoder and queue of RSPNet (m, K, tau), KD on the query clip only;
- RSPNet's margin (2.0 on cosine / tau) and its two appearance terms (a positive at each speed).
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.clips import prepare_video
from pipeline.methods import Method, StepOutput
from pipeline.methods.dtg import gather_across_ranks

VARIANTS = ("full", "ti", "rsp")


def parsing_kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Eq. 4: -(1/N) sum over positions and parts of F_t log F_h, averaged over the batch.
    (B, C, h, w) logits and probabilities. Soft-target cross-entropy: KL plus the teacher's
    entropy, so its gradient is KL's."""
    log_probs = F.log_softmax(student_logits.float(), dim=1)
    return -(teacher_probs.float() * log_probs).sum(dim=1).mean()


def speed_ranking_loss(
    query: torch.Tensor, same: torch.Tensor, other: torch.Tensor, *, tau: float, margin: float
) -> torch.Tensor:
    """Eq. 6's motion term as RSPNet computes it: s = q . k / tau for the key at the query's
    speed (s+) and at the other speed (s-), mean max(0, margin - (s+ - s-)). (B, D) unit vectors."""
    positive = (query * same).sum(dim=1) / tau
    negative = (query * other).sum(dim=1) / tau
    return F.margin_ranking_loss(positive, negative, torch.ones_like(positive), margin=margin)


def speed_pairs(keys: torch.Tensor, speed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2, D) keys at 1x and 2x, (B,) query speed index -> (the key at the query's speed:
    the motion task's positive, the key at the other speed: its negative)."""
    rows = torch.arange(len(speed), device=speed.device)
    return keys[rows, speed], keys[rows, 1 - speed]


def appearance_nce(
    query: torch.Tensor, positive: torch.Tensor, queue: torch.Tensor, *, tau: float
) -> torch.Tensor:
    """Eq. 6's appearance term (MoCo's InfoNCE): -log of the positive's softmax share among
    the positive and the K queued keys. query, positive (B, D) unit vectors, queue (K, D)."""
    logits = torch.cat([(query * positive).sum(dim=1, keepdim=True), query @ queue.T], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))


class PartDecoder(nn.Module):
    """g_h: (B, D, T, h, w) map of h_h -> (B, C, size, size) part logits.

    The time-averaged map goes through a 3x3 conv + BN + ReLU, then a sub-pixel convolution
    (a 1x1 conv to C x upscale^2 channels, pixel shuffle: ESPCN's upsampling), which lets the
    channels of a coarse map (2 x 2 for the tiny backbones at 40 px) carry where the parts are
    inside each cell; a bilinear resize gives the target side when the product differs."""

    def __init__(self, in_channels: int, num_parts: int, size: int, hidden: int = 32,
                 upscale: int = 4):  # fmt: skip
        super().__init__()
        self.size = size
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
        )
        self.classify = nn.Sequential(
            nn.Conv2d(hidden, num_parts * upscale**2, 1), nn.PixelShuffle(upscale)
        )

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        x = self.classify(self.conv(feature_map.mean(dim=2)))
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x


def _embedding_head(in_dim: int, out_dim: int) -> nn.Linear:
    # RSPNet's g_m / g_a (fc_type "linear"): AvgPool + Linear, L2-normalised by the caller
    return nn.Linear(in_dim, out_dim)


def _unit(head: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    return F.normalize(head(pooled).float(), dim=1)


class HPKD(Method):
    """The multi-task pre-training of one variant (VARIANTS) on `network`.

    network: a BranchedVideoNet of two branches (branch 0 = h_h, branch 1 = h_c) for "full", a
    plain backbone otherwise. Batch: "video" (B, C, T, H, W) query clips, "speed" (B,) the
    query's speed index (0: 1x, 1: 2x), "keys" (B, 2, C, T, H, W) one key clip of the same video
    at 1x and 2x, and for the KD variants "parts" (B, C_parts, s, s), the teacher's map of the
    query's middle frame under the query's crop and flip.
    Weights: kd_weight, motion_weight, appearance_weight (L = l_k L_KL + l_m L_m + l_a L_a).
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        variant: str,
        num_parts: int = 0,
        parts_size: int = 8,
        decoder_hidden: int = 32,
        decoder_upscale: int = 4,
        kd_weight: float = 1.0,
        motion_weight: float = 1.0,
        appearance_weight: float = 1.0,
        embed_dim: int = 128,
        tau: float = 0.07,
        margin: float = 2.0,
        momentum: float = 0.999,
        queue_size: int = 16384,
        queue_seed: int = 0,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        branched = hasattr(network, "branch_maps")
        if branched != (variant == "full"):
            needed = "branched" if variant == "full" else "plain"
            raise ValueError(f"variant {variant!r} needs a {needed} network "
                             "(model.branches 2 for full, 1 otherwise)")  # fmt: skip
        kd = variant != "rsp"
        if kd and (num_parts < 2 or kd_weight <= 0):
            raise ValueError(
                f"variant {variant!r} distils part maps: num_parts >= 2, kd_weight > 0"
            )
        if min(motion_weight, appearance_weight) < 0 or not 0 <= momentum < 1:
            raise ValueError("loss weights must be >= 0 and momentum in [0, 1)")
        if tau <= 0 or queue_size < 1:
            raise ValueError("tau must be > 0 and queue_size >= 1")
        self.model = network
        self.variant = variant
        self.kd_weight = kd_weight if kd else 0.0
        self.motion_weight = motion_weight
        self.appearance_weight = appearance_weight
        self.tau, self.margin, self.momentum = tau, margin, momentum
        branch_dim = network.branch_dim if branched else network.feature_dim
        self.motion_head = _embedding_head(branch_dim, embed_dim)
        self.appearance_head = _embedding_head(branch_dim, embed_dim)
        self.decoder = (
            PartDecoder(branch_dim, num_parts, parts_size, decoder_hidden, decoder_upscale)
            if kd
            else None
        )
        # MoCo's key encoder: a momentum copy of the contrastive path, never trained by gradient.
        # Its BatchNorm normalises each key batch by itself (MoCo shuffles BN across GPUs; on one
        # process there is nothing to shuffle with).
        self.key_model = copy.deepcopy(network).requires_grad_(False)
        self.key_motion_head = copy.deepcopy(self.motion_head).requires_grad_(False)
        self.key_appearance_head = copy.deepcopy(self.appearance_head).requires_grad_(False)
        generator = torch.Generator().manual_seed(queue_seed)
        self.register_buffer(
            "queue", F.normalize(torch.randn(queue_size, embed_dim, generator=generator), dim=1)
        )
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        # fc (a classifier on a pre-training backbone) gets no gradient
        self.ddp_find_unused_parameters = any(
            p.numel() for p in getattr(network, "fc", nn.Identity()).parameters()
        )

    @staticmethod
    def _maps(network: nn.Module, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(parsing map, contrastive map): branch 0 and the last branch, or the one map."""
        if hasattr(network, "branch_maps"):
            maps = network.branch_maps(clips)
            return maps[0], maps[-1]
        feature_map = network.feature_map(clips)
        return feature_map, feature_map

    @staticmethod
    def _contrast_map(network: nn.Module, clips: torch.Tensor) -> torch.Tensor:
        """The contrastive branch's map alone (the key encoder needs no parsing branch)."""
        if hasattr(network, "branch_maps"):
            return network.high[-1](network.low(clips))
        return network.feature_map(clips)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        pairs = ((self.model, self.key_model), (self.motion_head, self.key_motion_head),
                 (self.appearance_head, self.key_appearance_head))  # fmt: skip
        for online, key in pairs:
            for p, k in zip(online.parameters(), key.parameters(), strict=True):
                k.mul_(self.momentum).add_(p.detach(), alpha=1 - self.momentum)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        size = len(self.queue)
        keys = gather_across_ranks(keys)[-size:]
        index = (self.queue_pointer + torch.arange(len(keys), device=keys.device)) % size
        self.queue[index] = keys
        self.queue_pointer.copy_((self.queue_pointer + len(keys)) % size)

    def training_step(self, batch: dict) -> StepOutput:
        query = prepare_video(batch["video"])
        keys = prepare_video(batch["keys"])
        speed = batch["speed"].long()
        if query.dim() != 5 or keys.dim() != 6 or keys.shape[1] != 2:
            raise ValueError(
                f"HPKD expects 'video' (B, C, T, H, W) and 'keys' (B, 2, C, T, H, W), got "
                f"{tuple(query.shape)} and {tuple(keys.shape)}"
            )
        parsing_map, contrast_map = self._maps(self.model, query)
        pooled = contrast_map.mean(dim=(2, 3, 4))
        q_motion = _unit(self.motion_head, pooled)
        q_appearance = _unit(self.appearance_head, pooled)
        with torch.no_grad():
            self._momentum_update()
            key_pooled = self._contrast_map(self.key_model, keys.flatten(0, 1)).mean(dim=(2, 3, 4))
            # (B, 2, D): each video's key at 1x and at 2x
            k_motion = _unit(self.key_motion_head, key_pooled).unflatten(0, (-1, 2))
            k_appearance = _unit(self.key_appearance_head, key_pooled).unflatten(0, (-1, 2))
        logs = {}
        with torch.autocast(query.device.type, enabled=False):
            motion = speed_ranking_loss(q_motion, *speed_pairs(k_motion, speed), tau=self.tau,
                                        margin=self.margin)  # fmt: skip
            same, other = speed_pairs(k_appearance, speed)
            queue = self.queue.clone()
            # RSPNet's two terms: the same video's key is a positive at either speed
            appearance = sum(
                appearance_nce(q_appearance, k, queue, tau=self.tau) for k in (same, other)
            )
            loss = self.motion_weight * motion + self.appearance_weight * appearance
            logs |= {"motion": motion.detach(), "appearance": appearance.detach()}
            if self.decoder is not None:
                kd = parsing_kd_loss(self.decoder(parsing_map), batch["parts"])
                loss = loss + self.kd_weight * kd
                logs["kd"] = kd.detach()
        self._enqueue(other)  # RSPNet fills the queue with the other-speed keys
        return StepOutput(loss=loss, logs=logs)

    @torch.no_grad()
    def predict_parts(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, C_parts, s, s) part probabilities g_h predicts for (B, C, T, H, W) clips."""
        if self.decoder is None:
            raise ValueError("the rsp variant has no part decoder")
        return self.decoder(self._maps(self.model, prepare_video(clips))[0]).softmax(dim=1)
