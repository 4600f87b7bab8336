"""A causal LM whose weights stay on disk until asked for: the module tree on the meta device, and each
module's tensors read from the folder's safetensors shards (memory-mapped, ``safetensors.safe_open``) when
it is *materialised* and dropped again (back to meta) when it is *released*.

What ``llmopt compress --low-memory`` streams: the calibration engine asks for one decoder layer at a time
(:class:`~llmopt.calibration.streaming.StreamingLayerSource`), so the model is never resident as a whole.
Tensors are read and cast exactly as ``from_pretrained`` reads and casts them (checkpoint dtype → the run's
dtype with ``Tensor.to``), so a streamed run computes on the same bits as an in-memory one. Weights shared
by several modules (a tied output head and token embedding) stay one tensor: materialising or releasing
one name replaces it under every name that shares it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from llmopt import checkpoint
from llmopt.errors import LLMOptError, first_line

log = logging.getLogger(__name__)

_STORED = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class ShardedCheckpoint:
    """Tensor name → (shard file, stored dtype string, shape) of a folder's safetensors files (headers only);
    :meth:`get` reads one tensor."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        checkpoint.check_weights(self.folder)  # headers parse, the index names existing shards
        self.entries: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
        for p in sorted(self.folder.glob("*.safetensors")):
            if p.name == checkpoint.CODES_FILE:
                continue
            for name, (dtype, shape) in checkpoint.safetensors_header(p).items():
                self.entries[name] = (p, dtype, shape)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def parameters(self) -> int:
        """Number of stored values (the model's parameter count, a tied weight once)."""
        return sum(math.prod(shape) for _, _, shape in self.entries.values())

    def first_float_dtype(self) -> torch.dtype | None:
        return next((_STORED[d] for _, d, _ in self.entries.values() if d in _STORED), None)

    def get(self, name: str, dtype: torch.dtype | None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Tensor ``name`` (cast to ``dtype`` when floating), checked finite."""
        from safetensors import safe_open

        path, _, _ = self.entries[name]
        with safe_open(str(path), framework="pt") as f:
            t = f.get_tensor(name)
        if t.is_floating_point():
            if not bool(torch.isfinite(t).all()):
                raise LLMOptError(f"{name} in {self.folder} holds NaN or infinite values: the checkpoint is corrupt")
            if dtype is not None:
                t = t.to(dtype)
        return t.to(device)


def resolve_dtype(cfg, ckpt: ShardedCheckpoint, dtype: torch.dtype | str) -> torch.dtype:
    """The dtype a run holds the model in: ``dtype``, or for "auto" what ``from_pretrained`` picks (the config's
    ``dtype`` / ``torch_dtype``, else the checkpoint's first floating tensor's, else float32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    cfg_dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(cfg_dtype, str) and cfg_dtype != "auto":
        cfg_dtype = getattr(torch, cfg_dtype, None)
    if isinstance(cfg_dtype, torch.dtype):
        return cfg_dtype
    return ckpt.first_float_dtype() or torch.float32


class LazyModel:
    """The model's module tree on the meta device (buffers computed in ``__init__``, such as rotary
    frequencies, stay real) over a :class:`ShardedCheckpoint`; parameters materialised on demand."""

    def __init__(self, folder: str | Path, dtype: torch.dtype | str = "auto", device=None):
        import llmopt.hf_imports  # noqa: F401  (transformers' import-time settings, before its model classes)

        # isort: split
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.integrations.accelerate import init_empty_weights
        from transformers.modeling_utils import no_init_weights

        self.folder = Path(folder)
        checkpoint.read_config(self.folder)
        self.ckpt = ShardedCheckpoint(self.folder)
        checkpoint.check_generation_config(self.folder)
        try:
            cfg = AutoConfig.from_pretrained(self.folder)
        except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
            raise LLMOptError(f"config.json of {self.folder} cannot be read: {first_line(e, 200)}") from e
        self.dtype = resolve_dtype(cfg, self.ckpt, dtype)
        from llmopt.models import _parse_device

        self.device = _parse_device(device) or torch.device("cpu")  # cpu, cuda[:N], auto: checked as load_model does
        with no_init_weights(), init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(cfg, dtype=self.dtype)
        model.tie_weights()  # init_empty_weights re-registers each parameter, which unties them
        if (self.folder / checkpoint.GENERATION_CONFIG).is_file() and model.can_generate():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(self.folder)  # as from_pretrained reads it
        self.model = model.eval()
        # every name of each parameter (tied weights: several), in state_dict order
        groups: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        self.aliases = {n: names for names in groups.values() for n in names}
        self._check_names()

    def _check_names(self) -> None:
        """The checks of :func:`~llmopt.checkpoint.load_causal_lm` on names and shapes, before any work."""
        missing, mismatched = [], []
        for name in self.aliases:
            key = self.stored_name(name)
            if key is None:
                missing.append(name)
            elif tuple(self.ckpt.entries[key][2]) != tuple(self.model.get_parameter(name).shape):
                mismatched.append((key, name))
        if mismatched:
            key, name = mismatched[0]
            raise LLMOptError(
                f"config.json of {self.folder} does not match its weights: {key} is {list(self.ckpt.entries[key][2])} "
                f"in the checkpoint but {list(self.model.get_parameter(name).shape)} by the config"
            )
        if missing:
            raise LLMOptError(
                f"the checkpoint in {self.folder} lacks {len(missing)} tensor(s) the model needs ({missing[0]}, ...): "
                "re-download or re-save the model"
            )

    def stored_name(self, name: str) -> str | None:
        """The checkpoint's name for parameter ``name`` (for a tied weight: any name sharing it that is stored)."""
        return next((n for n in self.aliases.get(name, [name]) if n in self.ckpt), None)

    def _set(self, names: list[str], value: nn.Parameter) -> None:
        for n in names:
            mod_name, _, attr = n.rpartition(".")
            self.model.get_submodule(mod_name)._parameters[attr] = value

    def _under(self, prefix: str) -> list[str]:
        return [n for n in self.aliases if not prefix or n.startswith(prefix + ".")]

    def materialize(self, prefix: str) -> None:
        """Read every meta parameter of module ``prefix`` (and its stored buffers) from the checkpoint."""
        self.materialize_params(self._under(prefix))
        module = self.model.get_submodule(prefix)
        base = f"{prefix}." if prefix else ""
        for n, b in list(module.named_buffers()):
            if (base + n) in self.ckpt:
                mod_name, _, attr = n.rpartition(".")
                sub = module.get_submodule(mod_name)
                sub._buffers[attr] = self.ckpt.get(base + n, b.dtype if b.is_floating_point() else None, self.device)

    def materialize_params(self, names: list[str]) -> None:
        """Read the parameters ``names`` (full names) that are still on meta."""
        for full in names:
            p = self.model.get_parameter(full)
            if p.is_meta:
                t = self.ckpt.get(self.stored_name(full), self.dtype if p.is_floating_point() else None, self.device)
                self._set(self.aliases[full], nn.Parameter(t, requires_grad=False))

    def release(self, prefix: str) -> None:
        """Drop the parameters of module ``prefix`` (back to meta, keeping shape and dtype)."""
        self.release_params(self._under(prefix))

    def release_params(self, names: list[str]) -> None:
        for full in names:
            p = self.model.get_parameter(full)
            if not p.is_meta:
                self._set(self.aliases[full], nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))

    def materialized(self) -> int:
        """Number of parameter values held in memory now (a tied weight once)."""
        return sum(p.numel() for p in self.model.parameters() if not p.is_meta)

    def float32_bytes(self) -> int:
        return 4 * self.ckpt.parameters()


#: stream when the model's float32 size exceeds this share of the available memory (compress and export alike)
MEMORY_FRACTION = 0.5


def oversized_folder(spec: str) -> tuple[Path, float, float] | None:
    """(the safetensors folder, its float32 MiB, the available MiB) of a model too large to load whole (its
    float32 size over :data:`MEMORY_FRACTION` of the available memory); None when it fits, when ``spec`` is a
    GGUF file or ``bundled:`` (their float32 size is known once converted), or when the folder cannot be read
    (the in-memory path then reports what is wrong, in its own words)."""
    from llmopt.models import streamable_folder

    if spec.lower().endswith(".gguf") or spec.startswith("bundled:"):
        return None
    try:
        folder = streamable_folder(spec)
        short = memory_shortfall(folder, MEMORY_FRACTION)
    except LLMOptError as e:
        log.debug("not streaming %s: %s", spec, e)
        return None
    return None if short is None else (folder, *short)


def memory_shortfall(folder: Path, fraction: float) -> tuple[float, float] | None:
    """(the float32 size of the folder's weights, the available memory), MiB, when that size exceeds ``fraction``
    of what is available (:func:`llmopt.memory.available_mib`); None when it fits or nothing can be read."""
    from llmopt import memory

    need = 4 * ShardedCheckpoint(folder).parameters() / 2**20
    avail = memory.available_mib()
    return None if avail is None or need <= fraction * avail else (need, avail)


def load_lazy(folder: Path, spec: str, *, dtype: torch.dtype | str = "auto", device=None):
    """(:class:`LazyModel`, tokenizer) of a local safetensors folder (what ``spec`` resolved to), with the
    tokenizer checks of :func:`llmopt.models.load_model`."""
    from llmopt.models import load_tokenizer, parse_dtype

    checkpoint.check_tokenizer_files(Path(folder))
    lazy = LazyModel(folder, dtype=parse_dtype(dtype), device=device)
    tokenizer = load_tokenizer(spec)
    checkpoint.check_vocab(lazy.model, tokenizer, spec)
    log.info(
        "streaming %s from %s: %.2fM parameters, %s; one decoder layer in memory at a time",
        spec,
        folder,
        lazy.ckpt.parameters() / 1e6,
        str(lazy.dtype).removeprefix("torch."),
    )
    return lazy, tokenizer
