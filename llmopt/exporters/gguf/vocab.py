"""The tokenizer in llama.cpp's terms: vocabulary, merges / scores, pre-tokenizer, special tokens.

Byte-level BPE becomes ``tokenizer.ggml.model`` gpt2 with the ``tokenizer.ggml.pre`` under which
llama.cpp splits text exactly like the HF tokenizer (:func:`pre_tokenizer`); SentencePiece-style
tokenizers become ``llama`` (scores, byte tokens). Special token ids, add-BOS/EOS flags and the chat
template come from the model folder's own files through gguf-py's ``SpecialVocab``.
"""

from __future__ import annotations

import json
import logging
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from llmopt.errors import LLMOptError

log = logging.getLogger(__name__)

# convert_hf_to_gguf.py ``get_vocab_base_pre``: sha256 of str(tokenizer.encode(CHECK_TEXT)) → pre type.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ "
    "(multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai gpt2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM(2)
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
}
# Pre-tokenizer regexes of tokenizer.json ``Split`` steps → llama.cpp pre type (llama-vocab.cpp).
_LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def add_tokenizer(w: gguf.GGUFWriter, loaded: Any, vocab_size: int) -> str:
    """Write the tokenizer; returns the ``tokenizer.ggml.pre`` value ("default" for SentencePiece)."""
    tok, folder = loaded.tokenizer, Path(loaded.path)
    tj = json.loads(tok.backend_tokenizer.to_str()) if getattr(tok, "is_fast", False) else {}
    model_kind = tj.get("model", {}).get("type")
    byte_level = "ByteLevel" in json.dumps([tj.get("pre_tokenizer"), tj.get("decoder")])
    if model_kind == "BPE" and byte_level and not tj["model"].get("byte_fallback"):
        pre = _pre_tokenizer(tok, tj, loaded.gguf_path)
        _add_bpe_vocab(w, tok, tj, vocab_size, pre)
    elif (folder / "tokenizer.model").is_file() or (model_kind == "BPE" and tj["model"].get("byte_fallback")):
        pre = "default"
        _add_spm_vocab(w, tok, tj, folder, vocab_size)
    else:
        raise LLMOptError(
            f"tokenizer of {loaded.spec} ({model_kind or type(tok).__name__}) is neither byte-level BPE nor "
            "SentencePiece: GGUF export supports those two"
        )
    add_special(w, tok, folder, vocab_size)
    return pre


def _pre_tokenizer(tok: Any, tj: dict, source_gguf: str | None) -> str:
    """The llama.cpp pre-tokenizer that splits text like ``tok`` does.

    A model converted from a GGUF keeps its source's value; otherwise the hash of the tokenization of
    ``CHECK_TEXT`` (``convert_hf_to_gguf.py``), then the structure of tokenizer.json's pre-tokenizer.
    """
    if source_gguf:
        reader = gguf.GGUFReader(source_gguf)
        field = reader.fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    digest = sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest in _PRE_HASHES:
        return _PRE_HASHES[digest]
    if tj.get("normalizer") is None:
        steps = tj.get("pre_tokenizer") or {}
        steps = steps.get("pretokenizers", [steps]) if steps.get("type") == "Sequence" else [steps]
        kinds = [s.get("type") for s in steps]
        if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
            return "gpt-2"
        if (
            kinds == ["Digits", "ByteLevel"]
            and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True)
            and not steps[1].get("add_prefix_space")
        ):
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            regex = steps[0].get("pattern", {}).get("Regex")
            if regex == _LLAMA3_REGEX:
                return "llama-bpe"
            if regex == _QWEN2_REGEX:
                return "qwen2"
    raise LLMOptError(
        "the byte-level BPE pre-tokenizer of this model is not recognised (supported: gpt-2, smollm, "
        "llama-bpe, qwen2); llama.cpp would split text differently than the HF tokenizer"
    )


