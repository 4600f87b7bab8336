"""Calibration activations spilled to memory-mapped files (:mod:`llmopt.calibration.spill`): the same output
bit for bit as holding them in memory, nothing left on disk, and chosen automatically only when they would
take more than half of the available memory."""

from __future__ import annotations

import logging

import pytest
import torch

from llmopt import memory
from llmopt.calibration.spill import ActivationStore
from llmopt.compression import compress
from llmopt.errors import LLMOptError
from tests.conftest import make_tiny_tokenizer
from tests.test_streaming import codes, random_llama, weights

GPTAQ_HEAD = {"stages": [{"stage": "gptq", "format": "q4_0", "asymmetric": True, "head": "q8_0"}]}


def assert_same_tensors(a, b) -> None:
    for load in (weights, codes):
        ta, tb = load(a), load(b)
        assert sorted(ta) == sorted(tb)
        assert all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def tokenizer(tiny_text_file):
    return make_tiny_tokenizer(tiny_text_file.read_text())


@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "streamed"])
def test_spilled_run_equals_held_in_memory(tokenizer, tiny_text_file, tmp_path, monkeypatch, low_memory):
    """GPTQ q4_0 with GPTAQ's second stream and the output head, in memory and streamed: the run whose hidden
    states live in memory-mapped files stores the same weights, codes and scales; the spill folder is empty
    after it (the files were unlinked once mapped) and the report says how much was spilled."""
    model = random_llama(tmp_path / "model", tokenizer, layers=2)
    calib = dict(calib=f"text:{tiny_text_file}", calib_samples=4, calib_seq_len=64, low_memory=low_memory)
    spill = tmp_path / "spill"
    monkeypatch.setenv("LLMOPT_SPILL_DIR", str(spill))
    monkeypatch.setenv("LLMOPT_SPILL", "never")
    a = compress(str(model), GPTAQ_HEAD, tmp_path / "held", **calib)
    monkeypatch.setenv("LLMOPT_SPILL", "always")
    b = compress(str(model), GPTAQ_HEAD, tmp_path / "spilled", **calib)
    assert_same_tensors(tmp_path / "held", tmp_path / "spilled")
    assert codes(tmp_path / "spilled")  # quantized: the comparison covered codes and scales
    assert "activations_spilled_mib" not in a.report
    # 4 windows x 64 tokens x 64 wide x 4 bytes, twice (GPTAQ's stream): 0.125 MiB
    assert b.report["activations_spilled_mib"] == pytest.approx(2 * 4 * 64 * 64 * 4 / 2**20, abs=0.05)
    assert spill.is_dir() and list(spill.iterdir()) == []


def test_store_holds_file_backed_copies(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPT_SPILL_DIR", str(tmp_path))
    store = ActivationStore(windows=2, mode="always")
    t = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    held = store.hold(t)
    assert held is not t and torch.equal(held, t) and held.dtype == t.dtype
    name = held.untyped_storage().filename
    assert name is not None and name.startswith(str(tmp_path))  # backed by a file mapping ...
    assert list(tmp_path.iterdir()) == []  # ... whose file is already gone
    held.copy_(torch.zeros_like(t))  # written in place, as each layer overwrites its inputs
    assert held.abs().sum() == 0 and t.abs().sum() > 0
    second = store.copy(t)
    assert second.untyped_storage().filename is not None and torch.equal(second, t)
    assert store.bytes_held == 2 * t.nbytes
    kept = ActivationStore(windows=2, mode="never")
    assert kept.hold(t) is t and kept.copy(t) is not t and torch.equal(kept.copy(t), t)


def test_chosen_when_more_than_half_the_memory(monkeypatch, caplog, tmp_path):
    """Auto: 2 copies of 1000 windows of this batch's size (1000 x 64 x 256 x 4 bytes x 2 = 125 MiB) spill
    when 200 MiB are available, not when 300 are; GPU tensors never spill."""
    monkeypatch.setenv("LLMOPT_SPILL_DIR", str(tmp_path))
    monkeypatch.delenv("LLMOPT_SPILL", raising=False)
    t = torch.zeros(4, 64, 256)
    caplog.set_level(logging.WARNING, logger="llmopt.calibration.spill")
    monkeypatch.setattr(memory, "available_mib", lambda: 300.0)
    store = ActivationStore(windows=1000, copies=2)
    assert store.hold(t) is t and store.spilled is False and caplog.text == ""
    monkeypatch.setattr(memory, "available_mib", lambda: 200.0)
    store = ActivationStore(windows=1000, copies=2)
    assert store.hold(t) is not t and store.spilled is True
    assert "need 0.12 GiB, more than 50% of the 0.20 GiB available" in caplog.text
    assert str(tmp_path) in caplog.text
    monkeypatch.setattr(memory, "available_mib", lambda: None)  # unknown (off Linux): kept in memory
    assert ActivationStore(windows=1000, copies=2).hold(t) is t


def test_bad_mode_is_one_line(monkeypatch):
    monkeypatch.setenv("LLMOPT_SPILL", "sometimes")
    with pytest.raises(LLMOptError, match="LLMOPT_SPILL='sometimes' is not one of auto, always, never"):
        ActivationStore(windows=1)
