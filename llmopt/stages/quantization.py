"""Quantization stages: RTN and GPTQ onto a number format (see :mod:`llmopt.formats`)."""

from __future__ import annotations

import re
from functools import cache
from typing import ClassVar, Literal

from pydantic import Field, NonNegativeInt, field_validator, model_validator
from torch import nn

from llmopt.core.config import StageConfig
from llmopt.core.stage import Stage
from llmopt.core.state import LinearOutcome
from llmopt.errors import LLMOptError
from llmopt.formats import QuantFormat
from llmopt.kernels.gptq import GPTQConfig, gptq_quantize
from llmopt.linears import in_features, is_linear, out_features

FORMAT_NAMES = ("int", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# llama.cpp's quantizer (llama-quant.cpp, llama_tensor_get_type), given an importance matrix, writes the
# ffn_down tensors of the first n_layer/8 layers of a Q4_0 / Q5_0 file as Q4_1 / Q5_1 ("guard against
# craziness in the first few ffn_down layers"). `mixture: llama.cpp` picks the same types, so a GGUF export
# has the tensor types and file size of llama.cpp's own file of that type.
LLAMA_FFN_DOWN_GUARD = {"q4_0": "q4_1", "q5_0": "q5_1"}


@cache
def _gguf_patterns(kinds: tuple[str, ...]) -> re.Pattern:
    """Module names gguf-py maps to these GGUF tensor kinds (any architecture), with the decoder layer
    index as a group."""
    import gguf

    cfg = gguf.TensorNameMap.block_mappings_cfg
    esc = re.escape("{bid}")
    alts = sorted({re.escape(p).replace(esc, r"(\d+)") for k in kinds for p in cfg.get(gguf.MODEL_TENSOR[k], ())})
    return re.compile("|".join(f"(?:{a})" for a in alts))


def gguf_layer(name: str, kinds: tuple[str, ...]) -> int | None:
    """The decoder layer index when module ``name`` is one of gguf-py's tensor ``kinds`` (per-expert Linears
    ``...experts.<j>.down_proj`` count as the merged expert tensor), else None."""
    m = _gguf_patterns(kinds).fullmatch(re.sub(r"\.experts\.\d+\.", ".experts.", name))
    return None if m is None else int(next(g for g in m.groups() if g is not None))


def ffn_down_layer(name: str) -> int | None:
    """Layer index of an MLP down projection as llama.cpp names them (ffn_down, _exps, _shexp), else None."""
    return gguf_layer(name, ("FFN_DOWN", "FFN_DOWN_EXP", "FFN_DOWN_SHEXP"))


class QuantConfig(StageConfig):
    format: str = "int"  # "int" (bits, group_size, symmetric) or a llama.cpp block type: q8_0, q4_0, ...
    bits: int | None = None  # 2..8 for "int"; implied by block formats
    group_size: int | None = None  # along the input dim; None = one scale per output channel
    symmetric: bool = True
    # > 0: per-group scale search (shrunk ranges on this grid + least-squares refits; GPTQ weights the
    # error by diag H, RTN by nothing), for every format (llmopt.formats.QuantFormat.qparams)
    mse_grid: NonNegativeInt = 0
    # "llama.cpp": the tensor types llama.cpp picks for this format's file type with an importance matrix
    # (q4_0 / q5_0: the first n_layer/8 ffn_down Linears in q4_1 / q5_1; other formats: unchanged);
    # "none": every target in `format`. Linears pruned by an earlier stage keep `format` (q4_1/q5_1 have
    # no exact 0). GPTQ defaults to llama.cpp's mixture, RTN (data-free, as llama.cpp without an importance
    # matrix) to none.
    mixture: Literal["llama.cpp", "none"] = "none"

    @field_validator("format")
    @classmethod
    def _fmt(cls, v: str) -> str:
        if v not in FORMAT_NAMES:
            raise ValueError(f"unknown format '{v}'; valid formats: {', '.join(FORMAT_NAMES)}")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.format == "int":
            if self.bits is None:
                raise ValueError("format 'int' needs bits (2..8)")
            if not 2 <= self.bits <= 8:
                raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        try:
            self.make_format()
        except LLMOptError as e:
            raise ValueError(str(e)) from None
        return self

    def make_format(self):
        from llmopt.formats import make_format

        return make_format(self.format, bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)


class QuantStage(Stage):
    cfg: QuantConfig

    def __init__(self, cfg, index: int = 0):
        super().__init__(cfg, index)
        self.fmt = cfg.make_format()
        self._guard = None  # (format, number of layers with an ffn_down) of llama.cpp's mixture, set by targets
        if cfg.mixture == "llama.cpp" and cfg.format in LLAMA_FFN_DOWN_GUARD:
            self._guard = (cfg.model_copy(update={"format": LLAMA_FFN_DOWN_GUARD[cfg.format]}).make_format(), None)

    def targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        found = super().targets(model)
        if self._guard is not None:  # llama.cpp counts the layers over the whole model, targets or not
            layers = {ffn_down_layer(n) for n, m in model.named_modules() if is_linear(m)} - {None}
            self._guard = (self._guard[0], len(layers))
        return found

    def format_for(self, name: str, state):
        """The format of Linear ``name``: the stage's, or llama.cpp's guard format for an early ffn_down. A
        pruned Linear keeps the stage's format: the guard formats (q4_1, q5_1) have no exact 0."""
        if self._guard is None or state.masks.get(name) is not None:
            return self.fmt
        fmt, n_layer = self._guard
        if n_layer is None:
            raise LLMOptError(f"internal: stage '{self.name}' quantized {name} before its targets were listed")
        i = ffn_down_layer(name)
        return fmt if i is not None and i < n_layer // 8 else self.fmt

    def check(self, name: str, linear: nn.Linear) -> None:
        self.fmt.check_width(in_features(linear), name)
        if self._guard is not None:
            self._guard[0].check_width(in_features(linear), name)

    def _outcome(self, name, res, state, fmt) -> LinearOutcome:
        report = {
            "format": fmt.name,
            "bits_per_weight": fmt.bits_per_weight(res.weight.shape[1]),
            "loss": res.loss,
        }
        if res.damp is not None:
            report["damp"] = res.damp  # damping fraction actually used (the Cholesky retry may raise it)
        mask = state.masks.get(name)
        if mask is not None:
            pruned = ~mask
            report["sparsity"] = float((res.weight == 0).float().mean())
            # formats whose grid has no exact 0 (q4_1, q5_1) take the nearest code: say how many
            report["pruned_nonzero"] = int((res.weight[pruned] != 0).sum())
        return LinearOutcome(weight=res.weight, quant=res, fmt=fmt, report=report)

    def compress_uncalibrated(self, name, W, state, layer_index) -> LinearOutcome:
        """No activations seen (unrouted expert): round-to-nearest onto the same format, pruned weights
        kept at 0 where the grid has an exact 0."""
        from llmopt.formats import rtn_quantize

        mask = state.masks.get(name)
        fmt = self.format_for(name, state)
        out = self._outcome(name, rtn_quantize(W if mask is None else W * mask, fmt), state, fmt)
        out.report["fallback"] = "rtn"
        return out


class RTNConfig(QuantConfig):
    stage: Literal["rtn"]


class RTNStage(QuantStage):
    """Round-to-nearest onto the format's grid: the data-free baseline."""

    name = "rtn"
    Config: ClassVar = RTNConfig
    statistic = "none"

    def compress_linear(self, name, W, stats, state, layer_index) -> LinearOutcome:
        from llmopt.formats import rtn_quantize

        # Pruned weights are already 0 in W; every grid with an exact 0 (int, q8_0, q4_0, q5_0) keeps
        # them at 0, and the report counts those that moved (q4_1/q5_1).
        fmt = self.format_for(name, state)
        return self._outcome(name, rtn_quantize(W, fmt, mse_grid=self.cfg.mse_grid), state, fmt)


class GPTQStageConfig(GPTQConfig, QuantConfig):
    """A recipe's ``gptq`` entry: the format and target fields of :class:`QuantConfig` plus GPTQ's own
    :class:`~llmopt.kernels.gptq.GPTQConfig` (its fields, bounds and shipped defaults are defined there once;
    the kernel receives this object as it is), llama.cpp's tensor mixture and the attention-sink weight."""

    stage: Literal["gptq"]
    mixture: Literal["llama.cpp", "none"] = "llama.cpp"
    # Weight of each calibration window's first token in the value projection's Hessian, as a fraction
    # of the window's tokens (1.0: as much as all the others together). That token is the attention
    # sink: most queries put much of their attention on it, so an error in its value reaches nearly
    # every output, while the plain Hessian counts it once per window (eval/results/gptq-defaults.md 3b).
    # Applies to a separate value projection (gguf-py's attn_v: Llama, Qwen, Mistral, Gemma, ...; not
    # the fused qkv of GPT-2 or Phi-3). 0 = the plain Hessian.
    sink_weight: float = Field(1.0, ge=0.0)
    # The output head (lm_head; on a tied model also the token embedding: one tensor, as llama.cpp's tied
    # token_embd). "none": left to the exporter (the GGUF gets llama.cpp's round-to-nearest in the type it
    # picks). Else GPTQ onto that format after the last decoder layer, with this entry's GPTQ settings and
    # the Hessian of the final normed hidden states; its codes are stored like any Linear's, so the GGUF
    # holds them byte for byte. "auto": the type llama.cpp's quantizer gives the output tensor in a file of
    # this stage's format (q4_0 on SmolLM2, 576 wide: q8_0; on rows that are a multiple of 256: q6_K once
    # llmopt has that format); or a GGUF block format by name (q8_0, q6_K, q5_0, q4_0, ...).
    head: str = "none"

    @field_validator("head")
    @classmethod
    def _head(cls, v: str) -> str:
        from llmopt.formats import GGUF_FORMATS

        key = v.strip().lower()
        names = {n.lower(): n for n in GGUF_FORMATS}
        if key in ("none", "auto"):
            return key
        if key not in names:
            raise ValueError(f"unknown head format '{v}'; valid: none, auto, {', '.join(GGUF_FORMATS)}")
        return names[key]

    @model_validator(mode="after")
    def _head_auto(self):
        from llmopt.core.llama_types import DEFAULT_TYPE

        if self.head == "auto" and self.format not in DEFAULT_TYPE:
            raise ValueError(
                f"head: auto takes llama.cpp's choice for a file of the stage's format, and '{self.format}' is "
                "no llama.cpp file type: name the head's format (e.g. head: q8_0)"
            )
        return self

    @model_validator(mode="after")
    def _act_order(self):
        # Act-order permutes columns; with groups that are chosen on the fly, a group would gather
        # scattered columns and could not be stored as contiguous blocks (GGUF, compressed-tensors).
        grouped = self.format != "int" or self.group_size is not None
        if self.act_order and grouped and not self.static_groups:
            raise ValueError(
                "act_order with grouped formats needs static_groups: true (groups must stay contiguous to be exported)"
            )
        return self


class GPTQStage(QuantStage):
    """GPTQ (Frantar et al. 2022) on the format; keeps an earlier stage's sparsity mask."""

    name = "gptq"
    Config: ClassVar = GPTQStageConfig
    statistic = "hessian"

    def __init__(self, cfg, index: int = 0):
        super().__init__(cfg, index)
        self._head: tuple[str, QuantFormat] | None = None  # (module name, format) of the output head, by targets

    @property
    def quantizes_head(self) -> bool:
        return self.cfg.head != "none"

    def targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        found = super().targets(model)
        if self.quantizes_head:  # the head's format and width are checked with the targets, before any work
            from llmopt.calibration.head import output_head

            name, head, tied_to = output_head(model)
            fmt = head_format(self.cfg.head, self.cfg.format, head, tied_to is not None, model)
            fmt.check_width(in_features(head), name)
            self._head = (name, fmt)
        return found

    def format_for(self, name: str, state):
        if self._head is not None and name == self._head[0]:
            return self._head[1]
        return super().format_for(name, state)

    def first_token_weight(self, name: str) -> float:
        return self.cfg.sink_weight if gguf_layer(name, ("ATTN_V",)) is not None else 0.0

    @property
    def needs_fp_inputs(self) -> bool:
        return self.cfg.asymmetric  # GPTAQ

    def compress_linear(self, name, W, stats, state, layer_index) -> LinearOutcome:
        fmt = self.format_for(name, state)
        mask = state.masks.get(name)
        res = gptq_quantize(W, stats.hessian, fmt, self.cfg, keep_mask=mask, name=name, dxxt=stats.dxxt)
        return self._outcome(name, res, state, fmt)


def head_format(head: str, stage_format: str, module: nn.Module, tied: bool, model: nn.Module) -> QuantFormat:
    """The format of the output head for a stage's ``head`` setting: a named one, or for ``auto`` the type
    llama.cpp's ``llama_tensor_get_type`` gives the output tensor (the token embedding on a tied model, which
    llama.cpp then types as the output) in a file of type ``stage_format`` (:mod:`llmopt.core.llama_types`)."""
    from llmopt.formats import make_format

    if head != "auto":
        return make_format(head)
    from llmopt.calibration import find_decoder_layers
    from llmopt.core.llama_types import ModelFacts, tensor_type

    shape = (out_features(module), in_features(module))  # numpy order (rows, columns), as gguf-py's
    tensor = "token_embd.weight" if tied else "output.weight"
    facts = ModelFacts(n_layer=len(find_decoder_layers(model)[1]), has_output=not tied)
    t = tensor_type(stage_format, tensor, shape, facts, imatrix=True)
    try:
        return make_format(t.name.lower())
    except LLMOptError:
        raise LLMOptError(
            f"head: auto is {t.name} for a {stage_format.upper()} file with a {shape[1]}-wide output head (llama.cpp's "
            f"choice), and llmopt has no {t.name} format: name the head's format (e.g. head: q8_0)"
        ) from None
