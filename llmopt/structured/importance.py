"""One forward pass of the model over the calibration windows, with hooks that accumulate the
importance statistics of :mod:`llmopt.kernels.structured` (Minitron §2.2, ShortGPT §3.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmopt.calibration.capture import hidden_of
from llmopt.kernels.structured import block_influence, group_scores, head_scores


@dataclass
class Importance:
    mlp: list[torch.Tensor]  # per layer: (intermediate,) mean |down_proj input|
    groups: list[torch.Tensor]  # per layer: (kv_heads,) summed head-output L2 norms of each GQA group
    hidden: torch.Tensor  # (hidden,) mean |norm output|, summed over every RMSNorm
    block_influence: torch.Tensor  # (layers,) mean 1 − cos(layer input, layer output)
    tokens: int
    windows: torch.Tensor | None = None  # the (N, L) token ids measured on (the greedy depth ranking reuses them)


def measure(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> Importance:
    """Importance of every MLP channel, GQA group, hidden channel and decoder layer of ``model``
    (Llama layout), from ``windows`` (N, L) token ids."""
    from tqdm.auto import tqdm

    body = model.model
    layers = list(body.layers)
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dev = next(model.parameters()).device
    L = len(layers)
    mlp = [torch.zeros(cfg.intermediate_size, dtype=torch.float64) for _ in range(L)]
    heads = [torch.zeros(n_heads, dtype=torch.float64) for _ in range(L)]
    hidden = torch.zeros(cfg.hidden_size, dtype=torch.float64)
    bi = torch.zeros(L, dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}
    handles = []

    def abs_sum(acc: torch.Tensor):
        def hook(_m, args):
            acc.add_(args[0].detach().reshape(-1, args[0].shape[-1]).abs().double().sum(0).cpu())

        return hook

    def norm_out(_m, _args, out):
        hidden.add_(out.detach().reshape(-1, out.shape[-1]).abs().double().sum(0).cpu())

    def head_hook(acc: torch.Tensor):
        def hook(_m, args):
            acc.add_(head_scores(args[0].detach(), n_heads).cpu())

        return hook

    def layer_in(i: int):
        def hook(_m, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def layer_out(i: int):
        def hook(_m, _args, _kwargs, out):
            y = hidden_of(out)
            bi[i] += block_influence(inputs.pop(i).detach(), y.detach()).cpu()

        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(abs_sum(mlp[i])))
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(heads[i])))
            handles.append(layer.input_layernorm.register_forward_hook(norm_out))
            handles.append(layer.post_attention_layernorm.register_forward_hook(norm_out))
            handles.append(layer.register_forward_pre_hook(layer_in(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(layer_out(i), with_kwargs=True))
        handles.append(body.norm.register_forward_hook(norm_out))
        was_training = model.training
        model.eval()
        batches = range(0, windows.shape[0], batch_size)
        with torch.no_grad():
            for b in tqdm(batches, desc="structured importance", unit="batch", disable=not progress):
                body(input_ids=windows[b : b + batch_size].to(dev), use_cache=False)  # no lm_head: no V-wide logits
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    tokens = windows.numel()
    return Importance(
        mlp=[m / tokens for m in mlp],
        groups=[group_scores(h / tokens, n_kv) for h in heads],
        hidden=hidden / tokens,
        block_influence=bi / tokens,
        tokens=tokens,
        windows=windows,
    )
