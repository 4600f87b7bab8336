"""The distill stage's recipe entry: one pydantic object, validated once, read by the loop as it is."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from llmopt.core.config import StageConfig, StrictModel

# The learned scales' rate as a fraction of the weights'. Adam moves every parameter by about the rate
# per step whatever its gradient, and a scale step moves each weight of its group by code × step (up to
# 2ᵇ⁻¹ of them), so scales want a smaller rate than weights (LSQ, Esser et al. 2019, §2.2, scales the step
# size's gradient for SGD; with Adam only the rate does it). Chosen a priori; eval/bench_qat_scale_lr.py measures it.
SCALE_LR_RATIO = 0.1


class GradualConfig(StrictModel):
    """Gradual magnitude / Wanda pruning during distillation (Zhu & Gupta 2017, §3, Eq. 1):
    s(t) = s_f + (s_i − s_f)·(1 − (t − t₀)/(n·Δt))³, from the student's current sparsity s_i to ``target``
    s_f, with ``updates`` mask recomputations between the fractions ``start`` and ``end`` of the training
    budget; training continues at s_f after ``end``."""

    target: float = Field(gt=0.0, lt=1.0)
    start: float = Field(0.0, ge=0.0, lt=1.0)
    end: float = Field(0.7, gt=0.0, le=1.0)
    updates: int = Field(10, ge=1)  # n: mask recomputations; the last one reaches the target
    score: Literal["magnitude", "wanda"] = "wanda"  # |W|, or |W|·‖X_j‖ on the training activations

    @model_validator(mode="after")
    def _window(self):
        if self.end <= self.start:
            raise ValueError(f"gradual.end ({self.end}) must be after gradual.start ({self.start})")
        return self


class DistillConfig(StageConfig):
    """Logit distillation of the compressed student on a teacher (see :mod:`llmopt.distill`).

    Defaults suit the embedded SmolLM2-135M on a 2-core CPU: 2048 tokens per step, 30 minutes or 1M
    tokens (about 250k tokens fit in 30 minutes there; the teacher cache holds what the budget can train,
    :mod:`llmopt.distill.budget`).

    ``targets`` / ``ignore`` name the Linears gradual sparsity prunes; masks of earlier pruning stages
    and the formats of earlier quantization stages are kept wherever they are.
    """

    stage: Literal["distill"]
    # teacher and data
    teacher: str | None = None  # model spec; None = the recipe's input model before any stage ran
    data: str | None = None  # data spec; None = the recipe's calibration.data
    seq_len: int = Field(512, ge=8)
    heldout_windows: int = Field(4, ge=1)  # the last windows of the text, never trained on
    seed: int | None = Field(None, ge=0)  # data order; None = the recipe's calibration.seed
    # loss: loss_weight · T² · D(teacher ‖ student) + ce_weight · CE + hidden_weight · SquareHead
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    temperature: float = Field(1.0, gt=0.0)
    beta: float = Field(0.5, gt=0.0, lt=1.0)  # generalized JSD's β (GKD)
    loss_weight: float = Field(1.0, ge=0.0)
    ce_weight: float = Field(0.0, ge=0.0)
    hidden_weight: float = Field(0.0, ge=0.0)
    top_k: int | None = Field(64, ge=1)  # cached teacher tokens per position; None = full logits, live teacher
    chunk_tokens: int = Field(512, ge=1)  # positions per logits chunk (V floats each)
    # optimisation (AdamW)
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup: float = Field(0.05, ge=0.0, lt=1.0)  # fraction of the budget
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)  # lr at the end of the decay, as a fraction of lr
    batch_size: int = Field(1, ge=1)  # windows per micro-batch and process
    grad_accum: int = Field(4, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    gradient_checkpointing: bool = True
    # auto: bf16 where the device multiplies bfloat16 natively (AVX512-BF16/AMX CPUs, CUDA), else no.
    # bf16: the trunk under bfloat16 autocast and the head's matmuls in bfloat16, float32 master weights,
    # AdamW state, softmax and loss; held-out losses always float32 (llmopt.distill.objective)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    fused_loss: bool = True  # head + top-k loss fused, gradients in the forward (llmopt.kernels.distill_head)
    fake_quant_once: bool = True  # QAT: fake-quantized weights computed once per step, not per micro-batch
    train_embeddings: bool = False  # also train the input/output embeddings (large, untouched by compression)
    learn_scales: bool = False  # QAT: learn the quantization scales (and q4_1/q5_1 minima), else fixed
    scale_lr: float | None = Field(None, gt=0.0)  # learn_scales: their AdamW rate; None = lr · SCALE_LR_RATIO
    # budget, evaluation, checkpoints
    max_tokens: int = Field(1_000_000, ge=1)  # trained tokens (all processes together)
    max_minutes: float | None = Field(30.0, gt=0.0)  # wall clock of the training loop; None = no limit
    eval_every: int = Field(10, ge=1)  # steps between held-out losses
    checkpoint_every: int | None = Field(None, ge=1)  # steps between checkpoints (besides checkpoint_minutes)
    checkpoint_minutes: float | None = Field(5.0, gt=0.0)
    gradual: GradualConfig | None = None

    @field_validator("data")
    @classmethod
    def _data(cls, v: str | None) -> str | None:
        if v is not None:
            from llmopt.data import parse_data_spec

            parse_data_spec(v)
        return v

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("teacher is empty: give a model spec or leave it out (the input model)")
        return v

    @model_validator(mode="after")
    def _weights(self):
        if self.loss_weight == 0 and self.ce_weight == 0 and self.hidden_weight == 0:
            raise ValueError("loss_weight, ce_weight and hidden_weight are all 0: nothing to train on")
        return self

    @property
    def scales_lr(self) -> float:
        """The AdamW rate of learned scales and minima (``scale_lr``, else lr · SCALE_LR_RATIO)."""
        return self.scale_lr if self.scale_lr is not None else self.lr * SCALE_LR_RATIO

    @property
    def live_teacher(self) -> bool:
        """The teacher model must run during training (full logits or hidden states)."""
        return (self.top_k is None and self.loss_weight > 0) or self.hidden_weight > 0
