"""``llmopt.evaluation``: perplexity, KL against a base model, and speed, on any backend."""

from __future__ import annotations

import logging
import math

import torch

from llmopt.backends import Backend, make_backend
from llmopt.data import evaluation_tokens
from llmopt.metrics import EvalResult, KLStats, make_windows, measure_speed, score_windows

log = logging.getLogger(__name__)


def evaluate(
    model: str | Backend,
    data: str = "wikitext2",
    seq_len: int = 2048,
    max_windows: int | None = None,
    base: str | Backend | None = None,
    speed: bool = False,
    backend: str = "auto",
    threads: int | None = None,
    speed_prompt_tokens: int = 512,
    speed_new_tokens: int = 128,
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``model`` (a spec or a ready backend) on ``data``.

    Tokens come from the evaluated model's own tokenizer (the base model must share it: KL is computed
    on identical ids). Both backends see exactly the same (W, seq_len) windows.
    """
    from llmopt.models import load_tokenizer

    spec = model if isinstance(model, str) else model.model_spec
    be = make_backend(backend, model, threads=threads) if isinstance(model, str) else model
    tokenizer = load_tokenizer(spec)
    tokens = evaluation_tokens(data, tokenizer)
    windows = make_windows(tokens, seq_len, max_windows)
    log.info("evaluating %s on %d windows of %d tokens (%s)", spec, windows.shape[0], seq_len, data)

    base_be = None
    if base is not None:
        base_be = make_backend("auto", base, threads=threads) if isinstance(base, str) else base
    mean_nll, n_scored, kl = score_windows(be, windows, base=base_be, progress=progress)
    result = EvalResult(
        model=spec,
        backend=be.name,
        data=str(data),
        seq_len=seq_len,
        windows=int(windows.shape[0]),
        tokens_scored=n_scored,
        perplexity=math.exp(mean_nll),
        nll=mean_nll,
        kl=KLStats(**kl) if kl is not None else None,
    )
    if speed:
        prompt = tokens[:speed_prompt_tokens]
        if prompt.numel() < speed_prompt_tokens:
            prompt = torch.cat([prompt] * (speed_prompt_tokens // max(1, prompt.numel()) + 1))[:speed_prompt_tokens]
        result.speed = measure_speed(be, prompt, speed_new_tokens)
    return result


def format_result(r: EvalResult) -> str:
    """A readable table for the terminal."""
    rows = [
        ("model", r.model),
        ("backend", r.backend),
        ("data", r.data),
        ("windows x seq_len", f"{r.windows} x {r.seq_len} ({r.tokens_scored} tokens scored)"),
        ("perplexity", f"{r.perplexity:.4f}"),
    ]
    if r.kl is not None:
        k = r.kl
        rows += [
            ("base perplexity", f"{k.base_perplexity:.4f}  (ratio {k.ppl_ratio:.4f})"),
            ("KL mean", f"{k.mean:.6f}"),
            ("KL median", f"{k.median:.6f}"),
            ("KL p99 / p99.9", f"{k.p99:.6f} / {k.p999:.6f}"),
            ("KL max", f"{k.max:.6f}"),
            ("same top-1", f"{100 * k.top1_agreement:.2f}%"),
            ("mean dp (correct)", f"{100 * k.mean_delta_p:+.3f}%"),
        ]
    if r.speed is not None:
        s = r.speed
        rows += [
            ("prefill", f"{s.prefill_tok_s:.1f} tok/s ({s.prompt_tokens}-token prompt)"),
            ("decode", f"{s.decode_tok_s:.1f} tok/s ({s.new_tokens} greedy tokens)"),
            ("threads", str(s.threads)),
        ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
