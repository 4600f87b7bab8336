"""The output head after the last decoder layer: which module it is, whether it is tied to the token
embedding, and the statistics of its input (the final normed hidden states) on the calibration windows.

The head reads what the model's tail makes of the last decoder layer's output: the final norm for Llama,
Qwen, Mistral, Gemma, Phi-3 (``model.norm``), GPT-2's ``ln_f``, OPT's ``final_layer_norm`` (and its
``project_out``). Rather than naming that tail per architecture, :func:`head_statistics` runs the model's
own forward once more per batch with every decoder layer bypassed, the last one answering with the
batch's final hidden state as the engine left it (the output of the *compressed* last layer), and
accumulates the Hessian from a pre-hook on the head, which then stops the forward: the logits themselves
(vocab × hidden per token, the costliest matmul of the model) are never computed. The pass costs the
embedding lookup and the norm.
"""

from __future__ import annotations

import torch
from torch import nn

from llmopt.calibration.capture import Batch, StopForward, _output_kinds
from llmopt.calibration.stats import StatsAccumulator
from llmopt.core.state import LinearStats
from llmopt.errors import LLMOptError
from llmopt.linears import is_linear


def output_head(model: nn.Module) -> tuple[str, nn.Module, str | None]:
    """(module name, module, tied_to) of the model's output head (``get_output_embeddings``); ``tied_to``
    names the input embedding module when the two share one weight tensor (SmolLM2, Gemma, Qwen2.5-0.5B),
    else None. Raises LLMOptError when the model has no Linear head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not is_linear(head):
        raise LLMOptError(
            f"{type(model).__name__} has no Linear output head (get_output_embeddings): remove `head` from the "
            "quantization stage"
        )
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = emb is not None and getattr(emb, "weight", None) is not None
    # one Parameter, or one storage; on the meta device (a streamed model) every data_ptr is 0: identity only
    same = tied and (emb.weight is head.weight or not head.weight.is_meta)
    same = same and (emb.weight is head.weight or emb.weight.data_ptr() == head.weight.data_ptr())
    tied = same and emb.weight.shape == head.weight.shape
    return names[id(head)], head, names[id(emb)] if tied else None


@torch.no_grad()
def head_statistics(
    model: nn.Module,
    layers: nn.ModuleList,
    windows: torch.Tensor,
    batches: list[Batch],
    batch_size: int,
    name: str,
    head: nn.Module,
) -> LinearStats:
    """Hessian H = 2/N Σ xᵀx of the head's input x: (hidden,) over every token of ``windows`` (N, L).

    ``batches[k].hidden``: (B, L, hidden) the last decoder layer's output for windows [k·B, (k+1)·B), in
    the order :func:`~llmopt.calibration.capture.capture_layer_inputs` made them."""
    device = next(model.parameters()).device
    kinds = _output_kinds(model, layers)
    last = len(layers) - 1
    current: list[Batch] = []

    def bypass(i: int):
        def forward(*args, **kwargs):
            hidden = current[0].hidden if i == last else (args[0] if args else kwargs["hidden_states"])
            return (hidden, *([None] * (kinds[i] - 1))) if kinds[i] else hidden

        return forward

    acc = StatsAccumulator({name: head}, "hessian")
    for i, layer in enumerate(layers):
        layer.forward = bypass(i)
    try:
        for k, b0 in enumerate(range(0, windows.shape[0], batch_size)):
            current[:] = [batches[k]]
            acc.new_forward()
            try:
                model(input_ids=windows[b0 : b0 + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        acc.remove()
        for layer in layers:
            del layer.forward  # the instance attribute; the class's forward is back
    acc.all_reduce()  # under torchrun: every process's windows (llmopt.parallel)
    if not acc.has(name):
        raise LLMOptError(f"the output head {name} never ran in {type(model).__name__}'s forward: remove `head`")
    return acc.get(name)
