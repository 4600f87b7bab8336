"""The output head and the top-k bucket divergence fused: loss and gradients in one pass per chunk.

The reference path (:func:`llmopt.kernels.distill.logit_distill_loss` on ``head(h)``, one chunk of
positions at a time under activation checkpointing) computes each chunk's (n × V) logits in the forward,
again in the backward's recomputation, and then runs autograd's elementwise graph over them (the two
masked logsumexps, their backward, the scatter's). Here every chunk's logits exist once: the forward
computes the student's k + 1 bucket log-probabilities from them, the divergence's gradient on those
buckets (k + 1 numbers per position, by autograd on the small tensors, so every divergence of
:mod:`llmopt.kernels.distill` works unchanged), and from it the gradient of the logits in place,

    ∂/∂z_v = g_j − G·q_j                              v = index_j (the teacher's j-th token)
    ∂/∂z_v = exp(z_v − lse_tail) · (g_tail − G·q_tail)  v outside the top k

(g = ∂D/∂log q on the buckets, G = Σ g, q the student's bucket probabilities, lse_tail the logsumexp of
the logits outside the top k: every factor is at most 1, no cancellation), then the gradient of the hidden
states (and of the head's weight when it trains). The backward only scales them (the technique of Liger
Kernel's fused linear cross-entropy, Hsu et al. 2024). Per chunk: one head matmul for the logits, one for
the gradient (the reference path runs three), and about six passes over the logits.

The head's matmuls run in ``mm_dtype`` (bfloat16 in mixed precision: the (n × V) products are most of the
head's time); logsumexp, probabilities and gradients are computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math

import torch

from llmopt.kernels.distill import divergence

Tensor = torch.Tensor


def _bucket_gradient(kind: str, logp: Tensor, logq: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Σ_positions D(p‖q) and its gradient ∂/∂log q, both on the (n, k + 1) buckets."""
    with torch.enable_grad():
        lq = logq.detach().requires_grad_(True)
        d = divergence(kind, logp, lq, beta).sum()
        (g,) = torch.autograd.grad(d, lq)
    return d.detach(), g


class _HeadTopKLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, index, logp, kind, T, beta, chunk, mm_dtype):
        acc = torch.promote_types(h.dtype, torch.float32)
        mm = acc if mm_dtype is None else mm_dtype
        w = weight.detach().to(mm)  # (V, H), cast once per call
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=acc, device=h.device)
        for c0 in range(0, h.shape[0], chunk):
            hc = h[c0 : c0 + chunk].detach().to(mm)
            idx = index[c0 : c0 + chunk]
            z = (hc @ w.t()).to(acc)  # (n, V): the only logits of this chunk
            if T != 1.0:
                z.div_(T)
            top = z.gather(-1, idx)  # (n, k)
            z.scatter_(-1, idx, -math.inf)
            tail = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1) over the tokens outside the top k
            lse = torch.logaddexp(tail, torch.logsumexp(top, dim=-1, keepdim=True))
            logq = torch.cat([top - lse, tail - lse], dim=-1)  # (n, k + 1)
            d, g = _bucket_gradient(kind, logp[c0 : c0 + chunk].to(acc), logq, beta)
            total += d * (T * T)
            g = g * T  # T² · ∂/∂(z / T) · 1/T
            q = logq.exp()
            G = g.sum(-1, keepdim=True)
            coef = g[:, -1:] - G * q[:, -1:]
            z.sub_(torch.where(torch.isfinite(tail), tail, 0.0)).exp_().mul_(coef)  # outside the top k
            z.scatter_(-1, idx, g[:, :-1] - G * q[:, :-1])  # the top k
            gz = z.to(mm)
            grad_h[c0 : c0 + chunk] = (gz @ w).to(h.dtype)
            if grad_w is not None:
                grad_w += (gz.t() @ hc).to(acc)
            del z, gz
        ctx.grads = (grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, go):
        grad_h, grad_w = ctx.grads  # freed with the graph
        gw = None if grad_w is None else (grad_w * go).to(grad_w.dtype)
        return grad_h * go.to(grad_h.dtype), gw, None, None, None, None, None, None, None


def head_topk_loss(
    h: Tensor,
    weight: Tensor,
    index: Tensor,
    logp_teacher: Tensor,
    kind: str = "forward_kl",
    T: float = 1.0,
    beta: float = 0.5,
    chunk: int = 512,
    mm_dtype: torch.dtype | None = None,
) -> Tensor:
    """Σ over positions of T² · D(p_T ‖ q_T) on the teacher's k + 1 buckets, q = softmax(h Wᵀ / T):
    :func:`llmopt.kernels.distill.logit_distill_loss` of ``h @ weight.T``, without keeping the logits.

    h: (N, H) hidden states; weight: (V, H) the head (no bias); index: (N, k) the teacher's token ids;
    logp_teacher: (N, k + 1) its bucket log-probabilities. Differentiable in h and weight (once: the
    gradients are computed in the forward). ``mm_dtype``: the head matmuls' dtype (None: float32)."""
    return _HeadTopKLoss.apply(h, weight, index, logp_teacher, kind, float(T), beta, int(chunk), mm_dtype)
