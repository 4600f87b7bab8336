"""GGUF files with SentencePiece vocabularies (``tokenizer.ggml.model`` llama: Llama 2, Gemma).

Properties: the tokenizer llmopt builds from such a file gives llama.cpp's token ids (WikiText-like
text, digits, unicode through byte fallback, whitespace runs, control tokens); the folder a GGUF is
converted to, and every output made from it, carries ``tokenizer.json`` and no ``tokenizer.model``;
GGUF in → compress → GGUF out → llama.cpp closes (the exported file's ids are the input file's, KL to
the compressed torch model is tiny, F32 export logits match torch); a folder with an unreadable
tokenizer file is refused, naming the file, before its weights are read. The vocabularies are the
hand-made ones of :mod:`tests.spm_gguf`.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import pytest
import torch

from llmopt.errors import LLMOptError
from llmopt.exporters import export_gguf
from llmopt.exporters.gguf import CHECK_TEXT
from llmopt.models.gguf_spm import spm_merges
from tests.conftest import WIKITEXT, synthetic_text
from tests.spm_gguf import UNICODE_LINES, spm_vocab, with_vocab, write_vocab_gguf

llama_cpp = pytest.importorskip("llama_cpp")

STYLES = ("llama2", "gemma")
LINES = [
    "the city of the river was first in 1990 , and 17 ( 3.5 ) @-@ song",
    "3 33 333 3333 33333 1234567890 0.5 6/8 2004-1990",
    "  leading spaces,\ttabs and\n\nnew lines   trailing  ",
    *UNICODE_LINES,
    "émoji 🚀 ünïcödé 我想 нещо 'll 've 's",
    "<h1>title</h1>\n\n\n  <h1>  x",
]
CONTROL_TEXT = "<start_of_turn>user\n<s>hi</s><unk> <bos>the<eos>\n<end_of_turn>"


def _texts() -> list[str]:
    runs = [f"a{' ' * n}b" for n in range(1, 40)] + [" " * n for n in range(1, 20)] + ["x\n" * 5, "\t\t \n \t"]
    wiki = WIKITEXT.read_text(encoding="utf-8") if WIKITEXT.is_file() else synthetic_text(3000, seed=3)
    step = max(1, len(wiki) // 12)
    return LINES + runs + [CHECK_TEXT] + [wiki[i : i + 2000] for i in range(0, len(wiki), step)][:12]


@pytest.fixture(scope="module", params=STYLES)
def vocab_gguf(request, tmp_path_factory) -> Path:
    return write_vocab_gguf(tmp_path_factory.mktemp("spm") / f"{request.param}.gguf", spm_vocab(request.param))


def _llama_vocab(path: Path):
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def _ids(path: Path, texts: list[str]) -> list[list[int]]:
    llm = _llama_vocab(path)
    try:
        return [llm.tokenize(t.encode(), add_bos=True, special=False) for t in texts]
    finally:
        llm.close()


def test_merges_rank_by_score_then_longer_token_then_longer_left():
    tokens = ["▁", "▁▁", "▁▁▁", "a", "▁a", "▁▁a"]
    scores = [0.0, -1e9, -1e9, 0.0, -1.0, -2.0]
    assert spm_merges(tokens, scores) == [
        ("▁", "a"),  # the best score first
        ("▁▁", "a"),
        ("▁", "▁a"),
        ("▁▁", "▁"),  # equal scores: the longer token, the longer left piece first (the leftmost grows)
        ("▁", "▁▁"),
        ("▁", "▁"),
    ]


def test_ids_equal_llama_cpp(vocab_gguf, tmp_path, monkeypatch):
    from llmopt.models import load_tokenizer

    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / "cache"))
    tok = load_tokenizer(str(vocab_gguf))  # built from the GGUF metadata
    llm = _llama_vocab(vocab_gguf)
    try:
        for text in _texts():
            ref = llm.tokenize(text.encode(), add_bos=False, special=False)
            assert tok(text, add_special_tokens=False)["input_ids"] == ref, repr(text[:60])
            assert tok(text)["input_ids"] == llm.tokenize(text.encode(), add_bos=True, special=False), repr(text[:60])
        parsed = llm.tokenize(CONTROL_TEXT.encode(), add_bos=False, special=True)
        literal = llm.tokenize(CONTROL_TEXT.encode(), add_bos=False, special=False)
        assert tok(CONTROL_TEXT, add_special_tokens=False)["input_ids"] == parsed
        assert tok(CONTROL_TEXT, add_special_tokens=False, split_special_tokens=True)["input_ids"] == literal
    finally:
        llm.close()
    for text in LINES:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # both layouts ask for BOS
    gemma = "gemma" in vocab_gguf.name
    assert tok.convert_ids_to_tokens(tok("a b")["input_ids"])[1:] == (["a", "▁b"] if gemma else ["▁a", "▁b"])


def test_vocabularies_the_bpe_cannot_follow_exactly_are_warned(tmp_path, caplog):
    """A character only inside tokens (llama.cpp may join it, the BPE falls back to its bytes first) and
    flat scores (llama.cpp joins the leftmost pair, which no merge ranking reproduces everywhere)."""
    from llmopt.models.gguf_spm import spm_tokenizer_from_gguf
    from tests.spm_gguf import NORMAL

    v = spm_vocab("llama2")
    v.add("▁жa", -5000, NORMAL)
    with caplog.at_level("WARNING", logger="llmopt.models.gguf_spm"):
        spm_tokenizer_from_gguf(gguf.GGUFReader(write_vocab_gguf(tmp_path / "v.gguf", v)))
    assert (
        "1 characters occur inside tokens" in caplog.text and "ж" in caplog.text and "share a score" not in caplog.text
    )
    caplog.clear()
    v.scores = [0.0 if t != NORMAL else -1000.0 for t in v.types]  # gguf-py's LlamaHfVocab: no scores
    with caplog.at_level("WARNING", logger="llmopt.models.gguf_spm"):
        spm_tokenizer_from_gguf(gguf.GGUFReader(write_vocab_gguf(tmp_path / "flat.gguf", v)))
    assert "share a score" in caplog.text


# --- GGUF in → compress → GGUF out → llama.cpp -------------------------------------------------------


@pytest.mark.llamacpp
@pytest.mark.parametrize(("arch", "style"), [("llama", "llama2"), ("gemma2", "gemma"), ("gemma3", "gemma")])
def test_gguf_compress_export_round_trip(arch, style, tmp_path, monkeypatch):
    from llmopt.backends.llamacpp_backend import LlamaCppBackend
    from llmopt.compression import compress
    from llmopt.evaluation import evaluate
    from llmopt.models import load_model
    from llmopt.models.gguf_spm import spm_tokenizer_from_gguf
    from tests.tiny_archs import save_tiny_model

    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / "cache"))
    v = spm_vocab(style)
    tok = spm_tokenizer_from_gguf(gguf.GGUFReader(write_vocab_gguf(tmp_path / "vocab.gguf", v)))
    save_tiny_model(arch, tmp_path / "hf", tok)
    export_gguf(str(tmp_path / "hf"), str(tmp_path / "f32.gguf"), type="f32")
    src = with_vocab(tmp_path / "f32.gguf", tmp_path / f"{arch}-{style}.gguf", v)  # the hand-made vocabulary
    texts = LINES + [f"a{' ' * n}b" for n in (2, 9, 17, 33)]
    src_ids = _ids(src, texts)

    lm = load_model(str(src))  # converted by transformers, tokenizer rebuilt from the GGUF
    assert (Path(lm.path) / "tokenizer.json").is_file() and not (Path(lm.path) / "tokenizer.model").exists()
    assert [lm.tokenizer(t)["input_ids"] for t in texts] == src_ids

    # the GGUF spec exported at F32: same ids in llama.cpp, logits equal to torch's
    f32 = tmp_path / "out-f32.gguf"
    assert export_gguf(str(src), str(f32), type="f32")["pre_tokenizer"] == "default"
    assert _ids(f32, texts) == src_ids
    ids = torch.tensor(lm.tokenizer(" ".join(LINES * 3))["input_ids"][:128])
    with torch.no_grad():
        ref = lm.model(ids.view(1, -1)).logits[0].float()
    be = LlamaCppBackend(str(f32), threads=2)
    try:
        got = be.logits(ids)
    finally:
        be.close()
    assert (got - ref).abs().max().item() < 0.01 * ref.std().item()  # F16 KV cache
    assert torch.equal(got.argmax(-1), ref.argmax(-1))

    # compressed: a folder with tokenizer.json only, exported from its codes, evaluated in llama.cpp
    folder = tmp_path / "q4"
    compress(str(src), {"stages": [{"stage": "rtn", "format": "q4_0"}]}, folder)
    assert (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").exists()
    out = tmp_path / "q4.gguf"
    export_gguf(str(folder), str(out), type="auto")
    assert _ids(out, texts) == src_ids
    data = tmp_path / "data.txt"
    data.write_text(synthetic_text(3000, seed=5) + "\n".join(LINES))
    res = evaluate(str(out), data=f"text:{data}", seq_len=128, max_windows=3, base=str(folder), progress=False)
    assert res.backend == "gguf" and res.kl is not None
    # llama.cpp's q4_0 matmuls quantize activations to q8_0: KL small but not 0
    assert res.kl.mean < 0.02 and res.kl.top1_agreement > 0.9 and abs(res.kl.ppl_ratio - 1) < 0.02, res.kl


# --- unreadable tokenizer files ------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"GGUF\x03\x00\x00\x00" + bytes(64), b"\x00\x01not a model proto\xff" * 8])
def test_unreadable_tokenizer_model_is_refused_before_loading(content, tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from llmopt import checkpoint
    from llmopt.cli import main
    from llmopt.models import load_model

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "tokenizer.model").write_bytes(content)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the tokenizer files were checked")

    monkeypatch.setattr(checkpoint, "load_causal_lm", no_weights)
    why = "a copy of a GGUF file" if content.startswith(b"GGUF") else "not a SentencePiece model"
    with pytest.raises(LLMOptError) as e:
        load_model(str(folder))
    msg = str(e.value)
    assert "\n" not in msg and str(folder / "tokenizer.model") in msg and why in msg and "delete it" in msg
    out = tmp_path / "x.gguf"
    with pytest.raises(LLMOptError, match=why):
        export_gguf(str(folder), str(out), type="f32")
    assert not out.exists() and not list(tmp_path.glob("*.tmp-*"))
    assert main(["export", str(folder), "--to", "gguf", "--output", str(out)]) == 2
    os.remove(folder / "tokenizer.model")  # without it the folder loads (tokenizer.json is the tokenizer)
    monkeypatch.undo()
    assert load_model(str(folder)).tokenizer("the city")["input_ids"]
