"""What moves between the calibration engine, the stages and the saver: one Linear's calibration
statistics, what a stage did to it, the compact record of its quantized codes, the state stages hand to
later stages, and what a whole-model stage may need besides the model.

Part of the bottom layer (:mod:`llmopt.core`): it imports nothing of llmopt, so the engine, the stages and
the exporters can all depend on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class LinearStats:
    """Calibration statistics of one Linear's input X (N tokens × in features)."""

    hessian: torch.Tensor | None = None  # (in, in) float32, 2/N Σ xᵀx
    act_sq_norm: torch.Tensor | None = None  # (in,) float32, Σ_n x_nj²
    # (in, in) float32, 2/N Σ (x − x̃)ᵀ x̃: GPTAQ's asymmetry term, x̃ = X's rows (inputs through the compressed
    # earlier layers, those of ``hessian``), x the same tokens' inputs in the uncompressed model
    dxxt: torch.Tensor | None = None
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
        return type(qp)(*(None if t is None else t.to(torch.float32) for t in qp.tensors()))

    def offload(self, path: Path) -> None:
        """Move the packed codes and group parameters to the file ``path`` and map them back from it
        (``torch.load(mmap=True)``): the same bits, in pages the OS can drop and re-read rather than in
        anonymous memory (a streamed compression keeps every layer's codes until it writes them all)."""
        torch.save({"packed": self._packed, "qparams": list(self._qparams.tensors())}, path)
        back = torch.load(path, mmap=True, weights_only=True)
        self._packed, self._qparams = back["packed"], type(self._qparams)(*back["qparams"])


def _compact_qparams(qp):
    """QParams with every float16-exact field held in float16 (a lossless halving of its memory)."""

    def compact(t):
        if t is None or t.dtype != torch.float32:
            return t
        h = t.to(torch.float16)
        return h if torch.equal(h.to(torch.float32), t) else t

    return type(qp)(*(compact(t) for t in qp.tensors()))


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
    # the output head when a stage quantized it (its module name in ``quantized``), and the input embedding
    # module sharing its weight on a tied model (None: untied): exporters write the embedding from its codes
    head: str | None = None
    head_tied_to: str | None = None
    # MiB of calibration activations the engine held in memory-mapped files (0: all in memory)
    activations_spilled_mib: float = 0.0


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
