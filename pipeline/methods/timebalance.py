"""TimeBalance (CVPR'23): two self-supervised teachers and their reweighted student.

Spec: ../shared/specs/timebalance.md (cited below as "spec (x)"); paper: papers/timebalance.txt.

    InvariantSSL        f_I's pre-training, L_I (Eq. 1, spec (a))
    DistinctiveSSL      f_D's pre-training, L_D = L_D1 (Eq. 3) + L_D2 (Supp. D.2, TCLR; spec (b))
    similarity_score    Eq. 5-6 for one teacher: mean off-diagonal cosine of a video's n clips
    temporal_score      Eq. 6: s = mean of two teachers' scores (spec (d))
    TimeBalanceStudent  CE + omega * D(p_T, p_S), p_T = s p_I + (1 - s) p_D (Eq. 7-8, spec (e))

Teacher fine-tuning (spec (c)) is plain cross-entropy: the supervised method does it.

Batch items of the two SSL methods (one video per item):
  "video"   (A, n, C, T, H, W)    the n local clips (timestamps t = 1..n, in time order) under A
                                  independent augmentations (A = 1 or 2); video[a, t] is
                                  augmentation a of local clip t. Kept under "video" because the
                                  trainer counts the batch and normalises uint8 pixels by that key.
  "global"  (A_g, C, T_g, H, W)   the global clip covering the n local clips (spec (a) sampling),
                                  under A_g augmentations; only where a loss needs it.
Every clip is an anchor: the paper writes Eq. 1 and 3 with the anchors z_t only; taking the other
augmentation's clips as anchors too (as the authors' code does) is the same loss, symmetrised.
Projections z = g(features) are L2-normalised, so dot products are the cosines of h (Eq. 1).
All local clips of a batch go through the backbone in one call, so BatchNorm sees them together
(the authors' code calls it once per timestamp); contrastive logits are computed in float32.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.clips import prepare_video
from pipeline.methods import Method, StepOutput

LOSS_FORMS = ("paper", "ntxent")
TEACHERS = ("both", "invariant", "distinctive", "none")
DISTANCES = ("l2", "kl", "js")
CLASS_REDUCTIONS = ("mean", "sum")


def projection_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """g (spec (a), (g)1): Linear(in, hidden) BN ReLU, Linear(hidden, out, no bias) BN.

    The paper's hidden width is 512, the code's (`mlp_r50`) 128; its L2 normalisation is done by
    the callers (SSLTeacher.embed)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim, bias=False),
        nn.BatchNorm1d(out_dim),
    )


# ---------------------------------------------------------------- contrastive losses


def contrastive_terms(
    positive: torch.Tensor, negatives: torch.Tensor, positive_in_denominator: bool
) -> torch.Tensor:
    """-log(e^pos / (sum e^neg [+ e^pos])) per anchor; negatives' last dim (-inf: left out).

    Without the positive in the denominator (Eq. 1, 3) the term can be negative; with it, it is
    the InfoNCE / NT-Xent cross-entropy of the authors' code."""
    if positive_in_denominator:
        negatives = torch.cat([positive.unsqueeze(-1), negatives], dim=-1)
    return torch.logsumexp(negatives, dim=-1) - positive


def cross_video_contrast(
    z: torch.Tensor, tau: float, positive_in_denominator: bool
) -> torch.Tensor:
    """L_I per video (Eq. 1, spec (a)): (B, K, D) normalised embeddings of K clips -> (B,).

    Anchor z_c1^i, positive z_c2^i (c2 != c1), negatives z_c1^j and z_c2^j of every other video
    j != i; averaged over the K(K-1) ordered pairs (Eq. 1 sums them). With the positive in the
    denominator this equals the mean over ordered pairs of the code's SimCLR NT-Xent(z_c1, z_c2),
    whose 2B anchors are the two directions of each pair."""
    batch, clips, _ = z.shape
    if batch < 2:
        raise ValueError("L_I takes its negatives from other videos: it needs a batch of >= 2")
    similarity = torch.einsum("icd,jed->icje", z, z) / tau  # [i, c1, j, c2]
    positive = similarity.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [i, c1, c2]
    same_clip = similarity.diagonal(dim1=1, dim2=3).transpose(1, 2)  # [i, c1, j]: z_c1^i.z_c1^j
    other_clip = similarity.permute(0, 1, 3, 2)  # [i, c1, c2, j]: z_c1^i . z_c2^j
    negatives = torch.cat([same_clip.unsqueeze(2).expand_as(other_clip), other_clip], dim=-1)
    own_video = torch.eye(batch, dtype=torch.bool, device=z.device).repeat(1, 2)
    negatives = negatives.masked_fill(own_video[:, None, None, :], float("-inf"))
    terms = contrastive_terms(positive, negatives, positive_in_denominator)  # (B, K, K)
    pairs = ~torch.eye(clips, dtype=torch.bool, device=z.device)
    return terms[:, pairs].mean(dim=1)


