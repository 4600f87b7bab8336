"""Before compression: check the inputs, draw the windows, build the teacher (and fill its cache).

The default teacher is the recipe's input model *before any stage ran*: its top-k logits are cached
from the very model object while it is still uncompressed, so no copy is kept. A copy (``deepcopy``,
the model's size again in memory) is kept only when the teacher must run during training: full logits
(``top_k: null``) or SquareHead hidden states (``hidden_weight`` > 0). ``teacher: SPEC`` loads that
model instead (kept in memory only in the same two cases).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmopt.core.state import RunContext
from llmopt.distill.budget import cache_windows, student_params
from llmopt.distill.config import DistillConfig
from llmopt.distill.data import DistillData, check_data, distill_windows, windows_needed
from llmopt.distill.teacher import Teacher, TopKCache, model_fingerprint
from llmopt.errors import LLMOptError

log = logging.getLogger(__name__)

QUANT_STAGES = ("rtn", "gptq")


@dataclass
class Prepared:
    data: DistillData
    teacher: Teacher
    seed: int
    key: str  # checkpoint key: recipe, model, stage, teacher weights, windows
    teacher_seconds: float  # windows drawn and teacher logits cached (0 for windows already cached)
    teacher_windows: int  # windows the teacher ran on now


def data_spec(cfg: DistillConfig, ctx: RunContext) -> str:
    return cfg.data if cfg.data is not None else ctx.recipe.calibration.data


def check_inputs(cfg: DistillConfig, ctx: RunContext, index: int) -> None:
    """One-line errors before any model is loaded: data, teacher spec, recipe order."""
    check_data(data_spec(cfg, ctx))
    if ctx.model_spec and (Path(ctx.model_spec).expanduser() / "quantization.json").is_file():
        raise LLMOptError(
            f"{ctx.model_spec} is quantized (quantization.json): distil it within the recipe that quantizes it "
            "(e.g. gptq-q4_0-qat from the original model), so training keeps its format"
        )
    if cfg.gradual is not None:
        earlier = [s.stage for s in ctx.recipe.stages[:index] if s.stage in QUANT_STAGES]
        if earlier:
            raise LLMOptError(
                f"gradual sparsity prunes float weights, but stage '{earlier[0]}' quantizes the student before "
                "it: put the quantization stage after the distill stage, or drop gradual"
            )
    if cfg.teacher is not None:
        from llmopt.models import load_tokenizer

        tok = load_tokenizer(cfg.teacher)  # a missing file, folder or Hub model fails here, in one line
        if ctx.tokenizer is not None and tok.get_vocab() != ctx.tokenizer.get_vocab():
            raise LLMOptError(
                f"teacher {cfg.teacher} has another tokenizer than the student: distillation compares "
                "distributions over the same token ids"
            )


def _load_teacher(spec: str, device, dtype: str | torch.dtype = "auto") -> nn.Module:
    from llmopt.models import load_model

    model = load_model(spec, device=None if device is None else str(device), dtype=dtype).model
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _student_shape(model: nn.Module, ctx: RunContext, index: int) -> tuple[int, int]:
    """(layers, hidden size) of the student the distill stage at ``index`` will train: ``model`` (uncut, no
    stage has run yet) after the structured stages before it, their target sizes taken as they will be."""
    cuts = [c for c in (ctx.recipe.stages[:index] if ctx.recipe is not None else []) if c.stage == "structured"]
    if not cuts:
        return model.config.num_hidden_layers, model.config.hidden_size
    from llmopt.structured.layout import check_supported, sizes_of
    from llmopt.structured.plan import target_sizes

    flags, s = check_supported(model), sizes_of(model)
    for c in cuts:
        s = target_sizes(c, s, flags)
    return s.layers, s.hidden


def _check_compatible(teacher: nn.Module, student: nn.Module, cfg: DistillConfig, shape: tuple[int, int]) -> None:
    """``shape``: the trained student's (layers, hidden size), which a structured stage may have cut."""
    vt = teacher.get_output_embeddings().weight.shape[0]
    vs = student.get_output_embeddings().weight.shape[0]
    if vt != vs:
        raise LLMOptError(f"teacher has {vt} output logits, the student {vs}: they must share the vocabulary")
    if cfg.top_k is not None and cfg.top_k >= vs:
        raise LLMOptError(f"top_k {cfg.top_k} is not below the vocabulary size {vs}: use top_k: null for full logits")
    if cfg.hidden_weight > 0:
        nt, ht = teacher.config.num_hidden_layers, teacher.config.hidden_size
        ns, hs = shape
        if (nt, ht) != (ns, hs):
            cut = "" if (ns, hs) == (student.config.num_hidden_layers, student.config.hidden_size) else " after the cut"
            raise LLMOptError(
                f"hidden_weight (SquareHead) needs the teacher's layers and width ({nt} x {ht}) to equal the "
                f"student's{cut} ({ns} x {hs}); set hidden_weight: 0"
                + (", or let the structured stage cut only the mlp and heads axes" if cut else "")
            )


