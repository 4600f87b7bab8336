"""The layer loop: statistics, kernels and the layer's outputs, layer after layer (see the package docstring)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from llmopt import memory, parallel
from llmopt.calibration.capture import Batch, StopForward, capture_layer_inputs, layer_forward
from llmopt.calibration.fp_stream import FPStream
from llmopt.calibration.head import head_statistics, output_head
from llmopt.calibration.layers import LayerSource, find_decoder_layers
from llmopt.calibration.spill import ActivationStore
from llmopt.calibration.stats import StatsAccumulator
from llmopt.core.stage import Stage
from llmopt.core.state import CompressionState, LinearStats, QuantizedLinear
from llmopt.linears import is_linear, is_transposed, weight_oi, write_weight
from llmopt.memory import release_freed_memory

log = logging.getLogger(__name__)


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
                    raise StopForward

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        layer_forward(layer, batch, i)
    except StopForward:
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


def _run_all(layer: nn.Module, batches: list[Batch], acc: StatsAccumulator, i: int, fp=None, names=()) -> None:
    """One statistics pass of layer ``i`` over all batches (outputs are not needed); with an
    :class:`FPStream` ``fp``, each batch's inputs of the Linears ``names`` in the uncompressed model too."""
    for k, b in enumerate(batches):
        acc.new_forward(None if fp is None else fp.inputs(k, b, i, list(names)))
        try:
            layer_forward(layer, b, i)
        except StopForward:
            pass


def iterate_layers(
    source: LayerSource, batches: list[Batch], desc: str, last_outputs: bool = False
) -> Iterator[tuple[int, nn.Module]]:
    """Yield (index, layer) and afterwards replace each batch's hidden state by the layer's output
    (after the last layer only with ``last_outputs``: the output head's statistics read them)."""
    n = len(source)
    for i in tqdm(range(n), desc=desc, unit="layer"):
        layer = source.load(i)
        yield i, layer
        if i < n - 1 or last_outputs:
            with torch.no_grad(), memory.phase("layer_outputs"):
                for b in batches:
                    # written over the batch's input (no longer needed), so the hidden states stay in the
                    # buffers allocated once at capture and no long-lived block lands amid the layer's
                    # temporaries on the heap
                    b.hidden.copy_(layer_forward(layer, b, i))
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
    windows = parallel.shard(windows, batch_size)
    batches = capture_layer_inputs(model, layers, windows, batch_size, ActivationStore(windows.shape[0]))
    out = []
    for i, layer in iterate_layers(source, batches, "layer statistics"):
        linears = _layer_linears(layer, prefix, i)
        acc = StatsAccumulator(linears, statistic)
        _run_all(layer, batches, acc, i)
        acc.all_reduce()
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
    source: LayerSource | None = None,
) -> None:
    """Apply ``stages`` (in order, per layer) to every target Linear of every decoder layer.

    windows: (N, L) calibration token ids. Weights are replaced in place; per-Linear reports go to
    ``state.reports``. ``source``: where layers come from (default: the model in memory; a streaming one
    reads each from disk and writes it out once final, :mod:`llmopt.calibration.streaming`). Under
    ``torchrun`` each process calibrates on its share of the windows (:mod:`llmopt.parallel`).
    """
    windows = parallel.shard(windows, batch_size)
    prefix, layers = find_decoder_layers(model)
    source = LayerSource(layers, prefix) if source is None else source
    needs_fp = any(s.needs_fp_inputs for s in stages)
    store = ActivationStore(windows.shape[0], copies=2 if needs_fp else 1)
    with memory.phase("capture"), source.outside("inputs"):
        batches = capture_layer_inputs(model, layers, windows, batch_size, store)
    log.info("captured inputs of %s.0 for %d windows in %d batches", prefix, windows.shape[0], len(batches))
    heads = [s for s in stages if s.quantizes_head]
    # GPTAQ: the uncompressed model's activations beside the compressed ones, only when a stage asks
    fp = FPStream(batches, store) if needs_fp else None
    for i, layer in iterate_layers(source, batches, "compressing", last_outputs=bool(heads)):
        if fp is not None:
            fp.begin_layer(layer, f"{prefix}.{i}")
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
                        _run_all(layer, batches, acc, i, fp if stage.needs_fp_inputs else None, group)
                        acc.all_reduce()
                    acc.remove()
                    release_freed_memory()  # the forward's temporaries, kept by the heap for reuse, before the kernels
                with memory.phase("kernels"):
                    _apply_group(stage, group, names, acc, state, i)
                if acc is not None:
                    acc.release()  # what no kernel asked for, or (under torchrun) what every kernel read
        if fp is not None:
            with memory.phase("layer_outputs"):
                fp.end_layer(batches, i, advance=i < len(source) - 1)
    if heads:
        with source.outside("head"):
            _compress_head(model, layers, windows, batches, batch_size, heads, state)
    state.activations_spilled_mib += round(store.bytes_held / 2**20, 1)


