"""q6_K and q3_K: llama.cpp's bytes with and without an imatrix, gguf-py's values, GPTQ on their grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from llmopt.errors import LLMOptError
from llmopt.formats import make_format, rtn_quantize
from llmopt.kernels.gptq import GPTQConfig, gptq_quantize, refit_scales
from tests.ggml_oracle import ggml_quantize

torch.set_num_threads(1)

NAMES = ["q6_K", "q3_K"]
PLAIN = GPTQConfig(act_order=False, static_groups=False, mse_grid=0)  # the paper's GPTQ: dynamic groups


def awkward_weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """LLM-like rows (std 0.03, a few outliers) plus rows that stress every branch of llama.cpp's rules."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.03
    W[torch.rand(rows, cols, generator=g) < 0.002] *= 30  # outliers
    W[0] = 0.0  # all-zero super-blocks: d = 0
    W[1, 7] = 40.0  # one huge outlier: the other sub-blocks' scale codes round to 0
    W[2] = -W[2].abs()  # negative only
    W[3] *= 1e-5  # d underflows fp16
    W[4] *= 300  # large scales
    W[5, ::2] = 0.0  # many exact zeros
    W[6, 16:48] = 0.0  # all-zero sub-blocks inside a live super-block
    W[7, :16] = 0.7  # a constant sub-block
    W[8, :32] = 0.125 * torch.arange(-16, 16)  # exact grid points, ties of x/d
    W[9, :256] *= 1e-14  # below GROUP_MAX_EPS for the sub-block searches
    return W


def awkward_imatrix(cols: int, seed: int = 1) -> torch.Tensor:
    """Per-column importance with scattered zeros and whole zero sub-blocks (dead inputs)."""
    g = torch.Generator().manual_seed(seed)
    imp = torch.rand(cols, generator=g) * 3
    imp[torch.rand(cols, generator=g) < 0.15] = 0.0
    imp[32:48] = 0.0
    return imp


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("cols", [256, 512, 2048])
@pytest.mark.parametrize("name", NAMES)
def test_bytes_equal_llama_cpp(name, cols, with_imatrix):
    fmt = make_format(name)
    W = awkward_weights(24, cols)
    imatrix = awkward_imatrix(cols) if with_imatrix else None
    qp = fmt.qparams(W) if imatrix is None else fmt.qparams(W, 1, imatrix)
    codes = fmt.quantize(W, qp)
    ours = fmt.to_gguf_blocks(codes, qp)
    ref = ggml_quantize(W.numpy(), fmt.gguf_type, None if imatrix is None else imatrix.numpy())
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)
    # the data reach the branch where llama.cpp keeps its first search's codes (a live sub-block, d·sc = 0)
    live = W.reshape(W.shape[0], -1, 16).abs().amax(-1) > 0
    assert bool((live & (qp.scale == 0)).any())
    # gguf-py dequantizes the file to our values bit for bit (signs of zeros included)
    deq = gguf_dequantize(ref, fmt.gguf_type)
    assert np.array_equal(deq.view(np.int32), fmt.dequantize(codes, qp).numpy().view(np.int32))
    # and the file reads back to the same codes and every stored parameter
    codes2, qp2 = fmt.from_gguf_blocks(ref)
    assert torch.equal(codes2, codes)
    assert qp2.stored().keys() == qp.stored().keys() == {"scale", "zero", "scale_code", "super_scale"}
    for key, t in qp.stored().items():
        assert torch.equal(qp2.stored()[key].view(torch.int32), t.view(torch.int32)), key


@pytest.mark.parametrize("name", NAMES)
def test_stored_parameters(name):
    fmt = make_format(name)
    qp = fmt.qparams(awkward_weights(16, 512), 1, awkward_imatrix(512))
    d, sc = qp.super_scale, qp.scale_code
    assert torch.equal(d, d.half().float())  # fp16 d, one per super-block of 16 sub-blocks
    assert torch.equal(d, d[:, ::16].repeat_interleave(16, dim=1))
    assert torch.equal(sc, sc.round())
    lo, hi, off = (-128, 127, 0) if name == "q6_K" else (0, 63, 32)
    assert int(sc.min()) >= lo and int(sc.max()) <= hi
    assert torch.equal(qp.scale, d * (sc - off))  # the effective scale, as ggml computes it in float32
    assert bool((qp.scale < 0).any())  # symmetric grids whose effective scale may be negative
    assert torch.all(qp.zero == 0)


