"""Logit distillation of a compressed student on its teacher (the ``distill`` stage).

Files by job:

* :mod:`~llmopt.distill.config`: the recipe entry (one pydantic object);
* :mod:`~llmopt.distill.data`: training and held-out windows, resumable batch order;
* :mod:`~llmopt.distill.prepare`: input checks, teacher and windows before compression;
* :mod:`~llmopt.distill.teacher`: the top-k logits cache on disk, or a live teacher;
* :mod:`~llmopt.distill.heads`: trunk, chunked output head, per-layer hidden states;
* :mod:`~llmopt.distill.loop`: the accelerate training loop;
* :mod:`~llmopt.distill.objective`: the loss as one module (fused head + top-k loss, bf16 autocast);
* :mod:`~llmopt.distill.precision`: ``mixed_precision: auto`` (bfloat16 where native);
* :mod:`~llmopt.distill.schedules`: learning rate and budget progress;
* :mod:`~llmopt.distill.sparsity`: masks kept exactly, gradual sparsity (Zhu & Gupta 2017);
* :mod:`~llmopt.distill.fakequant`: QAT on the student's own formats (straight-through estimator);
* :mod:`~llmopt.distill.resume`: checkpoints in ``<output>.ckpt/``;
* :mod:`~llmopt.distill.curve`: the loss curve (JSON + PNG).

The losses themselves are the pure kernels :mod:`llmopt.kernels.distill` and
:mod:`llmopt.kernels.distill_head` (the head fused with the top-k loss).
"""
