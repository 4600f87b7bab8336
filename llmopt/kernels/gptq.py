"""GPTQ: one-shot weight quantization with OBS error compensation (Frantar et al. 2022, arXiv 2210.17323).

Follows Algorithm 1 of the paper and the IST-DASLab reference ``GPTQ.fasterquant``: quantize the
columns of W one at a time in a fixed order (§3 "arbitrary order insight"); after each column spread
its error (w − q) / U_jj over the not-yet-quantized columns of the current block of B columns, and
apply the block's accumulated update to all later columns in one matrix product (§3 "lazy batch
updates"); the rows of U, the upper Cholesky factor of H⁻¹, give every quantity needed without
re-inverting H (§3 "Cholesky reformulation").

The number format is a :class:`~llmopt.formats.QuantFormat`; this kernel only asks it for group
parameters, codes and values, so it serves int and GGUF formats alike.

Groups. With a group size, each group's parameters are chosen when the walk reaches its first column,
from the weights *as updated so far* (IST-DASLab default), or, with ``static_groups``, for all groups
up front from the original W (IST-DASLab ``--static-groups``). ``act_order`` (IST-DASLab
``--act-order``) walks the columns by decreasing diag(H); it then requires ``static_groups`` for any
grouped format (int with a group size, all GGUF formats), so that every group is still a contiguous
run of columns in the ORIGINAL order and the result can be exported without a g_idx permutation.
We raise rather than silently switch static groups on, so a recipe always says what it runs.

Scale search. ``mse_grid`` > 0 asks the format for searched group parameters (clipping candidates and
least-squares refits, scored per group by Σ_j diag(H)_j (w_j − ŵ_j)², :meth:`QuantFormat.qparams`):
once on the original W for static groups, or per group from the weights as updated so far. The
search is batched over candidates and groups, a small fraction of the column walk's cost.
``search_weight="imatrix"`` weighs each weight's error by diag(H)_j · sqrt(σ²_row + w²) instead, as
llama.cpp's importance-matrix quantization does. ``refit`` re-solves every group's scale for the codes
the walk chose, under the full layer objective (:func:`refit_scales`). Both are off by default: on the
embedded model neither beat the default on a text outside the calibration domain
(eval/results/gguf-q4_0-variants.md).

Damping. λ = damp · mean(diag H) is added to diag H (§4); if H + λI is still not positive definite the
Cholesky is retried with 10× the damping (:func:`inverse_hessian_cholesky`). The damping actually used
is returned in :class:`QuantResult` and a warning names the Linear when it exceeds the configured value
(at 1000× GPTQ degenerates towards RTN).

Asymmetric calibration. ``asymmetric`` (GPTAQ, arXiv 2504.02692; :mod:`llmopt.kernels.gptaq`) targets the
uncompressed model's outputs WX from the inputs X̃ the compressed model gives the layer; given the statistic
G = 2/N (X − X̃) X̃ᵀ it changes only where the walk starts, the walk itself is the same.

Sparsity. ``keep_mask`` (True = kept, from a pruning stage) is honoured as in SparseGPT §3.5 (joint
sparsification + quantization): when a column is reached its pruned entries are set to 0 before
rounding, and the error of doing so is compensated like any quantization error; so error propagation
never brings a pruned weight back. 0 maps to an exact 0 for every format whose grid contains it (int,
q8_0, q4_0, q5_0); q4_1/q5_1 round it to the nearest code and ``pruned_nonzero`` counts the misses.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from llmopt.core.config import StrictModel
from llmopt.errors import LLMOptError
from llmopt.formats import QParams, QuantFormat, QuantResult
from llmopt.kernels.gptaq import asymmetric_start
from llmopt.kernels.hessian import (
    hessian_in_walk_order,
    inverse_hessian_cholesky,
    prepare,
    prepare_weight,
    weighted_error,
)

log = logging.getLogger(__name__)


def search_weights(
    W: torch.Tensor,
    importance: torch.Tensor,
    kind: str,
    sigma2: torch.Tensor | None = None,
    fmt: QuantFormat | None = None,
):
    """Weights of the scale search's error Σ_j weight_j (w_j − ŵ_j)² for the weights W: (rows, g).

    "hessian": the column importance diag(H)_j, (g,). "imatrix": diag(H)_j · sqrt(σ² + w_ij²) per weight,
    (rows, g), σ² = the row's mean squared weight (``sigma2``: (rows, 1), default from W), as llama.cpp's
    importance-matrix quantization weighs its block-scale fits (ggml-quants.c ``quantize_row_q4_0_impl``).
    A format that takes an imatrix itself (``fmt.takes_imatrix``: the super-block formats, which run
    llama.cpp's own ``quantize_row_*_impl`` and form those per-weight weights inside) gets diag(H) either way.
    """
    if kind == "hessian" or getattr(fmt, "takes_imatrix", False):
        return importance
    if sigma2 is None:
        sigma2 = W.square().mean(1, keepdim=True)
    return importance[None, :] * (sigma2 + W.square()).sqrt()


class GPTQConfig(StrictModel):
    """GPTQ's settings, validated once. The recipe's ``gptq`` entry *is* this object (its stage config
    subclasses it with the format and target fields), and the kernel receives it as it is.

    The defaults are the shipped ones, the best measured (eval/results/gptq-defaults.md): act-order with
    static (contiguous, exportable) groups and the Hessian-weighted scale search on a 20-point grid. The
    paper's plain GPTQ is ``GPTQConfig(act_order=False, static_groups=False, mse_grid=0)``."""

    block_size: PositiveInt = 128  # B: columns updated lazily together (§3 "lazy batch updates")
    damp: PositiveFloat = 0.01  # fraction of mean(diag H) added to diag H before inverting (§4 "dampening")
    act_order: bool = True  # walk columns by decreasing diag(H); grouped formats need static_groups
    static_groups: bool = True  # all group parameters from the original W, before any update
    mse_grid: NonNegativeInt = 20  # > 0: Hessian-weighted scale search for group parameters (QuantFormat.qparams)
    # what the search weighs each weight's error by: "hessian" = diag(H)_j; "imatrix" = diag(H)_j ·
    # sqrt(σ²_row + w_ij²), llama.cpp's importance-matrix weighting (quantize_row_q4_0_impl)
    search_weight: Literal["hessian", "imatrix"] = "hessian"
    # after the walk, refit every group's scale for the codes GPTQ chose, minimising the layer objective
    # tr((W − Ŵ) H (W − Ŵ)ᵀ) with all groups of a row coupled through H (:func:`refit_scales`)
    refit: bool = False
    # GPTAQ (arXiv 2504.02692, :mod:`llmopt.kernels.gptaq`): minimise ‖WX − ŴX̃‖², X the Linear's inputs in the
    # uncompressed model, X̃ those through the compressed earlier layers, instead of ‖WX̃ − ŴX̃‖². The engine then
    # carries both activation streams (twice the activations' memory, one more forward per statistics pass)
    asymmetric: bool = False
    asym_alpha: NonNegativeFloat = 0.25  # weight of the asymmetric term: GPTQModel's alpha; 1 = the paper's Eq. 18
    # "gptaq": the paper's decomposition (each column's asymmetry absorbed by the columns after it);
    # "exact": start from the least-squares optimum W + α W G H⁻¹ (kernels.gptaq, for comparison)
    asym_form: Literal["gptaq", "exact"] = "gptaq"


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    fmt: QuantFormat,
    cfg: GPTQConfig = GPTQConfig(),  # noqa: B008 (frozen, immutable default)
    keep_mask: torch.Tensor | None = None,
    name: str | None = None,
    dxxt: torch.Tensor | None = None,
) -> QuantResult:
    """Quantize W onto ``fmt`` minimising ‖WX − ŴX‖² (GPTQ Algorithm 1).

    W: (out, in); H: (in, in) = 2 X Xᵀ / N from calibration inputs X: (in, N); keep_mask: (out, in)
    bool, True = kept. ``name`` (the layer) only makes error messages precise. With ``cfg.asymmetric`` and
    ``dxxt`` = 2/N (X − X̃) X̃ᵀ (in, in), H from X̃: GPTAQ, minimising ‖WX − ŴX̃‖² instead (GPTQ's walk from
    :func:`~llmopt.kernels.gptaq.asymmetric_start`; ``dxxt`` None: X = X̃, plain GPTQ; ``refit`` then fits the
    scales to that start, and ``loss`` stays GPTQ's).
    Returns codes and dequantized weights in the original column order, group parameters (rows,
    n_groups) in the original group order, and ``loss`` = tr((W − Ŵ) H (W − Ŵ)ᵀ).
    Dead input columns (diag H == 0) are zeroed before quantization (their inputs are always 0).
    """
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"H must be ({cols}, {cols}) for W of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    if keep_mask is not None and keep_mask.shape != W.shape:
        raise ValueError(f"keep_mask must have W's shape {tuple(W.shape)}, got {tuple(keep_mask.shape)}")
    fmt.check_width(cols, name)
    g = fmt.group_size
    static = g is None or cfg.static_groups  # per-channel params are always computed up front
    if cfg.act_order and not static:
        raise LLMOptError(
            f"GPTQ act_order with {fmt} (groups of {g}) needs static_groups=True so groups stay contiguous "
            "in the original column order; set static_groups: true or act_order: false"
        )

    W_orig, H_orig = W, H
    # W: a float32 copy with dead columns zeroed. H is not copied here: the Cholesky step makes its own prepared
    # copy in walk order (hessian_in_walk_order), so only H itself and the factors are ever alive (in, in).
    W, dead = prepare_weight(W, H)
    keep = None if keep_mask is None else keep_mask.to(device=W.device, dtype=torch.bool)
    if keep is not None:
        W = W * keep  # pruned weights start (and will end) at 0
    start = None
    if cfg.asymmetric and dxxt is not None:  # GPTAQ: the walk starts where it minimises ‖WX − ŴX̃‖²
        _, Hp, _ = prepare(W, H)  # float32 copy, dead columns on a unit diagonal
        W = start = asymmetric_start(W, Hp, dxxt, cfg.act_order, cfg.asym_alpha, cfg.damp, cfg.asym_form, name)
        del Hp
    importance = torch.diag(H).to(torch.float32)  # (in,) column weights for the optional clipping search
    importance[dead] = 1.0  # the prepared H's diagonal

    # (out, 1) row mean of w² for the "imatrix" search weights, from the whole row also for dynamic groups
    sigma2 = W.square().mean(1, keepdim=True) if cfg.search_weight == "imatrix" else None
    qp_static = None
    if static:
        weight = search_weights(W, importance, cfg.search_weight, sigma2, fmt)
        qp_static = fmt.qparams(W, cfg.mse_grid, weight).on_grid()
    col = torch.arange(cols, device=W.device)  # original index of the j-th column walked
    if cfg.act_order:
        col = torch.argsort(importance, descending=True, stable=True)
        W = W[:, col]
        keep = None if keep is None else keep[:, col]
        importance = importance[col]
    group_of = [0] * cols if g is None else (col // g).tolist()  # group of the j-th column walked
    # static groups: each group's (out, 1, 1) parameters grouped once, not once per column
    per_group = None if qp_static is None else [qp_static.select(k).grouped() for k in range(qp_static.n_groups)]

    order = col if cfg.act_order else None
    # (in, in) upper Cholesky of (H + λI)⁻¹, H in walk order with dead columns on a unit diagonal
    U, damp = inverse_hessian_cholesky(None, cfg.damp, name=name, fresh=lambda: hessian_in_walk_order(H, dead, order))
    WT = W.t().contiguous()
    del W  # the walk works on its transpose; freeing the rest as soon as it is done keeps the peak to one copy
    QT, CT, dynamic = _walk(WT, U, fmt, cfg, group_of, per_group, keep, importance, sigma2)
    del WT, U  # QT is WT, now holding Qᵀ; U is done
    Q, codes = QT.t().contiguous(), CT.t().contiguous()
    del QT, CT

    if cfg.act_order:
        inv = torch.argsort(col)
        Q, codes = Q[:, inv], codes[:, inv]
    qparams = qp_static if qp_static is not None else QParams.cat(dynamic)
    if cfg.refit:
        qparams, Q = refit_scales(W_orig if start is None else start, H_orig, codes, qparams, fmt)
    pruned_nonzero = 0 if keep_mask is None else int(((Q != 0) & ~keep_mask.to(torch.bool)).sum())
    loss = weighted_error(W_orig, Q, H_orig)
    log.debug("GPTQ %s %s %dx%d: loss %.4g, damp %g", name or "", fmt, rows, cols, loss, damp)
    return QuantResult(codes=codes, qparams=qparams, weight=Q, loss=loss, pruned_nonzero=pruned_nonzero, damp=damp)


SUB_BLOCK = 16  # columns whose updates inside a block are rank-1; the rest of the block gets them as one product


def _walk(
    WT: torch.Tensor,
    U: torch.Tensor,
    fmt: QuantFormat,
    cfg: GPTQConfig,
    group_of: list[int],
    per_group: list[QParams] | None,
    keep: torch.Tensor | None,
    importance: torch.Tensor,
    sigma2: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, list[QParams]]:
    """The column walk of Algorithm 1 on WT = Wᵀ: (in, out), columns in walk order, updated in place.

    Wᵀ makes each column a contiguous row, so the per-column work (round, error, rank-1 update) runs on
    contiguous memory. The lazy batch updates are applied at two levels: within a sub-block of
    ``SUB_BLOCK`` columns after each column (rank-1), to the rest of the block of ``block_size`` columns
    after each sub-block, and to all later columns after each block (one matrix product each). This is
    the same arithmetic as the paper's single level, reordered; it cuts the rank-1 traffic, which
    dominated the walk. With dynamic groups every parameter block (a group; a super-block of 256 columns
    for the K-quants, whose groups' parameters are chosen together) also starts a block, so when its
    parameters are chosen all of its columns hold every update from the columns before it.
    Returns (Qᵀ, codesᵀ, dynamic params): (in, out) in walk order, Qᵀ being WT itself, quantized in place.
    """
    cols, rows = WT.shape
    g = fmt.group_size
    pb = getattr(fmt, "param_block", None) or g  # columns whose parameters are chosen together (K-quants: 256)
    starts = set(range(0, cols, cfg.block_size))
    if per_group is None:  # dynamic groups (always with a group size: per-channel parameters are static)
        starts |= set(range(0, cols, pb))
    block_groups: list[QParams] = []
    bounds = sorted(starts) + [cols]
    d = U.diagonal()
    # Q is written over W's own rows: column j is never read again once it is quantized (every update goes to
    # the columns after it), so WT becomes Qᵀ in place; the errors are kept for the current block only.
    CT = torch.empty(cols, rows, dtype=fmt.code_dtype, device=WT.device)
    ErrB = torch.empty(min(cfg.block_size, cols), rows, dtype=WT.dtype, device=WT.device)  # blocks: ≤ block_size
    keepT = None if keep is None else keep.t().contiguous()
    dynamic: list[QParams] = []
    for i1, i2 in zip(bounds[:-1], bounds[1:]):
        ErrT = ErrB[: i2 - i1]  # (block, out) errors (w − q) / U_jj of this block's columns, row j − i1
        for k1 in range(i1, i2, SUB_BLOCK):
            k2 = min(k1 + SUB_BLOCK, i2)
            for j in range(k1, k2):
                if per_group is not None:
                    qp = per_group[group_of[j]]  # (out, 1, 1)
                elif j % pb == 0:  # a parameter block's first column: parameters from the weights as updated so far
                    Wg = WT[j : j + pb].t().contiguous()  # (out, pb): every earlier column's update is applied
                    if keepT is not None:
                        Wg = Wg * keepT[j : j + pb].t()
                    imp = importance[j : j + pb]
                    weight = search_weights(Wg, imp, cfg.search_weight, sigma2, fmt)
                    chosen = fmt.qparams(Wg, cfg.mse_grid, weight).on_grid()  # (out, pb / g)
                    dynamic.append(chosen)
                    block_groups = [chosen.select(k).grouped() for k in range(chosen.n_groups)]
                    qp = block_groups[0]
                elif j % g == 0:
                    qp = block_groups[(j % pb) // g]
                w = WT[j]  # (out,)
                target = w if keepT is None else w * keepT[j]  # pruned → 0 (SparseGPT §3.5)
                c, q = fmt.round_column(target, qp)
                err = (w - q).div_(d[j])
                if j + 1 < k2:  # OBS update of the rest of the sub-block
                    WT[j + 1 : k2].addr_(U[j, j + 1 : k2], err, alpha=-1)
                WT[j], CT[j], ErrT[j - i1] = q, c, err
            if k2 < i2:  # the sub-block's update of the rest of the block
                WT[k2:i2].addmm_(U[k1:k2, k2:i2].t(), ErrT[k1 - i1 : k2 - i1], alpha=-1)
        if i2 < cols:  # lazy update of all later columns
            WT[i2:].addmm_(U[i1:i2, i2:].t(), ErrT, alpha=-1)
    return WT, CT, dynamic


def refit_scales(
    W: torch.Tensor,
    H: torch.Tensor,
    codes: torch.Tensor,
    qp: QParams,
    fmt: QuantFormat,
    row_chunk_elems: int = 1 << 24,
) -> tuple[QParams, torch.Tensor]:
    """Best scales for fixed codes under the layer objective: per row r, with Ŵ_r = Σ_b d_rb · l_rb (l: the
    codes' levels, :meth:`QuantFormat.levels`, zero outside group b), minimise (w_r − Ŵ_r) H (w_r − Ŵ_r)ᵀ:
    the normal equations M_r d_r = v_r, M_r[b, c] = l_rbᵀ H_bc l_rc, v_r[b] = l_rbᵀ (H w_rᵀ)_b, an
    (n_groups × n_groups) solve per row. Scales are rounded to fp16 as stored; a row keeps its old scales
    unless the new ones lower its objective, so the layer objective never rises. Formats whose values
    have an offset besides the scale (q4_1/q5_1) are returned unchanged. Returns (params, Ŵ).
    """
    W = W.to(torch.float32)
    H = H.to(torch.float32)
    Q = fmt.dequantize(codes, qp)
    L = fmt.levels(codes, qp)
    if L is None:
        return qp, Q
    rows, cols = W.shape
    nb = qp.n_groups
    g = cols // nb
    Hb = H.reshape(cols, nb, g)  # H[i, (c, j)]
    WH = W @ H  # (rows, cols): (H w_rᵀ)ᵀ per row
    new_scale = torch.empty_like(qp.scale)
    step = max(1, row_chunk_elems // (cols * nb))
    for r0 in range(0, rows, step):
        Lg = L[r0 : r0 + step].reshape(-1, nb, g)  # (R, nb, g)
        Z = torch.einsum("icj,rcj->ric", Hb, Lg)  # (R, cols, nb): Σ_{j in c} H_ij l_rj
        M = torch.einsum("rbi,rbic->rbc", Lg, Z.reshape(-1, nb, g, nb))  # (R, nb, nb)
        v = (Lg * WH[r0 : r0 + step].reshape(-1, nb, g)).sum(-1)  # (R, nb)
        ridge = 1e-6 * M.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)  # (R,): all-zero groups stay solvable
        M.diagonal(dim1=1, dim2=2).add_(ridge[:, None])
        d0 = qp.scale[r0 : r0 + step]
        new_scale[r0 : r0 + step] = torch.linalg.solve(M, v + ridge[:, None] * d0)
    new_scale = new_scale.to(torch.float16).to(torch.float32)
    new_scale = torch.where(torch.isfinite(new_scale), new_scale, qp.scale)
    cand = QParams(new_scale, qp.zero)
    Q_new = fmt.dequantize(codes, cand)

    def row_loss(Wh: torch.Tensor) -> torch.Tensor:
        E = W - Wh
        return ((E @ H) * E).sum(1)

    better = row_loss(Q_new) < row_loss(Q)  # (rows,)
    scale = torch.where(better[:, None], new_scale, qp.scale)
    out = QParams(scale, qp.zero)
    return out, torch.where(better[:, None], Q_new, Q)
