"""llama.cpp's extra buffer types (AMX / repacked weights): the crash probe and the fallback without them."""

from __future__ import annotations

import logging

import pytest
import torch

from llmopt.backends import llamacpp_probe as probe

pytestmark = pytest.mark.llamacpp
pytest.importorskip("llama_cpp")

CRASH = "import ctypes; ctypes.string_at(0)"  # what a segfaulting AMX matmul does to the child


@pytest.fixture(scope="module")
def tiny_q4_0(tiny_model_dir, tmp_path_factory):
    from llmopt.exporters import export_gguf

    out = tmp_path_factory.mktemp("probe") / "tiny-q4_0.gguf"
    export_gguf(str(tiny_model_dir), str(out), type="q4_0")
    return out


def test_a_crashing_probe_means_no_extra_buffers_and_one_warning(tiny_q4_0, monkeypatch, caplog):
    monkeypatch.delenv(probe.ENV, raising=False)
    monkeypatch.setattr(probe, "amx_compiled", lambda: True)
    monkeypatch.setattr(probe, "_verdicts", {})
    with caplog.at_level(logging.WARNING, logger=probe.__name__):
        assert probe.extra_buffers_work(tiny_q4_0, probe=CRASH) is False
        assert probe.extra_buffers_work(tiny_q4_0, probe=CRASH) is False  # cached: probed once
    warnings = [r for r in caplog.records if "AMX kernels crash" in r.getMessage()]
    assert len(warnings) == 1 and "CMAKE_ARGS" in warnings[0].getMessage()
    # a child that exits cleanly means the extra buffer types stay on
    monkeypatch.setattr(probe, "_verdicts", {})
    assert probe.extra_buffers_work(tiny_q4_0, probe="pass") is True


def test_env_forces_the_choice_without_probing(tiny_q4_0, monkeypatch):
    monkeypatch.setattr(probe, "amx_compiled", lambda: pytest.fail("probed although forced"))
    monkeypatch.setenv(probe.ENV, "0")
    assert probe.extra_buffers_work(tiny_q4_0) is False
    monkeypatch.setenv(probe.ENV, "1")
    assert probe.extra_buffers_work(tiny_q4_0) is True


def test_without_extra_buffers_llama_cpp_gives_the_same_logits(tiny_q4_0, monkeypatch):
    from llmopt.backends.llamacpp_backend import LlamaCppBackend

    ids = torch.arange(3, 35)
    monkeypatch.delenv(probe.ENV, raising=False)
    if not probe.extra_buffers_work(tiny_q4_0):  # forcing them on here would crash the test process
        pytest.skip("llama.cpp's extra buffer types crash on this machine: nothing to compare against")
    be = LlamaCppBackend(tiny_q4_0, threads=1)
    assert be.extra_buffers and be.llm.model_params.use_extra_bufts
    ref = be.logits(ids)
    be.close()
    monkeypatch.setenv(probe.ENV, "0")
    be = LlamaCppBackend(tiny_q4_0, threads=1)
    assert not be.extra_buffers and not be.llm.model_params.use_extra_bufts
    got = be.logits(ids)
    assert be.time_generation(ids, 2).new_tokens == 2
    be.close()
    import llama_cpp.llama_cpp as lib

    assert lib.llama_model_default_params().use_extra_bufts  # the patch ends with the constructor
    # repacked q4_0 kernels may sum in another order: equal within float32 accumulation error
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_every_decoding_llama_is_opened_through_the_probe():
    """A ``llama_cpp.Llama`` opened directly would decode with the extra buffer types and kill the process
    where AMX crashes (CI's machine): only the probe module constructs one, or a vocabulary-only one."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("llmopt", "tests", "eval", "scripts"):
        for f in sorted((root / folder).rglob("*.py")):
            if f.name == "llamacpp_probe.py":
                continue
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if re.search(r"\bLlama\(", line) and "vocab_only=True" not in line and "def " not in line:
                    offenders.append(f"{f.relative_to(root)}:{n}: {line.strip()}")
    assert not offenders, "open these with llmopt.backends.llamacpp_probe.open_llama:\n" + "\n".join(offenders)
