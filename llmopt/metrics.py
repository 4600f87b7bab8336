"""Perplexity, KL divergence and speed, computed from any :class:`~llmopt.backends.Backend`.

Perplexity follows the GPTQ / SparseGPT papers' protocol (Frantar et al. 2022, §4 "Setup"; reference
code ``datautils.py`` + ``llama_eval``): the evaluation text is joined, tokenized once, cut into
non-overlapping windows of ``seq_len`` tokens (the tail shorter than a window is dropped), each window
is scored independently (no BOS inserted, no context carried over), the mean next-token NLL of each
window is averaged over windows, and ``ppl = exp(mean)``. This is the number ``model(x, labels=x)``
gives averaged over the same windows.

KL divergence mirrors llama-perplexity's ``--kl-divergence`` report: per scored token
KL(p_base ‖ p_model) over the full vocabulary, summarised by mean, median, p90/p99/p99.9, max; the
fraction of tokens where both models' top-1 tokens agree ("same top p"); the mean change of the
probability of the correct token (Δp); and the perplexity ratio.

Uncertainties are llama-perplexity's: the standard error of the mean over scored tokens (perplexity:
``ppl · stderr(nll)``; the ratio: of the per-token ``nll_model − nll_base``, paired on the same tokens;
KL: of the per-token KL). Tokens of one window are not independent, so these are lower bounds; the
per-window mean NLLs are kept (``window_nll``) for comparisons with windows as the unit.

Speed follows llama-bench: the same thread count on every backend (physical cores by default), one
untimed warm-up of exactly the timed shape, then ``repeats`` timed runs summarised by median, min, max.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmopt.backends.base import Backend, SpeedResult
from llmopt.errors import LLMOptError

log = logging.getLogger(__name__)


def make_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut a (T,) token stream into non-overlapping windows: (W, seq_len)."""
    if seq_len < 2:
        raise LLMOptError(f"--seq-len must be at least 2, got {seq_len}")
    n = tokens.numel() // seq_len
    if n == 0:
        raise LLMOptError(
            f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seq_len}: "
            "use more text or a smaller --seq-len"
        )
    if max_windows is not None:
        if max_windows < 1:
            raise LLMOptError(f"--max-windows must be >= 1, got {max_windows}")
        n = min(n, max_windows)
    return tokens[: n * seq_len].view(n, seq_len)


@dataclass
class KLStats:
    mean: float
    median: float
    p90: float
    p99: float
    p999: float
    max: float
    top1_agreement: float  # fraction of scored tokens where argmax(base) == argmax(model)
    mean_delta_p: float  # mean of p_model(correct) − p_base(correct)
    ppl_ratio: float  # ppl(model) / ppl(base)
    base_perplexity: float
    mean_stderr: float = float("nan")  # standard error of the per-token KL mean
    ln_ppl_ratio_stderr: float = float("nan")  # of mean(nll_model − nll_base) over the same tokens


@dataclass
class EvalResult:
    model: str
    backend: str
    data: str
    seq_len: int
    windows: int
    tokens_scored: int
    perplexity: float
    nll: float
    kl: KLStats | None = None
    speed: SpeedResult | None = None
    perplexity_stderr: float = float("nan")  # ppl · per-token standard error of the NLL (llama-perplexity's ±)
    window_nll: list[float] | None = None  # mean NLL of each window, in order

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("kl", "speed"):
            if d[k] is None:
                del d[k]
        return d


def _quantile(x: torch.Tensor, q: float) -> float:
    # torch.quantile refuses > 16M elements; sort once instead.
    s, _ = torch.sort(x)
    return float(s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))])


class WindowScores(NamedTuple):
    nll: float  # mean NLL over windows (GPTQ protocol)
    tokens: int  # tokens scored
    kl: dict | None  # KLStats fields, with a base
    nll_stderr: float  # per-token standard error of ``nll``
    window_nll: list[float]  # each window's mean NLL


def _stderr(total: float, total_sq: float, n: int) -> float:
    """Standard error of a mean from the sum and the sum of squares of ``n`` values."""
    if n < 2:
        return float("nan")
    mean = total / n
    return math.sqrt(max(total_sq / n - mean * mean, 0.0) / (n - 1))