def _teacher_loader(spec: str | None, device, dtype: torch.dtype, fingerprint: str):
    """A function loading the teacher again (None without a spec), for a cache the loop must extend;
    it returns None when the weights loaded differ from those the cache was filled with."""
    if not spec:
        return None

    def load() -> nn.Module | None:
        model = _load_teacher(spec, device, dtype)
        if model_fingerprint(model) != fingerprint:
            log.warning("teacher %s loaded again holds other weights than at the start: not used", spec)
            return None
        return model

    return load


def prepare(cfg: DistillConfig, model: nn.Module, ctx: RunContext, index: int) -> Prepared:
    """``model`` is the uncompressed input model (no stage has run yet).

    The teacher's top-k logits are cached for the held-out windows and for the training windows the time
    budget is planned to reach (:func:`llmopt.distill.budget.cache_windows`); the loop caches more if it
    outruns them, with the live teacher or one loaded again (the input model's spec, or ``teacher``).
    Without a way to load it again every training window is cached now."""
    from llmopt import memory, parallel
    from llmopt.models import cache_root

    if ctx.tokenizer is None:
        raise LLMOptError("the distill stage needs the model's tokenizer: run it through llmopt.compress")
    seed = cfg.seed if cfg.seed is not None else ctx.recipe.calibration.seed
    t0 = time.perf_counter()
    source = model if cfg.teacher is None else _load_teacher(cfg.teacher, ctx.device)
    _check_compatible(source, model, cfg, _student_shape(model, ctx, index))
    fingerprint = model_fingerprint(source)
    data = distill_windows(
        data_spec(cfg, ctx),
        ctx.tokenizer,
        cfg.seq_len,
        cfg.heldout_windows,
        seed,
        windows_needed(cfg.max_tokens, cfg.seq_len),
        model=source,
    )
    live = None
    if cfg.live_teacher:
        live = copy.deepcopy(model) if cfg.teacher is None else source
        for p in live.parameters():
            p.requires_grad_(False)
        live.eval()
    cache, computed, ready, loader = None, 0, len(data.train), None
    if cfg.top_k is not None:  # also for hidden / CE-only runs: the held-out KL reads it
        spec = cfg.teacher if cfg.teacher is not None else ctx.model_spec
        loader = _teacher_loader(spec, ctx.device, next(source.parameters()).dtype, fingerprint)
        if live is not None or loader is not None:
            n_student = student_params(ctx.recipe.stages, index, sum(p.numel() for p in model.parameters()))
            ready = min(ready, cache_windows(cfg, n_student))
        cache = TopKCache(cache_root(), fingerprint, cfg.top_k, cfg.temperature)
        todo = torch.cat([data.train[:ready], data.heldout])
        ranks = parallel.current()
        with memory.phase("distill.teacher_cache"):
            # under torchrun each process fills every world-th window, then waits for the others; whatever is
            # still missing (another node's cache folder) it fills itself
            computed = cache.fill(source, todo[ranks.rank :: ranks.world], cfg.chunk_tokens)
            if ranks.active:
                parallel.barrier()
                computed += cache.fill(source, todo, cfg.chunk_tokens)
        memory.release_freed_memory()  # the fill's logits blocks and forward activations
        log.info("teacher cache: %d of %d training windows (the time budget's, with a margin)", ready, len(data.train))
    h = hashlib.blake2b(digest_size=12)
    recipe_text = ctx.recipe.model_dump_json() if ctx.recipe is not None else ""
    for part in (recipe_text, str(ctx.model_spec), str(index), fingerprint):
        h.update(part.encode() + b"\0")
    h.update(data.train.numpy().tobytes())
    h.update(data.heldout.numpy().tobytes())
    teacher = Teacher(
        cache, live, cfg.hidden_weight > 0, pool=data.train, ready=ready, loader=loader, chunk_tokens=cfg.chunk_tokens
    )
    return Prepared(
        data=data,
        teacher=teacher,
        seed=seed,
        key=h.hexdigest(),
        teacher_seconds=round(time.perf_counter() - t0, 2),
        teacher_windows=computed,
    )
