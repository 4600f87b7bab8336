"""Model plumbing the loop needs: the trunk's last hidden state, the output head applied to chunks of
positions (so the (positions × vocabulary) logits never exist for a whole batch), and the output of
every decoder layer (SquareHead)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from llmopt.calibration import find_decoder_layers
from llmopt.errors import LLMOptError


def trunk(model: nn.Module) -> nn.Module:
    """The model without its output head (``LlamaModel`` of a ``LlamaForCausalLM``, GPT-2's transformer)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise LLMOptError(f"{type(model).__name__} has no base model under its output head: cannot distil it")
    return base


def output_head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden (..., H) → logits (..., V) as the model's own forward computes them (lm_head, then
    Gemma 2/3's final logit soft-capping when configured)."""
    head = model.get_output_embeddings()
    if head is None:
        raise LLMOptError(f"{type(model).__name__} has no output embeddings: cannot distil it")
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)

    def apply(h: torch.Tensor) -> torch.Tensor:
        z = head(h)
        return torch.tanh(z / cap) * cap if cap else z

    return apply


def last_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B, L) ids → (B, L, H) final hidden state (after the final norm), no KV cache."""
    return trunk(model)(input_ids=ids, use_cache=False).last_hidden_state


@torch.no_grad()
def check_head(model: nn.Module) -> None:
    """The chunked head must reproduce the model's logits; an architecture that post-processes them in
    another way (a logit scale, a second head) is refused with one line instead of distilled wrongly."""
    device = next(model.parameters()).device
    ids = torch.arange(1, 5, device=device).view(1, -1) % model.get_output_embeddings().weight.shape[0]
    want = model(input_ids=ids, use_cache=False).logits.float()
    got = output_head(model)(last_hidden(model, ids)).float()
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max().clamp_min(1))):
        raise LLMOptError(
            f"{type(model).__name__}: lm_head(last hidden state) does not give the model's logits; "
            "its output head is not supported by the distill stage"
        )


@contextlib.contextmanager
def layer_outputs(model: nn.Module, enabled: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Record every decoder layer's output hidden state (B, L, H) into the yielded dict, keyed by layer
    index (a recomputation under gradient checkpointing overwrites its own entry)."""
    store: dict[int, torch.Tensor] = {}
    if not enabled:
        yield store
        return
    _, layers = find_decoder_layers(model)

    def hook(i: int):
        def fn(module, args, output):
            store[i] = output[0] if isinstance(output, tuple) else output

        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def ordered(store: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    return [store[i] for i in sorted(store)]
