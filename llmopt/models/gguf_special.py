"""What every tokenizer built from a GGUF vocabulary shares: token types, added tokens, the BOS / EOS the
file asks llama.cpp to add, and the ``PreTrainedTokenizerFast`` around a `tokenizers` model."""

from __future__ import annotations

from typing import Any

import llmopt.hf_imports  # noqa: F401  (transformers' import-time settings, before its model classes)

# isort: split
from transformers import PreTrainedTokenizerFast

from llmopt.models.gguf_file import _gguf_value

# gguf token types (gguf.TokenType, llama.cpp LLAMA_TOKEN_TYPE_*)
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6


def _added_tokens(reader: Any, tokens: list[str], types: list[int]) -> list[Any]:
    """The tokens llama.cpp cuts out of the raw text before its tokenizer runs (``tokenizer_st_partition``).

    CONTROL and UNKNOWN tokens become special added tokens (llama.cpp with ``parse_special``, transformers'
    default); USER_DEFINED ones are cut out always, in both, and are plain added tokens. None is
    normalized: llama.cpp matches them in the raw text, before escaping spaces. For a model named Phi-3,
    llama.cpp strips the whitespace after them (but after ``<unk>``, ``<s>``, ``<|endoftext|>``).
    """
    from tokenizers import AddedToken

    ids = [i for i in range(len(tokens)) if types[i] in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED)]
    name = str(_gguf_value(reader, "general.name", "")).lower()
    phi3 = "phi-3" in name or "phi3" in name  # llama-vocab.cpp, "set attributes by model name"
    rstrip = {tokens[i] for i in ids} - {"<unk>", "<s>", "<|endoftext|>"} if phi3 else set()
    return [
        AddedToken(tokens[i], special=types[i] != TOKEN_USER_DEFINED, normalized=False, rstrip=tokens[i] in rstrip)
        for i in ids
    ]


def _wrap(reader: Any, tk: Any, tokens: list[str], *, add_bos: bool, add_eos: bool) -> PreTrainedTokenizerFast:
    """``tk`` with the GGUF's BOS / EOS rule as its post-processor, wrapped with the special tokens,
    context length and chat template of the file.

    A post-processor ``tk`` already has is kept when the file adds neither BOS nor EOS.
    """
    from tokenizers import processors

    def token(name: str) -> str | None:
        tid = _gguf_value(reader, f"tokenizer.ggml.{name}_token_id")
        return tokens[int(tid)] if tid is not None and 0 <= int(tid) < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    pre_ids = [bos] if add_bos and bos else []
    post_ids = [eos] if add_eos and eos else []
    if pre_ids or post_ids:  # llama.cpp adds BOS / EOS only when the GGUF asks for it
        single = [f"{t}:0" for t in pre_ids] + ["$A:0"] + [f"{t}:0" for t in post_ids]
        pair = single + ["$B:1"] + [f"{t}:1" for t in post_ids]  # llama.cpp has no pairs; BOS once
        ids = {t: i for i, t in enumerate(tokens) if t in set(pre_ids + post_ids)}
        tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items()))

    arch = _gguf_value(reader, "general.architecture")
    max_len = _gguf_value(reader, f"{arch}.context_length")
    kwargs: dict[str, Any] = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "clean_up_tokenization_spaces": False,
        "add_bos_token": add_bos,  # for readers that honour it (transformers 5); agrees with tokenizer.json
        "add_eos_token": add_eos,
    }
    if max_len:
        kwargs["model_max_length"] = int(max_len)
    template = _gguf_value(reader, "tokenizer.chat_template")
    if template:
        kwargs["chat_template"] = template
    return PreTrainedTokenizerFast(tokenizer_object=tk, **{k: v for k, v in kwargs.items() if v is not None})
