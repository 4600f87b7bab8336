"""``llmopt.compression``: load a model, run a recipe's stages, save an HF folder atomically."""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel
from torch import nn

from llmopt.calibration import (
    apply_to_linear,
    find_decoder_layers,
    layer_statistics,
    run_layerwise,
)
from llmopt.calibration.streaming import (
    StreamingLayerSource,
    choose_streaming,
    exact_float32_weights,
    save_config,
)
from llmopt.core.stage import Stage
from llmopt.core.state import CompressionState, LinearStats, RunContext
from llmopt.errors import LLMOptError
from llmopt.memory import PhaseSampler, peak_rss_mib, release_freed_memory, reset_peak_rss, return_large_blocks
from llmopt.outputs import atomic_output, preflight
from llmopt.recipe import apply_calibration_overrides, parse_recipe, recipe_to_yaml
from llmopt.safetensors_io import ShardWriter
from llmopt.stages import build_stages

log = logging.getLogger(__name__)

REPORT_FILE = "llmopt_report.json"
RECIPE_FILE = "recipe.yaml"
OFFLOAD_DIR = ".llmopt-codes"  # a streamed run's codes and scales until they are written, inside the output's temp


@dataclass
class CompressResult:
    output: str
    report: dict


def _preflight(model: nn.Module, stages: list[Stage]) -> dict[int, list[tuple[str, nn.Module]]]:
    """Check every target Linear against every stage before any work (width, group size, N:M)."""
    try:
        prefix, layers = find_decoder_layers(model)
    except LLMOptError:
        prefix = None
    targets = {}
    for st in stages:
        found = st.targets(model)
        for name, lin in found:
            st.check(name, lin)
            if st.needs_calibration and (prefix is None or not name.startswith(prefix + ".")):
                raise LLMOptError(
                    f"stage '{st.name}' needs calibration but {name} is outside the decoder layers; "
                    "add it to 'ignore' or use a data-free stage for it"
                )
        targets[st.index] = found
    return targets


def check_stage_order(stages: list[Stage]) -> None:
    """Refuse, before any model is loaded, a whole-model stage (distillation, structured pruning) after a stage
    that quantizes the output head: the head is quantized once every decoder layer is done, and training or
    reshaping after it would act on a tensor that is also the (tied) token embedding."""
    for i, st in enumerate(stages):
        later = next((s for s in stages[i + 1 :] if s.whole_model), None)
        if st.quantizes_head and later is not None:
            raise LLMOptError(
                f"stage {i + 1} ({st.name}) quantizes the output head and a later stage ({later.name}) works on the "
                "whole model: put the head in the last quantization stage after it, or set head: none"
            )


def _plan_owl(model, windows, stages, state, batch_size) -> None:
    """OWL (Yin et al. 2024 §4): per-layer sparsities from outlier ratios of the dense model."""
    from llmopt.kernels.owl import layer_outlier_ratio, owl_sparsities

    owl_stages = [s for s in stages if getattr(s.cfg, "owl", None) is not None]
    if not owl_stages:
        return
    stats = layer_statistics(model, windows, "act_sq_norm", batch_size)
    for st in owl_stages:
        ratios = []
        for layer_stats in stats:
            pairs = []
            for name, s in layer_stats.items():
                if st.matches(name):
                    lin = model.get_submodule(name)
                    pairs.append((lin.weight.data, s.act_sq_norm.sqrt()))
            ratios.append(layer_outlier_ratio(pairs, m=st.cfg.owl.m))
        state.layer_sparsity[st.index] = owl_sparsities(ratios, st.cfg.sparsity, st.cfg.owl.lam)
        log.info("OWL sparsities for stage %s: %s", st.name, [round(s, 3) for s in state.layer_sparsity[st.index]])


