"""The layer-wise calibration engine shared by every data-driven stage.

Data flow (SparseGPT §3 / GPTQ §4 "sequential" processing, IST-DASLab ``llama_sequential``):

1. run the model once over the calibration windows with every decoder layer bypassed (it returns its
   input unchanged, so the pass costs the embeddings alone) and keep, per batch, the first layer's
   input X₀: (B, L, hidden) and, **per layer**, the arguments the model passes to it (rotary position
   embeddings, and the attention mask of that layer's kind: models that mix sliding-window and full
   attention layers, such as Gemma 2/3 or Qwen2 with sliding windows, pass each layer its own mask),
   with the KV cache switched off;
2. for each decoder layer ℓ, for each stage of the recipe:
   a. run the layer on its inputs with forward hooks on the target Linears that accumulate the
      statistic the stage asks for (Hessian 2/N Σ xᵀx, or Σ x_j²); with ``true_sequential`` the
      Linears are calibrated in groups in the order the layer's forward first calls them (Linears
      reading the same tensor, such as q/k/v or gate/up, form one group), so later groups see the
      already compressed earlier ones;
   b. call the stage's kernel once per target Linear and write the new weight in place; a target
      that never ran on the calibration data (an unrouted MoE expert) gets the stage's data-free
      kernel, with a warning and a note in the report;
3. run the compressed layer once more: its outputs become layer ℓ+1's inputs, so the error made so
   far is carried forward, as in the papers.

Activations stay in the model's dtype, batch by batch; only one layer's activations live at a time.
"Linear" means nn.Linear or transformers' Conv1D (GPT-2), see :mod:`llmopt.linears`. Layers come from
a :class:`LayerSource`, so a later source can stream each layer's weights from safetensors shards
without changing anything here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from llmopt import memory
from llmopt.errors import LLMOptError
from llmopt.kernels.hessian import add_gram_upper_, symmetrize_upper_
from llmopt.linears import is_linear, is_transposed, weight_oi, write_weight
from llmopt.memory import release_freed_memory
from llmopt.stages.base import CompressionState, LinearStats, QuantizedLinear, Stage

log = logging.getLogger(__name__)


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
        """Called when layer i is final; a streaming source would save and free it here."""


@dataclass
class Batch:
    """One batch of calibration windows as seen by the current decoder layer."""

    hidden: torch.Tensor  # (B, L, hidden) input of the current decoder layer, in the model's dtype
    # per decoder layer: (positional args after the hidden state, keyword args) the model passes it.
    # Values are shared by reference: a mask the model hands to every layer is stored once.
    layer_args: list[tuple[tuple, dict]] = field(default_factory=list)


class _StopForward(Exception):
    pass


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
                raise _StopForward

        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        model(input_ids=torch.ones(1, 2, dtype=torch.long, device=device), use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return kinds


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int
) -> list[Batch]:
    """Inputs of the first decoder layer and every layer's arguments, for windows (N, L) in batches.

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
            if i == 0:
                b.hidden = hidden.detach().contiguous()  # overwritten in place by each layer's outputs
            b.layer_args.append((rest, _clean_kwargs(kwargs)))
            if i == len(layers) - 1:
                raise _StopForward
            return (hidden, *([None] * (kinds[i] - 1))) if kinds[i] else hidden

        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        for b0 in range(0, windows.shape[0], batch_size):
            current[:] = [Batch(hidden=torch.empty(0))]
            try:
                model(input_ids=windows[b0 : b0 + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
            batches.append(current[0])
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute; the class's forward is back
    return batches


def _layer_forward(layer: nn.Module, batch: Batch, i: int) -> torch.Tensor:
    args, kwargs = batch.layer_args[i]
    out = layer(batch.hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class StatsAccumulator:
    """Forward pre-hooks on Linears that accumulate the statistic a stage needs from their inputs.

    Hessian as a running average in float32 (IST-DASLab ``add_batch``): after N tokens
    H = 2/N Σ_n x_nᵀ x_n, so its scale does not depend on how many windows were used. Linears fed by
    the same tensor (q/k/v, gate/up) share one accumulation. Once every hooked Linear has seen its
    input, the layer's forward is cut short (:class:`_StopForward`): the rest of the layer, e.g.
    down_proj's matmul, is not needed for statistics.
    """

    def __init__(
        self, linears: dict[str, nn.Module], statistic: str, first_token_weight: dict[str, float] | None = None
    ):
        self.statistic = statistic
        # Linear name → weight of each window's first token in its Hessian, as a fraction of the window's
        # token count (see GPTQStageConfig.sink_weight). Such a Linear shares the plain accumulation with
        # the Linears that read the same tensor and adds a low-rank term of its own: with the first token
        # counted s² times, H' = H + 2/N (s² − 1) Σ_windows x₀ᵀx₀ (`_extra`, the raw sum, N = H's tokens).
        self._first = {n: w for n, w in (first_token_weight or {}).items() if w > 0}
        self._extra: dict[str, torch.Tensor] = {}
        self.stats: dict[str, LinearStats] = {}
        self._partial: set[str] = set()  # Hessians holding only their upper triangle so far (add_gram_upper_)
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
            if name in self._first and x.dim() == 3 and self.statistic == "hessian":  # x: (windows, tokens, in)
                x0 = x.detach()[:, 0].to(torch.float32)  # (windows, in)
                s2 = max(1.0, self._first[name] * x.shape[1])
                e = self._extra.setdefault(name, torch.zeros(x.shape[-1], x.shape[-1], device=x0.device))
                e.addmm_(x0.t(), x0, alpha=s2 - 1.0)
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
            add_gram_upper_(s.hessian, x, alpha=2.0 / (s.tokens + t))  # the lower triangle is filled in get()
            self._partial.add(name)
        elif self.statistic == "act_sq_norm":
            if s.act_sq_norm is None:
                s.act_sq_norm = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
            s.act_sq_norm.add_((x * x).sum(0))
        s.tokens += t

    def new_forward(self) -> None:
        self._last = None
        self._seen.clear()

    def get(self, name: str) -> LinearStats:
        key = self._alias.get(name, name)
        st = self.stats[key]
        if key in self._partial:  # once, after the last window: the accumulation filled the upper triangle
            symmetrize_upper_(st.hessian)
            self._partial.discard(key)
        if name not in self._extra:
            return st
        return replace(st, hessian=st.hessian + self._extra[name] * (2.0 / st.tokens))

    def has(self, name: str) -> bool:
        """False for a Linear that never ran (no statistics)."""
        return self._alias.get(name, name) in self.stats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def call_order_groups(layer: nn.Module, linears: dict[str, nn.Module], batch: Batch, i: int) -> list[list[str]]:
    """``true_sequential`` groups of a layer's target Linears, from one forward on ``batch``: in the
    order the forward first calls them, Linears called one after another on the very same input tensor
    forming one group (q/k/v, gate/up; Phi-3's fused qkv_proj and gate_up_proj, GPT-2's c_attn are
    groups of one). Linears that never run come last, as a group of their own."""
    order: list[tuple[str, torch.Tensor]] = []
    seen: set[str] = set()

    def hook(name: str):
        def fn(module, args):
            if name not in seen:
                seen.add(name)
                order.append((name, args[0]))
                if len(seen) == len(linears):
                    raise _StopForward

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        _layer_forward(layer, batch, i)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_input = None
    for name, x in order:
        if groups and x is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = x
    missing = [n for n in linears if n not in seen]
    return groups + ([missing] if missing else [])


def _run_all(layer: nn.Module, batches: list[Batch], acc: StatsAccumulator, i: int) -> None:
    """One statistics pass of layer ``i`` over all batches (outputs are not needed)."""
    for b in batches:
        acc.new_forward()
        try:
            _layer_forward(layer, b, i)
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
            with torch.no_grad(), memory.phase("layer_outputs"):
                for b in batches:
                    # written over the batch's input (no longer needed), so the hidden states stay in the
                    # buffers allocated once at capture and no long-lived block lands amid the layer's
                    # temporaries on the heap
                    b.hidden.copy_(_layer_forward(layer, b, i))
        source.release(i, layer)
        release_freed_memory()


def _layer_linears(layer: nn.Module, prefix: str, i: int, stage: Stage | None = None) -> dict[str, nn.Module]:
    """The Linears of decoder layer ``i`` by full module name (those ``stage`` targets, if given)."""
    out = {}
    for n, m in layer.named_modules():
        full = f"{prefix}.{i}.{n}"
        if is_linear(m) and (stage is None or stage.matches(full)):
            out[full] = m
    return out


@torch.no_grad()
def layer_statistics(
    model: nn.Module, windows: torch.Tensor, statistic: str, batch_size: int = 8
) -> list[dict[str, LinearStats]]:
    """Statistics of every decoder layer's Linears on the *uncompressed* model (for planning, e.g. OWL)."""
    prefix, layers = find_decoder_layers(model)
    source = LayerSource(layers, prefix)
    batches = capture_layer_inputs(model, layers, windows, batch_size)
    out = []
    for i, layer in iterate_layers(source, batches, "layer statistics"):
        linears = _layer_linears(layer, prefix, i)
        acc = StatsAccumulator(linears, statistic)
        _run_all(layer, batches, acc, i)
        acc.remove()
        out.append({n: acc.get(n) for n in linears if acc.has(n)})
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
    with memory.phase("capture"):
        batches = capture_layer_inputs(model, layers, windows, batch_size)
    log.info("captured inputs of %s.0 for %d windows in %d batches", prefix, windows.shape[0], len(batches))
    for i, layer in iterate_layers(source, batches, "compressing"):
        for stage in stages:
            names = _layer_linears(layer, prefix, i, stage)
            if not names:
                continue
            groups = [list(names)]
            if true_sequential and stage.needs_calibration:
                groups = call_order_groups(layer, names, batches[0], i)
            for group in groups:
                acc = None
                if stage.statistic != "none":
                    weights = {n: stage.first_token_weight(n) for n in group}
                    acc = StatsAccumulator({n: names[n] for n in group}, stage.statistic, weights)
                    with memory.phase("statistics"):
                        _run_all(layer, batches, acc, i)
                    acc.remove()
                    release_freed_memory()  # the forward's temporaries, kept by the heap for reuse, before the kernels
                with memory.phase("kernels"):
                    _apply_group(stage, group, names, acc, state, i)


def _apply_group(stage: Stage, group: list[str], names: dict, acc, state: CompressionState, i: int) -> None:
    """One group's Linears through the stage's kernel (the data-free one for a Linear the data never reached)."""
    for name in group:
        if acc is None:
            stats = LinearStats()
        elif acc.has(name):
            stats = acc.get(name)
        else:
            log.warning(
                "%s never ran on the calibration data (unrouted expert or unused branch): "
                "stage %s uses its data-free kernel for it",
                name,
                stage.name,
            )
            stats = None  # apply_to_linear: the stage's data-free kernel
        apply_to_linear(stage, name, names[name], stats, state, i)
        release_freed_memory()  # the kernel's work arrays (a few (in, in) matrices) before the next Linear's


def apply_to_linear(
    stage: Stage,
    name: str,
    linear: nn.Module,
    stats: LinearStats | None,
    state: CompressionState,
    layer_index: int | None,
) -> None:
    """Call the stage's kernel on one Linear (``stats`` None: it never ran on the calibration data, use the
    stage's data-free fallback), write the result back, and record the report."""
    t0 = time.perf_counter()
    W = weight_oi(linear)  # (out, in) view of the parameter
    if stats is None:
        outcome = stage.compress_uncalibrated(name, W.to(torch.float32), state, layer_index)
        outcome.report.setdefault("fallback", "data-free")
    else:
        outcome = stage.compress_linear(name, W.to(torch.float32), stats, state, layer_index)
    write_weight(linear, outcome.weight)
    if outcome.quant is not None:
        q = outcome.quant
        state.quantized[name] = QuantizedLinear(q.codes, q.qparams, outcome.fmt, is_transposed(linear))
    state.reports.append(
        {
            "stage": stage.name,
            "stage_index": stage.index,
            "linear": name,
            "shape": list(W.shape),
            "seconds": round(time.perf_counter() - t0, 4),
            **({"calibration_tokens": stats.tokens} if stats is not None and stats.tokens else {}),
            **outcome.report,
        }
    )