def _compress_head(model, layers, windows, batches, batch_size, stages: list[Stage], state: CompressionState) -> None:
    """After the last decoder layer: the output head (the tied embedding where tied) through each stage that
    quantizes it, with the Hessian of the final normed hidden states (:mod:`llmopt.calibration.head`)."""
    name, head, tied_to = output_head(model)
    with memory.phase("statistics"):
        stats = head_statistics(model, layers, windows, batches, batch_size, name, head)
    release_freed_memory()
    state.head, state.head_tied_to = name, tied_to
    with memory.phase("kernels"):
        for stage in stages:
            apply_linears(stage, {name: head}, {name: stats}, state, None)
            state.reports[-1].update(head=True, tied_to=tied_to)
            release_freed_memory()


def _apply_group(stage: Stage, group: list[str], names: dict, acc, state: CompressionState, i: int) -> None:
    """One group's Linears through the stage's kernel (the data-free one for a Linear the data never reached)."""
    apply_linears(stage, {n: names[n] for n in group}, _GroupStats(stage, group, acc), state, i)


class _GroupStats:
    """A group's statistics as :func:`apply_linears` reads them (``stats[name]``), each turned from its float64
    sums into float32 only when its Linear's kernel asks for it, and forgotten (``stats[name] = None``) once no
    later Linear of the group shares it: the widest Hessian (down_proj's) is then never alive beside the
    others', nor its float64 sums beside the float32 matrices of the Linears before it. ``acc`` None: a
    data-free stage (empty statistics)."""

    def __init__(self, stage: Stage, group: list[str], acc: StatsAccumulator | None):
        self._stage, self._left, self._acc = stage, list(group), acc
        self._got: dict[str, LinearStats | None] = {}  # read once (torchrun reads each twice: kernel, commit)

    def __getitem__(self, name: str) -> LinearStats | None:
        if name not in self._got:
            self._got[name] = self._read(name)
        return self._got[name]

    def _read(self, name: str) -> LinearStats | None:
        if self._acc is None:
            return LinearStats()
        if self._acc.has(name):
            return self._acc.get(name)
        log.warning(
            "%s never ran on the calibration data (unrouted expert or unused branch): "
            "stage %s uses its data-free kernel for it",
            name,
            self._stage.name,
        )
        return None  # the stage's data-free kernel

    def __setitem__(self, name: str, value: None) -> None:
        """``None``: the kernel of ``name`` is done; its statistics go unless a later Linear shares them."""
        self._left.remove(name)
        self._got.pop(name, None)
        if self._acc is not None:
            self._acc.forget(name, keep_for=self._left)


