"""GPTAQ: GPTQ with asymmetric calibration (Li et al. 2025, "GPTAQ: Efficient Finetuning-Free Quantization for
Asymmetric Calibration", arXiv 2504.02692; GPTQModel's ``v2=True``, ``GPTAQ.quantize``).

GPTQ makes the quantized layer reproduce its *own* outputs on the inputs it is given: min ‖WX̃ − ŴX̃‖², X̃ the
layer's inputs as they arrive through the already-quantized earlier layers. GPTAQ asks it to reproduce the
uncompressed model's outputs instead: min ‖WX − ŴX̃‖², X the same tokens' inputs in the uncompressed model,
so each layer also corrects what the layers before it got wrong. With ΔX = X − X̃,

    WX − ŴX̃ = (W − Ŵ) X̃ + W ΔX,

and besides H = 2/N X̃X̃ᵀ the objective needs one more statistic, G = 2/N ΔX X̃ᵀ (in, in), G[a, b] =
2/N Σ_n Δx_a x̃_b (the reference's ``dXXT``).

The column walk (the paper's Eq. 18 and its "neuron decomposition"). When column q is fixed to q̂, what the remaining
columns F = {q+1, …} must absorb is its quantization error (w_q − q̂) x̃_q, as in GPTQ, *and* its share of the
asymmetry, w_q Δx_q. The least-squares answer on X̃_F adds, to GPTQ's update of the later columns,

    w_q · G[q, F] (H_FF)⁻¹ = w_q · P[q, F],    P = (G Uᵀ).triu(1) U,

where U is the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU; (H_FF)⁻¹ = U_FFᵀ U_FF, the identity behind GPTQ's
Cholesky reformulation), so P is strictly upper triangular and costs two matrix products up front.

Which w_q. The term is the asymmetry of the weight the *uncompressed* model applies to input q, so w_q is
the original weight of column q: then every later column's total share, Σ_{q<j} w_q P[q, j], is known
before the walk starts, and adding a column's shares before the walk or just before the walk reaches it
gives the same codes (a column's own value never changes the errors of the columns walked before it).
GPTAQ is therefore GPTQ's unchanged walk started from W + α W P (:func:`asymmetric_start`). The reference
implementation multiplies P by the column's running value inside a block and by its quantized value across
blocks: both equal the original weight up to the (small) updates and errors, a second-order difference.

``alpha``: the reference implementation scales the asymmetric term by α = 0.25 (GPTQModel's
``GPTAQConfig.alpha`` default; not in the paper's equations, FOEM's docs note it is applied to Eq. 18's last
term); α = 1 is Eq. 18 as written, α = 0 is GPTQ.

``form="exact"`` (not in the paper; kept for the benchmark's comparison): start from the unconstrained
least-squares optimum of the asymmetric objective, W + α W G H⁻¹, which is where OBS starts for this
objective; the walk then keeps every not-yet-quantized column at its exact conditional optimum, where the
paper's decomposition assigns each column's asymmetry to the columns after it only.
"""

from __future__ import annotations

import torch

from llmopt.kernels.hessian import inverse_hessian_cholesky


def asymmetric_start(
    W: torch.Tensor,
    H: torch.Tensor,
    G: torch.Tensor,
    act_order: bool,
    alpha: float,
    damp: float,
    form: str = "gptaq",
    name: str | None = None,
) -> torch.Tensor:
    """The weights GPTQ's walk starts from so that it minimises ‖WX − ŴX̃‖² (see the module docstring).

    W: (out, in) float32, dead columns already zeroed; H: (in, in) = 2/N X̃X̃ᵀ with dead columns on a unit
    diagonal; G: (in, in) = 2/N (X − X̃) X̃ᵀ (its dead columns are 0 already: x̃ is 0 there, and its dead rows
    meet W's zero columns); ``act_order``: the walk goes by decreasing diag H, as in :func:`gptq_quantize`
    (P depends on the order; the exact form does not). Damping as the walk's own (λ = damp · mean diag H,
    raised on failure). Returns W + α W P (form "gptaq", Eq. 18) or W + α W G (H + λI)⁻¹ (form "exact"),
    (out, in), in the original column order.
    """
    G = G.to(device=W.device, dtype=torch.float32)
    if form == "exact":
        U, _ = inverse_hessian_cholesky(H, damp, name=name)  # (in, in), H⁻¹ = UᵀU
        return W + alpha * ((W @ G) @ U.t()) @ U
    cols = W.shape[1]
    order = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(cols)
    order = order.to(W.device)  # (in,) the walk's column order, as gptq_quantize computes it
    Hp, Gp = H[order[:, None], order], G[order[:, None], order]  # walk order
    U, _ = inverse_hessian_cholesky(Hp, damp, name=name)
    P = torch.triu(Gp @ U.t(), diagonal=1) @ U  # (in, in) strictly upper triangular, walk order
    shift = torch.empty_like(W)
    shift[:, order] = W[:, order] @ P  # (out, in): Σ_{q before j} w_q P[q, j], back in the original order
    return W + alpha * shift
