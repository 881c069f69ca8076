"""BatchNorm over the global batch: statistics summed across ranks, so N ranks normalise exactly
as one process would on the whole batch.

``convert_sync_batchnorm(module, device)`` swaps every ``nn.BatchNorm{1,2,3}d``: for torch's
:class:`torch.nn.SyncBatchNorm` on GPUs, for :class:`GlobalBatchNorm` on the CPU (torch's runs
only on accelerators). Both all-reduce per-channel sums in the forward pass and the gradients
through them in the backward pass.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (any device, gloo too).

    One all-reduce of ``[sum, sum of squares, count]`` per channel per call, differentiable
    (``torch.distributed.nn.functional.all_reduce``), so each rank's gradient includes its
    samples' effect on the other ranks' normalisation, as in one process.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.size(1)
        dims = [0, *range(2, x.dim())]
        count = x.new_full((1,), x.numel() // c)
        stats = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c : 2 * c] / total - mean * mean).clamp_min(0)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            tracked, running_mean = self.num_batches_tracked, self.running_mean
            running_var = self.running_var
            # track_running_stats: BatchNorm registered all three buffers
            assert tracked is not None and running_mean is not None and running_var is not None
            with torch.no_grad():
                tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                running_mean.lerp_(mean.detach().to(running_mean.dtype), m)
                unbiased = var.detach() * total / (total - 1).clamp_min(1)
                running_var.lerp_(unbiased.to(running_var.dtype), m)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm layer normalising over the global batch."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, (GlobalBatchNorm, nn.SyncBatchNorm)
    ):
        out = GlobalBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            with torch.no_grad():
                out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert(child))
    return out
