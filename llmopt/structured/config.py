"""The structured stage's recipe entry: target sizes, validated once."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from llmopt.core.config import StageConfig

Axis = Literal["mlp", "heads", "hidden", "depth"]
Size = int | float | None


def _check_size(name: str, v: Size) -> Size:
    if v is None:
        return v
    if isinstance(v, bool):
        raise ValueError(f"{name} is a size (an integer) or a fraction kept (0 < f <= 1), got {v}")
    if isinstance(v, int):
        if v < 1:
            raise ValueError(f"{name} as a size must be >= 1, got {v}")
    elif not 0.0 < v <= 1.0:
        raise ValueError(f"{name} as a fraction kept must be in (0, 1], got {v}")
    return v


class StructuredConfig(StageConfig):
    """Remove MLP channels, attention heads (whole K/V groups), hidden channels and decoder layers,
    ranked on the calibration data (see :mod:`llmopt.kernels.structured`), leaving a smaller dense model.

    Each size is an integer (the new size, e.g. ``intermediate_size: 1152``, ``num_layers: 24``) or a
    float in (0, 1] (the fraction kept, e.g. ``intermediate_size: 0.75``). Or ``params``: the fraction
    of the non-embedding parameters kept, reached by shrinking each of ``axes`` by one common factor.
    Widths are rounded down to multiples of ``round_to`` (32 keeps q4_0 / MatMulNBits blocks whole).
    Widths are uniform across layers: a Hugging Face config has one ``intermediate_size`` and one head
    count for all layers, so per-layer widths could not be loaded with ``from_pretrained``.

    ``reconstruct`` (default on): after the cut, every kept Linear is refitted by least squares so each
    layer keeps the uncut model's outputs on the calibration windows (the cut model fed its own
    activations forward, layer by layer; :mod:`llmopt.structured.reconstruct`). ``damp`` is its ridge
    term. Off: the plain cut (the kept weights as they were). ``refine_epochs``: then each layer is refined
    as a whole by gradient descent toward the same target (:mod:`llmopt.structured.refine`).
    """

    stage: Literal["structured"]
    intermediate_size: Size = None
    num_attention_heads: Size = None  # query heads kept; a multiple of the heads per K/V group
    hidden_size: Size = None
    num_layers: Size = None
    params: float | None = Field(None, gt=0.0, lt=1.0)
    # what ``params`` shrinks. Default MLP + depth: at 60% of SmolLM2-135M's non-embedding parameters it
    # loses less than also shrinking the hidden width (one shot 59.6 vs 89.5 reconstructed; after 30 min of
    # distillation + GPTQ q4_0 49.7, the hidden-448 shape 76.6 in an earlier run; reconstruct-60.md, structured.md)
    axes: list[Axis] = ["mlp", "depth"]
    round_to: int = Field(32, ge=1)
    # which decoder layers go: "loss" removes them one at a time, each step the layer whose removal raises
    # the calibration loss least, on the model with its widths already cut (llmopt.structured.depth; at
    # minitron-60 on SmolLM2-135M one shot 74.5 / 122 vs 79 / 135 reconstructed, wiki / Lee, and 131 / 165 vs
    # 171 / 244 plain, 32 windows, damp 0.01); "block_influence": ShortGPT's one-pass 1 - cos(input, output)
    depth_ranking: Literal["loss", "block_influence"] = "loss"
    # least-squares refit of every cut Linear to the uncut model's layer outputs (llmopt.structured.reconstruct)
    reconstruct: bool = True
    # its ridge term, λ = damp · mean(diag H), pulling the refit toward zero: at minitron-60 on SmolLM2-135M
    # (4 windows, wiki / Lee) with 32 calibration windows 0.01 gave 74.5 / 122.3, 0.003 66.5 / 112.0, 0.001
    # 65.9 / 113.0, 0.1 594 / 911; with 128 (the minitron recipes') 0.003 60.1 / 87.5, 0.001 58.5 / 86.3
    # (eval/results/reconstruct-60.md, probes of 2026-12-05)
    damp: float = Field(0.001, gt=0.0, lt=1.0)
    # after each layer's refits, epochs of Adam on the whole layer toward the same target (llmopt.structured.refine,
    # BRECQ-style; bfloat16 autocast where the CPU has AMX / AVX512-BF16), the lr decaying on a cosine from
    # refine_lr. At minitron-60 on SmolLM2-135M one shot (128 windows, wiki / Lee): 0 epochs 59.6 / 96.1; 4 epochs
    # at a constant 1e-4 56.1 / 87.8, 3e-4 53.5 / 80.3, 1e-3 53.6 / 77.2; cosine from 2e-3 51.6 / 76.1 (+~6 min on
    # 2 cores with AMX; probes of 2026-12-05, llmopt.structured.refine). 0 (the stage default): least squares
    # alone; both minitron-60 recipes ship 4 (distilled + GPTQ q4_0: 46.0 vs 49.7, eval/results/structured.md); the
    # recipes not re-measured with it (structured-mlp25, -depth20, minitron-75*) and this default stay at 0
    refine_epochs: int = Field(0, ge=0)
    refine_lr: float = Field(2e-3, gt=0.0, lt=1.0)

    @field_validator("intermediate_size", "num_attention_heads", "hidden_size", "num_layers")
    @classmethod
    def _size(cls, v: Size, info) -> Size:
        return _check_size(info.field_name, v)

    @model_validator(mode="after")
    def _one_way(self):
        explicit = [
            k for k in ("intermediate_size", "num_attention_heads", "hidden_size", "num_layers") if getattr(self, k)
        ]
        if self.params is not None and explicit:
            raise ValueError(f"give either params or explicit sizes, not both (got params and {explicit[0]})")
        if self.params is None and not explicit:
            raise ValueError("give params (fraction of non-embedding parameters kept) or at least one size")
        if self.params is not None and not self.axes:
            raise ValueError("params needs at least one axis (mlp, heads, hidden, depth)")
        return self
