"""Structured pruning kernels: importance scores → what to keep. Pure functions on tensors.

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation",
§2.2): activation-based importance from one forward pass of the model on calibration data,

* MLP neuron i: the mean |activation| of channel i of the MLP's hidden state (the input of the down
  projection, ``act(gate(x)) * up(x)``);
* attention head h: the L2 norm of head h's output (the input of the output projection, head h's
  ``head_dim`` slice), averaged over tokens; a GQA group scores the sum of its query heads, so whole
  groups (one K/V head and the query heads that read it) go together;
* embedding channel c: the mean |activation| of channel c of every normalisation layer's output,
  summed over the layers.

Depth (ShortGPT, Men et al. 2024, §3.1 "Block Influence"; Minitron §2.2): BI of a decoder layer =
1 − cos(input, output) of its hidden states, averaged over tokens; the layers with the lowest BI
change the residual stream least and go first.
"""

from __future__ import annotations

import torch


def keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in ascending index order (so kept channels keep their order).
    Ties go to the lower index (a stable sort), so the choice is deterministic."""
    if not 1 <= k <= scores.numel():
        raise ValueError(f"cannot keep {k} of {scores.numel()}")
    order = torch.sort(scores.double(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def head_scores(o_input: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Σ over tokens of ‖head h's slice‖₂ for an output-projection input ``o_input`` (..., n_heads·head_dim)."""
    x = o_input.reshape(-1, n_heads, o_input.shape[-1] // n_heads).double()
    return x.norm(dim=-1).sum(0)


def group_scores(head_score: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """A GQA group's score: the sum of the scores of the query heads that share its K/V head
    (query heads g·r … g·r + r − 1 with r = n_heads / n_kv_heads, transformers' repeat_kv order)."""
    return head_score.reshape(n_kv_heads, -1).sum(-1)


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of 1 − cos(x_in, x_out) along the hidden dimension (ShortGPT's BI, unnormalised)."""
    a, b = x_in.reshape(-1, x_in.shape[-1]).double(), x_out.reshape(-1, x_out.shape[-1]).double()
    return (1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)).sum()


def heads_to_groups(kept_groups: torch.Tensor, heads_per_group: int) -> torch.Tensor:
    """The query-head indices of the kept K/V groups, in order."""
    r = torch.arange(heads_per_group)
    return (kept_groups[:, None] * heads_per_group + r[None, :]).reshape(-1)


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The feature indices (rows of q/k/v, columns of o) of ``heads``, in order."""
    r = torch.arange(head_dim)
    return (heads[:, None] * head_dim + r[None, :]).reshape(-1)