def test_names_widths_and_sizes():
    assert make_format("Q6_K") is make_format("q6_k") is make_format(" q6_K ")
    assert make_format("Q3_k").name == "q3_K"
    assert make_format("q6_K").bits_per_weight() == 210 * 8 / 256
    assert make_format("q3_K").bits_per_weight() == 110 * 8 / 256
    with pytest.raises(LLMOptError, match="(?i)q3_K uses fixed blocks of 16"):
        make_format("q3_K", group_size=32)
    layer = "model.layers.0.mlp.down_proj"
    for name, fallback in (("q6_K", "q8_0"), ("q3_K", "q4_0")):  # llama-quant.cpp tensor_type_fallback
        msg = (
            f"{name} needs rows that are a multiple of 256 weights, in_features=576 of {layer} is not; "
            f"llama.cpp writes such a tensor as {fallback}: use format {fallback} for it"
        )
        with pytest.raises(LLMOptError, match=msg):
            make_format(name).check_width(576, layer)
        with pytest.raises(LLMOptError, match="in_features=576 is not"):
            make_format(name).qparams(torch.randn(4, 576))
        with pytest.raises(LLMOptError, match=f"{name} takes a per-column importance of 256 values"):
            make_format(name).qparams(torch.randn(4, 256), 1, torch.rand(4, 256))


@pytest.mark.parametrize("name", NAMES)
def test_on_grid_rounding_is_nearest(name):
    """What GPTQ uses: ``round_column`` with a group's parameters (negative scales included) gives the nearest
    point of the stored grid, and one column quantizes as in the whole matrix."""
    fmt = make_format(name)
    W = awkward_weights(32, 256)
    qp = fmt.qparams(W, 1, awkward_imatrix(256)).on_grid()
    grid = torch.arange(2**fmt.bits, dtype=torch.float32)
    whole = fmt.quantize(W, qp)
    for j in (0, 7, 17, 100, 255):
        w = W[:, j] * 1.3  # off the rows' own grid points, some beyond the range
        grouped = qp.select(j // 16).grouped()
        codes, vals = fmt.round_column(w, grouped)
        values = fmt._dq(grid.view(1, 1, -1), grouped)[:, 0]  # (rows, 2^bits) every grid value
        best = (values - w[:, None]).abs().amin(1)
        assert torch.equal((vals - w).abs(), best)
        assert torch.equal(vals, fmt._dq(codes.view(-1, 1, 1), grouped).view(-1))
        assert torch.equal(fmt.quantize(W[:, j : j + 1], qp.select(j // 16))[:, 0], whole[:, j])


def correlated_layer(out: int = 32, cols: int = 512, tokens: int = 768, seed: int = 0):
    """W (out, in) ~ 0.05·N(0,1); H = 2 X Xᵀ / N, X = A Z + noise (rank-32 correlated inputs, 4 loud channels)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g) * 0.05
    X = torch.randn(cols, 32, generator=g) @ torch.randn(32, tokens, generator=g)
    X += 0.3 * torch.randn(cols, tokens, generator=g)
    X[torch.randperm(cols, generator=g)[:4]] *= 20.0
    return W, 2 * X @ X.T / tokens


@pytest.mark.parametrize("cfg", [GPTQConfig(), PLAIN], ids=["static-act-order-search", "dynamic"])
@pytest.mark.parametrize("name", NAMES)
def test_gptq_beats_rtn_and_packs(name, cfg):
    fmt = make_format(name)
    W, H = correlated_layer()
    rtn = rtn_quantize(W, fmt, H=H)
    res = gptq_quantize(W, H, fmt, cfg)
    assert res.loss < 0.5 * rtn.loss
    assert res.codes.dtype == torch.uint8 and int(res.codes.max()) < 2**fmt.bits
    # the codes and parameters pack to blocks that gguf-py reads back as GPTQ's weights, bit for bit
    blocks = fmt.to_gguf_blocks(res.codes, res.qparams)
    deq = gguf_dequantize(blocks, fmt.gguf_type)
    assert np.array_equal(deq.view(np.int32), res.weight.numpy().view(np.int32))
    # re-quantizing the weights on the same grid is a fixed point
    assert torch.equal(fmt.quantize(res.weight, res.qparams), res.codes)
    # GPTQ's scale refit would leave the two-level grid: it leaves these formats alone
    qp, Q = refit_scales(W, H, res.codes, res.qparams, fmt)
    assert qp is res.qparams and torch.equal(Q, res.weight)
