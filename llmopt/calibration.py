"""The layer-wise calibration engine shared by every data-driven stage.

Data flow (SparseGPT §3 / GPTQ §4 "sequential" processing, IST-DASLab ``llama_sequential``):

1. run the model up to the first decoder layer on the calibration windows and keep that layer's inputs
   X₀: (B, L, hidden) per batch, plus the keyword arguments the model passes to its layers (rotary
   position embeddings, masks) with the KV cache switched off;
2. for each decoder layer ℓ, for each stage of the recipe:
   a. run the layer on its inputs with forward hooks on the target Linears that accumulate the
      statistic the stage asks for (Hessian 2/N Σ xᵀx, or Σ x_j²), grouped per sub-layer when
      ``true_sequential`` is on (q/k/v, then o, then gate/up, then down: later groups see the already
      compressed earlier ones);
   b. call the stage's kernel once per target Linear and write the new weight in place;
3. run the compressed layer once more: its outputs become layer ℓ+1's inputs, so the error made so
   far is carried forward, as in the papers.

Only one layer's activations live at a time. Layers come from a :class:`LayerSource`, so a later
source can stream each layer's weights from safetensors shards without changing anything here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llmopt.errors import LLMOptError
from llmopt.stages.base import CompressionState, LinearStats, Stage

log = logging.getLogger(__name__)

# Order of sub-layers inside a Llama-family decoder layer for "true sequential" processing
# (GPTQ reference code, llama.py): later groups are calibrated on the outputs of compressed earlier ones.
SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("o_proj",),
    ("gate_proj", "up_proj"),
    ("down_proj",),
)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder layers, found generically: the ModuleList with
    ``config.num_hidden_layers`` entries that contain nn.Linear (``model.layers`` for Llama, Qwen2,
    Mistral, SmolLM). Raises LLMOptError for architectures without one."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers):
            if all(any(isinstance(m, nn.Linear) for m in layer.modules()) for layer in mod):
                candidates.append((name, mod))
    if not candidates:
        arch = type(model).__name__
        raise LLMOptError(
            f"cannot find the decoder layers of {arch}: the calibration engine handles decoder-only models "
            "with a list of num_hidden_layers blocks (Llama, Qwen2, Mistral, SmolLM); use a data-free stage "
            "(magnitude, rtn) for this model"
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
        """Called when layer i is final; a streaming source would save and free it here."""


@dataclass
class Batch:
    hidden: torch.Tensor  # (B, L, hidden) input of the current decoder layer
    kwargs: dict = field(default_factory=dict)  # what the model passes to every layer (rotary, mask)


class _StopForward(Exception):
    pass


def _clean_kwargs(kwargs: dict) -> dict:
    """Layer kwargs without any KV cache: re-running a layer with the model's cache object would grow
    it across calibration windows and silently corrupt the statistics."""
    out = {}
    for k, v in kwargs.items():
        if k in ("past_key_value", "past_key_values", "layer_past"):
            continue
        out[k] = v
    out["use_cache"] = False
    return out


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, first_layer: nn.Module, windows: torch.Tensor, batch_size: int
) -> list[Batch]:
    """Run the model up to ``first_layer`` on windows (N, L) in batches; keep that layer's inputs."""
    device = next(model.parameters()).device
    batches: list[Batch] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        batches.append(Batch(hidden.detach(), _clean_kwargs(kwargs)))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for b0 in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[b0 : b0 + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return batches


def _layer_forward(layer: nn.Module, batch: Batch) -> torch.Tensor:
    out = layer(batch.hidden, **batch.kwargs)
    return out[0] if isinstance(out, tuple) else out


class StatsAccumulator:
    """Forward pre-hooks on Linears that accumulate the statistic a stage needs from their inputs.

    Hessian as a running average in float32 (IST-DASLab ``add_batch``): after N tokens
    H = 2/N Σ_n x_nᵀ x_n, so its scale does not depend on how many windows were used. Linears fed by
    the same tensor (q/k/v, gate/up) share one accumulation. Once every hooked Linear has seen its
    input, the layer's forward is cut short (:class:`_StopForward`): the rest of the layer, e.g.
    down_proj's matmul, is not needed for statistics.
    """

    def __init__(self, linears: dict[str, nn.Linear], statistic: str):
        self.statistic = statistic
        self.stats: dict[str, LinearStats] = {}
        self._alias: dict[str, str] = {}  # linear name → name whose stats it shares
        self._handles = [lin.register_forward_pre_hook(self._hook(name)) for name, lin in linears.items()]
        self._n = len(linears)
        self._seen: set[str] = set()
        # The previous hooked input and who accumulated it. Holding the tensor itself (not its address)
        # matters: a freed activation's memory is reused by the next one of the same shape, so an
        # address comparison would merge the statistics of unrelated Linears.
        self._last: tuple[torch.Tensor, str] | None = None

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if self._last is not None and self._last[0] is x:
                self._alias[name] = self._last[1]  # q/k/v (gate/up) read the very same tensor
            else:
                self._last = (x, name)
                self._add(name, x.detach().reshape(-1, x.shape[-1]))
            self._seen.add(name)
            if len(self._seen) == self._n:
                raise _StopForward

        return hook

    @torch.no_grad()
    def _add(self, name: str, x: torch.Tensor) -> None:
        x = x.to(torch.float32)  # (T, in)
        s = self.stats.setdefault(name, LinearStats())
        t = x.shape[0]
        if self.statistic == "hessian":
            if s.hessian is None:
                s.hessian = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            s.hessian.mul_(s.tokens / (s.tokens + t))
            s.hessian.addmm_(x.t(), x, alpha=2.0 / (s.tokens + t))
        elif self.statistic == "act_sq_norm":
            if s.act_sq_norm is None:
                s.act_sq_norm = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
            s.act_sq_norm.add_((x * x).sum(0))
        s.tokens += t

    def new_forward(self) -> None:
        self._last = None
        self._seen.clear()

    def get(self, name: str) -> LinearStats:
        return self.stats[self._alias.get(name, name)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _groups(names: Sequence[str], true_sequential: bool) -> list[list[str]]:
    if not true_sequential:
        return [list(names)]
    groups, seen = [], set()
    for suffixes in SEQUENTIAL_GROUPS:
        g = [n for n in names if n.rsplit(".", 1)[-1] in suffixes]
        if g:
            groups.append(g)
            seen.update(g)
    rest = [n for n in names if n not in seen]
    return groups + ([rest] if rest else [])


def _run_all(layer: nn.Module, batches: list[Batch], acc: StatsAccumulator) -> None:
    """One statistics pass of ``layer`` over all batches (outputs are not needed)."""
    for b in batches:
        acc.new_forward()
        try:
            _layer_forward(layer, b)
        except _StopForward:
            pass


def iterate_layers(source: LayerSource, batches: list[Batch], desc: str) -> Iterator[tuple[int, nn.Module]]:
    """Yield (index, layer) and afterwards replace each batch's hidden state by the layer's output
    (not after the last layer: nothing reads its outputs)."""
    n = len(source)
    for i in tqdm(range(n), desc=desc, unit="layer"):
        layer = source.load(i)
        yield i, layer
        if i < n - 1:
            with torch.no_grad():
                for b in batches:
                    b.hidden = _layer_forward(layer, b)
        source.release(i, layer)


@torch.no_grad()
def layer_statistics(
    model: nn.Module, windows: torch.Tensor, statistic: str, batch_size: int = 8
) -> list[dict[str, LinearStats]]:
    """Statistics of every decoder layer's Linears on the *uncompressed* model (for planning, e.g. OWL)."""
    prefix, layers = find_decoder_layers(model)
    source = LayerSource(layers, prefix)
    batches = capture_layer_inputs(model, layers[0], windows, batch_size)
    out = []
    for i, layer in iterate_layers(source, batches, "layer statistics"):
        linears = {f"{prefix}.{i}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        acc = StatsAccumulator(linears, statistic)
        _run_all(layer, batches, acc)
        acc.remove()
        out.append({n: acc.get(n) for n in linears})
    return out


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    windows: torch.Tensor,
    stages: Sequence[Stage],
    state: CompressionState,
    batch_size: int = 8,
    true_sequential: bool = False,
) -> None:
    """Apply ``stages`` (in order, per layer) to every target Linear of every decoder layer.

    windows: (N, L) calibration token ids. Weights are replaced in place; per-Linear reports go to
    ``state.reports``.
    """
    prefix, layers = find_decoder_layers(model)
    source = LayerSource(layers, prefix)
    batches = capture_layer_inputs(model, layers[0], windows, batch_size)
    log.info("captured inputs of %s.0 for %d windows in %d batches", prefix, windows.shape[0], len(batches))
    for i, layer in iterate_layers(source, batches, "compressing"):
        for stage in stages:
            names = {
                f"{prefix}.{i}.{n}": m
                for n, m in layer.named_modules()
                if isinstance(m, nn.Linear) and stage.matches(f"{prefix}.{i}.{n}")
            }
            for group in _groups(list(names), true_sequential and stage.needs_calibration):
                acc = None
                if stage.statistic != "none":
                    acc = StatsAccumulator({n: names[n] for n in group}, stage.statistic)
                    _run_all(layer, batches, acc)
                    acc.remove()
                for name in group:
                    apply_to_linear(stage, name, names[name], acc.get(name) if acc else LinearStats(), state, i)


def apply_to_linear(
    stage: Stage,
    name: str,
    linear: nn.Linear,
    stats: LinearStats,
    state: CompressionState,
    layer_index: int | None,
) -> None:
    """Call the stage's kernel on one Linear, write the result back, and record the report."""
    t0 = time.perf_counter()
    W = linear.weight.data
    outcome = stage.compress_linear(name, W.to(torch.float32), stats, state, layer_index)
    W.copy_(outcome.weight.to(W.dtype))
    if outcome.quant is not None:
        state.quantized[name] = outcome
    state.reports.append(
        {
            "stage": stage.name,
            "stage_index": stage.index,
            "linear": name,
            "shape": list(W.shape),
            "seconds": round(time.perf_counter() - t0, 4),
            **outcome.report,
        }
    )
