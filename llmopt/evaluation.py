"""``llmopt.evaluation``: perplexity, KL against a base model, and speed, on any backend."""

from __future__ import annotations

import logging
import math

import torch

from llmopt.backends import Backend, make_backend, resolve_threads
from llmopt.data import C4_EVAL_WINDOWS, load_text, parse_data_spec, tokenize_text
from llmopt.errors import LLMOptError
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
    speed_repeats: int = 3,
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``model`` (a spec or a ready backend) on ``data``.

    Tokens come from the evaluated model's own tokenizer (the base model must share it: KL is computed
    on identical ids). Both backends see exactly the same (W, seq_len) windows. ``max_windows`` None
    scores every window, except for ``c4``: the first 256 windows (the GPTQ/SparseGPT papers' protocol).
    ``threads`` None means physical cores; the model and the base run with the same count. Speed is the
    median [min, max] of ``speed_repeats`` timed runs after a same-shape warm-up.
    """
    from llmopt.models import load_tokenizer

    if threads is not None:
        threads = resolve_threads(threads)  # fail before loading anything
    if speed and (isinstance(speed_repeats, bool) or not isinstance(speed_repeats, int) or speed_repeats < 1):
        raise LLMOptError(f"--repeats must be a whole number >= 1, got {speed_repeats!r}")
    data_spec = parse_data_spec(data) if isinstance(data, str) else data
    if max_windows is None and data_spec.kind == "c4":
        max_windows = C4_EVAL_WINDOWS
    spec = model if isinstance(model, str) else model.model_spec
    # everything decidable from tokenizers and text first, before any weights are loaded
    tokenizer = load_tokenizer(spec)
    text = load_text(data_spec, role="eval")
    tokens = tokenize_text(tokenizer, text)
    windows = make_windows(tokens, seq_len, max_windows)
    base_spec = base if isinstance(base, str) else getattr(base, "model_spec", None)
    if base_spec:
        check_same_tokenizer(tokenizer, load_tokenizer(base_spec), text[:4000])
    be = make_backend(backend, model, threads=threads) if isinstance(model, str) else model
    log.info("evaluating %s on %d windows of %d tokens (%s)", spec, windows.shape[0], seq_len, data)

    base_be = None
    if base is not None:
        # the base runs with the evaluated backend's thread count, so both are timed/run alike
        base_threads = threads if threads is not None else be.threads
        base_be = make_backend("auto", base, threads=base_threads) if isinstance(base, str) else base
    mean_nll, n_scored, kl, nll_stderr, window_nll = score_windows(be, windows, base=base_be, progress=progress)
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
        perplexity_stderr=math.exp(mean_nll) * nll_stderr,
        window_nll=window_nll,
    )
    if speed:
        prompt = tokens[:speed_prompt_tokens]
        if prompt.numel() < speed_prompt_tokens:
            prompt = torch.cat([prompt] * (speed_prompt_tokens // max(1, prompt.numel()) + 1))[:speed_prompt_tokens]
        result.speed = measure_speed(be, prompt, speed_new_tokens, repeats=speed_repeats, progress=progress)
    return result


#: tokenized by both models' tokenizers for --base: digits, spaces, accents, CJK, emoji, code
PROBE_TEXT = "The 2024 café, naïve: 12,345.67 km — 中文 日本語 🤗\n\tdef f(x):  return x**2  # it's I'LL\n"


def check_same_tokenizer(tokenizer, base_tokenizer, sample: str = "") -> None:
    """KL compares distributions over the same token ids: the base model's tokenizer must have the same
    vocabulary and split text identically (merges, pre-tokenizer); one-line LLMOptError otherwise."""
    va, vb = tokenizer.get_vocab(), base_tokenizer.get_vocab()
    if len(va) != len(vb):
        raise LLMOptError(
            f"--base has a tokenizer of {len(vb)} tokens, the model one of {len(va)}: KL needs the same tokenizer"
        )
    if va != vb:
        diff = sum(1 for t, i in va.items() if vb.get(t) != i)
        raise LLMOptError(
            f"--base has a different tokenizer ({diff} of {len(va)} tokens have other ids): KL needs the same tokenizer"
        )
    for text in (PROBE_TEXT, sample):
        if text and tokenize_text(tokenizer, text).tolist() != tokenize_text(base_tokenizer, text).tolist():
            raise LLMOptError(
                "--base tokenizes text differently from the model (other merges or pre-tokenizer): "
                "KL needs the same tokenizer"
            )


def format_result(r: EvalResult) -> str:
    """A readable table for the terminal."""
    rows = [
        ("model", r.model),
        ("backend", r.backend),
        ("data", r.data),
        ("windows x seq_len", f"{r.windows} x {r.seq_len} ({r.tokens_scored} tokens scored)"),
        ("perplexity", f"{r.perplexity:.4f} ± {r.perplexity_stderr:.4f}"),
    ]
    if r.kl is not None:
        k = r.kl
        rows += [
            ("base perplexity", f"{k.base_perplexity:.4f}  (ratio {k.ppl_ratio:.4f})"),
            ("ln(ppl / base ppl)", f"{math.log(k.ppl_ratio):+.5f} ± {k.ln_ppl_ratio_stderr:.5f}"),
            ("KL mean", f"{k.mean:.6f} ± {k.mean_stderr:.6f}"),
            ("KL median", f"{k.median:.6f}"),
            ("KL p99 / p99.9", f"{k.p99:.6f} / {k.p999:.6f}"),
            ("KL max", f"{k.max:.6f}"),
            ("same top-1", f"{100 * k.top1_agreement:.2f}%"),
            ("mean dp (correct)", f"{100 * k.mean_delta_p:+.3f}%"),
        ]
    if r.speed is not None:
        s = r.speed
        runs = f"median of {s.repeats}" if s.repeats > 1 else "1 run"
        rows += [
            (
                "prefill",
                f"{s.prefill_tok_s:.1f} tok/s [{s.prefill_tok_s_min:.1f}–{s.prefill_tok_s_max:.1f}] "
                f"({s.prompt_tokens}-token prompt, {runs})",
            ),
            (
                "decode",
                f"{s.decode_tok_s:.1f} tok/s [{s.decode_tok_s_min:.1f}–{s.decode_tok_s_max:.1f}] "
                f"({s.new_tokens} greedy tokens, {runs})",
            ),
            ("threads / dtype", f"{s.threads} / {s.dtype or '?'}"),
        ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