def compress_model(
    model: nn.Module,
    recipe: BaseModel,
    windows: torch.Tensor | None,
    stages: list[Stage] | None = None,
    context: RunContext | None = None,
    state: CompressionState | None = None,
    source=None,
) -> tuple[CompressionState, dict]:
    """Apply a parsed recipe to a loaded model in place. ``windows``: (N, L) calibration ids, needed when
    a stage is data-driven; ``stages``: the recipe's stages if the caller already built them;
    ``context``: what whole-model stages (distill) need (tokenizer, output, resume); ``state``: an empty
    state to fill (a streaming ``source`` writes from it); ``source``: the engine's layer source (default: the
    model in memory; :class:`~llmopt.calibration.streaming.StreamingLayerSource` for ``--low-memory``).
    Returns the state (masks, quantized tensors) and a timing summary."""
    stages = build_stages(recipe) if stages is None else stages
    check_stage_order(stages)
    targets = _preflight(model, stages)
    state = CompressionState() if state is None else state
    t0 = time.perf_counter()
    ctx = context if context is not None else RunContext(recipe=recipe)
    ctx.windows = windows
    for st in stages:  # whole-model stages look at the model before any stage changed it (teacher cache)
        if st.whole_model:
            st.prepare(model, ctx)
    needs_data = any(s.needs_data for s in stages)
    if needs_data and windows is None:
        raise LLMOptError("this recipe has a data-driven stage: give calibration data (--calib)")
    batch = recipe.calibration.batch_size
    if needs_data:
        _plan_owl(model, windows, stages, state, batch)
    # Data-driven stages go through the layer-wise engine together (one capture, per layer in recipe
    # order); data-free stages apply directly; a whole-model stage (distill) runs on the model as the
    # stages before it left it. Order between the groups follows the recipe.
    prefix = None
    if needs_data:
        prefix, _ = find_decoder_layers(model)
    i = 0
    while i < len(stages):
        if stages[i].needs_calibration:
            j = i
            while j < len(stages) and stages[j].needs_calibration:
                j += 1
            run_layerwise(
                model,
                windows,
                stages[i:j],
                state,
                batch_size=batch,
                true_sequential=recipe.calibration.true_sequential,
                source=source,
            )
            i = j
        elif stages[i].whole_model:
            st = stages[i]
            t1 = time.perf_counter()
            report = st.run_model(model, state, ctx)
            state.stage_reports[f"{st.index}:{st.name}"] = {**report, "seconds": round(time.perf_counter() - t1, 2)}
            i += 1
            # a whole-model stage may have replaced Linears (structured pruning: smaller ones): the later
            # stages' targets and width checks are taken again on the model as it is now
            targets.update(_preflight(model, stages[i:]))
        else:
            st = stages[i]
            for name, lin in targets[st.index]:
                layer_index = None
                if prefix and name.startswith(prefix + "."):
                    layer_index = int(name[len(prefix) + 1 :].split(".")[0])
                apply_to_linear(st, name, lin, LinearStats(), state, layer_index)
            i += 1
    return state, {"compress_seconds": round(time.perf_counter() - t0, 2)}


def _summarise(state: CompressionState) -> dict:
    per_stage: dict[str, dict] = {}
    for r in state.reports:
        key = f"{r['stage_index']}:{r['stage']}"
        s = per_stage.setdefault(key, {"linears": 0, "params": 0, "zeros": 0.0, "seconds": 0.0})
        n = r["shape"][0] * r["shape"][1]
        s["linears"] += 1
        s["params"] += n
        s["seconds"] += r["seconds"]
        if "sparsity" in r:
            s["zeros"] += r["sparsity"] * n
        if "bits_per_weight" in r:
            s["bits_weighted"] = s.get("bits_weighted", 0.0) + r["bits_per_weight"] * n
    for s in per_stage.values():
        if s["zeros"]:
            s["sparsity"] = s["zeros"] / s["params"]
        if "bits_weighted" in s:
            s["bits_per_weight"] = s.pop("bits_weighted") / s["params"]
        del s["zeros"]
        s["seconds"] = round(s["seconds"], 3)
    return per_stage


