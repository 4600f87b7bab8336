"""Sparse students: pruned weights stay exactly zero, and gradual sparsity (Zhu & Gupta 2017).

Masks (True = kept, (out, in) like every llmopt mask) come from ``CompressionState.masks`` (the pruning
stages), or, for a float Linear without one that already holds at least ``ZERO_FRACTION`` exact zeros
(a pruned model loaded from a folder), from its zeros. After every backward the gradients of pruned
weights are zeroed (AdamW's moments stay 0 there) and after every optimizer step the weights are
multiplied by their masks, so a pruned weight is exactly 0 after each step, N:M patterns included.

Gradual sparsity raises each target Linear from its current sparsity s_i to ``target`` s_f with the
cubic schedule of Zhu & Gupta (2017, Eq. 1): at the j-th of n updates (j = 1..n, at evenly spaced
fractions of the training budget between ``start`` and ``end``) s_j = s_f + (s_i − s_f)(1 − j/n)³. Each
update recomputes the mask with the pruning kernels (:func:`~llmopt.kernels.magnitude.magnitude_prune`
per matrix, or :func:`~llmopt.kernels.wanda.wanda_prune` per output row on Σx² gathered from the
training forwards since the last update, the previous mask passed as ``prior`` so the rows are topped up
to exactly s_j of the layer however uneven they start) and intersects it with the previous one, so a
pruned weight never comes back.
"""

from __future__ import annotations

import torch
from torch import nn

from llmopt.distill.config import GradualConfig
from llmopt.distill.schedules import cubic_sparsity
from llmopt.kernels.magnitude import magnitude_prune
from llmopt.kernels.wanda import wanda_prune
from llmopt.linears import in_features, is_transposed, weight_oi

ZERO_FRACTION = 0.1


def student_masks(model: nn.Module, masks: dict[str, torch.Tensor], quantized: set[str]) -> dict[str, torch.Tensor]:
    """Keep-masks of the student's Linears (see the module docstring), on the model's device."""
    from llmopt.linears import is_linear

    out = {}
    for name, mod in model.named_modules():
        if not is_linear(mod):
            continue
        if name in masks:
            out[name] = masks[name].to(torch.bool)
        elif name not in quantized:
            W = weight_oi(mod)
            if float((W == 0).float().mean()) >= ZERO_FRACTION:
                out[name] = W != 0
    device = next(model.parameters()).device
    return {n: m.to(device) for n, m in out.items()}


def _param_layout(mod: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    return mask.t() if is_transposed(mod) else mask


class MaskKeeper:
    """Applies the masks to the trained parameters: ``params`` maps a Linear name to the parameter
    holding its weight (the Linear's own, or the latent weight behind a fake-quant parametrization)."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], params: dict[str, nn.Parameter]):
        self.model = model
        self.masks = masks
        self.params = params

    def _pairs(self):
        for name, mask in self.masks.items():
            p = self.params.get(name)
            if p is not None:
                yield p, _param_layout(self.model.get_submodule(name), mask)

    @torch.no_grad()
    def mask_grads(self) -> None:
        for p, m in self._pairs():
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def apply(self) -> None:
        for p, m in self._pairs():
            p.mul_(m)

    def exact(self) -> bool:
        """Every pruned weight is exactly 0."""
        return all(bool((p[~m] == 0).all()) for p, m in self._pairs())


class GradualPruner:
    """Gradual sparsity on the Linears ``names`` (float Linears; their masks live in ``masks``)."""

    def __init__(self, cfg: GradualConfig, model: nn.Module, names: list[str], masks: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.model = model
        self.names = names
        self.masks = masks
        self.done = 0  # updates applied so far
        device = next(model.parameters()).device
        self.initial: dict[str, float] = {}
        for n in names:
            W = weight_oi(model.get_submodule(n))
            if n not in masks:
                masks[n] = torch.ones_like(W, dtype=torch.bool, device=device)
            self.initial[n] = float(1.0 - masks[n].float().mean())
        self.act_sq = {n: torch.zeros(in_features(model.get_submodule(n)), device=device) for n in names}
        self._handles = []
        if cfg.score == "wanda":
            self._handles = [model.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def fn(module, args):
            x = args[0].detach().float()
            self.act_sq[name].add_(x.reshape(-1, x.shape[-1]).pow(2).sum(0))

        return fn

    def point(self, j: int) -> float:
        """The budget fraction at which update j (1..n) happens."""
        c = self.cfg
        return c.start + (c.end - c.start) * j / c.updates

    @torch.no_grad()
    def step(self, progress: float) -> bool:
        """Apply every update whose point ``progress`` has reached; True when masks changed."""
        changed = False
        while self.done < self.cfg.updates and progress >= self.point(self.done + 1) - 1e-12:
            self.done += 1
            self._update(self.done)
            changed = True
        return changed

    def _update(self, j: int) -> None:
        for n in self.names:
            s = cubic_sparsity(self.initial[n], self.cfg.target, j, self.cfg.updates)
            W = weight_oi(self.model.get_submodule(n)).float() * self.masks[n]
            if self.cfg.score == "wanda":
                res = wanda_prune(W, self.act_sq[n], s, prior=self.masks[n])
            else:
                res = magnitude_prune(W, s)
            self.masks[n] = res.mask.to(W.device) & self.masks[n]
        if self.cfg.score == "wanda":
            for v in self.act_sq.values():
                v.zero_()

    def sparsity(self) -> float:
        total = sum(self.masks[n].numel() for n in self.names)
        return sum(float((~self.masks[n]).sum()) for n in self.names) / total

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
