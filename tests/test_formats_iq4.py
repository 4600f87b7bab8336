"""iq4_nl / iq4_xs: llama.cpp's bytes with and without an imatrix, gguf-py's values, the grid index, GPTQ."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

import llmopt.formats.iq4 as iq4
from llmopt.errors import LLMOptError
from llmopt.formats import FORMAT_NAMES, make_format, rtn_quantize
from llmopt.formats.numeric import sqrtf
from llmopt.kernels.gptq import GPTQConfig, gptq_quantize
from tests.ggml_oracle import ggml_quantize

torch.set_num_threads(1)

KV = torch.tensor(iq4.KVALUES_IQ4NL, dtype=torch.float32)
WIDTHS = [("iq4_nl", 32), ("iq4_nl", 576), ("iq4_nl", 2048), ("iq4_xs", 256), ("iq4_xs", 512), ("iq4_xs", 2048)]


def stress_weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """LLM-like weights (std 0.03, a few outliers) plus rows that stress llama.cpp's corner cases."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.03
    W[torch.rand(rows, cols, generator=g) < 0.002] *= 30
    W[0] = 0.0  # all-zero blocks and super-blocks: d = 0 (iq4_xs: fp16 −0.0)
    W[1, 5] = 40.0  # one huge outlier in a block
    W[2, : min(cols, 64)] = -W[2, : min(cols, 64)].abs()  # negative-only blocks
    W[3] = W[3].abs()  # positive-only row
    W[4] *= 1e-5  # fp16-subnormal scales
    W[5] *= 300  # large scales
    W[6, :32] = 0.7  # constant block
    W[7, :32] = 1e-16  # below GROUP_MAX_EPS: scale 0
    W[8, :32] = 0.01 * KV.repeat(2)  # exact grid points
    W[9, :16], W[9, 16:32] = 0.25, -0.25  # ±max ties: the first one wins
    W[10, ::2] = 0.0
    if cols > 32:
        W[11, 32:64] = 0.0  # one zero sub-block beside non-zero ones: iq4_xs ls = 32 with d ≠ 0
    return W


def importance(cols: int, seed: int = 1) -> torch.Tensor:
    """An imatrix with zeros: scattered columns and one whole block of 32 (its fit has Σwq² = 0)."""
    imp = torch.rand(cols, generator=torch.Generator().manual_seed(seed)) ** 2 * 10
    imp[::7] = 0.0
    imp[:32] = 0.0
    return imp


def best_index_int8(x: torch.Tensor) -> torch.Tensor:
    """ggml-quants.c ``best_index_int8(16, kvalues_iq4nl, x)`` line by line, vectorised (its binary search
    runs log2(16) = 4 steps for every x)."""
    mu = torch.full(x.shape, 15)
    ml = torch.zeros(x.shape, dtype=torch.long)
    for _ in range(4):
        mav = (ml + mu) // 2
        lower = x < KV[mav]
        mu, ml = torch.where(lower, mav, mu), torch.where(lower, ml, mav)
    inner = torch.where(x - KV[mu - 1] < KV[mu] - x, mu - 1, mu)
    return torch.where(x <= KV[0], 0, torch.where(x >= KV[15], 15, inner))


def test_grid_index_is_best_index_int8():
    """Bucketize on the midpoints and the search's floor(2x) table are llama.cpp's index function, also
    a few ulps around every midpoint and grid value, where float32 subtractions could round."""
    g = torch.Generator().manual_seed(0)
    mids = (KV[1:] + KV[:-1]) / 2
    near = torch.cat([mids, KV])
    up, down = near.clone(), near.clone()
    around = [near]
    for _ in range(4):
        up, down = torch.nextafter(up, torch.tensor(np.inf)), torch.nextafter(down, torch.tensor(-np.inf))
        around += [up, down]
    x = torch.cat([*around, torch.rand(200_000, generator=g) * 300 - 150, torch.randn(1000, generator=g) * 1e-3])
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1e-30, -1e30, 1e30, np.inf, -np.inf])])
    ref = best_index_int8(x)
    assert torch.equal(iq4.grid_index(x), ref)
    finite = x[torch.isfinite(x)]
    assert torch.equal(iq4._grid_values(finite.clone(), iq4._value_table(x.device)), KV[best_index_int8(finite)])


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("name,cols", WIDTHS)
def test_bytes_equal_llama_cpp(name, cols, with_imatrix):
    """quantize(qparams) packs to ggml_quantize_chunk's bytes; gguf-py dequantizes them to our values bit for
    bit; from_gguf_blocks gives back the codes and every stored parameter."""
    fmt = make_format(name)
    W = stress_weights(24, cols)
    imp = importance(cols) if with_imatrix else None
    qp = fmt.qparams(W) if imp is None else fmt.qparams(W, 1, imp)
    codes = fmt.quantize(W, qp)
    ours = fmt.to_gguf_blocks(codes, qp)
    ref = ggml_quantize(W.numpy(), fmt.gguf_type, None if imp is None else imp.numpy())
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)
    values = fmt.dequantize(codes, qp)
    assert np.array_equal(gguf_dequantize(ref, fmt.gguf_type).view(np.int32), values.numpy().view(np.int32))
    codes2, qp2 = fmt.from_gguf_blocks(ref)
    assert torch.equal(codes2, codes)
    for field, got in qp2.stored().items():
        assert torch.equal(got.view(torch.int32), getattr(qp, field).view(torch.int32)), field
    assert qp2.stored().keys() == qp.stored().keys()


