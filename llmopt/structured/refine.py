"""Block-wise refinement after the least-squares refits (BRECQ, Li et al. 2021, §3: reconstruct a whole
block's output rather than each Linear's): a few epochs of Adam on every weight of one cut decoder layer,
its output on the cut model's own inputs pulled toward the target the refits aim at (the uncut residual
entering the next kept layer). The refits of :mod:`llmopt.structured.reconstruct` solve each Linear alone
against its own intermediate target; the attention softmax and the gated MLP between them are what the
joint fit adds. Each token's error is scaled by 1 / rms of its target, the scale the next RMSNorm applies
(the residual stream's magnitude grows with depth and would otherwise weigh late tokens and layers more).

The learning rate decays on a cosine from ``lr`` to zero over all the steps; a layer whose error would end
above the least squares' keeps the least-squares weights (a safeguard for learning rates too high for
the model at hand).

Measured at minitron-60 on SmolLM2-135M (128 calibration windows, 8 windows a text, wiki / Lee, the same
cut; probes of 2026-12-05): least squares alone 59.6 / 96.1; 4 epochs at a constant lr 1e-4 56.1 / 87.8,
3e-4 53.5 / 80.3 (54.8 / 81.5 in eval/results/reconstruct-60.md's run), 1e-3 53.6 / 77.2; cosine from 2e-3
51.6 / 76.1 (the default), each +~6 minutes on 2 cores in bfloat16.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmopt.calibration.capture import hidden_of


def _error(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of ``y`` against ``target``, each token scaled by 1 / rms of its target."""
    d = (y.float() - target) * torch.rsqrt(target.pow(2).mean(-1, keepdim=True) + 1e-6)
    return d.pow(2).mean()


def refine_layer(
    layer: nn.Module,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    layer_args: list[tuple[tuple, dict]],
    epochs: int,
    lr: float,
    bf16: bool = False,
    seed: int = 0,
) -> tuple[float, float]:
    """Adam on every parameter of ``layer`` for ``epochs`` passes over the batches (``inputs[k]`` with
    ``layer_args[k]`` should give ``targets[k]``), in a seeded order, the learning rate decaying on a
    cosine from ``lr`` to 0; the forward under bfloat16 autocast when ``bf16`` (float32 weights and
    optimizer). Returns the mean error before and after; if it ends higher, the weights are put back."""

    def mean_error() -> float:
        with torch.no_grad():
            errs = [
                float(_error(hidden_of(layer(x, *a, **kw)), t))
                for x, t, (a, kw) in zip(inputs, targets, layer_args, strict=True)
            ]
        return sum(errs) / len(errs)

    before = mean_error()
    params = list(layer.parameters())
    start = [p.detach().clone() for p in params]
    was = [p.requires_grad for p in params]
    g = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=lr)
            steps = max(1, epochs * len(inputs))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
            for _ in range(epochs):
                for k in torch.randperm(len(inputs), generator=g).tolist():
                    a, kw = layer_args[k]
                    dev = inputs[k].device.type
                    with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
                        y = hidden_of(layer(inputs[k], *a, **kw))
                    loss = _error(y, targets[k])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
    finally:
        for p, w in zip(params, was, strict=True):
            p.requires_grad_(w)
            p.grad = None
    after = mean_error()
    if not after <= before:  # diverged (or NaN): keep what the least squares gave
        with torch.no_grad():
            for p, w in zip(params, start, strict=True):
                p.copy_(w)
        after = mean_error()
    return before, after
