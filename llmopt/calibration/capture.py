"""Capturing what the model passes its decoder layers: the first layer's input and every layer's own
arguments (rotary embeddings, the mask of its attention kind), batch by batch, with the KV cache off;
and re-running one layer on a captured batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Batch:
    """One batch of calibration windows as seen by the current decoder layer."""

    hidden: torch.Tensor  # (B, L, hidden) input of the current decoder layer, in the model's dtype
    # per decoder layer: (positional args after the hidden state, keyword args) the model passes it.
    # Values are shared by reference: a mask the model hands to every layer is stored once.
    layer_args: list[tuple[tuple, dict]] = field(default_factory=list)


class StopForward(Exception):
    """Raised by a hook to cut a forward short once what it needed has been seen."""


_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")
try:  # cache objects some models pass positionally (GPT-2's layer_past): dropped like the kwargs above
    from transformers.cache_utils import Cache as _Cache

    _CacheTypes: tuple[type, ...] = (_Cache,)
except ImportError:  # pragma: no cover
    _CacheTypes = ()


def _clean_kwargs(kwargs: dict) -> dict:
    """Layer kwargs without any KV cache: re-running a layer with the model's cache object would grow
    it across calibration windows and silently corrupt the statistics."""
    out = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
    out["use_cache"] = False
    return out


def _output_kinds(model: nn.Module, layers: nn.ModuleList) -> list[int]:
    """How each decoder layer returns its hidden state: 0 = a tensor, n > 0 = a tuple of n items.
    Found on a 2-token forward (negligible), so the bypass in :func:`capture_layer_inputs` can answer
    in the same form whatever the architecture."""
    kinds: list[int] = [0] * len(layers)
    device = next(model.parameters()).device

    def hook(i):
        def fn(module, args, output):
            kinds[i] = len(output) if isinstance(output, tuple) else 0
            if i == len(layers) - 1:
                raise StopForward

        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        model(input_ids=torch.ones(1, 2, dtype=torch.long, device=device), use_cache=False)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return kinds


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int, store=None
) -> list[Batch]:
    """Inputs of the first decoder layer and every layer's arguments, for windows (N, L) in batches.
    ``store``: an :class:`llmopt.calibration.spill.ActivationStore` that holds each batch's hidden state
    (in memory, or spilled to a memory-mapped file); without one the hidden states stay as captured.

    Each layer's ``forward`` is temporarily replaced by a recorder that stores what the model passes
    and returns the hidden state unchanged (in the layer's own return form); the last one stops the
    forward, so the output head never runs.
    """
    device = next(model.parameters()).device
    kinds = _output_kinds(model, layers)
    batches: list[Batch] = []
    current: list[Batch] = []

    def recorder(i: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            rest = tuple(None if isinstance(a, _CacheTypes) else a for a in args[1:])
            b = current[0]
            if i == 0:  # overwritten in place by each layer's outputs
                b.hidden = hidden.detach().contiguous() if store is None else store.hold(hidden.detach().contiguous())
            b.layer_args.append((rest, _clean_kwargs(kwargs)))
            if i == len(layers) - 1:
                raise StopForward
            return (hidden, *([None] * (kinds[i] - 1))) if kinds[i] else hidden

        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        for b0 in range(0, windows.shape[0], batch_size):
            current[:] = [Batch(hidden=torch.empty(0))]
            try:
                model(input_ids=windows[b0 : b0 + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
            batches.append(current[0])
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute; the class's forward is back
    return batches


def hidden_of(out) -> torch.Tensor:
    """The hidden states a decoder layer returned (a tuple in some transformers versions, a tensor in others)."""
    return out[0] if isinstance(out, tuple) else out


def layer_forward(layer: nn.Module, batch: Batch, i: int) -> torch.Tensor:
    args, kwargs = batch.layer_args[i]
    return hidden_of(layer(batch.hidden, *args, **kwargs))
