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
    assert probe.buffer_mode(tiny_q4_0) == "extra"
    monkeypatch.setenv(probe.ENV, "0")
    assert probe.buffer_mode(tiny_q4_0) == "plain"
    monkeypatch.setenv(probe.ENV, "repack")
    assert probe.buffer_mode(tiny_q4_0) == "repack"


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


def test_repack_takes_the_q4_0_layer_matrices_only(tiny_q4_0):
    """The override names exactly the Q4_0 decoder-layer matrices with rows in multiples of 8: never the
    token embedding (read by row lookup) or a type the repack does not take."""
    from gguf import GGUFReader

    from llmopt.backends.llamacpp_repack import repackable_tensors

    names = repackable_tensors(tiny_q4_0)
    types = {t.name: (t.tensor_type.name, [int(d) for d in t.shape]) for t in GGUFReader(str(tiny_q4_0)).tensors}
    want = sorted(
        n
        for n, (ty, shape) in types.items()
        if ty == "Q4_0" and n.startswith("blk.") and len(shape) == 2 and shape[1] % 8 == 0
    )
    assert sorted(names) == want and want  # the tiny export has Q4_0 layer matrices
    assert "token_embd.weight" not in names and all(types[n][0] == "Q4_0" for n in names)


REPACK_CHILD = """
import sys
from llmopt.backends.llamacpp_probe import open_with
llm = open_with(sys.argv[2], sys.argv[1], n_ctx=64, n_batch=64, n_threads=1, verbose=True)
llm.eval([3, 4, 5])
"""


def test_repack_mode_puts_the_weights_in_the_repack_buffer_and_keeps_the_logits(tiny_q4_0, monkeypatch):
    """``repack``: llama.cpp reports a CPU_REPACK buffer (``plain`` none, with the extra buffer types off),
    and the logits equal the plain layout's within float32 accumulation error."""
    import subprocess
    import sys

    from llmopt.backends.llamacpp_backend import LlamaCppBackend
    from llmopt.backends.llamacpp_repack import repack_buffer_type

    if repack_buffer_type() is None:
        pytest.skip("this llama.cpp build has no CPU_REPACK buffer type")
    monkeypatch.setattr(probe, "_verdicts", {})
    if not probe.repack_works(tiny_q4_0):  # its own child crashed: nothing to compare in this process
        pytest.skip("llama.cpp's repacked weights crash on this machine")
    logs = {}
    for mode in ("repack", "plain"):
        r = subprocess.run([sys.executable, "-c", REPACK_CHILD, str(tiny_q4_0), mode], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        logs[mode] = r.stderr
    assert "CPU_REPACK model buffer size" in logs["repack"]
    assert "CPU_REPACK" not in logs["plain"] and "AMX model buffer size" not in logs["repack"]
    ids = torch.arange(3, 35)
    out = {}
    for mode in ("repack", "0"):
        monkeypatch.setenv(probe.ENV, mode)
        be = LlamaCppBackend(tiny_q4_0, threads=1)
        assert be.buffers == ("repack" if mode == "repack" else "plain") and not be.extra_buffers
        out[mode] = be.logits(ids)
        be.close()
    ref = out["0"]
    assert (out["repack"] - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_a_crashing_repack_probe_leaves_the_weights_plain(tiny_q4_0, monkeypatch):
    monkeypatch.delenv(probe.ENV, raising=False)
    monkeypatch.setattr(probe, "_verdicts", {})
    monkeypatch.setattr(probe, "extra_buffers_work", lambda path: False)
    monkeypatch.setattr(probe, "PROBE_REPACK", CRASH)
    assert probe.buffer_mode(tiny_q4_0) == "plain"
    assert probe.repack_works(tiny_q4_0) is False
