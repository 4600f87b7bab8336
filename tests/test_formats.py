"""Number formats: llama.cpp byte-exactness, grids, bits per weight, clipping search, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from llmopt.errors import LLMOptError
from llmopt.formats import IntFormat, make_format, rtn_quantize

torch.set_num_threads(1)

GGUF_NAMES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
INT_FORMATS = [IntFormat(b, g, s) for b in (2, 3, 4, 8) for g in (None, 32, 64) for s in (True, False)]


def realistic_weights(rows: int = 48, cols: int = 512, seed: int = 0) -> torch.Tensor:
    """LLM-like weights (std 0.03, a few outliers) plus rows that stress ties, zeros and extremes."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.03
    W[torch.rand(rows, cols, generator=g) < 0.002] *= 30  # outliers
    W[0] = 0.0  # all-zero blocks: d = 0
    W[1, :16], W[1, 16:32] = 0.25, -0.25  # ±max ties: first one wins in llama.cpp
    W[2, :32] = 0.125 * torch.arange(-16, 16)  # exact grid points, x·id + 0.5 lands on integers
    W[3] *= 1e-5  # fp16 subnormal scales
    W[4] *= 300  # large scales
    W[5, ::2] = 0.0  # many exact zeros
    W[6, :32] = 0.7  # constant block: q4_1 d = 0
    return W


@pytest.mark.parametrize("name", GGUF_NAMES)
def test_rtn_bytes_equal_gguf_py(name):
    fmt = make_format(name)
    W = realistic_weights()
    res = rtn_quantize(W, fmt)
    ref = gguf_quantize(W.numpy(), fmt.gguf_type)  # llama.cpp quantize_row_*_ref, byte-exact port
    ours = fmt.to_gguf_blocks(res.codes, res.qparams)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)
    # dequantizing the file gives our fake-quant weights bit for bit (incl. the sign of zeros)
    deq = gguf_dequantize(ref, fmt.gguf_type)
    assert np.array_equal(deq.view(np.int32), res.weight.numpy().view(np.int32))
    # and the file reads back to the same codes and parameters
    codes, qp = fmt.from_gguf_blocks(ref)
    assert torch.equal(codes, res.codes)
    assert torch.equal(qp.scale, res.qparams.scale) and torch.equal(qp.zero, res.qparams.zero)


@pytest.mark.parametrize("name", GGUF_NAMES)
def test_gguf_scales_are_fp16(name):
    qp = make_format(name).qparams(realistic_weights())
    assert torch.equal(qp.scale, qp.scale.half().float())
    assert torch.equal(qp.zero, qp.zero.half().float())


def test_bits_per_weight():
    assert make_format("q4_0").bits_per_weight() == 4.5
    assert make_format("q8_0").bits_per_weight() == 8.5
    assert make_format("q4_1").bits_per_weight() == 5.0
    assert make_format("q5_0").bits_per_weight() == 5.5
    assert make_format("q5_1").bits_per_weight() == 6.0
    assert make_format("int", 4, 64).bits_per_weight() == 4.25
    assert make_format("int", 4, 128, symmetric=False).bits_per_weight() == 4 + 20 / 128
    assert make_format("int", 8).bits_per_weight() == 8.0
    assert make_format("int", 8).bits_per_weight(in_features=512) == 8 + 16 / 512


