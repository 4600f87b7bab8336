"""Which decoder layers to remove, by the loss their removal costs: greedy, one layer at a time.

Minitron (§2.2) ranks depth by the LM loss of the model with a layer (or a block of layers) removed;
ShortGPT's Block Influence (1 − cos of a layer's input and output, :func:`llmopt.kernels.structured.block_influence`)
is the one-pass proxy. Removing several layers interacts (two neighbours each cheap alone are not cheap
together), so here the layers go one at a time: at each step every remaining layer is tried, and the one
whose removal raises the calibration loss least goes. It runs on the model *after* its width cuts, so the
choice sees the model that will be kept. Measured on SmolLM2-135M at 60% of the non-embedding parameters
(MLP 1152, 22 of 30 layers, eval/results/reconstruct-60.md, 32 calibration windows, reconstruction damp 0.01):
one shot, WikiText-2's second half / Lee news, the plain cut 131 / 165 against Block Influence's 171 / 244,
reconstructed 74.5 / 122 against 79 / 135. On 8 x 256 tokens the choice is noisy: ranking the MLP channels
on 128 windows instead of 32 kept ~98% of the same channels yet led to other layers (plain 163 / 258,
reconstructed on 128 windows about the same, 59.6 / 96.1 vs 58.8 / 90.3).

Cost: (layers removed) × (layers left) partial forwards over ``LOSS_WINDOWS`` × ``LOSS_TOKENS`` tokens; each
candidate reuses the hidden state entering it and runs only the layers after it (~8 minutes on 2 CPU cores
for 8 of SmolLM2's 30 layers).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from llmopt.calibration.capture import capture_layer_inputs, hidden_of

LOSS_WINDOWS, LOSS_TOKENS = 8, 256  # the calibration windows' first rows and tokens the losses are taken on


@torch.no_grad()
def greedy_layers(
    model: nn.Module, windows: torch.Tensor, n_keep: int, batch_size: int = 4, progress: bool = True
) -> tuple[list[int], list[float]]:
    """The ``n_keep`` decoder layers of ``model`` (Llama layout) kept by greedy removal on ``windows``
    (N, L) token ids; returns them (ascending) and the calibration loss after each removal."""
    layers = model.model.layers
    L = len(layers)
    if not 1 <= n_keep <= L:
        raise ValueError(f"cannot keep {n_keep} of {L} layers")
    ids = windows[:LOSS_WINDOWS, :LOSS_TOKENS]
    batches = capture_layer_inputs(model, layers, ids, batch_size)
    targets = [ids[b : b + batch_size] for b in range(0, ids.shape[0], batch_size)]
    norm, head = model.model.norm, model.get_output_embeddings()

    def run(h: torch.Tensor, k: int, order: list[int]) -> torch.Tensor:
        for i in order:
            args, kwargs = batches[k].layer_args[i]
            h = hidden_of(layers[i](h, *args, **kwargs))
        return h

    def loss(hs: list[torch.Tensor]) -> float:
        total, n = 0.0, 0
        for h, y in zip(hs, targets, strict=True):
            logits = head(norm(h))[:, :-1].float()
            y = y[:, 1:].to(logits.device)
            total += float(
                nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
            )
            n += y.numel()
        return total / n

    kept, losses = list(range(L)), []
    steps = tqdm(range(L - n_keep), desc="depth (greedy loss)", unit="layer", disable=not progress)
    for _ in steps:
        h = [b.hidden for b in batches]  # the hidden state entering kept[c], advanced candidate by candidate
        best: tuple[float, int] | None = None
        for c, i in enumerate(kept):
            after = kept[c + 1 :]
            cand = loss([run(x, k, after) for k, x in enumerate(h)])
            if best is None or cand < best[0]:
                best = (cand, i)
            h = [run(x, k, [i]) for k, x in enumerate(h)]
        kept.remove(best[1])
        losses.append(best[0])
    return kept, losses