@pytest.mark.parametrize("name", ["iq4_nl", "iq4_xs"])
def test_bytes_equal_llama_cpp_on_many_blocks(name):
    """8192 blocks of plain and heavy-tailed weights under two imatrices (smooth, and 0/1/2 with many ties):
    enough blocks that an ulp anywhere in the fit (e.g. a sqrtf that is not correctly rounded, which changed
    ~1 block in 1000) changes some d."""
    fmt = make_format(name)
    g = torch.Generator().manual_seed(5)
    W = torch.randn(256, 1024, generator=g)
    W[128:] = W[128:] / (torch.rand(128, 1024, generator=g) + 0.05)  # heavy tails
    for imp in (torch.rand(1024, generator=g) ** 3, torch.randint(0, 3, (1024,), generator=g).float()):
        qp = fmt.qparams(W, 1, imp)
        ours = fmt.to_gguf_blocks(fmt.quantize(W, qp), qp)
        assert np.array_equal(ours, ggml_quantize(W.numpy(), fmt.gguf_type, imp.numpy()))


def test_sqrtf_is_correctly_rounded():
    bits = torch.randint(0, 0x7F800000, (1 << 20,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    x = bits.view(torch.float32)  # positive finite float32s, uniform over bit patterns
    assert np.array_equal(sqrtf(x).numpy().view(np.int32), np.sqrt(x.numpy()).view(np.int32))


def test_imatrix_changes_the_choice():
    """The imatrix reaches llama.cpp's fit: different bytes than without it, both llama.cpp's."""
    for name in ("iq4_nl", "iq4_xs"):
        fmt = make_format(name)
        W, imp = stress_weights(16, 512), importance(512)
        assert not np.array_equal(
            fmt.to_gguf_blocks(fmt.quantize(W, qp := fmt.qparams(W, 1, imp)), qp),
            fmt.to_gguf_blocks(fmt.quantize(W, qp0 := fmt.qparams(W)), qp0),
        )


def test_parameters_are_what_ggml_stores():
    W = stress_weights(24, 512)
    nl = make_format("iq4_nl").qparams(W)
    assert torch.equal(nl.scale, nl.scale.half().float()) and torch.all(nl.zero == 0)
    assert nl.scale_code is None and nl.super_scale is None
    xs = make_format("iq4_xs").qparams(W, 1, importance(512))
    assert torch.equal(xs.scale_code, xs.scale_code.round()) and xs.scale_code.min() >= 0 and xs.scale_code.max() <= 63
    assert torch.equal(xs.super_scale, xs.super_scale.half().float())
    assert torch.equal(xs.super_scale, xs.super_scale[:, ::8].repeat_interleave(8, dim=1))  # one d per 256
    assert torch.equal(xs.scale, xs.super_scale * (xs.scale_code - 32)) and torch.all(xs.zero == 0)
    assert torch.any(xs.scale_code == 0)  # the largest sub-block scale is d·(−32)
    assert make_format("iq4_nl").bits_per_weight() == 4.5 and make_format("iq4_xs").bits_per_weight() == 4.25


@pytest.mark.parametrize("name", ["iq4_nl", "iq4_xs"])
def test_on_grid_rounding_is_nearest_and_round_column_agrees(name):
    """Without llama.cpp's inverse scale, a weight goes to the nearest point of scale·kvalues (negative
    scales included), and round_column gives quantize's codes and dequantize's values for every column."""
    fmt = make_format(name)
    W = stress_weights(24, 512)
    qp = fmt.qparams(W, 1, importance(512)).on_grid()
    assert torch.any(qp.scale < 0) and torch.any(qp.scale > 0)
    codes = fmt.quantize(W, qp)
    values = fmt.dequantize(codes, qp)
    grid = qp.scale.repeat_interleave(32, dim=1)[..., None] * KV  # (rows, cols, 16)
    nearest = (W[..., None] - grid).abs().amin(-1)
    assert torch.equal((W - values).abs(), nearest)
    assert torch.equal(fmt.quantize(values, qp), codes)  # a fixed point
    for j in (0, 31, 32, 300, 511):
        c, v = fmt.round_column(W[:, j].contiguous(), qp.select(j // 32).grouped())
        assert torch.equal(c, codes[:, j]) and torch.equal(v, values[:, j])


def test_row_slices_equal_one_pass(monkeypatch):
    W, imp = stress_weights(40, 512), importance(512)
    for name in ("iq4_nl", "iq4_xs"):
        fmt = make_format(name)
        whole = fmt.qparams(W, 1, imp)
        monkeypatch.setattr(iq4, "CHUNK", 1024)  # two rows at a time
        sliced = fmt.qparams(W, 1, imp)
        monkeypatch.undo()
        for a, b in zip(sliced.tensors(), whole.tensors()):
            assert (a is None and b is None) or torch.equal(a, b)


def test_widths_and_bad_input():
    assert "iq4_nl" in FORMAT_NAMES and "iq4_xs" in FORMAT_NAMES
    xs, nl = make_format("iq4_xs"), make_format("iq4_nl")
    assert xs.gguf_type == T.IQ4_XS and nl.gguf_type == T.IQ4_NL
    msg = r"iq4_xs needs rows that are a multiple of 256 .*576 of fc.*use format iq4_nl"
    with pytest.raises(LLMOptError, match=msg):
        xs.check_width(576, "fc")
    nl.check_width(576)
    with pytest.raises(LLMOptError, match="iq4_nl blocks of 32 do not divide in_features=100"):
        nl.qparams(torch.randn(2, 100))
    with pytest.raises(LLMOptError, match="iq4_nl uses fixed blocks of 32"):
        make_format("iq4_nl", group_size=64)
    W = torch.randn(4, 256)
    for fmt in (nl, xs):
        with pytest.raises(LLMOptError, match="per-column importance of 256 values"):
            fmt.qparams(W, 1, torch.rand(4, 256))
        with pytest.raises(LLMOptError, match="inf or nan"):
            fmt.qparams(torch.where(W > 2, torch.inf, W))
    with pytest.raises(LLMOptError, match="sub-block scale codes"):
        qp = xs.qparams(W)
        xs.to_gguf_blocks(xs.quantize(W, qp), type(qp)(qp.scale, qp.zero))


def correlated_layer(out: int = 48, cols: int = 512, tokens: int = 1024, seed: int = 0):
    """W (out, in) ~ 0.05·N(0,1); H = 2 X Xᵀ / N with X = A Z + noise (correlated) and 4 outlier channels."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g) * 0.05
    X = torch.randn(cols, 32, generator=g) @ torch.randn(32, tokens, generator=g)
    X += 0.3 * torch.randn(cols, tokens, generator=g)
    X[torch.randperm(cols, generator=g)[:4]] *= 20.0
    return W, 2 * X @ X.T / tokens


GPTQ_CONFIGS = [GPTQConfig(), GPTQConfig(act_order=False, static_groups=False)]


@pytest.mark.parametrize("cfg", GPTQ_CONFIGS, ids=["default", "dynamic"])
@pytest.mark.parametrize("name", ["iq4_nl", "iq4_xs"])
def test_gptq_beats_rtn_and_packs_exactly(name, cfg):
    """GPTQ (defaults: act-order, static groups, llama.cpp's imatrix rule with diag H; and dynamic groups
    per parameter block) beats llama.cpp's RTN; its codes + params pack to blocks that gguf-py dequantizes
    to GPTQ's weights bit for bit, and re-quantizing those weights is a fixed point."""
    W, H = correlated_layer()
    fmt = make_format(name)
    rtn = rtn_quantize(W, fmt, H=H)
    res = gptq_quantize(W, H, fmt, cfg)
    assert res.loss < 0.5 * rtn.loss
    assert res.qparams.ref_inv_scale is None and res.codes.dtype == torch.uint8 and res.codes.shape == W.shape
    blocks = fmt.to_gguf_blocks(res.codes, res.qparams)
    deq = gguf_dequantize(blocks, fmt.gguf_type)
    assert np.array_equal(deq.view(np.int32), res.weight.numpy().view(np.int32))
    assert torch.equal(fmt.quantize(res.weight, res.qparams), res.codes)


@pytest.mark.parametrize("name", ["iq4_nl", "iq4_xs"])
def test_quantized_linear_holds_iq4_exactly(name):
    """The compression state (two codes a byte, fp16-exact fields in fp16) gives back every field bit for bit."""
    from llmopt.core.state import QuantizedLinear

    fmt = make_format(name)
    W = stress_weights(24, 512)
    qp = fmt.qparams(W, 1, importance(512)).on_grid()
    codes = fmt.quantize(W, qp)
    held = QuantizedLinear(codes, qp, fmt)
    assert torch.equal(held.codes, codes)
    for a, b in zip(held.qparams.tensors(), qp.tensors()):
        assert (a is None and b is None) or torch.equal(a.view(torch.int32), b.view(torch.int32))