@pytest.mark.parametrize("fmt", INT_FORMATS, ids=str)
def test_int_grid(fmt):
    W = realistic_weights(cols=128)
    qp = fmt.qparams(W)
    codes = fmt.quantize(W, qp)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**fmt.bits - 1
    assert torch.equal(qp.scale, qp.scale.half().float())
    assert torch.equal(qp.zero, qp.zero.round())  # integer zero-points
    if fmt.symmetric:
        assert torch.all(qp.zero == 2 ** (fmt.bits - 1))
    # 0 is exactly representable in every group, and the all-zero row decodes to zeros
    assert torch.all(fmt.fake_quantize(torch.zeros_like(W), qp) == 0)
    assert torch.all(fmt.fake_quantize(W, qp)[0] == 0)
    # RTN error is at most half a step inside the range
    step = qp.scale.repeat_interleave(W.shape[1] // qp.n_groups, dim=1)
    err = (W - fmt.fake_quantize(W, qp)).abs()
    inside = (codes > 0) & (codes < 2**fmt.bits - 1)  # not clipped
    assert torch.all(err[inside] <= step[inside] / 2 * (1 + 1e-5))


@pytest.mark.parametrize("fmt", [*INT_FORMATS[::3], *map(make_format, GGUF_NAMES)], ids=str)
def test_column_slices_match_whole_matrix(fmt):
    """What GPTQ relies on: one column with its group's params quantizes like the whole matrix."""
    W = realistic_weights(cols=128)
    qp = fmt.qparams(W).on_grid()
    whole = fmt.quantize(W, qp)
    g = fmt.group_size or W.shape[1]
    for j in (0, 5, 31, 32, 70, 127):
        col = fmt.quantize(W[:, j : j + 1], qp.select(j // g))
        assert torch.equal(col[:, 0], whole[:, j])


@pytest.mark.parametrize(
    "fmt", [IntFormat(3, 32, True), IntFormat(4, None, False), *map(make_format, GGUF_NAMES)], ids=str
)
def test_mse_grid_never_worse(fmt):
    W = realistic_weights(cols=256)[7:]  # the plain rows (a few outliers), not the stress rows
    imp = torch.rand(256, generator=torch.Generator().manual_seed(1)) + 0.1

    def err(qp):
        return float(((W - fmt.fake_quantize(W, qp)) ** 2 * imp).sum())

    base, searched = fmt.qparams(W), fmt.qparams(W, mse_grid=20, weight=imp)
    assert err(searched) <= err(base)
    if fmt.bits <= 4:  # clipping pays at low bits; at 5-8 bits the gain is tiny or nil
        assert err(searched) < 0.99 * err(base)


def test_bad_input_messages():
    for bits in (1, 9):
        with pytest.raises(LLMOptError, match=f"bits must be in 2..8, got {bits}"):
            make_format("int", bits)
    with pytest.raises(LLMOptError, match="bits must be in 2..8, got 9"):
        make_format("int9")
    with pytest.raises(LLMOptError, match="unknown quantization format 'q9_k'; valid: int, q8_0, q4_0"):
        make_format("q9_k")
    with pytest.raises(LLMOptError, match="q4_0 uses fixed blocks of 32"):
        make_format("q4_0", group_size=64)
    fmt = make_format("int", 4, 128)
    msg = "group size 128 does not divide in_features=576 of model.layers.0.mlp.down_proj; use 64 or 32"
    with pytest.raises(LLMOptError, match=msg):
        fmt.check_width(576, "model.layers.0.mlp.down_proj")
    with pytest.raises(LLMOptError, match="group size 128 does not divide in_features=200; use 8"):
        fmt.qparams(torch.randn(4, 200))
    with pytest.raises(LLMOptError, match=r"q4_0 blocks of 32 do not divide in_features=100 of fc"):
        make_format("q4_0").check_width(100, "fc")
    with pytest.raises(LLMOptError, match="no GGUF tensor type"):
        fmt.to_gguf_blocks(torch.zeros(1, 128, dtype=torch.uint8), fmt.qparams(torch.randn(1, 128)))
    assert make_format("INT4", group_size=32) == IntFormat(4, 32, True)


def test_weighted_scale_search_beats_reference_on_q4_0():
    """The importance-weighted search (shrink + llama.cpp-style least-squares refits) never loses to the
    reference scale on its own criterion, and its values lie on the q4_0 grid."""
    torch.manual_seed(0)
    W = torch.randn(64, 256) * torch.rand(1, 256) * 2
    imp = torch.rand(256) ** 4  # strongly varying column importance, like diag(H)
    fmt = make_format("q4_0")

    def err(qp):
        return float((((W - fmt.fake_quantize(W, qp)) ** 2) * imp).sum())

    ref = fmt.qparams(W).on_grid()
    searched = fmt.qparams(W, mse_grid=20, weight=imp)
    assert err(searched) < 0.9 * err(ref)
    Q = fmt.fake_quantize(W, searched)
    assert torch.equal(fmt.fake_quantize(Q, searched), Q)


@pytest.mark.parametrize(
    "fmt",
    [IntFormat(3, 64, True), IntFormat(4, 32, False), IntFormat(4, None, True), *map(make_format, GGUF_NAMES)],
    ids=str,
)
def test_batched_search_picks_the_best_candidate_per_group(fmt):
    """The batched search equals scoring every candidate on its own: per group, no candidate (reference,
    shrunk range, refit) quantizes with a smaller importance-weighted error than the one chosen."""
    from llmopt.formats import MSE_MAX_SHRINK, QParams

    W = realistic_weights(cols=256)[7:]
    imp = torch.rand(256, generator=torch.Generator().manual_seed(1)) ** 3 + 0.01
    rows, cols = W.shape
    g = fmt.group_size or cols
    chosen = fmt.qparams(W, mse_grid=20, weight=imp)

    def group_err(qp: QParams) -> torch.Tensor:  # (rows, n_groups)
        return ((W - fmt.fake_quantize(W, qp)) ** 2 * imp).reshape(rows, cols // g, g).sum(-1)

    Wg, impg = W.reshape(rows, cols // g, g), imp.reshape(1, cols // g, g)
    cands = [fmt._range_params(Wg, 1 - i / 20).on_grid() for i in range(int(MSE_MAX_SHRINK * 20))]
    refits = fmt._refit_candidates(Wg, impg)
    if refits is not None:
        cands += [QParams(refits.scale[k], refits.zero[k]) for k in range(refits.scale.shape[0])]
    best = torch.stack([group_err(c) for c in cands]).amin(0)
    assert torch.allclose(group_err(chosen), best, rtol=1e-5, atol=1e-12)
    assert torch.all(group_err(chosen) <= group_err(fmt.qparams(W).on_grid()) * (1 + 1e-6))


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q8_0"])
def test_searched_params_pack_to_gguf_exactly(name):
    """Searched scales are fp16 values on the stored grid: the packed blocks dequantize (gguf-py) to
    exactly the weights the codes + params give, and unpack to the same codes and params."""
    fmt = make_format(name)
    W = realistic_weights()
    imp = torch.rand(512, generator=torch.Generator().manual_seed(2)) + 0.1
    qp = fmt.qparams(W, mse_grid=20, weight=imp)
    codes = fmt.quantize(W, qp)
    blocks = fmt.to_gguf_blocks(codes, qp)
    assert np.array_equal(gguf_dequantize(blocks, fmt.gguf_type), fmt.dequantize(codes, qp).numpy())
    codes2, qp2 = fmt.from_gguf_blocks(blocks)
    assert torch.equal(codes2, codes) and torch.equal(qp2.scale, qp.scale)


@pytest.mark.parametrize(
    "fmt", [IntFormat(4, 64, False), IntFormat(3, 64, True), *map(make_format, GGUF_NAMES)], ids=str
)
def test_search_in_row_slices_equals_one_pass(fmt, monkeypatch):
    """The scale search scores rows in slices to bound its temporaries; rows are independent, so the
    parameters are bit for bit those of scoring the whole matrix at once."""
    import llmopt.formats.search as search  # the module qparams reads SEARCH_CHUNK from

    W = realistic_weights(rows=300, cols=512)
    imp = torch.rand(512, generator=torch.Generator().manual_seed(3)) + 0.1
    monkeypatch.setattr(search, "SEARCH_CHUNK", 1 << 14)  # slices of a few rows
    sliced = fmt.qparams(W, mse_grid=20, weight=imp)
    monkeypatch.setattr(search, "SEARCH_CHUNK", 1 << 40)  # one pass
    whole = fmt.qparams(W, mse_grid=20, weight=imp)
    for a, b in zip(sliced.tensors(), whole.tensors()):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("fmt", [IntFormat(4, 64, False), *map(make_format, GGUF_NAMES)], ids=str)
def test_per_weight_search_weights(fmt, monkeypatch):
    """The search takes (rows, cols) per-weight importances (llama.cpp's imatrix · sqrt(σ² + w²)): a column
    importance broadcast to every row gives the column search's parameters bit for bit, row slices of
    per-weight importances equal one pass, and per group no candidate beats the chosen one under them."""
    import llmopt.formats.search as search  # the module qparams reads SEARCH_CHUNK from

    W = realistic_weights(rows=300, cols=512)
    imp = torch.rand(512, generator=torch.Generator().manual_seed(3)) + 0.1
    per_weight = imp[None, :] * (W.square().mean(1, keepdim=True) + W.square()).sqrt()
    same = fmt.qparams(W, mse_grid=20, weight=imp.expand(300, 512))
    assert torch.equal(same.scale, fmt.qparams(W, mse_grid=20, weight=imp).scale)
    monkeypatch.setattr(search, "SEARCH_CHUNK", 1 << 14)
    sliced = fmt.qparams(W, mse_grid=20, weight=per_weight)
    monkeypatch.setattr(search, "SEARCH_CHUNK", 1 << 40)
    whole = fmt.qparams(W, mse_grid=20, weight=per_weight)
    for a, b in zip(sliced.tensors(), whole.tensors()):
        assert (a is None and b is None) or torch.equal(a, b)
    g = fmt.group_size

    def group_err(qp):
        return ((W - fmt.fake_quantize(W, qp)) ** 2 * per_weight).reshape(300, 512 // g, g).sum(-1)

    assert torch.all(group_err(whole) <= group_err(fmt.qparams(W).on_grid()) * (1 + 1e-6))
    assert not torch.equal(whole.scale, fmt.qparams(W, mse_grid=20, weight=imp).scale)


@pytest.mark.parametrize(
    "fmt", [IntFormat(4, 64, False), IntFormat(3, 64, True), *map(make_format, GGUF_NAMES)], ids=str
)
def test_quantized_linear_holds_codes_compactly_and_exactly(fmt):
    """The compression state keeps ≤ 4-bit codes two to a byte and float16-exact params in float16,
    and gives back exactly the codes and params it was handed."""
    from llmopt.core.state import QuantizedLinear

    W = realistic_weights()
    qp = fmt.qparams(W, mse_grid=20).on_grid()
    codes = fmt.quantize(W, qp)
    q = QuantizedLinear(codes, qp, fmt)
    assert torch.equal(q.codes, codes) and q.codes.dtype == codes.dtype
    for a, b in zip(q.qparams.tensors(), qp.tensors()):
        assert (a is None and b is None) or (torch.equal(a, b) and a.dtype == torch.float32)
    held = q._packed.numel() * q._packed.element_size()
    assert held == codes.numel() // (2 if fmt.bits <= 4 else 1)
    assert q._qparams.scale.dtype == torch.float16  # every format's stored scale is a float16 value
