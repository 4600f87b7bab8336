"""The stage interface: a thin adapter between a recipe entry and a pure kernel.

A stage never walks the model or runs forwards itself. It answers three questions:

* which statistic its kernel needs from calibration data (``statistic``): none, the Hessian
  ``H = 2/N Σ xᵀx`` (SparseGPT, GPTQ), or the per-column ``Σ x_j²`` (Wanda);
* whether a given Linear is acceptable (``check``, run on every target before any work starts);
* what to do with one Linear's weight given that statistic (``compress_linear``).

The calibration engine (:mod:`llmopt.calibration`) or, for data-free stages, :func:`llmopt.compression.compress`
calls it once per target Linear.

A *whole-model* stage (``whole_model = True``: distillation) is not layer-wise: it runs on the whole
model at its place in the recipe, after the stages before it. It may check its inputs before any model
is loaded (``check_inputs``), look at the uncompressed model before any stage runs (``prepare``: e.g.
cache a teacher's logits), do its work (``run_model``), and clean up once the output is saved
(``finish``); a :class:`RunContext` tells it where the run comes from and goes.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from llmopt.errors import LLMOptError
from llmopt.linears import is_linear
from llmopt.recipe import StageConfig

Statistic = Literal["none", "hessian", "act_sq_norm"]


@dataclass
class LinearStats:
    """Calibration statistics of one Linear's input X (N tokens × in features)."""

    hessian: torch.Tensor | None = None  # (in, in) float32, 2/N Σ xᵀx
    act_sq_norm: torch.Tensor | None = None  # (in,) float32, Σ_n x_nj²
    tokens: int = 0


@dataclass
class LinearOutcome:
    """What a stage did to one Linear: the new weight and what the report and exporters need."""

    weight: torch.Tensor  # (out, in) float32, the weight the model continues with
    keep_mask: torch.Tensor | None = None  # (out, in) bool, True = kept (pruning stages)
    quant: object | None = None  # llmopt.formats.QuantResult (quantization stages)
    fmt: object | None = None  # llmopt.formats.QuantFormat
    report: dict = field(default_factory=dict)


class QuantizedLinear:
    """What the saver and exporters need of a quantized Linear: codes and group parameters only.

    The dequantized float32 weight is not kept (it is in the model, and ``fmt.dequantize(codes,
    qparams)`` rebuilds it): holding it for every Linear until saving cost 4 bytes per parameter.
    ``codes``: (out, in) in the format's code dtype; ``qparams``: llmopt.formats.QParams (out, n_groups);
    ``transposed``: the module stores its weight as (in, out) (transformers Conv1D).

    Held compactly until saving, losslessly: codes of ≤ 4-bit formats two to a byte (half a byte per
    weight instead of one), scales and zero-points in float16 when they are float16 values (every
    format's stored scale is; integer zero-points ≤ 255 and q4_1/q5_1 minima are too), else float32.
    ``codes`` / ``qparams`` give the unpacked tensors, bit for bit what was stored.
    """

    __slots__ = ("_packed", "_cols", "_code_dtype", "_qparams", "fmt", "transposed")

    def __init__(self, codes: torch.Tensor, qparams, fmt, transposed: bool = False):
        self.fmt, self.transposed = fmt, bool(transposed)
        self._cols, self._code_dtype = codes.shape[-1], codes.dtype
        bits = getattr(fmt, "bits", 8)
        if bits <= 4 and codes.dtype == torch.uint8 and codes.dim() == 2 and self._cols % 2 == 0:
            self._packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # low nibble: even column
        else:
            self._packed = codes.contiguous()
        self._qparams = _compact_qparams(qparams)

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the codes."""
        return (self._packed.shape[0], self._cols)

    @property
    def code_dtype(self) -> torch.dtype:
        return self._code_dtype

    def qparams_shapes(self) -> tuple[int, ...]:
        """Shape of the scale / zero tensors: (out, n_groups)."""
        return tuple(self._qparams.scale.shape)

    @property
    def codes(self) -> torch.Tensor:
        p = self._packed
        if p.shape[-1] == self._cols:
            return p
        out = torch.empty(p.shape[0], self._cols, dtype=self._code_dtype, device=p.device)
        out[:, 0::2], out[:, 1::2] = p & 0xF, p >> 4
        return out

    @property
    def qparams(self):
        qp = self._qparams
        return type(qp)(*(None if t is None else t.to(torch.float32) for t in qp._fields()))


def _compact_qparams(qp):
    """QParams with every float16-exact field held in float16 (a lossless halving of its memory)."""

    def compact(t):
        if t is None or t.dtype != torch.float32:
            return t
        h = t.to(torch.float16)
        return h if torch.equal(h.to(torch.float32), t) else t

    return type(qp)(*(compact(t) for t in qp._fields()))


@dataclass
class CompressionState:
    """What stages hand to later stages and to the saver (masks kept by GPTQ, codes for exporters)."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    quantized: dict[str, QuantizedLinear] = field(default_factory=dict)
    reports: list[dict] = field(default_factory=list)
    # per-decoder-layer override of the stage's sparsity (OWL), keyed by stage index then layer index
    layer_sparsity: dict[int, list[float]] = field(default_factory=dict)
    # whole-model stages: their report by "index:name", and extra files for the output folder (name → bytes)
    stage_reports: dict[str, dict] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class RunContext:
    """What a whole-model stage may need besides the model (built by :func:`llmopt.compression.compress`)."""

    tokenizer: object | None = None
    model_spec: str | None = None  # the input model as the user named it
    output: Path | None = None  # the output folder
    checkpoints: Path | None = None  # where training checkpoints live; None = <output>.ckpt (no output: none)
    resume: bool = False  # continue from a checkpoint of an interrupted identical run
    recipe: object | None = None  # the parsed recipe (calibration defaults, checkpoint keys)
    device: object | None = None  # torch.device the model runs on
    windows: torch.Tensor | None = None  # (N, L) calibration token ids, when the recipe needs data