def within_video_contrast(
    z: torch.Tensor, tau: float, positive_in_denominator: bool
) -> torch.Tensor:
    """L_D1 per video (Eq. 3, spec (b)): (B, 2, n, D) two augmentations of n clips -> (B,).

    Anchor z_t, positive its other augmentation z~_t, negatives the video's other timestamps
    z_t2 and z~_t2 (t2 != t) only: no other video enters. Mean over the 2n anchors, as the code's
    per-video NT-Xent (Eq. 3 sums over t)."""
    batch, views, clips, _ = z.shape
    if views != 2:
        raise ValueError(f"L_D1 contrasts two augmentations of each clip, got {views}")
    flat = z.reshape(batch, views * clips, -1)
    similarity = flat @ flat.transpose(1, 2) / tau  # (B, 2n, 2n), clip k = a * n + t
    anchors = torch.arange(views * clips, device=z.device)
    positive = similarity[:, anchors, (anchors + clips) % (views * clips)]
    timestamp = anchors % clips
    same_time = timestamp[:, None] == timestamp[None, :]
    negatives = similarity.masked_fill(same_time, float("-inf"))
    return contrastive_terms(positive, negatives, positive_in_denominator).mean(dim=1)


def global_local_contrast(slices: torch.Tensor, local: torch.Tensor, tau: float) -> torch.Tensor:
    """L_D2 per video (Supp. D.2, spec (b)): (B, n, D) each -> (B,).

    slices[:, t] = l_t, the projection of the global clip's t-th unpooled temporal slice;
    local[:, u] = d_u, the pooled projection of local clip u. With S = l d^T / tau, the loss is
    cross-entropy of each row S_t. with target t and of each column S_.u with target u, averaged
    over the 2n rows and columns (TCLR's code sums over them and halves: n times this)."""
    batch, clips, _ = slices.shape
    logits = slices @ local.transpose(1, 2) / tau  # [t, u]
    rows_then_columns = torch.cat([logits, logits.transpose(1, 2)], dim=1)  # (B, 2n, n)
    target = torch.arange(clips, device=slices.device).repeat(2 * batch)
    cross_entropy = F.cross_entropy(rows_then_columns.flatten(0, 1), target, reduction="none")
    return cross_entropy.view(batch, 2 * clips).mean(dim=1)


