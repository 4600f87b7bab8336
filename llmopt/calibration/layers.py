"""Where the engine finds a model's decoder layers, and where it loads each one from (:class:`LayerSource`)."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from llmopt.errors import LLMOptError
from llmopt.linears import is_linear


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder layers, found generically: the shallowest ModuleList with
    ``config.num_hidden_layers`` entries that all contain a Linear (``model.layers`` for Llama, Qwen,
    Mistral, Gemma, Phi-3; ``transformer.h`` for GPT-2; ``model.decoder.layers`` for OPT).
    Raises LLMOptError for architectures without one."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers):
            if all(any(is_linear(m) for m in layer.modules()) for layer in mod):
                candidates.append((name, mod))
    if not candidates:
        arch = type(model).__name__
        raise LLMOptError(
            f"cannot find the decoder layers of {arch}: the calibration engine handles decoder-only models "
            "with a list of num_hidden_layers blocks (Llama, Qwen, Mistral, Gemma, Phi-3, GPT-2, OPT); "
            "use a data-free stage (magnitude, rtn) for this model"
        )
    return min(candidates, key=lambda c: c[0].count("."))


class LayerSource:
    """Where decoder layers come from. This one keeps the whole model in memory; a streaming source
    (weights loaded per layer from safetensors shards, written back after compression) implements the
    same three methods."""

    def __init__(self, layers: nn.ModuleList, prefix: str):
        self.layers = layers
        self.prefix = prefix

    def __len__(self) -> int:
        return len(self.layers)

    def load(self, i: int) -> nn.Module:
        return self.layers[i]

    def release(self, i: int, layer: nn.Module) -> None:
        """Called when layer i is final; a streaming source saves and frees it here."""

    @contextmanager
    def outside(self, part: str):
        """While the engine runs the model's own forward around the bypassed layers: ``part`` "inputs" (the
        capture of the first layer's inputs: the embeddings) or "head" (the output head's statistics and
        kernels: the embeddings, the final norm and the head). A streaming source loads those tensors here."""
        yield
