"""Small exact tests for the one-shot pruning kernels (magnitude, Wanda, SparseGPT, OWL)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from llmopt.errors import LLMOptError
from llmopt.kernels.hessian import weighted_error
from llmopt.kernels.magnitude import magnitude_prune
from llmopt.kernels.owl import layer_outlier_ratio, outlier_ratio, owl_sparsities
from llmopt.kernels.pruning import (
    cumulative_quotas,
    nm_mask,
    row_topk_mask,
    validate_sparsity,
)
from llmopt.kernels.sparsegpt import SparseGPTConfig, sparsegpt_prune
from llmopt.kernels.wanda import wanda_prune

torch.set_num_threads(1)


def make_layer(out: int = 64, cols: int = 256, tokens: int = 1024, dead: int = 0, seed: int = 0):
    """W (out, in), calibration X = A Z + noise (in, N) with correlated channels and 4 outlier channels."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g)
    A = torch.randn(cols, 32, generator=g)  # channels share 32 latent factors → correlated
    X = A @ torch.randn(32, tokens, generator=g) + 0.3 * torch.randn(cols, tokens, generator=g)
    X[torch.randperm(cols, generator=g)[:4]] *= 20.0  # a few outlier input channels
    if dead:
        X[cols - dead :] = 0.0  # channels that never fire
    H = 2 * X @ X.T / tokens  # (in, in)
    return W, X, H, (X**2).sum(dim=1)


def run_all(W, H, act_sq_norm, sparsity, n_m=None, block_size=128):
    cfg = SparseGPTConfig(block_size=block_size)
    return {
        "magnitude": magnitude_prune(W, sparsity, n_m),
        "wanda": wanda_prune(W, act_sq_norm, sparsity, n_m),
        "sparsegpt": sparsegpt_prune(W, H, sparsity, n_m, cfg),
    }


@pytest.mark.parametrize("sparsity,n_m", [(0.5, None), (0.5, (2, 4)), (0.5, (4, 8))])
def test_reconstruction_error_order(sparsity, n_m):
    W, X, H, act = make_layer()
    res = run_all(W, H, act, sparsity, n_m)
    err = {k: float(((W - r.weight) @ X).pow(2).sum()) for k, r in res.items()}
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err
    # SparseGPT's loss is the same objective, through H (H = 2 X Xᵀ / N).
    N = X.shape[1]
    assert res["sparsegpt"].loss == pytest.approx(err["sparsegpt"] * 2 / N, rel=1e-3)
    assert res["sparsegpt"].loss == pytest.approx(weighted_error(W, res["sparsegpt"].weight, H))


@pytest.mark.parametrize("n_m", [(2, 4), (4, 8), (1, 4)])
def test_nm_masks_exact(n_m):
    n, m = n_m
    W, _, H, act = make_layer(cols=128)
    for name, r in run_all(W, H, act, 0.5, n_m).items():
        zeros_per_group = (~r.mask).reshape(W.shape[0], -1, m).sum(-1)
        assert (zeros_per_group == n).all(), name
        assert r.weight.dtype == torch.float32 and r.mask.dtype == torch.bool
        assert torch.equal(r.weight == 0, ~r.mask), name  # pruned ⇔ exactly zero


@pytest.mark.parametrize("sparsity,cols", [(0.0, 200), (0.3, 200), (0.5, 256), (0.3, 256), (0.7, 130)])
def test_unstructured_sparsity_exact(sparsity, cols):
    W, _, H, act = make_layer(cols=cols)
    expected = round(sparsity * W.numel())
    for name, r in run_all(W, H, act, sparsity, block_size=128).items():
        assert int((~r.mask).sum()) == expected, name
        assert torch.equal(r.weight == 0, ~r.mask), name
        if sparsity == 0.0:
            assert r.loss == pytest.approx(0.0, abs=1e-6), name
            assert torch.allclose(r.weight, W), name


def test_wanda_unstructured_is_per_row():
    W, _, _, act = make_layer(cols=200)
    r = wanda_prune(W, act, 0.3)
    assert ((~r.mask).sum(1) == 60).all()  # 0.3 · 200 exactly per row


