"""Quantization-aware training on a Linear's own number format (straight-through estimator).

Each quantized Linear of the student (``CompressionState.quantized``) gets a parametrization of its
weight (``torch.nn.utils.parametrize``): the trained parameter is a float *latent* weight, initialised
with the dequantized codes (so training starts from exactly the compressed model), and every forward
uses its fake-quantized value

    ŵ = fmt.dequantize(fmt.quantize(w ⊙ m, qp), qp)      (m: the pruning mask, 1 without one)

with the straight-through estimator of Bengio et al. 2013 / QAT practice: ∂ŵ/∂w = 1 where w rounds
onto the grid without clipping (|w − ŵ| ≤ scale/2) and 0 where it is clipped (PACT/LSQ's boundary
rule), times the mask. The format answers both questions (codes and values), so int grids and
llama.cpp blocks train alike. The group parameters qp are the stage's own (fixed), or with
``learn_scales`` the scales (and q4_1/q5_1's minima) are parameters too: ŵ is linear in them for fixed
codes, so they get the gradient of the dequantization (codes held fixed, as in PEQA, Kim et al. 2023).
Learned parameters enter the forward as the folder stores them, rounded to fp16 (int scales clamped to
≥ 2⁻²⁴ as the format does) with a straight-through gradient, so the grid trained on is the grid exported
(the loop gives them their own, smaller learning rate: ``scale_lr``).

At the end :func:`finish` removes the parametrizations and re-quantizes each latent weight onto its
grid: new codes on the stored (rounded) parameters, the model's weight set to ``dequantize(codes, qp)``
exactly (the last forward's weight), ``CompressionState.quantized`` replaced, so the GGUF and ONNX
exporters write the trained codes bit for bit.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.utils import parametrize

from llmopt.core.state import QuantizedLinear
from llmopt.formats import IntFormat, QParams, QuantFormat
from llmopt.linears import is_transposed, write_weight


class FakeQuant(nn.Module):
    """Parametrization weight ← fake_quant(latent) for one Linear (weights in the module's layout)."""

    def __init__(self, q: QuantizedLinear, mask: torch.Tensor | None, learn_scales: bool):
        super().__init__()
        self.fmt: QuantFormat = q.fmt
        self.transposed = q.transposed
        qp = q.qparams.on_grid()  # nearest grid point (llama.cpp's reference rounding is for RTN only)
        scale, zero = qp.scale.float().clone(), qp.zero.float().clone()
        learn_zero = learn_scales and q.fmt.gguf_type is not None and not q.fmt.symmetric  # q4_1/q5_1 min
        self.scale = nn.Parameter(scale, requires_grad=learn_scales) if learn_scales else None
        self.zero = nn.Parameter(zero, requires_grad=True) if learn_zero else None
        self.register_buffer("fixed_scale", scale, persistent=False)
        self.register_buffer("fixed_zero", zero, persistent=False)
        self.register_buffer("mask", None if mask is None else mask.to(torch.bool), persistent=False)

    def qparams(self) -> QParams:
        """The group parameters of the forward: fixed ones as they are (already stored values), learned ones
        rounded as the folder stores them, straight-through (value of the rounding, gradient of identity)."""
        scale, zero = self.fixed_scale, self.fixed_zero
        if self.scale is not None:
            stored = self.scale.detach().to(torch.float16).float()
            if isinstance(self.fmt, IntFormat):
                stored = stored.clamp(min=2**-24)  # as IntFormat._range_params; zero points stay integers
            scale = self.scale + (stored - self.scale.detach())
        if self.zero is not None:  # q4_1/q5_1 min m, fp16 in the block
            zero = self.zero + (self.zero.detach().to(torch.float16).float() - self.zero.detach())
        return QParams(scale, zero)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        w = latent.t() if self.transposed else latent  # (out, in)
        if self.mask is not None:
            w = w * self.mask
        qp = self.qparams()
        codes = self.fmt.quantize(w.detach().float(), QParams(qp.scale.detach(), qp.zero.detach()))
        value = self.fmt.dequantize(codes, qp)  # differentiable in qp for fixed codes
        half_step = (qp.scale.detach().abs() / 2).repeat_interleave(w.shape[1] // qp.n_groups, dim=1)
        through = (w.detach().float() - value.detach()).abs() <= half_step * (1 + 1e-6)  # bool: 1 byte saved
        w_hat = value.to(w.dtype) + (w - w.detach()) * through  # STE: gradient 1 on the grid's range
        return w_hat.t() if self.transposed else w_hat


def attach(
    model: nn.Module, quantized: dict[str, QuantizedLinear], masks: dict[str, torch.Tensor], learn_scales: bool
) -> dict[str, FakeQuant]:
    """Parametrize every quantized Linear's weight; returns the parametrizations by Linear name."""
    out = {}
    for name, q in quantized.items():
        lin = model.get_submodule(name)
        fq = FakeQuant(q, masks.get(name), learn_scales).to(lin.weight.device)
        parametrize.register_parametrization(lin, "weight", fq)
        out[name] = fq
    return out


@contextlib.contextmanager
def once_per_step(model: nn.Module, fqs: dict[str, FakeQuant]):
    """Within one optimizer step the latent weights do not change: every micro-batch reuses the fake-quantized
    weights computed on entry (``parametrize.cached``; their graph is shared, so each micro-batch's backward
    must retain it). Saves the quantize/dequantize of every weight on all but one micro-batch of a step; the
    values and gradients are the same. Computed on entry, outside any activation-checkpointed region, so a
    recomputation sees the same saved tensors as the first forward."""
    if not fqs:
        yield
        return
    with parametrize.cached():
        for name in fqs:
            model.get_submodule(name).weight  # noqa: B018 (fills the cache)
        yield


def latent(model: nn.Module, name: str) -> nn.Parameter:
    """The trained float parameter behind a parametrized Linear's weight."""
    return model.get_submodule(name).parametrizations.weight.original


@torch.no_grad()
def finish(model: nn.Module, fqs: dict[str, FakeQuant], quantized: dict[str, QuantizedLinear]) -> dict[str, dict]:
    """Remove the parametrizations; re-quantize each latent onto its grid; update ``quantized`` in place.
    Returns per Linear: codes changed, pruned weights left non-zero (grids without an exact 0)."""
    report = {}
    for name, fq in fqs.items():
        lin = model.get_submodule(name)
        parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
        w = lin.weight.detach()
        w = (w.t() if is_transposed(lin) else w).float()  # (out, in)
        if fq.mask is not None:
            w = w * fq.mask
        qp = fq.qparams()
        qp = QParams(qp.scale.detach().float().contiguous(), qp.zero.detach().float().contiguous())
        codes = fq.fmt.quantize(w, qp)
        write_weight(lin, fq.fmt.dequantize(codes, qp))
        old = quantized[name]
        quantized[name] = QuantizedLinear(codes, qp, fq.fmt, old.transposed)
        entry = {"codes_changed": float((codes != old.codes).float().mean())}
        if fq.mask is not None:
            entry["pruned_nonzero"] = int((fq.fmt.dequantize(codes, qp)[~fq.mask] != 0).sum())
        report[name] = entry
    return report
