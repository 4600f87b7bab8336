"""The distillation loop: AdamW through accelerate on the whole student, masks and formats kept.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` windows per process. Per
micro-batch the student's trunk runs once (bfloat16 autocast in mixed precision, gradient checkpointing
on its decoder layers when set), then the output head and the loss run in chunks of ``chunk_tokens``
positions (:mod:`llmopt.distill.objective`: fused, or under activation checkpointing). QAT's
fake-quantized weights are computed once per step and shared by its micro-batches
(:func:`llmopt.distill.fakequant.once_per_step`). AdamW's state and the master weights are float32.
After each step: pruned weights back to exactly 0, gradual-sparsity updates when due, a held-out loss
every ``eval_every`` steps, a checkpoint every ``checkpoint_every`` steps / ``checkpoint_minutes`` and
on SIGINT/SIGTERM.

Memory (SmolLM2-135M QAT, no gradient checkpointing): the model and its fake-quant state ~1.0 GiB,
AdamW's two moments 0.85 GiB and the gradients 0.43 GiB of the 106M trained parameters, one micro-batch's
activations ~1.6 GiB (0.5 GiB of it the fake-quantized weights and STE masks saved for the backward).
glibc keeps the freed activations of a micro-batch in its heap and cannot always reuse them for the
next one (fragmentation, depending on what the process allocated before), so they are given back after
every micro-batch (``malloc_trim``, milliseconds; no slower measured). 3 steps of the shipped QAT entry:
after RTN q4_0 5.47 → 4.50 GiB peak, after GPTQ q4_0 (``gptq-q4_0-qat``) 4.76 → 4.64 GiB, its save
4.05 → 2.47 GiB. The rest is live memory; the next cut would be to recompute the fake-quantized weights in
the backward instead of saving them (~0.5 GiB).

The same code runs on one CPU, one GPU, or under ``accelerate launch`` on several (data parallel: each
process takes its slice of every global batch; the loss is computed inside the prepared module's
forward so DDP synchronises the gradients; process 0 writes checkpoints).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from llmopt import memory
from llmopt.core.state import CompressionState
from llmopt.distill import fakequant, resume
from llmopt.distill.config import DistillConfig
from llmopt.distill.curve import heldout_kl_key, heldout_kl_label
from llmopt.distill.data import DistillData, batch_windows
from llmopt.distill.heads import check_head
from llmopt.distill.objective import DistillLoss
from llmopt.distill.precision import resolve_precision
from llmopt.distill.schedules import lr_factor, progress
from llmopt.distill.sparsity import GradualPruner, MaskKeeper, student_masks
from llmopt.distill.teacher import Teacher
from llmopt.linears import write_weight

log = logging.getLogger(__name__)


@dataclass
class DistillJob:
    """Everything the loop needs besides the student."""

    cfg: DistillConfig
    data: DistillData
    teacher: Teacher
    state: CompressionState  # masks and quantized codes of the student; refreshed at the end
    gradual_targets: list[str]  # float Linears gradual sparsity prunes
    seed: int
    key: str  # checkpoint key (see llmopt.distill.resume)
    checkpoints: Path | None  # <output>.ckpt, None = no checkpoints
    resume: bool = False


def _accelerator(cpu: bool, mixed_precision: str):
    """An ``Accelerator`` for this run. accelerate keeps one state per process: the first Accelerator
    fixes its device and mixed precision, later ones share them, and accelerate has no public way to
    change them. A run that needs other settings than an earlier one in this process gets a one-line
    error (where accelerate itself would refuse) instead of resetting state another Accelerator uses."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import DistributedType

    from llmopt.errors import LLMOptError

    if is_initialized():
        state = AcceleratorState()
        other_device = cpu and state.device.type != "cpu"
        other_precision = (
            mixed_precision != state.mixed_precision and state.distributed_type != DistributedType.DEEPSPEED
        )
        if other_device or other_precision:
            raise LLMOptError(
                f"accelerate was set up earlier in this process for {state.device.type}, mixed precision "
                f"'{state.mixed_precision}'; distillation on {'cpu' if cpu else 'the accelerator'} with mixed "
                f"precision '{mixed_precision}' needs a new process (accelerate keeps one state per process)"
            )
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