def temporal_slices(feature_map: torch.Tensor, n: int) -> torch.Tensor:
    """(B, F, T', H', W') -> (B, n, F): spatial mean, then the mean of each of n equal time spans.

    As the code's AdaptiveAvgPool3d((4, 1, 1)) (spec (a)), restricted to T' divisible by n so
    that slice t covers exactly local clip t's span (a shorter map would repeat slices)."""
    frames = feature_map.shape[2]
    if frames % n:
        raise ValueError(
            f"the global clip's feature map has {frames} time steps, which n = {n} slices cannot "
            "share equally: lengthen the global clip (an R3D-18 divides time by 8) or lower n"
        )
    pooled = feature_map.mean(dim=(3, 4))  # (B, F, T')
    return pooled.unflatten(2, (n, frames // n)).mean(dim=3).transpose(1, 2)


# ---------------------------------------------------------------- similarity score


def similarity_score(z: torch.Tensor) -> torch.Tensor:
    """Eq. 5-6 for one teacher: (B, n, D) clip projections -> (B,) mean off-diagonal cosine.

    In [-1, 1]: 1 when a video's clips embed alike (temporally invariant), lower when distinct."""
    unit = F.normalize(z.float(), dim=-1)
    cosine = unit @ unit.transpose(1, 2)  # C, (B, n, n)
    n = z.shape[1]
    off_diagonal = cosine.sum(dim=(1, 2)) - cosine.diagonal(dim1=1, dim2=2).sum(dim=1)
    return off_diagonal / (n * (n - 1))


def temporal_score(
    score_first: torch.Tensor, score_second: torch.Tensor, clamp: bool = False
) -> torch.Tensor:
    """Eq. 6: s = the mean of two SSL teachers' similarity_score per video (the paper's pair:
    f_I and f_D).

    spec (d): the paper does not normalise s (it lies in [-1, 1]); clamp=True clips it to [0, 1],
    our own option, so that p_T (Eq. 7) stays a convex mixture."""
    score = (score_first + score_second) / 2
    return score.clamp(0.0, 1.0) if clamp else score


# ---------------------------------------------------------------- the SSL teachers


def _has_classifier(model: nn.Module) -> bool:
    return any(p.numel() for p in getattr(model, "fc", nn.Identity()).parameters())


class SSLTeacher(Method):
    """What both SSL teachers share: the backbone `model` (with `.features`, `.feature_map`,
    `.feature_dim`), the projection head g and the embedding of clips.

    num_clips: n local clips per video (spec (a): 4; Table 5 also 2). head_hidden: g's hidden
    width (paper 512, code 128; spec (g)1). embed_dim: 128 (both). tau: 0.1 (paper §4.2, code).
    loss_form: "paper" (Eq. 1 / Eq. 3: no positive in the denominator) or "ntxent" (the code's
    NT-Xent, positive in the denominator; spec (g)2). model.pt keeps the backbone only; the head
    (which Eq. 5 uses) is in the method's checkpoint.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_clips: int,
        tau: float,
        head_hidden: int,
        embed_dim: int,
        loss_form: str,
    ):
        super().__init__()
        if num_clips < 2:
            raise ValueError(f"num_clips must be >= 2 (clips contrast each other), got {num_clips}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        if loss_form not in LOSS_FORMS:
            raise ValueError(f"loss_form must be one of {LOSS_FORMS}, got {loss_form!r}")
        self.model = model
        self.num_clips = num_clips
        self.tau = tau
        self.positive_in_denominator = loss_form == "ntxent"
        self.head = projection_head(model.feature_dim, head_hidden, embed_dim)
        # An SSL step leaves the backbone's classifier (if any) without gradient.
        self.ddp_find_unused_parameters = _has_classifier(model)

    def embed(self, clips: torch.Tensor) -> torch.Tensor:
        """(..., C, T, H, W) clips -> (..., D) L2-normalised float32 projections z = g(f(x))."""
        features = self.model.features(clips.reshape(-1, *clips.shape[-4:]))
        return F.normalize(self.head(features).float(), dim=-1).view(*clips.shape[:-4], -1)

    def local_clips(self, batch: dict) -> torch.Tensor:
        """The batch's (B, A, n, C, T, H, W) local clips, checked against num_clips."""
        video = prepare_video(batch["video"])
        if video.dim() != 7 or video.shape[2] != self.num_clips:
            raise ValueError(
                f"{type(self).__name__} expects 'video' of shape (B, A, n={self.num_clips}, C, T, "
                f"H, W), got {tuple(video.shape)}"
            )
        return video

    def global_clip(self, batch: dict) -> torch.Tensor:
        """The batch's (B, A_g, C, T_g, H, W) global clip."""
        if "global" not in batch:
            raise KeyError(f"{type(self).__name__} with a global-clip loss needs batch['global']")
        # The trainer normalises only "video"; this is a no-op on float clips.
        clip = prepare_video(batch["global"])
        if clip.dim() != 6:
            raise ValueError(f"'global' must be (B, A_g, C, T, H, W), got {tuple(clip.shape)}")
        return clip


class InvariantSSL(SSLTeacher):
    """f_I's pre-training (spec (a)): L_I over the n local clips of each video.

    Batch: "video" (B, A, n, C, T, H, W) with A = 1 (Eq. 1 as written) or 2 (the code's two
    augmentations per clip: all A*n clips of a video are mutual positives, so same-timestamp
    pairs across augmentations are positives too); "global" (B, 2, C, T_g, H, W) only when
    global_weight > 0.

    loss_form: default "paper" (Eq. 1); "ntxent" is the code's form. global_weight: weight of
    the code's instance term between the global clip's two augmentations (same loss form),
    default 0 (not in the paper). Scale: we average the clip pairs; the code sums its 56 pair
    NT-Xents and divides by 4, i.e. 14 x ours at A = 2, n = 4, with the global term at weight 1,
    so global_weight = 1/14 reproduces the code's balance (up to that factor of 14).
    head_hidden: default 512 (paper), 128 in the code.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_clips: int = 4,
        tau: float = 0.1,
        head_hidden: int = 512,
        embed_dim: int = 128,
        loss_form: str = "paper",
        global_weight: float = 0.0,
    ):
        super().__init__(
            model,
            num_clips=num_clips,
            tau=tau,
            head_hidden=head_hidden,
            embed_dim=embed_dim,
            loss_form=loss_form,
        )
        if global_weight < 0:
            raise ValueError(f"global_weight must be >= 0, got {global_weight}")
        self.global_weight = global_weight

    def training_step(self, batch: dict) -> StepOutput:
        z = self.embed(self.local_clips(batch))  # (B, A, n, D)
        z_global = self.embed(self.global_clip(batch)) if self.global_weight else None
        if z_global is not None and z_global.shape[1] < 2:
            raise ValueError("the global instance term needs two augmentations of the global clip")
        with torch.autocast(z.device.type, enabled=False):
            local = cross_video_contrast(z.flatten(1, 2), self.tau, self.positive_in_denominator)
            loss = local.mean()
            logs = {"instance_local": loss.detach()}
            if z_global is not None:
                instance_global = cross_video_contrast(
                    z_global, self.tau, self.positive_in_denominator
                ).mean()
                loss = loss + self.global_weight * instance_global
                logs["instance_global"] = instance_global.detach()
            logs["clip_similarity"] = similarity_score(z[:, 0].detach()).mean()
        return StepOutput(loss=loss, logs=logs)


class DistinctiveSSL(SSLTeacher):
    """f_D's pre-training (spec (b)): L_D = local_weight * L_D1 + global_weight * L_D2.

    Batch: "video" (B, 2, n, C, T, H, W), two augmentations of each local clip (L_D1 needs them;
    with local_weight = 0 one is enough); "global" (B, A_g, C, T_g, H, W) when global_weight > 0,
    whose backbone feature map must have a multiple of n time steps (temporal_slices).

    Both terms are per-video means, averaged over the batch, so 1:1 weights are 1:1 per sample
    (spec (g)3). The code instead sums L_D1's per-video NT-Xent over the batch (B x ours) and sums
    L_D2 over the {global, global'} x {local, local'} pairs of rows and columns (A_g * A * n x
    ours, 16 at n = 4); ours averages L_D2 over the available augmentation pairs.
    loss_form applies to L_D1 (default "paper", Eq. 3); L_D2 is cross-entropy in both.
    head_hidden: default 512 (paper), 128 in the code.
    instance_weight: adds instance_weight * L_I (InvariantSSL's loss on the same local clips):
    0 for f_D; 1 gives the full TCLR pre-training (instance + local-local + global-local, spec
    (b), "TB conf_ssl.py"), the student's initialisation (spec (e)).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_clips: int = 4,
        tau: float = 0.1,
        head_hidden: int = 512,
        embed_dim: int = 128,
        loss_form: str = "paper",
        local_weight: float = 1.0,
        global_weight: float = 1.0,
        instance_weight: float = 0.0,
    ):
        super().__init__(
            model,
            num_clips=num_clips,
            tau=tau,
            head_hidden=head_hidden,
            embed_dim=embed_dim,
            loss_form=loss_form,
        )
        if min(local_weight, global_weight) < 0 or local_weight + global_weight == 0:
            raise ValueError("local_weight and global_weight must be >= 0, not both 0")
        if instance_weight < 0:
            raise ValueError(f"instance_weight must be >= 0, got {instance_weight}")
        self.instance_weight = instance_weight
        self.local_weight = local_weight
        self.global_weight = global_weight

    def slice_embeddings(self, global_clip: torch.Tensor) -> torch.Tensor:
        """(B, A_g, C, T_g, H, W) -> (B, A_g, n, D): l_t = g(t-th unpooled slice), normalised."""
        feature_map = self.model.feature_map(global_clip.reshape(-1, *global_clip.shape[-4:]))
        slices = temporal_slices(feature_map, self.num_clips)  # (B * A_g, n, F)
        projected = self.head(slices.flatten(0, 1)).float()
        return F.normalize(projected, dim=-1).view(*global_clip.shape[:2], self.num_clips, -1)

    def training_step(self, batch: dict) -> StepOutput:
        z = self.embed(self.local_clips(batch))  # (B, A, n, D)
        slices = self.slice_embeddings(self.global_clip(batch)) if self.global_weight else None
        loss = z.new_zeros(())
        logs = {}
        with torch.autocast(z.device.type, enabled=False):
            if self.local_weight:
                local_local = within_video_contrast(
                    z, self.tau, self.positive_in_denominator
                ).mean()
                loss = loss + self.local_weight * local_local
                logs["local_local"] = local_local.detach()
            if slices is not None:
                global_local = torch.stack(
                    [
                        global_local_contrast(slices[:, g], z[:, a], self.tau)
                        for g in range(slices.shape[1])
                        for a in range(z.shape[1])
                    ]
                ).mean()
                loss = loss + self.global_weight * global_local
                logs["global_local"] = global_local.detach()
            if self.instance_weight:
                instance = cross_video_contrast(
                    z.flatten(1, 2), self.tau, self.positive_in_denominator
                ).mean()
                loss = loss + self.instance_weight * instance
                logs["instance_local"] = instance.detach()
            logs["clip_similarity"] = similarity_score(z[:, 0].detach()).mean()
        return StepOutput(loss=loss, logs=logs)


# ---------------------------------------------------------------- the student


def teacher_mixture(
    p_invariant: torch.Tensor, p_distinctive: torch.Tensor, score: torch.Tensor | float
) -> torch.Tensor:
    """Eq. 7: p_T = s p_I + (1 - s) p_D, with s per video (B,) or one number."""
    score = torch.as_tensor(score, dtype=p_invariant.dtype, device=p_invariant.device)
    if score.dim() == 1:
        score = score[:, None]
    return score * p_invariant + (1 - score) * p_distinctive


def distillation_distance(
    p_teacher: torch.Tensor, student_logits: torch.Tensor, distance: str, class_reduction: str
) -> torch.Tensor:
    """D(p_T, p_S) per clip, (B,) (Eq. 8, Table 6): "l2" (p_T - p_S)^2, "kl" KL(p_T || p_S) or
    "js" the Jensen-Shannon divergence, summed over classes or averaged ("mean": the code's
    MSELoss / KLDivLoss reduction 'mean' over B x C, to which its omegas 50 and 100 belong)."""
    log_student = F.log_softmax(student_logits, dim=1)
    if distance == "l2":
        per_class = (p_teacher - log_student.exp()) ** 2
    elif distance == "kl":
        per_class = torch.special.xlogy(p_teacher, p_teacher) - p_teacher * log_student
    else:
        p_student = log_student.exp()
        log_mean = torch.logaddexp(p_teacher.log(), log_student) - math.log(2)
        per_class = (
            torch.special.xlogy(p_teacher, p_teacher)
            - p_teacher * log_mean
            + p_student * log_student
            - p_student * log_mean
        ) / 2
    return per_class.sum(dim=1) if class_reduction == "sum" else per_class.mean(dim=1)


def _frozen(teacher: nn.Module) -> nn.Module:
    teacher.requires_grad_(False)
    return teacher.eval()


class TimeBalanceStudent(Method):
    """The student (spec (e)): CE on labeled clips + omega * D(p_T, p_S) on every clip.

    loss = CE (mean over clips with label >= 0; -1 = unlabeled)
         + omega_labeled * mean_{labeled} D + omega_unlabeled * mean_{unlabeled} D.
    Teachers are fine-tuned classifiers (nn.Modules returning logits) that see the student's own
    augmented clip; p = softmax of their logits. They are frozen (requires_grad False, so the
    trainer's optimiser never gets them), always in eval mode, run under no_grad, and are not
    part of `model` (model.pt); they are in the method's checkpoint. Freezing mutates the modules
    passed in. A teacher the variant does not use is not kept.

    teachers / reweight (Tables 2-3): "both" + reweight=True: s = batch["score"] per video (Eq. 7,
    the paper's method); "both" + reweight=False: s = 0.5 (average); "invariant" / "distinctive":
    that teacher alone (reweight must be False); "none": CE only (the supervised baseline).
    distance: "l2" (default, paper and code), "kl", "js" (Table 6). class_reduction: "mean"
    (default, the code's) or "sum" (the squared L2 norm / the divergence itself).
    omega_labeled / omega_unlabeled: the code's 50 and 100 (defaults); the paper has one omega,
    value not stated (spec (g)5): with equal labeled and unlabeled counts per batch (the code's
    16 + 16), omega * mean over all clips = omega / 2 for each.

    Batch: "video" (B, C, T, H, W), "label" (B,) with -1 for unlabeled clips, and "score" (B,)
    float, the video's precomputed s (temporal_score), when teachers="both" and reweight.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        invariant_teacher: nn.Module | None = None,
        distinctive_teacher: nn.Module | None = None,
        teachers: str = "both",
        reweight: bool = True,
        distance: str = "l2",
        class_reduction: str = "mean",
        omega_labeled: float = 50.0,
        omega_unlabeled: float = 100.0,
    ):
        super().__init__()
        if teachers not in TEACHERS:
            raise ValueError(f"teachers must be one of {TEACHERS}, got {teachers!r}")
        if reweight and teachers != "both":
            raise ValueError(f"reweight mixes two teachers; pass reweight=False with {teachers!r}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if class_reduction not in CLASS_REDUCTIONS:
            raise ValueError(
                f"class_reduction must be one of {CLASS_REDUCTIONS}, got {class_reduction!r}"
            )
        if min(omega_labeled, omega_unlabeled) < 0:
            raise ValueError("omega_labeled and omega_unlabeled must be >= 0")
        if not _has_classifier(model):
            raise ValueError("the student needs a classifier (num_classes > 0)")
        uses_invariant = teachers in ("both", "invariant")
        uses_distinctive = teachers in ("both", "distinctive")
        if uses_invariant and invariant_teacher is None:
            raise ValueError(f"teachers={teachers!r} needs invariant_teacher")
        if uses_distinctive and distinctive_teacher is None:
            raise ValueError(f"teachers={teachers!r} needs distinctive_teacher")
        self.model = model
        self.invariant_teacher = _frozen(invariant_teacher) if uses_invariant else None
        self.distinctive_teacher = _frozen(distinctive_teacher) if uses_distinctive else None
        self.teachers = teachers
        self.reweight = reweight
        self.distance = distance
        self.class_reduction = class_reduction
        self.omega_labeled = omega_labeled
        self.omega_unlabeled = omega_unlabeled

    def train(self, mode: bool = True) -> "TimeBalanceStudent":
        # Teachers always predict in eval mode (BatchNorm running statistics, no dropout).
        super().train(mode)
        for teacher in (self.invariant_teacher, self.distinctive_teacher):
            if teacher is not None:
                teacher.eval()
        return self

    @torch.no_grad()
    def teacher_prediction(self, video: torch.Tensor, batch: dict) -> torch.Tensor:
        """p_T (B, C) for this variant, in float32."""
        if self.teachers == "distinctive":
            return F.softmax(self.distinctive_teacher(video).float(), dim=1)
        p_invariant = F.softmax(self.invariant_teacher(video).float(), dim=1)
        if self.teachers == "invariant":
            return p_invariant
        p_distinctive = F.softmax(self.distinctive_teacher(video).float(), dim=1)
        if not self.reweight:
            return teacher_mixture(p_invariant, p_distinctive, 0.5)
        if "score" not in batch:
            raise KeyError("a reweighting student needs batch['score'] (the videos' s)")
        score = batch["score"].to(p_invariant.device, torch.float32)
        return teacher_mixture(p_invariant, p_distinctive, score)

    def training_step(self, batch: dict) -> StepOutput:
        video = batch["video"]
        logits = self.model(video)
        labels = batch["label"]
        labeled = labels >= 0
        labeled_count = labeled.sum().clamp(min=1)  # a batch without labels adds no CE
        ce = F.cross_entropy(logits.float(), labels, ignore_index=-1, reduction="sum")
        ce = ce / labeled_count
        logs = {"ce": ce.detach()}
        if self.teachers == "none":
            return StepOutput(loss=ce, logits=logits, logs=logs)
        target = self.teacher_prediction(video, batch)
        if target.shape != logits.shape:
            raise ValueError(
                f"teachers give {tuple(target.shape)} scores, the student {tuple(logits.shape)}"
            )
        with torch.autocast(logits.device.type, enabled=False):
            per_clip = distillation_distance(
                target, logits.float(), self.distance, self.class_reduction
            )
            distill_labeled = (per_clip * labeled).sum() / labeled_count
            distill_unlabeled = (per_clip * ~labeled).sum() / (~labeled).sum().clamp(min=1)
        loss = ce + self.omega_labeled * distill_labeled + self.omega_unlabeled * distill_unlabeled
        logs["distill_labeled"] = distill_labeled.detach()
        logs["distill_unlabeled"] = distill_unlabeled.detach()
        return StepOutput(loss=loss, logits=logits, logs=logs)