def score_windows(
    backend: Backend,
    windows: torch.Tensor,
    base: Backend | None = None,
    progress: bool = True,
) -> WindowScores:
    """Mean NLL over windows (GPTQ protocol), its uncertainty and, with ``base``, per-token KL statistics.

    windows: (W, L). Row t of each window's logits predicts token t+1, so L−1 tokens are scored per window.
    Logits arrive in blocks of positions (:meth:`~llmopt.backends.Backend.logit_blocks`, both models'
    aligned) and only per-token numbers are kept, so memory is a few blocks of (n, V), not (L, V).
    """
    window_nll: list[float] = []
    base_nll: list[float] = []
    kls: list[torch.Tensor] = []
    top1_same = 0
    delta_p = 0.0
    sums = dict(nll=0.0, nll2=0.0, d=0.0, d2=0.0)  # per-token sums for the standard errors
    for w in tqdm(windows, desc="scoring windows", disable=not progress, leave=False):
        target = w[1:]  # (L−1,)
        blocks = _aligned(_blocks(backend, w), _blocks(base, w) if base is not None else None)
        start, win, bwin = 0, 0.0, 0.0
        for zp, zq in blocks:
            rows = slice(start, min(start + zp.shape[0], target.shape[0]))  # the window's last row predicts nothing
            start += zp.shape[0]
            n = rows.stop - rows.start
            if n <= 0:
                continue
            tgt = target[rows, None]  # (n, 1)
            logp = F.log_softmax(zp[:n].float(), dim=-1)  # (n, V)
            nll = -logp.gather(1, tgt).squeeze(1).double()  # (n,)
            win += float(nll.sum())
            sums["nll"] += float(nll.sum())
            sums["nll2"] += float((nll * nll).sum())
            if zq is None:
                continue
            if zq.shape[-1] != zp.shape[-1]:
                raise LLMOptError(f"--base has vocabulary {zq.shape[-1]} but the model has {zp.shape[-1]}")
            logq = F.log_softmax(zq[:n].float(), dim=-1)  # base model: (n, V)
            bnll = -logq.gather(1, tgt).squeeze(1).double()
            bwin += float(bnll.sum())
            d = nll - bnll  # paired on the same tokens: ln(ppl ratio) per token
            sums["d"] += float(d.sum())
            sums["d2"] += float((d * d).sum())
            top1_same += int((logq.argmax(-1) == logp.argmax(-1)).sum())
            delta_p += float((logp.gather(1, tgt).exp() - logq.gather(1, tgt).exp()).sum())
            # KL(base ‖ model) = Σ_v q_v (log q_v − log p_v), per token; in place: two (n, V) temporaries
            diff = torch.sub(logq, logp, out=logp)
            kls.append(diff.mul_(logq.exp_()).sum(-1).clamp_min(0.0))
            del logq, diff
        window_nll.append(win / target.shape[0])
        if base is not None:
            base_nll.append(bwin / target.shape[0])
    mean_nll = sum(window_nll) / len(window_nll)
    n_scored = windows.shape[0] * (windows.shape[1] - 1)
    kl = None
    if base is not None:
        allk = torch.cat(kls).double()
        base_ppl = math.exp(sum(base_nll) / len(base_nll))
        kl = dict(
            mean=float(allk.mean()),
            median=_quantile(allk, 0.5),
            p90=_quantile(allk, 0.90),
            p99=_quantile(allk, 0.99),
            p999=_quantile(allk, 0.999),
            max=float(allk.max()),
            top1_agreement=top1_same / n_scored,
            mean_delta_p=delta_p / n_scored,
            ppl_ratio=math.exp(mean_nll) / base_ppl,
            base_perplexity=base_ppl,
            mean_stderr=float(allk.std() / math.sqrt(allk.numel())) if allk.numel() > 1 else float("nan"),
            ln_ppl_ratio_stderr=_stderr(sums["d"], sums["d2"], n_scored),
        )
    return WindowScores(mean_nll, n_scored, kl, _stderr(sums["nll"], sums["nll2"], n_scored), window_nll)


def _blocks(backend: Backend, w: torch.Tensor) -> Iterator[torch.Tensor]:
    """The backend's logit blocks; one block of its full logits for an object with ``logits`` only."""
    if hasattr(backend, "logit_blocks"):
        return backend.logit_blocks(w)
    return iter([backend.logits(w)])


def _aligned(
    a: Iterator[torch.Tensor], b: Iterator[torch.Tensor] | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Blocks of rows of two logit streams cut at the same positions (the backends' block sizes differ)."""
    if b is None:
        yield from ((x, None) for x in a)
        return
    xa = xb = None
    while True:
        if xa is None or xa.shape[0] == 0:
            xa = next(a, None)
        if xb is None or xb.shape[0] == 0:
            xb = next(b, None)
        if xa is None or xb is None:
            if xa is not None or xb is not None:
                raise LLMOptError("the model and --base returned logits for different numbers of positions")
            return
        n = min(xa.shape[0], xb.shape[0])
        yield xa[:n], xb[:n]
        xa, xb = xa[n:], xb[n:]


def measure_speed(
    backend: Backend, prompt: torch.Tensor, new_tokens: int = 128, repeats: int = 3, progress: bool = False
) -> SpeedResult:
    """Prefill throughput over ``prompt`` (P,) and greedy decode throughput over ``new_tokens``, llama-bench style.

    One untimed warm-up run of exactly the timed shape (same P, same ``new_tokens``: allocators, thread
    pools, kernel selection and the KV cache size all see what the timed runs see), then ``repeats``
    timed runs; each throughput is reported as the median over the repeats with its min and max.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise LLMOptError(f"--repeats must be a whole number >= 1, got {repeats!r}")
    prompt = prompt.reshape(-1)
    backend.time_generation(prompt, new_tokens)  # warm-up, same shape as the timed runs
    runs = [
        backend.time_generation(prompt, new_tokens)
        for _ in tqdm(range(repeats), desc="timing generation", disable=not progress, leave=False)
    ]
    prefill = [r.prefill_tok_s for r in runs]
    decode = [r.decode_tok_s for r in runs]
    log.info("prefill tok/s per run: %s; decode tok/s per run: %s", prefill, decode)
    return SpeedResult(
        prefill_tok_s=statistics.median(prefill),
        decode_tok_s=statistics.median(decode),
        prompt_tokens=int(prompt.numel()),
        new_tokens=new_tokens,
        threads=runs[0].threads,
        prefill_tok_s_min=min(prefill),
        prefill_tok_s_max=max(prefill),
        decode_tok_s_min=min(decode),
        decode_tok_s_max=max(decode),
        repeats=repeats,
        dtype=runs[0].dtype or backend.dtype,
    )