def test_mask_helpers_deterministic_ties():
    flat = torch.zeros(2, 8)
    assert nm_mask(flat, 2, 4).tolist() == [[False, False, True, True] * 2] * 2
    assert row_topk_mask(flat, 0.25).tolist() == [[False, False] + [True] * 6] * 2
    q = cumulative_quotas(0.3, [128 * 64, 72 * 64])
    assert sum(q) == round(0.3 * 200 * 64) and q == [2458, 1382]


def test_dead_columns_no_nan():
    W, _, H, act = make_layer(cols=128, dead=8)
    for n_m in (None, (2, 4)):
        for name, r in run_all(W, H, act, 0.5, n_m).items():
            assert torch.isfinite(r.weight).all() and r.loss == r.loss, name
            assert (r.weight[~r.mask] == 0).all(), name
        assert (res := sparsegpt_prune(W, H, 0.5, n_m)).weight[:, -8:].abs().sum() == 0
        assert int((~res.mask).sum()) == W.numel() // 2


def test_owl_sparsities():
    ratios = [0.01, 0.05, 0.02, 0.03, 0.011]
    target, lam = 0.6, 0.08
    S = owl_sparsities(ratios, target, lam)
    assert sum(S) / len(S) == pytest.approx(target, abs=1e-12)
    assert all(target - lam - 1e-12 <= s <= target + lam + 1e-12 for s in S)
    assert S[1] == min(S) and S[0] == max(S)  # most outliers → least pruned
    assert sorted(range(5), key=lambda i: S[i]) == sorted(range(5), key=lambda i: -ratios[i])
    assert owl_sparsities([0.1, 0.1], 0.5) == [0.5, 0.5]
    # Near the edges λ shrinks so every layer stays in [0, 1) with the mean still exact.
    S = owl_sparsities(ratios, 0.97, lam)
    assert sum(S) / len(S) == pytest.approx(0.97, abs=1e-12) and max(S) < 1.0


def test_outlier_ratio():
    W, X, _, _ = make_layer()
    norm = X.norm(dim=1)
    r = outlier_ratio(W, norm)
    score = W.abs() * norm
    assert r == pytest.approx(float((score > 5 * score.mean()).float().mean()))
    assert 0 < r < 0.2
    assert layer_outlier_ratio([(W, norm), (W, norm)]) == pytest.approx(r)
    assert outlier_ratio(W, torch.ones(W.shape[1])) < r  # outlier channels create outlier scores


@pytest.mark.parametrize(
    "sparsity,n_m,match",
    [
        (0.5, (4, 4), "1 <= N < M"),
        (0.5, (0, 4), "1 <= N < M"),
        (0.5, (2, 3), "does not divide"),
        (1.0, None, "prune every weight"),
        (-0.1, None, r"\[0, 1\)"),
        (float("nan"), None, r"\[0, 1\)"),
    ],
)
def test_bad_inputs(sparsity, n_m, match):
    W, _, H, act = make_layer(cols=128)
    with pytest.raises(LLMOptError, match=match) as e:
        validate_sparsity(sparsity, n_m, 128, name="model.layers.0.mlp.up_proj")
    assert "\n" not in str(e.value)
    for fn in (
        lambda: magnitude_prune(W, sparsity, n_m),
        lambda: wanda_prune(W, act, sparsity, n_m),
        lambda: sparsegpt_prune(W, H, sparsity, n_m),
    ):
        with pytest.raises(LLMOptError, match=match):
            fn()


def test_bad_sparsegpt_config():
    W, _, H, _ = make_layer(cols=128)
    with pytest.raises(LLMOptError, match="multiple of M"):
        sparsegpt_prune(W, H, 0.5, (2, 4), SparseGPTConfig(block_size=6))
    with pytest.raises(ValidationError, match="block_size"):
        SparseGPTConfig(block_size=0)
    with pytest.raises(ValidationError, match="damp"):
        SparseGPTConfig(damp=0.0)
    with pytest.raises(LLMOptError, match="OWL target"):
        owl_sparsities([0.1, 0.2], 1.0)
