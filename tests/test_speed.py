"""Honest speed: same-shape warm-up, median of repeats with min/max, physical-core threads everywhere,
KV-cache decode, dtype reported. No wall-clock thresholds: fakes record what was timed."""

from __future__ import annotations

import pytest
import torch

from llmopt.backends import Backend, SpeedResult, default_threads, make_backend
from llmopt.backends.torch_backend import TorchBackend
from llmopt.errors import LLMOptError
from llmopt.metrics import measure_speed


class FakeBackend(Backend):
    """Records every time_generation call and returns scripted throughputs (warm-up first)."""

    name = "fake"

    def __init__(self, prefill: list[float], decode: list[float]):
        self.prefill, self.decode = list(prefill), list(decode)
        self.calls: list[tuple[int, int]] = []

    @property
    def vocab_size(self) -> int:
        return 10

    @property
    def threads(self) -> int:
        return 7

    @property
    def dtype(self) -> str:
        return "fake8"

    def logits(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - not used
        return torch.zeros(ids.numel(), 10)

    def time_generation(self, prompt: torch.Tensor, new_tokens: int) -> SpeedResult:
        i = len(self.calls)
        self.calls.append((int(prompt.numel()), new_tokens))
        return SpeedResult(self.prefill[i], self.decode[i], int(prompt.numel()), new_tokens, self.threads)


@pytest.fixture
def restore_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_warmup_has_the_timed_shape_and_median_is_reported():
    # the warm-up (first call) is an outlier that must not count; timed runs 30, 10, 20 → median 20
    be = FakeBackend(prefill=[1.0, 30.0, 10.0, 20.0], decode=[999.0, 3.0, 5.0, 4.0])
    s = measure_speed(be, torch.arange(512), new_tokens=128, repeats=3)
    assert be.calls == [(512, 128)] * 4  # warm-up + 3 timed runs, all 512-token prompts and 128 new tokens
    assert (s.prefill_tok_s, s.prefill_tok_s_min, s.prefill_tok_s_max) == (20.0, 10.0, 30.0)
    assert (s.decode_tok_s, s.decode_tok_s_min, s.decode_tok_s_max) == (4.0, 3.0, 5.0)
    assert (s.repeats, s.threads, s.prompt_tokens, s.new_tokens, s.dtype) == (3, 7, 512, 128, "fake8")


def test_median_of_even_repeats_and_single_run():
    be = FakeBackend(prefill=[0.0, 1.0, 2.0, 4.0, 8.0], decode=[0.0, 1.0, 1.0, 1.0, 3.0])
    s = measure_speed(be, torch.arange(16), new_tokens=4, repeats=4)
    assert s.prefill_tok_s == 3.0 and s.decode_tok_s == 1.0 and s.repeats == 4 and len(be.calls) == 5
    one = measure_speed(FakeBackend([9.0, 5.0], [9.0, 2.0]), torch.arange(16), new_tokens=4, repeats=1)
    assert (one.prefill_tok_s, one.prefill_tok_s_min, one.prefill_tok_s_max) == (5.0, 5.0, 5.0)
    assert (one.decode_tok_s, one.decode_tok_s_min, one.decode_tok_s_max) == (2.0, 2.0, 2.0)


@pytest.mark.parametrize("repeats", [0, -1])
def test_repeats_below_one_is_an_error(repeats):
    be = FakeBackend([1.0], [1.0])
    with pytest.raises(LLMOptError, match="--repeats"):
        measure_speed(be, torch.arange(8), new_tokens=2, repeats=repeats)
    assert be.calls == []


def test_single_run_result_fills_min_max():
    s = SpeedResult(10.0, 2.0, 8, 4, 1)
    assert (s.prefill_tok_s_min, s.prefill_tok_s_max, s.decode_tok_s_min, s.decode_tok_s_max) == (10, 10, 2, 2)
    assert s.repeats == 1


def test_default_threads_is_physical_cores(monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 16 if logical else 3)
    assert default_threads() == 3
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 16 if logical else None)
    monkeypatch.setattr("os.cpu_count", lambda: 5)
    assert default_threads() == 5