def apply_linears(
    stage: Stage,
    linears: dict[str, nn.Module],
    stats,
    state: CompressionState,
    layer_index: int | None,
) -> None:
    """Linears that share their statistics' pass (one group) through the stage's kernel, in order. Under
    ``torchrun`` each kernel runs on the process that owns the Linear (dealt by cost) and its outcome is
    broadcast; every process then writes the same weights and state. ``stats``: name → LinearStats (None: it
    never ran on the data), a dict or a :class:`_GroupStats`.

    In one process, a quantized Linear's weight is parked (on the meta device) while the later kernels of the
    group run, and rebuilt from its codes afterwards, where the codes give back its weight bit for bit: at the
    last kernel of a 1.7B-shape layer (down_proj, 8192 inputs) the six Linears before it held 200 MiB."""
    if not parallel.current().active:
        parked: dict[str, tuple[nn.Module, torch.device]] = {}
        last = list(linears)[-1]
        try:
            for name, lin in linears.items():
                apply_to_linear(stage, name, lin, stats[name], state, layer_index)
                stats[name] = None  # its Hessian goes once no later Linear of the group shares it (q/k/v, gate/up)
                device = lin.weight.device
                if name != last and _park(lin, state.quantized.get(name)):
                    parked[name] = (lin, device)
                release_freed_memory()  # the kernel's work arrays (a few (in, in) matrices) before the next Linear's
        finally:
            for name, (lin, device) in parked.items():
                _unpark(lin, state.quantized[name], device)
        return
    owner = parallel.owners({n: float(lin.weight.numel()) * max(lin.weight.shape) for n, lin in linears.items()})
    rank = parallel.current().rank
    done = {}
    for name, lin in linears.items():  # this process's share, while the others compute theirs
        if owner[name] == rank:
            done[name] = _kernel(stage, name, weight_oi(lin), stats[name], state, layer_index)
            release_freed_memory()
    for name, lin in linears.items():
        outcome, seconds = parallel.broadcast_object(done.pop(name, None), src=owner[name])
        _commit(stage, name, lin, outcome, seconds, stats[name], state)


def _park(lin: nn.Module, q: QuantizedLinear | None) -> bool:
    """Put ``lin``'s weight on the meta device when its codes rebuild it exactly (see :func:`_unpark`)."""
    if q is None:
        return False
    W = weight_oi(lin)
    if tuple(q.shape) != tuple(W.shape) or W.device.type == "meta":
        return False
    if not torch.equal(q.fmt.dequantize(q.codes, q.qparams).to(device=W.device, dtype=W.dtype), W):
        return False
    lin.weight = nn.Parameter(torch.empty_like(lin.weight, device="meta"), requires_grad=False)
    return True


def _unpark(lin: nn.Module, q: QuantizedLinear, device: torch.device) -> None:
    """The weight :func:`_park` took away, from the codes, back on ``device``: the same bits as before."""
    w = lin.weight
    lin.weight = nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device=device), requires_grad=False)
    write_weight(lin, q.fmt.dequantize(q.codes, q.qparams))


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
    outcome, seconds = _kernel(stage, name, weight_oi(linear), stats, state, layer_index)
    _commit(stage, name, linear, outcome, seconds, stats, state)


def _kernel(stage: Stage, name: str, W: torch.Tensor, stats, state: CompressionState, layer_index):
    """(outcome, seconds) of the stage's kernel on ``W`` (out, in)."""
    t0 = time.perf_counter()
    if stats is None:
        outcome = stage.compress_uncalibrated(name, W.to(torch.float32), state, layer_index)
        outcome.report.setdefault("fallback", "data-free")
    else:
        outcome = stage.compress_linear(name, W.to(torch.float32), stats, state, layer_index)
    return outcome, time.perf_counter() - t0


def _commit(stage: Stage, name: str, linear: nn.Module, outcome, seconds: float, stats, state: CompressionState):
    """Write a kernel's outcome into the Linear and the state (the same on every process)."""
    write_weight(linear, outcome.weight)
    if outcome.keep_mask is not None:
        state.masks[name] = outcome.keep_mask  # (the owner's kernel has set it already)
    if outcome.quant is not None:
        q = outcome.quant
        state.quantized[name] = QuantizedLinear(q.codes, q.qparams, outcome.fmt, is_transposed(linear))
    state.reports.append(
        {
            "stage": stage.name,
            "stage_index": stage.index,
            "linear": name,
            "shape": list(outcome.weight.shape),
            "seconds": round(seconds, 4),
            **({"calibration_tokens": stats.tokens} if stats is not None and stats.tokens else {}),
            **outcome.report,
        }
    )
