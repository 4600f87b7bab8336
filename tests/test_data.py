"""Data specs and GPTQ-style calibration sampling."""

import pytest
import torch

from llmopt.data import calibration_windows, load_text, parse_data_spec, sample_from_model
from llmopt.errors import LLMOptError


def test_parse_specs():
    assert parse_data_spec("wikitext2").kind == "wikitext2"
    assert parse_data_spec("c4").kind == "c4"
    s = parse_data_spec("text:/a/b.txt#0.5:1")
    assert (s.kind, s.path, s.fraction) == ("text", "/a/b.txt", (0.5, 1.0))
    s = parse_data_spec("hf:org/ds:cfg:validation:content")
    assert (s.path, s.config, s.split, s.column) == ("org/ds", "cfg", "validation", "content")
    s = parse_data_spec("hf:org/ds:test")
    assert (s.path, s.config, s.split, s.column) == ("org/ds", None, "test", "text")
    assert parse_data_spec("self:16").n_samples == 16
    for bad in ("nope", "self:0", "text:", "text:x#0.5:0.2", "hf:a"):
        with pytest.raises(LLMOptError):
            parse_data_spec(bad)


def test_text_fractions_are_disjoint_and_cover(tiny_text_file):
    full = load_text(f"text:{tiny_text_file}")
    a = load_text(f"text:{tiny_text_file}#0:0.5")
    b = load_text(f"text:{tiny_text_file}#0.5:1")
    assert a + b == full and a.endswith("\n") and 0.4 < len(a) / len(full) < 0.6


def test_missing_text_file():
    with pytest.raises(LLMOptError, match="text file not found"):
        load_text("text:/no/such/file.txt")


def test_hub_dataset_offline_suggests_local_specs(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(LLMOptError) as e:
        load_text("wikitext2")
    msg = str(e.value)
    assert "text:PATH" in msg and "self:N" in msg and "\n" not in msg


def test_calibration_windows_seeded(tiny_model_dir, tiny_text_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = f"text:{tiny_text_file}"
    a = calibration_windows(spec, tok, 6, 64, seed=3)
    b = calibration_windows(spec, tok, 6, 64, seed=3)
    c = calibration_windows(spec, tok, 6, 64, seed=4)
    assert a.shape == (6, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every window is a contiguous slice of the tokenized text
    ids = tok(tiny_text_file.read_text(), add_special_tokens=False)["input_ids"]
    s = ",".join(map(str, ids))
    assert ",".join(map(str, a[0].tolist())) in s


def test_self_sampling_shapes(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    x = sample_from_model(model, tok, 3, 16, seed=0, batch_size=2)
    y = sample_from_model(model, tok, 3, 16, seed=0, batch_size=2)
    assert x.shape == (3, 16) and torch.equal(x, y)
    assert (x[:, 0] == tok.bos_token_id).all() and x.max() < len(tok)
