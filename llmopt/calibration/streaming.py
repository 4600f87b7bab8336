"""The engine's layers streamed from disk (``llmopt compress --low-memory``): one decoder layer in memory at
a time, written to the output's shards as soon as it is final.

The model is a :class:`~llmopt.models.lazy.LazyModel`: its module tree on the meta device over the input's
safetensors shards. :class:`StreamingLayerSource` is the engine's :class:`LayerSource` for it:

* ``load(i)`` reads decoder layer i's tensors (cast to the run's dtype exactly as ``from_pretrained`` casts);
* ``release(i)``, once every stage is done with the layer and its outputs have been computed, gives each
  quantized Linear its exact float32 weight when the model is 16-bit (as the in-memory path does before
  saving), writes the layer's tensors as shard i + 2 of the output and drops them (back to meta) and the
  layer's pruning masks (only later stages of the same layer read them); the codes and scales of its quantized
  Linears, needed when ``quantization.safetensors`` is written at the end, move to files under ``offload``
  mapped back from them (file pages the OS can drop, not anonymous memory);
* ``outside("inputs")`` holds the tensors outside the decoder layers except an untied output head (the
  embeddings the capture of the first layer's inputs runs) and ``outside("head")`` all of them (the head's
  statistics run the final norm; the head stage changes the head, on a tied model the token embedding);
* :meth:`StreamingLayerSource.finish` writes those tensors as shard 1 and the index.

The engine finds each layer's return form with one 2-token forward of the whole model
(``capture._output_kinds``); here the layers are still on meta then, so a pre-hook moves each such layer's
inputs to meta too: the layer's own forward runs on shapes alone and no weight is read for it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_map

from llmopt.calibration.head import output_head
from llmopt.calibration.layers import LayerSource, find_decoder_layers
from llmopt.core.state import CompressionState
from llmopt.errors import LLMOptError
from llmopt.linears import set_weight_tensor
from llmopt.memory import release_freed_memory
from llmopt.models.lazy import LazyModel
from llmopt.safetensors_io import ShardWriter

log = logging.getLogger(__name__)


def exact_float32_weights(model: nn.Module, state: CompressionState, prefix: str = "", names=None) -> None:
    """In a 16-bit model, give every quantized Linear its exact float32 weight, dequantized from the codes
    (bfloat16/float16 cannot hold code × fp16 scale exactly). Done just before saving: the folder then stores
    those Linears in float32 and everything else in the model's dtype. ``model`` may be one decoder layer whose
    full name starts with ``prefix``; ``names`` limits it to those Linears."""
    for name, q in state.quantized.items():
        if not name.startswith(prefix) or (names is not None and name not in names):
            continue
        lin = model.get_submodule(name[len(prefix) :])
        if lin.weight.dtype != torch.float32:
            set_weight_tensor(lin, q.fmt.dequantize(q.codes, q.qparams))
            if name == state.head and state.head_tied_to is not None:  # the tied embedding is the same tensor
                model.get_submodule(state.head_tied_to).weight = lin.weight


def check_streamable(stages) -> None:
    """Refuse, before any model is loaded, a recipe the streaming path cannot run in its one pass over the layers."""
    for st in stages:
        what = None
        if st.whole_model:
            what = "works on the whole model at once"
        elif getattr(st.cfg, "owl", None) is not None:
            what = "plans OWL sparsities from a pass over the whole uncompressed model"
        elif not st.needs_calibration:
            what = "is data-free (it runs on the loaded model, outside the layer-wise engine)"
        if what is not None:
            raise LLMOptError(
                f"--low-memory streams the model one decoder layer at a time, and stage {st.index + 1} ({st.name}) "
                f"{what}: run this recipe without --low-memory"
            )


def choose_streaming(spec: str, stages, calib_data: str | None, low_memory: bool | None):
    """The folder to stream from, or None to load the model whole. ``low_memory`` True forces streaming (any
    obstacle is an error), False never streams, None streams when the model's float32 size exceeds
    :data:`~llmopt.models.lazy.MEMORY_FRACTION` of the available memory (logged; a warning when the recipe
    cannot be streamed)."""
    from llmopt.models import streamable_folder
    from llmopt.models.lazy import MEMORY_FRACTION, oversized_folder

    if low_memory is False:
        return None
    if low_memory:
        _check_recipe(stages, calib_data)
        return streamable_folder(spec)
    big = oversized_folder(spec)
    if big is None:
        return None
    folder, need, avail = big
    why = f"the model's float32 size ({need:.0f} MiB) exceeds {100 * MEMORY_FRACTION:.0f}% of the available memory"
    try:
        _check_recipe(stages, calib_data)
    except LLMOptError as e:
        log.warning("%s (%.0f MiB), yet the recipe cannot be streamed, so it is loaded whole: %s", why, avail, e)
        return None
    log.info("%s (%.0f MiB): streaming it one decoder layer at a time (--no-low-memory loads it whole)", why, avail)
    return folder


def _check_recipe(stages, calib_data: str | None) -> None:
    from llmopt import parallel
    from llmopt.data import parse_data_spec

    check_streamable(stages)
    if parallel.launched():
        raise LLMOptError(
            "--low-memory streams in one process: run it without torchrun, or load the model whole under "
            "torchrun (--no-low-memory)"
        )
    if calib_data is not None and parse_data_spec(calib_data).kind == "self":
        raise LLMOptError(
            "--low-memory cannot sample self:N calibration text (generating needs the whole model): "
            "use text:PATH or wikitext2, or run without --low-memory"
        )


def _meta_inputs(layer: nn.Module, args, kwargs):
    """Forward pre-hook: a layer still on meta whose own forward is about to run gets meta inputs (shapes only)."""
    if "forward" in layer.__dict__ or not any(p.is_meta for p in layer.parameters()):
        return None  # the engine's recorder or bypass, or a loaded layer: inputs as they are

    def meta(x):
        return x.to("meta") if isinstance(x, torch.Tensor) else x

    return tree_map(meta, args), tree_map(meta, kwargs)


class StreamingLayerSource(LayerSource):
    """Decoder layers of a :class:`LazyModel`, loaded one at a time and written to ``writer`` when final.

    ``max_layer_params``: the most decoder-layer parameter values ever held at once (one layer's, by design)."""

    def __init__(self, lazy: LazyModel, writer: ShardWriter, state: CompressionState, offload: Path | None = None):
        prefix, layers = find_decoder_layers(lazy.model)
        super().__init__(layers, prefix)
        self.lazy, self.writer, self.state, self.offload = lazy, writer, state, offload
        self.max_layer_params = 0
        self._done_outside = False
        self._hooks = [layer.register_forward_pre_hook(_meta_inputs, with_kwargs=True) for layer in layers]
        in_layers = f"{prefix}."
        self.outside_names = [n for n in lazy.aliases if not n.startswith(in_layers)]
        head_params: set[str] = set()  # an untied output head: not needed to capture the inputs
        if _has_head(lazy.model):
            head_name, head, tied_to = output_head(lazy.model)
            head_params = set() if tied_to else {f"{head_name}.{n}" for n, _ in head.named_parameters()}
        self.input_names = [n for n in self.outside_names if n not in head_params]

    @staticmethod
    def shards(lazy: LazyModel) -> int:
        """Output shards: one for the tensors outside the decoder layers, one per decoder layer."""
        return 1 + len(find_decoder_layers(lazy.model)[1])

    def _layer_params(self) -> int:
        return sum(p.numel() for p in self.layers.parameters() if not p.is_meta)

    def load(self, i: int) -> nn.Module:
        self.lazy.materialize(f"{self.prefix}.{i}")
        self.max_layer_params = max(self.max_layer_params, self._layer_params())
        return self.layers[i]

    def release(self, i: int, layer: nn.Module) -> None:
        name = f"{self.prefix}.{i}"
        exact_float32_weights(layer, self.state, prefix=f"{name}.")
        self.writer.write(i + 1, layer.state_dict(prefix=f"{name}."))
        self.lazy.release(name)
        for n in [n for n in self.state.masks if n.startswith(f"{name}.")]:
            del self.state.masks[n]  # pruning masks serve the later stages of the same layer only (1 byte/weight)
        if self.offload is not None:
            self.offload.mkdir(exist_ok=True)
            for n, q in self.state.quantized.items():
                if n.startswith(f"{name}."):
                    q.offload(self.offload / f"{n}.pt")
        release_freed_memory()

    @contextmanager
    def outside(self, part: str):
        names = self.input_names if part == "inputs" else self.outside_names
        self.lazy.materialize_params(names)
        try:
            yield
            if part == "head":  # the head stage changed the head (and a tied embedding): save them now
                self._write_outside()
        finally:
            self.lazy.release_params(names)
            release_freed_memory()

    def _write_outside(self) -> None:
        model, state = self.lazy.model, self.state
        if state.head is not None:
            exact_float32_weights(model, state, names={state.head})
        keep, seen = {}, set()
        in_layers = f"{self.prefix}."
        for name, t in model.state_dict(keep_vars=True).items():
            if name.startswith(in_layers) or id(t) in seen:
                continue
            stored = self.lazy.stored_name(name) if name in self.lazy.aliases else name
            if name in self.lazy.aliases:
                seen.add(id(t))
                name = stored
            keep[name] = t.detach()
        self.writer.write(0, keep)
        self._done_outside = True

    def finish(self) -> None:
        """After the engine: the tensors outside the decoder layers (unless the head stage wrote them), the index."""
        if not self._done_outside:
            self.lazy.materialize_params(self.outside_names)
            try:
                self._write_outside()
            finally:
                self.lazy.release_params(self.outside_names)
        for h in self._hooks:
            h.remove()
        self.writer.finish(sum(p.numel() for p in self.lazy.model.parameters()))


def save_config(model: nn.Module, folder) -> None:
    """config.json and generation_config.json as ``save_pretrained`` writes them (the dtype of the first floating
    parameter, the architecture's class name)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def _has_head(model: nn.Module) -> bool:
    try:
        output_head(model)
    except LLMOptError:
        return False
    return True
