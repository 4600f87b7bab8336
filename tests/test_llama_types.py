"""llmopt's port of llama.cpp's tensor-type choice (:mod:`llmopt.core.llama_types`) against
llama.cpp's own quantizer: small random F32 GGUF files (llama and falcon layouts, widths 256 / 512 / 576,
1 to 80 layers, GQA, tied and separate output heads, 4 and 8 experts, an ffn width that is not a multiple
of 32) quantized by ``llama_model_quantize`` to every file type, with and without an importance matrix;
every tensor's type in llama.cpp's file must equal the function's answer.

llama.cpp's choice reads only the tensor names and row widths and the model's layer, head and expert
counts, so the tensors have 8 rows (the width of a row is what matters): each file is a few hundred KB.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from llmopt.core.llama_types import DEFAULT_TYPE, ModelFacts, is_70b, model_types, tensor_type

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.llamacpp

T = gguf.GGMLQuantizationType
LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
K_MIXES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs")
OTHERS = ("iq3_s", "iq3_m", "tq1_0", "tq2_0", "bf16")
# an importance matrix changes these choices (q4_k_m: a control)
WITH_IMATRIX = ("q4_0", "q5_0", "iq4_nl", "iq4_xs", "q4_k_m")
# llama.cpp refuses these without an importance matrix
IMATRIX_ONLY = ("q2_k_s", "iq3_xxs", "iq3_xs")
# also imatrix-only, and their grids take ~40 s to set up in llama.cpp: checked with LLMOPT_TEST_IQ_LOW=1
IQ_LOW = ("iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq1_s", "iq1_m")
IQ_LOW_MODELS = ("smollm2-576", "w256-gqa4", "moe8")
ROWS = 8

# name: (arch, n_layer, hidden, ffn, n_head, n_head_kv, n_expert, tied)
MODELS = {
    "smollm2-576": ("llama", 30, 576, 1536, 9, 3, 0, True),
    "w256-gqa4": ("llama", 8, 256, 512, 8, 2, 0, True),
    "w512-untied": ("llama", 17, 512, 1536, 8, 8, 0, False),
    "one-layer-ffn208": ("llama", 1, 256, 208, 2, 1, 0, False),  # ffn_down rows of 208: no 32-block fits → F16
    "70b": ("llama", 80, 256, 256, 8, 1, 0, False),  # llama.cpp's LLM_TYPE_70B
    "moe8": ("llama", 4, 256, 256, 4, 4, 8, False),
    "moe4": ("llama", 16, 512, 256, 4, 2, 4, True),
    "falcon": ("falcon", 16, 256, 1024, 4, 1, 0, False),
}


def _write(path, arch, n_layer, hidden, ffn, n_head, n_kv, n_expert, tied) -> dict[str, tuple[int, ...]]:
    """An F32 GGUF llama.cpp's quantizer loads (hyper-parameters, no vocabulary); returns name → shape."""
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(n_layer)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_vocab_size(64)
    if arch == "falcon":
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_layer_norm_rms_eps(1e-5)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(2)
    rng = np.random.default_rng(0)
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (64, hidden), "output_norm.weight": (hidden,)}
    if not tied:
        shapes["output.weight"] = (64, hidden)
    for i in range(n_layer):
        p = f"blk.{i}."
        shapes[p + "attn_norm.weight"] = (hidden,)
        shapes[p + "attn_output.weight"] = (ROWS, hidden)
        if arch == "falcon":
            shapes[p + "attn_qkv.weight"] = (ROWS, hidden)
        else:
            shapes[p + "ffn_norm.weight"] = (hidden,)
            for part in ("attn_q", "attn_k", "attn_v"):
                shapes[p + part + ".weight"] = (ROWS, hidden)
        if n_expert:
            shapes[p + "ffn_gate_inp.weight"] = (n_expert, hidden)
            shapes[p + "ffn_gate_exps.weight"] = (n_expert, ROWS, hidden)
            shapes[p + "ffn_up_exps.weight"] = (n_expert, ROWS, hidden)
            shapes[p + "ffn_down_exps.weight"] = (n_expert, ROWS, ffn)
        else:
            if arch != "falcon":
                shapes[p + "ffn_gate.weight"] = (ROWS, hidden)
            shapes[p + "ffn_up.weight"] = (ROWS, hidden)
            shapes[p + "ffn_down.weight"] = (ROWS, ffn)
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return shapes


def _llama_cpp_types(src, dst, ftype, imatrix, embedding="", output="") -> dict[str, T | None]:
    """Tensor types of llama.cpp's own quantization of ``src`` (None: left in the input's F32)."""
    from llmopt.exporters.gguf.plan import Plan
    from llmopt.exporters.gguf.quantize import llama_quantize

    llama_quantize(src, dst, Plan("llama", ftype, embedding, output), imatrix, threads=1)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(dst).tensors}
    return {n: (None if t == T.F32 else t) for n, t in types.items()}


def _ones_imatrix(shapes):
    """One importance value per input column (per column and expert for 3-D tensors) of every weight."""
    return {
        n: np.ones(s[-1] * (s[0] if len(s) == 3 else 1), np.float32)
        for n, s in shapes.items()
        if len(s) >= 2 and "gate_inp" not in n
    }


