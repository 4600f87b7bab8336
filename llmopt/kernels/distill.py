"""Distillation losses: tensors in, loss out (no model, no I/O).

Logit distillation compares the teacher's next-token distribution p with the student's q at every
position (Hinton et al. 2015, §2: both softened by a temperature T, the loss multiplied by T² so its
gradients keep their scale as T changes).

* forward KL(p‖q) = Σ p (log p − log q), the classic KD loss (mass-covering; Minitron distils with it);
* reverse KL(q‖p) (mode-seeking, MiniLLM, Gu et al. 2024);
* generalized JSD_β(p‖q) = β KL(p‖m) + (1−β) KL(q‖m), m = βp + (1−β)q (GKD, Agarwal et al. 2024,
  Eq. 2; β → 0 behaves like forward KL, β → 1 like reverse KL);
* SquareHead (Kurtic et al. 2023, §3.2): Σ_l MSE(h_l^s, h_l^t) / MSE(h_l^t, 0), each layer's
  hidden-state error normalised by the teacher's energy so every layer weighs alike.

Top-k teachers. A cached teacher keeps only its k most likely tokens per position, their logits and the
log of the mass outside them. Both distributions are then compared on the same k + 1 buckets: the
teacher's k tokens and one *tail* bucket holding everything else. The student's bucket probabilities
come from its full softmax (its own mass on the k tokens, and the rest of its mass, computed as a
masked logsumexp so no cancellation happens). This is the exact divergence of the two distributions
coarsened onto those buckets: a lower bound of the full-vocabulary divergence (data processing),
zero only when the student matches the teacher on the k tokens and on the total tail mass, and equal to
it when k covers the vocabulary. (Renormalising over the k tokens alone would drop the tail and give
the student no signal about how much mass it puts outside them.)

Shapes: N positions (flattened batch × time), V vocabulary, k kept tokens. Everything in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def student_buckets(logits: Tensor, index: Tensor | None, T: float) -> Tensor:
    """log softmax(logits / T) on the teacher's buckets.

    logits: (N, V); index: (N, k) teacher top-k token ids, or None for the full vocabulary.
    Returns (N, k + 1) log-probabilities (k tokens, then the tail) or (N, V).
    """
    z = logits.float() / T
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (N, 1)
    if index is None:
        return z - lse
    top = z.gather(-1, index) - lse  # (N, k)
    tail = torch.logsumexp(z.scatter(-1, index, -math.inf), dim=-1, keepdim=True) - lse  # (N, 1)
    return torch.cat([top, tail], dim=-1)


def teacher_buckets(top_logits: Tensor, lse: Tensor, log_tail: Tensor, T: float) -> Tensor:
    """The cached teacher's log-probabilities on its buckets at temperature T.

    top_logits: (N, k) raw logits of the top-k tokens; lse: (N,) logsumexp of all logits / T;
    log_tail: (N,) log of the softmax(logits / T) mass outside the top k. Returns (N, k + 1).
    """
    top = top_logits.float() / T - lse.unsqueeze(-1)
    return torch.cat([top, log_tail.unsqueeze(-1)], dim=-1)


def topk_summary(logits: Tensor, k: int, T: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What a top-k teacher cache stores per position: logits (N, V) → top-k logits (N, k), their ids
    (N, k), logsumexp(logits / T) (N,) and the log tail mass at T (N,)."""
    z = logits.float()
    top, index = z.topk(k, dim=-1)  # (N, k), sorted
    zt = z / T
    lse = torch.logsumexp(zt, dim=-1)
    log_tail = torch.logsumexp(zt.scatter(-1, index, -math.inf), dim=-1) - lse
    return top, index, lse, log_tail


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p‖q) per position from log-probabilities (N, C) → (N,); 0·log 0 = 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def divergence(kind: str, logp_teacher: Tensor, logq_student: Tensor, beta: float = 0.5) -> Tensor:
    """Per-position divergence (N,) between teacher p and student q, both (N, C) log-probabilities
    over the same support (the full vocabulary or the k + 1 buckets)."""
    if kind == "forward_kl":
        return _kl(logp_teacher, logq_student)
    if kind == "reverse_kl":
        return _kl(logq_student, logp_teacher)
    if kind == "jsd":  # GKD Eq. 2, m = βp + (1−β)q in log space
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
        logm = torch.logaddexp(logp_teacher + math.log(beta), logq_student + math.log(1 - beta))
        return beta * _kl(logp_teacher, logm) + (1 - beta) * _kl(logq_student, logm)
    raise ValueError(f"unknown divergence {kind!r}; valid: {', '.join(DIVERGENCES)}")


def logit_distill_loss(
    student_logits: Tensor,
    logp_teacher: Tensor,
    index: Tensor | None,
    kind: str = "forward_kl",
    T: float = 1.0,
    beta: float = 0.5,
) -> Tensor:
    """Σ over positions of T² · D(p_T ‖ q_T): student_logits (N, V), logp_teacher (N, k + 1) buckets
    with index (N, k), or (N, V) with index None. A sum, so chunks of positions add up; divide by the
    number of positions for the mean."""
    logq = student_buckets(student_logits, index, T)
    return divergence(kind, logp_teacher, logq, beta).sum() * (T * T)


def token_cross_entropy(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Σ of −log q(label) at T = 1: student_logits (N, V), labels (N,) with −100 = not scored."""
    return F.cross_entropy(student_logits.float(), labels, ignore_index=-100, reduction="sum")


def squarehead_loss(student_hidden: list[Tensor], teacher_hidden: list[Tensor]) -> Tensor:
    """SquareHead (Kurtic et al. 2023, §3.2): Σ_l MSE(h_l^s, h_l^t) / MSE(h_l^t, 0).

    Each list holds one (B, L, H) hidden state per decoder layer (the layer's output)."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student layers but {len(teacher_hidden)} teacher layers")
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for hs, ht in zip(student_hidden, teacher_hidden):
        ht = ht.float()
        total = total + (hs.float() - ht).pow(2).mean() / ht.pow(2).mean().clamp_min(1e-12)
    return total
