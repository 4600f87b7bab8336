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
from llmopt.linears import in_features, out_features


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


class QuantConfig(StageConfig):
    # "int" (bits, group_size, symmetric), a format of llmopt.formats (q4_0, q6_K, iq4_nl, ...) or a llama.cpp
    # file type (q4_k_m, q5_k_s, q3_k_m, iq4_xs, ...: llmopt.core.llama_mix.FILE_TYPES), any case
    format: str = "int"
    bits: int | None = None  # 2..8 for "int"; implied by block formats
    group_size: int | None = None  # along the input dim; None = one scale per output channel
    symmetric: bool = True
    # > 0: per-group scale search (shrunk ranges on this grid + least-squares refits; GPTQ weights the
    # error by diag H, RTN by nothing), for every format (llmopt.formats.QuantFormat.qparams)
    mse_grid: NonNegativeInt = 0
    # "llama.cpp": when `format` names a llama.cpp file type (q4_0, q6_k, q4_k_m, iq4_xs, ...), each target
    # gets the type llama.cpp's quantizer picks for that tensor in that file type made with an importance
    # matrix (llama_tensor_get_type: q4_k_m's attn_v / ffn_down of some layers in q6_K, q4_0's first
    # n_layer/8 ffn_down in q4_1, rows that are not whole 256-blocks in q5_0 / q8_0 / iq4_nl, ...), so the
    # GGUF export has the tensor types and size of llama.cpp's own file; other formats: unchanged.
    # "none": every target in `format` (a file type that is no single format, q4_k_m, needs llama.cpp's).
    # A Linear pruned by an earlier stage whose type has no exact 0 (q4_1, q5_1, K-quants with mins, IQ4)
    # takes the same-size type with one (llama_mix.ZERO_EXACT). GPTQ defaults to llama.cpp's mixture, RTN
    # (data-free) to none.
    mixture: Literal["llama.cpp", "none"] = "none"

    @field_validator("format")
    @classmethod
    def _fmt(cls, v: str) -> str:
        from llmopt.core.llama_mix import FILE_TYPES, file_type
        from llmopt.formats import FORMAT_NAMES

        named = {n.lower(): n for n in FORMAT_NAMES}
        key = file_type(v) or named.get(v.strip().lower())
        if key is None:
            raise ValueError(
                f"unknown format '{v}'; valid formats: {', '.join(FORMAT_NAMES)}; llama.cpp file types: "
                f"{', '.join(FILE_TYPES)}"
            )
        return key

    @model_validator(mode="after")
    def _check(self):
        from llmopt.core.llama_mix import is_mix_only

        if self.format == "int":
            if self.bits is None:
                raise ValueError("format 'int' needs bits (2..8)")
            if not 2 <= self.bits <= 8:
                raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if is_mix_only(self.format):  # its formats are checked per Linear when the stage meets the model
            if self.mixture != "llama.cpp":
                raise ValueError(
                    f"{self.format} is llama.cpp's mix of tensor types, not one format: set mixture: llama.cpp"
                )
            if self.bits is not None or self.group_size is not None:
                raise ValueError(f"{self.format} is a llama.cpp file type: leave bits and group_size out")
            return self
        try:
            self.make_format()
        except LLMOptError as e:
            raise ValueError(str(e)) from None
        return self

    @property
    def file_type(self) -> str | None:
        """The llama.cpp file type whose tensor types the stage follows (``mixture: llama.cpp`` and a format
        that names one), else None."""
        from llmopt.core.llama_mix import file_type

        return file_type(self.format) if self.mixture == "llama.cpp" else None

    def make_format(self):
        """The stage's format; for a file type that is no single format (q4_k_m), its default type's (q4_K)."""
        from llmopt.core.llama_mix import default_type, format_of, is_mix_only
        from llmopt.formats import make_format

        if is_mix_only(self.format):
            return format_of(default_type(self.format))
        return make_format(self.format, bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)


class QuantStage(Stage):
    cfg: QuantConfig

    def __init__(self, cfg, index: int = 0):
        super().__init__(cfg, index)
        self.fmt = None if cfg.file_type else cfg.make_format()
        self._types = None  # llama.cpp's mix: Linear name → ggml type, set by targets

    def targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        found = super().targets(model)
        if self.cfg.file_type:  # llama.cpp's choice reads the whole model (positions, head, layer count)
            from llmopt.core.llama_mix import linear_types

            self._types = linear_types(model, self.cfg.file_type)
        return found

    def format_for(self, name: str, state):
        """The format of Linear ``name``: the stage's, or the one of the type llama.cpp's mix gives it. A pruned
        Linear whose type has no exact 0 takes the same-size type that has one (llama_mix.ZERO_EXACT)."""
        if not self.cfg.file_type:
            return self.fmt
        from llmopt.core.llama_mix import ZERO_EXACT, format_of

        if self._types is None or name not in self._types:
            raise LLMOptError(f"internal: stage '{self.name}' quantized {name} before its targets were listed")
        t = self._types[name]
        if state is not None and state.masks.get(name) is not None:
            t = ZERO_EXACT.get(t, t)
        return format_of(t)

    def check(self, name: str, linear: nn.Linear) -> None:
        if self.cfg.file_type and self._types is not None and self._types.get(name) is None:
            raise LLMOptError(
                f"llama.cpp's {self.cfg.file_type} leaves {name} unquantized (rows of {in_features(linear)} weights "
                "fit no block): add it to the stage's ignore list"
            )
        self.format_for(name, None).check_width(in_features(linear), name)  # ZERO_EXACT's types fit it too

    def _outcome(self, name, res, state, fmt) -> LinearOutcome:
        report = {
            "format": fmt.name,
            "bits_per_weight": fmt.bits_per_weight(res.weight.shape[1]),
            "loss": res.loss,
        }
        if self.cfg.file_type:  # saved in quantization.json: --type auto writes the other tensors for this file type
            report["llama_ftype"] = self.cfg.file_type
        if res.damp is not None:
            report["damp"] = res.damp  # damping fraction actually used (the Cholesky retry may raise it)
        mask = state.masks.get(name)
        if mask is not None:
            pruned = ~mask
            report["sparsity"] = float((res.weight == 0).float().mean())
            # grids without an exact 0 (asymmetric int, and with mixture: none q4_1, q5_1, q4_K, iq4_xs, ...)
            # take the nearest code: say how many
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

        # Pruned weights are already 0 in W; every grid with an exact 0 (int, q8_0, q4_0, q5_0, q6_K, ...)
        # keeps them at 0, and the report counts those that moved (q4_1 / q5_1 with mixture: none).
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