def test_torch_backend_defaults_to_physical_cores(monkeypatch, tiny_model_dir, restore_torch_threads):
    import psutil
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8 if logical else 3)
    be = TorchBackend(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "tiny")
    assert be.threads == 3 == torch.get_num_threads()
    assert be.time_generation(torch.arange(8), 2).threads == 3
    TorchBackend(be.model, "tiny", threads=1)
    assert torch.get_num_threads() == 1


@pytest.mark.llamacpp
def test_llamacpp_backend_defaults_to_physical_cores(monkeypatch):
    pytest.importorskip("llama_cpp")
    import psutil

    from llmopt.backends.llamacpp_backend import LlamaCppBackend

    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8 if logical else 3)
    be = make_backend("gguf", "bundled:smollm2")
    try:
        assert isinstance(be, LlamaCppBackend) and be.threads == 3 and be.llm.n_threads == 3
        assert be.dtype == "gguf Q4_1"  # the bundled file's general.file_type
        s = measure_speed(be, torch.arange(16) + 100, new_tokens=2, repeats=2)
        assert s.threads == 3 and s.dtype == "gguf Q4_1" and s.repeats == 2
        assert s.prefill_tok_s_min <= s.prefill_tok_s <= s.prefill_tok_s_max
    finally:
        be.close()


@pytest.mark.parametrize("threads", [0, -2])
def test_threads_below_one_is_an_error(threads):
    for kind in ("torch", "gguf"):
        with pytest.raises(LLMOptError, match="--threads"):
            make_backend(kind, "bundled:smollm2", threads=threads)  # fails before loading anything


def test_cli_rejects_bad_threads_and_repeats(tiny_model_dir, tiny_text_file, capsys):
    from llmopt.cli import main

    base = ["eval", str(tiny_model_dir), "--data", f"text:{tiny_text_file}", "--seq-len", "32", "-q"]
    for extra, flag in ((["--threads", "0"], "--threads"), (["--speed", "--repeats", "0"], "--repeats")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and flag in err and "\n" not in err


def test_torch_speed_reports_dtype(tiny_model_dir, restore_torch_threads):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    s = measure_speed(TorchBackend(model, "tiny", threads=1), torch.arange(12), new_tokens=3, repeats=2)
    assert s.dtype == "float32" and s.repeats == 2 and s.threads == 1
    assert s.prefill_tok_s_min <= s.prefill_tok_s <= s.prefill_tok_s_max
    bf16 = TorchBackend(model.to(torch.bfloat16), "tiny", threads=1)
    assert bf16.dtype == "bfloat16" and bf16.time_generation(torch.arange(12), 2).dtype == "bfloat16"


def test_torch_decode_uses_the_kv_cache(tiny_model_dir, restore_torch_threads):
    """Prefill is one forward over the whole prompt; each decode step feeds one token plus the cache."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    seen: list[tuple[int, bool]] = []
    forward = model.forward

    def recording_forward(*args, **kw):
        seen.append((kw["input_ids"].shape[1], kw.get("past_key_values") is not None))
        return forward(*args, **kw)

    model.forward = recording_forward
    TorchBackend(model, "tiny", threads=1).time_generation(torch.arange(20), 5)
    assert seen == [(20, False)] + [(1, True)] * 5


def test_evaluate_runs_base_with_the_same_threads(monkeypatch, tiny_model_dir, tiny_text_file, restore_torch_threads):
    import llmopt.evaluation as ev

    asked: list[tuple[str, int | None]] = []
    real = ev.make_backend

    def recording(kind, spec, *, threads=None, **kw):
        asked.append((spec, threads))
        return real(kind, spec, threads=threads, **kw)

    monkeypatch.setattr(ev, "make_backend", recording)
    d = str(tiny_model_dir)
    ev.evaluate(d, data=f"text:{tiny_text_file}", seq_len=32, max_windows=1, base=d, progress=False)
    n = torch.get_num_threads()
    assert asked == [(d, None), (d, n)]  # None → the backend's default; the base gets the same count
    asked.clear()
    ev.evaluate(d, data=f"text:{tiny_text_file}", seq_len=32, max_windows=1, base=d, threads=1, progress=False)
    assert asked == [(d, 1), (d, 1)]