def compress(
    model: str,
    recipe: str | Path | dict | BaseModel,
    output: str | Path,
    calib: str | None = None,
    calib_samples: int | None = None,
    calib_seq_len: int | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    device: str | None = None,
    true_sequential: bool | None = None,
    dtype: str | torch.dtype = "auto",
    resume: bool = False,
    checkpoint_dir: str | Path | None = None,
    low_memory: bool | None = None,
) -> CompressResult:
    """Compress ``model`` (any model spec) with ``recipe`` and save an HF folder at ``output``.

    The folder holds the model (safetensors; ``from_pretrained`` loads it), its tokenizer, the resolved
    recipe (``recipe.yaml``, calibration overrides applied) and ``llmopt_report.json`` (per-Linear
    sparsity/bits/loss, times, peak memory). Everything is written to a temporary sibling first and
    renamed on success; an existing output is refused unless ``overwrite``.

    ``dtype`` ("auto" = the checkpoint's own, "float32", "bfloat16", "float16") is the dtype the model
    is loaded, calibrated and saved in; kernels always compute in float32. Quantized Linears of a
    16-bit model are saved in float32, the only dtype in which code × scale is exact, so the saved
    weights equal the stored codes bit for bit; ``true_sequential`` (None = the recipe's value)
    overrides ``calibration.true_sequential``. ``resume``: a distill stage continues from the checkpoint
    an interrupted run of the same command left in ``<output>.ckpt/`` (``checkpoint_dir`` elsewhere, e.g.
    for a caller whose ``output`` is a temporary folder); the checkpoints are removed once the output is saved.
    ``low_memory``: stream the model one decoder layer at a time from its safetensors shards, each layer written
    to the output once compressed (True), never (False), or when its float32 size exceeds half the available
    memory (None); see :mod:`llmopt.calibration.streaming`.
    """
    from llmopt import parallel
    from llmopt.data import calibration_windows
    from llmopt.models import load_model
    from llmopt.models.lazy import load_lazy

    ranks = parallel.init(device)  # under torchrun: join the process group (llmopt.parallel); else nothing
    t_start = time.perf_counter()
    peak_scope = "call" if reset_peak_rss() else "process"
    with PhaseSampler() as rss:
        rec = recipe if isinstance(recipe, BaseModel) else parse_recipe(recipe)
        rec = apply_calibration_overrides(
            rec, data=calib, samples=calib_samples, seq_len=calib_seq_len, seed=seed, true_sequential=true_sequential
        )
        out = preflight(output, overwrite=overwrite, kind="folder")  # before minutes of loading and compressing
        stages = build_stages(rec)
        check_stage_order(stages)
        ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
        ctx = RunContext(model_spec=model, output=out, checkpoints=ckpt, resume=resume, recipe=rec)
        if any(s.whole_model for s in stages):  # their data and teacher specs, before any weights are loaded
            from llmopt.models import load_tokenizer

            ctx.tokenizer = load_tokenizer(model)
            for st in stages:
                st.check_inputs(ctx)
        streamed = choose_streaming(model, stages, rec.calibration.data, low_memory)
        lazy = None
        with rss.phase("load"):
            if streamed is None:
                loaded = load_model(model, device=device, dtype=dtype)
                lm, tokenizer = loaded.model, loaded.tokenizer
            else:
                return_large_blocks()  # freed blocks of 4 MiB or more go back to the OS at once
                lazy, tokenizer = load_lazy(streamed, model, dtype=dtype, device=device)
                lm = lazy.model
        ctx.tokenizer, ctx.device = tokenizer, lazy.device if lazy else next(lm.parameters()).device
        _preflight(lm, stages)  # width / group / N:M errors before the (slow) calibration sampling
        windows = None
        t_calib = 0.0
        if any(s.needs_data for s in stages):
            c = rec.calibration
            t0 = time.perf_counter()
            with rss.phase("calibration_data"):
                windows = calibration_windows(c.data, tokenizer, c.samples, c.seq_len, c.seed, model=lm)
            t_calib = time.perf_counter() - t0
            release_freed_memory()  # the tokenizer's work arrays
            log.info("calibration: %d windows x %d tokens from %s (seed %d)", c.samples, c.seq_len, c.data, c.seed)
        with ExitStack() as stack:
            state, source = CompressionState(), None
            if lazy is not None:  # the output is written layer by layer, during the stages
                tmp = stack.enter_context(atomic_output(out, overwrite=overwrite, kind="folder"))
                writer = ShardWriter(tmp, StreamingLayerSource.shards(lazy))
                source = StreamingLayerSource(lazy, writer, state, offload=tmp / OFFLOAD_DIR)
            with rss.phase("stages"):
                state, timing = compress_model(lm, rec, windows, stages=stages, context=ctx, state=state, source=source)
            report = {
                "model": model,
                "dtype": str(lazy.dtype if lazy else lm.dtype).removeprefix("torch."),
                "true_sequential": rec.calibration.true_sequential,
                **({"low_memory": True} if lazy is not None else {}),
                **({"activations_spilled_mib": state.activations_spilled_mib} if state.activations_spilled_mib else {}),
                "recipe": rec.model_dump(mode="json"),
                "calibration_seconds": round(t_calib, 2),
                **timing,
                "peak_rss_scope": peak_scope,
                "stages": _summarise(state),
                **({"model_stages": state.stage_reports} if state.stage_reports else {}),
                "linears": state.reports,
            }
            if source is not None:
                with rss.phase("save"):
                    source.finish()
                    save_config(lm, tmp)
                    _write_rest(tmp, tokenizer, state, rec, report, t_start, rss)
                    shutil.rmtree(tmp / OFFLOAD_DIR, ignore_errors=True)  # written: the mapped files can go
            else:
                exact_float32_weights(lm, state)
                if not ranks.main:  # torchrun / accelerate launch: process 0 writes
                    return CompressResult(str(out), report)
                with rss.phase("save"), atomic_output(out, overwrite=overwrite, kind="folder") as tmp:
                    lm.save_pretrained(tmp, safe_serialization=True, max_shard_size=shard_size(lm))
                    _write_rest(tmp, tokenizer, state, rec, report, t_start, rss)
        log.info("saved %s", out)
        for st in stages:
            if st.whole_model:
                st.finish(ctx)  # e.g. remove the distillation checkpoints
        return CompressResult(str(out), report)


