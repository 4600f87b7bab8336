"""The training objective as one module (so a prepared DDP module sees the whole loss), and its precision.

Per micro-batch the student's trunk runs once, under bfloat16 autocast in mixed precision (matmuls in
bfloat16; the residual stream, norms, softmaxes and the float32 master weights stay float32). The output
head and the logit loss then run on chunks of ``chunk_tokens`` positions, so (positions × vocabulary)
logits exist for one chunk at a time (SmolLM2: 512 × 49152 floats ≈ 100 MB):

* fused (``fused_loss``, the default for a cached top-k teacher without a CE term): each chunk's logits
  are computed once and give the loss and its gradients in the forward
  (:func:`llmopt.kernels.distill_head.head_topk_loss`; head matmuls in bfloat16 in mixed precision, the
  softmax and the gradient in float32);
* reference: each chunk under activation checkpointing (logits in the forward and again in the backward),
  :func:`llmopt.kernels.distill.logit_distill_loss`, all in float32. Full-logit teachers, a CE term,
  logit soft-capping and the held-out evaluation take this path; the held-out loss is always computed
  in float32 without autocast, so curves of runs in different precisions compare.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmopt.distill.config import DistillConfig
from llmopt.distill.heads import last_hidden, layer_outputs, ordered, output_head
from llmopt.distill.teacher import Targets
from llmopt.kernels.distill import divergence, logit_distill_loss, squarehead_loss, student_buckets, token_cross_entropy
from llmopt.kernels.distill_head import head_topk_loss


def fused_head_weight(model: nn.Module) -> torch.Tensor | None:
    """The (V, H) weight of a plain bias-free Linear head without soft-capping, else None (reference path)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return None
    if getattr(getattr(model, "config", None), "final_logit_softcapping", None):
        return None
    return head.weight


class DistillLoss(nn.Module):
    """forward(ids, targets) → (loss, parts): the whole objective, so a prepared (DDP) module sees it.
    ``precision``: ``bf16`` (own autocast of the trunk, bfloat16 head matmuls) or anything else (float32;
    ``fp16`` is accelerate's autocast around this module)."""

    def __init__(self, student: nn.Module, cfg: DistillConfig, precision: str = "no"):
        super().__init__()
        self.student = student
        self.cfg = cfg
        self.precision = precision

    def _autocast(self, h_device: torch.device, enabled: bool):
        if not enabled or self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(h_device.type, dtype=torch.bfloat16)

    def forward(self, ids: torch.Tensor, tgt: Targets, at_one: bool = False) -> tuple[torch.Tensor, dict]:
        c = self.cfg
        with layer_outputs(self.student, enabled=c.hidden_weight > 0) as store:
            with self._autocast(ids.device, enabled=not at_one):
                h = last_hidden(self.student, ids)  # (B, L, H)
        B, L, H = h.shape
        h = h.float().reshape(B * L, H)
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).reshape(-1)  # (B·L,)
        weight = None if at_one else self._fused(tgt)
        kl = ce = kl1 = h.new_zeros((), dtype=torch.float32)
        if weight is not None:
            logp, index = tgt.log_probs(slice(None), c.temperature)
            mm = torch.bfloat16 if self.precision == "bf16" else None
            with torch.autocast(ids.device.type, enabled=False):  # accelerate's fp16 autocast: not here
                kl = head_topk_loss(h, weight, index, logp, c.loss, c.temperature, c.beta, c.chunk_tokens, mm)
        for c0 in range(0, B * L, c.chunk_tokens) if weight is None else ():
            rows = slice(c0, c0 + c.chunk_tokens)
            logp, index = tgt.log_probs(rows, c.temperature) if c.loss_weight > 0 else (None, None)
            if at_one:  # held-out: no graph, plus KL at T = 1 (NaN without teacher logits: a CE-only run)
                z = output_head(self.student)(h[rows])
                if tgt.logits is None and tgt.top is None:
                    kl1 = kl1 + float("nan")
                else:
                    lp1, idx1 = tgt.log_probs(rows, c.temperature, at_one=True)
                    kl1 = kl1 + divergence("forward_kl", lp1, student_buckets(z, idx1, 1.0)).sum()
                k, e = self._chunk_from_logits(z, logp, index, labels[rows])
            elif torch.is_grad_enabled():
                k, e = checkpoint(self._chunk, h[rows], logp, index, labels[rows], use_reentrant=False)
            else:
                k, e = self._chunk(h[rows], logp, index, labels[rows])
            kl, ce = kl + k, ce + e
        n_labels = max(1, B * (L - 1))
        parts = {"kl": kl / (B * L), "ce": ce / n_labels}
        loss = c.loss_weight * parts["kl"] + c.ce_weight * parts["ce"]
        if c.hidden_weight > 0:
            parts["hidden"] = squarehead_loss(ordered(store), tgt.hidden)
            loss = loss + c.hidden_weight * parts["hidden"]
        if at_one:
            parts["kl1"] = kl1 / (B * L)
        return loss, parts

    def _fused(self, tgt: Targets) -> torch.Tensor | None:
        """The head's weight when this micro-batch takes the fused path, else None."""
        c = self.cfg
        if not (c.fused_loss and c.loss_weight > 0 and c.ce_weight == 0 and tgt.index is not None):
            return None
        if not torch.is_grad_enabled():
            return None
        return fused_head_weight(self.student)

    def _chunk(self, h, logp, index, labels):
        return self._chunk_from_logits(output_head(self.student)(h), logp, index, labels)

    def _chunk_from_logits(self, z, logp, index, labels):
        c = self.cfg
        zero = z.new_zeros((), dtype=torch.float32)
        kl = logit_distill_loss(z, logp, index, c.loss, c.temperature, c.beta) if logp is not None else zero
        ce = token_cross_entropy(z, labels) if c.ce_weight > 0 else zero
        return kl, ce
