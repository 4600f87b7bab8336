"""Logits in blocks of positions: large vocabularies (Gemma 3: 262,144 tokens, 1 GiB of float32 logits per
1024 positions) are scored without the (L, V) logits of a window ever existing whole.

Properties: a backend's blocks concatenate to its logits (torch: the trunk once and the head per block,
Gemma's soft-capping included, the full forward where lm_head(hidden) is not the model's logits;
llama.cpp: fewer positions per decode for a large vocabulary; ONNX: chunks on the KV cache); perplexity and
KL from misaligned blocks equal the plain whole-window computation; lm-eval requests scored from blocks
equal the whole-sequence log-softmax exactly; the teacher top-k cache stores the same summary in blocks. On
a 262,144-token model, KL at 1024 positions, a harness log-likelihood over a 2040-token context (torch and
GGUF), 2048 ONNX positions and a 1024-position teacher cache fill all stay far below one window's logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from llmopt.backends import base as backend_base
from llmopt.backends.torch_backend import TorchBackend
from llmopt.metrics import score_windows
from tests.tiny_archs import make_tiny_model

BIG_VOCAB = 262_144


class _Blocks(backend_base.Backend):
    """Fixed logits per window (keyed by its first token), served in blocks of ``rows``."""

    name = "fixed"

    def __init__(self, table: dict[int, torch.Tensor], rows: int):
        self.table, self.rows = table, rows

    @property
    def vocab_size(self) -> int:
        return next(iter(self.table.values())).shape[-1]

    @property
    def threads(self) -> int:
        return 1

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[int(ids[0])]

    def logit_blocks(self, ids):
        yield from self.logits(ids).split(self.rows)

    def time_generation(self, prompt, new_tokens):
        raise NotImplementedError


def test_misaligned_blocks_score_like_whole_windows():
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 50, (3, 23), generator=g)
    windows[:, 0] = torch.arange(3)  # distinct keys
    table_p = {i: 3 * torch.randn(23, 50, generator=g) for i in range(3)}
    table_q = {i: 3 * torch.randn(23, 50, generator=g) for i in range(3)}
    whole = score_windows(_Blocks(table_p, 23), windows, base=_Blocks(table_q, 23), progress=False)
    blocks = score_windows(_Blocks(table_p, 7), windows, base=_Blocks(table_q, 5), progress=False)
    assert blocks.tokens == whole.tokens == 3 * 22
    assert blocks.nll == pytest.approx(whole.nll, rel=1e-12)
    assert blocks.window_nll == pytest.approx(whole.window_nll, rel=1e-12)
    for k, v in whole.kl.items():
        assert blocks.kl[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    logp = torch.log_softmax(table_p[1][:-1].double(), -1)
    logq = torch.log_softmax(table_q[1][:-1].double(), -1)
    kl = (logq.exp() * (logq - logp)).sum(-1)  # KL(base ‖ model) per token of window 1
    assert whole.kl["max"] >= float(kl.max()) - 1e-6


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_torch_blocks_are_the_logits(arch, monkeypatch):
    model = make_tiny_model(arch, 300)
    if arch == "gemma2":
        assert model.config.final_logit_softcapping  # applied per block too
    monkeypatch.setattr("llmopt.backends.torch_backend.block_rows", lambda vocab: 7)
    be = TorchBackend(model, threads=1)
    ids = torch.arange(40) * 7 % 300
    blocks = list(be.logit_blocks(ids))
    assert be._blocks_ok and [b.shape for b in blocks[:2]] == [(7, 300)] * 2 and len(blocks) == 6
    full = be.logits(ids)
    assert torch.allclose(torch.cat(blocks), full, atol=1e-5 * float(full.abs().max()))


def test_torch_blocks_fall_back_when_the_head_is_not_the_logits(monkeypatch):
    model = make_tiny_model("llama", 300)
    model.config.final_logit_softcapping = 2.0  # Llama ignores it; lm_head + soft-capping would not match
    monkeypatch.setattr("llmopt.backends.torch_backend.block_rows", lambda vocab: 7)
    be = TorchBackend(model, threads=1)
    ids = torch.arange(20) % 300
    blocks = list(be.logit_blocks(ids))
    assert be._blocks_ok is False
    assert torch.equal(torch.cat(blocks), be.logits(ids))


@pytest.fixture(scope="module")
def big_vocab_folder(tmp_path_factory, tiny_text_file):
    """A 2-layer hidden-64 Llama with a 262,144-token vocabulary (tied embeddings: 64 MiB)."""
    from tests.conftest import make_tiny_llama, make_tiny_tokenizer

    folder = tmp_path_factory.mktemp("big-vocab")
    make_tiny_llama(BIG_VOCAB).save_pretrained(folder, safe_serialization=True)
    make_tiny_tokenizer(tiny_text_file.read_text()).save_pretrained(folder)
    return folder


_KL_262K = """
import json, sys
from llmopt.evaluation import evaluate
from llmopt.memory import peak_rss_mib, reset_peak_rss, rss_mib

