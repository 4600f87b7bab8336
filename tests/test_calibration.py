"""The layer-wise calibration engine: exact statistics, order independence, error carried forward."""

from typing import ClassVar

import pytest
import torch
from torch import nn

from llmopt.calibration import find_decoder_layers, run_layerwise
from llmopt.core.config import StageConfig
from llmopt.core.stage import Stage
from llmopt.core.state import CompressionState, LinearOutcome
from llmopt.errors import LLMOptError
from tests.conftest import make_tiny_llama


class RecordingStage(Stage):
    """Leaves weights as they are (or scales them) and records the Hessian the engine hands over."""

    name = "record"
    Config: ClassVar = StageConfig
    statistic = "hessian"

    def __init__(self, scale: float = 1.0):
        super().__init__(StageConfig(stage="record"))
        self.scale = scale
        self.seen: dict[str, torch.Tensor] = {}

    def compress_linear(self, name, W, stats, state, layer_index):
        self.seen[name] = stats.hessian.clone()
        return LinearOutcome(weight=W * self.scale)


def direct_hessians(model, windows) -> dict[str, torch.Tensor]:
    """H = 2/N Σ xᵀx of every Linear input, from plain full-model forwards."""
    xs: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: xs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n != "lm_head"
    ]
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in hooks:
        h.remove()
    out = {}
    for n, parts in xs.items():
        x = torch.cat(parts).double()
        out[n] = (2 * x.t() @ x / x.shape[0]).float()
    return out


@pytest.fixture()
def tiny():
    model = make_tiny_llama(vocab_size=300, seed=1)
    windows = torch.randint(0, 300, (6, 32), generator=torch.Generator().manual_seed(0))
    return model, windows


def test_hessians_match_direct_forward(tiny):
    model, windows = tiny
    ref = direct_hessians(model, windows)
    st = RecordingStage()
    run_layerwise(model, windows, [st], CompressionState(), batch_size=4)
    assert set(st.seen) == set(ref)
    for n in ref:
        torch.testing.assert_close(st.seen[n], ref[n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("width", [200, 256, 600])
def test_block_triangular_gram_is_the_full_product(width):
    """The accumulator computes only the upper block triangle of xᵀx (blocks of 256 columns, a partial last
    block for 600) and mirrors it once: the result is the full running average 2/N Σ xᵀx."""
    from llmopt.kernels.hessian import add_gram_upper_, symmetrize_upper_

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, width, generator=g) for n in (100, 37, 64)]
    H, tokens = torch.zeros(width, width), 0
    for x in xs:
        H.mul_(tokens / (tokens + x.shape[0]))
        add_gram_upper_(H, x, alpha=2.0 / (tokens + x.shape[0]))
        tokens += x.shape[0]
    X = torch.cat(xs)
    torch.testing.assert_close(symmetrize_upper_(H), 2 * X.t() @ X / tokens, rtol=1e-5, atol=1e-5)
    assert torch.equal(H, H.t())


class SinkStage(RecordingStage):
    def first_token_weight(self, name):
        return 0.5 if name.endswith("v_proj") else 0.0


def test_first_token_weight_scales_only_that_linears_hessian(tiny):
    """GPTQ's sink_weight: the first token of each window weighs 0.5 x 32 = 16 tokens in v_proj's Hessian
    (H = 2/N Σ w_t x_tᵀx_t, N the plain token count); q_proj / k_proj, reading the same tensor, keep theirs."""
    model, windows = tiny
    xs: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: xs.setdefault(n, []).append(a[0].double()))
        for n, m in model.named_modules()
        if n.endswith("v_proj")
    ]
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in hooks:
        h.remove()
    ref, plain = direct_hessians(model, windows), RecordingStage()
    st = SinkStage()
    run_layerwise(model, windows, [st], CompressionState(), batch_size=4)
    run_layerwise(model, windows, [plain], CompressionState(), batch_size=4)
    for n in ref:
        if not n.endswith("v_proj"):
            torch.testing.assert_close(st.seen[n], plain.seen[n], rtol=0, atol=0)
            continue
        x = torch.cat(xs[n])  # (windows, 32, in)
        w = torch.ones(x.shape[:2], dtype=torch.float64)
        w[:, 0] = 16.0
        h = 2 * torch.einsum("bt,bti,btj->ij", w, x, x) / w.numel()
        torch.testing.assert_close(st.seen[n], h.float(), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(st.seen[n], ref[n], rtol=1e-2)


def test_statistics_do_not_depend_on_window_order_or_batching(tiny):
    model, windows = tiny
    a, b = RecordingStage(), RecordingStage()
    run_layerwise(model, windows, [a], CompressionState(), batch_size=2)
    run_layerwise(model, windows.flip(0), [b], CompressionState(), batch_size=3)
    for n in a.seen:
        torch.testing.assert_close(a.seen[n], b.seen[n], rtol=1e-4, atol=1e-5)


def test_error_is_carried_forward(tiny):
    """Layer 1 is calibrated on the outputs of the *compressed* layer 0: its Hessians equal those of a
    plain forward through the final model (whose layer 0 is compressed)."""
    model, windows = tiny
    st = RecordingStage(scale=0.5)  # a visible "compression" of every Linear
    run_layerwise(model, windows, [st], CompressionState(), batch_size=4)
    after = direct_hessians(model, windows)
    n = "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(st.seen[n], after[n], rtol=1e-4, atol=1e-5)
    first = "model.layers.0.self_attn.q_proj"  # layer 0's input does not depend on any compression
    torch.testing.assert_close(st.seen[first], after[first], rtol=1e-4, atol=1e-5)


def test_true_sequential_sees_compressed_earlier_groups(tiny):
    model, windows = tiny
    st = RecordingStage(scale=0.5)
    run_layerwise(model, windows, [st], CompressionState(), batch_size=6, true_sequential=True)
    after = direct_hessians(model, windows)
    # o_proj's input comes from the already-compressed q/k/v of the same layer
    n = "model.layers.0.self_attn.o_proj"
    torch.testing.assert_close(st.seen[n], after[n], rtol=1e-4, atol=1e-5)


def test_no_decoder_layers_is_a_clear_error():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    with pytest.raises(LLMOptError, match="cannot find the decoder layers"):
        find_decoder_layers(model)


def test_symmetrize_upper_in_blocks_equals_the_formula():
    """The block-wise in-place symmetrization gives triu(H) + triu(H, 1)ᵀ bit for bit, whatever the lower
    triangle held, for widths on and off the block size, with −0.0 entries in the upper triangle."""
    from llmopt.kernels.hessian import GRAM_BLOCK, symmetrize_upper_

    torch.manual_seed(0)
    for n in (5, GRAM_BLOCK, GRAM_BLOCK + 37, 3 * GRAM_BLOCK):
        for dtype in (torch.float32, torch.float64):
            H = torch.randn(n, n, dtype=dtype)
            H[0, n - 1] = -0.0
            H[1, 1] = -0.0
            want = H.triu() + H.triu(1).t()
            got = symmetrize_upper_(H.clone())
            assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit()), (n, dtype)
