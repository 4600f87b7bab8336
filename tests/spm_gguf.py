"""Tiny GGUFs with SentencePiece vocabularies (``tokenizer.ggml.model`` = llama), written with gguf-py.

Two layouts, as ``convert_hf_to_gguf.py`` writes them for real models:

``llama2``
    ``<unk>`` (UNKNOWN), ``<s>``, ``</s>`` (CONTROL), the 256 byte tokens ``<0x00>``..``<0xFF>``,
    whitespace runs ``▁▁``..``▁``×16 all scoring -1e9 (Llama 2's ties), then the pieces; no
    ``add_space_prefix`` key (llama.cpp's default, true), add BOS.
``gemma``
    ``<pad>``, ``<eos>``, ``<bos>`` (CONTROL), ``<unk>``, ``<mask>``, ``<unused0>``, ``<start_of_turn>``,
    ``<end_of_turn>``, USER_DEFINED tokens cut out of the raw text (``\\n\\n``, runs of 2..8 literal spaces,
    ``<h1>``), the byte tokens, then the pieces; ``add_space_prefix`` false, add BOS.

The pieces are a few hundred BPE merges learnt on pseudo-English with ``▁`` word prefixes, scored like
SentencePiece BPE (-rank, single characters below every merge), with a few non-ASCII ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from tests.conftest import synthetic_text

SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = (
    gguf.TokenType.NORMAL,
    gguf.TokenType.UNKNOWN,
    gguf.TokenType.CONTROL,
    gguf.TokenType.USER_DEFINED,
    gguf.TokenType.BYTE,
)
UNICODE_LINES = ["café naïve über straße", "東京 大阪 東京タワー", "ünïcödé çà et là", "café über 東京"]


@dataclass
class SpmVocab:
    tokens: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    flags: dict = field(default_factory=dict)  # add_space_prefix / add_bos / add_eos / *_token_id

    def add(self, token: str, score: float, ttype: int) -> None:
        if token not in self.tokens:
            self.tokens.append(token)
            self.scores.append(float(score))
            self.types.append(int(ttype))


def _pieces(n_merges: int = 360) -> list[str]:
    """Merged pieces, most frequent first, learnt with `tokenizers`' BPE trainer on ``▁``-prefixed words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    text = synthetic_text(6000, seed=1).splitlines() + UNICODE_LINES * 20
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=10_000, limit_alphabet=200, show_progress=False))
    merges = json.loads(tk.to_str())["model"]["merges"][:n_merges]
    alphabet = sorted({c for line in text for c in line.replace(" ", SPACE)})
    return ["".join(m.split(" ", 1) if isinstance(m, str) else m) for m in merges] + alphabet


def spm_vocab(style: str) -> SpmVocab:
    v = SpmVocab()
    if style == "llama2":
        v.add("<unk>", 0, UNKNOWN)
        v.add("<s>", 0, CONTROL)
        v.add("</s>", 0, CONTROL)
        v.flags = {"add_bos": True, "add_eos": False, "bos": 1, "eos": 2, "unk": 0}
    elif style == "gemma":
        for t in ("<pad>", "<eos>", "<bos>"):
            v.add(t, 0, CONTROL)
        v.add("<unk>", 0, UNKNOWN)
        for t in ("<mask>", "<unused0>", "<start_of_turn>", "<end_of_turn>"):
            v.add(t, 0, CONTROL)
        for t in ["\n\n"] + [" " * n for n in range(2, 9)] + ["<h1>"]:
            v.add(t, 0, USER_DEFINED)
        v.flags = {"add_bos": True, "add_eos": False, "bos": 2, "eos": 1, "unk": 3, "pad": 0, "space_prefix": False}
    else:
        raise ValueError(style)
    for b in range(256):
        v.add(f"<0x{b:02X}>", 0, BYTE)
    if style == "llama2":
        for n in range(2, 17):
            v.add(SPACE * n, -1e9, NORMAL)
    for rank, piece in enumerate(_pieces()):
        v.add(piece, -rank, NORMAL)
    return v


def _add_vocab(w: gguf.GGUFWriter, v: SpmVocab) -> None:
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(v.tokens)
    w.add_token_scores(v.scores)
    w.add_token_types(v.types)
    w.add_bos_token_id(v.flags["bos"])
    w.add_eos_token_id(v.flags["eos"])
    w.add_unk_token_id(v.flags["unk"])
    if "pad" in v.flags:
        w.add_pad_token_id(v.flags["pad"])
    w.add_add_bos_token(v.flags["add_bos"])
    w.add_add_eos_token(v.flags["add_eos"])
    if "space_prefix" in v.flags:
        w.add_add_space_prefix(v.flags["space_prefix"])


def write_vocab_gguf(path: Path, v: SpmVocab, name: str = "tiny-spm") -> Path:
    """A vocabulary-only GGUF (llama hparams, no tensors): what llama.cpp's ``vocab_only`` reads."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(name)
    for key, value in (("block_count", 1), ("context_length", 512), ("embedding_length", 64)):
        w.add_uint32(f"llama.{key}", value)
    w.add_uint32("llama.feed_forward_length", 128)
    w.add_uint32("llama.attention.head_count", 4)
    _add_vocab(w, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def with_vocab(src: Path, dst: Path, v: SpmVocab) -> Path:
    """``src`` (an F32 GGUF) with its tokenizer metadata replaced by ``v``: a model GGUF whose vocabulary
    is exactly the hand-made one (its ties and flags), as a real converted file would carry it."""
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for key, f in r.fields.items():
        if key.startswith(("GGUF.", "tokenizer.")) or key == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    _add_vocab(w, v)
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
        w.add_tensor(t.name, np.array(t.data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
