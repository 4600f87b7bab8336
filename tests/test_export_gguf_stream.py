"""``llmopt export --to gguf --low-memory``: the GGUF written tensor by tensor from the safetensors shards
(:mod:`llmopt.exporters.gguf.stream`) is the in-memory export byte for byte, for stored codes (``--type auto``),
plain floats and llama.cpp's own quantizer, tied and untied, without ever loading the model whole."""

from __future__ import annotations

import pytest

import llmopt.models
from llmopt import memory
from llmopt.compression import compress
from llmopt.errors import LLMOptError
from llmopt.exporters import export_gguf
from tests.conftest import make_tiny_tokenizer
from tests.test_streaming import random_llama


@pytest.fixture(scope="module")
def tokenizer(tiny_text_file):
    return make_tiny_tokenizer(tiny_text_file.read_text())


def no_whole_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the streamed export loaded the whole model")

    monkeypatch.setattr(llmopt.models, "load_model", refuse)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_streamed_gguf_is_byte_identical(tokenizer, tiny_text_file, tmp_path, monkeypatch, tied):
    model = random_llama(tmp_path / "model", tokenizer, hidden=64, layers=2, tied=tied)
    calib = dict(calib=f"text:{tiny_text_file}", calib_samples=4, calib_seq_len=64)
    out = tmp_path / "q"
    compress(str(model), {"stages": [{"stage": "gptq", "format": "q4_0", "head": "q8_0"}]}, out, **calib)
    cases = [(out, "auto"), (model, "f16"), (model, "q8_0")]
    for src, kind in cases:  # the in-memory files first, then the streamed ones with the whole load refused
        export_gguf(str(src), str(tmp_path / f"{src.name}-{kind}-mem.gguf"), type=kind, low_memory=False)
    with monkeypatch.context() as m:
        no_whole_load(m)
        for src, kind in cases:
            r = export_gguf(str(src), str(tmp_path / f"{src.name}-{kind}-str.gguf"), type=kind, low_memory=True)
            assert r["low_memory"] is True
    for src, kind in cases:
        a = (tmp_path / f"{src.name}-{kind}-mem.gguf").read_bytes()
        b = (tmp_path / f"{src.name}-{kind}-str.gguf").read_bytes()
        assert a == b, (src.name, kind)


def test_chosen_automatically_when_memory_is_short(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_mib", lambda: 0.1)  # the tiny model's float32 size is ~0.3 MiB
    no_whole_load(monkeypatch)
    r = export_gguf(str(tiny_model_dir), str(tmp_path / "a.gguf"), type="f32")
    assert r["low_memory"] is True


def test_imatrix_from_data_is_refused_streamed(tiny_model_dir, tiny_text_file, tmp_path):
    with pytest.raises(LLMOptError, match="cannot compute an importance matrix from data"):
        data = f"text:{tiny_text_file}"
        export_gguf(str(tiny_model_dir), str(tmp_path / "a.gguf"), type="q4_0", imatrix=data, low_memory=True)
    assert not (tmp_path / "a.gguf").exists()