folder, data = sys.argv[1], sys.argv[2]
evaluate(folder, data=data, seq_len=16, max_windows=1, progress=False, threads=1)  # warm
if not reset_peak_rss() or rss_mib() is None:
    print(json.dumps(None))
    sys.exit(0)
before = rss_mib()
r = evaluate(folder, data=data, seq_len=1024, max_windows=2, base=folder, progress=False)
print(json.dumps(dict(grew=peak_rss_mib() - before, kl=r.kl.mean, top1=r.kl.top1_agreement, ppl=r.perplexity)))
"""


def test_kl_on_a_262k_vocabulary_in_bounded_memory(big_vocab_folder, tiny_text_file):
    """Measured in a fresh process, as a user's run: inside the test session the heap that earlier tests
    left (glibc's raised mmap threshold, fragmentation) moved the same peak from ~460 to ~780 MiB."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _KL_262K, str(big_vocab_folder), f"text:{tiny_text_file}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    if r is None:
        pytest.skip("needs Linux's resettable VmHWM")
    # one window's float32 logits alone: 1024 x 262144 x 4 B = 1 GiB per model (the whole-window code: ~5 GiB)
    assert r["grew"] < 700, f"peak RSS grew by {r['grew']:.0f} MiB"
    assert r["kl"] == pytest.approx(0.0, abs=1e-6) and r["top1"] == 1.0 and math.isfinite(r["ppl"])


@pytest.mark.llamacpp
def test_llama_cpp_decodes_fewer_positions_per_batch_for_a_large_vocabulary(big_vocab_folder, tmp_path):
    pytest.importorskip("llama_cpp")
    from llmopt.backends.llamacpp_backend import LlamaCppBackend
    from llmopt.exporters import export_gguf

    out = tmp_path / "big.gguf"
    export_gguf(str(big_vocab_folder), str(out), type="f32")
    be = LlamaCppBackend(out, threads=2)
    try:
        assert be.llm.n_batch == 128  # 128 MiB of float32 logits per decode
        ids = torch.arange(300) * 7 % 320
        blocks = list(be.logit_blocks(ids))
        assert [b.shape[0] for b in blocks] == [128, 128, 44]
        got = torch.cat(blocks)
    finally:
        be.close()
    ref = TorchBackend.from_spec(str(big_vocab_folder), threads=2).logits(ids)
    assert (got - ref).abs().max().item() < 0.01 * ref.std().item()  # F16 KV cache
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


class _Tok:
    eos_token_id, bos_token_id = 2, 1


def test_harness_scores_blocks_like_whole_logits():
    """lm-eval requests scored from blocks (any size) give what the whole (L, V) log-softmax gives."""
    from llmopt.harness.backend_lm import BackendLM

    g = torch.Generator().manual_seed(0)
    requests = []
    for _ in range(12):
        ctx = torch.randint(3, 50, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        requests += [(None, ctx, [int(ctx[0])]), (None, ctx, torch.randint(0, 50, (4,), generator=g).tolist())]
    table = {}

    def logits_of(ids: torch.Tensor) -> torch.Tensor:  # fixed logits per sequence, argmax mostly ids[0]
        key = tuple(ids.tolist())
        if key not in table:
            table[key] = 3 * torch.randn(len(key), 50, generator=g)
            table[key][:, key[0]] += 8
        return table[key]

    def whole(inp: list[int], cont: list[int]) -> tuple[float, bool]:  # the pre-block code, verbatim
        rows = torch.log_softmax(logits_of(torch.tensor(inp)), -1)[len(inp) - len(cont) :]
        target = torch.tensor(cont)
        return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())

    for max_length in (6, 64):
        want = [whole((c + t)[-(max_length + 1) :][:-1], t) for _, c, t in requests]
        assert 0 < sum(w[1] for w in want) < len(want)
        for rows in (1, 5, 64):
            engine = _Blocks({}, rows)
            engine.logits = logits_of
            got = BackendLM(engine, _Tok(), max_length, progress=False)._loglikelihood_tokens(requests)
            assert got == want, (max_length, rows)


def test_harness_loglikelihood_on_a_262k_vocabulary_in_bounded_memory(big_vocab_folder):
    """A 2040-token context + 7-token continuation: whole logits + log-softmax would be 2 x 2 GiB."""
    from llmopt.harness.backend_lm import BackendLM
    from llmopt.memory import peak_rss_mib, reset_peak_rss, rss_mib

    engine = TorchBackend.from_spec(str(big_vocab_folder), threads=1)
    lm = BackendLM(engine, _Tok(), max_length=2048, progress=False)
    ids = (torch.arange(2047) * 7919 % 320).tolist()
    short = lm._loglikelihood_tokens([(None, ids[-40:-7], ids[-7:])])  # warm-up (one block)
    if not reset_peak_rss() or rss_mib() is None:
        pytest.skip("needs Linux's resettable VmHWM")
    before = rss_mib()
    (ll, greedy), (ll1, _) = lm._loglikelihood_tokens([(None, ids[:-7], ids[-7:]), (None, ids[:-1], ids[-1:])])
    grew = peak_rss_mib() - before
    assert grew < 700, f"peak RSS grew by {grew:.0f} MiB"  # one 2047-row float32 logits: 2 GiB
    assert math.isfinite(ll) and ll < ll1 < 0 and not greedy and ll != short[0][0]


def test_onnx_blocks_on_a_262k_vocabulary_in_bounded_memory(big_vocab_folder, tmp_path):
    """2048 positions through the ONNX graph in chunks on its KV cache: one run would return 2 GiB of logits."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("optimum.exporters.onnx")
    from llmopt.backends.onnx_backend import OnnxBackend
    from llmopt.exporters import export_onnx
    from llmopt.memory import peak_rss_mib, reset_peak_rss, rss_mib

    export_onnx(str(big_vocab_folder), str(tmp_path / "onnx"))
    be = OnnxBackend(tmp_path / "onnx", threads=1)
    ids = torch.arange(2048) * 7919 % 320
    tail = be.logits(ids[:64])  # warm-up: one block
    if not reset_peak_rss() or rss_mib() is None:
        pytest.skip("needs Linux's resettable VmHWM")
    before = rss_mib()
    rows, first = 0, None
    for block in be.logit_blocks(ids):
        first = block if first is None else first
        rows += block.shape[0]
    grew = peak_rss_mib() - before
    assert rows == 2048 and grew < 700, f"peak RSS grew by {grew:.0f} MiB"
    assert torch.allclose(first, tail, atol=1e-5)


def test_teacher_topk_cache_fills_in_blocks(tmp_path, monkeypatch):
    """The top-k summary is per position: blocks of 7 positions store what one 512-position chunk stores."""
    from safetensors.torch import load_file

    from llmopt.distill import teacher

    model = make_tiny_model("gemma2", 300)  # soft-capped logits
    windows = (torch.arange(2 * 40) * 7 % 300).view(2, 40)
    whole = teacher.TopKCache(tmp_path / "whole", "fp", k=8, T=2.0)
    assert whole.fill(model, windows) == 2
    monkeypatch.setattr(teacher, "TOPK_BLOCK_BYTES", 7 * 4 * 300)
    blocks = teacher.TopKCache(tmp_path / "blocks", "fp", k=8, T=2.0)
    assert blocks.fill(model, windows) == 2
    for w in windows:
        a, b = load_file(str(whole.path(w))), load_file(str(blocks.path(w)))
        assert torch.equal(a["index"], b["index"]) and a["top"].shape == (40, 8)
        for name in ("top", "lse", "tail", "lse1", "tail1"):
            assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_teacher_topk_cache_on_a_262k_vocabulary_in_bounded_memory(tmp_path):
    """One 1024-position window: 512-position chunks held 512 MiB of logits plus the summary's temporaries."""
    from llmopt.distill.teacher import TopKCache
    from llmopt.memory import peak_rss_mib, reset_peak_rss, rss_mib
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(BIG_VOCAB).eval()
    cache = TopKCache(tmp_path, "fp", k=64, T=1.0)
    cache.fill(model, torch.arange(64).view(1, -1))  # warm-up: one block
    if not reset_peak_rss() or rss_mib() is None:
        pytest.skip("needs Linux's resettable VmHWM")
    before = rss_mib()
    assert cache.fill(model, (torch.arange(1024) * 7919 % 320).view(1, -1)) == 1
    grew = peak_rss_mib() - before
    assert grew < 700, f"peak RSS grew by {grew:.0f} MiB"


@pytest.mark.llamacpp
def test_gguf_harness_loglikelihood_on_a_262k_vocabulary_in_bounded_memory(big_vocab_folder, tmp_path):
    """The GGUF case: llama.cpp's batches of 128 positions scored as they come, never (2047, V) floats."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("lm_eval")
    from llmopt.backends.llamacpp_backend import LlamaCppBackend
    from llmopt.exporters import export_gguf
    from llmopt.harness.backend_lm import BackendLM
    from llmopt.memory import peak_rss_mib, reset_peak_rss, rss_mib

    export_gguf(str(big_vocab_folder), str(tmp_path / "big.gguf"), type="f32")
    engine = LlamaCppBackend(tmp_path / "big.gguf", threads=2, n_ctx=2048)
    try:
        lm = BackendLM(engine, _Tok(), max_length=2048, progress=False)
        ids = (torch.arange(2047) * 7919 % 320).tolist()
        lm._loglikelihood_tokens([(None, ids[-40:-7], ids[-7:])])  # warm-up (one batch)
        if not reset_peak_rss() or rss_mib() is None:
            pytest.skip("needs Linux's resettable VmHWM")
        before = rss_mib()
        ((ll, _),) = lm._loglikelihood_tokens([(None, ids[:-7], ids[-7:])])
        grew = peak_rss_mib() - before
    finally:
        engine.close()
    assert grew < 700, f"peak RSS grew by {grew:.0f} MiB"  # one 2047-row float32 logits: 2 GiB
    assert math.isfinite(ll) and ll < 0
