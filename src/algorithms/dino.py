"""DINO (Caron et al., 2021): self-distillation with multi-crop, a centred and sharpened teacher."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import torch
from pydantic import Field
from torch import nn

from src.algorithms.ssl_base import SSLTask, cosine_momentum, ema_update, frozen_copy
from src.core.registry import TASKS, TRANSFORMS
from src.models.heads import DINOHead
from src.models.losses import dino_loss


@TASKS.register("dino")
class DINO(SSLTask):
    """Student sees every crop, the teacher (EMA of the student) only the global ones.

    The teacher's outputs are centred (``center``: an EMA of their mean, checkpointed) and
    sharpened with a temperature that warms up linearly from ``warmup_teacher_temp`` to
    ``teacher_temp`` over ``warmup_teacher_temp_steps``; the teacher momentum follows a cosine from
    ``base_momentum`` to 1. As in the reference head, ``use_bn`` puts BatchNorm in the head's MLP
    (on small backbones whose random features barely differ between images, it keeps the
    teacher's targets apart), and the prototypes can be held fixed for the first
    ``freeze_last_layer_steps`` steps.
    """

    default_views = {"type": "batch_multi_crop", "global_views": 2, "local_views": 4}
    center: torch.Tensor  # buffers, registered in configure
    steps_done: torch.Tensor

    def __init__(
        self,
        model,
        out_dim: Annotated[
            int, Field(gt=0, description="prototypes (output width of the head)")
        ] = 256,
        hidden: Annotated[int, Field(gt=0, description="hidden width of the head's MLP")] = 256,
        bottleneck: Annotated[int, Field(gt=0, description="width before the prototypes")] = 64,
        student_temp: Annotated[
            float, Field(gt=0, description="softmax temperature of the student")
        ] = 0.1,
        teacher_temp: Annotated[
            float, Field(gt=0, description="softmax temperature of the teacher after warm-up")
        ] = 0.04,
        warmup_teacher_temp: Annotated[
            float, Field(gt=0, description="teacher temperature at the start")
        ] = 0.02,
        warmup_teacher_temp_steps: Annotated[
            int, Field(ge=0, description="steps of the linear teacher-temperature warm-up")
        ] = 100,
        center_momentum: Annotated[
            float,
            Field(
                ge=0,
                lt=1,
                description="momentum of the centre subtracted from the teacher's outputs",
            ),
        ] = 0.9,
        base_momentum: Annotated[
            float,
            Field(
                ge=0, lt=1, description="teacher momentum at the start; it follows a cosine to 1"
            ),
        ] = 0.99,
        freeze_last_layer_steps: Annotated[
            int, Field(ge=0, description="steps during which the prototypes do not learn")
        ] = 0,
        use_bn: Annotated[bool, Field(description="BatchNorm in the head's MLP")] = False,
        views: Annotated[
            Optional[dict[str, Any]],
            Field(description="a TRANSFORMS section for the crops (default: batch_multi_crop)"),
        ] = None,
    ):
        super().__init__(model, views)
        self.out_dim, self.hidden, self.bottleneck = out_dim, hidden, bottleneck
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.warmup_temp, self.warmup_steps = warmup_teacher_temp, warmup_teacher_temp_steps
        self.center_momentum, self.base_momentum = center_momentum, base_momentum
        self.freeze_last_steps, self.use_bn = freeze_last_layer_steps, use_bn
        # the views section checked first: its global_views may be any value a YAML holds
        views = TRANSFORMS.validate(self.views, "task.views") if self.views else {}
        self.n_global = int(views.get("global_views", 2))

    def configure(self, info) -> None:
        super().configure(info)
        self.head = DINOHead(self.feat_dim, self.out_dim, self.hidden, self.bottleneck, self.use_bn)
        self.teacher = frozen_copy(nn.Sequential(self.model, self.head))
        self.register_buffer("center", torch.zeros(1, self.out_dim))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def teacher_temperature(self) -> torch.Tensor:
        frac = (self.steps_done.float() / max(self.warmup_steps, 1)).clamp(max=1.0)
        return self.warmup_temp + frac * (self.teacher_temp - self.warmup_temp)

    def training_step(self, batch):
        views = self.batch_views(batch, self.n_global)
        g = self.n_global
        n = views[0].shape[0]
        # the prototypes learn from step freeze_last_layer_steps on (a tensor test: no host sync)
        last_grad = (
            (self.steps_done >= self.freeze_last_steps).float() if self.freeze_last_steps else None
        )
        h_global = self.model(torch.cat(views[:g]))  # (g*N, D)
        student = [self.head(h_global, last_grad)]
        if len(views) > g:  # local crops share one smaller resolution: one more pass
            student.append(self.head(self.model(torch.cat(views[g:])), last_grad))
        student = torch.cat(student).float().chunk(len(views))
        with torch.no_grad():
            t_out = self.teacher(torch.cat(views[:g])).float()
        teacher = t_out.chunk(g)
        loss = dino_loss(
            list(student), list(teacher), self.center, self.student_temp, self.teacher_temperature()
        )
        with torch.no_grad():  # the centre follows the teacher's mean over the global batch
            self.center.mul_(self.center_momentum).add_(
                self.collectives.mean(t_out.mean(0, keepdim=True)), alpha=1 - self.center_momentum
            )
        return {"loss": loss, "features": h_global[:n].detach(), "labels": batch["labels"]}

    def on_step_end(self, step: int, max_steps: int) -> None:
        self.steps_done.add_(1)
        ema_update(
            self.teacher,
            nn.Sequential(self.model, self.head),
            cosine_momentum(self.base_momentum, step, max_steps),
        )
