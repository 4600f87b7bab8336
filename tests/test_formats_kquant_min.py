"""K-quants with mins (q4_K, q5_K, q2_K): llama.cpp's bytes with and without an imatrix, gguf-py's values, the
block round trip, GPTQ on them, names and the width rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from llmopt.errors import LLMOptError
from llmopt.formats import make_format, rtn_quantize
from llmopt.formats.kquant_fits import get_scale_min_k4, nearest_int, pack_scales_k4
from llmopt.kernels.gptq import GPTQConfig, gptq_quantize

torch.set_num_threads(1)

NAMES = ["q4_K", "q5_K", "q2_K"]
llamacpp = pytest.mark.llamacpp


def ggml_quantize(W: torch.Tensor, fmt, imatrix: torch.Tensor | None = None) -> np.ndarray:
    """llama.cpp's own bytes (ggml_quantize_chunk, what llama_model_quantize calls per tensor)."""
    pytest.importorskip("llama_cpp")
    from tests.ggml_oracle import ggml_quantize as oracle

    return oracle(W.numpy(), fmt.gguf_type, None if imatrix is None else imatrix.numpy())


def awkward(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """LLM-like weights plus rows of zeros, a huge outlier, negative-only and positive-only rows, tiny sub-blocks
    beside normal ones (their sub-block scale code comes out 0), constant and exactly representable blocks."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.03
    W[torch.rand(rows, cols, generator=g) < 0.01] *= 50
    W[0] = 0.0
    W[1] = -W[1].abs()
    W[2, 5] = 30.0
    W[3, :128] *= 1e-4
    W[4] *= 1e-6  # fp16 subnormal d
    W[5] *= 1e4
    W[6, :16], W[6, 16:32] = 0.7, -0.7
    W[7, ::2] = 0.0
    W[8, :64] = torch.arange(-32, 32) / 64
    W[9] = W[9].abs() + 0.5
    W[10, :32] = -0.3  # a constant negative sub-block: max == min
    return W


def imatrix(cols: int, kind: str, seed: int = 0) -> torch.Tensor | None:
    """None, a random importance with zeros (a whole sub-block, half the columns, denormal values) or all zeros."""
    if kind == "none":
        return None
    if kind == "zeros":
        return torch.zeros(cols)
    g = torch.Generator().manual_seed(seed)
    im = torch.rand(cols, generator=g) * 10
    im[torch.rand(cols, generator=g) < 0.5] = 0.0
    im[:32] = 0.0
    im[40:48] = 1e-30
    return im


@llamacpp
@pytest.mark.parametrize("kind", ["none", "imatrix", "zeros"])
@pytest.mark.parametrize("cols", [256, 512, 2048])
@pytest.mark.parametrize("name", NAMES)
def test_bytes_equal_llama_cpp_and_values_equal_gguf_py(name, cols, kind):
    fmt = make_format(name)
    W, im = awkward(24, cols, seed=cols), imatrix(cols, kind, seed=cols)
    qp = fmt.qparams(W) if im is None else fmt.qparams(W, 1, im)
    codes = fmt.quantize(W, qp)
    ref = ggml_quantize(W, fmt, im)
    ours = fmt.to_gguf_blocks(codes, qp)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)
    # gguf-py's dequantization of llama.cpp's bytes is ours, bit for bit (sign of zeros included)
    deq = gguf_dequantize(ref, fmt.gguf_type)
    assert np.array_equal(deq.view(np.int32), fmt.dequantize(codes, qp).numpy().view(np.int32))
    # the parameters are ggml's effective values of the stored codes
    assert torch.equal(qp.scale, qp.super_scale * qp.scale_code)
    assert torch.equal(qp.zero, -(qp.super_zero * qp.zero_code))
    assert torch.equal(qp.super_scale, qp.super_scale.half().float())
    assert int(qp.scale_code.max()) <= (63 if fmt.group_size == 32 else 15)


@llamacpp
@pytest.mark.parametrize("kind", ["none", "imatrix"])
@pytest.mark.parametrize("name", NAMES)
def test_from_gguf_blocks_inverts_to_gguf_blocks(name, kind):
    fmt = make_format(name)
    W, im = awkward(16, 512, seed=1), imatrix(512, kind, seed=1)
    qp = (fmt.qparams(W) if im is None else fmt.qparams(W, 1, im)).on_grid()
    ref = ggml_quantize(W, fmt, im)
    codes, back = fmt.from_gguf_blocks(ref)
    assert torch.equal(codes, fmt.quantize(W, fmt.qparams(W) if im is None else fmt.qparams(W, 1, im)))
    assert back.ref_inv_scale is None and back.ref_min is None
    for field, want, got in zip(("scale", "zero", "", "", "scale_code", "zero_code", "super_scale", "super_zero"),
                                qp.tensors(), back.tensors()):  # fmt: skip
        if field:
            assert torch.equal(want.view(torch.int32), got.view(torch.int32)), field
    assert np.array_equal(fmt.to_gguf_blocks(codes, back), ref)


@llamacpp
def test_search_codes_carried_where_the_sub_block_scale_is_zero():
    """A sub-block whose scale code rounds to 0 keeps llama.cpp's search codes (ref_inv_scale / ref_min); on the
    stored grid (what GPTQ uses) it gets code 0: the same values, other bytes."""
    fmt = make_format("q2_K")
    W = awkward(16, 256, seed=3)
    W[11] = torch.randn(256, generator=torch.Generator().manual_seed(3)) * 0.03
    W[11, :16] *= 0.01  # sub-block 0 of row 11 is 100x smaller than the rest: its scale code is 0
    qp = fmt.qparams(W)
    zero = qp.scale == 0
    carried, on_grid = fmt.quantize(W, qp), fmt.quantize(W, qp.on_grid())
    assert bool(zero[11, 0]) and bool((carried[11, :16] > 0).any())
    assert torch.equal(carried != on_grid, (carried != on_grid) & zero.repeat_interleave(16, 1))
    assert torch.equal(fmt.dequantize(carried, qp), fmt.dequantize(on_grid, qp))
    ref = ggml_quantize(W, fmt)
    assert np.array_equal(fmt.to_gguf_blocks(carried, qp), ref)
    assert not np.array_equal(fmt.to_gguf_blocks(on_grid, qp), ref)


def test_helpers_are_ggml_s():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 3.49999976, 15.5, 4194302.5, -7.0], np.float32)
    assert np.array_equal(nearest_int(v), np.rint(v).astype(np.int32))  # round half to even in range
    q = np.random.default_rng(0).integers(0, 256, (100, 12), dtype=np.uint8)
    sc, m = get_scale_min_k4(q)  # 12 bytes ↔ 16 six-bit codes: a bijection
    assert sc.max() <= 63 and m.max() <= 63
    assert np.array_equal(pack_scales_k4(sc, m), q)


def correlated_layer(out: int = 32, cols: int = 512, tokens: int = 512, seed: int = 0):
    """W (out, in) ~ 0.05·N(0,1); H = 2 X Xᵀ / N with X = A Z + noise (correlated) and 4 outlier channels."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g) * 0.05
    X = torch.randn(cols, 16, generator=g) @ torch.randn(16, tokens, generator=g)
    X += 0.3 * torch.randn(cols, tokens, generator=g)
    X[torch.randperm(cols, generator=g)[:4]] *= 20.0
    return W, 2 * X @ X.T / tokens


@pytest.mark.parametrize(
    "cfg", [GPTQConfig(), GPTQConfig(act_order=False, static_groups=False)], ids=["static", "dynamic"]
)
@pytest.mark.parametrize("name", NAMES)
def test_gptq_beats_rtn_and_packs_to_its_weights(name, cfg):
    fmt = make_format(name)
    W, H = correlated_layer()
    res = gptq_quantize(W, H, fmt, cfg)
    rtn = rtn_quantize(W, fmt, H=H)  # llama.cpp without an imatrix
    rtn_imatrix = rtn_quantize(W, fmt, 1, torch.diag(H), H=H)  # llama.cpp with diag(H) as its imatrix
    assert res.loss < rtn_imatrix.loss < rtn.loss
    assert res.codes.dtype == torch.uint8 and int(res.codes.max()) <= 2**fmt.bits - 1
    deq = gguf_dequantize(fmt.to_gguf_blocks(res.codes, res.qparams), fmt.gguf_type)
    assert np.array_equal(deq.view(np.int32), res.weight.numpy().view(np.int32))
    assert torch.equal(fmt.quantize(res.weight, res.qparams), res.codes)  # the weights are on the stored grid
    if not cfg.static_groups:  # per super-block from the updated weights: not the parameters of the original W
        assert not torch.equal(res.qparams.scale, fmt.qparams(W, 20, torch.diag(H)).scale)


@pytest.mark.parametrize("name, gguf_type, bpw, group, fallback", [
    ("q4_K", GGMLQuantizationType.Q4_K, 4.5, 32, "q5_0"),
    ("q5_K", GGMLQuantizationType.Q5_K, 5.5, 32, "q5_1"),
    ("q2_K", GGMLQuantizationType.Q2_K, 2.625, 16, "q4_0"),
])  # fmt: skip
def test_names_sizes_and_width_rule(name, gguf_type, bpw, group, fallback):
    fmt = make_format(name)
    assert fmt.name == name and fmt.gguf_type == gguf_type and fmt.group_size == group
    assert make_format(name.lower()) is fmt and make_format(name.upper()) is fmt
    assert fmt.bits_per_weight() == bpw
    assert make_format(name, group_size=group) is fmt
    with pytest.raises(LLMOptError, match=f"fixed blocks of {group}"):
        make_format(name, group_size=64)
    fmt.check_width(512)
    with pytest.raises(LLMOptError, match=rf"multiple of 256.*in_features=576 of blk\.0.*as {fallback}: use format"):
        fmt.check_width(576, "blk.0")
    with pytest.raises(LLMOptError, match="in_features=576"):
        fmt.qparams(torch.randn(4, 576))
    with pytest.raises(LLMOptError, match="imatrix"):
        fmt.qparams(torch.randn(4, 256), 1, torch.ones(4, 256))


def _tiny_f32_gguf(path, tensors: dict[str, np.ndarray]) -> None:
    """A one-layer llama GGUF, all F32: the header llama_model_quantize reads (hparams only, no vocabulary)."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(128)
    w.add_embedding_length(256)
    w.add_block_count(1)
    w.add_feed_forward_length(512)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@llamacpp
def test_llama_model_quantize_writes_our_bytes(tmp_path):
    """Through llama-cpp-python's llama_model_quantize (the whole-file route of ``--type q4_k_m`` etc.): every
    tensor llama.cpp writes as Q4_K, Q5_K or Q2_K, with and without an imatrix, is our bytes."""
    import gguf

    from llmopt.exporters.gguf.plan import Plan
    from llmopt.exporters.gguf.quantize import llama_quantize

    shapes = {
        "token_embd.weight": (64, 256), "blk.0.attn_q.weight": (256, 256), "blk.0.attn_k.weight": (128, 256),
        "blk.0.attn_v.weight": (128, 256), "blk.0.attn_output.weight": (256, 256), "blk.0.ffn_gate.weight": (512, 256),
        "blk.0.ffn_up.weight": (512, 256), "blk.0.ffn_down.weight": (256, 512),
    }  # fmt: skip
    src = {n: awkward(*s, seed=i).numpy() for i, (n, s) in enumerate(shapes.items())}
    norms = {f"{n}.weight": np.ones(256, np.float32) for n in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm")}
    _tiny_f32_gguf(tmp_path / "f32.gguf", {**src, **norms})
    imat = {n: imatrix(s[1], "imatrix", seed=i).numpy() for i, (n, s) in enumerate(shapes.items()) if "blk" in n}
    ours = {f.gguf_type: f for f in map(make_format, NAMES)}
    seen = set()
    for ftype in ("q4_k_m", "q5_k_m", "q2_k"):
        for im in (None, imat):
            dst = tmp_path / f"{ftype}.gguf"
            llama_quantize(tmp_path / "f32.gguf", dst, Plan("llama", ftype, "", ""), im, threads=1)
            for t in gguf.GGUFReader(dst).tensors:
                fmt = ours.get(t.tensor_type)
                if fmt is None:
                    continue
                W = torch.from_numpy(src[t.name])
                w = None if im is None else torch.from_numpy(im[t.name])
                qp = fmt.qparams(W) if w is None else fmt.qparams(W, 1, w)
                got = np.asarray(t.data).reshape(W.shape[0], -1)
                assert np.array_equal(fmt.to_gguf_blocks(fmt.quantize(W, qp), qp), got), (ftype, t.name)
                seen.add((t.tensor_type, im is not None))
    assert seen == {(t, i) for t in ours for i in (False, True)}
