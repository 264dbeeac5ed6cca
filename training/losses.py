"""Loss terms and schedules of the RS-M-CLIP recipe.

* CLIP InfoNCE over image/text embeddings with a learnable logit scale.
* DINO-style self-distillation: a projection head (MLP -> L2 -> weight-normalised linear with K
  outputs) on the student image tower and on its EMA teacher; the teacher's global-view outputs,
  centred and sharpened, are the targets for every other student view (global and local crops).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn.functional as F
from torch import nn


def clip_contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised image and text embeddings of matching rows.

    ``logit_scale`` is already exponentiated. Under DDP the other ranks' embeddings are gathered
    (with gradients) and each rank scores its own rows against the whole global batch.
    """
    if world_size > 1:
        all_image = torch.cat(dist_nn.all_gather(image_emb), dim=0)
        all_text = torch.cat(dist_nn.all_gather(text_emb), dim=0)
    else:
        all_image, all_text = image_emb, text_emb
    logits_per_image = logit_scale * image_emb @ all_text.T
    logits_per_text = logit_scale * text_emb @ all_image.T
    labels = torch.arange(image_emb.shape[0], device=image_emb.device) + rank * image_emb.shape[0]
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


class DinoHead(nn.Module):
    """Projection head: MLP -> L2 normalise -> weight-normalised linear layer (unit-norm rows)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError("DinoHead needs n_layers >= 1")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        # Weight normalisation with the gain fixed to 1: each prototype row is used at unit norm.
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.prototypes, dim=-1))


class SelfDistillationLoss(nn.Module):
    """DINO cross-entropy between centred/sharpened teacher global views and all student views.

    Student views are ordered global views first, then local crops; student view ``i`` is not
    compared with teacher view ``i`` (the same crop).
    """

    def __init__(self, out_dim: int, *, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center_ready", torch.zeros((), dtype=torch.bool))

    def forward(
        self,
        student_views: list[torch.Tensor],
        teacher_views: list[torch.Tensor],
        teacher_temp: float,
    ) -> torch.Tensor:
        targets = self.teacher_targets(teacher_views, teacher_temp)
        log_probs = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_views]
        total = student_views[0].new_zeros((), dtype=torch.float32)
        n_terms = 0
        for ti, target in enumerate(targets):
            for si, log_prob in enumerate(log_probs):
                if si == ti:
                    continue
                total = total + torch.sum(-target * log_prob, dim=-1).mean()
                n_terms += 1
        if n_terms == 0:
            raise ValueError("self-distillation needs at least two views")
        return total / n_terms

    @torch.no_grad()
    def teacher_targets(self, teacher_views: list[torch.Tensor], teacher_temp: float) -> list[torch.Tensor]:
        """Centred, sharpened teacher distributions (the distillation targets).

        The centre starts as the first batch's mean teacher output: a centre of zeros would leave the
        outputs' shared component in the first targets, which then sharpen onto one prototype that
        the student already predicts, and the loss would climb while the running centre catches up.
        """
        if not bool(self.center_ready):
            self.center.copy_(self._batch_mean(torch.cat(teacher_views)))
            self.center_ready.fill_(True)
        return [F.softmax((t.float() - self.center) / teacher_temp, dim=-1) for t in teacher_views]

    @torch.no_grad()
    def update_center(self, teacher_outputs: torch.Tensor) -> None:
        """centre <- m * centre + (1 - m) * mean of the teacher outputs (over all ranks)."""
        self.center.mul_(self.center_momentum).add_(self._batch_mean(teacher_outputs), alpha=1.0 - self.center_momentum)

    @staticmethod
    def _batch_mean(teacher_outputs: torch.Tensor) -> torch.Tensor:
        """Mean teacher output over the batch of every rank, [1, K]."""
        batch_sum = teacher_outputs.float().sum(dim=0, keepdim=True)
        count = torch.tensor(float(teacher_outputs.shape[0]), device=teacher_outputs.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        return batch_sum / count


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    for t_param, s_param in zip(teacher.parameters(), student.parameters(), strict=True):
        t_param.mul_(momentum).add_(s_param.detach().to(t_param.dtype), alpha=1.0 - momentum)
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers(), strict=True):
        if t_buf.is_floating_point():
            t_buf.mul_(momentum).add_(s_buf.to(t_buf.dtype), alpha=1.0 - momentum)
        else:
            t_buf.copy_(s_buf)


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (step ``total_steps`` and after)."""
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def teacher_temperature(step: int, warmup_steps: int, warmup_temp: float, final_temp: float) -> float:
    """Linear warm-up of the teacher temperature, then constant."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return final_temp
    return warmup_temp + (final_temp - warmup_temp) * step / warmup_steps


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to ``min_factor``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return cosine_schedule(step - warmup_steps, max(total_steps - warmup_steps, 1), 1.0, min_factor)