class Stage:
    """Base class; subclasses set ``name``, ``Config`` and ``statistic`` and implement ``compress_linear``."""

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]]
    statistic: ClassVar[Statistic] = "none"
    whole_model: ClassVar[bool] = False  # runs on the whole model (run_model), not per Linear

    def __init__(self, cfg: StageConfig, index: int = 0):
        self.cfg = cfg
        self.index = index

    def matches(self, name: str) -> bool:
        hit = any(fnmatch.fnmatchcase(name, p) for p in self.cfg.targets)
        return hit and not any(fnmatch.fnmatchcase(name, p) for p in self.cfg.ignore)

    def targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Target modules: nn.Linear and transformers Conv1D (see :mod:`llmopt.linears`) whose names match."""
        found = [(n, m) for n, m in model.named_modules() if is_linear(m) and self.matches(n)]
        if not found:
            raise LLMOptError(
                f"stage '{self.name}' matches no Linear (targets={self.cfg.targets}, "
                f"ignore={self.cfg.ignore}); fix the patterns (fnmatch on module names such as "
                "model.layers.0.mlp.down_proj)"
            )
        return found

    @property
    def needs_calibration(self) -> bool:
        """The kernel itself needs a statistic, so the stage runs inside the calibration engine."""
        return self.statistic != "none"

    @property
    def needs_data(self) -> bool:
        """Calibration windows are needed: for the kernel, or to plan OWL layer sparsities."""
        return self.needs_calibration or getattr(self.cfg, "owl", None) is not None

    def first_token_weight(self, name: str) -> float:
        """Weight of each calibration window's first token in Linear ``name``'s statistic, as a fraction of the
        window's token count (0 = the plain statistic: the first token counts as any other)."""
        return 0.0

    def check(self, name: str, linear: nn.Linear) -> None:
        """Raise LLMOptError when this Linear cannot be handled (width, group size, N:M)."""

    def compress_linear(
        self, name: str, W: torch.Tensor, stats: LinearStats, state: CompressionState, layer_index: int | None
    ) -> LinearOutcome:
        raise NotImplementedError

    def compress_uncalibrated(
        self, name: str, W: torch.Tensor, state: CompressionState, layer_index: int | None
    ) -> LinearOutcome:
        """A data-driven stage's answer for a target that never ran on the calibration windows (an
        unrouted MoE expert, a branch the data never took): the data-free kernel of the same kind."""
        raise LLMOptError(f"{name} never ran on the calibration data and stage '{self.name}' has no data-free fallback")

    # --- whole-model stages ----------------------------------------------------------------------
    def check_inputs(self, ctx: RunContext) -> None:
        """Before any model is loaded: raise LLMOptError for inputs the stage cannot use."""

    def prepare(self, model: nn.Module, ctx: RunContext) -> None:
        """Before the first stage runs, on the uncompressed model."""

    def run_model(self, model: nn.Module, state: CompressionState, ctx: RunContext) -> dict:
        """Do the stage's work on the whole model; returns its report."""
        raise NotImplementedError

    def finish(self, ctx: RunContext) -> None:
        """After the output was saved."""


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' → (2, 4): N pruned in every M consecutive input weights; None/'unstructured' → None."""
    if pattern is None or pattern == "unstructured":
        return None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern must be 'N:M' such as '2:4' or 'unstructured', got '{pattern}'") from None
    if not 1 <= n < m:
        raise ValueError(f"pattern N:M needs 1 <= N < M, got {pattern}")
    return n, m