def _looks_special(token: str) -> bool:
    """``convert_hf_to_gguf.py`` ``does_token_look_special``."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _add_bpe_vocab(w: gguf.GGUFWriter, tok: Any, tj: dict, vocab_size: int, pre: str) -> None:
    """Byte-level BPE vocabulary (``get_vocab_base``): tokens, types and merges."""
    vocab = tok.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise LLMOptError(f"tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        t = reverse[i]
        if t in added:
            special = decoder[i].special if i in decoder else False
            types.append(gguf.TokenType.CONTROL if special or _looks_special(t) else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(t)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)


def _add_spm_vocab(w: gguf.GGUFWriter, tok: Any, tj: dict, folder: Path, vocab_size: int) -> None:
    """SentencePiece vocabulary (Llama 1/2, Mistral, Gemma): tokens, scores, types (``tokenizer.ggml.model``
    llama). With a ``tokenizer.model``, gguf-py's ``SentencePieceVocab`` reads the model's own scores.
    With only a byte-fallback BPE tokenizer.json, each merged token scores −(rank of its first merge):
    llama.cpp's SPM tokenizer merges the pair whose result scores highest, which is then HF's lowest-rank
    merge (gguf-py's ``LlamaHfVocab`` gives every token −1000, which makes llama.cpp split text
    differently). Tokenizers llmopt built from a GGUF (:mod:`llmopt.models.gguf_spm`) rank their merges by
    the file's scores, so the exported file tokenizes like the one they came from. Special added tokens
    are CONTROL, the unknown token UNKNOWN, other added tokens USER_DEFINED (cut out of the raw text)."""
    if (folder / "tokenizer.model").is_file():
        from gguf.vocab import SentencePieceVocab

        try:
            tokens, scores, types = map(list, zip(*SentencePieceVocab(folder).all_tokens()))
        except Exception as e:  # gguf-py / sentencepiece raise various errors on odd files
            raise LLMOptError(f"could not read the SentencePiece model in {folder}: {e}") from e
    else:
        vocab, added = tok.get_vocab(), tok.get_added_vocab()
        special_ids = set(tok.all_special_ids) | {i for i, a in tok.added_tokens_decoder.items() if a.special}
        rank = {}
        for r, m in enumerate(tj["model"].get("merges", [])):
            rank.setdefault("".join(m.split(" ", 1) if isinstance(m, str) else m), r)
        reverse = {i: t for t, i in vocab.items()}
        tokens, scores, types = [], [], []
        for i in range(min(vocab_size, max(vocab.values()) + 1)):
            t = reverse.get(i, f"[PAD{i}]")
            if i not in reverse:
                ttype = gguf.TokenType.UNUSED
            elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                ttype = gguf.TokenType.BYTE
            elif i == tok.unk_token_id:
                ttype = gguf.TokenType.UNKNOWN
            elif i in special_ids or (t in added and _looks_special(t)):
                ttype = gguf.TokenType.CONTROL
            elif t in added:
                ttype = gguf.TokenType.USER_DEFINED
            else:
                ttype = gguf.TokenType.NORMAL
            tokens.append(t.encode())
            scores.append(-float(rank[t]) if t in rank else 0.0 if ttype == gguf.TokenType.NORMAL else -1000.0)
            types.append(ttype)
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    first = tok.convert_ids_to_tokens(tok("a", add_special_tokens=False)["input_ids"][:1])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_add_space_prefix(bool(first) and first[0].startswith("▁"))  # llama.cpp prepends "▁" if set
    w.add_token_list(tokens[:vocab_size])
    w.add_token_scores(scores[:vocab_size])
    w.add_token_types(types[:vocab_size])


def add_special(w: gguf.GGUFWriter, tok: Any, folder: Path, vocab_size: int) -> None:
    """Special token ids, add-BOS/EOS flags and chat template, read by gguf-py's ``SpecialVocab`` from the
    folder's ``tokenizer.json`` / ``tokenizer_config.json`` / ``config.json`` (as ``convert_hf_to_gguf.py``).

    The add-BOS/EOS flags are then checked against what the HF tokenizer really does on a probe text;
    where the files say nothing or disagree, the tokenizer's behaviour wins (so llama.cpp adds exactly
    the tokens transformers adds) and a disagreement is logged.
    """
    sv = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    ids = sv.special_token_ids
    for kind, tid in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unk", tok.unk_token_id)):
        if kind not in ids and tid is not None and tid < vocab_size:  # e.g. a tokenizer built in memory
            ids[kind] = int(tid)
    with_special = tok("a b", add_special_tokens=True)["input_ids"]
    plain = tok("a b", add_special_tokens=False)["input_ids"]
    measured = {
        "bos": ids.get("bos") is not None and with_special[:1] == [ids["bos"]] and plain[:1] != [ids["bos"]],
        "eos": ids.get("eos") is not None and with_special[-1:] == [ids["eos"]] and plain[-1:] != [ids["eos"]],
    }
    for kind, does in measured.items():
        said = sv.add_special_token.get(kind)
        if said is not None and bool(said) != does:
            log.warning("the tokenizer files say add_%s_token=%s but the HF tokenizer %s it; writing %s",
                        kind, said, "adds" if does else "does not add", does)  # fmt: skip
        sv.add_special_token[kind] = does
    if sv.chat_template is None and getattr(tok, "chat_template", None):
        sv.chat_template = tok.chat_template
    sv.add_to_gguf(w, quiet=True)
