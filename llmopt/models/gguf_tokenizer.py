"""A tokenizer for a GGUF that gives llama.cpp's token ids.

Tokenizer fidelity. The tokenizer built for a GGUF must give the token ids llama.cpp gives for the same
file, so that perplexities measured with torch and with llama.cpp are comparable. transformers' own GGUF
tokenizer conversion (4.57) gets a SmolLM2 GGUF wrong in three ways: it adds a BOS token although the
GGUF says ``tokenizer.ggml.add_bos_token = false``, it drops the digit splitting of llama.cpp's
``smollm`` pre-tokenizer (``\\p{N}`` isolated before the GPT-2 regex, see ``llama-vocab.cpp``), and it
saves a ``LlamaTokenizer`` class on a GPT-2 byte-level BPE, which other transformers versions rebuild
differently. For byte-level BPE GGUFs with a known pre-tokenizer we therefore build ``tokenizer.json``
directly from the GGUF vocabulary and merges (:func:`_tokenizer_from_gguf`) and save it as a plain
``PreTrainedTokenizerFast`` (``tokenizer.json``, no ``tokenizer.model``).

SentencePiece GGUFs (``tokenizer.ggml.model`` llama: Llama 2, Mistral v0.1, TinyLlama, Gemma) are built by
:mod:`llmopt.models.gguf_spm` the same way, with llama.cpp's SPM merge rule; the few other kinds fall back
to transformers' conversion with the BOS flag fixed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import llmopt.hf_imports  # noqa: F401  (transformers' import-time settings, before its model classes)

# isort: split
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from llmopt.models.gguf_file import _gguf_value, read_gguf
from llmopt.models.gguf_special import TOKEN_CONTROL, TOKEN_USER_DEFINED, _wrap
from llmopt.models.gguf_spm import spm_tokenizer_from_gguf

log = logging.getLogger(__name__)

# llama.cpp pre-tokenizer types (``tokenizer.ggml.pre``) whose regexes we reproduce with `tokenizers`
# components (llama.cpp src/llama-vocab.cpp, ``llm_tokenizer_bpe``): "smollm" runs ``\p{N}`` (each digit
# alone) and then the GPT-2 regex; "gpt-2" runs the GPT-2 regex only. Digits(individual_digits) splits on
# Unicode numerics, like ``\p{N}``; ByteLevel(use_regex) is the GPT-2 regex.
_DIGITS_THEN_GPT2 = frozenset({"smollm"})
_GPT2_ONLY = frozenset({"gpt-2"})


def _build_gguf_tokenizer(gguf: Path, reader: Any | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of ``gguf``, tokenizing like llama.cpp (see the module docstring)."""
    reader = reader if reader is not None else read_gguf(gguf)
    kind = _gguf_value(reader, "tokenizer.ggml.model")
    pre = _gguf_value(reader, "tokenizer.ggml.pre", "default")
    if kind == "gpt2" and pre in _DIGITS_THEN_GPT2 | _GPT2_ONLY:
        return _tokenizer_from_gguf(reader)
    if kind == "llama":
        return spm_tokenizer_from_gguf(reader)
    log.warning("GGUF tokenizer %s/%s is converted by transformers: token ids may differ from llama.cpp's", kind, pre)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    add_bos = bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", kind == "llama"))
    if hasattr(tok, "add_bos_token"):
        tok.add_bos_token = add_bos  # Llama/Gemma fast tokenizers rebuild their post-processor
    return tok


def _tokenizer_from_gguf(reader: Any) -> PreTrainedTokenizerFast:
    """A byte-level BPE ``PreTrainedTokenizerFast`` built from the GGUF vocabulary, merges and flags."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens: list[str] = list(_gguf_value(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(_gguf_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _gguf_value(reader, "tokenizer.ggml.merges", [])]
    pre = _gguf_value(reader, "tokenizer.ggml.pre", "default")
    add_bos = bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_gguf_value(reader, "tokenizer.ggml.add_eos_token", False))

    tk = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    tk.add_tokens(
        [
            AddedToken(tokens[i], special=types[i] == TOKEN_CONTROL, normalized=False)
            for i in range(len(tokens))
            if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
        ]
    )

    if not (add_bos or add_eos):
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return _wrap(reader, tk, tokens, add_bos=add_bos, add_eos=add_eos)