@pytest.fixture(scope="module", params=list(MODELS))
def tiny_file(request, tmp_path_factory):
    arch, n_layer, hidden, ffn, n_head, n_kv, n_expert, tied = MODELS[request.param]
    path = tmp_path_factory.mktemp("llama-types") / f"{request.param}.gguf"
    shapes = _write(path, *MODELS[request.param])
    facts = ModelFacts(n_layer, n_head, n_kv, n_expert, not tied, arch, is_70b(arch, n_layer, n_head, n_kv))
    return request.param, path, shapes, facts


def test_types_equal_llama_cpps_for_every_tensor_and_file_type(tiny_file, tmp_path):
    model, src, shapes, facts = tiny_file
    imatrix = _ones_imatrix(shapes)
    runs = [(f, False) for f in LEGACY + K_MIXES + OTHERS] + [(f, True) for f in WITH_IMATRIX + IMATRIX_ONLY]
    if model == "70b":  # 720 tensors: the K mixes only (the rule for 70B models bumps Q3_K / Q4_K attn_v)
        runs = [(f, False) for f in K_MIXES] + [("iq3_xs", True)]
    if os.environ.get("LLMOPT_TEST_IQ_LOW") == "1" and model in IQ_LOW_MODELS:
        runs += [(f, True) for f in IQ_LOW]
        assert {f for f, _ in runs} == set(DEFAULT_TYPE) - {"f32", "f16"}  # those two: llmopt writes them itself
    wrong = []
    for ftype, with_imatrix in runs:
        got = _llama_cpp_types(src, tmp_path / f"{ftype}.gguf", ftype, imatrix if with_imatrix else None)
        assert set(got) == set(shapes)
        ours = model_types(ftype, shapes, facts, with_imatrix)
        wrong += [(ftype, with_imatrix, n, got[n], ours[n]) for n in shapes if ours[n] != got[n]]
        if facts.n_expert <= 1:  # one tensor of a kind per layer: the per-tensor call agrees
            single = {n: tensor_type(ftype, n, s, facts, with_imatrix) for n, s in shapes.items()}
            wrong += [(ftype, with_imatrix, n, got[n], single[n], "tensor_type") for n in shapes if single[n] != got[n]]
    assert not wrong, wrong[:20]


def test_overridden_embedding_and_output_types(tiny_file, tmp_path):
    """``--token-embedding-type`` / ``--output-tensor-type``: a tied embedding takes the output's type."""
    _, src, shapes, facts = tiny_file
    for ftype, emb, outp in (("q4_k_m", T.Q4_0, T.Q5_K), ("q4_0", None, T.Q2_K), ("q6_k", T.Q8_0, None)):
        got = _llama_cpp_types(
            src, tmp_path / "o.gguf", ftype, None, emb.name if emb else "", outp.name if outp else ""
        )
        ours = model_types(ftype, shapes, facts, output_type=outp, embedding_type=emb)
        assert ours == got, ftype


def test_known_answers():
    """A few choices read off llama-quant.cpp, for the record."""
    smol = ModelFacts(n_layer=30, n_head=9, n_head_kv=3, has_output=False)
    assert tensor_type("q4_0", "token_embd.weight", (49152, 576), smol) == T.Q8_0  # Q6_K, but 576 % 256
    assert tensor_type("q4_0", "token_embd.weight", (49152, 4096), smol) == T.Q6_K
    assert tensor_type("q8_0", "token_embd.weight", (49152, 4096), smol) == T.Q8_0
    assert tensor_type("q4_0", "blk.0.ffn_down.weight", (576, 1536), smol, imatrix=True) == T.Q4_1
    assert tensor_type("q4_0", "blk.3.ffn_down.weight", (576, 1536), smol, imatrix=True) == T.Q4_0
    assert tensor_type("q4_0", "blk.0.ffn_down.weight", (576, 1536), smol) == T.Q4_0
    assert tensor_type("q4_k_m", "blk.0.attn_v.weight", (192, 576), smol) == T.Q8_0  # Q6_K → Q8_0
    assert tensor_type("q4_k_m", "blk.4.attn_v.weight", (192, 576), smol) == T.Q5_0  # Q4_K → Q5_0
    assert tensor_type("q4_k_m", "blk.1.ffn_down.weight", (576, 1536), smol) == T.Q6_K
    assert tensor_type("q5_k_s", "blk.1.attn_q.weight", (576, 576), smol) == T.Q5_1  # Q5_K → Q5_1
    assert tensor_type("q3_k_s", "blk.1.attn_q.weight", (576, 576), smol) == T.Q4_0  # Q3_K → Q4_0
    assert tensor_type("iq4_xs", "blk.1.attn_q.weight", (576, 576), smol) == T.IQ4_NL
    assert tensor_type("q4_0", "blk.1.attn_q.weight", (576, 100), smol) == T.F16
    assert tensor_type("q4_0", "blk.1.attn_norm.weight", (576,), smol) is None
    with pytest.raises(ValueError, match="unknown llama.cpp file type"):
        tensor_type("q4_z", "output.weight", (8, 256), smol)
