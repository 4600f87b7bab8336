"""The uncompressed model's activations beside the compressed ones, for statistics that compare the two
(GPTAQ's ΔX X̃ᵀ, :mod:`llmopt.kernels.gptaq`).

The engine's own stream carries each decoder layer's inputs through the layers *as compressed so far* (X̃).
This second stream carries the same windows through the layers with their ORIGINAL weights (X): each layer
is copied before any stage touches it, the copy runs on the stream's hidden states to give the inputs its
Linears see in the uncompressed model, and, once the layer is done, to advance the stream. Only made when a
stage asks for it (``Stage.needs_fp_inputs``): it holds one more hidden state per batch and one layer's copy.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from llmopt.calibration.capture import Batch, StopForward, layer_forward


class FPStream:
    """Hidden states of the uncompressed model, batch by batch, and the current layer's original copy."""

    def __init__(self, batches: list[Batch], store=None):
        # the first layer's inputs are the same in both models (the embeddings are not compressed here);
        # ``store`` (an ActivationStore) holds the copies as it holds the engine's own, spilled or not
        copy = (lambda t: t.clone()) if store is None else store.copy
        self.hidden = [copy(b.hidden) for b in batches]  # per batch (B, L, hidden), the model's dtype
        self.original: nn.Module | None = None
        self._prefix = ""

    def begin_layer(self, layer: nn.Module, prefix: str) -> None:
        """Keep a copy of decoder layer ``prefix`` (e.g. "model.layers.3") before any stage changes it."""
        self.original = copy.deepcopy(layer)
        self._prefix = prefix + "."

    @torch.no_grad()
    def inputs(self, k: int, batch: Batch, i: int, names: list[str]) -> dict[str, torch.Tensor]:
        """Inputs of the Linears ``names`` (full module names) in the uncompressed model, batch ``k``:
        name → (B, L, in). The original layer runs on the stream's hidden state until all were seen."""
        if self.original is None:
            raise RuntimeError("internal: FPStream.inputs before begin_layer")
        modules = dict(self.original.named_modules())
        seen: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def fn(module, args):
                seen[name] = args[0].detach()
                if len(seen) == len(names):
                    raise StopForward

            return fn

        handles = [modules[n.removeprefix(self._prefix)].register_forward_pre_hook(hook(n)) for n in names]
        try:
            layer_forward(self.original, Batch(self.hidden[k], batch.layer_args), i)
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return seen

    @torch.no_grad()
    def end_layer(self, batches: list[Batch], i: int, advance: bool) -> None:
        """Run the original layer on the stream (its outputs are the next layer's FP inputs; not needed
        after the last layer) and drop the copy."""
        if advance and self.original is not None:
            for k, b in enumerate(batches):
                self.hidden[k].copy_(layer_forward(self.original, Batch(self.hidden[k], b.layer_args), i))
        self.original = None
