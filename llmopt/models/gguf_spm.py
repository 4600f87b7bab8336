"""A GGUF SentencePiece vocabulary (``tokenizer.ggml.model`` = ``llama``: Llama 1/2, Mistral v0.1,
TinyLlama, Gemma 1/2/3) as a `tokenizers` BPE that gives llama.cpp's token ids.

What llama.cpp does (``src/llama-vocab.cpp``): USER_DEFINED tokens (and CONTROL ones when parsing
specials) are cut out of the raw text first; every remaining fragment gets a leading space when
``tokenizer.ggml.add_space_prefix`` is set (the default) and spaces become ``▁``; then
``llm_tokenizer_spm`` splits the fragment into characters and repeatedly joins the adjacent pair whose
concatenation is a vocabulary token of the highest score, the leftmost pair on equal scores; characters
left outside every token become their ``<0xXX>`` byte tokens. This is not SentencePiece's unigram
search, and it is not a merge list: any two adjacent pieces whose text is a token may join.

The same as a BPE: every split of every token into two vocabulary tokens is a merge, ranked by the
token's score (:func:`spm_merges`); `tokenizers` then joins the best-ranked adjacent pair, the leftmost
of a rank first, exactly llama.cpp's loop while scores are distinct. Equal scores (Llama 2's
whitespace runs ``▁▁``…``▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁`` all score -1e9) cannot all share one rank; ranking the longer
token, then the longer left piece, first makes the leftmost piece grow before a piece to its right
starts, which is llama.cpp's leftmost rule on such runs. Byte fallback, the space prefix (a ``Prepend``
normalizer runs on every fragment between added tokens, as llama.cpp's prefix follows every special
token) and the BOS / EOS flags (llama.cpp's defaults for SPM: BOS yes, EOS no) complete it.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import PreTrainedTokenizerFast

from llmopt.models.gguf_file import _gguf_value
from llmopt.models.gguf_special import TOKEN_NORMAL, _added_tokens, _wrap

log = logging.getLogger(__name__)

SPACE = "\u2581"  # "▁", SentencePiece's escaped space


def spm_tokenizer_from_gguf(reader: Any) -> PreTrainedTokenizerFast:
    """The tokenizer of a GGUF whose ``tokenizer.ggml.model`` is ``llama`` (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = _token_texts(list(_gguf_value(reader, "tokenizer.ggml.tokens")))
    scores = [float(s) for s in _gguf_value(reader, "tokenizer.ggml.scores", [0.0] * len(tokens))]
    types = [int(t) for t in _gguf_value(reader, "tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))]
    add_prefix = bool(_gguf_value(reader, "tokenizer.ggml.add_space_prefix", True))
    add_bos = bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", True))
    add_eos = bool(_gguf_value(reader, "tokenizer.ggml.add_eos_token", False))

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if vocab.setdefault(t, i) != i:
            log.warning("GGUF vocabulary lists %r twice (ids %d and %d): id %d is unreachable", t, vocab[t], i, i)
    _warn_unreachable_chars([t for t, k in zip(tokens, types) if k == TOKEN_NORMAL], vocab)
    _warn_flat_scores([s for s, k, t in zip(scores, types, tokens) if k == TOKEN_NORMAL and len(t) > 1])
    unk_id = _gguf_value(reader, "tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    tk = Tokenizer(
        models.BPE(vocab=vocab, merges=spm_merges(tokens, scores), unk_token=unk, fuse_unk=False, byte_fallback=True)
    )
    escape = normalizers.Replace(" ", SPACE)
    tk.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), escape]) if add_prefix else escape
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
    tk.add_tokens(_added_tokens(reader, tokens, types))
    return _wrap(reader, tk, tokens, add_bos=add_bos, add_eos=add_eos)


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every (left, right) pair of vocabulary tokens whose concatenation is a token, best first.

    Order: the joined token's score (higher first), then its length in characters (longer first), then
    the left piece's length (longer first), then the token id. ``tokens`` as llama.cpp reads them (first
    occurrence of a text wins); ``scores`` float32 values as stored.
    """
    ids: dict[str, int] = {}
    for i, t in enumerate(tokens):
        ids.setdefault(t, i)
    keyed: list[tuple[float, int, int, int, str, str]] = []
    for text, i in ids.items():
        n = len(text)
        for k in range(1, n):
            left, right = text[:k], text[k:]
            if left in ids and right in ids:
                keyed.append((-scores[i], -n, -k, i, left, right))
    keyed.sort()
    return [(left, right) for *_, left, right in keyed]


def _warn_unreachable_chars(normal: list[str], vocab: dict[str, int]) -> None:
    """A character inside a normal token that is no token by itself: llama.cpp may still join it into
    that token, the BPE turns it into byte tokens first. SentencePiece-trained vocabularies (Llama 2,
    Phi-3, Baichuan: none) keep every such character as a piece, so this only warns."""
    missing = {c for t in normal if len(t) > 1 for c in t if c not in vocab}
    if missing:
        shown = "".join(sorted(missing)[:20])
        log.warning(
            "GGUF vocabulary: %d characters occur inside tokens but are no token themselves (%r...): on text "
            "with them, token ids may differ from llama.cpp's",
            len(missing),
            shown,
        )


def _warn_flat_scores(scores: list[float]) -> None:
    """Mostly equal scores (gguf-py's ``LlamaHfVocab`` writes -1000 for every token of a tokenizer.json
    without SentencePiece model): llama.cpp then joins the leftmost joinable pair, which no merge ranking
    reproduces everywhere (llama.cpp's Llama-2 vocabulary with flat scores: 116 of 4634 texts differ)."""
    if len(scores) > 1 and len(set(scores)) < len(scores) // 2:
        log.warning(
            "GGUF vocabulary: %d of %d multi-character tokens share a score (a vocabulary converted without its "
            "SentencePiece scores): token ids may differ from llama.cpp's on some texts",
            len(scores) - len(set(scores)) + 1,
            len(scores),
        )


def _token_texts(raw: list[Any]) -> list[str]:
    """Token texts as llama.cpp keeps them: an empty one becomes ``[EMPTY_<id>]``."""
    out = []
    for i, t in enumerate(raw):
        text = t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t)
        out.append(text if text else f"[EMPTY_{i}]")
    return out
