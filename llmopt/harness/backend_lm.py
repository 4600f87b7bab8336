"""An lm-eval ``LM`` over any llmopt :class:`~llmopt.backends.Backend` (llama.cpp, ONNX Runtime).

It feeds lm-eval's requests to ``Backend.logit_blocks`` (one sequence, no cache between calls) and follows
lm-eval's own ``HFLM`` token by token, so a model scored through it and through HFLM (torch) sees the same
ids and windows and differs only in the logits its runtime computes:

* ``tok_encode``: the tokenizer's own rule for special tokens (HFLM with ``add_bos_token=None``); a string
  that already starts with the prefix token's text gets none added.
* ``prefix_token_id``: BOS, else EOS, conditions an empty context and the first rolling window.
* ``loglikelihood``: context + continuation encoded whole and split at the context's length
  (``TemplateLM._encode_pair``); the input ``(ctx + cont)[-(max_length + 1):][:-1]``; the last
  ``len(cont)`` rows score the continuation; ``is_greedy`` when every argmax equals it. The logits are
  consumed block by block (only the continuation's log-probabilities are kept), so a long context with a
  large vocabulary (a GGUF's default ``max_length`` is its training context) never holds (L, V) floats.
* ``loglikelihood_rolling``: ``lm_eval.utils.get_rolling_token_windows(ids, prefix, max_length, 1)``
  made disjoint, each window scored like a loglikelihood request, summed per document.
* ``generate_until``: greedy, the context left-truncated to ``max_length - max_gen_toks`` tokens, stopped
  at EOS or once an ``until`` string appears, the text cut at it (lm-eval's ``handle_stop_sequences`` and
  ``postprocess_generated_text``, as HFLM); sampling arguments are ignored (with a warning).

Subclasses override :meth:`BackendLM._greedy` with their backend's KV-cache loop (its public ``greedy``);
the generic one re-runs the whole sequence per token (correct, quadratic).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm.auto import tqdm

from llmopt.backends.base import Backend

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's default when neither the config nor the tokenizer says
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's max_gen_toks


class BackendLM(TemplateLM):
    """lm-eval's ``TemplateLM`` scoring with ``engine.logit_blocks``; see the module docstring for the rules."""

    def __init__(self, engine: Backend, tokenizer, max_length: int, progress: bool = True):
        super().__init__()
        # not `self.backend`: TemplateLM.backend is the string "causal", read by _encode_pair
        self.engine = engine
        self.tokenizer = tokenizer
        self._max_length = int(max_length)
        self.progress = progress
        self._warned_sampling = False

    # ------------------------------------------------------------------ tokens (HFLM's rules)
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "").replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **_
    ) -> list[int]:
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            kwargs["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **kwargs)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ scoring
    def _score(self, inp: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        """One run over ``inp`` (L,) scoring every continuation in ``conts`` (each the last ``len(cont)``
        predictions of ``inp``): (sum of log p(cont[t]), every cont[t] the argmax).

        The logits arrive as blocks of positions (``engine.logit_blocks``); rows before the earliest
        continuation are skipped, the rest get a float32 log-softmax (HFLM's default) per block, of which
        only the continuation tokens' log-probabilities and the argmax check are kept: memory is one block,
        not (L, V). Log-softmax is per row, so the numbers are those of the whole sequence's."""
        length = len(inp)
        first = length - max(len(c) for c in conts)  # the first row a continuation needs
        picked: list[list[torch.Tensor]] = [[] for _ in conts]
        greedy = [True] * len(conts)
        start = 0
        for block in self.engine.logit_blocks(torch.tensor(inp, dtype=torch.long)):  # (n, V)
            end = start + block.shape[0]
            if end > first:
                lo = max(start, first)
                logp = F.log_softmax(block[lo - start :].float(), dim=-1)  # rows lo..end-1
                best = logp.argmax(-1)
                for j, cont in enumerate(conts):
                    c0 = length - len(cont)  # row c0 + t predicts cont[t]
                    a = max(lo, c0)
                    if a >= end:
                        continue
                    target = torch.tensor(cont[a - c0 : end - c0], dtype=torch.long)
                    picked[j].append(logp[a - lo : end - lo].gather(1, target[:, None])[:, 0])
                    greedy[j] = greedy[j] and bool((best[a - lo : end - lo] == target).all())
                del logp, best
            start = end
        assert start == length, f"the backend returned {start} logit rows for {length} tokens"
        return [(float(torch.cat(p).sum()), g) for p, g in zip(picked, greedy)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_) -> list[tuple[float, bool]]:
        """requests: [(cache key or None, context ids, continuation ids)] → [(log p(cont | ctx), is_greedy)].

        Requests with the same model input (e.g. one-token continuations of one context) share a run."""
        inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in requests]
        order = sorted(range(len(requests)), key=lambda i: inputs[i])  # equal inputs become neighbours
        groups: list[list[int]] = []
        for i in order:
            assert 0 < len(requests[i][2]) <= self.max_length, "continuation longer than the context window"
            if groups and inputs[groups[-1][0]] == inputs[i]:
                groups[-1].append(i)
            else:
                groups.append([i])
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm or not self.progress, leave=False)
        for group in groups:
            answers = self._score(inputs[group[0]], [requests[i][2] for i in group])
            for i, answer in zip(group, answers):
                out[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(group))
        bar.close()
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for (string,) in tqdm(
            [r.args for r in requests], desc="rolling loglikelihood", disable=disable_tqdm or not self.progress
        ):
            windows = map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            total = sum(ll for ll, _ in scored)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            results.append(total)
        return results

    # ------------------------------------------------------------------ generation
    def _greedy(self, ids: list[int], max_new: int) -> Iterator[int]:
        """Greedy next tokens after ``ids``; the generic loop re-runs the sequence for every token."""
        ids = list(ids)
        for _ in range(max_new):
            nxt = int(self.engine.logits(torch.tensor(ids[-self.max_length :], dtype=torch.long))[-1].argmax())
            yield nxt
            ids.append(nxt)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results = []
        for context, gen_kwargs in tqdm(
            [r.args for r in requests], desc="generate_until", disable=disable_tqdm or not self.progress
        ):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            if kwargs.get("do_sample") and not self._warned_sampling:
                log.warning("generate_until: sampling is not implemented for this backend; decoding greedily")
                self._warned_sampling = True
            until = [s for s in handle_stop_sequences(kwargs.get("until"), eos=eos) if s]
            max_new = int(kwargs["max_gen_toks"])
            ids = self.tok_encode(context, left_truncate_len=max(1, self.max_length - max_new))
            generated: list[int] = []
            for tok in self._greedy(ids, max_new):
                generated.append(tok)
                if tok == self.eot_token_id or any(s in self.tok_decode(generated) for s in until):
                    break
            text = postprocess_generated_text(self.tok_decode(generated), until, None)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            results.append(text)
        return results

    def get_model_info(self) -> dict:
        """Recorded by lm-eval in ``results["config"]``."""
        return {"llmopt_backend": self.engine.name, "model_spec": self.engine.model_spec, "dtype": self.engine.dtype}