def _train_mode(model: nn.Module) -> None:
    """train() for gradient checkpointing, with dropout off (distilling a pretrained student)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()


def _trainable(model: nn.Module, cfg: DistillConfig) -> dict[str, nn.Parameter]:
    frozen: set[int] = set()
    if not cfg.train_embeddings:
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None:
                frozen |= {id(p) for p in emb.parameters()}
    out = {}
    for name, p in model.named_parameters():
        train = id(p) not in frozen and p.is_floating_point()
        p.requires_grad_(train)
        if train:
            out[name] = p
    return out


def _optimizer(params: dict[str, nn.Parameter], cfg: DistillConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (never norms, biases, quantization scales), and the learned
    scales / minima (FakeQuant's parameters) at their own rate ``cfg.scales_lr``. Each group keeps its base
    rate in ``base_lr`` for :func:`set_lr`."""
    scales = [p for n, p in params.items() if ".parametrizations.weight.0." in n]
    decay = [p for n, p in params.items() if p.dim() >= 2 and ".parametrizations.weight.0." not in n]
    rest = [p for n, p in params.items() if p.dim() < 2 and ".parametrizations.weight.0." not in n]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": rest, "weight_decay": 0.0, "base_lr": cfg.lr},
    ]
    if scales:
        groups.append({"params": scales, "weight_decay": 0.0, "base_lr": cfg.scales_lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    set_lr(opt, 1.0)
    return opt


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    """Every group at ``factor`` (the schedule's) times its own base rate."""
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor


@torch.no_grad()
def heldout(module: DistillLoss, job: DistillJob, device: torch.device) -> dict:
    """Mean objective and forward KL at T = 1 over the held-out windows: the KL with full teacher logits,
    its top-k bucket bound with cached ones (keys: :func:`~llmopt.distill.curve.heldout_kl_key`)."""
    model = module.student
    was_training = model.training
    model.eval()
    loss = kl1 = 0.0
    windows = job.data.heldout
    for b0 in range(0, len(windows), job.cfg.batch_size):
        ids = windows[b0 : b0 + job.cfg.batch_size].to(device)
        l_, parts = module(ids, job.teacher.targets(ids), at_one=True)
        loss += float(l_) * len(ids)
        kl1 += float(parts["kl1"]) * len(ids)
    if was_training:
        _train_mode(model)
    return {"loss": loss / len(windows), heldout_kl_key(job.cfg.top_k): kl1 / len(windows)}


def run(model: nn.Module, job: DistillJob, device: torch.device) -> tuple[dict, dict[str, dict]]:
    """Distil ``model`` in place. Returns the stage's report (``curve`` included) and, per masked or
    quantized Linear, its final sparsity and how many of its codes training changed."""
    cfg, state = job.cfg, job.state
    orig_dtype = model.dtype
    if orig_dtype != torch.float32:  # AdamW on 16-bit weights loses the updates: train in float32
        model.float()
    check_head(model)
    precision = resolve_precision(cfg.mixed_precision, device)  # bf16: our own autocast (DistillLoss)
    acc = _accelerator(cpu=device.type == "cpu", mixed_precision="fp16" if precision == "fp16" else "no")
    for name, q in state.quantized.items():  # start exactly at the codes (a 16-bit weight only rounds them)
        write_weight(model.get_submodule(name), q.fmt.dequantize(q.codes, q.qparams).to(device))
    masks = student_masks(model, state.masks, set(state.quantized))
    fqs = fakequant.attach(model, state.quantized, masks, cfg.learn_scales)
    memory.release_freed_memory()  # attach computed every fake-quantized weight once (a shape check)
    pruner = GradualPruner(cfg.gradual, model, job.gradual_targets, masks) if cfg.gradual else None
    params = _trainable(model, cfg)
    weights = {n: (fakequant.latent(model, n) if n in fqs else model.get_submodule(n).weight) for n in masks}
    keeper = MaskKeeper(model, masks, weights)
    keeper.apply()
    opt = _optimizer(params, cfg)
    if cfg.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _train_mode(model)
    module, opt = acc.prepare(DistillLoss(model, cfg, precision), opt)
    raw = acc.unwrap_model(module)

    ls = resume.LoopState()
    if job.resume and job.checkpoints is not None:
        ckpt = resume.load(job.checkpoints, job.key)
        if ckpt is not None:
            with torch.no_grad():
                for n, t in ckpt.params.items():
                    params[n].copy_(t)
                for n, m in ckpt.masks.items():
                    masks[n] = m.to(masks[n].device if n in masks else device)
                if pruner is not None:
                    for n, a in ckpt.act_sq.items():
                        pruner.act_sq[n].copy_(a)
                    pruner.done = ckpt.loop.gradual_done
            opt.load_state_dict(ckpt.optimizer)
            ls = ckpt.loop
            ls.resumed_from = ls.step
            log.info("resumed distillation from %s at step %d (%d tokens)", job.checkpoints, ls.step, ls.tokens)

    world, rank = acc.num_processes, acc.process_index
    n_train = len(job.data.train)
    per_step = cfg.batch_size * cfg.grad_accum * world * cfg.seq_len
    total_steps = math.ceil(cfg.max_tokens / per_step)
    last_save = time.perf_counter()

    def save_checkpoint() -> None:
        nonlocal last_save
        if job.checkpoints is None or not acc.is_main_process:
            return
        acts = pruner.act_sq if pruner is not None else {}
        resume.save(job.checkpoints, job.key, ls, params, opt.state_dict(), masks, acts)
        last_save = time.perf_counter()

    kl_key, kl_label = heldout_kl_key(cfg.top_k), heldout_kl_label(cfg.top_k)

    def evaluate() -> None:
        r = heldout(raw, job, acc.device)
        ls.curve["heldout"].append({"step": ls.step, "tokens": ls.tokens, **r})
        log.info("step %d: held-out loss %.4f, %s %.4f", ls.step, r["loss"], kl_label, r[kl_key])

    t0 = time.perf_counter() - ls.seconds
    t_run, first_step = time.perf_counter(), ls.step
    if not ls.curve["heldout"]:
        evaluate()
    bar = tqdm(total=total_steps, initial=ls.step, desc="distill", unit="step", disable=not acc.is_main_process)
    stopped_by = "tokens"
    try:
        while True:
            ls.seconds = time.perf_counter() - t0
            if ls.step >= total_steps:
                break
            if cfg.max_minutes is not None and ls.seconds / 60 >= cfg.max_minutes:
                stopped_by = "minutes"
                break
            p_next = progress(ls.tokens + per_step, cfg.max_tokens, ls.seconds / 60, cfg.max_minutes)
            set_lr(opt, lr_factor(p_next, cfg.warmup, cfg.decay, cfg.min_lr_ratio))
            t_step = time.perf_counter()
            total, parts_sum = 0.0, {}
            once = cfg.fake_quant_once and bool(fqs)
            with fakequant.once_per_step(model, fqs if once else {}):  # fake-quantized weights computed once a step
                for micro in range(cfg.grad_accum):
                    idx = batch_windows(n_train, job.seed, ls.step, micro, cfg.grad_accum, cfg.batch_size, rank, world)
                    idx = job.teacher.ensure(idx)  # the budget-sized teacher cache, extended if training outran it
                    ids = job.data.train[idx].to(acc.device)
                    tgt = job.teacher.targets(ids)
                    sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else acc.no_sync(module)
                    with sync:
                        loss, parts = module(ids, tgt)
                        acc.backward(loss / cfg.grad_accum, retain_graph=once)  # the shared weights' graph
                    total += float(loss.detach()) / cfg.grad_accum
                    for k, v in parts.items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
                    del loss, parts  # this micro-batch's graph (kept by retain_graph until here)
                    memory.release_freed_memory()  # its activations (see the module docstring)
            keeper.mask_grads()
            if cfg.max_grad_norm is not None:
                acc.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            keeper.apply()
            ls.step += 1
            ls.tokens += per_step
            ls.seconds = time.perf_counter() - t0
            p_done = progress(ls.tokens, cfg.max_tokens, ls.seconds / 60, cfg.max_minutes)
            if pruner is not None and pruner.step(p_done):
                keeper.apply()
                ls.gradual_done = pruner.done
            loss_all = float(acc.reduce(torch.tensor(total, device=acc.device), reduction="mean"))
            step_s = time.perf_counter() - t_step
            ls.curve["train"].append(
                {
                    "step": ls.step,
                    "tokens": ls.tokens,
                    "loss": loss_all,
                    "lr": opt.param_groups[0]["lr"],
                    **parts_sum,
                    "seconds": round(step_s, 3),
                }  # fmt: skip
            )
            tok_s = per_step / max(1e-9, step_s)
            eta = (total_steps - ls.step) * (time.perf_counter() - t_run) / (ls.step - first_step)
            if cfg.max_minutes is not None:
                eta = min(eta, cfg.max_minutes * 60 - ls.seconds)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_all:.4f}", tok_s=f"{tok_s:.0f}", eta=f"{max(0.0, eta) / 60:.1f}min")
            if ls.step % cfg.eval_every == 0:
                evaluate()
            due_steps = cfg.checkpoint_every is not None and ls.step % cfg.checkpoint_every == 0
            due_time = (
                cfg.checkpoint_minutes is not None and time.perf_counter() - last_save >= 60 * cfg.checkpoint_minutes
            )
            if due_steps or due_time:
                save_checkpoint()
    except KeyboardInterrupt:  # SIGINT, and SIGTERM (llmopt.outputs.Interrupted)
        if ls.step > first_step:
            save_checkpoint()  # a rerun with --resume continues from here
        raise
    finally:
        bar.close()
    memory.switch_phase("distill.finish")
    if pruner is not None and pruner.step(1.0):  # stopped by the clock before the last update
        log.warning(
            "distillation stopped before its sparsity schedule ended: target %s applied without training after it",
            cfg.gradual.target,
        )
        keeper.apply()
        ls.gradual_done = pruner.done
    if ls.curve["heldout"][-1]["step"] != ls.step:
        evaluate()
    save_checkpoint()  # the finished run: a failed save of the output resumes right here

    if cfg.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    model.eval()
    if pruner is not None:
        pruner.remove()
        for n in job.gradual_targets:
            state.masks[n] = masks[n].cpu()
    exact = keeper.exact()
    fq_report = fakequant.finish(model, fqs, state.quantized)
    for p in model.parameters():
        p.requires_grad_(True)  # as from_pretrained leaves them
    if orig_dtype != torch.float32:
        model.to(orig_dtype)
    acc.free_memory()
    held = ls.curve["heldout"]
    report = {
        "steps": ls.step,
        "tokens": ls.tokens,
        "minutes": round(ls.seconds / 60, 2),
        "stopped_by": stopped_by,
        "resumed_from_step": ls.resumed_from,
        "train_windows": n_train,
        "heldout_windows": len(job.data.heldout),
        "heldout_before": held[0],
        "heldout_after": held[-1],
        "heldout_kl": kl_label,  # what the held-out records' kl_key holds, in words
        "masks_exact": exact,
        "masked_linears": len(masks),
        "qat_linears": len(fqs),
        "teacher_windows_extended": job.teacher.extended,
        "gradual_sparsity": pruner.sparsity() if pruner is not None else None,
        "curve": ls.curve,
    }
    linears = {n: {"sparsity": float(1.0 - m.float().mean())} for n, m in masks.items()}
    for n, entry in fq_report.items():
        linears.setdefault(n, {}).update(entry)
    return report, linears