def _write_rest(tmp: Path, tokenizer, state: CompressionState, rec, report: dict, t_start: float, rss) -> None:
    """Everything of the output folder but the weights and config: tokenizer, codes, extra files, recipe, report."""
    tokenizer.save_pretrained(tmp)
    save_quantized(state, tmp)
    for name, data in state.files.items():  # e.g. the distillation loss curve
        (tmp / name).write_bytes(data)
    report["total_seconds"] = round(time.perf_counter() - t_start, 2)
    report["peak_rss_mib"] = round(peak_rss_mib(), 1)  # loading, calibration, compression and saving
    report["peak_rss_mib_by_phase"] = {k: round(v, 1) for k, v in rss.peaks.items()}  # sampled every 50 ms
    (tmp / RECIPE_FILE).write_text(recipe_to_yaml(rec))
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))


def shard_size(model: nn.Module) -> int:
    """Bytes per safetensors shard when saving: an eighth of the model, between 100 MB and 5 GB.

    safetensors serialises a whole shard in memory before writing it, so one shard for the whole model
    (transformers' default up to 5 GB) adds a full copy of the weights to the peak memory of every
    compression; eight shards add an eighth."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(min(5e9, max(100e6, total / 8)))


def save_quantized(state: CompressionState, folder: Path) -> None:
    """Per quantized Linear: integer codes and scales (``quantization.safetensors``) plus a JSON index
    of formats, so exporters write them without re-quantizing. Codes are (out, in) whatever the
    module's layout; ``transposed`` says the model file stores that Linear's weight as (in, out)
    (transformers Conv1D); ``llama_ftype`` names the llama.cpp file type whose tensor types (with an importance
    matrix) the quantization followed, from its stage report, so ``--type auto`` types the other tensors so."""
    if not state.quantized:
        return
    from llmopt.safetensors_io import write_safetensors

    mixes = {r["linear"]: r.get("llama_ftype") for r in state.reports if "format" in r}  # each Linear's last
    entries, index = [], {}
    for name, q in state.quantized.items():
        qp = q.qparams_shapes()
        entries += [
            (f"{name}.codes", q.shape, q.code_dtype, lambda q=q: q.codes),
            (f"{name}.scale", qp, torch.float32, lambda q=q: q.qparams.scale),
            (f"{name}.zero", qp, torch.float32, lambda q=q: q.qparams.zero),
        ]
        extra = [k for k in q.qparams.stored() if k not in ("scale", "zero")]  # two-level formats (K-quants)
        entries += [(f"{name}.{k}", qp, torch.float32, lambda q=q, k=k: getattr(q.qparams, k)) for k in extra]
        f = q.fmt
        index[name] = {
            "format": f.name,
            "bits": f.bits,
            "group_size": f.group_size,
            "symmetric": f.symmetric,
            "gguf_type": f.gguf_type.name if f.gguf_type is not None else None,
            "codes_dtype": str(q.code_dtype).removeprefix("torch."),
            "transposed": q.transposed,
        }
        if name == state.head:  # the output head; on a tied model also the input embedding named here
            index[name].update(head=True, tied_to=state.head_tied_to)
        if mixes.get(name):
            index[name].update(llama_ftype=mixes[name], llama_imatrix=True)
    write_safetensors(folder / "quantization.safetensors", entries)  # one Linear's codes unpacked at a time
    (folder / "quantization.json").write_text(json.dumps(index, indent=1))
